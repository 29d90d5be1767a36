//! Compiles validated resources into a [`Snapshot`]: numeric identities (workloads, and
//! address blocks named by policies), the identity of every address, and the policy as
//! (source, destination, port) cells — the image the kernel maps hold. Two evaluations read a
//! snapshot: [`Snapshot::verdict`] runs the kernel's algorithm on the cells, and
//! [`Snapshot::authorize`] evaluates the policies exactly for one connection (ztunnel's proxies,
//! `palisade explain`). Where the cells cannot say exactly what a rule says (see
//! [`crate::matching`]), they allow and leave the decision to the exact evaluation; they never
//! deny what it allows.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use palisade_ebpf_common::{
    IDENTITY_ANY, IDENTITY_WORLD, PORT_ANY, RULE_DEFAULT_ALLOW, RULE_DEFAULT_DENY, RULE_NOT_AT_SOURCE,
    RULE_PLAINTEXT_FROM_MESH, RULE_UNKNOWN_ADDRESS,
};
use serde::Serialize;

use crate::cidr::Cidr;
use crate::load::Located;
use crate::matching::{Match, SourceFacts, rule_port_matches, rule_sources_match};
use crate::resource::{Action, Mode, Resource, Rule};

/// First identity number given to workloads; lower numbers are reserved.
pub const FIRST_WORKLOAD_IDENTITY: u32 = 256;
/// Identities of address blocks named by policies (`ipBlocks`) start here.
pub const FIRST_CIDR_IDENTITY: u32 = 1 << 24;
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The identity-defining attributes of a workload.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct IdentityLabels {
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Identity {
    pub id: u32,
    #[serde(flatten)]
    pub labels: IdentityLabels,
    /// Connections to this identity that no rule allows are denied.
    pub default_deny: bool,
    /// Why `default_deny` is what it is (namespace default or a selecting Allow policy).
    pub default_reason: String,
    /// Addresses of the workloads with this identity.
    pub addresses: Vec<IpAddr>,
}

/// An address block named by a policy, with its own identity so the kernel can tell it apart.
#[derive(Clone, Debug, Serialize)]
pub struct CidrIdentity {
    pub id: u32,
    pub cidr: Cidr,
}

#[derive(Clone, Debug, Serialize)]
pub struct WorkloadEntry {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub uid: Option<String>,
    pub addresses: Vec<IpAddr>,
    pub identity: u32,
}

/// One rule of one policy, numbered in the snapshot.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RuleRef {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// Index of the rule in `spec.rules`.
    pub index: usize,
    pub action: Action,
    pub mode: Mode,
}

/// A policy as the exact evaluation reads it.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyEntry {
    pub name: String,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    pub action: Action,
    pub mode: Mode,
    pub rules: Vec<Rule>,
    /// Number of `rules[0]` in [`Snapshot::rules`].
    pub first_rule: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct CellKey {
    pub src: u32,
    pub dst: u32,
    pub port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Cell {
    pub action: Action,
    pub rule: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    pub trust_domain: String,
    pub identities: Vec<Identity>,
    pub cidrs: Vec<CidrIdentity>,
    pub workloads: Vec<WorkloadEntry>,
    pub rules: Vec<RuleRef>,
    pub policies: Vec<PolicyEntry>,
    /// Rules the kernel cannot hold exactly; the proxies enforce them.
    pub approximations: Vec<String>,
    #[serde(skip)]
    pub cells: HashMap<CellKey, Cell>,
    #[serde(skip)]
    pub addresses: HashMap<IpAddr, u32>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            identities: vec![],
            cidrs: vec![],
            workloads: vec![],
            rules: vec![],
            policies: vec![],
            approximations: vec![],
            cells: HashMap::new(),
            addresses: HashMap::new(),
        }
    }
}

/// The outcome of evaluating one connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub action: Action,
    /// Rule number, or `RULE_DEFAULT_*`.
    pub rule: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
}

/// The exact decision for one connection, and what audit-mode policies would have decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    /// Rule of an Audit-mode policy that would deny this connection (which is allowed).
    pub audit_deny: Option<u32>,
}

