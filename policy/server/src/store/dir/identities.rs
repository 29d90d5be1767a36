//! Numeric identities of the directory store, kept in `<root>/.palisade/identities.json`
//! (hidden, so the loader and the change detector never read it as a resource). The file
//! holds every identity ever numbered: numbers are never reused (an identity whose workloads
//! are gone keeps its number, so a workload that comes back gets it again), and a new one is
//! numbered above the largest. It is replaced atomically (a synced temporary file renamed over
//! it), so a crash leaves the old table or the new one.
//!
//! One server per directory (as for the rest of the directory store): the table is changed
//! under the store's lock, which orders it with every write and poll of this process.
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use palisade_model::compile::{Identities, IdentityLabels};

use super::Inner;
use crate::store::StoreError;

/// The directory palisade keeps its own state in, beside the managed `applied/` area.
pub const STATE_DIR: &str = ".palisade";
pub const IDENTITIES_FILE: &str = "identities.json";

impl Inner {
    fn identities_file(&self) -> PathBuf {
        self.root.join(STATE_DIR).join(IDENTITIES_FILE)
    }

    /// Blocking: the number of each of `wanted`, numbering (and writing) the new ones.
    pub(super) fn number_identities(&self, wanted: &[IdentityLabels]) -> Result<Identities, StoreError> {
        let _state = self.lock();
        let file = self.identities_file();
        let kept = self.read_identities(&file)?;
        let wanted: BTreeSet<IdentityLabels> = wanted.iter().cloned().collect();
        let numbers = kept.number(&wanted);
        let new = numbers.iter().filter(|(l, _)| kept.get(l).is_none()).count();
        if new > 0 {
            let all = Identities::new(kept.iter().map(|(l, n)| (l.clone(), n)).chain(numbers.clone()))
                .map_err(|e| self.backend(format!("{}: {e}", file.display())))?;
            self.write_identities(&file, &all)?;
            tracing::info!(new, total = all.len(), file = %file.display(), "numbered new identities");
        }
        Identities::new(numbers).map_err(|e| self.backend(format!("{}: {e}", file.display())))
    }

    fn read_identities(&self, file: &Path) -> Result<Identities, StoreError> {
        match std::fs::read(file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| self.backend(format!("{}: not an identity table: {e}", file.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Identities::default()),
            Err(e) => Err(self.backend(format!("cannot read {}: {e}", file.display()))),
        }
    }

    fn write_identities(&self, file: &Path, all: &Identities) -> Result<(), StoreError> {
        let io = |what: &str, path: &Path, e: std::io::Error| self.backend(format!("{what} {}: {e}", path.display()));
        let dir = file.parent().expect("the file is inside the state directory");
        std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
        let text = serde_json::to_vec_pretty(all).map_err(|e| self.backend(format!("{}: {e}", file.display())))?;
        let tmp = dir.join(format!(".{IDENTITIES_FILE}.tmp"));
        let mut out = std::fs::File::create(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
        out.write_all(&text).and_then(|()| out.sync_all()).map_err(|e| io("cannot write", &tmp, e))?;
        std::fs::rename(&tmp, file).map_err(|e| io("cannot replace", file, e))?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("cannot sync", dir, e))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::Store;
    use crate::store::dir::DirStore;

    fn labels(sa: &str) -> IdentityLabels {
        IdentityLabels { namespace: "shop".into(), service_account: sa.into(), labels: Default::default() }
    }

    #[tokio::test]
    async fn numbers_persist_across_reopening_and_are_never_reused() {
        let root = std::env::temp_dir().join(format!("palisade-dir-identities-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let _cleanup = RemoveOnDrop(root.clone());
        let store = DirStore::open(&root, Duration::from_millis(20)).unwrap();
        let first = store.number_identities(&[labels("web"), labels("db")]).await.unwrap();
        // Sorted: db before web.
        assert_eq!((first.get(&labels("db")), first.get(&labels("web"))), (Some(256), Some(257)));
        assert!(root.join(STATE_DIR).join(IDENTITIES_FILE).is_file());
        drop(store);

        // A restarted server: `web` is gone from the resources, `api` is new.
        let store = DirStore::open(&root, Duration::from_millis(20)).unwrap();
        let revision = *store.watch().borrow();
        let second = store.number_identities(&[labels("db"), labels("api")]).await.unwrap();
        assert_eq!(second.get(&labels("db")), Some(256));
        assert_eq!(second.get(&labels("api")), Some(258), "web's 257 stays taken");
        assert_eq!(second.len(), 2, "only what was asked for");
        let back = store.number_identities(&[labels("web")]).await.unwrap();
        assert_eq!(back.get(&labels("web")), Some(257), "a workload that comes back gets its number again");
        // The table is not a resource: writing it moves no revision.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(store.list().await.unwrap().resources.is_empty());
        assert_eq!(*store.watch().borrow(), revision, "the identity table was read as a change");
    }

    struct RemoveOnDrop(PathBuf);

    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
