//! `http-load`: the waypoint benchmark's HTTP/1.1 load generator.
//!
//! ```text
//! palisade-probe http-load --to IP:PORT --conns C --duration-ms D [--rate R] [--path /p]...
//! ```
//! C keep-alive connections send `GET` requests (cycling through the `--path`s) for D ms.
//! With `--rate`, open loop: request `k` of a connection is due at `start + k × C / R` and its
//! latency counts from that due time, so a stall shows in every request it delays. Without it,
//! closed loop: each connection sends its next request as soon as the answer is in, and the
//! figure is the request rate reached. A connection the server closes (or that fails) is
//! reopened and the failure counted. Prints `{"ok", "count", "errors", "rps", "statuses",
//! "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "body_bytes"}` (latencies in µs).
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::arg;

/// Longest response head accepted.
const MAX_HEAD: usize = 16 * 1024;

struct Outcome {
    latency: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    last_error: Option<String>,
    body_bytes: u64,
}

pub fn run(args: &[String]) -> Value {
    let to: SocketAddr = match arg(args, "--to").and_then(|a| a.parse().ok()) {
        Some(a) => a,
        None => return json!({"ok": false, "error": "--to IP:PORT is required"}),
    };
    let conns: usize = arg(args, "--conns").and_then(|c| c.parse().ok()).unwrap_or(4).max(1);
    let duration = Duration::from_millis(arg(args, "--duration-ms").and_then(|d| d.parse().ok()).unwrap_or(10_000));
    let rate: Option<f64> = arg(args, "--rate").and_then(|r| r.parse().ok()).filter(|r: &f64| *r > 0.0);
    let mut paths: Vec<String> = args.windows(2).filter(|w| w[0] == "--path").map(|w| w[1].clone()).collect();
    if paths.is_empty() {
        paths.push("/".into());
    }
    let requests: Vec<Vec<u8>> =
        paths.iter().map(|p| format!("GET {p} HTTP/1.1\r\nhost: {to}\r\n\r\n").into_bytes()).collect();
    // Sleeps end up to 50 µs late by default (timer slack), which would count as latency.
    // SAFETY: prctl on the calling thread; threads spawned below inherit the slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64) };
    let start = Instant::now() + Duration::from_millis(200);
    let interval = rate.map(|r| Duration::from_secs_f64(conns as f64 / r));
    let workers: Vec<_> = (0..conns)
        .map(|c| {
            let requests = requests.clone();
            // Spread the connections' schedules evenly over one interval.
            let offset = interval.map_or(Duration::ZERO, |i| i.mul_f64(c as f64 / conns as f64));
            std::thread::spawn(move || connection(to, &requests, start, offset, interval, duration, c))
        })
        .collect();
    let mut total =
        Outcome { latency: histogram(), statuses: BTreeMap::new(), errors: 0, last_error: None, body_bytes: 0 };
    for w in workers {
        let o = w.join().expect("http-load worker");
        total.latency.add(&o.latency).expect("histogram add");
        for (s, n) in o.statuses {
            *total.statuses.entry(s).or_default() += n;
        }
        total.errors += o.errors;
        total.last_error = o.last_error.or(total.last_error);
        total.body_bytes += o.body_bytes;
    }
    let h = &total.latency;
    let ok_statuses = total.statuses.iter().all(|(s, _)| (200..300).contains(s));
    json!({
        "ok": total.errors == 0 && ok_statuses && !h.is_empty(),
        "count": h.len(),
        "errors": total.errors,
        "last_error": total.last_error,
        "rps": h.len() as f64 / duration.as_secs_f64(),
        "statuses": total.statuses,
        "body_bytes": total.body_bytes,
        "p50_us": h.value_at_quantile(0.50),
        "p90_us": h.value_at_quantile(0.90),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
    })
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// One connection's requests until the duration is over (reconnecting as needed).
fn connection(
    to: SocketAddr,
    requests: &[Vec<u8>],
    start: Instant,
    offset: Duration,
    interval: Option<Duration>,
    duration: Duration,
    first: usize,
) -> Outcome {
    let mut out =
        Outcome { latency: histogram(), statuses: BTreeMap::new(), errors: 0, last_error: None, body_bytes: 0 };
    let mut conn: Option<BufReader<TcpStream>> = None;
    if let Some(wait) = start.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
    for k in 0u32.. {
        let due = match interval {
            Some(i) => start + offset + i * k,
            None => Instant::now(),
        };
        if due.duration_since(start) >= duration {
            break;
        }
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let request = &requests[(first + k as usize) % requests.len()];
        match exchange(&mut conn, to, request) {
            Ok((status, body)) => {
                let _ = out.latency.record(Instant::now().duration_since(due).as_micros().max(1) as u64);
                *out.statuses.entry(status).or_default() += 1;
                out.body_bytes += body as u64;
            }
            Err(e) => {
                conn = None;
                out.errors += 1;
                out.last_error = Some(e.to_string());
                // A refused or failing path must not turn into a busy loop.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    out
}

/// One request on the kept connection (opened when there is none): status and body length.
fn exchange(conn: &mut Option<BufReader<TcpStream>>, to: SocketAddr, request: &[u8]) -> std::io::Result<(u16, usize)> {
    if conn.is_none() {
        let stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        *conn = Some(BufReader::with_capacity(64 * 1024, stream));
    }
    let reader = conn.as_mut().expect("connection");
    reader.get_mut().write_all(request)?;
    let (mut status, mut length, mut close, mut size) = (None, 0usize, false, 0usize);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            return Err(std::io::Error::other("connection closed before a full response"));
        }
        size += n;
        if size > MAX_HEAD {
            return Err(std::io::Error::other("response head too large"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if status.is_none() {
            status = l.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok());
            if status.is_none() {
                return Err(std::io::Error::other(format!("bad status line {l:?}")));
            }
        } else if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse().map_err(|_| std::io::Error::other(format!("bad content-length {v:?}")))?;
            } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                close = true;
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                return Err(std::io::Error::other("chunked responses are not supported by http-load"));
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    if close {
        *conn = None;
    }
    Ok((status.expect("status parsed"), length))
}
