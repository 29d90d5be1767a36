//! Compiles validated resources into a [`Snapshot`]: numeric identities (workloads, and
//! address blocks named by policies), the identity of every address, and the policy as
//! (direction, source, destination, port) cells — the image the kernel maps hold. Two
//! evaluations read a snapshot: [`Snapshot::verdict`] runs the kernel's algorithm on the cells,
//! and [`Snapshot::authorize`] evaluates the policies exactly for one connection (ztunnel's
//! proxies, `palisade explain`). Where the cells cannot say exactly what a rule says (see
//! [`crate::matching`]), they allow and leave the decision to the exact evaluation; they never
//! deny what it allows.
//!
//! Two directions, as in Kubernetes: ingress rules belong to the destination (who may connect
//! to it), egress rules to the source (where it may connect). A connection is allowed only
//! when both consent. In each direction, every policy selecting the workload counts (the
//! union of their Allow rules, whichever kind they are: SegmentationPolicy or NetworkPolicy);
//! a Deny rule (Palisade's kind only) beats any Allow; without a matching rule the workload's
//! default decides: deny once any Allow policy of that direction selects it (it is isolated),
//! or for ingress when its namespace says `defaultAction: Deny`.
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use palisade_ebpf_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, IDENTITY_ANY, IDENTITY_WORLD, PORT_ANY, RULE_DEFAULT_ALLOW, RULE_DEFAULT_DENY,
    RULE_EGRESS_DEFAULT_DENY, RULE_NOT_AT_SOURCE, RULE_PLAINTEXT_FROM_MESH, RULE_UNKNOWN_ADDRESS,
};
use serde::{Deserialize, Serialize, Serializer};

use crate::cidr::Cidr;
use crate::matching::{Match, PolicyRule, SourceFacts, rule_peers_match, rule_port_matches};
use crate::resource::{Action, ContainerPort, Mode, Protocol, Selector};

mod build;
mod cells;
mod identities;
mod incremental;
mod numbers;
mod rules;
pub mod services;

pub use build::{compile, compile_for, compile_with, identity_labels_of};
pub use identities::{Identities, IdentitiesError, NumberedIdentity};
pub use incremental::{Compiler, PolicyKey};
pub use rules::Rules;
pub use services::{Endpoint, ServiceChoice, ServiceEntry, ServicePortEntry};

/// Which end of a connection a rule belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Direction {
    /// The destination's: who may connect to it.
    Ingress,
    /// The source's: where it may connect.
    Egress,
}

impl Direction {
    /// `PolicyKey::direction`.
    pub fn kernel(self) -> u8 {
        match self {
            Direction::Ingress => DIRECTION_INGRESS,
            Direction::Egress => DIRECTION_EGRESS,
        }
    }
}

/// First identity number given to workloads; lower numbers are reserved.
pub const FIRST_WORKLOAD_IDENTITY: u32 = 256;
/// Identities of address blocks named by policies (`ipBlocks`) start here.
pub const FIRST_CIDR_IDENTITY: u32 = 1 << 24;
/// Identities of Service VIPs start here.
pub const FIRST_SERVICE_IDENTITY: u32 = 1 << 25;
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The identity-defining attributes of a workload.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IdentityLabels {
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Identity {
    pub id: u32,
    #[serde(flatten)]
    pub labels: IdentityLabels,
    /// Connections to this identity that no rule allows are denied.
    pub default_deny: bool,
    /// Why `default_deny` is what it is (namespace default or a selecting Allow policy).
    pub default_reason: String,
    /// Connections from this identity that no egress rule allows are denied.
    pub egress_default_deny: bool,
    /// Why (the egress policy that isolates it), when `egress_default_deny`.
    pub egress_default_reason: String,
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
    /// Container ports, for rules that name ports.
    pub ports: Vec<ContainerPort>,
}

/// One rule of one policy, numbered in the snapshot.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RuleRef {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// `SegmentationPolicy` or `NetworkPolicy`.
    pub kind: String,
    pub direction: Direction,
    /// Index of the rule in its list (`spec.rules`, `spec.egress`, `spec.ingress`).
    pub index: usize,
    pub action: Action,
    pub mode: Mode,
}

