//! The `waypoint` binary end to end over real HBONE and mutual TLS: it gets its certificate
//! from a real CA with a node credential, HBONE clients with workload certificates CONNECT to
//! it for a Service VIP, their HTTP/1.1 and HTTP/2 requests are routed to backends reached over
//! HBONE (each backend checks that the waypoint proved its own identity), a source the
//! destination's L4 policy does not admit never reaches a backend, and clients without a mesh
//! certificate are refused at the handshake.
mod bed;

use bed::{Bed, FRONTEND, INTRUDER, WEB_V1, WEB_V2, bounded, get, id, raw_connect};
use http::StatusCode;
use palisade_mesh::tls::CredentialSlot;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_http1_and_http2_to_backends_over_hbone_with_the_waypoints_identity() {
    let mut bed = Bed::new("route").await;
    let v1 = bed.destination(WEB_V1, "v1").await;
    let v2 = bed.destination(WEB_V2, "v2").await;
    bounded(30, bed.start_waypoint()).await;
    let frontend = id("front", "frontend");
    let cred = bed.issue(&frontend);
    for h2 in [false, true] {
        for (path, want) in [("/items/1", "v1"), ("/v2/items/1", "v2")] {
            let io = bounded(10, bed.tunnel(FRONTEND, frontend.clone(), cred.clone())).await.unwrap();
            let (status, body) = bounded(10, get(io, path, h2)).await;
            assert_eq!(status, StatusCode::OK, "{path} h2={h2}: {body}\n{}", bed.log());
            assert!(body.starts_with(&format!("{want} {path}")), "{path} h2={h2} went to {body}");
        }
    }
    assert_eq!((v1.hits(), v2.hits()), (2, 2));
    // Every tunnel to a backend proved the waypoint's identity, never the client's.
    let waypoint = id("shop", "waypoint").to_string();
    for d in [&v1, &v2] {
        let peers = d.peers.lock().unwrap().clone();
        assert!(!peers.is_empty() && peers.iter().all(|p| *p == waypoint), "{} saw {peers:?}", d.name);
    }
    let (status, metrics) = bounded(5, bed.get_admin("/metrics")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(metrics.contains("status=\"200\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_the_destination_does_not_admit_at_l4_never_reaches_the_backend() {
    let mut bed = Bed::new("l4").await;
    let v1 = bed.destination(WEB_V1, "v1").await;
    let _v2 = bed.destination(WEB_V2, "v2").await;
    bounded(30, bed.start_waypoint()).await;
    let intruder = id("other", "intruder");
    let io = bounded(10, bed.tunnel(INTRUDER, intruder.clone(), bed.issue(&intruder))).await.unwrap();
    let (status, body) = bounded(10, get(io, "/items/1", false)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // The access log names the L4 rule that refused.
    let named = bed
        .wait_for_log(|log| log.lines().any(|l| l.contains("other/sa/intruder") && l.contains("authz_rule=\"l4:")))
        .await;
    assert!(named, "no access-log line names the L4 rule:\n{}", bed.log());
    // A proven identity used from another workload's address is refused too (not at source).
    let frontend = id("front", "frontend");
    let io = bounded(10, bed.tunnel(INTRUDER, frontend.clone(), bed.issue(&frontend))).await.unwrap();
    let (status, _) = bounded(10, get(io, "/items/1", false)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(v1.hits(), 0, "a refused source reached the backend");
    assert!(v1.peers.lock().unwrap().is_empty(), "the waypoint opened a tunnel for a refused source");
    // The allowed source from its own address still gets through.
    let io = bounded(10, bed.tunnel(FRONTEND, frontend.clone(), bed.issue(&frontend))).await.unwrap();
    assert_eq!(bounded(10, get(io, "/items/1", true)).await.0, StatusCode::OK);
    assert_eq!(v1.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_mesh_certificate_are_refused_at_the_handshake() {
    let mut bed = Bed::new("unauth").await;
    let v1 = bed.destination(WEB_V1, "v1").await;
    bounded(30, bed.start_waypoint()).await;
    let frontend = id("front", "frontend");
    // No certificate at all.
    let refused = bounded(15, raw_connect(&bed, FRONTEND, None)).await;
    assert!(refused.is_err(), "a client without a certificate got {refused:?}");
    // A certificate for the right name from another CA.
    let other_dir = bed.dir.join("other-ca");
    let other = palisade_ca::authority::CertificateAuthority::init(&other_dir, bed::TD).unwrap().0;
    let (key, csr) = palisade_mesh::ca_api::new_key_and_csr().unwrap();
    let (chain, _) = other.sign_workload(&csr, &frontend).unwrap();
    let forged = CredentialSlot::new(palisade_mesh::tls::Credential::from_pem(&chain, &key).unwrap());
    let refused = bounded(15, raw_connect(&bed, FRONTEND, Some(forged))).await;
    assert!(refused.is_err(), "a client of another CA got {refused:?}");
    // Both were refused by the waypoint's TLS, which says so (the client may finish its side
    // of a TLS 1.3 handshake before the refusal arrives).
    let logged = bed.wait_for_log(|log| log.matches("HBONE handshake failed").count() == 2).await;
    assert!(logged, "the waypoint did not log two refused handshakes:\n{}", bed.log());
    // The same client with the mesh's certificate is served.
    let good = bounded(15, raw_connect(&bed, FRONTEND, Some(bed.issue(&frontend)))).await;
    assert_eq!(good, Ok(StatusCode::OK));
    assert_eq!(v1.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_is_put_in_force_and_a_bad_one_keeps_the_last_good() {
    let mut bed = Bed::new("reload").await;
    let v1 = bed.destination(WEB_V1, "v1").await;
    let v2 = bed.destination(WEB_V2, "v2").await;
    bounded(30, bed.start_waypoint()).await;
    let frontend = id("front", "frontend");
    let cred = bed.issue(&frontend);
    let fetch = |path: &'static str| {
        let (bed, frontend, cred) = (&bed, frontend.clone(), cred.clone());
        async move {
            let io = bounded(10, bed.tunnel(FRONTEND, frontend, cred)).await.unwrap();
            bounded(10, get(io, path, false)).await
        }
    };
    assert!(fetch("/items/1").await.1.starts_with("v1 "));
    // Everything to v2 now.
    let all_to_v2 = std::fs::read_to_string(&bed.policy)
        .unwrap()
        .replace("  - backendRefs: [{name: web-v1, port: 80}]", "  - backendRefs: [{name: web-v2, port: 80}]");
    std::fs::write(&bed.policy, &all_to_v2).unwrap();
    let mut moved = false;
    for _ in 0..100 {
        if fetch("/items/1").await.1.starts_with("v2 ") {
            moved = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(moved, "the route change was not put in force:\n{}", bed.log());
    // A broken file: refused with its place named, the last good configuration stays.
    std::fs::write(&bed.policy, format!("{all_to_v2}---\nkind: HTTPRoute\nmetadata: {{name: bad\n")).unwrap();
    let refused = bed.wait_for_log(|log| log.contains("policy change refused")).await;
    assert!(refused, "a broken policy file was not reported:\n{}", bed.log());
    assert!(bed.log().contains("policy.yaml"), "the refusal does not name the file:\n{}", bed.log());
    assert!(fetch("/items/1").await.1.starts_with("v2 "));
    assert!(v1.hits() >= 1 && v2.hits() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_tcp_passes_through_over_hbone_under_the_destinations_l4_policy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut bed = Bed::new("tcp").await;
    let (v1, v2) = (bed.echo_destination(WEB_V1, "v1").await, bed.echo_destination(WEB_V2, "v2").await);
    bounded(30, bed.start_waypoint()).await;
    let frontend = id("front", "frontend");
    let mut io = bounded(10, bed.tunnel(FRONTEND, frontend.clone(), bed.issue(&frontend))).await.unwrap();
    // Not HTTP: passed through to an endpoint of the Service, over HBONE.
    io.write_all(b"\x00\x01 not http\n").await.unwrap();
    io.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    bounded(10, io.read_to_end(&mut echoed)).await.unwrap();
    assert_eq!(echoed, b"\x00\x01 not http\n", "{}", bed.log());
    assert_eq!(v1.hits() + v2.hits(), 1);
    // A source the destination does not admit: closed, and no tunnel reaches a backend.
    let intruder = id("other", "intruder");
    let mut io = bounded(10, bed.tunnel(INTRUDER, intruder.clone(), bed.issue(&intruder))).await.unwrap();
    io.write_all(b"\x00\x01 not http\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = bounded(10, io.read_to_end(&mut answer)).await;
    assert!(answer.is_empty(), "a refused source got {answer:?}");
    assert_eq!(v1.hits() + v2.hits(), 1, "a refused source reached a backend");
    let named = bed
        .wait_for_log(|log| log.lines().any(|l| l.contains("protocol=\"tcp\"") && l.contains("authz_rule=\"l4:")))
        .await;
    assert!(named, "no access-log line names the L4 rule of the refused connection:\n{}", bed.log());
}
