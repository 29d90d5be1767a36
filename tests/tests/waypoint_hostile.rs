//! Hostile peers against the waypoint's own listeners, on the sandbox: its admin listener
//! (`/metrics`, `/ready`; 15020) and its debug listener (`/flows`; 15000), both one bounded
//! server (64 connections, 5 s to send a head). From inside the waypoint's network namespace
//! (where the sandbox binds both, on 127.0.0.1) a flood of connections that send nothing or
//! garbage, and slow clients that never finish a head, hit them while a captured client pod
//! sends ordinary HTTP through the waypoint the real way (its ztunnel, HBONE). Proven: the
//! proxied traffic is all served during the flood; scrapes work again once it stops; the
//! waypoint's memory comes back near where it was. Outcomes are counted, nothing is timed.
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use palisade_sandbox::cluster::{WAYPOINT_ADMIN, WAYPOINT_DEBUG};
use palisade_sandbox::{Cluster, ClusterSpec, PodTemplate};
use serde_json::Value;
use support::flood::{Flood, HOLD, rss_kib};
use support::l7::*;

const VIP: &str = "10.96.0.20:80";
/// Flooding connections held at once: far more than the 64 the admin server serves.
const IN_FLIGHT: usize = 300;
/// Bounds waits for what happens at once when the code is right.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn cluster() -> Cluster {
    let pod = |name: &str, app: &str| {
        let mut t = PodTemplate::new(name, "shop", name);
        t.labels = BTreeMap::from([("app".to_string(), app.to_string())]);
        t.ports = vec![("http".to_string(), 8080)];
        t
    };
    let id = palisade_sandbox::unique_test_id();
    let mut spec = ClusterSpec::uniform(&id, palisade_sandbox::test_state_dir(&id), 0, 0);
    spec.nodes = vec![vec![pod("client", "client")], vec![pod("web-a", "web")]];
    spec.policy =
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/use-waypoint: waypoint}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.20\n  \
         selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: http}]\n---\n"
            .into();
    start_with_waypoint(spec)
}

fn report(out: std::process::Output, what: &str) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{what}: output {text:?}: {e}"))
}

/// An HTTP/1.1 endpoint in `pod` answering its name.
fn http_server(cluster: &Cluster, pod: &str) -> Proc {
    probe_server(cluster, pod, &["http-serve-x", "--name", pod, "--port", "8080"])
}

/// `count` GETs from the client pod to the VIP (through its ztunnel and the waypoint).
fn many(cluster: &Cluster, count: usize) -> Value {
    let count = count.to_string();
    probe_report(
        cluster,
        "client",
        &["http-many", "--to", VIP, "--count", &count, "--parallel", "2", "--timeout-ms", "10000"],
    )
}

/// `palisade-probe slowloris` inside the waypoint's namespace against `to`, on a thread.
fn slowloris(netns: &str, to: &str, conns: usize) -> std::thread::JoinHandle<Value> {
    let (netns, to) = (netns.to_string(), to.to_string());
    std::thread::spawn(move || {
        let conns = conns.to_string();
        let out = Command::new("ip")
            .args(["netns", "exec", &netns])
            .arg(probe_bin())
            .args(["slowloris", "--to", &to, "--conns", &conns, "--hold-ms", "9000", "--interval-ms", "200"])
            .stderr(Stdio::inherit())
            .output()
            .expect("run slowloris");
        report(out, "slowloris")
    })
}

