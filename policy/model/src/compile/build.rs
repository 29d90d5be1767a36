//! Resources to a [`Snapshot`]: identities, namespaces, workloads, and every policy (of
//! either kind, in either direction) as [`PolicyEntry`]s in one stable order; then the cells.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::cells::compile_cells;
use std::sync::Arc;

use super::{
    CidrIdentity, DEFAULT_TRUST_DOMAIN, Direction, FIRST_CIDR_IDENTITY, Identities, Identity, IdentityLabels,
    PolicyEntry, PolicyKey, Rules, Snapshot, WorkloadEntry, canonical,
};
use crate::cidr::Cidr;
use crate::k8s;
use crate::load::Located;
use crate::matching::{PolicyRule, PortMatch};
use crate::resource::{Action, Metadata, Mode, Peer, Resource, Selector, WorkloadSpec};

/// Compiles resources that [`crate::validate::validate`] accepted.
pub fn compile(resources: &[Located]) -> Snapshot {
    compile_for(resources, DEFAULT_TRUST_DOMAIN)
}

/// As [`compile`], in `trust_domain`, numbering identities from `FIRST_WORKLOAD_IDENTITY`
/// up in sorted order (no pre-assigned numbers).
pub fn compile_for(resources: &[Located], trust_domain: &str) -> Snapshot {
    compile_with(resources, trust_domain, &Identities::default())
}

/// A policy of one direction before it is numbered.
pub(super) struct Draft {
    kind: &'static str,
    name: String,
    namespace: String,
    selector: Selector,
    direction: Direction,
    action: Action,
    mode: Mode,
    rules: Vec<PolicyRule>,
}

/// A label selector without a namespace reads in the policy's own namespace (Kubernetes'
/// podSelector peer); `validate` warns where the literal reading would match more.
fn scoped(peers: &[Peer], namespace: &str) -> Vec<Peer> {
    peers
        .iter()
        .map(|p| {
            let mut p = p.clone();
            if p.reads_in_policy_namespace() {
                p.namespace = Some(namespace.to_string());
            }
            p
        })
        .collect()
}

fn exact_ports(ports: &[u16]) -> Vec<PortMatch> {
    ports.iter().map(|p| PortMatch::Range(*p, *p)).collect()
}

impl Draft {
    pub(super) fn key(&self) -> PolicyKey {
        PolicyKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            kind: self.kind.to_string(),
            direction: self.direction,
        }
    }

    pub(super) fn entry(self, first_rule: u32) -> PolicyEntry {
        PolicyEntry {
            name: self.name,
            kind: self.kind.into(),
            namespace: self.namespace,
            selector: self.selector,
            direction: self.direction,
            action: self.action,
            mode: self.mode,
            rules: self.rules,
            first_rule,
        }
    }

    pub(super) fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The address blocks its rules name (each gets an identity).
    pub(super) fn blocks(&self) -> impl Iterator<Item = Cidr> + '_ {
        Draft::blocks_of(&self.rules)
    }

    pub(super) fn blocks_of(rules: &[PolicyRule]) -> impl Iterator<Item = Cidr> + '_ {
        rules.iter().flat_map(|r| &r.peers).flat_map(|p| p.ip_blocks.iter().chain(&p.not_ip_blocks).copied())
    }
}

fn drafts(resources: &[Located]) -> Vec<Draft> {
    let mut out = Vec::new();
    for r in resources {
        drafts_of(r, &mut out);
    }
    // A stable order, so rule numbers do not depend on file order.
    out.sort_by_cached_key(Draft::key);
    out
}

