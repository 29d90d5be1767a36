//! Checks that the YAML shape cannot express, within a resource and across resources. Every
//! problem of a batch is reported in one run, each at the line of its field: errors refuse
//! the batch; warnings (a reference to a namespace that does not exist yet, a selector that
//! selects nothing, a rule that is shadowed or can never match, something the kernel does not
//! enforce) never do, because policies may be written before the pods they protect.
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use crate::load::{Batch, Located, Origin, Sources};
use crate::resource::{Peer, Resource};

mod finding;
mod references;
mod services;
mod shadow;
#[cfg(test)]
mod tests;

pub use finding::{Finding, Severity};

/// What used to be the only kind of finding; errors are still called problems.
pub type Problem = Finding;

/// The errors that refuse a configuration (warnings are not in it).
#[derive(Debug, thiserror::Error)]
pub struct Invalid(pub Vec<Finding>);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(f, "{n} problem{} in the configuration:", if n == 1 { "" } else { "s" })?;
        for p in &self.0 {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// Refuses resources with any error. Without the documents' texts a finding names its
/// resource's first line; [`check_batch`] names the field's. Checks that can only warn
/// (references, shadowing) are not run: this is the control plane's gate on every change,
/// where they would cost most of the time (90 % at 10,000 workloads) to find nothing that
/// refuses.
pub fn validate(resources: &[Located]) -> Result<(), Invalid> {
    let errors: Vec<Finding> =
        run(resources, &Sources::default(), false).into_iter().filter(Finding::is_error).collect();
    if errors.is_empty() { Ok(()) } else { Err(Invalid(errors)) }
}

/// Everything wrong with a loaded batch: what loading found plus every check across its
/// resources, sorted by file and line (errors before warnings on one line).
pub fn check_batch(batch: &Batch) -> Vec<Finding> {
    let mut all = batch.findings.clone();
    all.extend(check(&batch.resources, &batch.sources));
    sort(&mut all);
    all
}

/// The batch's errors as [`Invalid`], or its warnings when it has no error.
pub fn validate_batch(batch: &Batch) -> Result<Vec<Finding>, Invalid> {
    let (errors, warnings): (Vec<_>, Vec<_>) = check_batch(batch).into_iter().partition(Finding::is_error);
    if errors.is_empty() { Ok(warnings) } else { Err(Invalid(errors)) }
}

pub fn sort(findings: &mut [Finding]) {
    findings.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
}

/// Every finding about `resources`, errors and warnings, positioned through `sources`.
pub fn check(resources: &[Located], sources: &Sources) -> Vec<Finding> {
    run(resources, sources, true)
}

/// The checks; `warnings: false` skips those that only warn.
fn run(resources: &[Located], sources: &Sources, warnings: bool) -> Vec<Finding> {
    let mut out = Findings { sources, list: Vec::new() };
    let mut names: HashMap<(&str, Option<&str>, &str), &Origin> = HashMap::new();
    // The first owner of each address; its field's line is looked up only for a duplicate
    // (a lookup reads the document again).
    let mut addresses: HashMap<IpAddr, (&Located, usize)> = HashMap::new();
    for located in resources {
        let at = At::new(located);
        let (resource, meta) = (&located.resource, located.resource.metadata());
        if !is_dns_label(&meta.name) {
            out.error(&at, "metadata.name", format!("{:?} is not a lowercase DNS name", meta.name));
        }
        // (Kubernetes' Namespace is a `Resource::Namespace` too: defining one name with both
        // kinds is defined twice.)
        if let Some(first) = names.insert((resource.kind(), meta.namespace.as_deref(), &meta.name), &located.origin) {
            let first = sources.locate(first, "metadata.name");
            out.error(&at, "metadata.name", format!("defined twice; first at {first}"));
        }
        let namespaced = !matches!(resource, Resource::Namespace { .. });
        match (&meta.namespace, namespaced) {
            (None, true) => out.error(&at, "metadata.namespace", "required for this kind".into()),
            (Some(_), false) => out.error(&at, "metadata.namespace", "a Namespace has no namespace".into()),
            (Some(ns), true) if !is_dns_label(ns) => {
                out.error(&at, "metadata.namespace", format!("{ns:?} is not a lowercase DNS name"))
            }
            _ => {}
        }
        match resource {
            Resource::Workload { spec, .. } => {
                if spec.addresses.is_empty() {
                    out.error(&at, "spec.addresses", "a workload needs at least one address".into());
                }
                if spec.service_account.is_empty() {
                    out.error(&at, "spec.serviceAccount", "must not be empty".into());
                }
                if spec.node.is_empty() {
                    out.error(&at, "spec.node", "must not be empty".into());
                }
                for (i, addr) in spec.addresses.iter().enumerate() {
                    let field = format!("spec.addresses[{i}]");
                    match addresses.get(addr) {
                        Some((owner, index)) => {
                            let first = sources.locate(&owner.origin, &format!("spec.addresses[{index}]"));
                            let owner = At::new(owner).label;
                            out.error(&at, &field, format!("{addr} is already the address of {owner} ({first})"))
                        }
                        None => {
                            addresses.insert(*addr, (located, i));
                        }
                    }
                }
                for (i, port) in spec.ports.iter().enumerate() {
                    if port.container_port == 0 {
                        out.error(&at, &format!("spec.ports[{i}].containerPort"), "port 0 is not a port".into());
                    }
                }
            }
            Resource::SegmentationPolicy { spec, .. } => {
                if spec.rules.is_empty() && spec.egress.is_none() {
                    out.error(
                        &at,
                        "spec.rules",
                        "at least one rule is required (a rule `{}` matches every connection)".into(),
                    );
                }
                for (r, rule) in spec.rules.iter().enumerate() {
                    rule_shape(&mut out, &at, Entry("spec.rules", r), "from", &rule.from, &rule.ports, &rule.not_ports);
                }
                for (r, rule) in spec.egress.iter().flatten().enumerate() {
                    rule_shape(&mut out, &at, Entry("spec.egress", r), "to", &rule.to, &rule.ports, &rule.not_ports);
                }
            }
            // The waypoint's kinds: `crate::waypoint::validate`.
            Resource::Namespace { .. }
            | Resource::Service { .. }
            | Resource::HttpRoute { .. }
            | Resource::Gateway { .. }
            | Resource::AuthorizationPolicy { .. }
            | Resource::TrafficPolicy { .. } => {}
            Resource::NetworkPolicy { spec, .. } => {
                for (field, message) in crate::k8s::problems(spec) {
                    out.error(&at, &field, message);
                }
            }
        }
    }
    if warnings {
        references::check(resources, &mut out);
        shadow::check(resources, &mut out);
    }
    services::check(resources, &mut out);
    out.list.extend(crate::waypoint::validate::check(resources, sources));
    let mut list = out.list;
    sort(&mut list);
    list
}

/// Ports and peers of one rule (ingress `from` or egress `to`).
fn rule_shape(
    out: &mut Findings,
    at: &At,
    rule: Entry,
    peers_name: &str,
    peers: &[Peer],
    ports: &[u16],
    not_ports: &[u16],
) {
    for (field, list) in [("ports", ports), ("notPorts", not_ports)] {
        for (p, port) in list.iter().enumerate() {
            if *port == 0 {
                out.error(at, &format!("{rule}.{field}[{p}]"), "port 0 is not a port".into());
            }
        }
    }
    for (f, peer) in peers.iter().enumerate() {
        let field = Below(rule, Entry(peers_name, f));
        if peer.is_empty() {
            let message = format!("an empty peer matches nothing; omit `{peers_name}` to match any peer");
            out.error(at, &field.to_string(), message);
        }
        if peer.service.is_some() && peers_name == "from" {
            let message = "a Service is a destination, never a source: name it in an egress rule's `to`";
            out.error(at, &format!("{field}.service"), message.into());
        }
        for (list, patterns) in [("principals", &peer.principals), ("notPrincipals", &peer.not_principals)] {
            for (i, p) in patterns.iter().enumerate() {
                if let Some(why) = principal_problem(p) {
                    out.error(at, &format!("{field}.{list}[{i}]"), format!("{p:?} {why}"));
                }
            }
        }
    }
}

/// `list[index]`, a field path spelled out only for a finding: a cluster's batch has a
/// hundred thousand rules and peers, and few findings.
#[derive(Clone, Copy)]
struct Entry<'a>(&'a str, usize);

