//! Waypoints in a sandbox cluster: a pod of its own on a node (a network namespace with an
//! address like any pod's, never enrolled: a waypoint terminates HBONE itself, as Istio's
//! do), its `Workload` labelled `gateway.networking.k8s.io/gateway-name: <name>`, a `Gateway`
//! of class `palisade-waypoint`, and the `waypoint` binary running in that namespace with a
//! credential bound to its own identity (`palisade ca waypoint-credential`, as Kubernetes
//! would mount a projected service-account token), never its node's. The Service
//! it serves carries `istio.io/use-waypoint: <name>` in the resources the test writes.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{CA_ADDR, Cluster, PodInfo, TRUST_DOMAIN, netns_name};
use crate::sys::{ip_in, sysctl_in};

/// The HBONE port the waypoint listens on, and its admin port (`/ready`, `/metrics`).
pub const WAYPOINT_ADMIN: &str = "127.0.0.1:15020";
/// Where a waypoint serves `/flows`, in its pod's network namespace.
pub const WAYPOINT_DEBUG: &str = "127.0.0.1:15000";

/// A waypoint to run.
#[derive(Clone, Debug)]
pub struct WaypointSpec {
    /// Its Gateway's (and pod's) name.
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Node (1-based) whose pod network it joins and whose node credential it uses.
    pub node: usize,
}

impl WaypointSpec {
    pub fn new(name: &str, namespace: &str, node: usize) -> Self {
        WaypointSpec { name: name.into(), namespace: namespace.into(), service_account: name.into(), node }
    }
}

