//! Prometheus metrics (`prometheus-client`), registered under the `waypoint` prefix of the
//! caller's registry: request count and duration by service, route, backend and status;
//! circuit-breaker overflows by limit; outlier ejections; downstream connections. Label names
//! are the snapshot's own `Arc<str>`: a request clones pointers, not strings.
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub service: Arc<str>,
    pub route: Arc<str>,
    pub backend: Arc<str>,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    pub backend: Arc<str>,
    pub limit: String,
}

fn duration_histogram() -> Histogram {
    // 0.5 ms to about 16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

#[derive(Clone, Debug)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub overflows: Family<OverflowLabels, Counter>,
    pub ejections: Counter,
    pub connections: Gauge,
    /// Downstream connections refused because the engine was at its connection limit.
    pub refused: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            overflows: Family::default(),
            ejections: Counter::default(),
            connections: Gauge::default(),
            refused: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("waypoint");
        r.register("requests", "HTTP requests served", m.requests.clone());
        r.register("request_duration_seconds", "Time from request to the end of the response", m.duration.clone());
        r.register("overflows", "Requests answered 503 by a circuit-breaker limit", m.overflows.clone());
        r.register("outlier_ejections", "Endpoints ejected by outlier detection", m.ejections.clone());
        r.register("downstream_connections", "Downstream connections open", m.connections.clone());
        r.register("downstream_refused", "Downstream connections refused at the connection limit", m.refused.clone());
        m
    }
}
