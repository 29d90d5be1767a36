//! The waypoint as a client of `palisade serve` (`--control-plane`): the shared subscriber
//! (`palisade_api::client`) over mutual TLS with the waypoint's own workload certificate, named
//! `waypoint <ns>/<gateway>` (the server admits that name only for the identity the Gateway's
//! workloads run as). Each response is validated and compiled like the files of file mode and
//! put in force, then ACKed; anything wrong is NACKed and the last good configuration stays.
use std::sync::Arc;

use palisade_api::client::{Content, Sink};
use palisade_api::v1::SnapshotResponse;
use palisade_mesh::identity::SpiffeId;

use crate::engine::Engine;
use crate::policy::{self, L4Policy};

/// The name a waypoint subscribes under, as `palisade get nodes` shows it.
pub fn client_name(waypoint: &str) -> String {
    format!("waypoint {waypoint}")
}

pub struct WaypointSink {
    pub content: Content,
    /// `namespace/gateway`.
    pub name: String,
    pub identity: SpiffeId,
    pub engine: Engine,
    pub l4: Arc<L4Policy>,
}

impl Sink for WaypointSink {
    async fn apply(&mut self, response: SnapshotResponse) -> Result<(), String> {
        let next = self.content.next(&response);
        if response.full && next.same_as(&self.content) {
            self.content = next;
            return Ok(());
        }
        let documents: Vec<(String, String)> = next
            .documents
            .iter()
            .map(|((kind, ns, name), yaml)| (format!("control-plane:{kind}/{ns}/{name}"), yaml.clone()))
            .collect();
        let (name, identity) = (self.name.clone(), self.identity.clone());
        let loaded = tokio::task::spawn_blocking(move || {
            policy::load_documents(documents.iter().map(|(k, y)| (k.clone(), y.as_str())), &name, &identity)
        })
        .await
        .map_err(|e| format!("compiling: {e}"))?
        .map_err(|e| e.to_string())?;
        let services = loaded.config.services.len();
        self.engine.update(loaded.config).map_err(|e| e.to_string())?;
        self.l4.replace(loaded.snapshot);
        tracing::info!(version = %next.version, waypoint = %self.name, services, "configuration from the control plane in force");
        self.content = next;
        Ok(())
    }

    fn version(&self) -> String {
        self.content.version.clone()
    }
}
