//! Compiling the waypoint's resources: for each waypoint, every Service port it serves with its
//! routes (in Gateway API precedence), backends resolved to endpoints and their identities,
//! authorization and traffic policies, and every Workload address it serves for workload
//! traffic ([`super::workload`]) ([`compile_waypoints`]); and for ztunnel, which waypoint
//! serves which VIP, Workload address and endpoint ([`waypoint_index`]). Input is a validated batch: what
//! validation refuses is skipped here, never guessed.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::ServiceSpec;
use serde::{Deserialize, Serialize};

use super::attach::{Attachments, attachments};
use super::config::*;
use super::gateway::{
    BackendRef, GATEWAY_GROUP, HttpPathModifier, HttpRouteFilter, HttpRouteMatch, HttpRouteRule, HttpRouteSpec,
    HttpValueMatch, PathMatchType, PathModifierType, ValueMatchType,
};
use super::istio::{AuthorizationPolicySpec, IstioAction, condition_key, port_number};
use super::parse_duration;
use super::traffic::TrafficPolicySpec;
use crate::compile::canonical;
use crate::compile::services::{ClusterIp, cluster_ip, is_tcp, selected, target_port};
use crate::load::Located;
use crate::resource::{Metadata, Resource};

/// The DNS domain of Service host names (Kubernetes' default cluster domain).
const CLUSTER_DOMAIN: &str = "cluster.local";

/// What a ztunnel needs to know of one waypoint: where it runs and who it is.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WaypointRef {
    /// `namespace/name` of its Gateway.
    pub name: String,
    pub workloads: Vec<WaypointWorkload>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WaypointWorkload {
    /// `namespace/name` of the workload.
    pub workload: String,
    pub addresses: Vec<IpAddr>,
    /// The SPIFFE ID it proves.
    pub identity: String,
}

/// Which waypoint serves what, for ztunnel: a source's ztunnel sends a connection to a VIP to
/// [`WaypointIndex::for_vip`], and one to a Workload's address to
/// [`WaypointIndex::for_workload`]; a destination's ztunnel accepts a tunnel for one of its
/// endpoints from a waypoint serving it ([`WaypointIndex::accepts_from`]), and for a Workload
/// served for workload traffic from nothing else.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WaypointIndex {
    /// By `namespace/name`.
    pub waypoints: BTreeMap<String, WaypointRef>,
    /// Service VIP → the waypoint serving it.
    pub vips: BTreeMap<IpAddr, String>,
    /// Endpoint address → the waypoints serving a Service it is an endpoint of (or the
    /// Workload itself).
    pub endpoints: BTreeMap<IpAddr, BTreeSet<String>>,
    /// Workload address → the waypoint serving it for workload traffic (`istio.io/waypoint-for:
    /// workload` or `all`): traffic to it goes through that waypoint, and its ztunnel accepts
    /// tunnels only from a waypoint.
    #[serde(default)]
    pub workloads: BTreeMap<IpAddr, String>,
}

impl WaypointIndex {
    pub fn for_vip(&self, vip: IpAddr) -> Option<&WaypointRef> {
        self.waypoints.get(self.vips.get(&canonical(vip))?)
    }

    /// The waypoint serving the Workload at `addr` for workload traffic.
    pub fn for_workload(&self, addr: IpAddr) -> Option<&WaypointRef> {
        self.waypoints.get(self.workloads.get(&canonical(addr))?)
    }

    /// The waypoints that may send to endpoint `addr` on behalf of others.
    pub fn serving_endpoint(&self, addr: IpAddr) -> impl Iterator<Item = &WaypointRef> {
        self.endpoints.get(&canonical(addr)).into_iter().flatten().filter_map(|w| self.waypoints.get(w))
    }

    /// Whether a tunnel from `src` proving `identity` to endpoint `dst` comes from a waypoint
    /// serving `dst`: the identity and the address must be one workload's of that waypoint.
    pub fn accepts_from(&self, dst: IpAddr, src: IpAddr, identity: &str) -> bool {
        let src = canonical(src);
        self.serving_endpoint(dst)
            .flat_map(|w| &w.workloads)
            .any(|w| w.identity == identity && w.addresses.iter().any(|a| canonical(*a) == src))
    }
}

