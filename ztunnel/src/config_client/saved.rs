//! The last good content on disk, so a ztunnel that starts while the control plane is
//! unreachable starts from it. `snapshot.json` holds a whole set; `snapshot.journal` the
//! deltas put in force since, one JSON line each, appended before the delta is put in force
//! (a node that cannot write its state NACKs, rather than running what it could not keep)
//! and taken back if it is not. A change costs an append, not a rewrite of a 10,000-workload
//! set; the journal is folded into the whole file once it outgrows it.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use palisade_model::compile::Identities;
use palisade_model::key::ResourceKey;
use serde::{Deserialize, Serialize};

use super::Current;

const WHOLE: &str = "snapshot.json";
const JOURNAL: &str = "snapshot.journal";
/// A journal being folded into the whole file (replayed before the journal after a crash).
const FOLDING: &str = "snapshot.journal.folding";

/// Held while the whole file is written: a fold in the background and a whole set saved by a
/// full response are ordered.
static WHOLE_FILE: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// The journal is folded into the whole file once it is larger than this and than the file.
const JOURNAL_FOLD_BYTES: u64 = 1 << 20;

#[derive(Serialize, Deserialize)]
struct Doc {
    key: ResourceKey,
    yaml: String,
}

#[derive(Serialize, Deserialize)]
struct Whole {
    version: String,
    digest: String,
    #[serde(default)]
    documents: Vec<Doc>,
    #[serde(default)]
    identities: Identities,
    /// Files saved before deltas: the whole set as one YAML text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resources_yaml: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    version: String,
    digest: String,
    put: Vec<Doc>,
    removed: Vec<ResourceKey>,
    /// The numbers the delta added (a number never changes, so replay adds them).
    #[serde(default)]
    added: Identities,
}

/// Where an appended entry starts, to take it back.
pub struct Appended(u64);

pub struct SavedFiles {
    whole: PathBuf,
    journal: PathBuf,
    folding: PathBuf,
}

impl SavedFiles {
    pub fn new(state_dir: &Path) -> Self {
        SavedFiles { whole: state_dir.join(WHOLE), journal: state_dir.join(JOURNAL), folding: state_dir.join(FOLDING) }
    }

    /// The saved content with the journal replayed; `None` when nothing was saved.
    pub fn load(&self) -> anyhow::Result<Option<Current>> {
        let text = match std::fs::read_to_string(&self.whole) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => anyhow::bail!("{}: {e}", self.whole.display()),
        };
        let whole: Whole = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not a saved snapshot: {e}", self.whole.display()))?;
        let mut current = Current {
            version: whole.version,
            digest: whole.digest,
            documents: whole.documents.into_iter().map(|d| (d.key, d.yaml)).collect(),
            identities: Arc::new(whole.identities),
        };
        if let Some(yaml) = whole.resources_yaml {
            current.documents = split_legacy(&self.whole, &yaml)?;
        }
        // A fold cut short by a crash: its entries come before the journal's.
        let mut journal = String::new();
        for file in [&self.folding, &self.journal] {
            match std::fs::read_to_string(file) {
                Ok(t) => journal.push_str(&t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => anyhow::bail!("{}: {e}", file.display()),
            }
        }
        for (n, line) in journal.lines().enumerate() {
            // A line cut short by a crash in the middle of an append was never put in force.
            let Ok(entry) = serde_json::from_str::<Entry>(line) else {
                tracing::warn!(file = %self.journal.display(), line = n + 1, "unreadable journal entry skipped");
                break;
            };
            for key in &entry.removed {
                current.documents.remove(key);
            }
            current.documents.extend(entry.put.into_iter().map(|d| (d.key, d.yaml)));
            current.version = entry.version;
            current.digest = entry.digest;
            if !entry.added.is_empty() {
                let all = current.identities.iter().chain(entry.added.iter()).map(|(l, n)| (l.clone(), n));
                current.identities = Arc::new(Identities::new(all)?);
            }
        }
        Ok(Some(current))
    }

    /// Saves a whole set (and drops the journals, which it supersedes).
    pub fn save_whole(&self, current: &Current) -> anyhow::Result<()> {
        let _whole = WHOLE_FILE.lock().unwrap_or_else(|p| p.into_inner());
        self.write_whole(current)?;
        for file in [&self.journal, &self.folding] {
            remove(file);
        }
        Ok(())
    }

    /// A fold's end: the whole file, then only the journal it folded (`self.journal` is the
    /// renamed one here).
    fn save_whole_keeping(&self, current: &Current) -> anyhow::Result<()> {
        self.write_whole(current)?;
        remove(&self.journal);
        Ok(())
    }

