//! One HTTP request through the waypoint, in order: service by destination, trace context,
//! authorization, route, redirect/rewrite/header filters, backend choice, the backend's
//! active-request limit, mirror, then attempts (balance, pool, outlier, retry) under the
//! request timeout. Written as one plain async function over small helpers rather than a
//! tower stack: each step needs the previous steps' results (the matched route decides the
//! backend, whose policy decides the balancer, limits and retries), which tower layers could
//! only pass through request extensions, and the order is easier to read here top to bottom.
use std::sync::Arc;

use http::header::HOST;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use palisade_model::waypoint::config::{Backend, Filter, Route};
use tokio::time::Instant;

use crate::access_log::{self, AccessRecord};
use crate::authz::{self, Attributes, Http};
use crate::body::{ProxyBody, Tracked, boxed, full};
use crate::engine::{Downstream, Inner};
use crate::filters;
use crate::forward::{AttemptError, Attempted, Target, attempt, hash_key, spawn_mirror, strip_hop_by_hop};
use crate::limits::{Limit, OVERFLOW_HEADER, Overflow};
use crate::metrics::{OverflowLabels, RequestLabels};
use crate::pool::SendError;
use crate::retry::RequestBody;
use crate::route::choose_backend;
use crate::trace;

/// Answers of the waypoint itself, which say what happened and nothing of policy contents.
const DENIED: &str = "RBAC: access denied\n";

/// A request being served: its access record and start time.
struct Exchange {
    inner: Arc<Inner>,
    rec: AccessRecord,
    start: Instant,
}

/// The label value of a name a request never reached (no service, route or backend).
fn none() -> Arc<str> {
    Arc::from("")
}

pub(crate) fn finish(inner: &Inner, mut rec: AccessRecord, start: Instant) {
    rec.duration = start.elapsed();
    let labels = RequestLabels {
        service: rec.service.clone().unwrap_or_else(none),
        route: rec.route.clone().unwrap_or_else(none),
        backend: rec.backend.clone().unwrap_or_else(none),
        status: rec.status,
    };
    inner.metrics.requests.get_or_create(&labels).inc();
    inner.metrics.duration.get_or_create(&labels).observe(rec.duration.as_secs_f64());
    access_log::emit(rec, &inner.recent, &inner.access);
}

/// Counts an answer of a circuit-breaker limit (by backend and limit) and names the limit in
/// the request's access record.
pub(crate) fn count_overflow(inner: &Inner, rec: &mut AccessRecord, o: &Overflow) {
    let labels = OverflowLabels { backend: rec.backend.clone().unwrap_or_else(none), limit: o.limit.name().into() };
    inner.metrics.overflows.get_or_create(&labels).inc();
    rec.overflow = Some(o.limit.name());
}

/// What finishes a request whose response body streams: called by the body's tracker with
/// whether the body reached its end.
pub(crate) fn finisher(inner: Arc<Inner>, mut rec: AccessRecord, start: Instant) -> impl FnOnce(bool) + Send + Unpin {
    move |complete| {
        rec.complete = complete;
        finish(&inner, rec, start);
    }
}

impl Exchange {
    /// An answer of the waypoint's own (no upstream response).
    fn local(mut self, status: StatusCode, body: &'static str) -> Response<ProxyBody> {
        self.rec.status = status.as_u16();
        self.rec.complete = true;
        finish(&self.inner, self.rec, self.start);
        let mut resp = Response::new(full(body));
        *resp.status_mut() = status;
        resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        resp
    }

    fn overflow(mut self, o: Overflow) -> Response<ProxyBody> {
        count_overflow(&self.inner, &mut self.rec, &o);
        let mut resp = self.local(StatusCode::SERVICE_UNAVAILABLE, "upstream overflow\n");
        resp.headers_mut().insert(OVERFLOW_HEADER, HeaderValue::from_static(o.limit.name()));
        resp
    }
}

