//! The CA's endpoint (see `palisade_mesh::ca_api`): HTTP/1.1 over mutual TLS. Two kinds of
//! caller, told apart by the SPIFFE ID of the client certificate (which must chain to a root
//! of the bundle and be unexpired, or the handshake fails):
//! - a node credential (`spiffe://<td>/node/<name>`, ztunnels): certificates only for
//!   identities of workloads scheduled on that node (the `Workload` resources' `spec.node`);
//! - a workload certificate of identity X (waypoints, see [`waypoint_credential`]): a
//!   certificate for X itself and nothing else, and only while X is a waypoint's identity in
//!   the resources in force (a `Gateway` of class palisade-waypoint whose Workloads run as
//!   X). A waypoint thus renews itself with its current certificate and holds no credential
//!   that could ask for another identity; ordinary workloads are enrolled by their node.
//!
//! Neither ever gets the control plane's own identities (`palisade-system`, which holds the
//! CA's serving identity). Refusals are logged with the caller.
//!
//! The endpoint must outlive hostile or broken peers: accept errors (descriptors exhausted)
//! are waited out, never fatal; each connection must finish its TLS handshake within
//! [`HANDSHAKE_TIMEOUT`] and its request within [`CONNECTION_DEADLINE`]; connections beyond
//! [`MAX_CONNECTIONS`] (or [`MAX_CONNECTIONS_PER_SOURCE`] from one address) are accepted and
//! closed at once, so a flood neither grows without bound nor leaves legitimate clients
//! waiting in the kernel's accept queue. Files (inventory, roots) are read outside the CA's
//! lock, by a refresh task, and the last good inventory is kept when the files go bad.
use std::convert::Infallible;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use palisade_mesh::accept::{Acceptor, HandshakeLimit};
use palisade_mesh::ca_api::{
    CONTROL_PLANE_NAMESPACE, SignRequest, SignResponse, ca_identity, new_key_and_csr, node_of_uri,
};
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::tls::{
    Clients, Credential, CredentialSlot, TrustBundle, server_config_for, spiffe_id_of, spiffe_uri_of,
};
use tokio::net::TcpListener;
use tokio_rustls::rustls::pki_types::CertificateDer;

use crate::authority::CertificateAuthority;

pub mod inventory;

use inventory::{Inventory, REFRESH_EVERY};

/// Lifetime of the CA endpoint's own certificate; re-issued on restart.
const SERVING_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
const MAX_BODY: usize = 64 << 10;
/// A client must complete its TLS handshake within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client must send its request head within this once TLS is up.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of a connection after its handshake (one request, a slow body included).
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);
/// Largest request head buffered (hyper's minimum is 8 KiB).
const MAX_HEAD_BYTES: usize = 16 << 10;
/// Connections served at once (in handshake or request).
pub const MAX_CONNECTIONS: usize = 256;
/// Connections served at once from one source address.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 16;

type Refusal = (StatusCode, String);

/// Who asks, as its client certificate proves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A node credential: certificates for the workloads scheduled on that node.
    Node(String),
    /// A workload certificate: a renewal of that very identity, for waypoints only.
    Workload(SpiffeId),
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Node(node) => write!(f, "node {node}"),
            Caller::Workload(id) => write!(f, "workload {id}"),
        }
    }
}

/// Why a bootstrap credential for a waypoint was not issued.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Ca(#[from] crate::authority::CaError),
}

/// The identities no caller is ever given, whatever the resources say: the CA's own serving
/// identity and the control plane's namespace; and none outside the trust domain.
fn reserved(id: &SpiffeId, trust_domain: &str) -> Option<String> {
    if id.trust_domain != trust_domain {
        return Some(format!("{id} is outside trust domain {trust_domain}"));
    }
    if *id == ca_identity(trust_domain) {
        return Some(format!("{id} is the CA's own serving identity: never issued"));
    }
    if id.namespace == CONTROL_PLANE_NAMESPACE {
        return Some(format!("{id} is in the control plane's namespace {CONTROL_PLANE_NAMESPACE}: never issued"));
    }
    None
}

/// Why `schedule` does not let `id` renew itself, if it does not.
fn not_a_waypoint(schedule: &inventory::Schedule, id: &SpiffeId) -> Option<String> {
    (!schedule.is_waypoint(id)).then(|| {
        format!(
            "{id} is not the identity of a waypoint (a Gateway of class palisade-waypoint whose Workloads all run \
             as it): a workload certificate renews only a waypoint's; other workloads are enrolled by their node"
        )
    })
}

/// A waypoint's bootstrap credential (`palisade ca waypoint-credential`): a workload
/// certificate for `id`, valid for `ttl`, issued only when `id` may renew itself at the CA
/// (a waypoint's identity in `schedule`, not reserved), so the waypoint never needs its
/// node's credential. Kubernetes would mount it as a projected service-account token.
pub fn waypoint_credential(
    ca: &CertificateAuthority,
    schedule: &inventory::Schedule,
    id: &SpiffeId,
    ttl: Duration,
) -> Result<(String, String), CredentialError> {
    if let Some(why) = reserved(id, ca.trust_domain()).or_else(|| not_a_waypoint(schedule, id)) {
        return Err(CredentialError::Refused(why));
    }
    Ok(ca.workload_credential(id, ttl)?)
}

