//! `cargo xtask fuzz [--secs N] [TARGET]`: builds the cargo-fuzz targets of `fuzz/` with
//! nightly, runs each (or one) for a bounded time, one after the other on one worker, and
//! reports the inputs executed and the findings. A finding (a crash, a timeout or an
//! out-of-memory input, saved by libFuzzer under fuzz/artifacts/<target>/) fails the command.
//! Not part of `cargo xtask test`: it needs minutes per target.
//!
//! The committed seeds (fuzz/corpus/<target>/) are only read; what the fuzzer learns goes to
//! target/fuzz-corpus/<target>/, so later runs start from it without touching the repository.
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

use crate::{cmd, root};

pub const TARGETS: &[&str] = &["policy_load", "policy_compile", "enroll_request", "hbone_connect"];
/// Memory a run may use before libFuzzer reports the input as an out-of-memory finding.
const RSS_LIMIT_MB: u32 = 2048;
/// One input running longer than this is a finding (parsers must stay near-linear).
const INPUT_TIMEOUT_SECS: u32 = 10;

/// Arguments common to `cargo fuzz build` and `run`. No sanitizer: the code under test is safe
/// Rust, and AddressSanitizer would halve the executions; debug assertions catch overflows.
const BUILD_ARGS: &[&str] = &["--sanitizer", "none", "--debug-assertions"];

/// What one target's run came to.
struct Outcome {
    target: &'static str,
    executions: Option<u64>,
    new_artifacts: Vec<PathBuf>,
    succeeded: bool,
    log: PathBuf,
}

pub fn run(secs: u64, only: Option<String>) -> Result<()> {
    ensure!(secs > 0, "--secs must be at least 1");
    let targets: Vec<&'static str> = match only {
        None => TARGETS.to_vec(),
        Some(name) => match TARGETS.iter().find(|t| **t == name) {
            Some(t) => vec![*t],
            None => bail!("no fuzz target {name:?}; the targets are {}", TARGETS.join(", ")),
        },
    };
    ensure_cargo_fuzz()?;
    // `cargo fuzz build` takes one target or none (all of them).
    let one = if targets.len() == 1 { &targets[..] } else { &[] };
    let build: Vec<String> = ["build"].iter().chain(BUILD_ARGS).chain(one).map(|s| s.to_string()).collect();
    let status = cargo_fuzz(&build).status().context("run cargo fuzz build")?;
    ensure!(status.success(), "cargo +nightly fuzz build failed ({status})");
    let mut outcomes = Vec::new();
    for target in targets {
        outcomes.push(run_target(target, secs)?);
    }
    println!("\nfuzzing, {secs} s per target:");
    println!("{:<16} {:>14}  findings", "target", "executions");
    for o in &outcomes {
        let executions = o.executions.map_or("?".to_string(), |n| n.to_string());
        let findings = if o.new_artifacts.is_empty() && o.succeeded {
            "none".to_string()
        } else if o.new_artifacts.is_empty() {
            format!("the run failed without an artifact; see {}", o.log.display())
        } else {
            o.new_artifacts.iter().map(|a| a.display().to_string()).collect::<Vec<_>>().join(", ")
        };
        println!("{:<16} {executions:>14}  {findings}", o.target);
    }
    let failed: Vec<&str> =
        outcomes.iter().filter(|o| !o.succeeded || !o.new_artifacts.is_empty()).map(|o| o.target).collect();
    ensure!(
        failed.is_empty(),
        "fuzzing found problems in {}: reproduce with `cargo +nightly fuzz run <target> <artifact>`, fix, and add \
         the input to fuzz/corpus/<target>/",
        failed.join(", ")
    );
    Ok(())
}

/// `cargo +nightly fuzz <args>` in the workspace root. The kernel programs are no part of
/// what is fuzzed: ztunnel's build script writes an empty object instead of building them
/// (a second nightly build that would also inherit the fuzzer's compiler flags).
fn cargo_fuzz(args: &[String]) -> Command {
    eprintln!("$ cargo +nightly fuzz {}", args.join(" "));
    let mut command = Command::new("cargo");
    command.args(["+nightly", "fuzz"]).args(args).current_dir(root()).env("PALISADE_EBPF_STUB", "1");
    command
}

