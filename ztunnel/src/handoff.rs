//! Upgrades without dropping connections: a new ztunnel takes the listening sockets of the
//! running one, which then only finishes the connections it carries.
//!
//! The running ztunnel listens on `handoff.sock` in its state directory. A new ztunnel
//! starting with the same state directory connects there first; if someone answers:
//!
//! 1. new → old: `{"op":"takeover","pid":N}`;
//! 2. old stops every accept loop, stops writing the kernel maps and reading kernel events,
//!    and sends a JSON header (which descriptors follow) then the descriptors themselves
//!    (SCM_RIGHTS): the node's admin, metrics, readiness and enrollment listeners, then each
//!    pod's listeners. Connections waiting in a listener's queue are not lost: the same
//!    socket is accepted from by the new process; the inbound sockmap already points at it;
//! 3. the new ztunnel adopts the pinned maps and links, enrolls the recorded pods over the
//!    sockets it received, and serves; the old one carries its established connections
//!    until they end (or `--upgrade-drain-secs`), then exits without detaching anything.
//!
//! TLS sessions cannot move between processes (no kernel TLS here), so established
//! connections stay with the process that made them; what moves is every new connection.
//! When nobody answers (first start, or the previous ztunnel was killed) the new ztunnel
//! starts on its own over the pinned state.
use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

use crate::pods::PodListeners;

/// Descriptors per message; the kernel allows at most 253 (SCM_MAX_FD).
const FDS_PER_MESSAGE: usize = 200;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The header is a few hundred bytes per pod; far more than 1,024 pods need.
const MAX_HEADER: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("hand-over socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("hand-over: {0}")]
    Protocol(String),
}

/// The node-wide listeners that move with an upgrade.
#[derive(Debug)]
pub struct NodeListeners {
    pub admin: OwnedFd,
    pub metrics: OwnedFd,
    pub ready: OwnedFd,
    pub enroll: OwnedFd,
}

impl NodeListeners {
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(NodeListeners {
            admin: self.admin.try_clone()?,
            metrics: self.metrics.try_clone()?,
            ready: self.ready.try_clone()?,
            enroll: self.enroll.try_clone()?,
        })
    }
}

/// What a successor receives.
#[derive(Debug)]
pub struct Inherited {
    pub node: NodeListeners,
    pub pods: HashMap<String, PodListeners>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    /// Descriptors that follow: 4 node listeners, then each pod's.
    fds: usize,
    pods: Vec<PodEntry>,
}

#[derive(Serialize, Deserialize)]
struct PodEntry {
    uid: String,
    /// Presence of the IPv6 outbound and HBONE listeners.
    optional: [bool; 2],
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HandoffError + '_ {
    move |source| HandoffError::Io { path: path.display().to_string(), source }
}

/// Asks the ztunnel running on `socket` for its listeners. `Ok(None)` when there is none
/// (nothing listens there: a stale socket of a killed process is removed).
pub fn take_over(socket: &Path) -> Result<Option<Inherited>, HandoffError> {
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            let _ = std::fs::remove_file(socket);
            return Ok(None);
        }
        Err(e) => return Err(io_err(socket)(e)),
    };
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_err(socket))?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io_err(socket))?;
    let request = serde_json::json!({"op": "takeover", "pid": std::process::id()});
    write_frame(&mut stream, request.to_string().as_bytes()).map_err(io_err(socket))?;
    let frame = read_frame(&mut stream).map_err(io_err(socket))?;
    let header: Header = serde_json::from_slice(&frame).map_err(|e| HandoffError::Protocol(format!("header: {e}")))?;
    let fds = receive_fds(&stream, header.fds).map_err(io_err(socket))?;
    let mut fds = fds.into_iter();
    let mut next = || fds.next().ok_or_else(|| HandoffError::Protocol("fewer descriptors than announced".into()));
    let node = NodeListeners { admin: next()?, metrics: next()?, ready: next()?, enroll: next()? };
    let mut pods = HashMap::new();
    for entry in header.pods {
        let listeners = PodListeners::from_fds(&mut fds, entry.optional)
            .ok_or_else(|| HandoffError::Protocol(format!("descriptors of pod {} missing", entry.uid)))?;
        pods.insert(entry.uid, listeners);
    }
    Ok(Some(Inherited { node, pods }))
}

/// Reads a successor's request on an accepted connection; returns its process id. Blocking:
/// run it on a blocking thread. Nothing is given away yet, so a bad request costs nothing.
pub fn read_request(stream: &mut UnixStream) -> Result<u32, HandoffError> {
    let path = Path::new("handoff.sock");
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_err(path))?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io_err(path))?;
    let frame = read_frame(stream).map_err(io_err(path))?;
    let request: serde_json::Value =
        serde_json::from_slice(&frame).map_err(|e| HandoffError::Protocol(format!("request: {e}")))?;
    if request["op"] != "takeover" {
        return Err(HandoffError::Protocol(format!("unknown request {request}")));
    }
    Ok(request["pid"].as_u64().unwrap_or(0) as u32)
}

/// Sends the listeners to the successor that asked on `stream`. Blocking.
pub fn send_listeners(
    mut stream: UnixStream,
    node: NodeListeners,
    pods: Vec<(String, PodListeners)>,
) -> Result<(), HandoffError> {
    let path = Path::new("handoff.sock");
    let mut fds = vec![node.admin, node.metrics, node.ready, node.enroll];
    let mut entries = Vec::new();
    for (uid, listeners) in pods {
        let (pod_fds, optional) = listeners.into_fds();
        fds.extend(pod_fds);
        entries.push(PodEntry { uid, optional });
    }
    let header = Header { fds: fds.len(), pods: entries };
    let text = serde_json::to_vec(&header).map_err(|e| HandoffError::Protocol(e.to_string()))?;
    write_frame(&mut stream, &text).map_err(io_err(path))?;
    send_fds(&stream, &fds).map_err(io_err(path))
}

/// A length-prefixed message. Exact reads never run into the next message, which matters:
/// a plain read that reached a message carrying descriptors would make the kernel drop them.
fn write_frame(stream: &mut UnixStream, body: &[u8]) -> std::io::Result<()> {
    stream.write_all(&(body.len() as u32).to_be_bytes())?;
    stream.write_all(body)
}

fn read_frame(stream: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_HEADER {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("message of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok(body)
}

fn send_fds(stream: &UnixStream, fds: &[OwnedFd]) -> std::io::Result<()> {
    for chunk in fds.chunks(FDS_PER_MESSAGE) {
        let raw: Vec<i32> = chunk.iter().map(AsRawFd::as_raw_fd).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let iov = [IoSlice::new(&[0u8])];
        sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)?;
    }
    Ok(())
}

fn receive_fds(stream: &UnixStream, count: usize) -> std::io::Result<Vec<OwnedFd>> {
    let mut fds = Vec::with_capacity(count);
    while fds.len() < count {
        let mut byte = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; FDS_PER_MESSAGE]);
        let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
        if msg.bytes == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "predecessor closed mid-way"));
        }
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: descriptors the kernel just installed in this process.
                fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
    }
    Ok(fds)
}
