//! The control-plane client: subscribes to `palisade serve` over mutual TLS with the node
//! credential (the stream itself is `palisade_api::client`, shared with the waypoint), puts
//! every snapshot it receives in force, and ACKs it once the kernel maps are switched — or
//! NACKs it with the reason, keeping the last good one in force.
//!
//! The control plane being down changes nothing on the node: the last snapshot stays in force,
//! the client reconnects with jittered exponential backoff (cycling through every
//! `--control-plane` address, so a second replica takes over) and resyncs on return. The last
//! good snapshot is kept in `<state dir>/snapshot.json`, and a ztunnel that starts while the
//! control plane is unreachable starts from it.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use palisade_api::client::{Sink, Subscriber};
use palisade_api::v1::SnapshotResponse;
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::tls::{Credential, CredentialSlot, TrustBundle, client_config};
use palisade_model::compile::{Identities, IdentitiesError};
use palisade_model::key::ResourceKey;
use tokio::sync::watch;

use crate::policy_source::PolicySource;
use crate::pushed::ResourceDelta;

mod saved;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("node credential in {dir}: {message}")]
    Credential { dir: PathBuf, message: String },
}

/// The content in force from the control plane: the documents by key, the identity numbers,
/// and the version and digest the server gave them.
#[derive(Clone, Debug, Default)]
pub struct Current {
    pub version: String,
    pub digest: String,
    pub documents: BTreeMap<ResourceKey, String>,
    /// Shared with the compiler: 10,000 identities are not copied per change.
    pub identities: Arc<Identities>,
}

pub struct ConfigClient {
    addrs: Vec<SocketAddr>,
    node: String,
    credential: Arc<CredentialSlot>,
    /// The trust bundle, kept current by the certificate manager when there is one.
    bundle: watch::Receiver<TrustBundle>,
    server: SpiffeId,
    state_dir: PathBuf,
    /// What is in force (empty version: nothing from the control plane yet).
    current: Current,
    policy: PolicySource,
    /// Set once this process handed the node over to a successor (upgrade): it keeps following
    /// the control plane, so the connections it still carries are re-checked against new
    /// policies, but it no longer writes the state directory's files, which are the
    /// successor's now (the successor's stream is the one the server listens to).
    handed_over: Arc<AtomicBool>,
}

impl ConfigClient {
    pub fn new(
        addrs: Vec<SocketAddr>,
        node: String,
        credential_dir: &Path,
        trust_domain: &str,
        state_dir: PathBuf,
        policy: PolicySource,
    ) -> Result<Self, ClientError> {
        let bad = |message: String| ClientError::Credential { dir: credential_dir.to_path_buf(), message };
        let read =
            |name: &str| std::fs::read_to_string(credential_dir.join(name)).map_err(|e| bad(format!("{name}: {e}")));
        let credential =
            Credential::from_pem(&read("node.pem")?, &read("node-key.pem")?).map_err(|e| bad(e.to_string()))?;
        let bundle = TrustBundle::from_pem(&read("bundle.pem")?, trust_domain).map_err(|e| bad(e.to_string()))?;
        let server = SpiffeId::new(
            trust_domain,
            palisade_mesh::ca_api::CONTROL_PLANE_NAMESPACE,
            palisade_api::SERVER_SERVICE_ACCOUNT,
        );
        // Checked now, so a bad bundle fails start-up rather than every connection.
        client_config(None, &bundle, Some(server.clone()), &[b"h2"]).map_err(|e| bad(e.to_string()))?;
        let (_, bundle) = watch::channel(bundle);
        Ok(ConfigClient {
            addrs,
            node,
            credential: CredentialSlot::new(credential),
            bundle,
            server,
            state_dir,
            current: Current::default(),
            policy,
            handed_over: Arc::default(),
        })
    }

    fn saved(&self) -> saved::SavedFiles {
        saved::SavedFiles::new(&self.state_dir)
    }

    /// Puts the content saved on disk in force, if there is one (start-up while the control
    /// plane is unreachable). Returns whether it did.
    pub async fn start_from_disk(&mut self) -> anyhow::Result<bool> {
        let Some(saved) = self.saved().load()? else { return Ok(false) };
        let delta = ResourceDelta::parse(true, saved.documents.iter().map(|(k, y)| (k.clone(), y.as_str())), vec![])
            .map_err(|e| anyhow::anyhow!("saved snapshot: {e}"))?;
        let stats = self.policy.put_delta_in_force(delta, saved.identities.clone()).await?;
        tracing::info!(version = %saved.version, generation = stats.generation, "started from the snapshot saved on disk");
        self.current = saved;
        Ok(true)
    }

