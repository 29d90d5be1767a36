//! The admin listener: `/metrics` (Prometheus text) and `/ready` (200 once the certificate,
//! the configuration and the HBONE listener are in place; 503 before and while draining).
//! Anything else is a 404: nothing here names policy contents. The debug listener (localhost
//! only) serves `/flows` ([`super::flows`]) and nothing else.
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use palisade_mesh::accept::Acceptor;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Admin connections served at once; more are closed on arrival.
const MAX_CONNECTIONS: usize = 64;
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

pub struct AdminState {
    pub registry: Registry,
    pub ready: AtomicBool,
}

impl AdminState {
    /// `registry` plus the process's own metrics (the log writer's dropped lines).
    pub fn new(mut registry: Registry) -> Self {
        registry.register(
            "waypoint_log_lines_dropped",
            "Log and access-log lines dropped because the log writer could not keep up",
            DroppedLogLines,
        );
        AdminState { registry, ready: false.into() }
    }
}

/// Read at each scrape from [`palisade_mesh::logging::dropped_lines`].
#[derive(Debug)]
struct DroppedLogLines;

impl prometheus_client::encoding::EncodeMetric for DroppedLogLines {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(
            &palisade_mesh::logging::dropped_lines(),
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Counter
    }
}

/// What one listener serves.
pub enum Served {
    /// `/metrics` and `/ready`.
    Public(Arc<AdminState>),
    /// `/flows`.
    Debug(crate::engine::Engine),
}

fn answer(served: &Served, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let state = match served {
        Served::Public(state) => state,
        Served::Debug(engine) => {
            let (status, body) = match req.uri().path() {
                "/flows" => (StatusCode::OK, super::flows::json(&engine.recent_records())),
                _ => (StatusCode::NOT_FOUND, "not found\n".into()),
            };
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = status;
            return resp;
        }
    };
    let (status, body) = match req.uri().path() {
        "/metrics" | "/stats/prometheus" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
                Ok(()) => (StatusCode::OK, text),
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")),
            }
        }
        "/ready" | "/healthz/ready" if state.ready.load(Ordering::Acquire) => (StatusCode::OK, "ready\n".into()),
        "/ready" | "/healthz/ready" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

pub async fn serve(listener: TcpListener, state: Arc<Served>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut acceptor = Acceptor::new("admin", listener);
    loop {
        let (tcp, _) = acceptor.accept().await;
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else { continue };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let resp = answer(&state, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}
