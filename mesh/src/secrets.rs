//! Workload certificates of the local workloads: one [`CredentialSlot`] per identity, filled
//! from the CA and renewed at half life (± 10 % jitter so a node's renewals spread out). The
//! private key is generated here for every request and never leaves the process. When the CA
//! is unreachable the current certificate stays in use and the request is retried with
//! backoff. Trust bundles that come back with certificates replace the current one, so a
//! root rotation reaches every ztunnel with its next renewal (or `refresh_bundle`).
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::ca_api::{SignRequest, SignResponse, new_key_and_csr};
use crate::identity::SpiffeId;
use crate::tls::{Credential, CredentialSlot, TrustBundle};

/// Something that turns a CSR into a certificate: the CA client, or an in-process CA in tests.
pub trait Signer: Send + Sync + 'static {
    fn sign<'a>(
        &'a self,
        bundle: &'a TrustBundle,
        request: SignRequest,
    ) -> Pin<Box<dyn Future<Output = Result<SignResponse, String>> + Send + 'a>>;

    /// The CA's current trust bundle, PEM.
    fn bundle<'a>(
        &'a self,
        bundle: &'a TrustBundle,
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>>;
}

impl Signer for crate::ca_client::CaClient {
    fn sign<'a>(
        &'a self,
        bundle: &'a TrustBundle,
        request: SignRequest,
    ) -> Pin<Box<dyn Future<Output = Result<SignResponse, String>> + Send + 'a>> {
        Box::pin(
            async move { crate::ca_client::CaClient::sign(self, bundle, &request).await.map_err(|e| e.to_string()) },
        )
    }

    fn bundle<'a>(
        &'a self,
        bundle: &'a TrustBundle,
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>> {
        Box::pin(async move { crate::ca_client::CaClient::bundle(self, bundle).await.map_err(|e| e.to_string()) })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("no certificate for {identity} within {waited:?}: {last_error}")]
    NotReady { identity: SpiffeId, waited: Duration, last_error: String },
}

struct Managed {
    slot: Arc<CredentialSlot>,
    ready: watch::Receiver<Option<Result<(), String>>>,
    task: tokio::task::JoinHandle<()>,
}

pub struct SecretManager {
    signer: Arc<dyn Signer>,
    bundle: watch::Sender<TrustBundle>,
    managed: Mutex<HashMap<SpiffeId, Managed>>,
}

impl SecretManager {
    pub fn new(signer: Arc<dyn Signer>, bundle: TrustBundle) -> Arc<Self> {
        Arc::new(SecretManager { signer, bundle: watch::channel(bundle).0, managed: Mutex::default() })
    }