/// A policy as the exact evaluation reads it.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyEntry {
    pub name: String,
    pub kind: String,
    pub namespace: String,
    /// Workloads of `namespace` the policy applies to (destinations of ingress rules,
    /// sources of egress rules).
    pub selector: Selector,
    pub direction: Direction,
    pub action: Action,
    pub mode: Mode,
    pub rules: Vec<PolicyRule>,
    /// Number of `rules[0]` in [`Snapshot::rules`].
    pub first_rule: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct CellKey {
    pub src: u32,
    pub dst: u32,
    pub port: u16,
    pub direction: Direction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Cell {
    pub action: Action,
    pub rule: u32,
}

/// A compiled policy, immutable once built: it is published as `Arc<Snapshot>` and kept for
/// recent generations. Its large parts are shared (`Arc`) so that the incremental
/// [`Compiler`] builds the next snapshot from the previous one without copying what did not
/// change.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    pub trust_domain: String,
    /// By number. Numbers are not positions: with a pre-assigned map ([`compile_with`])
    /// they have gaps. Serialised as a list, in number order.
    #[serde(serialize_with = "identities_in_order")]
    pub identities: Arc<BTreeMap<u32, Arc<Identity>>>,
    #[serde(serialize_with = "shared")]
    pub cidrs: Arc<Vec<CidrIdentity>>,
    #[serde(serialize_with = "shared")]
    pub workloads: Arc<Vec<WorkloadEntry>>,
    /// Every rule by number, found through its policy.
    pub rules: Rules,
    /// In a stable order (namespace, name, kind, direction): the exact evaluation reads the
    /// first matching rule in this order, as the cells' merge does.
    #[serde(serialize_with = "shared_each")]
    pub policies: Vec<Arc<PolicyEntry>>,
    /// Rules the kernel cannot hold exactly; the proxies enforce them.
    pub approximations: Vec<String>,
    /// Labels of every namespace known (with `kubernetes.io/metadata.name`).
    #[serde(serialize_with = "shared")]
    pub namespaces: Arc<BTreeMap<String, BTreeMap<String, String>>>,
    /// Services with a virtual address, and their endpoints.
    #[serde(serialize_with = "shared")]
    pub services: Arc<Vec<ServiceEntry>>,
    /// Index in `services` (and its `ports`) of each VIP:port.
    #[serde(skip)]
    pub service_index: Arc<HashMap<std::net::SocketAddr, (usize, usize)>>,
    /// The identity of each Service VIP.
    #[serde(skip)]
    pub service_ids: Arc<HashMap<IpAddr, u32>>,
    #[serde(skip)]
    pub cells: HashMap<CellKey, Cell>,
    #[serde(skip)]
    pub addresses: Arc<HashMap<IpAddr, u32>>,
    /// Index in `workloads` of the workload at each address.
    #[serde(skip)]
    pub workload_at: Arc<HashMap<IpAddr, usize>>,
    /// Which waypoint serves which VIP and endpoint: where a source's ztunnel sends a
    /// connection to a Service, and whose tunnels an endpoint's ztunnel accepts for it.
    #[serde(serialize_with = "shared")]
    pub waypoints: Arc<crate::waypoint::WaypointIndex>,
    /// What may differ from the snapshot the same [`Compiler`] built before this one (`None`:
    /// unknown, compare everything). The kernel write reads it to diff only what moved.
    #[serde(skip)]
    pub changed: Option<Arc<Changed>>,
}

