//! Kubernetes NetworkPolicy on real connections: a truth table of the kinds of cases
//! Kubernetes' own network-policy conformance tests use (namespaces x, y, z; pods a, b, c),
//! checked pair by pair on the sandbox, and for every pair the exact evaluation
//! (`Snapshot::authorize` on the same files the ztunnels load) must give the same verdict.
//! One cluster for every case; policies change with `set_policy`.
mod support;

use std::collections::BTreeMap;
use std::process::Command;

use palisade_model::Action;
use palisade_sandbox::{Cluster, PodTemplate};
use support::*;

const EPERM: i64 = 1;
const ECONNREFUSED: i64 = 111;
/// Every pod serves these; `a` names 81 `p81`.
const PORTS: [u16; 2] = [80, 81];

const NAMESPACES: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {ns: y}}
---
apiVersion: v1
kind: Namespace
metadata: {name: z, labels: {ns: z}}
---
";

/// `pod` names: `<namespace><label>`: xa, xb (node 1); ya, yb, zc (node 2).
fn pod(name: &str) -> PodTemplate {
    let (ns, label) = name.split_at(1);
    let mut t = PodTemplate::new(name, ns, name);
    t.labels = BTreeMap::from([("pod".to_string(), label.to_string())]);
    if name == "xa" {
        t.ports = vec![("p81".into(), 81)];
    }
    t
}

const PODS: [&str; 5] = ["xa", "xb", "ya", "yb", "zc"];

fn np(name: &str, namespace: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}---\n"
    )
}

fn seg(name: &str, namespace: &str, spec: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}---\n"
    )
}

struct Case {
    name: &'static str,
    policy: String,
    /// Kubernetes' verdict for (source pod, destination pod, port).
    allowed: fn(&str, &str, u16) -> bool,
}

fn cases(yb_ip: &str, node2_cidr: &str) -> Vec<Case> {
    vec![
        Case { name: "no policy", policy: String::new(), allowed: |_, _, _| true },
        Case {
            name: "default deny ingress in x",
            policy: np("deny-in", "x", "  podSelector: {}\n"),
            allowed: |_, dst, _| !dst.starts_with('x'),
        },
        Case {
            name: "default deny egress in y",
            policy: np("deny-out", "y", "  podSelector: {}\n  policyTypes: [Egress]\n"),
            allowed: |src, _, _| !src.starts_with('y'),
        },
        Case {
            name: "namespaceSelector AND podSelector (one peer)",
            policy: np(
                "and",
                "x",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  \
                 - from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]\n",
            ),
            allowed: |src, dst, _| dst != "xa" || src == "yb",
        },
        Case {
            name: "namespaceSelector OR podSelector (two peers), podSelector in the policy's namespace",
            policy: np(
                "or",
                "x",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  \
                 - from: [{namespaceSelector: {matchLabels: {ns: y}}}, {podSelector: {matchLabels: {pod: b}}}]\n",
            ),
            // yb is a `pod: b` too, but of y: it is allowed through the namespace peer; zc by neither.
            allowed: |src, dst, _| dst != "xa" || src != "zc",
        },
        Case {
            name: "ipBlock with except (pod addresses)",
            policy: np(
                "block",
                "x",
                &format!(
                    "  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  \
                     - from: [{{ipBlock: {{cidr: {node2_cidr}, except: [{yb_ip}/32]}}}}]\n"
                ),
            ),
            allowed: |src, dst, _| dst != "xa" || src == "ya" || src == "zc",
        },
        Case {
            name: "named port",
            policy: np("named", "x", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: p81}]\n"),
            allowed: |_, dst, port| dst != "xa" || port == 81,
        },
        Case {
            name: "endPort range",
            policy: np(
                "range",
                "x",
                "  podSelector: {}\n  ingress:\n  - ports: [{protocol: TCP, port: 81, endPort: 90}]\n",
            ),
            allowed: |_, dst, port| !dst.starts_with('x') || port == 81,
        },
        Case {
            // Without policyTypes, a policy affects ingress too: y is isolated both ways.
            name: "egress allowed to a namespace (implicit name label), policyTypes defaulted",
            policy: np(
                "to-z",
                "y",
                "  podSelector: {}\n  egress:\n  \
                 - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}}]\n",
            ),
            allowed: |src, dst, _| (!src.starts_with('y') || dst == "zc") && !dst.starts_with('y'),
        },
        Case {
            name: "union of two policies selecting one pod",
            policy: np(
                "from-y",
                "x",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]\n",
            ) + &np(
                "from-xb",
                "x",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n    ports: [{port: 80}]\n",
            ),
            allowed: |src, dst, port| dst != "xa" || src.starts_with('y') || (src == "xb" && port == 80),
        },
        Case {
            name: "a Palisade Deny beats a NetworkPolicy allow (both select xa)",
            policy: np(
                "from-y",
                "x",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]\n",
            ) + &seg(
                "no-81-from-y",
                "x",
                "  selector: {matchLabels: {pod: a}}\n  action: Deny\n  rules:\n  - from: [{namespaces: [y]}]\n    ports: [81]\n",
            ),
            allowed: |src, dst, port| dst != "xa" || (src.starts_with('y') && port == 80),
        },
        Case {
            name: "SegmentationPolicy egress: zc may reach x only",
            policy: seg("z-to-x", "z", "  selector: {}\n  action: Allow\n  egress:\n  - to: [{namespaces: [x]}]\n"),
            allowed: |src, dst, _| src != "zc" || dst.starts_with('x'),
        },
        Case { name: "policies deleted: traffic restored", policy: String::new(), allowed: |_, _, _| true },
    ]
}

