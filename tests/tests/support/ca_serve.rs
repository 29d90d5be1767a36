//! `palisade ca serve` as a process of its own (the real binary, on 127.0.0.1, port chosen
//! by the system), its log in a file, for the tests that attack or exercise the CA's server.
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Bounds waits for what happens at once when the code is right.
const HANG_GUARD: Duration = Duration::from_secs(60);

pub fn palisade() -> PathBuf {
    palisade_sandbox::workspace_bin("palisade").expect("palisade binary")
}

/// A running `palisade ca serve`; killed on drop.
pub struct CaServe {
    child: Child,
    log: PathBuf,
    pub addr: SocketAddr,
}

impl CaServe {
    /// Serves the CA in `ca_dir` with the inventory file `inventory`, logging to `log`;
    /// `max_files` lowers its RLIMIT_NOFILE. Returns once it listens.
    pub fn start(ca_dir: &Path, inventory: &Path, log: PathBuf, max_files: Option<u64>) -> CaServe {
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(palisade());
        cmd.arg("ca")
            .arg("--dir")
            .arg(ca_dir)
            .args(["serve", "--listen", "127.0.0.1:0", "--inventory"])
            .arg(inventory)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            // tracing writes to stdout.
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        if let Some(limit) = max_files {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
            unsafe {
                cmd.pre_exec(move || {
                    let rlim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("start palisade ca serve");
        let mut ca = CaServe { child, log, addr: SocketAddr::from(([127, 0, 0, 1], 0)) };
        let line = ca.wait_log("the CA to listen", |l| l.contains("CA serving"));
        let addr = line.split("addr=").nth(1).and_then(|a| a.split_whitespace().next()).expect("addr in log");
        ca.addr = addr.parse().unwrap_or_else(|e| panic!("CA address {addr:?}: {e}"));
        ca
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a log line matching `pred`; panics with the log if the CA exits first.
    pub fn wait_log(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            if let Some(line) = self.log().lines().find(|l| pred(l)) {
                return line.to_string();
            }
            self.assert_alive();
            assert!(Instant::now() < deadline, "timed out waiting for {what}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the CA exited ({status}); log:\n{}", self.log());
        }
    }
}

impl Drop for CaServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
