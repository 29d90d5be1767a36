//! The etcd store, for a highly available control plane: several `palisade serve` replicas
//! share one etcd cluster, so any of them can take an `apply` and every one of them serves the
//! same content at the same revision.
//!
//! Layout (every key under `/palisade/`):
//! - `/palisade/resources/<kind>/<namespace>/<name>` (`<kind>/<name>` for cluster-wide kinds)
//!   holds the resource as YAML. Errors in a value name the key and the line, like a file:
//!   `etcd:/palisade/resources/Workload/default/web:3`.
//! - `/palisade/resources/.revision` is put by every batch palisade writes. The store's revision
//!   is the largest modification revision under `/palisade/resources/`: every replica computes
//!   the same number from the same content, and writes elsewhere (identities) do not move it.
//!   A delete leaves no key behind, so the marker is what makes a batch of deletes move the
//!   revision; a delete made by hand (`etcdctl del`) is noticed by the watchers, which put the
//!   marker for it.
//! - `/palisade/identities/…`: numeric identities, see [`identities`].
//!
//! A batch is one etcd transaction: it applies only if no key under `/palisade/resources/` was
//! modified after the expected revision (a range comparison), so two replicas applying at the
//! same time never both win. etcd bounds one transaction (`--max-txn-ops`, 128 operations by
//! default, and `--max-request-bytes`, 1.5 MiB): a larger batch is refused whole with a message
//! that says which limit to raise; the sandbox raises both.
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions};
use palisade_model::load::{self, Located};
use palisade_model::resource::Resource;
use tokio::sync::watch;

use super::{Change, Listing, ResourceKey, Revision, Store, StoreError};

pub mod identities;

/// Every resource lives under this prefix.
pub const RESOURCES: &str = "/palisade/resources/";
/// Put by every batch, so that deletes move the revision too.
pub const MARKER: &str = "/palisade/resources/.revision";
/// One request (not a watch) may take this long before it fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A watch that breaks is opened again after a pause growing to this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Resources in etcd. Cloning the client is cheap (one shared HTTP/2 channel).
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
    /// Shared with the watch task; both publish the newest revision they know.
    publish: Arc<watch::Sender<Revision>>,
    watcher: tokio::task::JoinHandle<()>,
}

