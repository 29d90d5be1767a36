//! A real etcd (Debian's `etcd-server`, installed by `cargo xtask setup`) for the tests and
//! for `cargo xtask sandbox up --store etcd`: one member, its own data directory, plain HTTP
//! on addresses nobody else uses.
//!
//! [`Etcd::start`] runs one on 127.0.0.1 for a test: free ports are picked by the kernel, the
//! data directory lives under the test's state directory, and the process is killed and its
//! directory removed when the value is dropped, also when the test panics. A test killed from
//! outside (a timeout's SIGKILL) cannot run its drop: the child is started with
//! `PR_SET_PDEATHSIG`, so the kernel kills it with its parent thread.
//!
//! The sandbox runs etcd inside its fabric namespace instead (see [`EtcdSpec::command`]), in
//! the cluster's cgroup, where teardown finds it like every other process of the cluster.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a fresh member may take to answer `/health` (it elects itself leader after one
/// election timeout, about a second).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One etcd member: where it keeps its data and where it listens.
#[derive(Clone, Debug)]
pub struct EtcdSpec {
    /// The member's name (also the name of its one-member cluster).
    pub name: String,
    pub data_dir: PathBuf,
    /// Clients (`palisade serve`, `etcdctl`) connect here.
    pub client: SocketAddr,
    /// Raft peers would connect here; a one-member cluster still needs it.
    pub peer: SocketAddr,
    /// Operations allowed in one transaction (etcd's default is 128): a batch of resources is
    /// one transaction, so a cluster with large batches raises it.
    pub max_txn_ops: Option<u32>,
}

impl EtcdSpec {
    /// The client URL, `http://<client>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }

    /// The `etcd` command for this member (stdout/stderr and the namespace are the caller's).
    pub fn command(&self) -> Command {
        let client = self.endpoint();
        let peer = format!("http://{}", self.peer);
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("{}={peer}", self.name), "--initial-cluster-state", "new"])
            // Old revisions are kept for an hour so that watchers that reconnect can resume.
            .args(["--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1h"])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        if let Some(ops) = self.max_txn_ops {
            // Large batches are large requests too (etcd warns above 10 MiB).
            cmd.args(["--max-txn-ops", &ops.to_string(), "--max-request-bytes", &(10 << 20).to_string()]);
        }
        cmd
    }
}

/// Whether the member at `client` answers `GET /health` with `"health":"true"` (it has a
/// leader and serves reads). Call it from the namespace the member listens in.
pub fn healthy(client: SocketAddr) -> bool {
    let ask = || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&client, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(s, "GET /health HTTP/1.1\r\nHost: {client}\r\nConnection: close\r\n\r\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    };
    ask().is_ok_and(|a| a.starts_with("HTTP/1.1 200") && a.contains("\"health\":\"true\""))
}

/// The last lines of a log, for errors.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// An etcd member run by a test on 127.0.0.1; killed and removed on drop. Start it on the
/// thread that runs the test (not a pool thread such as tokio's `spawn_blocking`): the
/// parent-death signal fires when the thread that started it ends.
pub struct Etcd {
    spec: EtcdSpec,
    child: Option<Child>,
    log: PathBuf,
    /// Everything of this member (data and log), removed on drop.
    dir: PathBuf,
}

impl Etcd {
    /// Starts a member under `<state_dir>/etcd-<n>` and waits until it is healthy
    /// ([`START_TIMEOUT`]). Several members (and several tests) run side by side.
    pub fn start(state_dir: &Path) -> Result<Etcd> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = state_dir.join(format!("etcd-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut etcd = Etcd {
            spec: EtcdSpec {
                name: format!("plsd-{:x}-{n}", std::process::id()),
                data_dir: dir.join("data"),
                client: "127.0.0.1:0".parse()?,
                peer: "127.0.0.1:0".parse()?,
                max_txn_ops: None,
            },
            child: None,
            log: dir.join("etcd.log"),
            dir,
        };
        // The ports are free when the kernel hands them out, but another process may take one
        // before etcd binds it: start again on fresh ports when that is what went wrong.
        let mut attempts = 0;
        loop {
            attempts += 1;
            etcd.spec.client = free_port()?;
            etcd.spec.peer = free_port()?;
            match etcd.run() {
                Ok(()) => return Ok(etcd),
                Err(e) if attempts < 5 && log_tail(&etcd.log, 20).contains("address already in use") => {
                    eprintln!("etcd: {e:#}; trying other ports");
                    let _ = std::fs::remove_dir_all(&etcd.spec.data_dir);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts the process (the member keeps its data across [`Etcd::kill`] and `run`).
    fn run(&mut self) -> Result<()> {
        which_etcd()?;
        let log = std::fs::File::create(&self.log).with_context(|| format!("create {}", self.log.display()))?;
        let mut cmd = self.spec.command();
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        // SAFETY: pre_exec only makes one raw syscall (prctl).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("start etcd")?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if healthy(self.spec.client) {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                bail!(
                    "etcd exited ({status}) before it was healthy; {}:\n{}",
                    self.log.display(),
                    log_tail(&self.log, 20)
                );
            }
            if Instant::now() > deadline {
                self.kill();
                bail!(
                    "etcd was not healthy at {} after {START_TIMEOUT:?}; {}:\n{}",
                    self.spec.endpoint(),
                    self.log.display(),
                    log_tail(&self.log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        self.spec.endpoint()
    }

    pub fn spec(&self) -> &EtcdSpec {
        &self.spec
    }

    /// The member's log (zap's JSON lines).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Kills the process (SIGKILL: what a crash looks like to its clients); its data stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the member again on the same ports and data, after [`Etcd::kill`].
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.run()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("etcd {} ({}):\n{}", self.spec.endpoint(), self.log.display(), log_tail(&self.log, 30));
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Fails with what to do when etcd is not installed.
fn which_etcd() -> Result<()> {
    match Command::new("etcd").arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => bail!("`etcd --version` failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => bail!("cannot run etcd ({e}): install it with `cargo xtask setup` (Debian package etcd-server)"),
    }
}
