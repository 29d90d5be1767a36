//! The subscriber side of the snapshot stream, for every client of `palisade serve` (ztunnels,
//! waypoints): mutual TLS with the client's credential, verifying the server's identity
//! against a trust bundle that follows root rotations; one stream, every response handed to a
//! [`Sink`] that puts it in force and answered with an ACK (the version now in force) or a
//! NACK (the reason; the previous content stays); reconnection with jittered exponential
//! backoff, cycling through every address (replicas). [`Content`] keeps the documents in
//! force across full responses and deltas.
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use palisade_mesh::identity::SpiffeId;
use palisade_mesh::tls::{CredentialSlot, TrustBundle, client_config, no_sni};
use tokio::sync::{mpsc, oneshot, watch};

use crate::v1::snapshot_discovery_client::SnapshotDiscoveryClient;
use crate::v1::{ErrorDetail, SnapshotRequest, SnapshotResponse};

pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("control plane {addr}: {message}")]
pub struct StreamError {
    pub addr: SocketAddr,
    pub message: String,
}

/// What a subscriber does with the responses.
pub trait Sink: Send {
    /// Puts `response` in force; an error is a NACK and must leave the previous content in force.
    fn apply(&mut self, response: SnapshotResponse) -> impl Future<Output = Result<(), String>> + Send;
    /// The version in force (empty: nothing from the control plane yet).
    fn version(&self) -> String;
}

pub struct Subscriber {
    /// `palisade serve` replicas, tried in turn.
    pub addrs: Vec<SocketAddr>,
    /// How the client names itself: its node's name, or `waypoint <ns>/<name>`; the server
    /// checks it against the certificate.
    pub name: String,
    pub credential: Arc<CredentialSlot>,
    /// Kept current by the client's certificate manager (root rotations).
    pub bundle: watch::Receiver<TrustBundle>,
    /// The server's identity (`…/ns/palisade-system/sa/palisade-server`).
    pub server: SpiffeId,
}

impl Subscriber {
    /// Follows the control plane forever. `first` is told once a response is in force (or at
    /// once when the sink already runs a version).
    pub async fn run<S: Sink>(self, mut sink: S, first: oneshot::Sender<()>) {
        let mut first = Some(first);
        let mut backoff = BACKOFF_MIN;
        for attempt in 0usize.. {
            let addr = self.addrs[attempt % self.addrs.len()];
            match self.session(addr, &mut sink, &mut first, &mut backoff).await {
                Ok(()) => tracing::warn!(%addr, "control-plane stream closed; reconnecting"),
                Err(e) => tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64,
                    "control plane unreachable; the last content stays in force"),
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One stream to `addr`, until it ends; for tests and tools (`run` reconnects).
    pub async fn once<S: Sink>(&self, addr: SocketAddr, sink: &mut S) -> Result<(), StreamError> {
        self.session(addr, sink, &mut None, &mut BACKOFF_MIN.clone()).await
    }

    async fn session<S: Sink>(
        &self,
        addr: SocketAddr,
        sink: &mut S,
        first: &mut Option<oneshot::Sender<()>>,
        backoff: &mut Duration,
    ) -> Result<(), StreamError> {
        let failed = |message: String| StreamError { addr, message };
        let bundle = self.bundle.borrow().clone();
        let config = client_config(Some(self.credential.clone()), &bundle, Some(self.server.clone()), &[b"h2"])
            .map_err(|e| failed(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(config);
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let tls = tls.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let stream = tls.connect(no_sni(), tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        let channel = tonic::transport::Endpoint::from_static("http://control-plane")
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_with_connector(connector)
            .await
            .map_err(|e| failed(format!("{e:?}")))?;
        let mut client = SnapshotDiscoveryClient::new(channel)
            .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(4);
        let hello = SnapshotRequest { node: self.name.clone(), version_info: sink.version(), ..Default::default() };
        tx.send(hello).await.map_err(|e| failed(e.to_string()))?;
        let mut responses = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|e| failed(e.to_string()))?
            .into_inner();
        tracing::info!(%addr, version = %sink.version(), "subscribed to the control plane");
        *backoff = BACKOFF_MIN;
        if !sink.version().is_empty()
            && let Some(first) = first.take()
        {
            let _ = first.send(());
        }
        while let Some(response) = responses.message().await.map_err(|e| failed(e.to_string()))? {
            let mut answer = SnapshotRequest {
                node: self.name.clone(),
                response_nonce: response.nonce.clone(),
                ..Default::default()
            };
            let version = response.version_info.clone();
            match sink.apply(response).await {
                Ok(()) => {
                    if let Some(first) = first.take() {
                        let _ = first.send(());
                    }
                }
                Err(message) => {
                    tracing::error!(%version, error = %message, "content rejected (NACK); the last good one stays in force");
                    answer.error_detail = Some(ErrorDetail { message });
                }
            }
            answer.version_info = sink.version();
            tx.send(answer).await.map_err(|e| failed(e.to_string()))?;
        }
        Ok(())
    }
}

/// A resource's key on the wire: kind, namespace (empty for cluster-scoped), name.
pub type Key = (String, String, String);

/// The documents in force from the control plane, with the version and digest they came under.
#[derive(Clone, Debug, Default)]
pub struct Content {
    pub version: String,
    pub digest: String,
    pub documents: BTreeMap<Key, String>,
}

fn key(k: Option<crate::v1::ResourceKey>) -> Key {
    let k = k.unwrap_or_default();
    (k.kind, k.namespace, k.name)
}

impl Content {
    /// The content `response` leads to from this one (whole, or this one changed by a delta).
    pub fn next(&self, response: &SnapshotResponse) -> Content {
        let mut documents = if response.full { BTreeMap::new() } else { self.documents.clone() };
        for removed in &response.removed {
            documents.remove(&key(Some(removed.clone())));
        }
        for d in &response.documents {
            documents.insert(key(d.key.clone()), d.yaml.clone());
        }
        Content { version: response.version_info.clone(), digest: response.content_digest.clone(), documents }
    }

    /// The same content as this one (a restarted server sending it under a new version).
    pub fn same_as(&self, other: &Content) -> bool {
        !self.digest.is_empty() && self.digest == other.digest
    }
}

/// Between half and all of `d`, so that clients that lost the control plane together do not
/// come back together.
pub fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.subsec_nanos());
    d / 2 + d.mul_f64(f64::from(nanos % 1000) / 2000.0)
}
