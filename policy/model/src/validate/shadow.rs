//! Rules that cannot change any verdict: an Allow rule every connection of which a Deny rule
//! for the same workloads denies (deny wins whatever the order), and rules or peers that can
//! never match (all their ports excluded, all their namespaces excluded). Warnings, named
//! with both positions, because the batch is consistent but does not say what its author
//! meant.
//!
//! Coverage is decided structurally and conservatively: a Deny rule covers an Allow rule when
//! each of its constraints is one the Allow rule has too (or a wider one: a CIDR that covers,
//! a port list that contains). When unsure it says nothing.
use std::collections::{BTreeMap, HashMap};

use super::{At, Findings};
use crate::load::Located;
use crate::resource::{Action, Mode, Peer, Resource, SegmentationSpec, Selector};

/// One rule of either direction, with what it is matched against.
struct Rule<'a> {
    field: String,
    peers: &'a [Peer],
    ports: &'a [u16],
    not_ports: &'a [u16],
}

fn rules(spec: &SegmentationSpec) -> [Vec<Rule<'_>>; 2] {
    let ingress = spec.rules.iter().enumerate().map(|(i, r)| Rule {
        field: format!("spec.rules[{i}]"),
        peers: &r.from,
        ports: &r.ports,
        not_ports: &r.not_ports,
    });
    let egress = spec.egress.iter().flatten().enumerate().map(|(i, r)| Rule {
        field: format!("spec.egress[{i}]"),
        peers: &r.to,
        ports: &r.ports,
        not_ports: &r.not_ports,
    });
    [ingress.collect(), egress.collect()]
}

pub(super) fn check(resources: &[Located], out: &mut Findings) {
    let policies: Vec<(&Located, &str, &SegmentationSpec)> = resources
        .iter()
        .filter_map(|l| match &l.resource {
            Resource::SegmentationPolicy { metadata, spec, .. } => Some((l, metadata.namespace.as_deref()?, spec)),
            _ => None,
        })
        .collect();
    // The enforced Deny policies of each namespace, in batch order: an Allow policy is
    // compared with those of its own namespace only (a scan of every policy per policy is
    // quadratic in a cluster's ten thousand).
    let mut denies: HashMap<&str, Vec<(At, &SegmentationSpec)>> = HashMap::new();
    for &(located, ns, spec) in &policies {
        if spec.action == Action::Deny && spec.mode == Mode::Enforce {
            denies.entry(ns).or_default().push((At::new(located), spec));
        }
    }
    for &(located, ns, spec) in &policies {
        let at = At::new(located);
        for rule in rules(spec).iter().flatten() {
            never_matches(out, &at, rule);
        }
        if spec.action != Action::Allow {
            continue;
        }
        for (deny_at, deny) in denies.get(ns).into_iter().flatten() {
            if !selector_covers(&deny.selector, &spec.selector) {
                continue;
            }
            for (allows, denies) in rules(spec).iter().zip(rules(deny).iter()) {
                for allow in allows {
                    if let Some(d) = denies.iter().find(|d| rule_covers(ns, d, allow)) {
                        let place = out.place(deny_at, &d.field);
                        out.warning(
                            &at,
                            &allow.field,
                            format!(
                                "shadowed: every connection this rule allows is denied by {} {} ({place}); deny wins, so this rule allows nothing",
                                deny_at.label, d.field
                            ),
                        );
                    }
                }
            }
        }
    }
}

