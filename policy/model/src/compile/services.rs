//! Kubernetes `v1` `Service`s: a virtual address (`clusterIP`) and ports, each resolved to the
//! endpoints the Service's selector picks among the workloads of its namespace, with the
//! `targetPort` resolved on each workload (a name against its container ports). Nothing listens
//! at a virtual address: ztunnel's outbound proxy resolves a connection to one endpoint it may
//! reach ([`Snapshot::service_choice`]) and carries it there; the policies that apply are the
//! chosen endpoint's (its ingress) and the source's egress towards that endpoint.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use palisade_ebpf_common::{RULE_DEFAULT_ALLOW, RULE_DEFAULT_DENY, RULE_EGRESS_DEFAULT_DENY};

use super::{Cell, CellKey, Decision, Direction, FIRST_SERVICE_IDENTITY, PolicyEntry, Snapshot, Verdict, canonical};
use crate::load::Located;
use crate::resource::{Action, Metadata, Protocol, Resource, WorkloadSpec};

/// One Service in a snapshot.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ServiceEntry {
    /// `namespace/name`.
    pub name: String,
    /// The VIP's identity in the kernel (`IDENTITY_SERVICE`), from [`FIRST_SERVICE_IDENTITY`]
    /// up in name order: it names no workload, only the cells of the VIP's egress.
    pub id: u32,
    pub vip: IpAddr,
    pub ports: Vec<ServicePortEntry>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ServicePortEntry {
    pub name: Option<String>,
    pub port: u16,
    /// Every selected workload on which the target port resolves, at its address of the
    /// VIP's family, in workload order.
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Endpoint {
    /// `namespace/name` of the workload.
    pub workload: String,
    pub address: SocketAddr,
}

/// What the clusterIP of a Service says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterIp {
    Vip(IpAddr),
    /// `None`: a headless Service, which has no virtual address to resolve.
    Headless,
    Missing,
    Invalid(String),
}

pub fn cluster_ip(spec: &ServiceSpec) -> ClusterIp {
    match spec.cluster_ip.as_deref() {
        None | Some("") => ClusterIp::Missing,
        Some("None") => ClusterIp::Headless,
        Some(s) => s.parse().map(|ip| ClusterIp::Vip(canonical(ip))).unwrap_or_else(|_| ClusterIp::Invalid(s.into())),
    }
}

/// The workloads of `namespace` the Service's selector picks (none without a selector: such a
/// Service's endpoints would be written by hand, which Palisade does not read).
pub fn selected<'a>(
    namespace: &str,
    spec: &ServiceSpec,
    resources: &'a [Located],
) -> Vec<(&'a Metadata, &'a WorkloadSpec)> {
    selected_in(namespace, spec, resources)
}

fn selected_in<'a>(
    namespace: &str,
    spec: &ServiceSpec,
    resources: impl IntoIterator<Item = &'a Located>,
) -> Vec<(&'a Metadata, &'a WorkloadSpec)> {
    let Some(selector) = &spec.selector else { return vec![] };
    resources
        .into_iter()
        .filter_map(|r| match &r.resource {
            Resource::Workload { metadata, spec, .. }
                if metadata.namespace.as_deref() == Some(namespace)
                    && selector.iter().all(|(k, v)| spec.labels.get(k) == Some(v)) =>
            {
                Some((metadata, spec))
            }
            _ => None,
        })
        .collect()
}

/// The port a workload serves a Service port on: `targetPort` as a number, as the name of one
/// of its TCP container ports, or (omitted) the Service port itself.
pub fn target_port(port: &ServicePort, workload: &WorkloadSpec) -> Option<u16> {
    match &port.target_port {
        None => u16::try_from(port.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok().filter(|n| *n != 0),
        Some(IntOrString::String(name)) => workload
            .ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()) && p.protocol == Protocol::Tcp)
            .map(|p| p.container_port),
    }
}

/// Whether a port is TCP, the only protocol the mesh carries.
pub fn is_tcp(port: &ServicePort) -> bool {
    port.protocol.as_deref().is_none_or(|p| p == "TCP")
}

/// Every Service with a virtual address, with its endpoints ([`crate::validate`] reports the
/// rest: headless Services, unresolved names, selectors that select nothing).
pub fn compile_services<'a>(resources: impl IntoIterator<Item = &'a Located> + Clone) -> Vec<ServiceEntry> {
    let mut out = Vec::new();
    for r in resources.clone() {
        let Resource::Service { metadata, spec, .. } = &r.resource else { continue };
        let ClusterIp::Vip(vip) = cluster_ip(spec) else { continue };
        let namespace = metadata.namespace.clone().unwrap_or_default();
        let workloads = selected_in(&namespace, spec, resources.clone());
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| is_tcp(p))
            .filter_map(|p| {
                let endpoints = workloads
                    .iter()
                    .filter_map(|(meta, w)| {
                        let port = target_port(p, w)?;
                        let address =
                            w.addresses.iter().map(|a| canonical(*a)).find(|a| a.is_ipv4() == vip.is_ipv4())?;
                        Some(Endpoint {
                            workload: format!("{namespace}/{}", meta.name),
                            address: SocketAddr::new(address, port),
                        })
                    })
                    .collect();
                Some(ServicePortEntry { name: p.name.clone(), port: u16::try_from(p.port).ok()?, endpoints })
            })
            .collect();
        out.push(ServiceEntry { name: format!("{namespace}/{}", metadata.name), id: 0, vip, ports });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    for (i, s) in out.iter_mut().enumerate() {
        s.id = FIRST_SERVICE_IDENTITY + i as u32;
    }
    out
}

