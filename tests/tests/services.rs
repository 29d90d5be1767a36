//! Kubernetes `v1` `Service` on the sandbox: a connection to the Service's virtual address is
//! resolved by the client's ztunnel to one endpoint (round robin among those the exact
//! evaluation allows) and carried there; `targetPort` by name resolves on each endpoint; the
//! endpoints follow the snapshot; the client's egress narrows the choice, and allowing none of
//! the endpoints is EPERM at connect() (the VIP's own kernel cells). VIPs come from 10.96.0.0/16, which nothing in the sandbox
//! routes: the pod's `connect4` captures the connection before routing matters.
mod support;

use std::collections::BTreeMap;

use palisade_sandbox::PodTemplate;
use support::*;

const VIP: &str = "10.96.0.10:80";

fn pod(name: &str, labels: &[(&str, &str)], http: Option<u16>) -> PodTemplate {
    let mut t = PodTemplate::new(name, "shop", name);
    t.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
    t.ports = http.map(|p| vec![("http".to_string(), p)]).unwrap_or_default();
    t
}

/// `shop/web` on port 80, `targetPort: http` (8080 on web-a, 9090 on web-b), selecting `selector`.
fn service(selector: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec:\n  clusterIP: 10.96.0.10\n  \
         selector: {selector}\n  ports:\n  - {{name: http, port: 80, targetPort: http}}\n---\n"
    )
}

/// Denies `client` at the ingress of the workloads labelled `tier` in `tiers`.
fn deny_client_at(tiers: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: no-client, namespace: shop}}\n\
         spec:\n  selector:\n    matchExpressions: [{{key: tier, operator: In, values: [{tiers}]}}]\n  action: Deny\n  \
         rules: [{{from: [{{matchLabels: {{app: client}}}}]}}]\n---\n"
    )
}

/// An egress NetworkPolicy on the client with these rules.
fn client_egress(rules: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: client-out, namespace: shop}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: client}}}}\n  policyTypes: [Egress]\n  egress: {rules}\n---\n"
    )
}

const EPERM: i64 = 1;

