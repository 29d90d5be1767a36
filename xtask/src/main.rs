//! `cargo xtask`: orchestration only — toolchain set-up, the sandbox cluster, the demo, the
//! test suite. The product's logic lives in the crates it drives.
mod bench;
mod demo;
mod fuzz;
mod sandbox;
mod setup;
mod test;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Palisade developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install everything the build and tests need (idempotent).
    Setup,
    /// Build ztunnel (with its kernel programs), waypoint, palisade and the probe.
    Build,
    /// The sandbox cluster: nodes and pods as network namespaces on this machine.
    Sandbox {
        #[command(subcommand)]
        command: sandbox::SandboxCommand,
    },
    /// Bring up a sandbox, show an allowed and a denied flow with their flow events, tear down.
    Demo,
    /// Measure the data path against the no-mesh baseline (report in target/bench; a full run
    /// also updates BENCHMARKS.md).
    Bench {
        /// A short run for comparisons during development.
        #[arg(long)]
        quick: bool,
        /// Only these sections (data-path, scale, restart, hostile, control-plane); the report
        /// is written to target/bench only, never to BENCHMARKS.md.
        #[arg(long, value_delimiter = ',')]
        only: Vec<palisade_bench::Section>,
    },
    /// Fuzz the parsers and the policy compiler with cargo-fuzz (nightly; installs cargo-fuzz
    /// when missing). Fails when a target finds a crash, a timeout or an out-of-memory input.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// One target (policy_load, policy_compile, enroll_request, hbone_connect); all by default.
        target: Option<String>,
    },
    /// The whole suite: formatting, clippy, unit and end-to-end tests.
    Test {
        /// Extra arguments for the test runner (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Runs a command in the workspace root, failing when it fails.
pub fn cmd(program: &str, args: &[&str]) -> anyhow::Result<()> {
    eprintln!("$ {program} {}", args.join(" "));
    let status = std::process::Command::new(program).args(args).current_dir(root()).status()?;
    anyhow::ensure!(status.success(), "{program} {} failed ({status})", args.join(" "));
    Ok(())
}

/// Builds every binary the sandbox runs.
pub fn build() -> anyhow::Result<()> {
    cmd("cargo", &["build", "--quiet", "--bins"])
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Setup) {
        setup::ensure()?;
    }
    match cli.command {
        Command::Setup => setup::run(),
        Command::Build => build(),
        Command::Sandbox { command } => sandbox::run(command),
        Command::Demo => demo::run(),
        Command::Bench { quick, only } => bench::run(quick, &only),
        Command::Fuzz { secs, target } => fuzz::run(secs, target),
        Command::Test { args } => test::run(&args),
    }
}
