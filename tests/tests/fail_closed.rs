//! Enforcement never switches off: a killed ztunnel leaves its pinned programs enforcing the
//! last policy (denied stays denied, allowed fails closed), a restarted one resumes every pod
//! on its own, and an upgrade hands the listeners to the new process while the old one
//! finishes the connections it carries.
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use palisade_sandbox::Cluster;
use support::*;

const EPERM: i64 = 1;

fn deny(name: &str, target: &str, source_sa: &str, port: u16) -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{selector: {{matchLabels: {{app: {target}}}}}, action: Deny, rules: [{{from: [{{namespace: default, \
         serviceAccount: {source_sa}}}], ports: [{port}]}}]}}\n---\n"
    )
}

/// Connects from `pod` to `to` again and again until `stop`; counts the connections that
/// carried data (they must never succeed for a denied destination).
fn hammer(cluster: &Cluster, pod: &str, to: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(usize, usize)> {
    let view = Cluster::attach(cluster.info.clone());
    let pod = pod.to_string();
    std::thread::spawn(move || {
        let (mut tries, mut passed) = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            let r = connect_with(&view, &pod, &to, 10, &["--timeout-ms", "2000"]);
            tries += 1;
            if r["verified"] == true {
                passed += 1;
            }
        }
        (tries, passed)
    })
}

