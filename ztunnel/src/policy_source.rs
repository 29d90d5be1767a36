//! The policy in force comes from YAML files, or from the control plane's stream
//! (`config_client`, which hands each snapshot to [`PolicySource::put_in_force`]). The files are polled; a changed file is loaded, validated and compiled, and only a
//! complete, valid snapshot reaches the kernel. A bad file is reported and the last good
//! policy stays in force.
//!
//! Which files are read, and how a change is noticed, is the loader's business
//! (`palisade_model::load`): the poll `stat`s the very files the loader reads and re-reads
//! contents only when their metadata moved. A file that cannot be read (deleted, a dangling
//! symlink, over the size limit) is logged with its path and counted once per distinct
//! failure, not on every poll.
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use palisade_model::Snapshot;
use palisade_model::compile::Identities;
use palisade_model::load::{ChangeDetector, LoadError};
use tokio::sync::watch;

use crate::datapath::{ApplyStats, PolicyMaps};
use crate::metrics::Metrics;
use crate::pushed::{Pushed, ResourceDelta, Undo};

pub struct PolicySource {
    paths: Vec<PathBuf>,
    trust_domain: String,
    maps: Option<PolicyMaps>,
    /// The control plane's resources as in force (empty in file mode); owned like `maps`.
    pushed: Option<Pushed>,
    /// Between polls; taken by the blocking task that polls.
    files: Option<Files>,
    metrics: Arc<Metrics>,
    publish: watch::Sender<Arc<Snapshot>>,
    /// Recent generations' snapshots, to name kernel events with the policy that decided.
    generations: Arc<crate::flows::Generations>,
    /// The last policy refused, served at `/config_dump`.
    last_rejected: Arc<LastRejected>,
}

/// The last policy refused and why, for `/config_dump` (a log line and a counter alone left
/// operators guessing which file and which field).
pub type LastRejected = std::sync::Mutex<Option<Rejection>>;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Rejection {
    /// When, in seconds since the Unix epoch.
    pub at_unix_secs: u64,
    /// Every problem, each `file:line: resource: field: reason` (or the error, when the
    /// input could not be read at all).
    pub problems: Vec<String>,
    /// The policy generation that stayed in force.
    pub generation_in_force: u64,
}

/// A compiled snapshot, and how to take back what compiling it changed (a delta applied to the
/// pushed resources) when the maps refuse it.
trait Compiled: Send + 'static {
    fn snapshot(&self) -> &Snapshot;
    fn into_snapshot(self) -> Arc<Snapshot>;
    fn undo(self, pushed: &mut Pushed);
}

impl Compiled for Snapshot {
    fn snapshot(&self) -> &Snapshot {
        self
    }
    fn into_snapshot(self) -> Arc<Snapshot> {
        Arc::new(self)
    }
    fn undo(self, _: &mut Pushed) {}
}

struct CompiledDelta {
    snapshot: Arc<Snapshot>,
    undo: Undo,
}

impl Compiled for CompiledDelta {
    fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }
    fn into_snapshot(self) -> Arc<Snapshot> {
        self.snapshot
    }
    fn undo(self, pushed: &mut Pushed) {
        pushed.undo(self.undo)
    }
}

/// The policy files as the loader sees them, and the read failure last reported.
struct Files {
    changes: ChangeDetector,
    read_error: Option<String>,
}

#[derive(Debug)]
enum Polled {
    Unchanged,
    Changed,
    /// A new read failure (a lasting one is reported once, then polls say `Unchanged`).
    Failed(LoadError),
}

impl Files {
    /// Blocking: lists and `stat`s the files, reads them if they moved.
    fn poll(&mut self) -> Polled {
        match self.changes.poll() {
            Ok(changed) => {
                if let Some(e) = self.read_error.take() {
                    tracing::info!(previous_error = %e, "policy files readable again");
                }
                if changed { Polled::Changed } else { Polled::Unchanged }
            }
            Err(e) => {
                let message = e.to_string();
                if self.read_error.as_deref() == Some(message.as_str()) {
                    return Polled::Unchanged;
                }
                self.read_error = Some(message);
                Polled::Failed(e)
            }
        }
    }
}

