//! The node-local enrollment API, the role a CNI plugin plays in Kubernetes: a Unix socket
//! speaking one JSON request per line, one JSON reply per line.
//!
//! ```text
//! {"op":"enroll","pod":{"uid":"…","name":"…","netns":"/run/netns/…","cgroup":"/sys/fs/cgroup/…","ips":["10.244.1.10"]}}
//! {"op":"remove","uid":"…"}
//! {"op":"list"}
//! ```
//! Replies: `{"ok":true}` (with `"pods":[…]` for list) or `{"ok":false,"error":"…"}`.
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

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
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream, pods.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "enrollment accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn handle(stream: UnixStream, pods: Arc<Pods>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply { error: Some(format!("bad request: {e}")), ..Default::default() },
            Ok(Request::Enroll { pod }) => match pods.enroll(pod).await {
                Ok(()) => Reply { ok: true, ..Default::default() },
                Err(e) => {
                    let message = error_chain(&e);
                    tracing::warn!(error = %message, "enrollment failed");
                    Reply { error: Some(message), ..Default::default() }
                }
            },
            Ok(Request::Remove { uid }) => {
                if pods.remove(&uid) {
                    Reply { ok: true, ..Default::default() }
                } else {
                    Reply { error: Some(format!("pod {uid} is not enrolled")), ..Default::default() }
                }
            }
            Ok(Request::List) => Reply { ok: true, pods: Some(pods.list()), ..Default::default() },
        };
        let mut out = serde_json::to_vec(&reply).expect("reply serializes");
        out.push(b'\n');
        if write.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// An error and all its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
