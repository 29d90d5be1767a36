//! The CA's endpoint (see `palisade_mesh::ca_api`): HTTP/1.1 over mutual TLS. Callers prove
//! their node with a node credential; a node gets certificates only for identities of
//! workloads scheduled on it (the `Workload` resources' `spec.node`). Refusals are logged with
//! the node that asked.
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use palisade_mesh::ca_api::{SignRequest, SignResponse, ca_identity, new_key_and_csr, node_of_uri};
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::tls::{Clients, Credential, CredentialSlot, TrustBundle, server_config_for, spiffe_uri_of};
use tokio::net::TcpListener;

use crate::ca::CertificateAuthority;
use crate::resource::Resource;

/// Lifetime of the CA endpoint's own certificate; re-issued on restart.
const SERVING_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
const MAX_BODY: usize = 64 << 10;

pub struct CaService {
    pub ca: Mutex<CertificateAuthority>,
    pub dir: PathBuf,
    /// Resource files that say which workload runs on which node.
    pub inventory: Vec<PathBuf>,
}

impl CaService {
    /// Decides and signs one request from `node`.
    pub fn sign(&self, node: &str, request: &SignRequest) -> Result<SignResponse, (StatusCode, String)> {
        let mut ca = self.ca.lock().expect("ca lock");
        if request.identity.trust_domain != ca.trust_domain() {
            return Err((
                StatusCode::FORBIDDEN,
                format!("{} is outside trust domain {}", request.identity, ca.trust_domain()),
            ));
        }
        if !self.scheduled_on(node, &request.identity)? {
            tracing::warn!(node, identity = %request.identity, "refused: identity is not scheduled on the requesting node");
            return Err((
                StatusCode::FORBIDDEN,
                format!("no workload with identity {} is scheduled on node {node}", request.identity),
            ));
        }
        self.reload_if_rotated(&mut ca);
        let (chain_pem, not_after) = ca
            .sign_workload(&request.csr_pem, &request.identity)
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        tracing::info!(node, identity = %request.identity, root = ca.state().1, "signed workload certificate");
        Ok(SignResponse {
            chain_pem,
            bundle_pem: ca.bundle_pem(),
            not_after_unix: not_after.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        })
    }

    /// Picks up `palisade ca rotate` / `activate` made while serving.
    fn reload_if_rotated(&self, ca: &mut CertificateAuthority) {
        if let Ok(fresh) = CertificateAuthority::open(&self.dir, ca.trust_domain())
            && fresh.state() != ca.state()
        {
            let ttl = ca.workload_ttl;
            *ca = fresh;
            ca.workload_ttl = ttl;
            tracing::info!(signing_root = ca.state().1, "roots changed on disk: reloaded");
        }
    }

    /// The trust bundle, after picking up a rotation.
    pub fn bundle(&self) -> String {
        let mut ca = self.ca.lock().expect("ca lock");
        self.reload_if_rotated(&mut ca);
        ca.bundle_pem()
    }

    fn scheduled_on(&self, node: &str, id: &SpiffeId) -> Result<bool, (StatusCode, String)> {
        let resources = crate::load::load_paths(&self.inventory)
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("workload inventory unreadable: {e}")))?;
        Ok(resources.iter().any(|r| match &r.resource {
            Resource::Workload { metadata, spec, .. } => {
                spec.node == node
                    && metadata.namespace.as_deref() == Some(id.namespace.as_str())
                    && spec.service_account == id.service_account
            }
            _ => false,
        }))
    }

    /// The CA endpoint's own credential, issued by the CA itself.
    fn serving_credential(&self) -> Result<Credential, String> {
        let ca = self.ca.lock().expect("ca lock");
        let (key, csr) = new_key_and_csr().map_err(|e| e.to_string())?;
        let now = SystemTime::now();
        let id = ca_identity(ca.trust_domain());
        let (chain, _) = ca
            .sign_workload_between(&csr, &id, now - Duration::from_secs(300), now + SERVING_TTL)
            .map_err(|e| e.to_string())?;
        Credential::from_pem(&chain, &key).map_err(|e| e.to_string())
    }
}

/// Serves the CA API until the process ends.
pub async fn serve(listener: TcpListener, service: Arc<CaService>) -> anyhow::Result<()> {
    let credential = CredentialSlot::new(service.serving_credential().map_err(anyhow::Error::msg)?);
    let (bundle_pem, trust_domain) = {
        let ca = service.ca.lock().expect("ca lock");
        (ca.bundle_pem(), ca.trust_domain().to_string())
    };
    let make_tls = |pem: &str| -> anyhow::Result<_> {
        let bundle = TrustBundle::from_pem(pem, &trust_domain)?;
        Ok(server_config_for(credential.clone(), &bundle, Clients::Nodes, &[b"http/1.1"])?)
    };
    let (mut tls, mut tls_bundle) = (make_tls(&bundle_pem)?, bundle_pem);
    tracing::info!(addr = %listener.local_addr()?, "CA serving");
    loop {
        let (tcp, peer) = listener.accept().await?;
        // Node credentials signed by a newly activated root are accepted without a restart.
        let current = service.bundle();
        if current != tls_bundle {
            tls = make_tls(&current)?;
            tls_bundle = current;
        }
        let (tls, service, trust_domain) = (tls.clone(), service.clone(), trust_domain.clone());
        tokio::spawn(async move {
            let stream = match tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(%peer, error = %e, "CA client refused at TLS");
                    return;
                }
            };
            let node = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| spiffe_uri_of(c).ok())
                .and_then(|uri| node_of_uri(&uri, &trust_domain).map(str::to_string));
            let Some(node) = node else { return };
            let svc = hyper::service::service_fn(move |req| {
                let (service, node) = (service.clone(), node.clone());
                async move { Ok::<_, Infallible>(handle(&service, &node, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("connection", "close")
        .body(Full::new(body.into()))
        .expect("static response")
}

async fn handle(service: &CaService, node: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
            match service.sign(node, &request) {
                Ok(response) => reply(StatusCode::OK, serde_json::to_vec(&response).expect("response serializes")),
                Err((status, message)) => reply(status, message),
            }
        }
        (m, p) => reply(StatusCode::NOT_FOUND, format!("no endpoint {m} {p}")),
    }
}
