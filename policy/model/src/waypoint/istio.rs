//! Istio's `security.istio.io/v1` `AuthorizationPolicy`, with Istio's field names, for the
//! form that attaches to a Service or a waypoint with `targetRefs` (the one a waypoint
//! enforces in Istio's ambient mode). Fields of Istio's schema that need what the mesh does not
//! have (JWT: `requestPrincipals`, `remoteIpBlocks`; `CUSTOM` external authorization) are
//! refused, never silently ignored.
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

pub const ISTIO_SECURITY_API_VERSION: &str = "security.istio.io/v1";
/// The same schema, as older manifests write it.
pub const ISTIO_SECURITY_API_VERSION_BETA: &str = "security.istio.io/v1beta1";

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Istio's workload selector: an L4 policy enforced by ztunnel in Istio; refused here
    /// (validation says to use `targetRefs` or a SegmentationPolicy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<serde_json::Value>,
    /// The deprecated single form of `targetRefs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetRef>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetRef>,
    /// Omitted: `ALLOW`.
    #[serde(default)]
    pub action: IstioAction,
    #[serde(default)]
    pub rules: Vec<IstioRule>,
}

impl AuthorizationPolicySpec {
    /// `targetRefs` and the deprecated `targetRef`, with each one's field path.
    pub fn targets(&self) -> Vec<(String, &PolicyTargetRef)> {
        let single = self.target_ref.iter().map(|t| ("spec.targetRef".to_string(), t));
        let many = self.target_refs.iter().enumerate().map(|(i, t)| (format!("spec.targetRefs[{i}]"), t));
        single.chain(many).collect()
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetRef {
    /// `""` for a Service, `gateway.networking.k8s.io` for a Gateway.
    #[serde(default)]
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    /// Must be the policy's own namespace (as in Istio).
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum IstioAction {
    #[default]
    Allow,
    Deny,
    Audit,
    /// External authorization; refused by validation.
    Custom,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioRule {
    #[serde(default)]
    pub from: Vec<IstioFrom>,
    #[serde(default)]
    pub to: Vec<IstioTo>,
    #[serde(default)]
    pub when: Vec<IstioCondition>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioFrom {
    #[serde(default)]
    pub source: Option<IstioSource>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioSource {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<crate::cidr::Cidr>,
    #[serde(default)]
    pub not_ip_blocks: Vec<crate::cidr::Cidr>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioTo {
    #[serde(default)]
    pub operation: Option<IstioOperation>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioOperation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Istio writes ports as strings (`"8080"`); numbers are accepted too.
    #[serde(default)]
    pub ports: Vec<IntOrString>,
    #[serde(default)]
    pub not_ports: Vec<IntOrString>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioCondition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// A port of `ports`/`notPorts` as a number, if it is one.
pub fn port_number(p: &IntOrString) -> Option<u16> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).ok().filter(|n| *n != 0),
        IntOrString::String(s) => s.parse::<u16>().ok().filter(|n| *n != 0),
    }
}

/// Whether a `when` key is one the waypoint evaluates, and its canonical form (header names
/// lower case).
pub fn condition_key(key: &str) -> Option<String> {
    if let Some(name) = key.strip_prefix("request.headers[").and_then(|k| k.strip_suffix(']')) {
        return (!name.is_empty()).then(|| format!("request.headers[{}]", name.to_ascii_lowercase()));
    }
    matches!(key, "source.ip" | "source.namespace" | "source.principal" | "destination.port").then(|| key.to_string())
}