pub(super) fn spiffe(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// The ztunnel's view: waypoints, the VIPs they serve, and the endpoints behind those VIPs.
pub fn waypoint_index(resources: &[Located], trust_domain: &str) -> WaypointIndex {
    let att = attachments(resources);
    let mut index = WaypointIndex::default();
    for (key, w) in &att.waypoints {
        let mut workloads: Vec<WaypointWorkload> = w
            .workloads
            .iter()
            .map(|(m, spec)| WaypointWorkload {
                workload: format!("{}/{}", w.namespace, m.name),
                addresses: spec.addresses.iter().map(|a| canonical(*a)).collect(),
                identity: spiffe(trust_domain, w.namespace, &spec.service_account),
            })
            .collect();
        workloads.sort_by(|a, b| a.workload.cmp(&b.workload));
        index.waypoints.insert(key.clone(), WaypointRef { name: key.clone(), workloads });
    }
    let services = services(resources);
    for (meta, spec, vip) in &services {
        let ns = meta.namespace.as_deref().unwrap_or_default();
        let Ok(waypoint) = att.waypoint_of(ns, &meta.name) else { continue };
        index.vips.insert(*vip, waypoint.to_string());
        for (_, w) in selected(ns, spec, resources) {
            for a in &w.addresses {
                index.endpoints.entry(canonical(*a)).or_default().insert(waypoint.to_string());
            }
        }
    }
    for served in super::workload::served(resources, &att) {
        for a in &served.spec.addresses {
            index.workloads.insert(canonical(*a), served.waypoint.clone());
            index.endpoints.entry(canonical(*a)).or_default().insert(served.waypoint.clone());
        }
    }
    route_backends(resources, &att, &services, &mut index);
    index
}

/// The backends (and mirrors) of routes on a served Service receive the waypoint's tunnels
/// too, though they may select workloads the Service itself does not (validation keeps them
/// Services of the route's namespace).
fn route_backends(
    resources: &[Located],
    att: &Attachments<'_>,
    services: &[(&Metadata, &ServiceSpec, IpAddr)],
    index: &mut WaypointIndex,
) {
    for r in resources {
        let Resource::HttpRoute { metadata, spec, .. } = &r.resource else { continue };
        let ns = metadata.namespace.as_deref().unwrap_or_default();
        let waypoints: BTreeSet<String> = spec
            .parent_refs
            .iter()
            .filter(|p| {
                p.kind() == "Service"
                    && matches!(p.group(), "" | "core")
                    && p.namespace.as_deref().is_none_or(|n| n == ns)
            })
            .filter_map(|p| att.waypoint_of(ns, &p.name).ok().map(str::to_string))
            .collect();
        if waypoints.is_empty() {
            continue;
        }
        let mirrors = |rule: &HttpRouteRule| -> Vec<String> {
            rule.filters.iter().filter_map(|f| f.request_mirror.as_ref().map(|m| m.backend_ref.name.clone())).collect()
        };
        let names: BTreeSet<String> = spec
            .rules
            .iter()
            .flat_map(|rule| rule.backend_refs.iter().map(|b| b.name.clone()).chain(mirrors(rule)))
            .collect();
        for (_, svc, _) in
            services.iter().filter(|(m, _, _)| m.namespace.as_deref() == Some(ns) && names.contains(&m.name))
        {
            for (_, w) in selected(ns, svc, resources) {
                for a in &w.addresses {
                    index.endpoints.entry(canonical(*a)).or_default().extend(waypoints.iter().cloned());
                }
            }
        }
    }
}

/// Services with a virtual address, in `namespace/name` order.
fn services(resources: &[Located]) -> Vec<(&Metadata, &ServiceSpec, IpAddr)> {
    let mut out: Vec<_> = resources
        .iter()
        .filter_map(|r| match &r.resource {
            Resource::Service { metadata, spec, .. } => match cluster_ip(spec) {
                ClusterIp::Vip(vip) => Some((metadata, &**spec, vip)),
                _ => None,
            },
            _ => None,
        })
        .collect();
    out.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
    out
}

/// The batch, indexed for compilation.
struct Ctx<'a> {
    resources: &'a [Located],
    trust_domain: &'a str,
    att: Attachments<'a>,
    services: HashMap<String, (&'a Metadata, &'a ServiceSpec, IpAddr)>,
    traffic: HashMap<String, TrafficPolicy>,
}

