//! Sending a request upstream: attempts with balancing, outlier accounting and retries; the
//! upstream request's shape (hop-by-hop headers, URI form per protocol, translated when the
//! upstream speaks another HTTP version than the client: see `pool` for which); fire-and-forget
//! mirrors.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONNECTION, COOKIE, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use palisade_model::waypoint::config::{Backend, HashKey, LoadBalancer, Route, TrafficPolicy, UpstreamProtocol};

use crate::admission::Refusal;
use crate::balance::{BackendState, EndpointState, InFlight, hash64};
use crate::body::ProxyBody;
use crate::engine::{Downstream, Inner};
use crate::filters;
use crate::limits::{Limit, Overflow};
use crate::outlier::Outcome;
use crate::pool::SendError;
use crate::retry::{self, Failure, RequestBody};

/// A mirror that has not answered in this long is abandoned.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("the backend has no endpoints")]
    NoEndpoint,
    #[error(transparent)]
    Send(#[from] SendError),
    #[error("the backend did not answer within the backend timeout")]
    Timeout,
    #[error(transparent)]
    Denied(Refusal),
}

/// Where and what a request's attempts send.
pub(crate) struct Target<'a> {
    pub inner: &'a Inner,
    pub down: &'a Downstream,
    pub state: &'a BackendState,
    pub traffic: &'a TrafficPolicy,
    pub route: &'a Route,
    /// The ring-hash key, if the backend hashes.
    pub key: Option<u64>,
    /// The client spoke HTTP/2.
    pub h2: bool,
    /// What the backend's Service port declares.
    pub protocol: UpstreamProtocol,
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

pub(crate) struct Attempted {
    pub result: Result<Response<Incoming>, AttemptError>,
    pub endpoint: Option<Arc<EndpointState>>,
    /// Held until the response body ends (least request's load).
    pub in_flight: Option<InFlight>,
    pub tries: u32,
    /// A retry was due but the backend's retry budget was spent.
    pub retry_overflow: Option<Overflow>,
}

/// Attempts until one answers for good or retries are spent; each retry goes to an endpoint
/// not tried yet where there is one.
pub(crate) async fn attempt(t: &Target<'_>, body: &mut RequestBody) -> Attempted {
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut retry_unit = None;
    let mut tries = 0;
    loop {
        tries += 1;
        let (Some(ep), Some(req_body)) = (t.state.pick(t.key, &tried), body.take()) else {
            return Attempted {
                result: Err(AttemptError::NoEndpoint),
                endpoint: None,
                in_flight: None,
                tries,
                retry_overflow: None,
            };
        };
        if let Some(gate) = &t.inner.admission
            && let Err(refusal) = gate.admit(t.down, &ep.endpoint)
        {
            // The destination's own policy refuses this client: no other endpoint is tried,
            // as the client connecting directly would have been refused too.
            return Attempted {
                result: Err(AttemptError::Denied(refusal)),
                endpoint: Some(ep),
                in_flight: None,
                tries,
                retry_overflow: None,
            };
        }
        let in_flight = ep.start();
        let wire = t.inner.pool.wire(t.protocol, t.h2, ep.endpoint.address);
        let req = upstream_request(t.method, t.uri, t.headers, wire.is_h2(), req_body, ep.endpoint.address);
        let sent = t.inner.pool.send(t.state, &ep, t.traffic, wire, req);
        let result = match t.route.backend_timeout {
            Some(limit) => match tokio::time::timeout(limit, sent).await {
                Ok(sent) => sent.map_err(AttemptError::from),
                Err(_) => Err(AttemptError::Timeout),
            },
            None => sent.await.map_err(AttemptError::from),
        };
        let failure = match &result {
            Ok(r) => Some(Failure::Status(r.status().as_u16())),
            // Our own limit, not the endpoint's fault: neither outlier nor retry.
            Err(AttemptError::Send(SendError::Overflow(_)))
            | Err(AttemptError::NoEndpoint)
            | Err(AttemptError::Denied(_)) => None,
            Err(AttemptError::Send(e)) if e.before_sending() => Some(Failure::NotSent),
            Err(_) => Some(Failure::Reset),
        };
        let outcome = match failure {
            Some(Failure::Status(s)) => Some(Outcome::Status(s)),
            Some(_) => Some(Outcome::Failed),
            None => None,
        };
        if let Some(outcome) = outcome
            && t.state.record(&ep, outcome)
        {
            t.inner.metrics.ejections.inc();
        }
        let policy = t.route.retry.as_ref();
        let retry = failure.is_some_and(|f| body.replayable() && retry::should_retry(policy, t.method, tries - 1, f));
        let mut retry_overflow = None;
        if retry {
            match t.state.counters.acquire(Limit::ActiveRetries, t.traffic.limits.max_active_retries) {
                Ok(unit) => {
                    retry_unit.replace(unit);
                    tried.push(ep.endpoint.address);
                    drop((result, in_flight));
                    let base = policy.map_or(retry::DEFAULT_BACKOFF, |p| p.backoff);
                    tokio::time::sleep(retry::backoff(base, tries - 1)).await;
                    continue;
                }
                Err(o) => retry_overflow = Some(o),
            }
        }
        return Attempted { result, endpoint: Some(ep), in_flight: Some(in_flight), tries, retry_overflow };
    }
}

