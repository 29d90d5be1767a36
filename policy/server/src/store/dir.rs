//! The directory store: a directory of YAML, as `palisade validate` reads it (see
//! `palisade_model::load`), watched by polling the loader's [`ChangeDetector`], so a `git pull`
//! or a ConfigMap update into it is applied like any other change.
//!
//! `palisade apply` writes into one subdirectory that palisade manages, `<root>/applied`, and
//! nowhere else: resources defined in other files belong to whoever manages those files (a git
//! checkout), and changing one through the API is refused ([`StoreError::NotManaged`]) rather
//! than silently shadowed. A batch is written atomically the way Kubernetes updates a
//! ConfigMap volume: the new set of managed files goes to a fresh hidden directory
//! (`.applied-<revision>`, skipped by the loader), then a symlink renamed over `applied`
//! switches every file at once; a reader sees the old set or the new one, never a mix.
//!
//! Revisions start at the time the store was opened (milliseconds since the epoch) and grow
//! by one per change, so they keep growing across restarts of the server.
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use palisade_model::load::{self, ChangeDetector, Located};
use palisade_model::resource::Resource;
use tokio::sync::watch;

use super::{Change, Listing, ResourceKey, Revision, Store, StoreError};

/// Name of the subdirectory `palisade apply` writes.
pub const MANAGED: &str = "applied";

pub struct DirStore {
    inner: Arc<Inner>,
    revisions: watch::Receiver<Revision>,
}

struct Inner {
    root: PathBuf,
    /// Held for every poll and every write, so a write and a `git pull` noticed at the same
    /// time are ordered.
    state: Mutex<State>,
    publish: watch::Sender<Revision>,
}

struct State {
    changes: ChangeDetector,
    parsed: Parsed,
    revision: Revision,
    /// The last read failure logged, so a lasting one is logged once.
    read_error: Option<String>,
}

impl DirStore {
    /// Opens `root` (which must exist: a mistyped path is an error, not an empty cluster) and
    /// polls it every `every` until the store is dropped.
    pub fn open(root: &Path, every: Duration) -> Result<DirStore, StoreError> {
        let backend = |message: String| StoreError::Backend { store: format!("dir:{}", root.display()), message };
        if !std::fs::metadata(root).map_err(|e| backend(format!("cannot open: {e}")))?.is_dir() {
            return Err(backend("not a directory".into()));
        }
        let start =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_millis() as Revision);
        let mut changes = ChangeDetector::new(vec![root.to_path_buf()]);
        // The first poll says "changed" and takes the baseline.
        changes.poll().map_err(|e| backend(e.to_string()))?;
        let (publish, revisions) = watch::channel(start);
        let state = Mutex::new(State { changes, parsed: Parsed::default(), revision: start, read_error: None });
        let inner = Arc::new(Inner { root: root.to_path_buf(), state, publish });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { return };
                let _ = tokio::task::spawn_blocking(move || inner.poll()).await;
            }
        });
        Ok(DirStore { inner, revisions })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }
}

