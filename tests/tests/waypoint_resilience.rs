//! The waypoint's resilience on the sandbox, the real way: a captured client pod (node 1)
//! calls a Service VIP; its ztunnel carries the request over HBONE to the waypoint (`shop/
//! waypoint`, node 1), which balances, limits, ejects and retries across the Service's
//! endpoints (pods on node 2, real HTTP/1.1 or HTTP/2 servers), reached over HBONE through
//! their ztunnel. Outcomes are counted (bodies name the endpoint that answered); nothing is
//! timed.
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use palisade_sandbox::{Cluster, ClusterSpec, PodTemplate};
use serde_json::Value;
use support::flood::rss_kib;
use support::l7::*;

const VIP: &str = "10.96.0.20:80";

/// `shop` (behind `waypoint`) and its Service `web` selecting `selector`, then `extra`.
fn resources(selector: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{istio.io/use-waypoint: waypoint}}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec:\n  clusterIP: 10.96.0.20\n  \
         selector: {selector}\n  ports: [{{name: http, port: 80, targetPort: http}}]\n---\n{extra}"
    )
}

/// A TrafficPolicy on `web` with `spec` (indented YAML lines under `spec:`).
fn traffic_policy(spec: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: web, namespace: shop}}\nspec:\n  \
         targetRef: {{kind: Service, name: web}}\n{spec}---\n"
    )
}

/// `client` and the waypoint on node 1; the endpoint pods `backends` (name, extra labels;
/// every one has `app: web`) on node 2.
fn cluster(backends: &[(&str, &[(&str, &str)])], policy: String) -> Cluster {
    let pod = |name: &str, labels: &[(&str, &str)]| {
        let mut t = PodTemplate::new(name, "shop", name);
        t.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
        t.ports = vec![("http".to_string(), 8080)];
        t
    };
    let id = palisade_sandbox::unique_test_id();
    let mut spec = ClusterSpec::uniform(&id, palisade_sandbox::test_state_dir(&id), 0, 0);
    spec.nodes = vec![
        vec![pod("client", &[("app", "client")])],
        backends
            .iter()
            .map(|(name, labels)| {
                let mut all = vec![("app", "web")];
                all.extend_from_slice(labels);
                pod(name, &all)
            })
            .collect(),
    ];
    spec.policy = policy;
    start_with_waypoint(spec)
}

/// An HTTP/1.1 endpoint answering `name` (after `delay_ms`, with `status`).
fn http_server(cluster: &Cluster, pod: &str, name: &str, delay_ms: u64, status: u16) -> Proc {
    let (delay_ms, status) = (delay_ms.to_string(), status.to_string());
    let args = ["http-serve-x", "--name", name, "--delay-ms", &delay_ms, "--status", &status, "--port", "8080"];
    probe_server(cluster, pod, &args)
}

/// Reaches every endpoint once before a test counts: what these tests prove is where requests
/// go, not the first tunnel of each pair (one of 600 requests once met an endpoint's tunnel not
/// yet up at the start of a test and got 503; see the closing note of stop 10).
fn warm(cluster: &Cluster) {
    let _ = many(cluster, 40, 4, &[]);
}

/// `count` GETs of `/` from `client` to the VIP over `parallel` connections, plus `extra` args.
fn many(cluster: &Cluster, count: usize, parallel: usize, extra: &[&str]) -> Value {
    let (count, parallel) = (count.to_string(), parallel.to_string());
    let mut args = vec!["http-many", "--to", VIP, "--count", &count, "--parallel", &parallel, "--timeout-ms", "10000"];
    args.extend_from_slice(extra);
    probe_report(cluster, "client", &args)
}

