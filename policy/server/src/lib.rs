//! `palisade serve`: the policy control plane. Resources live in a [`store::Store`] (a
//! directory of YAML, or etcd); the server validates every change as a whole batch before it
//! reaches the store, pushes the resulting snapshot to the ztunnels over mutual TLS
//! ([`push`]), which ACK or NACK each version, and answers the CLI on a local socket
//! ([`admin`]).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub mod admin;
pub mod control;
pub mod payload;
pub mod push;
pub mod store;
pub mod tls;

pub use control::{Control, NodeStatus};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("control-plane TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("{what} {addr}: {source}")]
    Io {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Grpc(String),
}

pub struct ServeConfig {
    /// The push endpoint (ztunnels connect here).
    pub listen: SocketAddr,
    /// The admin socket the CLI uses.
    pub admin_socket: PathBuf,
    /// The CA directory, re-read for renewals and root rotations.
    pub ca_dir: PathBuf,
    /// Also serve the CA here (see [`serve_ca`]); `None`: `palisade ca serve` runs apart.
    pub ca_listen: Option<SocketAddr>,
    /// Lifetime of the workload certificates the CA signs.
    pub workload_ttl: std::time::Duration,
}

/// Serves until the process ends (or a listener fails).
pub async fn serve(
    config: ServeConfig,
    store: Arc<dyn store::Store>,
    ca: palisade_ca::authority::CertificateAuthority,
) -> Result<(), ServeError> {
    let control = Control::new(store);
    tokio::spawn(control.clone().follow_store());
    if let Some(addr) = config.ca_listen {
        let mut authority = palisade_ca::authority::CertificateAuthority::open(&config.ca_dir, ca.trust_domain())
            .map_err(|e| ServeError::Tls(format!("CA: {e}")))?;
        authority.workload_ttl = config.workload_ttl;
        serve_ca(addr, authority, config.ca_dir.clone(), &control).await?;
    }
    let tls = tls::serving(ca, config.ca_dir.clone())?;
    let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(|source| ServeError::Io {
        what: "bind",
        addr: config.listen.to_string(),
        source,
    })?;
    let admin = admin::bind(&config.admin_socket)?;
    tokio::spawn(admin::serve(admin, control.clone()));
    let incoming = tls::incoming(listener, tls);
    tracing::info!(listen = %config.listen, admin = %config.admin_socket.display(), store = %control.store.describe(),
        "control plane serving");
    let service = palisade_api::v1::snapshot_discovery_server::SnapshotDiscoveryServer::new(push::Push { control })
        .max_decoding_message_size(palisade_api::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(palisade_api::MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
        .add_service(service)
        .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(incoming))
        .await
        .map_err(|e| ServeError::Grpc(e.to_string()))
}

/// Serves the CA beside the control plane: its node authorization (which workload may get a
/// certificate on which node) is fed from the resources in force, whatever the store, so a
/// workload applied to etcd gets its certificate as soon as the nodes get its policy.
async fn serve_ca(
    addr: SocketAddr,
    authority: palisade_ca::authority::CertificateAuthority,
    ca_dir: PathBuf,
    control: &Arc<Control>,
) -> Result<(), ServeError> {
    use palisade_ca::server::inventory::{Inventory, Schedule};
    let service = Arc::new(palisade_ca::server::CaService::with_inventory(authority, ca_dir, Inventory::fed()));
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Io {
        what: "bind the CA on",
        addr: addr.to_string(),
        source,
    })?;
    let mut payloads = control.payload();
    let fed = service.clone();
    tokio::spawn(async move {
        loop {
            if let Some(p) = payloads.borrow_and_update().clone() {
                fed.inventory.feed(Schedule::of(p.documents.values().map(|d| &d.resource)));
            }
            if payloads.changed().await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        if let Err(e) = palisade_ca::server::serve(listener, service).await {
            tracing::error!(error = %format!("{e:#}"), "the CA stopped");
        }
    });
    tracing::info!(%addr, "the CA runs beside the control plane");
    Ok(())
}
