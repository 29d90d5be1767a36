//! Palisade's policy model: resources (YAML), validation, and compilation to snapshots that
//! ztunnel loads into the kernel. The verdict algorithm lives here once ([`Snapshot::verdict`])
//! and is used by ztunnel, by tests and by `palisade explain`.
pub mod cidr;
pub mod compile;
pub mod k8s;
pub mod key;
pub mod load;
pub mod matching;
pub mod resource;
pub mod validate;
pub mod waypoint;

use std::path::PathBuf;

pub use compile::{Decision, Snapshot, Verdict, compile};
pub use resource::{Action, Mode};

/// Everything that can go wrong turning files into a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Load(#[from] load::LoadError),
    #[error(transparent)]
    Invalid(#[from] validate::Invalid),
}

/// Loads, validates and compiles the resources in `paths` (files or directories).
pub fn load_snapshot(paths: &[PathBuf]) -> Result<Snapshot, ConfigError> {
    load_snapshot_for(paths, compile::DEFAULT_TRUST_DOMAIN)
}

/// As [`load_snapshot`], for a mesh whose trust domain is not the default.
pub fn load_snapshot_for(paths: &[PathBuf], trust_domain: &str) -> Result<Snapshot, ConfigError> {
    load_snapshot_with(paths, trust_domain, &compile::Identities::default())
}

/// As [`load_snapshot_for`], with identity numbers assigned by the control plane.
pub fn load_snapshot_with(
    paths: &[PathBuf],
    trust_domain: &str,
    identities: &compile::Identities,
) -> Result<Snapshot, ConfigError> {
    // Every problem of every file, each at its field's line (not only the first one).
    let batch = load::load_batch(paths)?;
    validate::validate_batch(&batch)?;
    Ok(compile::compile_with(&batch.resources, trust_domain, identities))
}
