//! The control plane (`palisade serve`) on the sandbox: `palisade apply` reaches every node's
//! kernel, nodes ACK what they put in force and NACK what they could not, and the mesh keeps
//! enforcing while the control plane is down.
mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use palisade_sandbox::cluster::Cluster;
use serde_json::Value;
use support::*;

const EPERM: i64 = 1;

/// Denies every source of namespace `default` to `target` on `port`.
fn deny_to(name: &str, target: &str, port: u16) -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  selector: {{matchLabels: {{app: {target}}}}}\n  action: Deny\n  rules:\n  - from: [{{namespace: default}}]\n    ports: [{port}]\n"
    )
}

/// Runs the `palisade` CLI the way a user would: no flags to find the server, only the
/// context file the sandbox wrote.
fn palisade(cluster: &Cluster, args: &[&str]) -> Output {
    let context = cluster.info.state_dir.join("palisade-context");
    cluster.write_cli_context(&context).unwrap();
    std::process::Command::new(palisade_sandbox::workspace_bin("palisade").unwrap())
        .args(args)
        .env("PALISADE_CONFIG", &context)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn write(cluster: &Cluster, name: &str, yaml: &str) -> PathBuf {
    let file = cluster.info.state_dir.join(name);
    std::fs::write(&file, yaml).unwrap();
    file
}

fn apply(cluster: &Cluster, file: &Path) -> Output {
    palisade(cluster, &["apply", "-f", file.to_str().unwrap()])
}

/// `palisade get nodes -o json`, by node name.
fn node_table(cluster: &Cluster) -> std::collections::BTreeMap<String, Value> {
    let out = palisade(cluster, &["get", "nodes", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    list.into_iter().map(|n| (n["node"].as_str().unwrap().to_string(), n)).collect()
}

/// The revision `apply` reported ("applied: revision N, …").
fn revision_of(out: &Output) -> String {
    let t = text(out);
    t.split("revision ")
        .nth(1)
        .and_then(|r| r.split([',', ';', '\n']).next())
        .unwrap_or_else(|| panic!("{t}"))
        .to_string()
}

#[test]
fn apply_is_enforced_on_every_node_and_get_nodes_shows_the_acked_version() {
    let cluster = mesh(2, 1, "");
    let _s = serve(&cluster, "p2-1", 9090);
    let dst = format!("{}:9090", cluster.pod("p2-1").unwrap().ip);
    assert_eq!(connect(&cluster, "p1-1", &dst, 10)["verified"], true);

    let out = apply(&cluster, &write(&cluster, "deny.yaml", &deny_to("no-9090", "p2-1", 9090)));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("in force on every connected node"), "{}", text(&out));
    let revision = revision_of(&out);
    let r = connect(&cluster, "p1-1", &dst, 10);
    assert_eq!(r["errno"], EPERM, "applied and ACKed, so enforced at the source's connect(): {r}");
    let nodes = node_table(&cluster);
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    for (name, n) in &nodes {
        assert_eq!(n["connected"], true, "{name}: {n}");
        assert_eq!(n["version"], revision.as_str(), "{name} ACKed the applied revision: {n}");
    }
    let get = palisade(&cluster, &["get", "segmentationpolicy", "-o", "json"]);
    assert!(text(&get).contains("no-9090"), "{}", text(&get));

    // An invalid batch changes nothing and names every problem with its file and line.
    let bad = write(
        &cluster,
        "bad.yaml",
        &format!(
            "{}---\n{}",
            deny_to("Bad_Name", "p2-1", 1),
            deny_to("no-9090", "p2-1", 9090).replace("Deny", "Sometimes")
        ),
    );
    let out = apply(&cluster, &bad);
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains(&format!("{}:1", bad.display())), "first document's problem with file:line: {t}");
    assert!(t.contains("nothing changed"), "{t}");
    assert_eq!(connect(&cluster, "p1-1", &dst, 10)["errno"], EPERM, "the previous policy stays");
    assert!(node_table(&cluster).values().all(|n| n["version"] == revision.as_str()));

    // Delete puts the traffic back.
    let out = palisade(&cluster, &["delete", "-f", cluster.info.state_dir.join("deny.yaml").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(connect(&cluster, "p1-1", &dst, 10)["verified"], true);
}

#[test]
fn a_nacked_snapshot_is_visible_with_its_reason_and_the_node_keeps_its_last_good_one() {
    // Two pods per node, so a connection can stay on one node.
    let cluster = mesh(2, 2, "");
    let _s = serve(&cluster, "p1-2", 9090);
    let target = format!("{}:9090", cluster.pod("p1-2").unwrap().ip);
    let generation_before = cluster.policy_generation("node-1").unwrap();
    // node-1 cannot write its state directory (a full or read-only disk: here, a directory
    // where the journal of its last good content must be appended), so it cannot put a
    // snapshot in force: one it could not keep on disk would be lost by a restart.
    let blocker = cluster.info.state_dir.join("ztunnel-node-1").join("snapshot.journal");
    let _ = std::fs::remove_file(&blocker);
    std::fs::create_dir_all(&blocker).unwrap();

    let out = apply(&cluster, &write(&cluster, "deny.yaml", &deny_to("no-9090", "p1-2", 9090)));
    assert!(!out.status.success(), "apply reports the node that did not take it: {}", text(&out));
    let t = text(&out);
    assert!(t.contains("node-1: NACK") && t.contains("snapshot.journal"), "{t}");
    let revision = revision_of(&out);
    let nodes = node_table(&cluster);
    let (n1, n2) = (&nodes["node-1"], &nodes["node-2"]);
    assert_eq!(n1["last_nack"]["version"], revision.as_str(), "{n1}");
    assert!(n1["last_nack"]["reason"].as_str().unwrap().contains("snapshot.journal"), "{n1}");
    assert_ne!(n1["version"], revision.as_str(), "node-1 keeps its last good version: {n1}");
    assert_eq!(n2["version"], revision.as_str(), "{n2}");
    // node-1 kept its policy: a connection within node-1 passes; node-2 enforces the new one.
    assert_eq!(cluster.policy_generation("node-1").unwrap(), generation_before);
    assert_eq!(connect(&cluster, "p1-1", &target, 10)["verified"], true);
    assert_eq!(connect(&cluster, "p2-1", &target, 10)["errno"], EPERM);

    // Once the node can write again, the next change reaches it.
    std::fs::remove_dir(&blocker).unwrap();
    let out = apply(&cluster, &write(&cluster, "deny2.yaml", &deny_to("no-9091", "p1-2", 9091)));
    assert!(out.status.success(), "{}", text(&out));
    let revision = revision_of(&out);
    assert_eq!(node_table(&cluster)["node-1"]["version"], revision.as_str());
    assert_eq!(connect(&cluster, "p1-1", &target, 10)["errno"], EPERM);
}

#[test]
fn with_the_control_plane_down_enforcement_continues_and_nodes_resync_when_it_returns() {
    let mut cluster = mesh(2, 1, "");
    let _s = serve(&cluster, "p2-1", 9090);
    let _t = serve(&cluster, "p2-1", 9091);
    let (denied, allowed) = {
        let ip = &cluster.pod("p2-1").unwrap().ip;
        (format!("{ip}:9090"), format!("{ip}:9091"))
    };
    let out = apply(&cluster, &write(&cluster, "deny.yaml", &deny_to("no-9090", "p2-1", 9090)));
    assert!(out.status.success(), "{}", text(&out));

    cluster.stop_control_plane().unwrap();
    assert_eq!(connect(&cluster, "p1-1", &denied, 10)["errno"], EPERM, "denied stays denied");
    assert_eq!(connect(&cluster, "p1-1", &allowed, 10)["verified"], true, "allowed still works");

    // A ztunnel restarted meanwhile starts from the snapshot it saved: its proxies know the
    // policy (the HBONE authorization at node-2 is user space), not only the pinned maps.
    cluster.stop_ztunnel("node-2", libc::SIGKILL).unwrap();
    cluster.start_new_ztunnel("node-2").unwrap();
    let log = std::fs::read_to_string(&cluster.node("node-2").unwrap().log).unwrap();
    assert!(log.contains("started from the snapshot saved on disk"), "{log}");
    let dump: Value = serde_json::from_str(&cluster.admin_get("node-2", "/config_dump").unwrap()).unwrap();
    assert!(dump["policy"].to_string().contains("no-9090"), "restarted node-2 runs the saved policy: {dump}");
    assert_eq!(connect(&cluster, "p1-1", &denied, 10)["errno"], EPERM);
    assert_eq!(connect(&cluster, "p1-1", &allowed, 10)["verified"], true);

    // A change made while it was down (a `git pull` into the store) reaches every node on return.
    std::fs::write(cluster.store_dir().join("more.yaml"), deny_to("no-9091", "p2-1", 9091)).unwrap();
    cluster.restart_control_plane().unwrap();
    wait_until("every node resynced", || {
        let nodes = node_table(&cluster);
        nodes.len() == 2
            && nodes.values().all(|n| n["connected"] == true)
            && connect(&cluster, "p1-1", &allowed, 10)["errno"] == EPERM
    });
    // Every node catches up with the store (node-2 saw no change of its own, so it may ACK a
    // moment after node-1).
    let revision = cluster.admin(&serde_json::json!({"op": "nodes"})).unwrap()["revision"].to_string();
    wait_until("every node ACKed the store's revision", || {
        node_table(&cluster).values().all(|n| n["version"] == revision.as_str())
    });
}

#[test]
fn after_a_root_rotation_nodes_follow_a_control_plane_whose_certificate_has_the_new_root() {
    let mut cluster = mesh(2, 1, "");
    let _s = serve(&cluster, "p2-1", 9090);
    let dst = format!("{}:9090", cluster.pod("p2-1").unwrap().ip);
    let palisade = palisade_sandbox::workspace_bin("palisade").unwrap();
    let ca = |step: &str| {
        let ca_dir = cluster.info.state_dir.join("ca");
        let out = std::process::Command::new(&palisade).args(["ca", "--dir", ca_dir.to_str().unwrap(), step]).output();
        let out = out.unwrap();
        assert!(out.status.success(), "palisade ca {step}: {}", text(&out));
    };
    let roots = |node: &str| {
        let dump: Value = serde_json::from_str(&cluster.admin_get(node, "/config_dump").unwrap()).unwrap();
        dump["trust_bundle_roots"].as_u64().unwrap_or(0)
    };
    ca("rotate");
    wait_until("both nodes trust two roots", || roots("node-1") == 2 && roots("node-2") == 2);
    ca("activate");
    // Started now, the control plane presents a certificate of the new root, which the nodes'
    // bundle.pem (written before the rotation) does not hold: they trust it through the
    // bundle their certificate manager keeps current.
    cluster.restart_control_plane().unwrap();
    wait_until("both nodes reconnected", || {
        let nodes = node_table(&cluster);
        nodes.len() == 2 && nodes.values().all(|n| n["connected"] == true)
    });
    let out = apply(&cluster, &write(&cluster, "deny.yaml", &deny_to("no-9090", "p2-1", 9090)));
    assert!(out.status.success(), "{}", text(&out));
    let revision = revision_of(&out);
    assert!(node_table(&cluster).values().all(|n| n["version"] == revision.as_str()), "{:?}", node_table(&cluster));
    assert_eq!(connect(&cluster, "p1-1", &dst, 10)["errno"], EPERM);
}

/// Polls `cond` every 50 ms for up to 30 s.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The control plane's listeners under attack: idle and garbage connections on the push port
/// (from a node's namespace) and garbage and an oversized line on the admin socket. Pushes
/// still reach every node, and the admin API still answers.
#[test]
fn the_control_plane_stays_up_under_idle_garbage_and_oversized_input() {
    use std::io::{Read, Write};
    let cluster = mesh(2, 1, "");
    let _s = serve(&cluster, "p2-1", 9090);
    let dst = format!("{}:9090", cluster.pod("p2-1").unwrap().ip);
    let node = cluster.node("node-1").unwrap().netns.clone();
    let addr: std::net::SocketAddr = palisade_sandbox::cluster::CONTROL_PLANE_ADDR.parse().unwrap();
    let held = palisade_sandbox::sys::in_netns(&node, move || {
        let mut held = Vec::new();
        for i in 0..300 {
            let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)) else {
                continue;
            };
            if i % 3 == 0 {
                let _ = s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff]);
                let _ = s.write_all(&[0x41; 4096]);
            }
            held.push(s);
        }
        held
    })
    .unwrap();
    // Garbage, then an endless line, on the admin socket.
    let socket = cluster.admin_socket();
    let mut garbage = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    garbage.write_all(b"{not json\n").unwrap();
    let mut answer = [0u8; 256];
    let _ = garbage.read(&mut answer);
    let mut endless = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    endless.set_write_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let _ = endless.write_all(&vec![b'x'; 8 << 20]);

    let out = apply(&cluster, &write(&cluster, "deny.yaml", &deny_to("no-9090", "p2-1", 9090)));
    assert!(out.status.success(), "{}", text(&out));
    let revision = revision_of(&out);
    assert!(node_table(&cluster).values().all(|n| n["version"] == revision.as_str()), "{:?}", node_table(&cluster));
    assert_eq!(connect(&cluster, "p1-1", &dst, 10)["errno"], EPERM);
    drop(held);
}
