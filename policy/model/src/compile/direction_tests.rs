//! Egress, NetworkPolicy semantics and the union of policies, on both evaluations.
use std::path::Path;

use super::*;
use crate::load::parse_str;

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {env: prod}}
---
apiVersion: v1
kind: Namespace
metadata: {name: dev, labels: {env: dev}}
---
apiVersion: palisade.dev/v1alpha1
kind: Namespace
metadata: {name: ops, labels: {env: ops}}
spec: {defaultAction: Allow}
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {name: web, namespace: prod}
spec: {serviceAccount: web, labels: {app: web}, node: n1, addresses: [10.1.0.1], ports: [{name: http, containerPort: 8080}]}
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {name: db, namespace: prod}
spec: {serviceAccount: db, labels: {app: db}, node: n1, addresses: [10.1.0.2], ports: [{name: sql, containerPort: 5432}]}
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {name: web, namespace: dev}
spec: {serviceAccount: web, labels: {app: web}, node: n2, addresses: [10.2.0.1]}
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {name: client, namespace: dev}
spec: {serviceAccount: client, labels: {role: client}, node: n2, addresses: [10.2.0.2]}
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {name: client, namespace: ops}
spec: {serviceAccount: client, labels: {role: client}, node: n2, addresses: [10.3.0.1]}
"#;

const ADDRS: [&str; 7] = ["10.1.0.1", "10.1.0.2", "10.2.0.1", "10.2.0.2", "10.3.0.1", "192.0.2.9", "198.51.100.1"];
const PORTS: [u16; 6] = [22, 80, 5432, 8080, 9000, 9005];

fn snapshot(policies: &str) -> Snapshot {
    snapshot_and_warnings(policies).0
}

