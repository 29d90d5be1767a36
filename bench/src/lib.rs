//! `cargo xtask bench`: Palisade's data path measured on a sandbox cluster, every mesh figure
//! beside the no-mesh baseline measured in the same run (the same pods, not enrolled).
//!
//! 1. throughput, one stream and 8 streams (iperf3), pod to pod across nodes;
//! 2. latency of 1 KiB request/response at a fixed rate, open loop (HDR histogram);
//! 3. ztunnel CPU and peak RSS during 2;
//! 4. new connections per second, one at a time, and ztunnel CPU per 1,000 connections;
//! 5. `connect()` time: denied in the kernel, and allowed, enrolled versus not;
//! 6. idle RSS with 0, 10 and 100 enrolled pods;
//! 7. compiling and loading a policy of 10,000 workloads and 100,000 rules, and map memory;
//! 8. restarts: connections alive across an upgrade under load, and the longest windows in
//!    which a denied connection succeeded or an allowed one failed (upgrade; kill -9 + restart);
//! 9. hostile peers: legitimate p99 latency and success while a handshake flood runs against
//!    15008, beside the same run without it, and ztunnel RSS before, during and after;
//! 10. control plane: `apply` until every node ACKed (its maps switched), p50 and p99;
//! 11. the waypoint: HTTP/1.1 at a fixed rate with and without it (latency, its vCPU and RSS);
//! 12. the waypoint's maximum req/s against haproxy in the same role.
//!
//! No figure is asserted anywhere: the report states them, `BENCHMARKS.md` keeps the latest.
mod control_plane;
mod hostile;
mod measure;
mod procfs;
mod report;
mod restart;
pub mod stats;
mod waypoint;

use std::path::PathBuf;

pub use report::{Report, write};

/// Binaries the bench runs (release builds for real figures).
#[derive(Clone, Debug)]
pub struct Binaries {
    pub ztunnel: PathBuf,
    pub palisade: PathBuf,
    pub probe: PathBuf,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Sizes {
    pub reps: usize,
    pub throughput_secs: u64,
    pub latency_secs: u64,
    pub latency_rate: u32,
    pub latency_conns: usize,
    pub connrate_secs: u64,
    pub connect_count: usize,
    pub idle_pods: [usize; 3],
    pub scale_workloads: usize,
    pub scale_rules: usize,
    /// Paced connections kept open across the upgrade of both nodes.
    pub restart_streams: usize,
    /// Applies through the control plane, each timed until every node ACKed.
    pub applies: usize,
    /// Closed-loop connections and seconds of the waypoint's maximum req/s run.
    pub waypoint_max_conns: usize,
    pub waypoint_max_secs: u64,
}

impl Sizes {
    /// What the issue asks for: several repetitions of full-length runs.
    pub fn full() -> Sizes {
        Sizes {
            reps: 3,
            throughput_secs: 10,
            latency_secs: 30,
            latency_rate: 1000,
            latency_conns: 4,
            connrate_secs: 10,
            connect_count: 2000,
            idle_pods: [0, 10, 100],
            scale_workloads: 10_000,
            scale_rules: 100_000,
            restart_streams: 32,
            applies: 100,
            waypoint_max_conns: 16,
            waypoint_max_secs: 10,
        }
    }

    /// A short version for comparisons during development.
    pub fn quick() -> Sizes {
        Sizes {
            reps: 1,
            throughput_secs: 3,
            latency_secs: 5,
            connrate_secs: 3,
            connect_count: 500,
            idle_pods: [0, 10, 30],
            scale_workloads: 2_000,
            scale_rules: 20_000,
            waypoint_max_secs: 5,
            ..Sizes::full()
        }
    }

    /// Tiny sizes: the smoke test of the bench code itself.
    pub fn smoke() -> Sizes {
        Sizes {
            reps: 1,
            throughput_secs: 1,
            latency_secs: 1,
            latency_rate: 200,
            latency_conns: 2,
            connrate_secs: 1,
            connect_count: 20,
            idle_pods: [0, 1, 2],
            scale_workloads: 50,
            scale_rules: 200,
            restart_streams: 2,
            applies: 3,
            waypoint_max_conns: 2,
            waypoint_max_secs: 1,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub sizes: Sizes,
    pub bins: Binaries,
    /// Run only these sections (empty: all).
    pub only: Vec<Section>,
}

/// The report's sections, to run a few of them during development.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    DataPath,
    Scale,
    Restart,
    Hostile,
    ControlPlane,
    Waypoint,
}

/// Runs every measurement and returns the report (not yet written).
pub fn run(options: &Options) -> anyhow::Result<Report> {
    let mut figures = Vec::new();
    let started = std::time::Instant::now();
    let runs = |s: Section| options.only.is_empty() || options.only.contains(&s);
    if runs(Section::DataPath) {
        figures.extend(measure::data_path(options)?);
    }
    if runs(Section::Scale) {
        figures.extend(measure::idle_and_policy_scale(options)?);
    }
    if runs(Section::Restart) {
        figures.extend(restart::restarts(options)?);
    }
    if runs(Section::Hostile) {
        figures.extend(hostile::hostile(options)?);
    }
    if runs(Section::ControlPlane) {
        figures.extend(control_plane::apply_to_enforced(options)?);
    }
    if runs(Section::Waypoint) {
        figures.extend(waypoint::waypoint(options)?);
    }
    Ok(Report::new(options, figures, started.elapsed()))
}
