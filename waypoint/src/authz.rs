//! L7 authorization with Istio's semantics: any DENY policy whose rule matches denies; then,
//! if ALLOW policies exist, one of their rules must match; AUDIT policies only mark the
//! request for the log. The source's identity is the one its tunnel's certificate proved,
//! never a header.
//!
//! For plain TCP (no HTTP attributes) Istio's L4 rule applies: an ALLOW rule that names HTTP
//! fields (methods, paths, hosts, request headers) cannot match, and a DENY rule ignores them
//! and so denies more, never less.
use std::net::IpAddr;

use http::HeaderMap;
use palisade_model::waypoint::config::{
    AuthzAction, AuthzCondition, AuthzOperation, AuthzPolicy, AuthzRule, AuthzSource,
};

/// The request's HTTP attributes.
#[derive(Debug, Clone, Copy)]
pub struct Http<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

/// What authorization looks at.
#[derive(Debug, Clone, Copy)]
pub struct Attributes<'a> {
    pub source_ip: IpAddr,
    /// The proven SPIFFE ID, as Istio writes principals: without `spiffe://`.
    pub principal: Option<&'a str>,
    pub destination_port: u16,
    /// None for plain TCP.
    pub http: Option<Http<'a>>,
}

impl<'a> Attributes<'a> {
    /// Istio's principal form of a SPIFFE ID (`spiffe://td/ns/x/sa/y` → `td/ns/x/sa/y`).
    pub fn principal_of(identity: &str) -> &str {
        identity.strip_prefix("spiffe://").unwrap_or(identity)
    }

    fn namespace(&self) -> Option<&'a str> {
        let mut parts = self.principal?.split('/');
        parts.find(|p| *p == "ns")?;
        parts.next()
    }
}

/// The verdict and which rule decided it (`namespace/name#rule`), for the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub rule: Option<String>,
    /// AUDIT rules that matched.
    pub audited: Vec<String>,
}

/// Named in the log when ALLOW policies exist and none matched.
pub const NO_ALLOW_MATCH: &str = "(no ALLOW policy matched)";

pub fn authorize(policies: &[AuthzPolicy], attrs: &Attributes<'_>) -> Decision {
    let first_match = |p: &AuthzPolicy, deny: bool| {
        p.rules.iter().position(|r| rule_matches(r, attrs, deny)).map(|i| format!("{}#{i}", p.name))
    };
    let audited: Vec<String> =
        policies.iter().filter(|p| p.action == AuthzAction::Audit).filter_map(|p| first_match(p, false)).collect();
    if let Some(rule) = policies.iter().filter(|p| p.action == AuthzAction::Deny).find_map(|p| first_match(p, true)) {
        return Decision { allowed: false, rule: Some(rule), audited };
    }
    let mut allows = policies.iter().filter(|p| p.action == AuthzAction::Allow).peekable();
    if allows.peek().is_none() {
        return Decision { allowed: true, rule: None, audited };
    }
    match allows.find_map(|p| first_match(p, false)) {
        Some(rule) => Decision { allowed: true, rule: Some(rule), audited },
        None => Decision { allowed: false, rule: Some(NO_ALLOW_MATCH.into()), audited },
    }
}

/// Istio's value forms: `*`, `prefix*`, `*suffix`, or exact.
fn wild(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else {
        pattern == value
    }
}

/// A positive and a negative list: the positive one (if any) must contain the value, the
/// negative one must not. An absent value matches no positive list.
fn lists(value: Option<&str>, any: &[String], none: &[String], eq: impl Fn(&str, &str) -> bool) -> bool {
    let pos = any.is_empty() || value.is_some_and(|v| any.iter().any(|p| eq(p, v)));
    let neg = none.is_empty() || value.is_none_or(|v| !none.iter().any(|p| eq(p, v)));
    pos && neg
}

fn source_matches(s: &AuthzSource, a: &Attributes<'_>) -> bool {
    let ip = |blocks: &[palisade_model::cidr::Cidr]| blocks.iter().any(|b| b.contains(a.source_ip));
    lists(a.principal, &s.principals, &s.not_principals, wild)
        && lists(a.namespace(), &s.namespaces, &s.not_namespaces, |p, v| p == v)
        && (s.ip_blocks.is_empty() || ip(&s.ip_blocks))
        && !ip(&s.not_ip_blocks)
}

