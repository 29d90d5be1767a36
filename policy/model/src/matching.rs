//! Whether a rule's sources and ports match, written once for both evaluations:
//!
//! - exactly, for one concrete connection ([`crate::Snapshot::authorize`]: ztunnel's proxies,
//!   `palisade explain`);
//! - for a whole numeric identity (the kernel cells), where an attribute can hold for some of
//!   the identity's addresses and not for others. That case is [`Match::Maybe`]; the compiler
//!   turns it into an Allow cell (the proxies then decide exactly) and never into a Deny cell,
//!   so the kernel never denies what the exact evaluation allows.
use std::collections::BTreeMap;

use crate::cidr::Cidr;
use crate::resource::{Peer, Rule};

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

/// What is known about a source.
pub struct SourceFacts<'a> {
    /// `<trust-domain>/ns/<ns>/sa/<sa>`, when the source is a workload.
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub service_account: Option<&'a str>,
    pub labels: Option<&'a BTreeMap<String, String>>,
    /// Whether the source's address is in a prefix.
    pub in_block: &'a dyn Fn(&Cidr) -> Match,
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
    field(
        !peer.match_labels.is_empty(),
        Match::from_bool(src.labels.is_some_and(|l| peer.match_labels.iter().all(|(k, v)| l.get(k) == Some(v)))),
    );
    let in_namespaces = |list: &[String]| src.namespace.is_some_and(|n| list.iter().any(|x| x == n));
    field(!peer.namespaces.is_empty(), Match::from_bool(in_namespaces(&peer.namespaces)));
    field(!peer.not_namespaces.is_empty(), Match::from_bool(!in_namespaces(&peer.not_namespaces)));
    let principal = src.principal;
    field(!peer.principals.is_empty(), Match::from_bool(principal_matches(&peer.principals, principal)));
    field(!peer.not_principals.is_empty(), Match::from_bool(!principal_matches(&peer.not_principals, principal)));
    field(!peer.ip_blocks.is_empty(), any_block(&peer.ip_blocks, src));
    field(!peer.not_ip_blocks.is_empty(), any_block(&peer.not_ip_blocks, src).not());
    m
}

/// Sources of a rule: any of its peers, or anyone when it lists none.
pub fn rule_sources_match(rule: &Rule, src: &SourceFacts<'_>) -> Match {
    if rule.from.is_empty() {
        return Match::Yes;
    }
    rule.from.iter().fold(Match::No, |m, p| m.or(peer_matches(p, src)))
}

pub fn rule_port_matches(rule: &Rule, port: u16) -> bool {
    (rule.ports.is_empty() || rule.ports.contains(&port)) && !rule.not_ports.contains(&port)
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
            in_block: &yes,
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
