//! What the server knows: the resources in force (validated), the payload every node is sent
//! (recomputed when the store moves, kept as the last good one when the store's content is
//! invalid), and each node's status (the version it ACKed, its last NACK).
//!
//! Two ways content changes. A change made through this server ([`Control::change`], what
//! `palisade apply`/`delete` call) is validated against the resources in force, written to the
//! store and put in force at once from what was validated: no re-listing, no second
//! validation, one document rendered per changed resource. A change made behind its back (a
//! `git pull` into the directory, another replica writing to etcd) is noticed through the
//! store's watch and taken whole ([`Control::follow_store`]).
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use palisade_model::compile::identity_labels_of;
use palisade_model::key::ResourceKey;
use palisade_model::load::Located;
use palisade_model::resource::Resource;
use palisade_model::validate;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use crate::payload::Payload;
use crate::payload::documents;
use crate::store::{Change, Listing, Revision, Store, StoreError};

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

/// The resources in force: what the payload was computed from.
#[derive(Default)]
struct Content {
    revision: Revision,
    resources: Vec<Located>,
}

/// Why a [`Control::change`] changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// Every problem of the batch (with the resources it would join), each with file:line.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Payload(String),
}

/// Attempts of a change whose store moved under it (another writer) before it gives up.
const CONFLICT_RETRIES: usize = 5;

pub struct Control {
    pub store: Arc<dyn Store>,
    payload: watch::Sender<Option<Arc<Payload>>>,
    /// Held for a whole change or take-over, so they are ordered.
    content: tokio::sync::Mutex<Content>,
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
            content: tokio::sync::Mutex::default(),
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

    /// Follows the store forever: every revision it did not write itself is listed,
    /// validated and, if valid, put in force. An invalid content is logged and reported; the
    /// last good payload stays.
    pub async fn follow_store(self: Arc<Self>) {
        let mut revisions = self.store.watch();
        loop {
            let seen = *revisions.borrow_and_update();
            let mut content = self.content.lock().await;
            if self.payload.borrow().is_none() || seen > content.revision {
                match self.store.list().await {
                    Ok(listing) => self.take(&mut content, listing).await,
                    Err(e) => self.refuse(seen, e.to_string()),
                }
            }
            drop(content);
            if revisions.changed().await.is_err() {
                return;
            }
        }
    }

    fn refuse(&self, revision: Revision, error: String) {
        tracing::error!(revision, error = %error, "store content not pushed; nodes keep the last good snapshot");
        *self.store_error.lock().expect("store error lock") = Some(format!("revision {revision}: {error}"));
    }

    /// Takes a whole listing (a change made behind this server's back).
    async fn take(&self, content: &mut Content, listing: Listing) {
        if self.payload.borrow().as_ref().is_some_and(|p| p.revision >= listing.revision) {
            return;
        }
        if let Err(invalid) = validate::validate(&listing.resources) {
            return self.refuse(listing.revision, invalid.to_string());
        }
        let wanted: Vec<_> = identity_labels_of(&listing.resources).into_iter().collect();
        let numbered = match self.store.number_identities(&wanted).await {
            Ok(ids) => ids,
            Err(e) => return self.refuse(listing.revision, format!("cannot number identities: {e}")),
        };
        let previous = self.payload.borrow().clone();
        let identities = match previous.as_ref().filter(|p| *p.identities == numbered) {
            Some(p) => p.identities.clone(),
            None => Arc::new(numbered),
        };
        let payload = documents(&listing.resources, previous.as_ref().map(|p| &*p.documents))
            .and_then(|docs| Payload::new(listing.revision, Arc::new(docs), identities, previous.as_deref()));
        match payload {
            Ok(payload) => {
                *content = Content { revision: listing.revision, resources: listing.resources };
                self.publish(payload);
            }
            Err(e) => self.refuse(listing.revision, e),
        }
    }

    fn publish(&self, payload: Payload) {
        *self.store_error.lock().expect("store error lock") = None;
        tracing::info!(version = %payload.version, resources = payload.documents.len(), "new snapshot for the nodes");
        self.payload.send_replace(Some(Arc::new(payload)));
    }

