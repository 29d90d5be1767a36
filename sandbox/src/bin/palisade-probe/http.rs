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
use std::net::{SocketAddr, TcpListener, TcpStream};
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

/// The value of header `name` in `head` (the first if repeated).
pub(crate) fn header<'a>(head: &'a [String], name: &str) -> Option<&'a str> {
    head.iter()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

pub(crate) fn content_length(head: &[String]) -> usize {
    header(head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0)
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
    let to: SocketAddr = arg(args, "--to").and_then(|a| a.parse().ok()).expect("--to IP:PORT");
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
            Ok(Answer { status, body, .. }) => {
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

/// A response: its status, its body and its head (status line and header lines).
pub(crate) struct Answer {
    pub status: u16,
    pub body: String,
    pub head: Vec<String>,
}

/// One request on the kept connection (opened when there is none); the response. A response
/// that asks to close, or a connection the server closed, is not reused.
pub(crate) fn exchange(
    conn: &mut Option<BufReader<TcpStream>>,
    to: SocketAddr,
    request: &str,
    timeout: Duration,
) -> std::io::Result<Answer> {
    if conn.is_none() {
        let stream = TcpStream::connect_timeout(&to, timeout)?;
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
    if header(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
        *conn = None;
    }
    Ok(Answer { status, body: String::from_utf8_lossy(&body).into_owned(), head })
}
