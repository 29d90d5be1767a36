//! Enrolled pods: what a CNI plugin tells ztunnel in Kubernetes. Enrolling opens ztunnel's
//! listeners inside the pod's network namespace, then attaches the capture programs;
//! removing does the reverse. Only enrolled pods are captured.
//!
//! Enrollments outlive the process: every change is written to `pods.json` in the state
//! directory (with the pod's capture slot), and the capture itself is pinned. A restarted
//! ztunnel enrolls the recorded pods again over their pinned links ([`Pods::restore`]); an
//! upgraded one receives the old process's listening sockets as well, so no connection
//! attempt is refused during the hand-over (see `handoff`).
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
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
    #[error("pod {uid}: address {ip} belongs to enrolled pod {owner}; an address is owned by exactly one pod")]
    AddressInUse { uid: String, ip: IpAddr, owner: String },
    #[error("pod {uid}: {source}")]
    Certificate {
        uid: String,
        #[source]
        source: Box<palisade_mesh::secrets::SecretError>,
    },
}

/// The listening sockets ztunnel holds inside one pod; handed to a successor on upgrade.
#[derive(Debug)]
pub struct PodListeners {
    pub outbound4: OwnedFd,
    pub outbound6: Option<OwnedFd>,
    pub inbound: OwnedFd,
    pub hbone: Option<OwnedFd>,
}

impl PodListeners {
    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(PodListeners {
            outbound4: self.outbound4.try_clone()?,
            outbound6: self.outbound6.as_ref().map(OwnedFd::try_clone).transpose()?,
            inbound: self.inbound.try_clone()?,
            hbone: self.hbone.as_ref().map(OwnedFd::try_clone).transpose()?,
        })
    }

    /// Every descriptor, in a fixed order, with the presence of the optional ones.
    pub fn into_fds(self) -> (Vec<OwnedFd>, [bool; 2]) {
        let flags = [self.outbound6.is_some(), self.hbone.is_some()];
        let mut fds = vec![self.outbound4, self.inbound];
        fds.extend(self.outbound6);
        fds.extend(self.hbone);
        (fds, flags)
    }

    /// The inverse of [`Self::into_fds`].
    pub fn from_fds(fds: &mut impl Iterator<Item = OwnedFd>, flags: [bool; 2]) -> Option<Self> {
        let outbound4 = fds.next()?;
        let inbound = fds.next()?;
        let outbound6 = if flags[0] { Some(fds.next()?) } else { None };
        let hbone = if flags[1] { Some(fds.next()?) } else { None };
        Some(PodListeners { outbound4, outbound6, inbound, hbone })
    }
}

/// What `pods.json` records per pod.
#[derive(Clone, Debug, Deserialize, Serialize)]
struct Record {
    spec: PodSpec,
    slot: u32,
}

struct Enrolled {
    spec: PodSpec,
    identity: Option<palisade_mesh::identity::SpiffeId>,
    netns_cookie: u64,
    tasks: Vec<JoinHandle<()>>,
    /// Duplicates of the listeners the tasks serve (for a hand-over or a re-enrollment).
    listeners: PodListeners,
}

pub struct Pods {
    capture: Mutex<Capture>,
    enrolled: Mutex<BTreeMap<String, Enrolled>>,
    /// Every pod this node must enforce, also those a restart could not enroll again yet.
    records: Mutex<BTreeMap<String, Record>>,
    state_file: PathBuf,
    ctx: Arc<ProxyCtx>,
    /// Set to true at shutdown: HBONE listeners stop accepting and drain.
    shutdown: watch::Sender<bool>,
}

type Identity = Option<(palisade_mesh::identity::SpiffeId, Arc<palisade_mesh::tls::CredentialSlot>)>;

fn tokio_listener(fd: OwnedFd) -> std::io::Result<tokio::net::TcpListener> {
    let std = std::net::TcpListener::from(fd);
    std.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(std)
}

