//! HTTP/1.1 modes for the waypoint's resilience tests: a server that can be slow or fail, a
//! client with parallel connections and a per-request key header, and slow clients.
//!
//! ```text
//! palisade-probe http-serve-x --port P --name NAME [--delay-ms D] [--status S] [--log FILE]
//! palisade-probe http-many --to IP:PORT [--path /p] [--count N] [--parallel C] [--header 'k: v']...
//!                          [--key-header NAME --keys K]  [--timeout-ms T]
//! palisade-probe slowloris --to IP:PORT --conns N --hold-ms T [--interval-ms I]
//! ```
//! `http-serve-x` answers every request with status S (200) and body NAME after D ms, and
//! appends one line per request to FILE. `http-many` sends N requests split over C keep-alive
//! connections; with `--key-header`, request i carries `NAME: key-(i mod K)`, and the report
//! maps each key to the bodies that answered it. `slowloris` opens N connections that send a
//! request head one byte every I ms (never finishing it) for T ms, and reports how many the
//! server closed.
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::arg;
use crate::http::{Answer, exchange, header, read_head};

fn num<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    arg(args, name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn serve(args: &[String]) {
    let port: u16 = num(args, "--port", 8080);
    let name = arg(args, "--name").unwrap_or("probe").to_string();
    let delay = Duration::from_millis(num(args, "--delay-ms", 0));
    let status: u16 = num(args, "--status", 200);
    let log = arg(args, "--log").map(str::to_string);
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    println!("listening {port}");
    std::io::stdout().flush().ok();
    for stream in listener.incoming().flatten() {
        let (name, log) = (name.clone(), log.clone());
        std::thread::spawn(move || {
            let _ = answer(stream, &name, delay, status, log.as_deref());
        });
    }
}

fn answer(stream: TcpStream, name: &str, delay: Duration, status: u16, log: Option<&str>) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    while let Some(head) = read_head(&mut reader)? {
        let mut body = vec![0; header(&head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0)];
        reader.read_exact(&mut body)?;
        if let Some(path) = log
            && let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path)
        {
            let _ = writeln!(f, "{}", head.first().map(String::as_str).unwrap_or_default());
        }
        std::thread::sleep(delay);
        let response =
            format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{name}", name.len());
        writer.write_all(response.as_bytes())?;
    }
    Ok(())
}

#[derive(Default)]
struct Tally {
    statuses: BTreeMap<String, u64>,
    bodies: BTreeMap<String, u64>,
    overflow: BTreeMap<String, u64>,
    keys: BTreeMap<String, BTreeSet<String>>,
    errors: u64,
    last_error: Option<String>,
}

pub fn many(args: &[String]) -> serde_json::Value {
    let to: SocketAddr = arg(args, "--to").and_then(|a| a.parse().ok()).expect("--to IP:PORT");
    let path = arg(args, "--path").unwrap_or("/").to_string();
    let count: usize = num(args, "--count", 1);
    let parallel: usize = num(args, "--parallel", 1).max(1);
    let timeout = Duration::from_millis(num(args, "--timeout-ms", 5000));
    let key_header = arg(args, "--key-header").map(str::to_string);
    let keys: usize = num(args, "--keys", 1).max(1);
    let headers: Vec<String> = args.windows(2).filter(|w| w[0] == "--header").map(|w| w[1].clone()).collect();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let workers: Vec<_> = (0..parallel)
        .map(|w| {
            let (tally, path, headers, key_header) = (tally.clone(), path.clone(), headers.clone(), key_header.clone());
            std::thread::spawn(move || {
                let mut conn = None;
                for i in (w..count).step_by(parallel) {
                    let key = key_header.as_ref().map(|h| (h, format!("key-{}", i % keys)));
                    let mut request = format!("GET {path} HTTP/1.1\r\nhost: {to}\r\n");
                    for h in headers
                        .iter()
                        .map(String::as_str)
                        .chain(key.as_ref().map(|(h, k)| format!("{h}: {k}")).as_deref())
                    {
                        request.push_str(h);
                        request.push_str("\r\n");
                    }
                    request.push_str("\r\n");
                    let result = exchange(&mut conn, to, &request, timeout);
                    let mut t = tally.lock().expect("tally");
                    match result {
                        Ok(Answer { status, body, head }) => {
                            *t.statuses.entry(status.to_string()).or_default() += 1;
                            if let Some(o) = header(&head, "x-palisade-overflow") {
                                *t.overflow.entry(o.to_string()).or_default() += 1;
                            }
                            if let Some((_, k)) = key {
                                t.keys.entry(k).or_default().insert(body.clone());
                            }
                            *t.bodies.entry(body).or_default() += 1;
                        }
                        Err(e) => {
                            conn = None;
                            t.errors += 1;
                            t.last_error = Some(e.to_string());
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("client thread");
    }
    let t = tally.lock().expect("tally");
    json!({"statuses": t.statuses, "bodies": t.bodies, "overflow": t.overflow, "keys": t.keys,
        "errors": t.errors, "last_error": t.last_error})
}

pub fn slowloris(args: &[String]) -> serde_json::Value {
    let to: SocketAddr = arg(args, "--to").and_then(|a| a.parse().ok()).expect("--to IP:PORT");
    let conns: usize = num(args, "--conns", 10);
    let hold = Duration::from_millis(num(args, "--hold-ms", 5000));
    let interval = Duration::from_millis(num(args, "--interval-ms", 200));
    // An endless head: a header whose value never ends.
    let head = format!("GET / HTTP/1.1\r\nhost: {to}\r\nx-slow: ");
    let end = Instant::now() + hold;
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            let head = head.clone();
            std::thread::Builder::new()
                .stack_size(128 << 10)
                .spawn(move || -> &'static str {
                    let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else { return "refused" };
                    for b in head.bytes().chain(std::iter::repeat(b'a')) {
                        if Instant::now() >= end {
                            return "open";
                        }
                        if s.write_all(&[b]).is_err() {
                            return "closed";
                        }
                        std::thread::sleep(interval);
                    }
                    "open"
                })
                .expect("spawn slow client")
        })
        .collect();
    let mut outcomes = BTreeMap::<&str, u64>::new();
    for w in workers {
        *outcomes.entry(w.join().unwrap_or("panicked")).or_default() += 1;
    }
    json!({"outcomes": outcomes})
}
