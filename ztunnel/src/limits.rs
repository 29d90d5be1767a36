//! Resource limits of the process as a whole, against floods and hostile peers.
//!
//! - **Descriptors.** Data-path connections (the HBONE listeners, inbound and outbound proxied
//!   connections) may use descriptors only up to `RLIMIT_NOFILE` minus a reserve, so that the
//!   control path (admin API, enrollment, policy reloads, certificate renewals) always has
//!   some. The limit is read at run time (it can be lowered while ztunnel runs, `prlimit`),
//!   the descriptors in use are counted from `/proc/self/fd` at most every `SAMPLE_EVERY`,
//!   and every admission since the last count is added to it (closes are only seen at the
//!   next count: the estimate errs on the side of refusing). A refused connection is accepted
//!   and closed at once (a reset), so it does not wait in the kernel's queue.
//! - **HBONE handshakes.** At most `HBONE_HANDSHAKES` at once for all pods of the node, at
//!   most `HBONE_HANDSHAKES_PER_SOURCE` per source address (see
//!   [`palisade_mesh::accept::HandshakeLimit`]).
//! - **Memory.** glibc keeps freed memory in its arenas (one per thread that ever allocated,
//!   up to 8 × cores); after a flood of handshakes that is tens of MiB never given back. The
//!   arenas are capped at start-up and, once activity has dropped, freed pages are returned
//!   to the kernel (`malloc_trim`).
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use palisade_mesh::accept::HandshakeLimit;

/// Concurrent inbound HBONE handshakes of the whole ztunnel (all pods of the node).
pub const HBONE_HANDSHAKES: usize = 1024;
/// Concurrent inbound HBONE handshakes from one source address.
pub const HBONE_HANDSHAKES_PER_SOURCE: usize = 32;
/// Connections an HBONE listener refuses in a row before it lets the worker run other tasks.
pub const REFUSALS_PER_YIELD: u32 = 8;
/// Descriptors kept for the control path: this many, or a tenth of the limit if more.
pub const FD_RESERVE: u64 = 64;
/// How often the descriptors in use are counted (and the limit re-read) at most.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// ...and at most this often while connections are being refused, so that a burst that has
/// already closed does not keep refusing on a stale count.
const SAMPLE_WHEN_REFUSING: Duration = Duration::from_millis(200);
/// glibc malloc arenas: two are enough for ztunnel's few threads, and bound what a burst on
/// many threads leaves behind.
const MALLOC_ARENAS: i32 = 2;
/// Allocations at least this large are mapped on their own (see `init_process`).
const MMAP_THRESHOLD: i32 = 32 << 10;
/// Memory is returned to the kernel when there was activity since the last trim but fewer
/// than `TRIM_QUIET_BELOW` new data-path connections during the last `TRIM_EVERY`.
const TRIM_EVERY: Duration = Duration::from_secs(5);
const TRIM_QUIET_BELOW: u64 = 1000;

/// The handshake bound shared by every pod's HBONE listener.
pub fn hbone_handshakes() -> &'static Arc<HandshakeLimit> {
    static LIMIT: OnceLock<Arc<HandshakeLimit>> = OnceLock::new();
    LIMIT.get_or_init(|| HandshakeLimit::new(HBONE_HANDSHAKES, HBONE_HANDSHAKES_PER_SOURCE))
}

/// The descriptor budget of the data path.
pub fn fds() -> &'static FdBudget {
    static FDS: OnceLock<FdBudget> = OnceLock::new();
    FDS.get_or_init(FdBudget::new)
}

pub struct FdBudget {
    epoch: Instant,
    /// When the last count was taken, in ms since `epoch` (`u64::MAX`: never).
    sampled_ms: AtomicU64,
    limit: AtomicU64,
    open_at_sample: AtomicU64,
    admitted_since_sample: AtomicU64,
    admitted: AtomicU64,
    refused: AtomicU64,
}

impl FdBudget {
    fn new() -> Self {
        FdBudget {
            epoch: Instant::now(),
            sampled_ms: AtomicU64::new(u64::MAX),
            limit: AtomicU64::new(0),
            open_at_sample: AtomicU64::new(0),
            admitted_since_sample: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Whether a new data-path connection that will hold `need` descriptors may proceed.
    /// Counted as admitted (or refused) either way.
    pub fn admit(&self, need: u64) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.sampled_ms.load(Relaxed);
        if last == u64::MAX || now.saturating_sub(last) >= SAMPLE_EVERY.as_millis() as u64 {
            self.sample(last, now);
        }
        if self.fits(need) {
            self.admitted_since_sample.fetch_add(need, Relaxed);
            self.admitted.fetch_add(1, Relaxed);
            return true;
        }
        // Refusing on an estimate that only grows: recount, sooner than usual.
        let last = self.sampled_ms.load(Relaxed);
        if now.saturating_sub(last) >= SAMPLE_WHEN_REFUSING.as_millis() as u64
            && self.sample(last, now)
            && self.fits(need)
        {
            self.admitted_since_sample.fetch_add(need, Relaxed);
            self.admitted.fetch_add(1, Relaxed);
            return true;
        }
        self.refused.fetch_add(1, Relaxed);
        false
    }

    fn fits(&self, need: u64) -> bool {
        let limit = self.limit.load(Relaxed);
        let used = self.open_at_sample.load(Relaxed) + self.admitted_since_sample.load(Relaxed);
        used + need + reserve(limit) <= limit
    }

    /// Re-reads the limit and counts open descriptors; one caller at a time (the one that
    /// moves `sampled_ms` from `last`). Returns whether this call sampled.
    fn sample(&self, last: u64, now: u64) -> bool {
        if self.sampled_ms.compare_exchange(last, now, Relaxed, Relaxed).is_err() {
            return false;
        }
        let limit = nofile_limit();
        // Counting needs a descriptor itself: when none is left, everything is in use.
        let open = open_fds().unwrap_or(limit);
        self.limit.store(limit, Relaxed);
        self.open_at_sample.store(open, Relaxed);
        self.admitted_since_sample.store(0, Relaxed);
        true
    }

    /// Data-path connections refused for lack of descriptors since start.
    pub fn refused_total(&self) -> u64 {
        self.refused.load(Relaxed)
    }

    /// Data-path connections admitted since start.
    pub fn admitted_total(&self) -> u64 {
        self.admitted.load(Relaxed)
    }
}

fn reserve(limit: u64) -> u64 {
    FD_RESERVE.max(limit / 10)
}

/// The soft `RLIMIT_NOFILE` now.
fn nofile_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 { limit.rlim_cur } else { 1024 }
}

