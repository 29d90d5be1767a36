//! Compiles validated resources into a [`Snapshot`]: numeric identities, the identity of every
//! workload address, and the policy as (source, destination, port) cells. The kernel maps are a
//! direct image of a snapshot, and [`Snapshot::verdict`] runs the kernel's algorithm in user
//! space (for `palisade explain`, tests, and the proxies), so both always agree.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use palisade_ebpf_common::{IDENTITY_ANY, IDENTITY_WORLD, PORT_ANY, RULE_DEFAULT_ALLOW, RULE_DEFAULT_DENY};
use serde::Serialize;

use crate::load::Located;
use crate::resource::{Action, Peer, Resource};

/// First identity number given to workloads; lower numbers are reserved.
pub const FIRST_WORKLOAD_IDENTITY: u32 = 256;

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

#[derive(Clone, Debug, Default, Serialize)]
pub struct Snapshot {
    pub identities: Vec<Identity>,
    pub workloads: Vec<WorkloadEntry>,
    pub rules: Vec<RuleRef>,
    #[serde(skip)]
    pub cells: HashMap<CellKey, Cell>,
    #[serde(skip)]
    pub addresses: HashMap<IpAddr, u32>,
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

impl Snapshot {
    pub fn identity_of(&self, addr: IpAddr) -> u32 {
        self.addresses.get(&canonical(addr)).copied().unwrap_or(IDENTITY_WORLD)
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
            n => match self.rules.get(n as usize) {
                Some(r) => format!("{} rule {}", r.policy, r.index),
                None => format!("rule #{n}"),
            },
        }
    }

    /// `namespace/serviceaccount` of an identity, or `world`.
    pub fn identity_name(&self, id: u32) -> String {
        match self.identity(id) {
            Some(i) => format!("{}/{}", i.labels.namespace, i.labels.service_account),
            None if id == IDENTITY_WORLD => "world".into(),
            None => format!("identity-{id}"),
        }
    }
}

/// IPv4-mapped IPv6 addresses are the same endpoint as the IPv4 address.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
        v4 => v4,
    }
}

fn peer_matches(peer: &Peer, id: &IdentityLabels) -> bool {
    peer.namespace.as_ref().is_none_or(|n| *n == id.namespace)
        && peer.service_account.as_ref().is_none_or(|s| *s == id.service_account)
        && peer.match_labels.iter().all(|(k, v)| id.labels.get(k) == Some(v))
}

/// Compiles resources that [`crate::validate::validate`] accepted.
pub fn compile(resources: &[Located]) -> Snapshot {
    let mut labels_set = BTreeSet::new();
    let mut namespace_defaults = HashMap::new();
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
            Resource::SegmentationPolicy { .. } => {}
        }
    }
    let mut snapshot = Snapshot::default();
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
        });
    }
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
        let namespace = meta.namespace.as_deref().unwrap_or_default();
        let policy_name = format!("{namespace}/{}", meta.name);
        let dsts: Vec<u32> = snapshot
            .identities
            .iter()
            .filter(|i| {
                i.labels.namespace == namespace
                    && spec.selector.match_labels.iter().all(|(k, v)| i.labels.labels.get(k) == Some(v))
            })
            .map(|i| i.id)
            .collect();
        if spec.action == Action::Allow {
            for &d in &dsts {
                let ident = &mut snapshot.identities[(d - FIRST_WORKLOAD_IDENTITY) as usize];
                if !ident.default_deny {
                    ident.default_deny = true;
                    ident.default_reason = format!("selected by Allow policy {policy_name}");
                }
            }
        }
        for (index, rule) in spec.rules.iter().enumerate() {
            let rule_no = snapshot.rules.len() as u32;
            snapshot.rules.push(RuleRef { policy: policy_name.clone(), index, action: spec.action });
            let srcs: Vec<u32> = if rule.from.is_empty() {
                vec![IDENTITY_ANY]
            } else {
                snapshot
                    .identities
                    .iter()
                    .filter(|i| rule.from.iter().any(|p| peer_matches(p, &i.labels)))
                    .map(|i| i.id)
                    .collect()
            };
            let ports: Vec<u16> = if rule.ports.is_empty() { vec![PORT_ANY] } else { rule.ports.clone() };
            for &dst in &dsts {
                for &src in &srcs {
                    for &port in &ports {
                        let new = Cell { action: spec.action, rule: rule_no };
                        snapshot
                            .cells
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
    snapshot
}

#[cfg(test)]
mod tests;
