//! The CA's view of which workload runs on which node, kept as the last good parse of the
//! inventory files. Signing requests read it without touching the files; a refresh (every
//! [`REFRESH_EVERY`], or at once when a node asks for an identity the current view does not
//! give it, so a pod scheduled a moment ago gets its certificate) re-reads the files only when
//! they changed. A bad inventory is logged once and counted, and the previous one stays in
//! use: a typo in a ConfigMap must not stop every certificate renewal in the mesh.
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use palisade_mesh::identity::SpiffeId;

use palisade_model::load::{ChangeDetector, Located, Origin, load_paths};
use palisade_model::resource::Resource;
use palisade_model::waypoint::attach::attachments;
use palisade_model::waypoint::config::{GATEWAY_NAME_LABEL, WAYPOINT_GATEWAY_CLASS};

/// How often the inventory files are checked for changes.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// node → the (namespace, service account) pairs of the workloads scheduled on it; and the
/// identities waypoints run as, which may renew their own certificates (see `server`).
#[derive(Debug, Default)]
pub struct Schedule {
    by_node: HashMap<String, HashSet<(String, String)>>,
    /// (namespace, service account) of every waypoint (a `Gateway` of class
    /// palisade-waypoint) whose Workloads all run as that one identity.
    waypoints: HashSet<(String, String)>,
    workloads: usize,
}

impl Schedule {
    pub fn from_resources(resources: &[Located]) -> Schedule {
        Schedule::of(resources.iter().map(|l| &l.resource))
    }

    pub fn of<'a>(resources: impl IntoIterator<Item = &'a Resource>) -> Schedule {
        let resources: Vec<&Resource> = resources.into_iter().collect();
        let mut schedule = Schedule::default();
        for r in resources.iter().copied() {
            if let Resource::Workload { metadata, spec, .. } = r
                && let Some(ns) = &metadata.namespace
            {
                schedule
                    .by_node
                    .entry(spec.node.clone())
                    .or_default()
                    .insert((ns.clone(), spec.service_account.clone()));
                schedule.workloads += 1;
            }
        }
        schedule.waypoints = waypoint_identities(resources);
        schedule
    }

    /// Whether `id` is the identity a waypoint's Workloads run as.
    pub fn is_waypoint(&self, id: &SpiffeId) -> bool {
        self.waypoints.contains(&(id.namespace.clone(), id.service_account.clone()))
    }

    /// Whether a workload with `id`'s namespace and service account is scheduled on `node`.
    pub fn allows(&self, node: &str, id: &SpiffeId) -> bool {
        self.by_node.get(node).is_some_and(|ids| ids.contains(&(id.namespace.clone(), id.service_account.clone())))
    }
}

/// The identities of waypoints, by the model's own rule for which Workloads are a Gateway's
/// (`palisade_model::waypoint::attachments`) and the control plane's for admitting a waypoint:
/// a Gateway counts when it has Workloads and every one runs as the same identity. Only the
/// Gateways and the Workloads carrying the gateway-name label are copied for the model's
/// input, so a large inventory costs little more than its waypoints.
fn waypoint_identities<'a>(resources: impl IntoIterator<Item = &'a Resource>) -> HashSet<(String, String)> {
    let origin = Origin { file: "inventory".into(), line: 0 };
    let relevant: Vec<Located> = resources
        .into_iter()
        .filter(|r| match r {
            Resource::Gateway { spec, .. } => spec.gateway_class_name == WAYPOINT_GATEWAY_CLASS,
            Resource::Workload { metadata, spec, .. } => {
                metadata.labels.contains_key(GATEWAY_NAME_LABEL) || spec.labels.contains_key(GATEWAY_NAME_LABEL)
            }
            _ => false,
        })
        .map(|r| Located { origin: origin.clone(), resource: r.clone() })
        .collect();
    let mut out = HashSet::new();
    for w in attachments(&relevant).waypoints.values() {
        let mut accounts = w.workloads.iter().map(|(_, spec)| spec.service_account.as_str());
        let Some(first) = accounts.next() else { continue };
        if accounts.all(|sa| sa == first) {
            out.insert((w.namespace.to_string(), first.to_string()));
        }
    }
    out
}

struct Refresh {
    changes: ChangeDetector,
    last_check: Option<Instant>,
    /// The failure last logged, so a lasting one is logged once, not on every check.
    last_error: Option<String>,
    /// `last_error` came from reading the files, not from their content.
    unreadable: bool,
}

