//! The admin API (15000), metrics (15020) and readiness (15021): one small HTTP/1.1 service
//! on three listeners, each answering only for its [`Role`].
//!
//! The admin listener (localhost only) serves everything:
//! - `GET /flows` — recent flow events as a JSON array; `/flows?follow=1` streams new events
//!   live, one JSON object per line.
//! - `GET /config_dump` — configuration, policy in force, enrolled pods.
//! - `GET /metrics` (alias `/stats/prometheus`) — Prometheus text format.
//! - `GET /healthz/ready` — 200 once ztunnel serves.
//!
//! The metrics and readiness listeners bind every address (Prometheus and the kubelet reach
//! them from outside the node), so they answer only `/metrics` and `/healthz/ready`
//! respectively: flows and the config dump name every workload, identity and rule of the
//! node and must not be readable from pods or the node network.
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response, StatusCode, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

use crate::config::Config;
use crate::pods::Pods;
use crate::proxy::ProxyCtx;

pub struct AdminState {
    pub config: Config,
    pub ctx: Arc<ProxyCtx>,
    pub pods: Arc<Pods>,
    /// The last policy refused (see `policy_source`).
    pub last_rejected: Arc<crate::policy_source::LastRejected>,
}

type RespBody = BoxBody<Bytes, Infallible>;

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Every endpoint; bound to localhost.
    Admin,
    /// Prometheus metrics only.
    Metrics,
    /// The readiness probe only.
    Ready,
}

impl Role {
    /// Whether a listener of this role answers `path`.
    fn serves(self, path: &str) -> bool {
        match self {
            Role::Admin => true,
            Role::Metrics => matches!(path, "/metrics" | "/stats/prometheus"),
            Role::Ready => path == "/healthz/ready",
        }
    }
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>, role: Role) {
    if role == Role::Admin && listener.local_addr().is_ok_and(|a| !a.ip().is_loopback()) {
        tracing::warn!(addr = ?listener.local_addr().ok(), "the admin API (flows, config dump) listens beyond localhost");
    }
    let name = format!("admin {}", listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()));
    let mut acceptor = palisade_mesh::accept::Acceptor::new(name, listener);
    loop {
        let (stream, _) = acceptor.accept().await;
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, role, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<RespBody> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()).boxed())
        .expect("static response parts")
}

fn json(value: &impl serde::Serialize) -> Response<RespBody> {
    let mut body = serde_json::to_vec_pretty(value).expect("serializable");
    body.push(b'\n');
    full(StatusCode::OK, "application/json", body)
}

fn not_found(path: &str) -> Response<RespBody> {
    full(StatusCode::NOT_FOUND, "text/plain", format!("no such endpoint: {path}\n"))
}

fn route(state: &AdminState, role: Role, req: Request<Incoming>) -> Response<RespBody> {
    let path = req.uri().path();
    if !role.serves(path) {
        return not_found(path);
    }
    let follow = req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv == "follow=1" || kv == "follow=true"));
    match path {
        "/flows" if follow => live_flows(state.ctx.hub.subscribe()),
        "/flows" => json(&state.ctx.hub.recent()),
        "/config_dump" => {
            let snapshot = state.ctx.snapshot.borrow().clone();
            let (certificates, pool) = match &state.ctx.mesh {
                Some(mesh) => (
                    mesh.secrets
                        .identities()
                        .into_iter()
                        .map(|(id, not_after)| serde_json::json!({"identity": id, "not_after": not_after}))
                        .collect(),
                    mesh.pool
                        .connections()
                        .into_iter()
                        .map(|(k, n)| serde_json::json!({"src": k.src, "dst": k.dst, "endpoint": k.endpoint, "connections": n}))
                        .collect(),
                ),
                None => (vec![], vec![]),
            };
            json(&serde_json::json!({
                "config": state.config,
                "policy_generation": state.ctx.metrics.policy_generation.load(std::sync::atomic::Ordering::Relaxed),
                "policy": &*snapshot,
                // What was refused, when, why (file:line: field: reason), and what stayed.
                "last_rejected_policy": &*state.last_rejected.lock().expect("rejection lock"),
                "pods": state.pods.list(),
                "certificates": certificates,
                "trust_bundle_roots": state.ctx.mesh.as_ref().map(|m| m.secrets.bundle().roots.len()),
                "hbone_pool": pool,
            }))
        }
        "/metrics" | "/stats/prometheus" => {
            let mut text = state.ctx.metrics.render();
            if let Some(mesh) = &state.ctx.mesh {
                let pooled: usize = mesh.pool.connections().iter().map(|(_, n)| n).sum();
                text.push_str(&format!(
                    "# HELP palisade_hbone_connections_opened_total HBONE connections opened by the pool.\n\
                     # TYPE palisade_hbone_connections_opened_total counter\n\
                     palisade_hbone_connections_opened_total {}\n\
                     # HELP palisade_hbone_pooled_connections HBONE connections in the pool now.\n\
                     # TYPE palisade_hbone_pooled_connections gauge\n\
                     palisade_hbone_pooled_connections {pooled}\n",
                    mesh.pool.opened_total()
                ));
            }
            full(StatusCode::OK, "text/plain; version=0.0.4", text)
        }
        "/healthz/ready" => full(StatusCode::OK, "text/plain", "ready\n"),
        other => not_found(other),
    }
}

/// Streams flow events as JSON lines until the client goes away.
fn live_flows(mut events: broadcast::Receiver<Arc<crate::flows::FlowEvent>>) -> Response<RespBody> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        loop {
            let line = match events.recv().await {
                Ok(e) => serde_json::to_string(&*e).expect("flow serializes"),
                Err(broadcast::error::RecvError::Lagged(n)) => format!("{{\"lagged\":{n}}}"),
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(Bytes::from(line + "\n")).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(ChannelBody(rx).boxed())
        .expect("static response parts")
}

struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}