    /// Applies `batch` (or deletes its resources): validates the result against every
    /// resource in force, writes it to the store as one atomic change and puts it in force.
    /// An invalid batch or a failed write changes nothing. Returns the new revision.
    pub async fn change(&self, batch: Vec<Located>, delete: bool) -> Result<Revision, ChangeError> {
        let keys: HashSet<ResourceKey> = batch.iter().map(|l| ResourceKey::of(&l.resource)).collect();
        let mut content = self.content.lock().await;
        for attempt in 1.. {
            if self.payload.borrow().is_none() || *self.store.watch().borrow() > content.revision {
                // The store moved and the follower has not taken it yet (or nothing is in
                // force): validate against what the store holds now.
                let listing = self.store.list().await?;
                *content = Content { revision: listing.revision, resources: listing.resources };
            }
            // The batch joins the resources in place (no copy of a large set); undone on failure.
            // A key is built only for a resource whose name is one of the batch's.
            let names: HashSet<&str> = keys.iter().map(|k| k.name.as_str()).collect();
            let replaced_by_batch = |l: &Located| {
                names.contains(l.resource.metadata().name.as_str()) && keys.contains(&ResourceKey::of(&l.resource))
            };
            let replaced: Vec<Located> = content.resources.extract_if(.., |l| replaced_by_batch(l)).collect();
            let joined = content.resources.len();
            if !delete {
                content.resources.extend(batch.iter().cloned());
            }
            let undo = |content: &mut Content, replaced: Vec<Located>| {
                content.resources.truncate(joined);
                content.resources.extend(replaced);
            };
            if let Err(validate::Invalid(problems)) = validate::validate(&content.resources) {
                undo(&mut content, replaced);
                return Err(ChangeError::Invalid(problems.iter().map(ToString::to_string).collect()));
            }
            let changes = batch
                .iter()
                .map(|l| match delete {
                    true => Change::Delete(ResourceKey::of(&l.resource)),
                    false => Change::Put(l.resource.clone()),
                })
                .collect();
            let revision = match self.store.apply(content.revision, changes).await {
                Ok(revision) => revision,
                Err(StoreError::Conflict { .. }) if attempt < CONFLICT_RETRIES => {
                    undo(&mut content, replaced);
                    // Another writer: list again.
                    content.revision = 0;
                    continue;
                }
                Err(e) => {
                    undo(&mut content, replaced);
                    return Err(e.into());
                }
            };
            content.revision = revision;
            // Written: from here on the store holds the change, so it is put in force even if
            // building the payload fails (then the follower retries from a listing).
            if let Err(e) = self.put_changed(&content, &batch, delete).await {
                self.refuse(revision, e);
                content.revision = 0;
            }
            return Ok(revision);
        }
        unreachable!("the loop returns")
    }

    /// The payload after a change of this server's own: the previous documents with the
    /// batch's resources rendered; numbers asked of the store only for identities it has
    /// not numbered yet.
    async fn put_changed(&self, content: &Content, batch: &[Located], delete: bool) -> Result<(), String> {
        let Some(previous) = self.payload.borrow().clone() else { return Err("nothing in force".into()) };
        let (changed, removed): (Vec<&Resource>, Vec<ResourceKey>) = match delete {
            true => (vec![], batch.iter().map(|l| ResourceKey::of(&l.resource)).collect()),
            false => (batch.iter().map(|l| &l.resource).collect(), vec![]),
        };
        let new_identity = identity_labels_of(batch).iter().any(|l| previous.identities.get(l).is_none());
        let identities = match !delete && new_identity {
            true => {
                let wanted: Vec<_> = identity_labels_of(&content.resources).into_iter().collect();
                let numbered = self.store.number_identities(&wanted).await.map_err(|e| e.to_string())?;
                Arc::new(numbered)
            }
            false => previous.identities.clone(),
        };
        self.publish(Payload::changed(&previous, content.revision, &changed, &removed, identities)?);
        Ok(())
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
        assert!(first.documents.values().any(|d| d.yaml.contains("name: a")));

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
        assert!(next.unwrap().documents.values().any(|d| d.yaml.contains("name: b")));
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