/// The VIP's egress cells, for every source identity an egress policy selects (the others
/// are allowed by default) and every Service port: Allow when its egress allows some endpoint
/// (at the endpoint's target port), so that connect() passes and ztunnel picks among the
/// allowed ones; when it allows none, the egress default denies an isolated source, and a Deny
/// cell the rest (a Deny rule on every endpoint). The kernel reads no wildcard cell for a VIP,
/// so these decide alone, and allow whenever the exact evaluation allows some endpoint.
/// Returns the keys it wrote.
pub(super) fn service_cells(snapshot: &mut Snapshot) -> Vec<CellKey> {
    if snapshot.services.is_empty() {
        return vec![];
    }
    let mut cells = Vec::new();
    let egress: Vec<_> = snapshot.policies.iter().filter(|p| p.direction == Direction::Egress).collect();
    for ident in snapshot.identities.values() {
        let selects =
            |p: &&Arc<PolicyEntry>| p.namespace == ident.labels.namespace && p.selector.matches(&ident.labels.labels);
        if !egress.iter().any(selects) {
            continue;
        }
        let Some(&src) = ident.addresses.first() else { continue };
        for svc in snapshot.services.iter() {
            for port in &svc.ports {
                let parts: Vec<(Action, u32)> = port
                    .endpoints
                    .iter()
                    .filter_map(|e| snapshot.authorize(src, None, e.address.ip(), e.address.port()).egress)
                    .collect();
                let key = CellKey { src: ident.id, dst: svc.id, port: port.port, direction: Direction::Egress };
                let allowed = parts.iter().find(|p| p.0 == Action::Allow);
                let denied = parts.iter().find(|p| p.0 == Action::Deny && p.1 != RULE_EGRESS_DEFAULT_DENY);
                match (allowed, denied) {
                    (Some(&(_, rule)), _) if rule != RULE_DEFAULT_ALLOW => {
                        cells.push((key, Cell { action: Action::Allow, rule }))
                    }
                    (None, Some(&(_, rule))) => cells.push((key, Cell { action: Action::Deny, rule })),
                    _ => {}
                }
            }
        }
    }
    let keys = cells.iter().map(|(k, _)| *k).collect();
    snapshot.cells.extend(cells);
    keys
}

impl Snapshot {
    /// The exact evaluation of a connection to a Service VIP (identity `id`): allowed when some
    /// endpoint is (the decision is the first allowed endpoint's, else the first refused
    /// one's); a Service without endpoints refuses. A port the Service does not have is
    /// nobody's: only the source's egress default applies.
    pub(super) fn authorize_service(
        &self,
        src: IpAddr,
        proven: Option<(&str, &str)>,
        vip: IpAddr,
        port: u16,
        id: u32,
    ) -> Decision {
        let src_identity = self.identity_of(src);
        let decided = |action, rule| {
            let verdict = Verdict { action, rule, src_identity, dst_identity: id };
            Decision { verdict, audit_deny: None, egress: Some((action, rule)), ingress: None }
        };
        match self.service_choice(src, proven, SocketAddr::new(vip, port)) {
            Some(choice) => match (choice.allowed.first(), choice.first_denied) {
                (Some(e), _) => self.authorize(src, proven, e.address.ip(), e.address.port()),
                (None, Some((_, d))) => d,
                (None, None) => decided(Action::Deny, RULE_DEFAULT_DENY),
            },
            None if self.identity(src_identity).is_some_and(|i| i.egress_default_deny) => {
                decided(Action::Deny, RULE_EGRESS_DEFAULT_DENY)
            }
            None => decided(Action::Allow, RULE_DEFAULT_ALLOW),
        }
    }
}

/// Index of each (VIP, port) in `services`.
pub(super) fn index(services: &[ServiceEntry]) -> HashMap<SocketAddr, (usize, usize)> {
    let mut out = HashMap::new();
    for (s, svc) in services.iter().enumerate() {
        for (p, port) in svc.ports.iter().enumerate() {
            out.entry(SocketAddr::new(svc.vip, port.port)).or_insert((s, p));
        }
    }
    out
}

/// A connection to a Service, evaluated for each of its endpoints.
#[derive(Clone, Debug)]
pub struct ServiceChoice<'a> {
    pub service: &'a ServiceEntry,
    /// Endpoints the exact evaluation allows this source to reach, in endpoint order.
    pub allowed: Vec<&'a Endpoint>,
    /// The decision for the first endpoint refused (what a refusal names), if any.
    pub first_denied: Option<(&'a Endpoint, Decision)>,
}

impl Snapshot {
    /// The Service whose virtual address and port `dst` is.
    pub fn service_at(&self, dst: SocketAddr) -> Option<(&ServiceEntry, &ServicePortEntry)> {
        let dst = SocketAddr::new(canonical(dst.ip()), dst.port());
        let (s, p) = *self.service_index.get(&dst)?;
        Some((&self.services[s], &self.services[s].ports[p]))
    }

    /// For a connection from `src` (identity `proven`, if a certificate proved it) to a
    /// Service's `dst`: the endpoints the exact evaluation allows (both the source's egress
    /// and the endpoint's ingress, as for a direct connection to endpoint:targetPort).
    pub fn service_choice(
        &self,
        src: IpAddr,
        proven: Option<(&str, &str)>,
        dst: SocketAddr,
    ) -> Option<ServiceChoice<'_>> {
        let (service, port) = self.service_at(dst)?;
        let mut choice = ServiceChoice { service, allowed: vec![], first_denied: None };
        for e in &port.endpoints {
            let d = self.authorize(src, proven, e.address.ip(), e.address.port());
            if d.verdict.action == Action::Allow {
                choice.allowed.push(e);
            } else if choice.first_denied.is_none() {
                choice.first_denied = Some((e, d));
            }
        }
        Some(choice)
    }
}
