//! Builds Palisade's kernel programs (`ebpf/programs`) for `bpfel-unknown-none` with the nightly
//! toolchain and bpf-linker, and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//!
//! Under clippy (or with PALISADE_EBPF_STUB=1) an empty object is written instead so that lints
//! stay fast; such a binary refuses to start. The kernel build has its own target directory
//! (`target/ebpf`), so it is incremental and never contends for the host build's lock.
use std::{env, path::PathBuf, process::Command};

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let object = out_dir.join("palisade-ebpf.o");
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let workspace = manifest_dir.parent().expect("workspace root").to_path_buf();
    for path in ["ebpf/programs/src", "ebpf/programs/Cargo.toml", "ebpf/common/src"] {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }
    println!("cargo:rerun-if-env-changed=PALISADE_EBPF_STUB");

    let under_clippy = env::var("RUSTC_WORKSPACE_WRAPPER").is_ok_and(|w| w.contains("clippy"));
    if under_clippy || env::var("PALISADE_EBPF_STUB").is_ok_and(|v| v == "1") {
        std::fs::write(&object, []).expect("write stub object");
        return;
    }

    let target_dir = workspace.join("target/ebpf");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&workspace)
        .args(["+nightly", "build", "--release", "--package", "palisade-ebpf"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer cargo's settings describe the host build; none of them apply here.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("CARGO_PROFILE_RELEASE_PANIC", "abort");
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run `cargo +nightly` to build the kernel programs ({e}); run `cargo xtask setup`")
    });
    if !status.success() {
        panic!(
            "building the kernel programs failed ({status}); `cargo xtask setup` installs the \
             nightly rust-src and bpf-linker they need"
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release/palisade-ebpf");
    std::fs::copy(&built, &object).unwrap_or_else(|e| panic!("copy {} to {}: {e}", built.display(), object.display()));
}
