//! A minimal HTTP/1.1 server and client for the waypoint's end-to-end tests: enough of the
//! protocol for routing, splits and authorization to be observed from real pods (request
//! line, headers, Content-Length bodies, keep-alive), nothing more.
//!
//! ```text
//! palisade-probe http-serve --port P --name NAME     answers every request 200 with body NAME
//! palisade-probe http-get --to IP:PORT [--path /p] [--count N] [--header 'k: v']... [--timeout-ms T]
//! ```
//! `http-get` sends N requests over keep-alive connections (a new one when the server closes)
//! and prints `{"statuses": {code: n}, "bodies": {body: n}, "errors": n, "last_error": …}`.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use serde_json::json;

use crate::arg;

/// Longest request or response head accepted.
const MAX_HEAD: usize = 16 * 1024;

pub fn serve(args: &[String]) {
    let port: u16 = arg(args, "--port").and_then(|p| p.parse().ok()).unwrap_or(8080);
    let name = arg(args, "--name").unwrap_or("probe").to_string();
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    println!("listening {port}");
    for stream in listener.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || {
            let _ = answer(stream, &name);
        });
    }
}

/// Reads a head (until the blank line, at most `MAX_HEAD` bytes); returns its lines, or None at
/// a clean end of stream. Shared by every HTTP mode of the probe.
pub(crate) fn read_head(reader: &mut impl BufRead) -> std::io::Result<Option<Vec<String>>> {
    let (mut lines, mut size) = (Vec::new(), 0);
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            return Ok(None);
        }
        size += n;
        if size > MAX_HEAD {
            return Err(std::io::Error::other("head too large"));
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            return Ok(Some(lines));
        }
        lines.push(line);
    }
}

fn content_length(head: &[String]) -> usize {
    head.iter()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

fn answer(stream: TcpStream, name: &str) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    while let Some(head) = read_head(&mut reader)? {
        let mut body = vec![0; content_length(&head)];
        reader.read_exact(&mut body)?;
        let response =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{name}", name.len());
        writer.write_all(response.as_bytes())?;
    }
    Ok(())
}

pub fn get(args: &[String]) -> serde_json::Value {
    let to = arg(args, "--to").expect("--to IP:PORT");
    let path = arg(args, "--path").unwrap_or("/");
    let count: usize = arg(args, "--count").and_then(|c| c.parse().ok()).unwrap_or(1);
    let timeout = Duration::from_millis(arg(args, "--timeout-ms").and_then(|t| t.parse().ok()).unwrap_or(5000));
    let headers: Vec<&str> = args.windows(2).filter(|w| w[0] == "--header").map(|w| w[1].as_str()).collect();
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: {to}\r\n");
    for h in &headers {
        request.push_str(&format!("{h}\r\n"));
    }
    request.push_str("\r\n");
    let (mut statuses, mut bodies) = (BTreeMap::<String, u64>::new(), BTreeMap::<String, u64>::new());
    let (mut errors, mut last_error) = (0u64, None::<String>);
    let mut conn: Option<BufReader<TcpStream>> = None;
    for _ in 0..count {
        match exchange(&mut conn, to, &request, timeout) {
            Ok((status, body)) => {
                *statuses.entry(status.to_string()).or_default() += 1;
                *bodies.entry(body).or_default() += 1;
            }
            Err(e) => {
                conn = None;
                errors += 1;
                last_error = Some(e.to_string());
            }
        }
    }
    json!({"statuses": statuses, "bodies": bodies, "errors": errors, "last_error": last_error})
}

/// One request on the kept connection (opened when there is none); the response's status and
/// body. A response that asks to close, or a connection the server closed, is not reused.
fn exchange(
    conn: &mut Option<BufReader<TcpStream>>,
    to: &str,
    request: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    if conn.is_none() {
        let addr = to.parse().map_err(std::io::Error::other)?;
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        *conn = Some(BufReader::new(stream));
    }
    let reader = conn.as_mut().expect("connection");
    reader.get_mut().write_all(request.as_bytes())?;
    let head = read_head(reader)?.ok_or_else(|| std::io::Error::other("connection closed before a response"))?;
    let status = head
        .first()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {:?}", head.first())))?;
    let mut body = vec![0; content_length(&head)];
    reader.read_exact(&mut body)?;
    let close = head.iter().any(|l| l.to_ascii_lowercase().replace(' ', "") == "connection:close");
    if close {
        *conn = None;
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
