//! Where the waypoint's configuration comes from: YAML resources (files or directories) read
//! with `palisade_model`'s loader, validated as a whole, then compiled twice — the L7
//! configuration of this waypoint (`compile_waypoints`) and the L4 `Snapshot` the
//! destination's policy is checked against ([`L4Policy`]). The files are polled; a change is
//! put in force only when it loads, validates and compiles; otherwise it is logged (once per
//! distinct problem) and the last good configuration stays, as ztunnel's policy source does.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
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
/// snapshot in force. Decisions are remembered until the snapshot changes: a keep-alive
/// client asks the same question (its identity and address, the same few endpoints) on
/// every request, and parsing the identity and walking the policy was 3 % of the waypoint's
/// CPU at 1,000 req/s. The memory is bounded ([`DECISIONS_KEPT`]) and only ever costs a
/// recomputation when it is cleared.
pub struct L4Policy {
    state: Mutex<State>,
    trust_domain: String,
}

/// Decisions kept per snapshot; more clear them all (a flood of new sources cannot grow it).
const DECISIONS_KEPT: usize = 4096;

/// `Err`: the rule that refused.
type Verdict = Result<(), String>;

struct State {
    snapshot: Arc<Snapshot>,
    /// Under `snapshot`: by the client's identity, then by (client address, endpoint), the
    /// verdict.
    decided: HashMap<String, HashMap<(IpAddr, SocketAddr), Verdict>>,
    kept: usize,
}

impl L4Policy {
    pub fn new(snapshot: Snapshot, trust_domain: &str) -> Arc<Self> {
        let state = State { snapshot: Arc::new(snapshot), decided: HashMap::new(), kept: 0 };
        Arc::new(L4Policy { state: Mutex::new(state), trust_domain: trust_domain.into() })
    }

    pub fn replace(&self, snapshot: Snapshot) {
        *self.lock() = State { snapshot: Arc::new(snapshot), decided: HashMap::new(), kept: 0 };
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The verdict of `snapshot` for `identity` at `from` reaching `to`.
    fn decide(&self, snapshot: &Snapshot, identity: &str, from: IpAddr, to: SocketAddr) -> Verdict {
        // Identity comes from the client's certificate only; without one nothing is reached.
        let Ok(id) = identity.parse::<SpiffeId>() else {
            return Err("no proven workload identity".into());
        };
        if id.trust_domain != self.trust_domain {
            return Err(format!("{id} is outside trust domain {}", self.trust_domain));
        }
        // As the destination's ztunnel decides a tunnel from the client: the proven identity
        // must be the workload at the client's address, then the policies of both ends.
        let d = snapshot.authorize(from, Some((&id.namespace, &id.service_account)), to.ip(), to.port());
        if d.verdict.action == Action::Allow {
            return Ok(());
        }
        Err(snapshot.describe_rule(d.verdict.rule, d.verdict.dst_identity))
    }
}

impl Admission for L4Policy {
    fn admit(&self, down: &Downstream, endpoint: &BackendEndpoint) -> Result<(), Refusal> {
        let refused = |rule: String| Refusal { endpoint: endpoint.address, rule };
        let Some(identity) = down.identity.as_deref() else {
            return Err(refused("no proven workload identity".into()));
        };
        let key = (down.peer.ip(), endpoint.address);
        let snapshot = {
            let state = self.lock();
            if let Some(known) = state.decided.get(identity).and_then(|d| d.get(&key)) {
                return known.clone().map_err(refused);
            }
            Arc::clone(&state.snapshot)
        };
        let verdict = self.decide(&snapshot, identity, key.0, key.1);
        let mut state = self.lock();
        // Kept only if no newer snapshot came in while this one decided.
        if Arc::ptr_eq(&state.snapshot, &snapshot) {
            if state.kept >= DECISIONS_KEPT {
                state.decided.clear();
                state.kept = 0;
            }
            state.decided.entry(identity.to_string()).or_default().insert(key, verdict.clone());
            state.kept += 1;
        }
        verdict.map_err(refused)
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

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "cluster.local";

    /// `web` in `shop`, `frontend` in `front`; `allow_front` adds a policy that admits it.
    fn snapshot(allow_front: bool) -> Snapshot {
        let mut yaml = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: front}\n---\n\
             apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {name: web-0, namespace: shop}\n\
             spec: {serviceAccount: web, node: n1, addresses: [10.1.0.2], labels: {app: web}}\n---\n\
             apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {name: fe-0, namespace: front}\n\
             spec: {serviceAccount: frontend, node: n1, addresses: [10.1.0.3], labels: {app: fe}}\n---\n\
             apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: web-in, namespace: shop}\n\
             spec: {selector: {matchLabels: {app: web}}, action: Allow, rules: [{from: [{namespace: nobody}], ports: [80]}]}\n",
        );
        if allow_front {
            yaml.push_str(
                "---\napiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\n\
                 metadata: {name: web-from-front, namespace: shop}\n\
                 spec: {selector: {matchLabels: {app: web}}, action: Allow, \
                 rules: [{from: [{namespace: front, serviceAccount: frontend}], ports: [80]}]}\n",
            );
        }
        let resources = parse_str(std::path::Path::new("test.yaml"), &yaml).unwrap();
        compile_with(&resources, TD, &Identities::default())
    }

    #[test]
    fn remembered_decisions_follow_the_snapshot_in_force() {
        let l4 = L4Policy::new(snapshot(true), TD);
        let web = BackendEndpoint {
            workload: "shop/web-0".into(),
            address: "10.1.0.2:80".parse().unwrap(),
            identity: format!("spiffe://{TD}/ns/shop/sa/web"),
        };
        let front = Downstream {
            peer: "10.1.0.3:40000".parse().unwrap(),
            identity: Some(format!("spiffe://{TD}/ns/front/sa/frontend").into()),
            destination: "10.96.0.10:80".parse().unwrap(),
        };
        // Asked twice: the second answer is the remembered one, and the same.
        assert_eq!(l4.admit(&front, &web), Ok(()));
        assert_eq!(l4.admit(&front, &web), Ok(()));
        // The same identity from another address is another question.
        let elsewhere = Downstream { peer: "10.1.0.9:40000".parse().unwrap(), ..front.clone() };
        assert!(l4.admit(&elsewhere, &web).is_err());
        // A new snapshot forgets every decision: the allow is gone at once.
        l4.replace(snapshot(false));
        let refused = l4.admit(&front, &web).unwrap_err();
        assert_eq!(refused.endpoint, web.address);
        assert!(refused.rule.contains("shop"), "{refused}");
        assert_eq!(l4.admit(&front, &web).unwrap_err(), refused);
        l4.replace(snapshot(true));
        assert_eq!(l4.admit(&front, &web), Ok(()));
        // Without a proven identity nothing is reached.
        assert!(l4.admit(&Downstream { identity: None, ..front }, &web).is_err());
    }
}
