//! The mesh certificate authority: ECDSA P-256 roots kept in a directory, short-lived workload
//! SVIDs whose only name is the SPIFFE URI, node credentials for ztunnels.
//!
//! Layout of the CA directory: `roots/<n>/cert.pem` and `roots/<n>/key.pem` (0600). Every
//! root in the directory is in the trust bundle; the highest *active* `<n>` signs. A rotation
//! has two steps so that the mesh never drops: `palisade ca rotate` adds a root marked
//! `pending` (trusted everywhere once ztunnels refresh their bundle, signing nothing yet),
//! then `palisade ca activate` makes it the signer. Old roots stay trusted until removed. A
//! root is created only when the directory holds none; a root whose key is missing or
//! unreadable is an error, never a reason to make a new one.
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use palisade_mesh::ca_api::node_uri;
use palisade_mesh::identity::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

/// Workload certificates live this long unless configured otherwise.
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const NODE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Accepted clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no root CA in {dir}: create it once with `palisade ca --dir {dir} init`")]
    NoRoot { dir: PathBuf },
    #[error("root {path}: {detail}")]
    BadRoot { path: PathBuf, detail: String },
    #[error("certificate signing request: {0}")]
    BadCsr(String),
    #[error("signing: {0}")]
    Sign(#[from] rcgen::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io { path: path.to_path_buf(), source }
}

struct Root {
    number: u32,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// Trusted but not yet signing (first step of a rotation).
    pending: bool,
}

const PENDING_MARKER: &str = "pending";

pub struct CertificateAuthority {
    trust_domain: String,
    roots: Vec<Root>,
    pub workload_ttl: Duration,
}

fn random_serial() -> SerialNumber {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut bytes).expect("system random source");
    bytes[0] &= 0x7f; // a positive integer
    SerialNumber::from_slice(&bytes)
}

fn at(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0))
        .expect("time in range")
}

fn write_private(path: &Path, contents: &str) -> Result<(), CaError> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io(path))?;
    f.write_all(contents.as_bytes()).map_err(io(path))
}

impl CertificateAuthority {
    /// Opens the CA in `dir`. A directory without a root is an error, never a new CA: a
    /// mistyped path or a wiped volume must not silently replace the mesh's root of trust.
    pub fn open(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let ca = Self::load(dir, trust_domain)?;
        if ca.roots.is_empty() {
            return Err(CaError::NoRoot { dir: dir.to_path_buf() });
        }
        Ok(ca)
    }

    /// Creates the first root if (and only if) there is none; says whether it did.
    pub fn init(dir: &Path, trust_domain: &str) -> Result<(Self, bool), CaError> {
        let mut ca = Self::load(dir, trust_domain)?;
        if !ca.roots.is_empty() {
            return Ok((ca, false));
        }
        let roots_dir = dir.join("roots");
        fs::create_dir_all(&roots_dir).map_err(io(&roots_dir))?;
        ca.create_root(&roots_dir, 1, false)?;
        Ok((ca, true))
    }

    fn load(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let mut ca = CertificateAuthority {
            trust_domain: trust_domain.into(),
            roots: Vec::new(),
            workload_ttl: DEFAULT_WORKLOAD_TTL,
        };
        let roots_dir = dir.join("roots");
        if roots_dir.exists() {
            ca.load_roots(&roots_dir)?;
        }
        Ok(ca)
    }