/// The cells that may differ from the previous snapshot of a [`Compiler`], and whether
/// anything the kernel's address table holds may (identities, their default flags, address
/// blocks, VIPs).
#[derive(Clone, Debug, Default)]
pub struct Changed {
    pub cells: Vec<CellKey>,
    pub addresses: bool,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            identities: Arc::default(),
            cidrs: Arc::default(),
            workloads: Arc::default(),
            rules: Rules::default(),
            policies: vec![],
            approximations: vec![],
            namespaces: Arc::default(),
            services: Arc::default(),
            service_index: Arc::default(),
            service_ids: Arc::default(),
            cells: HashMap::new(),
            addresses: Arc::default(),
            workload_at: Arc::default(),
            waypoints: Arc::default(),
            changed: None,
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
    /// Each direction's own (action, rule): the source's egress and the destination's
    /// ingress, which [`combine`] made `verdict`; `None` when the connection was refused
    /// before any policy was read (a proven identity not at its source address).
    pub egress: Option<(Action, u32)>,
    pub ingress: Option<(Action, u32)>,
}

impl Snapshot {
    /// The identity the kernel gives an address: its workload's, else the most specific
    /// policy address block containing it, else `world`.
    pub fn identity_of(&self, addr: IpAddr) -> u32 {
        let addr = canonical(addr);
        if let Some(id) = self.addresses.get(&addr).or_else(|| self.service_ids.get(&addr)) {
            return *id;
        }
        self.cidrs
            .iter()
            .filter(|c| c.cidr.contains(addr))
            .max_by_key(|c| c.cidr.prefix)
            .map_or(IDENTITY_WORLD, |c| c.id)
    }

    pub fn identity(&self, id: u32) -> Option<&Identity> {
        self.identities.get(&id).map(|i| &**i)
    }

    /// The kernel's algorithm (`decide` in `ebpf/programs`): in each direction, deny beats
    /// allow across the four cells that can match, and without a match the default of the end
    /// the direction belongs to decides; then [`combine`]. Ingress cells wildcard the source,
    /// egress cells the destination.
    pub fn verdict(&self, src: IpAddr, dst: IpAddr, port: u16) -> Verdict {
        let s = self.identity_of(src);
        let d = self.identity_of(dst);
        let egress = self.cells_verdict(Direction::Egress, s, d, port);
        let ingress = self.cells_verdict(Direction::Ingress, s, d, port);
        let (action, rule) = combine(egress, ingress);
        Verdict { action, rule, src_identity: s, dst_identity: d }
    }

    fn cells_verdict(&self, direction: Direction, s: u32, d: u32, port: u16) -> (Action, u32) {
        let probes = match direction {
            Direction::Ingress => {
                [(s, d, port), (s, d, PORT_ANY), (IDENTITY_ANY, d, port), (IDENTITY_ANY, d, PORT_ANY)]
            }
            Direction::Egress => {
                // A Service VIP: its own cells only (`IDENTITY_SERVICE` in the kernel).
                let any = if self.is_service(d) { d } else { IDENTITY_ANY };
                [(s, d, port), (s, d, PORT_ANY), (s, any, port), (s, any, PORT_ANY)]
            }
        };
        let mut allow = None;
        for (src, dst, port) in probes {
            if let Some(c) = self.cells.get(&CellKey { src, dst, port, direction }) {
                if c.action == Action::Deny {
                    return (Action::Deny, c.rule);
                }
                allow.get_or_insert(c.rule);
            }
        }
        match (allow, direction) {
            (Some(rule), _) => (Action::Allow, rule),
            (None, Direction::Ingress) if self.identity(d).is_some_and(|i| i.default_deny) => {
                (Action::Deny, RULE_DEFAULT_DENY)
            }
            (None, Direction::Egress) if self.identity(s).is_some_and(|i| i.egress_default_deny) => {
                (Action::Deny, RULE_EGRESS_DEFAULT_DENY)
            }
            (None, _) => (Action::Allow, RULE_DEFAULT_ALLOW),
        }
    }

