//! References across resources that point at nothing, and policies that attach to nothing.
//! These are warnings: a policy may be applied before the namespace and the pods it names,
//! and it takes effect as they appear. Each is reported at the line of the reference.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::{At, Below, Entry, Findings};
use crate::load::Located;
use crate::resource::{Peer, Resource, Selector};

/// One workload as references see it.
struct Workload<'a> {
    namespace: &'a str,
    account: &'a str,
    labels: &'a BTreeMap<String, String>,
}

/// What the batch knows of namespaces and workloads, indexed: a cluster-scale batch has
/// thousands of workloads and a hundred thousand peers, and a scan of every workload per peer
/// is seconds. Every list of workload indices is in batch order.
struct Inventory<'a> {
    /// Namespaces defined by a `Namespace` resource or holding a workload.
    known: HashSet<&'a str>,
    /// Labels of every known namespace as selectors see them (one with workloads only has
    /// just its name label).
    namespace_labels: Vec<BTreeMap<String, String>>,
    workloads: Vec<Workload<'a>>,
    /// Every workload's index.
    all: Vec<usize>,
    by_namespace: HashMap<&'a str, Vec<usize>>,
    /// (label key, value) → the workloads that carry it.
    by_label: HashMap<(&'a str, &'a str), Vec<usize>>,
    /// (namespace, label key, value) → the workloads of that namespace that carry it.
    by_namespace_label: HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
    /// (namespace, service account) of every workload.
    accounts: HashSet<(&'a str, &'a str)>,
    /// Names of the TCP container ports of every workload.
    port_names: HashSet<&'a str>,
    /// (namespace, name) of every Service.
    services: HashSet<(&'a str, &'a str)>,
}

impl<'a> Inventory<'a> {
    fn new(resources: &'a [Located]) -> Self {
        let mut inv = Inventory {
            known: HashSet::new(),
            namespace_labels: Vec::new(),
            workloads: Vec::new(),
            all: Vec::new(),
            by_namespace: HashMap::new(),
            by_label: HashMap::new(),
            by_namespace_label: HashMap::new(),
            accounts: HashSet::new(),
            port_names: HashSet::new(),
            services: HashSet::new(),
        };
        let mut defined = HashSet::new();
        for r in resources {
            match &r.resource {
                Resource::Service { metadata, .. } => {
                    if let Some(ns) = &metadata.namespace {
                        inv.services.insert((ns, &metadata.name));
                    }
                }
                Resource::Namespace { metadata, .. } => {
                    defined.insert(metadata.name.as_str());
                    inv.known.insert(&metadata.name);
                    inv.namespace_labels.push(crate::k8s::namespace_labels(&metadata.name, &metadata.labels));
                }
                Resource::Workload { metadata, spec, .. } => {
                    if let Some(ns) = &metadata.namespace {
                        let i = inv.workloads.len();
                        inv.workloads.push(Workload {
                            namespace: ns,
                            account: &spec.service_account,
                            labels: &spec.labels,
                        });
                        inv.all.push(i);
                        inv.known.insert(ns);
                        inv.by_namespace.entry(ns).or_default().push(i);
                        inv.accounts.insert((ns, &spec.service_account));
                        for (k, v) in &spec.labels {
                            inv.by_label.entry((k, v)).or_default().push(i);
                            inv.by_namespace_label.entry((ns, k, v)).or_default().push(i);
                        }
                    }
                    let tcp = spec.ports.iter().filter(|p| p.protocol == crate::resource::Protocol::Tcp);
                    inv.port_names.extend(tcp.filter_map(|p| p.name.as_deref()));
                }
                _ => {}
            }
        }
        let mut seen = HashSet::new();
        for w in &inv.workloads {
            if !defined.contains(w.namespace) && seen.insert(w.namespace) {
                inv.namespace_labels.push(crate::k8s::namespace_labels(w.namespace, &BTreeMap::new()));
            }
        }
        inv
    }

    fn known(&self, ns: &str) -> bool {
        self.known.contains(ns)
    }