/// Descriptors open in this process (not counting the one used to count them).
fn open_fds() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some((entries.count() as u64).saturating_sub(1))
}

/// Lifts the soft limit on open files to the hard one (every proxied connection holds two
/// descriptors, four with HBONE) and caps glibc's malloc arenas. Call once, early.
pub fn init_process() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit/mallopt with valid arguments.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
        #[cfg(target_env = "gnu")]
        {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
            // Copy buffers (64 KiB) and other large ones come from mappings of their own,
            // given back on free. From the heap, short-lived buffers between long-lived small
            // objects fragment it: RSS grew by 4 to 10 MiB with every 400-connection load and no
            // trim returned it. The price is a mapping per large buffer (measured in quick
            // benchmark runs: up to 15 % of throughput); pooling the buffers would avoid both.
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}

static TRIMS: AtomicU64 = AtomicU64::new(0);

/// Returns freed heap memory to the kernel once a burst of activity is over. `closed` counts
/// the proxied connections that have ended so far. Runs until the runtime stops.
///
/// Activity is new admissions or ended connections since the last trim. Ended connections
/// count because admissions alone miss a load carried on pooled tunnels (no new socket on
/// this node), and a trim that fell in the middle of a load (its buffers still live) would
/// otherwise be the last one: the load's freed buffers would stay in the heap for good.
pub async fn trim_memory_after_activity(closed: impl Fn() -> u64) {
    let activity = || fds().admitted_total() + closed();
    let mut trimmed_at = activity();
    let mut previous = fds().admitted_total();
    loop {
        tokio::time::sleep(TRIM_EVERY).await;
        let admitted = fds().admitted_total();
        let quiet = admitted - previous < TRIM_QUIET_BELOW;
        previous = admitted;
        let now = activity();
        if !quiet || now == trimmed_at {
            continue;
        }
        trimmed_at = now;
        // malloc_trim walks every arena under its lock: keep it off the runtime's threads.
        let _ = tokio::task::spawn_blocking(|| {
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim has no preconditions.
            unsafe {
                libc::malloc_trim(0);
            }
            TRIMS.fetch_add(1, Relaxed);
        })
        .await;
    }
}

/// Appends these limits' metrics in the Prometheus text format.
pub fn render(out: &mut String) {
    use std::fmt::Write;
    let handshakes = hbone_handshakes();
    let fds = fds();
    for (name, kind, help, value) in [
        (
            "palisade_accept_errors_total",
            "counter",
            "accept() failures of every listener (each backs off).",
            palisade_mesh::accept::accept_errors_total(),
        ),
        (
            "palisade_hbone_handshakes_refused_total",
            "counter",
            "Inbound HBONE connections closed unhandshaken: too many handshakes overall or from their source.",
            handshakes.refused_total(),
        ),
        (
            "palisade_hbone_handshakes_in_progress",
            "gauge",
            "Inbound HBONE handshakes running now.",
            handshakes.in_progress() as u64,
        ),
        (
            "palisade_hbone_handshake_failures_total",
            "counter",
            "Inbound HBONE handshakes that failed or timed out.",
            palisade_mesh::hbone::server::handshake_failures_total(),
        ),
        (
            "palisade_fd_reserve_refusals_total",
            "counter",
            "Data-path connections closed because only the control path's reserve of descriptors was left.",
            fds.refused_total(),
        ),
        ("palisade_open_fds", "gauge", "Descriptors open at the last count.", fds.open_at_sample.load(Relaxed)),
        ("palisade_fd_limit", "gauge", "RLIMIT_NOFILE at the last count.", fds.limit.load(Relaxed)),
        ("palisade_malloc_trims_total", "counter", "Freed heap returned to the kernel after activity.", {
            TRIMS.load(Relaxed)
        }),
        (
            "palisade_log_lines_dropped_total",
            "counter",
            "Log and access-log lines dropped because the log writer could not keep up.",
            palisade_mesh::logging::dropped_lines(),
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_follows_the_limit_and_keeps_the_reserve() {
        let budget = FdBudget::new();
        assert!(budget.admit(2), "a fresh process has descriptors to spare");
        let limit = budget.limit.load(Relaxed);
        let open = budget.open_at_sample.load(Relaxed);
        assert_eq!(limit, nofile_limit());
        // Fill up to the reserve: the next admission is refused, whatever the limit.
        let room = limit - reserve(limit) - open - 2;
        budget.admitted_since_sample.fetch_add(room, Relaxed);
        assert!(!budget.admit(1));
        assert_eq!(budget.refused_total(), 1);
        assert!(budget.fits(0));
    }

    #[test]
    fn open_descriptors_are_counted() {
        let before = open_fds().unwrap();
        let files: Vec<_> = (0..5).map(|_| std::fs::File::open("/proc/self/status").unwrap()).collect();
        assert!(open_fds().unwrap() >= before + 5);
        drop(files);
    }
}
