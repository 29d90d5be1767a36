//! The incremental compiler: a node receives changes (resources upserted by key, keys removed)
//! and compiles only what they touch into the next [`Snapshot`], which shares every unchanged
//! part with the previous one.
//!
//! - The base (identities, workloads, addresses, namespaces) changes with Workloads and
//!   Namespaces: patched (only the changed workloads' identities built again, see
//!   `workloads`) when the map numbers every identity, else built again in full. A namespace
//!   is *dirty* when one of its workloads or its Namespace changed, or one of its identities
//!   got another number.
//! - Each enforced policy's contribution (its cells with the index of the rule that wrote
//!   each, the identities it isolates, its approximations; see [`super::cells::contribute`])
//!   is kept, and recomputed when the policy changed or something it reads did: a dirty
//!   namespace among its dependencies (its own, and its rules' peer namespaces), or, for a
//!   policy whose peers are not confined to namespaces, any dirty namespace or a new or
//!   vanished address block.
//! - The cells are the merge of every contribution, kept per cell: a Deny beats an Allow, and
//!   among the same action the first rule in policy order (namespace, name, kind, direction,
//!   then rule index) wins. That is what the from-scratch compile's first insertion gives, so
//!   both agree whatever the numbers are. Only the cells a changed contribution touches are
//!   merged again.
//! - Numbers are stable ([`super::numbers`]): a policy keeps its rule numbers and a block its
//!   identity while they exist; new ones are numbered above the largest in use, in sorted
//!   order within one update (so a first update over everything numbers as
//!   [`super::compile_with`] does).
//! - Services and the VIP cells are computed again on every update with Services (cheap
//!   without them: there are none).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::Serialize;

use super::build::{Draft, base, drafts_of, identity_labels, service_entries};
use super::cells::{Contribution, Index, contribute, dependencies};
use super::numbers::{CidrNumbers, RuleNumbers};
use super::{
    Cell, CellKey, Changed, CidrIdentity, Direction, Identities, Identity, IdentityLabels, PolicyEntry, Rules, Snapshot,
};

mod isolation;
mod workloads;
use crate::key::ResourceKey;
use crate::load::Located;
use crate::resource::{Action, Mode, Resource};

/// Names a policy of one direction; its order is the policies' order in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PolicyKey {
    pub namespace: String,
    /// `namespace/name`.
    pub name: String,
    pub kind: String,
    pub direction: Direction,
}

struct PolicyState {
    entry: Arc<PolicyEntry>,
    /// Rule numbers held from `entry.first_rule` (at least its rule count).
    reserved: u32,
    key: Arc<PolicyKey>,
    deps: Option<BTreeSet<String>>,
    contribution: Contribution,
}

/// One contribution to a cell.
#[derive(Clone, Debug)]
struct Contributor {
    policy: Arc<PolicyKey>,
    index: u32,
    cell: Cell,
}

/// Keeps the resources by key and what the last snapshot was made of; see the module doc.
pub struct Compiler {
    trust_domain: String,
    /// Workloads and Namespaces: what the base is built from, in key order.
    inputs: BTreeMap<ResourceKey, Located>,
    services: BTreeMap<ResourceKey, Located>,
    /// Each policy resource, with the keys of its policies (one per direction).
    policy_resources: BTreeMap<ResourceKey, (Located, Vec<PolicyKey>)>,
    policies: BTreeMap<PolicyKey, PolicyState>,
    /// Policies by the namespaces they depend on; those that depend on all of them.
    dependents: HashMap<String, BTreeSet<PolicyKey>>,
    everywhere: BTreeSet<PolicyKey>,
    rule_numbers: RuleNumbers,
    cidrs: CidrNumbers,
    numbered: Identities,
    /// Identities the map does not number (numbered by rank: a new one may shift them).
    unnumbered: usize,
    /// Identities (without isolation), workloads, addresses, namespaces, blocks.
    base: Snapshot,
    index: Index,
    contributors: HashMap<CellKey, Vec<Contributor>>,
    cells: HashMap<CellKey, Cell>,
    approximations: BTreeMap<String, usize>,
    /// The VIP cells of the last snapshot (computed again on every update).
    service_cells: Vec<CellKey>,
    /// `base.identities` with isolation.
    identities: Arc<BTreeMap<u32, Arc<Identity>>>,
    /// The Allow policies that select each identity, per direction, in policy order: the
    /// first isolates it.
    isolators: HashMap<(Direction, u32), BTreeSet<Arc<PolicyKey>>>,
    /// Gateways and HTTPRoutes (the waypoint kinds the ztunnel's index reads: waypoints, and
    /// the backends their routes send to), and that index: recomputed only on an update with
    /// one of the kinds it reads, and only read at all when some Gateway exists.
    gateways: BTreeMap<ResourceKey, Located>,
    waypoints: Arc<crate::waypoint::WaypointIndex>,
}

