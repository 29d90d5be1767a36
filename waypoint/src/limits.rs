//! Circuit-breaker counters of one backend. Each limit is an atomic counter taken with
//! `fetch_add` and given back by a guard's `Drop`, so a request that fails anywhere (timeout,
//! client gone, panic in a task) still returns what it took. Over a limit the caller answers
//! 503 at once with `x-palisade-overflow: <limit>`: nothing waits in a queue, so a saturated
//! backend costs the waypoint a counter check per request, not memory.
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// The response header that names the limit a request overflowed.
pub const OVERFLOW_HEADER: &str = "x-palisade-overflow";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    Connections,
    PendingRequests,
    ActiveRequests,
    ActiveRetries,
}

impl Limit {
    /// The name in the overflow header, the access log and metrics (TrafficPolicy's field).
    pub fn name(self) -> &'static str {
        match self {
            Limit::Connections => "max_connections",
            Limit::PendingRequests => "max_pending_requests",
            Limit::ActiveRequests => "max_active_requests",
            Limit::ActiveRetries => "max_active_retries",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
#[error("circuit breaker: {limit} ({max}) reached")]
pub struct Overflow {
    pub limit: Limit,
    pub max: u32,
}

/// The live counts of one backend (shared by every request to it, kept across config
/// updates so a new configuration does not reset a breaker that is open).
#[derive(Debug, Default)]
pub struct Counters {
    connections: AtomicU32,
    pending: AtomicU32,
    active: AtomicU32,
    retries: AtomicU32,
}

impl Counters {
    fn counter(&self, limit: Limit) -> &AtomicU32 {
        match limit {
            Limit::Connections => &self.connections,
            Limit::PendingRequests => &self.pending,
            Limit::ActiveRequests => &self.active,
            Limit::ActiveRetries => &self.retries,
        }
    }

    /// Takes one unit of `limit`, or fails if that would exceed `max` (None: unlimited,
    /// still counted so that a later limit sees the true load).
    pub fn acquire(self: &Arc<Self>, limit: Limit, max: Option<u32>) -> Result<Guard, Overflow> {
        let counter = self.counter(limit);
        let before = counter.fetch_add(1, Ordering::AcqRel);
        if let Some(max) = max
            && before >= max
        {
            counter.fetch_sub(1, Ordering::AcqRel);
            return Err(Overflow { limit, max });
        }
        Ok(Guard { counters: Arc::clone(self), limit })
    }

    pub fn current(&self, limit: Limit) -> u32 {
        self.counter(limit).load(Ordering::Acquire)
    }
}

/// One unit of a limit, returned on drop.
#[derive(Debug)]
pub struct Guard {
    counters: Arc<Counters>,
    limit: Limit,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.counters.counter(self.limit).fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_is_exact_and_guards_give_back() {
        let c = Arc::new(Counters::default());
        let a = c.acquire(Limit::ActiveRequests, Some(2)).unwrap();
        let _b = c.acquire(Limit::ActiveRequests, Some(2)).unwrap();
        let err = c.acquire(Limit::ActiveRequests, Some(2)).unwrap_err();
        assert_eq!(err.limit.name(), "max_active_requests");
        assert_eq!(c.current(Limit::ActiveRequests), 2);
        drop(a);
        assert!(c.acquire(Limit::ActiveRequests, Some(2)).is_ok());
        assert!(c.acquire(Limit::Connections, None).is_ok());
    }
}
