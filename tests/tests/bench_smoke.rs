//! The benchmark code itself, run with tiny sizes: every figure is produced and the report is
//! written. It checks that the bench works, never how fast anything is.
mod support;

use palisade_bench::{Binaries, Options, Sizes};
use support::require_root;

#[test]
fn the_benchmark_runs_end_to_end_with_tiny_sizes() {
    require_root();
    let bin = |name: &str| palisade_sandbox::workspace_bin(name).unwrap();
    let options = Options {
        sizes: Sizes::smoke(),
        bins: Binaries { ztunnel: bin("ztunnel"), palisade: bin("palisade"), probe: bin("palisade-probe") },
        only: vec![],
    };
    let report = palisade_bench::run(&options).unwrap_or_else(|e| panic!("bench: {e:#}"));
    let names: Vec<&String> = report.figures.iter().map(|f| &f.name).collect();
    // The data path, idle and scale sections (21 figures), restarts (5), hostile peers (8) and
    // the control plane (3 on a small cluster, 3 with the scale policy in the store) and the
    // waypoint (5 at a fixed rate, 1 against haproxy).
    assert_eq!(report.figures.len(), 46, "{names:#?}");
    let restart: Vec<&String> = report.figures.iter().filter(|f| f.group == "restart").map(|f| &f.name).collect();
    assert_eq!(restart.len(), 5, "{names:#?}");
    for f in &report.figures {
        assert!(f.mesh.median.is_finite() && f.mesh.median >= 0.0, "{}: {:?}", f.name, f.mesh);
        if let Some(b) = &f.baseline {
            assert!(b.median.is_finite() && b.median > 0.0, "{} baseline: {:?}", f.name, b);
        }
    }
    let dir = std::env::temp_dir().join(format!("plsd-bench-smoke-{}", std::process::id()));
    palisade_bench::write(&report, &dir).unwrap();
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("| one stream | Gbit/s |"), "{md}");
    assert!(dir.join("report.json").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
