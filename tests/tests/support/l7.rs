//! Helpers of the waypoint (L7) tests: a cluster with the waypoint `shop/waypoint` (one
//! replica, on node 1), HTTP servers of the probe in pods, and the probe's JSON reports.
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};

use palisade_sandbox::{Cluster, ClusterSpec, WaypointSpec};
use serde_json::Value;

pub fn probe_bin() -> PathBuf {
    palisade_sandbox::workspace_bin("palisade-probe").expect("palisade-probe binary")
}

/// Starts `spec` with ztunnel and the waypoint `shop/waypoint` on node 1.
pub fn start_with_waypoint(mut spec: ClusterSpec) -> Cluster {
    spec.ztunnel = Some(palisade_sandbox::workspace_bin("ztunnel").expect("ztunnel binary"));
    spec.waypoints = vec![WaypointSpec::new("waypoint", "shop", 1)];
    spec.waypoint = Some(palisade_sandbox::workspace_bin("waypoint").expect("waypoint binary"));
    super::start_spec(spec)
}

/// A probe server in a pod; killed on drop.
pub struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `palisade-probe <args>` in `pod` and waits for its "listening" line.
pub fn probe_server(cluster: &Cluster, pod: &str, args: &[&str]) -> Proc {
    let mut child = cluster
        .command(pod, probe_bin())
        .expect("pod command")
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {args:?} in {pod}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("server ready line");
    assert!(line.contains("listening"), "server {args:?} in {pod}: {line:?}");
    Proc(child)
}

/// Runs the probe in `pod` with `args` to its end; its JSON report.
pub fn probe_report(cluster: &Cluster, pod: &str, args: &[&str]) -> Value {
    let out = cluster
        .command(pod, probe_bin())
        .expect("pod command")
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run probe");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("probe {args:?} output {text:?}: {e}"))
}

/// `report[section][key]` as a count (0 when absent).
pub fn count(report: &Value, section: &str, key: &str) -> u64 {
    report[section][key].as_u64().unwrap_or(0)
}