impl Snapshot {
    /// The identity the kernel gives an address: its workload's, else the most specific
    /// policy address block containing it, else `world`.
    pub fn identity_of(&self, addr: IpAddr) -> u32 {
        let addr = canonical(addr);
        if let Some(id) = self.addresses.get(&addr) {
            return *id;
        }
        self.cidrs
            .iter()
            .filter(|c| c.cidr.contains(addr))
            .max_by_key(|c| c.cidr.prefix)
            .map_or(IDENTITY_WORLD, |c| c.id)
    }

    pub fn identity(&self, id: u32) -> Option<&Identity> {
        let i = id.checked_sub(FIRST_WORKLOAD_IDENTITY)? as usize;
        self.identities.get(i)
    }

    /// The kernel's algorithm: deny beats allow across the four cells that can match;
    /// without a match the destination's default decides.
    pub fn verdict(&self, src: IpAddr, dst: IpAddr, port: u16) -> Verdict {
        let s = self.identity_of(src);
        let d = self.identity_of(dst);
        let mut allow = None;
        for (src, port) in [(s, port), (s, PORT_ANY), (IDENTITY_ANY, port), (IDENTITY_ANY, PORT_ANY)] {
            if let Some(c) = self.cells.get(&CellKey { src, dst: d, port }) {
                if c.action == Action::Deny {
                    return Verdict { action: Action::Deny, rule: c.rule, src_identity: s, dst_identity: d };
                }
                allow.get_or_insert(c.rule);
            }
        }
        let (action, rule) = match allow {
            Some(rule) => (Action::Allow, rule),
            None if self.identity(d).is_some_and(|i| i.default_deny) => (Action::Deny, RULE_DEFAULT_DENY),
            None => (Action::Allow, RULE_DEFAULT_ALLOW),
        };
        Verdict { action, rule, src_identity: s, dst_identity: d }
    }

    /// A readable name for a rule number.
    pub fn describe_rule(&self, rule: u32, dst_identity: u32) -> String {
        let default_reason =
            || self.identity(dst_identity).map(|i| i.default_reason.clone()).unwrap_or_else(|| "no policy".into());
        match rule {
            RULE_DEFAULT_ALLOW => format!("default allow ({})", default_reason()),
            RULE_DEFAULT_DENY => format!("default deny ({})", default_reason()),
            RULE_NOT_AT_SOURCE => "the proven identity is not the workload at the source address".into(),
            RULE_PLAINTEXT_FROM_MESH => "plaintext from a mesh workload (it must use HBONE)".into(),
            RULE_UNKNOWN_ADDRESS => "the destination address is not registered for the enrolled pod".into(),
            n => match self.rules.get(n as usize) {
                Some(r) => format!("{} rule {}", r.policy, r.index),
                None => format!("rule #{n}"),
            },
        }
    }

    /// `namespace/serviceaccount` of an identity, the block of a CIDR identity, or `world`.
    pub fn identity_name(&self, id: u32) -> String {
        match self.identity(id) {
            Some(i) => format!("{}/{}", i.labels.namespace, i.labels.service_account),
            None if id == IDENTITY_WORLD => "world".into(),
            None => match self.cidrs.iter().find(|c| c.id == id) {
                Some(c) => format!("cidr:{}", c.cidr),
                None => format!("identity-{id}"),
            },
        }
    }

    fn principal(&self, l: &IdentityLabels) -> String {
        format!("{}/ns/{}/sa/{}", self.trust_domain, l.namespace, l.service_account)
    }

    fn policies_for(&self, dst: &Identity) -> impl Iterator<Item = &PolicyEntry> {
        self.policies.iter().filter(move |p| {
            p.namespace == dst.labels.namespace && p.selector.iter().all(|(k, v)| dst.labels.labels.get(k) == Some(v))
        })
    }

    /// The exact evaluation of one connection. `proven` is the source's SPIFFE identity when a
    /// certificate proved it (`namespace`, `service account`); otherwise the source is known by
    /// its address only. A proven identity must be the workload at `src`: a tunnel comes from
    /// its workload's own address, so anything else is a certificate used from elsewhere.
    /// A plaintext connection: no identity proven. Where the mesh requires HBONE (it has a
    /// CA), a mesh workload never connects in plaintext (its ztunnel tunnels everything), so
    /// plaintext from a workload's address is refused whatever the policy says: the address
    /// alone never stands in for an identity that should have been proven.
    pub fn authorize_plaintext(&self, src: IpAddr, dst: IpAddr, port: u16, require_hbone: bool) -> Decision {
        if require_hbone && self.addresses.contains_key(&src) {
            let verdict = Verdict {
                action: Action::Deny,
                rule: RULE_PLAINTEXT_FROM_MESH,
                src_identity: self.identity_of(src),
                dst_identity: self.identity_of(dst),
            };
            return Decision { verdict, audit_deny: None };
        }
        self.authorize(src, None, dst, port)
    }

