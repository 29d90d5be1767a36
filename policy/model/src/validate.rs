//! Checks across resources that the YAML shape cannot express. Every problem is reported,
//! each naming where it is, so one run fixes them all.
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use crate::load::{Located, Origin};
use crate::resource::Resource;

mod finding;
pub use finding::{Finding, Severity};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub origin: Origin,
    /// `Kind namespace/name`.
    pub resource: String,
    /// Dotted path of the field, e.g. `spec.rules[0].ports[1]`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}: {}", self.origin, self.resource, self.field, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub struct Invalid(pub Vec<Problem>);

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

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub fn validate(resources: &[Located]) -> Result<(), Invalid> {
    let mut problems = Vec::new();
    let mut names: HashMap<(&str, Option<&str>, &str), &Origin> = HashMap::new();
    let mut addresses: HashMap<IpAddr, (&Origin, String)> = HashMap::new();
    for Located { origin, resource } in resources {
        let meta = resource.metadata();
        let label = format!(
            "{} {}{}",
            resource.kind(),
            meta.namespace.as_deref().map(|n| format!("{n}/")).unwrap_or_default(),
            meta.name
        );
        let mut problem = |field: &str, message: String| {
            problems.push(Problem {
                origin: origin.clone(),
                resource: label.clone(),
                field: field.to_string(),
                message,
            })
        };
        if !is_dns_label(&meta.name) {
            problem("metadata.name", format!("{:?} is not a lowercase DNS name", meta.name));
        }
        let key = (resource.kind(), meta.namespace.as_deref(), meta.name.as_str());
        if let Some(first) = names.insert(key, origin) {
            problem("metadata.name", format!("defined twice; first at {first}"));
        }
        let namespaced = !matches!(resource, Resource::Namespace { .. });
        match (&meta.namespace, namespaced) {
            (None, true) => problem("metadata.namespace", "required for this kind".into()),
            (Some(_), false) => problem("metadata.namespace", "a Namespace has no namespace".into()),
            (Some(ns), true) if !is_dns_label(ns) => {
                problem("metadata.namespace", format!("{ns:?} is not a lowercase DNS name"))
            }
            _ => {}
        }
        match resource {
            Resource::Workload { spec, .. } => {
                if spec.addresses.is_empty() {
                    problem("spec.addresses", "a workload needs at least one address".into());
                }
                if spec.service_account.is_empty() {
                    problem("spec.serviceAccount", "must not be empty".into());
                }
                if spec.node.is_empty() {
                    problem("spec.node", "must not be empty".into());
                }
                for (i, addr) in spec.addresses.iter().enumerate() {
                    if let Some((first, owner)) = addresses.get(addr) {
                        problem(
                            &format!("spec.addresses[{i}]"),
                            format!("{addr} is already the address of {owner} ({first})"),
                        );
                    } else {
                        addresses.insert(*addr, (origin, label.clone()));
                    }
                }
            }
            Resource::SegmentationPolicy { spec, .. } => {
                if spec.rules.is_empty() && spec.egress.is_none() {
                    problem(
                        "spec.rules",
                        "at least one rule is required (a rule `{}` matches every connection)".into(),
                    );
                }
                for (r, rule) in spec.rules.iter().enumerate() {
                    for (field, ports) in [("ports", &rule.ports), ("notPorts", &rule.not_ports)] {
                        for (p, port) in ports.iter().enumerate() {
                            if *port == 0 {
                                problem(&format!("spec.rules[{r}].{field}[{p}]"), "port 0 is not a port".into());
                            }
                        }
                    }
                    for (f, peer) in rule.from.iter().enumerate() {
                        if peer.is_empty() {
                            problem(
                                &format!("spec.rules[{r}].from[{f}]"),
                                "an empty source matches nothing; omit `from` to match any source".into(),
                            );
                        }
                    }
                }
            }
            Resource::Namespace { .. } => {}
            Resource::NetworkPolicy { spec, .. } => {
                for (field, message) in crate::k8s::problems(spec) {
                    problem(&field, message);
                }
            }
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(Invalid(problems)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::parse_str;
    use std::path::Path;

    fn check(text: &str) -> Vec<String> {
        let resources = parse_str(Path::new("c.yaml"), text).expect("parses");
        match validate(&resources) {
            Ok(()) => vec![],
            Err(Invalid(p)) => p.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn reports_every_problem_with_its_place() {
        let problems = check(
            "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {name: a, namespace: x}\n\
             spec: {serviceAccount: s, node: n1, addresses: [10.0.0.1]}\n---\n\
             apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {name: b, namespace: x}\n\
             spec: {serviceAccount: s, node: n1, addresses: [10.0.0.1]}\n---\n\
             apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: P, namespace: x}\n\
             spec: {action: Deny, rules: [{ports: [0]}]}\n",
        );
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(problems[0].starts_with("c.yaml:6: Workload x/b: spec.addresses[0]: 10.0.0.1 is already"));
        assert!(problems[1].contains("c.yaml:11: SegmentationPolicy x/P: metadata.name"));
        assert!(problems[2].contains("spec.rules[0].ports[0]: port 0"));
    }

    #[test]
    fn valid_configuration_passes() {
        assert!(
            check(
                "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: x}\nspec: {defaultAction: Deny}\n"
            )
            .is_empty()
        );
    }
}
