//! The waypoint on the sandbox, the real way: a captured client pod's connection to a Service
//! VIP goes through its ztunnel, over HBONE to the waypoint (the real `waypoint` binary in a
//! pod of its own, not enrolled), which routes and authorizes it and forwards over HBONE to the
//! chosen endpoint's ztunnel, then to a real HTTP/1.1 server in the endpoint pod.
//!
//! Layout: node 1 runs `client`, `intruder` and the waypoint `shop/waypoint`; node 2 runs
//! `web-v1`, `web-v2` (endpoints of `shop/web`, behind the waypoint) and `other` (namespace
//! `misc`, no waypoint).
mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use palisade_ca::authority::CertificateAuthority;
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::tls::{Credential, CredentialSlot, TrustBundle, client_config, no_sni};
use palisade_sandbox::{Cluster, ClusterSpec, PodTemplate};
use serde_json::Value;
use support::l7::*;
use support::*;

const VIP: &str = "10.96.0.10:80";
const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";

fn pod(name: &str, namespace: &str, labels: &[(&str, &str)]) -> PodTemplate {
    let mut t = PodTemplate::new(name, namespace, name);
    t.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
    t.ports = vec![("http".to_string(), 8080)];
    t
}

/// `shop` (every Service behind `waypoint`), `web` and its two versions, the routes, and
/// `extra` resources.
fn resources(extra: &str) -> String {
    let service = |name: &str, ip: &str, selector: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  clusterIP: {ip}\n  \
             selector: {selector}\n  ports: [{{name: http, port: 80, targetPort: http}}]\n---\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{istio.io/use-waypoint: waypoint}}}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {{name: misc}}\n---\n{}{}{}{ROUTES}{extra}",
        service("web", "10.96.0.10", "{app: web}"),
        service("web-v1", "10.96.0.11", "{app: web, version: v1}"),
        service("web-v2", "10.96.0.12", "{app: web, version: v2}"),
    )
}