    pub fn authorize(&self, src: IpAddr, proven: Option<(&str, &str)>, dst: IpAddr, port: u16) -> Decision {
        let src_identity = self.identity_of(src);
        let dst_identity = self.identity_of(dst);
        let at_address = self.identity(src_identity);
        let labels_at = at_address.map(|i| &i.labels);
        let verdict = |action, rule| Verdict { action, rule, src_identity, dst_identity };
        let (namespace, service_account, labels) = match proven {
            Some((ns, sa)) => {
                let Some(same) = labels_at.filter(|l| l.namespace == ns && l.service_account == sa) else {
                    return Decision { verdict: verdict(Action::Deny, RULE_NOT_AT_SOURCE), audit_deny: None };
                };
                (Some(ns), Some(sa), Some(&same.labels))
            }
            None => (
                labels_at.map(|l| l.namespace.as_str()),
                labels_at.map(|l| l.service_account.as_str()),
                labels_at.map(|l| &l.labels),
            ),
        };
        let principal = namespace.zip(service_account).map(|(ns, sa)| format!("{}/ns/{ns}/sa/{sa}", self.trust_domain));
        let in_block = |c: &Cidr| Match::from_bool(c.contains(src));
        let facts =
            SourceFacts { principal: principal.as_deref(), namespace, service_account, labels, in_block: &in_block };
        let Some(dst_ident) = self.identity(dst_identity) else {
            // Not a workload: no policy selects it.
            return Decision { verdict: verdict(Action::Allow, RULE_DEFAULT_ALLOW), audit_deny: None };
        };
        // Deny beats allow; without a match, the default (an Allow policy isolates what it
        // selects). With `audit`, Audit-mode policies count as if they were enforced.
        let evaluate = |audit: bool| {
            let counts = |p: &&PolicyEntry| p.mode == Mode::Enforce || audit;
            let matching = |action: Action| {
                self.policies_for(dst_ident).filter(counts).filter(|p| p.action == action).find_map(|p| {
                    p.rules.iter().enumerate().find_map(|(i, r)| {
                        (rule_port_matches(r, port) && rule_sources_match(r, &facts) == Match::Yes)
                            .then_some(p.first_rule + i as u32)
                    })
                })
            };
            let isolated = dst_ident.default_deny
                || self.policies_for(dst_ident).filter(counts).any(|p| p.action == Action::Allow);
            if let Some(rule) = matching(Action::Deny) {
                verdict(Action::Deny, rule)
            } else if let Some(rule) = matching(Action::Allow) {
                verdict(Action::Allow, rule)
            } else if isolated {
                verdict(Action::Deny, RULE_DEFAULT_DENY)
            } else {
                verdict(Action::Allow, RULE_DEFAULT_ALLOW)
            }
        };
        let enforced = evaluate(false);
        let audit_deny = match enforced.action {
            Action::Allow => Some(evaluate(true)).filter(|v| v.action == Action::Deny).map(|v| v.rule),
            Action::Deny => None,
        };
        Decision { verdict: enforced, audit_deny }
    }
}

/// IPv4-mapped IPv6 addresses are the same endpoint as the IPv4 address.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
        v4 => v4,
    }
}

/// Compiles resources that [`crate::validate::validate`] accepted.
pub fn compile(resources: &[Located]) -> Snapshot {
    compile_for(resources, DEFAULT_TRUST_DOMAIN)
}

