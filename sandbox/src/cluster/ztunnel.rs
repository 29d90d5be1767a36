//! The ztunnels of a sandbox cluster: their command lines, start-up, restarts and upgrades
//! (a new process beside the old one), and stopping them.
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{CA_ADDR, Cluster, pin_root};

impl Cluster {
    /// The command line of a node's ztunnel.
    fn ztunnel_command(&self, i: usize, bin: &Path, with_ca: bool) -> Command {
        let node = &self.info.nodes[i];
        let mut cmd = Command::new(bin);
        cmd.args(["--node", &node.name]);
        // With a CA, the node has a credential to subscribe to the control plane with;
        // without one (insecure trials), it reads the policy file.
        match with_ca {
            true => {
                cmd.args(self.control_plane_addrs().iter().flat_map(|a| ["--control-plane".to_string(), a.to_string()]))
            }
            false => cmd.arg("--policy").arg(&self.info.policy_file),
        };
        cmd.arg("--enroll-socket")
            .arg(&node.enroll_socket)
            .arg("--pin-dir")
            .arg(pin_root(&self.info.id).join(&node.name))
            .arg("--state-dir")
            .arg(self.info.state_dir.join(format!("ztunnel-{}", node.name)))
            .args(["--policy-poll-ms", "100"]);
        if with_ca {
            cmd.args(["--ca-addr", CA_ADDR, "--bundle-refresh-secs", "1"])
                .arg("--node-credential-dir")
                .arg(self.info.state_dir.join(format!("credential-{}", node.name)));
        } else {
            cmd.arg("--insecure-plaintext");
        }
        cmd
    }

    pub(super) fn start_ztunnel(&mut self, i: usize, bin: &Path, with_ca: bool) -> Result<()> {
        let node = self.info.nodes[i].clone();
        let cmd = self.ztunnel_command(i, bin, with_ca);
        let child = self.spawn_in(&node.netns, &format!("ztunnel-{}", node.name), cmd, &node.log)?;
        self.ztunnels.push(child);
        self.started.push((bin.to_path_buf(), with_ca));
        self.wait_ztunnel_ready(i)
    }

    /// Waits until the ztunnel of node `i` answers on its enrollment socket.
    fn wait_ztunnel_ready(&mut self, i: usize) -> Result<()> {
        let node = self.info.nodes[i].clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.enroll_request(&node, &serde_json::json!({"op": "list"})).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.ztunnels.get_mut(i).and_then(|c| c.try_wait().ok().flatten()) {
                bail!("ztunnel on {} exited during start-up ({status})", node.name);
            }
            if Instant::now() > deadline {
                bail!("ztunnel on {} not ready after 30 s", node.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a new ztunnel on `node` while the old one may still run: with the old one alive
    /// this is an upgrade (the new process takes over its listeners and the old one drains);
    /// after a kill, a restart over the pinned state. Returns once the new one serves
    /// enrollment requests; the old process, if any, is kept and reaped at teardown.
    pub fn start_new_ztunnel(&mut self, node: &str) -> Result<()> {
        let i = self.info.nodes.iter().position(|n| n.name == node).with_context(|| format!("no node {node}"))?;
        let (bin, with_ca) = self.started.get(i).cloned().context("this handle did not start the ztunnels")?;
        let info = self.info.nodes[i].clone();
        let generation = self.ztunnel_generation.entry(i).or_insert(0);
        *generation += 1;
        let log = self.info.state_dir.join(format!("ztunnel-{}.{}.log", info.name, generation));
        let cmd = self.ztunnel_command(i, &bin, with_ca);
        let child = self.spawn_in(&info.netns, &format!("ztunnel-{}", info.name), cmd, &log)?;
        let old = std::mem::replace(&mut self.ztunnels[i], child);
        self.retired.push(old);
        self.info.nodes[i].log = log;
        self.save()?;
        // The old process answers enrollment requests until it has handed over; wait for the
        // new one's log line.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&self.info.nodes[i].log).unwrap_or_default();
            if text.contains("ztunnel ready") {
                return self.wait_ztunnel_ready(i);
            }
            if let Some(status) = self.ztunnels[i].try_wait()? {
                bail!("new ztunnel on {node} exited during start-up ({status}):\n{text}");
            }
            if Instant::now() > deadline {
                bail!("new ztunnel on {node} not ready after 30 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// ztunnels replaced by [`Self::start_new_ztunnel`] that are still running.
    pub fn retired_ztunnels_running(&mut self) -> usize {
        self.retired.iter_mut().map(|c| c.try_wait().ok().flatten().is_none()).filter(|running| *running).count()
    }

    /// Stops a node's ztunnel with `signal` and waits for it to exit.
    pub fn stop_ztunnel(&mut self, node: &str, signal: i32) -> Result<std::process::ExitStatus> {
        let i = self.info.nodes.iter().position(|n| n.name == node).with_context(|| format!("no node {node}"))?;
        let child = self.ztunnels.get_mut(i).context("this handle does not own the ztunnels")?;
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("ztunnel on {node} still running 10 s after signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Process id of a node's ztunnel (when this handle started it).
    pub fn ztunnel_pid(&self, node: &str) -> Option<u32> {
        let i = self.info.nodes.iter().position(|n| n.name == node)?;
        self.ztunnels.get(i).map(|c| c.id())
    }
}
