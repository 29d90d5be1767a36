//! What the waypoint shows the CA when it asks for its certificate.
//!
//! - **Bound** (`waypoint.pem`, `waypoint-key.pem` in `--credential-dir`, written by `palisade
//!   ca waypoint-credential`): a certificate of the waypoint's own identity. The CA signs, for
//!   a workload certificate, only that same identity and only while it is a waypoint's in the
//!   resources in force, so this credential can ask for nothing else. Once the waypoint has its
//!   own certificate it renews with that one; the mounted bootstrap is read again only while
//!   it has none that is unexpired (first start, or after the CA was unreachable for a whole
//!   certificate lifetime), so a bootstrap re-issued on disk is picked up without a restart.
//! - **Node** (`node.pem`, `node-key.pem`): its node's credential, as a ztunnel's. Kept for
//!   compatibility; it could ask for any identity scheduled on the node.
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use anyhow::Context;
use palisade_mesh::ca_api::{SignRequest, SignResponse};
use palisade_mesh::ca_client::CaClient;
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::secrets::Signer;
use palisade_mesh::tls::{Credential, CredentialSlot, TrustBundle};

/// The bound credential's files.
pub const BOUND_CERT: &str = "waypoint.pem";
pub const BOUND_KEY: &str = "waypoint-key.pem";
/// The node credential's files (compatibility).
pub const NODE_CERT: &str = "node.pem";
pub const NODE_KEY: &str = "node-key.pem";

fn read_credential(dir: &Path, cert: &str, key: &str) -> anyhow::Result<Credential> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).with_context(|| format!("read {}", dir.join(name).display()))
    };
    Credential::from_pem(&read(cert)?, &read(key)?).with_context(|| format!("credential in {}", dir.display()))
}

/// The bound credential in `dir`, checked to be `identity`'s and unexpired.
fn read_bound(dir: &Path, identity: &SpiffeId) -> anyhow::Result<Credential> {
    let c = read_credential(dir, BOUND_CERT, BOUND_KEY)?;
    let path = dir.join(BOUND_CERT);
    anyhow::ensure!(
        c.workload_id().as_ref() == Some(identity),
        "{} is a credential of {}, not of this waypoint's identity {identity}",
        path.display(),
        c.uri
    );
    anyhow::ensure!(
        c.not_after > SystemTime::now(),
        "{} expired at {:?}: issue a new one with `palisade ca waypoint-credential`",
        path.display(),
        c.not_after
    );
    Ok(c)
}

/// The CA client and, in bound mode, what lets it follow the waypoint's own certificate.
pub struct CaCredential {
    pub signer: Arc<dyn Signer>,
    renewing: Option<Arc<SelfRenewing>>,
}

impl CaCredential {
    /// Reads the credential in `dir`: the bound one if `waypoint.pem` is there, else the node's.
    pub fn load(dir: &Path, identity: &SpiffeId, ca: std::net::SocketAddr) -> anyhow::Result<CaCredential> {
        if dir.join(BOUND_CERT).exists() {
            let bootstrap = read_bound(dir, identity)?;
            tracing::info!(credential = %bootstrap.uri, not_after = ?bootstrap.not_after, "bound CA credential loaded: the waypoint renews its own identity");
            let shown = CredentialSlot::new(bootstrap);
            let renewing = Arc::new(SelfRenewing {
                client: CaClient::new(ca, shown.clone()),
                shown,
                own: OnceLock::new(),
                dir: dir.to_path_buf(),
                identity: identity.clone(),
            });
            return Ok(CaCredential { signer: renewing.clone(), renewing: Some(renewing) });
        }
        let node = read_credential(dir, NODE_CERT, NODE_KEY).with_context(|| {
            format!("no {BOUND_CERT} in {} (the bound credential), and no usable node credential", dir.display())
        })?;
        tracing::warn!(credential = %node.uri, not_after = ?node.not_after,
            "node CA credential loaded: it could ask for any identity on its node; prefer `palisade ca waypoint-credential`");
        Ok(CaCredential { signer: Arc::new(CaClient::new(ca, CredentialSlot::new(node))), renewing: None })
    }

