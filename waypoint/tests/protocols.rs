//! The upstream's HTTP version and HTTP/1.1 Upgrade, end to end with real hyper clients and
//! servers: an HTTP/2 client to an HTTP/1.1-only backend (undeclared: falls back and
//! remembers; declared `http`: HTTP/1.1 from the start), a gRPC-shaped call to an
//! HTTP/2-only backend declared `grpc` (also from an HTTP/1.1 client), a WebSocket-style
//! upgrade round-tripping bytes under the connection limit, CONNECT refused.
mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_model::waypoint::config::{TrafficPolicy, UpstreamProtocol};
use palisade_waypoint::Settings;
use palisade_waypoint::body::{ProxyBody, boxed, full};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// How a test server that speaks HTTP/1.1 only treats the HTTP/2 preface.
#[derive(Clone, Copy)]
enum OnPreface {
    /// Closes without a byte (hyper's HTTP/1.1 server).
    Close,
    /// Answers `HTTP/1.1 400` and closes (nginx and most servers).
    Answer400,
}

/// An HTTP/1.1-only server (hyper's http1) answering with what it saw; counts the
/// connections that opened with the HTTP/2 preface.
struct H1Only {
    addr: SocketAddr,
    prefaces: Arc<AtomicUsize>,
    _task: AbortOnDrop,
}

async fn h1_only(on_preface: OnPreface) -> H1Only {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
    let addr = listener.local_addr().unwrap();
    let prefaces = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&prefaces);
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let counted = Arc::clone(&counted);
            conns.spawn(async move {
                let mut start = [0u8; PREFACE.len()];
                let Ok(n) = stream.peek(&mut start).await else { return };
                // A partial peek of the preface is not expected on loopback; count what arrived.
                if n > 0 && PREFACE.starts_with(&start[..n]) {
                    counted.fetch_add(1, Ordering::SeqCst);
                    if let OnPreface::Answer400 = on_preface {
                        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
                        return;
                    }
                }
                let service =
                    service_fn(|req: Request<Incoming>| async move { Ok::<_, Infallible>(describe(req).await) });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    H1Only { addr, prefaces, _task: AbortOnDrop(task) }
}

/// Answers 200 describing the request: version, host/authority, TE, cookie, transfer
/// encoding, the body's length.
async fn describe(req: Request<Incoming>) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut resp = Response::new(full(body.clone()));
    let h = resp.headers_mut();
    let get = |name: &str| parts.headers.get(name).map(|v| v.to_str().unwrap_or("?").to_string()).unwrap_or_default();
    let authority = parts.uri.authority().map(|a| a.to_string()).unwrap_or_default();
    h.insert("x-version", format!("{:?}", parts.version).parse().unwrap());
    h.insert("x-authority", authority.parse().unwrap());
    h.insert("x-host", get("host").parse().unwrap());
    h.insert("x-te", get("te").parse().unwrap());
    h.insert("x-cookie", get("cookie").parse().unwrap());
    h.insert("x-transfer-encoding", get("transfer-encoding").parse().unwrap());
    h.insert("x-body-len", body.len().to_string().parse().unwrap());
    resp
}

fn endpoint(name: &str, addr: SocketAddr) -> palisade_model::waypoint::config::BackendEndpoint {
    palisade_model::waypoint::config::BackendEndpoint {
        workload: format!("ns/{name}"),
        address: addr,
        identity: format!("spiffe://td/ns/ns/sa/{name}"),
    }
}

fn declared(
    name: &str,
    addr: SocketAddr,
    protocol: UpstreamProtocol,
    traffic: TrafficPolicy,
) -> palisade_model::waypoint::config::Backend {
    let mut b = backend(name, vec![endpoint(name, addr)], traffic);
    b.protocol = protocol;
    b
}

/// A body of ready frames, with no length known up front (a streaming body).
struct Frames(VecDeque<Frame<Bytes>>);

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

