//! The measurements, each run on a sandbox cluster built for it.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use palisade_sandbox::{Cluster, ClusterSpec};
use serde_json::Value;

use crate::procfs::{Sampler, bpf_map_mib, rss_mib};
use crate::stats::Figure;
use crate::{Options, Sizes};

const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 8080;
const DENIED_PORT: u16 = 9999;

/// A mesh sandbox for one section: `nodes` × `pods`, with the extra `policy` resources.
pub(crate) fn cluster(options: &Options, nodes: usize, pods: usize, enroll: bool, policy: &str) -> Result<Cluster> {
    palisade_sandbox::sweep_stale_test_clusters()?;
    let id = palisade_sandbox::unique_test_id();
    let mut spec = ClusterSpec::uniform(&id, palisade_sandbox::test_state_dir(&id), nodes, pods);
    spec.ztunnel = Some(options.bins.ztunnel.clone());
    spec.palisade = Some(options.bins.palisade.clone());
    spec.enroll = enroll;
    spec.policy = policy.to_string();
    Cluster::up(spec)
}

/// A server process in a pod, killed on drop.
pub(crate) struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An echo server (the probe) in `pod` on `port`, once it listens.
pub(crate) fn echo_server(cluster: &Cluster, options: &Options, pod: &str, port: u16) -> Result<Server> {
    let mut child = cluster
        .command(pod, &options.bins.probe)?
        .args(["serve", "--port", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    Ok(Server(child))
}

fn iperf_server(cluster: &Cluster, pod: &str) -> Result<Server> {
    let child = cluster
        .command(pod, "iperf3")?
        .args(["-s", "-p", &IPERF_PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 (cargo xtask setup installs it)")?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(Server(child))
}

fn json_output(cluster: &Cluster, pod: &str, program: &std::path::Path, args: &[String]) -> Result<Value> {
    let out = cluster.command(pod, program)?.args(args).stderr(Stdio::inherit()).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("{} {}: {text}", program.display(), args.join(" ")))
}

fn iperf(cluster: &Cluster, dst: &str, secs: u64, streams: usize) -> Result<f64> {
    let args: Vec<String> =
        ["-c", dst, "-p", &IPERF_PORT.to_string(), "-t", &secs.to_string(), "-P", &streams.to_string(), "-J"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let v = json_output(cluster, "p1-1", std::path::Path::new("iperf3"), &args)?;
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().with_context(|| format!("iperf3 result: {v}"))?;
    Ok(bps / 1e9)
}

fn probe(cluster: &Cluster, options: &Options, args: &[&str]) -> Result<Value> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    json_output(cluster, "p1-1", &options.bins.probe, &args)
}

/// Baseline (pods not enrolled) or mesh (both enrolled).
fn set_mesh(cluster: &Cluster, on: bool) -> Result<()> {
    for pod in ["p1-1", "p2-1"] {
        if on {
            cluster.enroll(pod)?;
        } else {
            // Not enrolled yet is fine.
            let _ = cluster.unenroll(pod);
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

#[derive(Default)]
struct Samples(BTreeMap<&'static str, [Vec<f64>; 2]>);

impl Samples {
    fn add(&mut self, name: &'static str, mesh: bool, v: f64) {
        self.0.entry(name).or_default()[mesh as usize].push(v);
    }
    fn get(&self, name: &str) -> (&[f64], &[f64]) {
        self.0.get(name).map_or((&[][..], &[][..]), |[b, m]| (&b[..], &m[..]))
    }
    fn compared(&self, group: &str, name: &'static str, label: &str, unit: &str) -> Figure {
        let (b, m) = self.get(name);
        Figure::compared(group, label, unit, b, m)
    }
    fn mesh(&self, group: &str, name: &'static str, label: &str, unit: &str) -> Figure {
        Figure::mesh_only(group, label, unit, self.get(name).1)
    }
}

/// Figures 1–5 on a 2-node cluster with one pod per node.
pub fn data_path(options: &Options) -> Result<Vec<Figure>> {
    let s: &Sizes = &options.sizes;
    let cluster = cluster(options, 2, 1, true, "")?;
    let dst_ip = cluster.pod("p2-1")?.ip.clone();
    let echo = format!("{dst_ip}:{ECHO_PORT}");
    let _iperf = iperf_server(&cluster, "p2-1")?;
    let _echo = echo_server(&cluster, options, "p2-1", ECHO_PORT)?;
    let ztunnels: Vec<u32> = ["node-1", "node-2"].iter().filter_map(|n| cluster.ztunnel_pid(n)).collect();
    let mut samples = Samples::default();
    let (rate, conns) = (s.latency_rate.to_string(), s.latency_conns.to_string());
    let latency_ms = (s.latency_secs * 1000).to_string();
    let connrate_ms = (s.connrate_secs * 1000).to_string();
    let count = s.connect_count.to_string();
    for rep in 0..s.reps {
        for mesh in [false, true] {
            eprintln!("bench: repetition {}/{}, {}", rep + 1, s.reps, if mesh { "mesh" } else { "baseline" });
            set_mesh(&cluster, mesh)?;
            samples.add("tput1", mesh, iperf(&cluster, &dst_ip, s.throughput_secs, 1)?);
            samples.add("tput8", mesh, iperf(&cluster, &dst_ip, s.throughput_secs, 8)?);

            let sampler = Sampler::start(ztunnels.clone());
            let lat = probe(
                &cluster,
                options,
                &[
                    "latency",
                    "--to",
                    &echo,
                    "--rate",
                    &rate,
                    "--conns",
                    &conns,
                    "--duration-ms",
                    &latency_ms,
                    "--size",
                    "1024",
                ],
            )?;
            let used = sampler.finish();
            if lat["ok"] != true {
                bail!("latency run failed: {lat}");
            }
            for (name, key) in [("p50", "p50_us"), ("p90", "p90_us"), ("p99", "p99_us"), ("p999", "p999_us")] {
                samples.add(name, mesh, lat[key].as_f64().unwrap_or(f64::NAN));
            }
            if mesh {
                let per_ztunnel = used.vcpu / ztunnels.len().max(1) as f64;
                samples.add("cpu_per_krps", true, per_ztunnel / (s.latency_rate as f64 / 1000.0));
                samples.add("rss_peak", true, used.peak_rss_mib);
            }

            let sampler = Sampler::start(ztunnels.clone());
            let cr =
                probe(&cluster, options, &["connrate", "--to", &echo, "--duration-ms", &connrate_ms, "--size", "100"])?;
            let used = sampler.finish();
            let per_sec = cr["per_sec"].as_f64().unwrap_or(f64::NAN);
            samples.add("connrate", mesh, per_sec);
            if mesh {
                let connections = cr["connections"].as_f64().unwrap_or(1.0).max(1.0);
                let cpu_ms = used.vcpu * used.wall.as_secs_f64() * 1e3 / ztunnels.len().max(1) as f64;
                samples.add("cpu_per_kconn", true, cpu_ms / (connections / 1000.0));
            }

            let ct = probe(&cluster, options, &["connect-timing", "--to", &echo, "--count", &count])?;
            samples.add("connect_allow_p50", mesh, ct["p50_us"].as_f64().unwrap_or(f64::NAN));
            samples.add("connect_allow_p99", mesh, ct["p99_us"].as_f64().unwrap_or(f64::NAN));
        }
    }

    // 5. A connect() the kernel denies.
    set_mesh(&cluster, true)?;
    let mut cluster = cluster;
    cluster.set_policy(&format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: bench-deny, namespace: default}}\n\
         spec:\n  selector: {{matchLabels: {{app: p2-1}}}}\n  action: Deny\n  rules: [{{ports: [{DENIED_PORT}]}}]\n"
    ))?;
    let denied = format!("{dst_ip}:{DENIED_PORT}");
    for _ in 0..s.reps {
        let ct = probe(&cluster, options, &["connect-timing", "--to", &denied, "--count", &count])?;
        if ct["errno"] != 1 || ct["succeeded"] != 0 {
            bail!("denied connects did not all fail with EPERM: {ct}");
        }
        samples.add("deny_p50", true, ct["p50_us"].as_f64().unwrap_or(f64::NAN));
        samples.add("deny_p99", true, ct["p99_us"].as_f64().unwrap_or(f64::NAN));
    }

    let t = "1. throughput";
    let l = "2. latency, 1 KiB at a fixed rate";
    let c = "3. ztunnel resources during 2";
    let n = "4. new connections";
    let k = "5. connect() in the kernel";
    Ok(vec![
        samples.compared(t, "tput1", "one stream", "Gbit/s").target("≥ 0.40×"),
        samples.compared(t, "tput8", "8 streams", "Gbit/s"),
        samples.compared(l, "p50", "p50", "µs").target("≤ +45 µs"),
        samples.compared(l, "p90", "p90", "µs"),
        samples.compared(l, "p99", "p99", "µs").target("≤ +70 µs"),
        samples.compared(l, "p999", "p99.9", "µs"),
        samples.mesh(c, "cpu_per_krps", "CPU per ztunnel per 1,000 req/s", "vCPU").target("≤ 0.025"),
        samples.mesh(c, "rss_peak", "peak RSS of a ztunnel", "MiB"),
        samples.compared(n, "connrate", "connections per second, one at a time", "conn/s").target("≥ 0.40×"),
        samples.mesh(n, "cpu_per_kconn", "CPU per ztunnel per 1,000 connections", "ms"),
        samples.mesh(k, "deny_p50", "denied connect(), p50", "µs").target("< 10 µs"),
        samples.mesh(k, "deny_p99", "denied connect(), p99", "µs"),
        samples.compared(k, "connect_allow_p50", "allowed connect(), p50 (enrolled vs not)", "µs"),
        samples.compared(k, "connect_allow_p99", "allowed connect(), p99 (enrolled vs not)", "µs"),
    ])
}

/// A synthetic policy: `workloads` workloads (100 per namespace), one Allow policy per
/// workload, `rules` rules in all (each: one service account, one port). Each `salt` gives
/// every rule other ports, so a new salt is a whole new policy (every cell changes).
pub fn scale_policy(workloads: usize, rules: usize, salt: usize) -> String {
    let per_ns = 100.min(workloads.max(1));
    let rules_per = (rules / workloads.max(1)).max(1);
    let mut y = format!("# bench policy, variant {salt}\n");
    for i in 0..workloads {
        let (ns, w) = (i / per_ns, i % per_ns);
        let ip = format!("10.100.{}.{}", i / 250, i % 250 + 1);
        y.push_str(&format!(
            "---\napiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w{w}, namespace: ns{ns}}}\n\
             spec: {{serviceAccount: sa{w}, node: bench-node, labels: {{app: w{w}}}, addresses: [{ip}]}}\n"
        ));
    }
    for i in 0..workloads {
        let (ns, w) = (i / per_ns, i % per_ns);
        y.push_str(&format!(
            "---\napiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: p{w}, namespace: ns{ns}}}\n\
             spec:\n  selector: {{matchLabels: {{app: w{w}}}}}\n  action: Allow\n  rules:\n"
        ));
        for j in 0..rules_per {
            let from = (w + j + 1) % per_ns;
            y.push_str(&format!(
                "  - {{from: [{{namespace: ns{ns}, serviceAccount: sa{from}}}], ports: [{}]}}\n",
                8000 + j + 100 * (salt % 100)
            ));
        }
    }
    y
}

/// Documents per file when a large policy goes to a store directory (the loader refuses files
/// of more than 10,000 documents, and real repositories split policies anyway).
const DOCUMENTS_PER_FILE: usize = 2_000;

/// Writes `policy` into the cluster's store directory as `<prefix>-<n>.yaml` files (each
/// written whole, then renamed), removing files of an earlier call with the same prefix, and
/// waits until every node has put a new policy generation in force.
pub(crate) fn put_store_files(cluster: &Cluster, prefix: &str, policy: &str, timeout: Duration) -> Result<()> {
    let before: Vec<u64> =
        cluster.info.nodes.iter().map(|n| cluster.policy_generation(&n.name)).collect::<Result<_>>()?;
    let dir = cluster.store_dir();
    for entry in std::fs::read_dir(&dir)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&format!("{prefix}-")) {
            std::fs::remove_file(entry.path())?;
        }
    }
    let documents: Vec<&str> = policy.split("---\n").filter(|d| !d.trim().is_empty()).collect();
    for (i, chunk) in documents.chunks(DOCUMENTS_PER_FILE).enumerate() {
        let text: String = chunk.iter().map(|d| format!("---\n{d}")).collect();
        let file = dir.join(format!("{prefix}-{i}.yaml"));
        let tmp = dir.join(format!(".{prefix}-{i}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &file)?;
    }
    let deadline = Instant::now() + timeout;
    for (node, old) in cluster.info.nodes.iter().zip(before) {
        while cluster.policy_generation(&node.name)? <= old {
            if Instant::now() > deadline {
                anyhow::bail!("{} did not put the policy in force (see {})", node.name, node.log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

fn metric(cluster: &Cluster, name: &str) -> Result<f64> {
    let text = cluster.admin_get("node-1", "/metrics")?;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.parse().ok()))
        .with_context(|| format!("metric {name}"))
}

/// Figures 6 and 7 on a one-node cluster.
pub fn idle_and_policy_scale(options: &Options) -> Result<Vec<Figure>> {
    let s = &options.sizes;
    let most = *s.idle_pods.iter().max().unwrap_or(&0);
    let cluster = cluster(options, 1, most.max(1), false, "")?;
    let pid = cluster.ztunnel_pid("node-1").context("ztunnel pid")?;
    let names: Vec<String> = cluster.info.pods.iter().map(|p| p.name.clone()).collect();
    let mut figures = Vec::new();
    let mut enrolled = 0;
    for &n in &s.idle_pods {
        for name in &names[enrolled..n] {
            cluster.enroll(name)?;
        }
        enrolled = n;
        std::thread::sleep(Duration::from_secs(2));
        let rss: Vec<f64> = (0..5)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(200));
                rss_mib(pid)
            })
            .collect();
        figures.push(
            Figure::mesh_only("6. idle ztunnel", &format!("RSS with {n} enrolled pods"), "MiB", &rss)
                .target(if n == 0 { "≤ 8 MiB" } else { "" }),
        );
    }

    let (mut compile, mut apply, mut maps, mut cells) = (vec![], vec![], vec![], vec![]);
    for rep in 0..s.reps {
        let policy = scale_policy(s.scale_workloads, s.scale_rules, rep);
        put_store_files(&cluster, "scale", &policy, Duration::from_secs(300))?;
        compile.push(metric(&cluster, "palisade_policy_compile_seconds")? * 1e3);
        apply.push(metric(&cluster, "palisade_policy_apply_seconds")? * 1e3);
        cells.push(metric(&cluster, "palisade_policy_cells")?);
        maps.push(bpf_map_mib(pid));
    }
    let g = format!("7. policy of {} workloads, {} rules", s.scale_workloads, s.scale_rules);
    figures.push(Figure::mesh_only(&g, "read, validate and compile", "ms", &compile));
    figures.push(Figure::mesh_only(&g, "write the kernel maps and switch", "ms", &apply));
    figures.push(Figure::mesh_only(&g, "policy cells in the kernel", "cells", &cells));
    figures.push(Figure::mesh_only(&g, "BPF map memory of the ztunnel", "MiB", &maps));
    Ok(figures)
}
