//! Mutual TLS between workloads: TLS 1.3 only, X.509 SVIDs whose only name is a SPIFFE URI SAN.
//!
//! - Servers present the certificate of the workload they stand for (no SNI: the listener
//!   knows its workload) and require a client certificate that chains to the trust bundle and
//!   names a workload of the trust domain.
//! - Clients present their workload's certificate and accept only a server that chains to the
//!   bundle and proves the identity they expect for that destination.
//!
//! Certificates are read through a [`CredentialSlot`] on every handshake, so a renewed
//! certificate is used by the next connection without rebuilding any configuration.
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::identity::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("bad PEM ({what}): {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("certificate has no valid SPIFFE URI SAN: {0}")]
    NoSpiffeId(String),
    #[error("peer identity mismatch: expected {expected}, got {got}")]
    PeerMismatch { expected: Box<SpiffeId>, got: Box<SpiffeId> },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The single `spiffe://` URI SAN of a certificate.
pub fn spiffe_uri_of(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, x509) = X509Certificate::from_der(cert).map_err(|e| TlsError::NoSpiffeId(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::NoSpiffeId(e.to_string()))?
        .ok_or_else(|| TlsError::NoSpiffeId("no subjectAltName".into()))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err(TlsError::NoSpiffeId("no spiffe:// URI".into())),
        _ => Err(TlsError::NoSpiffeId("more than one spiffe:// URI".into())),
    }
}

/// The workload SPIFFE ID of a certificate.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    spiffe_uri_of(cert)?.parse().map_err(|e: crate::identity::InvalidSpiffeId| TlsError::NoSpiffeId(e.to_string()))
}

/// `notAfter` of a certificate.
pub fn not_after(cert: &CertificateDer<'_>) -> Result<SystemTime, TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, x509) = X509Certificate::from_der(cert).map_err(|e| TlsError::NoSpiffeId(e.to_string()))?;
    let secs = x509.validity().not_after.timestamp().max(0) as u64;
    Ok(UNIX_EPOCH + Duration::from_secs(secs))
}

pub fn certs_from_pem(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| TlsError::Pem { what, detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { what, detail: "no CERTIFICATE block".into() });
    }
    Ok(certs)
}

/// The roots a mesh trusts (several during a root rotation) and its trust domain.
#[derive(Clone)]
pub struct TrustBundle {
    pub roots: Arc<RootCertStore>,
    pub pem: String,
    pub trust_domain: String,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustBundle({} roots, {})", self.roots.len(), self.trust_domain)
    }
}

impl TrustBundle {
    pub fn from_pem(pem: &str, trust_domain: &str) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in certs_from_pem(pem, "trust bundle")? {
            roots.add(cert)?;
        }
        Ok(TrustBundle { roots: Arc::new(roots), pem: pem.to_string(), trust_domain: trust_domain.to_string() })
    }
}

/// A certificate chain with its private key: a workload SVID or a node credential.
#[derive(Clone)]
pub struct Credential {
    /// The `spiffe://` URI the certificate names.
    pub uri: String,
    pub certified: Arc<CertifiedKey>,
    pub not_after: SystemTime,
    pub chain_pem: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential({}, not_after {:?})", self.uri, self.not_after)
    }
}

impl Credential {
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let chain = certs_from_pem(chain_pem, "certificate chain")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::Pem { what: "private key", detail: e.to_string() })?;
        let uri = spiffe_uri_of(&chain[0])?;
        let not_after = not_after(&chain[0])?;
        let certified = Arc::new(CertifiedKey::from_der(chain, key, &provider())?);
        Ok(Credential { uri, certified, not_after, chain_pem: chain_pem.to_string() })
    }

    /// The workload identity, when the certificate is a workload SVID.
    pub fn workload_id(&self) -> Option<SpiffeId> {
        self.uri.parse().ok()
    }
}

/// The current credential of one workload, swapped on renewal.
#[derive(Default, Debug)]
pub struct CredentialSlot(RwLock<Option<Credential>>);

impl CredentialSlot {
    pub fn new(c: Credential) -> Arc<Self> {
        Arc::new(CredentialSlot(RwLock::new(Some(c))))
    }
    pub fn set(&self, c: Credential) {
        *self.0.write().expect("credential lock") = Some(c);
    }
    pub fn get(&self) -> Option<Credential> {
        self.0.read().expect("credential lock").clone()
    }
}

