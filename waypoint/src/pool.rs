//! Upstream connections, pooled per endpoint address: HTTP/1.1 connections are reused one
//! request at a time (kept while idle up to a bound), HTTP/2 connections are shared by every
//! request to that endpoint (multiplexed). Which one a request uses is decided by the
//! downstream request's version, as Istio's waypoints do: a client that spoke h2 gets an h2
//! (prior knowledge, h2c) upstream, so gRPC and streaming keep their semantics end to end.
//!
//! Opening a connection takes a `max_pending_requests` unit while connecting and a
//! `max_connections` unit for the connection's life; `max_requests_per_connection` retires a
//! connection after that many requests.
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use palisade_model::waypoint::config::TrafficPolicy;

use crate::balance::{BackendState, EndpointState};
use crate::body::ProxyBody;
use crate::limits::{Guard, Limit, Overflow};
use crate::upstream::{BoxedIo, Upstream};

/// Used when the backend's TrafficPolicy sets no connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Used when the backend's TrafficPolicy sets no idle timeout.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle HTTP/1.1 connections kept per endpoint; more are closed when they come back.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

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
        matches!(self, SendError::Connect { .. } | SendError::ConnectTimeout { .. } | SendError::Handshake { .. })
    }
}

struct IdleH1 {
    sender: http1::SendRequest<ProxyBody>,
    uses: u32,
    since: Instant,
}

struct SharedH2 {
    sender: http2::SendRequest<ProxyBody>,
    uses: Arc<AtomicU32>,
}

type IdleMap = Arc<Mutex<HashMap<SocketAddr, Vec<IdleH1>>>>;

pub struct Pool {
    upstream: Arc<dyn Upstream>,
    idle: IdleMap,
    h2: Mutex<HashMap<SocketAddr, SharedH2>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    pub fn new(upstream: Arc<dyn Upstream>) -> Self {
        Pool { upstream, idle: IdleMap::default(), h2: Mutex::default() }
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
        h2: bool,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, SendError> {
        if h2 { self.send_h2(backend, ep, traffic, req).await } else { self.send_h1(backend, ep, traffic, req).await }
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
            let mut idle = lock(&self.idle);
            let list = idle.entry(endpoint).or_default();
            // Newest first: the most recently used connection is the least likely to have
            // been closed by the backend's own idle timeout.
            std::iter::from_fn(|| list.pop())
                .find(|c| !c.sender.is_closed() && c.sender.is_ready() && c.since.elapsed() < idle_timeout)
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

    /// Returns an HTTP/1.1 connection to the pool once the response that is using it has
    /// been read (a small task waits for that), unless it served its allowance of requests.
    fn give_back(
        &self,
        mut sender: http1::SendRequest<ProxyBody>,
        endpoint: SocketAddr,
        uses: u32,
        traffic: &TrafficPolicy,
    ) {
        if traffic.limits.max_requests_per_connection.is_some_and(|max| uses >= max) {
            return;
        }
        let idle = Arc::clone(&self.idle);
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut idle = lock(&idle);
                let list = idle.entry(endpoint).or_default();
                if list.len() < MAX_IDLE_PER_ENDPOINT {
                    list.push(IdleH1 { sender, uses, since: Instant::now() });
                }
            }
        });
    }

    async fn send_h2(
        &self,
        backend: &BackendState,
        ep: &EndpointState,
        traffic: &TrafficPolicy,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, SendError> {
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
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(30))
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(|source| SendError::Handshake { endpoint, source })?;
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
        sender.send_request(req).await.map_err(|source| SendError::Request { endpoint, source })
    }
}
