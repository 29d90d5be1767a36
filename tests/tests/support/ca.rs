//! A real certificate authority (the control plane's) in a temporary directory, for tests that
//! need workload certificates without a cluster.
use std::sync::Arc;
use std::time::SystemTime;

use palisade_ca::authority::CertificateAuthority;
use palisade_mesh::ca_api::new_key_and_csr;
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::tls::{Credential, CredentialSlot, TrustBundle};

pub struct TestCa {
    pub ca: CertificateAuthority,
    dir: std::path::PathBuf,
    trust_domain: String,
}

impl TestCa {
    /// A fresh CA; `name` keeps the CAs of one test process apart.
    pub fn new(name: &str, trust_domain: &str) -> TestCa {
        let dir = std::env::temp_dir().join(format!("plsd-ca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TestCa { ca: CertificateAuthority::init(&dir, trust_domain).unwrap().0, dir, trust_domain: trust_domain.into() }
    }

    /// A certificate for `id` (valid for the CA's default lifetime, or between the given times).
    pub fn issue(&self, id: &SpiffeId, validity: Option<(SystemTime, SystemTime)>) -> Arc<CredentialSlot> {
        let (key, csr) = new_key_and_csr().unwrap();
        let (chain, _) = match validity {
            None => self.ca.sign_workload(&csr, id).unwrap(),
            Some((a, b)) => self.ca.sign_workload_between(&csr, id, a, b).unwrap(),
        };
        CredentialSlot::new(Credential::from_pem(&chain, &key).unwrap())
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::from_pem(&self.ca.bundle_pem(), &self.trust_domain).unwrap()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa)
}