pub struct CaService {
    ca: Mutex<CertificateAuthority>,
    dir: PathBuf,
    trust_domain: String,
    /// Which workload runs on which node (node authorization).
    pub inventory: Inventory,
}

impl CaService {
    /// The service over an opened CA; reads the inventory once (a bad one is logged, and
    /// signing answers 503 until a good one appears).
    pub fn new(ca: CertificateAuthority, dir: PathBuf, inventory: Vec<PathBuf>) -> CaService {
        Self::with_inventory(ca, dir, Inventory::new(inventory))
    }

    /// The service with an inventory kept by its owner (see [`Inventory::fed`]).
    pub fn with_inventory(ca: CertificateAuthority, dir: PathBuf, inventory: Inventory) -> CaService {
        let trust_domain = ca.trust_domain().to_string();
        CaService { ca: Mutex::new(ca), dir, trust_domain, inventory }
    }

    /// Decides and signs one request from `caller`. Blocking (file checks, signing).
    pub fn sign(&self, caller: &Caller, request: &SignRequest) -> Result<SignResponse, Refusal> {
        let id = &request.identity;
        if let Err(refusal) = self.authorize(caller, id) {
            tracing::warn!(%caller, identity = %id, reason = %refusal.1, "refused");
            return Err(refusal);
        }
        let ca = self.ca.lock().expect("ca lock");
        let (chain_pem, not_after) =
            ca.sign_workload(&request.csr_pem, id).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        tracing::info!(%caller, identity = %id, root = ca.state().1, "signed workload certificate");
        Ok(SignResponse {
            chain_pem,
            bundle_pem: ca.bundle_pem(),
            not_after_unix: not_after.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        })
    }

    /// Whether `caller` may have a certificate for `id`.
    fn authorize(&self, caller: &Caller, id: &SpiffeId) -> Result<(), Refusal> {
        let forbidden = |m: String| Err((StatusCode::FORBIDDEN, m));
        if let Some(why) = reserved(id, &self.trust_domain) {
            return forbidden(why);
        }
        if let Caller::Workload(own) = caller
            && own != id
        {
            // Checked before the inventory: no resource can widen a workload certificate.
            return forbidden(format!("a workload certificate of {own} may only renew {own}, not ask for {id}"));
        }
        let allowed = |s: &Option<Arc<inventory::Schedule>>| {
            s.as_ref().is_some_and(|s| match caller {
                Caller::Node(node) => s.allows(node, id),
                Caller::Workload(_) => s.is_waypoint(id),
            })
        };
        let mut schedule = self.inventory.current();
        if !allowed(&schedule) {
            // Perhaps scheduled a moment ago: look at the files before refusing.
            self.inventory.refresh(true);
            schedule = self.inventory.current();
        }
        match schedule {
            None => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no workload inventory loaded yet: {}",
                    self.inventory.last_error().unwrap_or_else(|| "not read".into())
                ),
            )),
            Some(_) if allowed(&schedule) => Ok(()),
            Some(s) => match caller {
                Caller::Node(node) => forbidden(format!("no workload with identity {id} is scheduled on node {node}")),
                Caller::Workload(_) => forbidden(not_a_waypoint(&s, id).unwrap_or_default()),
            },
        }
    }

    /// Picks up `palisade ca rotate` / `activate` made while serving. The roots are read
    /// before the lock is taken.
    fn refresh_roots(&self) {
        let fresh = match CertificateAuthority::open(&self.dir, &self.trust_domain) {
            Ok(fresh) => fresh,
            Err(e) => {
                tracing::debug!(error = %e, "roots unreadable; keeping the ones in use");
                return;
            }
        };
        let mut ca = self.ca.lock().expect("ca lock");
        if fresh.state() != ca.state() {
            let ttl = ca.workload_ttl;
            *ca = fresh;
            ca.workload_ttl = ttl;
            tracing::info!(signing_root = ca.state().1, "roots changed on disk: reloaded");
        }
    }

    /// The trust bundle in use.
    pub fn bundle(&self) -> String {
        self.ca.lock().expect("ca lock").bundle_pem()
    }

    /// The CA endpoint's own credential, issued by the CA itself.
    fn serving_credential(&self) -> Result<Credential, String> {
        let ca = self.ca.lock().expect("ca lock");
        let (key, csr) = new_key_and_csr().map_err(|e| e.to_string())?;
        let now = SystemTime::now();
        let id = ca_identity(&self.trust_domain);
        let (chain, _) = ca
            .sign_workload_between(&csr, &id, now - Duration::from_secs(300), now + SERVING_TTL)
            .map_err(|e| e.to_string())?;
        Credential::from_pem(&chain, &key).map_err(|e| e.to_string())
    }
}

