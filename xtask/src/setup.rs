//! `cargo xtask setup`: installs, idempotently, what a fresh machine lacks, and says what it
//! did and what was already there. Versions are the ones verified in TOOLCHAIN.md.
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd;

/// Debian packages: iproute2 (netns, veth, bridge), bpftool (inspecting programs),
/// iperf3 (benchmarks), tshark (proving what crosses the wire), etcd-server (the store of a
/// highly available control plane: the tests and `sandbox up --store etcd` run the real one),
/// etcd-client (`etcdctl`, to look into that store), protobuf-compiler and libprotobuf-dev
/// (`protoc` and the well-known `.proto` files it imports: the `etcd-client` crate generates
/// its gRPC code from etcd's protos at build time), haproxy (the waypoint's benchmark compares
/// against it in the same role).
const PACKAGES: &[&str] = &[
    "iproute2",
    "bpftool",
    "iperf3",
    "tshark",
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "libprotobuf-dev",
    "haproxy",
];
const BPF_LINKER: &str = "0.10.0";

fn quiet_ok(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).output().is_ok_and(|o| o.status.success())
}

fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .copied()
        .filter(|p| !output("dpkg-query", &["-W", "-f=${Status}", p]).contains("install ok installed"))
        .collect()
}

fn has_rust_src() -> bool {
    output("rustup", &["component", "list", "--toolchain", "nightly", "--installed"])
        .lines()
        .any(|l| l.starts_with("rust-src"))
}

fn has_bpf_linker() -> bool {
    output("bpf-linker", &["--version"]).contains(BPF_LINKER)
}

/// Runs the set-up only when something is missing (every other command calls this).
pub fn ensure() -> Result<()> {
    if missing_packages().is_empty() && has_rust_src() && has_bpf_linker() {
        return Ok(());
    }
    run()
}

pub fn run() -> Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        println!("setup: Debian packages already there: {}", PACKAGES.join(", "));
    } else {
        println!("setup: installing Debian packages: {}", missing.join(", "));
        cmd("apt-get", &["update", "-qq"])?;
        let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
        args.extend(&missing);
        // tshark asks whether non-root users may capture; answer for it.
        let status = Command::new("apt-get")
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("apt-get install")?;
        anyhow::ensure!(status.success(), "apt-get install {} failed", missing.join(" "));
    }
    if !quiet_ok("rustup", &["run", "nightly", "rustc", "--version"]) {
        println!("setup: installing the nightly toolchain");
        cmd("rustup", &["toolchain", "install", "nightly", "--profile", "minimal"])?;
    }
    if has_rust_src() {
        println!("setup: rust-src for nightly already there");
    } else {
        println!("setup: adding rust-src to the nightly toolchain");
        cmd("rustup", &["component", "add", "rust-src", "--toolchain", "nightly"])?;
    }
    if has_bpf_linker() {
        println!("setup: bpf-linker {BPF_LINKER} already there");
    } else {
        println!("setup: installing bpf-linker {BPF_LINKER} (about a minute)");
        cmd("cargo", &["install", &format!("bpf-linker@{BPF_LINKER}"), "--locked", "--force"])?;
    }
    println!("setup: done");
    Ok(())
}
