//! The waypoint's two HBONE legs, both on `palisade_mesh`:
//!
//! - Downstream ([`serve`]): a listener on 15008 presenting the waypoint's own workload
//!   certificate and requiring a client certificate of the trust domain (`mesh::hbone::server`:
//!   TLS 1.3, ALPN h2, handshake timeouts). Each CONNECT stream becomes one engine connection
//!   whose identity is the SPIFFE ID the client's certificate proved and whose destination is
//!   the CONNECT authority (the VIP:port the client dialled). A CONNECT to an address the
//!   waypoint does not serve is answered 400.
//! - Upstream ([`HboneUpstream`]): a CONNECT to `endpoint ip:target port` through the
//!   endpoint's HBONE port (its ztunnel, in-pod), on `mesh::hbone::pool`'s pooled connections,
//!   presenting the waypoint's certificate and requiring the endpoint's own identity.
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use http::StatusCode;
use palisade_mesh::accept::{Acceptor, HandshakeLimit};
use palisade_mesh::hbone::pool::{ConnectRequest, Pool, PoolKey};
use palisade_mesh::hbone::request::forwarded_for;
use palisade_mesh::hbone::server::{InboundStream, serve_connection_admitted};
use palisade_mesh::hbone::{ALPN, PORT};
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::tls::{CredentialSlot, TrustBundle, server_config};
use palisade_model::waypoint::config::BackendEndpoint;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::engine::{Downstream, Engine};
use crate::tunnel::TunnelIo;
use crate::upstream::{BoxedIo, ConnectFuture, Upstream};

/// TLS + HTTP/2 handshakes in progress at once, overall and per source address (as ztunnel's
/// HBONE listener): over either, a new connection is closed at once.
pub const HANDSHAKES: usize = 1024;
pub const HANDSHAKES_PER_SOURCE: usize = 32;
/// Downstream HBONE connections open at once; each carries up to 100 streams (the engine's
/// own connection limit bounds streams overall).
pub const MAX_TUNNEL_CONNECTIONS: usize = 4096;

/// Reaches endpoints over HBONE with the waypoint's own identity.
pub struct HboneUpstream {
    pool: Pool,
    own: SpiffeId,
    credential: Arc<CredentialSlot>,
    bundle: watch::Receiver<TrustBundle>,
    /// The endpoints' HBONE port (15008).
    port: u16,
}

impl HboneUpstream {
    /// `bundle` follows the certificate manager's (root rotations).
    pub fn new(
        pool: Pool,
        own: SpiffeId,
        credential: Arc<CredentialSlot>,
        bundle: watch::Receiver<TrustBundle>,
    ) -> Self {
        HboneUpstream { pool, own, credential, bundle, port: PORT }
    }
}

/// The `forwarded` value of the waypoint's CONNECTs: one upstream connection carries many
/// clients' requests, so no client's address applies; the destination takes the tunnel's own
/// source (the waypoint), since an address that disagrees with it is ignored there.
const NO_CLIENT: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

impl Upstream for HboneUpstream {
    fn connect<'a>(&'a self, endpoint: &'a BackendEndpoint) -> ConnectFuture<'a> {
        Box::pin(async move {
            let dst: SpiffeId = endpoint.identity.parse().map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("endpoint {}: {e}", endpoint.workload))
            })?;
            let hbone = SocketAddr::new(endpoint.address.ip(), self.port);
            let key = PoolKey { src: self.own.clone(), dst, endpoint: hbone };
            let bundle = self.bundle.borrow().clone();
            let request = ConnectRequest { authority: endpoint.address, forwarded_for: NO_CLIENT };
            let tunnel = self
                .pool
                .connect(key, self.credential.clone(), &bundle, move || TcpStream::connect(hbone), request)
                .await
                .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e))?;
            Ok(Box::new(TunnelIo::new(tunnel.send, tunnel.recv, tunnel.slot)) as BoxedIo)
        })
    }
}

/// Serves HBONE on `listener` until `shutdown` turns true; then open connections are sent
/// GOAWAY and their streams finish.
pub async fn serve(
    listener: TcpListener,
    engine: Engine,
    credential: Arc<CredentialSlot>,
    mut bundles: watch::Receiver<TrustBundle>,
    shutdown: watch::Receiver<bool>,
) {
    let make_tls = |bundle: &TrustBundle| server_config(credential.clone(), bundle, &[ALPN]);
    let mut tls = match make_tls(&bundles.borrow_and_update()) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the HBONE server configuration");
            return;
        }
    };
    let handshakes = HandshakeLimit::new(HANDSHAKES, HANDSHAKES_PER_SOURCE);
    let connections = Arc::new(Semaphore::new(MAX_TUNNEL_CONNECTIONS));
    let handler = Arc::new(move |stream: InboundStream| handle(engine.clone(), stream));
    let name = listener.local_addr().map_or_else(|_| "hbone".to_string(), |a| format!("hbone {a}"));
    let mut acceptor = Acceptor::new(name, listener);
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            (tcp, peer) = acceptor.accept() => {
                let (Ok(permit), Ok(open)) =
                    (handshakes.try_admit(peer.ip()), Arc::clone(&connections).try_acquire_owned())
                else {
                    tracing::debug!(%peer, "HBONE connection refused: at the handshake or connection limit");
                    continue;
                };
                // A root rotation reaches the listener with the next connection.
                if bundles.has_changed().unwrap_or(false)
                    && let Ok(t) = make_tls(&bundles.borrow_and_update())
                {
                    tls = t;
                }
                let serving = serve_connection_admitted(tcp, permit, tls.clone(), handler.clone(), shutdown.clone());
                tokio::spawn(async move {
                    serving.await;
                    drop(open);
                });
            }
            _ = stop.changed() => return,
        }
    }
}

async fn handle(engine: Engine, stream: InboundStream) {
    let destination = match &stream.authority {
        Ok(a) if engine.serves(*a) => *a,
        Ok(a) => {
            tracing::debug!(authority = %a, peer = %stream.peer, "HBONE request for an address this waypoint does not serve");
            stream.reject(StatusCode::BAD_REQUEST);
            return;
        }
        Err(e) => {
            tracing::debug!(error = %e, peer = %stream.peer, "malformed HBONE request");
            stream.reject(StatusCode::BAD_REQUEST);
            return;
        }
    };
    // The tunnel comes from the client's own address (its ztunnel dials from inside the pod):
    // `forwarded` may only add the client's port; an address that disagrees is ignored.
    let peer = forwarded_for(stream.forwarded_for.as_deref())
        .filter(|f| f.ip() == stream.peer_addr.ip())
        .unwrap_or(stream.peer_addr);
    let identity: Arc<str> = stream.peer.to_string().into();
    let Ok((send, recv)) = stream.accept() else { return };
    let downstream = Downstream { peer, identity: Some(identity), destination };
    engine.serve(TunnelIo::new(send, recv, ()), downstream).await;
}
