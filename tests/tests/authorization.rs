//! L4 authorization by identity at the destination ztunnel: rules the kernel cannot hold are
//! enforced there (HBONE answers 401), Audit mode reports without enforcing, and a policy
//! change closes established connections it now denies within a second.
mod support;

use std::time::Duration;

use support::*;

fn policy(name: &str, action: &str, mode: &str, rule: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  selector: {{matchLabels: {{app: p2-1}}}}\n  action: {action}\n  mode: {mode}\n  rules:\n  - {rule}\n"
    )
}

#[test]
fn the_destination_enforces_rules_the_kernel_cannot_hold() {
    // "Deny p1-1 on every port but 8080": notPorts cannot be a kernel cell, so the kernel lets
    // the connect through and the destination ztunnel refuses the HBONE stream.
    let deny = policy(
        "only-8080",
        "Deny",
        "Enforce",
        "{from: [{principals: [\"cluster.local/ns/default/sa/p1-1\"]}], notPorts: [8080]}",
    );
    let cluster = mesh(2, 1, &deny);
    let blocked = serve(&cluster, "p2-1", 9090);
    let _open = serve(&cluster, "p2-1", 8080);
    let ip = cluster.pod("p2-1").unwrap().ip.clone();
    let r = connect(&cluster, "p1-1", &format!("{ip}:9090"), 1000);
    assert_ne!(r["verified"], true, "a denied connection carried data: {r}");
    assert!(blocked.connections().is_empty(), "the application saw a denied connection");
    let ev = wait_flow(&cluster, "node-2", |f| f["direction"] == "inbound" && f["verdict"] == "deny");
    assert_eq!(ev["policy"], "default/only-8080 rule 0", "{ev}");
    assert_eq!(ev["peer_spiffe_id"], "spiffe://cluster.local/ns/default/sa/p1-1", "{ev}");
    assert_eq!(connect(&cluster, "p1-1", &format!("{ip}:8080"), 1000)["verified"], true);
}

#[test]
fn audit_mode_reports_what_it_would_deny_without_enforcing() {
    let audit = policy("trial", "Deny", "Audit", "{from: [{namespaces: [default]}]}");
    let cluster = mesh(2, 1, &audit);
    let _server = serve(&cluster, "p2-1", 8080);
    let ip = cluster.pod("p2-1").unwrap().ip.clone();
    assert_eq!(connect(&cluster, "p1-1", &format!("{ip}:8080"), 1000)["verified"], true);
    let ev = wait_flow(&cluster, "node-2", |f| f["direction"] == "inbound" && f["observer"] == "proxy");
    assert_eq!(ev["verdict"], "allow");
    assert_eq!(ev["audit"], "default/trial rule 0", "{ev}");
    assert_eq!(metric(&cluster, "node-2", "palisade_audit_would_deny_total"), 1.0);
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[test]
fn a_policy_change_closes_established_connections_it_denies_within_a_second() {
    let mut cluster = mesh(2, 1, "");
    let _server = serve(&cluster, "p2-1", 8080);
    let dst = format!("{}:8080", cluster.pod("p2-1").unwrap().ip);
    // A slow 4 MiB transfer (~6 s) is established when the policy changes.
    let long = paced_transfer(&cluster, &dst, 4 << 20, 100);
    wait_flow(&cluster, "node-1", |f| f["observer"] == "kernel" && f["dst"] == dst.as_str());
    std::thread::sleep(Duration::from_millis(500));
    let applied_unix_ms = unix_ms();
    cluster.set_policy(&policy("cut", "Deny", "Enforce", "{from: [{serviceAccount: p1-1}]}")).unwrap();
    let ev = wait_flow(&cluster, "node-2", |f| {
        f["observer"] == "proxy" && f["error"].as_str().is_some_and(|e| e.contains("policy now denies"))
    });
    // The flow event's own timestamp is when ztunnel closed the connection.
    let closed_after_ms = ev["time_unix_ms"].as_u64().unwrap().saturating_sub(applied_unix_ms);
    eprintln!("established connection closed {closed_after_ms} ms after the policy was written");
    assert!(ev["error"].as_str().unwrap().contains("default/cut rule 0"), "{ev}");
    assert!(closed_after_ms < 1000, "closed {closed_after_ms} ms after the policy was written");
    let r = long.join().unwrap();
    assert_ne!(r["verified"], true, "the connection survived a policy that denies it: {r}");
}
