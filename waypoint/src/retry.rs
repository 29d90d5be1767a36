//! Retries: which failures are retried, the jittered backoff, and the request body a retry
//! must be able to send again.
//!
//! Bodies stream; a retry needs the body a second time, so when a route retries (or mirrors)
//! and the body's exact size is known and at most the engine's replay limit (64 KiB by
//! default), the body is read into memory first and replayed per attempt. A larger or
//! unsized body (e.g. a streaming gRPC call) streams through once and is never retried:
//! memory per request stays bounded by the replay limit. The retry budget is the backend's
//! `max_active_retries`: over it, the failed attempt's answer goes back as it is.
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use palisade_model::waypoint::config::RetryPolicy;
use rand::Rng;

use crate::body::{BoxError, ProxyBody, boxed};

/// Backoff never grows past this many times the base (Envoy's rule).
const MAX_BACKOFF_FACTOR: u32 = 10;
/// Without a retry policy on the route, a request that never left (the endpoint refused or
/// did not answer the connection) is still tried once more on another endpoint, as Istio's
/// default retry policy does (`connect-failure`): nothing was sent, so it is safe for every
/// method, and an endpoint that just went away or is not listening yet costs no request.
pub const DEFAULT_CONNECT_RETRIES: u32 = 1;
/// The backoff base of that default retry (Envoy's default base interval).
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

/// The request body, either replayable (small, read in full) or a stream usable once.
pub enum RequestBody {
    Replayable { data: Bytes, trailers: Option<HeaderMap> },
    Stream(Option<Incoming>),
}

impl RequestBody {
    /// Reads the body into memory when a copy is wanted and it fits `limit`; otherwise
    /// leaves it streaming.
    /// A body that has already ended (most GETs) is replayable at no cost, so such requests
    /// can always be tried again.
    pub async fn prepare(body: Incoming, want_copy: bool, limit: usize) -> Result<Self, BoxError> {
        if body.is_end_stream() {
            return Ok(RequestBody::Replayable { data: Bytes::new(), trailers: None });
        }
        let small = body.is_end_stream() || body.size_hint().exact().is_some_and(|n| n <= limit as u64);
        if !want_copy || !small {
            return Ok(RequestBody::Stream(Some(body)));
        }
        let collected = Limited::new(body, limit).collect().await?;
        let trailers = collected.trailers().cloned();
        Ok(RequestBody::Replayable { data: collected.to_bytes(), trailers })
    }

    pub fn replayable(&self) -> bool {
        matches!(self, RequestBody::Replayable { .. })
    }

    /// The body for the next attempt (None once a stream was used).
    pub fn take(&mut self) -> Option<ProxyBody> {
        match self {
            RequestBody::Replayable { .. } => self.copy(),
            RequestBody::Stream(s) => s.take().map(boxed),
        }
    }

    /// A copy for a mirror, if the body is replayable.
    pub fn copy(&self) -> Option<ProxyBody> {
        match self {
            // Most requests (GET) have no body: an empty body is boxed without allocating.
            RequestBody::Replayable { data, trailers: None } if data.is_empty() => Some(crate::body::empty()),
            RequestBody::Replayable { data, trailers } => {
                Some(boxed(Replay { data: Some(data.clone()).filter(|d| !d.is_empty()), trailers: trailers.clone() }))
            }
            RequestBody::Stream(_) => None,
        }
    }
}

/// A buffered body sent again: its data, then its trailers.
struct Replay {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Replay {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// RFC 9110's idempotent methods: sending them twice is the same as once.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// How an attempt failed, as far as retrying cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The request never left (connect failure or timeout).
    NotSent,
    /// Sent, no response (reset, closed, backend timeout).
    Reset,
    Status(u16),
}

/// Whether to retry after `retries_done` retries.
pub fn should_retry(policy: Option<&RetryPolicy>, method: &Method, retries_done: u32, failure: Failure) -> bool {
    let Some(policy) = policy else { return failure == Failure::NotSent && retries_done < DEFAULT_CONNECT_RETRIES };
    if retries_done >= policy.attempts {
        return false;
    }
    let safe = policy.non_idempotent || is_idempotent(method);
    match failure {
        Failure::NotSent => true,
        Failure::Reset => safe,
        Failure::Status(code) => safe && policy.codes.contains(&code),
    }
}

/// Exponential backoff with "equal jitter": half the step fixed, half random, so retries
/// from many requests spread out but none retries immediately.
pub fn backoff(base: Duration, retry: u32) -> Duration {
    let step = base.saturating_mul(1 << retry.min(16)).min(base.saturating_mul(MAX_BACKOFF_FACTOR));
    let half = step / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_rules() {
        let p =
            RetryPolicy { attempts: 2, codes: vec![503], backoff: Duration::from_millis(10), non_idempotent: false };
        assert!(should_retry(Some(&p), &Method::POST, 0, Failure::NotSent));
        assert!(!should_retry(Some(&p), &Method::POST, 0, Failure::Status(503)));
        assert!(should_retry(Some(&p), &Method::GET, 1, Failure::Status(503)));
        assert!(!should_retry(Some(&p), &Method::GET, 2, Failure::Reset), "attempts exhausted");
        assert!(!should_retry(Some(&p), &Method::GET, 0, Failure::Status(500)));
        // Without a policy: a request that never left is tried once more, nothing else is.
        assert!(should_retry(None, &Method::POST, 0, Failure::NotSent));
        assert!(!should_retry(None, &Method::POST, 1, Failure::NotSent));
        assert!(!should_retry(None, &Method::GET, 0, Failure::Reset));
        assert!(!should_retry(None, &Method::GET, 0, Failure::Status(503)));
        let b = backoff(Duration::from_millis(100), 5);
        assert!(b >= Duration::from_millis(500) && b <= Duration::from_secs(1), "{b:?}");
    }
}
