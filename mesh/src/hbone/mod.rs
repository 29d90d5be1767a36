//! HBONE: TCP connections carried as HTTP/2 CONNECT streams over mutual TLS (port 15008,
//! ALPN `h2`, TLS 1.3, no SNI), as Istio's ambient mesh defines it.
//!
//! - The client sends `CONNECT` with `:authority` = the original destination `ip:port`, a
//!   `forwarded: for="<source ip:port>"` header and a W3C `traceparent`.
//! - The server answers 200 only once the upstream connection is established, 401 when
//!   authorization denies, 503 when the upstream connect fails, 400 for a malformed request.
//!
//! [`pool`] multiplexes streams over pooled connections; [`server`] accepts them.
pub mod pool;
pub mod request;
pub mod server;

use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const PORT: u16 = 15008;
pub const ALPN: &[u8] = b"h2";
/// Streams per pooled connection.
pub const DEFAULT_MAX_STREAMS: usize = 100;
/// Flow-control windows: large enough that one stream is not window-bound on a fast link.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
pub const MAX_FRAME: u32 = 256 << 10;
/// Largest decoded header list either end accepts (SETTINGS_MAX_HEADER_LIST_SIZE). A CONNECT
/// head is a few hundred bytes; h2's default (16 MiB) let one request hold that much memory.
/// A larger request is refused (431 and a stream reset; a header block that keeps growing
/// past it ends the connection).
pub const MAX_HEADER_LIST_SIZE: u32 = 16 << 10;
/// Bytes one stream may queue for sending before it stops asking for capacity: a full frame,
/// so a stream never waits on its own buffer, while a connection of `DEFAULT_MAX_STREAMS`
/// streams stays bounded.
pub const MAX_SEND_BUFFER: usize = MAX_FRAME as usize;
/// Locally reset streams whose state is kept (further frames on them are ignored); the oldest
/// is forgotten beyond this. Explicit so that a change of h2's default does not move it.
pub const MAX_CONCURRENT_RESET_STREAMS: usize = 50;
/// Streams the peer reset before they were accepted (the "rapid reset" attack): beyond this
/// the connection ends with ENHANCE_YOUR_CALM.
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
const READ_CHUNK: usize = 64 << 10;
/// Reads smaller than this are copied into a buffer of their own size (see `tcp_to_h2`).
const COPY_BELOW: usize = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connect to {endpoint}: {source}")]
    Dial {
        endpoint: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("TLS with {endpoint}: {source}")]
    Tls {
        endpoint: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("peer answered {status} for CONNECT {authority}")]
    Status { status: http::StatusCode, authority: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] crate::tls::TlsError),
    #[error("no certificate yet for {0}")]
    NoCredential(String),
    /// A peer that stalled: `stage` did not finish within `after`.
    #[error("{stage} with {endpoint} timed out after {after:?}")]
    Timeout { stage: &'static str, endpoint: std::net::SocketAddr, after: std::time::Duration },
}

impl HboneError {
    /// `(expected, got)` when the TLS handshake failed because the server proved another
    /// identity than the one required: the caller must not report the expected one as proven.
    pub fn identity_mismatch(&self) -> Option<(&crate::identity::SpiffeId, &crate::identity::SpiffeId)> {
        let HboneError::Tls { source, .. } = self else { return None };
        let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) =
            source.get_ref()?.downcast_ref::<rustls::Error>()?
        else {
            return None;
        };
        match other.0.downcast_ref::<crate::tls::TlsError>()? {
            crate::tls::TlsError::PeerMismatch { expected, got } => Some((expected, got)),
            _ => None,
        }
    }
}

/// Bytes moved by [`pump`], seen from the TCP side.
#[derive(Debug, Default, Clone)]
pub struct Pumped {
    /// Read from the TCP stream and sent into the tunnel.
    pub to_tunnel: u64,
    /// Received from the tunnel and written to the TCP stream.
    pub from_tunnel: u64,
    pub error: Option<String>,
}

/// Running byte counts of a [`pump_counted`], updated as bytes move: readable while it runs
/// and after it was cancelled (a connection cut short still reports what it carried).
#[derive(Debug, Default)]
pub struct Progress {
    /// Read from the TCP stream and handed to the tunnel.
    pub to_tunnel: AtomicU64,
    /// Received from the tunnel and written to the TCP stream.
    pub from_tunnel: AtomicU64,
}

impl Progress {
    fn pumped(&self, error: Option<String>) -> Pumped {
        Pumped {
            to_tunnel: self.to_tunnel.load(Ordering::Relaxed),
            from_tunnel: self.from_tunnel.load(Ordering::Relaxed),
            error,
        }
    }
}

/// Copies between a TCP stream and an HTTP/2 stream until both directions are finished.
/// EOF on TCP ends the h2 stream (END_STREAM) and vice versa, so half-close crosses the
/// tunnel; an error on either side resets the other. The counts include what moved before
/// an error.
pub async fn pump<T>(tcp: T, send: SendStream<Bytes>, recv: RecvStream) -> Pumped
where
    T: AsyncRead + AsyncWrite + Send,
{
    pump_counted(tcp, send, recv, &Progress::default()).await
}

/// [`pump`], counting into `progress` as bytes move, for callers that may cancel it.
pub async fn pump_counted<T>(tcp: T, send: SendStream<Bytes>, recv: RecvStream, progress: &Progress) -> Pumped
where
    T: AsyncRead + AsyncWrite + Send,
{
    let (rd, wr) = tokio::io::split(tcp);
    let up = tcp_to_h2(rd, send, &progress.to_tunnel);
    let down = h2_to_tcp(recv, wr, &progress.from_tunnel);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(e) => return progress.pumped(Some(format!("to tunnel: {e}"))),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(e) => return progress.pumped(Some(format!("from tunnel: {e}"))),
            },
        }
        if up_done && down_done {
            return progress.pumped(None);
        }
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    io::Error::other(e)
}

async fn tcp_to_h2<R: AsyncRead + Unpin>(mut rd: R, mut send: SendStream<Bytes>, total: &AtomicU64) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        buf.reserve(READ_CHUNK);
        let n = match rd.read_buf(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(e);
            }
        };
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(());
        }
        // A small read is copied out and the buffer kept: a request of a few KiB costs a small
        // allocation, not a fresh 64 KiB buffer per read. A large read is handed over whole.
        let mut chunk = if n < COPY_BELOW {
            let small = Bytes::copy_from_slice(&buf);
            buf.clear();
            small
        } else {
            buf.split().freeze()
        };
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let granted = match send.capacity() {
                0 => poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream closed"))?
                    .map_err(h2_io)?,
                n => n,
            };
            let part = chunk.split_to(granted.min(chunk.len()));
            let len = part.len() as u64;
            send.send_data(part, false).map_err(h2_io)?;
            total.fetch_add(len, Ordering::Relaxed);
        }
    }
}

async fn h2_to_tcp<W: AsyncWrite + Unpin>(mut recv: RecvStream, mut wr: W, total: &AtomicU64) -> io::Result<()> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        let n = chunk.len();
        wr.write_all(&chunk).await?;
        total.fetch_add(n as u64, Ordering::Relaxed);
        let _ = recv.flow_control().release_capacity(n);
    }
    wr.shutdown().await?;
    Ok(())
}

/// A W3C trace context header value with fresh random ids.
pub fn new_traceparent() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut ids = [0u64; 3];
    for (i, id) in ids.iter_mut().enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
        *id = h.finish().max(1);
    }
    format!("00-{:016x}{:016x}-{:016x}-01", ids[0], ids[1], ids[2])
}