    /// A readable name for a rule number.
    pub fn describe_rule(&self, rule: u32, dst_identity: u32) -> String {
        let default_reason =
            || self.identity(dst_identity).map(|i| i.default_reason.clone()).unwrap_or_else(|| "no policy".into());
        match rule {
            RULE_DEFAULT_ALLOW => format!("default allow ({})", default_reason()),
            RULE_DEFAULT_DENY => format!("default deny ({})", default_reason()),
            RULE_EGRESS_DEFAULT_DENY => "default deny egress (an egress policy selects the source)".into(),
            RULE_NOT_AT_SOURCE => "the proven identity is not the workload at the source address".into(),
            RULE_PLAINTEXT_FROM_MESH => "plaintext from a mesh workload (it must use HBONE)".into(),
            RULE_UNKNOWN_ADDRESS => "the destination address is not registered for the enrolled pod".into(),
            n => match self.rules.get(n) {
                Some(r) if r.kind == "SegmentationPolicy" && r.direction == Direction::Ingress => {
                    format!("{} rule {}", r.policy, r.index)
                }
                Some(r) if r.kind == "SegmentationPolicy" => format!("{} egress rule {}", r.policy, r.index),
                Some(r) => format!("{} {} {} rule {}", r.kind, r.policy, direction_word(r.direction), r.index),
                None => format!("rule #{n}"),
            },
        }
    }

    /// As [`Self::describe_rule`], naming the egress policy that isolates the source when
    /// that is what decided.
    pub fn describe_verdict(&self, v: &Verdict) -> String {
        match self.identity(v.src_identity) {
            Some(i) if v.rule == RULE_EGRESS_DEFAULT_DENY => {
                format!("default deny egress ({})", i.egress_default_reason)
            }
            _ => self.describe_rule(v.rule, v.dst_identity),
        }
    }

    /// One direction's part of a decision, readable: whose policy it is and what decided.
    pub fn describe_direction(&self, direction: Direction, (action, rule): (Action, u32), v: &Verdict) -> String {
        let (end, id) = match direction {
            Direction::Egress => ("egress of the source", v.src_identity),
            Direction::Ingress => ("ingress of the destination", v.dst_identity),
        };
        let why = match (direction, rule) {
            (Direction::Egress, RULE_DEFAULT_ALLOW) => "no egress policy selects it".to_string(),
            (Direction::Egress, RULE_EGRESS_DEFAULT_DENY) => self.describe_verdict(&Verdict {
                action,
                rule,
                src_identity: v.src_identity,
                dst_identity: v.dst_identity,
            }),
            _ => self.describe_rule(rule, v.dst_identity),
        };
        format!("{end} ({}): {action:?}, {why}", self.identity_name(id))
    }

