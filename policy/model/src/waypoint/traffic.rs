//! `palisade.dev/v1alpha1` `TrafficPolicy`: how a waypoint balances, limits and ejects the
//! endpoints of one Service. Field names follow Istio's DestinationRule where one exists
//! (`connectionPool`, `outlierDetection`), in the flat shape of a Gateway API policy
//! (`targetRef`); durations are written as Gateway API writes them (`10s`, `500ms`, `1m`).
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    pub target_ref: TrafficTargetRef,
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSpec>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSpec>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    #[serde(default)]
    pub timeouts: Option<TrafficTimeouts>,
}

/// A Service of the policy's namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficTargetRef {
    #[serde(default)]
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
}

/// Exactly one of the three.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSpec {
    #[serde(default)]
    pub round_robin: Option<Empty>,
    /// Power of two choices on active requests.
    #[serde(default)]
    pub least_request: Option<Empty>,
    #[serde(default)]
    pub ring_hash: Option<RingHashSpec>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// Exactly one key: a header's value or the source address.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RingHashSpec {
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default, rename = "sourceIP")]
    pub source_ip: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPoolSpec {
    #[serde(default)]
    pub max_connections: Option<u32>,
    #[serde(default)]
    pub max_pending_requests: Option<u32>,
    #[serde(default)]
    pub max_requests_per_connection: Option<u32>,
    #[serde(default)]
    pub max_active_requests: Option<u32>,
    #[serde(default)]
    pub max_active_retries: Option<u32>,
}

/// Omitted counts: `consecutive5xx: 5` when neither is given (Envoy's default); omitted
/// times: `interval: 10s`, `baseEjectionTime: 30s`; `maxEjectionPercent: 10`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetectionSpec {
    #[serde(default, rename = "consecutive5xx")]
    pub consecutive_5xx: Option<u32>,
    #[serde(default, rename = "consecutiveGatewayErrors")]
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default, rename = "baseEjectionTime")]
    pub base_ejection_time: Option<String>,
    #[serde(default, rename = "maxEjectionPercent")]
    pub max_ejection_percent: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficTimeouts {
    #[serde(default)]
    pub connect: Option<String>,
    #[serde(default)]
    pub idle: Option<String>,
}