/// The policies (one per direction) of a resource; none for other kinds.
pub(super) fn drafts_of(r: &Located, out: &mut Vec<Draft>) {
    {
        let meta = r.resource.metadata();
        let namespace = meta.namespace.clone().unwrap_or_default();
        let name = format!("{namespace}/{}", meta.name);
        match &r.resource {
            Resource::SegmentationPolicy { spec, .. } => {
                let draft = |direction, rules: Vec<PolicyRule>| Draft {
                    kind: "SegmentationPolicy",
                    name: name.clone(),
                    namespace: namespace.clone(),
                    selector: spec.selector.clone(),
                    direction,
                    action: spec.action,
                    mode: spec.mode,
                    rules,
                };
                // Without `egress`, a policy is the ingress policy it always was.
                if !spec.rules.is_empty() || spec.egress.is_none() {
                    let rules = spec
                        .rules
                        .iter()
                        .map(|r| PolicyRule {
                            peers: scoped(&r.from, &namespace),
                            ports: exact_ports(&r.ports),
                            not_ports: r.not_ports.clone(),
                        })
                        .collect();
                    out.push(draft(Direction::Ingress, rules));
                }
                if let Some(egress) = &spec.egress {
                    let rules = egress
                        .iter()
                        .map(|r| PolicyRule {
                            peers: scoped(&r.to, &namespace),
                            ports: exact_ports(&r.ports),
                            not_ports: r.not_ports.clone(),
                        })
                        .collect();
                    out.push(draft(Direction::Egress, rules));
                }
            }
            Resource::NetworkPolicy { spec, .. } => {
                // What it cannot enforce (UDP, SCTP) the validator reports as warnings.
                let t = k8s::translate(&namespace, spec);
                for (direction, rules) in [(Direction::Ingress, t.ingress), (Direction::Egress, t.egress)] {
                    let Some(rules) = rules else { continue };
                    out.push(Draft {
                        kind: "NetworkPolicy",
                        name: name.clone(),
                        namespace: namespace.clone(),
                        selector: t.selector.clone(),
                        direction,
                        action: Action::Allow,
                        mode: Mode::Enforce,
                        rules,
                    });
                }
            }
            Resource::Workload { .. } | Resource::Namespace { .. } | Resource::Service { .. } => {}
            // L7: compiled for the waypoints (`crate::waypoint::compile`), not for the kernel.
            Resource::HttpRoute { .. }
            | Resource::Gateway { .. }
            | Resource::AuthorizationPolicy { .. }
            | Resource::TrafficPolicy { .. } => {}
        }
    }
}

/// Every distinct identity of the workloads among `resources`, sorted: what the control
/// plane numbers in its store before it pushes ([`compile_with`] takes the numbers).
pub fn identity_labels_of(resources: &[Located]) -> BTreeSet<IdentityLabels> {
    resources.iter().filter_map(|r| identity_labels(&r.resource)).collect()
}

pub(super) fn identity_labels(r: &Resource) -> Option<IdentityLabels> {
    match r {
        Resource::Workload { metadata, spec, .. } => Some(IdentityLabels {
            namespace: metadata.namespace.clone().unwrap_or_default(),
            service_account: spec.service_account.clone(),
            labels: spec.labels.clone(),
        }),
        _ => None,
    }
}

