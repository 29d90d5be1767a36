//! Test bed for the engine: real hyper backends and clients on 127.0.0.1, the engine behind a
//! TCP listener with the plain-TCP upstream, and configuration builders. Every task started
//! here is aborted when its owner drops, so a failing test leaves nothing running.
#![allow(dead_code)]
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use palisade_model::waypoint::config::{
    Backend, BackendEndpoint, PathMatch, Route, RouteMatch, ServiceL7, TrafficPolicy, WaypointConfig, WeightedBackend,
};
use palisade_waypoint::body::{ProxyBody, empty, full};
use palisade_waypoint::{Downstream, Engine, PlainTcp, Settings};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The Service's VIP every test client "dialled".
pub const VIP: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 10)), 80);
pub const CLIENT_ID: &str = "spiffe://td/ns/web/sa/frontend";

/// Bounds every test: a hang fails with a message instead of stalling the run.
pub async fn bounded<F: Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f).await.expect("test did not finish within its time bound")
}

pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub type Handler =
    Arc<dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>> + Send + Sync>;

/// A backend: hyper HTTP/1.1 + HTTP/2 server counting the requests it answers.
pub struct TestBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    _task: AbortOnDrop,
}

impl TestBackend {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn endpoint(&self) -> BackendEndpoint {
        BackendEndpoint {
            workload: format!("ns/{}", self.name),
            address: self.addr,
            identity: format!("spiffe://td/ns/ns/sa/{}", self.name),
        }
    }
}

pub async fn serve_backend(name: &str, handler: Handler) -> TestBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (handler, hits) = (Arc::clone(&handler), Arc::clone(&counted));
            conns.spawn(async move {
                let service = service_fn(move |req| {
                    let (handler, hits) = (Arc::clone(&handler), Arc::clone(&hits));
                    async move {
                        let resp = handler(req).await;
                        hits.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    TestBackend { name: name.to_string(), addr, hits, _task: AbortOnDrop(task) }
}

/// Answers 200 with what it saw in headers: `x-backend`, `x-path`, `x-host`, `x-traceparent`,
/// `x-added` (the request's), `x-version`.
pub fn echo(name: &str) -> Handler {
    status_handler(name, StatusCode::OK, Duration::ZERO)
}

pub fn status_handler(name: &str, status: StatusCode, delay: Duration) -> Handler {
    let name = name.to_string();
    Arc::new(move |req: Request<Incoming>| {
        let name = name.clone();
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut resp = Response::new(full(name.clone()));
            *resp.status_mut() = status;
            let h = resp.headers_mut();
            h.insert("x-backend", name.parse().unwrap());
            h.insert("x-path", req.uri().path_and_query().map_or("/", |p| p.as_str()).parse().unwrap());
            let host = req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| req.headers().get("host").and_then(|v| v.to_str().ok()).map(str::to_string));
            h.insert("x-host", host.unwrap_or_default().parse().unwrap());
            h.insert("x-version", format!("{:?}", req.version()).parse().unwrap());
            for (from, to) in [("traceparent", "x-traceparent"), ("x-added", "x-added")] {
                if let Some(v) = req.headers().get(from) {
                    h.insert(to, v.clone());
                }
            }
            resp
        })
    })
}

/// The engine behind a loopback listener; every accepted connection is served as if it came
/// through a tunnel from `identity` to [`VIP`].
pub struct Waypoint {
    pub engine: Engine,
    pub addr: SocketAddr,
    pub registry: prometheus_client::registry::Registry,
    _task: AbortOnDrop,
}

impl Waypoint {
    /// The metrics in Prometheus' text format.
    pub fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("metrics encode");
        text
    }
}

pub async fn waypoint(config: WaypointConfig, settings: Settings, identity: &str) -> Waypoint {
    let mut registry = prometheus_client::registry::Registry::default();
    let engine = Engine::new(config, Arc::new(PlainTcp), settings, &mut registry).expect("configuration compiles");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind waypoint");
    let addr = listener.local_addr().unwrap();
    let (serving, identity) = (engine.clone(), identity.to_string());
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, peer)) = listener.accept().await else { continue };
            let down = Downstream { peer, identity: Some(identity.as_str().into()), destination: VIP };
            let engine = serving.clone();
            conns.spawn(async move { engine.serve(stream, down).await });
        }
    });
    Waypoint { engine, addr, registry, _task: AbortOnDrop(task) }
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

#[derive(Clone)]
pub enum Client {
    H1(Arc<tokio::sync::Mutex<http1::SendRequest<ProxyBody>>>),
    H2(http2::SendRequest<ProxyBody>),
}

impl Client {
    pub async fn h1(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect waypoint");
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        Client::H1(Arc::new(tokio::sync::Mutex::new(sender)))
    }

    pub async fn h2(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect waypoint");
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
        tokio::spawn(conn);
        Client::H2(sender)
    }

    pub async fn send(&self, mut req: Request<ProxyBody>) -> Reply {
        let resp = match self {
            Client::H1(s) => {
                let mut s = s.lock().await;
                s.ready().await.expect("HTTP/1.1 connection usable");
                s.send_request(req).await.expect("HTTP/1.1 response")
            }
            Client::H2(s) => {
                let mut s = s.clone();
                if req.uri().authority().is_none() {
                    let pq = req.uri().path_and_query().map_or("/".to_string(), |p| p.to_string());
                    *req.uri_mut() = format!("http://svc.test{pq}").parse().unwrap();
                }
                s.ready().await.expect("HTTP/2 connection usable");
                s.send_request(req).await.expect("HTTP/2 response")
            }
        };
        let (head, body) = resp.into_parts();
        let collected = body.collect().await.expect("response body");
        let trailers = collected.trailers().cloned();
        Reply { status: head.status, headers: head.headers, body: collected.to_bytes(), trailers }
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = Request::get(path).header("host", "svc.test");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req.body(empty()).unwrap()).await
    }
}

pub fn backend(name: &str, endpoints: Vec<BackendEndpoint>, traffic: TrafficPolicy) -> Backend {
    Backend { name: name.to_string(), endpoints, traffic, protocol: Default::default() }
}

pub fn route(name: &str, matches: Vec<RouteMatch>, backends: Vec<(Backend, u32)>) -> Route {
    Route {
        name: name.to_string(),
        matches,
        backends: backends.into_iter().map(|(backend, weight)| WeightedBackend { backend, weight }).collect(),
        filters: Vec::new(),
        request_timeout: None,
        backend_timeout: None,
        retry: None,
    }
}

pub fn path(p: PathMatch) -> RouteMatch {
    RouteMatch { path: Some(p), ..Default::default() }
}

pub fn config(routes: Vec<Route>, default_backend: Backend) -> WaypointConfig {
    WaypointConfig {
        name: "ns/waypoint".into(),
        services: vec![ServiceL7 {
            service: "ns/svc".into(),
            vip: VIP,
            hosts: vec!["svc.test".into()],
            routes,
            default_backend,
            authorization: Vec::new(),
            traffic: TrafficPolicy::default(),
        }],
    }
}

/// Polls `check` every 20 ms until it holds (the caller bounds the time).
pub async fn until(mut check: impl FnMut() -> bool) {
    while !check() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
