//! `cargo xtask bench [--quick] [--only section,…]`: builds release binaries, runs `palisade_bench`, writes
//! target/bench/report.{md,json}; a full run also rewrites BENCHMARKS.md (the report followed
//! by the hand-written analysis in bench/ANALYSIS.md).
use anyhow::Result;
use palisade_bench::{Binaries, Options, Sizes};

use crate::{cmd, root};

pub fn run(quick: bool, only: &[palisade_bench::Section]) -> Result<()> {
    cmd("cargo", &["build", "--quiet", "--release", "--bins"])?;
    let release = root().join("target/release");
    let options = Options {
        sizes: if quick { Sizes::quick() } else { Sizes::full() },
        only: only.to_vec(),
        bins: Binaries {
            ztunnel: release.join("ztunnel"),
            palisade: release.join("palisade"),
            probe: release.join("palisade-probe"),
        },
    };
    let report = palisade_bench::run(&options)?;
    let out = root().join("target/bench");
    palisade_bench::write(&report, &out)?;
    let markdown = report.markdown();
    println!("{markdown}");
    println!("written: {} and report.json", out.join("report.md").display());
    if !quick && only.is_empty() {
        let analysis = std::fs::read_to_string(root().join("bench/ANALYSIS.md")).unwrap_or_default();
        std::fs::write(root().join("BENCHMARKS.md"), format!("{markdown}\n{analysis}"))?;
        println!("BENCHMARKS.md updated");
    }
    Ok(())
}