/// What one update changed, gathered before anything is recompiled.
#[derive(Default)]
struct Changes {
    base: bool,
    /// A Service changed: the endpoints `service` peers read are computed again.
    services: bool,
    /// A Namespace changed (the base is built again in full).
    namespace_changed: bool,
    /// Identities of the workloads changed (before and after), and their keys.
    labels: BTreeSet<IdentityLabels>,
    workload_keys: BTreeSet<ResourceKey>,
    /// Identities whose isolating policies may have changed.
    isolation: BTreeSet<u32>,
    namespaces: BTreeSet<String>,
    policies: BTreeSet<PolicyKey>,
    /// Policies upserted, numbered in key order once every removal is done.
    drafts: BTreeMap<PolicyKey, Draft>,
    /// Rule ranges of removed policies: the same key may take its range again.
    replaced: HashMap<PolicyKey, (u32, u32)>,
    touched: BTreeSet<CellKey>,
}

impl Compiler {
    pub fn new(trust_domain: &str) -> Compiler {
        let base = Snapshot { trust_domain: trust_domain.into(), ..Snapshot::default() };
        Compiler {
            trust_domain: trust_domain.into(),
            inputs: BTreeMap::new(),
            services: BTreeMap::new(),
            policy_resources: BTreeMap::new(),
            policies: BTreeMap::new(),
            dependents: HashMap::new(),
            everywhere: BTreeSet::new(),
            rule_numbers: RuleNumbers::default(),
            cidrs: CidrNumbers::default(),
            numbered: Identities::default(),
            unnumbered: 0,
            index: Index::new(&base),
            base,
            contributors: HashMap::new(),
            cells: HashMap::new(),
            approximations: BTreeMap::new(),
            identities: Arc::default(),
            service_cells: Vec::new(),
            isolators: HashMap::new(),
            gateways: BTreeMap::new(),
            waypoints: Arc::default(),
        }
    }

    /// Every resource held, in key order (what a from-scratch compile of the same set reads).
    pub fn resources(&self) -> Vec<&Located> {
        let mut all: Vec<(&ResourceKey, &Located)> =
            self.inputs.iter().chain(self.services.iter()).chain(self.gateways.iter()).collect();
        all.extend(self.policy_resources.iter().map(|(k, (l, _))| (k, l)));
        all.sort_by(|a, b| a.0.cmp(b.0));
        all.into_iter().map(|(_, l)| l).collect()
    }