/// Repeats `attempt` until it returns Some (every 200 ms, at most `secs`); panics naming `what`.
fn eventually<T>(secs: u64, what: &str, mut attempt: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = attempt() {
            return v;
        }
        assert!(Instant::now() < deadline, "after {secs} s: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn least_request_sends_most_traffic_to_the_faster_backend() {
    let policy = resources("{app: web}", &traffic_policy("  loadBalancer: {leastRequest: {}}\n"));
    let cluster = cluster(&[("fast", &[]), ("slow", &[])], policy);
    let _fast = http_server(&cluster, "fast", "fast", 0, 200);
    let _slow = http_server(&cluster, "slow", "slow", 100, 200);
    warm(&cluster);

    // Eight requests in flight at once: the slow endpoint holds its requests longer, so it
    // has more active requests whenever it is compared, and loses the comparison.
    let r = many(&cluster, 400, 8, &[]);
    assert_eq!(count(&r, "statuses", "200"), 400, "{r}");
    let (fast, slow) = (count(&r, "bodies", "fast"), count(&r, "bodies", "slow"));
    eprintln!("least request: fast {fast}, slow {slow}");
    assert!(fast >= 3 * slow, "least request: fast {fast}, slow {slow} of 400 (expected most on fast): {r}");
}

#[test]
fn ring_hash_keeps_keys_and_a_new_backend_takes_about_its_share() {
    let traffic = traffic_policy("  loadBalancer: {ringHash: {header: x-user}}\n");
    let backends: &[(&str, &[(&str, &str)])] = &[
        ("web-a", &[("member", "yes")]),
        ("web-b", &[("member", "yes")]),
        ("web-c", &[("member", "yes")]),
        ("web-d", &[]),
    ];
    let mut cluster = cluster(backends, resources("{app: web, member: \"yes\"}", &traffic));
    let _servers: Vec<Proc> =
        ["web-a", "web-b", "web-c", "web-d"].iter().map(|p| http_server(&cluster, p, p, 0, 200)).collect();

    warm(&cluster);
    // 200 keys, each sent 3 times over 4 connections: each key answered by one endpoint.
    let keys = 200;
    let assignment = |cluster: &Cluster| -> BTreeMap<String, String> {
        let r = many(cluster, 3 * keys, 4, &["--key-header", "x-user", "--keys", &keys.to_string()]);
        assert_eq!(count(&r, "statuses", "200"), 3 * keys as u64, "{r}");
        let map = r["keys"].as_object().expect("keys").clone();
        assert_eq!(map.len(), keys, "{r}");
        map.into_iter()
            .map(|(k, v)| {
                let bodies = v.as_array().unwrap();
                assert_eq!(bodies.len(), 1, "key {k} was answered by {bodies:?}, not one endpoint");
                (k, bodies[0].as_str().unwrap().to_string())
            })
            .collect()
    };
    let before = assignment(&cluster);
    assert!(!before.values().any(|b| b == "web-d"), "web-d is not in the Service yet: {before:?}");

    // web-d joins the Service (the selector drops the `member` label): N = 3 → 4.
    cluster.set_policy(&resources("{app: web}", &traffic)).expect("apply the wider selector");
    eventually(20, "the waypoint never sent a key to web-d", || {
        let r = many(&cluster, keys, 1, &["--key-header", "x-user", "--keys", &keys.to_string()]);
        (count(&r, "bodies", "web-d") > 0).then_some(())
    });
    let after = assignment(&cluster);
    let moved: Vec<(&String, &String)> = after.iter().filter(|(k, b)| before[*k] != **b).collect();
    assert!(
        moved.iter().all(|(_, b)| *b == "web-d"),
        "keys moved between old endpoints, not only to the new one: {moved:?}"
    );
    // About 1/4 (50 of 200); the ring's spread and 200 keys allow a wide margin.
    let share = moved.len() as f64 / keys as f64;
    eprintln!("ring hash: {} of {keys} keys moved to web-d", moved.len());
    assert!(
        (0.10..=0.42).contains(&share),
        "{} of {keys} keys moved to web-d ({share:.2}), not about 1/4",
        moved.len()
    );
}

#[test]
fn circuit_breaker_answers_503_at_once_while_saturated_and_recovers() {
    let traffic =
        traffic_policy("  connectionPool: {maxConnections: 2, maxPendingRequests: 1, maxActiveRequests: 2}\n");
    let cluster = cluster(&[("web-a", &[])], resources("{app: web}", &traffic));
    let _slow = http_server(&cluster, "web-a", "web-a", 1000, 200);

    // Ten clients against a backend that holds every request for a second: at most two are
    // active; the rest overflow at once with 503 and the header naming the limit.
    let r = many(&cluster, 30, 10, &[]);
    let (ok, overflowed) = (count(&r, "statuses", "200"), count(&r, "statuses", "503"));
    eprintln!("circuit breaker: {r}");
    assert_eq!(ok + overflowed, 30, "only 200 or 503: {r}");
    assert!(ok >= 1, "the saturated backend still served some: {r}");
    assert!(overflowed >= 10, "ten clients, two active slots: most overflow: {r}");
    let named: u64 = r["overflow"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(named, overflowed, "every 503 names its limit in x-palisade-overflow: {r}");

    // Load drops to one client: every request is served again.
    let calm = many(&cluster, 5, 1, &[]);
    assert_eq!(count(&calm, "statuses", "200"), 5, "after the load dropped: {calm}");
}

#[test]
fn an_endpoint_returning_5xx_is_ejected_and_later_returned() {
    let traffic = traffic_policy(
        "  outlierDetection: {consecutive5xx: 3, interval: 1s, baseEjectionTime: 4s, maxEjectionPercent: 50}\n",
    );
    let cluster = cluster(&[("web-a", &[]), ("web-b", &[])], resources("{app: web}", &traffic));
    let _good = http_server(&cluster, "web-a", "web-a", 0, 200);
    let bad = http_server(&cluster, "web-b", "web-b", 0, 500);

    // Round robin would send half of 100 requests to web-b; three consecutive 5xx eject it,
    // so only a few 500s (one run of three, perhaps another after a return) reach the client.
    let r = many(&cluster, 100, 1, &[]);
    let errors = count(&r, "statuses", "500");
    eprintln!("outlier detection: {errors} of 100 answered 500");
    assert!((3..=12).contains(&errors), "web-b answered {errors} of 100 with 500 (ejected after 3): {r}");
    assert_eq!(count(&r, "statuses", "200") + errors, 100, "{r}");

    // web-b recovers; after its ejection time it gets traffic again.
    drop(bad);
    let _healed = http_server(&cluster, "web-b", "web-b", 0, 200);
    eventually(40, "web-b never returned after its ejection", || {
        let r = many(&cluster, 10, 1, &[]);
        (count(&r, "bodies", "web-b") > 0 && count(&r, "statuses", "200") == 10).then_some(())
    });
}

#[test]
fn retries_hide_one_failing_endpoint_from_the_client() {
    let route = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]
  rules:
  - backendRefs: [{name: web, port: 80}]
    retry: {codes: [500], attempts: 2, backoff: 10ms}
---
";
    let cluster = cluster(&[("web-a", &[]), ("web-b", &[])], resources("{app: web}", route));
    let _good = http_server(&cluster, "web-a", "web-a", 0, 200);
    let log = cluster.info.state_dir.join("web-b-requests.log");
    let args = ["http-serve-x", "--name", "web-b", "--status", "500", "--log", log.to_str().unwrap(), "--port", "8080"];
    let _bad = probe_server(&cluster, "web-b", &args);

    let r = many(&cluster, 100, 2, &[]);
    assert_eq!(count(&r, "statuses", "200"), 100, "a retry should have hidden every 500: {r}");
    assert_eq!(count(&r, "bodies", "web-a"), 100, "{r}");
    // The failing endpoint was tried (its answers were hidden, not avoided).
    let tried = std::fs::read_to_string(&log).unwrap_or_default().lines().count();
    eprintln!("retries: web-b saw {tried} requests, all hidden");
    assert!(tried >= 10, "web-b saw {tried} requests; retries were not exercised");
}

/// The waypoint process of this cluster (its command line names the cluster's policy file).
fn waypoint_pid(cluster: &Cluster) -> u32 {
    let policy = cluster.info.policy_file.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.contains(&&b"--gateway"[..]) && args.contains(&policy.as_bytes())
        })
        .expect("the waypoint's process")
}