    /// From now on (bound mode) the CA is shown the waypoint's own certificate in `slot`.
    pub fn follow(&self, slot: Arc<CredentialSlot>) {
        if let Some(r) = &self.renewing {
            let _ = r.own.set(slot);
        }
    }
}

/// A CA client that shows the waypoint's current certificate while it is valid, else the
/// mounted bootstrap credential.
struct SelfRenewing {
    client: CaClient,
    /// What `client` shows in its handshakes.
    shown: Arc<CredentialSlot>,
    /// The waypoint's own certificate, kept current by the certificate manager.
    own: OnceLock<Arc<CredentialSlot>>,
    dir: PathBuf,
    identity: SpiffeId,
}

impl SelfRenewing {
    fn choose(&self) {
        let now = SystemTime::now();
        if let Some(own) = self.own.get().and_then(|s| s.get()).filter(|c| c.not_after > now) {
            self.shown.set(own);
            return;
        }
        match read_bound(&self.dir, &self.identity) {
            Ok(bootstrap) => self.shown.set(bootstrap),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "no unexpired credential to show the CA"),
        }
    }
}

impl Signer for SelfRenewing {
    fn sign<'a>(
        &'a self,
        bundle: &'a TrustBundle,
        request: SignRequest,
    ) -> Pin<Box<dyn Future<Output = Result<SignResponse, String>> + Send + 'a>> {
        self.choose();
        Box::pin(async move { self.client.sign(bundle, &request).await.map_err(|e| e.to_string()) })
    }

    fn bundle<'a>(
        &'a self,
        bundle: &'a TrustBundle,
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>> {
        self.choose();
        Box::pin(async move { self.client.bundle(bundle).await.map_err(|e| e.to_string()) })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use palisade_ca::authority::CertificateAuthority;

    use super::*;

    #[test]
    fn the_ca_is_shown_the_waypoints_own_certificate_while_it_is_valid() {
        let dir = std::env::temp_dir().join(format!("plsd-wp-credential-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = CertificateAuthority::init(&dir.join("ca"), "cluster.local").unwrap().0;
        let id = SpiffeId::new("cluster.local", "shop", "waypoint");
        let (cert, key) = ca.workload_credential(&id, Duration::from_secs(3600)).unwrap();
        std::fs::write(dir.join(BOUND_CERT), &cert).unwrap();
        std::fs::write(dir.join(BOUND_KEY), &key).unwrap();
        let own = |validity: (SystemTime, SystemTime)| {
            let (key, csr) = palisade_mesh::ca_api::new_key_and_csr().unwrap();
            let chain = ca.sign_workload_between(&csr, &id, validity.0, validity.1).unwrap().0;
            Credential::from_pem(&chain, &key).unwrap()
        };
        let addr = "127.0.0.1:1".parse().unwrap();
        let loaded = CaCredential::load(&dir, &id, addr).unwrap();
        let renewing = loaded.renewing.clone().expect("waypoint.pem selects the bound mode");
        let shown = || renewing.shown.get().unwrap().chain_pem;
        assert_eq!(shown(), cert, "before its first certificate the waypoint shows the bootstrap");

        let slot = Arc::new(CredentialSlot::default());
        loaded.follow(slot.clone());
        let now = SystemTime::now();
        let current = own((now - Duration::from_secs(60), now + Duration::from_secs(600)));
        slot.set(current.clone());
        renewing.choose();
        assert_eq!(shown(), current.chain_pem, "with a valid certificate of its own, the waypoint shows it");

        // Its own expired (the CA was unreachable for a lifetime): back to the mounted one.
        slot.set(own((now - Duration::from_secs(600), now - Duration::from_secs(60))));
        renewing.choose();
        assert_eq!(shown(), cert, "with its own certificate expired, the waypoint shows the bootstrap");

        // A bootstrap of another identity is refused at start-up, naming both.
        let other = SpiffeId::new("cluster.local", "shop", "web");
        let (cert, key) = ca.workload_credential(&other, Duration::from_secs(3600)).unwrap();
        std::fs::write(dir.join(BOUND_CERT), &cert).unwrap();
        std::fs::write(dir.join(BOUND_KEY), &key).unwrap();
        let err = CaCredential::load(&dir, &id, addr).err().expect("another identity's credential");
        assert!(format!("{err:#}").contains("sa/web") && format!("{err:#}").contains("sa/waypoint"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
