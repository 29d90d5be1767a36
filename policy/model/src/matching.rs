//! Whether a rule's peers and ports match, written once for both evaluations and both
//! directions (the peer is the source of an ingress rule, the destination of an egress rule):
//!
//! - exactly, for one concrete connection ([`crate::Snapshot::authorize`]: ztunnel's proxies,
//!   `palisade explain`);
//! - for a whole numeric identity (the kernel cells), where an attribute can hold for some of
//!   the identity's addresses and not for others. That case is [`Match::Maybe`]; the compiler
//!   turns it into an Allow cell (the proxies then decide exactly) and never into a Deny cell,
//!   so the kernel never denies what the exact evaluation allows.
use std::collections::BTreeMap;

use serde::Serialize;

use crate::cidr::Cidr;
use crate::resource::{Peer, Selector};

/// A rule as both evaluations read it, whichever resource (SegmentationPolicy,
/// NetworkPolicy) and direction it came from.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct PolicyRule {
    /// Sources of an ingress rule, destinations of an egress rule; empty means anyone (also
    /// outside the mesh). Label selectors are already scoped to a namespace where the
    /// resource says so (see [`Peer::is_unscoped_label_selector`]).
    pub peers: Vec<Peer>,
    /// Destination TCP ports; empty means any port.
    pub ports: Vec<PortMatch>,
    /// Destination TCP ports the rule does not apply to (proxies only, see ARCHITECTURE.md).
    pub not_ports: Vec<u16>,
}

/// A destination port of a rule.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub enum PortMatch {
    /// `first..=last` (one port: both equal).
    Range(u16, u16),
    /// A container port name, resolved on the destination workload.
    Named(String),
    /// Stands for a port list that names only protocols the kernel does not enforce (UDP,
    /// SCTP): the rule matches no TCP connection.
    Never,
}