/// Every waypoint's configuration, keyed by `namespace/name` (a waypoint serving nothing has
/// an empty one).
pub fn compile_waypoints(resources: &[Located], trust_domain: &str) -> WaypointConfigs {
    let mut ctx = Ctx {
        resources,
        trust_domain,
        att: attachments(resources),
        services: services(resources)
            .into_iter()
            .map(|s| (format!("{}/{}", s.0.namespace.as_deref().unwrap_or_default(), s.0.name), s))
            .collect(),
        traffic: HashMap::new(),
    };
    for r in resources {
        if let Resource::TrafficPolicy { metadata, spec, .. } = &r.resource {
            let ns = metadata.namespace.as_deref().unwrap_or_default();
            ctx.traffic.insert(format!("{ns}/{}", spec.target_ref.name), traffic_policy(ns, &metadata.name, spec));
        }
    }
    let mut out: WaypointConfigs = ctx
        .att
        .waypoints
        .keys()
        .map(|k| (k.clone(), WaypointConfig { name: k.clone(), services: Vec::new() }))
        .collect();
    for (meta, spec, vip) in services(resources) {
        let ns = meta.namespace.as_deref().unwrap_or_default();
        let Ok(waypoint) = ctx.att.waypoint_of(ns, &meta.name) else { continue };
        let Some(config) = out.get_mut(waypoint) else { continue };
        for port in spec.ports.iter().flatten().filter(|p| is_tcp(p)) {
            let Ok(number) = u16::try_from(port.port) else { continue };
            config.services.push(ctx.service_l7(waypoint, meta, vip, number, port.name.as_deref()));
        }
    }
    let served = super::workload::served(resources, &ctx.att);
    if !served.is_empty() {
        let service_ports = super::workload::service_ports(resources);
        for s in &served {
            let Some(config) = out.get_mut(&s.waypoint) else { continue };
            let ns = s.meta.namespace.as_deref().unwrap_or_default();
            let identity = spiffe(trust_domain, ns, &s.spec.service_account);
            let authorization = ctx.authorization(&s.waypoint, ns, None);
            let ports = super::workload::ports(s, &service_ports);
            config.services.extend(super::workload::entries(s, &ports, &identity, &authorization));
        }
    }
    out
}

