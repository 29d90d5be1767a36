//! The local admin API that the `palisade` CLI talks to: one JSON request and one JSON
//! response per line, on a Unix socket. Authentication is the socket itself: it is created
//! with mode 0600 (owner only: the root user that runs the server) and every connection's
//! peer credentials (`SO_PEERCRED`) must be root or the server's own user; nothing listens on
//! the network for it.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use palisade_model::load::{self, Located};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::control::{ChangeError, Control, NodeStatus};
use crate::store::Revision;

/// Largest request line (a batch of files): the loader's per-file limit, a few times over.
const MAX_REQUEST_BYTES: usize = 64 << 20;

/// One input file as the CLI read it (its name is what errors point at).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Create or replace every resource of the files, all or none.
    Apply { files: Vec<SourceFile>, wait_secs: Option<u64> },
    /// Remove every resource the files name, all or none.
    Delete { files: Vec<SourceFile>, wait_secs: Option<u64> },
    /// Resources of one kind (all kinds when none).
    Get { kind: Option<String> },
    /// Node statuses and the store's.
    Nodes,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    /// Why the request failed; every problem, each with its file and line.
    pub errors: Vec<String>,
    pub revision: Option<Revision>,
    /// Set with `wait_secs`: nodes that had not ACKed the revision in time, or NACKed it.
    pub not_in_force: Vec<String>,
    pub resources: Vec<serde_json::Value>,
    pub nodes: Vec<NodeStatus>,
    pub store: Option<String>,
    pub store_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{socket}: {source}")]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{socket}: bad answer: {message}")]
    Protocol { socket: PathBuf, message: String },
}

/// Binds the socket, owner-only.
pub fn bind(socket: &Path) -> Result<UnixListener, AdminError> {
    let io = |source| AdminError::Io { socket: socket.to_path_buf(), source };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let _ = std::fs::remove_file(socket);
    // Created owner-only from the start: no window in which another user could connect.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(socket);
    unsafe { libc::umask(old) };
    bound.map_err(io)
}

pub async fn serve(listener: UnixListener, control: Arc<Control>) {
    let me = unsafe { libc::geteuid() };
    let mut accept = palisade_mesh::accept::Acceptor::new("admin", listener);
    loop {
        let (stream, _) = accept.accept().await;
        let allowed = stream.peer_cred().is_ok_and(|c| c.uid() == 0 || c.uid() == me);
        if !allowed {
            tracing::warn!(peer = ?stream.peer_cred().ok(), "admin connection from another user refused");
            continue;
        }
        tokio::spawn(connection(stream, control.clone()));
    }
}

async fn connection(stream: UnixStream, control: Arc<Control>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take_limited());
    let mut line = String::new();
    if lines.read_line(&mut line).await.is_err() {
        return;
    }
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => handle(&control, request).await,
        Err(e) => Response { errors: vec![format!("bad request: {e}")], ..Default::default() },
    };
    let mut text = serde_json::to_string(&response).unwrap_or_else(|e| format!("{{\"errors\":[\"{e}\"]}}"));
    text.push('\n');
    let _ = write.write_all(text.as_bytes()).await;
}

trait TakeLimited: tokio::io::AsyncRead + Sized {
    fn take_limited(self) -> tokio::io::Take<Self> {
        tokio::io::AsyncReadExt::take(self, MAX_REQUEST_BYTES as u64)
    }
}
impl<T: tokio::io::AsyncRead> TakeLimited for T {}

/// Sends one request to the server at `socket` (the CLI's side).
pub async fn call(socket: &Path, request: &Request) -> Result<Response, AdminError> {
    let io = |source| AdminError::Io { socket: socket.to_path_buf(), source };
    let mut stream = UnixStream::connect(socket).await.map_err(io)?;
    let mut text = serde_json::to_string(request).map_err(|e| io(std::io::Error::other(e)))?;
    text.push('\n');
    stream.write_all(text.as_bytes()).await.map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).await.map_err(io)?;
    serde_json::from_str(&answer)
        .map_err(|e| AdminError::Protocol { socket: socket.to_path_buf(), message: format!("{e}: {answer:.200}") })
}

fn error(message: impl Into<String>) -> Response {
    Response { errors: vec![message.into()], ..Default::default() }
}

async fn handle(control: &Control, request: Request) -> Response {
    match request {
        Request::Apply { files, wait_secs } => change(control, files, false, wait_secs).await,
        Request::Delete { files, wait_secs } => change(control, files, true, wait_secs).await,
        Request::Get { kind } => match control.store.list().await {
            Ok(listing) => Response {
                revision: Some(listing.revision),
                resources: listing
                    .resources
                    .iter()
                    .filter(|l| kind.as_deref().is_none_or(|k| l.resource.kind().eq_ignore_ascii_case(k)))
                    .filter_map(|l| serde_json::to_value(&l.resource).ok())
                    .collect(),
                ..Default::default()
            },
            Err(e) => error(e.to_string()),
        },
        Request::Nodes => Response {
            nodes: control.nodes(),
            store: Some(control.store.describe()),
            store_error: control.store_error(),
            revision: control.payload().borrow().as_ref().map(|p| p.revision),
            ..Default::default()
        },
    }
}

/// Apply or delete: parse every file, check the whole resulting set, write it in one batch.
async fn change(control: &Control, files: Vec<SourceFile>, delete: bool, wait_secs: Option<u64>) -> Response {
    let mut batch: Vec<Located> = Vec::new();
    let mut errors = Vec::new();
    for file in &files {
        match load::parse_str(Path::new(&file.name), &file.text) {
            Ok(resources) => batch.extend(resources),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        return Response { errors, ..Default::default() };
    }
    if batch.is_empty() {
        return error("no resources in the input");
    }
    let revision = match control.change(batch, delete).await {
        Ok(revision) => revision,
        Err(ChangeError::Invalid(errors)) => return Response { errors, ..Default::default() },
        Err(e) => return error(e.to_string()),
    };
    let not_in_force = match wait_secs {
        Some(secs) => wait_in_force(control, revision, Duration::from_secs(secs)).await,
        None => vec![],
    };
    Response { revision: Some(revision), not_in_force, ..Default::default() }
}

/// Waits until every connected node has ACKed `revision` or a later one; returns the nodes
/// that have not (each with why), when the time is up or every node has answered.
pub async fn wait_in_force(control: &Control, revision: Revision, timeout: Duration) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let pending = pending_nodes(&control.nodes(), revision);
        let answered_all = pending.iter().all(|(_, nacked)| *nacked);
        if answered_all || tokio::time::Instant::now() >= deadline {
            return pending.into_iter().map(|(why, _)| why).collect();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Nodes without `revision` in force: (why, whether they NACKed it, a final answer).
pub fn pending_nodes(nodes: &[NodeStatus], revision: Revision) -> Vec<(String, bool)> {
    let at_least =
        |v: &Option<String>| v.as_deref().and_then(|v| v.parse::<Revision>().ok()).is_some_and(|v| v >= revision);
    nodes
        .iter()
        .filter(|n| n.connected && !at_least(&n.version))
        .map(|n| match &n.last_nack {
            Some(nack) if nack.version.parse::<Revision>().is_ok_and(|v| v >= revision) => {
                (format!("{}: NACK: {}", n.node, nack.reason), true)
            }
            _ => (format!("{}: has {} in force", n.node, n.version.as_deref().unwrap_or("nothing")), false),
        })
        .collect()
}