/// Repeats `attempt` until it holds (every 200 ms, at most [`HANG_GUARD`]); panics naming `what`.
fn eventually(what: &str, mut attempt: impl FnMut() -> bool) {
    let deadline = Instant::now() + HANG_GUARD;
    while !attempt() {
        assert!(Instant::now() < deadline, "after {HANG_GUARD:?}: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Requests the waypoint answered 200 (`waypoint_requests_total`), from a scrape.
fn served_ok(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("waypoint_requests_total{") && l.contains("status=\"200\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_flood_and_slow_clients_on_the_admin_ports_neither_stop_traffic_nor_keep_memory() {
    let cluster = cluster();
    let _server = http_server(&cluster, "web-a");
    let waypoint = cluster.waypoint("waypoint").unwrap().clone();
    let pid = cluster.waypoint_pid("waypoint").unwrap();
    let scrape = |path: &str, on: &str| palisade_sandbox::sys::http_get_in(&waypoint.netns, on, path);

    // Warm up (tunnels, pools, first allocations), then the baseline.
    eventually("the first requests through the waypoint", || count(&many(&cluster, 10), "statuses", "200") == 10);
    assert_eq!(count(&many(&cluster, 40), "statuses", "200"), 40);
    scrape("/metrics", WAYPOINT_ADMIN).expect("a scrape before the flood");
    scrape("/flows", WAYPOINT_DEBUG).expect("flows before the flood");
    std::thread::sleep(Duration::from_secs(1));
    let before = rss_kib(pid);
    let served_before = served_ok(&scrape("/metrics", WAYPOINT_ADMIN).unwrap());

    // Idle and garbage connections on the admin port, slow heads on both ports.
    let admin: SocketAddr = WAYPOINT_ADMIN.parse().unwrap();
    let flood = Flood::start(&waypoint.netns, admin, IN_FLIGHT);
    let slow_admin = slowloris(&waypoint.netns, WAYPOINT_ADMIN, 100);
    let slow_debug = slowloris(&waypoint.netns, WAYPOINT_DEBUG, 100);
    eventually("1,000 flooding connections", || flood.opened() >= 1000);

    // Proxied traffic is all served while both listeners are flooded.
    let mut peak = rss_kib(pid);
    for round in 0..3 {
        let r = many(&cluster, 50);
        assert_eq!(count(&r, "statuses", "200"), 50, "round {round} through the waypoint during the flood: {r}");
        peak = peak.max(rss_kib(pid));
    }
    eventually("5,000 flooding connections", || {
        peak = peak.max(rss_kib(pid));
        flood.opened() >= 5000
    });
    let outcome = flood.stop();
    let (opened, closed) = (outcome.opened, outcome.closed);
    let (slow_admin, slow_debug) = (slow_admin.join().expect("slowloris"), slow_debug.join().expect("slowloris"));
    eprintln!(
        "flood: {opened} connections, {closed} closed by the waypoint within {HOLD:?}; slow clients: admin \
         {slow_admin}, debug {slow_debug}; RSS {before} KiB before, peak {peak} KiB"
    );
    // Over the bound the waypoint closes connections itself: most flooding ones never waited.
    assert!(closed * 2 >= opened, "the waypoint closed only {closed} of {opened} flooding connections");
    // Heads that never end are cut off (5 s) before the slow clients give up (9 s).
    for (port, slow) in [("admin", &slow_admin), ("debug", &slow_debug)] {
        assert!(count(slow, "outcomes", "open") == 0, "slow clients of the {port} port still open at the end: {slow}");
    }

    // Scrapes work again once the flood stops, and counted the requests served during it.
    let mut metrics = String::new();
    eventually("a scrape of /metrics after the flood", || match scrape("/metrics", WAYPOINT_ADMIN) {
        Ok(text) => {
            metrics = text;
            true
        }
        Err(_) => false,
    });
    eventually("/flows after the flood", || scrape("/flows", WAYPOINT_DEBUG).is_ok());
    let served_after = served_ok(&metrics);
    assert!(
        served_after >= served_before + 150.0,
        "the waypoint's 200 count went from {served_before} to {served_after}, not by the 150 requests of the flood"
    );

    // Memory comes back within 16 MiB of the baseline (a leak check, not a timing one).
    let bound = before + (16 << 10);
    let mut after = rss_kib(pid);
    let settle = Instant::now() + Duration::from_secs(40);
    while after > bound && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(500));
        after = rss_kib(pid);
    }
    eprintln!("waypoint RSS after the flood: {after} KiB (before {before} KiB, peak {peak} KiB)");
    assert!(after <= bound, "the waypoint kept {after} KiB after the flood against {before} KiB before (peak {peak})");
    let r = many(&cluster, 20);
    assert_eq!(count(&r, "statuses", "200"), 20, "through the waypoint after the flood: {r}");
}