    /// The workloads (of namespace `ns`, or of any) that may match `selector`: those that
    /// carry the rarest of its `matchLabels`, or all of them. Callers still match each.
    fn candidates<'s>(&'s self, ns: Option<&'s str>, selector: &'s Selector) -> &'s [usize] {
        let lists = selector.match_labels.iter().map(|(k, v)| -> &'s [usize] {
            let list = match ns {
                Some(ns) => self.by_namespace_label.get(&(ns, k.as_str(), v.as_str())),
                None => self.by_label.get(&(k.as_str(), v.as_str())),
            };
            list.map_or(&[][..], Vec::as_slice)
        });
        let every: &'s [usize] = match ns {
            Some(ns) => self.by_namespace.get(ns).map_or(&[][..], Vec::as_slice),
            None => &self.all,
        };
        lists.min_by_key(|l| l.len()).unwrap_or(every)
    }

    /// The workloads `selector` selects (in namespace `ns`, or in any) that run as an account
    /// `account_ok` accepts.
    fn selected<'s>(
        &'s self,
        ns: Option<&'s str>,
        selector: &'s Selector,
        account_ok: impl Fn(&str) -> bool + 's,
    ) -> impl Iterator<Item = &'s Workload<'a>> + 's {
        let candidates = self.candidates(ns, selector).iter().map(|&i| &self.workloads[i]);
        candidates.filter(move |w| account_ok(w.account) && selector.matches(w.labels))
    }
}

/// A peer's labels and service account, as selectors of workloads.
type SelectorKey<'a> = (&'a BTreeMap<String, String>, Vec<(&'a str, u8, &'a [String])>, Option<&'a str>);

/// The namespaces holding a workload that a peer's labels and account select, found once
/// per distinct selector: the peers of a cluster repeat few selectors many times, and one
/// read in no particular namespace is matched against every workload.
#[derive(Default)]
struct Matches<'a>(HashMap<SelectorKey<'a>, BTreeSet<&'a str>>);

impl<'a> Matches<'a> {
    fn namespaces(&mut self, inv: &Inventory<'a>, peer: &'a Peer, labels: &Selector) -> &BTreeSet<&'a str> {
        let expressions = peer.match_expressions.iter().map(|r| (r.key.as_str(), operator(r.operator), &r.values[..]));
        let key = (&peer.match_labels, expressions.collect(), peer.service_account.as_deref());
        self.0.entry(key).or_insert_with(|| {
            let account_ok = |a: &str| peer.service_account.as_deref().is_none_or(|sa| sa == a);
            inv.selected(None, labels, account_ok).map(|w| w.namespace).collect()
        })
    }
}

fn operator(o: crate::resource::Operator) -> u8 {
    use crate::resource::Operator::*;
    match o {
        In => 0,
        NotIn => 1,
        Exists => 2,
        DoesNotExist => 3,
    }
}

pub(super) fn check(resources: &[Located], out: &mut Findings) {
    let inv = Inventory::new(resources);
    let mut matches = Matches::default();
    for located in resources {
        let Some(ns) = located.resource.metadata().namespace.as_deref() else { continue };
        match &located.resource {
            Resource::SegmentationPolicy { spec, .. } => {
                let at = At::new(located);
                attachment(out, &inv, &at, ns, "spec.selector", &spec.selector);
                for (r, rule) in spec.rules.iter().enumerate() {
                    for (p, peer) in rule.from.iter().enumerate() {
                        let field = Below(Entry("spec.rules", r), Entry("from", p));
                        peer_refs(out, &inv, &mut matches, &at, ns, field, peer);
                    }
                }
                for (r, rule) in spec.egress.iter().flatten().enumerate() {
                    for (p, peer) in rule.to.iter().enumerate() {
                        let field = Below(Entry("spec.egress", r), Entry("to", p));
                        peer_refs(out, &inv, &mut matches, &at, ns, field, peer);
                    }
                }
            }
            Resource::NetworkPolicy { spec, .. } => {
                let at = At::new(located);
                let selector = spec.pod_selector.as_ref().map(crate::k8s::selector).unwrap_or_default();
                attachment(out, &inv, &at, ns, "spec.podSelector", &selector);
                named_ports(out, &inv, &at, spec);
                network_policy_peers(out, &inv, &at, spec);
                // What the translation cannot enforce (a UDP port, …), for a policy that is valid.
                if crate::k8s::problems(spec).is_empty() {
                    for note in crate::k8s::translate(ns, spec).notes {
                        out.warning(&at, &note.field, note.message);
                    }
                }
            }
            _ => {}
        }
    }
}