/// The request as the upstream gets it: origin form and a Host header for HTTP/1.1;
/// absolute form (`:authority`) and no Host header for HTTP/2; hop-by-hop headers removed
/// either way (hyper writes no HTTP/2 pseudo-header as a field, and frames an HTTP/1.1
/// body without a length as chunked).
fn upstream_request(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    h2: bool,
    body: ProxyBody,
    endpoint: SocketAddr,
) -> Request<ProxyBody> {
    let mut headers = headers.clone();
    strip_hop_by_hop(&mut headers);
    let authority = |headers: &HeaderMap| match filters::request_host(uri, headers) {
        "" => endpoint.to_string(),
        host => host.to_string(),
    };
    let pq = uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let uri = if h2 {
        let authority = authority(&headers);
        headers.remove(HOST);
        Uri::builder()
            .scheme("http")
            .authority(authority.as_str())
            .path_and_query(pq.clone())
            .build()
            .unwrap_or_else(|_| Uri::from(pq))
    } else {
        if !headers.contains_key(HOST)
            && let Ok(v) = HeaderValue::from_str(&authority(&headers))
        {
            headers.insert(HOST, v);
        }
        http1_fields(&mut headers);
        Uri::from(pq)
    };
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
    *req.headers_mut() = headers;
    req
}

/// A request shaped for HTTP/2 (see [`upstream_request`]) reshaped for HTTP/1.1: its
/// endpoint answered the HTTP/2 preface as an HTTP/1.1 server before any of it was sent.
pub(crate) fn as_http1(req: Request<ProxyBody>) -> Request<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    if let Some(authority) = parts.uri.authority()
        && !parts.headers.contains_key(HOST)
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(HOST, v);
    }
    parts.uri = Uri::from(parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
    parts.version = Version::HTTP_11;
    http1_fields(&mut parts.headers);
    Request::from_parts(parts, body)
}