impl ResolvesServerCert for CredentialSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get().map(|c| c.certified)
    }
}

impl ResolvesClientCert for CredentialSlot {
    fn resolve(&self, _issuers: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.get().map(|c| c.certified)
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Which clients a server accepts (beyond chaining to the bundle).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clients {
    /// Workloads of the trust domain (`spiffe://<td>/ns/<ns>/sa/<sa>`).
    Workloads,
    /// Node credentials of the trust domain (`spiffe://<td>/node/<name>`): the CA's callers.
    Nodes,
    /// Either: the control plane's callers (ztunnels with node credentials, waypoints with
    /// their workload certificates; the server decides what each may do).
    NodesOrWorkloads,
}

/// Requires a client chain to the bundle whose SPIFFE ID is in the trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
    clients: Clients,
}

fn reject(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(TlsError::NoSpiffeId(msg)))))
}

fn check_trust_domain(cert: &CertificateDer<'_>, trust_domain: &str) -> Result<SpiffeId, rustls::Error> {
    let id = spiffe_id_of(cert).map_err(|e| reject(e.to_string()))?;
    if id.trust_domain != trust_domain {
        return Err(reject(format!("{id} is outside trust domain {trust_domain}")));
    }
    Ok(id)
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        match self.clients {
            Clients::Workloads => check_trust_domain(end_entity, &self.trust_domain).map(|_| ())?,
            Clients::Nodes => {
                let uri = spiffe_uri_of(end_entity).map_err(|e| reject(e.to_string()))?;
                if crate::ca_api::node_of_uri(&uri, &self.trust_domain).is_none() {
                    return Err(reject(format!("{uri} is not a node credential of {}", self.trust_domain)));
                }
            }
            Clients::NodesOrWorkloads => {
                let uri = spiffe_uri_of(end_entity).map_err(|e| reject(e.to_string()))?;
                if crate::ca_api::node_of_uri(&uri, &self.trust_domain).is_none() {
                    check_trust_domain(end_entity, &self.trust_domain)?;
                }
            }
        }
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Accepts a server that chains to the bundle and proves the expected SPIFFE ID (or, with no
/// expectation, any ID of the trust domain). Server names (SNI/DNS) play no part.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    expected: Option<SpiffeId>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(&parsed, &self.roots, intermediates, now, self.algs.all)?;
        let id = check_trust_domain(end_entity, &self.trust_domain)?;
        if let Some(expected) = &self.expected
            && *expected != id
        {
            let mismatch = TlsError::PeerMismatch { expected: Box::new(expected.clone()), got: Box::new(id) };
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
                mismatch,
            )))));
        }
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server side: present `credential`, require a client of the trust domain.
pub fn server_config(
    credential: Arc<CredentialSlot>,
    bundle: &TrustBundle,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_for(credential, bundle, Clients::Workloads, alpn)
}

/// As [`server_config`], choosing which kind of client is accepted.
pub fn server_config_for(
    credential: Arc<CredentialSlot>,
    bundle: &TrustBundle,
    clients: Clients,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(bundle.roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
    let verifier = Arc::new(SpiffeClientVerifier { inner, trust_domain: bundle.trust_domain.clone(), clients });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(credential);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Client side: present `credential` (if any), accept only `expected` (or any ID of the domain).
pub fn client_config(
    credential: Option<Arc<CredentialSlot>>,
    bundle: &TrustBundle,
    expected: Option<SpiffeId>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: bundle.roots.clone(),
        trust_domain: bundle.trust_domain.clone(),
        expected,
        algs: provider.signature_verification_algorithms,
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match credential {
        Some(c) => builder.with_client_cert_resolver(c),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The SPIFFE ID the peer proved in a completed handshake.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<SpiffeId> {
    conn.peer_certificates().and_then(|c| c.first()).and_then(|c| spiffe_id_of(c).ok())
}

/// The name we put in ClientHello: a fixed placeholder, since identities, not names, are
/// verified (Istio's HBONE sends no SNI; rustls needs a value, we use an IP, which rustls
/// does not send as SNI).
pub fn no_sni() -> ServerName<'static> {
    ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
}
