//! The waypoint's recent flows, for SREs: every access record (one per request or TCP
//! connection) as JSON, the last [`HISTORY`] of them, at `/flows` on the debug listener
//! (127.0.0.1:15000 by default, as ztunnel's: flows name identities and rules, so they are not
//! served where Prometheus and the kubelet connect).
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::access_log::AccessRecord;

/// Flows kept.
pub const HISTORY: usize = 1024;

/// Records are kept as they are and turned into JSON only when `/flows` is read: building
/// a JSON object per request cost more than the rest of the record's handling.
#[derive(Default)]
pub struct Flows {
    recent: Mutex<VecDeque<Arc<AccessRecord>>>,
}

impl Flows {
    /// Records every access record of `records` until the engine goes away.
    pub async fn follow(&self, mut records: broadcast::Receiver<Arc<AccessRecord>>) {
        loop {
            match records.recv().await {
                Ok(r) => self.record(r),
                // A burst larger than the channel: those are gone, the next ones are kept.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn record(&self, r: Arc<AccessRecord>) {
        let mut recent = self.recent.lock().expect("flows lock");
        if recent.len() == HISTORY {
            recent.pop_front();
        }
        recent.push_back(r);
    }

    /// The recent flows, oldest first, as a JSON array.
    pub fn json(&self) -> String {
        let recent: Vec<Arc<AccessRecord>> = self.recent.lock().expect("flows lock").iter().cloned().collect();
        let events: Vec<Value> = recent.iter().map(|r| event(r)).collect();
        serde_json::to_string(&events).unwrap_or_else(|_| "[]".into())
    }
}

fn event(r: &AccessRecord) -> Value {
    json!({
        "src_identity": r.source_identity,
        "src": r.source.map(|a| a.to_string()),
        "dst": r.destination.map(|a| a.to_string()),
        "service": r.service,
        "protocol": r.protocol,
        "method": r.method,
        "path": r.path,
        "route": r.route,
        "verdict": r.authz_verdict,
        "rule": r.authz_rule,
        "backend": r.backend,
        "upstream": r.upstream.map(|a| a.to_string()),
        "upstream_workload": r.upstream_workload,
        "upstream_identity": r.upstream_identity,
        "status": r.status,
        "overflow": r.overflow,
        "attempts": r.attempts,
        "complete": r.complete,
        "duration_ms": r.duration.as_secs_f64() * 1e3,
        "trace_id": r.trace_id,
    })
}