impl PolicySource {
    pub fn new(
        paths: Vec<PathBuf>,
        trust_domain: String,
        maps: PolicyMaps,
        metrics: Arc<Metrics>,
    ) -> (Self, watch::Receiver<Arc<Snapshot>>) {
        let (publish, rx) = watch::channel(Arc::new(Snapshot::default()));
        let pushed = Some(Pushed::new(&trust_domain));
        let generations = Arc::default();
        let files = Some(Files { changes: ChangeDetector::new(paths.clone()), read_error: None });
        let last_rejected = Arc::default();
        let source = PolicySource {
            paths,
            trust_domain,
            maps: Some(maps),
            pushed,
            files,
            metrics,
            publish,
            generations,
            last_rejected,
        };
        (source, rx)
    }

    /// The snapshots of recent generations, recorded as each is put in force.
    pub fn generations(&self) -> Arc<crate::flows::Generations> {
        self.generations.clone()
    }

    /// The last policy refused (shared with the admin endpoint).
    pub fn last_rejected(&self) -> Arc<LastRejected> {
        self.last_rejected.clone()
    }

    /// Loads the files and puts the result in force. Errors leave the last good policy.
    pub async fn reload(&mut self) -> anyhow::Result<Option<ApplyStats>> {
        let mut files = self.files.take().expect("policy files are owned between polls");
        let (files, polled) = tokio::task::spawn_blocking(move || {
            let polled = files.poll();
            (files, polled)
        })
        .await?;
        self.files = Some(files);
        match polled {
            Polled::Unchanged => return Ok(None),
            Polled::Failed(e) => {
                self.metrics.policy_read_error();
                return Err(anyhow::Error::from(e).context("policy files unreadable"));
            }
            Polled::Changed => {}
        }
        // File mode: no store numbers identities; the compiler numbers them in sorted order.
        self.put_in_force(self.paths.clone(), Identities::default()).await.map(Some)
    }

    /// Loads, validates and compiles `paths` and writes the result to the maps; returns once
    /// the maps are switched. Errors leave the last good policy in force.
    pub async fn put_in_force(&mut self, paths: Vec<PathBuf>, identities: Identities) -> anyhow::Result<ApplyStats> {
        let trust_domain = self.trust_domain.clone();
        self.switch(move |_| {
            palisade_model::load_snapshot_with(&paths, &trust_domain, &identities).map_err(anyhow::Error::from)
        })
        .await
    }

    /// Changes the control plane's resources by `delta`, compiles them with `identities` (the
    /// control plane's numbers) and writes the result to the maps; returns once the maps are
    /// switched (the control-plane client ACKs only then). On error the resources and the
    /// maps stay as they were.
    pub async fn put_delta_in_force(
        &mut self,
        delta: ResourceDelta,
        identities: Arc<Identities>,
    ) -> anyhow::Result<ApplyStats> {
        self.switch(move |pushed| {
            let (snapshot, undo) = pushed.apply(delta, identities);
            Ok(CompiledDelta { snapshot, undo })
        })
        .await
    }