pub fn compile_for(resources: &[Located], trust_domain: &str) -> Snapshot {
    let mut labels_set = BTreeSet::new();
    let mut namespace_defaults = HashMap::new();
    let mut blocks = BTreeSet::new();
    for r in resources {
        match &r.resource {
            Resource::Workload { metadata, spec, .. } => {
                labels_set.insert(IdentityLabels {
                    namespace: metadata.namespace.clone().unwrap_or_default(),
                    service_account: spec.service_account.clone(),
                    labels: spec.labels.clone(),
                });
            }
            Resource::Namespace { metadata, spec, .. } => {
                namespace_defaults.insert(metadata.name.clone(), spec.default_action);
            }
            Resource::SegmentationPolicy { spec, .. } => {
                for peer in spec.rules.iter().flat_map(|r| &r.from) {
                    blocks.extend(peer.ip_blocks.iter().chain(&peer.not_ip_blocks).copied());
                }
            }
        }
    }
    let mut snapshot = Snapshot { trust_domain: trust_domain.into(), ..Snapshot::default() };
    let mut id_by_labels = HashMap::new();
    for (i, labels) in labels_set.into_iter().enumerate() {
        let id = FIRST_WORKLOAD_IDENTITY + i as u32;
        let ns_default = namespace_defaults.get(&labels.namespace).copied().unwrap_or_default();
        id_by_labels.insert(labels.clone(), id);
        snapshot.identities.push(Identity {
            id,
            default_deny: ns_default == Action::Deny,
            default_reason: format!("namespace {} default {:?}", labels.namespace, ns_default),
            labels,
            addresses: vec![],
        });
    }
    snapshot.cidrs = blocks
        .into_iter()
        .enumerate()
        .map(|(i, cidr)| CidrIdentity { id: FIRST_CIDR_IDENTITY + i as u32, cidr })
        .collect();
    for r in resources {
        if let Resource::Workload { metadata, spec, .. } = &r.resource {
            let labels = IdentityLabels {
                namespace: metadata.namespace.clone().unwrap_or_default(),
                service_account: spec.service_account.clone(),
                labels: spec.labels.clone(),
            };
            let id = id_by_labels[&labels];
            for a in &spec.addresses {
                snapshot.addresses.insert(canonical(*a), id);
                snapshot.identities[(id - FIRST_WORKLOAD_IDENTITY) as usize].addresses.push(canonical(*a));
            }
            snapshot.workloads.push(WorkloadEntry {
                name: metadata.name.clone(),
                namespace: labels.namespace,
                node: spec.node.clone(),
                uid: spec.uid.clone(),
                addresses: spec.addresses.clone(),
                identity: id,
            });
        }
    }

    // Policies in a stable order so rule numbers do not depend on file order.
    let mut policies: Vec<_> = resources
        .iter()
        .filter_map(|r| match &r.resource {
            Resource::SegmentationPolicy { metadata, spec, .. } => Some((metadata, spec)),
            _ => None,
        })
        .collect();
    policies.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
    for (meta, spec) in policies {
        let namespace = meta.namespace.clone().unwrap_or_default();
        let name = format!("{namespace}/{}", meta.name);
        let first_rule = snapshot.rules.len() as u32;
        for index in 0..spec.rules.len() {
            snapshot.rules.push(RuleRef { policy: name.clone(), index, action: spec.action, mode: spec.mode });
        }
        snapshot.policies.push(PolicyEntry {
            name,
            namespace,
            selector: spec.selector.match_labels.clone(),
            action: spec.action,
            mode: spec.mode,
            rules: spec.rules.clone(),
            first_rule,
        });
    }
    compile_cells(&mut snapshot);
    snapshot
}

/// A source the kernel can tell apart: an identity number and what is known of it.
struct Candidate<'a> {
    id: u32,
    labels: Option<&'a IdentityLabels>,
    principal: Option<String>,
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

/// Namespaces a rule's sources are confined to, when every source names some.
fn source_namespaces(rule: &Rule) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    for peer in &rule.from {
        match (&peer.namespace, peer.namespaces.is_empty()) {
            (Some(ns), _) => out.push(ns.as_str()),
            (None, false) => out.extend(peer.namespaces.iter().map(String::as_str)),
            (None, true) => return None,
        }
    }
    Some(out)
}