    fn load_roots(&mut self, roots_dir: &Path) -> Result<(), CaError> {
        let mut numbers: Vec<u32> = fs::read_dir(roots_dir)
            .map_err(io(roots_dir))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        numbers.sort();
        self.roots.clear();
        for n in numbers {
            let d = roots_dir.join(n.to_string());
            let bad = |detail: String| CaError::BadRoot { path: d.clone(), detail };
            let cert_pem = fs::read_to_string(d.join("cert.pem")).map_err(|e| bad(format!("cert.pem: {e}")))?;
            let key_pem = fs::read_to_string(d.join("key.pem"))
                .map_err(|e| bad(format!("key.pem: {e} (refusing to create a new root over an existing one)")))?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(format!("key.pem: {e}")))?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| bad(format!("cert.pem: {e}")))?;
            let pending = d.join(PENDING_MARKER).exists();
            self.roots.push(Root { number: n, cert_pem, issuer, pending });
        }
        if !self.roots.is_empty() && self.roots.iter().all(|r| r.pending) {
            return Err(CaError::BadRoot {
                path: roots_dir.to_path_buf(),
                detail: "every root is pending: activate one".into(),
            });
        }
        Ok(())
    }

    fn create_root(&mut self, roots_dir: &Path, number: u32, pending: bool) -> Result<(), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, self.trust_domain.clone());
        params.distinguished_name.push(DnType::CommonName, format!("Palisade root {number}"));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        params.not_before = at(now - BACKDATE);
        params.not_after = at(now + ROOT_TTL);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let d = roots_dir.join(number.to_string());
        fs::create_dir(&d).map_err(io(&d))?;
        write_private(&d.join("key.pem"), &key.serialize_pem())?;
        if pending {
            fs::write(d.join(PENDING_MARKER), "").map_err(io(&d))?;
        }
        fs::write(d.join("cert.pem"), cert.pem()).map_err(io(&d))?;
        let issuer = Issuer::new(params, key);
        self.roots.push(Root { number, cert_pem: cert.pem(), issuer, pending });
        Ok(())
    }

    /// First step of a rotation: adds a root to the bundle that does not sign yet.
    pub fn rotate(&mut self, dir: &Path) -> Result<u32, CaError> {
        let next = self.roots.last().map_or(1, |r| r.number + 1);
        self.create_root(&dir.join("roots"), next, true)?;
        Ok(next)
    }

    /// Second step: the newest pending root signs from now on.
    pub fn activate(&mut self, dir: &Path) -> Result<Option<u32>, CaError> {
        let Some(root) = self.roots.iter_mut().rev().find(|r| r.pending) else { return Ok(None) };
        let marker = dir.join("roots").join(root.number.to_string()).join(PENDING_MARKER);
        fs::remove_file(&marker).map_err(io(&marker))?;
        root.pending = false;
        Ok(Some(root.number))
    }

    /// Which roots exist and which signs: changes with `rotate` and `activate`.
    pub fn state(&self) -> (String, u32) {
        (self.bundle_pem(), self.signer().number)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Every trusted root, PEM.
    pub fn bundle_pem(&self) -> String {
        self.roots.iter().map(|r| r.cert_pem.as_str()).collect()
    }

    fn signer(&self) -> &Root {
        self.roots.iter().rev().find(|r| !r.pending).expect("a CA always has an active root")
    }

    /// Signs a workload SVID for `identity` over the key in `csr_pem`, valid for the TTL.
    pub fn sign_workload(&self, csr_pem: &str, identity: &SpiffeId) -> Result<(String, SystemTime), CaError> {
        let now = SystemTime::now();
        self.sign_workload_between(csr_pem, identity, now - BACKDATE, now + self.workload_ttl)
    }

    /// As [`Self::sign_workload`] with an explicit validity (tests make expired certificates).
    pub fn sign_workload_between(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(String, SystemTime), CaError> {
        let uri = identity.to_string();
        let pem = self.sign(csr_pem, &uri, not_before, not_after)?;
        Ok((pem, not_after))
    }

    /// A node credential (URI `spiffe://<td>/node/<node>`) for authenticating to the CA.
    pub fn node_credential(&self, node: &str) -> Result<(String, String), CaError> {
        self.credential(&node_uri(&self.trust_domain, node), NODE_TTL)
    }

    /// A credential bound to one workload identity, valid for `ttl`: a waypoint's bootstrap
    /// credential (see `server::waypoint_credential`, which decides whether it may be issued).
    pub fn workload_credential(&self, identity: &SpiffeId, ttl: Duration) -> Result<(String, String), CaError> {
        self.credential(&identity.to_string(), ttl)
    }

    /// A key made here and a certificate for `uri` over it: (certificate PEM, key PEM).
    fn credential(&self, uri: &str, ttl: Duration) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = CertificateParams::default().serialize_request(&key)?.pem().map_err(CaError::Sign)?;
        let now = SystemTime::now();
        let cert = self.sign(&csr, uri, now - BACKDATE, now + ttl)?;
        Ok((cert, key.serialize_pem()))
    }

    /// The names in the request are ignored: the certificate carries `uri` and nothing else.
    fn sign(&self, csr_pem: &str, uri: &str, not_before: SystemTime, not_after: SystemTime) -> Result<String, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::BadCsr(e.to_string()))?;
        // Mesh SVIDs are ECDSA P-256 only: one algorithm every peer (Istio's too) accepts.
        if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::BadCsr(format!(
                "key is {:?}; only ECDSA P-256 is signed",
                csr.public_key.algorithm()
            )));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(uri.try_into().map_err(|e: rcgen::Error| CaError::BadCsr(e.to_string()))?)];
        params.not_before = at(not_before);
        params.not_after = at(not_after);
        params.serial_number = Some(random_serial());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyAgreement];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let request = CertificateSigningRequestParams { params, public_key: csr.public_key };
        Ok(request.signed_by(&self.signer().issuer)?.pem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_mesh::ca_api::new_key_and_csr;
    use palisade_mesh::tls::{Credential, certs_from_pem, spiffe_id_of};

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("palisade-ca-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn signs_spiffe_svids_and_keeps_its_root() {
        let dir = tmp("sign");
        let err = CertificateAuthority::open(&dir, "cluster.local").err().expect("no root yet");
        assert!(err.to_string().contains("palisade ca"), "{err}");
        let (ca, created) = CertificateAuthority::init(&dir, "cluster.local").unwrap();
        assert!(created);
        let bundle = ca.bundle_pem();
        let id = SpiffeId::new("cluster.local", "shop", "web");
        let (key, csr) = new_key_and_csr().unwrap();
        let (chain, _) = ca.sign_workload(&csr, &id).unwrap();
        let cred = Credential::from_pem(&chain, &key).unwrap();
        assert_eq!(cred.workload_id(), Some(id.clone()));
        assert_eq!(spiffe_id_of(&certs_from_pem(&chain, "c").unwrap()[0]).unwrap(), id);
        // Reopening uses the same root, never a new one.
        let again = CertificateAuthority::open(&dir, "cluster.local").unwrap();
        assert_eq!(again.bundle_pem(), bundle);
        let (again, created) = CertificateAuthority::init(&dir, "cluster.local").unwrap();
        assert!(!created);
        assert_eq!(again.bundle_pem(), bundle);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_p256_keys_are_signed() {
        let dir = tmp("p256");
        let (ca, _) = CertificateAuthority::init(&dir, "cluster.local").unwrap();
        let id = SpiffeId::new("cluster.local", "shop", "web");
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let csr = CertificateParams::default().serialize_request(&p384).unwrap().pem().unwrap();
        let err = ca.sign_workload(&csr, &id).expect_err("a P-384 key was signed");
        assert!(err.to_string().contains("only ECDSA P-256"), "{err}");
        // What ztunnel sends is P-256, and the certificate carries that key.
        let (_, csr) = new_key_and_csr().unwrap();
        let chain = ca.sign_workload(&csr, &id).unwrap().0;
        let der = certs_from_pem(&chain, "c").unwrap().remove(0);
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        let spki = x509.public_key();
        assert_eq!(spki.algorithm.algorithm, x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY);
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        assert_eq!(curve, Some(x509_parser::oid_registry::OID_EC_P256));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_root_without_its_key_is_an_error_not_a_new_root() {
        let dir = tmp("nokey");
        CertificateAuthority::init(&dir, "cluster.local").unwrap();
        fs::remove_file(dir.join("roots/1/key.pem")).unwrap();
        let err = CertificateAuthority::init(&dir, "cluster.local").err().expect("must fail");
        assert!(err.to_string().contains("key.pem"), "{err}");
        assert!(!dir.join("roots/2").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotation_keeps_the_old_root_in_the_bundle() {
        let dir = tmp("rotate");
        let (mut ca, _) = CertificateAuthority::init(&dir, "cluster.local").unwrap();
        let old = ca.bundle_pem();
        let id = SpiffeId::new("cluster.local", "shop", "web");
        let issuer_of = |ca: &CertificateAuthority| {
            let (_, csr) = new_key_and_csr().unwrap();
            let chain = ca.sign_workload(&csr, &id).unwrap().0;
            let der = certs_from_pem(&chain, "c").unwrap().remove(0);
            let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
            x509.issuer().to_string()
        };
        assert_eq!(ca.rotate(&dir).unwrap(), 2);
        let both = ca.bundle_pem();
        assert!(both.starts_with(&old) && both.len() > old.len());
        assert_eq!(certs_from_pem(&both, "b").unwrap().len(), 2);
        // Pending: trusted, but root 1 still signs — also after reopening.
        assert!(issuer_of(&ca).contains("root 1"));
        let mut ca = CertificateAuthority::open(&dir, "cluster.local").unwrap();
        assert!(issuer_of(&ca).contains("root 1"));
        assert_eq!(ca.activate(&dir).unwrap(), Some(2));
        assert!(issuer_of(&ca).contains("root 2"));
        assert_eq!(ca.bundle_pem(), both);
        fs::remove_dir_all(&dir).unwrap();
    }
}