/// Installs cargo-fuzz when `cargo +nightly fuzz` is not there.
fn ensure_cargo_fuzz() -> Result<()> {
    let works =
        || Command::new("cargo").args(["+nightly", "fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if works() {
        return Ok(());
    }
    println!("fuzz: installing cargo-fuzz (a few minutes)");
    cmd("cargo", &["install", "cargo-fuzz", "--locked"])?;
    ensure!(works(), "cargo-fuzz was installed but `cargo +nightly fuzz --version` still fails");
    Ok(())
}

fn files_in(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default()
}

fn run_target(target: &'static str, secs: u64) -> Result<Outcome> {
    let root = root();
    let seeds = root.join("fuzz/corpus").join(target);
    let grown = root.join("target/fuzz-corpus").join(target);
    let artifacts = root.join("fuzz/artifacts").join(target);
    let logs = root.join("target/fuzz-logs");
    for dir in [&grown, &artifacts, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let before = files_in(&artifacts);
    let log_path = logs.join(format!("{target}.log"));
    let mut log = std::fs::File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let libfuzzer = [
        format!("-max_total_time={secs}"),
        format!("-rss_limit_mb={RSS_LIMIT_MB}"),
        format!("-timeout={INPUT_TIMEOUT_SECS}"),
        "-print_final_stats=1".to_string(),
    ];
    let mut args: Vec<String> = ["run"].iter().chain(BUILD_ARGS).map(|s| s.to_string()).collect();
    args.push(target.into());
    // The first corpus directory receives new inputs; the seeds are only read.
    args.push(grown.display().to_string());
    args.push(seeds.display().to_string());
    args.push("--".into());
    args.extend(libfuzzer);
    println!("\n== fuzz {target} for {secs} s (log: {})", log_path.display());
    let mut child =
        cargo_fuzz(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("start cargo fuzz run")?;
    // libFuzzer reports on stderr; cargo fuzz's own messages go to stdout. Both go to the log.
    let stdout = child.stdout.take().expect("piped stdout");
    let copy_stdout =
        std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<_>>());
    let mut executions = None;
    for line in BufReader::new(child.stderr.take().expect("piped stderr")).lines() {
        let line = line.context("read the fuzzer's output")?;
        writeln!(log, "{line}")?;
        if let Some(n) = executed_units(&line) {
            executions = Some(n);
        }
        if is_notable(&line) {
            println!("   {line}");
        }
    }
    for line in copy_stdout.join().unwrap_or_default() {
        writeln!(log, "{line}")?;
    }
    let status = child.wait().context("wait for cargo fuzz run")?;
    let new_artifacts: Vec<PathBuf> = files_in(&artifacts).difference(&before).cloned().collect();
    Ok(Outcome { target, executions, new_artifacts, succeeded: status.success(), log: log_path })
}

/// The executions count of libFuzzer's last lines: `stat::number_of_executed_units: N`, or
/// `#N DONE ...`/`Done N runs in S second(s)` when the final statistics are missing.
fn executed_units(line: &str) -> Option<u64> {
    let line = line.trim();
    if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
        return n.trim().parse().ok();
    }
    if let Some(rest) = line.strip_prefix('#')
        && let Some((n, what)) = rest.split_once(char::is_whitespace)
        && what.trim_start().starts_with("DONE")
    {
        return n.parse().ok();
    }
    line.strip_prefix("Done ")?.split_whitespace().next()?.parse().ok()
}

/// Lines worth showing while the fuzzer runs: the start, the end, and anything found.
fn is_notable(line: &str) -> bool {
    [
        "INFO: Seed",
        "DONE",
        "Done ",
        "stat::number_of_executed_units",
        "ERROR",
        "panicked",
        "SUMMARY",
        "artifact_prefix",
        "Test unit written",
    ]
    .iter()
    .any(|m| line.contains(m))
}

#[cfg(test)]
mod tests {
    use super::executed_units;

    #[test]
    fn reads_the_executions_of_libfuzzers_last_lines() {
        assert_eq!(executed_units("stat::number_of_executed_units: 1234567"), Some(1234567));
        assert_eq!(
            executed_units("#98765\tDONE   cov: 812 ft: 2301 corp: 310/21Kb exec/s: 1646 rss: 71Mb"),
            Some(98765)
        );
        assert_eq!(executed_units("Done 98765 runs in 61 second(s)"), Some(98765));
        assert_eq!(executed_units("#4096\tpulse  cov: 700 ft: 1000 corp: 100/3Kb"), None);
        assert_eq!(executed_units("stat::peak_rss_mb: 71"), None);
    }
}