impl Ctx<'_> {
    fn service_l7(
        &self,
        waypoint: &str,
        meta: &Metadata,
        vip: IpAddr,
        port: u16,
        port_name: Option<&str>,
    ) -> ServiceL7 {
        let ns = meta.namespace.as_deref().unwrap_or_default();
        let name = &meta.name;
        let key = format!("{ns}/{name}");
        ServiceL7 {
            service: key.clone(),
            vip: SocketAddr::new(vip, port),
            hosts: vec![format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"), format!("{name}.{ns}"), name.clone()],
            routes: self.routes(ns, name, port, port_name),
            default_backend: self.backend(ns, name, port),
            authorization: self.authorization(waypoint, ns, Some(name)),
            traffic: self.traffic.get(&key).cloned().unwrap_or_default(),
        }
    }

    /// A Service port's endpoints, resolved with the model's own Service computation.
    fn backend(&self, ns: &str, name: &str, port: u16) -> Backend {
        let key = format!("{ns}/{name}");
        let mut endpoints = Vec::new();
        let service_port = self.services.get(&key).and_then(|(_, spec, vip)| {
            let p = spec.ports.iter().flatten().find(|p| p.port == i32::from(port) && is_tcp(p))?;
            Some((spec, p, vip))
        });
        let protocol = service_port
            .map(|(_, p, _)| UpstreamProtocol::declared(p.app_protocol.as_deref(), p.name.as_deref()))
            .unwrap_or_default();
        if let Some((spec, p, vip)) = service_port {
            for (m, w) in selected(ns, spec, self.resources) {
                let Some(target) = target_port(p, w) else { continue };
                let Some(address) = w.addresses.iter().map(|a| canonical(*a)).find(|a| a.is_ipv4() == vip.is_ipv4())
                else {
                    continue;
                };
                endpoints.push(BackendEndpoint {
                    workload: format!("{ns}/{}", m.name),
                    address: SocketAddr::new(address, target),
                    identity: spiffe(self.trust_domain, ns, &w.service_account),
                });
            }
        }
        endpoints.sort();
        Backend {
            name: format!("{key}:{port}"),
            endpoints,
            traffic: self.traffic.get(&key).cloned().unwrap_or_default(),
            protocol,
        }
    }

    fn backend_ref(&self, ns: &str, b: &BackendRef) -> Option<Backend> {
        (b.is_service() && b.namespace.as_deref().is_none_or(|n| n == ns)).then_some(())?;
        Some(self.backend(ns, &b.name, b.port?))
    }

    /// The routes of every HTTPRoute attached to this Service port, one per match, in
    /// precedence order.
    fn routes(&self, ns: &str, service: &str, port: u16, port_name: Option<&str>) -> Vec<Route> {
        let mut keyed = Vec::new();
        for r in self.resources {
            let Resource::HttpRoute { metadata, spec, .. } = &r.resource else { continue };
            if metadata.namespace.as_deref() != Some(ns) || !attached(spec, ns, service, port, port_name) {
                continue;
            }
            let route_name = format!("{ns}/{}", metadata.name);
            for (i, rule) in spec.rules.iter().enumerate() {
                let Some(base) = self.rule(ns, &format!("{route_name}#{i}"), rule) else { continue };
                let default = [HttpRouteMatch::default()];
                let matches = if rule.matches.is_empty() { &default[..] } else { &rule.matches[..] };
                for (m, mat) in matches.iter().enumerate() {
                    let compiled = route_match(mat);
                    let key = (precedence(&compiled), route_name.clone(), i, m);
                    keyed.push((key, Route { matches: vec![compiled], ..base.clone() }));
                }
            }
        }
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        keyed.into_iter().map(|(_, r)| r).collect()
    }

    /// A rule without its matches; None when validation would have refused it.
    fn rule(&self, ns: &str, name: &str, rule: &HttpRouteRule) -> Option<Route> {
        let backends = rule
            .backend_refs
            .iter()
            .map(|b| {
                Some(WeightedBackend { backend: self.backend_ref(ns, &b.as_ref())?, weight: b.weight.unwrap_or(1) })
            })
            .collect::<Option<Vec<_>>>()?;
        let filters = rule.filters.iter().map(|f| self.filter(ns, f)).collect::<Option<Vec<_>>>()?;
        let timeout = |t: Option<&String>| t.and_then(|t| parse_duration(t)).filter(|d| !d.is_zero());
        let timeouts = rule.timeouts.as_ref();
        Some(Route {
            name: name.to_string(),
            matches: Vec::new(),
            backends,
            filters,
            request_timeout: timeout(timeouts.and_then(|t| t.request.as_ref())),
            backend_timeout: timeout(timeouts.and_then(|t| t.backend_request.as_ref())),
            retry: rule.retry.as_ref().map(|r| RetryPolicy {
                attempts: r.attempts.unwrap_or(2),
                codes: r.codes.clone(),
                backoff: r.backoff.as_deref().and_then(parse_duration).unwrap_or(Duration::from_millis(25)),
                non_idempotent: false,
            }),
        })
    }

    fn filter(&self, ns: &str, f: &HttpRouteFilter) -> Option<Filter> {
        let headers = |m: &super::gateway::HttpHeaderFilter| HeaderModifier {
            set: m.set.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.clone())).collect(),
            add: m.add.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.clone())).collect(),
            remove: m.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
        };
        Some(if let Some(m) = &f.request_header_modifier {
            Filter::RequestHeaders(headers(m))
        } else if let Some(m) = &f.response_header_modifier {
            Filter::ResponseHeaders(headers(m))
        } else if let Some(r) = &f.request_redirect {
            Filter::Redirect(Redirect {
                scheme: r.scheme.clone(),
                hostname: r.hostname.clone(),
                port: r.port,
                path: r.path.as_ref().and_then(path_rewrite),
                status: r.status_code.unwrap_or(302),
            })
        } else if let Some(r) = &f.url_rewrite {
            Filter::Rewrite(Rewrite { hostname: r.hostname.clone(), path: r.path.as_ref().and_then(path_rewrite) })
        } else {
            Filter::Mirror(self.backend_ref(ns, &f.request_mirror.as_ref()?.backend_ref)?)
        })
    }

    /// Policies targeting this Service, or the waypoint itself (all it serves), by name; for a
    /// Workload's entry (`service` None) only the waypoint's.
    fn authorization(&self, waypoint: &str, ns: &str, service: Option<&str>) -> Vec<AuthzPolicy> {
        let mut out = Vec::new();
        for r in self.resources {
            let Resource::AuthorizationPolicy { metadata, spec, .. } = &r.resource else { continue };
            let pns = metadata.namespace.as_deref().unwrap_or_default();
            let applies = spec.targets().iter().any(|(_, t)| {
                let group = t.group.as_deref().unwrap_or("");
                match (t.kind.as_str(), group) {
                    ("Service", "" | "core") => pns == ns && Some(t.name.as_str()) == service,
                    ("Gateway", GATEWAY_GROUP) => format!("{pns}/{}", t.name) == waypoint,
                    _ => false,
                }
            });
            if applies && let Some(p) = authz_policy(&format!("{pns}/{}", metadata.name), spec) {
                out.push(p);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// Whether `spec` attaches to Service `ns/service` on `port`.
fn attached(spec: &HttpRouteSpec, ns: &str, service: &str, port: u16, port_name: Option<&str>) -> bool {
    spec.parent_refs.iter().any(|p| {
        p.kind() == "Service"
            && matches!(p.group(), "" | "core")
            && p.namespace.as_deref().is_none_or(|n| n == ns)
            && p.name == service
            && p.port.is_none_or(|n| n == port)
            && p.section_name.as_deref().is_none_or(|s| Some(s) == port_name)
    })
}

fn value_match(m: &HttpValueMatch, lower: bool) -> ValueMatch {
    let name = if lower { m.name.to_ascii_lowercase() } else { m.name.clone() };
    let value = match m.kind {
        ValueMatchType::Exact => StringMatch::Exact(m.value.clone()),
        ValueMatchType::RegularExpression => StringMatch::Regex(m.value.clone()),
    };
    ValueMatch { name, value }
}

/// One match, with Gateway API's default path (`PathPrefix /`) made explicit.
fn route_match(m: &HttpRouteMatch) -> RouteMatch {
    let path = m.path.as_ref().map_or(PathMatch::Prefix("/".into()), |p| match p.kind {
        PathMatchType::Exact => PathMatch::Exact(p.value.clone()),
        PathMatchType::PathPrefix => PathMatch::Prefix(p.value.clone()),
        PathMatchType::RegularExpression => PathMatch::Regex(p.value.clone()),
    });
    RouteMatch {
        path: Some(path),
        headers: m.headers.iter().map(|h| value_match(h, true)).collect(),
        query: m.query_params.iter().map(|q| value_match(q, false)).collect(),
        method: m.method.map(|m| m.as_str().to_string()),
    }
}

/// Gateway API's precedence, smallest first: an exact path, then a regular expression (its
/// place is left to implementations; Envoy Gateway's), then a prefix, longer before shorter;
/// then a method match; then more header matches; then more query matches. Ties go by route
/// `namespace/name` (Gateway API's tie after creation time, which files do not carry), then
/// rule and match order.
fn precedence(
    m: &RouteMatch,
) -> (u8, std::cmp::Reverse<usize>, bool, std::cmp::Reverse<usize>, std::cmp::Reverse<usize>) {
    use std::cmp::Reverse;
    let (rank, len) = match &m.path {
        Some(PathMatch::Exact(p)) => (0, p.len()),
        Some(PathMatch::Regex(p)) => (1, p.len()),
        Some(PathMatch::Prefix(p)) => (2, p.trim_end_matches('/').len()),
        None => (2, 0),
    };
    (rank, Reverse(len), m.method.is_none(), Reverse(m.headers.len()), Reverse(m.query.len()))
}

fn path_rewrite(p: &HttpPathModifier) -> Option<PathRewrite> {
    match p.kind {
        PathModifierType::ReplaceFullPath => p.replace_full_path.clone().map(PathRewrite::Full),
        PathModifierType::ReplacePrefixMatch => p.replace_prefix_match.clone().map(PathRewrite::Prefix),
    }
}

fn authz_policy(name: &str, spec: &AuthorizationPolicySpec) -> Option<AuthzPolicy> {
    let action = match spec.action {
        IstioAction::Allow => AuthzAction::Allow,
        IstioAction::Deny => AuthzAction::Deny,
        IstioAction::Audit => AuthzAction::Audit,
        IstioAction::Custom => return None,
    };
    let principals = |v: &[String]| v.iter().map(|p| p.strip_prefix("spiffe://").unwrap_or(p).to_string()).collect();
    let ports =
        |v: &[k8s_openapi::apimachinery::pkg::util::intstr::IntOrString]| v.iter().filter_map(port_number).collect();
    let rules = spec
        .rules
        .iter()
        .map(|r| AuthzRule {
            from: r
                .from
                .iter()
                .filter_map(|f| f.source.as_ref())
                .map(|s| AuthzSource {
                    principals: principals(&s.principals),
                    not_principals: principals(&s.not_principals),
                    namespaces: s.namespaces.clone(),
                    not_namespaces: s.not_namespaces.clone(),
                    ip_blocks: s.ip_blocks.clone(),
                    not_ip_blocks: s.not_ip_blocks.clone(),
                })
                .collect(),
            to: r
                .to
                .iter()
                .filter_map(|t| t.operation.as_ref())
                .map(|o| AuthzOperation {
                    methods: o.methods.clone(),
                    not_methods: o.not_methods.clone(),
                    paths: o.paths.clone(),
                    not_paths: o.not_paths.clone(),
                    hosts: o.hosts.clone(),
                    not_hosts: o.not_hosts.clone(),
                    ports: ports(&o.ports),
                    not_ports: ports(&o.not_ports),
                })
                .collect(),
            when: r
                .when
                .iter()
                .map(|c| AuthzCondition {
                    key: condition_key(&c.key).unwrap_or_else(|| c.key.clone()),
                    values: c.values.clone(),
                    not_values: c.not_values.clone(),
                })
                .collect(),
        })
        .collect();
    Some(AuthzPolicy { name: name.to_string(), action, rules })
}

fn traffic_policy(ns: &str, name: &str, spec: &TrafficPolicySpec) -> TrafficPolicy {
    let duration = |d: &Option<String>| d.as_deref().and_then(parse_duration).filter(|d| !d.is_zero());
    let load_balancer = match &spec.load_balancer {
        Some(lb) if lb.least_request.is_some() => LoadBalancer::LeastRequest,
        Some(lb) => match &lb.ring_hash {
            Some(rh) => match &rh.header {
                Some(h) if !h.is_empty() => LoadBalancer::RingHash(HashKey::Header(h.to_ascii_lowercase())),
                _ => LoadBalancer::RingHash(HashKey::SourceIp),
            },
            None => LoadBalancer::RoundRobin,
        },
        None => LoadBalancer::RoundRobin,
    };
    let pool = spec.connection_pool.clone().unwrap_or_default();
    let outlier = spec.outlier_detection.as_ref().map(|o| {
        let neither = o.consecutive_5xx.is_none() && o.consecutive_gateway_errors.is_none();
        OutlierDetection {
            consecutive_5xx: if neither { Some(5) } else { o.consecutive_5xx },
            consecutive_gateway_errors: o.consecutive_gateway_errors,
            interval: duration(&o.interval).unwrap_or(Duration::from_secs(10)),
            base_ejection_time: duration(&o.base_ejection_time).unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: o.max_ejection_percent.unwrap_or(10),
        }
    });
    let timeouts = spec.timeouts.clone().unwrap_or_default();
    TrafficPolicy {
        name: Some(format!("{ns}/{name}")),
        load_balancer,
        limits: ConnectionLimits {
            max_connections: pool.max_connections,
            max_pending_requests: pool.max_pending_requests,
            max_requests_per_connection: pool.max_requests_per_connection,
            max_active_requests: pool.max_active_requests,
            max_active_retries: pool.max_active_retries,
        },
        outlier,
        connect_timeout: duration(&timeouts.connect),
        idle_timeout: duration(&timeouts.idle),
    }
}