/// A policy of namespace `ns` whose namespace or selector names no workload is enforced
/// nowhere (yet).
fn attachment(out: &mut Findings, inv: &Inventory, at: &At, ns: &str, field: &str, selector: &Selector) {
    if !inv.known(ns) {
        out.warning(
            at,
            "metadata.namespace",
            format!("namespace {ns:?} has no Namespace resource and no workloads (yet): the policy applies to nothing"),
        );
    } else if !selector.is_empty() && inv.selected(Some(ns), selector, |_| true).next().is_none() {
        out.warning(
            at,
            field,
            format!("selects no workload of namespace {ns:?} (yet): the policy is enforced nowhere"),
        );
    }
}

/// The references of one peer: namespaces that do not exist, service accounts no workload
/// runs as, selectors that select nothing.
fn peer_refs<'a>(
    out: &mut Findings,
    inv: &Inventory<'a>,
    matches: &mut Matches<'a>,
    at: &At,
    policy_ns: &str,
    field: Below,
    peer: &'a Peer,
) {
    let unknown = |ns: &str| format!("namespace {ns:?} has no Namespace resource and no workloads (yet)");
    if let Some(service) = &peer.service {
        let ns = peer.namespace.as_deref().unwrap_or(policy_ns);
        if !inv.services.contains(&(ns, service.as_str())) {
            out.warning(
                at,
                &format!("{field}.service"),
                format!("no Service {ns}/{service} (yet): this peer matches nothing"),
            );
        }
    }
    if let Some(ns) = &peer.namespace
        && !inv.known(ns)
    {
        out.warning(at, &format!("{field}.namespace"), format!("{}: this peer matches nothing", unknown(ns)));
    }
    for (list, names) in [("namespaces", &peer.namespaces), ("notNamespaces", &peer.not_namespaces)] {
        for (i, ns) in names.iter().enumerate() {
            if !inv.known(ns) {
                out.warning(at, &format!("{field}.{list}[{i}]"), unknown(ns));
            }
        }
    }
    // The namespaces the peer's workloads are in, when it says (or implies) which.
    let scope: Option<Vec<&str>> = match (&peer.namespace, peer.namespaces.is_empty(), &peer.namespace_selector) {
        (Some(ns), _, _) => Some(vec![ns.as_str()]),
        (None, false, _) => Some(peer.namespaces.iter().map(String::as_str).collect()),
        (None, true, None) if peer.is_unscoped_label_selector() || peer.service_account.is_some() => {
            Some(vec![policy_ns])
        }
        _ => None,
    };
    let in_scope = |ns: &str| scope.as_ref().is_none_or(|s| s.contains(&ns));
    if let Some(sa) = &peer.service_account
        && let Some(scope) = &scope
        && scope.iter().all(|ns| inv.known(ns))
        && !scope.iter().any(|ns| inv.accounts.contains(&(*ns, sa.as_str())))
    {
        out.warning(at, &format!("{field}.serviceAccount"), format!("no workload runs as {sa:?} there (yet)"));
    }
    let labels =
        Selector { match_labels: peer.match_labels.clone(), match_expressions: peer.match_expressions.clone() };
    if !labels.is_empty() {
        let sa_ok = |a: &str| peer.service_account.as_deref().is_none_or(|sa| sa == a);
        let key = if peer.match_labels.is_empty() { "matchExpressions" } else { "matchLabels" };
        // Only an unscoped selector can match elsewhere than where it is read.
        let elsewhere: BTreeSet<&str> = match peer.is_unscoped_label_selector() {
            true => matches.namespaces(inv, peer, &labels).iter().copied().filter(|ns| !in_scope(ns)).collect(),
            false => BTreeSet::new(),
        };
        let mut here = || match &scope {
            Some(scope) => scope.iter().any(|ns| inv.selected(Some(ns), &labels, sa_ok).next().is_some()),
            None => !matches.namespaces(inv, peer, &labels).is_empty(),
        };
        if !elsewhere.is_empty() {
            // Where it matters: the literal reading would match more than the scoped one.
            let elsewhere: Vec<&str> = elsewhere.into_iter().collect();
            out.warning(
                at,
                &format!("{field}.{key}"),
                format!(
                    "matches workloads of namespace {policy_ns:?} only (a label selector without a namespace is read in the policy's own namespace, as Kubernetes reads a podSelector), not those of {}: name their namespaces (`namespaces` or `namespaceSelector`) to match them",
                    elsewhere.join(", ")
                ),
            );
        } else if !here() {
            out.warning(at, &format!("{field}.{key}"), "selects no workload (yet): this peer matches nothing".into());
        }
    }
    if let Some(sel) = &peer.namespace_selector
        && !sel.is_empty()
        && !inv.namespace_labels.iter().any(|l| sel.matches(l))
    {
        out.warning(at, &format!("{field}.namespaceSelector"), "selects no namespace (yet)".into());
    }
}

