//! Policies to kernel cells. An ingress rule becomes cells (peer | ANY, selected, port | ANY),
//! an egress rule (selected, peer | ANY, port | ANY); Allow cells may allow more than the rule
//! (a `Maybe` peer, a named port that differs between the workloads of one identity, a wide
//! port range), never less, and Deny cells only what the rule certainly denies.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use palisade_ebpf_common::{IDENTITY_ANY, IDENTITY_WORLD, PORT_ANY};

use super::{Cell, CellKey, Direction, Identity, IdentityLabels, PolicyEntry, Snapshot};
use crate::cidr::Cidr;
use crate::matching::{Match, PolicyRule, PortMatch, SourceFacts, rule_peers_match};
use crate::resource::{Action, Mode, Protocol};

/// Port ranges longer than this become one any-port cell (the proxies decide exactly):
/// one cell per port would fill the map.
const MAX_RANGE_CELLS: u32 = 256;

/// A peer the kernel can tell apart: an identity number and what is known of it.
struct Candidate<'a> {
    id: u32,
    labels: Option<&'a IdentityLabels>,
    principal: Option<&'a str>,
    addresses: &'a [IpAddr],
    cidr: Option<Cidr>,
}

impl Candidate<'_> {
    fn in_block(&self, block: &Cidr) -> Match {
        if let Some(c) = self.cidr {
            // Blocks named by policies are identities themselves, so an address block is either
            // inside another or apart from it.
            return Match::from_bool(block.covers(&c));
        }
        let inside = self.addresses.iter().filter(|a| block.contains(**a)).count();
        match inside {
            0 => Match::No,
            n if n == self.addresses.len() => Match::Yes,
            _ => Match::Maybe,
        }
    }
}

/// Namespaces a rule's peers are confined to, when every peer names some.
fn peer_namespaces(rule: &PolicyRule) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    for peer in &rule.peers {
        match (&peer.namespace, peer.namespaces.is_empty()) {
            (Some(ns), _) => out.push(ns.as_str()),
            (None, false) => out.extend(peer.namespaces.iter().map(String::as_str)),
            (None, true) => return None,
        }
    }
    Some(out)
}

/// TCP port numbers of a container port name, per workload identity; and the (identity,
/// name) pairs whose workloads do not all agree (the cells allow the union).
struct NamedPorts {
    by_identity: HashMap<u32, BTreeMap<String, BTreeSet<u16>>>,
    divergent: BTreeSet<(u32, String)>,
}

impl NamedPorts {
    fn new(s: &Snapshot) -> NamedPorts {
        let mut by_identity: HashMap<u32, BTreeMap<String, BTreeSet<u16>>> = HashMap::new();
        let mut per_workload: HashMap<(u32, String), usize> = HashMap::new();
        let mut workloads: HashMap<u32, usize> = HashMap::new();
        for w in s.workloads.iter() {
            *workloads.entry(w.identity).or_default() += 1;
            for p in w.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
                if let Some(name) = &p.name {
                    by_identity
                        .entry(w.identity)
                        .or_default()
                        .entry(name.clone())
                        .or_default()
                        .insert(p.container_port);
                    *per_workload.entry((w.identity, name.clone())).or_default() += 1;
                }
            }
        }
        let divergent = per_workload
            .into_iter()
            .filter(|((id, name), n)| *n != workloads[id] || by_identity[id][name].len() > 1)
            .map(|(k, _)| k)
            .collect();
        NamedPorts { by_identity, divergent }
    }

    fn get(&self, identity: u32, name: &str) -> impl Iterator<Item = u16> + '_ {
        self.by_identity.get(&identity).and_then(|m| m.get(name)).into_iter().flatten().copied()
    }
}

/// Cell ports of a rule towards destination `dst` (a workload identity, a block, the world, or
/// `IDENTITY_ANY`, for which named ports are expanded by the caller).
fn ports_for(rule: &PolicyRule, dst: u32, named: &NamedPorts, approximate: &mut dyn FnMut(String)) -> Vec<u16> {
    if rule.ports.is_empty() || !rule.not_ports.is_empty() {
        return vec![PORT_ANY];
    }
    let mut out = BTreeSet::new();
    for p in &rule.ports {
        match p {
            PortMatch::Range(1, u16::MAX) => return vec![PORT_ANY],
            PortMatch::Range(first, last) if u32::from(*last - *first) >= MAX_RANGE_CELLS => {
                approximate(format!("port range {first}-{last} is held as any port"));
                return vec![PORT_ANY];
            }
            PortMatch::Range(first, last) => out.extend(*first..=*last),
            PortMatch::Named(name) => {
                if named.divergent.contains(&(dst, name.clone())) {
                    approximate(format!("port name {name:?} differs between workloads of one identity"));
                }
                out.extend(named.get(dst, name));
            }
            PortMatch::Never => {}
        }
    }
    out.into_iter().collect()
}