fn frames(data: &[&'static [u8]], trailers: Option<HeaderMap>) -> ProxyBody {
    let mut f: VecDeque<Frame<Bytes>> = data.iter().map(|d| Frame::data(Bytes::from_static(d))).collect();
    f.extend(trailers.map(Frame::trailers));
    boxed(Frames(f))
}

/// An HTTP/2 client's streaming POST with gRPC's `te: trailers` and a split cookie, as the
/// HTTP/1.1 backend must get it.
async fn post_h2(client: &Client) -> Reply {
    let req = Request::post("http://svc.test/upload?x=1")
        .header("te", "trailers")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(frames(&[b"hello ", b"world"], None))
        .unwrap();
    client.send(req).await
}

fn assert_translated_to_http1(r: &Reply) {
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.header("x-version"), "HTTP/1.1");
    assert_eq!(r.header("x-host"), "svc.test", "the :authority became Host");
    assert_eq!(r.header("x-authority"), "", "origin form on HTTP/1.1");
    assert_eq!(r.header("x-te"), "", "te: trailers is not sent to an HTTP/1.1 upstream");
    assert_eq!(r.header("x-cookie"), "a=1; b=2", "cookie fields joined into one");
    assert_eq!(r.header("x-transfer-encoding"), "chunked", "a body without a length is chunked");
    assert_eq!(&r.body[..], b"hello world");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_client_to_undeclared_http1_backend_falls_back_and_remembers() {
    bounded(30, async {
        for on_preface in [OnPreface::Close, OnPreface::Answer400] {
            let server = h1_only(on_preface).await;
            let b = declared("ns/legacy:80", server.addr, UpstreamProtocol::Auto, TrafficPolicy::default());
            let wp = waypoint(config(vec![], b), Settings::default(), CLIENT_ID).await;
            let client = Client::h2(wp.addr).await;
            let r = post_h2(&client).await;
            assert_translated_to_http1(&r);
            for _ in 0..3 {
                let r = client.get("/again", &[]).await;
                assert_eq!(r.status, StatusCode::OK, "{r:?}");
                assert_eq!(r.header("x-version"), "HTTP/1.1");
            }
            assert_eq!(
                server.prefaces.load(Ordering::SeqCst),
                1,
                "the endpoint is asked for HTTP/2 once, then remembered as HTTP/1.1"
            );
            // An HTTP/1.1 client never tries HTTP/2.
            let r = Client::h1(wp.addr).await.get("/h1", &[]).await;
            assert_eq!(r.header("x-version"), "HTTP/1.1");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_http_gives_an_h2_client_an_http1_upstream() {
    bounded(30, async {
        let server = h1_only(OnPreface::Close).await;
        let b = declared(
            "ns/web:80",
            server.addr,
            UpstreamProtocol::declared(Some("http"), None),
            TrafficPolicy::default(),
        );
        let wp = waypoint(config(vec![], b), Settings::default(), CLIENT_ID).await;
        let client = Client::h2(wp.addr).await;
        let r = post_h2(&client).await;
        assert_translated_to_http1(&r);
        assert_eq!(server.prefaces.load(Ordering::SeqCst), 0, "declared http: no HTTP/2 attempt at all");
    })
    .await;
}

/// An HTTP/2-only backend (hyper's http2) with gRPC's shape: checks `te: trailers` and the
/// request's trailers, answers with trailers.
async fn h2_only_grpc() -> (SocketAddr, AbortOnDrop) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            conns.spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let te = req.headers().get("te").is_some_and(|v| v == "trailers");
                    let authority = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
                    let collected = req.into_body().collect().await.unwrap();
                    let trailer = collected.trailers().and_then(|t| t.get("x-req-trailer")).is_some();
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", if te { "0" } else { "3" }.parse().unwrap());
                    trailers
                        .insert("grpc-message", if trailer { "trailer-seen" } else { "no-trailer" }.parse().unwrap());
                    let body = collected.to_bytes();
                    let mut resp = Response::new(boxed(Frames([Frame::data(body), Frame::trailers(trailers)].into())));
                    resp.headers_mut().insert("content-type", "application/grpc".parse().unwrap());
                    resp.headers_mut().insert("x-authority", authority.parse().unwrap());
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, AbortOnDrop(task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_call_with_trailers_to_an_h2_only_backend_declared_grpc() {
    bounded(30, async {
        let (addr, _server) = h2_only_grpc().await;
        let protocol = UpstreamProtocol::declared(None, Some("grpc-api"));
        assert_eq!(protocol, UpstreamProtocol::Http2);
        let wp = waypoint(
            config(vec![], declared("ns/grpc:50051", addr, protocol, TrafficPolicy::default())),
            Settings::default(),
            CLIENT_ID,
        )
        .await;
        let mut trailers = HeaderMap::new();
        trailers.insert("x-req-trailer", "1".parse().unwrap());
        let message: &'static [u8] = b"\x00\x00\x00\x00\x05hello";
        let req = Request::post("http://svc.test/pkg.Greeter/SayHello")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(frames(&[message], Some(trailers)))
            .unwrap();
        let r = Client::h2(wp.addr).await.send(req).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(&r.body[..], message);
        let t = r.trailers.expect("response trailers pass through");
        assert_eq!(t["grpc-status"], "0", "te: trailers reached the backend");
        assert_eq!(t["grpc-message"], "trailer-seen", "request trailers reached the backend");

        // An HTTP/1.1 client to the same HTTP/2-only backend: Host becomes :authority and
        // hop-by-hop headers go.
        let r = Client::h1(wp.addr)
            .await
            .get("/pkg.Greeter/Other", &[("connection", "keep-alive, x-hop"), ("x-hop", "1")])
            .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.header("x-authority"), "svc.test");
    })
    .await;
}