    /// Applies upserts (a resource replaces the one of its key) and removals, numbering new
    /// identities with `identities` as [`super::compile_with`] does, and returns the snapshot.
    /// The resources must be valid together ([`crate::validate`]).
    pub fn update(
        &mut self,
        upserts: Vec<Located>,
        removals: &[ResourceKey],
        identities: &Identities,
    ) -> Arc<Snapshot> {
        let mut changes = Changes::default();
        let reindex = upserts.iter().any(|l| waypoint_input(&l.resource))
            || removals
                .iter()
                .any(|k| self.gateways.contains_key(k) || self.services.contains_key(k) || self.inputs.contains_key(k));
        for key in removals {
            self.remove(key, &mut changes);
        }
        for located in upserts {
            let key = ResourceKey::of(&located.resource);
            self.remove(&key, &mut changes);
            self.insert(key, located, &mut changes);
        }
        self.number_drafts(&mut changes);
        let old_base = self.base.identities.clone();
        if changes.base || *identities != self.numbered {
            let patched = changes.base
                && !changes.namespace_changed
                && self.patch_base(identities, &changes.labels, &changes.workload_keys);
            match patched {
                true => self.index = Index::new(&self.base),
                false => self.rebuild_base(identities, &mut changes),
            }
            changes.base = true;
        }
        let blocks_moved = self.cidrs.settle();
        if blocks_moved {
            self.base.cidrs = Arc::new(self.cidrs.iter().map(|(cidr, id)| CidrIdentity { id, cidr }).collect());
            changes.policies.extend(self.everywhere.iter().cloned());
        }
        // Endpoints before contributions: `service` peers read them.
        if changes.services || changes.base {
            service_entries(&mut self.base, self.services.values().chain(self.inputs.values()));
        }
        if !changes.namespaces.is_empty() {
            changes.policies.extend(self.everywhere.iter().cloned());
            for ns in &changes.namespaces {
                changes.policies.extend(self.dependents.get(ns).into_iter().flatten().cloned());
            }
        }
        for key in std::mem::take(&mut changes.policies) {
            self.recontribute(&key, &mut changes);
        }
        let touched: Vec<CellKey> = std::mem::take(&mut changes.touched).into_iter().collect();
        for key in &touched {
            self.merge(*key);
        }
        let addresses = changes.base || changes.services || blocks_moved || !changes.isolation.is_empty();
        if reindex {
            self.reindex_waypoints();
        }
        match changes.base {
            true => self.isolate_all(&old_base, &changes.isolation),
            false => self.isolate(&changes.isolation),
        }
        Arc::new(self.snapshot(touched, addresses))
    }

    fn remove(&mut self, key: &ResourceKey, changes: &mut Changes) {
        if let Some(old) = self.inputs.remove(key) {
            changes.base = true;
            changes.namespaces.insert(namespace_of(&old));
            changes.note(key, &old);
        } else if let Some(old) = self.services.remove(key) {
            changes.services = true;
            changes.namespaces.insert(namespace_of(&old));
        } else if self.gateways.remove(key).is_some() {
        } else if let Some((_, keys)) = self.policy_resources.remove(key) {
            for k in keys {
                // Upserted earlier in this update: not numbered yet.
                if let Some(d) = changes.drafts.remove(&k) {
                    for block in d.blocks() {
                        self.cidrs.release(block);
                    }
                }
                let Some(state) = self.policies.remove(&k) else { continue };
                self.forget(&state, changes);
                self.unindex(&k, &state.deps);
                for block in Draft::blocks_of(&state.entry.rules) {
                    self.cidrs.release(block);
                }
                changes.replaced.insert(k, (state.entry.first_rule, state.reserved));
            }
        }
    }

    fn insert(&mut self, key: ResourceKey, located: Located, changes: &mut Changes) {
        match &located.resource {
            Resource::Workload { .. } | Resource::Namespace { .. } => {
                changes.base = true;
                changes.namespaces.insert(namespace_of(&located));
                changes.note(&key, &located);
                self.inputs.insert(key, located);
            }
            Resource::Service { .. } => {
                changes.services = true;
                changes.namespaces.insert(namespace_of(&located));
                self.services.insert(key, located);
            }
            Resource::Gateway { .. } | Resource::HttpRoute { .. } => {
                self.gateways.insert(key, located);
            }
            Resource::SegmentationPolicy { .. } | Resource::NetworkPolicy { .. } => {
                let mut drafts = Vec::new();
                drafts_of(&located, &mut drafts);
                let keys = drafts.iter().map(Draft::key).collect();
                for d in drafts {
                    for block in d.blocks() {
                        self.cidrs.hold(block);
                    }
                    changes.drafts.insert(d.key(), d);
                }
                self.policy_resources.insert(key, (located, keys));
            }
            // The waypoint's kinds: not the kernel's.
            _ => {}
        }
    }