/// A NetworkPolicy port given by name that no workload's TCP container port has matches no
/// port (yet).
fn named_ports(
    out: &mut Findings,
    inv: &Inventory,
    at: &At,
    spec: &k8s_openapi::api::networking::v1::NetworkPolicySpec,
) {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let ingress = spec.ingress.iter().flatten().map(|r| r.ports.as_ref());
    let egress = spec.egress.iter().flatten().map(|r| r.ports.as_ref());
    for (list, rules) in [("ingress", ingress.collect::<Vec<_>>()), ("egress", egress.collect())] {
        for (r, ports) in rules.into_iter().enumerate() {
            for (p, port) in ports.into_iter().flatten().enumerate() {
                if let Some(IntOrString::String(name)) = &port.port
                    && port.protocol.as_deref().unwrap_or("TCP") == "TCP"
                    && !inv.port_names.contains(name.as_str())
                {
                    out.warning(
                        at,
                        &format!("spec.{list}[{r}].ports[{p}].port"),
                        format!("no workload has a TCP container port named {name:?} (yet): this port matches nothing"),
                    );
                }
            }
        }
    }
}

/// A NetworkPolicy peer's namespaceSelector that selects no namespace known (yet).
fn network_policy_peers(
    out: &mut Findings,
    inv: &Inventory,
    at: &At,
    spec: &k8s_openapi::api::networking::v1::NetworkPolicySpec,
) {
    let ingress = spec.ingress.iter().flatten().map(|r| r.from.as_ref());
    let egress = spec.egress.iter().flatten().map(|r| r.to.as_ref());
    let namespaces = &inv.namespace_labels;
    for (list, peers_key, rules) in
        [("ingress", "from", ingress.collect::<Vec<_>>()), ("egress", "to", egress.collect())]
    {
        for (r, peers) in rules.into_iter().enumerate() {
            for (p, peer) in peers.into_iter().flatten().enumerate() {
                let Some(sel) = peer.namespace_selector.as_ref().map(crate::k8s::selector) else { continue };
                if !sel.is_empty() && !namespaces.iter().any(|l| sel.matches(l)) {
                    out.warning(
                        at,
                        &format!("spec.{list}[{r}].{peers_key}[{p}].namespaceSelector"),
                        "selects no namespace (yet): this peer matches nothing".into(),
                    );
                }
            }
        }
    }
}