    /// Fetches the CA's trust bundle every `every`, so a root added by a rotation is trusted
    /// here before anything signed by it arrives.
    pub fn refresh_bundle_every(self: &Arc<Self>, every: Duration) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(manager) = me.upgrade() else { return };
                let current = manager.bundle();
                match manager.signer.bundle(&current).await {
                    Ok(pem) => manager.update_bundle(&current, &pem),
                    Err(e) => tracing::debug!(error = %e, "trust bundle refresh failed; keeping the current bundle"),
                }
            }
        });
    }

    fn update_bundle(&self, current: &TrustBundle, pem: &str) {
        if pem == current.pem {
            return;
        }
        match TrustBundle::from_pem(pem, &current.trust_domain) {
            Ok(b) => {
                tracing::info!(roots = b.roots.len(), "trust bundle updated from the CA");
                self.bundle.send_replace(b);
            }
            Err(e) => tracing::warn!(error = %e, "ignoring an unreadable trust bundle from the CA"),
        }
    }

    /// The trust bundle in force (follows rotations).
    pub fn bundle(&self) -> TrustBundle {
        self.bundle.borrow().clone()
    }

    pub fn watch_bundle(&self) -> watch::Receiver<TrustBundle> {
        self.bundle.subscribe()
    }

    /// The credential slot of `identity`, waiting up to `wait` for its first certificate.
    /// Starts managing the identity if it is new.
    pub async fn credential(
        self: &Arc<Self>,
        identity: &SpiffeId,
        wait: Duration,
    ) -> Result<Arc<CredentialSlot>, SecretError> {
        let (slot, mut ready) = {
            let mut managed = self.managed.lock().expect("secrets lock");
            let m = managed.entry(identity.clone()).or_insert_with(|| self.start(identity.clone()));
            (m.slot.clone(), m.ready.clone())
        };
        if slot.get().is_some() {
            return Ok(slot);
        }
        let not_ready =
            |last_error: String| SecretError::NotReady { identity: identity.clone(), waited: wait, last_error };
        let ok =
            tokio::time::timeout(wait, ready.wait_for(|r| matches!(r, Some(Ok(()))))).await.is_ok_and(|r| r.is_ok());
        if ok {
            return Ok(slot);
        }
        let last = ready.borrow().clone().and_then(|r| r.err());
        Err(not_ready(last.unwrap_or_else(|| "still waiting for the CA".into())))
    }

    /// Stops renewing `identity` (no local workload has it any more).
    pub fn forget(&self, identity: &SpiffeId) {
        if let Some(m) = self.managed.lock().expect("secrets lock").remove(identity) {
            m.task.abort();
        }
    }

    pub fn identities(&self) -> Vec<(SpiffeId, Option<SystemTime>)> {
        let managed = self.managed.lock().expect("secrets lock");
        managed.iter().map(|(id, m)| (id.clone(), m.slot.get().map(|c| c.not_after))).collect()
    }

    fn start(self: &Arc<Self>, identity: SpiffeId) -> Managed {
        let slot = Arc::new(CredentialSlot::default());
        let (ready_tx, ready) = watch::channel(None);
        let me = Arc::downgrade(self);
        let task_slot = slot.clone();
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                let Some(manager) = me.upgrade() else { return };
                let result = manager.fetch(&identity).await;
                drop(manager);
                let wait = match result {
                    Ok(credential) => {
                        let wait = renew_after(&credential);
                        tracing::info!(%identity, not_after = ?credential.not_after, renew_in = ?wait, "workload certificate issued");
                        task_slot.set(credential);
                        let _ = ready_tx.send(Some(Ok(())));
                        backoff = Duration::from_millis(200);
                        wait
                    }
                    Err(e) => {
                        tracing::warn!(%identity, error = %e, retry_in = ?backoff, "certificate request failed; keeping the current certificate");
                        let _ = ready_tx.send(Some(Err(e)));
                        let wait = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        wait
                    }
                };
                tokio::time::sleep(wait).await;
            }
        });
        Managed { slot, ready, task }
    }

    async fn fetch(&self, identity: &SpiffeId) -> Result<Credential, String> {
        let (key_pem, csr_pem) = new_key_and_csr().map_err(|e| e.to_string())?;
        let bundle = self.bundle();
        let response = self.signer.sign(&bundle, SignRequest { identity: identity.clone(), csr_pem }).await?;
        let credential = Credential::from_pem(&response.chain_pem, &key_pem).map_err(|e| e.to_string())?;
        if credential.workload_id().as_ref() != Some(identity) {
            return Err(format!("CA returned a certificate for {} instead of {identity}", credential.uri));
        }
        self.update_bundle(&bundle, &response.bundle_pem);
        Ok(credential)
    }
}

/// Half of the remaining lifetime, minus up to 10 % (deterministic per certificate).
fn renew_after(c: &Credential) -> Duration {
    let left = c.not_after.duration_since(SystemTime::now()).unwrap_or_default();
    let half = left / 2;
    let jitter_pct = (c.chain_pem.len() as u64
        ^ c.not_after.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs())
        % 10;
    half - half * jitter_pct as u32 / 100
}
