//! Hostile peers against a pod's HBONE port (15008), on a sandbox cluster: a flood of TCP
//! connections that send nothing or garbage, from the network namespaces of other pods and
//! of a node (the test process enters them; the traffic stays inside the cluster).
//!
//! - During a flood, a legitimate client of the same pod still gets through byte-exact, and
//!   after it (and after an ordinary load) ztunnel's memory comes back near where it was.
//! - With descriptors exhausted (its `RLIMIT_NOFILE` lowered at run time), ztunnel's accept
//!   loop backs off instead of spinning a core.
//! - With a low descriptor limit, set while it runs, the control path (enrollment API, admin
//!   API) keeps answering through a flood, and the data path works again after it.
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use palisade_sandbox::Cluster;
use support::flood::{Flood, rss_kib};
use support::{connect, mesh, metric, serve};

/// Connections a flooding namespace keeps open at once (the client side's descriptors).
const IN_FLIGHT: usize = 400;

/// CPU time a process has used (user + system), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("process stat");
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0)
}

/// A process's `RLIMIT_NOFILE` (soft, hard).
fn nofile(pid: u32) -> (u64, u64) {
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: prlimit reading another process's limit into a valid struct.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit {pid}: {}", std::io::Error::last_os_error());
    (old.rlim_cur, old.rlim_max)
}

/// Sets a process's `RLIMIT_NOFILE` while it runs, as `prlimit --nofile=soft:hard` does (a
/// hard limit can be lowered, not raised again without CAP_SYS_RESOURCE).
fn set_nofile(pid: u32, soft: u64, hard: u64) {
    let new = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: prlimit on another process with a valid new limit and no old-limit output.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit {pid} nofile={soft}:{hard}: {}", std::io::Error::last_os_error());
}

fn hbone_of(cluster: &Cluster, pod: &str) -> SocketAddr {
    SocketAddr::new(cluster.pod(pod).unwrap().ip.parse().unwrap(), palisade_mesh::hbone::PORT)
}

fn netns_of_pod(cluster: &Cluster, pod: &str) -> String {
    cluster.pod(pod).unwrap().netns.clone()
}

fn assert_carried(cluster: &Cluster, from: &str, to: &str, when: &str) {
    let r = connect(cluster, from, to, 256 << 10);
    assert_eq!(r["verified"], true, "{when}: the legitimate connection {from} -> {to} failed: {r}");
}

fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_handshake_flood_neither_starves_legitimate_clients_nor_keeps_memory() {
    let cluster = mesh(2, 2, "");
    let _server = serve(&cluster, "p2-1", 8080);
    let dst = format!("{}:8080", cluster.pod("p2-1").unwrap().ip);
    let pid = cluster.ztunnel_pid("node-2").expect("node-2's ztunnel");
    // Warm up (pool, certificates, first allocations), then the baseline.
    for _ in 0..3 {
        assert_carried(&cluster, "p1-1", &dst, "before the flood");
    }
    std::thread::sleep(Duration::from_secs(1));
    let before = rss_kib(pid);

    let target = hbone_of(&cluster, "p2-1");
    let floods = [
        Flood::start(&netns_of_pod(&cluster, "p1-2"), target, IN_FLIGHT),
        Flood::start(&cluster.node("node-1").unwrap().netns, target, IN_FLIGHT),
    ];
    let flooded = || floods.iter().map(Flood::opened).sum::<u64>();
    let mut peak = before;
    wait_until("1,000 flooding connections", Duration::from_secs(60), || flooded() >= 1000);
    // A legitimate client of the flooded pod gets through, byte-exact, while the flood runs.
    for _ in 0..3 {
        assert_carried(&cluster, "p1-1", &dst, "during the flood");
        peak = peak.max(rss_kib(pid));
    }
    wait_until("20,000 flooding connections", Duration::from_secs(120), || {
        peak = peak.max(rss_kib(pid));
        flooded() >= 20_000
    });
    assert_carried(&cluster, "p1-1", &dst, "late in the flood");
    let stats: Vec<_> = floods.into_iter().map(Flood::stop).collect();
    let refused = metric(&cluster, "node-2", "palisade_hbone_handshakes_refused_total");
    let failures = metric(&cluster, "node-2", "palisade_hbone_handshake_failures_total");
    eprintln!(
        "flood (opened, failed connects, per second) per source: {stats:?}; ztunnel: {refused} handshakes refused \
         over the bounds, {failures} failed; RSS {before} KiB before, peak {peak} KiB during"
    );
    assert!(refused > 0.0, "the per-source bound never refused a flooding connection");

    // Memory comes back: within 16 MiB of the baseline (a leak check, not a timing one).
    let bound = before + (16 << 10);
    let mut after = rss_kib(pid);
    let settled = Instant::now() + Duration::from_secs(40);
    while after > bound && Instant::now() < settled {
        std::thread::sleep(Duration::from_millis(500));
        after = rss_kib(pid);
    }
    eprintln!("RSS after the flood: {after} KiB (before {before} KiB, peak {peak} KiB)");
    assert!(after <= bound, "ztunnel kept {after} KiB after the flood against {before} KiB before it (peak {peak})");
    assert_carried(&cluster, "p1-1", &dst, "after the flood");

    // Ordinary loads (400 concurrent 1 MiB echoes) leave little behind and do not make memory
    // grow load after load (with heap-allocated copy buffers it grew by 4 to 10 MiB per load).
    // Each load is measured after ztunnel's next trim that follows it (its trimmer runs every
    // 5 s once activity stops), not after a fixed wait that a busy machine may outlast.
    let trims = || metric(&cluster, "node-2", "palisade_malloc_trims_total");
    let settle = |what: &str| {
        let r = support::connect_with(&cluster, "p1-1", &dst, 1 << 20, &["--parallel", "400"]);
        assert_eq!(r["verified_count"], 400, "{r}");
        let after_load = trims();
        wait_until("a trim after the load", Duration::from_secs(30), || trims() > after_load);
        let rss = rss_kib(pid);
        eprintln!("RSS after {what} load of 400 x 1 MiB: {rss} KiB (before the flood {before} KiB)");
        rss
    };
    let first = settle("a first");
    let second = settle("a second");
    let third = settle("a third");
    assert!(
        third <= first + (6 << 10) && first <= bound,
        "ztunnel grows load after load: {first} KiB, then {second} KiB, then {third} KiB (before {before} KiB)"
    );
}

