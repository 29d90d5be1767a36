//! Flow events tell the truth: an outbound HBONE connection whose peer proved another identity
//! is reported as refused, without claiming the identity it did not prove; a connection
//! closed by a policy change reports the bytes it carried until the close; kernel verdicts
//! carry the policy generation that took them and are named with it.
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use palisade_mesh::ca_api::new_key_and_csr;
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::tls::{Credential, CredentialSlot, TrustBundle, server_config};
use palisade_sandbox::Cluster;
use serde_json::Value;
use support::*;

const CHUNK: i64 = 64 * 1024;

fn policy(name: &str, action: &str, rule: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  selector: {{matchLabels: {{app: p2-1}}}}\n  action: {action}\n  rules:\n  - {rule}\n---\n"
    )
}

/// A TLS server on `pod`'s 15008 presenting a certificate of the cluster's CA for `identity`;
/// counts the handshakes tried against it. Stops when the returned sender is dropped.
fn impostor(cluster: &Cluster, pod: &str, identity: &SpiffeId) -> (tokio::sync::oneshot::Sender<()>, Arc<AtomicUsize>) {
    let ca = palisade_ca::authority::CertificateAuthority::open(&cluster.info.state_dir.join("ca"), "cluster.local")
        .expect("the sandbox CA");
    let (key, csr) = new_key_and_csr().unwrap();
    let (chain, _) = ca.sign_workload(&csr, identity).unwrap();
    let credential = CredentialSlot::new(Credential::from_pem(&chain, &key).unwrap());
    let bundle = TrustBundle::from_pem(&ca.bundle_pem(), "cluster.local").unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(credential, &bundle, &[b"h2"]).unwrap());
    let netns = cluster.pod(pod).unwrap().netns.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (bound_tx, bound) = std::sync::mpsc::channel();
    let tried = Arc::new(AtomicUsize::new(0));
    let counter = tried.clone();
    std::thread::spawn(move || {
        palisade_sandbox::sys::in_netns(&netns, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                // ztunnel's listener of the unenrolled pod has just closed: retry briefly.
                let deadline = Instant::now() + Duration::from_secs(5);
                let listener = loop {
                    match tokio::net::TcpListener::bind("0.0.0.0:15008").await {
                        Ok(l) => break l,
                        Err(e) if Instant::now() > deadline => panic!("bind 15008 in the pod: {e}"),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                };
                bound_tx.send(()).unwrap();
                let serve = async {
                    loop {
                        let (tcp, _) = listener.accept().await.unwrap();
                        counter.fetch_add(1, Ordering::SeqCst);
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await;
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            })
        })
        .unwrap();
    });
    bound.recv_timeout(Duration::from_secs(10)).expect("impostor listening");
    (stop, tried)
}

#[test]
fn an_outbound_event_never_claims_an_identity_the_peer_did_not_prove() {
    let cluster = mesh(2, 1, "");
    // p2-1 stays in the inventory (so p1-1's ztunnel tunnels to it and requires its identity),
    // but its ztunnel listener is gone and an impostor of the mesh answers on 15008.
    cluster.unenroll("p2-1").unwrap();
    let impostor_id = SpiffeId::new("cluster.local", "default", "impostor");
    let (_stop, tried) = impostor(&cluster, "p2-1", &impostor_id);
    let dst = format!("{}:8080", cluster.pod("p2-1").unwrap().ip);
    let r = connect(&cluster, "p1-1", &dst, 1000);
    assert_ne!(r["verified"], true, "data crossed to an impostor: {r}");
    assert!(tried.load(Ordering::SeqCst) > 0, "the tunnel never reached the impostor (test set-up)");
    let ev = wait_flow(&cluster, "node-1", |f| {
        f["observer"] == "proxy" && f["direction"] == "outbound" && f["dst"] == dst.as_str()
    });
    assert_eq!(ev["transport"], "hbone", "{ev}");
    assert_eq!(ev["verdict"], "deny", "a connection to a peer that proved the wrong identity is not allowed: {ev}");
    assert!(ev.get("peer_spiffe_id").is_none_or(Value::is_null), "claims an unproven peer identity: {ev}");
    let error = ev["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("peer identity mismatch")
            && error.contains("expected spiffe://cluster.local/ns/default/sa/p2-1")
            && error.contains("got spiffe://cluster.local/ns/default/sa/impostor"),
        "the error says what was expected and what was proven: {ev}"
    );
}

/// Waits for the echo server's log line of the connection (written when it ends).
fn server_bytes(server: &Server) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(c) = server.connections().first() {
            return c["bytes"].as_i64().unwrap();
        }
        assert!(Instant::now() < deadline, "the server never logged the connection");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn closed_by_policy(f: &Value) -> bool {
    f["observer"] == "proxy" && f["error"].as_str().is_some_and(|e| e.contains("policy now denies"))
}

fn assert_near(what: &str, got: &Value, expected: i64, ev: &Value) {
    let got = got.as_i64().unwrap_or(-1);
    assert!(got > 0, "{what}: no bytes reported: {ev}");
    assert!((got - expected).abs() <= CHUNK, "{what}: reported {got}, the endpoints saw {expected}: {ev}");
}