pub(crate) async fn handle(
    inner: Arc<Inner>,
    down: Arc<Downstream>,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let rec = AccessRecord::of_request(&down, &req);
    let mut ex = Exchange { inner: Arc::clone(&inner), rec, start: Instant::now() };
    let snapshot = inner.snapshot();
    let Some(svc) = snapshot.services.get(&down.destination).cloned() else {
        return ex.local(StatusCode::NOT_FOUND, "no service at this address\n");
    };
    ex.rec.service = Some(Arc::clone(&svc.name));
    ex.rec.trace_id = Some(trace::propagate(req.headers_mut()));

    let host = filters::request_host(req.uri(), req.headers());
    let attrs = Attributes {
        source_ip: down.peer.ip(),
        principal: down.identity.as_deref().map(Attributes::principal_of),
        destination_port: down.destination.port(),
        http: Some(Http { method: req.method().as_str(), path: req.uri().path(), host, headers: req.headers() }),
    };
    let decision = authz::authorize(&svc.config.authorization, &attrs);
    for rule in &decision.audited {
        tracing::info!(target: "access", audit = %rule, service = %svc.config.service, path = %ex.rec.path, "audit");
    }
    ex.rec.authz_verdict = if decision.allowed { "allow" } else { "deny" };
    ex.rec.authz_rule = decision.rule;
    if !decision.allowed {
        return ex.local(StatusCode::FORBIDDEN, DENIED);
    }

    let (route, prefix): (&Route, Option<String>) = match svc.routes.find(req.method(), req.uri(), req.headers()) {
        Some(m) => {
            ex.rec.route = Some(Arc::clone(&m.route.name));
            (&m.route.route, m.prefix.map(str::to_string))
        }
        None => return ex.local(StatusCode::NOT_FOUND, "no route\n"),
    };

    let mut response_headers = None;
    let mut mirrors = Vec::new();
    for filter in &route.filters {
        match filter {
            Filter::Redirect(r) => {
                let resp = filters::redirect(r, req.uri(), req.headers(), prefix.as_deref());
                ex.rec.status = resp.status().as_u16();
                ex.rec.complete = true;
                finish(&inner, ex.rec, ex.start);
                return resp;
            }
            Filter::RequestHeaders(m) => filters::modify_headers(m, req.headers_mut()),
            Filter::ResponseHeaders(m) => response_headers = Some(m),
            Filter::Rewrite(rw) => {
                if let Some(p) = &rw.path {
                    let path = filters::rewrite_path(p, req.uri().path(), prefix.as_deref());
                    *req.uri_mut() = filters::with_path(req.uri(), &path);
                }
                if let Some(h) = rw.hostname.as_deref().and_then(|h| HeaderValue::from_str(h).ok()) {
                    req.headers_mut().insert(HOST, h);
                    let mut parts = req.uri().clone().into_parts();
                    if parts.authority.is_some() {
                        parts.authority = rw.hostname.as_deref().and_then(|h| h.parse().ok());
                        *req.uri_mut() = Uri::from_parts(parts).unwrap_or_else(|_| req.uri().clone());
                    }
                }
            }
            Filter::Mirror(b) => mirrors.push(b),
        }
    }

    // A rule without backends (the default route among them) sends to the Service itself, as
    // a GAMMA route attached to its own Service does.
    let backend: &Backend = if route.backends.is_empty() {
        &svc.config.default_backend
    } else {
        match choose_backend(&route.backends) {
            Some(b) => &b.backend,
            None => return ex.local(StatusCode::INTERNAL_SERVER_ERROR, "no backend with weight\n"),
        }
    };
    let Some(state) = snapshot.backends.get(&backend.name).cloned() else {
        ex.rec.backend = Some(backend.name.as_str().into());
        return ex.local(StatusCode::SERVICE_UNAVAILABLE, "backend unknown\n");
    };
    ex.rec.backend = Some(Arc::clone(&state.name));
    let traffic = state.traffic();
    let active = match state.counters.acquire(Limit::ActiveRequests, traffic.limits.max_active_requests) {
        Ok(g) => g,
        Err(o) => return ex.overflow(o),
    };
    let key = hash_key(&traffic, req.headers(), down.peer);
    if crate::upgrade::wanted(&req) {
        let (inner, timeout, rec, start) = (&inner, route.backend_timeout, ex.rec, ex.start);
        let x = crate::upgrade::Exchange {
            inner,
            down: &down,
            state: &state,
            traffic: &traffic,
            key,
            timeout,
            response_headers,
            active,
            rec,
            start,
        };
        return crate::upgrade::forward(x, req).await;
    }

    let (parts, body) = req.into_parts();
    let want_copy = route.retry.is_some() || !mirrors.is_empty();
    let mut body = match RequestBody::prepare(body, want_copy, inner.settings.replay_limit).await {
        Ok(b) => b,
        Err(_) => return ex.local(StatusCode::BAD_REQUEST, "request body could not be read\n"),
    };
    let h2 = parts.version == Version::HTTP_2;
    for mirror in mirrors {
        spawn_mirror(&inner, &down, &snapshot.backends, mirror, (&parts.method, &parts.uri, &parts.headers, h2), &body);
    }

    let deadline = route.request_timeout.map(|t| (ex.start + t, t));
    let target = Target {
        inner: &inner,
        down: &down,
        state: &state,
        traffic: &traffic,
        route,
        key,
        h2,
        protocol: backend.protocol,
        method: &parts.method,
        uri: &parts.uri,
        headers: &parts.headers,
    };
    let attempts = attempt(&target, &mut body);
    let Attempted { result, endpoint, in_flight, tries, retry_overflow } = match deadline {
        Some((at, _)) => match tokio::time::timeout_at(at, attempts).await {
            Ok(r) => r,
            Err(_) => return ex.local(StatusCode::GATEWAY_TIMEOUT, "request timeout\n"),
        },
        None => attempts.await,
    };
    ex.rec.attempts = tries;
    if let Some(ep) = &endpoint {
        ex.rec.upstream(ep);
    }
    if let Some(o) = retry_overflow {
        // The retry budget is spent: the failed attempt's answer goes back, marked with the
        // limit so the client and the log can tell why it was not retried.
        if result.is_err() {
            return ex.overflow(o);
        }
        count_overflow(&inner, &mut ex.rec, &o);
    }
    let resp = match result {
        Ok(resp) => resp,
        Err(AttemptError::NoEndpoint) => return ex.local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n"),
        Err(AttemptError::Send(SendError::Overflow(o))) => return ex.overflow(o),
        Err(AttemptError::Send(e)) if e.before_sending() => {
            tracing::debug!(error = %e, "upstream connect failed");
            return ex.local(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error\n");
        }
        Err(AttemptError::Send(e)) => {
            tracing::debug!(error = %e, "upstream request failed");
            return ex.local(StatusCode::BAD_GATEWAY, "upstream reset\n");
        }
        Err(AttemptError::Timeout) => return ex.local(StatusCode::GATEWAY_TIMEOUT, "upstream timeout\n"),
        Err(AttemptError::Denied(refusal)) => {
            tracing::debug!(%refusal, "request refused by the destination's L4 policy");
            ex.rec.authz_verdict = "deny";
            ex.rec.authz_rule = Some(format!("l4:{}", refusal.rule));
            return ex.local(StatusCode::FORBIDDEN, DENIED);
        }
    };

    let (mut head, upstream_body) = resp.into_parts();
    strip_hop_by_hop(&mut head.headers);
    if let Some(limit) = ex.rec.overflow {
        head.headers.insert(OVERFLOW_HEADER, HeaderValue::from_static(limit));
    }
    if let Some(m) = response_headers {
        filters::modify_headers(m, &mut head.headers);
    }
    ex.rec.status = head.status.as_u16();
    let on_finish = finisher(Arc::clone(&inner), ex.rec, ex.start);
    let mut tracked = Tracked::new(upstream_body, (active, in_flight), on_finish);
    if let Some((at, timeout)) = deadline {
        tracked = tracked.with_deadline(at, timeout);
    }
    Response::from_parts(head, boxed(tracked))
}
