//! The HBONE connection pool over real mutual TLS and HTTP/2 on loopback: a pooled connection
//! whose peer still answers PING is kept and reused; one whose peer went silent (its packets
//! vanish, no FIN or RST, as when a node loses power) is detected by PING and never handed to
//! a new stream, which gets a fresh connection instead.
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use palisade_mesh::hbone::pool::{ConnectRequest, Pool, PoolConfig, PoolKey, Tunnel};
use palisade_mesh::hbone::server::serve_connection;
use palisade_mesh::tls::{CredentialSlot, TrustBundle, server_config};
use support::ca::{TestCa, id};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEEPALIVE: Duration = Duration::from_millis(200);

/// An HBONE server that accepts every CONNECT (the stream is then simply held open).
async fn hbone_server(credential: Arc<CredentialSlot>, bundle: &TrustBundle) -> SocketAddr {
    let tls = server_config(credential, bundle, &[palisade_mesh::hbone::ALPN]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_keep, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _keep = _keep;
        let handler = Arc::new(|stream: palisade_mesh::hbone::server::InboundStream| async move {
            if let Ok((_send, mut recv)) = stream.accept() {
                while let Some(Ok(_)) = recv.data().await {}
            }
        });
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve_connection(tcp, tls.clone(), handler.clone(), shutdown.clone()));
        }
    });
    addr
}

