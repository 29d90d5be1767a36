//! Outlier detection for one endpoint: a small explicit state machine (counting → ejected →
//! returned) in the manner of linkerd's consecutive-failures breaker. Ejection lasts
//! `base_ejection_time × times ejected` (capped at [`MAX_EJECTION`] or the base if larger);
//! the endpoint returns lazily, the first time a pick looks at it after that instant, so no
//! timer task runs per endpoint. Every `interval` of healthy traffic after a return forgives
//! one past ejection, as Envoy does, so an endpoint that recovered does not carry a long
//! penalty forever. Whether an ejection is allowed at all (max ejection percent) is the
//! backend's decision: see `balance::BackendState::record`.
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use palisade_model::waypoint::config::OutlierDetection;

/// Envoy's default `max_ejection_time`: a flapping endpoint is retried at least this often.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// What one attempt to an endpoint came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this status.
    Status(u16),
    /// Connect failure, reset or timeout: the endpoint never answered (a gateway error).
    Failed,
}

impl Outcome {
    fn is_5xx(self) -> bool {
        match self {
            Outcome::Status(s) => (500..600).contains(&s),
            Outcome::Failed => true,
        }
    }

    fn is_gateway_error(self) -> bool {
        matches!(self, Outcome::Status(502..=504) | Outcome::Failed)
    }
}

#[derive(Debug, Default)]
struct State {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
    /// When the endpoint last returned, or last had a past ejection forgiven.
    healthy_since: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct Outlier {
    state: Mutex<State>,
    /// Set while ejected: every pick asks every endpoint, and this keeps the common answer
    /// ("not ejected") off the lock.
    ejected: AtomicBool,
}

impl Outlier {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain counters behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the endpoint is ejected at `now`; returns it (clears the ejection) once its
    /// time is up.
    pub fn is_ejected(&self, now: Instant) -> bool {
        if !self.ejected.load(Ordering::Acquire) {
            return false;
        }
        let mut s = self.lock();
        match s.ejected_until {
            Some(until) if until > now => true,
            Some(_) => {
                s.ejected_until = None;
                self.ejected.store(false, Ordering::Release);
                s.healthy_since = Some(now);
                false
            }
            None => false,
        }
    }

    /// Counts an outcome; true when a threshold is reached and the endpoint should be
    /// ejected (the caller then decides with [`Outlier::eject`]).
    pub fn record(&self, outcome: Outcome, policy: &OutlierDetection, now: Instant) -> bool {
        let mut s = self.lock();
        if s.ejected_until.is_some() {
            return false;
        }
        if outcome.is_5xx() {
            s.consecutive_5xx += 1;
        } else {
            s.consecutive_5xx = 0;
            if let Some(since) = s.healthy_since
                && s.times_ejected > 0
                && now.duration_since(since) >= policy.interval
            {
                s.times_ejected -= 1;
                s.healthy_since = Some(now);
            }
        }
        if outcome.is_gateway_error() {
            s.consecutive_gateway += 1;
        } else {
            s.consecutive_gateway = 0;
        }
        let over = |count: u32, threshold: Option<u32>| threshold.is_some_and(|t| t > 0 && count >= t);
        over(s.consecutive_5xx, policy.consecutive_5xx)
            || over(s.consecutive_gateway, policy.consecutive_gateway_errors)
    }

    /// Ejects the endpoint from `now`; returns for how long.
    pub fn eject(&self, policy: &OutlierDetection, now: Instant) -> Duration {
        let mut s = self.lock();
        s.times_ejected = s.times_ejected.saturating_add(1);
        let cap = MAX_EJECTION.max(policy.base_ejection_time);
        let time = policy.base_ejection_time.saturating_mul(s.times_ejected).min(cap);
        s.ejected_until = Some(now + time);
        self.ejected.store(true, Ordering::Release);
        s.consecutive_5xx = 0;
        s.consecutive_gateway = 0;
        time
    }

    /// Resets the consecutive counters without ejecting (ejection refused by the percent cap),
    /// so the endpoint is judged afresh rather than ejected by its next single failure.
    pub fn forgive(&self) {
        let mut s = self.lock();
        s.consecutive_5xx = 0;
        s.consecutive_gateway = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: Some(3),
            consecutive_gateway_errors: None,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 50,
        }
    }

    #[test]
    fn ejects_after_threshold_for_base_times_count_and_returns() {
        let o = Outlier::default();
        let p = policy();
        let t0 = Instant::now();
        assert!(!o.record(Outcome::Status(500), &p, t0));
        assert!(!o.record(Outcome::Status(200), &p, t0), "a success resets the count");
        assert!(!o.record(Outcome::Status(503), &p, t0));
        assert!(!o.record(Outcome::Failed, &p, t0));
        assert!(o.record(Outcome::Status(500), &p, t0));
        assert_eq!(o.eject(&p, t0), Duration::from_secs(30));
        assert!(o.is_ejected(t0 + Duration::from_secs(29)));
        assert!(!o.is_ejected(t0 + Duration::from_secs(30)));
        for _ in 0..3 {
            o.record(Outcome::Status(500), &p, t0);
        }
        assert_eq!(o.eject(&p, t0), Duration::from_secs(60), "second ejection is twice as long");
    }
}
