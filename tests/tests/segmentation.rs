//! In-kernel microsegmentation: denied egress fails at connect() with EPERM and sends
//! nothing; denied inbound plaintext is refused before the application sees it; reloads
//! change verdicts for new connections without a window.
mod support;

use support::*;

const EPERM: i64 = 1;
const ECONNREFUSED: i64 = 111;

fn deny_policy(name: &str, target: &str, source_sa: &str, port: u16) -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  selector: {{matchLabels: {{app: {target}}}}}\n  action: Deny\n  rules:\n  - from: [{{serviceAccount: {source_sa}}}]\n    ports: [{port}]\n"
    )
}

#[test]
fn denied_egress_connect_fails_with_eperm_and_sends_no_packet() {
    let cluster = mesh(2, 2, &deny_policy("no-9090", "p2-1", "p1-1", 9090));
    let denied = serve(&cluster, "p2-1", 9090);
    let _allowed = serve(&cluster, "p2-1", 9091);
    let dst = cluster.pod("p2-1").unwrap().ip.clone();

    let before = cluster.tx_packets("p1-1").unwrap();
    let r = connect(&cluster, "p1-1", &format!("{dst}:9090"), 10);
    let after = cluster.tx_packets("p1-1").unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["errno"], EPERM, "{r}");
    assert_eq!(after, before, "a denied connect must not put a single packet on the pod's interface");
    assert!(denied.connections().is_empty(), "the application saw a denied connection");
    let ev = wait_flow(&cluster, "node-1", |f| f["verdict"] == "deny" && f["dst"] == format!("{dst}:9090"));
    assert_eq!(ev["observer"], "kernel");
    assert_eq!(ev["policy"], "default/no-9090 rule 0");
    assert_eq!(ev["src_identity"], "default/p1-1");
    assert_eq!(ev["dst_identity"], "default/p2-1");

    // The rule is specific: another port and another source still pass.
    let ok = connect(&cluster, "p1-1", &format!("{dst}:9091"), 10);
    assert_eq!(ok["verified"], true, "{ok}");
    let ok = connect(&cluster, "p1-2", &format!("{dst}:9090"), 10);
    assert_eq!(ok["verified"], true, "{ok}");
}

#[test]
fn plaintext_from_a_mesh_workload_never_reaches_the_application() {
    // No policy: everything is allowed, but only through HBONE.
    let cluster = mesh(2, 2, "");
    // p1-1 leaves the mesh (its ztunnel bypassed): its traffic arrives at p2-1 as plain TCP
    // from a mesh workload's address, which must never stand in for a proven identity.
    cluster.unenroll("p1-1").unwrap();
    let server = serve(&cluster, "p2-1", 2222);
    let dst = cluster.pod("p2-1").unwrap().ip.clone();

    let r = connect(&cluster, "p1-1", &format!("{dst}:2222"), 10);
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["errno"], ECONNREFUSED, "refused by a reset, not left to time out: {r}");
    assert!(server.connections().is_empty(), "the application saw a plaintext connection: {:?}", server.connections());
    let ev = wait_flow(&cluster, "node-2", |f| f["verdict"] == "deny" && f["direction"] == "inbound");
    assert_eq!(ev["policy"], "plaintext from a mesh workload (it must use HBONE)");
    assert_eq!(ev["src_identity"], "default/p1-1");

    // The same workload through its ztunnel (HBONE) is carried.
    let ok = connect(&cluster, "p1-2", &format!("{dst}:2222"), 1000);
    assert_eq!(ok["verified"], true, "{ok}");
    assert_eq!(server.connections().len(), 1);
}

#[test]
fn policy_reload_changes_verdicts_without_a_window() {
    let mut cluster = mesh(2, 1, "");
    let _s1 = serve(&cluster, "p2-1", 9090);
    let _s2 = serve(&cluster, "p2-1", 9091);
    let dst = cluster.pod("p2-1").unwrap().ip.clone();
    let (denied_addr, allowed_addr) = (format!("{dst}:9090"), format!("{dst}:9091"));

    assert_eq!(connect(&cluster, "p1-1", &denied_addr, 10)["verified"], true);
    let deny = deny_policy("no-9090", "p2-1", "p1-1", 9090);
    cluster.set_policy(&deny).unwrap();
    let r = connect(&cluster, "p1-1", &denied_addr, 10);
    assert_eq!(r["errno"], EPERM, "after reload: {r}");

    // A broken file is rejected; the policy in force stays.
    let before = cluster.policy_generation("node-1").unwrap();
    let err = cluster.set_policy(
        "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: x}\nspec: {action: Maybe}\n",
    );
    assert!(err.is_err(), "an invalid policy must not be applied");
    assert_eq!(cluster.policy_generation("node-1").unwrap(), before);
    assert_eq!(connect(&cluster, "p1-1", &denied_addr, 10)["errno"], EPERM);

    // Reload again and again (an unrelated rule changes each time) while connecting: the
    // denied flow never passes and the allowed one never fails.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let policies: Vec<String> =
        (0..12u16).map(|i| format!("{deny}---\n{}", deny_policy("unrelated", "p2-1", "p1-1", 30000 + i))).collect();
    let prober = {
        let stop = stop.clone();
        let view = palisade_sandbox::Cluster::attach(cluster.info.clone());
        let (denied_addr, allowed_addr) = (denied_addr.clone(), allowed_addr.clone());
        std::thread::spawn(move || {
            let mut results = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                results.push(("deny", connect(&view, "p1-1", &denied_addr, 10)));
                results.push(("allow", connect(&view, "p1-1", &allowed_addr, 10)));
            }
            results
        })
    };
    for p in &policies {
        cluster.set_policy(p).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = prober.join().unwrap();
    assert!(results.len() >= 4, "too few probes during reloads: {}", results.len());
    for (expect, r) in &results {
        match *expect {
            "deny" => assert_eq!(r["errno"], EPERM, "a denied flow passed during a reload: {r}"),
            _ => assert_eq!(r["verified"], true, "an allowed flow failed during a reload: {r}"),
        }
    }

    // Removing the policy allows again.
    cluster.set_policy("").unwrap();
    assert_eq!(connect(&cluster, "p1-1", &denied_addr, 10)["verified"], true);
}
