//! Resources to a [`Snapshot`]: identities, namespaces, workloads, and every policy (of
//! either kind, in either direction) as [`PolicyEntry`]s in one stable order; then the cells.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::cells::compile_cells;
use super::{
    CidrIdentity, DEFAULT_TRUST_DOMAIN, Direction, FIRST_CIDR_IDENTITY, FIRST_WORKLOAD_IDENTITY, Identity,
    IdentityLabels, PolicyEntry, RuleRef, Snapshot, WorkloadEntry, canonical,
};
use crate::k8s;
use crate::load::{Located, Origin};
use crate::matching::{PolicyRule, PortMatch};
use crate::resource::{Action, Mode, Peer, Protocol, Resource, Selector};

/// Compiles resources that [`crate::validate::validate`] accepted.
pub fn compile(resources: &[Located]) -> Snapshot {
    compile_for(resources, DEFAULT_TRUST_DOMAIN)
}

/// A policy of one direction before it is numbered.
struct Draft<'a> {
    origin: &'a Origin,
    kind: &'static str,
    name: String,
    namespace: String,
    selector: Selector,
    direction: Direction,
    action: Action,
    mode: Mode,
    rules: Vec<PolicyRule>,
    /// Where each rule's list is, for warnings (`spec.rules`, `spec.egress`, `spec.ingress`).
    list: &'static str,
    /// The peers' field name in a rule (`from`, `to`).
    peers_field: &'static str,
    /// (rule, peer) of label selectors read in the policy's namespace because they name none.
    scoped: Vec<(usize, usize)>,
}

/// A label selector without a namespace reads in the policy's own namespace (Kubernetes'
/// podSelector peer); what it would also match elsewhere is reported by [`scoping_warnings`].
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

fn drafts(resources: &[Located]) -> (Vec<Draft<'_>>, Vec<String>) {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for r in resources {
        let (meta, origin) = (r.resource.metadata(), &r.origin);
        let namespace = meta.namespace.clone().unwrap_or_default();
        let name = format!("{namespace}/{}", meta.name);
        match &r.resource {
            Resource::SegmentationPolicy { spec, .. } => {
                let draft = |direction, rules: Vec<PolicyRule>, list, peers_field, original: Vec<&Vec<Peer>>| Draft {
                    scoped: original
                        .iter()
                        .enumerate()
                        .flat_map(|(r, peers)| {
                            peers
                                .iter()
                                .enumerate()
                                .filter(|(_, p)| p.is_unscoped_label_selector())
                                .map(move |(i, _)| (r, i))
                        })
                        .collect(),
                    origin,
                    kind: "SegmentationPolicy",
                    name: name.clone(),
                    namespace: namespace.clone(),
                    selector: spec.selector.clone(),
                    direction,
                    action: spec.action,
                    mode: spec.mode,
                    rules,
                    list,
                    peers_field,
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
                    let original = spec.rules.iter().map(|r| &r.from).collect();
                    out.push(draft(Direction::Ingress, rules, "spec.rules", "from", original));
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
                    let original = egress.iter().map(|r| &r.to).collect();
                    out.push(draft(Direction::Egress, rules, "spec.egress", "to", original));
                }
            }
            Resource::NetworkPolicy { spec, .. } => {
                let t = k8s::translate(&namespace, spec);
                for n in t.notes {
                    warnings.push(format!("{origin}: NetworkPolicy {name}: {}: {}", n.field, n.message));
                }
                let directions = [
                    (Direction::Ingress, t.ingress, "spec.ingress", "from"),
                    (Direction::Egress, t.egress, "spec.egress", "to"),
                ];
                for (direction, rules, list, peers_field) in directions {
                    let Some(rules) = rules else { continue };
                    out.push(Draft {
                        origin,
                        kind: "NetworkPolicy",
                        name: name.clone(),
                        namespace: namespace.clone(),
                        selector: t.selector.clone(),
                        direction,
                        action: Action::Allow,
                        mode: Mode::Enforce,
                        rules,
                        list,
                        peers_field,
                        scoped: vec![],
                    });
                }
            }
            Resource::Workload { .. } | Resource::Namespace { .. } => {}
        }
    }
    // A stable order, so rule numbers do not depend on file order.
    out.sort_by(|a, b| (&a.namespace, &a.name, a.kind, a.direction).cmp(&(&b.namespace, &b.name, b.kind, b.direction)));
    (out, warnings)
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

