//! Workload traffic through a waypoint: a connection made to the address of a Workload that a
//! waypoint serves for workload traffic (`istio.io/waypoint-for: workload` or `all`) goes to
//! that waypoint like Service traffic does, with the Workload's address and port as the
//! destination. The waypoint serves it as a Service of one endpoint, the Workload itself, on
//! every TCP port the Workload is known to listen on (its declared container ports and the
//! target ports of the Services that select it): a port nobody declared is refused by the
//! waypoint, never carried around it. Only AuthorizationPolicies targeting the waypoint
//! `Gateway` apply there; routes and policies attached to a Service are about that Service's
//! VIP traffic.
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use super::attach::{Attachments, workload_labelled};
use super::config::{
    AuthzPolicy, Backend, BackendEndpoint, ServiceL7, USE_WAYPOINT_LABEL, WAYPOINT_FOR_LABEL, WAYPOINT_GATEWAY_CLASS,
    WaypointFor,
};
use crate::compile::canonical;
use crate::compile::services::{is_tcp, selected, target_port};
use crate::load::Located;
use crate::resource::{Metadata, Protocol, Resource, WorkloadSpec};

/// One Workload served for workload traffic.
pub(super) struct Served<'a> {
    /// `namespace/name` of the waypoint.
    pub waypoint: String,
    pub meta: &'a Metadata,
    pub spec: &'a WorkloadSpec,
}

/// Every Workload a waypoint serves for workload traffic, in the batch's order. Without a
/// waypoint that serves workloads nothing is read.
pub(super) fn served<'a>(resources: &'a [Located], att: &Attachments<'a>) -> Vec<Served<'a>> {
    if !att.waypoints.values().any(|w| w.waypoint_for.is_some_and(WaypointFor::workloads)) {
        return Vec::new();
    }
    resources
        .iter()
        .filter_map(|r| match &r.resource {
            Resource::Workload { metadata, spec, .. } => {
                let waypoint = att.workload_waypoint(metadata, spec).ok()?.to_string();
                Some(Served { waypoint, meta: metadata, spec })
            }
            _ => None,
        })
        .collect()
}

/// The TCP ports of each Workload (by `namespace/name`) that Services reach: the target ports
/// of every Service selecting it.
pub(super) fn service_ports(resources: &[Located]) -> HashMap<String, BTreeSet<u16>> {
    let mut out: HashMap<String, BTreeSet<u16>> = HashMap::new();
    for r in resources {
        let Resource::Service { metadata, spec, .. } = &r.resource else { continue };
        let ns = metadata.namespace.as_deref().unwrap_or_default();
        for (m, w) in selected(ns, spec, resources) {
            let ports = spec.ports.iter().flatten().filter(|p| is_tcp(p)).filter_map(|p| target_port(p, w));
            out.entry(format!("{ns}/{}", m.name)).or_default().extend(ports);
        }
    }
    out
}

/// The ports the waypoint serves a Workload on: its declared TCP container ports and what
/// Services reach ([`service_ports`]).
pub(super) fn ports(served: &Served<'_>, service_ports: &HashMap<String, BTreeSet<u16>>) -> BTreeSet<u16> {
    let key = format!("{}/{}", served.meta.namespace.as_deref().unwrap_or_default(), served.meta.name);
    let declared = served.spec.ports.iter().filter(|p| p.protocol == Protocol::Tcp).map(|p| p.container_port);
    declared.chain(service_ports.get(&key).into_iter().flatten().copied()).collect()
}

/// The name a Workload's entries carry in the waypoint's logs and metrics (where a Service's
/// carry `namespace/name`).
pub fn entry_name(namespace: &str, name: &str) -> String {
    format!("workload:{namespace}/{name}")
}

/// The waypoint's entries for one served Workload: one per address and port, each with the
/// Workload as its only endpoint.
pub(super) fn entries(
    served: &Served<'_>,
    ports: &BTreeSet<u16>,
    identity: &str,
    authorization: &[AuthzPolicy],
) -> Vec<ServiceL7> {
    let ns = served.meta.namespace.as_deref().unwrap_or_default();
    let name = entry_name(ns, &served.meta.name);
    let addresses: BTreeSet<IpAddr> = served.spec.addresses.iter().map(|a| canonical(*a)).collect();
    let mut out = Vec::new();
    for address in addresses {
        for port in ports {
            let at = SocketAddr::new(address, *port);
            let endpoint = BackendEndpoint {
                workload: format!("{ns}/{}", served.meta.name),
                address: at,
                identity: identity.to_string(),
            };
            out.push(ServiceL7 {
                service: name.clone(),
                vip: at,
                hosts: Vec::new(),
                routes: Vec::new(),
                default_backend: Backend {
                    name: format!("{name}:{port}"),
                    endpoints: vec![endpoint],
                    traffic: Default::default(),
                    protocol: Default::default(),
                },
                authorization: authorization.to_vec(),
                traffic: Default::default(),
            });
        }
    }
    out
}

/// Findings about a Workload's use of a waypoint: (error, field, message).
pub(super) fn check(
    att: &Attachments<'_>,
    meta: &Metadata,
    spec: &WorkloadSpec,
    service_ports: &HashMap<String, BTreeSet<u16>>,
) -> Vec<(bool, &'static str, String)> {
    let mut out = Vec::new();
    let ns = meta.namespace.as_deref().unwrap_or_default();
    if workload_labelled(meta, spec) {
        let labels = if meta.labels.contains_key(USE_WAYPOINT_LABEL) { &meta.labels } else { &spec.labels };
        let field = if labels == &meta.labels { "metadata.labels" } else { "spec.labels" };
        if att.is_waypoint_workload(meta) {
            out.push((
                false,
                field,
                format!("{USE_WAYPOINT_LABEL} is ignored: a waypoint's own workload never uses a waypoint"),
            ));
        } else if let Some(key) = att.dangling(labels, ns) {
            out.push((
                false,
                field,
                format!("{USE_WAYPOINT_LABEL} names {key}, which is not a Gateway of class {WAYPOINT_GATEWAY_CLASS} (yet): no waypoint serves this Workload"),
            ));
        } else if let Some((key, info)) = att.workload_label_target(meta, spec)
            && !info.waypoint_for.is_some_and(WaypointFor::workloads)
        {
            let value = info.waypoint_for.map_or("an unknown value", WaypointFor::as_str);
            out.push((
                false,
                field,
                format!(
                    "{USE_WAYPOINT_LABEL} names {key}, which is `{WAYPOINT_FOR_LABEL}: {value}`: it has no effect for workload traffic (label the Gateway `{WAYPOINT_FOR_LABEL}: workload` or `all`)"
                ),
            ));
        }
    }
    if let Ok(waypoint) = att.workload_waypoint(meta, spec) {
        let served = Served { waypoint: waypoint.to_string(), meta, spec };
        if ports(&served, service_ports).is_empty() {
            out.push((
                false,
                "spec.ports",
                format!(
                    "served by waypoint {waypoint} for workload traffic, but it declares no TCP port and no Service selects it: the waypoint refuses every connection to its address"
                ),
            ));
        }
    }
    out
}
