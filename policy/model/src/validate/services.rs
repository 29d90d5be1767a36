//! Kubernetes `v1` `Service`s: the virtual address is required (it is what clients dial);
//! a headless Service, a selector that selects nothing, a `targetPort` name a selected workload
//! does not have, and a non-TCP port are accepted and reported (pods may come later).
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use super::{At, Findings};
use crate::compile::canonical;
use crate::compile::services::{ClusterIp, cluster_ip, is_tcp, selected, target_port};
use crate::load::Located;
use crate::resource::Resource;

pub(super) fn check(resources: &[Located], out: &mut Findings) {
    // A VIP names one Service, and no workload: connections to it are the Service's.
    let mut owners: HashMap<IpAddr, String> = HashMap::new();
    for r in resources {
        if let Resource::Workload { metadata, spec, .. } = &r.resource {
            for a in &spec.addresses {
                owners.insert(canonical(*a), format!("workload {}", metadata.name));
            }
        }
    }
    // The workloads of each namespace that has a Service, in batch order: `selected` scans
    // the slice it is given, and a scan of the whole batch per Service is quadratic in a
    // cluster's thousands of each.
    let service_namespaces: HashSet<&str> = resources
        .iter()
        .filter_map(|r| match &r.resource {
            Resource::Service { metadata, .. } => Some(metadata.namespace.as_deref().unwrap_or_default()),
            _ => None,
        })
        .collect();
    let mut workloads_of: HashMap<&str, Vec<Located>> = HashMap::new();
    for r in resources {
        if let Resource::Workload { metadata, .. } = &r.resource
            && let Some(ns) = metadata.namespace.as_deref()
            && service_namespaces.contains(ns)
        {
            workloads_of.entry(ns).or_default().push(r.clone());
        }
    }
    for located in resources {
        let Resource::Service { metadata, spec, .. } = &located.resource else { continue };
        let at = At::new(located);
        let namespace = metadata.namespace.as_deref().unwrap_or_default();
        match cluster_ip(spec) {
            ClusterIp::Vip(vip) => {
                if let Some(owner) = owners.insert(vip, at.label.clone()) {
                    out.error(&at, "spec.clusterIP", format!("{vip} is already the address of {owner}"));
                }
            }
            ClusterIp::Missing => out.error(
                &at,
                "spec.clusterIP",
                "required: the Service's virtual address, which clients connect to (`None` for a headless Service)"
                    .into(),
            ),
            ClusterIp::Invalid(s) => out.error(&at, "spec.clusterIP", format!("{s:?} is not an IP address")),
            ClusterIp::Headless => {
                out.warning(&at, "spec.clusterIP", "headless (`None`): no virtual address, not enforced".into())
            }
        }
        let workloads = selected(namespace, spec, workloads_of.get(namespace).map_or(&[][..], Vec::as_slice));
        match &spec.selector {
            None => out.warning(&at, "spec", "no selector: Palisade computes no endpoints for this Service".into()),
            Some(_) if workloads.is_empty() => out.warning(
                &at,
                "spec.selector",
                format!("selects no workload of namespace {namespace}: the Service has no endpoints"),
            ),
            Some(_) => {}
        }
        for (i, port) in spec.ports.iter().flatten().enumerate() {
            if !(1..=65535).contains(&port.port) {
                out.error(&at, &format!("spec.ports[{i}].port"), format!("{} is not a port", port.port));
            }
            if !is_tcp(port) {
                let protocol = port.protocol.as_deref().unwrap_or_default();
                out.warning(
                    &at,
                    &format!("spec.ports[{i}].protocol"),
                    format!("{protocol} is not enforced: the mesh carries TCP only"),
                );
                continue;
            }
            let unresolved: Vec<&str> = workloads
                .iter()
                .filter(|(_, w)| target_port(port, w).is_none())
                .map(|(m, _)| m.name.as_str())
                .collect();
            if !unresolved.is_empty() {
                out.warning(
                    &at,
                    &format!("spec.ports[{i}].targetPort"),
                    format!(
                        "does not resolve on {}: no TCP container port of that name (those workloads are not endpoints of this port)",
                        unresolved.join(", ")
                    ),
                );
            }
        }
    }
}