impl Pods {
    /// `state_dir` holds `pods.json`.
    pub fn new(capture: Capture, ctx: Arc<ProxyCtx>, state_dir: &Path) -> Self {
        Pods {
            capture: Mutex::new(capture),
            enrolled: Mutex::new(BTreeMap::new()),
            records: Mutex::new(BTreeMap::new()),
            state_file: state_dir.join("pods.json"),
            ctx,
            shutdown: watch::channel(false).0,
        }
    }

    /// The pod's identity and first certificate, when ztunnel has a CA.
    async fn identity(&self, spec: &PodSpec) -> Result<Identity, EnrollError> {
        let Some(mesh) = &self.ctx.mesh else { return Ok(None) };
        let ip = spec.ips[0];
        let id = workload_identity(&self.ctx.snapshot.borrow(), ip, &mesh.trust_domain)
            .ok_or_else(|| EnrollError::NoIdentity { uid: spec.uid.clone(), ip })?;
        let slot = mesh
            .secrets
            .credential(&id, FIRST_CERTIFICATE_WAIT)
            .await
            .map_err(|source| EnrollError::Certificate { uid: spec.uid.clone(), source: Box::new(source) })?;
        Ok(Some((id, slot)))
    }

    /// Enrolls a pod (again: an existing enrollment with the same uid is replaced in place,
    /// its capture never lifted).
    pub async fn enroll(&self, spec: PodSpec) -> Result<(), EnrollError> {
        let slot = self.records.lock().expect("records lock").get(&spec.uid).map(|r| r.slot);
        self.enroll_with(spec, slot, None).await
    }

    async fn enroll_with(
        &self,
        spec: PodSpec,
        slot: Option<u32>,
        inherited: Option<PodListeners>,
    ) -> Result<(), EnrollError> {
        if spec.ips.is_empty() {
            return Err(EnrollError::NoAddress { uid: spec.uid });
        }
        self.check_addresses(&spec)?;
        let identity = self.identity(&spec).await?;
        let id = identity.as_ref().map(|(id, _)| id.clone());
        let result = self.enroll_inner(spec, identity, slot, inherited);
        if result.is_err() {
            // A failed enrollment must not leave a certificate renewing for nobody.
            self.forget_unused(id.as_ref());
        }
        result
    }

    /// An address belongs to one pod: refuse a pod that claims another enrolled pod's.
    fn check_addresses(&self, spec: &PodSpec) -> Result<(), EnrollError> {
        let records = self.records.lock().expect("records lock");
        for (uid, r) in records.iter().filter(|(uid, _)| **uid != spec.uid) {
            if let Some(ip) = spec.ips.iter().find(|ip| r.spec.ips.contains(ip)) {
                return Err(EnrollError::AddressInUse { uid: spec.uid.clone(), ip: *ip, owner: uid.clone() });
            }
        }
        Ok(())
    }

