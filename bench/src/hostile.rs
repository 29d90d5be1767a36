//! Hostile peers, measured: a legitimate client's p99 latency, answered requests and new
//! connections while a flood of TCP connections that send nothing or garbage runs against
//! the destination pod's HBONE port (15008), against the same figures without the flood in
//! the same run (the "baseline" column is the unflooded run); the flood's rate; and the
//! destination ztunnel's RSS before, during and after the flood.
use std::collections::VecDeque;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use palisade_sandbox::Cluster;
use serde_json::Value;

use crate::Options;
use crate::procfs::{Sampler, rss_mib};
use crate::stats::Figure;

const GROUP: &str = "hostile: handshake flood on 15008 (baseline column: the same run without the flood)";
const ECHO_PORT: u16 = 8080;
const HBONE_PORT: u16 = 15008;
/// Flooding threads per source namespace, and connections each keeps open.
const FLOOD_THREADS: usize = 4;
const FLOOD_HELD: usize = 100;
/// Time given to ztunnel after the flood before "after" is read (its memory trimmer runs
/// every 5 s once activity has dropped).
const SETTLE: Duration = Duration::from_secs(12);

struct Flood {
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
    started: Instant,
}

impl Flood {
    fn start(sources: &[String], target: SocketAddr) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicU64::new(0));
        let threads = sources
            .iter()
            .map(|netns| {
                let (netns, stop, opened) = (netns.clone(), stop.clone(), opened.clone());
                std::thread::spawn(move || {
                    // Threads created inside inherit the namespace.
                    let _ = palisade_sandbox::sys::in_netns(&netns, move || {
                        let workers: Vec<_> = (0..FLOOD_THREADS)
                            .map(|_| {
                                let (stop, opened) = (stop.clone(), opened.clone());
                                std::thread::spawn(move || flood(target, &stop, &opened))
                            })
                            .collect();
                        workers.into_iter().for_each(|w| drop(w.join()));
                    });
                })
            })
            .collect();
        Flood { stop, opened, threads, started: Instant::now() }
    }

    /// Stops the flood; returns its rate in connections per second.
    fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.into_iter().for_each(|t| drop(t.join()));
        self.opened.load(Ordering::Relaxed) as f64 / self.started.elapsed().as_secs_f64()
    }
}

fn flood(target: SocketAddr, stop: &AtomicBool, opened: &AtomicU64) {
    // The attacker would run on other machines; here it shares the 2 cores with the proxies
    // and the legitimate client. At the lowest priority its threads take the CPU they leave,
    // so the figures show what the flood does to ztunnel rather than to the scheduler. (The
    // kernel's work for the flood's packets is not lowered: that is part of the attack.)
    // SAFETY: setpriority on this thread (tid), no pointers.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    let mut held = VecDeque::with_capacity(FLOOD_HELD);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
            Ok(mut s) => {
                opened.fetch_add(1, Ordering::Relaxed);
                if n.is_multiple_of(4) {
                    let _ = s.write_all(&[0x5a; 512]);
                }
                if held.len() == FLOOD_HELD {
                    held.pop_front();
                }
                held.push_back(s);
            }
            // Reset before connect() returned: ztunnel closed it over a bound.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                opened.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn probe(cluster: &Cluster, options: &Options, args: &[String]) -> Result<Value> {
    let out = cluster.command("p1-1", &options.bins.probe)?.args(args).stderr(Stdio::inherit()).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("probe {}: {text}", args.join(" ")))
}

