//! Resources to a [`Snapshot`]: identities, namespaces, workloads, and every policy (of
//! either kind, in either direction) as [`PolicyEntry`]s in one stable order; then the cells.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::cells::compile_cells;
use super::{
    CidrIdentity, DEFAULT_TRUST_DOMAIN, Direction, FIRST_CIDR_IDENTITY, Identities, Identity, IdentityLabels,
    PolicyEntry, RuleRef, Snapshot, WorkloadEntry, canonical,
};
use crate::k8s;
use crate::load::Located;
use crate::matching::{PolicyRule, PortMatch};
use crate::resource::{Action, Mode, Peer, Resource, Selector};

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
struct Draft {
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
            if p.is_unscoped_label_selector() {
                p.namespace = Some(namespace.to_string());
            }
            p
        })
        .collect()
}

fn exact_ports(ports: &[u16]) -> Vec<PortMatch> {
    ports.iter().map(|p| PortMatch::Range(*p, *p)).collect()
}

fn drafts(resources: &[Located]) -> Vec<Draft> {
    let mut out = Vec::new();
    for r in resources {
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
    // A stable order, so rule numbers do not depend on file order.
    out.sort_by(|a, b| (&a.namespace, &a.name, a.kind, a.direction).cmp(&(&b.namespace, &b.name, b.kind, b.direction)));
    out
}

/// Every distinct identity of the workloads among `resources`, sorted: what the control
/// plane numbers in its store before it pushes ([`compile_with`] takes the numbers).
pub fn identity_labels_of(resources: &[Located]) -> BTreeSet<IdentityLabels> {
    resources.iter().filter_map(|r| identity_labels(&r.resource)).collect()
}

fn identity_labels(r: &Resource) -> Option<IdentityLabels> {
    match r {
        Resource::Workload { metadata, spec, .. } => Some(IdentityLabels {
            namespace: metadata.namespace.clone().unwrap_or_default(),
            service_account: spec.service_account.clone(),
            labels: spec.labels.clone(),
        }),
        _ => None,
    }
}

/// Compiles with the numbers of `numbered` (see [`Identities`]); identities it does not number
/// get numbers above its largest.
pub fn compile_with(resources: &[Located], trust_domain: &str, numbered: &Identities) -> Snapshot {
    let mut namespace_defaults = HashMap::new();
    let mut namespace_labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let labels_set = identity_labels_of(resources);
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
    snapshot.namespaces = namespace_labels.iter().map(|(n, l)| (n.clone(), k8s::namespace_labels(n, l))).collect();

    let drafts = drafts(resources);
    let blocks: BTreeSet<_> = drafts
        .iter()
        .flat_map(|d| d.rules.iter().flat_map(|r| &r.peers))
        .flat_map(|p| p.ip_blocks.iter().chain(&p.not_ip_blocks).copied())
        .collect();

    let id_by_labels = numbered.number(&labels_set);
    for (labels, &id) in &id_by_labels {
        let labels = labels.clone();
        let ns_default = namespace_defaults.get(&labels.namespace).copied().unwrap_or_default();
        snapshot.identities.insert(
            id,
            Identity {
                id,
                default_deny: ns_default == Action::Deny,
                default_reason: format!("namespace {} default {:?}", labels.namespace, ns_default),
                egress_default_deny: false,
                egress_default_reason: String::new(),
                labels,
                addresses: vec![],
            },
        );
    }
    snapshot.cidrs = blocks
        .into_iter()
        .enumerate()
        .map(|(i, cidr)| CidrIdentity { id: FIRST_CIDR_IDENTITY + i as u32, cidr })
        .collect();
    for r in resources {
        let (Some(labels), Resource::Workload { metadata, spec, .. }) = (identity_labels(&r.resource), &r.resource)
        else {
            continue;
        };
        let id = id_by_labels[&labels];
        for a in &spec.addresses {
            snapshot.addresses.insert(canonical(*a), id);
            snapshot.workload_at.insert(canonical(*a), snapshot.workloads.len());
            if let Some(ident) = snapshot.identities.get_mut(&id) {
                ident.addresses.push(canonical(*a));
            }
        }
        snapshot.workloads.push(WorkloadEntry {
            name: metadata.name.clone(),
            namespace: labels.namespace,
            node: spec.node.clone(),
            uid: spec.uid.clone(),
            addresses: spec.addresses.clone(),
            identity: id,
            ports: spec.ports.clone(),
        });
    }

    for d in drafts {
        let first_rule = snapshot.rules.len() as u32;
        for index in 0..d.rules.len() {
            snapshot.rules.push(RuleRef {
                policy: d.name.clone(),
                kind: d.kind.into(),
                direction: d.direction,
                index,
                action: d.action,
                mode: d.mode,
            });
        }
        snapshot.policies.push(PolicyEntry {
            name: d.name,
            kind: d.kind.into(),
            namespace: d.namespace,
            selector: d.selector,
            direction: d.direction,
            action: d.action,
            mode: d.mode,
            rules: d.rules,
            first_rule,
        });
    }
    snapshot.services = super::services::compile_services(resources);
    snapshot.service_index = super::services::index(&snapshot.services);
    snapshot.service_ids = snapshot.services.iter().map(|s| (s.vip, s.id)).collect();
    compile_cells(&mut snapshot);
    // After the other cells: they decide the egress defaults these rely on.
    super::services::service_cells(&mut snapshot);
    snapshot
}
