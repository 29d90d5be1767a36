//! The `waypoint` binary following `palisade serve` (in process, over a directory store):
//! it subscribes with its own workload certificate as `waypoint shop/waypoint`, serves what
//! the control plane pushes and ACKs it (`get nodes` lists it); a workload certificate that is
//! not the identity of the waypoint's workloads is refused by the server.
mod bed;

use std::sync::Arc;
use std::time::Duration;

use bed::{Bed, CA, FRONTEND, WEB_V1, bounded, get, id};
use http::StatusCode;
use palisade_api::client::{Content, Sink, Subscriber};
use palisade_api::v1::SnapshotResponse;
use palisade_server::store::dir::DirStore;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const PUSH_PORT: u16 = 15010;

/// `palisade serve` on the bed's CA directory, its store a directory holding the bed's
/// resources.
async fn serve_control_plane(bed: &Bed) -> bed::AbortOnDrop {
    let store_dir = bed.dir.join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    std::fs::copy(&bed.policy, store_dir.join("policy.yaml")).unwrap();
    let store = DirStore::open(&store_dir, Duration::from_millis(100)).unwrap();
    let ca_dir = bed.dir.join("ca");
    let config = palisade_server::ServeConfig {
        listen: bed.net.addr(CA, PUSH_PORT),
        admin_socket: bed.dir.join("palisade.sock"),
        ca_dir: ca_dir.clone(),
        ca_listen: None,
        workload_ttl: Duration::from_secs(3600),
    };
    let ca = palisade_ca::authority::CertificateAuthority::open(&ca_dir, bed::TD).unwrap();
    let task = tokio::spawn(async move {
        if let Err(e) = palisade_server::serve(config, Arc::new(store), ca).await {
            panic!("control plane: {e}");
        }
    });
    bed::AbortOnDrop(task)
}

/// `get nodes` through the admin socket: (name, version in force) of each client.
async fn nodes(bed: &Bed) -> Vec<(String, Option<String>)> {
    let mut socket = tokio::net::UnixStream::connect(bed.dir.join("palisade.sock")).await.unwrap();
    socket.write_all(b"{\"op\":\"nodes\"}\n").await.unwrap();
    let mut line = String::new();
    BufReader::new(socket).read_line(&mut line).await.unwrap();
    let answer: serde_json::Value = serde_json::from_str(&line).unwrap();
    let list = answer.get("nodes").and_then(|n| n.as_array()).cloned().unwrap_or_default();
    list.iter()
        .map(|n| (n["node"].as_str().unwrap_or_default().to_string(), n["version"].as_str().map(str::to_string)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_follows_the_control_plane_with_its_own_identity() {
    let mut bed = Bed::new("cp").await;
    let _server = serve_control_plane(&bed).await;
    let v1 = bed.destination(WEB_V1, "v1").await;
    let push = bed.net.addr(CA, PUSH_PORT).to_string();
    bounded(30, bed.start_waypoint_with(&["--control-plane", &push])).await;
    let frontend = id("front", "frontend");
    let io = bounded(10, bed.tunnel(FRONTEND, frontend.clone(), bed.issue(&frontend))).await.unwrap();
    let (status, body) = bounded(10, get(io, "/items/1", false)).await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", bed.log());
    assert_eq!(v1.hits(), 1);
    // The server lists the waypoint under its name, with a version in force (ACKed).
    let mut listed = Vec::new();
    for _ in 0..100 {
        listed = bounded(5, nodes(&bed)).await;
        if listed.iter().any(|(n, v)| n == "waypoint shop/waypoint" && v.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(listed.iter().any(|(n, v)| n == "waypoint shop/waypoint" && v.is_some()), "get nodes: {listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_restarted_while_the_control_plane_is_unreachable_serves_the_saved_configuration() {
    let mut bed = Bed::new("cp-saved").await;
    let server = serve_control_plane(&bed).await;
    let v1 = bed.destination(WEB_V1, "v1").await;
    let state = bed.dir.join("state").to_string_lossy().into_owned();
    let push = bed.net.addr(CA, PUSH_PORT).to_string();
    bounded(30, bed.start_waypoint_with(&["--control-plane", &push, "--state-dir", &state])).await;
    let frontend = id("front", "frontend");
    let io = bounded(10, bed.tunnel(FRONTEND, frontend.clone(), bed.issue(&frontend))).await.unwrap();
    assert_eq!(bounded(10, get(io, "/items/1", false)).await.0, StatusCode::OK);
    bed.kill_waypoint();
    drop(server);
    // Nothing listens there: only the saved configuration can make the waypoint ready.
    let nowhere = bed.net.addr(CA, PUSH_PORT + 1).to_string();
    bounded(30, bed.start_waypoint_with(&["--control-plane", &nowhere, "--state-dir", &state])).await;
    // Log lines reach the file from a writer thread, a few milliseconds after they are logged.
    let saved = bed.wait_for_log(|log| log.contains("started from the content saved on disk")).await;
    assert!(saved, "{}", bed.log());
    let io = bounded(10, bed.tunnel(FRONTEND, frontend.clone(), bed.issue(&frontend))).await.unwrap();
    let (status, body) = bounded(10, get(io, "/items/1", true)).await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", bed.log());
    assert_eq!(v1.hits(), 2);
}

struct Recorder(Content);

impl Sink for Recorder {
    async fn apply(&mut self, response: SnapshotResponse) -> Result<(), String> {
        self.0 = self.0.next(&response);
        Ok(())
    }
    fn version(&self) -> String {
        self.0.version.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_that_is_not_the_waypoints_identity_is_refused_by_the_control_plane() {
    let bed = Bed::new("cp-refuse").await;
    let _server = serve_control_plane(&bed).await;
    let push = bed.net.addr(CA, PUSH_PORT);
    let subscribe = |who: &str, name: &str| {
        let identity = id("front", who);
        Subscriber {
            addrs: vec![push],
            name: name.into(),
            credential: bed.issue(&identity),
            bundle: tokio::sync::watch::channel(bed.bundle.clone()).1,
            server: palisade_mesh::identity::SpiffeId::new(bed::TD, "palisade-system", "palisade-server"),
        }
    };
    // The server may still be binding or reading its store: retry those, not a refusal.
    let mut outcome = Err(String::new());
    for _ in 0..100 {
        let mut sink = Recorder(Content::default());
        outcome = bounded(10, subscribe("frontend", "waypoint shop/waypoint").once(push, &mut sink))
            .await
            .map_err(|e| e.message);
        if !matches!(&outcome, Err(m) if m.contains("onnect") || m.contains("no resources in force yet")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refusal = outcome.expect_err("a workload that is not the waypoint's identity got the stream");
    assert!(refusal.contains("do not run as this identity"), "{refusal}");
    // A workload certificate may not pose as a node either.
    let mut sink = Recorder(Content::default());
    let refusal = bounded(10, subscribe("frontend", "node-1").once(push, &mut sink)).await.unwrap_err().message;
    assert!(refusal.contains("may only subscribe as"), "{refusal}");
    assert!(sink.0.documents.is_empty());
}
