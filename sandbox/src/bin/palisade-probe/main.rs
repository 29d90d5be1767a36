//! `palisade-probe`: a tiny real TCP client and server for the sandbox, run inside pods by
//! tests, the demo and benchmarks. Every result is one JSON line on stdout.
//!
//! ```text
//! palisade-probe serve --port 8080 [--log FILE]      echo server; logs each connection
//! palisade-probe connect --to IP:PORT [--bytes N] [--timeout-ms T] [--pace-ms P] [--parallel C [--together]]
//! palisade-probe latency --to IP:PORT --rate R --conns C --duration-ms D [--size S]
//! palisade-probe connrate --to IP:PORT --duration-ms D [--size S]
//! palisade-probe connect-timing --to IP:PORT --count N
//! palisade-probe http-serve … | http-get …            HTTP/1.1 (see `http`)
//! palisade-probe http-load --to IP:PORT --conns C --duration-ms D [--rate R] [--path P]…  (see `http_load`)
//! palisade-probe http-serve-x … | http-many … | slowloris …  resilience tests (see `http_more`)
//! palisade-probe h2-serve … | h2-get …                 gRPC-shaped HTTP/2 (see `grpc`)
//! ```
//! The last three are the benchmark's load generators (see `load.rs`).
//! `connect` sends N bytes of a deterministic pattern (one 64 KiB chunk every P ms when
//! paced), half-closes, reads the echo to EOF and checks it byte for byte. With `--parallel C`
//! it opens C such connections at once and reports a summary; `--together` also holds every
//! connection open, after its first echoed bytes, until all C have echoed (so that all C are
//! live end to end at the same moment), and reports whether that moment came.
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

mod grpc;
mod http;
mod http_load;
mod http_more;
mod load;

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

pub(crate) fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

fn main() {
    // Many parallel connections need more descriptors than the usual soft limit.
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(&args),
        Some("connect") => connect(&args),
        Some("latency") => println!("{}", load::latency(&args)),
        Some("connrate") => println!("{}", load::connrate(&args)),
        Some("connect-timing") => println!("{}", load::connect_timing(&args)),
        Some("http-serve") => http::serve(&args),
        Some("http-get") => println!("{}", http::get(&args)),
        Some("http-load") => println!("{}", http_load::run(&args)),
        Some("http-serve-x") => http_more::serve(&args),
        Some("http-many") => println!("{}", http_more::many(&args)),
        Some("slowloris") => println!("{}", http_more::slowloris(&args)),
        Some("h2-serve") => grpc::serve(&args),
        Some("h2-get") => println!("{}", grpc::get(&args)),
        _ => {
            eprintln!(
                "usage: palisade-probe serve --port P [--log FILE] | connect --to ADDR [--bytes N] [--timeout-ms T]"
            );
            std::process::exit(2);
        }
    }
}

fn serve(args: &[String]) {
    let port: u16 = arg(args, "--port").and_then(|p| p.parse().ok()).expect("--port");
    let log = arg(args, "--log").map(str::to_string);
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    println!("{}", json!({"listening": port}));
    std::io::stdout().flush().ok();
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let log = log.clone();
        std::thread::spawn(move || echo(stream, log));
    }
}