/// Connects `n` times to the VIP, each byte-exact; returns how many each server saw.
fn spread(cluster: &palisade_sandbox::Cluster, servers: &[(&str, &Server)], n: usize) -> BTreeMap<String, usize> {
    let before: Vec<usize> = servers.iter().map(|(_, s)| s.connections().len()).collect();
    for i in 0..n {
        let r = connect(cluster, "client", VIP, 1000 + i as u64);
        assert_eq!(r["verified"], true, "connection {i} to {VIP}: {r}");
    }
    // The servers log a connection when it ends; the client saw its echo before that.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let counts: BTreeMap<String, usize> =
            servers.iter().zip(&before).map(|((name, s), b)| (name.to_string(), s.connections().len() - b)).collect();
        if counts.values().sum::<usize>() >= n || std::time::Instant::now() > deadline {
            return counts;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn service_vip_reaches_the_allowed_endpoints_round_robin_and_follows_the_snapshot() {
    let mut cluster = mesh_with(
        vec![
            vec![
                pod("client", &[("app", "client")], None),
                pod("web-a", &[("role", "web"), ("tier", "a")], Some(8080)),
            ],
            vec![
                pod("web-b", &[("role", "web"), ("tier", "b")], Some(9090)),
                pod("web-c", &[("role", "spare"), ("tier", "c")], Some(8080)),
            ],
        ],
        &service("{role: web}"),
    );
    let (a, b, c) = (serve(&cluster, "web-a", 8080), serve(&cluster, "web-b", 9090), serve(&cluster, "web-c", 8080));
    let servers = [("web-a", &a), ("web-b", &b), ("web-c", &c)];

    // Two endpoints on two nodes, each at its own named target port: round robin.
    let seen = spread(&cluster, &servers, 20);
    assert_eq!(seen, BTreeMap::from([("web-a".into(), 10), ("web-b".into(), 10), ("web-c".into(), 0)]));

    // web-a refuses the client (its ingress): the client's ztunnel picks web-b only.
    cluster.set_policy(&(service("{role: web}") + &deny_client_at("a"))).expect("policy applies");
    let seen = spread(&cluster, &servers, 6);
    assert_eq!(seen, BTreeMap::from([("web-a".into(), 0), ("web-b".into(), 6), ("web-c".into(), 0)]));

    // No endpoint allowed: reset, and a deny event that names the Service.
    cluster.set_policy(&(service("{role: web}") + &deny_client_at("a, b"))).expect("policy applies");
    let r = connect(&cluster, "client", VIP, 100);
    assert_ne!(r["verified"], true, "a connection went through with every endpoint denied: {r}");
    let node1 = cluster.info.nodes[0].name.clone();
    let event = wait_flow(&cluster, &node1, |f| {
        f["verdict"] == "deny" && f["dst_identity"] == "service:shop/web" && f["dst"] == VIP
    });
    assert!(event["policy"].as_str().unwrap_or_default().contains("no endpoint allowed"), "{event}");

    // The client's egress allows web-b (at its target port) only: connect() to the VIP
    // passes (the kernel's cell for the VIP) and every connection goes to web-b.
    cluster
        .set_policy(
            &(service("{role: web}")
                + &client_egress("[{to: [{podSelector: {matchLabels: {tier: b}}}], ports: [{port: 9090}]}]")),
        )
        .expect("policy applies");
    let seen = spread(&cluster, &servers, 6);
    assert_eq!(seen, BTreeMap::from([("web-a".into(), 0), ("web-b".into(), 6), ("web-c".into(), 0)]));

    // Egress allows none of the endpoints (web-c is no endpoint): EPERM at connect(), no packet.
    cluster
        .set_policy(&(service("{role: web}") + &client_egress("[{to: [{podSelector: {matchLabels: {tier: c}}}]}]")))
        .expect("policy applies");
    let r = connect(&cluster, "client", VIP, 100);
    assert_eq!(r["errno"], EPERM, "connect() to a VIP whose endpoints egress refuses: {r}");
    assert_eq!(
        connect(&cluster, "client", &format!("{}:8080", cluster.pod("web-c").expect("web-c").ip), 100)["verified"],
        true,
        "web-c itself is allowed"
    );

    // The Service now selects every workload of shop (`{}`): web-c is a new endpoint and
    // receives connections once the snapshot carries it (the client has no `http` port, so
    // it is no endpoint: its targetPort does not resolve).
    cluster.set_policy(&service("{}")).expect("policy applies");
    let seen = spread(&cluster, &servers, 9);
    assert_eq!(seen.values().sum::<usize>(), 9, "{seen:?}");
    assert_eq!(seen["web-c"], 3, "web-c is an endpoint now: {seen:?}");
}

/// An endpoint whose workload stopped listening is left out of the choice after a failed
/// connection (passive health): the connections after it all reach the other endpoint, and
/// once it listens again (and its bench time is over) it is chosen again.
#[test]
fn a_failing_endpoint_is_left_out_and_comes_back() {
    let cluster = mesh_with(
        vec![
            vec![pod("client", &[("app", "client")], None), pod("web-a", &[("role", "web")], Some(8080))],
            vec![pod("web-b", &[("role", "web")], Some(9090))],
        ],
        &service("{role: web}"),
    );
    let b = serve(&cluster, "web-b", 9090);
    // web-a listens on nothing: a connection that lands there fails (its ztunnel answers 503).
    let mut failures = 0;
    let started = std::time::Instant::now();
    for i in 0..12 {
        if connect(&cluster, "client", VIP, 2000 + i)["verified"] != true {
            failures += 1;
        }
    }
    // Benched 1 s, then 2 s, 4 s…: over t seconds, at most 2 + log2(t + 1) tries land there.
    let t = started.elapsed().as_secs_f64();
    let bound = 2 + (t + 1.0).log2().ceil() as usize;
    assert!(failures <= bound, "round robin would fail every other connection; failed {failures} of 12 in {t:.1} s");
    assert!(b.connections().len() >= 10, "web-b took the others");
    // web-a back: chosen again once its bench time (at most a few seconds here) is over.
    let a = serve(&cluster, "web-a", 8080);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while a.connections().is_empty() {
        assert!(std::time::Instant::now() < deadline, "web-a never chosen again");
        let r = connect(&cluster, "client", VIP, 3000);
        assert_eq!(r["verified"], true, "{r}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}
