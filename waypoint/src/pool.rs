//! Upstream connections, pooled per endpoint address: HTTP/1.1 connections are reused one
//! request at a time (kept while idle up to a bound), HTTP/2 connections are shared by every
//! request to that endpoint (multiplexed).
//!
//! Which one a request uses ([`Pool::wire`]) is decided as Istio and Envoy do, by the
//! Service port's declared protocol (`appProtocol`, else the port name's prefix: see
//! `UpstreamProtocol`): HTTP/2 (prior knowledge, h2c) for `http2`, `grpc` and
//! `kubernetes.io/h2c`, HTTP/1.1 for `http`, whatever the client spoke. Undeclared, the
//! client's version is kept (gRPC and streaming keep their semantics end to end), with one
//! safety net: a new HTTP/2 connection waits for the endpoint's first bytes (`preface`), and
//! an endpoint that answers as an HTTP/1.1 server gets the request over HTTP/1.1 instead —
//! nothing of it went out yet — and HTTP/1.1 for [`HTTP1_MEMORY`] after.
//!
//! Opening a connection takes a `max_pending_requests` unit while connecting and a
//! `max_connections` unit for the connection's life; `max_requests_per_connection` retires a
//! connection after that many requests.
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use palisade_model::waypoint::config::{TrafficPolicy, UpstreamProtocol};

use crate::balance::{BackendState, EndpointState};
use crate::body::ProxyBody;
use crate::limits::{Guard, Limit, Overflow};
use crate::preface::{self, PeerStart};
use crate::upstream::{BoxedIo, Upstream};

/// Used when the backend's TrafficPolicy sets no connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Used when the backend's TrafficPolicy sets no idle timeout.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// HTTP/1.1 connections kept per endpoint; more are closed when their exchange is over.
const MAX_IDLE_PER_ENDPOINT: usize = 64;
/// How long an endpoint of an undeclared Service that answered the HTTP/2 preface as an
/// HTTP/1.1 server is sent HTTP/1.1 without asking again (a new pod may reuse the address).
pub const HTTP1_MEMORY: Duration = Duration::from_secs(300);

/// How one request goes to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    Http1,
    /// HTTP/2 because the Service declares it: a peer that does not speak it fails the request.
    Http2,
    /// HTTP/2 because the client spoke it and the Service declares nothing: over HTTP/1.1
    /// instead if the endpoint turns out to be an HTTP/1.1 server.
    Http2OrHttp1,
}

impl Wire {
    pub fn is_h2(self) -> bool {
        self != Wire::Http1
    }
}

/// Why an HTTP/2 send did not happen.
enum H2Failure {
    Send(SendError),
    /// The endpoint is no HTTP/2 server; the request is handed back unsent.
    NotHttp2 {
        req: Request<ProxyBody>,
        start: PeerStart,
    },
}

