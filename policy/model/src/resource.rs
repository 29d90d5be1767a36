//! The resources users write, as YAML documents in the Kubernetes shape
//! (`apiVersion`, `kind`, `metadata`, `spec`).
use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "palisade.dev/v1alpha1";
/// Kubernetes' `NetworkPolicy`, accepted as written for Kubernetes.
pub const K8S_NETWORKING_API_VERSION: &str = "networking.k8s.io/v1";
/// Kubernetes' core group (`Namespace`).
pub const K8S_CORE_API_VERSION: &str = "v1";
/// The label Kubernetes sets on every namespace (its name); Palisade sets it too, on every
/// namespace it knows, whichever kind defined it (namespaceSelector relies on it).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// One resource of any kind. The loader reads `kind` first and then the typed document,
/// so that errors keep their line numbers (serde's tagged enums would lose them).
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "kind")]
pub enum Resource {
    Workload {
        #[serde(rename = "apiVersion")]
        api_version: String,
        metadata: Metadata,
        spec: WorkloadSpec,
    },
    Namespace {
        #[serde(rename = "apiVersion")]
        api_version: String,
        metadata: Metadata,
        spec: NamespaceSpec,
    },
    SegmentationPolicy {
        #[serde(rename = "apiVersion")]
        api_version: String,
        metadata: Metadata,
        spec: SegmentationSpec,
    },
    /// Kubernetes `networking.k8s.io/v1` `NetworkPolicy` (translated by [`crate::k8s`]).
    /// A namespace-less one is in `default`, as `kubectl apply` puts it.
    NetworkPolicy {
        #[serde(rename = "apiVersion")]
        api_version: String,
        metadata: Metadata,
        spec: Box<k8s_openapi::api::networking::v1::NetworkPolicySpec>,
    },
    /// Kubernetes `v1` `Service` (endpoints computed by [`crate::compile`], see [`crate::k8s`]).
    Service {
        #[serde(rename = "apiVersion")]
        api_version: String,
        metadata: Metadata,
        spec: Box<k8s_openapi::api::core::v1::ServiceSpec>,
    },
    /// Gateway API `HTTPRoute` attached to a Service (see [`crate::waypoint`]).
    #[serde(rename = "HTTPRoute")]
    HttpRoute {
        #[serde(rename = "apiVersion")]
        api_version: String,
        metadata: Metadata,
        spec: Box<crate::waypoint::gateway::HttpRouteSpec>,
    },
    /// Gateway API `Gateway`; of class `palisade-waypoint`, a waypoint.
    Gateway {
        #[serde(rename = "apiVersion")]
        api_version: String,
        metadata: Metadata,
        spec: Box<crate::waypoint::gateway::GatewaySpec>,
    },
    /// Istio `AuthorizationPolicy` with `targetRefs`, enforced by a waypoint.
    AuthorizationPolicy {
        #[serde(rename = "apiVersion")]
        api_version: String,
        metadata: Metadata,
        spec: Box<crate::waypoint::istio::AuthorizationPolicySpec>,
    },
    /// Load balancing, limits and outlier detection of a Service, enforced by a waypoint.
    TrafficPolicy {
        #[serde(rename = "apiVersion")]
        api_version: String,
        metadata: Metadata,
        spec: Box<crate::waypoint::traffic::TrafficPolicySpec>,
    },
}

/// The typed shape of one YAML document of a given kind.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Document<S> {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: Metadata,
    pub spec: S,
}

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Workload { .. } => "Workload",
            Resource::Namespace { .. } => "Namespace",
            Resource::SegmentationPolicy { .. } => "SegmentationPolicy",
            Resource::NetworkPolicy { .. } => "NetworkPolicy",
            Resource::Service { .. } => "Service",
            Resource::HttpRoute { .. } => "HTTPRoute",
            Resource::Gateway { .. } => "Gateway",
            Resource::AuthorizationPolicy { .. } => "AuthorizationPolicy",
            Resource::TrafficPolicy { .. } => "TrafficPolicy",
        }
    }

    pub fn api_version(&self) -> &str {
        match self {
            Resource::Workload { api_version, .. }
            | Resource::Namespace { api_version, .. }
            | Resource::SegmentationPolicy { api_version, .. }
            | Resource::NetworkPolicy { api_version, .. }
            | Resource::Service { api_version, .. }
            | Resource::HttpRoute { api_version, .. }
            | Resource::Gateway { api_version, .. }
            | Resource::AuthorizationPolicy { api_version, .. }
            | Resource::TrafficPolicy { api_version, .. } => api_version,
        }
    }

    /// The `apiVersion` this kind is written with (for messages).
    pub fn expected_api_version(&self) -> &'static str {
        match self {
            Resource::NetworkPolicy { .. } => K8S_NETWORKING_API_VERSION,
            Resource::Service { .. } => K8S_CORE_API_VERSION,
            Resource::HttpRoute { .. } | Resource::Gateway { .. } => crate::waypoint::gateway::GATEWAY_API_VERSION,
            Resource::AuthorizationPolicy { .. } => crate::waypoint::istio::ISTIO_SECURITY_API_VERSION,
            _ => API_VERSION,
        }
    }

    /// Palisade's kinds are `palisade.dev/v1alpha1`; Kubernetes' keep their own group.
    pub fn api_version_accepted(&self) -> bool {
        match self {
            Resource::NetworkPolicy { api_version, .. } => api_version == K8S_NETWORKING_API_VERSION,
            Resource::Service { api_version, .. } => api_version == K8S_CORE_API_VERSION,
            Resource::HttpRoute { api_version, .. } | Resource::Gateway { api_version, .. } => {
                api_version == crate::waypoint::gateway::GATEWAY_API_VERSION
            }
            Resource::AuthorizationPolicy { api_version, .. } => [
                crate::waypoint::istio::ISTIO_SECURITY_API_VERSION,
                crate::waypoint::istio::ISTIO_SECURITY_API_VERSION_BETA,
            ]
            .contains(&api_version.as_str()),
            Resource::Namespace { api_version, .. } => {
                api_version == API_VERSION || api_version == K8S_CORE_API_VERSION
            }
            other => other.api_version() == API_VERSION,
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::Workload { metadata, .. }
            | Resource::Namespace { metadata, .. }
            | Resource::SegmentationPolicy { metadata, .. }
            | Resource::NetworkPolicy { metadata, .. }
            | Resource::Service { metadata, .. }
            | Resource::HttpRoute { metadata, .. }
            | Resource::Gateway { metadata, .. }
            | Resource::AuthorizationPolicy { metadata, .. }
            | Resource::TrafficPolicy { metadata, .. } => metadata,
        }
    }
}

