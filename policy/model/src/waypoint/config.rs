//! What a waypoint runs: the L7 configuration compiled for one waypoint from the resources
//! (`HTTPRoute`, `AuthorizationPolicy`, `TrafficPolicy`, Services and their endpoints). Plain
//! data: the control plane computes it, the waypoint binary executes it (`palisade-waypoint`).
//! Everything here is already validated and resolved (names to addresses, named ports to
//! numbers, regular expressions known to compile).
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One waypoint's configuration.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct WaypointConfig {
    /// `namespace/name` of the waypoint (its `Gateway`).
    pub name: String,
    /// Every Service this waypoint serves, by VIP and port (the address the client dialled).
    pub services: Vec<ServiceL7>,
}

/// One Service port as the waypoint serves it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServiceL7 {
    /// `namespace/name`.
    pub service: String,
    /// The VIP and port clients dial.
    pub vip: SocketAddr,
    /// The Service's host names (`name.namespace.svc.cluster.local`, `name.namespace`, `name`).
    pub hosts: Vec<String>,
    /// Routes in precedence order (Gateway API's: exact before prefix, longer before shorter,
    /// more header matches first, then creation order). No match: 404.
    pub routes: Vec<Route>,
    /// When no route is attached, everything goes to the Service's own endpoints.
    pub default_backend: Backend,
    /// Authorization in force for this Service (DENY before ALLOW; AUDIT only logs).
    pub authorization: Vec<AuthzPolicy>,
    pub traffic: TrafficPolicy,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Route {
    /// `namespace/name` of the HTTPRoute and the rule index, for logs and metrics:
    /// `ns/name#rule`.
    pub name: String,
    /// Any of these matches (Gateway API: matches of one rule are ORed).
    pub matches: Vec<RouteMatch>,
    pub backends: Vec<WeightedBackend>,
    pub filters: Vec<Filter>,
    /// Whole request, from the first byte received to the last byte of the response.
    pub request_timeout: Option<Duration>,
    /// One attempt to one backend.
    pub backend_timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    /// All must match.
    pub headers: Vec<ValueMatch>,
    pub query: Vec<ValueMatch>,
    /// Upper case, e.g. `GET`.
    pub method: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum PathMatch {
    Exact(String),
    /// Gateway API semantics: `/foo` matches `/foo` and `/foo/bar`, not `/foobar`.
    Prefix(String),
    /// A regular expression that must match the whole path.
    Regex(String),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ValueMatch {
    /// Header names are lower case; query parameter names are as written.
    pub name: String,
    pub value: StringMatch,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum StringMatch {
    Exact(String),
    /// Whole-value regular expression.
    Regex(String),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WeightedBackend {
    pub backend: Backend,
    /// Gateway API weight (0 = receives nothing).
    pub weight: u32,
}

/// A Service port's endpoints, resolved.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Backend {
    /// `namespace/name:port` of the Service, for logs and metrics.
    pub name: String,
    pub endpoints: Vec<BackendEndpoint>,
    /// The backend's load balancing, limits and outlier detection (its own TrafficPolicy).
    pub traffic: TrafficPolicy,
    /// The HTTP version the Service port declares for its endpoints.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
}

/// Which HTTP version a waypoint speaks to a Service's endpoints, from the Service port's
/// declared protocol as Istio reads it: `appProtocol`, else the port name's prefix.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// Nothing declared (or a non-HTTP protocol): the client's version, and HTTP/1.1 to an
    /// endpoint that answers the HTTP/2 preface as an HTTP/1.1 server.
    #[default]
    Auto,
    /// `http`, `grpc-web`, `kubernetes.io/ws`, `kubernetes.io/wss`.
    Http1,
    /// `http2`, `grpc`, `kubernetes.io/h2c`.
    Http2,
}

impl UpstreamProtocol {
    /// Kubernetes' `appProtocol` wins; without it, Istio's port naming (`<protocol>[-<suffix>]`,
    /// case-insensitive). Unknown or non-HTTP protocols are [`UpstreamProtocol::Auto`].
    pub fn declared(app_protocol: Option<&str>, port_name: Option<&str>) -> Self {
        let by_name = |p: &str| match p {
            "http" | "grpc-web" | "kubernetes.io/ws" | "kubernetes.io/wss" => Some(UpstreamProtocol::Http1),
            "http2" | "grpc" | "kubernetes.io/h2c" => Some(UpstreamProtocol::Http2),
            _ => None,
        };
        if let Some(app) = app_protocol.map(str::to_ascii_lowercase) {
            return by_name(&app).unwrap_or_default();
        }
        let Some(name) = port_name.map(str::to_ascii_lowercase) else { return UpstreamProtocol::Auto };
        // `grpc-web` contains the separator, so it is matched before the prefix is cut.
        if name == "grpc-web" || name.starts_with("grpc-web-") {
            return UpstreamProtocol::Http1;
        }
        let prefix = name.split('-').next().unwrap_or_default();
        match prefix {
            "http" | "http2" | "grpc" => by_name(prefix).unwrap_or_default(),
            _ => UpstreamProtocol::Auto,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendEndpoint {
    /// `namespace/name` of the workload.
    pub workload: String,
    /// Address and target port.
    pub address: SocketAddr,
    /// SPIFFE ID the endpoint must prove (the upstream tunnel checks it).
    pub identity: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
    /// A copy of each request goes to this backend; its answer is dropped.
    Mirror(Backend),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HeaderModifier {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathRewrite>,
    /// 301 or 302 (Gateway API allows these two).
    pub status: u16,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathRewrite>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum PathRewrite {
    Full(String),
    /// Replaces the matched `PathPrefix`.
    Prefix(String),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Status codes that are retried (connect failures and resets always are).
    pub codes: Vec<u16>,
    pub backoff: Duration,
    /// Also retry methods that are not idempotent.
    pub non_idempotent: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuthzPolicy {
    /// `namespace/name` of the AuthorizationPolicy.
    pub name: String,
    pub action: AuthzAction,
    /// Any rule matches (empty: ALLOW matches nothing, DENY matches nothing; an empty rule
    /// `{}` matches everything).
    pub rules: Vec<AuthzRule>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum AuthzAction {
    Allow,
    Deny,
    Audit,
}

/// Istio's rule: every present part must match (from AND to AND when); within a part, any
/// listed value.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AuthzRule {
    pub from: Vec<AuthzSource>,
    pub to: Vec<AuthzOperation>,
    pub when: Vec<AuthzCondition>,
}

/// Values with Istio's wildcard forms: `*`, `prefix*`, `*suffix`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AuthzSource {
    /// SPIFFE IDs without `spiffe://` (`td/ns/x/sa/y`), as Istio writes principals.
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub ip_blocks: Vec<crate::cidr::Cidr>,
    pub not_ip_blocks: Vec<crate::cidr::Cidr>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AuthzOperation {
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AuthzCondition {
    /// `request.headers[name]` (name lower case) or `source.ip`, `source.namespace`,
    /// `source.principal`, `destination.port`.
    pub key: String,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrafficPolicy {
    /// `namespace/name` of the TrafficPolicy, if one applies.
    pub name: Option<String>,
    pub load_balancer: LoadBalancer,
    pub limits: ConnectionLimits,
    pub outlier: Option<OutlierDetection>,
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    /// Power of two choices on active requests.
    LeastRequest,
    RingHash(HashKey),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum HashKey {
    /// Lower-case header name.
    Header(String),
    SourceIp,
}

/// Circuit-breaker limits (None: unlimited). Over a limit the waypoint answers 503 at once
/// with `x-palisade-overflow: <limit name>`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ConnectionLimits {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_active_requests: Option<u32>,
    pub max_active_retries: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OutlierDetection {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    /// 0..=100.
    pub max_ejection_percent: u32,
}

/// Labels that say which waypoint serves a Service or a Namespace (Istio's names, so
/// manifests written for Istio ambient read the same here).
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// The label on a waypoint's own workloads naming their `Gateway` (Gateway API's).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The `gatewayClassName` of a waypoint `Gateway`.
pub const WAYPOINT_GATEWAY_CLASS: &str = "palisade-waypoint";

/// Keyed by `namespace/name` of the waypoint.
pub type WaypointConfigs = BTreeMap<String, WaypointConfig>;

/// The label on a waypoint `Gateway` saying which traffic it serves (Istio's).
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";

/// What a waypoint serves ([`WAYPOINT_FOR_LABEL`]; Istio's values and default).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum WaypointFor {
    /// Traffic to the VIPs of the Services that use it.
    #[default]
    Service,
    /// Traffic to the addresses of the Workloads that use it.
    Workload,
    All,
    None,
}

impl WaypointFor {
    /// The label's value; an absent label is [`WaypointFor::Service`], an unknown one `None`.
    pub fn parse(value: Option<&str>) -> Option<Self> {
        Some(match value {
            None | Some("service") => Self::Service,
            Some("workload") => Self::Workload,
            Some("all") => Self::All,
            Some("none") => Self::None,
            Some(_) => return None,
        })
    }

    pub fn services(self) -> bool {
        matches!(self, Self::Service | Self::All)
    }

    pub fn workloads(self) -> bool {
        matches!(self, Self::Workload | Self::All)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Workload => "workload",
            Self::All => "all",
            Self::None => "none",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::UpstreamProtocol::{self, Auto, Http1, Http2};

    #[test]
    fn declared_protocol_reads_app_protocol_then_port_name() {
        let d = UpstreamProtocol::declared;
        assert_eq!(d(Some("http"), Some("grpc")), Http1, "appProtocol wins over the name");
        assert_eq!(d(Some("kubernetes.io/h2c"), None), Http2);
        assert_eq!(d(Some("GRPC"), None), Http2);
        assert_eq!(d(Some("kubernetes.io/ws"), None), Http1);
        assert_eq!(d(Some("tcp"), Some("http")), Auto);
        assert_eq!(d(None, Some("http2-api")), Http2);
        assert_eq!(d(None, Some("grpc")), Http2);
        assert_eq!(d(None, Some("grpc-web-x")), Http1);
        assert_eq!(d(None, Some("http-metrics")), Http1);
        assert_eq!(d(None, Some("httpx")), Auto);
        assert_eq!(d(None, Some("web")), Auto);
        assert_eq!(d(None, None), Auto);
    }
}
