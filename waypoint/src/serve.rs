//! One downstream connection: the engine-wide connection limit (over it the connection is
//! closed at once, never queued), protocol detection, then hyper (HTTP/1.1 or HTTP/2, with
//! header size, header count, header read and idle bounds; HTTP/1.1 upgrades are handed to
//! `upgrade`) or a TCP pass-through to the Service's default backend under L4 authorization.
//! The connection's unit of the limit travels with its transport, so an upgraded connection,
//! which outlives hyper's, keeps holding it.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::time::Instant;

use crate::access_log::{self, AccessRecord};
use crate::authz::{self, Attributes};
use crate::detect::{self, Activity, Prefixed, Protocol, Watched};
use crate::engine::{Downstream, Inner};
use crate::forward::hash_key;
use crate::outlier::Outcome;
use crate::upstream::Io;

/// Time a connection closing for idleness gets to finish what it is writing.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// One downstream connection's unit of the engine's limit and its place in the gauge.
struct Open {
    inner: Arc<Inner>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.inner.metrics.connections.dec();
    }
}

pub(crate) async fn serve<I: Io + 'static>(inner: Arc<Inner>, mut io: I, down: Downstream) {
    let Ok(permit) = Arc::clone(&inner.connections).try_acquire_owned() else {
        inner.metrics.refused.inc();
        tracing::debug!(peer = %down.peer, "downstream connection refused: engine at its connection limit");
        return;
    };
    inner.metrics.connections.inc();
    let open = Open { inner: Arc::clone(&inner), _permit: permit };
    let (protocol, prefix) = detect::sniff(&mut io, inner.settings.header_read_timeout).await;
    let activity = Activity::default();
    let io = Watched::new(Prefixed::new(prefix, io), activity.clone()).holding(Box::new(open));
    match protocol {
        Some(Protocol::Http) => serve_http(&inner, io, down, activity).await,
        Some(Protocol::Tcp) => passthrough(&inner, io, down, activity).await,
        None => tracing::debug!(peer = %down.peer, "downstream closed or stalled before its protocol was known"),
    }
}

/// Resolves once no byte has moved either way for `limit`. Requests in flight do not
/// hold the connection open on their own: a client that stalls mid-body, or a backend that
/// never answers, is cut like an idle connection (Envoy's stream idle timeout, also five
/// minutes by default). Streaming responses keep it open by moving bytes.
pub(crate) async fn idle(activity: &Activity, limit: Duration) {
    let period = (limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
    loop {
        tokio::time::sleep(period).await;
        if activity.idle_for() >= limit {
            return;
        }
    }
}

async fn serve_http<I: Io + 'static>(inner: &Arc<Inner>, io: I, down: Downstream, activity: Activity) {
    let s = &inner.settings;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(s.header_read_timeout)
        .max_buf_size(s.max_header_bytes.max(8192))
        .max_headers(s.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(s.max_concurrent_streams)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let down = Arc::new(down);
    let service = {
        let (inner, down) = (Arc::clone(inner), Arc::clone(&down));
        service_fn(move |req| {
            let (inner, down) = (Arc::clone(&inner), Arc::clone(&down));
            async move {
                if req.method() == http::Method::CONNECT {
                    return Ok::<_, Infallible>(crate::upgrade::refuse_connect(&inner, &down, &req));
                }
                Ok(crate::proxy::handle(inner, down, req).await)
            }
        })
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(peer = %down.peer, error = %e, "downstream HTTP connection ended");
            }
        }
        () = idle(&activity, s.idle_timeout) => {
            tracing::debug!(peer = %down.peer, "downstream HTTP connection idle; closing");
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await;
        }
    }
}

/// Non-HTTP traffic: L4 authorization, then bytes both ways to one endpoint of the
/// Service's default backend.
async fn passthrough<I: Io>(inner: &Inner, mut io: I, down: Downstream, activity: Activity) {
    let start = Instant::now();
    let mut rec = AccessRecord {
        source_identity: down.identity.clone(),
        source: Some(down.peer),
        destination: Some(down.destination),
        protocol: "tcp",
        authz_verdict: "none",
        ..Default::default()
    };
    let snapshot = inner.snapshot();
    let emit = |mut rec: AccessRecord| {
        rec.duration = start.elapsed();
        access_log::emit(rec, &inner.recent, &inner.access);
    };
    let Some(svc) = snapshot.services.get(&down.destination) else { return emit(rec) };
    rec.service = Some(Arc::clone(&svc.name));
    let attrs = Attributes {
        source_ip: down.peer.ip(),
        principal: down.identity.as_deref().map(Attributes::principal_of),
        destination_port: down.destination.port(),
        http: None,
    };
    let decision = authz::authorize(&svc.config.authorization, &attrs);
    rec.authz_verdict = if decision.allowed { "allow" } else { "deny" };
    rec.authz_rule = decision.rule;
    if !decision.allowed {
        return emit(rec);
    }
    let backend = &svc.config.default_backend;
    let Some(state) = snapshot.backends.get(&backend.name) else {
        rec.backend = Some(backend.name.as_str().into());
        return emit(rec);
    };
    rec.backend = Some(Arc::clone(&state.name));
    let traffic = state.traffic();
    let Some(ep) = state.pick(hash_key(&traffic, &http::HeaderMap::new(), down.peer), &[]) else { return emit(rec) };
    rec.upstream(&ep);
    rec.attempts = 1;
    if let Some(gate) = &inner.admission
        && let Err(refusal) = gate.admit(&down, &ep.endpoint)
    {
        tracing::debug!(%refusal, "TCP pass-through refused by the destination's L4 policy");
        rec.authz_verdict = "deny";
        rec.authz_rule = Some(format!("l4:{}", refusal.rule));
        return emit(rec);
    }
    let _in_flight = ep.start();
    let (mut upstream, _connection) = match inner.pool.open(state, &ep, &traffic).await {
        Ok(opened) => opened,
        Err(e) => {
            tracing::debug!(error = %e, "TCP pass-through: upstream connect failed");
            if !matches!(e, crate::pool::SendError::Overflow(_)) && state.record(&ep, Outcome::Failed) {
                inner.metrics.ejections.inc();
            }
            return emit(rec);
        }
    };
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut io, &mut upstream) => {
            rec.complete = result.is_ok();
        }
        () = idle(&activity, inner.settings.idle_timeout) => {}
    }
    emit(rec);
}
