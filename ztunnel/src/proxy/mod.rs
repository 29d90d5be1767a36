//! The L4 proxies that carry captured connections. Between two enrolled pods the hop is
//! HBONE (mutual TLS proving both identities, [`hbone`]); destinations outside the mesh, and
//! every destination when no CA is configured, get plain TCP.
//!
//! Proxies create their upstream sockets inside the pod's network namespace, so the
//! destination sees the pod's address, exactly as without the mesh.
pub mod hbone;
mod health;
pub mod inbound;
pub mod outbound;

use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::datapath::OrigDstTable;
use crate::flows::{FlowEvent, FlowHub, Observer, Transport, Verdict};
use crate::metrics::{Direction, Metrics};
use crate::netns::Netns;

/// Bound on establishing an upstream connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Copy buffers: large enough that one stream reaches memory bandwidth on loopback/veth.
const COPY_BUFFER: usize = 64 * 1024;

/// What every proxy task needs, shared by all pods of the node.
pub struct ProxyCtx {
    pub hub: Arc<FlowHub>,
    pub metrics: Arc<Metrics>,
    pub orig_dst: OrigDstTable,
    pub snapshot: tokio::sync::watch::Receiver<Arc<palisade_model::Snapshot>>,
    /// Identity and HBONE, when a CA is configured.
    pub mesh: Option<hbone::Mesh>,
    /// Connections at their destination, re-checked on policy changes.
    pub connections: Arc<crate::connections::Connections>,
    /// Which Service endpoints recently failed (left out of the choice for a while).
    pub health: health::EndpointHealth,
}

/// One enrolled pod as the proxies see it.
pub struct PodNet {
    pub name: String,
    pub netns: Netns,
    pub ip: std::net::IpAddr,
    /// The pod's workload identity and certificate (with a CA).
    pub identity: Option<(palisade_mesh::identity::SpiffeId, Arc<palisade_mesh::tls::CredentialSlot>)>,
}

/// Connects to `dst` from inside the pod's network namespace.
async fn connect_from(pod: &PodNet, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = pod.netns.tcp_socket(&dst)?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The identities and rule of a connection, named for its flow event.
struct Decided {
    src_identity: u32,
    dst_identity: u32,
    rule: u32,
    /// What an Audit-mode policy would have denied.
    audit: Option<String>,
}

/// Connects upstream, copies both ways until both sides are done (half-close is passed on),
/// and records one flow event for the whole connection.
#[allow(clippy::too_many_arguments)]
async fn carry(
    ctx: &ProxyCtx,
    pod: &PodNet,
    direction: Direction,
    mut client: TcpStream,
    client_addr: SocketAddr,
    dst: SocketAddr,
    decided: Decided,
    mut registration: Option<crate::connections::Registration>,
) {
    let start = Instant::now();
    ctx.metrics.connection_opened(direction);
    let _ = client.set_nodelay(true);
    let mut src = client_addr;
    let (sent, received, error) = match connect_from(pod, dst).await {
        Err(e) => {
            ctx.health.failed(dst);
            ctx.metrics.proxy_error(direction);
            // Reset, so the client sees a refusal rather than an orderly empty stream.
            let _ = socket_reset(&client);
            (0, 0, Some(format!("connect {dst}: {e}")))
        }
        Ok(mut upstream) => {
            ctx.health.succeeded(dst);
            if direction == Direction::Outbound {
                src = upstream.local_addr().unwrap_or(src);
            }
            // Counted as written, so that a copy cut short by an error or a policy change
            // still reports what crossed (seen from the client: sent went upstream).
            let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
            let mut client_side = CountWrites { io: &mut client, written: &received };
            let mut upstream_side = CountWrites { io: &mut upstream, written: &sent };
            let copy = tokio::io::copy_bidirectional_with_sizes(
                &mut client_side,
                &mut upstream_side,
                COPY_BUFFER,
                COPY_BUFFER,
            );
            let closed = async {
                match registration.as_mut() {
                    Some(r) => r.until_closed().await,
                    None => std::future::pending().await,
                }
            };
            let error = tokio::select! {
                copied = copy => match copied {
                    Ok(_) => None,
                    Err(e) => {
                        ctx.metrics.proxy_error(direction);
                        Some(format!("copy: {e}"))
                    }
                },
                reason = closed => {
                    let _ = socket_reset(&client);
                    Some(reason)
                }
            };
            (sent.into_inner(), received.into_inner(), error)
        }
    };
    ctx.metrics.connection_closed(direction, sent, received);
    let (src_identity, dst_identity, policy) =
        ctx.hub.describe(decided.src_identity, decided.dst_identity, decided.rule);
    record(
        ctx,
        Finished {
            direction,
            verdict: Verdict::Allow,
            src,
            dst,
            src_identity,
            dst_identity,
            policy,
            transport: Transport::Tcp,
            peer: None,
            sent,
            received,
            started: start,
            error,
            audit: decided.audit,
        },
    );
}

/// One side of a copy, counting the bytes written to it as they are written.
struct CountWrites<'a, T> {
    io: T,
    written: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin> AsyncRead for CountWrites<'_, T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountWrites<'_, T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            this.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A proxied connection that ended (or was refused), for its flow event.
struct Finished {
    direction: Direction,
    verdict: Verdict,
    src: SocketAddr,
    dst: SocketAddr,
    src_identity: String,
    dst_identity: String,
    policy: String,
    transport: Transport,
    peer: Option<String>,
    sent: u64,
    received: u64,
    started: Instant,
    error: Option<String>,
    audit: Option<String>,
}

/// The names a refused connection's flow event carries.
struct Refusal {
    src_identity: String,
    dst_identity: String,
    policy: String,
}

/// Refuses a plain TCP connection the proxy decided to deny: reset (the client sees a refusal,
/// not an orderly empty stream), counted, and recorded as a deny event.
fn refuse(ctx: &ProxyCtx, client: &TcpStream, direction: Direction, src: SocketAddr, dst: SocketAddr, why: Refusal) {
    let _ = socket_reset(client);
    ctx.metrics.verdict(direction, true);
    record(
        ctx,
        Finished {
            direction,
            verdict: Verdict::Deny,
            src,
            dst,
            src_identity: why.src_identity,
            dst_identity: why.dst_identity,
            policy: why.policy,
            transport: Transport::Tcp,
            peer: None,
            sent: 0,
            received: 0,
            started: Instant::now(),
            error: None,
            audit: None,
        },
    );
}

fn record(ctx: &ProxyCtx, f: Finished) {
    ctx.hub.record(FlowEvent {
        time_unix_ms: crate::flows::now_unix_ms(),
        node: ctx.hub.node().to_string(),
        observer: Observer::Proxy,
        direction: f.direction,
        verdict: f.verdict,
        policy: f.policy,
        src: f.src,
        dst: f.dst,
        src_identity: f.src_identity,
        dst_identity: f.dst_identity,
        bytes_sent: f.sent,
        bytes_received: f.received,
        duration_ms: f.started.elapsed().as_secs_f64() * 1e3,
        error: f.error,
        transport: Some(f.transport),
        peer_spiffe_id: f.peer,
        audit: f.audit,
        policy_generation: None,
    });
}

/// Sets SO_LINGER to zero so that closing sends a reset.
fn socket_reset(stream: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid socket fd and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}
