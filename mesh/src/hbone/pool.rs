//! The HBONE client: a pool of mTLS HTTP/2 connections keyed by (source identity, destination
//! identity, HBONE endpoint), each carrying up to `max_streams` CONNECT streams.
//!
//! A connection is opened only when every pooled one for the key is full; opening is serialized
//! per key so a burst of new streams shares the connections it creates. Each connection sends
//! an HTTP/2 PING when idle for `keepalive`; a peer that does not answer, or a connection that
//! ended, is marked dead and never handed to a new stream. Idle connections expire.
//!
//! A connection also stops taking new streams (it is *retired*; its streams finish) once the
//! source's certificate has been renewed or either end's certificate has expired: every new
//! stream is carried under the identities' current certificates, so a renewal or a root
//! rotation takes effect on the wire at once, and nothing rides on an expired certificate.
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use tokio::net::TcpStream;

use super::{CONNECTION_WINDOW, DEFAULT_MAX_STREAMS, HboneError, MAX_FRAME, STREAM_WINDOW};
use crate::identity::SpiffeId;
use crate::tls::{CredentialSlot, TrustBundle, client_config, no_sni, not_after};

/// Bound on getting a connection for a stream: waiting for another stream's opening of the
/// key, then the dial, TLS and HTTP/2 handshakes. Opening is serialized per key, so without
/// it one stalled peer would hold every stream to it (and the task that opens) forever.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the peer's answer to a CONNECT (it answers once its upstream connect is done).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub max_streams: usize,
    pub idle_timeout: Duration,
    /// PING a connection that has been idle this long; no answer within the same time kills it.
    pub keepalive: Duration,
    /// See [`OPEN_TIMEOUT`].
    pub open_timeout: Duration,
    /// See [`RESPONSE_TIMEOUT`].
    pub response_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams: DEFAULT_MAX_STREAMS,
            idle_timeout: Duration::from_secs(60),
            keepalive: Duration::from_secs(10),
            open_timeout: OPEN_TIMEOUT,
            response_timeout: RESPONSE_TIMEOUT,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: SpiffeId,
    pub dst: SpiffeId,
    pub endpoint: SocketAddr,
}

struct Conn {
    sender: SendRequest<Bytes>,
    active: AtomicUsize,
    dead: Arc<AtomicBool>,
    last_used: Mutex<Instant>,
    /// The source certificate the handshake presented.
    presented: Arc<rustls::sign::CertifiedKey>,
    /// When the first of the two certificates expires.
    valid_until: SystemTime,
}

impl Conn {
    /// Usable for new streams: alive, and handshaken with the source's current certificate,
    /// neither end's certificate expired.
    fn fresh(&self, current: Option<&Arc<rustls::sign::CertifiedKey>>, now: SystemTime) -> bool {
        !self.dead.load(Ordering::Acquire)
            && now < self.valid_until
            && current.is_some_and(|c| Arc::ptr_eq(c, &self.presented))
    }

    fn try_acquire(&self, max: usize) -> bool {
        self.active.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
    }
}

/// Holds a stream slot of a pooled connection; released on drop.
pub struct StreamSlot(Arc<Conn>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        *self.0.last_used.lock().expect("pool time") = Instant::now();
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An established CONNECT stream.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub slot: StreamSlot,
}

#[derive(Default)]
struct Entry {
    conns: Vec<Arc<Conn>>,
    opening: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Clone)]
pub struct Pool {
    config: PoolConfig,
    entries: Arc<Mutex<HashMap<PoolKey, Entry>>>,
    opened: Arc<std::sync::atomic::AtomicU64>,
}

/// Headers of a CONNECT request.
pub struct ConnectRequest {
    pub authority: SocketAddr,
    pub forwarded_for: SocketAddr,
}

