//! One access-log line per request (and per passed-through TCP connection), of target `access`
//! with flat fields (one JSON object per line with `--log-json`), filtered by `RUST_LOG` like
//! every other line but formatted by hand: it is the one line per request.
//! The same record is kept among the engine's recent ones (`Engine::recent_records`, the
//! waypoint's `/flows`) and goes to subscribers of `Engine::access_records` (tests), shared
//! rather than copied. Names that come from the configuration (service, route, backend,
//! endpoint) and the client's identity are `Arc<str>` shared with the snapshot and the
//! connection, so a record allocates only its path and trace id.
//! The query string is never logged: it often carries tokens.
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_mesh::logging::Line;
use tokio::sync::broadcast;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessRecord {
    /// Proven SPIFFE ID of the source (from its tunnel's certificate).
    pub source_identity: Option<Arc<str>>,
    pub source: Option<SocketAddr>,
    /// The VIP:port the client dialled.
    pub destination: Option<SocketAddr>,
    /// `namespace/name` of the Service.
    pub service: Option<Arc<str>>,
    /// `HTTP/1.1`, `HTTP/2` or `tcp`.
    pub protocol: &'static str,
    pub method: http::Method,
    pub path: String,
    pub route: Option<Arc<str>>,
    /// `allow`, `deny` or `none` (not reached).
    pub authz_verdict: &'static str,
    /// The policy rule that decided (`namespace/name#rule`).
    pub authz_rule: Option<String>,
    pub backend: Option<Arc<str>>,
    pub upstream: Option<SocketAddr>,
    pub upstream_workload: Option<Arc<str>>,
    /// The SPIFFE ID the upstream endpoint must prove.
    pub upstream_identity: Option<Arc<str>>,
    pub status: u16,
    /// The circuit-breaker limit that answered, if one did.
    pub overflow: Option<&'static str>,
    /// Attempts to upstreams (1 + retries).
    pub attempts: u32,
    /// Whether the response body was sent in full.
    pub complete: bool,
    pub duration: Duration,
    pub trace_id: Option<crate::trace::TraceId>,
}

impl AccessRecord {
    /// Names the endpoint a request or connection went to.
    pub(crate) fn upstream(&mut self, ep: &crate::balance::EndpointState) {
        self.upstream = Some(ep.endpoint.address);
        self.upstream_workload = Some(Arc::clone(&ep.workload));
        self.upstream_identity = Some(Arc::clone(&ep.identity));
    }

    /// The record of a request from `down`, before anything about it was decided.
    pub(crate) fn of_request<B>(down: &crate::engine::Downstream, req: &http::Request<B>) -> Self {
        AccessRecord {
            source_identity: down.identity.clone(),
            source: Some(down.peer),
            destination: Some(down.destination),
            protocol: if req.version() == http::Version::HTTP_2 { "HTTP/2" } else { "HTTP/1.1" },
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            authz_verdict: "none",
            ..Default::default()
        }
    }
}

/// Records kept for `/flows` (see [`Recent`]).
pub const HISTORY: usize = 1024;

/// The last [`HISTORY`] records, oldest first, kept as they are: they are turned into JSON
/// only when read. Kept here, in the request's own call, rather than by a subscriber task:
/// a channel send and a task wake per request cost more than the push.
#[derive(Default)]
pub struct Recent(Mutex<VecDeque<Arc<AccessRecord>>>);

impl Recent {
    fn push(&self, record: Arc<AccessRecord>) {
        let mut recent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == HISTORY {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    pub fn records(&self) -> Vec<Arc<AccessRecord>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }
}

/// Logs `record` and keeps it in `recent`; subscribers of `sink` (tests) get it too.
pub fn emit(record: AccessRecord, recent: &Recent, sink: &broadcast::Sender<Arc<AccessRecord>>) {
    if tracing::enabled!(target: "access", tracing::Level::INFO) {
        write_line(&record);
    }
    let record = Arc::new(record);
    if sink.receiver_count() > 0 {
        // Lagging receivers lose old records rather than slow requests down.
        let _ = sink.send(Arc::clone(&record));
    }
    recent.push(record);
}

/// The line, formatted by hand (one per request: see `palisade_mesh::logging::Line`), with
/// the fields an `info!` event of target `access` would have.
fn write_line(r: &AccessRecord) {
    Line::new("access", "request")
        .str("src_identity", r.source_identity.as_deref().unwrap_or("-"))
        .addr("src_addr", r.source)
        .addr("dst_addr", r.destination)
        .str("dst_service", r.service.as_deref().unwrap_or("-"))
        .str("protocol", r.protocol)
        .bare("method", r.method.as_str())
        .bare("path", &r.path)
        .str("route", r.route.as_deref().unwrap_or("-"))
        .str("authz_verdict", r.authz_verdict)
        .str("authz_rule", r.authz_rule.as_deref().unwrap_or("-"))
        .str("backend", r.backend.as_deref().unwrap_or("-"))
        .addr("upstream_addr", r.upstream)
        .str("upstream_workload", r.upstream_workload.as_deref().unwrap_or("-"))
        .str("upstream_identity", r.upstream_identity.as_deref().unwrap_or("-"))
        .value("status", r.status)
        .str("overflow", r.overflow.unwrap_or("-"))
        .value("attempts", r.attempts)
        .value("complete", r.complete)
        .millis("duration_ms", r.duration)
        .str("trace_id", r.trace_id.as_ref().map_or("-", crate::trace::TraceId::as_str))
        .emit();
}
