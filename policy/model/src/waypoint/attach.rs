//! Which waypoint serves which Service: the `istio.io/use-waypoint` label of the Service, else
//! of its Namespace (`istio.io/use-waypoint-namespace` names a waypoint of another namespace;
//! `none` opts a Service out of its namespace's waypoint). Only `Gateway`s of class
//! `palisade-waypoint` are waypoints. Used by validation and by compilation alike, so both
//! read the labels the same way.
use std::collections::{BTreeMap, HashMap};

use super::config::{GATEWAY_NAME_LABEL, USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL, WAYPOINT_GATEWAY_CLASS};
use crate::load::Located;
use crate::resource::{Metadata, Resource, WorkloadSpec};

/// One waypoint (a `Gateway` of class `palisade-waypoint`).
#[derive(Debug)]
pub struct WaypointInfo<'a> {
    pub located: &'a Located,
    pub namespace: &'a str,
    pub name: &'a str,
    /// Workloads of its namespace labelled `gateway.networking.k8s.io/gateway-name: <name>`.
    pub workloads: Vec<(&'a Metadata, &'a WorkloadSpec)>,
}

/// What a use-waypoint label says.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Label {
    /// `namespace/name` of the waypoint named.
    Waypoint(String),
    OptOut,
}

/// The waypoints of a batch and what they serve.
#[derive(Debug, Default)]
pub struct Attachments<'a> {
    /// By `namespace/name`.
    pub waypoints: BTreeMap<String, WaypointInfo<'a>>,
    /// Services' labels by `namespace/name` (of the Services the batch defines).
    services: HashMap<String, &'a Metadata>,
    /// Namespaces' labels by name.
    namespaces: HashMap<&'a str, &'a Metadata>,
}

fn label_of(meta: &Metadata, own_namespace: &str) -> Option<Label> {
    let name = meta.labels.get(USE_WAYPOINT_LABEL)?;
    if name == "none" {
        return Some(Label::OptOut);
    }
    let ns = meta.labels.get(USE_WAYPOINT_NAMESPACE_LABEL).map_or(own_namespace, String::as_str);
    Some(Label::Waypoint(format!("{ns}/{name}")))
}

pub fn attachments(resources: &[Located]) -> Attachments<'_> {
    let mut out = Attachments::default();
    for r in resources {
        match &r.resource {
            Resource::Gateway { metadata, spec, .. } if spec.gateway_class_name == WAYPOINT_GATEWAY_CLASS => {
                let namespace = metadata.namespace.as_deref().unwrap_or_default();
                let workloads = resources
                    .iter()
                    .filter_map(|w| match &w.resource {
                        Resource::Workload { metadata: m, spec, .. }
                            if m.namespace.as_deref() == Some(namespace)
                                && (m.labels.get(GATEWAY_NAME_LABEL) == Some(&metadata.name)
                                    || spec.labels.get(GATEWAY_NAME_LABEL) == Some(&metadata.name)) =>
                        {
                            Some((m, spec))
                        }
                        _ => None,
                    })
                    .collect();
                let info = WaypointInfo { located: r, namespace, name: &metadata.name, workloads };
                out.waypoints.insert(format!("{namespace}/{}", metadata.name), info);
            }
            Resource::Service { metadata, .. } => {
                let ns = metadata.namespace.as_deref().unwrap_or_default();
                out.services.insert(format!("{ns}/{}", metadata.name), metadata);
            }
            Resource::Namespace { metadata, .. } => {
                out.namespaces.insert(&metadata.name, metadata);
            }
            _ => {}
        }
    }
    out
}

impl Attachments<'_> {
    /// The waypoint (`namespace/name`) serving Service `namespace/name`, or why none does
    /// (a sentence for an error message).
    pub fn waypoint_of(&self, namespace: &str, service: &str) -> Result<&str, String> {
        let own = self.services.get(&format!("{namespace}/{service}")).and_then(|m| label_of(m, namespace));
        let (label, whose) = match own {
            Some(l) => (Some(l), "the Service's"),
            None => (self.namespaces.get(namespace).and_then(|m| label_of(m, namespace)), "its Namespace's"),
        };
        match label {
            Some(Label::Waypoint(key)) => match self.waypoints.get_key_value(&key) {
                Some((k, _)) => Ok(k.as_str()),
                None => Err(format!(
                    "{whose} label {USE_WAYPOINT_LABEL} names {key}, which is not a Gateway of class {WAYPOINT_GATEWAY_CLASS}"
                )),
            },
            Some(Label::OptOut) => Err(format!("the Service opts out ({USE_WAYPOINT_LABEL}: none)")),
            None => Err(format!(
                "label the Service or its Namespace `{USE_WAYPOINT_LABEL}: <name of a Gateway of class {WAYPOINT_GATEWAY_CLASS}>`"
            )),
        }
    }

    /// A use-waypoint label on `meta` (of namespace `own_namespace`) that names no waypoint:
    /// the waypoint it names.
    pub fn dangling(&self, meta: &Metadata, own_namespace: &str) -> Option<String> {
        match label_of(meta, own_namespace)? {
            Label::Waypoint(key) if !self.waypoints.contains_key(&key) => Some(key),
            _ => None,
        }
    }
}
