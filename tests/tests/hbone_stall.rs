//! Peers that stall, on loopback with real mutual TLS and HTTP/2: the HBONE pool's per-key
//! opening lock never waits on a peer that accepts and never answers (every stream to it
//! fails with a timeout within the bound, the second as well as the first), a CONNECT that
//! is never answered times out, and the server frees a handshake slot when a client that
//! sends nothing reaches the TLS handshake timeout.
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade_mesh::accept::HandshakeLimit;
use palisade_mesh::hbone::HboneError;
use palisade_mesh::hbone::pool::{ConnectRequest, OPEN_TIMEOUT, Pool, PoolConfig, PoolKey, RESPONSE_TIMEOUT};
use palisade_mesh::hbone::server::{InboundStream, TLS_HANDSHAKE_TIMEOUT, serve_connection, serve_connection_admitted};
use palisade_mesh::tls::{CredentialSlot, TrustBundle, server_config};
use support::ca::{TestCa, id};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

/// Outer bound of every wait here: today's pool waited forever.
const GIVE_UP: Duration = Duration::from_secs(40);

/// A TCP peer that accepts and then says nothing (the sockets are kept open).
async fn silent_peer() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    addr
}

fn request() -> ConnectRequest {
    ConnectRequest { authority: "10.0.0.1:80".parse().unwrap(), forwarded_for: "10.0.0.2:4000".parse().unwrap() }
}

/// One stream through the pool; its outcome and how long it took.
async fn try_stream(
    pool: &Pool,
    key: &PoolKey,
    credential: &Arc<CredentialSlot>,
    bundle: &TrustBundle,
) -> (Result<(), HboneError>, Duration) {
    let started = Instant::now();
    let endpoint = key.endpoint;
    let connect = pool.connect(key.clone(), credential.clone(), bundle, || TcpStream::connect(endpoint), request());
    let outcome = tokio::time::timeout(GIVE_UP, connect)
        .await
        .unwrap_or_else(|_| panic!("a stream to a stalled peer was still waiting after {GIVE_UP:?}"));
    (outcome.map(drop), started.elapsed())
}

fn assert_timed_out(outcome: &Result<(), HboneError>, stage: &str, took: Duration, bound: Duration) {
    match outcome {
        Err(HboneError::Timeout { stage: s, after, .. }) => {
            assert!(s.contains(stage), "timed out in {s:?}, expected {stage:?}");
            assert_eq!(*after, bound);
        }
        Err(e) => panic!("expected a timeout while {stage}, got: {e}"),
        Ok(()) => panic!("a stalled peer answered"),
    }
    // Generous: the point is that the wait ends near the bound, not after several of them.
    assert!(took < bound + bound / 2, "the stream waited {took:?} for a bound of {bound:?}");
}

#[tokio::test]
async fn a_peer_that_never_answers_the_handshake_cannot_hold_the_opening_lock() {
    let ca = TestCa::new("stall-open", "cluster.local");
    let bundle = ca.bundle();
    let client = id("shop", "web");
    let credential = ca.issue(&client, None);
    let pool = Pool::new(PoolConfig::default());
    let key = PoolKey { src: client, dst: id("shop", "db"), endpoint: silent_peer().await };

    // Two streams at once for the same key: one opens (and stalls in TLS), the other waits
    // for the opening lock. Both must give up within the bound.
    let (first, second) =
        tokio::join!(try_stream(&pool, &key, &credential, &bundle), try_stream(&pool, &key, &credential, &bundle));
    assert_timed_out(&first.0, "opening", first.1, OPEN_TIMEOUT);
    assert_timed_out(&second.0, "opening", second.1, OPEN_TIMEOUT);
    // And the lock is free again: the next stream is bounded the same way.
    let third = try_stream(&pool, &key, &credential, &bundle).await;
    assert_timed_out(&third.0, "opening", third.1, OPEN_TIMEOUT);
    assert_eq!(pool.opened_total(), 0);
}

#[tokio::test]
async fn a_connect_that_is_never_answered_times_out() {
    let ca = TestCa::new("stall-connect", "cluster.local");
    let bundle = ca.bundle();
    let (client, server) = (id("shop", "web"), id("shop", "db"));
    let credential = ca.issue(&client, None);
    // A real HBONE server whose handler never answers the CONNECT.
    let tls = server_config(ca.issue(&server, None), &bundle, &[palisade_mesh::hbone::ALPN]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = listener.local_addr().unwrap();
    let (_keep, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let handler = Arc::new(|stream: InboundStream| async move {
            std::future::pending::<()>().await;
            drop(stream);
        });
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve_connection(tcp, tls.clone(), handler.clone(), shutdown.clone()));
        }
    });
    let pool = Pool::new(PoolConfig::default());
    let key = PoolKey { src: client, dst: server, endpoint };
    let (outcome, took) = try_stream(&pool, &key, &credential, &bundle).await;
    assert_timed_out(&outcome, "CONNECT response", took, RESPONSE_TIMEOUT);
    assert_eq!(pool.opened_total(), 1, "the handshakes themselves completed");
}

#[tokio::test]
async fn a_client_that_sends_nothing_loses_its_handshake_slot_at_the_tls_timeout() {
    let ca = TestCa::new("stall-server", "cluster.local");
    let bundle = ca.bundle();
    let tls = server_config(ca.issue(&id("shop", "db"), None), &bundle, &[palisade_mesh::hbone::ALPN]).unwrap();
    let limit = HandshakeLimit::new(8, 1);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_keep, shutdown) = tokio::sync::watch::channel(false);
    let server_limit = limit.clone();
    tokio::spawn(async move {
        let handler = Arc::new(|stream: InboundStream| async move { drop(stream) });
        while let Ok((tcp, peer)) = listener.accept().await {
            // Over the bound: closed at once, as ztunnel's listener does.
            let Ok(permit) = server_limit.try_admit(peer.ip()) else { continue };
            tokio::spawn(serve_connection_admitted(tcp, permit, tls.clone(), handler.clone(), shutdown.clone()));
        }
    });

    let mut silent = TcpStream::connect(addr).await.unwrap();
    wait_for(|| limit.in_progress() == 1, "the silent client's handshake to start").await;
    // A second client from the same address is over the per-source bound: closed at once.
    let mut refused = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(GIVE_UP, refused.read(&mut buf)).await.expect("the refused client was closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "the refused client got data: {closed:?}");
    assert_eq!(limit.refused_total(), 1);

    // The silent client is dropped at the TLS timeout and its slot comes back.
    let started = Instant::now();
    let ended = tokio::time::timeout(GIVE_UP, silent.read(&mut buf)).await.expect("the silent client was closed");
    assert!(matches!(ended, Ok(0) | Err(_)), "the silent client got data: {ended:?}");
    assert!(started.elapsed() < TLS_HANDSHAKE_TIMEOUT * 2, "the silent client was held {:?}", started.elapsed());
    wait_for(|| limit.in_progress() == 0, "the handshake slot to be released").await;
}

async fn wait_for(cond: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + GIVE_UP;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