    /// Compiles (off the runtime, with the pushed resources at hand) and, if that worked,
    /// writes the result to the maps; records a refusal for `/config_dump`.
    async fn switch<C: Compiled>(
        &mut self,
        compile: impl FnOnce(&mut Pushed) -> anyhow::Result<C> + Send + 'static,
    ) -> anyhow::Result<ApplyStats> {
        let mut maps = self.maps.take().expect("policy maps are owned between reloads");
        let mut pushed = self.pushed.take().expect("pushed resources are owned between reloads");
        let (maps, pushed, result) = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let result = compile(&mut pushed).and_then(|compiled| {
                let compile_ms = started.elapsed().as_secs_f64() * 1e3;
                match maps.apply(compiled.snapshot()) {
                    Ok(mut stats) => {
                        stats.compile_ms = compile_ms;
                        Ok((compiled.into_snapshot(), stats))
                    }
                    Err(e) => {
                        compiled.undo(&mut pushed);
                        Err(e.into())
                    }
                }
            });
            (maps, pushed, result)
        })
        .await?;
        let generation = maps.generation();
        self.maps = Some(maps);
        self.pushed = Some(pushed);
        self.metrics.policy_reload(result.is_ok());
        if let Err(e) = &result {
            let problems = match e.downcast_ref::<palisade_model::ConfigError>() {
                Some(palisade_model::ConfigError::Invalid(invalid)) => {
                    invalid.0.iter().map(|p| p.to_string()).collect()
                }
                _ => vec![format!("{e:#}")],
            };
            let at_unix_secs =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let generation_in_force = self.metrics.policy_generation.load(Ordering::Relaxed);
            *self.last_rejected.lock().expect("rejection lock") =
                Some(Rejection { at_unix_secs, problems, generation_in_force });
        }
        let (snapshot, stats) = result?;
        self.metrics.policy_generation.store(generation.into(), Ordering::Relaxed);
        self.metrics.policy_applied(&stats);
        self.generations.record(generation, snapshot.clone());
        self.publish.send_replace(snapshot);
        Ok(stats)
    }

    /// Polls for changes forever.
    pub async fn watch(mut self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            match self.reload().await {
                Ok(Some(stats)) => tracing::info!(
                    generation = stats.generation,
                    identities = stats.identities,
                    cells = stats.cells,
                    compile_ms = stats.compile_ms,
                    apply_ms = stats.elapsed_ms,
                    "policy reloaded"
                ),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "policy rejected; the previous policy stays in force")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    const NS: &str = "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: a}\n";

    #[test]
    fn polls_the_loaders_files_and_reports_a_lasting_read_failure_once() {
        let dir = std::env::temp_dir().join(format!("palisade-policy-source-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cleanup = RemoveOnDrop(dir.clone());
        // A ConfigMap mount (hidden ..data) and a plain subdirectory: both used to stop ztunnel.
        std::fs::create_dir_all(dir.join("..2026_11_25_13_00_00.1")).unwrap();
        std::fs::write(dir.join("..2026_11_25_13_00_00.1/ns.yaml"), NS).unwrap();
        symlink("..2026_11_25_13_00_00.1", dir.join("..data")).unwrap();
        symlink("..data/ns.yaml", dir.join("ns.yaml")).unwrap();
        std::fs::create_dir_all(dir.join("team")).unwrap();
        std::fs::write(dir.join("team/more.yaml"), NS.replace("name: a", "name: b")).unwrap();
        let paths = vec![dir.clone()];
        palisade_model::load_snapshot(&paths).expect("the loader accepts the directory");
        let mut files = Files { changes: ChangeDetector::new(paths), read_error: None };
        assert!(matches!(files.poll(), Polled::Changed));
        assert!(matches!(files.poll(), Polled::Unchanged));
        // The file behind a visible name disappears: named once, then quiet.
        std::fs::remove_file(dir.join("..2026_11_25_13_00_00.1/ns.yaml")).unwrap();
        match files.poll() {
            Polled::Failed(e) => assert!(e.to_string().contains(&*dir.join("ns.yaml").to_string_lossy()), "{e}"),
            other => panic!("a missing policy file was not reported: {other:?}"),
        }
        for _ in 0..3 {
            assert!(matches!(files.poll(), Polled::Unchanged), "a lasting failure is reported once");
        }
        std::fs::write(dir.join("..2026_11_25_13_00_00.1/ns.yaml"), NS).unwrap();
        assert!(matches!(files.poll(), Polled::Unchanged), "back as it was: nothing to reload");
        assert!(files.read_error.is_none());
        drop(cleanup);
    }

    /// Removes the directory when dropped, also when the test panics.
    struct RemoveOnDrop(PathBuf);

    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
