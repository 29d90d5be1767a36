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
pub mod server;

use std::future::poll_fn;
use std::io;

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
const READ_CHUNK: usize = 64 << 10;

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

/// Copies between a TCP stream and an HTTP/2 stream until both directions are finished.
/// EOF on TCP ends the h2 stream (END_STREAM) and vice versa, so half-close crosses the
/// tunnel; an error on either side resets the other.
pub async fn pump<T>(tcp: T, send: SendStream<Bytes>, recv: RecvStream) -> Pumped
where
    T: AsyncRead + AsyncWrite + Send,
{
    let (rd, wr) = tokio::io::split(tcp);
    let up = tcp_to_h2(rd, send);
    let down = h2_to_tcp(recv, wr);
    tokio::pin!(up, down);
    let (mut to_tunnel, mut from_tunnel) = (None, None);
    loop {
        tokio::select! {
            r = &mut up, if to_tunnel.is_none() => match r {
                Ok(n) => to_tunnel = Some(n),
                Err(e) => return Pumped { error: Some(format!("to tunnel: {e}")), ..Default::default() },
            },
            r = &mut down, if from_tunnel.is_none() => match r {
                Ok(n) => from_tunnel = Some(n),
                Err(e) => return Pumped { error: Some(format!("from tunnel: {e}")), ..Default::default() },
            },
        }
        if let (Some(to_tunnel), Some(from_tunnel)) = (to_tunnel, from_tunnel) {
            return Pumped { to_tunnel, from_tunnel, error: None };
        }
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    io::Error::other(e)
}

async fn tcp_to_h2<R: AsyncRead + Unpin>(mut rd: R, mut send: SendStream<Bytes>) -> io::Result<u64> {
    let mut total = 0u64;
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
            return Ok(total);
        }
        total += n as u64;
        let mut chunk = buf.split().freeze();
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
            send.send_data(part, false).map_err(h2_io)?;
        }
    }
}

async fn h2_to_tcp<W: AsyncWrite + Unpin>(mut recv: RecvStream, mut wr: W) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        let n = chunk.len();
        wr.write_all(&chunk).await?;
        total += n as u64;
        let _ = recv.flow_control().release_capacity(n);
    }
    wr.shutdown().await?;
    Ok(total)
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
