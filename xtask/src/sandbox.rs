//! `cargo xtask sandbox up|down|exec|status`: the sandbox cluster, kept under
//! `target/sandbox` with the id `sbx` (names `plsd-sbx-…`).
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Subcommand;
use palisade_sandbox::{Cluster, ClusterSpec, cluster};

pub const ID: &str = "sbx";

#[derive(Subcommand)]
pub enum SandboxCommand {
    /// Create the cluster (cleaning what an interrupted run left), start a ztunnel per node,
    /// enroll every pod, and write target/sandbox/cluster.json.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods: usize,
        /// Where the control plane keeps resources: `dir` (one `palisade serve` over a
        /// directory) or `etcd` (a real etcd and two `palisade serve` replicas on it; every
        /// ztunnel is given both and fails over between them).
        #[arg(long, value_enum, default_value_t = StoreKind::Dir)]
        store: StoreKind,
        /// Put Service SERVICE (default namespace, VIP 10.96.0.10, port 80 → 8080, selecting
        /// the last node's pods, which get the label `service: SERVICE`) behind a waypoint
        /// `SERVICE-waypoint` running on node 1 (`istio.io/use-waypoint` on the Service).
        #[arg(long, value_name = "SERVICE")]
        waypoint: Option<String>,
    },
    /// Remove every namespace, cgroup, process and file the sandbox made.
    Down,
    /// Run a command inside a pod (its network namespace and cgroup).
    Exec {
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print the summary of the running sandbox.
    Status,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    Dir,
    Etcd,
}

/// Replicas of `palisade serve` with `--store etcd`.
const ETCD_REPLICAS: usize = 2;

pub fn state_dir() -> PathBuf {
    crate::root().join("target/sandbox")
}

pub fn run(command: SandboxCommand) -> Result<()> {
    match command {
        SandboxCommand::Up { nodes, pods, store, waypoint } => {
            if nodes == 0 || nodes > 200 || pods > 200 {
                bail!("--nodes must be 1..=200 and --pods 0..=200");
            }
            crate::build()?;
            let mut spec = ClusterSpec::uniform(ID, state_dir(), nodes, pods);
            spec.ztunnel = Some(palisade_sandbox::workspace_bin("ztunnel")?);
            spec.palisade = Some(palisade_sandbox::workspace_bin("palisade")?);
            spec.teardown_on_drop = false;
            if store == StoreKind::Etcd {
                spec.etcd_replicas = ETCD_REPLICAS;
            }
            if let Some(service) = &waypoint {
                with_waypoint(&mut spec, service)?;
            }
            let cluster = Cluster::up(spec)?;
            print_summary(&cluster);
            // Like kubectl's kubeconfig: a plain `palisade apply -f …` now reaches this sandbox.
            let context = std::env::var_os("PALISADE_CONFIG").map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".palisade/config")
            });
            cluster.write_cli_context(&context)?;
            println!(
                "  palisade CLI context: {} (admin socket {})",
                context.display(),
                cluster.admin_socket().display()
            );
            if store == StoreKind::Etcd {
                let addrs: Vec<String> = cluster.control_plane_addrs().iter().map(|a| a.to_string()).collect();
                println!(
                    "  etcd {} (fabric netns; log {}), palisade serve replicas {}",
                    cluster::ETCD_ADDR,
                    cluster.info.state_dir.join("etcd.log").display(),
                    addrs.join(", ")
                );
            }
            cluster.keep();
            Ok(())
        }
        SandboxCommand::Down => {
            cluster::teardown(ID, &state_dir())?;
            println!("sandbox {ID}: removed");
            Ok(())
        }
        SandboxCommand::Exec { pod, command } => {
            let cluster = Cluster::load(&state_dir())?;
            let mut cmd = cluster.command(&pod, &command[0])?;
            cmd.args(&command[1..]);
            Err(cmd.exec().into())
        }
        SandboxCommand::Status => {
            print_summary(&Cluster::load(&state_dir())?);
            Ok(())
        }
    }
}

/// VIP of the Service `sandbox up --waypoint` makes.
pub const WAYPOINT_SERVICE_VIP: &str = "10.96.0.10";

/// Adds a Service served by a waypoint to `spec` (see `Up::waypoint`).
pub fn with_waypoint(spec: &mut ClusterSpec, service: &str) -> Result<()> {
    let valid = !service.is_empty()
        && service.len() <= 50
        && service.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        bail!("--waypoint {service:?}: a Service name is lowercase letters, digits and '-' (at most 50)");
    }
    let Some(last) = spec.nodes.last_mut().filter(|pods| !pods.is_empty()) else {
        bail!("--waypoint needs pods on the last node (they become the Service's endpoints)");
    };
    for pod in last {
        pod.labels.insert("service".into(), service.into());
    }
    let waypoint = format!("{service}-waypoint");
    spec.waypoints.push(cluster::WaypointSpec::new(&waypoint, "default", 1));
    spec.waypoint = Some(palisade_sandbox::workspace_bin("waypoint")?);
    spec.policy.push_str(&format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {service}\n  namespace: default\n  labels: {{istio.io/use-waypoint: {waypoint}}}\n\
         spec:\n  clusterIP: {WAYPOINT_SERVICE_VIP}\n  selector: {{service: {service}}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n---\n"
    ));
    Ok(())
}

pub fn print_summary(cluster: &Cluster) {
    let info = &cluster.info;
    println!(
        "sandbox {}: {} nodes, {} pods (state in {})",
        info.id,
        info.nodes.len(),
        info.pods.len(),
        info.state_dir.display()
    );
    for n in &info.nodes {
        println!(
            "  {} netns {} ip {} pods {} ztunnel admin {} log {}",
            n.name,
            n.netns,
            n.ip,
            n.pod_cidr,
            n.admin,
            n.log.display()
        );
        for p in info.pods.iter().filter(|p| p.node == n.name) {
            println!("    {:<10} {:<13} {}", p.name, p.ip, p.identity);
        }
    }
    for w in &info.waypoints {
        println!(
            "  waypoint {} on {} at {} ({}), log {}",
            w.name,
            w.node,
            w.ip,
            w.identity,
            cluster.waypoint_log(&w.name).display()
        );
    }
    println!("  cluster.json: {}", info.state_dir.join("cluster.json").display());
}