fn echo(mut stream: TcpStream, log: Option<String>) {
    let peer = stream.peer_addr().ok();
    let local = stream.local_addr().ok();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n as u64;
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
    if let Some(path) = log {
        let line = json!({"peer": peer, "local": local, "bytes": total}).to_string() + "\n";
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

fn connect(args: &[String]) {
    let to: SocketAddr = arg(args, "--to").and_then(|a| a.parse().ok()).expect("--to IP:PORT");
    let bytes: u64 = arg(args, "--bytes").and_then(|b| b.parse().ok()).unwrap_or(0);
    let timeout = Duration::from_millis(arg(args, "--timeout-ms").and_then(|t| t.parse().ok()).unwrap_or(5000));
    let pace = Duration::from_millis(arg(args, "--pace-ms").and_then(|t| t.parse().ok()).unwrap_or(0));
    let parallel: usize = arg(args, "--parallel").and_then(|n| n.parse().ok()).unwrap_or(1);
    if parallel <= 1 {
        println!("{}", one_connection(to, bytes, timeout, pace, None));
        return;
    }
    let together = args.iter().any(|a| a == "--together").then(|| Arc::new(Rendezvous::new(parallel, timeout)));
    // Everyone connects at the same moment.
    let barrier = Arc::new(std::sync::Barrier::new(parallel));
    let workers: Vec<_> = (0..parallel)
        .map(|_| {
            let (barrier, together) = (barrier.clone(), together.clone());
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || {
                    barrier.wait();
                    one_connection(to, bytes, timeout, pace, together)
                })
                .expect("spawn connection thread")
        })
        .collect();
    let results: Vec<serde_json::Value> = workers.into_iter().map(|w| w.join().expect("connection thread")).collect();
    let verified = results.iter().filter(|r| r["verified"] == true).count();
    let failures: Vec<&serde_json::Value> = results.iter().filter(|r| r["verified"] != true).take(5).collect();
    let all_live_at_once = together.map(|t| t.completed());
    println!(
        "{}",
        json!({"ok": verified == parallel, "count": parallel, "verified_count": verified, "failures": failures,
            "all_live_at_once": all_live_at_once})
    );
}

/// Where `--together` connections wait for each other (bounded by the timeout, so that one
/// failed connection cannot hang the others).
struct Rendezvous {
    expected: usize,
    arrived: Mutex<usize>,
    all_here: Condvar,
    timeout: Duration,
}

impl Rendezvous {
    fn new(expected: usize, timeout: Duration) -> Self {
        Rendezvous { expected, arrived: Mutex::new(0), all_here: Condvar::new(), timeout }
    }

    fn arrive_and_wait(&self) {
        let mut arrived = self.arrived.lock().expect("rendezvous");
        *arrived += 1;
        self.all_here.notify_all();
        let _ = self.all_here.wait_timeout_while(arrived, self.timeout, |n| *n < self.expected);
    }

    fn completed(&self) -> bool {
        *self.arrived.lock().expect("rendezvous") == self.expected
    }
}

fn one_connection(
    to: SocketAddr,
    bytes: u64,
    timeout: Duration,
    pace: Duration,
    together: Option<Arc<Rendezvous>>,
) -> serde_json::Value {
    let start = Instant::now();
    let stream = match TcpStream::connect_timeout(&to, timeout) {
        Ok(s) => s,
        Err(e) => {
            return json!({"ok": false, "error": e.to_string(), "errno": e.raw_os_error(),
                "connect_us": start.elapsed().as_micros() as u64});
        }
    };
    let connect_us = start.elapsed().as_micros() as u64;
    let local = stream.local_addr().ok();
    stream.set_read_timeout(Some(timeout.max(Duration::from_secs(60)))).ok();
    let mut writer = stream.try_clone().expect("clone socket");
    // With a rendezvous, the sender stops after its first chunk until everyone has arrived.
    let (go, gate) = std::sync::mpsc::channel::<()>();
    let gated = together.is_some();
    let sender = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(buf.len() as u64) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(sent + i as u64);
            }
            writer.write_all(&buf[..n])?;
            if gated && sent == 0 {
                let _ = gate.recv();
            }
            sent += n as u64;
            if !pace.is_zero() {
                std::thread::sleep(pace);
            }
        }
        writer.shutdown(Shutdown::Write)?;
        Ok(sent)
    });
    let mut reader = stream;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut received, mut mismatch_at) = (0u64, None);
    let mut together = together;
    let read_result = loop {
        let read = reader.read(&mut buf);
        if let Some(rendezvous) = together.take() {
            // The first echoed bytes (or the failure) prove this connection's path is up.
            rendezvous.arrive_and_wait();
            let _ = go.send(());
        }
        match read {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if mismatch_at.is_none()
                    && let Some(i) = buf[..n].iter().enumerate().position(|(i, b)| *b != pattern(received + i as u64))
                {
                    mismatch_at = Some(received + i as u64);
                }
                received += n as u64;
            }
            Err(e) => break Err(e),
        }
    };
    let sent = sender.join().expect("sender thread");
    let ok = read_result.is_ok() && sent.is_ok();
    let error = read_result.err().or(sent.as_ref().err().map(|e| std::io::Error::new(e.kind(), e.to_string())));
    json!({
        "ok": ok,
        "error": error.as_ref().map(|e| e.to_string()),
        "local": local,
        "peer": to,
        "sent": sent.unwrap_or(0),
        "received": received,
        "verified": ok && mismatch_at.is_none() && received == bytes,
        "mismatch_at": mismatch_at,
        "connect_us": connect_us,
        "total_ms": start.elapsed().as_secs_f64() * 1e3,
    })
}