impl Inner {
    fn backend(&self, message: impl Into<String>) -> StoreError {
        StoreError::Backend { store: format!("dir:{}", self.root.display()), message: message.into() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves a state that is still consistent (the
        // detector and the counter are each updated in one step).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocking: notices changes made behind our back and publishes a new revision.
    fn poll(&self) {
        let mut state = self.lock();
        self.poll_locked(&mut state);
    }

    fn poll_locked(&self, state: &mut State) {
        match state.changes.poll() {
            Ok(changed) => {
                state.read_error = None;
                if changed {
                    state.revision += 1;
                    self.publish.send_replace(state.revision);
                    tracing::info!(store = %self.root.display(), revision = state.revision, "store changed");
                }
            }
            Err(e) => {
                let message = e.to_string();
                if state.read_error.as_deref() != Some(&message) {
                    tracing::error!(store = %self.root.display(), error = %message, "store unreadable; the last good content stays in force");
                    state.read_error = Some(message);
                }
            }
        }
    }

    fn list(&self) -> Result<Listing, StoreError> {
        let mut state = self.lock();
        let files = state.parsed.load(&self.root).map_err(|e| self.backend(e.to_string()))?;
        let resources = files.iter().flat_map(|(_, f)| f.iter().cloned()).collect();
        Ok(Listing { revision: state.revision, resources })
    }

    fn apply(&self, expected: Revision, changes: Vec<Change>) -> Result<Revision, StoreError> {
        let mut state = self.lock();
        self.poll_locked(&mut state);
        if state.revision != expected {
            return Err(StoreError::Conflict { expected, actual: state.revision });
        }
        let files = state.parsed.load(&self.root).map_err(|e| self.backend(e.to_string()))?;
        let managed_dir = self.root.join(MANAGED);
        // Only the batch's keys are looked up among resources defined elsewhere (borrowed,
        // so a large store costs no allocation per resource).
        let names: HashSet<String> = changes
            .iter()
            .map(|c| match c {
                Change::Put(r) => r.metadata().name.clone(),
                Change::Delete(k) => k.name.clone(),
            })
            .collect();
        let touched: HashSet<(String, Option<String>, String)> = changes
            .iter()
            .map(|c| match c {
                Change::Put(r) => ResourceKey::of(r),
                Change::Delete(k) => k.clone(),
            })
            .map(|k| (k.kind, k.namespace, k.name))
            .collect();
        let mut managed: BTreeMap<ResourceKey, Resource> = BTreeMap::new();
        let mut elsewhere: BTreeMap<ResourceKey, String> = BTreeMap::new();
        for (file, resources) in &files {
            // Whose the file is, once per file, not per resource.
            if file.starts_with(&managed_dir) {
                managed.extend(resources.iter().map(|l| (ResourceKey::of(&l.resource), l.resource.clone())));
                continue;
            }
            for Located { origin, resource } in resources.iter() {
                let meta = resource.metadata();
                if !names.contains(&meta.name) {
                    continue;
                }
                let key = (resource.kind().to_string(), meta.namespace.clone(), meta.name.clone());
                if touched.contains(&key) {
                    elsewhere.insert(ResourceKey::of(resource), origin.to_string());
                }
            }
        }
        for change in changes {
            let key = match &change {
                Change::Put(r) => ResourceKey::of(r),
                Change::Delete(k) => k.clone(),
            };
            if let Some(origin) = elsewhere.get(&key) {
                return Err(StoreError::NotManaged { key, origin: origin.clone() });
            }
            match change {
                Change::Put(r) => {
                    managed.insert(key, r);
                }
                Change::Delete(key) => {
                    if managed.remove(&key).is_none() {
                        return Err(StoreError::NotFound { key });
                    }
                }
            }
        }
        let next = state.revision + 1;
        self.write_managed(next, &managed)?;
        // Take the new content as the baseline and publish it now, not at the next poll.
        self.poll_locked(&mut state);
        if state.revision < next {
            state.revision = next;
            self.publish.send_replace(next);
        }
        Ok(state.revision)
    }

    /// Writes the managed set to `.applied-<revision>` and switches `applied` to it.
    fn write_managed(&self, revision: Revision, managed: &BTreeMap<ResourceKey, Resource>) -> Result<(), StoreError> {
        let io = |what: &str, path: &Path, e: std::io::Error| self.backend(format!("{what} {}: {e}", path.display()));
        let fresh_name = format!(".{MANAGED}-{revision}");
        let fresh = self.root.join(&fresh_name);
        let _ = std::fs::remove_dir_all(&fresh);
        std::fs::create_dir(&fresh).map_err(|e| io("cannot create", &fresh, e))?;
        for (key, resource) in managed {
            let text = to_yaml(key, resource).map_err(|m| self.backend(m))?;
            let file = fresh.join(file_name(key));
            std::fs::write(&file, text).map_err(|e| io("cannot write", &file, e))?;
            std::fs::File::open(&file).and_then(|f| f.sync_all()).map_err(|e| io("cannot sync", &file, e))?;
        }
        let link = self.root.join(MANAGED);
        let old = std::fs::read_link(&link).ok();
        if old.is_none() && std::fs::symlink_metadata(&link).is_ok() {
            return Err(self.backend(format!("{} exists and is not palisade's symlink; move it away", link.display())));
        }
        let tmp = self.root.join(format!(".{MANAGED}.link"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&fresh_name, &tmp).map_err(|e| io("cannot create", &tmp, e))?;
        std::fs::rename(&tmp, &link).map_err(|e| io("cannot switch", &link, e))?;
        std::fs::File::open(&self.root).and_then(|d| d.sync_all()).map_err(|e| io("cannot sync", &self.root, e))?;
        if let Some(old) = old.filter(|o| o.as_os_str() != fresh_name.as_str()) {
            let _ = std::fs::remove_dir_all(self.root.join(old));
        }
        Ok(())
    }
}

/// `<kind>.<namespace>.<name>.yaml`: names are DNS labels (validated before they get here),
/// checked again so that no name can leave the directory.
fn file_name(key: &ResourceKey) -> String {
    let safe =
        |s: &str| s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect::<String>();
    let ns = key.namespace.as_deref().map(|n| format!("{}.", safe(n))).unwrap_or_default();
    format!("{}.{ns}{}.yaml", key.kind.to_ascii_lowercase(), safe(&key.name))
}

/// The resource as YAML, checked to read back as the same resource (so a serialisation the
/// loader does not accept is refused here, not discovered at the next restart).
fn to_yaml(key: &ResourceKey, resource: &Resource) -> Result<String, String> {
    let text = serde_yaml::to_string(resource).map_err(|e| format!("{key}: cannot serialise: {e}"))?;
    let back =
        load::parse_str(Path::new(&file_name(key)), &text).map_err(|e| format!("{key}: does not read back: {e}"))?;
    match back.as_slice() {
        [one] if &one.resource == resource => Ok(text),
        _ => Err(format!("{key}: does not read back as written")),
    }
}

#[async_trait]
impl Store for DirStore {
    async fn list(&self) -> Result<Listing, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.list()).await.map_err(|e| self.inner.backend(e.to_string()))?
    }

    async fn apply(&self, expected: Revision, changes: Vec<Change>) -> Result<Revision, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.apply(expected, changes))
            .await
            .map_err(|e| self.inner.backend(e.to_string()))?
    }

