//! The node-local enrollment API, the role a CNI plugin plays in Kubernetes: a Unix socket
//! speaking one JSON request per line, one JSON reply per line.
//!
//! ```text
//! {"op":"enroll","pod":{"uid":"…","name":"…","netns":"/run/netns/…","cgroup":"/sys/fs/cgroup/…","ips":["10.244.1.10"]}}
//! {"op":"remove","uid":"…"}
//! {"op":"list"}
//! ```
//! Replies: `{"ok":true}` (with `"pods":[…]` for list) or `{"ok":false,"error":"…"}`.
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::pods::{PodSpec, Pods};

#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Enroll { pod: PodSpec },
    Remove { uid: String },
    List,
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pods: Option<Vec<PodSpec>>,
}

/// Binds the socket, replacing a stale one left by a previous run.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    UnixListener::bind(path)
}

pub async fn serve(listener: UnixListener, pods: Arc<Pods>) {
    let mut acceptor = palisade_mesh::accept::Acceptor::new("enrollment", listener);
    loop {
        let (stream, _) = acceptor.accept().await;
        tokio::spawn(handle(stream, pods.clone()));
    }
}

/// Longest request line (without its newline). A longer one is answered with an error and
/// the connection closed: `lines()` would have buffered a line of any length.
pub const MAX_LINE: usize = 64 << 10;
/// Longest wait for a request line to be complete (and for a reply to be taken); a client
/// that is slower is disconnected, so idle connections cannot pile up.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Enrollment connections served at once; one more is answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 64;

/// The slots of the process's enrollment connections.
static CONNECTIONS: Semaphore = Semaphore::const_new(MAX_CONNECTIONS);

/// Why a connection stopped being read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("request line longer than {max} bytes")]
    TooLong { max: usize },
    #[error("no complete request line within {}s", .0.as_secs_f64())]
    Idle(Duration),
    #[error("reading the request: {0}")]
    Io(#[from] std::io::Error),
}

/// Bounds of one enrollment connection.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_line: usize,
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_line: MAX_LINE, idle: IDLE_TIMEOUT }
    }
}

/// Reads one request: the JSON object of a line (without its line ending).
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))
}

/// Reads one line into `buf`, without its `\n` (or `\r\n`), never holding more than the
/// `max` bytes allowed before the `\n`. `Ok(false)` when the stream ended before a byte of a
/// new line; a last line without `\n` counts.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
    buf: &mut Vec<u8>,
) -> Result<bool, LineError> {
    buf.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(!buf.is_empty());
        }
        let newline = available.iter().position(|&b| b == b'\n');
        let take = newline.unwrap_or(available.len());
        if buf.len() + take > max {
            return Err(LineError::TooLong { max });
        }
        buf.extend_from_slice(&available[..take]);
        reader.consume(take + usize::from(newline.is_some()));
        if newline.is_some() {
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(true);
        }
    }
}

async fn handle(stream: UnixStream, pods: Arc<Pods>) {
    let answer = |request| {
        let pods = pods.clone();
        async move { answer(&pods, request).await }
    };
    serve_lines(stream, &Limits::default(), &CONNECTIONS, answer).await;
}

/// Serves one connection: one request per line, one reply per line, within `limits` and
/// while a slot of `slots` is free. A line that is too long, too slow or not a request
/// gets an error reply; the first two also end the connection.
pub async fn serve_lines<F, Fut>(stream: UnixStream, limits: &Limits, slots: &Semaphore, answer: F)
where
    F: Fn(Request) -> Fut,
    Fut: Future<Output = Reply>,
{
    let (read, mut write) = stream.into_split();
    let mut send = async |reply: Reply| {
        let mut out = serde_json::to_vec(&reply).expect("reply serializes");
        out.push(b'\n');
        matches!(tokio::time::timeout(limits.idle, write.write_all(&out)).await, Ok(Ok(())))
    };
    let Ok(_slot) = slots.try_acquire() else {
        tracing::warn!(limit = MAX_CONNECTIONS, "enrollment connection refused: too many at once");
        let error = "too many enrollment connections at once; retry later".to_string();
        send(Reply { error: Some(error), ..Default::default() }).await;
        return;
    };
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        let read = tokio::time::timeout(limits.idle, read_line(&mut reader, limits.max_line, &mut line)).await;
        let error = match read.unwrap_or(Err(LineError::Idle(limits.idle))) {
            Ok(false) => return,
            Ok(true) => {
                let reply = match parse_request(&line) {
                    Ok(request) => answer(request).await,
                    Err(error) => Reply { error: Some(error), ..Default::default() },
                };
                if send(reply).await {
                    continue;
                }
                return;
            }
            Err(LineError::Io(_)) => return,
            Err(e) => e,
        };
        tracing::warn!(error = %error, "enrollment connection closed");
        send(Reply { error: Some(error.to_string()), ..Default::default() }).await;
        return;
    }
}

async fn answer(pods: &Pods, request: Request) -> Reply {
    match request {
        Request::Enroll { pod } => match pods.enroll(pod).await {
            Ok(()) => Reply { ok: true, ..Default::default() },
            Err(e) => {
                let message = error_chain(&e);
                tracing::warn!(error = %message, "enrollment failed");
                Reply { error: Some(message), ..Default::default() }
            }
        },
        Request::Remove { uid } => {
            if pods.remove(&uid) {
                Reply { ok: true, ..Default::default() }
            } else {
                Reply { error: Some(format!("pod {uid} is not enrolled")), ..Default::default() }
            }
        }
        Request::List => Reply { ok: true, pods: Some(pods.list()), ..Default::default() },
    }
}

/// An error and all its sources, on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests;
