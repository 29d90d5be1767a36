//! The engine: the current configuration (one snapshot behind an `RwLock`, swapped whole by
//! [`Engine::update`], read once per request), the backends' live state (kept across
//! updates), the upstream pool, metrics and the downstream connection limit.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use palisade_model::waypoint::config::{Backend, Filter, ServiceL7, WaypointConfig};
use prometheus_client::registry::Registry;
use tokio::sync::{Semaphore, broadcast};

use crate::access_log::{AccessRecord, Recent};
use crate::admission::Admission;
use crate::balance::BackendState;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::route::{RouteError, RouteTable};
use crate::upstream::{Io, Upstream};

/// What the caller knows of one accepted downstream connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Downstream {
    pub peer: SocketAddr,
    /// The source's SPIFFE ID as its HBONE tunnel's certificate proved it; never a header.
    pub identity: Option<Arc<str>>,
    /// The VIP:port the client dialled.
    pub destination: SocketAddr,
}

/// Bounds on what a downstream client can make the engine hold.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Downstream connections served at once; more are closed on arrival.
    pub max_connections: usize,
    /// Time for a client to send its first bytes and a request's headers (slowloris).
    pub header_read_timeout: Duration,
    /// A downstream connection with no bytes moving either way this long is closed, requests
    /// in flight or not.
    pub idle_timeout: Duration,
    /// Request head size (HTTP/1.1 read buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Header count of an HTTP/1.1 request.
    pub max_headers: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// Largest request body kept in memory so a retry or mirror can send it again.
    pub replay_limit: usize,
    /// Mirrored requests in flight at once; more are not mirrored.
    pub max_mirrors: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_concurrent_streams: 100,
            replay_limit: 64 * 1024,
            max_mirrors: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("service {service} ({vip}): {source}")]
    Route {
        service: String,
        vip: SocketAddr,
        #[source]
        source: Box<RouteError>,
    },
}

/// One Service ready to serve.
pub(crate) struct ServiceState {
    pub config: ServiceL7,
    /// `config.service`, shared with the access records and metric labels.
    pub name: Arc<str>,
    pub routes: RouteTable,
}

/// One configuration, compiled.
#[derive(Default)]
pub(crate) struct Snapshot {
    pub services: HashMap<SocketAddr, Arc<ServiceState>>,
    pub backends: HashMap<String, Arc<BackendState>>,
}

pub(crate) struct Inner {
    pub settings: Settings,
    pub snapshot: RwLock<Arc<Snapshot>>,
    /// Serialises updates so two cannot interleave their backend bookkeeping.
    pub updating: Mutex<()>,
    pub pool: Pool,
    /// The destination's L4 policy against the original client (none in tests of L7 alone).
    pub admission: Option<Arc<dyn Admission>>,
    pub metrics: Metrics,
    pub recent: Recent,
    pub access: broadcast::Sender<Arc<AccessRecord>>,
    pub connections: Arc<Semaphore>,
    pub mirrors: Arc<Semaphore>,
}

impl Inner {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The waypoint's L7 engine; cheap to clone (one shared state).
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

/// Every backend a service refers to: its default, its routes' and its mirrors'.
fn backends_of(svc: &ServiceL7) -> impl Iterator<Item = &Backend> {
    let routes = svc.routes.iter().flat_map(|r| {
        let weighted = r.backends.iter().map(|w| &w.backend);
        let mirrors = r.filters.iter().filter_map(|f| match f {
            Filter::Mirror(b) => Some(b),
            _ => None,
        });
        weighted.chain(mirrors)
    });
    std::iter::once(&svc.default_backend).chain(routes)
}

impl Engine {
    pub fn new(
        config: WaypointConfig,
        upstream: Arc<dyn Upstream>,
        settings: Settings,
        registry: &mut Registry,
    ) -> Result<Self, ConfigError> {
        Self::with_admission(config, upstream, None, settings, registry)
    }

    /// As [`Engine::new`], checking `admission` before any request or connection is sent to an
    /// endpoint: a refusal answers 403 (HTTP) or closes (TCP) and is access-logged with the
    /// rule.
    pub fn with_admission(
        config: WaypointConfig,
        upstream: Arc<dyn Upstream>,
        admission: Option<Arc<dyn Admission>>,
        settings: Settings,
        registry: &mut Registry,
    ) -> Result<Self, ConfigError> {
        let inner = Inner {
            admission,
            connections: Arc::new(Semaphore::new(settings.max_connections)),
            mirrors: Arc::new(Semaphore::new(settings.max_mirrors)),
            settings,
            snapshot: RwLock::default(),
            updating: Mutex::default(),
            pool: Pool::new(upstream),
            metrics: Metrics::new(registry),
            recent: Recent::default(),
            access: broadcast::channel(1024).0,
        };
        let engine = Engine { inner: Arc::new(inner) };
        engine.update(config)?;
        Ok(engine)
    }

    /// Installs a new configuration. Requests in flight finish on what they started with;
    /// endpoints that stay keep their load counts and ejections. On error the previous
    /// configuration stays in force.
    pub fn update(&self, config: WaypointConfig) -> Result<(), ConfigError> {
        let _one_at_a_time = self.inner.updating.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.inner.snapshot();
        let mut services = HashMap::new();
        let mut backends: HashMap<String, Arc<BackendState>> = HashMap::new();
        for svc in config.services {
            let routes = RouteTable::compile(&svc.routes).map_err(|source| ConfigError::Route {
                service: svc.service.clone(),
                vip: svc.vip,
                source: Box::new(source),
            })?;
            for backend in backends_of(&svc) {
                if backends.contains_key(&backend.name) {
                    continue;
                }
                let state = match old.backends.get(&backend.name) {
                    Some(existing) => {
                        existing.update(backend);
                        Arc::clone(existing)
                    }
                    None => Arc::new(BackendState::new(backend)),
                };
                backends.insert(backend.name.clone(), state);
            }
            let name = svc.service.as_str().into();
            services.insert(svc.vip, Arc::new(ServiceState { config: svc, name, routes }));
        }
        *self.inner.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Snapshot { services, backends });
        Ok(())
    }

    /// Serves one accepted downstream connection until it ends.
    pub async fn serve<I: Io + 'static>(&self, io: I, downstream: Downstream) {
        crate::serve::serve(Arc::clone(&self.inner), io, downstream).await;
    }

    /// The last finished requests' access records, oldest first (flow events).
    pub fn recent_records(&self) -> Vec<Arc<AccessRecord>> {
        self.inner.recent.records()
    }

    /// Every finished request's access record from now on (tests). Slow receivers lose the
    /// oldest records.
    pub fn access_records(&self) -> broadcast::Receiver<Arc<AccessRecord>> {
        self.inner.access.subscribe()
    }

    /// Whether a Service is configured at `vip` (the HBONE listener refuses other CONNECTs).
    pub fn serves(&self, vip: SocketAddr) -> bool {
        self.inner.snapshot().services.contains_key(&vip)
    }

    /// Downstream connections being served now.
    pub fn connections(&self) -> usize {
        self.inner.settings.max_connections - self.inner.connections.available_permits()
    }

    /// The live state of a backend by name (`namespace/name:port`).
    pub fn backend(&self, name: &str) -> Option<Arc<BackendState>> {
        self.inner.snapshot().backends.get(name).cloned()
    }
}
