//! Which waypoint serves what. A Service: the `istio.io/use-waypoint` label of the Service,
//! else of its Namespace (`istio.io/use-waypoint-namespace` names a waypoint of another
//! namespace; `none` opts out of the namespace's waypoint). A Workload likewise: its own label
//! (the Workload's metadata, else its pod labels), else its Namespace's. The waypoint's
//! `istio.io/waypoint-for` label then decides which traffic it takes (Istio's: `service` by
//! default, `workload`, `all`, `none`): a Service's VIP traffic only when it serves Services,
//! a Workload's address traffic only when it serves workloads. A waypoint's own workloads
//! never use a waypoint. Only `Gateway`s of class `palisade-waypoint` are waypoints. Used by
//! validation and by compilation alike, so both read the labels the same way.
use std::collections::{BTreeMap, HashMap};

use super::config::{
    GATEWAY_NAME_LABEL, USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL, WAYPOINT_FOR_LABEL, WAYPOINT_GATEWAY_CLASS,
    WaypointFor,
};
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
    /// What it serves; `None` when its [`WAYPOINT_FOR_LABEL`] is not a known value
    /// (validation refuses that, and such a waypoint serves nothing: nothing is guessed).
    pub waypoint_for: Option<WaypointFor>,
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

fn label_of(labels: &BTreeMap<String, String>, own_namespace: &str) -> Option<Label> {
    let name = labels.get(USE_WAYPOINT_LABEL)?;
    if name == "none" {
        return Some(Label::OptOut);
    }
    let ns = labels.get(USE_WAYPOINT_NAMESPACE_LABEL).map_or(own_namespace, String::as_str);
    Some(Label::Waypoint(format!("{ns}/{name}")))
}

/// A Workload's own use-waypoint label: on its metadata, else on its pod labels.
fn workload_label(meta: &Metadata, spec: &WorkloadSpec) -> Option<Label> {
    let ns = meta.namespace.as_deref().unwrap_or_default();
    label_of(&meta.labels, ns).or_else(|| label_of(&spec.labels, ns))
}

/// Whether a Workload carries a use-waypoint label of its own.
pub fn workload_labelled(meta: &Metadata, spec: &WorkloadSpec) -> bool {
    meta.labels.contains_key(USE_WAYPOINT_LABEL) || spec.labels.contains_key(USE_WAYPOINT_LABEL)
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
                let waypoint_for = WaypointFor::parse(metadata.labels.get(WAYPOINT_FOR_LABEL).map(String::as_str));
                let info = WaypointInfo { located: r, namespace, name: &metadata.name, workloads, waypoint_for };
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

/// What a waypoint of `info` serves, for messages.
fn serves(info: &WaypointInfo<'_>) -> String {
    match info.waypoint_for {
        Some(f) => format!("{WAYPOINT_FOR_LABEL}: {}", f.as_str()),
        None => format!("an unknown {WAYPOINT_FOR_LABEL}"),
    }
}

impl<'a> Attachments<'a> {
    /// The waypoint a label names (`own`, else the Namespace's), with its info, or why none.
    fn resolve(
        &self,
        own: Option<Label>,
        namespace: &str,
        kind: &str,
    ) -> Result<(&str, &WaypointInfo<'a>, String), String> {
        let (label, whose) = match own {
            Some(l) => (Some(l), format!("the {kind}'s")),
            None => {
                (self.namespaces.get(namespace).and_then(|m| label_of(&m.labels, namespace)), "its Namespace's".into())
            }
        };
        match label {
            Some(Label::Waypoint(key)) => match self.waypoints.get_key_value(&key) {
                Some((k, info)) => Ok((k.as_str(), info, whose)),
                None => Err(format!(
                    "{whose} label {USE_WAYPOINT_LABEL} names {key}, which is not a Gateway of class {WAYPOINT_GATEWAY_CLASS}"
                )),
            },
            Some(Label::OptOut) => Err(format!("the {kind} opts out ({USE_WAYPOINT_LABEL}: none)")),
            None => Err(format!(
                "label the {kind} or its Namespace `{USE_WAYPOINT_LABEL}: <name of a Gateway of class {WAYPOINT_GATEWAY_CLASS}>`"
            )),
        }
    }

    /// The waypoint (`namespace/name`) serving Service `namespace/name` (its VIP traffic), or
    /// why none does (a sentence for an error message).
    pub fn waypoint_of(&self, namespace: &str, service: &str) -> Result<&str, String> {
        let own = self.services.get(&format!("{namespace}/{service}")).and_then(|m| label_of(&m.labels, namespace));
        let (key, info, whose) = self.resolve(own, namespace, "Service")?;
        match info.waypoint_for.is_some_and(WaypointFor::services) {
            true => Ok(key),
            false => Err(format!(
                "{whose} label {USE_WAYPOINT_LABEL} names {key}, which is `{}`: it serves no Service traffic",
                serves(info)
            )),
        }
    }

    /// The waypoint (`namespace/name`) serving traffic sent to the addresses of this Workload,
    /// or why none does.
    pub fn workload_waypoint(&self, meta: &Metadata, spec: &WorkloadSpec) -> Result<&str, String> {
        if self.is_waypoint_workload(meta) {
            return Err("a waypoint's own workload never uses a waypoint".into());
        }
        let ns = meta.namespace.as_deref().unwrap_or_default();
        let (key, info, whose) = self.resolve(workload_label(meta, spec), ns, "Workload")?;
        match info.waypoint_for.is_some_and(WaypointFor::workloads) {
            true => Ok(key),
            false => Err(format!(
                "{whose} label {USE_WAYPOINT_LABEL} names {key}, which is `{}`: it has no effect for workload traffic (label the Gateway `{WAYPOINT_FOR_LABEL}: workload` or `all`)",
                serves(info)
            )),
        }
    }

    /// Whether `meta` is a workload of some waypoint.
    pub fn is_waypoint_workload(&self, meta: &Metadata) -> bool {
        self.waypoints
            .values()
            .flat_map(|w| &w.workloads)
            .any(|(m, _)| m.name == meta.name && m.namespace == meta.namespace)
    }

    /// The waypoint (`namespace/name`, with its info) a Workload's own use-waypoint label names.
    pub fn workload_label_target(&self, meta: &Metadata, spec: &WorkloadSpec) -> Option<(&str, &WaypointInfo<'a>)> {
        match workload_label(meta, spec)? {
            Label::Waypoint(key) => self.waypoints.get_key_value(&key).map(|(k, i)| (k.as_str(), i)),
            Label::OptOut => None,
        }
    }

    /// A use-waypoint label on `labels` (of namespace `own_namespace`) that names no waypoint:
    /// the waypoint it names.
    pub fn dangling(&self, labels: &BTreeMap<String, String>, own_namespace: &str) -> Option<String> {
        match label_of(labels, own_namespace)? {
            Label::Waypoint(key) if !self.waypoints.contains_key(&key) => Some(key),
            _ => None,
        }
    }

    /// The waypoint a Service's own label names, when that waypoint takes no Service traffic.
    pub fn service_label_without_effect(&self, meta: &Metadata) -> Option<(&str, String)> {
        let ns = meta.namespace.as_deref().unwrap_or_default();
        let Label::Waypoint(key) = label_of(&meta.labels, ns)? else { return None };
        let (k, info) = self.waypoints.get_key_value(&key)?;
        (!info.waypoint_for.is_some_and(WaypointFor::services)).then(|| (k.as_str(), serves(info)))
    }
}