/// 90/10 by default; `/v2…` (prefix), `x-canary: yes` (header) and `/items/<digits>`
/// (regular expression) to v2 only; exactly `/healthz` to v1 only.
const ROUTES: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]
  rules:
  - backendRefs: [{name: web-v1, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}]
  - matches: [{path: {type: PathPrefix, value: /v2}}, {headers: [{name: x-canary, value: \"yes\"}]}]
    backendRefs: [{name: web-v2, port: 80}]
  - matches: [{path: {type: RegularExpression, value: \"/items/[0-9]+\"}}]
    backendRefs: [{name: web-v2, port: 80}]
  - matches: [{path: {type: Exact, value: /healthz}}]
    backendRefs: [{name: web-v1, port: 80}]
---
";

/// Nobody reaches `/admin…` on `web` (L7), and `intruder` may not reach `web`'s workloads (L4).
const DENIES: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: \"\", name: web}]
  action: DENY
  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]
---
apiVersion: palisade.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: no-intruder, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: Deny
  rules: [{from: [{namespace: shop, serviceAccount: intruder}]}]
---
";

fn cluster(extra: &str) -> Cluster {
    let id = palisade_sandbox::unique_test_id();
    let mut spec = ClusterSpec::uniform(&id, palisade_sandbox::test_state_dir(&id), 0, 0);
    spec.nodes = vec![
        vec![pod("client", "shop", &[("app", "client")]), pod("intruder", "shop", &[("app", "intruder")])],
        vec![
            pod("web-v1", "shop", &[("app", "web"), ("version", "v1")]),
            pod("web-v2", "shop", &[("app", "web"), ("version", "v2")]),
            pod("other", "misc", &[("app", "other")]),
        ],
    ];
    spec.policy = resources(extra);
    start_with_waypoint(spec)
}

/// `count` GETs of `path` from `pod` to `to`; the probe's report (statuses, bodies, errors).
fn get(cluster: &Cluster, pod: &str, to: &str, path: &str, count: usize, headers: &[&str]) -> Value {
    let count = count.to_string();
    let mut args = vec!["http-get", "--to", to, "--path", path, "--count", &count, "--timeout-ms", "5000"];
    for h in headers {
        args.extend(["--header", h]);
    }
    probe_report(cluster, pod, &args)
}

/// An HTTP/1.1 server in `pod` answering every request with `name`.
fn http_server(cluster: &Cluster, pod: &str, name: &str) -> Proc {
    probe_server(cluster, pod, &["http-serve", "--port", "8080", "--name", name])
}

fn servers(cluster: &Cluster) -> Vec<Proc> {
    vec![
        http_server(cluster, "web-v1", "v1"),
        http_server(cluster, "web-v2", "v2"),
        http_server(cluster, "other", "other"),
    ]
}

#[test]
fn weighted_split_and_route_matching_through_the_waypoint() {
    let cluster = cluster("");
    let _servers = servers(&cluster);

    // 10,000 requests over one keep-alive connection (the waypoint picks a backend per
    // request): 10 % is 1,000 ± 30 (one standard deviation), so ±2 points is over 6 of them.
    let n = 10_000;
    let split = get(&cluster, "client", VIP, "/", n, &[]);
    assert_eq!(count(&split, "statuses", "200"), n as u64, "{split}");
    let v2 = count(&split, "bodies", "v2") as f64 / n as f64;
    assert!((0.08..=0.12).contains(&v2), "v2 got {:.2} % of {n} requests, not 10 ± 2: {split}", v2 * 100.0);
    assert_eq!(count(&split, "bodies", "v1") + count(&split, "bodies", "v2"), n as u64, "{split}");

    let only = |path: &str, headers: &[&str], body: &str| {
        let r = get(&cluster, "client", VIP, path, 50, headers);
        assert_eq!(count(&r, "bodies", body), 50, "{path} {headers:?} should all reach {body}: {r}");
    };
    only("/v2/catalog", &[], "v2"); // PathPrefix
    only("/", &["x-canary: yes"], "v2"); // header
    only("/items/42", &[], "v2"); // RegularExpression
    only("/healthz", &[], "v1"); // Exact
    let not_exact = get(&cluster, "client", VIP, "/healthz/deep", 200, &[]);
    assert!(count(&not_exact, "bodies", "v2") > 0, "an Exact match took a longer path: {not_exact}");

    // The client's ztunnel sent to the waypoint (its identity required), for the VIP. (The
    // waypoint keeps its upstream tunnels pooled, so the endpoints' side of this traffic is
    // recorded only when they close: the next test checks it on tunnels of its own.)
    let out =
        wait_flow(&cluster, "node-1", |f| f["observer"] == "proxy" && f["direction"] == "outbound" && f["dst"] == VIP);
    assert_eq!(out["peer_spiffe_id"], WAYPOINT_ID, "{out}");
}

#[test]
fn l7_and_l4_denies_through_the_waypoint_and_direct_tunnels() {
    let cluster = cluster(DENIES);
    let _servers = servers(&cluster);

    // L7: 403 from the waypoint, and its access log names the rule.
    let admin = get(&cluster, "client", VIP, "/admin/users", 3, &[]);
    assert_eq!(count(&admin, "statuses", "403"), 3, "{admin}");
    let ok = get(&cluster, "client", VIP, "/", 3, &[]);
    assert_eq!(count(&ok, "statuses", "200"), 3, "{ok}");
    let log = cluster.waypoint_log("waypoint");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let line = text.lines().find(|l| l.contains("/admin/users") && l.contains("403"));
        if let Some(line) = line {
            assert!(line.contains("no-admin"), "the access log line does not name the rule: {line}");
            assert!(line.contains("spiffe://cluster.local/ns/shop/sa/client"), "{line}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no access log line for the denied request in:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // …and so does its flow event (the waypoint's /flows, on its localhost debug listener).
    let flows = cluster.waypoint_flows("waypoint").expect("the waypoint's flows");
    let denied = flows.as_array().into_iter().flatten().find(|f| f["path"] == "/admin/users" && f["status"] == 403);
    let denied = denied.unwrap_or_else(|| panic!("no flow event for the denied request in {flows}"));
    assert_eq!(denied["verdict"], "deny", "{denied}");
    assert!(denied["rule"].as_str().is_some_and(|r| r.contains("no-admin")), "{denied}");
    assert_eq!(denied["src_identity"], "spiffe://cluster.local/ns/shop/sa/client", "{denied}");

    // L4: the destination's policy refuses `intruder`; the waypoint enforces it against the
    // intruder's proven identity, so nothing reaches a backend (no body of theirs comes back).
    let through = get(&cluster, "intruder", VIP, "/", 5, &[]);
    // (The waypoint answers 403, as for an L7 deny, or closes: never a backend's answer.)
    assert_eq!(count(&through, "statuses", "403") + through["errors"].as_u64().unwrap_or(0), 5, "{through}");
    assert_eq!(count(&through, "bodies", "v1") + count(&through, "bodies", "v2"), 0, "{through}");
    // Nor directly: the endpoint's ztunnel still evaluates the intruder's own tunnel.
    let v1 = cluster.pod("web-v1").unwrap().ip.clone();
    let direct = get(&cluster, "intruder", &format!("{v1}:8080"), "/", 1, &[]);
    assert_eq!(count(&direct, "bodies", "v1"), 0, "{direct}");
    // Refused by the kernel at connect() (the ingress Deny is exact for the whole identity) or
    // by the endpoint's ztunnel; either way a deny event names the intruder.
    let v1_dst = format!("{v1}:8080");
    wait_flow_any(&cluster, |f| {
        f["verdict"] == "deny"
            && f["dst"] == v1_dst.as_str()
            && f["src_identity"].as_str().unwrap_or_default().contains("intruder")
    });
    // An allowed client straight to an endpoint still works without the waypoint.
    let client_direct = get(&cluster, "client", &format!("{v1}:8080"), "/", 1, &[]);
    assert_eq!(count(&client_direct, "bodies", "v1"), 1, "{client_direct}");

    // Hand-made tunnels from the waypoint's pod: its identity is accepted for an endpoint it
    // serves, refused for one it does not (`other`); another identity from its address is
    // refused even for an endpoint it serves (a certificate used from elsewhere).
    let other = cluster.pod("other").unwrap().ip.clone();
    let statuses = tunnels_from_waypoint(
        &cluster,
        &[
            ("shop", "waypoint", &v1, "web-v1"),
            ("shop", "waypoint", &other, "other"),
            ("shop", "client", &v1, "web-v1"),
        ],
    );
    assert_eq!(statuses, vec![Ok(200), Ok(401), Ok(401)], "waypoint→v1, waypoint→other, client-cert→v1");
    let accepted = wait_flow(&cluster, "node-2", |f| {
        f["direction"] == "inbound" && f["peer_spiffe_id"] == WAYPOINT_ID && f["verdict"] == "allow"
    });
    assert!(accepted["policy"].as_str().unwrap_or_default().contains("from a waypoint serving"), "{accepted}");
    wait_flow(&cluster, "node-2", |f| {
        f["verdict"] == "deny"
            && f["peer_spiffe_id"] == "spiffe://cluster.local/ns/shop/sa/client"
            && f["src"]
                .as_str()
                .unwrap_or_default()
                .starts_with(&format!("{}:", cluster.waypoint("waypoint").unwrap().ip))
    });
    wait_flow(&cluster, "node-2", |f| {
        f["verdict"] == "deny"
            && f["peer_spiffe_id"] == WAYPOINT_ID
            && f["policy"].as_str().unwrap_or_default().contains("does not serve")
    });
}

/// Waits until either node reports a flow event matching `pred`.
fn wait_flow_any(cluster: &Cluster, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        for node in ["node-1", "node-2"] {
            if let Some(f) = cluster.flows(node).expect("read flows").into_iter().find(|f| pred(f)) {
                return f;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no matching flow event on either node");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// For each (namespace, service account, destination ip, destination pod): one HBONE CONNECT to
/// `ip:8080` from the waypoint pod's network namespace, with a certificate for that identity
/// signed by the cluster's CA; the status of each.
fn tunnels_from_waypoint(cluster: &Cluster, tunnels: &[(&str, &str, &str, &str)]) -> Vec<Result<u16, String>> {
    let state = cluster.info.state_dir.clone();
    let bundle_pem = std::fs::read_to_string(state.join("credential-node-1/bundle.pem")).unwrap();
    let ca = CertificateAuthority::open(&state.join("ca"), "cluster.local").unwrap();
    let mut jobs = Vec::new();
    for (ns, sa, ip, pod) in tunnels {
        let (key, csr) = palisade_mesh::ca_api::new_key_and_csr().unwrap();
        let chain = ca.sign_workload(&csr, &SpiffeId::new("cluster.local", ns, sa)).unwrap().0;
        let credential = CredentialSlot::new(Credential::from_pem(&chain, &key).unwrap());
        let ip: IpAddr = ip.parse().unwrap();
        let pod_ns = cluster.pod(pod).unwrap().namespace.clone();
        jobs.push((credential, ip, SpiffeId::new("cluster.local", &pod_ns, pod)));
    }
    let netns = cluster.waypoint("waypoint").unwrap().netns.clone();
    palisade_sandbox::sys::in_netns(&netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let bundle = TrustBundle::from_pem(&bundle_pem, "cluster.local").unwrap();
            let mut out = Vec::new();
            for (credential, ip, expected) in jobs {
                let tls = client_config(Some(credential), &bundle, Some(expected), &[b"h2"]).unwrap();
                let one = connect_status(SocketAddr::new(ip, 15008), tls, format!("{ip}:8080"));
                out.push(tokio::time::timeout(Duration::from_secs(10), one).await.unwrap_or(Err("timed out".into())));
            }
            out
        })
    })
    .unwrap()
}

async fn connect_status(
    endpoint: SocketAddr,
    tls: std::sync::Arc<rustls::ClientConfig>,
    authority: String,
) -> Result<u16, String> {
    let tcp = tokio::net::TcpStream::connect(endpoint).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(tls).connect(no_sni(), tcp).await.map_err(|e| e.to_string())?;
    let (client, connection) = h2::client::handshake(tls).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut client = client.ready().await.map_err(|e| e.to_string())?;
    let request =
        http::Request::builder().method(http::Method::CONNECT).uri(authority).body(()).map_err(|e| e.to_string())?;
    let (response, _send) = client.send_request(request, false).map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    Ok(response.status().as_u16())
}

/// The waypoint killed (SIGKILL): requests to the Service it serves fail — the client's ztunnel
/// never sends them around it to an endpoint, where the waypoint's L7 policy would not apply —
/// and traffic that needs no waypoint is untouched.
#[test]
fn a_killed_waypoint_fails_closed() {
    let cluster = cluster(DENIES);
    let _servers = servers(&cluster);
    let before = get(&cluster, "client", VIP, "/", 3, &[]);
    assert_eq!(count(&before, "statuses", "200"), 3, "{before}");

    cluster.kill_waypoint("waypoint").expect("kill -9 the waypoint");
    let after = get(&cluster, "client", VIP, "/admin/users", 5, &[]);
    let answered: u64 = after["statuses"].as_object().into_iter().flatten().filter_map(|(_, n)| n.as_u64()).sum();
    assert_eq!(answered, 0, "a request was answered with the waypoint dead (bypassed?): {after}");
    let bodies = after["bodies"].as_object().map_or(0, |b| b.len());
    assert_eq!(bodies, 0, "a backend answered with the waypoint dead: {after}");
}