impl fmt::Display for Entry<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.0, self.1)
    }
}

/// `outer.inner`, e.g. `spec.rules[1].from[0]`, spelled out only for a finding.
#[derive(Clone, Copy)]
struct Below<'a>(Entry<'a>, Entry<'a>);

impl fmt::Display for Below<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// Why a principal pattern can never name an identity, if it cannot. Patterns are matched
/// against `<trust-domain>/ns/<namespace>/sa/<service-account>`; `*` matches any run.
fn principal_problem(pattern: &str) -> Option<&'static str> {
    let body = pattern.strip_prefix("spiffe://").unwrap_or(pattern);
    if body.is_empty() {
        return Some("is empty: write `*` for any identity");
    }
    if body.chars().any(char::is_whitespace) {
        return Some("contains white space, which no identity has");
    }
    if body.contains('*') {
        return None;
    }
    let parts: Vec<&str> = body.split('/').collect();
    let shaped = parts.len() == 5 && parts[1] == "ns" && parts[3] == "sa" && parts.iter().all(|p| !p.is_empty());
    (!shaped)
        .then_some("is not an identity `<trust-domain>/ns/<namespace>/sa/<service-account>` (nor a pattern with `*`)")
}

pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The resource a finding is about.
struct At<'a> {
    origin: &'a Origin,
    /// `Kind namespace/name`.
    label: String,
}

impl<'a> At<'a> {
    fn new(located: &'a Located) -> Self {
        let meta = located.resource.metadata();
        let ns = meta.namespace.as_deref().map(|n| format!("{n}/")).unwrap_or_default();
        At { origin: &located.origin, label: format!("{} {ns}{}", located.resource.kind(), meta.name) }
    }
}

/// Findings being collected, each placed at its field's line.
struct Findings<'s> {
    sources: &'s Sources,
    list: Vec<Finding>,
}

impl Findings<'_> {
    fn error(&mut self, at: &At, field: &str, message: String) {
        let origin = self.sources.locate(at.origin, field);
        self.list.push(Finding::error(&origin, &at.label, field, message));
    }

    fn warning(&mut self, at: &At, field: &str, message: String) {
        let origin = self.sources.locate(at.origin, field);
        self.list.push(Finding::warning(&origin, &at.label, field, message));
    }

    /// Where `field` of `at` is, to name a second position in a message.
    fn place(&self, at: &At, field: &str) -> Origin {
        self.sources.locate(at.origin, field)
    }
}
