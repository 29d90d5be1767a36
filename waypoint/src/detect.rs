//! Protocol detection on a fresh downstream stream, and the small I/O wrappers serving needs.
//!
//! The first bytes decide: the HTTP/2 connection preface (prior knowledge, h2c) or an
//! HTTP/1.1 method followed by a space is HTTP; anything else is passed through as TCP. The
//! bytes read to decide are replayed to whoever handles the stream ([`Prefixed`]). A client
//! that sends nothing within the header timeout is treated as a server-first protocol (TCP);
//! one that sent part of an HTTP method and stalled is a slow client and is closed.
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] =
    [b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"CONNECT ", b"OPTIONS ", b"TRACE ", b"PATCH "];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Tcp,
}

/// None: the bytes so far are a prefix of an HTTP start; more are needed.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    let mut partial = false;
    for start in METHODS.iter().copied().chain(std::iter::once(H2_PREFACE)) {
        if buf.len() >= start.len() {
            if buf.starts_with(start) {
                return Some(Protocol::Http);
            }
        } else if start.starts_with(buf) {
            partial = true;
        }
    }
    if partial || buf.is_empty() { None } else { Some(Protocol::Tcp) }
}

/// Reads until the protocol is known. Returns the protocol (None: the client closed, failed
/// or stalled mid-method: drop it) and the bytes read.
pub async fn sniff<I: AsyncRead + Unpin>(io: &mut I, timeout: Duration) -> (Option<Protocol>, Vec<u8>) {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(H2_PREFACE.len());
    let mut chunk = [0u8; 64];
    loop {
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Ok(Ok(0)) => return (if buf.is_empty() { None } else { Some(Protocol::Tcp) }, buf),
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Some(p) = classify(&buf) {
                    return (Some(p), buf);
                }
            }
            Ok(Err(_)) => return (None, buf),
            Err(_) => return (if buf.is_empty() { Some(Protocol::Tcp) } else { None }, buf),
        }
    }
}

/// A stream whose first reads return `prefix` (the bytes detection consumed).
pub struct Prefixed<I> {
    prefix: Vec<u8>,
    pos: usize,
    io: I,
}

impl<I> Prefixed<I> {
    pub fn new(prefix: Vec<u8>, io: I) -> Self {
        Prefixed { prefix, pos: 0, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = out.remaining().min(self.prefix.len() - self.pos);
            let start = self.pos;
            out.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, out)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// When bytes last moved on a connection, for the idle timeout.
#[derive(Clone, Debug)]
pub struct Activity {
    epoch: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity { epoch: Instant::now(), last_ms: Arc::default() }
    }
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn idle_for(&self) -> Duration {
        self.epoch.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A stream that records its activity, and holds what must live exactly as long as it.
pub struct Watched<I> {
    io: I,
    activity: Activity,
    _held: Option<Box<dyn std::any::Any + Send>>,
}

impl<I> Watched<I> {
    pub fn new(io: I, activity: Activity) -> Self {
        Watched { io, activity, _held: None }
    }

    /// Keeps `held` (a connection's limit unit) until the stream is dropped, by whoever
    /// ends up owning it.
    pub fn holding(mut self, held: Box<dyn std::any::Any + Send>) -> Self {
        self._held = Some(held);
        self
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = out.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, out);
        if out.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_http_starts_and_others() {
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET /"), Some(Protocol::Http));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http));
        assert_eq!(classify(b"\x16\x03\x01"), Some(Protocol::Tcp));
        assert_eq!(classify(b"GETX"), Some(Protocol::Tcp));
        assert_eq!(classify(b"P"), None);
    }
}