    fn enroll_inner(
        &self,
        spec: PodSpec,
        identity: Identity,
        slot: Option<u32>,
        inherited: Option<PodListeners>,
    ) -> Result<(), EnrollError> {
        let uid = spec.uid.clone();
        let io = |what| {
            let uid = uid.clone();
            move |source| EnrollError::Io { uid, what, source }
        };
        let netns = Netns::open(&spec.netns).map_err(io("open network namespace"))?;
        // Enrolled again: its listeners are taken over (binding the same ports again would fail).
        let previous = self.enrolled.lock().expect("pods lock").remove(&uid);
        let inherited = match (inherited, previous) {
            (Some(l), _) => Some(l),
            (None, Some(prev)) if prev.netns_cookie == netns.cookie() => {
                prev.tasks.iter().for_each(JoinHandle::abort);
                Some(prev.listeners)
            }
            (None, Some(prev)) => {
                prev.tasks.iter().for_each(JoinHandle::abort);
                self.capture.lock().expect("capture lock").detach(prev.netns_cookie);
                None
            }
            (None, None) => None,
        };
        let listeners = self.listeners(&netns, inherited, identity.is_some()).map_err(io("listen in the pod"))?;
        let netns_cookie = netns.cookie();
        let slot = self
            .capture
            .lock()
            .expect("capture lock")
            .attach(PodCapture {
                uid: &uid,
                netns: &netns,
                cgroup: &spec.cgroup,
                addrs: &spec.ips,
                inbound_listener: listeners.inbound.as_fd(),
                slot,
            })
            .map_err(|source| EnrollError::Kernel { uid: uid.clone(), source: Box::new(source) })?;

        let kept = listeners.try_clone().map_err(io("duplicate the pod's listeners"))?;
        let pod = Arc::new(PodNet { name: spec.name.clone(), netns, ip: spec.ips[0], identity });
        let serve = |fd: OwnedFd| tokio_listener(fd).map_err(io("register a listener"));
        let mut tasks = vec![
            tokio::spawn(outbound::serve(serve(listeners.outbound4)?, pod.clone(), self.ctx.clone())),
            tokio::spawn(inbound::serve(serve(listeners.inbound)?, pod.clone(), self.ctx.clone())),
        ];
        if let Some(l) = listeners.hbone {
            let l = serve(l)?;
            tasks.push(tokio::spawn(hbone::serve_inbound(l, pod.clone(), self.ctx.clone(), self.shutdown.subscribe())));
        }
        if let Some(l) = listeners.outbound6 {
            tasks.push(tokio::spawn(outbound::serve(serve(l)?, pod.clone(), self.ctx.clone())));
        }
        tracing::info!(uid = %spec.uid, pod = %spec.name, ips = ?spec.ips, netns_cookie, slot, "pod enrolled");
        let identity = pod.identity.as_ref().map(|(id, _)| id.clone());
        self.records.lock().expect("records lock").insert(uid.clone(), Record { spec: spec.clone(), slot });
        let mut enrolled = self.enrolled.lock().expect("pods lock");
        enrolled.insert(uid, Enrolled { spec, identity, netns_cookie, tasks, listeners: kept });
        self.ctx.metrics.enrolled_pods.store(enrolled.len() as i64, std::sync::atomic::Ordering::Relaxed);
        drop(enrolled);
        self.persist();
        Ok(())
    }