impl Pool {
    pub fn new(config: PoolConfig) -> Self {
        let pool = Pool { config, entries: Arc::default(), opened: Arc::default() };
        let weak = Arc::downgrade(&pool.entries);
        let idle = pool.config.idle_timeout;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(idle / 2).await;
                let Some(entries) = weak.upgrade() else { return };
                expire(&entries, idle);
            }
        });
        pool
    }

    /// Number of live pooled connections per key (for the admin API and tests).
    pub fn connections(&self) -> Vec<(PoolKey, usize)> {
        let entries = self.entries.lock().expect("pool lock");
        entries
            .iter()
            .map(|(k, e)| (k.clone(), e.conns.iter().filter(|c| !c.dead.load(Ordering::Acquire)).count()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Connections opened since start.
    pub fn opened_total(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    fn acquire(
        &self,
        key: &PoolKey,
        current: Option<&Arc<rustls::sign::CertifiedKey>>,
    ) -> (Option<StreamSlot>, Arc<tokio::sync::Mutex<()>>) {
        let now = SystemTime::now();
        let mut entries = self.entries.lock().expect("pool lock");
        let entry = entries.entry(key.clone()).or_default();
        // Retired connections stay listed only while their streams finish.
        entry.conns.retain(|c| {
            !c.dead.load(Ordering::Acquire) && (c.fresh(current, now) || c.active.load(Ordering::Acquire) > 0)
        });
        let slot = entry
            .conns
            .iter()
            .find(|c| c.fresh(current, now) && c.try_acquire(self.config.max_streams))
            .map(|c| StreamSlot(c.clone()));
        (slot, entry.opening.clone())
    }

    /// Opens a CONNECT stream to `request.authority` through the endpoint of `key`, reusing a
    /// pooled connection when one has room. `dial` makes the TCP connection (from the source
    /// workload's network namespace).
    ///
    /// When a pooled connection fails the stream at the HTTP/2 level — typically its peer is
    /// going away (GOAWAY: the peer ztunnel drains after an upgrade) — the stream is tried once
    /// more on a connection opened for it (a closing one is marked dead first): an upgrade of
    /// the peer never fails a new stream.
    pub async fn connect<D, F>(
        &self,
        key: PoolKey,
        credential: Arc<CredentialSlot>,
        bundle: &TrustBundle,
        dial: D,
        request: ConnectRequest,
    ) -> Result<Tunnel, HboneError>
    where
        D: FnOnce() -> F,
        F: Future<Output = std::io::Result<TcpStream>>,
    {
        let mut dial = Some(dial);
        let first = self.connect_once(&key, &credential, bundle, &mut dial, &request).await;
        match first {
            Ok((tunnel, _)) => Ok(tunnel),
            // Nothing of the client's has been sent yet (CONNECT is answered before any byte
            // flows), so one more try is safe.
            Err(HboneError::H2(e)) if dial.is_some() => {
                tracing::debug!(endpoint = %key.endpoint, error = %e, "pooled HBONE connection closing; retrying on a new one");
                self.connect_once(&key, &credential, bundle, &mut dial, &request).await.map(|(t, _)| t)
            }
            Err(e) => Err(e),
        }
    }

    async fn connect_once<D, F>(
        &self,
        key: &PoolKey,
        credential: &Arc<CredentialSlot>,
        bundle: &TrustBundle,
        dial: &mut Option<D>,
        request: &ConnectRequest,
    ) -> Result<(Tunnel, bool), HboneError>
    where
        D: FnOnce() -> F,
        F: Future<Output = std::io::Result<TcpStream>>,
    {
        let current = credential.get().map(|c| c.certified);
        let endpoint = key.endpoint;
        let mut pooled = true;
        let slot = match self.acquire(key, current.as_ref()) {
            (Some(slot), _) => slot,
            (None, opening) => {
                let open = async {
                    let _guard = opening.lock().await;
                    // Someone may have opened a connection while we waited.
                    match self.acquire(key, current.as_ref()).0 {
                        Some(slot) => Ok(slot),
                        None => {
                            let dial = dial.take().ok_or(HboneError::NoCredential(key.src.to_string()))?;
                            pooled = false;
                            let conn = self.open(key, credential.clone(), bundle, dial).await?;
                            conn.active.store(1, Ordering::Release);
                            let mut entries = self.entries.lock().expect("pool lock");
                            entries.entry(key.clone()).or_default().conns.push(conn.clone());
                            Ok::<_, HboneError>(StreamSlot(conn))
                        }
                    }
                };
                let after = self.config.open_timeout;
                tokio::time::timeout(after, open).await.map_err(|_| HboneError::Timeout {
                    stage: "opening an HBONE connection",
                    endpoint,
                    after,
                })??
            }
        };
        let after = self.config.response_timeout;
        let answered = tokio::time::timeout(after, async {
            let mut sender =
                slot.0.sender.clone().ready().await.inspect_err(|_| slot.0.dead.store(true, Ordering::Release))?;
            let req = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(request.authority.to_string())
                .header("forwarded", format!("for=\"{}\"", request.forwarded_for))
                .header("traceparent", super::new_traceparent())
                .body(())
                .expect("static request parts");
            let (response, send) = sender.send_request(req, false).inspect_err(|e| mark_if_closing(&slot.0, e))?;
            let response = response.await.inspect_err(|e| mark_if_closing(&slot.0, e))?;
            Ok::<_, HboneError>((response, send))
        });
        // A stream that timed out is reset when its handles drop; the connection stays pooled
        // (its PING keepalive judges whether the peer as a whole still answers).
        let (response, send) = answered.await.map_err(|_| HboneError::Timeout {
            stage: "waiting for the CONNECT response",
            endpoint,
            after,
        })??;
        if response.status() != http::StatusCode::OK {
            return Err(HboneError::Status { status: response.status(), authority: request.authority.to_string() });
        }
        Ok((Tunnel { send, recv: response.into_body(), slot }, pooled))
    }

    async fn open<D, F>(
        &self,
        key: &PoolKey,
        credential: Arc<CredentialSlot>,
        bundle: &TrustBundle,
        dial: D,
    ) -> Result<Arc<Conn>, HboneError>
    where
        D: FnOnce() -> F,
        F: Future<Output = std::io::Result<TcpStream>>,
    {
        let endpoint = key.endpoint;
        let own = credential.get().ok_or_else(|| HboneError::NoCredential(key.src.to_string()))?;
        let config = client_config(Some(credential), bundle, Some(key.dst.clone()), &[super::ALPN])?;
        let tcp = dial().await.map_err(|source| HboneError::Dial { endpoint, source })?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(no_sni(), tcp)
            .await
            .map_err(|source| HboneError::Tls { endpoint, source })?;
        // Had a renewal slipped in before the handshake, the connection is merely retired early.
        let presented = own.certified.clone();
        let peer_until = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(not_after).transpose()?;
        let valid_until = peer_until.map_or(own.not_after, |p| p.min(own.not_after));
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(self.config.max_streams as u32)
            .max_header_list_size(super::MAX_HEADER_LIST_SIZE)
            .max_send_buffer_size(super::MAX_SEND_BUFFER)
            .max_concurrent_reset_streams(super::MAX_CONCURRENT_RESET_STREAMS)
            .max_pending_accept_reset_streams(super::MAX_PENDING_ACCEPT_RESET_STREAMS)
            .handshake::<_, Bytes>(tls)
            .await?;
        let dead = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(Conn {
            sender,
            active: AtomicUsize::new(0),
            dead: dead.clone(),
            last_used: Mutex::new(Instant::now()),
            presented,
            valid_until,
        });
        let ping_pong = connection.ping_pong();
        tokio::spawn({
            let dead = dead.clone();
            async move {
                if let Err(e) = connection.await {
                    tracing::debug!(%endpoint, error = %e, "pooled HBONE connection ended");
                }
                dead.store(true, Ordering::Release);
            }
        });
        if let Some(pp) = ping_pong {
            tokio::spawn(keepalive(pp, Arc::downgrade(&conn), self.config.keepalive, endpoint));
        }
        self.opened.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(src = %key.src, dst = %key.dst, %endpoint, "opened pooled HBONE connection");
        Ok(conn)
    }
}

/// The peer refuses new streams on this connection: it is going away (GOAWAY, e.g. a draining
/// ztunnel) or refused the stream before processing it.
fn peer_closing(e: &h2::Error) -> bool {
    e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

fn mark_if_closing(conn: &Conn, e: &h2::Error) {
    if peer_closing(e) {
        conn.dead.store(true, Ordering::Release);
    }
}

/// PINGs the peer when the connection has been idle for `every`; marks it dead on silence.
async fn keepalive(mut pp: h2::PingPong, conn: std::sync::Weak<Conn>, every: Duration, endpoint: SocketAddr) {
    loop {
        tokio::time::sleep(every).await;
        let Some(c) = conn.upgrade() else { return };
        if c.dead.load(Ordering::Acquire) {
            return;
        }
        let idle = c.last_used.lock().expect("pool time").elapsed();
        if idle < every && c.active.load(Ordering::Acquire) > 0 {
            continue;
        }
        match tokio::time::timeout(every, pp.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            _ => {
                tracing::info!(%endpoint, "HBONE peer did not answer PING; dropping the pooled connection");
                c.dead.store(true, Ordering::Release);
                return;
            }
        }
    }
}

fn expire(entries: &Mutex<HashMap<PoolKey, Entry>>, idle: Duration) {
    let mut entries = entries.lock().expect("pool lock");
    for entry in entries.values_mut() {
        entry.conns.retain(|c| {
            let unused =
                c.active.load(Ordering::Acquire) == 0 && c.last_used.lock().expect("pool time").elapsed() >= idle;
            if unused {
                c.dead.store(true, Ordering::Release);
            }
            !unused && !c.dead.load(Ordering::Acquire)
        });
    }
    entries.retain(|_, e| !e.conns.is_empty() || Arc::strong_count(&e.opening) > 1);
}