/// Re-reads the inventory and the roots when they change, off the request path.
async fn refresh_forever(service: Arc<CaService>) {
    loop {
        tokio::time::sleep(REFRESH_EVERY).await;
        let s = service.clone();
        let _ = tokio::task::spawn_blocking(move || {
            s.inventory.refresh(false);
            s.refresh_roots();
        })
        .await;
    }
}

/// Serves the CA API until the process ends. Only set-up errors are returned.
pub async fn serve(listener: TcpListener, service: Arc<CaService>) -> anyhow::Result<()> {
    let credential = CredentialSlot::new(service.serving_credential().map_err(anyhow::Error::msg)?);
    let trust_domain = service.trust_domain.clone();
    let make_tls = |pem: &str| -> anyhow::Result<_> {
        let bundle = TrustBundle::from_pem(pem, &trust_domain)?;
        // Workload certificates too: a waypoint renews its own (see `authorize`).
        Ok(server_config_for(credential.clone(), &bundle, Clients::NodesOrWorkloads, &[b"http/1.1"])?)
    };
    let bundle_pem = service.bundle();
    let (mut tls, mut tls_bundle) = (make_tls(&bundle_pem)?, bundle_pem);
    tracing::info!(addr = %listener.local_addr()?, "CA serving");
    tokio::spawn(refresh_forever(service.clone()));
    // The shared bound, held here for a connection's whole life (a CA request is short).
    let admission = HandshakeLimit::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE);
    let mut acceptor = Acceptor::new("ca", listener);
    let mut last_log: Option<Instant> = None;
    loop {
        let (tcp, peer) = acceptor.accept().await;
        // Over the limit: closed at once (dropped), so the queue keeps moving.
        let admitted = match admission.try_admit(peer.ip()) {
            Ok(permit) => permit,
            Err(why) => {
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(source = %peer.ip(), ?why, in_service = admission.in_progress(),
                        refused_total = admission.refused_total(), "CA connection limit reached: closing new connections at once");
                    last_log = Some(Instant::now());
                }
                continue;
            }
        };
        // Node credentials signed by a newly activated root are accepted without a restart.
        let current = service.bundle();
        if current != tls_bundle {
            match make_tls(&current) {
                Ok(config) => tls = config,
                Err(e) => tracing::error!(error = %format!("{e:#}"), "new trust bundle unusable; keeping the last"),
            }
            tls_bundle = current;
        }
        let (tls, service, trust_domain) = (tls.clone(), service.clone(), trust_domain.clone());
        tokio::spawn(async move {
            let _admitted = admitted;
            connection(tcp, peer, tls, service, &trust_domain).await;
        });
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    service: Arc<CaService>,
    trust_domain: &str,
) {
    let handshake = tokio_rustls::TlsAcceptor::from(tls).accept(tcp);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "CA client refused at TLS");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, timeout_s = HANDSHAKE_TIMEOUT.as_secs(), "CA client did not finish its TLS handshake");
            return;
        }
    };
    let Some(caller) = caller_of(stream.get_ref().1.peer_certificates(), trust_domain) else { return };
    let svc = {
        let caller = caller.clone();
        hyper::service::service_fn(move |req| {
            let (service, caller) = (service.clone(), caller.clone());
            async move { Ok::<_, Infallible>(handle(service, caller, req).await) }
        })
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(false);
    let serving = http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
    if tokio::time::timeout(CONNECTION_DEADLINE, serving).await.is_err() {
        tracing::info!(%peer, %caller, deadline_s = CONNECTION_DEADLINE.as_secs(), "CA request not done in time: closed");
    }
}

/// The caller a verified client certificate proves (the TLS verifier already required a node
/// credential or a workload identity of the trust domain).
fn caller_of(certs: Option<&[CertificateDer<'_>]>, trust_domain: &str) -> Option<Caller> {
    let cert = certs?.first()?;
    if let Some(node) = node_of_uri(&spiffe_uri_of(cert).ok()?, trust_domain) {
        return Some(Caller::Node(node.to_string()));
    }
    let id = spiffe_id_of(cert).ok()?;
    (id.trust_domain == trust_domain).then_some(Caller::Workload(id))
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("connection", "close")
        .body(Full::new(body.into()))
        .expect("static response")
}

async fn handle(service: Arc<CaService>, caller: Caller, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/v1/bundle") => reply(StatusCode::OK, service.bundle()),
        ("POST", "/v1/sign") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return reply(StatusCode::BAD_REQUEST, format!("body: {e}")),
            };
            let request: SignRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return reply(StatusCode::BAD_REQUEST, format!("bad request: {e}")),
            };
            // Signing and any inventory check are blocking work: off the async workers.
            match tokio::task::spawn_blocking(move || service.sign(&caller, &request)).await {
                Ok(Ok(response)) => reply(StatusCode::OK, serde_json::to_vec(&response).expect("response serializes")),
                Ok(Err((status, message))) => reply(status, message),
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("signing failed: {e}")),
            }
        }
        (m, p) => reply(StatusCode::NOT_FOUND, format!("no endpoint {m} {p}")),
    }
}