#[test]
fn slow_clients_cannot_exhaust_the_waypoint() {
    let cluster = cluster(&[("web-a", &[])], resources("{app: web}", ""));
    let _server = http_server(&cluster, "web-a", "web-a", 0, 200);
    let pid = waypoint_pid(&cluster);
    assert_eq!(count(&many(&cluster, 5, 1, &[]), "statuses", "200"), 5);
    let rss_before = rss_kib(pid);

    // 300 clients each dribble a never-ending head, one byte every 100 ms, for longer than the
    // waypoint's header read timeout (10 s).
    let view = Cluster::attach(cluster.info.clone());
    let slow = std::thread::spawn(move || {
        probe_report(
            &view,
            "client",
            &["slowloris", "--to", VIP, "--conns", "300", "--hold-ms", "14000", "--interval-ms", "100"],
        )
    });
    std::thread::sleep(Duration::from_secs(3));
    // Meanwhile a normal client is served, and the waypoint's memory stays bounded.
    let normal = many(&cluster, 50, 2, &[]);
    assert_eq!(count(&normal, "statuses", "200"), 50, "a normal client beside 300 slow ones: {normal}");
    let rss_during = rss_kib(pid);
    // A safety limit, not a performance target: a waypoint buffering without bound would
    // pass it quickly; one holding 300 idle heads needs a small fraction of it.
    const RSS_LIMIT_KIB: u64 = 256 * 1024;
    assert!(rss_during < RSS_LIMIT_KIB, "waypoint RSS {rss_during} KiB (was {rss_before}) over {RSS_LIMIT_KIB} KiB");

    // The waypoint closes heads that do not finish in time: the slow clients were cut off.
    let slow = slow.join().expect("slow clients");
    eprintln!("slow clients: {slow}");
    assert_eq!(count(&slow, "outcomes", "refused"), 0, "{slow}");
    assert!(count(&slow, "outcomes", "closed") >= 250, "the waypoint should cut off unfinished heads: {slow}");
    let after = many(&cluster, 5, 1, &[]);
    assert_eq!(count(&after, "statuses", "200"), 5, "after the slow clients: {after}");
    eprintln!("waypoint RSS: {rss_before} KiB idle, {rss_during} KiB with 300 slow clients");
}

#[test]
fn grpc_with_trailers_passes_through_the_waypoint() {
    // The port declares gRPC (Istio's port-name prefix), so the upstream is HTTP/2: a port
    // named `http` declares HTTP/1.1, which has no trailers.
    let policy = resources("{app: web}", "").replace("{name: http, port: 80", "{name: grpc, port: 80");
    let cluster = cluster(&[("grpc", &[])], policy);
    let _server = probe_server(&cluster, "grpc", &["h2-serve", "--name", "grpc-backend", "--port", "8080"]);
    let r = probe_report(&cluster, "client", &["h2-get", "--to", VIP, "--count", "20", "--timeout-ms", "10000"]);
    assert_eq!(count(&r, "statuses", "200"), 20, "{r}");
    assert_eq!(count(&r, "grpc_status", "0"), 20, "grpc-status trailer on every call: {r}");
    assert_eq!(count(&r, "messages", "grpc-backend"), 20, "message and grpc-message trailer from the backend: {r}");
}