/// What the cell scans read besides the policies, built once per set of workloads: each
/// identity's principal, the identities of each namespace (in number order), named ports.
pub(super) struct Index {
    principals: HashMap<u32, String>,
    by_namespace: HashMap<String, Vec<u32>>,
    named: NamedPorts,
}

impl Index {
    pub(super) fn new(s: &Snapshot) -> Index {
        let principals = s.identities.values().map(|i| (i.id, s.principal(&i.labels))).collect();
        let mut by_namespace: HashMap<String, Vec<u32>> = HashMap::new();
        for i in s.identities.values() {
            by_namespace.entry(i.labels.namespace.clone()).or_default().push(i.id);
        }
        Index { principals, by_namespace, named: NamedPorts::new(s) }
    }
}

/// What one (enforced) policy puts in the kernel before the policies are merged: cells with
/// the index of the rule that wrote each (in the order the rules write them), the identities
/// it isolates (an Allow policy's selected ones), and what the cells cannot hold exactly.
#[derive(Clone, Debug, Default)]
pub(super) struct Contribution {
    pub cells: Vec<(CellKey, u32)>,
    pub isolates: Vec<u32>,
    pub approximations: BTreeSet<String>,
}

/// The namespaces whose identities, addresses, named ports or labels a policy's cells depend
/// on; `None`: every namespace, and the address blocks (a peer without a namespace scope).
pub(super) fn dependencies(policy: &PolicyEntry) -> Option<BTreeSet<String>> {
    let mut out = BTreeSet::from([policy.namespace.clone()]);
    for rule in &policy.rules {
        if rule.peers.is_empty() {
            // An egress rule to anywhere on a named port reads every workload's ports.
            let named = rule.ports.iter().any(|p| matches!(p, PortMatch::Named(_)));
            if policy.direction == Direction::Egress && named {
                return None;
            }
            continue;
        }
        out.extend(peer_namespaces(rule)?.into_iter().map(String::from));
    }
    Some(out)
}

