//! The certificate authority's HTTP API, shared by the CA (in `palisade`) and its clients.
//!
//! Callers authenticate with mutual TLS: a node credential whose URI SAN is
//! `spiffe://<trust-domain>/node/<node-name>`, issued by the same CA.
//!
//! - `POST /v1/sign` — JSON [`SignRequest`] → [`SignResponse`]; 403 when the identity is not
//!   scheduled on the calling node, 400 for a bad CSR.
//! - `GET /v1/bundle` — the trust bundle (PEM, every root currently trusted).
use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;

#[derive(Debug, Serialize, Deserialize)]
pub struct SignRequest {
    pub identity: SpiffeId,
    /// PKCS#10 request, PEM; proves possession of the key, its names are ignored.
    pub csr_pem: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SignResponse {
    /// Leaf first, then any intermediates.
    pub chain_pem: String,
    /// Every root currently trusted (more than one during a rotation).
    pub bundle_pem: String,
    pub not_after_unix: u64,
}

/// The URI of a node credential.
pub fn node_uri(trust_domain: &str, node: &str) -> String {
    format!("spiffe://{trust_domain}/node/{node}")
}

/// The node named by a node credential URI of this trust domain.
pub fn node_of_uri<'a>(uri: &'a str, trust_domain: &str) -> Option<&'a str> {
    uri.strip_prefix("spiffe://")?.strip_prefix(trust_domain)?.strip_prefix("/node/").filter(|n| !n.contains('/'))
}

/// The control plane's own namespace: its identities (the CA's among them) are never issued
/// to a node, whatever the workload inventory says.
pub const CONTROL_PLANE_NAMESPACE: &str = "palisade-system";

/// The identity the CA's own endpoint presents.
pub fn ca_identity(trust_domain: &str) -> SpiffeId {
    SpiffeId::new(trust_domain, CONTROL_PLANE_NAMESPACE, "palisade-ca")
}

/// A fresh ECDSA P-256 key pair and a CSR for it, both PEM. Keys are made where they are used
/// and never leave that process; only the CSR travels.
pub fn new_key_and_csr() -> Result<(String, String), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?.pem()?;
    Ok((key.serialize_pem(), csr))
}
