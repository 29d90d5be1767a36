//! One access-log line per request (and per passed-through TCP connection), of target `access`
//! with flat fields (one JSON object per line with `--log-json`), filtered by `RUST_LOG` like
//! every other line but formatted by hand: it is the one line per request.
//! The same record goes to subscribers of `Engine::access_records` (flow events, tests),
//! shared rather than copied per subscriber.
//! The query string is never logged: it often carries tokens.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use palisade_mesh::logging::Line;
use tokio::sync::broadcast;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessRecord {
    /// Proven SPIFFE ID of the source (from its tunnel's certificate).
    pub source_identity: Option<String>,
    pub source: Option<SocketAddr>,
    /// The VIP:port the client dialled.
    pub destination: Option<SocketAddr>,
    /// `namespace/name` of the Service.
    pub service: Option<String>,
    /// `HTTP/1.1`, `HTTP/2` or `tcp`.
    pub protocol: &'static str,
    pub method: String,
    pub path: String,
    pub route: Option<String>,
    /// `allow`, `deny` or `none` (not reached).
    pub authz_verdict: &'static str,
    /// The policy rule that decided (`namespace/name#rule`).
    pub authz_rule: Option<String>,
    pub backend: Option<String>,
    pub upstream: Option<SocketAddr>,
    pub upstream_workload: Option<String>,
    /// The SPIFFE ID the upstream endpoint must prove.
    pub upstream_identity: Option<String>,
    pub status: u16,
    /// The circuit-breaker limit that answered, if one did.
    pub overflow: Option<&'static str>,
    /// Attempts to upstreams (1 + retries).
    pub attempts: u32,
    /// Whether the response body was sent in full.
    pub complete: bool,
    pub duration: Duration,
    pub trace_id: Option<String>,
}

impl AccessRecord {
    /// The record of a request from `down`, before anything about it was decided.
    pub(crate) fn of_request<B>(down: &crate::engine::Downstream, req: &http::Request<B>) -> Self {
        AccessRecord {
            source_identity: down.identity.clone(),
            source: Some(down.peer),
            destination: Some(down.destination),
            protocol: if req.version() == http::Version::HTTP_2 { "HTTP/2" } else { "HTTP/1.1" },
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            authz_verdict: "none",
            ..Default::default()
        }
    }
}

pub fn emit(record: AccessRecord, sink: &broadcast::Sender<Arc<AccessRecord>>) {
    if tracing::enabled!(target: "access", tracing::Level::INFO) {
        write_line(&record);
    }
    if sink.receiver_count() > 0 {
        // Lagging receivers lose old records rather than slow requests down.
        let _ = sink.send(Arc::new(record));
    }
}

/// The line, formatted by hand (one per request: see `palisade_mesh::logging::Line`), with
/// the fields an `info!` event of target `access` would have.
fn write_line(r: &AccessRecord) {
    Line::new("access", "request")
        .str("src_identity", r.source_identity.as_deref().unwrap_or("-"))
        .display("src_addr", Opt(r.source))
        .display("dst_addr", Opt(r.destination))
        .str("dst_service", r.service.as_deref().unwrap_or("-"))
        .str("protocol", r.protocol)
        .display("method", &r.method)
        .display("path", &r.path)
        .str("route", r.route.as_deref().unwrap_or("-"))
        .str("authz_verdict", r.authz_verdict)
        .str("authz_rule", r.authz_rule.as_deref().unwrap_or("-"))
        .str("backend", r.backend.as_deref().unwrap_or("-"))
        .display("upstream_addr", Opt(r.upstream))
        .str("upstream_workload", r.upstream_workload.as_deref().unwrap_or("-"))
        .str("upstream_identity", r.upstream_identity.as_deref().unwrap_or("-"))
        .value("status", r.status)
        .str("overflow", r.overflow.unwrap_or("-"))
        .value("attempts", r.attempts)
        .value("complete", r.complete)
        .value("duration_ms", r.duration.as_secs_f64() * 1000.0)
        .str("trace_id", r.trace_id.as_deref().unwrap_or("-"))
        .emit();
}

/// An address, or `-`.
struct Opt(Option<SocketAddr>);

impl std::fmt::Display for Opt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("-"),
        }
    }
}