/// `palisade explain` on the cluster's policy file: true when it says Allow.
fn explain(cluster: &Cluster, src: &str, dst: &str, port: u16) -> bool {
    let out = Command::new(palisade_sandbox::workspace_bin("palisade").expect("palisade binary"))
        .arg("explain")
        .arg("--config")
        .arg(&cluster.info.policy_file)
        .args(["--from", &cluster.pod(src).unwrap().ip, "--to", &format!("{}:{port}", cluster.pod(dst).unwrap().ip)])
        .output()
        .expect("run palisade explain");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "explain failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    text.starts_with("Allow")
}

#[test]
fn network_policy_truth_table_on_real_connections() {
    let mut cluster = mesh_with(vec![vec![pod("xa"), pod("xb")], vec![pod("ya"), pod("yb"), pod("zc")]], NAMESPACES);
    let _servers: Vec<Server> =
        PODS.iter().flat_map(|p| PORTS.iter().map(|port| serve(&cluster, p, *port)).collect::<Vec<_>>()).collect();
    let yb_ip = cluster.pod("yb").unwrap().ip.clone();
    let node2_cidr = cluster.node("node-2").unwrap().pod_cidr.clone();
    let mut failures = Vec::new();
    let mut in_force = NAMESPACES.to_string();
    for case in cases(&yb_ip, &node2_cidr) {
        // An unchanged file is no new policy (ztunnel keeps its generation).
        let text = format!("{NAMESPACES}{}", case.policy);
        if text != in_force {
            cluster.set_policy(&text).unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
            in_force = text;
        }
        let snapshot = palisade_model::load_snapshot(std::slice::from_ref(&cluster.info.policy_file))
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let mut explained = (false, false);
        for src in PODS {
            for dst in PODS.iter().filter(|d| **d != src) {
                for port in PORTS {
                    let want = (case.allowed)(src, dst, port);
                    let (s, d) = (cluster.pod(src).unwrap().ip.clone(), cluster.pod(dst).unwrap().ip.clone());
                    let r = connect(&cluster, src, &format!("{d}:{port}"), 100);
                    let real = r["verified"] == true;
                    let exact = snapshot.authorize(s.parse().unwrap(), None, d.parse().unwrap(), port).verdict;
                    let exact_allows = exact.action == Action::Allow;
                    if real != want || exact_allows != want {
                        failures.push(format!(
                            "{}: {src} -> {dst}:{port}: Kubernetes {want}, connection {real} ({r}), exact {exact_allows} ({})",
                            case.name,
                            snapshot.describe_verdict(&exact)
                        ));
                    }
                    // Denied in the kernel at the source's connect(): EPERM, no packet.
                    if !want && r["errno"] != EPERM {
                        failures.push(format!("{}: {src} -> {dst}:{port}: denied but not by EPERM: {r}", case.name));
                    }
                    // `palisade explain` (offline, same file) once per verdict per case.
                    let seen = if want { &mut explained.0 } else { &mut explained.1 };
                    if !*seen {
                        *seen = true;
                        if explain(&cluster, src, dst, port) != want {
                            failures.push(format!("{}: explain {src} -> {dst}:{port} is not {want}", case.name));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} disagreements:\n{}", failures.len(), failures.join("\n"));

    // ipBlock from outside the mesh: the nodes' own addresses (plaintext, checked at xa's
    // socket lookup: a refusal is a reset).
    let node2_ip = cluster.node("node-2").unwrap().ip.clone();
    let policy = np(
        "from-node-2",
        "x",
        &format!(
            "  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from: [{{ipBlock: {{cidr: {node2_ip}/32}}}}]\n"
        ),
    );
    cluster.set_policy(&format!("{NAMESPACES}{policy}")).unwrap();
    let snapshot = palisade_model::load_snapshot(std::slice::from_ref(&cluster.info.policy_file)).unwrap();
    let xa = cluster.pod("xa").unwrap().ip.clone();
    for (node, want) in [("node-2", true), ("node-1", false)] {
        let info = cluster.node(node).unwrap();
        let out = Command::new("ip")
            .args(["netns", "exec", &info.netns])
            .arg(palisade_sandbox::workspace_bin("palisade-probe").unwrap())
            .args(["connect", "--to", &format!("{xa}:80"), "--bytes", "100", "--timeout-ms", "5000"])
            .output()
            .expect("probe in the node's namespace");
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("probe report");
        assert_eq!(r["verified"] == true, want, "{node} ({}) -> xa:80: {r}", info.ip);
        if !want {
            assert_eq!(r["errno"], ECONNREFUSED, "refused at xa's socket lookup: {r}");
        }
        let exact = snapshot.authorize(info.ip.parse().unwrap(), None, xa.parse().unwrap(), 80).verdict;
        assert_eq!(exact.action == Action::Allow, want, "exact {node} -> xa:80: {}", snapshot.describe_verdict(&exact));
    }
}

/// Egress the kernel's cells can only approximate (a port range longer than the cells spell
/// out) to a destination outside the mesh, where no destination ztunnel re-checks: the
/// outbound proxy's exact evaluation refuses what the policy does not allow.
#[test]
fn egress_beyond_what_the_kernel_can_express_is_refused_by_the_proxy() {
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: egress-range, namespace: default}\n\
                  spec:\n  podSelector: {matchLabels: {app: p1-1}}\n  policyTypes: [Egress]\n  egress:\n\
                  \x20 - to: [{ipBlock: {cidr: 172.18.0.0/24}}]\n    ports: [{protocol: TCP, port: 1000, endPort: 2000}]\n";
    let cluster = mesh(1, 1, policy);
    let node = cluster.node("node-1").unwrap();
    // Two servers outside the mesh, on the node's own address: inside the range and beyond it.
    let listeners: Vec<std::net::TcpListener> = [1500u16, 3000]
        .iter()
        .map(|port| {
            let addr = format!("{}:{port}", node.ip);
            palisade_sandbox::sys::in_netns(&node.netns, move || std::net::TcpListener::bind(addr).unwrap()).unwrap()
        })
        .collect();
    for l in &listeners {
        let l = l.try_clone().unwrap();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                });
            }
        });
    }
    let inside = connect(&cluster, "p1-1", &format!("{}:1500", node.ip), 100);
    assert_eq!(inside["verified"], true, "{inside}");
    let beyond = connect(&cluster, "p1-1", &format!("{}:3000", node.ip), 100);
    assert_eq!(beyond["ok"], false, "egress beyond the allowed range went through: {beyond}");
    let ev = wait_flow(&cluster, "node-1", |f| {
        f["observer"] == "proxy" && f["verdict"] == "deny" && f["dst"] == format!("{}:3000", node.ip)
    });
    assert!(ev["policy"].as_str().is_some_and(|p| p.contains("egress")), "{ev}");
}
