//! `cargo xtask test`: the whole suite — formatting, clippy, unit tests and the end-to-end
//! tests on sandbox clusters — then a check that no test left anything behind, and the demo
//! (a newcomer's first command must keep working; it fails when its story does not happen).
use anyhow::{Result, bail};

use crate::cmd;

pub fn run(extra: &[String]) -> Result<()> {
    let removed = palisade_sandbox::sweep_stale_test_clusters()?;
    if !removed.is_empty() {
        println!("removed clusters of earlier, interrupted test runs: {}", removed.join(", "));
    }
    cmd("cargo", &["fmt", "--all", "--check"])?;
    cmd("cargo", &["clippy", "--quiet", "--all-targets", "--", "-D", "warnings"])?;
    crate::build()?;
    let nextest =
        std::process::Command::new("cargo").args(["nextest", "--version"]).output().is_ok_and(|o| o.status.success());
    let mut args: Vec<&str> =
        if nextest { vec!["nextest", "run", "--no-fail-fast"] } else { vec!["test", "--no-fail-fast"] };
    args.extend(extra.iter().map(String::as_str));
    cmd("cargo", &args)?;
    let left: Vec<String> = palisade_sandbox::cluster::list_netns()?
        .into_iter()
        .filter(|n| n.starts_with(&format!("{}t", palisade_sandbox::cluster::PREFIX)))
        .collect();
    if !left.is_empty() {
        bail!("tests left network namespaces behind: {}", left.join(", "));
    }
    println!("all tests passed; nothing left behind");
    crate::demo::run()?;
    Ok(())
}
