//! Helpers shared by the end-to-end tests: a uniquely named sandbox cluster per test (removed
//! on drop, also when the test panics), probe servers and clients inside pods, and waiting
//! for flow events.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub mod ca;
pub mod ca_serve;
pub mod flood;
pub mod l7;

use palisade_sandbox::{Cluster, ClusterSpec, PodTemplate};
use serde_json::Value;

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "these tests load eBPF programs and create network namespaces: run them as root");
}

/// A mesh cluster: `nodes` × `pods`, ztunnel on every node, every pod enrolled.
pub fn mesh(nodes: usize, pods: usize, policy: &str) -> Cluster {
    let id = palisade_sandbox::unique_test_id();
    let mut spec = ClusterSpec::uniform(&id, palisade_sandbox::test_state_dir(&id), nodes, pods);
    spec.policy = policy.to_string();
    spec.ztunnel = Some(palisade_sandbox::workspace_bin("ztunnel").expect("ztunnel binary"));
    start(spec)
}

/// A cluster from explicit pod templates per node.
pub fn mesh_with(nodes: Vec<Vec<PodTemplate>>, policy: &str) -> Cluster {
    let id = palisade_sandbox::unique_test_id();
    let mut spec = ClusterSpec::uniform(&id, palisade_sandbox::test_state_dir(&id), 0, 0);
    spec.nodes = nodes;
    spec.policy = policy.to_string();
    spec.ztunnel = Some(palisade_sandbox::workspace_bin("ztunnel").expect("ztunnel binary"));
    start(spec)
}

/// Starts a cluster from a full spec (the CA is added).
pub fn start_spec(spec: ClusterSpec) -> Cluster {
    start(spec)
}

fn start(mut spec: ClusterSpec) -> Cluster {
    require_root();
    spec.palisade = Some(palisade_sandbox::workspace_bin("palisade").expect("palisade binary"));
    palisade_sandbox::sweep_stale_test_clusters().expect("sweep stale test clusters");
    Cluster::up(spec).unwrap_or_else(|e| panic!("sandbox up: {e:#}"))
}

fn probe() -> PathBuf {
    palisade_sandbox::workspace_bin("palisade-probe").expect("palisade-probe binary")
}

/// An echo server in a pod; killed on drop. Connections it served are logged to `log`.
pub struct Server {
    child: Child,
    pub log: PathBuf,
}

impl Server {
    /// Connections the application saw: one JSON object each.
    pub fn connections(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("server log line"))
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn serve(cluster: &Cluster, pod: &str, port: u16) -> Server {
    let log = cluster.info.state_dir.join(format!("server-{pod}-{port}.log"));
    let mut child = cluster
        .command(pod, probe())
        .expect("pod command")
        .args(["serve", "--port", &port.to_string(), "--log"])
        .arg(&log)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start probe server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("server ready line");
    assert!(line.contains("listening"), "probe server in {pod} did not start: {line:?}");
    Server { child, log }
}

/// Runs a client in `pod`; returns its JSON report.
pub fn connect(cluster: &Cluster, pod: &str, to: &str, bytes: u64) -> Value {
    let out = cluster
        .command(pod, probe())
        .expect("pod command")
        .args(["connect", "--to", to, "--bytes", &bytes.to_string(), "--timeout-ms", "5000"])
        .stderr(Stdio::inherit())
        .output()
        .expect("run probe client");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("probe output {text:?}: {e}"))
}

/// Waits until a node reports a flow event matching `pred`; panics with the events seen.
pub fn wait_flow(cluster: &Cluster, node: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let flows = cluster.flows(node).expect("read flows");
        if let Some(f) = flows.iter().find(|f| pred(f)) {
            return f.clone();
        }
        if Instant::now() > deadline {
            panic!("no matching flow event on {node}; events: {}", serde_json::to_string_pretty(&flows).unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a client in `pod` with extra probe arguments; returns its JSON report.
pub fn connect_with(cluster: &Cluster, pod: &str, to: &str, bytes: u64, extra: &[&str]) -> Value {
    let out = cluster
        .command(pod, probe())
        .expect("pod command")
        .args(["connect", "--to", to, "--bytes", &bytes.to_string(), "--timeout-ms", "10000"])
        .args(extra)
        .stderr(Stdio::inherit())
        .output()
        .expect("run probe client");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("probe output {text:?}: {e}"))
}

/// A sample of a node's Prometheus metrics (`name` or `name{labels}`).
pub fn metric(cluster: &Cluster, node: &str, name: &str) -> f64 {
    let text = cluster.admin_get(node, "/metrics").expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("no metric {name} on {node}:\n{text}"))
}

/// A paced transfer from p1-1 to `dst`, in the background: established, then slowly carried
/// (one 64 KiB chunk every `pace_ms`), so that something can happen to it in flight.
pub fn paced_transfer(cluster: &Cluster, dst: &str, bytes: u64, pace_ms: u64) -> std::thread::JoinHandle<Value> {
    let view = Cluster::attach(cluster.info.clone());
    let dst = dst.to_string();
    std::thread::spawn(move || connect_with(&view, "p1-1", &dst, bytes, &["--pace-ms", &pace_ms.to_string()]))
}