/// The snapshot and the validator's warnings (`file:line: resource: field: message`).
fn snapshot_and_warnings(policies: &str) -> (Snapshot, Vec<String>) {
    let text = format!("{MESH}---\n{policies}");
    let resources = parse_str(Path::new("np.yaml"), &text).expect("parses");
    crate::validate::validate(&resources).expect("valid");
    let findings = crate::validate::check(&resources, &Default::default());
    (compile(&resources), findings.iter().map(|f| f.to_string()).collect())
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Both evaluations give `allowed` for each (source, destination, port), and the kernel
/// never denies what the exact evaluation allows for any pair.
fn truth(s: &Snapshot, cases: &[(&str, &str, u16, bool)]) {
    for (src, dst, port, allowed) in cases {
        let exact = s.authorize(ip(src), None, ip(dst), *port).verdict;
        let kernel = s.verdict(ip(src), ip(dst), *port);
        let want = if *allowed { Action::Allow } else { Action::Deny };
        assert_eq!(exact.action, want, "exact {src} -> {dst}:{port}: {}", s.describe_verdict(&exact));
        assert_eq!(kernel.action, want, "kernel {src} -> {dst}:{port}: {}", s.describe_verdict(&kernel));
    }
    for src in ADDRS {
        for dst in ADDRS {
            for port in PORTS {
                let kernel = s.verdict(ip(src), ip(dst), port);
                let exact = s.authorize(ip(src), None, ip(dst), port).verdict;
                assert!(
                    !(kernel.action == Action::Deny && exact.action == Action::Allow),
                    "kernel denies what is allowed: {src} -> {dst}:{port}"
                );
            }
        }
    }
}

const NP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n";

#[test]
fn default_deny_ingress_and_egress() {
    let s = snapshot(&format!(
        "{NP}metadata: {{name: deny-in, namespace: prod}}\nspec: {{podSelector: {{}}}}\n---\n\
         {NP}metadata: {{name: deny-out, namespace: dev}}\nspec: {{podSelector: {{}}, policyTypes: [Egress]}}\n"
    ));
    truth(
        &s,
        &[
            ("10.3.0.1", "10.1.0.1", 80, false),
            ("10.1.0.2", "10.1.0.1", 80, false),
            // prod may still connect out (only ingress is isolated there).
            ("10.1.0.1", "10.3.0.1", 80, true),
            // dev may not connect anywhere, not even to the world; dev still accepts.
            ("10.2.0.2", "10.3.0.1", 80, false),
            ("10.2.0.2", "198.51.100.1", 443, false),
            ("10.3.0.1", "10.2.0.1", 80, true),
        ],
    );
    let v = s.verdict(ip("10.2.0.2"), ip("10.3.0.1"), 80);
    assert_eq!(v.rule, RULE_EGRESS_DEFAULT_DENY);
    assert_eq!(s.describe_verdict(&v), "default deny egress (selected by egress policy NetworkPolicy dev/deny-out)");
}

#[test]
fn namespace_and_pod_selectors_and_or() {
    let and = "{namespaceSelector: {matchLabels: {env: dev}}, podSelector: {matchLabels: {role: client}}}";
    let s = snapshot(&format!(
        "{NP}metadata: {{name: and, namespace: prod}}\n\
         spec: {{podSelector: {{matchLabels: {{app: db}}}}, ingress: [{{from: [{and}]}}]}}\n---\n\
         {NP}metadata: {{name: or, namespace: prod}}\n\
         spec:\n  podSelector: {{matchExpressions: [{{key: app, operator: In, values: [web]}}]}}\n  ingress:\n  \
         - from: [{{namespaceSelector: {{matchLabels: {{env: ops}}}}}}, {{podSelector: {{matchLabels: {{role: client}}}}}}]\n"
    ));
    truth(
        &s,
        &[
            // AND: a client of dev only.
            ("10.2.0.2", "10.1.0.2", 5432, true),
            ("10.3.0.1", "10.1.0.2", 5432, false),
            ("10.2.0.1", "10.1.0.2", 5432, false),
            // OR: anything in ops, or a client of prod (none): dev's client is not in prod.
            ("10.3.0.1", "10.1.0.1", 8080, true),
            ("10.2.0.2", "10.1.0.1", 8080, false),
            ("10.1.0.2", "10.1.0.1", 8080, false),
            ("192.0.2.9", "10.1.0.1", 8080, false),
        ],
    );
}

#[test]
fn ip_blocks_named_ports_end_ports_and_union() {
    let (s, warnings) = snapshot_and_warnings(&format!(
        "{NP}metadata: {{name: blocks, namespace: prod}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  \
         - from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [10.3.0.0/16]}}}}]\n    ports: [{{port: http}}]\n---\n\
         {NP}metadata: {{name: range, namespace: prod}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  \
         - ports: [{{port: 9000, endPort: 9010, protocol: TCP}}, {{port: 53, protocol: UDP}}]\n"
    ));
    truth(
        &s,
        &[
            ("10.2.0.1", "10.1.0.1", 8080, true),
            ("10.2.0.1", "10.1.0.1", 80, false),
            ("10.3.0.1", "10.1.0.1", 8080, false),
            ("192.0.2.9", "10.1.0.1", 8080, false),
            // The second policy (union): 9000-9010 from anywhere.
            ("192.0.2.9", "10.1.0.1", 9005, true),
            ("10.3.0.1", "10.1.0.1", 9000, true),
            ("10.3.0.1", "10.1.0.1", 22, false),
        ],
    );
    assert!(warnings.iter().any(|w| w.contains("np.yaml:") && w.contains("UDP is not enforced")), "{warnings:?}");
}

#[test]
fn egress_rules_of_both_kinds_and_deny_beats_allow() {
    let s = snapshot(&format!(
        "{NP}metadata: {{name: web-out, namespace: prod}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  policyTypes: [Egress]\n  egress:\n  \
         - to: [{{namespaceSelector: {{matchLabels: {{env: ops}}}}}}]\n  \
         - to: [{{podSelector: {{matchLabels: {{app: db}}}}}}]\n    ports: [{{port: sql}}]\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: web-world, namespace: prod}}\n\
         spec:\n  selector: {{matchLabels: {{app: web}}}}\n  action: Allow\n  egress:\n  \
         - to: [{{ipBlocks: [198.51.100.0/24]}}]\n    ports: [443]\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: no-ops-22, namespace: prod}}\n\
         spec:\n  action: Deny\n  egress:\n  - to: [{{namespaces: [ops]}}]\n    ports: [22]\n"
    ));
    truth(
        &s,
        &[
            ("10.1.0.1", "10.3.0.1", 80, true),
            ("10.1.0.1", "10.1.0.2", 5432, true),
            ("10.1.0.1", "10.1.0.2", 22, false),
            ("10.1.0.1", "10.2.0.2", 80, false),
            // The union with the SegmentationPolicy: the world on 443 only.
            ("10.1.0.1", "198.51.100.1", 443, true),
            ("10.1.0.1", "198.51.100.1", 80, false),
            // A Palisade Deny beats the NetworkPolicy's allow.
            ("10.1.0.1", "10.3.0.1", 22, false),
            // db: not selected by the Allow egress policies, only the Deny one.
            ("10.1.0.2", "10.2.0.2", 80, true),
            ("10.1.0.2", "10.3.0.1", 22, false),
        ],
    );
    let v = s.verdict(ip("10.1.0.1"), ip("10.1.0.2"), 5432);
    assert_eq!(s.describe_verdict(&v), "NetworkPolicy prod/web-out egress rule 1");
    let v = s.verdict(ip("10.1.0.1"), ip("10.3.0.1"), 22);
    assert_eq!(s.describe_verdict(&v), "prod/no-ops-22 egress rule 0");
}

#[test]
fn unscoped_match_labels_read_in_the_policy_namespace_and_say_so() {
    let (s, warnings) = snapshot_and_warnings(
        "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: from-web, namespace: prod}\n\
         spec:\n  selector: {matchLabels: {app: db}}\n  action: Allow\n  rules:\n  - from: [{matchLabels: {app: web}}]\n",
    );
    truth(&s, &[("10.1.0.1", "10.1.0.2", 5432, true), ("10.2.0.1", "10.1.0.2", 5432, false)]);
    assert!(
        warnings.iter().any(|w| w.contains("spec.rules[0].from[0]") && w.contains("not those of dev")),
        "{warnings:?}"
    );
}

#[test]
fn unknown_namespaces_and_unresolved_port_names_are_warnings() {
    let (s, warnings) = snapshot_and_warnings(&format!(
        "{NP}metadata: {{name: early, namespace: future}}\nspec: {{podSelector: {{}}}}\n---\n\
         {NP}metadata: {{name: grpc, namespace: prod}}\n\
         spec: {{podSelector: {{}}, ingress: [{{ports: [{{port: grpc}}]}}]}}\n"
    ));
    let joined = warnings.join("\n");
    assert!(joined.contains("NetworkPolicy future/early: metadata.namespace: namespace \"future\""), "{joined}");
    assert!(
        joined.contains("spec.ingress[0].ports[0].port: no workload has a TCP container port named \"grpc\""),
        "{joined}"
    );
    // The unresolved name matches nothing: prod is isolated.
    truth(&s, &[("10.3.0.1", "10.1.0.1", 8080, false)]);
}
