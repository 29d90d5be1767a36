//! The highly available control plane of a sandbox (`ClusterSpec::etcd_replicas` > 0, `cargo
//! xtask sandbox up --store etcd`): a real etcd member and several `palisade serve` replicas
//! on it, all in the fabric namespace; every ztunnel is given every replica's address and
//! fails over between them.
//!
//! Replica `i` listens on `172.18.0.1:15010 + i` with its admin socket at `palisade.sock`
//! (replica 0, the one the CLI's context names) or `palisade-<i>.sock`. The policy file stays
//! in the store directory, where the CA reads its inventory, and is applied to etcd through a
//! replica's admin API; resources dropped from the file are not deleted from etcd (a test
//! deletes through the API).
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{CONTROL_PLANE_ADDR, Cluster, netns_name};
use crate::etcd::{self, EtcdSpec};
use crate::sys;

/// Where etcd serves its clients (the replicas), inside the fabric namespace.
pub const ETCD_ADDR: &str = "172.18.0.1:2379";

/// What the cluster runs for its etcd control plane.
pub(super) struct EtcdPlane {
    replicas: usize,
    etcd: Option<Child>,
    servers: Vec<Option<Child>>,
    palisade: PathBuf,
}

impl EtcdPlane {
    pub(super) fn new(replicas: usize, palisade: &Path) -> EtcdPlane {
        EtcdPlane { replicas, etcd: None, servers: (0..replicas).map(|_| None).collect(), palisade: palisade.into() }
    }

    /// Every process it started (for teardown).
    pub(super) fn children(&mut self) -> impl Iterator<Item = &mut Child> {
        self.etcd.iter_mut().chain(self.servers.iter_mut().flatten())
    }
}

/// Where ztunnels reach replica `i`.
pub fn replica_addr(i: usize) -> SocketAddr {
    let base: SocketAddr = CONTROL_PLANE_ADDR.parse().expect("CONTROL_PLANE_ADDR is an address");
    SocketAddr::new(base.ip(), base.port() + i as u16)
}

impl Cluster {
    /// The addresses a ztunnel is given (`--control-plane`, repeated): every replica's.
    pub fn control_plane_addrs(&self) -> Vec<SocketAddr> {
        match &self.etcd_plane {
            Some(plane) => (0..plane.replicas).map(replica_addr).collect(),
            None => vec![CONTROL_PLANE_ADDR.parse().expect("CONTROL_PLANE_ADDR is an address")],
        }
    }

    /// The admin socket of replica `i` (replica 0's is [`Cluster::admin_socket`]).
    pub fn replica_admin_socket(&self, i: usize) -> PathBuf {
        match i {
            0 => self.admin_socket(),
            i => self.info.state_dir.join(format!("palisade-{i}.sock")),
        }
    }

    fn replica_log(&self, i: usize) -> PathBuf {
        self.info.state_dir.join(format!("serve-{i}.log"))
    }

    /// Starts etcd, then every replica, then applies the cluster's policy through replica 0.
    pub(super) fn start_etcd_plane(&mut self) -> Result<()> {
        let fabric = netns_name(&self.info.id, "fab");
        let spec = EtcdSpec {
            name: format!("plsd-{}", self.info.id),
            data_dir: self.info.state_dir.join("etcd"),
            client: ETCD_ADDR.parse()?,
            peer: "127.0.0.1:2380".parse()?,
            // The sandbox applies every workload in one batch.
            max_txn_ops: Some(100_000),
        };
        let log = self.info.state_dir.join("etcd.log");
        let child = self.spawn_in(&fabric, "etcd", spec.command(), &log)?;
        self.etcd_plane.as_mut().context("no etcd plane")?.etcd = Some(child);
        let deadline = Instant::now() + etcd::START_TIMEOUT;
        let client = spec.client;
        while !sys::in_netns(&fabric, move || etcd::healthy(client))? {
            if Instant::now() > deadline {
                bail!("etcd was not healthy at {ETCD_ADDR}; {}:\n{}", log.display(), etcd::log_tail(&log, 20));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let replicas = self.etcd_plane.as_ref().map_or(0, |p| p.replicas);
        for i in 0..replicas {
            self.start_replica(i)?;
        }
        self.apply_policy_to_etcd()
    }

    /// Starts replica `i` (again, after [`Cluster::stop_replica`]) and waits until it
    /// answers on its admin socket.
    pub fn start_replica(&mut self, i: usize) -> Result<()> {
        let palisade = self.etcd_plane.as_ref().context("this cluster has no etcd control plane")?.palisade.clone();
        let socket = self.replica_admin_socket(i);
        let mut cmd = Command::new(palisade);
        cmd.args(["serve", "--store", &format!("etcd://{ETCD_ADDR}")])
            .arg("--ca-dir")
            .arg(self.info.state_dir.join("ca"))
            .args(["--listen", &replica_addr(i).to_string()])
            .arg("--admin-socket")
            .arg(&socket);
        let _ = std::fs::remove_file(&socket);
        let fabric = netns_name(&self.info.id, "fab");
        let log = self.replica_log(i);
        let child = self.spawn_in(&fabric, &format!("serve-{i}"), cmd, &log)?;
        let plane = self.etcd_plane.as_mut().context("no etcd plane")?;
        plane.servers[i] = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.replica_admin(i, &serde_json::json!({"op": "nodes"})).is_err() {
            if Instant::now() > deadline {
                bail!("replica {i} did not answer on {} (see {})", socket.display(), log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kills replica `i` (SIGKILL: a crash, as its ztunnels see it).
    pub fn stop_replica(&mut self, i: usize) -> Result<()> {
        let plane = self.etcd_plane.as_mut().context("this cluster has no etcd control plane")?;
        if let Some(mut child) = plane.servers.get_mut(i).and_then(Option::take) {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// One request to replica `i`'s admin API.
    pub fn replica_admin(&self, i: usize, request: &serde_json::Value) -> Result<serde_json::Value> {
        super::control_plane::admin_request(&self.replica_admin_socket(i), request)
    }

    /// Applies the policy file (every workload and the extra resources) through the first
    /// replica that answers; fails with every problem the server reports.
    pub(super) fn apply_policy_to_etcd(&self) -> Result<()> {
        let text = std::fs::read_to_string(&self.info.policy_file)
            .with_context(|| format!("read {}", self.info.policy_file.display()))?;
        let name = self.info.policy_file.display().to_string();
        let request = serde_json::json!({"op": "apply", "files": [{"name": name, "text": text}]});
        let replicas = self.etcd_plane.as_ref().map_or(0, |p| p.replicas);
        let mut last = None;
        for i in 0..replicas {
            match self.replica_admin(i, &request) {
                Ok(answer) => {
                    let errors = answer["errors"].as_array().cloned().unwrap_or_default();
                    if !errors.is_empty() {
                        bail!("the policy was not applied to etcd: {errors:?}");
                    }
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no replica")).context("no replica answered"))
    }
}
