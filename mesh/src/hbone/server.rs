//! The HBONE server: terminates mutual TLS (the listener's workload certificate, a client of
//! the trust domain required), accepts HTTP/2 and hands every CONNECT stream to a handler
//! that authorizes it, connects upstream, and answers.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::StatusCode;
use tokio::net::TcpStream;

use super::{CONNECTION_WINDOW, DEFAULT_MAX_STREAMS, MAX_FRAME, STREAM_WINDOW};
use crate::identity::SpiffeId;
use crate::tls::peer_identity;

/// Bound on the TLS and HTTP/2 handshakes of an inbound connection.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) where
    H: Fn(InboundStream) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let peer_addr = match tcp.peer_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let _ = tcp.set_nodelay(true);
    let handshake = async {
        let tls_stream = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = peer_identity(tls_stream.get_ref().1).ok_or("client presented no SPIFFE identity")?;
        let conn = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(DEFAULT_MAX_STREAMS as u32)
            .handshake::<_, Bytes>(tls_stream)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((peer, conn))
    };
    let (peer, mut conn) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::info!(%peer_addr, error = %e, "HBONE handshake refused");
            return;
        }
        Err(_) => {
            tracing::info!(%peer_addr, "HBONE handshake timed out");
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
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let authority = if request.method() != http::Method::CONNECT {
        Err(format!("method {} is not CONNECT", request.method()))
    } else {
        request
            .uri()
            .authority()
            .ok_or_else(|| "missing :authority".to_string())
            .and_then(|a| a.as_str().parse::<SocketAddr>().map_err(|_| format!(":authority {a} is not ip:port")))
    };
    let (forwarded_for, traceparent) = (header("forwarded"), header("traceparent"));
    InboundStream {
        peer: peer.clone(),
        peer_addr,
        authority,
        forwarded_for,
        traceparent,
        respond,
        recv: request.into_body(),
    }
}
