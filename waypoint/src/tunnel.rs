//! An HBONE CONNECT stream (an HTTP/2 stream pair) as a byte stream the engine reads and
//! writes like a socket: downstream tunnels are handed to `Engine::serve` and upstream tunnels
//! to the HTTP pool this way. Flow control is h2's: data read is released to the peer at
//! once (the engine's own buffers bound what it holds), and a write waits for send capacity,
//! so a slow peer slows its writer instead of growing a queue.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest piece handed to h2 per write (one HBONE frame).
const MAX_WRITE: usize = palisade_mesh::hbone::MAX_FRAME as usize;

/// One CONNECT stream; `hold` is kept alive with it (an upstream pool slot).
pub struct TunnelIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    shut: bool,
    _hold: Box<dyn Send>,
}

impl TunnelIo {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream, hold: impl Send + 'static) -> Self {
        TunnelIo { send, recv, pending: Bytes::new(), shut: false, _hold: Box::new(hold) }
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl AsyncRead for TunnelIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    self.pending = chunk;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = buf.len().min(MAX_WRITE);
        self.send.reserve_capacity(want);
        let granted = loop {
            match self.send.capacity() {
                0 => match ready!(self.send.poll_capacity(cx)) {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                    None => return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream closed"))),
                },
                n => break n,
            }
        };
        let n = granted.min(want);
        self.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Half-close: END_STREAM, the tunnel's FIN.
    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for TunnelIo {
    fn drop(&mut self) {
        // A stream dropped before its end was written was cut short: tell the peer.
        if !self.shut {
            self.send.send_reset(h2::Reason::CANCEL);
        }
    }
}