/// The cells, isolation and approximations of one enforced policy, as [`compile_cells`]
/// merges them (the incremental compiler keeps them per policy).
pub(super) fn contribute(snapshot: &Snapshot, index: &Index, policy: &PolicyEntry) -> Contribution {
    let identity = |id: u32| {
        let i = &snapshot.identities[&id];
        Candidate {
            id,
            labels: Some(&i.labels),
            principal: index.principals.get(&id).map(String::as_str),
            addresses: &i.addresses,
            cidr: None,
        }
    };
    let named = &index.named;
    let mut out = Contribution::default();
    let selected: Vec<u32> = index
        .by_namespace
        .get(policy.namespace.as_str())
        .into_iter()
        .flatten()
        .filter(|id| policy.selector.matches(&snapshot.identities[*id].labels.labels))
        .copied()
        .collect();
    if policy.action == Action::Allow {
        out.isolates.clone_from(&selected);
    }
    for (index_in_policy, rule) in policy.rules.iter().enumerate() {
        let rule_index = index_in_policy as u32;
        let approximations = &mut out.approximations;
        let mut approximate = |what: String| {
            approximations.insert(format!("{} {} rule {index_in_policy}: {what}", policy.kind, policy.name));
        };
        if !rule.not_ports.is_empty() {
            approximate(format!(
                "notPorts is enforced by ztunnel's proxies, {} in the kernel",
                if policy.action == Action::Allow { "allowed on every port" } else { "not denied" }
            ));
            // Deny with notPorts cannot be held exactly: leave it to the proxies.
            if policy.action == Action::Deny {
                continue;
            }
        }
        let peers: Vec<u32> = if rule.peers.is_empty() {
            vec![IDENTITY_ANY]
        } else {
            let scope: Vec<Candidate> = match peer_namespaces(rule) {
                Some(namespaces) => {
                    let mut ids: Vec<u32> =
                        namespaces.iter().filter_map(|ns| index.by_namespace.get(*ns)).flatten().copied().collect();
                    ids.sort_unstable();
                    ids.dedup();
                    ids.into_iter().map(identity).collect()
                }
                None => snapshot
                    .identities
                    .keys()
                    .map(|id| identity(*id))
                    .chain(snapshot.cidrs.iter().map(|c| Candidate {
                        id: c.id,
                        labels: None,
                        principal: None,
                        addresses: &[],
                        cidr: Some(c.cidr),
                    }))
                    .chain([Candidate {
                        id: IDENTITY_WORLD,
                        labels: None,
                        principal: None,
                        addresses: &[],
                        cidr: None,
                    }])
                    .collect(),
            };
            scope
                .into_iter()
                .filter(|c| {
                    let in_block = |b: &Cidr| c.in_block(b);
                    let backs = |ns: &str, name: &str| match c.labels {
                        Some(_) => snapshot.backs(ns, name, c.addresses),
                        None => Match::No,
                    };
                    let facts = SourceFacts {
                        principal: c.principal,
                        namespace: c.labels.map(|l| l.namespace.as_str()),
                        service_account: c.labels.map(|l| l.service_account.as_str()),
                        labels: c.labels.map(|l| &l.labels),
                        namespace_labels: c.labels.and_then(|l| snapshot.namespaces.get(&l.namespace)),
                        in_block: &in_block,
                        backs: &backs,
                    };
                    match (policy.action, rule_peers_match(rule, &facts)) {
                        (Action::Deny, m) => m == Match::Yes,
                        (Action::Allow, m) => m != Match::No,
                    }
                })
                .map(|c| c.id)
                .collect()
        };
        let mut put = |src: u32, dst: u32, port: u16| {
            out.cells.push((CellKey { src, dst, port, direction: policy.direction }, rule_index));
        };
        for &sel in &selected {
            for &peer in &peers {
                let (src, dst) = match policy.direction {
                    Direction::Ingress => (peer, sel),
                    Direction::Egress => (sel, peer),
                };
                for port in ports_for(rule, dst, named, &mut approximate) {
                    put(src, dst, port);
                }
                // An egress rule to anywhere on a named port: the name means a port on
                // each workload that has it.
                if dst == IDENTITY_ANY {
                    for name in rule.ports.iter().filter_map(|p| match p {
                        PortMatch::Named(n) => Some(n),
                        _ => None,
                    }) {
                        for (&id, names) in &named.by_identity {
                            for &port in names.get(name).into_iter().flatten() {
                                put(src, id, port);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// How an isolating policy is named in an identity's default reason.
pub(super) fn isolation_name(kind: &str, name: &str) -> String {
    match kind {
        "SegmentationPolicy" => name.to_string(),
        kind => format!("{kind} {name}"),
    }
}

/// `base` (an identity with its namespace's default) isolated by the first of the Allow
/// policies that select it in each direction (`None`: no policy isolates it so).
pub(super) fn isolated(
    base: &Arc<Identity>,
    ingress: Option<(&str, &str)>,
    egress: Option<(&str, &str)>,
) -> Arc<Identity> {
    let ingress = ingress.filter(|_| !base.default_deny);
    if ingress.is_none() && egress.is_none() {
        return base.clone();
    }
    let mut ident = (**base).clone();
    if let Some((kind, name)) = ingress {
        ident.default_deny = true;
        ident.default_reason = format!("selected by Allow policy {}", isolation_name(kind, name));
    }
    if let Some((kind, name)) = egress {
        ident.egress_default_deny = true;
        ident.egress_default_reason = format!("selected by egress policy {}", isolation_name(kind, name));
    }
    Arc::new(ident)
}

/// Marks each identity isolated by the first policy (in `isolated`'s order) that selects it.
fn apply_isolation<'a>(
    identities: &mut BTreeMap<u32, Arc<Identity>>,
    isolating: impl IntoIterator<Item = (Direction, u32, &'a PolicyEntry)>,
) {
    let mut first: HashMap<(Direction, u32), &PolicyEntry> = HashMap::new();
    for (direction, id, policy) in isolating {
        first.entry((direction, id)).or_insert(policy);
    }
    let names = |d, id| first.get(&(d, id)).map(|p| (p.kind.as_str(), p.name.as_str()));
    for (id, ident) in identities.iter_mut() {
        *ident = isolated(ident, names(Direction::Ingress, *id), names(Direction::Egress, *id));
    }
}

pub(super) fn compile_cells(snapshot: &mut Snapshot) {
    let index = Index::new(snapshot);
    let mut cells: HashMap<CellKey, Cell> = HashMap::new();
    let mut isolated: Vec<(Direction, u32, &PolicyEntry)> = Vec::new();
    let mut approximations = BTreeSet::new();
    for policy in snapshot.policies.iter().filter(|p| p.mode == Mode::Enforce) {
        let c = contribute(snapshot, &index, policy);
        for (key, i) in c.cells {
            let new = Cell { action: policy.action, rule: policy.first_rule + i };
            // The first rule (in number order) wins, and a Deny beats an Allow.
            cells
                .entry(key)
                .and_modify(|c| {
                    if c.action == Action::Allow && new.action == Action::Deny {
                        *c = new;
                    }
                })
                .or_insert(new);
        }
        isolated.extend(c.isolates.into_iter().map(|d| (policy.direction, d, &**policy)));
        approximations.extend(c.approximations);
    }
    apply_isolation(Arc::make_mut(&mut snapshot.identities), isolated);
    snapshot.cells = cells;
    snapshot.approximations = approximations.into_iter().collect();
}
