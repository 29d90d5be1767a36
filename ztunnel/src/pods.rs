//! Enrolled pods: what a CNI plugin tells ztunnel in Kubernetes. Enrolling opens ztunnel's
//! listeners inside the pod's network namespace, then attaches the capture programs;
//! removing does the reverse. Only enrolled pods are captured.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use palisade_ebpf_common::{INBOUND_PORT, OUTBOUND_PORT};
use palisade_policy::Snapshot;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::datapath::{Capture, PodCapture};
use crate::netns::Netns;
use crate::proxy::{PodNet, ProxyCtx, inbound, outbound};

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
}

struct Enrolled {
    spec: PodSpec,
    netns_cookie: u64,
    tasks: Vec<JoinHandle<()>>,
}

pub struct Pods {
    capture: Mutex<Capture>,
    enrolled: Mutex<BTreeMap<String, Enrolled>>,
    ctx: Arc<ProxyCtx>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
}

impl Pods {
    pub fn new(capture: Capture, ctx: Arc<ProxyCtx>, snapshot: watch::Receiver<Arc<Snapshot>>) -> Self {
        Pods { capture: Mutex::new(capture), enrolled: Mutex::new(BTreeMap::new()), ctx, snapshot }
    }

    /// Enrolls a pod (again: an existing enrollment with the same uid is replaced).
    pub fn enroll(&self, spec: PodSpec) -> Result<(), EnrollError> {
        let uid = spec.uid.clone();
        if spec.ips.is_empty() {
            return Err(EnrollError::NoAddress { uid });
        }
        self.remove(&uid);
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
        let netns_cookie = netns.cookie();
        self.capture
            .lock()
            .expect("capture lock")
            .attach(PodCapture { netns: &netns, cgroup: &spec.cgroup, addrs: &spec.ips, inbound_listener: &inbound })
            .map_err(|source| EnrollError::Kernel { uid: uid.clone(), source: Box::new(source) })?;

        let pod = Arc::new(PodNet { name: spec.name.clone(), netns });
        let mut tasks = vec![
            tokio::spawn(outbound::serve(outbound4, pod.clone(), self.ctx.clone())),
            tokio::spawn(inbound::serve(inbound, pod.clone(), self.ctx.clone(), self.snapshot.clone())),
        ];
        if let Some(l) = outbound6 {
            tasks.push(tokio::spawn(outbound::serve(l, pod.clone(), self.ctx.clone())));
        }
        tracing::info!(uid = %spec.uid, pod = %spec.name, ips = ?spec.ips, netns_cookie, "pod enrolled");
        let mut enrolled = self.enrolled.lock().expect("pods lock");
        enrolled.insert(uid, Enrolled { spec, netns_cookie, tasks });
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
        let n = self.enrolled.lock().expect("pods lock").len();
        self.ctx.metrics.enrolled_pods.store(n as i64, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(uid, pod = %pod.spec.name, "pod removed");
        true
    }

    pub fn list(&self) -> Vec<PodSpec> {
        self.enrolled.lock().expect("pods lock").values().map(|p| p.spec.clone()).collect()
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
