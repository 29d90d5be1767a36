//! Enrolled pods: what a CNI plugin tells ztunnel in Kubernetes. Enrolling opens ztunnel's
//! listeners inside the pod's network namespace, then attaches the capture programs;
//! removing does the reverse. Only enrolled pods are captured.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use palisade_ebpf_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::datapath::{Capture, PodCapture};
use crate::netns::Netns;
use crate::proxy::hbone::workload_identity;
use crate::proxy::{PodNet, ProxyCtx, hbone, inbound, outbound};

/// How long enrollment waits for a pod's first certificate.
const FIRST_CERTIFICATE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// An enrollment request.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct PodSpec {
    pub uid: String,
    pub name: String,
    /// Path of the pod's network namespace (e.g. /run/netns/x or /proc/<pid>/ns/net).
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory.
    pub cgroup: PathBuf,
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("pod {uid}: {what}: {source}")]
    Io {
        uid: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {uid}: {source}")]
    Kernel {
        uid: String,
        #[source]
        source: Box<crate::datapath::KernelError>,
    },
    #[error("pod {uid}: at least one IP is required")]
    NoAddress { uid: String },
    #[error("pod {uid}: {ip} is not the address of any workload in the inventory, so it has no identity")]
    NoIdentity { uid: String, ip: IpAddr },
    #[error("pod {uid}: {source}")]
    Certificate {
        uid: String,
        #[source]
        source: palisade_mesh::secrets::SecretError,
    },
}

struct Enrolled {
    spec: PodSpec,
    identity: Option<palisade_mesh::identity::SpiffeId>,
    netns_cookie: u64,
    tasks: Vec<JoinHandle<()>>,
}

pub struct Pods {
    capture: Mutex<Capture>,
    enrolled: Mutex<BTreeMap<String, Enrolled>>,
    ctx: Arc<ProxyCtx>,
    /// Set to true at shutdown: HBONE listeners stop accepting and drain.
    shutdown: watch::Sender<bool>,
}

impl Pods {
    pub fn new(capture: Capture, ctx: Arc<ProxyCtx>) -> Self {
        Pods {
            capture: Mutex::new(capture),
            enrolled: Mutex::new(BTreeMap::new()),
            ctx,
            shutdown: watch::channel(false).0,
        }
    }

    /// The pod's identity and first certificate, when ztunnel has a CA.
    async fn identity(
        &self,
        spec: &PodSpec,
    ) -> Result<Option<(palisade_mesh::identity::SpiffeId, Arc<palisade_mesh::tls::CredentialSlot>)>, EnrollError> {
        let Some(mesh) = &self.ctx.mesh else { return Ok(None) };
        let ip = spec.ips[0];
        let id = workload_identity(&self.ctx.snapshot.borrow(), ip, &mesh.trust_domain)
            .ok_or_else(|| EnrollError::NoIdentity { uid: spec.uid.clone(), ip })?;
        let slot = mesh
            .secrets
            .credential(&id, FIRST_CERTIFICATE_WAIT)
            .await
            .map_err(|source| EnrollError::Certificate { uid: spec.uid.clone(), source })?;
        Ok(Some((id, slot)))
    }

    /// Enrolls a pod (again: an existing enrollment with the same uid is replaced).
    pub async fn enroll(&self, spec: PodSpec) -> Result<(), EnrollError> {
        let uid = spec.uid.clone();
        if spec.ips.is_empty() {
            return Err(EnrollError::NoAddress { uid });
        }
        self.remove(&uid);
        let identity = self.identity(&spec).await?;
        let io = |what| {
            let uid = uid.clone();
            move |source| EnrollError::Io { uid, what, source }
        };
        let netns = Netns::open(&spec.netns).map_err(io("open network namespace"))?;
        let outbound4 = netns
            .listen(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT))
            .map_err(io("listen on 127.0.0.1:15001 in the pod"))?;
        // IPv6 may be disabled in the pod; IPv6 connects then fail on their own.
        let outbound6 = netns.listen(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT)).ok();
        let inbound = netns
            .listen(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), INBOUND_PORT))
            .map_err(io("listen on 127.0.0.1:15006 in the pod"))?;
        let hbone_listener = match identity {
            Some(_) => Some(
                netns
                    .listen(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), HBONE_PORT))
                    .map_err(io("listen on 0.0.0.0:15008 in the pod"))?,
            ),
            None => None,
        };
        let netns_cookie = netns.cookie();
        self.capture
            .lock()
            .expect("capture lock")
            .attach(PodCapture { netns: &netns, cgroup: &spec.cgroup, addrs: &spec.ips, inbound_listener: &inbound })
            .map_err(|source| EnrollError::Kernel { uid: uid.clone(), source: Box::new(source) })?;

        let pod = Arc::new(PodNet { name: spec.name.clone(), netns, ip: spec.ips[0], identity });
        let mut tasks = vec![
            tokio::spawn(outbound::serve(outbound4, pod.clone(), self.ctx.clone())),
            tokio::spawn(inbound::serve(inbound, pod.clone(), self.ctx.clone())),
        ];
        if let Some(l) = hbone_listener {
            tasks.push(tokio::spawn(hbone::serve_inbound(l, pod.clone(), self.ctx.clone(), self.shutdown.subscribe())));
        }
        if let Some(l) = outbound6 {
            tasks.push(tokio::spawn(outbound::serve(l, pod.clone(), self.ctx.clone())));
        }
        tracing::info!(uid = %spec.uid, pod = %spec.name, ips = ?spec.ips, netns_cookie, "pod enrolled");
        let mut enrolled = self.enrolled.lock().expect("pods lock");
        let identity = pod.identity.as_ref().map(|(id, _)| id.clone());
        enrolled.insert(uid, Enrolled { spec, identity, netns_cookie, tasks });
        self.ctx.metrics.enrolled_pods.store(enrolled.len() as i64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Stops capturing a pod; connections already proxied finish on their own.
    pub fn remove(&self, uid: &str) -> bool {
        let Some(pod) = self.enrolled.lock().expect("pods lock").remove(uid) else {
            return false;
        };
        let _ = self.capture.lock().expect("capture lock").detach(pod.netns_cookie);
        for t in &pod.tasks {
            t.abort();
        }
        let enrolled = self.enrolled.lock().expect("pods lock");
        self.ctx.metrics.enrolled_pods.store(enrolled.len() as i64, std::sync::atomic::Ordering::Relaxed);
        // Stop renewing a certificate no local workload uses any more.
        if let (Some(mesh), Some(id)) = (&self.ctx.mesh, &pod.identity)
            && !enrolled.values().any(|p| p.identity.as_ref() == Some(id))
        {
            mesh.secrets.forget(id);
        }
        drop(enrolled);
        tracing::info!(uid, pod = %pod.spec.name, "pod removed");
        true
    }

    pub fn list(&self) -> Vec<PodSpec> {
        self.enrolled.lock().expect("pods lock").values().map(|p| p.spec.clone()).collect()
    }

    /// Stops accepting HBONE connections; streams in flight continue (drain).
    pub fn stop_accepting(&self) {
        self.shutdown.send_replace(true);
    }

    /// Detaches every program (shutdown).
    pub fn shutdown(&self) {
        let uids: Vec<String> = self.enrolled.lock().expect("pods lock").keys().cloned().collect();
        for uid in uids {
            self.remove(&uid);
        }
        self.capture.lock().expect("capture lock").detach_all();
    }
}