impl From<SendError> for H2Failure {
    fn from(e: SendError) -> Self {
        H2Failure::Send(e)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        endpoint: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {endpoint}: no answer within {timeout:?}")]
    ConnectTimeout { endpoint: SocketAddr, timeout: Duration },
    #[error(transparent)]
    Overflow(#[from] Overflow),
    #[error("HTTP/2 handshake with {endpoint}: the endpoint sent nothing within {timeout:?}")]
    PrefaceTimeout { endpoint: SocketAddr, timeout: Duration },
    #[error("HTTP handshake with {endpoint}: {source}")]
    Handshake {
        endpoint: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    /// Sent (perhaps partly) but no response: reset, closed, protocol error.
    #[error("request to {endpoint}: {source}")]
    Request {
        endpoint: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl SendError {
    /// The request never left the waypoint (safe to retry whatever the method).
    pub fn before_sending(&self) -> bool {
        matches!(
            self,
            SendError::Connect { .. }
                | SendError::ConnectTimeout { .. }
                | SendError::Handshake { .. }
                | SendError::PrefaceTimeout { .. }
        )
    }
}

/// An HTTP/1.1 connection in the pool: idle, or busy with the response it was given back
/// with (not ready until that exchange is over).
struct PooledH1 {
    sender: http1::SendRequest<ProxyBody>,
    uses: u32,
    /// When it was given back; older than the idle timeout, it is forgotten.
    since: Instant,
}

struct SharedH2 {
    sender: http2::SendRequest<ProxyBody>,
    uses: Arc<AtomicU32>,
}

pub struct Pool {
    upstream: Arc<dyn Upstream>,
    h1: Mutex<HashMap<SocketAddr, Vec<PooledH1>>>,
    h2: Mutex<HashMap<SocketAddr, SharedH2>>,
    /// Endpoints of undeclared Services found to speak HTTP/1.1 only, since when.
    http1_only: Mutex<HashMap<SocketAddr, Instant>>,
    /// Entries in `http1_only`, so the common case (none) takes no lock.
    http1_known: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    pub fn new(upstream: Arc<dyn Upstream>) -> Self {
        Pool {
            upstream,
            h1: Mutex::default(),
            h2: Mutex::default(),
            http1_only: Mutex::default(),
            http1_known: AtomicUsize::new(0),
        }
    }

    /// The wire for a request to `endpoint`: the Service's declaration, else the client's
    /// version unless the endpoint was found to speak HTTP/1.1 only.
    pub fn wire(&self, declared: UpstreamProtocol, downstream_h2: bool, endpoint: SocketAddr) -> Wire {
        match declared {
            UpstreamProtocol::Http1 => Wire::Http1,
            UpstreamProtocol::Http2 => Wire::Http2,
            UpstreamProtocol::Auto if !downstream_h2 || self.known_http1(endpoint) => Wire::Http1,
            UpstreamProtocol::Auto => Wire::Http2OrHttp1,
        }
    }

    fn known_http1(&self, endpoint: SocketAddr) -> bool {
        if self.http1_known.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let known = lock(&self.http1_only);
        known.get(&endpoint).is_some_and(|since| since.elapsed() < HTTP1_MEMORY)
    }

    fn remember_http1(&self, endpoint: SocketAddr) {
        let mut known = lock(&self.http1_only);
        known.retain(|_, since| since.elapsed() < HTTP1_MEMORY);
        known.insert(endpoint, Instant::now());
        self.http1_known.store(known.len(), Ordering::Relaxed);
        tracing::info!(%endpoint, "endpoint answered HTTP/2 as an HTTP/1.1 server; using HTTP/1.1 for it");
    }

    /// Opens a transport to `ep` under the backend's connection limits.
    pub async fn open(
        &self,
        backend: &BackendState,
        ep: &EndpointState,
        traffic: &TrafficPolicy,
    ) -> Result<(BoxedIo, Guard), SendError> {
        let limits = &traffic.limits;
        let _pending = backend.counters.acquire(Limit::PendingRequests, limits.max_pending_requests)?;
        let connection = backend.counters.acquire(Limit::Connections, limits.max_connections)?;
        let endpoint = ep.endpoint.address;
        let timeout = traffic.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let io = tokio::time::timeout(timeout, self.upstream.connect(&ep.endpoint))
            .await
            .map_err(|_| SendError::ConnectTimeout { endpoint, timeout })?
            .map_err(|source| SendError::Connect { endpoint, source })?;
        Ok((io, connection))
    }

    /// Sends `req` to `ep` over a pooled or new connection; returns once response headers
    /// arrive (the body streams after).
    pub async fn send(
        &self,
        backend: &BackendState,
        ep: &EndpointState,
        traffic: &TrafficPolicy,
        wire: Wire,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let endpoint = ep.endpoint.address;
        match wire {
            Wire::Http1 => self.send_h1(backend, ep, traffic, req).await,
            Wire::Http2 | Wire::Http2OrHttp1 => match self.send_h2(backend, ep, traffic, wire, req).await {
                Ok(response) => Ok(response),
                Err(H2Failure::Send(e)) => Err(e),
                Err(H2Failure::NotHttp2 { req, start }) => {
                    tracing::debug!(%endpoint, ?start, "endpoint is no HTTP/2 server; sending over HTTP/1.1");
                    let sent = self.send_h1(backend, ep, traffic, crate::forward::as_http1(req)).await;
                    // A silent close alone may be a server going down: only an answer over
                    // HTTP/1.1 proves which protocol the endpoint speaks.
                    if start == PeerStart::Http1 || sent.is_ok() {
                        self.remember_http1(endpoint);
                    }
                    sent
                }
            },
        }
    }

    async fn send_h1(
        &self,
        backend: &BackendState,
        ep: &EndpointState,
        traffic: &TrafficPolicy,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let endpoint = ep.endpoint.address;
        let idle_timeout = traffic.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
        let reused = {
            let now = Instant::now();
            let mut h1 = lock(&self.h1);
            let list = h1.entry(endpoint).or_default();
            list.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < idle_timeout);
            // Newest first: the most recently used connection is the least likely to have
            // been closed by the backend's own idle timeout. One whose response is still
            // being read is not ready (hyper takes no second request before the first
            // exchange is over) and stays for later.
            list.iter().rposition(|c| c.sender.is_ready()).map(|i| list.remove(i))
        };
        let mut req = req;
        if let Some(pooled) = reused {
            let mut sender = pooled.sender;
            match sender.try_send_request(req).await {
                Ok(response) => {
                    self.give_back(sender, endpoint, pooled.uses + 1, traffic);
                    return Ok(response);
                }
                // The backend closed this idle connection as we picked it (a keep-alive race):
                // hyper hands back the request it never wrote, and it goes on a new connection.
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(SendError::Request { endpoint, source: e.into_error() }),
                },
            }
        }
        let (io, guard) = self.open(backend, ep, traffic).await?;
        let (mut sender, conn) =
            http1::handshake(TokioIo::new(io)).await.map_err(|source| SendError::Handshake { endpoint, source })?;
        tokio::spawn(async move {
            let _connection = guard;
            if let Err(e) = conn.await {
                tracing::debug!(%endpoint, error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        let response = sender.send_request(req).await.map_err(|source| SendError::Request { endpoint, source })?;
        self.give_back(sender, endpoint, 1, traffic);
        Ok(response)
    }

    /// Returns an HTTP/1.1 connection to the pool as soon as its response head is in, unless
    /// it served its allowance of requests; it is reused once that exchange is over (see the
    /// pick in [`Pool::send_h1`]). Nothing waits for the body's end: a task per request to
    /// wait for it cost more than the pick's check.
    fn give_back(
        &self,
        sender: http1::SendRequest<ProxyBody>,
        endpoint: SocketAddr,
        uses: u32,
        traffic: &TrafficPolicy,
    ) {
        if traffic.limits.max_requests_per_connection.is_some_and(|max| uses >= max) {
            return;
        }
        let mut h1 = lock(&self.h1);
        let list = h1.entry(endpoint).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(PooledH1 { sender, uses, since: Instant::now() });
        }
    }

    async fn send_h2(
        &self,
        backend: &BackendState,
        ep: &EndpointState,
        traffic: &TrafficPolicy,
        wire: Wire,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, H2Failure> {
        let endpoint = ep.endpoint.address;
        let max_uses = traffic.limits.max_requests_per_connection;
        let shared = {
            let mut conns = lock(&self.h2);
            match conns.get(&endpoint) {
                Some(c) if !c.sender.is_closed() => {
                    let uses = c.uses.fetch_add(1, Ordering::AcqRel) + 1;
                    let sender = c.sender.clone();
                    if max_uses.is_some_and(|max| uses >= max) {
                        // Retire it: requests in flight finish, new ones open a fresh one.
                        conns.remove(&endpoint);
                    }
                    Some(sender)
                }
                Some(_) => {
                    conns.remove(&endpoint);
                    None
                }
                None => None,
            }
        };
        let mut sender = match shared {
            Some(sender) => sender,
            None => {
                let (io, guard) = self.open(backend, ep, traffic).await?;
                let (io, start) = if wire == Wire::Http2OrHttp1 {
                    let (watched, start) = preface::Watch::new(io);
                    (Box::new(watched) as BoxedIo, Some(start))
                } else {
                    (io, None)
                };
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(30))
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(|source| SendError::Handshake { endpoint, source })?;
                let mut conn = Box::pin(conn);
                if let Some(mut start) = start {
                    // One round trip on a new connection only: the connection task runs here
                    // (sending the preface) until the peer's first bytes say what it is.
                    let timeout = traffic.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
                    let waited = tokio::select! {
                        biased;
                        d = tokio::time::timeout(timeout, start.wait_for(|s| *s != PeerStart::Unknown)) => Some(d.is_ok()),
                        _ = conn.as_mut() => None,
                    };
                    if waited == Some(false) {
                        return Err(SendError::PrefaceTimeout { endpoint, timeout }.into());
                    }
                    // Undecided here means the connection ended before the peer said anything.
                    let decided = match *start.borrow() {
                        PeerStart::Unknown => PeerStart::Closed,
                        s => s,
                    };
                    if decided != PeerStart::Http2 {
                        // `guard` goes now, so the HTTP/1.1 connection can take its place.
                        return Err(H2Failure::NotHttp2 { req, start: decided });
                    }
                }
                tokio::spawn(async move {
                    let _connection = guard;
                    if let Err(e) = conn.await {
                        tracing::debug!(%endpoint, error = %e, "upstream HTTP/2 connection ended");
                    }
                });
                if max_uses.is_none_or(|max| max > 1) {
                    let uses = Arc::new(AtomicU32::new(1));
                    lock(&self.h2).insert(endpoint, SharedH2 { sender: sender.clone(), uses });
                }
                sender
            }
        };
        sender.ready().await.map_err(|source| SendError::Request { endpoint, source })?;
        Ok(sender.send_request(req).await.map_err(|source| SendError::Request { endpoint, source })?)
    }
}
