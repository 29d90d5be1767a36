//! Load generators for `cargo xtask bench`. Latencies go into HDR histograms (microseconds).
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::arg;

fn parsed<T: std::str::FromStr>(args: &[String], name: &str, default: Option<T>) -> T {
    arg(args, name).and_then(|v| v.parse().ok()).or(default).unwrap_or_else(|| panic!("{name} is required"))
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn percentiles(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.50),
        "p90_us": h.value_at_quantile(0.90),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
    })
}

/// Request/response at a fixed rate, open loop: request `k` of a connection is due at
/// `start + k * interval` whether or not the previous answer came back, and its latency is
/// counted from that due time. A stall therefore shows in every request it delays
/// (no coordinated omission).
pub fn latency(args: &[String]) -> Value {
    let to: SocketAddr = parsed(args, "--to", None);
    let rate: f64 = parsed(args, "--rate", Some(1000.0));
    let conns: usize = parsed(args, "--conns", Some(4));
    let duration = Duration::from_millis(parsed(args, "--duration-ms", Some(30_000)));
    let size: usize = parsed(args, "--size", Some(1024));
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    // Sleeps end up to 50 µs late by default (timer slack); that lateness would count as
    // latency, in the baseline as in the mesh.
    // SAFETY: prctl on the calling thread; threads spawned below inherit the slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64) };
    let start = Instant::now() + Duration::from_millis(200);
    let workers: Vec<_> = (0..conns)
        .map(|c| {
            std::thread::spawn(move || -> Result<(Histogram<u64>, u64), String> {
                let mut s = TcpStream::connect(to).map_err(|e| format!("connect {to}: {e}"))?;
                s.set_nodelay(true).ok();
                s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                let request = vec![b'x'; size];
                let mut response = vec![0u8; size];
                let mut h = histogram();
                let mut errors = 0u64;
                // Spread the connections' schedules evenly over one interval.
                let offset = interval.mul_f64(c as f64 / conns as f64);
                for k in 0u32.. {
                    let due = start + offset + interval * k;
                    if due.duration_since(start) >= duration {
                        break;
                    }
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    match s.write_all(&request).and_then(|_| s.read_exact(&mut response)) {
                        Ok(()) => {
                            let _ = h.record(Instant::now().duration_since(due).as_micros().max(1) as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
                Ok((h, errors))
            })
        })
        .collect();
    let mut total = histogram();
    let mut errors = 0;
    for w in workers {
        match w.join().expect("latency worker") {
            Ok((h, e)) => {
                total.add(&h).expect("histogram add");
                errors += e;
            }
            Err(e) => return json!({"ok": false, "error": e}),
        }
    }
    let mut out = percentiles(&total);
    out["ok"] = json!(errors == 0);
    out["errors"] = json!(errors);
    out["achieved_rps"] = json!(total.len() as f64 / duration.as_secs_f64());
    out
}

/// New connections one at a time: connect, exchange `size` bytes, close; as fast as possible.
pub fn connrate(args: &[String]) -> Value {
    let to: SocketAddr = parsed(args, "--to", None);
    let duration = Duration::from_millis(parsed(args, "--duration-ms", Some(10_000)));
    let size: usize = parsed(args, "--size", Some(100));
    let request = vec![b'y'; size];
    let mut response = vec![0u8; size];
    let (mut ok, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < duration {
        let exchanged = TcpStream::connect(to).and_then(|mut s| {
            s.set_nodelay(true)?;
            s.write_all(&request)?;
            s.read_exact(&mut response)
        });
        match exchanged {
            Ok(()) => ok += 1,
            Err(_) => errors += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    json!({"ok": errors == 0, "connections": ok, "errors": errors, "per_sec": ok as f64 / secs})
}

/// How long `connect()` takes to return, success or not (an EPERM from the kernel included).
pub fn connect_timing(args: &[String]) -> Value {
    let to: SocketAddr = parsed(args, "--to", None);
    let count: usize = parsed(args, "--count", Some(1000));
    let mut h = histogram();
    let (mut ok, mut failed, mut errno) = (0u64, 0u64, None);
    for _ in 0..count {
        let t = Instant::now();
        let r = TcpStream::connect(to);
        let _ = h.record(t.elapsed().as_nanos().div_ceil(1000).max(1) as u64);
        match r {
            Ok(_) => ok += 1,
            Err(e) => {
                failed += 1;
                errno = e.raw_os_error();
            }
        }
    }
    let mut out = percentiles(&h);
    out["succeeded"] = json!(ok);
    out["failed"] = json!(failed);
    out["errno"] = json!(errno);
    out
}
