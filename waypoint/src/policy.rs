//! Where the waypoint's configuration comes from: YAML resources (files or directories) read
//! with `palisade_model`'s loader, validated as a whole, then compiled twice — the L7
//! configuration of this waypoint (`compile_waypoints`) and the L4 `Snapshot` the
//! destination's policy is checked against ([`L4Policy`]). The files are polled; a change is
//! put in force only when it loads, validates and compiles; otherwise it is logged (once per
//! distinct problem) and the last good configuration stays, as ztunnel's policy source does.
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use palisade_mesh::identity::SpiffeId;
use palisade_model::compile::{Identities, compile_with};
use palisade_model::load::{ChangeDetector, LoadError, Located, load_batch, parse_str};
use palisade_model::validate::{Invalid, validate, validate_batch};
use palisade_model::waypoint::config::{BackendEndpoint, WaypointConfig};
use palisade_model::waypoint::{compile_waypoints, waypoint_index};
use palisade_model::{Action, Snapshot};

use crate::admission::{Admission, Refusal};
use crate::engine::{ConfigError, Downstream, Engine};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("no waypoint {name} (a Gateway of class palisade-waypoint) in the resources; known: [{}]", known.join(", "))]
    UnknownWaypoint { name: String, known: Vec<String> },
    #[error("waypoint {name} runs as {runs_as} in the resources, not as this waypoint's identity {identity}")]
    NotOurIdentity { name: String, runs_as: String, identity: String },
    #[error(transparent)]
    Engine(#[from] ConfigError),
}

/// One good read of the resources.
pub struct Loaded {
    pub config: WaypointConfig,
    pub snapshot: Snapshot,
}

/// Loads, validates and compiles `paths` for the waypoint `name` (`namespace/gateway`), which
/// runs as `identity`. Blocking (file reads, compilation).
pub fn load(paths: &[PathBuf], name: &str, identity: &SpiffeId) -> Result<Loaded, PolicyError> {
    let batch = load_batch(paths)?;
    for warning in validate_batch(&batch)? {
        tracing::warn!(%warning, "policy warning");
    }
    compile(&batch.resources, name, identity)
}

/// Validates and compiles resources pushed by the control plane (one YAML document per
/// resource, named by its key in errors), as [`load`] does files. Blocking.
pub fn load_documents<'a>(
    documents: impl IntoIterator<Item = (String, &'a str)>,
    name: &str,
    identity: &SpiffeId,
) -> Result<Loaded, PolicyError> {
    let mut resources = Vec::new();
    for (key, yaml) in documents {
        resources.extend(parse_str(std::path::Path::new(&key), yaml)?);
    }
    validate(&resources)?;
    compile(&resources, name, identity)
}

/// This waypoint's L7 configuration and the L4 snapshot, from validated resources.
fn compile(resources: &[Located], name: &str, identity: &SpiffeId) -> Result<Loaded, PolicyError> {
    let trust_domain = &identity.trust_domain;
    let mut configs = compile_waypoints(resources, trust_domain);
    let Some(config) = configs.remove(name) else {
        return Err(PolicyError::UnknownWaypoint { name: name.into(), known: configs.into_keys().collect() });
    };
    // The Gateway's workloads (its pods) must run as this process's identity: a waypoint
    // started with another Gateway's name would otherwise serve that Gateway's Services while
    // destinations accept only that Gateway's own identity.
    let index = waypoint_index(resources, trust_domain);
    let own = identity.to_string();
    if let Some(w) = index.waypoints.get(name)
        && let Some(other) = w.workloads.iter().find(|w| w.identity != own)
    {
        return Err(PolicyError::NotOurIdentity { name: name.into(), runs_as: other.identity.clone(), identity: own });
    }
    let snapshot = compile_with(resources, trust_domain, &Identities::default());
    Ok(Loaded { config, snapshot })
}

/// The destination's L4 policy against the original client's proven identity, from the
/// snapshot in force.
pub struct L4Policy {
    snapshot: RwLock<Arc<Snapshot>>,
    trust_domain: String,
}

impl L4Policy {
    pub fn new(snapshot: Snapshot, trust_domain: &str) -> Arc<Self> {
        Arc::new(L4Policy { snapshot: RwLock::new(Arc::new(snapshot)), trust_domain: trust_domain.into() })
    }

    pub fn replace(&self, snapshot: Snapshot) {
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
    }

    fn current(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.read().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Admission for L4Policy {
    fn admit(&self, down: &Downstream, endpoint: &BackendEndpoint) -> Result<(), Refusal> {
        let refuse = |rule: String| Err(Refusal { endpoint: endpoint.address, rule });
        // Identity comes from the client's certificate only; without one nothing is reached.
        let Some(id) = down.identity.as_deref().and_then(|i| i.parse::<SpiffeId>().ok()) else {
            return refuse("no proven workload identity".into());
        };
        if id.trust_domain != self.trust_domain {
            return refuse(format!("{id} is outside trust domain {}", self.trust_domain));
        }
        let snapshot = self.current();
        let to = endpoint.address;
        // As the destination's ztunnel decides a tunnel from the client: the proven identity
        // must be the workload at the client's address, then the policies of both ends.
        let d = snapshot.authorize(down.peer.ip(), Some((&id.namespace, &id.service_account)), to.ip(), to.port());
        if d.verdict.action == Action::Allow {
            return Ok(());
        }
        refuse(snapshot.describe_rule(d.verdict.rule, d.verdict.dst_identity))
    }
}

/// Polls `paths` every `every`; a good change goes to `engine` and `l4`, a bad one is logged
/// and the last good configuration stays. `changes` has seen the files of the configuration
/// in force.
pub async fn watch(
    paths: Vec<PathBuf>,
    name: String,
    identity: SpiffeId,
    mut changes: ChangeDetector,
    engine: Engine,
    l4: Arc<L4Policy>,
    every: Duration,
) {
    let mut last_problem: Option<String> = None;
    loop {
        tokio::time::sleep(every).await;
        let (paths_, name_, identity_) = (paths.clone(), name.clone(), identity.clone());
        let polled = tokio::task::spawn_blocking(move || {
            let result = changes
                .poll()
                .map_err(PolicyError::from)
                .and_then(|changed| changed.then(|| load(&paths_, &name_, &identity_)).transpose());
            (changes, result)
        })
        .await;
        let Ok((returned, result)) = polled else { return };
        changes = returned;
        let result = result.and_then(|loaded| {
            let Some(loaded) = loaded else { return Ok(false) };
            let services = loaded.config.services.len();
            engine.update(loaded.config)?;
            l4.replace(loaded.snapshot);
            tracing::info!(waypoint = %name, services, "configuration in force");
            Ok(true)
        });
        match result {
            Ok(changed) => {
                if changed && let Some(p) = last_problem.take() {
                    tracing::info!(previous_problem = %p, "policy files good again");
                }
            }
            Err(e) => {
                let text = e.to_string();
                if last_problem.as_deref() != Some(text.as_str()) {
                    tracing::error!(problem = %text, "policy change refused; the last good configuration stays in force");
                    last_problem = Some(text);
                }
            }
        }
    }
}
