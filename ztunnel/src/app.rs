//! Start-up and shutdown: load the kernel programs, put the policy in force, bind every
//! listener (a port conflict fails start-up), then serve until SIGTERM/SIGINT, and detach
//! everything on the way out.
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::datapath::Kernel;
use crate::enroll;
use crate::flows::FlowHub;
use crate::metrics::Metrics;
use crate::pods::Pods;
use crate::policy_source::PolicySource;
use crate::proxy::ProxyCtx;

pub async fn run(config: Config) -> anyhow::Result<()> {
    tracing::info!(config = %serde_json::to_string(&config)?, "starting ztunnel");
    let kernel = Kernel::load().context("loading the kernel programs")?;
    let metrics = Arc::new(Metrics::default());
    let (mut policy, snapshot) = PolicySource::new(config.policy.clone(), kernel.policy, metrics.clone());
    let stats = policy.reload().await.context("initial policy")?;
    tracing::info!(stats = ?stats, "policy in force");

    let hub = Arc::new(FlowHub::new(config.node.clone(), metrics.clone(), snapshot.clone()));
    let ctx = Arc::new(ProxyCtx { hub: hub.clone(), metrics: metrics.clone(), orig_dst: kernel.orig_dst });
    let pods = Arc::new(Pods::new(kernel.capture, ctx, snapshot.clone()));

    let bind = |addr| async move { TcpListener::bind(addr).await.with_context(|| format!("bind {addr}")) };
    let listeners = [bind(config.admin_addr).await?, bind(config.metrics_addr).await?, bind(config.ready_addr).await?];
    let enroll_listener = enroll::bind(&config.enroll_socket)
        .with_context(|| format!("bind enrollment socket {}", config.enroll_socket.display()))?;

    let events = tokio::spawn(crate::flows::drain_kernel_events(kernel.events, hub.clone()));
    let state = Arc::new(AdminState { config: config.clone(), hub, metrics, pods: pods.clone(), snapshot });
    for l in listeners {
        tokio::spawn(admin::serve(l, state.clone()));
    }
    tokio::spawn(enroll::serve(enroll_listener, pods.clone()));
    tokio::spawn(policy.watch(Duration::from_millis(config.policy_poll_ms)));
    tracing::info!(node = %config.node, "ztunnel ready");

    shutdown_signal().await;
    tracing::info!("shutting down: detaching programs");
    pods.shutdown();
    events.abort();
    let _ = std::fs::remove_file(&config.enroll_socket);
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