    /// The TCP port a workload address names `name`.
    pub fn named_port(&self, addr: IpAddr, name: &str) -> Option<u16> {
        let w = &self.workloads[*self.workload_at.get(&canonical(addr))?];
        w.ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name) && p.protocol == Protocol::Tcp)
            .map(|p| p.container_port)
    }

    /// Whether `id` is a Service VIP's identity.
    /// Whether `addresses` are endpoints of the Service `namespace/name`: all of them
    /// (`Yes`), some (`Maybe`), none (`No`).
    pub fn backs(&self, namespace: &str, name: &str, addresses: &[IpAddr]) -> Match {
        let Some(service) = self.services.iter().find(|s| s.name.split_once('/') == Some((namespace, name))) else {
            return Match::No;
        };
        let is_endpoint =
            |a: &IpAddr| service.ports.iter().flat_map(|p| &p.endpoints).any(|e| canonical(e.address.ip()) == *a);
        match addresses.iter().filter(|a| is_endpoint(a)).count() {
            0 => Match::No,
            n if n == addresses.len() => Match::Yes,
            _ => Match::Maybe,
        }
    }

    pub fn is_service(&self, id: u32) -> bool {
        id >= FIRST_SERVICE_IDENTITY && self.services.iter().any(|s| s.id == id)
    }

    /// `namespace/serviceaccount` of an identity, the block of a CIDR identity,
    /// `service:<namespace>/<name>` of a VIP, or `world`.
    pub fn identity_name(&self, id: u32) -> String {
        match self.identity(id) {
            Some(i) => format!("{}/{}", i.labels.namespace, i.labels.service_account),
            None if id == IDENTITY_WORLD => "world".into(),
            None if id >= FIRST_SERVICE_IDENTITY && self.is_service(id) => {
                format!("service:{}", self.services.iter().find(|s| s.id == id).map_or("", |s| s.name.as_str()))
            }
            None => match self.cidrs.iter().find(|c| c.id == id) {
                Some(c) => format!("cidr:{}", c.cidr),
                None => format!("identity-{id}"),
            },
        }
    }

    fn principal(&self, l: &IdentityLabels) -> String {
        format!("{}/ns/{}/sa/{}", self.trust_domain, l.namespace, l.service_account)
    }

    /// Policies of one direction that select a workload identity.
    fn policies_for(&self, ident: &Identity, direction: Direction) -> impl Iterator<Item = &PolicyEntry> {
        self.policies.iter().map(|p| &**p).filter(move |p| {
            p.direction == direction
                && p.namespace == ident.labels.namespace
                && p.selector.matches(&ident.labels.labels)
        })
    }

    /// One direction's exact verdict for the workload `selected` (the destination for
    /// ingress, the source for egress) facing `peer`. With `audit`, Audit-mode policies count
    /// as if they were enforced.
    fn evaluate(
        &self,
        direction: Direction,
        selected: &Identity,
        peer: &SourceFacts<'_>,
        port: u16,
        named: &dyn Fn(&str) -> Option<u16>,
        audit: bool,
    ) -> (Action, u32) {
        let counts = |p: &&PolicyEntry| p.mode == Mode::Enforce || audit;
        let matching = |action: Action| {
            self.policies_for(selected, direction).filter(counts).filter(|p| p.action == action).find_map(|p| {
                p.rules.iter().enumerate().find_map(|(i, r)| {
                    (rule_port_matches(r, port, named) && rule_peers_match(r, peer) == Match::Yes)
                        .then_some(p.first_rule + i as u32)
                })
            })
        };
        let (default_deny, deny_rule) = match direction {
            Direction::Ingress => (selected.default_deny, RULE_DEFAULT_DENY),
            Direction::Egress => (selected.egress_default_deny, RULE_EGRESS_DEFAULT_DENY),
        };
        // An Allow policy isolates what it selects, in its direction.
        let isolated =
            default_deny || self.policies_for(selected, direction).filter(counts).any(|p| p.action == Action::Allow);
        if let Some(rule) = matching(Action::Deny) {
            (Action::Deny, rule)
        } else if let Some(rule) = matching(Action::Allow) {
            (Action::Allow, rule)
        } else if isolated {
            (Action::Deny, deny_rule)
        } else {
            (Action::Allow, RULE_DEFAULT_ALLOW)
        }
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
            return Decision { verdict, audit_deny: None, egress: None, ingress: None };
        }
        self.authorize(src, None, dst, port)
    }

    pub fn authorize(&self, src: IpAddr, proven: Option<(&str, &str)>, dst: IpAddr, port: u16) -> Decision {
        if let Some(&id) = self.service_ids.get(&canonical(dst)) {
            return self.authorize_service(src, proven, canonical(dst), port, id);
        }
        let src_identity = self.identity_of(src);
        let dst_identity = self.identity_of(dst);
        let at_address = self.identity(src_identity);
        let labels_at = at_address.map(|i| &i.labels);
        let verdict = |action, rule| Verdict { action, rule, src_identity, dst_identity };
        let (namespace, service_account, labels) = match proven {
            Some((ns, sa)) => {
                let Some(same) = labels_at.filter(|l| l.namespace == ns && l.service_account == sa) else {
                    let verdict = verdict(Action::Deny, RULE_NOT_AT_SOURCE);
                    return Decision { verdict, audit_deny: None, egress: None, ingress: None };
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
        let src_in_block = |c: &Cidr| Match::from_bool(c.contains(src));
        let src_backs = |ns: &str, name: &str| self.backs(ns, name, &[canonical(src)]);
        let src_facts = SourceFacts {
            principal: principal.as_deref(),
            namespace,
            service_account,
            labels,
            namespace_labels: namespace.and_then(|n| self.namespaces.get(n)),
            in_block: &src_in_block,
            backs: &src_backs,
        };
        let dst_ident = self.identity(dst_identity);
        let dst_labels = dst_ident.map(|i| &i.labels);
        let dst_principal = dst_labels.map(|l| self.principal(l));
        let dst_in_block = |c: &Cidr| Match::from_bool(c.contains(dst));
        let dst_backs = |ns: &str, name: &str| self.backs(ns, name, &[canonical(dst)]);
        let dst_facts = SourceFacts {
            principal: dst_principal.as_deref(),
            namespace: dst_labels.map(|l| l.namespace.as_str()),
            service_account: dst_labels.map(|l| l.service_account.as_str()),
            labels: dst_labels.map(|l| &l.labels),
            namespace_labels: dst_labels.and_then(|l| self.namespaces.get(&l.namespace)),
            in_block: &dst_in_block,
            backs: &dst_backs,
        };
        let named = |name: &str| self.named_port(dst, name);
        let evaluate = |audit: bool| {
            // Not a workload: no policy selects it.
            let ingress = dst_ident.map_or((Action::Allow, RULE_DEFAULT_ALLOW), |d| {
                self.evaluate(Direction::Ingress, d, &src_facts, port, &named, audit)
            });
            let egress = at_address.map_or((Action::Allow, RULE_DEFAULT_ALLOW), |s| {
                self.evaluate(Direction::Egress, s, &dst_facts, port, &named, audit)
            });
            let (action, rule) = combine(egress, ingress);
            (verdict(action, rule), egress, ingress)
        };
        let (enforced, egress, ingress) = evaluate(false);
        let audit_deny = match enforced.action {
            Action::Allow => Some(evaluate(true).0).filter(|v| v.action == Action::Deny).map(|v| v.rule),
            Action::Deny => None,
        };
        Decision { verdict: enforced, audit_deny, egress: Some(egress), ingress: Some(ingress) }
    }
}

fn identities_in_order<S: Serializer>(ids: &Arc<BTreeMap<u32, Arc<Identity>>>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(ids.values().map(|i| &**i))
}

fn shared<T: Serialize, S: Serializer>(value: &Arc<T>, s: S) -> Result<S::Ok, S::Error> {
    T::serialize(value, s)
}

fn shared_each<T: Serialize, S: Serializer>(values: &[Arc<T>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(values.iter().map(|v| &**v))
}

/// A connection needs both ends' consent: the source's egress and the destination's ingress.
/// The verdict names the egress rule when egress denies, or when it is the only rule that
/// allowed (no ingress rule decided); otherwise the ingress one.
pub fn combine(egress: (Action, u32), ingress: (Action, u32)) -> (Action, u32) {
    if egress.0 == Action::Deny {
        egress
    } else if ingress.0 == Action::Deny || ingress.1 != RULE_DEFAULT_ALLOW {
        ingress
    } else {
        egress
    }
}

fn direction_word(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

/// IPv4-mapped IPv6 addresses are the same endpoint as the IPv4 address.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
        v4 => v4,
    }
}

#[cfg(test)]
mod direction_tests;
#[cfg(test)]
mod identity_tests;
#[cfg(test)]
mod incremental_tests;
#[cfg(test)]
mod services_tests;
#[cfg(test)]
mod tests;
