//! What the server knows: the store, the payload every node is sent (recomputed when the store
//! moves, kept as the last good one when the store's content is invalid), and each node's
//! status (the version it ACKed, its last NACK).
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use palisade_model::compile::{Identities, identity_labels_of};
use palisade_model::validate;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::store::{Listing, Revision, Store};

/// What is pushed to every node: the whole resource set, validated (see ARCHITECTURE.md,
/// "Control plane", for why the nodes compile it themselves).
#[derive(Debug)]
pub struct Payload {
    /// The store revision it was computed at, as text (opaque to the nodes).
    pub version: String,
    pub revision: Revision,
    pub resources_yaml: String,
    /// The number of every workload identity of the resources, from the store (so numbers
    /// stay put across recompiles and restarts, and replicas push the same ones).
    pub identities: Identities,
    /// SHA-256 of `resources_yaml` and `identities`, hex.
    pub digest: String,
}

/// One node as the server sees it (`palisade get nodes`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeStatus {
    pub node: String,
    /// A stream from the node is open now.
    pub connected: bool,
    /// The version the node has in force (ACKed: its maps are switched to it).
    pub version: Option<String>,
    /// When the node ACKed it (milliseconds since the epoch).
    pub acked_at_ms: Option<u64>,
    /// The last version sent to the node.
    pub sent_version: Option<String>,
    pub last_nack: Option<Nack>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Nack {
    pub version: String,
    pub reason: String,
    pub at_ms: u64,
}

/// One stream of a node (see [`Control::open_session`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session(u64);

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub struct Control {
    pub store: Arc<dyn Store>,
    payload: watch::Sender<Option<Arc<Payload>>>,
    nodes: Mutex<BTreeMap<String, (Session, NodeStatus)>>,
    next_session: std::sync::atomic::AtomicU64,
    /// Why the store's current content is not pushed (invalid), if it is not.
    store_error: Mutex<Option<String>>,
}

impl Control {
    pub fn new(store: Arc<dyn Store>) -> Arc<Control> {
        let (payload, _) = watch::channel(None);
        Arc::new(Control {
            store,
            payload,
            nodes: Mutex::default(),
            next_session: Default::default(),
            store_error: Mutex::default(),
        })
    }

    pub fn payload(&self) -> watch::Receiver<Option<Arc<Payload>>> {
        self.payload.subscribe()
    }

    pub fn store_error(&self) -> Option<String> {
        self.store_error.lock().expect("store error lock").clone()
    }

    /// Follows the store forever: every new revision is listed, validated and, if valid,
    /// becomes the payload. An invalid content is logged and reported; the last good payload
    /// stays.
    pub async fn follow_store(self: Arc<Self>) {
        let mut revisions = self.store.watch();
        loop {
            let seen = *revisions.borrow_and_update();
            match self.store.list().await {
                Ok(listing) => self.take(listing).await,
                Err(e) => self.refuse(seen, e.to_string()),
            }
            if revisions.changed().await.is_err() {
                return;
            }
        }
    }

    fn refuse(&self, revision: Revision, error: String) {
        tracing::error!(revision, error = %error, "store content not pushed; nodes keep the last good snapshot");
        *self.store_error.lock().expect("store error lock") = Some(format!("revision {revision}: {error}"));
    }

    async fn take(&self, listing: Listing) {
        if self.payload.borrow().as_ref().is_some_and(|p| p.revision >= listing.revision) {
            return;
        }
        if let Err(invalid) = validate::validate(&listing.resources) {
            return self.refuse(listing.revision, invalid.to_string());
        }
        let wanted: Vec<_> = identity_labels_of(&listing.resources).into_iter().collect();
        let identities = match self.store.number_identities(&wanted).await {
            Ok(ids) => ids,
            Err(e) => return self.refuse(listing.revision, format!("cannot number identities: {e}")),
        };
        let payload = match render(&listing, identities) {
            Ok(p) => p,
            Err(e) => return self.refuse(listing.revision, e),
        };
        *self.store_error.lock().expect("store error lock") = None;
        tracing::info!(version = %payload.version, resources = listing.resources.len(), "new snapshot for the nodes");
        self.payload.send_replace(Some(Arc::new(payload)));
    }

