//! The waypoint's recent flows, for SREs: every access record (one per request or TCP
//! connection) as JSON, the last `access_log::HISTORY` of them, at `/flows` on the debug listener
//! (127.0.0.1:15000 by default, as ztunnel's: flows name identities and rules, so they are not
//! served where Prometheus and the kubelet connect).
use std::sync::Arc;

use serde_json::{Value, json};

use crate::access_log::AccessRecord;

/// `records` (the engine's recent ones, the last `access_log::HISTORY`), oldest first, as a
/// JSON array.
pub fn json(records: &[Arc<AccessRecord>]) -> String {
    let events: Vec<Value> = records.iter().map(|r| event(r)).collect();
    serde_json::to_string(&events).unwrap_or_else(|_| "[]".into())
}

fn event(r: &AccessRecord) -> Value {
    json!({
        "src_identity": r.source_identity.as_deref(),
        "src": r.source.map(|a| a.to_string()),
        "dst": r.destination.map(|a| a.to_string()),
        "service": r.service.as_deref(),
        "protocol": r.protocol,
        "method": r.method.as_str(),
        "path": r.path,
        "route": r.route.as_deref(),
        "verdict": r.authz_verdict,
        "rule": r.authz_rule,
        "backend": r.backend.as_deref(),
        "upstream": r.upstream.map(|a| a.to_string()),
        "upstream_workload": r.upstream_workload.as_deref(),
        "upstream_identity": r.upstream_identity.as_deref(),
        "status": r.status,
        "overflow": r.overflow,
        "attempts": r.attempts,
        "complete": r.complete,
        "duration_ms": r.duration.as_secs_f64() * 1e3,
        "trace_id": r.trace_id.as_ref().map(crate::trace::TraceId::as_str),
    })
}
