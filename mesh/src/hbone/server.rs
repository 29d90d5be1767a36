//! The HBONE server: terminates mutual TLS (the listener's workload certificate, a client of
//! the trust domain required), accepts HTTP/2 and hands every CONNECT stream to a handler
//! that authorizes it, connects upstream, and answers.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::StatusCode;
use tokio::net::TcpStream;

use super::request::parse_connect;
use super::{
    CONNECTION_WINDOW, DEFAULT_MAX_STREAMS, MAX_CONCURRENT_RESET_STREAMS, MAX_FRAME, MAX_HEADER_LIST_SIZE,
    MAX_PENDING_ACCEPT_RESET_STREAMS, MAX_SEND_BUFFER, STREAM_WINDOW,
};
use crate::identity::SpiffeId;
use crate::tls::peer_identity;

/// Bound on the TLS handshake of an inbound connection: a client that sends nothing holds a
/// descriptor, a task and a handshake slot until then. A real client needs one round trip.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the HTTP/2 connection preface that follows TLS.
pub const H2_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Inbound handshakes that failed or timed out, process-wide (logged at debug only: a flood of
/// garbage must not become a flood of log lines).
static HANDSHAKE_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Inbound HBONE handshakes that failed or timed out since start.
pub fn handshake_failures_total() -> u64 {
    HANDSHAKE_FAILURES.load(Ordering::Relaxed)
}

/// One CONNECT stream, before it is answered.
pub struct InboundStream {
    /// The client's proven SPIFFE ID.
    pub peer: SpiffeId,
    /// The TCP peer of the tunnel connection.
    pub peer_addr: SocketAddr,
    /// `:authority`, or the reason it is unusable.
    pub authority: Result<SocketAddr, String>,
    pub forwarded_for: Option<String>,
    pub traceparent: Option<String>,
    respond: SendResponse<Bytes>,
    recv: RecvStream,
}

impl InboundStream {
    /// Answers with an error status and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        let response = http::Response::builder().status(status).body(()).expect("static response");
        let _ = self.respond.send_response(response, true);
    }

    /// Answers 200: from here the stream carries the connection's bytes.
    pub fn accept(mut self) -> Result<(SendStream<Bytes>, RecvStream), h2::Error> {
        let response = http::Response::builder().status(StatusCode::OK).body(()).expect("static response");
        let send = self.respond.send_response(response, false)?;
        Ok((send, self.recv))
    }
}

/// Serves one accepted TCP connection: TLS, HTTP/2, then `handler` for each stream (each in
/// its own task). Ends when the client closes or `shutdown` fires (then in-flight streams
/// finish: HTTP/2 GOAWAY lets the client know no new stream will be accepted).
pub async fn serve_connection<H, F>(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) where
    H: Fn(InboundStream) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    serve_connection_admitted(tcp, (), tls, handler, shutdown).await
}

/// [`serve_connection`] for a connection admitted by a handshake limit: `permit` (e.g. a
/// [`crate::accept::HandshakePermit`]) is held while the handshakes run and released as soon
/// as they end, whatever their outcome.
pub async fn serve_connection_admitted<P, H, F>(
    tcp: TcpStream,
    permit: P,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) where
    P: Send,
    H: Fn(InboundStream) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let peer_addr = match tcp.peer_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let _ = tcp.set_nodelay(true);
    let handshake = async {
        let tls_stream = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tokio_rustls::TlsAcceptor::from(tls).accept(tcp))
            .await
            .map_err(|_| format!("TLS handshake timed out after {TLS_HANDSHAKE_TIMEOUT:?}"))?
            .map_err(|e| format!("TLS: {e}"))?;
        let peer = peer_identity(tls_stream.get_ref().1).ok_or("client presented no SPIFFE identity")?;
        let h2 = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(DEFAULT_MAX_STREAMS as u32)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_concurrent_reset_streams(MAX_CONCURRENT_RESET_STREAMS)
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
            .handshake::<_, Bytes>(tls_stream);
        let conn = tokio::time::timeout(H2_HANDSHAKE_TIMEOUT, h2)
            .await
            .map_err(|_| format!("HTTP/2 handshake timed out after {H2_HANDSHAKE_TIMEOUT:?}"))?
            .map_err(|e| format!("HTTP/2: {e}"))?;
        Ok::<_, String>((peer, conn))
    };
    let handshaken = handshake.await;
    drop(permit);
    let (peer, mut conn) = match handshaken {
        Ok(v) => v,
        Err(e) => {
            HANDSHAKE_FAILURES.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer_addr, error = %e, "HBONE handshake failed");
            return;
        }
    };
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    let stream = inbound_stream(&peer, peer_addr, request, respond);
                    tokio::spawn(handler(stream));
                }
                Some(Err(e)) => {
                    tracing::debug!(%peer_addr, error = %e, "HBONE connection error");
                    return;
                }
                None => return,
            },
            _ = shutdown.changed() => {
                conn.graceful_shutdown();
                // Let in-flight streams finish; the connection future completes after them.
                while let Some(Ok((request, respond))) = conn.accept().await {
                    let stream = inbound_stream(&peer, peer_addr, request, respond);
                    tokio::spawn(handler(stream));
                }
                return;
            }
        }
    }
}

fn inbound_stream(
    peer: &SpiffeId,
    peer_addr: SocketAddr,
    request: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
) -> InboundStream {
    let head = parse_connect(request.method(), request.uri(), request.headers());
    InboundStream {
        peer: peer.clone(),
        peer_addr,
        authority: head.authority,
        forwarded_for: head.forwarded,
        traceparent: head.traceparent,
        respond,
        recv: request.into_body(),
    }
}
