//! HTTP/1.1 Upgrade through the waypoint with a real hyper backend that answers 101 and
//! echoes the upgraded stream, and a client speaking raw bytes: data round-trips, the
//! exchange is one request with status 101, the backend's connection limit holds while a
//! tunnel is open, an h2c upgrade is not passed through, CONNECT is refused.
mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use palisade_model::waypoint::config::{ConnectionLimits, TrafficPolicy};
use palisade_waypoint::Settings;
use palisade_waypoint::body::{ProxyBody, empty, full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP/1.1 server: `Upgrade: websocket` gets 101 and an echo of the upgraded stream;
/// anything else 200 with the request's `upgrade` header (empty if none) in `x-upgrade`.
async fn echo_upgrades() -> (SocketAddr, Arc<AtomicUsize>, AbortOnDrop) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
    let addr = listener.local_addr().unwrap();
    let upgraded = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&upgraded);
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let count = Arc::clone(&count);
            conns.spawn(async move {
                let service = service_fn(move |mut req: Request<Incoming>| {
                    let count = Arc::clone(&count);
                    async move {
                        let token = req.headers().get("upgrade").cloned();
                        if token.as_ref().is_none_or(|t| t != "websocket") {
                            let mut resp = Response::new(full("plain"));
                            let seen = token.map(|t| t.to_str().unwrap_or("?").to_string()).unwrap_or_default();
                            resp.headers_mut().insert("x-upgrade", seen.parse().unwrap());
                            return Ok::<_, Infallible>(resp);
                        }
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let Ok(up) = on.await else { return };
                            count.fetch_add(1, Ordering::SeqCst);
                            let mut io = TokioIo::new(up);
                            let mut buf = [0u8; 1024];
                            while let Ok(n) = io.read(&mut buf).await {
                                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        });
                        let mut resp = Response::new(empty());
                        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                        resp.headers_mut().insert("upgrade", "websocket".parse().unwrap());
                        resp.headers_mut().insert("connection", "upgrade".parse().unwrap());
                        resp.headers_mut().insert("sec-websocket-accept", "test-accept".parse().unwrap());
                        Ok::<Response<ProxyBody>, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, upgraded, AbortOnDrop(task))
}

fn service(addr: SocketAddr, traffic: TrafficPolicy) -> palisade_model::waypoint::config::WaypointConfig {
    let ep = palisade_model::waypoint::config::BackendEndpoint {
        workload: "ns/ws".into(),
        address: addr,
        identity: "spiffe://td/ns/ns/sa/ws".into(),
    };
    config(vec![], backend("ns/ws:80", vec![ep], traffic))
}

/// Sends a request head on a raw connection and reads the response head.
async fn head(stream: &mut TcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "response head cut short: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

const UPGRADE: &str =
    "GET /chat HTTP/1.1\r\nhost: svc.test\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-key: k\r\n\r\n";

async fn open_tunnel(waypoint: SocketAddr) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(waypoint).await.unwrap();
    let head = head(&mut stream, UPGRADE).await;
    (stream, head)
}

async fn round_trip(stream: &mut TcpStream, data: &[u8]) {
    stream.write_all(data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(back, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_round_trips_bytes_and_is_one_request_with_status_101() {
    bounded(30, async {
        let (addr, upgraded, _server) = echo_upgrades().await;
        let wp = waypoint(service(addr, TrafficPolicy::default()), Settings::default(), CLIENT_ID).await;
        let mut log = wp.engine.access_records();
        let (mut stream, head) = open_tunnel(wp.addr).await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: websocket"), "{head}");
        assert!(head.contains("connection: upgrade"), "{head}");
        assert!(head.contains("sec-websocket-accept: test-accept"), "{head}");
        round_trip(&mut stream, b"ping").await;
        round_trip(&mut stream, &[7u8; 100_000]).await;
        assert_eq!(upgraded.load(Ordering::SeqCst), 1);
        drop(stream);
        let rec = log.recv().await.expect("one access record when the tunnel ends");
        assert_eq!(rec.status, 101);
        assert_eq!(rec.method, "GET");
        assert_eq!(rec.path, "/chat");
        assert_eq!(rec.upstream, Some(addr));
        assert_eq!(rec.attempts, 1);
        assert!(rec.complete, "{rec:?}");
        let metrics = wp.metrics();
        assert!(
            metrics.lines().any(|l| l.contains("status=\"101\"") && l.starts_with("waypoint_requests_total")),
            "{metrics}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tunnel_holds_its_connection_under_max_connections() {
    bounded(30, async {
        let (addr, _, _server) = echo_upgrades().await;
        let traffic = TrafficPolicy {
            limits: ConnectionLimits { max_connections: Some(1), ..Default::default() },
            ..Default::default()
        };
        let wp = waypoint(service(addr, traffic), Settings::default(), CLIENT_ID).await;
        let (mut first, head) = open_tunnel(wp.addr).await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        let (_, refused) = open_tunnel(wp.addr).await;
        assert!(refused.starts_with("http/1.1 503"), "{refused}");
        assert!(refused.contains("x-palisade-overflow: max_connections"), "{refused}");
        round_trip(&mut first, b"still open").await;
        drop(first);
        // The unit comes back when the tunnel ends (its end is seen asynchronously).
        let backend = wp.engine.backend("ns/ws:80").expect("backend state");
        until(|| backend.counters.current(palisade_waypoint::limits::Limit::Connections) == 0).await;
        let (mut again, head) = open_tunnel(wp.addr).await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        round_trip(&mut again, b"again").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_is_not_passed_through_and_connect_is_refused() {
    bounded(30, async {
        let (addr, upgraded, _server) = echo_upgrades().await;
        let wp = waypoint(service(addr, TrafficPolicy::default()), Settings::default(), CLIENT_ID).await;
        let r = Client::h1(wp.addr)
            .await
            .get(
                "/",
                &[
                    ("connection", "Upgrade, HTTP2-Settings"),
                    ("upgrade", "h2c"),
                    ("http2-settings", "AAMAAABkAAQAAP__"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.header("x-upgrade"), "", "the backend never saw the h2c upgrade");

        let mut stream = TcpStream::connect(wp.addr).await.unwrap();
        let refused = head(&mut stream, "CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n").await;
        assert!(refused.starts_with("http/1.1 501"), "{refused}");
        assert_eq!(upgraded.load(Ordering::SeqCst), 0);
    })
    .await;
}
