//! What the Kubernetes API server would refuse in a NetworkPolicy, so that a manifest Palisade
//! accepts is one Kubernetes accepts too. Every problem is reported with its field.
use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::cidr::Cidr;

fn selector(s: &LabelSelector, field: &str, out: &mut Vec<(String, String)>) {
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        let values = e.values.as_ref().map_or(0, Vec::len);
        match e.operator.as_str() {
            "In" | "NotIn" if values == 0 => {
                out.push((format!("{f}.values"), format!("must be non-empty with operator {}", e.operator)))
            }
            "Exists" | "DoesNotExist" if values != 0 => {
                out.push((format!("{f}.values"), format!("must be empty with operator {}", e.operator)))
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => out.push((
                format!("{f}.operator"),
                format!("{other:?} is not an operator (In, NotIn, Exists or DoesNotExist)"),
            )),
        }
        if e.key.is_empty() {
            out.push((format!("{f}.key"), "must not be empty".into()));
        }
    }
}

fn peer(p: &NetworkPolicyPeer, field: &str, out: &mut Vec<(String, String)>) {
    let selectors = p.pod_selector.is_some() || p.namespace_selector.is_some();
    match &p.ip_block {
        Some(_) if selectors => out.push((
            field.into(),
            "ipBlock cannot be combined with podSelector or namespaceSelector in one peer".into(),
        )),
        Some(block) => match block.cidr.parse::<Cidr>() {
            Err(e) => out.push((format!("{field}.ipBlock.cidr"), e.to_string())),
            Ok(cidr) => {
                for (i, ex) in block.except.iter().flatten().enumerate() {
                    let f = format!("{field}.ipBlock.except[{i}]");
                    match ex.parse::<Cidr>() {
                        Err(e) => out.push((f, e.to_string())),
                        Ok(ex) if !cidr.covers(&ex) || ex.prefix == cidr.prefix => {
                            out.push((f, format!("{ex} must be strictly within {cidr}")))
                        }
                        Ok(_) => {}
                    }
                }
            }
        },
        None if !selectors => out.push((
            field.into(),
            "a peer needs podSelector, namespaceSelector or ipBlock (omit the peer list to match everyone)".into(),
        )),
        None => {}
    }
    if let Some(s) = &p.pod_selector {
        selector(s, &format!("{field}.podSelector"), out);
    }
    if let Some(s) = &p.namespace_selector {
        selector(s, &format!("{field}.namespaceSelector"), out);
    }
}

fn is_port_name(s: &str) -> bool {
    // IANA_SVC_NAME, as Kubernetes validates named ports.
    !s.is_empty()
        && s.len() <= 15
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn port(p: &NetworkPolicyPort, field: &str, out: &mut Vec<(String, String)>) {
    if let Some(proto) = &p.protocol
        && !matches!(proto.as_str(), "TCP" | "UDP" | "SCTP")
    {
        out.push((format!("{field}.protocol"), format!("{proto:?} is not a protocol (TCP, UDP or SCTP)")));
    }
    let numbered = match &p.port {
        Some(IntOrString::Int(n)) if !(1..=65_535).contains(n) => {
            out.push((format!("{field}.port"), format!("{n} is not a port (1-65535)")));
            None
        }
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => {
            if !is_port_name(name) {
                out.push((format!("{field}.port"), format!("{name:?} is not a port name (IANA service name)")));
            }
            None
        }
        None => None,
    };
    if let Some(end) = p.end_port {
        match numbered {
            None => out.push((format!("{field}.endPort"), "requires a numbered port".into())),
            Some(first) if end < first || end > 65_535 => {
                out.push((format!("{field}.endPort"), format!("{end} must be between port ({first}) and 65535")))
            }
            Some(_) => {}
        }
    }
}

/// Every problem of one NetworkPolicy's spec: (field, reason).
pub fn problems(spec: &NetworkPolicySpec) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, t) in spec.policy_types.iter().flatten().enumerate() {
        if t != "Ingress" && t != "Egress" {
            out.push((format!("spec.policyTypes[{i}]"), format!("{t:?} is not a policy type (Ingress or Egress)")));
        }
    }
    if let Some(s) = &spec.pod_selector {
        selector(s, "spec.podSelector", &mut out);
    }
    for (r, rule) in spec.ingress.iter().flatten().enumerate() {
        for (i, p) in rule.from.iter().flatten().enumerate() {
            peer(p, &format!("spec.ingress[{r}].from[{i}]"), &mut out);
        }
        for (i, p) in rule.ports.iter().flatten().enumerate() {
            port(p, &format!("spec.ingress[{r}].ports[{i}]"), &mut out);
        }
    }
    for (r, rule) in spec.egress.iter().flatten().enumerate() {
        for (i, p) in rule.to.iter().flatten().enumerate() {
            peer(p, &format!("spec.egress[{r}].to[{i}]"), &mut out);
        }
        for (i, p) in rule.ports.iter().flatten().enumerate() {
            port(p, &format!("spec.egress[{r}].ports[{i}]"), &mut out);
        }
    }
    out
}