fn compile_cells(snapshot: &mut Snapshot) {
    let mut candidates: Vec<Candidate> = snapshot
        .identities
        .iter()
        .map(|i| Candidate {
            id: i.id,
            labels: Some(&i.labels),
            principal: Some(snapshot.principal(&i.labels)),
            addresses: &i.addresses,
            cidr: None,
        })
        .collect();
    candidates.extend(snapshot.cidrs.iter().map(|c| Candidate {
        id: c.id,
        labels: None,
        principal: None,
        addresses: &[],
        cidr: Some(c.cidr),
    }));
    candidates.push(Candidate { id: IDENTITY_WORLD, labels: None, principal: None, addresses: &[], cidr: None });
    // Workload candidates by namespace: most rules name the namespaces of their sources, and
    // most policies select within one namespace, so neither scan needs every identity.
    let mut by_namespace: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, c) in candidates.iter().enumerate() {
        if let Some(l) = c.labels {
            by_namespace.entry(l.namespace.as_str()).or_default().push(i);
        }
    }
    let all: Vec<usize> = (0..candidates.len()).collect();

    let mut cells: HashMap<CellKey, Cell> = HashMap::new();
    let mut isolated: Vec<(u32, String)> = Vec::new();
    let mut approximations = Vec::new();
    for policy in snapshot.policies.iter().filter(|p| p.mode == Mode::Enforce) {
        let dsts: Vec<u32> = by_namespace
            .get(policy.namespace.as_str())
            .into_iter()
            .flatten()
            .map(|&i| &candidates[i])
            .filter(|c| c.labels.is_some_and(|l| policy.selector.iter().all(|(k, v)| l.labels.get(k) == Some(v))))
            .map(|c| c.id)
            .collect();
        if policy.action == Action::Allow {
            isolated.extend(dsts.iter().map(|d| (*d, policy.name.clone())));
        }
        for (index, rule) in policy.rules.iter().enumerate() {
            let rule_no = policy.first_rule + index as u32;
            let exact_ports = rule.not_ports.is_empty();
            if !exact_ports {
                approximations.push(format!(
                    "{} rule {index}: notPorts is enforced by ztunnel's proxies, {} in the kernel",
                    policy.name,
                    if policy.action == Action::Allow { "allowed on every port" } else { "not denied" }
                ));
            }
            let srcs: Vec<u32> = if rule.from.is_empty() {
                vec![IDENTITY_ANY]
            } else {
                let mut scope: Vec<usize> = match source_namespaces(rule) {
                    Some(namespaces) => {
                        namespaces.iter().filter_map(|ns| by_namespace.get(ns)).flatten().copied().collect()
                    }
                    None => all.clone(),
                };
                scope.sort_unstable();
                scope.dedup();
                scope
                    .into_iter()
                    .map(|i| &candidates[i])
                    .filter(|c| {
                        let in_block = |b: &Cidr| c.in_block(b);
                        let facts = SourceFacts {
                            principal: c.principal.as_deref(),
                            namespace: c.labels.map(|l| l.namespace.as_str()),
                            service_account: c.labels.map(|l| l.service_account.as_str()),
                            labels: c.labels.map(|l| &l.labels),
                            in_block: &in_block,
                        };
                        match (policy.action, rule_sources_match(rule, &facts)) {
                            (Action::Deny, m) => m == Match::Yes,
                            (Action::Allow, m) => m != Match::No,
                        }
                    })
                    .map(|c| c.id)
                    .collect()
            };
            // Deny with notPorts cannot be held exactly: leave it to the proxies.
            if policy.action == Action::Deny && !exact_ports {
                continue;
            }
            let ports: Vec<u16> =
                if rule.ports.is_empty() || !exact_ports { vec![PORT_ANY] } else { rule.ports.clone() };
            for &dst in &dsts {
                for &src in &srcs {
                    for &port in &ports {
                        let new = Cell { action: policy.action, rule: rule_no };
                        cells
                            .entry(CellKey { src, dst, port })
                            .and_modify(|c| {
                                if c.action == Action::Allow && new.action == Action::Deny {
                                    *c = new;
                                }
                            })
                            .or_insert(new);
                    }
                }
            }
        }
    }
    for (d, policy) in isolated {
        let ident = &mut snapshot.identities[(d - FIRST_WORKLOAD_IDENTITY) as usize];
        if !ident.default_deny {
            ident.default_deny = true;
            ident.default_reason = format!("selected by Allow policy {policy}");
        }
    }
    snapshot.cells = cells;
    snapshot.approximations = approximations;
}

#[cfg(test)]
mod tests;