    fn write_whole(&self, current: &Current) -> anyhow::Result<()> {
        let whole = Whole {
            version: current.version.clone(),
            digest: current.digest.clone(),
            documents: current.documents.iter().map(|(k, y)| Doc { key: k.clone(), yaml: y.clone() }).collect(),
            identities: (*current.identities).clone(),
            resources_yaml: None,
        };
        let tmp = self.whole.with_extension("tmp");
        let bytes = serde_json::to_vec(&whole)?;
        std::fs::write(&tmp, bytes).map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &self.whole).map_err(|e| anyhow::anyhow!("{}: {e}", self.whole.display()))?;
        Ok(())
    }

    /// Appends one delta: the version and digest after it, what it puts and removes, the
    /// numbers it adds.
    pub fn append(
        &self,
        (version, digest): (&str, &str),
        put: &[(ResourceKey, String)],
        removed: &[ResourceKey],
        added: &Identities,
    ) -> anyhow::Result<Appended> {
        let entry = Entry {
            version: version.into(),
            digest: digest.into(),
            put: put.iter().map(|(k, y)| Doc { key: k.clone(), yaml: y.clone() }).collect(),
            removed: removed.to_vec(),
            added: added.clone(),
        };
        let mut line = serde_json::to_vec(&entry)?;
        line.push(b'\n');
        let fail = |e: std::io::Error| anyhow::anyhow!("{}: {e}", self.journal.display());
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&self.journal).map_err(fail)?;
        let start = file.metadata().map_err(fail)?.len();
        file.write_all(&line).map_err(fail)?;
        Ok(Appended(start))
    }

    /// Takes back an entry that was not put in force.
    pub fn take_back(&self, entry: Appended) {
        let cut = std::fs::OpenOptions::new().write(true).open(&self.journal).and_then(|f| f.set_len(entry.0));
        if let Err(e) = cut {
            tracing::error!(file = %self.journal.display(), error = %e, "journal entry of a refused snapshot not taken back");
        }
    }

    /// Whether the journal has grown past both a bound and the whole file (and no fold is
    /// under way).
    pub fn should_fold(&self) -> bool {
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let journal = size(&self.journal);
        journal > JOURNAL_FOLD_BYTES && journal > size(&self.whole) && !self.folding.exists()
    }

    /// Starts a fold: the journal is renamed aside (the next delta starts a new one) and the
    /// whole file is written from `current`, the content at that point, off the caller's path
    /// (the ACK does not wait for several megabytes to be written). A crash in between leaves
    /// the whole file, the renamed journal and the new one, replayed in that order.
    pub fn fold(self, current: Current) -> Option<std::thread::JoinHandle<()>> {
        if let Err(e) = std::fs::rename(&self.journal, &self.folding) {
            tracing::warn!(file = %self.journal.display(), error = %e, "journal not folded");
            return None;
        }
        Some(std::thread::spawn(move || {
            let _whole = WHOLE_FILE.lock().unwrap_or_else(|p| p.into_inner());
            // A whole set saved since (a full response) superseded this fold and removed the
            // renamed journal: writing the older content now would go back in time.
            if !self.folding.exists() {
                return;
            }
            let folded = SavedFiles { journal: self.folding.clone(), ..self };
            if let Err(e) = folded.save_whole_keeping(&current) {
                tracing::warn!(error = %format!("{e:#}"), "journal not folded into the saved snapshot");
            }
        }))
    }
}

fn remove(file: &Path) {
    match std::fs::remove_file(file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(file = %file.display(), error = %e, "old journal not removed")
        }
        _ => {}
    }
}

/// A snapshot saved before deltas: one YAML text, split into documents by resource.
fn split_legacy(file: &Path, yaml: &str) -> anyhow::Result<BTreeMap<ResourceKey, String>> {
    let resources = palisade_model::load::parse_str(file, yaml)?;
    resources.iter().map(|l| Ok((ResourceKey::of(&l.resource), serde_yaml::to_string(&l.resource)?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ResourceKey {
        ResourceKey { kind: "Namespace".into(), namespace: None, name: name.into() }
    }

    #[test]
    fn whole_then_journal_replays_and_a_taken_back_entry_is_gone() {
        let dir = std::env::temp_dir().join(format!("palisade-saved-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let files = SavedFiles::new(&dir);
        assert!(files.load().unwrap().is_none());
        let mut current = Current { version: "1".into(), digest: "d1".into(), ..Default::default() };
        current.documents.insert(key("a"), "a: 1\n".into());
        files.save_whole(&current).unwrap();

        let none = Identities::default();
        files.append(("2", "d2"), &[(key("b"), "b: 1\n".into())], &[], &none).unwrap();
        let third = files.append(("3", "d3"), &[], &[key("a")], &none).unwrap();
        let loaded = files.load().unwrap().unwrap();
        assert_eq!(loaded.version, "3");
        assert_eq!(loaded.documents.keys().cloned().collect::<Vec<_>>(), [key("b")]);

        files.take_back(third);
        let loaded = files.load().unwrap().unwrap();
        assert_eq!(loaded.version, "2");
        assert_eq!(loaded.documents.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_fold_keeps_every_entry_appended_while_it_runs() {
        let dir = std::env::temp_dir().join(format!("palisade-fold-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let files = SavedFiles::new(&dir);
        let none = Identities::default();
        let mut current = Current { version: "1".into(), digest: "d1".into(), ..Default::default() };
        files.save_whole(&current).unwrap();
        files.append(("2", "d2"), &[(key("a"), "a: 1\n".into())], &[], &none).unwrap();
        current.version = "2".into();
        current.documents.insert(key("a"), "a: 1\n".into());
        // The fold renames the journal at once; an append right after goes to a new one.
        let fold = SavedFiles::new(&dir).fold(current.clone()).expect("a fold");
        files.append(("3", "d3"), &[(key("b"), "b: 1\n".into())], &[], &none).unwrap();
        fold.join().unwrap();
        let loaded = files.load().unwrap().unwrap();
        assert_eq!(loaded.version, "3");
        assert_eq!(loaded.documents.keys().cloned().collect::<Vec<_>>(), [key("a"), key("b")]);
        assert!(!dir.join(FOLDING).exists(), "the folded journal is gone");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