/// A pod (or VM) of the mesh: who it is and where it runs. In Kubernetes these come from the
/// API server; in standalone mode (and in the sandbox) from files.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub addresses: Vec<IpAddr>,
    /// The node the workload is scheduled on.
    pub node: String,
    /// Pod UID, as the enrollment API names it.
    #[serde(default)]
    pub uid: Option<String>,
    /// Container ports, for policies that name ports (`port: http`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
}

/// A port a workload's container listens on, as in a Kubernetes pod spec.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

/// Per-namespace defaults.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSpec {
    /// Verdict for connections into this namespace's workloads that no rule decides.
    #[serde(default)]
    pub default_action: Action,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// L4 segmentation: which sources may (or may not) reach the selected workloads, on which
/// ports (`rules`, ingress), and where the selected workloads may (or may not) connect
/// (`egress`). Selects workloads of its own namespace. An Allow policy isolates what it
/// selects in each direction it names: `rules` for ingress, `egress` (even empty) for egress.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SegmentationSpec {
    /// Destination workloads in the policy's namespace; empty selects them all.
    #[serde(default)]
    pub selector: Selector,
    pub action: Action,
    /// `Audit` evaluates the policy and reports what it would deny, without enforcing it.
    #[serde(default)]
    pub mode: Mode,
    /// Ingress rules. Omitted (with `egress` given): the policy says nothing about ingress.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Egress rules of the selected workloads; `[]` with `action: Allow` denies all egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
}

/// Destinations the selected workloads may (or may not) connect to.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    /// Destinations; one matches when all its given fields match. Empty means anywhere.
    /// `matchLabels` without a namespace names workloads of the policy's own namespace.
    #[serde(default)]
    pub to: Vec<Peer>,
    /// Destination TCP ports; empty means any port.
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub not_ports: Vec<u16>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

impl Selector {
    /// Kubernetes' label selector semantics: every label and every expression must hold;
    /// an empty selector matches everything.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Requirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            // As in Kubernetes: a pod without the key is "not in" the values.
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Sources; a source matches when all its given fields match. Empty means any source,
    /// also outside the mesh.
    #[serde(default)]
    pub from: Vec<Peer>,
    /// Destination TCP ports; empty means any port.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Destination TCP ports the rule does not apply to. Enforced by ztunnel's proxies; the
    /// kernel keeps the rule only where that cannot deny too much (see ARCHITECTURE.md).
    #[serde(default)]
    pub not_ports: Vec<u16>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Peer {
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
    /// Namespaces by their labels (`kubernetes.io/metadata.name` is always set); `{}` is every
    /// namespace's workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<Selector>,
    /// Source namespaces (any of them).
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Source identities, `<trust-domain>/ns/<ns>/sa/<sa>` (with or without `spiffe://`);
    /// `*` matches any run of characters.
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// Source addresses.
    #[serde(default)]
    pub ip_blocks: Vec<crate::cidr::Cidr>,
    #[serde(default)]
    pub not_ip_blocks: Vec<crate::cidr::Cidr>,
    /// Egress only: the endpoints of this Service (of `namespace`, else the policy's own), and
    /// through them its virtual address. A Service is a destination, never a source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

impl Peer {
    /// Whether the peer is read in the policy's own namespace because it names none: a label
    /// selector (as Kubernetes reads a podSelector) or a Service.
    pub fn reads_in_policy_namespace(&self) -> bool {
        self.is_unscoped_label_selector()
            || (self.service.is_some()
                && self.namespace.is_none()
                && self.namespaces.is_empty()
                && self.namespace_selector.is_none())
    }

    /// Whether the peer names workloads by their labels without saying in which namespaces:
    /// such a peer is read in the policy's own namespace, as Kubernetes reads a podSelector.
    pub fn is_unscoped_label_selector(&self) -> bool {
        (!self.match_labels.is_empty() || !self.match_expressions.is_empty())
            && self.namespace.is_none()
            && self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.namespace_selector.is_none()
            && self.principals.is_empty()
    }

    /// True when no field is set (such a peer would match nothing useful).
    pub fn is_empty(&self) -> bool {
        self.namespace.is_none()
            && self.service_account.is_none()
            && self.match_labels.is_empty()
            && self.match_expressions.is_empty()
            && self.namespace_selector.is_none()
            && self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.ip_blocks.is_empty()
            && self.not_ip_blocks.is_empty()
            && self.service.is_none()
    }
}