impl Cluster {
    /// Creates each waypoint's pod network (addresses after its node's pods: 10.244.<n>.200+j).
    pub(super) fn add_waypoint_pods(&mut self, waypoints: &[WaypointSpec]) -> Result<()> {
        for (j, w) in waypoints.iter().enumerate() {
            let n = w.node;
            let node = self.info.nodes.get(n - 1).with_context(|| format!("waypoint {}: no node {n}", w.name))?.clone();
            let pod_ns = netns_name(&self.info.id, &format!("n{n}w{}", j + 1));
            let pod_ip = format!("10.244.{n}.{}", 200 + j);
            let veth = format!("w{}", j + 1);
            super::ip(&["netns", "add", &pod_ns])?;
            ip_in(&pod_ns, &["link", "set", "lo", "up"])?;
            ip_in(&node.netns, &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod_ns])?;
            ip_in(&node.netns, &["link", "set", &veth, "up"])?;
            ip_in(&node.netns, &["route", "add", &format!("{pod_ip}/32"), "dev", &veth])?;
            sysctl_in(&pod_ns, "net.ipv6.conf.default.disable_ipv6", "1")?;
            sysctl_in(&pod_ns, "net.ipv6.conf.eth0.disable_ipv6", "1")?;
            ip_in(&pod_ns, &["addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"])?;
            ip_in(&pod_ns, &["link", "set", "eth0", "up"])?;
            ip_in(&pod_ns, &["route", "add", &format!("10.244.{n}.1"), "dev", "eth0", "scope", "link"])?;
            ip_in(&pod_ns, &["route", "add", "default", "via", &format!("10.244.{n}.1"), "dev", "eth0"])?;
            // The waypoint asks the CA (on the fabric) for its certificate itself, as ztunnels
            // do from their nodes: the fabric routes this one address back through its node.
            let fabric = netns_name(&self.info.id, "fab");
            ip_in(&fabric, &["route", "add", &format!("{pod_ip}/32"), "via", &node.ip])?;
            let cgroup = self.info.cgroup.join(format!("waypoint-{}", w.name));
            std::fs::create_dir_all(&cgroup).with_context(|| format!("create {}", cgroup.display()))?;
            let labels = [
                ("app".to_string(), w.name.clone()),
                ("gateway.networking.k8s.io/gateway-name".to_string(), w.name.clone()),
            ];
            self.info.waypoints.push(PodInfo {
                name: w.name.clone(),
                uid: format!("{}-{}", self.info.id, w.name),
                node: node.name.clone(),
                netns: pod_ns.clone(),
                netns_path: PathBuf::from(format!("/run/netns/{pod_ns}")),
                cgroup,
                ip: pod_ip,
                namespace: w.namespace.clone(),
                service_account: w.service_account.clone(),
                labels: labels.into_iter().collect(),
                ports: vec![],
                identity: format!("spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}", w.namespace, w.service_account),
            });
        }
        Ok(())
    }

    /// The Gateway of each waypoint, for the resources file.
    pub(super) fn waypoint_gateways_yaml(&self) -> String {
        self.info
            .waypoints
            .iter()
            .map(|w| {
                format!(
                    "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {}, namespace: {}}}\n\
                     spec:\n  gatewayClassName: palisade-waypoint\n  listeners:\n  - {{name: mesh, port: 15008, protocol: HBONE}}\n---\n",
                    w.name, w.namespace
                )
            })
            .collect()
    }

    /// Starts every waypoint's binary in its pod's namespace and waits until each is ready.
    pub(super) fn start_waypoints(&mut self, bin: &Path) -> Result<()> {
        for w in self.info.waypoints.clone() {
            let log = self.waypoint_log(&w.name);
            let credential = self.waypoint_credential(&w)?;
            let mut cmd = Command::new(bin);
            cmd.args(["--gateway", &w.name, "--namespace", &w.namespace, "--service-account", &w.service_account])
                .args(["--ca-addr", CA_ADDR, "--trust-domain", TRUST_DOMAIN])
                .arg("--credential-dir")
                .arg(credential)
                .arg("--policy")
                .arg(&self.info.policy_file)
                .args(["--listen", &format!("{}:15008", w.ip), "--admin", WAYPOINT_ADMIN]);
            let child = self.spawn_in(&w.netns, &format!("waypoint-{}", w.name), cmd, &log)?;
            self.waypoint_pids.insert(w.name.clone(), child.id());
            self.processes.push(child);
        }
        for w in self.info.waypoints.clone() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while crate::sys::http_get_in(&w.netns, WAYPOINT_ADMIN, "/ready").is_err() {
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(self.waypoint_log(&w.name)).unwrap_or_default();
                    bail!("waypoint {} not ready after 30 s; its log:\n{log}", w.name);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Issues waypoint `w`'s bound credential (its own identity only) into the state directory.
    fn waypoint_credential(&self, w: &PodInfo) -> Result<PathBuf> {
        let palisade = self.control_plane_bin.as_ref().context("waypoints need the palisade binary (the CA)")?;
        let out = self.info.state_dir.join(format!("waypoint-credential-{}", w.name));
        let mut cmd = Command::new(palisade);
        cmd.arg("ca")
            .arg("--dir")
            .arg(self.info.state_dir.join("ca"))
            .args(["--trust-domain", TRUST_DOMAIN, "waypoint-credential"])
            .args(["--namespace", &w.namespace, "--service-account", &w.service_account])
            .arg("--inventory")
            .arg(self.store_dir())
            .arg("--out")
            .arg(&out);
        let result = cmd.output().with_context(|| format!("run {}", palisade.display()))?;
        if !result.status.success() {
            bail!("waypoint credential for {}: {}", w.name, String::from_utf8_lossy(&result.stderr).trim());
        }
        Ok(out)
    }

    /// Kills a waypoint's process with SIGKILL (a crash, as its clients see it); teardown reaps it.
    pub fn kill_waypoint(&self, name: &str) -> Result<()> {
        let pid = *self.waypoint_pids.get(name).with_context(|| format!("no waypoint process {name}"))?;
        // SAFETY: kill(2) with a pid this cluster started and has not reaped yet.
        if unsafe { libc::kill(pid as i32, libc::SIGKILL) } != 0 {
            bail!("kill waypoint {name}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The process id of waypoint `name` (for its memory, in tests).
    pub fn waypoint_pid(&self, name: &str) -> Result<u32> {
        self.waypoint_pids.get(name).copied().with_context(|| format!("no waypoint process {name}"))
    }

    /// The waypoint's recent flows (its `/flows`, a JSON array).
    pub fn waypoint_flows(&self, name: &str) -> Result<serde_json::Value> {
        let w = self.waypoint(name)?;
        let text = crate::sys::http_get_in(&w.netns, WAYPOINT_DEBUG, "/flows")?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Where waypoint `name` logs (its access log lines included).
    pub fn waypoint_log(&self, name: &str) -> PathBuf {
        self.info.state_dir.join(format!("waypoint-{name}.log"))
    }

    /// A waypoint's pod.
    pub fn waypoint(&self, name: &str) -> Result<&PodInfo> {
        self.info.waypoints.iter().find(|w| w.name == name).with_context(|| format!("no waypoint {name}"))
    }
}