    fn watch(&self) -> watch::Receiver<Revision> {
        self.revisions.clone()
    }

    fn describe(&self) -> String {
        format!("dir:{}", self.inner.root.display())
    }

    async fn number_identities(
        &self,
        wanted: &[palisade_model::compile::IdentityLabels],
    ) -> Result<palisade_model::compile::Identities, StoreError> {
        let inner = self.inner.clone();
        let wanted = wanted.to_vec();
        tokio::task::spawn_blocking(move || inner.number_identities(&wanted))
            .await
            .map_err(|e| self.inner.backend(e.to_string()))?
    }
}

mod identities;

#[cfg(test)]
mod tests;

/// The store's files as last parsed, by path: a file whose metadata (inode, size, change and
/// modification times) did not move is not read again (a `git pull` into a 10,000-workload
/// repository re-parses the files it changed, and an `apply` none but its own). Writers of
/// this directory replace files by renaming (git, ConfigMap updates, `apply`), which gives a
/// new inode.
#[derive(Default)]
struct Parsed(std::collections::HashMap<PathBuf, (FileStamp, Arc<Vec<Located>>)>);

type FileStamp = (u64, u64, i64, i64, i64, i64);

/// A file and its resources, in file order.
type ParsedFile = (PathBuf, Arc<Vec<Located>>);

fn stamp(file: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(file).ok()?;
    Some((m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()))
}

impl Parsed {
    /// Every file of `root` (the loader's rules), each file's resources in file order.
    fn load(&mut self, root: &Path) -> Result<Vec<ParsedFile>, load::LoadError> {
        let mut next = std::collections::HashMap::new();
        let mut out = Vec::new();
        for file in load::policy_files(std::slice::from_ref(&root.to_path_buf()))? {
            let seen = stamp(&file);
            let parsed = match (self.0.get(&file), seen) {
                (Some((before, parsed)), Some(now)) if *before == now => parsed.clone(),
                _ => Arc::new(load::parse_str(&file, &load::read_bounded(&file)?)?),
            };
            out.push((file.clone(), parsed.clone()));
            if let Some(now) = seen {
                next.insert(file, (now, parsed));
            }
        }
        self.0 = next;
        Ok(out)
    }
}
