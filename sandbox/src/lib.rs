//! The sandbox cluster: Palisade's test bed and the demo's stage. Nodes and pods are network
//! namespaces on one machine (see [`cluster`]); the same library drives `cargo xtask sandbox`,
//! the demo, the end-to-end tests and the benchmarks.
pub mod cluster;
pub mod etcd;
pub mod sys;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

pub use cluster::{Cluster, ClusterInfo, ClusterSpec, NodeInfo, PodInfo, PodTemplate, WaypointSpec};

/// A cluster id unique to this process and call: `t<pid>x<n>`. Tests running in parallel
/// (separate processes under nextest, threads under cargo test) never share names.
pub fn unique_test_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("t{:x}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// State directory of a test cluster.
pub fn test_state_dir(id: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{}{id}", cluster::PREFIX))
}

/// Removes test clusters whose owning process is gone (a test killed by a timeout cannot
/// clean up after itself; the next run does).
pub fn sweep_stale_test_clusters() -> Result<Vec<String>> {
    let mut ids: Vec<String> = cluster::list_netns()?
        .iter()
        .filter_map(|n| n.strip_prefix(cluster::PREFIX))
        .filter_map(|rest| rest.split('-').next())
        .map(str::to_string)
        .collect();
    if let Ok(entries) = std::fs::read_dir(sys::cgroup2_root()?) {
        ids.extend(
            entries.flatten().filter_map(|e| {
                e.file_name().to_str().and_then(|n| n.strip_prefix(cluster::PREFIX)).map(str::to_string)
            }),
        );
    }
    // Pins outlive everything else (a test killed after its namespaces were removed).
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        ids.extend(
            entries.flatten().filter_map(|e| {
                e.file_name().to_str().and_then(|n| n.strip_prefix(cluster::PREFIX)).map(str::to_string)
            }),
        );
    }
    ids.sort();
    ids.dedup();
    let mut removed = Vec::new();
    for id in ids {
        let Some(pid) =
            id.strip_prefix('t').and_then(|r| r.split('x').next()).and_then(|p| u32::from_str_radix(p, 16).ok())
        else {
            continue;
        };
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            cluster::teardown(&id, &test_state_dir(&id))?;
            removed.push(id);
        }
    }
    Ok(removed)
}

/// Path of a binary of this workspace built next to the running executable (tests run from
/// `target/<profile>/deps`, xtask from `target/<profile>`).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PALISADE_BIN_DIR") {
        return Ok(PathBuf::from(dir).join(name));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let mut dir = exe.parent().context("exe dir")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the workspace binaries first (`cargo build --bins`, done by `cargo xtask test`)",
            path.display()
        );
    }
    Ok(path)
}