/// One legitimate run: (p99 µs, requests answered %, new connections that succeeded %).
fn legitimate(cluster: &Cluster, options: &Options, echo: &str) -> Result<(f64, f64, f64)> {
    let s = &options.sizes;
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let lat = probe(
        cluster,
        options,
        &strings(&[
            "latency",
            "--to",
            echo,
            "--rate",
            &s.latency_rate.to_string(),
            "--conns",
            &s.latency_conns.to_string(),
            "--duration-ms",
            &(s.latency_secs * 1000).to_string(),
            "--size",
            "1024",
        ]),
    )?;
    if lat.get("p99_us").is_none() {
        bail!("latency run failed: {lat}");
    }
    let answered = lat["count"].as_f64().unwrap_or(0.0);
    let failed = lat["errors"].as_f64().unwrap_or(0.0);
    let cr = probe(
        cluster,
        options,
        &strings(&["connrate", "--to", echo, "--duration-ms", &(s.connrate_secs * 1000).to_string(), "--size", "100"]),
    )?;
    let (ok, errors) = (cr["connections"].as_f64().unwrap_or(0.0), cr["errors"].as_f64().unwrap_or(0.0));
    let percent = |ok: f64, bad: f64| if ok + bad > 0.0 { 100.0 * ok / (ok + bad) } else { f64::NAN };
    Ok((lat["p99_us"].as_f64().unwrap_or(f64::NAN), percent(answered, failed), percent(ok, errors)))
}

fn metric(cluster: &Cluster, node: &str, name: &str) -> f64 {
    let text = cluster.admin_get(node, "/metrics").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// The hostile section.
pub fn hostile(options: &Options) -> Result<Vec<Figure>> {
    let cluster = crate::measure::cluster(options, 2, 2, true, "")?;
    let _server = crate::measure::echo_server(&cluster, options, "p2-1", ECHO_PORT)?;
    let dst_ip = cluster.pod("p2-1")?.ip.clone();
    let echo = format!("{dst_ip}:{ECHO_PORT}");
    let target = SocketAddr::new(dst_ip.parse()?, HBONE_PORT);
    let pid = cluster.ztunnel_pid("node-2").context("node-2's ztunnel")?;
    let sources = [cluster.pod("p1-2")?.netns.clone(), cluster.node("node-1")?.netns.clone()];

    let mut samples: [Vec<(f64, f64, f64)>; 2] = Default::default();
    let (mut before, mut during, mut after, mut rates) = (vec![], vec![], vec![], vec![]);
    for rep in 0..options.sizes.reps {
        eprintln!("bench: hostile, repetition {}/{}", rep + 1, options.sizes.reps);
        samples[0].push(legitimate(&cluster, options, &echo)?);
        std::thread::sleep(Duration::from_secs(1));
        before.push(rss_mib(pid));
        let flood = Flood::start(&sources, target);
        let sampler = Sampler::start(vec![pid]);
        std::thread::sleep(Duration::from_millis(500));
        let flooded = legitimate(&cluster, options, &echo);
        let used = sampler.finish();
        rates.push(flood.stop());
        samples[1].push(flooded?);
        during.push(used.peak_rss_mib);
        std::thread::sleep(SETTLE);
        after.push(rss_mib(pid));
    }
    let pick = |i: usize, f: fn(&(f64, f64, f64)) -> f64| samples[i].iter().map(f).collect::<Vec<_>>();
    let refused = metric(&cluster, "node-2", "palisade_hbone_handshakes_refused_total");
    Ok(vec![
        Figure::compared(
            GROUP,
            "legitimate p99 latency, 1 KiB at a fixed rate",
            "µs",
            &pick(0, |s| s.0),
            &pick(1, |s| s.0),
        ),
        Figure::compared(GROUP, "legitimate requests answered", "%", &pick(0, |s| s.1), &pick(1, |s| s.1))
            .target("100"),
        Figure::compared(GROUP, "legitimate new connections that succeeded", "%", &pick(0, |s| s.2), &pick(1, |s| s.2))
            .target("100"),
        Figure::mesh_only(GROUP, "flood: connections per second against 15008", "conn/s", &rates),
        Figure::mesh_only(GROUP, "flood: handshakes refused over the bounds (whole run)", "conns", &[refused]),
        Figure::mesh_only(GROUP, "destination ztunnel RSS before the flood", "MiB", &before),
        Figure::mesh_only(GROUP, "destination ztunnel RSS during the flood (peak)", "MiB", &during),
        Figure::mesh_only(GROUP, "destination ztunnel RSS after the flood", "MiB", &after)
            .target("within a few MiB of before"),
    ])
}
