//! The policy in force comes from YAML files (the control plane replaces the source, not the
//! model). The files are polled; a changed file is loaded, validated and compiled, and only a
//! complete, valid snapshot reaches the kernel. A bad file is reported and the last good
//! policy stays in force.
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use palisade_policy::Snapshot;
use tokio::sync::watch;

use crate::datapath::{ApplyStats, PolicyMaps};
use crate::metrics::Metrics;

pub struct PolicySource {
    paths: Vec<PathBuf>,
    trust_domain: String,
    maps: Option<PolicyMaps>,
    digest: Option<u64>,
    metrics: Arc<Metrics>,
    publish: watch::Sender<Arc<Snapshot>>,
    /// Recent generations' snapshots, to name kernel events with the policy that decided.
    generations: Arc<crate::flows::Generations>,
}

/// Hash of every file's name and content (directories: their YAML files).
fn digest(paths: &[PathBuf]) -> std::io::Result<u64> {
    let mut h = DefaultHasher::new();
    for p in paths {
        let mut files = vec![p.clone()];
        if p.is_dir() {
            files = std::fs::read_dir(p)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
            files.sort();
        }
        for f in files {
            f.hash(&mut h);
            std::fs::read(&f)?.hash(&mut h);
        }
    }
    Ok(h.finish())
}

impl PolicySource {
    pub fn new(
        paths: Vec<PathBuf>,
        trust_domain: String,
        maps: PolicyMaps,
        metrics: Arc<Metrics>,
    ) -> (Self, watch::Receiver<Arc<Snapshot>>) {
        let (publish, rx) = watch::channel(Arc::new(Snapshot::default()));
        let generations = Arc::default();
        (PolicySource { paths, trust_domain, maps: Some(maps), digest: None, metrics, publish, generations }, rx)
    }

    /// The snapshots of recent generations, recorded as each is put in force.
    pub fn generations(&self) -> Arc<crate::flows::Generations> {
        self.generations.clone()
    }

    /// Loads the files and puts the result in force. Errors leave the last good policy.
    pub async fn reload(&mut self) -> anyhow::Result<Option<ApplyStats>> {
        let digest = digest(&self.paths)?;
        if self.digest == Some(digest) {
            return Ok(None);
        }
        self.digest = Some(digest);
        let (paths, trust_domain) = (self.paths.clone(), self.trust_domain.clone());
        let mut maps = self.maps.take().expect("policy maps are owned between reloads");
        let (maps, result) = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let result = palisade_policy::load_snapshot_for(&paths, &trust_domain)
                .map_err(anyhow::Error::from)
                .and_then(|snap| {
                    let compile_ms = started.elapsed().as_secs_f64() * 1e3;
                    let mut stats = maps.apply(&snap)?;
                    stats.compile_ms = compile_ms;
                    Ok((snap, stats))
                });
            (maps, result)
        })
        .await?;
        let generation = maps.generation();
        self.maps = Some(maps);
        self.metrics.policy_reload(result.is_ok());
        let (snapshot, stats) = result?;
        self.metrics.policy_generation.store(generation.into(), Ordering::Relaxed);
        self.metrics.policy_applied(&stats);
        let snapshot = Arc::new(snapshot);
        self.generations.record(generation, snapshot.clone());
        self.publish.send_replace(snapshot);
        Ok(Some(stats))
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
