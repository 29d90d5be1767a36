//! The L7 half of the model: the resources a waypoint enforces, which waypoint serves which
//! Service, their validation, and what they compile to ([`config`]).
//!
//! - `Gateway` (class [`config::WAYPOINT_GATEWAY_CLASS`]): a waypoint. Its workloads are the
//!   Workloads of its namespace labelled [`config::GATEWAY_NAME_LABEL`]`: <name>`.
//! - Which waypoint serves a Service: the label [`config::USE_WAYPOINT_LABEL`] on the Service,
//!   else on its Namespace (with [`config::USE_WAYPOINT_NAMESPACE_LABEL`] for a waypoint of
//!   another namespace); `none` opts a Service out of its namespace's waypoint. A Workload
//!   likewise (its own label, else its Namespace's); the waypoint's `istio.io/waypoint-for`
//!   says which it takes: Service VIP traffic (`service`, the default), traffic to Workload
//!   addresses (`workload`, see [`workload`]), `all` or `none`.
//! - `HTTPRoute`, `AuthorizationPolicy` and `TrafficPolicy` attach to a Service (an
//!   `AuthorizationPolicy` also to the waypoint, meaning all of its Services); one on a Service
//!   that no waypoint serves is a validation error, never silently unenforced.
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use crate::resource::{Metadata, Resource};

pub mod attach;
pub mod compile;
pub mod config;
pub mod gateway;
pub mod istio;
pub mod traffic;
pub mod validate;
pub mod workload;

#[cfg(test)]
mod compile_tests;
#[cfg(test)]
mod validate_tests;
#[cfg(test)]
mod workload_tests;

pub use attach::{Attachments, WaypointInfo};
pub use compile::{WaypointIndex, WaypointRef, WaypointWorkload, compile_waypoints, waypoint_index};

/// A document of a kind defined outside Palisade (Gateway API, Istio): Kubernetes' metadata
/// (annotations and the rest are accepted), and a `status` that is ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Foreign<S> {
    #[serde(rename = "apiVersion")]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    spec: S,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<serde_json::Value>,
}

fn foreign<S: serde::de::DeserializeOwned>(doc: &str) -> Result<(String, Metadata, S), serde_yaml::Error> {
    let d = Foreign::<S>::deserialize(serde_yaml::Deserializer::from_str(doc))?;
    let metadata = Metadata {
        name: d.metadata.name.unwrap_or_default(),
        // As `kubectl apply` would: a namespace-less manifest is in `default`.
        namespace: Some(d.metadata.namespace.unwrap_or_else(|| crate::k8s::DEFAULT_NAMESPACE.into())),
        labels: d.metadata.labels.unwrap_or_default(),
    };
    Ok((d.api_version, metadata, d.spec))
}

/// Reads one `HTTPRoute` document.
pub(crate) fn http_route(doc: &str) -> Result<Resource, serde_yaml::Error> {
    let (api_version, metadata, spec) = foreign(doc)?;
    Ok(Resource::HttpRoute { api_version, metadata, spec: Box::new(spec) })
}

/// Reads one `Gateway` document.
pub(crate) fn gateway(doc: &str) -> Result<Resource, serde_yaml::Error> {
    let (api_version, metadata, spec) = foreign(doc)?;
    Ok(Resource::Gateway { api_version, metadata, spec: Box::new(spec) })
}

/// Reads one `AuthorizationPolicy` document.
pub(crate) fn authorization_policy(doc: &str) -> Result<Resource, serde_yaml::Error> {
    let (api_version, metadata, spec) = foreign(doc)?;
    Ok(Resource::AuthorizationPolicy { api_version, metadata, spec: Box::new(spec) })
}

/// A Gateway API duration: one to four `<1-5 digits><h|m|s|ms>` parts (`1h30m`, `500ms`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let (mut rest, mut total, mut parts) = (s, Duration::ZERO, 0);
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if !(1..=5).contains(&digits) {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(n), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(n * 3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(n * 60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(n), 1)
        } else {
            return None;
        };
        rest = &rest[len..];
        total += unit;
        parts += 1;
    }
    (1..=4).contains(&parts).then_some(total)
}

/// Why a duration is not one, for messages.
pub(crate) const DURATION_FORM: &str = "is not a duration like `10s`, `500ms`, `1m` or `1h30m`";
