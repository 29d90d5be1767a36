//! The `waypoint` process: identity from the CA, configuration from the resources, the engine
//! behind an HBONE listener, the admin listener; until SIGTERM/SIGINT, then a drain.
//!
//! Identity: the waypoint is a workload of its own (`--namespace`, `--service-account`). Its
//! certificate manager (`mesh::secrets`, as ztunnel's for its pods) generates the key here,
//! asks the CA to sign `spiffe://<td>/ns/<ns>/sa/<sa>` and renews at half life. What it shows
//! the CA is in [`credential`]: a credential bound to that one identity (the CA renews a
//! waypoint's identity for its own certificate, nothing else), or its node's (compatibility).
pub mod admin;
pub mod config;
pub mod credential;
pub mod flows;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use palisade_mesh::hbone::pool::Pool;
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::secrets::SecretManager;
use palisade_mesh::tls::TrustBundle;
use palisade_model::load::ChangeDetector;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::hbone::{self, HboneUpstream};
use crate::policy::{self, L4Policy};
use crate::{Engine, Settings};
use admin::{AdminState, Served};
pub use config::Config;
use credential::CaCredential;

pub async fn run(config: Config) -> anyhow::Result<()> {
    tracing::info!(config = %serde_json::to_string(&config)?, "starting waypoint");
    let identity = SpiffeId::new(&config.trust_domain, &config.namespace, &config.service_account);
    let name = config.waypoint_name();

    // Listeners first, so a port conflict fails start-up before anything else is asked for.
    let hbone_listener =
        TcpListener::bind(config.listen).await.with_context(|| format!("bind HBONE listener {}", config.listen))?;
    let admin_listener =
        TcpListener::bind(config.admin).await.with_context(|| format!("bind admin listener {}", config.admin))?;
    let debug_listener =
        TcpListener::bind(config.debug).await.with_context(|| format!("bind debug listener {}", config.debug))?;
    let mut registry = Registry::default();

    let (secrets, ca_credential) = secrets(&config, &identity)?;
    let wait = Duration::from_secs(config.certificate_wait_secs);
    let credential = secrets.credential(&identity, wait).await.context("the waypoint's certificate")?;
    ca_credential.follow(credential.clone());
    tracing::info!(%identity, "waypoint certificate issued");

    let upstream =
        HboneUpstream::new(Pool::new(Default::default()), identity.clone(), credential.clone(), secrets.watch_bundle());
    let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    let (engine, policy_task) = if config.control_plane.is_empty() {
        let mut changes = ChangeDetector::new(config.policy.clone());
        let _ = changes.poll();
        let loaded = {
            let (paths, name, identity) = (config.policy.clone(), name.clone(), identity.clone());
            tokio::task::spawn_blocking(move || policy::load(&paths, &name, &identity)).await?
        }
        .context("initial configuration")?;
        tracing::info!(waypoint = %name, services = loaded.config.services.len(), "configuration in force");
        let l4 = L4Policy::new(loaded.snapshot, &config.trust_domain);
        let admission: Arc<dyn crate::admission::Admission> = l4.clone();
        let engine = Engine::with_admission(
            loaded.config,
            Arc::new(upstream),
            Some(admission),
            Settings::default(),
            &mut registry,
        )
        .context("initial configuration")?;
        let poll = Duration::from_millis(config.policy_poll_ms.max(10));
        let watch =
            policy::watch(config.policy.clone(), name.clone(), identity.clone(), changes, engine.clone(), l4, poll);
        (engine, tokio::spawn(watch))
    } else {
        // Nothing is served before the first configuration from the control plane is in force.
        let l4 = L4Policy::new(Default::default(), &config.trust_domain);
        let admission: Arc<dyn crate::admission::Admission> = l4.clone();
        let engine = Engine::with_admission(
            Default::default(),
            Arc::new(upstream),
            Some(admission),
            Settings::default(),
            &mut registry,
        )
        .context("empty configuration")?;
        let subscriber = palisade_api::client::Subscriber {
            addrs: config.control_plane.clone(),
            name: crate::control::client_name(&name),
            credential: credential.clone(),
            bundle: secrets.watch_bundle(),
            server: SpiffeId::new(
                &config.trust_domain,
                palisade_mesh::ca_api::CONTROL_PLANE_NAMESPACE,
                palisade_api::SERVER_SERVICE_ACCOUNT,
            ),
        };
        let mut sink = crate::control::WaypointSink {
            content: Default::default(),
            name: name.clone(),
            identity: identity.clone(),
            engine: engine.clone(),
            l4,
            state_dir: config.state_dir.clone(),
        };
        let from_disk = match sink.start_from_disk().await {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "saved configuration unusable; waiting for the control plane");
                false
            }
        };
        let (first, in_force) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(subscriber.run(sink, first));
        if !from_disk {
            tracing::info!(control_plane = ?config.control_plane, "waiting for the first configuration");
            let _ = in_force.await;
        }
        (engine, task)
    };

    let admin_state = Arc::new(AdminState::new(registry));
    let admin_task = tokio::spawn(admin::serve(admin_listener, Arc::new(Served::Public(admin_state.clone()))));
    let debug_task = tokio::spawn(admin::serve(debug_listener, Arc::new(Served::Debug(engine.clone()))));
    let hbone_task =
        tokio::spawn(hbone::serve(hbone_listener, engine.clone(), credential, secrets.watch_bundle(), shutdown));
    admin_state.ready.store(true, Ordering::Release);
    tracing::info!(waypoint = %name, listen = %config.listen, "waypoint ready");

    palisade_mesh::signal::shutdown().await;
    tracing::info!(drain_secs = config.drain_secs, "shutting down: draining connections");
    admin_state.ready.store(false, Ordering::Release);
    let _ = shutdown_tx.send(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(config.drain_secs);
    while engine.connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    policy_task.abort();
    hbone_task.abort();
    admin_task.abort();
    debug_task.abort();
    tracing::info!(still_active = engine.connections(), "exiting");
    Ok(())
}

/// The credential shown to the CA, the initial trust bundle, and the certificate manager.
fn secrets(config: &Config, identity: &SpiffeId) -> anyhow::Result<(Arc<SecretManager>, CaCredential)> {
    let dir = &config.credential_dir;
    let ca_credential = CaCredential::load(dir, identity, config.ca_addr)?;
    let path = dir.join("bundle.pem");
    let pem = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let bundle = TrustBundle::from_pem(&pem, &config.trust_domain).with_context(|| format!("{}", path.display()))?;
    let secrets = SecretManager::new(ca_credential.signer.clone(), bundle);
    secrets.refresh_bundle_every(Duration::from_secs(config.bundle_refresh_secs.max(1)));
    Ok((secrets, ca_credential))
}
