//! What an upstream answers first on a new HTTP/2 (prior knowledge) connection. An HTTP/2
//! server's first bytes are a SETTINGS frame; an HTTP/1.1 server either answers the preface
//! with an HTTP/1.1 status line (`HTTP/1.1 400 …`, nginx and most servers) or closes without
//! a byte (hyper). [`Watch`] wraps the connection's transport and reports which, so the pool can
//! send the request over HTTP/1.1 before any of it went out on the HTTP/2 connection.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

/// How an HTTP/1.1 server's answer starts.
const STATUS_LINE: &[u8] = b"HTTP/";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerStart {
    /// Nothing read yet.
    Unknown,
    /// The first bytes are not an HTTP/1.x status line: an HTTP/2 server (a peer that
    /// speaks neither fails in the HTTP/2 codec, as before).
    Http2,
    /// An HTTP/1.x status line.
    Http1,
    /// End of stream or an error before any byte.
    Closed,
}

/// A transport that reports its peer's first bytes. After the decision it only forwards.
pub struct Watch<I> {
    io: I,
    seen: Vec<u8>,
    report: Option<watch::Sender<PeerStart>>,
}

impl<I> Watch<I> {
    pub fn new(io: I) -> (Self, watch::Receiver<PeerStart>) {
        let (tx, rx) = watch::channel(PeerStart::Unknown);
        (Watch { io, seen: Vec::new(), report: Some(tx) }, rx)
    }

    fn decide(&mut self, start: PeerStart) {
        if let Some(tx) = self.report.take() {
            tx.send_replace(start);
        }
        self.seen = Vec::new();
    }

    fn observe(&mut self, read: &[u8], eof_or_error: bool) {
        if self.report.is_none() {
            return;
        }
        let room = STATUS_LINE.len() - self.seen.len();
        self.seen.extend_from_slice(&read[..read.len().min(room)]);
        if !STATUS_LINE.starts_with(&self.seen) {
            self.decide(PeerStart::Http2);
        } else if self.seen.len() == STATUS_LINE.len() {
            self.decide(PeerStart::Http1);
        } else if eof_or_error {
            // A peer that wrote part of "HTTP/" and closed is no HTTP/2 server either.
            self.decide(if self.seen.is_empty() { PeerStart::Closed } else { PeerStart::Http1 });
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watch<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = out.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, out);
        if self.report.is_some() {
            match &polled {
                Poll::Ready(Ok(())) => {
                    let read = out.filled()[before..].to_vec();
                    self.observe(&read, read.is_empty());
                }
                Poll::Ready(Err(_)) => self.observe(&[], true),
                Poll::Pending => {}
            }
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watch<I> {
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

impl<I> Drop for Watch<I> {
    fn drop(&mut self) {
        // Dropped undecided: the connection ended without the peer saying anything.
        self.decide(PeerStart::Closed);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn first_bytes(peer_writes: &'static [&'static [u8]]) -> PeerStart {
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        let (mut watched, rx) = Watch::new(&mut ours);
        tokio::spawn(async move {
            for chunk in peer_writes {
                theirs.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut buf = [0u8; 64];
        while watched.read(&mut buf).await.is_ok_and(|n| n > 0) && *rx.borrow() == PeerStart::Unknown {}
        drop(watched);
        *rx.borrow()
    }

    #[tokio::test]
    async fn tells_an_http2_server_from_an_http1_one_and_a_silent_close() {
        // An HTTP/2 SETTINGS frame header: length 0x000012, type 0x04.
        assert_eq!(first_bytes(&[b"\x00\x00\x12\x04\x00"]).await, PeerStart::Http2);
        assert_eq!(first_bytes(&[b"HT", b"TP/1.1 400 Bad Request\r\n"]).await, PeerStart::Http1);
        assert_eq!(first_bytes(&[b"HTX"]).await, PeerStart::Http2);
        assert_eq!(first_bytes(&[]).await, PeerStart::Closed);
    }
}