impl PortMatch {
    pub fn matches(&self, port: u16, named: &dyn Fn(&str) -> Option<u16>) -> bool {
        match self {
            PortMatch::Range(first, last) => (*first..=*last).contains(&port),
            PortMatch::Named(name) => named(name) == Some(port),
            PortMatch::Never => false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Match {
    No,
    Maybe,
    Yes,
}

impl Match {
    pub fn from_bool(b: bool) -> Match {
        if b { Match::Yes } else { Match::No }
    }
    fn and(self, other: Match) -> Match {
        self.min(other)
    }
    fn or(self, other: Match) -> Match {
        self.max(other)
    }
    fn not(self) -> Match {
        match self {
            Match::No => Match::Yes,
            Match::Maybe => Match::Maybe,
            Match::Yes => Match::No,
        }
    }
}

/// What is known about a peer (a source, or an egress rule's destination).
pub struct SourceFacts<'a> {
    /// `<trust-domain>/ns/<ns>/sa/<sa>`, when the peer is a workload.
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub service_account: Option<&'a str>,
    pub labels: Option<&'a BTreeMap<String, String>>,
    /// Labels of the peer's namespace (always with `kubernetes.io/metadata.name`).
    pub namespace_labels: Option<&'a BTreeMap<String, String>>,
    /// Whether the peer's address is in a prefix.
    pub in_block: &'a dyn Fn(&Cidr) -> Match,
    /// Whether the peer is an endpoint of the Service `namespace/name` (`Maybe` for an
    /// identity some of whose workloads are and some are not).
    pub backs: &'a dyn Fn(&str, &str) -> Match,
}

/// For facts about a peer that is no workload (an address block, the world): backs nothing.
pub fn backs_nothing(_: &str, _: &str) -> Match {
    Match::No
}

/// `*` matches any run of characters (including none).
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

fn principal_matches(patterns: &[String], principal: Option<&str>) -> bool {
    let Some(p) = principal else { return false };
    patterns.iter().any(|pat| glob(pat.strip_prefix("spiffe://").unwrap_or(pat), p))
}

fn any_block(blocks: &[Cidr], src: &SourceFacts<'_>) -> Match {
    blocks.iter().fold(Match::No, |m, b| m.or((src.in_block)(b)))
}

/// A peer matches when every field it sets matches; `not*` fields match what is not listed,
/// including sources without an identity.
pub fn peer_matches(peer: &Peer, src: &SourceFacts<'_>) -> Match {
    let mut m = Match::Yes;
    let mut field = |applies: bool, result: Match| {
        if applies {
            m = m.and(result);
        }
    };
    field(
        peer.namespace.is_some(),
        Match::from_bool(peer.namespace.as_deref() == src.namespace && src.namespace.is_some()),
    );
    field(
        peer.service_account.is_some(),
        Match::from_bool(src.service_account.is_some() && peer.service_account.as_deref() == src.service_account),
    );
    let pods = Selector { match_labels: peer.match_labels.clone(), match_expressions: peer.match_expressions.clone() };
    field(!pods.is_empty(), Match::from_bool(src.labels.is_some_and(|l| pods.matches(l))));
    if let Some(namespaces) = &peer.namespace_selector {
        field(true, Match::from_bool(src.namespace_labels.is_some_and(|l| namespaces.matches(l))));
    }
    let in_namespaces = |list: &[String]| src.namespace.is_some_and(|n| list.iter().any(|x| x == n));
    field(!peer.namespaces.is_empty(), Match::from_bool(in_namespaces(&peer.namespaces)));
    field(!peer.not_namespaces.is_empty(), Match::from_bool(!in_namespaces(&peer.not_namespaces)));
    let principal = src.principal;
    field(!peer.principals.is_empty(), Match::from_bool(principal_matches(&peer.principals, principal)));
    field(!peer.not_principals.is_empty(), Match::from_bool(!principal_matches(&peer.not_principals, principal)));
    field(!peer.ip_blocks.is_empty(), any_block(&peer.ip_blocks, src));
    field(!peer.not_ip_blocks.is_empty(), any_block(&peer.not_ip_blocks, src).not());
    if let Some(service) = &peer.service {
        // Compilation reads a namespace-less service peer in the policy's namespace.
        field(true, peer.namespace.as_deref().map_or(Match::No, |ns| (src.backs)(ns, service)));
    }
    m
}

/// Peers of a rule: any of them, or anyone when it lists none.
pub fn rule_peers_match(rule: &PolicyRule, peer: &SourceFacts<'_>) -> Match {
    if rule.peers.is_empty() {
        return Match::Yes;
    }
    rule.peers.iter().fold(Match::No, |m, p| m.or(peer_matches(p, peer)))
}

/// `named` resolves a port name on the connection's destination workload.
pub fn rule_port_matches(rule: &PolicyRule, port: u16, named: &dyn Fn(&str) -> Option<u16>) -> bool {
    (rule.ports.is_empty() || rule.ports.iter().any(|p| p.matches(port, named))) && !rule.not_ports.contains(&port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("cluster.local/ns/shop/sa/*", "cluster.local/ns/shop/sa/web"));
        assert!(glob("*/ns/shop/*", "cluster.local/ns/shop/sa/web"));
        assert!(glob("*", ""));
        assert!(!glob("cluster.local/ns/shop/sa/*", "cluster.local/ns/shopping/sa/web"));
        assert!(glob("a*b*c", "aXXbYYc") && !glob("a*b*c", "aXXcYYb"));
        assert!(glob("exact", "exact") && !glob("exact", "exactly"));
    }

    #[test]
    fn negations_and_blocks() {
        let labels = BTreeMap::new();
        let yes = |_: &Cidr| Match::Yes;
        let web = SourceFacts {
            principal: Some("cluster.local/ns/shop/sa/web"),
            namespace: Some("shop"),
            service_account: Some("web"),
            labels: Some(&labels),
            namespace_labels: None,
            in_block: &yes,
            backs: &backs_nothing,
        };
        let peer = |f: &dyn Fn(&mut Peer)| {
            let mut p = Peer::default();
            f(&mut p);
            p
        };
        assert_eq!(peer_matches(&peer(&|p| p.not_namespaces = vec!["ops".into()]), &web), Match::Yes);
        assert_eq!(peer_matches(&peer(&|p| p.not_namespaces = vec!["shop".into()]), &web), Match::No);
        assert_eq!(
            peer_matches(&peer(&|p| p.principals = vec!["spiffe://cluster.local/ns/shop/*".into()]), &web),
            Match::Yes
        );
        assert_eq!(peer_matches(&peer(&|p| p.not_principals = vec!["*/sa/web".into()]), &web), Match::No);
        assert_eq!(peer_matches(&peer(&|p| p.ip_blocks = vec!["10.0.0.0/8".parse().unwrap()]), &web), Match::Yes);
        let maybe = |_: &Cidr| Match::Maybe;
        let some = SourceFacts { in_block: &maybe, ..web };
        assert_eq!(
            peer_matches(&peer(&|p| p.not_ip_blocks = vec!["10.0.0.0/8".parse().unwrap()]), &some),
            Match::Maybe
        );
    }
}