    /// Numbers the upserted policies: a policy replaced by one of the same key keeps its range
    /// when its rules still fit; the others take new ranges, in key order.
    fn number_drafts(&mut self, changes: &mut Changes) {
        let mut kept = HashMap::new();
        for (key, d) in &changes.drafts {
            if let Some(&(first, reserved)) = changes.replaced.get(key).filter(|(_, r)| d.rule_count() as u32 <= *r) {
                kept.insert(key.clone(), (first, reserved));
                changes.replaced.remove(key);
            }
        }
        for (_, (first, reserved)) in changes.replaced.drain() {
            self.rule_numbers.release(first, reserved);
        }
        for (key, d) in std::mem::take(&mut changes.drafts) {
            let n = d.rule_count() as u32;
            let (first, reserved) = kept.remove(&key).unwrap_or_else(|| (self.rule_numbers.allocate(n), n));
            let entry = Arc::new(d.entry(first));
            let deps = dependencies(&entry);
            match &deps {
                None => {
                    self.everywhere.insert(key.clone());
                }
                Some(namespaces) => {
                    for ns in namespaces {
                        self.dependents.entry(ns.clone()).or_default().insert(key.clone());
                    }
                }
            }
            let state = PolicyState {
                entry,
                reserved,
                key: Arc::new(key.clone()),
                deps,
                contribution: Contribution::default(),
            };
            self.policies.insert(key.clone(), state);
            changes.policies.insert(key);
        }
    }

    fn unindex(&mut self, key: &PolicyKey, deps: &Option<BTreeSet<String>>) {
        match deps {
            None => {
                self.everywhere.remove(key);
            }
            Some(namespaces) => {
                for ns in namespaces {
                    if let Some(set) = self.dependents.get_mut(ns) {
                        set.remove(key);
                        if set.is_empty() {
                            self.dependents.remove(ns);
                        }
                    }
                }
            }
        }
    }

    /// Builds the base again; namespaces whose identities were renumbered are dirty.
    fn rebuild_base(&mut self, identities: &Identities, changes: &mut Changes) {
        let mut base = base(self.inputs.values(), &self.trust_domain, identities);
        let (old, new) = (&self.base.identities, &base.identities);
        for (id, i) in new.iter() {
            if old.get(id).map(|o| &o.labels) != Some(&i.labels) {
                changes.namespaces.insert(i.labels.namespace.clone());
            }
        }
        for (id, i) in old.iter() {
            if new.get(id).map(|n| &n.labels) != Some(&i.labels) {
                changes.namespaces.insert(i.labels.namespace.clone());
            }
        }
        base.cidrs = self.base.cidrs.clone();
        self.unnumbered = base.identities.values().filter(|i| identities.get(&i.labels).is_none()).count();
        self.index = Index::new(&base);
        self.base = base;
        self.numbered = identities.clone();
    }

    /// Takes a policy's contribution out of the cells and approximations.
    fn forget(&mut self, state: &PolicyState, changes: &mut Changes) {
        let c = &state.contribution;
        for &id in &c.isolates {
            let slot = (state.entry.direction, id);
            if let Some(set) = self.isolators.get_mut(&slot) {
                set.remove(&state.key);
                if set.is_empty() {
                    self.isolators.remove(&slot);
                }
            }
            changes.isolation.insert(id);
        }
        for (key, _) in &c.cells {
            if let Some(list) = self.contributors.get_mut(key) {
                list.retain(|x| !Arc::ptr_eq(&x.policy, &state.key));
                if list.is_empty() {
                    self.contributors.remove(key);
                }
            }
            changes.touched.insert(*key);
        }
        for a in &c.approximations {
            if let Some(n) = self.approximations.get_mut(a) {
                *n -= 1;
                if *n == 0 {
                    self.approximations.remove(a);
                }
            }
        }
    }