/// `etcd://host:port[,host:port…]` (also `http://…`) → client URLs.
pub fn parse_url(url: &str) -> Result<Vec<String>, StoreError> {
    let bad = |message: String| StoreError::Backend { store: url.to_string(), message };
    let rest = url
        .strip_prefix("etcd://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| bad("expected etcd://host:port[,host:port…] (TLS to etcd is not supported yet)".into()))?
        .trim_end_matches('/');
    let endpoints: Vec<String> = rest.split(',').filter(|e| !e.is_empty()).map(|e| format!("http://{e}")).collect();
    if endpoints.is_empty() || rest.contains(['/', '@', '?']) {
        return Err(bad("expected etcd://host:port[,host:port…]".into()));
    }
    Ok(endpoints)
}

impl EtcdStore {
    /// Connects to the etcd cluster at `url` ([`parse_url`]), reads the current revision
    /// (so an unreachable etcd is an error here, not later) and starts watching.
    pub async fn open(url: &str) -> Result<EtcdStore, StoreError> {
        let endpoints = parse_url(url)?;
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(REQUEST_TIMEOUT)
            // A dead member is noticed within seconds, also by a watch that carries nothing.
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(|e| backend(&endpoints, format!("cannot connect: {e}")))?;
        let revision = current_revision(&client).await.map_err(|e| backend(&endpoints, e.to_string()))?;
        let publish = Arc::new(watch::Sender::new(revision));
        let watcher = tokio::spawn(watch_loop(client.clone(), endpoints.clone(), publish.clone()));
        Ok(EtcdStore { client, endpoints, publish, watcher })
    }

    pub(crate) fn backend(&self, message: impl Into<String>) -> StoreError {
        backend(&self.endpoints, message.into())
    }

    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

fn backend(endpoints: &[String], message: String) -> StoreError {
    StoreError::Backend { store: format!("etcd:{}", endpoints.join(",")), message }
}

/// The key of a resource. Names are DNS labels (validated before they get here); checked
/// again so that no name can reach another key.
pub fn resource_key(key: &ResourceKey) -> Result<String, String> {
    let segment = |what: &str, s: &str| {
        if s.is_empty() || s.starts_with('.') || s.contains(['/', '\0']) {
            Err(format!("{key}: {what} {s:?} cannot be part of an etcd key"))
        } else {
            Ok(())
        }
    };
    segment("kind", &key.kind)?;
    segment("name", &key.name)?;
    match &key.namespace {
        Some(ns) => {
            segment("namespace", ns)?;
            Ok(format!("{RESOURCES}{}/{ns}/{}", key.kind, key.name))
        }
        None => Ok(format!("{RESOURCES}{}/{}", key.kind, key.name)),
    }
}

/// The resource as YAML, checked to read back as the same resource (a serialisation the
/// loader does not accept is refused now, not discovered by every replica's next list).
fn to_yaml(path: &str, resource: &Resource) -> Result<String, String> {
    let text = serde_yaml::to_string(resource).map_err(|e| format!("etcd:{path}: cannot serialise: {e}"))?;
    let back =
        load::parse_str(Path::new(&format!("etcd:{path}")), &text).map_err(|e| format!("does not read back: {e}"))?;
    match back.as_slice() {
        [one] if &one.resource == resource => Ok(text),
        _ => Err(format!("etcd:{path}: does not read back as written")),
    }
}

/// Reads one value: exactly one resource, the one its key names.
fn parse_value(path: &str, text: &str) -> Result<Located, String> {
    let mut docs = load::parse_str(Path::new(&format!("etcd:{path}")), text).map_err(|e| e.to_string())?;
    if docs.len() != 1 {
        return Err(format!("etcd:{path}: holds {} resources; a key holds exactly one", docs.len()));
    }
    let located = docs.remove(0);
    let expected = resource_key(&ResourceKey::of(&located.resource))?;
    if expected != path {
        return Err(format!(
            "{}: holds {}, which belongs at {expected}",
            located.origin,
            ResourceKey::of(&located.resource)
        ));
    }
    Ok(located)
}

/// The largest modification revision under [`RESOURCES`] (0 for an empty store).
async fn current_revision(client: &Client) -> Result<Revision, etcd_client::Error> {
    let options = GetOptions::new().with_prefix().with_keys_only();
    let response = client.clone().get(RESOURCES, Some(options)).await?;
    Ok(response.kvs().iter().map(|kv| kv.mod_revision().max(0) as Revision).max().unwrap_or(0))
}

/// Publishes a revision unless a newer one was published already.
fn publish_at_least(publish: &watch::Sender<Revision>, revision: Revision) {
    publish.send_if_modified(|current| {
        let newer = revision > *current;
        if newer {
            *current = revision;
        }
        newer
    });
}

/// Watches [`RESOURCES`] until the store is dropped, opening the watch again (from the
/// revision it had reached) whenever it breaks, with a growing pause.
async fn watch_loop(client: Client, endpoints: Vec<String>, publish: Arc<watch::Sender<Revision>>) {
    let mut pause = Duration::from_millis(100);
    let mut last_error: Option<String> = None;
    loop {
        match watch_once(&client, &publish).await {
            Ok(()) => tracing::info!(store = %endpoints.join(","), "etcd watch ended; watching again"),
            Err(e) => {
                let message = e.to_string();
                if last_error.as_deref() != Some(&message) {
                    tracing::warn!(store = %endpoints.join(","), error = %message, "etcd watch failed; retrying");
                    last_error = Some(message);
                }
            }
        }
        // Spread the replicas' retries so they do not hit a recovering etcd together.
        let jitter = Duration::from_millis(u64::from(std::process::id() % 100));
        tokio::time::sleep(pause + jitter).await;
        pause = (pause * 2).min(MAX_BACKOFF);
    }
}

async fn watch_once(client: &Client, publish: &watch::Sender<Revision>) -> Result<(), etcd_client::Error> {
    let mut client = client.clone();
    // Re-read first: changes may have been missed while the watch was down, and the history
    // the watch would resume from may have been compacted.
    let start = current_revision(&client).await?;
    publish_at_least(publish, start);
    let options = WatchOptions::new().with_prefix().with_start_revision(start as i64 + 1);
    let mut stream = client.watch(RESOURCES, Some(options)).await?;
    while let Some(response) = stream.message().await? {
        if response.canceled() {
            return Err(etcd_client::Error::WatchError(format!(
                "cancelled by etcd: {} (compacted at {})",
                response.cancel_reason(),
                response.compact_revision()
            )));
        }
        // One response may carry the events of several revisions (a watch catching up).
        let mut newest = 0;
        let mut last_marker = 0;
        let mut last_delete = 0;
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let revision = kv.mod_revision().max(0) as Revision;
            newest = newest.max(revision);
            match event.event_type() {
                EventType::Put if kv.key() == MARKER.as_bytes() => last_marker = last_marker.max(revision),
                EventType::Delete => last_delete = last_delete.max(revision),
                EventType::Put => {}
            }
        }
        publish_at_least(publish, newest);
        // A delete made behind palisade's back (no marker put with it or after it): put the
        // marker so the revision every replica computes from the content moves past it (its
        // own event comes back through here).
        if last_delete > last_marker {
            client.put(MARKER, "deleted by hand", None).await?;
        }
    }
    Ok(())
}

#[async_trait]
impl Store for EtcdStore {
    async fn number_identities(
        &self,
        wanted: &[palisade_model::compile::IdentityLabels],
    ) -> Result<palisade_model::compile::Identities, StoreError> {
        // The inherent method: numbers taken in etcd transactions (see [`identities`]).
        let numbers = EtcdStore::assign_identities(self, wanted).await?;
        palisade_model::compile::Identities::new(numbers)
            .map_err(|e| self.backend(format!("{}: inconsistent: {e}", identities::IDENTITIES)))
    }

    async fn list(&self) -> Result<Listing, StoreError> {
        let response = self
            .client()
            .get(RESOURCES, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.backend(format!("cannot list {RESOURCES}: {e}")))?;
        let mut revision = 0;
        let mut resources = Vec::with_capacity(response.kvs().len());
        let mut problems = Vec::new();
        for kv in response.kvs() {
            revision = revision.max(kv.mod_revision().max(0) as Revision);
            let path = String::from_utf8_lossy(kv.key());
            if path == MARKER {
                continue;
            }
            let parsed = std::str::from_utf8(kv.value())
                .map_err(|e| format!("etcd:{path}: not UTF-8: {e}"))
                .and_then(|text| parse_value(&path, text));
            match parsed {
                Ok(located) => resources.push(located),
                Err(message) => problems.push(message),
            }
        }
        if !problems.is_empty() {
            // Every bad value at once, as `validate` reports every problem of a batch.
            return Err(self.backend(problems.join("\n")));
        }
        Ok(Listing { revision, resources })
    }

    async fn apply(&self, expected: Revision, changes: Vec<Change>) -> Result<Revision, StoreError> {
        let mut client = self.client();
        let present = client
            .get(RESOURCES, Some(GetOptions::new().with_prefix().with_keys_only()))
            .await
            .map_err(|e| self.backend(format!("cannot read {RESOURCES}: {e}")))?;
        let actual = present.kvs().iter().map(|kv| kv.mod_revision().max(0) as Revision).max().unwrap_or(0);
        if actual != expected {
            return Err(StoreError::Conflict { expected, actual });
        }
        let exists = |path: &str| present.kvs().iter().any(|kv| kv.key() == path.as_bytes());
        let mut operations = Vec::with_capacity(changes.len() + 1);
        let mut deleted = Vec::new();
        for change in &changes {
            match change {
                Change::Put(resource) => {
                    let path = resource_key(&ResourceKey::of(resource)).map_err(|m| self.backend(m))?;
                    let text = to_yaml(&path, resource).map_err(|m| self.backend(m))?;
                    operations.push(TxnOp::put(path, text, None));
                }
                Change::Delete(key) => {
                    let path = resource_key(key).map_err(|m| self.backend(m))?;
                    if !exists(&path) {
                        return Err(StoreError::NotFound { key: key.clone() });
                    }
                    deleted.push(Compare::create_revision(path.clone(), CompareOp::NotEqual, 0));
                    operations.push(TxnOp::delete(path, None));
                }
            }
        }
        operations.push(TxnOp::put(MARKER, "written by palisade", None));
        // Nothing under the prefix modified after `expected`, and what we delete still there
        // (a delete by hand in between leaves no modification to compare).
        let mut compares = vec![Compare::mod_revision(RESOURCES, CompareOp::Less, expected as i64 + 1).with_prefix()];
        compares.extend(deleted);
        let count = operations.len();
        let response = client.txn(Txn::new().when(compares).and_then(operations)).await.map_err(|e| {
            let message = e.to_string();
            let hint = if message.contains("too many operations") {
                format!("; the batch needs {count} operations in one transaction: raise etcd's --max-txn-ops")
            } else if message.contains("request is too large") {
                "; raise etcd's --max-request-bytes".into()
            } else {
                String::new()
            };
            self.backend(format!("the batch was not written: {message}{hint}"))
        })?;
        if !response.succeeded() {
            let actual = current_revision(&client).await.map_err(|e| self.backend(e.to_string()))?;
            return Err(StoreError::Conflict { expected, actual });
        }
        let revision = response.header().map_or(0, |h| h.revision().max(0) as Revision);
        // The watch will say so too; publishing now lets this replica's own caller see it
        // without waiting for the round trip.
        publish_at_least(&self.publish, revision);
        Ok(revision)
    }

    fn watch(&self) -> watch::Receiver<Revision> {
        self.publish.subscribe()
    }

    fn describe(&self) -> String {
        format!("etcd:{}", self.endpoints.join(","))
    }
}

#[cfg(test)]
mod tests;
