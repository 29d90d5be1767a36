//! The cluster's control plane: `palisade serve` in the fabric namespace beside the CA, over a
//! directory store (`<state>/store`, which holds the cluster's policy file; `palisade apply`
//! writes into its `applied/`). ztunnels started with a CA subscribe to it; the CLI reaches it
//! from the root namespace through its admin socket (a Unix socket is reachable from every
//! network namespace).
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{Cluster, netns_name};

/// Where ztunnels reach `palisade serve` (the fabric's bridge address).
pub const CONTROL_PLANE_ADDR: &str = "172.18.0.1:15010";

impl Cluster {
    /// The store directory `palisade serve` follows (the policy file lives in it).
    pub fn store_dir(&self) -> PathBuf {
        self.info.policy_file.parent().map(Path::to_path_buf).unwrap_or_else(|| self.info.state_dir.clone())
    }

    /// The control plane's admin socket (what the CLI talks to).
    pub fn admin_socket(&self) -> PathBuf {
        self.info.state_dir.join("palisade.sock")
    }

    fn serve_log(&self) -> PathBuf {
        self.info.state_dir.join("serve.log")
    }

    /// Starts `palisade serve` (again, after [`Self::stop_control_plane`]) and waits until it
    /// answers on its admin socket.
    pub fn start_control_plane(&mut self, palisade: &Path) -> Result<()> {
        let mut cmd = Command::new(palisade);
        cmd.arg("serve")
            .arg("--store")
            .arg(self.store_dir())
            .arg("--ca-dir")
            .arg(self.info.state_dir.join("ca"))
            .args(["--listen", CONTROL_PLANE_ADDR, "--poll-ms", "50"])
            .arg("--admin-socket")
            .arg(self.admin_socket());
        let fabric = netns_name(&self.info.id, "fab");
        let _ = std::fs::remove_file(self.admin_socket());
        let log = self.serve_log();
        let child = self.spawn_in(&fabric, "serve", cmd, &log)?;
        self.control_plane = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.admin(&serde_json::json!({"op": "nodes"})).is_err() {
            if Instant::now() > deadline {
                bail!("palisade serve did not answer on {} (see {})", self.admin_socket().display(), log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kills `palisade serve` (the ztunnels keep enforcing their last snapshot).
    pub fn stop_control_plane(&mut self) -> Result<()> {
        if let Some(mut child) = self.control_plane.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the control plane again with the binary it ran before.
    pub fn restart_control_plane(&mut self) -> Result<()> {
        let bin = self.control_plane_bin.clone().context("this cluster has no control plane")?;
        self.stop_control_plane()?;
        self.start_control_plane(&bin)
    }

    /// One request to the admin API (see `palisade_server::admin`), answered as JSON.
    pub fn admin(&self, request: &serde_json::Value) -> Result<serde_json::Value> {
        admin_request(&self.admin_socket(), request)
    }

    /// Every node's status as the control plane sees it (`palisade get nodes -o json`).
    pub fn node_statuses(&self) -> Result<Vec<serde_json::Value>> {
        let answer = self.admin(&serde_json::json!({"op": "nodes"}))?;
        Ok(answer["nodes"].as_array().cloned().unwrap_or_default())
    }

    /// Writes the CLI's context file so that a plain `palisade apply -f …` reaches this
    /// cluster.
    pub fn write_cli_context(&self, file: &Path) -> Result<()> {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let context = serde_json::json!({"socket": self.admin_socket(), "cluster": self.info.id});
        std::fs::write(file, serde_json::to_string_pretty(&context)?)?;
        Ok(())
    }
}

/// One JSON request to a `palisade serve` admin socket, answered by one JSON line.
pub(super) fn admin_request(socket: &std::path::Path, request: &serde_json::Value) -> Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket).with_context(|| format!("connect {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).with_context(|| format!("{} answered: {answer:.200}", socket.display()))
}