#[test]
fn with_no_descriptor_left_the_accept_loop_backs_off_instead_of_spinning() {
    let cluster = mesh(2, 1, "");
    let _server = serve(&cluster, "p2-1", 8080);
    let dst = format!("{}:8080", cluster.pod("p2-1").unwrap().ip);
    assert_carried(&cluster, "p1-1", &dst, "before");
    let pid = cluster.ztunnel_pid("node-2").expect("node-2's ztunnel");
    let errors_before = metric(&cluster, "node-2", "palisade_accept_errors_total");

    // Not one descriptor to spare: every accept fails with EMFILE while connections wait. The
    // soft limit goes below every descriptor ztunnel holds but stdio's, not to the number it
    // holds: a new descriptor takes the lowest free number, so a hole below that number (a
    // connection closed a moment ago) would let accepts through, each refused and closed, the
    // hole reopening (seen once in a local run: no accept error at all).
    let (soft, hard) = nofile(pid);
    set_nofile(pid, 3, hard);
    let flood = Flood::start(&cluster.node("node-1").unwrap().netns, hbone_of(&cluster, "p2-1"), IN_FLIGHT);
    wait_until("flooding connections queued", Duration::from_secs(30), || flood.opened() >= 50);
    let (ticks, started) = (cpu_ticks(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cores = (cpu_ticks(pid) - ticks) as f64 / hz / started.elapsed().as_secs_f64();
    let stats = flood.stop();
    eprintln!("with descriptors exhausted, ztunnel used {cores:.3} cores under a flood of {stats:?}");
    assert!(cores < 0.5, "ztunnel used {cores:.2} cores while its accept() kept failing: it spins");

    // Descriptors back: the errors were counted and the pod is served again.
    set_nofile(pid, soft, hard);
    wait_until("the admin API to answer again", Duration::from_secs(10), || {
        cluster.admin_get("node-2", "/metrics").is_ok()
    });
    let errors = metric(&cluster, "node-2", "palisade_accept_errors_total");
    assert!(errors > errors_before, "no accept error was counted ({errors_before} -> {errors})");
    assert_carried(&cluster, "p1-1", &dst, "after descriptors came back");
}

#[test]
fn with_a_low_descriptor_limit_the_control_path_answers_through_a_flood() {
    let cluster = mesh(2, 2, "");
    let _server = serve(&cluster, "p2-1", 8080);
    let dst = format!("{}:8080", cluster.pod("p2-1").unwrap().ip);
    assert_carried(&cluster, "p1-1", &dst, "before");
    let pid = cluster.ztunnel_pid("node-2").expect("node-2's ztunnel");
    let base = open_fds(pid);
    set_nofile(pid, 256, 256);

    // Three sources, each up to its bound of concurrent handshakes, against both pods: more
    // descriptors than the data path may have under this limit.
    let node1 = cluster.node("node-1").unwrap().netns.clone();
    let floods = [
        Flood::start(&netns_of_pod(&cluster, "p1-1"), hbone_of(&cluster, "p2-1"), IN_FLIGHT),
        Flood::start(&netns_of_pod(&cluster, "p1-2"), hbone_of(&cluster, "p2-2"), IN_FLIGHT),
        Flood::start(&node1, hbone_of(&cluster, "p2-1"), IN_FLIGHT),
        Flood::start(&node1, hbone_of(&cluster, "p2-2"), IN_FLIGHT),
    ];
    wait_until("the data path to refuse for lack of descriptors", Duration::from_secs(60), || {
        cluster
            .admin_get("node-2", "/metrics")
            .ok()
            .and_then(|m| m.lines().find_map(|l| l.strip_prefix("palisade_fd_reserve_refusals_total ")?.parse().ok()))
            .is_some_and(|v: f64| v > 0.0)
    });
    // The control path still has descriptors: enrollment API and admin API answer.
    for _ in 0..5 {
        let listed = cluster.enroll_raw("node-2", &serde_json::json!({"op": "list"})).expect("enrollment list");
        assert_eq!(listed["pods"].as_array().map(Vec::len), Some(2), "{listed}");
        cluster.admin_get("node-2", "/config_dump").expect("admin API during the flood");
        std::thread::sleep(Duration::from_millis(200));
    }
    let peak_fds = open_fds(pid);
    let stats: Vec<_> = floods.into_iter().map(Flood::stop).collect();
    let refusals = metric(&cluster, "node-2", "palisade_fd_reserve_refusals_total");
    eprintln!(
        "limit 256 (open before: {base}, during: {peak_fds}); floods {stats:?}; {refusals} data-path connections \
         refused for the control path's reserve"
    );
    assert!(peak_fds < 256, "ztunnel reached its descriptor limit ({peak_fds} open)");
    // After the flood the data path works again, under the same low limit.
    assert_carried(&cluster, "p1-1", &dst, "after the flood");
}
