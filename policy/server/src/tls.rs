//! The push endpoint's transport: TCP, then mutual TLS where the client must present a node
//! credential of the trust domain (`spiffe://<td>/node/<name>`, as for the CA) or a workload
//! certificate (a waypoint's: `push` admits it only as a waypoint whose workloads run as that
//! identity); who the certificate proves travels with each gRPC request ([`Client`]). The
//! server presents
//! `spiffe://<td>/ns/palisade-system/sa/palisade-server`, issued from the CA directory.
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::RwLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use palisade_ca::authority::CertificateAuthority;
use palisade_mesh::accept::{Acceptor, HandshakeLimit};
use palisade_mesh::ca_api::{CONTROL_PLANE_NAMESPACE, new_key_and_csr, node_of_uri};
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::tls::{Clients, Credential, CredentialSlot, TrustBundle, server_config_for, spiffe_uri_of};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::ServeError;

/// The server's own identity.
pub fn server_identity(trust_domain: &str) -> SpiffeId {
    SpiffeId::new(trust_domain, CONTROL_PLANE_NAMESPACE, palisade_api::SERVER_SERVICE_ACCOUNT)
}

/// Lifetime of the serving certificate; renewed at half of it.
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often the CA directory is re-read (rotations, renewals).
const REFRESH_EVERY: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections in their TLS handshake at once (overall, per source address).
const MAX_HANDSHAKES: (usize, usize) = (256, 16);

/// Who a connection's certificate proves, for the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Client {
    /// A node credential: the node's name.
    Node(String),
    /// A workload certificate (a waypoint's).
    Workload(SpiffeId),
}

/// One client's mutual-TLS connection.
pub struct NodeConn {
    tls: TlsStream<TcpStream>,
    client: Client,
}

impl tonic::transport::server::Connected for NodeConn {
    type ConnectInfo = Client;
    fn connect_info(&self) -> Client {
        self.client.clone()
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

/// The server's TLS, kept current: the CA directory is re-read every [`REFRESH_EVERY`]; the
/// serving certificate is renewed at half its lifetime and whenever the trust bundle changes
/// (so after `palisade ca activate` it chains to the new root), and node credentials of a new
/// root are accepted as soon as the bundle lists it.
pub struct ServingTls {
    acceptor: RwLock<TlsAcceptor>,
    trust_domain: String,
}

impl ServingTls {
    fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn acceptor_for(
    credential: Arc<CredentialSlot>,
    bundle_pem: &str,
    trust_domain: &str,
) -> Result<TlsAcceptor, ServeError> {
    let tls = |e: String| ServeError::Tls(e);
    let bundle = TrustBundle::from_pem(bundle_pem, trust_domain).map_err(|e| tls(e.to_string()))?;
    let config =
        server_config_for(credential, &bundle, Clients::NodesOrWorkloads, &[b"h2"]).map_err(|e| tls(e.to_string()))?;
    Ok(TlsAcceptor::from(config))
}

/// Issues the serving credential from `ca` (opened from `ca_dir`) and keeps it and the trust
/// bundle current.
pub fn serving(ca: CertificateAuthority, ca_dir: PathBuf) -> Result<Arc<ServingTls>, ServeError> {
    let trust_domain = ca.trust_domain().to_string();
    let slot = CredentialSlot::new(issue(&ca, &trust_domain)?);
    let mut bundle_pem = ca.bundle_pem();
    let acceptor = RwLock::new(acceptor_for(slot.clone(), &bundle_pem, &trust_domain)?);
    let tls = Arc::new(ServingTls { acceptor, trust_domain: trust_domain.clone() });
    let weak = Arc::downgrade(&tls);
    tokio::spawn(async move {
        let mut issued = Instant::now();
        loop {
            tokio::time::sleep(REFRESH_EVERY).await;
            let Some(tls) = weak.upgrade() else { return };
            let (dir, td) = (ca_dir.clone(), trust_domain.clone());
            let opened = tokio::task::spawn_blocking(move || CertificateAuthority::open(&dir, &td)).await;
            let ca = match opened {
                Ok(Ok(ca)) => ca,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "CA directory unreadable; the serving certificate and bundle stay");
                    continue;
                }
                Err(_) => continue,
            };
            let pem = ca.bundle_pem();
            let rotated = pem != bundle_pem;
            if rotated || issued.elapsed() >= SERVING_TTL / 2 {
                match issue(&ca, &trust_domain) {
                    Ok(c) => {
                        slot.set(c);
                        issued = Instant::now();
                    }
                    Err(e) => tracing::error!(error = %e, "serving certificate not renewed; the current one stays"),
                }
            }
            if rotated {
                match acceptor_for(slot.clone(), &pem, &trust_domain) {
                    Ok(a) => {
                        *tls.acceptor.write().unwrap_or_else(|p| p.into_inner()) = a;
                        bundle_pem = pem;
                        tracing::info!("trust bundle changed: node credentials of every listed root accepted");
                    }
                    Err(e) => tracing::error!(error = %e, "new trust bundle unusable; keeping the last"),
                }
            }
        }
    });
    Ok(tls)
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
/// connections of proven nodes and workloads.
pub fn incoming(listener: TcpListener, tls: Arc<ServingTls>) -> mpsc::Receiver<Result<NodeConn, io::Error>> {
    let trust_domain = tls.trust_domain.clone();
    let (tx, rx) = mpsc::channel(16);
    let limit = HandshakeLimit::new(MAX_HANDSHAKES.0, MAX_HANDSHAKES.1);
    tokio::spawn(async move {
        let mut accept = Acceptor::new("control plane", listener);
        loop {
            let (tcp, peer) = accept.accept().await;
            let Ok(permit) = limit.try_admit(peer.ip()) else { continue };
            let (acceptor, tx, trust_domain) = (tls.acceptor(), tx.clone(), trust_domain.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return tracing::info!(%peer, error = %e, "control-plane client refused at TLS"),
                    Err(_) => return tracing::info!(%peer, "control-plane client did not finish its TLS handshake"),
                };
                drop(permit);
                let uri =
                    tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| spiffe_uri_of(c).ok());
                let client = uri.and_then(|uri| match node_of_uri(&uri, &trust_domain) {
                    Some(node) => Some(Client::Node(node.to_string())),
                    None => uri.parse().ok().map(Client::Workload),
                });
                if let Some(client) = client {
                    let _ = tx.send(Ok(NodeConn { tls, client })).await;
                }
            });
        }
    });
    rx
}
