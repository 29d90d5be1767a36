//! A sandbox cluster: nodes and pods as network namespaces on one machine.
//!
//! ```text
//!   fabric netns: bridge br0 ── n1 ──veth── eth0 172.18.0.11  node 1 netns (ztunnel)
//!                            └─ n2 ──veth── eth0 172.18.0.12  node 2 netns (ztunnel)
//!   node i: pK ──veth── eth0 10.244.i.(10+K)/32  pod netns, own cgroup v2 directory
//! ```
//! Every name starts with `plsd-<id>-` (netns) or `plsd-<id>` (the cgroup directory holding
//! every process of the cluster), so teardown finds all of it and touches nothing else. The
//! root network namespace is never modified.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::sys::{self, ip, ip_in, sysctl_in};

mod control_plane;
mod etcd_plane;
mod waypoint;
mod ztunnel;

pub use control_plane::CONTROL_PLANE_ADDR;
pub use etcd_plane::{ETCD_ADDR, replica_addr};
pub use waypoint::{WAYPOINT_ADMIN, WAYPOINT_DEBUG, WaypointSpec};

pub const PREFIX: &str = "plsd-";
/// Where the CA listens: the fabric bridge's address, reachable from every node.
pub const CA_ADDR: &str = "172.18.0.1:15012";
pub const TRUST_DOMAIN: &str = "cluster.local";

/// A pod to create.
#[derive(Clone, Debug)]
pub struct PodTemplate {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// Named TCP container ports (name, port), for policies that name ports.
    pub ports: Vec<(String, u16)>,
}

impl PodTemplate {
    pub fn new(name: &str, namespace: &str, service_account: &str) -> Self {
        let labels = BTreeMap::from([("app".to_string(), name.to_string())]);
        PodTemplate {
            name: name.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
            labels,
            ports: vec![],
        }
    }
}

#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Short unique id; names are `plsd-<id>-…`.
    pub id: String,
    /// Where cluster.json, the policy file, sockets and logs go.
    pub state_dir: PathBuf,
    /// Pods of each node, in node order.
    pub nodes: Vec<Vec<PodTemplate>>,
    /// ztunnel binary; `None` runs no ztunnel (the no-mesh baseline).
    pub ztunnel: Option<PathBuf>,
    /// `palisade` binary: with it the cluster runs a CA and ztunnels use HBONE (mTLS);
    /// without it ztunnels carry plain TCP between pods.
    pub palisade: Option<PathBuf>,
    /// Lifetime of workload certificates issued by the sandbox CA.
    pub workload_ttl: Duration,
    /// Enroll every pod with its node's ztunnel at start.
    pub enroll: bool,
    /// Extra YAML resources (policies, namespaces) added to the generated workloads.
    pub policy: String,
    /// Remove everything when the `Cluster` is dropped.
    pub teardown_on_drop: bool,
    /// 0: one `palisade serve` over a directory. More: etcd and that many replicas on it
    /// (see `etcd_plane`).
    pub etcd_replicas: usize,
    /// Waypoints (pods of their own, not enrolled), run with the `waypoint` binary when it is
    /// given (and the cluster has a CA).
    pub waypoints: Vec<WaypointSpec>,
    pub waypoint: Option<PathBuf>,
}