    /// The pod's listeners: inherited ones where given, new ones for the rest.
    fn listeners(&self, netns: &Netns, inherited: Option<PodListeners>, hbone: bool) -> std::io::Result<PodListeners> {
        let bind = |addr: SocketAddr| -> std::io::Result<OwnedFd> {
            let l = netns.listen(addr)?.into_std()?;
            Ok(OwnedFd::from(l))
        };
        let v4 = |port| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        let (outbound4, outbound6, inbound, old_hbone) = match inherited {
            Some(l) => (l.outbound4, l.outbound6, l.inbound, l.hbone),
            None => {
                // IPv6 may be disabled in the pod; IPv6 connects then fail on their own.
                let outbound6 = bind(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT)).ok();
                (bind(v4(OUTBOUND_PORT))?, outbound6, bind(v4(INBOUND_PORT))?, None)
            }
        };
        let hbone = match (hbone, old_hbone) {
            (true, Some(l)) => Some(l),
            (true, None) => Some(bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), HBONE_PORT))?),
            (false, _) => None,
        };
        Ok(PodListeners { outbound4, outbound6, inbound, hbone })
    }

    /// Enrolls again every pod recorded by an earlier ztunnel (over its pinned capture), with
    /// the listeners a predecessor handed over where there are some. A pod whose network
    /// namespace is gone is released; one that cannot be enrolled stays captured by its pins
    /// (its traffic is refused, never let through) and is retried by the next enrollment.
    pub async fn restore(self: &Arc<Self>, mut inherited: HashMap<String, PodListeners>) {
        let records: Vec<Record> = match std::fs::read(&self.state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(file = %self.state_file.display(), error = %e, "unreadable enrollment record; pods stay captured by their pins");
                Vec::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::error!(file = %self.state_file.display(), error = %e, "cannot read enrollment record");
                Vec::new()
            }
        };
        self.records.lock().expect("records lock").extend(records.iter().map(|r| (r.spec.uid.clone(), r.clone())));
        let mut tasks = tokio::task::JoinSet::new();
        for r in records {
            if !r.spec.netns.exists() {
                tracing::info!(uid = %r.spec.uid, pod = %r.spec.name, "pod gone while ztunnel was down: released");
                self.capture.lock().expect("capture lock").release_pinned(&r.spec.uid, Some(r.slot));
                self.records.lock().expect("records lock").remove(&r.spec.uid);
                continue;
            }
            let (pods, listeners) = (self.clone(), inherited.remove(&r.spec.uid));
            tasks.spawn(async move {
                let (uid, name) = (r.spec.uid.clone(), r.spec.name.clone());
                match pods.enroll_with(r.spec, Some(r.slot), listeners).await {
                    Ok(()) => tracing::info!(%uid, pod = %name, "pod resumed"),
                    Err(e) => tracing::error!(%uid, pod = %name, error = %crate::enroll::error_chain(&e),
                        "pod could not be resumed; it stays captured and its traffic is refused"),
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        self.persist();
        for dir in self.capture.lock().expect("capture lock").unclaimed_pins() {
            tracing::error!(pins = %dir.display(), "pinned capture without an enrollment record: the pod's traffic is refused until it is enrolled again");
        }
    }

    /// Writes the records (atomically: a crash leaves the old file or the new one).
    fn persist(&self) {
        let records: Vec<Record> = self.records.lock().expect("records lock").values().cloned().collect();
        let tmp = self.state_file.with_extension("json.tmp");
        let written = serde_json::to_vec_pretty(&records)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.state_file));
        if let Err(e) = written {
            tracing::error!(file = %self.state_file.display(), error = %e, "cannot record enrollments; a restart would not resume them");
        }
    }

    /// Stops capturing a pod; connections already proxied finish on their own.
    pub fn remove(&self, uid: &str) -> bool {
        let record = self.records.lock().expect("records lock").remove(uid);
        let pod = self.enrolled.lock().expect("pods lock").remove(uid);
        match (&pod, &record) {
            (Some(pod), _) => {
                self.capture.lock().expect("capture lock").detach(pod.netns_cookie);
                pod.tasks.iter().for_each(JoinHandle::abort);
            }
            (None, Some(r)) => self.capture.lock().expect("capture lock").release_pinned(uid, Some(r.slot)),
            (None, None) => return false,
        }
        self.persist();
        let count = self.enrolled.lock().expect("pods lock").len();
        self.ctx.metrics.enrolled_pods.store(count as i64, std::sync::atomic::Ordering::Relaxed);
        self.forget_unused(pod.as_ref().and_then(|p| p.identity.as_ref()));
        tracing::info!(uid, "pod removed");
        true
    }

    /// Stops renewing a certificate no local workload uses any more.
    fn forget_unused(&self, id: Option<&palisade_mesh::identity::SpiffeId>) {
        let (Some(mesh), Some(id)) = (&self.ctx.mesh, id) else { return };
        if !self.enrolled.lock().expect("pods lock").values().any(|p| p.identity.as_ref() == Some(id)) {
            mesh.secrets.forget(id);
        }
    }

    pub fn list(&self) -> Vec<PodSpec> {
        self.enrolled.lock().expect("pods lock").values().map(|p| p.spec.clone()).collect()
    }

    /// Stops accepting HBONE connections; streams in flight continue (drain).
    pub fn stop_accepting(&self) {
        self.shutdown.send_replace(true);
    }

    /// For an upgrade: stops every accept loop and hands out the listening sockets; the
    /// connections in flight go on. HBONE connections are told (GOAWAY) to take no new
    /// streams, so clients open new ones, to the successor.
    pub fn hand_over(&self) -> Vec<(String, PodListeners)> {
        let enrolled = std::mem::take(&mut *self.enrolled.lock().expect("pods lock"));
        self.stop_accepting();
        enrolled
            .into_iter()
            .map(|(uid, pod)| {
                pod.tasks.iter().for_each(JoinHandle::abort);
                (uid, pod.listeners)
            })
            .collect()
    }
}
