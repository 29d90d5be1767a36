//! Start-up and shutdown: load the kernel programs, put the policy in force, bind every
//! listener (a port conflict fails start-up), then serve until SIGTERM/SIGINT, and detach
//! everything on the way out.
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use std::os::fd::OwnedFd;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::datapath::Kernel;
use crate::datapath::pins::Pins;
use crate::enroll;
use crate::flows::FlowHub;
use crate::handoff::{self, NodeListeners};
use crate::metrics::Metrics;
use crate::pods::Pods;
use crate::policy_source::PolicySource;
use crate::proxy::ProxyCtx;

pub async fn run(config: Config) -> anyhow::Result<()> {
    tracing::info!(config = %serde_json::to_string(&config)?, "starting ztunnel");
    if config.insecure_plaintext {
        tracing::warn!(
            "--insecure-plaintext: no CA, no workload identities; traffic between pods is NOT encrypted and \
             identities are taken from addresses"
        );
    }
    let metrics = Arc::new(Metrics::default());
    process_limits(&metrics);
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("create state directory {}", config.state_dir.display()))?;
    let pins = Pins::prepare(&config.pin_dir).with_context(|| format!("pin directory {}", config.pin_dir.display()))?;
    let kernel = Kernel::load(pins, config.ca_addr.is_some()).context("loading the kernel programs")?;
    // A running predecessor hands over its listeners (upgrade); it stops writing the maps
    // before it answers, so this process owns them from here on.
    let handoff_socket = config.state_dir.join("handoff.sock");
    let inherited = {
        let socket = handoff_socket.clone();
        tokio::task::spawn_blocking(move || handoff::take_over(&socket))
            .await?
            .context("taking over from the running ztunnel")?
    };
    if inherited.is_some() {
        tracing::info!("took over the listeners of the running ztunnel");
    }
    let retire = kernel.policy.retire_switch();
    let (mut policy, snapshot) =
        PolicySource::new(config.policy.clone(), config.trust_domain.clone(), kernel.policy, metrics.clone());
    let generations = policy.generations();
    // Set once a successor took over: from then on its state files are the successor's.
    let handed_over_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let last_rejected = policy.last_rejected();
    let mesh = match config.ca_addr {
        Some(addr) => Some(mesh(&config, addr).context("identity set-up")?),
        None => None,
    };
    // Files, polled; or the control plane's stream (which owns the source from here on); its
    // trust bundle follows the CA's (root rotations).
    let (files, control_plane) = if config.control_plane.is_empty() {
        let stats = policy.reload().await.context("initial policy")?;
        tracing::info!(stats = ?stats, "policy in force");
        (Some(policy), None)
    } else {
        let bundle = mesh.as_ref().map(|m| m.secrets.watch_bundle());
        let task = crate::config_client::start(&config, policy, handed_over_flag.clone(), bundle).await;
        (None, Some(task.context("control plane")?))
    };

    let hub = Arc::new(FlowHub::new(config.node.clone(), metrics.clone(), snapshot.clone(), generations));
    let ctx = Arc::new(ProxyCtx {
        hub: hub.clone(),
        metrics: metrics.clone(),
        orig_dst: kernel.orig_dst,
        snapshot: snapshot.clone(),
        mesh,
        connections: Arc::default(),
        health: Default::default(),
    });
    tokio::spawn(crate::connections::revalidate_on_change(ctx.connections.clone(), snapshot.clone()));
    let pods = Arc::new(Pods::new(kernel.capture, ctx.clone(), &config.state_dir));

    let (node_listeners, inherited_pods) = match inherited {
        Some(i) => (i.node, i.pods),
        None => (bind_node_listeners(&config).await?, Default::default()),
    };
    let kept = node_listeners.try_clone().context("duplicate node listeners")?;
    let events = tokio::spawn(crate::flows::drain_kernel_events(kernel.events, hub.clone()));
    let state = Arc::new(AdminState { config: config.clone(), ctx: ctx.clone(), pods: pods.clone(), last_rejected });
    // Pods first: readiness means every recorded pod is served again (requests wait in the
    // listeners' queues meanwhile).
    pods.restore(inherited_pods).await;
    let mut serving = Vec::new();
    let roles = [admin::Role::Admin, admin::Role::Metrics, admin::Role::Ready];
    for (fd, role) in [node_listeners.admin, node_listeners.metrics, node_listeners.ready].into_iter().zip(roles) {
        serving.push(tokio::spawn(admin::serve(tcp_listener(fd)?, state.clone(), role)));
    }
    serving.push(tokio::spawn(enroll::serve(unix_listener(node_listeners.enroll)?, pods.clone())));
    let policy_task = match files {
        Some(policy) => tokio::spawn(policy.watch(Duration::from_millis(config.policy_poll_ms))),
        None => control_plane.expect("one policy source"),
    };
    let handed_over = serve_successor(&handoff_socket, pods.clone(), kept, serving, events, retire)?;
    tracing::info!(node = %config.node, "ztunnel ready");

    let drain = tokio::select! {
        _ = palisade_mesh::signal::shutdown() => {
            tracing::info!(drain_secs = config.drain_secs, "shutting down: draining connections");
            pods.stop_accepting();
            Duration::from_secs(config.drain_secs)
        }
        successor = handed_over => {
            handed_over_flag.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(successor = ?successor.ok(), drain_secs = config.upgrade_drain_secs,
                "handed over to a new ztunnel: carrying established connections until they end");
            Duration::from_secs(config.upgrade_drain_secs)
        }
    };
    // SIGTERM during an upgrade drain does not cut it short: Kubernetes terminates the old pod
    // as soon as the new one is ready, and its grace period (SIGKILL) bounds the drain.
    let deadline = tokio::time::Instant::now() + drain;
    while ctx.metrics.active_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    policy_task.abort();
    // Nothing is detached: the pinned programs keep enforcing the last policy until the next
    // ztunnel adopts them (allowed connections are refused meanwhile, never let through).
    tracing::info!(still_active = ctx.metrics.active_connections(), "exiting; the kernel keeps enforcing");
    Ok(())
}

