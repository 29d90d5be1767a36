//! Kubernetes' own resources, read with Kubernetes' types (`k8s-openapi`) so that a manifest
//! written for a cluster loads unchanged, and translated into the rules both evaluations read.
//!
//! - `v1` `Namespace`: its labels (plus `kubernetes.io/metadata.name`, which Palisade sets on
//!   every namespace it knows) for `namespaceSelector`. It *is* a Palisade `Namespace` with
//!   `defaultAction: Allow`: a namespace is defined once, by one kind or the other (both is the
//!   "defined twice" error); Palisade's kind carries labels too, so it can stand for both.
//! - `networking.k8s.io/v1` `NetworkPolicy`, with Kubernetes' semantics: see [`translate`].
//! - `v1` `Service`: selector, ports (`targetPort` by number or name) and `clusterIP`, the
//!   virtual address ztunnel resolves to one endpoint (see `crate::compile::services`).
use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

use crate::matching::{PolicyRule, PortMatch};
use crate::resource::{
    K8S_CORE_API_VERSION, K8S_NETWORKING_API_VERSION, Metadata, NamespaceSpec, Operator, Peer, Requirement, Resource,
    Selector,
};

mod check;
#[cfg(test)]
mod tests;

pub use check::problems;

/// The namespace `kubectl apply` puts a namespace-less manifest in.
pub const DEFAULT_NAMESPACE: &str = "default";

fn metadata(meta: ObjectMeta, namespaced: bool) -> Metadata {
    Metadata {
        name: meta.name.unwrap_or_default(),
        namespace: if namespaced { Some(meta.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.into())) } else { None },
        labels: meta.labels.unwrap_or_default(),
    }
}

/// Reads one `NetworkPolicy` document.
pub(crate) fn network_policy(doc: &str) -> Result<Resource, serde_yaml::Error> {
    let np = k8s_openapi::api::networking::v1::NetworkPolicy::deserialize(serde_yaml::Deserializer::from_str(doc))?;
    Ok(Resource::NetworkPolicy {
        api_version: K8S_NETWORKING_API_VERSION.into(),
        metadata: metadata(np.metadata, true),
        spec: Box::new(np.spec.unwrap_or_default()),
    })
}

/// Reads one `v1` `Service` document.
pub(crate) fn service(doc: &str) -> Result<Resource, serde_yaml::Error> {
    let svc = k8s_openapi::api::core::v1::Service::deserialize(serde_yaml::Deserializer::from_str(doc))?;
    Ok(Resource::Service {
        api_version: K8S_CORE_API_VERSION.into(),
        metadata: metadata(svc.metadata, true),
        spec: Box::new(svc.spec.unwrap_or_default()),
    })
}

/// Reads one `v1` `Namespace` document.
pub(crate) fn namespace(doc: &str) -> Result<Resource, serde_yaml::Error> {
    let ns = k8s_openapi::api::core::v1::Namespace::deserialize(serde_yaml::Deserializer::from_str(doc))?;
    Ok(Resource::Namespace {
        api_version: K8S_CORE_API_VERSION.into(),
        metadata: metadata(ns.metadata, false),
        spec: NamespaceSpec::default(),
    })
}

/// Something a policy says that the mesh cannot (or not yet) enforce; never an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub field: String,
    pub message: String,
}

/// A NetworkPolicy as rules: `None` for a direction the policy does not affect; `Some([])`
/// isolates without allowing anything (default deny).
#[derive(Clone, Debug, Default)]
pub struct Translated {
    pub selector: Selector,
    pub ingress: Option<Vec<PolicyRule>>,
    pub egress: Option<Vec<PolicyRule>>,
    pub notes: Vec<Note>,
}

