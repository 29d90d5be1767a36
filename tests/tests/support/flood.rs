//! Floods of TCP connections from inside a network namespace, for the hostile-peer tests:
//! each connection sends nothing (or, one in [`GARBAGE_EVERY`], bytes that are neither TLS
//! nor HTTP) and is held until the server closes it or [`HOLD`] ends, so that a server
//! without bounds on handshakes, heads or connections would keep them all.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a flooding connection is held open at most: longer than the servers' handshake
/// and header timeouts (5 s), so it is the server that gives up.
pub const HOLD: Duration = Duration::from_secs(8);
/// One flooding connection in `GARBAGE_EVERY` sends 512 bytes of garbage.
pub const GARBAGE_EVERY: u64 = 4;

/// What a flood did, counted from the flooding side.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub opened: u64,
    /// Connects that failed or timed out (not counting resets by the server).
    pub failed: u64,
    /// Connections the server closed (or reset) before the hold ended.
    pub closed: u64,
    pub per_second: f64,
}

/// A flood from one network namespace against one address, on its own thread, at most
/// `in_flight` connections open at once. Stopped (and its thread joined) on drop.
pub struct Flood {
    stop: Arc<AtomicBool>,
    counts: Arc<[AtomicU64; 3]>,
    started: Instant,
    thread: Option<std::thread::JoinHandle<()>>,
}

const OPENED: usize = 0;
const FAILED: usize = 1;
const CLOSED: usize = 2;

impl Flood {
    pub fn start(netns: &str, target: SocketAddr, in_flight: usize) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<[AtomicU64; 3]> = Arc::default();
        let (s, c) = (stop.clone(), counts.clone());
        let netns = netns.to_string();
        let thread = std::thread::spawn(move || {
            palisade_sandbox::sys::in_netns(&netns, move || flood(target, in_flight, s, c)).expect("flood thread");
        });
        Flood { stop, counts, started: Instant::now(), thread: Some(thread) }
    }

    pub fn opened(&self) -> u64 {
        self.counts[OPENED].load(Ordering::Relaxed)
    }

    pub fn stop(mut self) -> Outcome {
        self.halt();
        let get = |i: usize| self.counts[i].load(Ordering::Relaxed);
        Outcome {
            opened: get(OPENED),
            failed: get(FAILED),
            closed: get(CLOSED),
            per_second: get(OPENED) as f64 / self.started.elapsed().as_secs_f64(),
        }
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.halt();
    }
}

fn flood(target: SocketAddr, in_flight: usize, stop: Arc<AtomicBool>, counts: Arc<[AtomicU64; 3]>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(in_flight));
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let Ok(slot) = tokio::time::timeout(Duration::from_millis(100), slots.clone().acquire_owned()).await else {
                continue;
            };
            let slot = slot.unwrap();
            n += 1;
            let garbage = n.is_multiple_of(GARBAGE_EVERY);
            let (counts, stop) = (counts.clone(), stop.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let count = |i: usize| counts[i].fetch_add(1, Ordering::Relaxed);
                let connected =
                    tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(target)).await;
                let mut tcp = match connected {
                    Ok(Ok(tcp)) => tcp,
                    // Reset by the server (over a bound) before the connect was even polled.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        count(OPENED);
                        count(CLOSED);
                        return;
                    }
                    _ => {
                        count(FAILED);
                        return;
                    }
                };
                count(OPENED);
                if garbage {
                    let _ = tcp.write_all(&[0x5a; 512]).await;
                }
                let mut buf = [0u8; 512];
                let deadline = Instant::now() + HOLD;
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    match tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => {
                            count(CLOSED);
                            return;
                        }
                        _ => {}
                    }
                }
            });
        }
    });
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}