/// Identities, workloads, addresses and namespaces of `resources` (the workloads in their
/// order), numbered with `numbered`: the part of a snapshot that policies do not change
/// (but for isolation, which [`super::cells`] adds).
pub(super) fn base<'a>(
    resources: impl Iterator<Item = &'a Located> + Clone,
    trust_domain: &str,
    numbered: &Identities,
) -> Snapshot {
    let mut namespace_defaults = HashMap::new();
    let mut namespace_labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    // Each workload's identity labels, copied once.
    let members: Vec<(IdentityLabels, &Metadata, &WorkloadSpec)> = resources
        .clone()
        .filter_map(|r| match &r.resource {
            Resource::Workload { metadata, spec, .. } => Some((identity_labels(&r.resource)?, metadata, spec)),
            _ => None,
        })
        .collect();
    let labels_set: BTreeSet<&IdentityLabels> = members.iter().map(|(l, _, _)| l).collect();
    for l in &labels_set {
        namespace_labels.entry(l.namespace.clone()).or_default();
    }
    for r in resources {
        if let Resource::Namespace { metadata, spec, .. } = &r.resource {
            namespace_defaults.insert(metadata.name.clone(), spec.default_action);
            namespace_labels.insert(metadata.name.clone(), metadata.labels.clone());
        }
    }
    let mut snapshot = Snapshot { trust_domain: trust_domain.into(), ..Snapshot::default() };
    snapshot.namespaces =
        Arc::new(namespace_labels.iter().map(|(n, l)| (n.clone(), k8s::namespace_labels(n, l))).collect());

    let id_by_labels = numbered.number_each(&labels_set);
    let mut identities = BTreeMap::new();
    for (&labels, &id) in &id_by_labels {
        let ns_default = namespace_defaults.get(&labels.namespace).copied().unwrap_or_default();
        identities.insert(
            id,
            Identity {
                id,
                default_deny: ns_default == Action::Deny,
                default_reason: format!("namespace {} default {:?}", labels.namespace, ns_default),
                egress_default_deny: false,
                egress_default_reason: String::new(),
                labels: labels.clone(),
                addresses: vec![],
            },
        );
    }
    let (mut addresses, mut workload_at, mut workloads) = (HashMap::new(), HashMap::new(), Vec::new());
    for (labels, metadata, spec) in &members {
        let id = id_by_labels[labels];
        for a in &spec.addresses {
            addresses.insert(canonical(*a), id);
            workload_at.insert(canonical(*a), workloads.len());
            if let Some(ident) = identities.get_mut(&id) {
                ident.addresses.push(canonical(*a));
            }
        }
        workloads.push(WorkloadEntry {
            name: metadata.name.clone(),
            namespace: labels.namespace.clone(),
            node: spec.node.clone(),
            uid: spec.uid.clone(),
            addresses: spec.addresses.clone(),
            identity: id,
            ports: spec.ports.clone(),
        });
    }
    snapshot.identities = Arc::new(identities.into_iter().map(|(id, i)| (id, Arc::new(i))).collect());
    snapshot.addresses = Arc::new(addresses);
    snapshot.workload_at = Arc::new(workload_at);
    snapshot.workloads = Arc::new(workloads);
    snapshot
}

/// Services with their endpoints and indexes: before the policy cells, which read them for
/// `service` peers.
pub(super) fn service_entries<'a>(snapshot: &mut Snapshot, resources: impl Iterator<Item = &'a Located> + Clone) {
    let services = super::services::compile_services(resources);
    snapshot.service_index = Arc::new(super::services::index(&services));
    snapshot.service_ids = Arc::new(services.iter().map(|s| (s.vip, s.id)).collect());
    snapshot.services = Arc::new(services);
}

/// Compiles with the numbers of `numbered` (see [`Identities`]); identities it does not number
/// get numbers above its largest.
pub fn compile_with(resources: &[Located], trust_domain: &str, numbered: &Identities) -> Snapshot {
    let mut snapshot = base(resources.iter(), trust_domain, numbered);
    let drafts = drafts(resources);
    let blocks: BTreeSet<Cidr> = drafts.iter().flat_map(Draft::blocks).collect();
    snapshot.cidrs = Arc::new(
        blocks
            .into_iter()
            .enumerate()
            .map(|(i, cidr)| CidrIdentity { id: FIRST_CIDR_IDENTITY + i as u32, cidr })
            .collect(),
    );
    let mut next_rule = 0;
    for d in drafts {
        let n = d.rule_count() as u32;
        snapshot.policies.push(Arc::new(d.entry(next_rule)));
        next_rule += n;
    }
    snapshot.rules = Rules::new(&snapshot.policies);
    service_entries(&mut snapshot, resources.iter());
    compile_cells(&mut snapshot);
    let _ = super::services::service_cells(&mut snapshot);
    snapshot.waypoints = Arc::new(crate::waypoint::waypoint_index(resources, trust_domain));
    snapshot
}
