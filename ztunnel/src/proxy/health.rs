//! Passive health of the endpoints a Service VIP resolves to: an endpoint that could not be
//! reached (refused, timed out, or its ztunnel answered 503 because the workload refused) is
//! left out of the choice for a while — 1 s, doubling with each failure in a row, at most
//! 30 s — and a success clears it. With no healthy endpoint left, every allowed one is tried
//! again rather than none (health is about availability; policy was decided before). There are
//! no probes in the mesh: the connections themselves are the probes, as with Envoy's outlier
//! detection.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Endpoints remembered at most (a node's Services' endpoints; the oldest go first).
const MAX_TRACKED: usize = 4096;

#[derive(Default)]
pub struct EndpointHealth {
    failing: Mutex<HashMap<SocketAddr, (u32, Instant)>>,
}

impl EndpointHealth {
    /// Whether `endpoint` may be chosen now.
    pub fn healthy(&self, endpoint: SocketAddr) -> bool {
        let failing = self.failing.lock().expect("health lock");
        failing.get(&endpoint).is_none_or(|(_, until)| *until <= Instant::now())
    }

    pub fn failed(&self, endpoint: SocketAddr) {
        let mut failing = self.failing.lock().expect("health lock");
        if failing.len() >= MAX_TRACKED && !failing.contains_key(&endpoint) {
            let now = Instant::now();
            failing.retain(|_, (_, until)| *until > now);
            if failing.len() >= MAX_TRACKED {
                return;
            }
        }
        let entry = failing.entry(endpoint).or_insert((0, Instant::now()));
        entry.0 = entry.0.saturating_add(1);
        let backoff = FIRST_BACKOFF.saturating_mul(1 << (entry.0 - 1).min(5)).min(MAX_BACKOFF);
        entry.1 = Instant::now() + backoff;
    }

    pub fn succeeded(&self, endpoint: SocketAddr) {
        let mut failing = self.failing.lock().expect("health lock");
        if !failing.is_empty() {
            failing.remove(&endpoint);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_benches_an_endpoint_and_a_success_clears_it() {
        let health = EndpointHealth::default();
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        assert!(health.healthy(a));
        health.failed(a);
        assert!(!health.healthy(a), "left out after a failure");
        health.failed(a);
        let until = health.failing.lock().unwrap()[&a].1;
        assert!(until > Instant::now() + Duration::from_millis(1500), "the second failure doubles the wait");
        health.succeeded(a);
        assert!(health.healthy(a));
    }
}