impl ClusterSpec {
    /// `nodes` nodes with `pods` pods each, named `p<node>-<pod>` in namespace `default`.
    pub fn uniform(id: &str, state_dir: PathBuf, nodes: usize, pods: usize) -> Self {
        let nodes = (1..=nodes)
            .map(|n| {
                (1..=pods).map(|p| PodTemplate::new(&format!("p{n}-{p}"), "default", &format!("p{n}-{p}"))).collect()
            })
            .collect();
        ClusterSpec {
            id: id.into(),
            state_dir,
            nodes,
            ztunnel: None,
            palisade: None,
            workload_ttl: Duration::from_secs(24 * 3600),
            enroll: true,
            policy: String::new(),
            teardown_on_drop: true,
            etcd_replicas: 0,
            waypoints: vec![],
            waypoint: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub netns: String,
    pub ip: String,
    pub pod_cidr: String,
    pub admin: String,
    pub enroll_socket: PathBuf,
    pub log: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodInfo {
    pub name: String,
    pub uid: String,
    pub node: String,
    pub netns: String,
    pub netns_path: PathBuf,
    pub cgroup: PathBuf,
    pub ip: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<(String, u16)>,
    pub identity: String,
}

/// What `cluster.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub id: String,
    pub state_dir: PathBuf,
    pub cgroup: PathBuf,
    pub policy_file: PathBuf,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
    /// Waypoints' pods (not enrolled; see `waypoint`).
    #[serde(default)]
    pub waypoints: Vec<PodInfo>,
}

pub struct Cluster {
    pub info: ClusterInfo,
    extra_policy: String,
    ztunnels: Vec<Child>,
    /// How each node's ztunnel was started (binary, with a CA), to start it again.
    started: Vec<(PathBuf, bool)>,
    /// Restarts per node, to name their logs.
    ztunnel_generation: BTreeMap<usize, u32>,
    /// Other processes of the cluster (the CA, waypoints).
    processes: Vec<Child>,
    /// Each waypoint's process id (its `Child` is in `processes`).
    waypoint_pids: BTreeMap<String, u32>,
    /// `palisade serve` and its binary (see `control_plane`).
    control_plane: Option<Child>,
    control_plane_bin: Option<PathBuf>,
    /// etcd and the `palisade serve` replicas, when the spec asks for them.
    etcd_plane: Option<etcd_plane::EtcdPlane>,
    /// ztunnels replaced by [`Cluster::start_new_ztunnel`] (draining after a hand-over, or dead).
    retired: Vec<Child>,
    teardown_on_drop: bool,
}

fn netns_name(id: &str, suffix: &str) -> String {
    format!("{PREFIX}{id}-{suffix}")
}

/// Where the ztunnels of cluster `id` pin their maps and links (one directory per node). The
/// kernel side outlives the processes, so teardown removes it.
pub fn pin_root(id: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{PREFIX}{id}"))
}

impl Cluster {
    /// Builds the cluster; on any error, everything made so far is removed.
    pub fn up(spec: ClusterSpec) -> Result<Cluster> {
        teardown(&spec.id, &spec.state_dir).context("clean what an earlier run left")?;
        let mut cluster = Cluster::attach(ClusterInfo {
            id: spec.id.clone(),
            state_dir: spec.state_dir.clone(),
            cgroup: sys::cgroup2_root()?.join(format!("{PREFIX}{}", spec.id)),
            // In the control plane's store directory (see `control_plane`).
            policy_file: spec.state_dir.join("store").join("policy.yaml"),
            nodes: Vec::new(),
            pods: Vec::new(),
            waypoints: Vec::new(),
        });
        cluster.extra_policy = spec.policy.clone();
        // Ours from here: everything made so far is removed if the build fails.
        cluster.teardown_on_drop = true;
        match cluster.build(&spec) {
            Ok(()) => {
                cluster.teardown_on_drop = spec.teardown_on_drop;
                Ok(cluster)
            }
            Err(e) => {
                let logs = cluster.log_tails();
                drop(cluster);
                Err(e.context(logs))
            }
        }
    }

    fn build(&mut self, spec: &ClusterSpec) -> Result<()> {
        std::fs::create_dir_all(&spec.state_dir)?;
        std::fs::create_dir_all(self.store_dir())?;
        std::fs::create_dir_all(&self.info.cgroup).with_context(|| format!("create {}", self.info.cgroup.display()))?;
        let id = &spec.id;
        let fabric = netns_name(id, "fab");
        ip(&["netns", "add", &fabric])?;
        ip_in(&fabric, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(&fabric, &["link", "set", "br0", "up"])?;
        ip_in(&fabric, &["link", "set", "lo", "up"])?;
        ip_in(&fabric, &["addr", "add", "172.18.0.1/24", "dev", "br0"])?;
        let n_nodes = spec.nodes.len();
        for (i, pods) in spec.nodes.iter().enumerate() {
            let n = i + 1;
            let node = netns_name(id, &format!("n{n}"));
            let node_ip = format!("172.18.0.{}", 10 + n);
            ip(&["netns", "add", &node])?;
            ip_in(&node, &["link", "set", "lo", "up"])?;
            ip_in(&node, &["link", "add", "eth0", "type", "veth", "peer", "name", &format!("n{n}"), "netns", &fabric])?;
            ip_in(&fabric, &["link", "set", &format!("n{n}"), "master", "br0", "up"])?;
            sysctl_in(&node, "net.ipv6.conf.all.disable_ipv6", "1")?;
            ip_in(&node, &["addr", "add", &format!("{node_ip}/24"), "dev", "eth0"])?;
            ip_in(&node, &["link", "set", "eth0", "up"])?;
            ip_in(&node, &["addr", "add", &format!("10.244.{n}.1/32"), "dev", "lo"])?;
            sysctl_in(&node, "net.ipv4.ip_forward", "1")?;
            for m in (1..=n_nodes).filter(|m| *m != n) {
                ip_in(&node, &["route", "add", &format!("10.244.{m}.0/24"), "via", &format!("172.18.0.{}", 10 + m)])?;
            }
            let node_name = format!("node-{n}");
            self.info.nodes.push(NodeInfo {
                name: node_name.clone(),
                netns: node.clone(),
                ip: node_ip,
                pod_cidr: format!("10.244.{n}.0/24"),
                admin: "127.0.0.1:15000".into(),
                enroll_socket: spec.state_dir.join(format!("ztunnel-{node_name}.sock")),
                log: spec.state_dir.join(format!("ztunnel-{node_name}.log")),
            });
            for (k, tpl) in pods.iter().enumerate() {
                let pod_ns = netns_name(id, &format!("n{n}p{}", k + 1));
                let pod_ip = format!("10.244.{n}.{}", 10 + k + 1);
                let veth = format!("p{}", k + 1);
                ip(&["netns", "add", &pod_ns])?;
                ip_in(&pod_ns, &["link", "set", "lo", "up"])?;
                ip_in(&node, &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod_ns])?;
                ip_in(&node, &["link", "set", &veth, "up"])?;
                ip_in(&node, &["route", "add", &format!("{pod_ip}/32"), "dev", &veth])?;
                // IPv6 stays on lo (::1) but off eth0, so the interface is silent unless the
                // pod itself sends something: tests count its packets.
                sysctl_in(&pod_ns, "net.ipv6.conf.default.disable_ipv6", "1")?;
                sysctl_in(&pod_ns, "net.ipv6.conf.eth0.disable_ipv6", "1")?;
                // Reuse TIME_WAIT ports for new outgoing connections on every interface, not
                // only loopback (the default): otherwise a burst of connections to another pod
                // slows connect() down while loopback connections (to ztunnel) do not.
                sysctl_in(&pod_ns, "net.ipv4.tcp_tw_reuse", "1")?;
                ip_in(&pod_ns, &["addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"])?;
                ip_in(&pod_ns, &["link", "set", "eth0", "up"])?;
                ip_in(&pod_ns, &["route", "add", &format!("10.244.{n}.1"), "dev", "eth0", "scope", "link"])?;
                ip_in(&pod_ns, &["route", "add", "default", "via", &format!("10.244.{n}.1"), "dev", "eth0"])?;
                let cgroup = self.info.cgroup.join(format!("pod-{}", tpl.name));
                std::fs::create_dir_all(&cgroup).with_context(|| format!("create {}", cgroup.display()))?;
                self.info.pods.push(PodInfo {
                    name: tpl.name.clone(),
                    uid: format!("{id}-{}", tpl.name),
                    node: node_name.clone(),
                    netns: pod_ns.clone(),
                    netns_path: PathBuf::from(format!("/run/netns/{pod_ns}")),
                    cgroup,
                    ip: pod_ip,
                    namespace: tpl.namespace.clone(),
                    service_account: tpl.service_account.clone(),
                    labels: tpl.labels.clone(),
                    ports: tpl.ports.clone(),
                    identity: format!("spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}", tpl.namespace, tpl.service_account),
                });
            }
        }
        self.add_waypoint_pods(&spec.waypoints)?;
        self.write_policy_file(&self.extra_policy.clone())?;
        self.save()?;
        if let Some(bin) = &spec.ztunnel {
            if let Some(palisade) = &spec.palisade {
                self.start_ca(palisade, spec.workload_ttl)?;
                self.control_plane_bin = Some(palisade.clone());
                if spec.etcd_replicas > 0 {
                    self.etcd_plane = Some(etcd_plane::EtcdPlane::new(spec.etcd_replicas, palisade));
                    self.start_etcd_plane()?;
                } else {
                    self.start_control_plane(palisade)?;
                }
            }
            for i in 0..self.info.nodes.len() {
                self.start_ztunnel(i, bin, spec.palisade.is_some())?;
            }
            if spec.enroll {
                for pod in self.info.pods.clone() {
                    self.enroll(&pod.name)?;
                }
            }
            if let (Some(waypoint), Some(_)) = (&spec.waypoint, &spec.palisade) {
                self.start_waypoints(waypoint)?;
            }
        }
        Ok(())
    }

    /// Starts `cmd` inside network namespace `netns`, in the cluster cgroup `cgroup_name`,
    /// in its own session, logging to `log`.
    fn spawn_in(&self, netns: &str, cgroup_name: &str, mut cmd: Command, log: &Path) -> Result<Child> {
        let cgroup = self.info.cgroup.join(cgroup_name);
        std::fs::create_dir_all(&cgroup)?;
        let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").into_os_string().into_encoded_bytes())?;
        let log = std::fs::File::create(log)?;
        // Enter the namespace directly rather than through `ip netns exec`, which would also
        // give the process a private /sys without the cgroup mounts ztunnel needs.
        let netns = std::fs::File::open(format!("/run/netns/{netns}"))?;
        cmd.env("RUST_LOG", std::env::var("PALISADE_LOG").unwrap_or_else(|_| "info".into()))
            .env("RUST_BACKTRACE", "0")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: pre_exec only makes raw syscalls (open/write cgroup.procs, setns, setsid).
        unsafe {
            cmd.pre_exec(move || {
                use std::os::fd::AsRawFd;
                sys::join_cgroup(&procs)?;
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::setsid();
                Ok(())
            });
        }
        cmd.spawn().with_context(|| format!("start {:?}", cmd.get_program()))
    }

    /// Creates the CA's root and a credential per node, then serves the CA on the fabric.
    fn start_ca(&mut self, palisade: &Path, workload_ttl: Duration) -> Result<()> {
        let ca_dir = self.info.state_dir.join("ca");
        sys::run(palisade.to_str().context("palisade path")?, &["ca", "--dir", ca_dir.to_str().unwrap(), "init"])?;
        for node in &self.info.nodes {
            let out = self.info.state_dir.join(format!("credential-{}", node.name));
            sys::run(
                palisade.to_str().context("palisade path")?,
                &[
                    "ca",
                    "--dir",
                    ca_dir.to_str().unwrap(),
                    "node-credential",
                    "--node",
                    &node.name,
                    "--out",
                    out.to_str().unwrap(),
                ],
            )?;
        }
        let mut cmd = Command::new(palisade);
        cmd.args(["ca", "--dir"])
            .arg(&ca_dir)
            .args(["serve", "--listen", CA_ADDR, "--inventory"])
            .arg(self.store_dir())
            .args(["--workload-ttl-secs", &workload_ttl.as_secs().to_string()]);
        let fabric = netns_name(&self.info.id, "fab");
        let child = self.spawn_in(&fabric, "ca", cmd, &self.info.state_dir.join("ca.log"))?;
        self.processes.push(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sys::in_netns(&fabric, || std::net::TcpStream::connect(CA_ADDR).is_ok())? {
            if Instant::now() > deadline {
                bail!(
                    "the CA did not start listening on {CA_ADDR} (see {})",
                    self.info.state_dir.join("ca.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Sends one request to a node's enrollment API (what a CNI plugin would send).
    pub fn enroll_raw(&self, node: &str, request: &serde_json::Value) -> Result<serde_json::Value> {
        self.enroll_request(self.node(node)?, request)
    }

    fn enroll_request(&self, node: &NodeInfo, request: &serde_json::Value) -> Result<serde_json::Value> {
        let mut stream = std::os::unix::net::UnixStream::connect(&node.enroll_socket)
            .with_context(|| format!("connect {}", node.enroll_socket.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(format!("{request}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        let reply: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("reply {line:?}"))?;
        if reply["ok"] != true {
            bail!("ztunnel on {}: {}", node.name, reply["error"]);
        }
        Ok(reply)
    }

    pub fn node(&self, name: &str) -> Result<&NodeInfo> {
        self.info.nodes.iter().find(|n| n.name == name).with_context(|| format!("no node {name}"))
    }

    pub fn pod(&self, name: &str) -> Result<&PodInfo> {
        self.info.pods.iter().find(|p| p.name == name).with_context(|| format!("no pod {name}"))
    }

    /// Enrolls a pod with its node's ztunnel (the CNI's job in Kubernetes).
    pub fn enroll(&self, pod: &str) -> Result<()> {
        let pod = self.pod(pod)?;
        let request = serde_json::json!({"op": "enroll", "pod": {
            "uid": pod.uid, "name": pod.name, "netns": pod.netns_path, "cgroup": pod.cgroup, "ips": [pod.ip]}});
        self.enroll_request(self.node(&pod.node)?, &request).map(|_| ())
    }

    pub fn unenroll(&self, pod: &str) -> Result<()> {
        let pod = self.pod(pod)?;
        self.enroll_request(self.node(&pod.node)?, &serde_json::json!({"op": "remove", "uid": pod.uid})).map(|_| ())
    }

    /// The workloads of the cluster as resources, followed by `extra`.
    pub fn policy_yaml(&self, extra: &str) -> String {
        let mut out = String::new();
        for p in self.info.pods.iter().chain(&self.info.waypoints) {
            let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            out.push_str(&format!(
                "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {}, namespace: {}}}\n\
                 spec: {{serviceAccount: {}, node: {}, uid: {}, addresses: [{}], labels: {{{}}}}}\n---\n",
                p.name,
                p.namespace,
                p.service_account,
                p.node,
                p.uid,
                p.ip,
                labels.join(", ")
            ));
            if !p.ports.is_empty() {
                // Inside the Workload's spec: the flow mapping above ends with "}\n---\n".
                let ports: Vec<String> =
                    p.ports.iter().map(|(n, port)| format!("{{name: {n}, containerPort: {port}}}")).collect();
                let at = out.len() - "}\n---\n".len();
                out.insert_str(at, &format!(", ports: [{}]", ports.join(", ")));
            }
        }
        out.push_str(&self.waypoint_gateways_yaml());
        out.push_str(extra);
        out
    }

    fn write_policy_file(&self, extra: &str) -> Result<()> {
        let tmp = self.info.policy_file.with_extension("yaml.tmp");
        std::fs::write(&tmp, self.policy_yaml(extra))?;
        std::fs::rename(&tmp, &self.info.policy_file)?;
        Ok(())
    }

    /// Replaces the extra resources and waits until every ztunnel has put the new policy in
    /// force. Fails (and the old policy stays in force) when ztunnel rejects it.
    pub fn set_policy(&mut self, extra: &str) -> Result<()> {
        self.set_policy_within(extra, Duration::from_secs(10))
    }

    /// As [`Self::set_policy`], waiting up to `timeout` (large policies take longer).
    pub fn set_policy_within(&mut self, extra: &str, timeout: Duration) -> Result<()> {
        let before: Vec<u64> =
            self.info.nodes.iter().map(|n| self.policy_generation(&n.name)).collect::<Result<_>>()?;
        self.extra_policy = extra.to_string();
        self.write_policy_file(extra)?;
        if self.etcd_plane.is_some() {
            self.apply_policy_to_etcd()?;
        }
        let deadline = Instant::now() + timeout;
        for (node, old) in self.info.nodes.iter().zip(before) {
            while self.policy_generation(&node.name)? <= old {
                if Instant::now() > deadline {
                    bail!("{} did not apply the new policy (see {})", node.name, node.log.display());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Generation of the policy in force on a node.
    pub fn policy_generation(&self, node: &str) -> Result<u64> {
        let dump: serde_json::Value = serde_json::from_str(&self.admin_get(node, "/config_dump")?)?;
        dump["policy_generation"].as_u64().context("config_dump has no policy_generation")
    }

    /// GET on a node's ztunnel admin port.
    pub fn admin_get(&self, node: &str, path: &str) -> Result<String> {
        let node = self.node(node)?;
        sys::http_get_in(&node.netns, &node.admin, path)
    }

    /// Recent flow events of a node.
    pub fn flows(&self, node: &str) -> Result<Vec<serde_json::Value>> {
        Ok(serde_json::from_str(&self.admin_get(node, "/flows")?)?)
    }

    /// A command that runs inside a pod: in its network namespace and its cgroup, so it is
    /// captured like a real pod process.
    pub fn command(&self, pod: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let pod = self.pod(pod)?;
        let procs = std::ffi::CString::new(pod.cgroup.join("cgroup.procs").into_os_string().into_encoded_bytes())?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &pod.netns]).arg(program);
        // SAFETY: pre_exec only opens and writes cgroup.procs.
        unsafe {
            cmd.pre_exec(move || sys::join_cgroup(&procs));
        }
        Ok(cmd)
    }

    /// Transmitted packets counted on a pod's eth0.
    pub fn tx_packets(&self, pod: &str) -> Result<u64> {
        let pod = self.pod(pod)?;
        let out = sys::run("ip", &["netns", "exec", &pod.netns, "cat", "/sys/class/net/eth0/statistics/tx_packets"])?;
        Ok(out.trim().parse()?)
    }

    pub fn save(&self) -> Result<()> {
        std::fs::write(self.info.state_dir.join("cluster.json"), serde_json::to_string_pretty(&self.info)?)?;
        Ok(())
    }

    /// The last lines of every ztunnel log (for failure reports).
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        let logs = self.info.nodes.iter().map(|n| (n.name.clone(), n.log.clone()));
        // Files that do not exist (no etcd in a directory-store cluster) are skipped.
        let others = [
            ("ca", "ca.log"),
            ("palisade serve", "serve.log"),
            ("etcd", "etcd.log"),
            ("palisade serve replica 0", "serve-0.log"),
            ("palisade serve replica 1", "serve-1.log"),
        ];
        let others = others.map(|(name, file)| (name.to_string(), self.info.state_dir.join(file)));
        let waypoints =
            self.info.waypoints.iter().map(|w| (format!("waypoint {}", w.name), self.waypoint_log(&w.name)));
        for (name, log) in logs.chain(others).chain(waypoints) {
            let Ok(text) = std::fs::read_to_string(&log) else { continue };
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            out.push_str(&format!("--- {name} ({}) ---\n{}\n", log.display(), tail.join("\n")));
        }
        out
    }

    /// Stops the cluster's CA (to show ztunnels keep working without it).
    pub fn stop_ca(&mut self) -> Result<()> {
        for child in &mut self.processes {
            child.kill()?;
            child.wait()?;
        }
        self.processes.clear();
        Ok(())
    }

    /// A handle on a running cluster made by someone else (`cluster.json`, another thread):
    /// it never tears the cluster down.
    pub fn attach(info: ClusterInfo) -> Cluster {
        Cluster {
            info,
            extra_policy: String::new(),
            ztunnels: Vec::new(),
            started: Vec::new(),
            ztunnel_generation: BTreeMap::new(),
            processes: Vec::new(),
            waypoint_pids: BTreeMap::new(),
            control_plane: None,
            control_plane_bin: None,
            etcd_plane: None,
            retired: Vec::new(),
            teardown_on_drop: false,
        }
    }

    /// Loads `cluster.json` from a state directory.
    pub fn load(state_dir: &Path) -> Result<Cluster> {
        let path = state_dir.join("cluster.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("read {} (is the sandbox up? `cargo xtask sandbox up`)", path.display()))?;
        Ok(Cluster::attach(serde_json::from_str(&text)?))
    }

    /// Leaves the cluster running after this value is dropped (`sandbox up`).
    pub fn keep(mut self) {
        self.teardown_on_drop = false;
        self.ztunnels.clear();
        self.processes.clear();
        self.control_plane = None;
        self.etcd_plane = None;
    }

    /// Stops ztunnels gracefully, then removes everything (their pins included).
    pub fn down(&mut self) -> Result<()> {
        for child in &mut self.ztunnels {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for child in &mut self.ztunnels {
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        teardown(&self.info.id, &self.info.state_dir)?;
        let control_plane = self.control_plane.iter_mut().chain(self.etcd_plane.iter_mut().flat_map(|p| p.children()));
        for child in self.ztunnels.iter_mut().chain(&mut self.processes).chain(&mut self.retired).chain(control_plane) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.ztunnels.clear();
        self.processes.clear();
        self.retired.clear();
        self.control_plane = None;
        self.etcd_plane = None;
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.teardown_on_drop {
            return;
        }
        if std::thread::panicking() {
            eprintln!("sandbox {} failed; ztunnel logs:\n{}", self.info.id, self.log_tails());
        }
        if let Err(e) = self.down() {
            eprintln!("sandbox {}: teardown incomplete: {e:#}", self.info.id);
        }
    }
}

/// Removes everything of cluster `id`: its processes (by cgroup), network namespaces,
/// cgroups and state directory. Safe to run when nothing is left.
pub fn teardown(id: &str, state_dir: &Path) -> Result<()> {
    let cgroup = sys::cgroup2_root()?.join(format!("{PREFIX}{id}"));
    sys::remove_cgroup_tree(&cgroup)?;
    // Unpinning the links detaches the programs; the maps go with the last reference.
    let pins = pin_root(id);
    if pins.exists() {
        std::fs::remove_dir_all(&pins).with_context(|| format!("remove {}", pins.display()))?;
    }
    let prefix = format!("{PREFIX}{id}-");
    for ns in list_netns()?.into_iter().filter(|n| n.starts_with(&prefix)) {
        ip(&["netns", "del", &ns])?;
    }
    if state_dir.exists() {
        std::fs::remove_dir_all(state_dir).with_context(|| format!("remove {}", state_dir.display()))?;
    }
    Ok(())
}

/// Names of the named network namespaces (`ip netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?.lines().filter_map(|l| l.split_whitespace().next().map(str::to_string)).collect())
}