pub(crate) fn selector(s: &LabelSelector) -> Selector {
    Selector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: s
            .match_expressions
            .iter()
            .flatten()
            .map(|e| Requirement {
                key: e.key.clone(),
                operator: match e.operator.as_str() {
                    "In" => Operator::In,
                    "NotIn" => Operator::NotIn,
                    "Exists" => Operator::Exists,
                    // `check` refused anything else.
                    _ => Operator::DoesNotExist,
                },
                values: e.values.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

/// Whether the policy affects each direction. Kubernetes' defaulting: without `policyTypes`,
/// every policy affects ingress, and egress only when it has egress rules.
pub fn policy_types(spec: &NetworkPolicySpec) -> (bool, bool) {
    match &spec.policy_types {
        Some(types) if !types.is_empty() => (types.iter().any(|t| t == "Ingress"), types.iter().any(|t| t == "Egress")),
        _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
    }
}

/// One peer, in the policy's namespace `ns`:
/// - `podSelector` alone: pods of `ns`;
/// - `namespaceSelector` alone: every pod of the selected namespaces;
/// - both (one peer): pods matching both (AND); separate peers are alternatives (OR);
/// - `ipBlock`: addresses in `cidr` and in none of `except`.
fn peer(p: &NetworkPolicyPeer, ns: &str) -> Peer {
    let mut out = Peer::default();
    if let Some(block) = &p.ip_block {
        out.ip_blocks = block.cidr.parse().into_iter().collect();
        out.not_ip_blocks = block.except.iter().flatten().filter_map(|c| c.parse().ok()).collect();
        return out;
    }
    if let Some(pods) = &p.pod_selector {
        let s = selector(pods);
        out.match_labels = s.match_labels;
        out.match_expressions = s.match_expressions;
    }
    match &p.namespace_selector {
        Some(namespaces) => out.namespace_selector = Some(selector(namespaces)),
        None => out.namespace = Some(ns.to_string()),
    }
    out
}

/// TCP ports of a rule; UDP and SCTP ones are noted as not enforced. A rule that names ports
/// but none of them TCP allows no TCP connection at all ([`PortMatch::Never`]).
fn ports(ports: &[NetworkPolicyPort], field: &str, notes: &mut Vec<Note>) -> Vec<PortMatch> {
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let protocol = p.protocol.as_deref().unwrap_or("TCP");
        if protocol != "TCP" {
            notes.push(Note {
                field: format!("{field}[{i}].protocol"),
                message: format!(
                    "{protocol} is not enforced: the kernel enforces TCP only, {protocol} traffic is neither allowed nor denied by Palisade"
                ),
            });
            continue;
        }
        out.push(match &p.port {
            // No port: every port of the protocol.
            None => PortMatch::Range(1, u16::MAX),
            Some(IntOrString::Int(n)) => {
                let first = *n as u16;
                PortMatch::Range(first, p.end_port.map_or(first, |e| e as u16))
            }
            Some(IntOrString::String(name)) => PortMatch::Named(name.clone()),
        });
    }
    if out.is_empty() && !ports.is_empty() { vec![PortMatch::Never] } else { out }
}

/// A rule's peers (`from` or `to`) and ports, whichever direction it is.
type RuleParts<'a> = (Option<&'a Vec<NetworkPolicyPeer>>, Option<&'a Vec<NetworkPolicyPort>>);

/// Translates a policy that [`problems`] accepted. Kubernetes' semantics: the policy selects
/// pods of its namespace (`podSelector`, `{}` all of them) and isolates them in each direction
/// it affects ([`policy_types`]); a connection is then allowed only when some rule of some
/// policy selecting the pod allows it (the union); an empty rule list denies everything in
/// that direction; a rule without peers matches every peer, without ports every port.
pub fn translate(ns: &str, spec: &NetworkPolicySpec) -> Translated {
    let (ingress, egress) = policy_types(spec);
    let mut notes = Vec::new();
    let mut rules = |dir: &str, list: Vec<RuleParts<'_>>| {
        let mut out = Vec::new();
        for (i, (peers, ps)) in list.into_iter().enumerate() {
            let field = format!("spec.{dir}[{i}].ports");
            out.push(PolicyRule {
                peers: peers.into_iter().flatten().map(|p| peer(p, ns)).collect(),
                ports: ports(ps.map(Vec::as_slice).unwrap_or_default(), &field, &mut notes),
                not_ports: vec![],
            });
        }
        out
    };
    let ingress_rules = ingress.then(|| {
        rules("ingress", spec.ingress.iter().flatten().map(|r| (r.from.as_ref(), r.ports.as_ref())).collect())
    });
    let egress_rules = egress
        .then(|| rules("egress", spec.egress.iter().flatten().map(|r| (r.to.as_ref(), r.ports.as_ref())).collect()));
    Translated {
        selector: spec.pod_selector.as_ref().map(selector).unwrap_or_default(),
        ingress: ingress_rules,
        egress: egress_rules,
        notes,
    }
}

/// Labels of a namespace as selectors see them: its own plus `kubernetes.io/metadata.name`.
pub fn namespace_labels(name: &str, labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut out = labels.clone();
    out.insert(crate::resource::NAMESPACE_NAME_LABEL.into(), name.into());
    out
}
