//! The waypoint as a client of `palisade serve` (`--control-plane`): the shared subscriber
//! (`palisade_api::client`) over mutual TLS with the waypoint's own workload certificate, named
//! `waypoint <ns>/<gateway>` (the server admits that name only for the identity the Gateway's
//! workloads run as). Each response is validated and compiled like the files of file mode and
//! put in force, then saved (`<state dir>/control-plane.json`, replaced atomically) and ACKed;
//! anything wrong is NACKed and the last good configuration stays. A waypoint that starts
//! while the control plane is unreachable starts from the saved content.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use palisade_api::client::{Content, Sink};
use palisade_api::v1::SnapshotResponse;
use palisade_mesh::identity::SpiffeId;
use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::policy::{self, L4Policy};

/// The name a waypoint subscribes under, as `palisade get nodes` shows it.
pub fn client_name(waypoint: &str) -> String {
    format!("waypoint {waypoint}")
}

const SAVED_FILE: &str = "control-plane.json";

#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    #[error("{file}: {message}")]
    File { file: PathBuf, message: String },
    #[error("{file}: saved content refused: {source}")]
    Refused {
        file: PathBuf,
        #[source]
        source: policy::PolicyError,
    },
}

/// The content in force, as saved on disk.
#[derive(Serialize, Deserialize)]
struct Saved {
    version: String,
    digest: String,
    /// (kind, namespace, name, YAML).
    documents: Vec<(String, String, String, String)>,
}

pub struct WaypointSink {
    pub content: Content,
    /// `namespace/gateway`.
    pub name: String,
    pub identity: SpiffeId,
    pub engine: Engine,
    pub l4: Arc<L4Policy>,
    /// Where the content in force is saved (none: not saved).
    pub state_dir: Option<PathBuf>,
}

/// Validates and compiles `content` for this waypoint and puts it in force. Blocking work runs
/// off the runtime.
async fn put_in_force(sink: &WaypointSink, content: &Content) -> Result<usize, policy::PolicyError> {
    let documents: Vec<(String, String)> = content
        .documents
        .iter()
        .map(|((kind, ns, name), yaml)| (format!("control-plane:{kind}/{ns}/{name}"), yaml.clone()))
        .collect();
    let (name, identity) = (sink.name.clone(), sink.identity.clone());
    let loaded = tokio::task::spawn_blocking(move || {
        policy::load_documents(documents.iter().map(|(k, y)| (k.clone(), y.as_str())), &name, &identity)
    })
    .await
    .expect("compile task")?;
    let services = loaded.config.services.len();
    sink.engine.update(loaded.config)?;
    sink.l4.replace(loaded.snapshot);
    Ok(services)
}

fn save(dir: &Path, content: &Content) -> Result<(), SavedError> {
    let file = dir.join(SAVED_FILE);
    let failed = |message: String| SavedError::File { file: file.clone(), message };
    let saved = Saved {
        version: content.version.clone(),
        digest: content.digest.clone(),
        documents: content
            .documents
            .iter()
            .map(|((k, ns, n), y)| (k.clone(), ns.clone(), n.clone(), y.clone()))
            .collect(),
    };
    let text = serde_json::to_vec(&saved).map_err(|e| failed(e.to_string()))?;
    std::fs::create_dir_all(dir).map_err(|e| failed(e.to_string()))?;
    let tmp = dir.join(format!(".{SAVED_FILE}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| failed(e.to_string()))?;
    std::fs::rename(&tmp, &file).map_err(|e| failed(e.to_string()))
}

impl WaypointSink {
    /// Puts the saved content in force, if there is one; returns whether it did.
    pub async fn start_from_disk(&mut self) -> Result<bool, SavedError> {
        let Some(dir) = &self.state_dir else { return Ok(false) };
        let file = dir.join(SAVED_FILE);
        let text = match std::fs::read(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(SavedError::File { file, message: e.to_string() }),
        };
        let saved: Saved = serde_json::from_slice(&text)
            .map_err(|e| SavedError::File { file: file.clone(), message: e.to_string() })?;
        let content = Content {
            version: saved.version,
            digest: saved.digest,
            documents: saved.documents.into_iter().map(|(k, ns, n, y)| ((k, ns, n), y)).collect(),
        };
        let services = put_in_force(self, &content).await.map_err(|source| SavedError::Refused { file, source })?;
        tracing::info!(version = %content.version, services, "started from the content saved on disk");
        self.content = content;
        Ok(true)
    }
}

impl Sink for WaypointSink {
    async fn apply(&mut self, response: SnapshotResponse) -> Result<(), String> {
        let next = self.content.next(&response);
        if response.full && next.same_as(&self.content) {
            self.content = next;
            return Ok(());
        }
        let services = put_in_force(self, &next).await.map_err(|e| e.to_string())?;
        tracing::info!(version = %next.version, waypoint = %self.name, services, "configuration from the control plane in force");
        if let Some(dir) = &self.state_dir {
            // In force already: a failed save costs only a start without the control plane.
            if let Err(e) = save(dir, &next) {
                tracing::warn!(error = %e, "could not save the configuration in force");
            }
        }
        self.content = next;
        Ok(())
    }

    fn version(&self) -> String {
        self.content.version.clone()
    }
}