fn never_matches(out: &mut Findings, at: &At, rule: &Rule) {
    if !rule.ports.is_empty() && rule.ports.iter().all(|p| rule.not_ports.contains(p)) {
        out.warning(at, &format!("{}.ports", rule.field), "can never match: every port it names is in notPorts".into());
    }
    for (i, peer) in rule.peers.iter().enumerate() {
        let excluded_ns = |ns: &String| peer.not_namespaces.contains(ns);
        let why = if peer.namespace.as_ref().is_some_and(excluded_ns) {
            Some("its namespace is in notNamespaces")
        } else if !peer.namespaces.is_empty() && peer.namespaces.iter().all(excluded_ns) {
            Some("every namespace it names is in notNamespaces")
        } else if !peer.ip_blocks.is_empty()
            && peer.ip_blocks.iter().all(|b| peer.not_ip_blocks.iter().any(|n| n.covers(b)))
        {
            Some("every ipBlock it names is inside a notIpBlock")
        } else if !peer.principals.is_empty() && peer.principals.iter().all(|p| peer.not_principals.contains(p)) {
            Some("every principal it names is in notPrincipals")
        } else {
            None
        };
        if let Some(why) = why {
            out.warning(
                at,
                &format!("{}.{}[{i}]", rule.field, peers_key(&rule.field)),
                format!("can never match: {why}"),
            );
        }
    }
}

fn peers_key(rule_field: &str) -> &'static str {
    if rule_field.starts_with("spec.egress") { "to" } else { "from" }
}

/// Whether every workload `narrow` selects, `wide` selects too.
fn selector_covers(wide: &Selector, narrow: &Selector) -> bool {
    subset(&wide.match_labels, &narrow.match_labels)
        && wide.match_expressions.iter().all(|e| narrow.match_expressions.contains(e))
}

fn subset(small: &BTreeMap<String, String>, big: &BTreeMap<String, String>) -> bool {
    small.iter().all(|(k, v)| big.get(k) == Some(v))
}

/// Whether `deny` matches every connection `allow` matches (both of namespace `ns`).
fn rule_covers(ns: &str, deny: &Rule, allow: &Rule) -> bool {
    let ports = if deny.ports.is_empty() && deny.not_ports.is_empty() {
        true
    } else {
        !allow.ports.is_empty()
            && allow
                .ports
                .iter()
                .all(|p| (deny.ports.is_empty() || deny.ports.contains(p)) && !deny.not_ports.contains(p))
    };
    let peers = deny.peers.is_empty()
        || (!allow.peers.is_empty() && allow.peers.iter().all(|a| deny.peers.iter().any(|d| peer_covers(ns, d, a))));
    ports && peers
}

/// The namespace a peer's workloads are in, when it names one (a label selector alone is
/// read in the policy's namespace).
fn namespace_of<'a>(ns: &'a str, p: &'a Peer) -> Option<&'a str> {
    p.namespace.as_deref().or_else(|| p.reads_in_policy_namespace().then_some(ns))
}

fn peer_covers(ns: &str, d: &Peer, a: &Peer) -> bool {
    let negations_free = d.not_namespaces.is_empty() && d.not_principals.is_empty() && d.not_ip_blocks.is_empty();
    let namespace = match namespace_of(ns, d) {
        None => true,
        Some(dn) => namespace_of(ns, a) == Some(dn),
    };
    let namespaces = d.namespaces.is_empty()
        || namespace_of(ns, a).is_some_and(|an| d.namespaces.iter().any(|n| n == an))
        || (!a.namespaces.is_empty() && a.namespaces.iter().all(|n| d.namespaces.contains(n)));
    let account = d.service_account.is_none() || d.service_account == a.service_account;
    let labels =
        subset(&d.match_labels, &a.match_labels) && d.match_expressions.iter().all(|e| a.match_expressions.contains(e));
    let namespace_selector = d.namespace_selector.is_none() || d.namespace_selector == a.namespace_selector;
    let principals = d.principals.is_empty()
        || d.principals.iter().any(|p| p == "*")
        || (!a.principals.is_empty() && a.principals.iter().all(|p| d.principals.contains(p)));
    let blocks = d.ip_blocks.is_empty()
        || (!a.ip_blocks.is_empty() && a.ip_blocks.iter().all(|b| d.ip_blocks.iter().any(|w| w.covers(b))));
    negations_free && namespace && namespaces && account && labels && namespace_selector && principals && blocks
}
