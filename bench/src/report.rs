//! The report: a Markdown table (`report.md`, also printed) and the raw figures
//! (`report.json`), with the machine and the commit they were measured on.
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::stats::Figure;
use crate::{Options, Sizes};

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub commit: String,
    pub machine: Machine,
    pub sizes: Sizes,
    pub duration_s: f64,
    pub figures: Vec<Figure>,
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().trim().to_string())
        .unwrap_or_default()
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    Machine {
        cpu: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default(),
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        memory_gib: kib / (1024.0 * 1024.0),
        kernel: first_line("uname", &["-r"]),
    }
}

impl Report {
    pub fn new(options: &Options, figures: Vec<Figure>, took: Duration) -> Report {
        let commit = first_line("git", &["rev-parse", "--short", "HEAD"]);
        let dirty = !first_line("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
        Report {
            commit: if dirty { format!("{commit} (with uncommitted changes)") } else { commit },
            machine: machine(),
            sizes: options.sizes.clone(),
            duration_s: took.as_secs_f64(),
            figures,
        }
    }

    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let s = &self.sizes;
        let mut out = format!(
            "# Palisade benchmark report\n\nCommit `{}` on {} ({} cores, {:.0} GiB, Linux {}); {:.0} s.\n\n\
             Baseline: the same two pods, not enrolled (no capture, no ztunnel in the path). Mesh: both \
             enrolled — eBPF capture, two ztunnels, HBONE (HTTP/2 CONNECT over mutual TLS) between them. \
             Each figure is the median of {} repetition(s) [min–max]. Throughput {} s per run; latency \
             {} req/s of 1 KiB over {} connections for {} s, open loop; new connections for {} s; {} \
             timed connect() calls.\n",
            self.commit,
            m.cpu,
            m.cores,
            m.memory_gib,
            m.kernel,
            self.duration_s,
            s.reps,
            s.throughput_secs,
            s.latency_rate,
            s.latency_conns,
            s.latency_secs,
            s.connrate_secs,
            s.connect_count
        );
        let mut group = "";
        for f in &self.figures {
            if f.group != group {
                group = &f.group;
                out.push_str(&format!(
                    "\n## {group}\n\n| figure | unit | baseline | mesh | mesh / baseline | target |\n|---|---|---|---|---|---|\n"
                ));
            }
            out.push_str(&f.row());
            out.push('\n');
        }
        out
    }
}

/// Writes `report.md` and `report.json` into `dir`.
pub fn write(report: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("report.md"), report.markdown())?;
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(report)?)?;
    Ok(())
}