async fn bind_node_listeners(config: &Config) -> anyhow::Result<NodeListeners> {
    let bind = |addr: std::net::SocketAddr| async move {
        let l = TcpListener::bind(addr).await.with_context(|| format!("bind {addr}"))?;
        Ok::<_, anyhow::Error>(OwnedFd::from(l.into_std()?))
    };
    let enroll = enroll::bind(&config.enroll_socket)
        .with_context(|| format!("bind enrollment socket {}", config.enroll_socket.display()))?;
    Ok(NodeListeners {
        admin: bind(config.admin_addr).await?,
        metrics: bind(config.metrics_addr).await?,
        ready: bind(config.ready_addr).await?,
        enroll: OwnedFd::from(enroll.into_std()?),
    })
}

fn tcp_listener(fd: OwnedFd) -> std::io::Result<TcpListener> {
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

fn unix_listener(fd: OwnedFd) -> std::io::Result<tokio::net::UnixListener> {
    let l = std::os::unix::net::UnixListener::from(fd);
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l)
}

/// Listens for a successor on `socket`; the returned future completes once one took over.
/// Until then this process serves; after, it has stopped accepting, reading kernel events and
/// writing the maps, and only carries its established connections.
fn serve_successor(
    socket: &std::path::Path,
    pods: Arc<Pods>,
    node: NodeListeners,
    serving: Vec<tokio::task::JoinHandle<()>>,
    events: tokio::task::JoinHandle<()>,
    retire: crate::datapath::RetireSwitch,
) -> anyhow::Result<impl std::future::Future<Output = Result<u32, tokio::sync::oneshot::error::RecvError>>> {
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("bind hand-over socket {}", socket.display()))?;
    // Whoever connects here receives every listener: root only.
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let (done, handed_over) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut acceptor = palisade_mesh::accept::Acceptor::new("hand-over", listener);
        let (stream, successor) = loop {
            let (stream, _) = acceptor.accept().await;
            let Ok(mut stream) = stream.into_std().and_then(|s| s.set_nonblocking(false).map(|()| s)) else { continue };
            match tokio::task::spawn_blocking(move || handoff::read_request(&mut stream).map(|pid| (stream, pid))).await
            {
                Ok(Ok(accepted)) => break accepted,
                Ok(Err(e)) => tracing::warn!(error = %e, "hand-over request refused"),
                Err(e) => tracing::warn!(error = %e, "hand-over task failed"),
            }
        };
        // From here the listeners leave this process, whatever happens to the exchange.
        let sent = tokio::task::spawn_blocking(move || {
            retire.retire();
            events.abort();
            serving.iter().for_each(tokio::task::JoinHandle::abort);
            handoff::send_listeners(stream, node, pods.hand_over())
        })
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "hand-over failed after this ztunnel stopped accepting"),
            Err(e) => tracing::error!(error = %e, "hand-over task failed"),
        }
        let _ = done.send(successor);
    });
    Ok(handed_over)
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

/// Descriptor limit, malloc arenas (see `limits`; `main` applies them once before the runtime
/// starts, so that its threads share the capped arenas) and the memory trimmer.
fn process_limits(metrics: &Arc<Metrics>) {
    crate::limits::init_process();
    let metrics = metrics.clone();
    tokio::spawn(crate::limits::trim_memory_after_activity(move || metrics.closed_connections()));
}