pub struct Inventory {
    paths: Vec<PathBuf>,
    /// Fed by its owner ([`Inventory::fed`]) rather than read from files.
    fed: bool,
    current: RwLock<Option<Arc<Schedule>>>,
    /// Serialises refreshes; never held together with the CA's lock.
    refresh: Mutex<Refresh>,
    errors: AtomicU64,
}

impl Inventory {
    /// Reads the inventory once; a failure is logged and retried by later refreshes.
    pub fn new(paths: Vec<PathBuf>) -> Inventory {
        let inventory = Inventory {
            current: RwLock::new(None),
            refresh: Mutex::new(Refresh {
                changes: ChangeDetector::new(paths.clone()),
                last_check: None,
                last_error: None,
                unreadable: false,
            }),
            paths,
            fed: false,
            errors: AtomicU64::new(0),
        };
        inventory.refresh(true);
        inventory
    }

    /// An inventory its owner keeps current with [`Inventory::feed`]: `palisade serve`
    /// serving the CA feeds it the workloads of the resources in force, whatever the store
    /// (etcd included), so the CA and the push never disagree on which workload is where.
    pub fn fed() -> Inventory {
        Inventory {
            paths: vec![],
            fed: true,
            current: RwLock::new(None),
            refresh: Mutex::new(Refresh {
                changes: ChangeDetector::new(vec![]),
                last_check: None,
                last_error: Some("the control plane has no resources in force yet".into()),
                unreadable: false,
            }),
            errors: AtomicU64::new(0),
        }
    }

    /// Replaces the schedule of a [`fed`](Inventory::fed) inventory.
    pub fn feed(&self, schedule: Schedule) {
        tracing::debug!(workloads = schedule.workloads, nodes = schedule.by_node.len(), "workload inventory fed");
        *self.current.write().expect("inventory lock") = Some(Arc::new(schedule));
        self.refresh.lock().expect("inventory refresh lock").last_error = None;
    }

    /// The last good schedule, if any inventory was ever read.
    pub fn current(&self) -> Option<Arc<Schedule>> {
        self.current.read().expect("inventory lock").clone()
    }

    /// Inventories found bad (unreadable, over a limit, invalid YAML) since start.
    pub fn errors_total(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The current failure, if the files are bad right now.
    pub fn last_error(&self) -> Option<String> {
        self.refresh.lock().expect("inventory refresh lock").last_error.clone()
    }

    /// Re-reads the files if they changed. Unless `now`, does nothing when the last check is
    /// younger than [`REFRESH_EVERY`]. Blocking: call it from a blocking thread.
    pub fn refresh(&self, now: bool) {
        if self.fed {
            return;
        }
        let mut state = self.refresh.lock().expect("inventory refresh lock");
        let loaded = self.current().is_some();
        // Without a good inventory every request would re-parse the files: keep to the pace.
        let fresh = state.last_check.is_some_and(|t| t.elapsed() < REFRESH_EVERY);
        if fresh && (!now || !loaded) {
            return;
        }
        state.last_check = Some(Instant::now());
        let polled = state.changes.poll();
        let unreadable = polled.is_err();
        let result = polled.and_then(|changed| match changed || !loaded {
            true => load_paths(&self.paths).map(|r| Some(Schedule::from_resources(&r))),
            false => Ok(None),
        });
        match result {
            Ok(None) => {
                // Files that were unreadable are back as they were (a bad content stays bad).
                if state.unreadable {
                    state.last_error = None;
                    state.unreadable = false;
                }
            }
            Ok(Some(schedule)) => {
                tracing::info!(
                    workloads = schedule.workloads,
                    nodes = schedule.by_node.len(),
                    "workload inventory loaded"
                );
                *self.current.write().expect("inventory lock") = Some(Arc::new(schedule));
                state.last_error = None;
                state.unreadable = false;
            }
            Err(e) => {
                let message = e.to_string();
                if state.last_error.as_deref() != Some(message.as_str()) {
                    let errors_total = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
                    let keeping = if loaded { "the last good inventory stays in use" } else { "no inventory yet" };
                    tracing::error!(error = %message, errors_total, "workload inventory unusable: {keeping}");
                    state.last_error = Some(message);
                }
                state.unreadable = unreadable;
            }
        }
    }
}