    /// Puts one response in force: journals it (unless handed over), compiles, switches the
    /// maps. On error nothing changed (the journal entry is taken back).
    async fn take(&mut self, response: SnapshotResponse) -> anyhow::Result<()> {
        let documents: Vec<(ResourceKey, String)> =
            response.documents.into_iter().map(|d| (key_from_wire(d.key.unwrap_or_default()), d.yaml)).collect();
        let removed: Vec<ResourceKey> = response.removed.into_iter().map(key_from_wire).collect();
        let wire = identities_from_wire(response.identities).map_err(|e| anyhow::anyhow!("identity numbers: {e}"))?;
        let identities = match (response.full, wire.is_empty()) {
            (true, _) => Arc::new(wire.clone()),
            // A delta carries the numbers this stream has not carried before (most carry none).
            (false, true) => self.current.identities.clone(),
            (false, false) => {
                let all = self.current.identities.iter().chain(wire.iter()).map(|(l, n)| (l.clone(), n));
                Arc::new(Identities::new(all).map_err(|e| anyhow::anyhow!("identity numbers: {e}"))?)
            }
        };
        let (version, digest) = (response.version_info, response.content_digest);
        // The same content under a new version (a restarted server): nothing to rewrite.
        if response.full && !digest.is_empty() && digest == self.current.digest {
            self.current.version = version;
            return Ok(());
        }
        let delta = ResourceDelta::parse(
            response.full,
            documents.iter().map(|(k, y)| (k.clone(), y.as_str())),
            removed.clone(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let writes = !self.handed_over.load(Ordering::Relaxed);
        let journal = match (writes, response.full) {
            (false, _) => None,
            (true, true) => {
                let whole = Current {
                    version: version.clone(),
                    digest: digest.clone(),
                    documents: documents.iter().cloned().collect(),
                    identities: identities.clone(),
                };
                self.saved().save_whole(&whole)?;
                None
            }
            (true, false) => Some(self.saved().append((&version, &digest), &documents, &removed, &wire)?),
        };
        let stats = match self.policy.put_delta_in_force(delta, identities.clone()).await {
            Ok(stats) => stats,
            Err(e) => {
                if let Some(entry) = journal {
                    self.saved().take_back(entry);
                }
                return Err(e);
            }
        };
        tracing::info!(%version, generation = stats.generation, cells = stats.cells,
            compile_ms = stats.compile_ms, apply_ms = stats.elapsed_ms, "snapshot from the control plane in force");
        // In force: the documents change in place (a copy of 20,000 of them per change costs).
        if response.full {
            self.current.documents.clear();
        }
        for key in &removed {
            self.current.documents.remove(key);
        }
        self.current.documents.extend(documents);
        (self.current.version, self.current.digest, self.current.identities) = (version, digest, identities);
        Ok(())
    }

    fn subscriber(&self) -> Subscriber {
        Subscriber {
            addrs: self.addrs.clone(),
            name: self.node.clone(),
            credential: self.credential.clone(),
            bundle: self.bundle.clone(),
            server: self.server.clone(),
        }
    }
}

impl Sink for ConfigClient {
    async fn apply(&mut self, response: SnapshotResponse) -> Result<(), String> {
        self.take(response).await.map_err(|e| format!("{e:#}"))?;
        // Folding the journal into the whole file happens once it outgrows it, and off the
        // ACK's path (the copy of the documents is the only cost here).
        if !self.handed_over.load(Ordering::Relaxed) && self.saved().should_fold() {
            self.saved().fold(self.current.clone());
        }
        Ok(())
    }

    fn version(&self) -> String {
        self.current.version.clone()
    }
}

/// Starts following the control plane: from the snapshot on disk if there is one (then at
/// once), otherwise once the first snapshot from the control plane is in force — a node never
/// serves without a policy.
pub async fn start(
    config: &crate::config::Config,
    policy: PolicySource,
    handed_over: Arc<AtomicBool>,
    bundle: Option<watch::Receiver<TrustBundle>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut client = ConfigClient::new(
        config.control_plane.clone(),
        config.node.clone(),
        &config.node_credential_dir,
        &config.trust_domain,
        config.state_dir.clone(),
        policy,
    )?;
    client.handed_over = handed_over;
    if let Some(bundle) = bundle {
        client.bundle = bundle;
    }
    let from_disk = match client.start_from_disk().await {
        Ok(done) => done,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "saved snapshot unusable; waiting for the control plane");
            false
        }
    };
    let (first, in_force) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(client.subscriber().run(client, first));
    if !from_disk {
        tracing::info!(control_plane = ?config.control_plane, "waiting for the first snapshot");
        let _ = in_force.await;
    }
    Ok(task)
}

/// The wire's numbers, checked (each number given once, in the workload range): a bad table
/// is NACKed rather than compiled.
fn identities_from_wire(wire: Vec<palisade_api::v1::NumberedIdentity>) -> Result<Identities, IdentitiesError> {
    Identities::new(wire.into_iter().map(|w| {
        let labels = palisade_model::compile::IdentityLabels {
            namespace: w.namespace,
            service_account: w.service_account,
            labels: w.labels,
        };
        (labels, w.id)
    }))
}

fn key_from_wire(k: palisade_api::v1::ResourceKey) -> ResourceKey {
    ResourceKey { kind: k.kind, namespace: (!k.namespace.is_empty()).then_some(k.namespace), name: k.name }
}