/// A TCP relay in front of `upstream`. Connections it accepted before `silence()` keep their
/// sockets open but drop every byte from then on; later connections are relayed normally.
struct Relay {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    silenced_below: Arc<AtomicUsize>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let silenced_below = Arc::new(AtomicUsize::new(0));
        let (count, silenced) = (accepted.clone(), silenced_below.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let index = count.fetch_add(1, Ordering::SeqCst);
                let server = TcpStream::connect(upstream).await.unwrap();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(forward(cr, sw, index, silenced.clone()));
                tokio::spawn(forward(sr, cw, index, silenced.clone()));
            }
        });
        Relay { addr, accepted, silenced_below }
    }

    /// Every connection accepted so far goes silent.
    fn silence(&self) {
        self.silenced_below.store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    index: usize,
    silenced_below: Arc<AtomicUsize>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if index < silenced_below.load(Ordering::SeqCst) {
            continue; // a black hole: the bytes vanish, the sockets stay open
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn open_stream(pool: &Pool, key: &PoolKey, credential: &Arc<CredentialSlot>, bundle: &TrustBundle) -> Tunnel {
    let endpoint = key.endpoint;
    let request =
        ConnectRequest { authority: "10.0.0.1:80".parse().unwrap(), forwarded_for: "10.0.0.2:4000".parse().unwrap() };
    let connect = pool.connect(key.clone(), credential.clone(), bundle, || TcpStream::connect(endpoint), request);
    tokio::time::timeout(Duration::from_secs(5), connect).await.expect("CONNECT bounded").expect("CONNECT answered 200")
}

fn live_connections(pool: &Pool, key: &PoolKey) -> usize {
    pool.connections().into_iter().find(|(k, _)| k == key).map_or(0, |(_, n)| n)
}

#[tokio::test]
async fn a_pooled_connection_whose_peer_went_silent_is_never_reused() {
    let ca = TestCa::new("keepalive", "cluster.local");
    let bundle = ca.bundle();
    let (client, server) = (id("shop", "web"), id("shop", "db"));
    let client_cred = ca.issue(&client, None);
    let relay = Relay::start(hbone_server(ca.issue(&server, None), &bundle).await).await;

    let pool = Pool::new(PoolConfig { keepalive: KEEPALIVE, ..PoolConfig::default() });
    let key = PoolKey { src: client, dst: server, endpoint: relay.addr };

    // A healthy peer answers PING: several keepalive rounds later the connection is still
    // pooled and the next stream reuses it.
    drop(open_stream(&pool, &key, &client_cred, &bundle).await);
    tokio::time::sleep(KEEPALIVE * 5).await;
    assert_eq!(live_connections(&pool, &key), 1, "a connection whose peer answers PING was dropped");
    drop(open_stream(&pool, &key, &client_cred, &bundle).await);
    assert_eq!(pool.opened_total(), 1, "the healthy pooled connection was not reused");

    // The peer goes silent: PING gets no answer and the connection leaves the pool.
    relay.silence();
    let deadline = Instant::now() + Duration::from_secs(5);
    while live_connections(&pool, &key) > 0 {
        assert!(Instant::now() < deadline, "a connection whose peer is silent stayed in the pool for 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A new stream gets a new connection (through the relay, which relays new ones again).
    let tunnel = open_stream(&pool, &key, &client_cred, &bundle).await;
    assert_eq!(pool.opened_total(), 2, "the new stream did not get a fresh connection");
    assert_eq!(relay.accepted.load(Ordering::SeqCst), 2);
    drop(tunnel);
}

#[tokio::test]
async fn idle_connections_expire() {
    let ca = TestCa::new("idle", "cluster.local");
    let bundle = ca.bundle();
    let (client, server) = (id("shop", "web"), id("shop", "db"));
    let client_cred = ca.issue(&client, None);
    let endpoint = hbone_server(ca.issue(&server, None), &bundle).await;
    let idle = Duration::from_millis(300);
    let pool = Pool::new(PoolConfig { idle_timeout: idle, ..PoolConfig::default() });
    let key = PoolKey { src: client, dst: server, endpoint };

    let held = open_stream(&pool, &key, &client_cred, &bundle).await;
    tokio::time::sleep(idle * 3).await;
    assert_eq!(live_connections(&pool, &key), 1, "a connection with a stream in flight expired");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while live_connections(&pool, &key) > 0 {
        assert!(Instant::now() < deadline, "an idle connection was still pooled after 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(open_stream(&pool, &key, &client_cred, &bundle).await);
    assert_eq!(pool.opened_total(), 2, "the expired connection was reused");
}

#[tokio::test]
async fn a_renewed_or_expired_certificate_retires_the_pooled_connection() {
    let ca = TestCa::new("retire", "cluster.local");
    let bundle = ca.bundle();
    let (client, server) = (id("shop", "web"), id("shop", "db"));
    let client_cred = ca.issue(&client, None);
    // The server's first certificate lives 3 s.
    let now = std::time::SystemTime::now();
    let server_cred = ca.issue(&server, Some((now - Duration::from_secs(60), now + Duration::from_secs(3))));
    let endpoint = hbone_server(server_cred.clone(), &bundle).await;
    let pool = Pool::new(PoolConfig::default());
    let key = PoolKey { src: client.clone(), dst: server.clone(), endpoint };

    // The client's certificate is renewed while a stream is in flight: that stream goes on,
    // the next one gets a connection made with the new certificate.
    let in_flight = open_stream(&pool, &key, &client_cred, &bundle).await;
    client_cred.set(ca.issue(&client, None).get().unwrap());
    let after_renewal = open_stream(&pool, &key, &client_cred, &bundle).await;
    assert_eq!(pool.opened_total(), 2, "a stream rode on a connection made with the old certificate");
    assert_eq!(live_connections(&pool, &key), 2, "the retired connection was closed under its stream");
    drop(in_flight);
    drop(after_renewal);
    drop(open_stream(&pool, &key, &client_cred, &bundle).await);
    assert_eq!(pool.opened_total(), 2, "the connection made with the current certificate was not reused");
    assert_eq!(live_connections(&pool, &key), 1, "the retired connection stayed pooled without streams");

    // The server renews too, but the pooled connection was made with its old certificate:
    // once that expires, the connection is not used again.
    server_cred.set(ca.issue(&server, None).get().unwrap());
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(open_stream(&pool, &key, &client_cred, &bundle).await);
    assert_eq!(pool.opened_total(), 3, "a stream rode on a connection whose peer certificate had expired");
}