    pub fn nodes(&self) -> Vec<NodeStatus> {
        self.nodes.lock().expect("nodes lock").values().map(|(_, s)| s.clone()).collect()
    }

    /// A new stream from `node`: it supersedes any earlier one (an upgraded ztunnel's
    /// predecessor may keep its stream while it drains; only the newest speaks for the node).
    pub fn open_session(&self, node: &str) -> Session {
        let session = Session(self.next_session.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
        let mut nodes = self.nodes.lock().expect("nodes lock");
        let fresh = || (session, NodeStatus { node: node.into(), ..Default::default() });
        let entry = nodes.entry(node.to_string()).or_insert_with(fresh);
        entry.0 = session;
        entry.1.connected = true;
        session
    }

    /// Changes the node's status if `session` is still its newest stream.
    pub fn update_node(&self, node: &str, session: Session, change: impl FnOnce(&mut NodeStatus)) {
        let mut nodes = self.nodes.lock().expect("nodes lock");
        if let Some((current, status)) = nodes.get_mut(node)
            && *current == session
        {
            change(status);
        }
    }
}

/// The resources as one multi-document YAML text, in the store's order.
fn render(listing: &Listing, identities: Identities) -> Result<Payload, String> {
    let mut yaml = String::new();
    for located in &listing.resources {
        let doc = serde_yaml::to_string(&located.resource)
            .map_err(|e| format!("{}: cannot serialise: {e}", located.origin))?;
        yaml.push_str("---\n");
        yaml.push_str(&doc);
    }
    let numbers = serde_json::to_vec(&identities).map_err(|e| format!("cannot serialise identities: {e}"))?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(yaml.as_bytes());
    // Numbers move nothing in the YAML, but they are content: a node must recompile for them.
    context.update(b"\n# identities\n");
    context.update(&numbers);
    let digest = context.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok(Payload {
        version: listing.revision.to_string(),
        revision: listing.revision,
        resources_yaml: yaml,
        identities,
        digest,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::dir::DirStore;

    const NS: &str = "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: a}\n";

    #[tokio::test]
    async fn an_invalid_store_content_is_reported_and_the_last_good_payload_stays() {
        let dir = std::env::temp_dir().join(format!("palisade-control-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let _cleanup = RemoveOnDrop(dir.clone());
        std::fs::write(dir.join("a.yaml"), NS).unwrap();
        let control = Control::new(Arc::new(DirStore::open(&dir, Duration::from_millis(20)).unwrap()));
        tokio::spawn(control.clone().follow_store());
        let mut payloads = control.payload();
        let first = payloads.wait_for(Option::is_some).await.unwrap().clone().unwrap();
        assert!(first.resources_yaml.contains("name: a"), "{}", first.resources_yaml);

        // A bad `git pull`: a name that is not a DNS label.
        std::fs::write(dir.join("b.yaml"), NS.replace("name: a", "name: Not_Valid")).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while control.store_error().is_none() {
            assert!(tokio::time::Instant::now() < deadline, "the invalid content was not reported");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let error = control.store_error().unwrap();
        assert!(error.contains("b.yaml:1") && error.contains("Not_Valid"), "{error}");
        assert_eq!(control.payload().borrow().as_ref().unwrap().version, first.version, "the last good payload stays");

        // Fixed: pushed again, with a newer version.
        std::fs::write(dir.join("b.yaml"), NS.replace("name: a", "name: b")).unwrap();
        let next =
            payloads.wait_for(|p| p.as_ref().is_some_and(|p| p.revision > first.revision)).await.unwrap().clone();
        assert!(next.unwrap().resources_yaml.contains("name: b"));
        assert!(control.store_error().is_none());
    }

    /// Removes the directory also when the test fails.
    struct RemoveOnDrop(std::path::PathBuf);

    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