pub fn compile_for(resources: &[Located], trust_domain: &str) -> Snapshot {
    let mut namespace_defaults = HashMap::new();
    let mut namespace_labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let labels_set: BTreeSet<IdentityLabels> = resources.iter().filter_map(|r| identity_labels(&r.resource)).collect();
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

    let (drafts, mut warnings) = drafts(resources);
    let blocks: BTreeSet<_> = drafts
        .iter()
        .flat_map(|d| d.rules.iter().flat_map(|r| &r.peers))
        .flat_map(|p| p.ip_blocks.iter().chain(&p.not_ip_blocks).copied())
        .collect();

    let mut id_by_labels = HashMap::new();
    for (i, labels) in labels_set.into_iter().enumerate() {
        let id = FIRST_WORKLOAD_IDENTITY + i as u32;
        let ns_default = namespace_defaults.get(&labels.namespace).copied().unwrap_or_default();
        id_by_labels.insert(labels.clone(), id);
        snapshot.identities.push(Identity {
            id,
            default_deny: ns_default == Action::Deny,
            default_reason: format!("namespace {} default {:?}", labels.namespace, ns_default),
            egress_default_deny: false,
            egress_default_reason: String::new(),
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
        let (Some(labels), Resource::Workload { metadata, spec, .. }) = (identity_labels(&r.resource), &r.resource)
        else {
            continue;
        };
        let id = id_by_labels[&labels];
        for a in &spec.addresses {
            snapshot.addresses.insert(canonical(*a), id);
            snapshot.workload_at.insert(canonical(*a), snapshot.workloads.len());
            snapshot.identities[(id - FIRST_WORKLOAD_IDENTITY) as usize].addresses.push(canonical(*a));
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
        warnings.extend(draft_warnings(&snapshot, &d));
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
    warnings.dedup();
    snapshot.warnings = warnings;
    compile_cells(&mut snapshot);
    snapshot
}

/// Unknown namespaces, port names no workload has, and label selectors that the scoped
/// reading keeps from matching workloads of other namespaces. Warnings, never errors:
/// policies may exist before their pods.
fn draft_warnings(s: &Snapshot, d: &Draft<'_>) -> Vec<String> {
    let mut out = Vec::new();
    let mut warn = |field: String, message: String| {
        out.push(format!("{}: {} {}: {field}: {message}", d.origin, d.kind, d.name, message = message))
    };
    let known = |ns: &str| s.namespaces.contains_key(ns);
    if !known(&d.namespace) {
        warn(
            "metadata.namespace".into(),
            format!(
                "namespace {:?} has no workloads and no Namespace resource: the policy selects nothing yet",
                d.namespace
            ),
        );
    }
    for (r, rule) in d.rules.iter().enumerate() {
        for (p, peer) in rule.peers.iter().enumerate() {
            let field = format!("{}[{r}].{}[{p}]", d.list, d.peers_field);
            for ns in peer.namespace.iter().chain(&peer.namespaces) {
                if !known(ns) && ns != &d.namespace {
                    warn(field.clone(), format!("namespace {ns:?} has no workloads and no Namespace resource"));
                }
            }
            if let Some(sel) = &peer.namespace_selector
                && !s.namespaces.values().any(|l| sel.matches(l))
            {
                warn(format!("{field}.namespaceSelector"), "selects no namespace known yet".into());
            }
            if d.scoped.contains(&(r, p)) {
                let pods = Selector {
                    match_labels: peer.match_labels.clone(),
                    match_expressions: peer.match_expressions.clone(),
                };
                let elsewhere: BTreeSet<&str> = s
                    .identities
                    .iter()
                    .filter(|i| i.labels.namespace != d.namespace && pods.matches(&i.labels.labels))
                    .map(|i| i.labels.namespace.as_str())
                    .collect();
                if !elsewhere.is_empty() {
                    warn(
                        field.clone(),
                        format!(
                            "matchLabels without a namespace matches workloads of {:?} only (the policy's own, as Kubernetes reads a podSelector), not those of {}: add `namespaces` or `namespaceSelector: {{}}` to match them",
                            d.namespace,
                            elsewhere.into_iter().collect::<Vec<_>>().join(", ")
                        ),
                    );
                }
            }
        }
        for port in &rule.ports {
            if let PortMatch::Named(name) = port
                && !s.workloads.iter().any(|w| {
                    w.ports.iter().any(|c| c.name.as_deref() == Some(name.as_str()) && c.protocol == Protocol::Tcp)
                })
            {
                warn(
                    format!("{}[{r}].ports", d.list),
                    format!("no workload has a TCP container port named {name:?}: the rule matches no port yet"),
                );
            }
        }
    }
    out
}
