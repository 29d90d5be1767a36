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
    raise_fd_limit();
    let kernel = Kernel::load().context("loading the kernel programs")?;
    let metrics = Arc::new(Metrics::default());
    let (mut policy, snapshot) =
        PolicySource::new(config.policy.clone(), config.trust_domain.clone(), kernel.policy, metrics.clone());
    let stats = policy.reload().await.context("initial policy")?;
    tracing::info!(stats = ?stats, "policy in force");

    let hub = Arc::new(FlowHub::new(config.node.clone(), metrics.clone(), snapshot.clone()));
    let mesh = match config.ca_addr {
        Some(addr) => Some(mesh(&config, addr).context("identity set-up")?),
        None => {
            tracing::warn!(
                "no CA configured (--ca-addr): no workload identities; traffic between pods is NOT encrypted"
            );
            None
        }
    };
    let ctx = Arc::new(ProxyCtx {
        hub: hub.clone(),
        metrics: metrics.clone(),
        orig_dst: kernel.orig_dst,
        snapshot: snapshot.clone(),
        mesh,
        connections: Arc::default(),
    });
    tokio::spawn(crate::connections::revalidate_on_change(ctx.connections.clone(), snapshot.clone()));
    let pods = Arc::new(Pods::new(kernel.capture, ctx.clone()));

    let bind = |addr| async move { TcpListener::bind(addr).await.with_context(|| format!("bind {addr}")) };
    let listeners = [bind(config.admin_addr).await?, bind(config.metrics_addr).await?, bind(config.ready_addr).await?];
    let enroll_listener = enroll::bind(&config.enroll_socket)
        .with_context(|| format!("bind enrollment socket {}", config.enroll_socket.display()))?;

    let events = tokio::spawn(crate::flows::drain_kernel_events(kernel.events, hub.clone()));
    let state = Arc::new(AdminState { config: config.clone(), ctx: ctx.clone(), pods: pods.clone() });
    for l in listeners {
        tokio::spawn(admin::serve(l, state.clone()));
    }
    tokio::spawn(enroll::serve(enroll_listener, pods.clone()));
    tokio::spawn(policy.watch(Duration::from_millis(config.policy_poll_ms)));
    tracing::info!(node = %config.node, "ztunnel ready");

    shutdown_signal().await;
    tracing::info!(drain_secs = config.drain_secs, "shutting down: draining connections");
    pods.stop_accepting();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(config.drain_secs);
    while ctx.metrics.active_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(still_active = ctx.metrics.active_connections(), "detaching programs");
    pods.shutdown();
    events.abort();
    let _ = std::fs::remove_file(&config.enroll_socket);
    Ok(())
}

/// Node credential, trust bundle, CA client, certificate manager and HBONE pool.
fn mesh(config: &Config, ca_addr: std::net::SocketAddr) -> anyhow::Result<crate::proxy::hbone::Mesh> {
    use palisade_mesh::tls::{Credential, CredentialSlot, TrustBundle};
    let dir = &config.node_credential_dir;
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).with_context(|| format!("read {}", dir.join(name).display()))
    };
    let node = Credential::from_pem(&read("node.pem")?, &read("node-key.pem")?)?;
    tracing::info!(node = %node.uri, not_after = ?node.not_after, "node credential loaded");
    let bundle = TrustBundle::from_pem(&read("bundle.pem")?, &config.trust_domain)?;
    let client = palisade_mesh::ca_client::CaClient::new(ca_addr, CredentialSlot::new(node));
    let secrets = palisade_mesh::secrets::SecretManager::new(Arc::new(client), bundle);
    secrets.refresh_bundle_every(Duration::from_secs(config.bundle_refresh_secs.max(1)));
    let pool = palisade_mesh::hbone::pool::Pool::new(Default::default());
    Ok(crate::proxy::hbone::Mesh { secrets, pool, trust_domain: config.trust_domain.clone() })
}

/// Every proxied connection holds two sockets (four with HBONE); lift the soft limit on open
/// files to the hard one.
fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
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
