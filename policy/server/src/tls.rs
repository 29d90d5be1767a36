//! The push endpoint's transport: TCP, then mutual TLS where the client must present a node
//! credential of the trust domain (`spiffe://<td>/node/<name>`, as for the CA); the proven
//! node name travels with each gRPC request ([`NodeName`]). The server presents
//! `spiffe://<td>/ns/palisade-system/sa/palisade-server`, issued from the CA directory.
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use palisade_ca::authority::CertificateAuthority;
use palisade_mesh::accept::{Acceptor, HandshakeLimit};
use palisade_mesh::ca_api::{CONTROL_PLANE_NAMESPACE, new_key_and_csr, node_of_uri};
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::tls::{Clients, Credential, CredentialSlot, TrustBundle, server_config_for, spiffe_uri_of};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

use crate::ServeError;

/// The server's own identity.
pub fn server_identity(trust_domain: &str) -> SpiffeId {
    SpiffeId::new(trust_domain, CONTROL_PLANE_NAMESPACE, palisade_api::SERVER_SERVICE_ACCOUNT)
}

/// Lifetime of the serving certificate; renewed at half of it.
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections in their TLS handshake at once (overall, per source address).
const MAX_HANDSHAKES: (usize, usize) = (256, 16);

/// The node a connection's certificate proves, for the service.
#[derive(Clone, Debug)]
pub struct NodeName(pub String);

/// One node's mutual-TLS connection.
pub struct NodeConn {
    tls: TlsStream<TcpStream>,
    node: String,
}

impl tonic::transport::server::Connected for NodeConn {
    type ConnectInfo = NodeName;
    fn connect_info(&self) -> NodeName {
        NodeName(self.node.clone())
    }
}

impl AsyncRead for NodeConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for NodeConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// Issues the serving credential from the CA directory and renews it at half its lifetime.
pub fn serving_credential(ca: CertificateAuthority) -> Result<(Arc<CredentialSlot>, TrustBundle), ServeError> {
    let trust_domain = ca.trust_domain().to_string();
    let bundle = TrustBundle::from_pem(&ca.bundle_pem(), &trust_domain).map_err(|e| ServeError::Tls(e.to_string()))?;
    let slot = CredentialSlot::new(issue(&ca, &trust_domain)?);
    let renew = slot.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(SERVING_TTL / 2).await;
            match issue(&ca, &trust_domain) {
                Ok(c) => renew.set(c),
                Err(e) => tracing::error!(error = %e, "serving certificate not renewed; the current one stays"),
            }
        }
    });
    Ok((slot, bundle))
}

fn issue(ca: &CertificateAuthority, trust_domain: &str) -> Result<Credential, ServeError> {
    let tls = |e: String| ServeError::Tls(e);
    let (key, csr) = new_key_and_csr().map_err(|e| tls(e.to_string()))?;
    let now = SystemTime::now();
    let (chain, _) = ca
        .sign_workload_between(&csr, &server_identity(trust_domain), now - Duration::from_secs(300), now + SERVING_TTL)
        .map_err(|e| tls(e.to_string()))?;
    Credential::from_pem(&chain, &key).map_err(|e| tls(e.to_string()))
}

/// Accepts TCP connections and completes their handshakes off the accept loop; yields the
/// connections of proven nodes.
pub fn incoming(
    listener: TcpListener,
    credential: Arc<CredentialSlot>,
    bundle: &TrustBundle,
) -> Result<mpsc::Receiver<Result<NodeConn, io::Error>>, ServeError> {
    let config =
        server_config_for(credential, bundle, Clients::Nodes, &[b"h2"]).map_err(|e| ServeError::Tls(e.to_string()))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let trust_domain = bundle.trust_domain.clone();
    let (tx, rx) = mpsc::channel(16);
    let limit = HandshakeLimit::new(MAX_HANDSHAKES.0, MAX_HANDSHAKES.1);
    tokio::spawn(async move {
        let mut accept = Acceptor::new("control plane", listener);
        loop {
            let (tcp, peer) = accept.accept().await;
            let Ok(permit) = limit.try_admit(peer.ip()) else { continue };
            let (acceptor, tx, trust_domain) = (acceptor.clone(), tx.clone(), trust_domain.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return tracing::info!(%peer, error = %e, "control-plane client refused at TLS"),
                    Err(_) => return tracing::info!(%peer, "control-plane client did not finish its TLS handshake"),
                };
                drop(permit);
                let node = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| spiffe_uri_of(c).ok())
                    .and_then(|uri| node_of_uri(&uri, &trust_domain).map(str::to_string));
                if let Some(node) = node {
                    let _ = tx.send(Ok(NodeConn { tls, node })).await;
                }
            });
        }
    });
    Ok(rx)
}