    fn recontribute(&mut self, key: &PolicyKey, changes: &mut Changes) {
        let Some(mut state) = self.policies.remove(key) else { return };
        self.forget(&state, changes);
        let new = match state.entry.mode {
            Mode::Enforce => contribute(&self.base, &self.index, &state.entry),
            Mode::Audit => Contribution::default(),
        };
        for &id in &new.isolates {
            self.isolators.entry((state.entry.direction, id)).or_default().insert(state.key.clone());
            changes.isolation.insert(id);
        }
        let action = state.entry.action;
        for &(cell, index) in &new.cells {
            let c = Contributor {
                policy: state.key.clone(),
                index,
                cell: Cell { action, rule: state.entry.first_rule + index },
            };
            self.contributors.entry(cell).or_default().push(c);
            changes.touched.insert(cell);
        }
        for a in &new.approximations {
            *self.approximations.entry(a.clone()).or_default() += 1;
        }
        state.contribution = new;
        self.policies.insert(key.clone(), state);
    }

    /// A cell's winner: a Deny beats an Allow; then the first rule in policy order.
    fn merge(&mut self, key: CellKey) {
        let winner = self.contributors.get(&key).and_then(|list| {
            list.iter()
                .min_by(|a, b| {
                    let deny = |c: &Contributor| c.cell.action != Action::Deny;
                    (deny(a), &*a.policy, a.index).cmp(&(deny(b), &*b.policy, b.index))
                })
                .map(|c| c.cell)
        });
        match winner {
            Some(cell) => self.cells.insert(key, cell),
            None => self.cells.remove(&key),
        };
    }

    /// The waypoint index as [`super::compile_with`] computes it. Without a Gateway there is no
    /// waypoint, so nothing is read (the common case stays free at any scale).
    fn reindex_waypoints(&mut self) {
        if !self.gateways.values().any(|l| matches!(l.resource, Resource::Gateway { .. })) {
            self.waypoints = Arc::default();
            return;
        }
        let resources: Vec<Located> =
            self.gateways.values().chain(self.services.values()).chain(self.inputs.values()).cloned().collect();
        self.waypoints = Arc::new(crate::waypoint::waypoint_index(&resources, &self.trust_domain));
    }

    /// The snapshot, with what may differ from the previous one: the cells merged again, the
    /// VIP cells of both, and whether the address table moved.
    fn snapshot(&mut self, mut cells: Vec<CellKey>, addresses: bool) -> Snapshot {
        let policies: Vec<Arc<PolicyEntry>> = self.policies.values().map(|s| s.entry.clone()).collect();
        let mut snapshot = Snapshot {
            trust_domain: self.trust_domain.clone(),
            identities: self.identities.clone(),
            cidrs: self.base.cidrs.clone(),
            workloads: self.base.workloads.clone(),
            rules: Rules::new(&policies),
            policies,
            approximations: self.approximations.keys().cloned().collect(),
            namespaces: self.base.namespaces.clone(),
            cells: self.cells.clone(),
            addresses: self.base.addresses.clone(),
            workload_at: self.base.workload_at.clone(),
            waypoints: self.waypoints.clone(),
            services: self.base.services.clone(),
            service_index: self.base.service_index.clone(),
            service_ids: self.base.service_ids.clone(),
            changed: None,
        };
        let service_cells = super::services::service_cells(&mut snapshot);
        cells.extend(std::mem::replace(&mut self.service_cells, service_cells.clone()));
        cells.extend(service_cells);
        snapshot.changed = Some(Arc::new(Changed { cells, addresses }));
        snapshot
    }
}

/// What the waypoint index is computed from.
fn waypoint_input(r: &Resource) -> bool {
    matches!(
        r,
        Resource::Service { .. }
            | Resource::Gateway { .. }
            | Resource::HttpRoute { .. }
            | Resource::Workload { .. }
            | Resource::Namespace { .. }
    )
}

impl Changes {
    /// A Workload or Namespace added or removed.
    fn note(&mut self, key: &ResourceKey, l: &Located) {
        match identity_labels(&l.resource) {
            Some(labels) => {
                self.labels.insert(labels);
                self.workload_keys.insert(key.clone());
            }
            None => self.namespace_changed = true,
        }
    }
}

/// The namespace a Workload or Namespace resource belongs to (a Namespace: itself).
fn namespace_of(l: &Located) -> String {
    let meta = l.resource.metadata();
    match &l.resource {
        Resource::Namespace { .. } => meta.name.clone(),
        _ => meta.namespace.clone().unwrap_or_default(),
    }
}