/// Fields that differ between an HTTP/2 request and its HTTP/1.1 form.
fn http1_fields(headers: &mut HeaderMap) {
    // `te: trailers` is a promise of the client's HTTP/2 hop (gRPC); in HTTP/1.1 TE is
    // hop-by-hop and this hop makes no such promise.
    headers.remove(TE);
    // HTTP/2 may split Cookie into several fields; HTTP/1.1 allows one (RFC 9113 §8.2.3).
    if headers.get_all(COOKIE).iter().nth(1).is_some() {
        let joined: Vec<&[u8]> = headers.get_all(COOKIE).iter().map(HeaderValue::as_bytes).collect();
        if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
            headers.insert(COOKIE, v);
        }
    }
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes headers that belong to one connection only (RFC 9110 §7.6.1), keeping
/// `te: trailers`, which gRPC needs end to end.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none (names a `Connection` header lists come with one): one pass
    // over the names says so, where each removal below is a lookup.
    let hop = |n: &HeaderName| {
        [CONNECTION, TRANSFER_ENCODING, UPGRADE, TE].contains(n) || *n == KEEP_ALIVE || *n == PROXY_CONNECTION
    };
    if !headers.keys().any(hop) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    let trailers =
        headers.get_all(TE).iter().any(|v| v.to_str().is_ok_and(|s| s.to_ascii_lowercase().contains("trailers")));
    for name in [CONNECTION, TRANSFER_ENCODING, UPGRADE, TE] {
        headers.remove(name);
    }
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    if trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// The request's ring-hash key: a header's value or the source address. None (no hash:
/// any endpoint) when the header is absent or the backend does not hash.
pub(crate) fn hash_key(traffic: &TrafficPolicy, headers: &HeaderMap, peer: SocketAddr) -> Option<u64> {
    match &traffic.load_balancer {
        LoadBalancer::RingHash(HashKey::Header(name)) => headers.get(name.as_str()).map(|v| hash64(v.as_bytes())),
        LoadBalancer::RingHash(HashKey::SourceIp) => Some(hash64(peer.ip().to_string().as_bytes())),
        _ => None,
    }
}

/// Sends a copy of the request to `mirror` and drops its answer. Only requests whose body
/// was buffered (see `retry`) are mirrored, and at most `Settings::max_mirrors` at once:
/// a mirror must never slow or grow the real request.
pub(crate) fn spawn_mirror(
    inner: &Arc<Inner>,
    down: &Downstream,
    backends: &HashMap<String, Arc<BackendState>>,
    mirror: &Backend,
    request: (&Method, &Uri, &HeaderMap, bool),
    body: &RequestBody,
) {
    let (Some(copy), Some(state)) = (body.copy(), backends.get(&mirror.name).cloned()) else {
        tracing::debug!(mirror = %mirror.name, "request not mirrored: body streams or backend unknown");
        return;
    };
    let Ok(permit) = Arc::clone(&inner.mirrors).try_acquire_owned() else {
        tracing::debug!(mirror = %mirror.name, "request not mirrored: too many mirrors in flight");
        return;
    };
    let (method, uri, headers, h2) = request;
    let Some(ep) = state.pick(None, &[]) else { return };
    if let Some(gate) = &inner.admission
        && let Err(refusal) = gate.admit(down, &ep.endpoint)
    {
        tracing::debug!(mirror = %mirror.name, %refusal, "request not mirrored");
        return;
    }
    let wire = inner.pool.wire(mirror.protocol, h2, ep.endpoint.address);
    let req = upstream_request(method, uri, headers, wire.is_h2(), copy, ep.endpoint.address);
    let inner = Arc::clone(inner);
    tokio::spawn(async move {
        let _permit = permit;
        let _in_flight = ep.start();
        let traffic = state.traffic();
        let exchange = async {
            let resp = inner.pool.send(&state, &ep, &traffic, wire, req).await?;
            let mut body = resp.into_body();
            // Read and discard, frame by frame, so the connection can be reused.
            while let Some(Ok(_)) = body.frame().await {}
            Ok::<_, SendError>(())
        };
        if let Ok(Err(e)) = tokio::time::timeout(MIRROR_TIMEOUT, exchange).await {
            tracing::debug!(error = %e, "mirror failed");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_stays() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert(PROXY_CONNECTION, HeaderValue::from_static("close"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(TE, HeaderValue::from_static("trailers, deflate"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-end-to-end"]);
        assert_eq!(h[TE], "trailers");

        // Nothing hop-by-hop: nothing changes (the fast path).
        let mut plain = HeaderMap::new();
        plain.insert(HOST, HeaderValue::from_static("web"));
        plain.insert("x-a", HeaderValue::from_static("1"));
        let before = plain.clone();
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain, before);
        // A lone transfer-encoding is caught by the same pass.
        plain.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain, before);
    }
}
