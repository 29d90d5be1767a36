//! CPU time, resident memory and BPF map memory of a process, from /proc.
use std::time::{Duration, Instant};

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the state field.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

/// Resident set size, MiB.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Memory of every BPF map the process holds (the kernel's `memlock` accounting), MiB.
pub fn bpf_map_mib(pid: u32) -> f64 {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0.0 };
    let mut bytes = 0u64;
    for fd in fds.flatten() {
        let is_map = std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == "anon_inode:bpf-map");
        if !is_map {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy()))
            .unwrap_or_default();
        bytes += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    bytes as f64 / (1024.0 * 1024.0)
}

/// Samples processes while a measurement runs: CPU used and peak RSS.
pub struct Sampler {
    pids: Vec<u32>,
    cpu_start: f64,
    started: Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    peak: std::thread::JoinHandle<f64>,
}

pub struct Sampled {
    /// CPU used by all processes together, in vCPU (seconds of CPU per second).
    pub vcpu: f64,
    /// Largest RSS of any one process, MiB.
    pub peak_rss_mib: f64,
    pub wall: Duration,
}

impl Sampler {
    pub fn start(pids: Vec<u32>) -> Sampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let peak = {
            let (pids, stop) = (pids.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut peak = 0f64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for p in &pids {
                        peak = peak.max(rss_mib(*p));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                peak
            })
        };
        let cpu_start = pids.iter().map(|p| cpu_seconds(*p)).sum();
        Sampler { pids, cpu_start, started: Instant::now(), stop, peak }
    }

    pub fn finish(self) -> Sampled {
        let wall = self.started.elapsed();
        let cpu: f64 = self.pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - self.cpu_start;
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let peak_rss_mib = self.peak.join().unwrap_or(0.0);
        Sampled { vcpu: cpu / wall.as_secs_f64(), peak_rss_mib, wall }
    }
}