#[test]
fn an_hbone_connection_closed_by_a_policy_change_reports_its_bytes() {
    let mut cluster = mesh(2, 1, "");
    let server = serve(&cluster, "p2-1", 8080);
    let dst = format!("{}:8080", cluster.pod("p2-1").unwrap().ip);
    let long = paced_transfer(&cluster, &dst, 4 << 20, 100);
    wait_flow(&cluster, "node-1", |f| f["observer"] == "kernel" && f["dst"] == dst.as_str());
    // A few chunks cross before the cut.
    std::thread::sleep(Duration::from_millis(800));
    cluster.set_policy(&policy("cut", "Deny", "{from: [{serviceAccount: p1-1}]}")).unwrap();
    let inbound = wait_flow(&cluster, "node-2", closed_by_policy);
    let r = long.join().unwrap();
    assert_ne!(r["verified"], true, "the connection survived a policy that denies it: {r}");
    let at_server = server_bytes(&server);
    let client_received = r["received"].as_i64().unwrap();
    eprintln!("server got {at_server}, client received {client_received}; destination event: {inbound}");
    // Destination: what it delivered to the application, and what it sent back.
    assert_near("destination bytes_sent", &inbound["bytes_sent"], at_server, &inbound);
    assert_near("destination bytes_received", &inbound["bytes_received"], client_received, &inbound);
    // Source: the tunnel was reset under it; it still reports what it carried.
    let outbound = wait_flow(&cluster, "node-1", |f| f["observer"] == "proxy" && f["dst"] == dst.as_str());
    assert_near("source bytes_sent", &outbound["bytes_sent"], at_server, &outbound);
    assert_near("source bytes_received", &outbound["bytes_received"], client_received, &outbound);
}

#[test]
fn a_plaintext_connection_closed_by_a_policy_change_reports_its_bytes() {
    // From the node network (outside the mesh): plaintext, carried by the inbound proxy.
    let mut cluster = mesh(2, 1, "");
    let server = serve(&cluster, "p2-1", 8080);
    let dst = format!("{}:8080", cluster.pod("p2-1").unwrap().ip);
    let node1 = cluster.node("node-1").unwrap().clone();
    let probe = palisade_sandbox::workspace_bin("palisade-probe").unwrap();
    let client = {
        let (dst, netns) = (dst.clone(), node1.netns.clone());
        std::thread::spawn(move || {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &netns])
                .arg(probe)
                .args(["connect", "--to", &dst, "--bytes", &(4u64 << 20).to_string(), "--timeout-ms", "10000"])
                .args(["--pace-ms", "100"])
                .output()
                .expect("run probe client");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            serde_json::from_str::<Value>(text.trim()).unwrap_or_else(|e| panic!("probe output {text:?}: {e}"))
        })
    };
    wait_flow(&cluster, "node-2", |f| f["observer"] == "kernel" && f["dst"] == dst.as_str());
    std::thread::sleep(Duration::from_millis(800));
    cluster.set_policy(&policy("cut-node", "Deny", "{from: [{ipBlocks: [\"172.18.0.0/24\"]}]}")).unwrap();
    let ev = wait_flow(&cluster, "node-2", closed_by_policy);
    assert_eq!(ev["transport"], "tcp", "{ev}");
    let r = client.join().unwrap();
    assert_ne!(r["verified"], true, "the connection survived a policy that denies it: {r}");
    let at_server = server_bytes(&server);
    eprintln!("server got {at_server}, client received {}; event: {ev}", r["received"]);
    assert_near("bytes_sent", &ev["bytes_sent"], at_server, &ev);
    assert_near("bytes_received", &ev["bytes_received"], r["received"].as_i64().unwrap(), &ev);
}

#[test]
fn kernel_verdicts_carry_and_are_named_by_the_generation_that_took_them() {
    let deny = |name: &str| policy(name, "Deny", "{from: [{serviceAccount: p1-1}]}");
    let mut cluster = mesh(2, 1, &deny("first"));
    let _server = serve(&cluster, "p2-1", 8080);
    let dst = format!("{}:8080", cluster.pod("p2-1").unwrap().ip);
    let first_generation = cluster.policy_generation("node-1").unwrap();
    let r = connect(&cluster, "p1-1", &dst, 100);
    assert_ne!(r["verified"], true, "{r}");
    let denied_under = |cluster: &Cluster, rule: &str| {
        wait_flow(cluster, "node-1", |f| f["observer"] == "kernel" && f["verdict"] == "deny" && f["policy"] == rule)
    };
    let ev = denied_under(&cluster, "default/first rule 0");
    assert_eq!(ev["policy_generation"].as_u64(), Some(first_generation), "{ev}");
    // A policy whose rule numbers differ: an allow rule sorts before the new deny.
    cluster
        .set_policy(&format!("{}{}", policy("a-allow", "Allow", "{from: [{serviceAccount: p1-1}]}"), deny("second")))
        .unwrap();
    let second_generation = cluster.policy_generation("node-1").unwrap();
    assert!(second_generation > first_generation);
    let r = connect(&cluster, "p1-1", &dst, 100);
    assert_ne!(r["verified"], true, "{r}");
    let ev = denied_under(&cluster, "default/second rule 0");
    assert_eq!(ev["policy_generation"].as_u64(), Some(second_generation), "{ev}");
    assert_eq!(
        (ev["src_identity"].as_str(), ev["dst_identity"].as_str()),
        (Some("default/p1-1"), Some("default/p2-1"))
    );
    // The first verdict keeps its names: recorded with the policy that took it.
    let flows = cluster.flows("node-1").unwrap();
    let kernel_denies: Vec<&Value> =
        flows.iter().filter(|f| f["observer"] == "kernel" && f["verdict"] == "deny").collect();
    assert_eq!(kernel_denies.len(), 2, "{kernel_denies:?}");
    assert_eq!(kernel_denies[0]["policy"], "default/first rule 0");
}