/// `lenient`: HTTP-only fields on a plain TCP connection count as matching (DENY at L4).
fn operation_matches(o: &AuthzOperation, a: &Attributes<'_>, lenient: bool) -> bool {
    let ports =
        (o.ports.is_empty() || o.ports.contains(&a.destination_port)) && !o.not_ports.contains(&a.destination_port);
    let http = match a.http {
        Some(h) => {
            let host = h.host.to_ascii_lowercase();
            let host_eq = |p: &str, v: &str| {
                let p = p.to_ascii_lowercase();
                wild(&p, v) || v.rsplit_once(':').is_some_and(|(bare, _)| wild(&p, bare))
            };
            lists(Some(h.method), &o.methods, &o.not_methods, |p, v| p == v)
                && lists(Some(h.path), &o.paths, &o.not_paths, wild)
                && lists(Some(&host), &o.hosts, &o.not_hosts, host_eq)
        }
        None => {
            let names_http = [&o.methods, &o.not_methods, &o.paths, &o.not_paths, &o.hosts, &o.not_hosts]
                .iter()
                .any(|l| !l.is_empty());
            lenient || !names_http
        }
    };
    ports && http
}

fn condition_matches(c: &AuthzCondition, a: &Attributes<'_>, lenient: bool) -> bool {
    let ok = |value: Option<&str>| lists(value, &c.values, &c.not_values, wild);
    if let Some(name) = c.key.strip_prefix("request.headers[").and_then(|k| k.strip_suffix(']')) {
        return match a.http {
            Some(h) => {
                let values: Vec<&str> = h.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
                if values.is_empty() { ok(None) } else { values.iter().any(|v| ok(Some(v))) }
            }
            None => lenient,
        };
    }
    match c.key.as_str() {
        "source.ip" => {
            let in_list = |l: &[String]| {
                l.iter().any(|v| match v.parse::<palisade_model::cidr::Cidr>() {
                    Ok(block) => block.contains(a.source_ip),
                    Err(_) => v.parse::<IpAddr>().is_ok_and(|ip| ip == a.source_ip),
                })
            };
            (c.values.is_empty() || in_list(&c.values)) && !in_list(&c.not_values)
        }
        "source.namespace" => ok(a.namespace()),
        "source.principal" => ok(a.principal),
        "destination.port" => ok(Some(&a.destination_port.to_string())),
        // Validation rejects other keys; should one slip through, it matches nothing.
        _ => false,
    }
}

fn rule_matches(r: &AuthzRule, a: &Attributes<'_>, deny: bool) -> bool {
    let lenient = deny && a.http.is_none();
    (r.from.is_empty() || r.from.iter().any(|s| source_matches(s, a)))
        && (r.to.is_empty() || r.to.iter().any(|o| operation_matches(o, a, lenient)))
        && r.when.iter().all(|c| condition_matches(c, a, lenient))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, action: AuthzAction, rule: AuthzRule) -> AuthzPolicy {
        AuthzPolicy { name: name.into(), action, rules: vec![rule] }
    }

    fn attrs<'a>(principal: Option<&'a str>, http: Option<Http<'a>>) -> Attributes<'a> {
        Attributes { source_ip: "10.0.0.9".parse().unwrap(), principal, destination_port: 80, http }
    }

    #[test]
    fn deny_before_allow_and_l4_rules() {
        let headers = HeaderMap::new();
        let admin = AuthzRule {
            to: vec![AuthzOperation { paths: vec!["/admin*".into()], ..Default::default() }],
            ..Default::default()
        };
        let frontend = AuthzRule {
            from: vec![AuthzSource { principals: vec!["td/ns/web/sa/*".into()], ..Default::default() }],
            ..Default::default()
        };
        let policies =
            vec![policy("ns/allow-web", AuthzAction::Allow, frontend), policy("ns/no-admin", AuthzAction::Deny, admin)];
        let http = |path| Some(Http { method: "GET", path, host: "svc", headers: &headers });
        let web = Some("td/ns/web/sa/frontend");
        let d = authorize(&policies, &attrs(web, http("/admin/x")));
        assert_eq!((d.allowed, d.rule.as_deref()), (false, Some("ns/no-admin#0")));
        let d = authorize(&policies, &attrs(web, http("/home")));
        assert_eq!((d.allowed, d.rule.as_deref()), (true, Some("ns/allow-web#0")));
        let d = authorize(&policies, &attrs(Some("td/ns/other/sa/x"), http("/home")));
        assert_eq!((d.allowed, d.rule.as_deref()), (false, Some(NO_ALLOW_MATCH)));
        // Plain TCP: the DENY rule's HTTP-only path is ignored, so it denies.
        assert!(!authorize(&policies, &attrs(web, None)).allowed);
    }
}