#[test]
fn killed_ztunnel_keeps_enforcing_and_a_restart_resumes_every_pod() {
    let policy = deny("no-9090", "p1-2", "p1-1", 9090);
    let mut cluster = mesh(1, 2, &policy);
    let (_denied_srv, allowed_srv) = (serve(&cluster, "p1-2", 9090), serve(&cluster, "p1-2", 9091));
    let dst = cluster.pod("p1-2").unwrap().ip.clone();
    assert_eq!(connect(&cluster, "p1-1", &format!("{dst}:9091"), 100)["verified"], true);
    let served_before = allowed_srv.connections().len();

    // Denied connections are tried throughout the kill and the restart.
    let stop = Arc::new(AtomicBool::new(false));
    let denied = hammer(&cluster, "p1-1", format!("{dst}:9090"), stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    cluster.stop_ztunnel("node-1", libc::SIGKILL).unwrap();

    // Down: denied is still denied in the kernel; allowed fails closed (nothing proxies it,
    // nothing lets it through unproxied).
    for _ in 0..3 {
        let r = connect(&cluster, "p1-1", &format!("{dst}:9090"), 10);
        assert_eq!(r["errno"], EPERM, "denied while ztunnel is down: {r}");
        let r = connect(&cluster, "p1-1", &format!("{dst}:9091"), 10);
        assert_eq!(r["ok"], false, "allowed traffic must fail closed while ztunnel is down: {r}");
    }
    assert_eq!(allowed_srv.connections().len(), served_before, "a connection bypassed the proxy while it was down");

    // Restarted over the pinned state: every pod resumes without being enrolled again.
    cluster.start_new_ztunnel("node-1").unwrap();
    let pods = cluster.enroll_raw("node-1", &serde_json::json!({"op": "list"})).unwrap();
    assert_eq!(pods["pods"].as_array().map(Vec::len), Some(2), "{pods}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = connect(&cluster, "p1-1", &format!("{dst}:9091"), 1000);
        if r["verified"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "allowed traffic did not resume after the restart: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (tries, passed) = denied.join().unwrap();
    assert!(tries > 3, "the denied flow was tried only {tries} times");
    assert_eq!(passed, 0, "{passed} of {tries} denied connections went through across the kill and restart");
    assert_eq!(connect(&cluster, "p1-1", &format!("{dst}:9090"), 10)["errno"], EPERM);
}

#[test]
fn upgrade_keeps_established_connections_alive() {
    let mut cluster = mesh(2, 2, "");
    let _server = serve(&cluster, "p2-1", 8080);
    let dst = format!("{}:8080", cluster.pod("p2-1").unwrap().ip);
    // Established before the upgrades, carrying bytes for several seconds after them.
    const CONNECTIONS: usize = 6;
    let transfers: Vec<_> = (0..CONNECTIONS).map(|_| paced_transfer(&cluster, &dst, 4 << 20, 100)).collect();
    let established = Instant::now();
    let deadline = established + Duration::from_secs(10);
    while metric(&cluster, "node-2", "palisade_active_connections{direction=\"inbound\"}") < CONNECTIONS as f64 {
        assert!(Instant::now() < deadline, "the transfers did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    // New connections keep working while both nodes are upgraded, one after the other.
    let stop = Arc::new(AtomicBool::new(false));
    let (tries, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let new_conns = {
        let (view, dst, stop, tries, failures) =
            (Cluster::attach(cluster.info.clone()), dst.clone(), stop.clone(), tries.clone(), failures.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = connect_with(&view, "p1-2", &dst, 1000, &["--timeout-ms", "5000"]);
                tries.fetch_add(1, Ordering::Relaxed);
                if r["verified"] != true {
                    eprintln!("new connection failed during the upgrade: {r}");
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // A bad request on the hand-over socket gives nothing away.
    let socket = cluster.info.state_dir.join("ztunnel-node-1/handoff.sock");
    let mut garbage = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    std::io::Write::write_all(&mut garbage, b"\x00\x00\x00\x05hello").unwrap();
    drop(garbage);
    assert_eq!(connect(&cluster, "p1-1", &dst, 1000)["verified"], true);
    for node in ["node-1", "node-2"] {
        cluster.start_new_ztunnel(node).unwrap();
        let log = std::fs::read_to_string(&cluster.node(node).unwrap().log).unwrap();
        assert!(log.contains("took over the listeners"), "{node} did not take over:\n{log}");
    }
    let upgraded = Instant::now();
    assert_eq!(cluster.retired_ztunnels_running(), 2, "the old ztunnels exited while carrying connections");

    let reports: Vec<serde_json::Value> = transfers.into_iter().map(|t| t.join().unwrap()).collect();
    let finished = Instant::now();
    stop.store(true, Ordering::Relaxed);
    new_conns.join().unwrap();
    let survived = reports.iter().filter(|r| r["verified"] == true).count();
    assert!(
        finished.duration_since(upgraded) > Duration::from_secs(1),
        "the transfers ended too soon after the upgrade to prove anything"
    );
    assert_eq!(survived, CONNECTIONS, "connections alive across the upgrade: {survived}/{CONNECTIONS}: {reports:?}");
    assert_eq!(failures.load(Ordering::Relaxed), 0, "of {} new connections", tries.load(Ordering::Relaxed));
    assert!(tries.load(Ordering::Relaxed) > 0);

    // With their connections done, the old processes leave; nothing was detached.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.retired_ztunnels_running() > 0 {
        assert!(Instant::now() < deadline, "old ztunnels still running after their connections ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(connect(&cluster, "p1-1", &dst, 1000)["verified"], true);
}

#[test]
fn an_address_belongs_to_one_pod() {
    let cluster = mesh(1, 3, "");
    let victim = cluster.pod("p1-1").unwrap().clone();
    let intruder = cluster.pod("p1-3").unwrap().clone();
    cluster.unenroll("p1-3").unwrap();
    let _server = serve(&cluster, "p1-1", 7070);

    // A second pod claiming p1-1's address is refused, and naming the owner.
    let request = serde_json::json!({"op": "enroll", "pod": {"uid": "intruder", "name": "intruder",
        "netns": intruder.netns_path, "cgroup": intruder.cgroup, "ips": [victim.ip]}});
    let err = cluster.enroll_raw("node-1", &request).unwrap_err().to_string();
    assert!(err.contains("belongs to enrolled pod") && err.contains(&victim.uid), "{err}");
    // Removing it does not touch the owner's entry.
    assert!(cluster.enroll_raw("node-1", &serde_json::json!({"op": "remove", "uid": "intruder"})).is_err());

    // p1-1 is still enforced inbound: plaintext from the (unenrolled) mesh workload p1-3 is
    // refused by the kernel, not delivered.
    let r = connect(&cluster, "p1-3", &format!("{}:7070", victim.ip), 10);
    assert_eq!(r["ok"], false, "inbound enforcement of p1-1 was lost: {r}");
    let r = connect(&cluster, "p1-2", &format!("{}:7070", victim.ip), 10);
    assert_eq!(r["verified"], true, "{r}");
}

#[test]
fn an_address_the_pod_was_not_enrolled_with_is_refused() {
    let cluster = mesh(1, 2, "");
    let pod = cluster.pod("p1-2").unwrap().clone();
    let server = serve(&cluster, "p1-2", 7171);
    // The pod gains an address its enrollment does not name; the node routes it to the pod.
    let extra = "10.244.1.99";
    palisade_sandbox::sys::ip_in(&pod.netns, &["addr", "add", &format!("{extra}/32"), "dev", "eth0"]).unwrap();
    let node = cluster.node("node-1").unwrap().netns.clone();
    palisade_sandbox::sys::ip_in(&node, &["route", "add", &format!("{extra}/32"), "dev", "p2"]).unwrap();
    // From the node (outside the mesh): reaching the known address is carried by the inbound
    // proxy; the unknown one must not bypass it.
    let reach = |addr: String| {
        palisade_sandbox::sys::in_netns(&node, move || {
            std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)).map(|_| ())
        })
        .unwrap()
    };
    assert!(reach(format!("{}:7171", pod.ip)).is_ok());
    let err = reach(format!("{extra}:7171")).expect_err("an unregistered address let a connection through");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        server.connections().iter().all(|c| !c.to_string().contains(extra)),
        "the application saw a connection to {extra}: {:?}",
        server.connections()
    );
    let ev = wait_flow(&cluster, "node-1", |f| {
        f["verdict"] == "deny" && f["dst"].as_str().is_some_and(|d| d.starts_with(extra))
    });
    assert_eq!(ev["policy"], "the destination address is not registered for the enrolled pod", "{ev}");
}

#[test]
fn ztunnel_without_a_ca_needs_an_explicit_choice() {
    let bin = palisade_sandbox::workspace_bin("ztunnel").unwrap();
    let out = std::process::Command::new(bin).args(["--node", "n", "--policy", "/dev/null"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--ca-addr"), "{stderr}");
}

#[test]
fn a_failed_enrollment_leaves_no_certificate_renewing() {
    let cluster = mesh(1, 2, "");
    let pod = cluster.pod("p1-2").unwrap().clone();
    cluster.unenroll("p1-2").unwrap();
    let certificates = || {
        let dump: serde_json::Value =
            serde_json::from_str(&cluster.admin_get("node-1", "/config_dump").unwrap()).unwrap();
        dump["certificates"].to_string()
    };
    assert!(!certificates().contains(&pod.identity), "{}", certificates());
    // The identity is known (so its certificate is issued), then the enrollment fails.
    let request = serde_json::json!({"op": "enroll", "pod": {"uid": pod.uid, "name": pod.name,
        "netns": "/nonexistent/netns", "cgroup": pod.cgroup, "ips": [pod.ip]}});
    let err = cluster.enroll_raw("node-1", &request).unwrap_err().to_string();
    assert!(err.contains("open network namespace"), "{err}");
    assert!(!certificates().contains(&pod.identity), "a failed enrollment left {} renewing", pod.identity);
}
