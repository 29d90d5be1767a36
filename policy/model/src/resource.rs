//! The resources users write, as YAML documents in the Kubernetes shape
//! (`apiVersion`, `kind`, `metadata`, `spec`).
use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "palisade.dev/v1alpha1";

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
        }
    }

    pub fn api_version(&self) -> &str {
        match self {
            Resource::Workload { api_version, .. }
            | Resource::Namespace { api_version, .. }
            | Resource::SegmentationPolicy { api_version, .. } => api_version,
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::Workload { metadata, .. }
            | Resource::Namespace { metadata, .. }
            | Resource::SegmentationPolicy { metadata, .. } => metadata,
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

/// L4 segmentation: which sources may (or may not) reach the selected destinations, on
/// which ports. Selects workloads of its own namespace.
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
    pub rules: Vec<Rule>,
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
}

impl Peer {
    /// True when no field is set (such a peer would match nothing useful).
    pub fn is_empty(&self) -> bool {
        self.namespace.is_none()
            && self.service_account.is_none()
            && self.match_labels.is_empty()
            && self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.ip_blocks.is_empty()
            && self.not_ip_blocks.is_empty()
    }
}
