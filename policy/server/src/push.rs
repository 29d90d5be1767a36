//! The snapshot stream (`palisade.v1.SnapshotDiscovery`), xDS-style: the server sends a
//! response (version, nonce, content) and waits for the request that answers its nonce — an
//! ACK (`version_info` = the version sent) or a NACK (`error_detail`, and `version_info` = the
//! version still in force) — before it sends the next. A NACKed version is not sent again;
//! the next change of the store is.
//!
//! The first response of a stream carries the whole resource set; every later one only what
//! differs from the set of the last response the node ACKed on this stream (a NACKed one
//! leaves the node where it was, so the next delta is computed from there again).
use std::pin::Pin;
use std::sync::Arc;

use palisade_api::v1::snapshot_discovery_server::SnapshotDiscovery;
use palisade_api::v1::{Document, SnapshotRequest, SnapshotResponse};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::control::{Control, Nack, Session, now_ms};
use crate::payload::{Delta, Documents};
use crate::tls::Client;
use palisade_model::compile::Identities;

pub struct Push {
    pub control: Arc<Control>,
}

type Responses = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SnapshotDiscovery for Push {
    type StreamStream = Responses;

    async fn stream(&self, request: Request<Streaming<SnapshotRequest>>) -> Result<Response<Responses>, Status> {
        let client = request
            .extensions()
            .get::<Client>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no node credential"))?;
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("no request"))?;
        let node = match client {
            Client::Node(node) if first.node.is_empty() || first.node == node => node,
            Client::Node(node) => {
                return Err(Status::permission_denied(format!(
                    "the credential is node {node:?}, the request names {:?}",
                    first.node
                )));
            }
            Client::Workload(id) => waypoint_client(&self.control, &id, &first.node)?,
        };
        let (tx, rx) = mpsc::channel(1);
        let control = self.control.clone();
        tokio::spawn(async move {
            tracing::info!(%node, version = %first.version_info, "node subscribed");
            let session = control.open_session(&node);
            control.update_node(&node, session, |s| {
                if !first.version_info.is_empty() {
                    s.version = Some(first.version_info.clone());
                }
            });
            let ended = serve_node(&control, &node, session, first, &mut inbound, &tx).await;
            tracing::info!(%node, reason = %ended, "node stream ended");
            control.update_node(&node, session, |s| s.connected = false);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The name under which a workload certificate may follow the stream: `waypoint <ns>/<name>`,
/// as its request names it, when the resources in force have that waypoint (a Gateway of class
/// palisade-waypoint) and every one of its workloads runs as `id`. Anything else is refused: a
/// workload identity alone grants nothing here.
fn waypoint_client(control: &Control, id: &palisade_mesh::identity::SpiffeId, named: &str) -> Result<String, Status> {
    let refuse = |why: String| Err(Status::permission_denied(format!("{id}: {why}")));
    let Some(waypoint) = named.strip_prefix(WAYPOINT_PREFIX) else {
        return refuse(format!(
            "a workload certificate may only subscribe as \"{WAYPOINT_PREFIX}<ns>/<name>\", not {named:?}"
        ));
    };
    let Some(payload) = control.payload().borrow().clone() else {
        return Err(Status::unavailable("no resources in force yet"));
    };
    let resources: Vec<palisade_model::load::Located> = payload
        .documents
        .values()
        .map(|d| palisade_model::load::Located {
            origin: palisade_model::load::Origin { file: "control-plane".into(), line: 0 },
            resource: d.resource.clone(),
        })
        .collect();
    let index = palisade_model::waypoint::waypoint_index(&resources, &id.trust_domain);
    let own = id.to_string();
    match index.waypoints.get(waypoint) {
        Some(w) if !w.workloads.is_empty() && w.workloads.iter().all(|w| w.identity == own) => Ok(named.to_string()),
        Some(_) => refuse(format!("the workloads of waypoint {waypoint} do not run as this identity")),
        None => refuse(format!("no waypoint {waypoint} in the resources in force")),
    }
}

/// How a waypoint names itself in its requests (and in `palisade get nodes`).
pub const WAYPOINT_PREFIX: &str = "waypoint ";

/// Serves one node's stream until it ends; returns why.
async fn serve_node(
    control: &Control,
    node: &str,
    session: Session,
    first: SnapshotRequest,
    inbound: &mut Streaming<SnapshotRequest>,
    tx: &mpsc::Sender<Result<SnapshotResponse, Status>>,
) -> String {
    let mut payloads = control.payload();
    let mut in_force = first.version_info;
    let mut nacked: Option<String> = None;
    let mut nonce = 0u64;
    // What the node has in force as this stream knows it (None: unknown, send everything).
    let mut acked: Option<(Arc<Documents>, Arc<Identities>)> = None;
    if let Some(p) = payloads.borrow().as_ref().filter(|p| p.version == in_force) {
        // The node runs this very version (a reconnection): deltas can start from it.
        acked = Some((p.documents.clone(), p.identities.clone()));
    }
    loop {
        let current = payloads.borrow_and_update().clone();
        if let Some(p) = current.filter(|p| p.version != in_force && nacked.as_ref() != Some(&p.version)) {
            nonce += 1;
            let delta = Delta::between(acked.as_ref().map(|(d, _)| &**d), &p.documents);
            let known = acked.as_ref().filter(|_| !delta.full).map(|(_, ids)| ids);
            let response = SnapshotResponse {
                version_info: p.version.clone(),
                nonce: nonce.to_string(),
                content_digest: p.digest.clone(),
                identities: wire_identities(&p.identities, known),
                full: delta.full,
                documents: delta
                    .put
                    .iter()
                    .map(|(key, doc)| Document { key: Some(wire_key(key)), yaml: doc.yaml.clone() })
                    .collect(),
                removed: delta.removed.iter().map(|k| wire_key(k)).collect(),
            };
            if tx.send(Ok(response)).await.is_err() {
                return "the node went away".into();
            }
            control.update_node(node, session, |s| s.sent_version = Some(p.version.clone()));
            let answer = loop {
                match inbound.message().await {
                    Ok(Some(r)) if r.response_nonce == nonce.to_string() => break r,
                    // An answer to an earlier response: superseded.
                    Ok(Some(_)) => continue,
                    Ok(None) => return "closed by the node".into(),
                    Err(e) => return e.to_string(),
                }
            };
            in_force = answer.version_info.clone();
            match answer.error_detail {
                Some(error) => {
                    tracing::warn!(%node, version = %p.version, reason = %error.message, "node NACKed a snapshot");
                    nacked = Some(p.version.clone());
                    control.update_node(node, session, |s| {
                        s.version = (!in_force.is_empty()).then(|| in_force.clone());
                        s.last_nack = Some(Nack { version: p.version.clone(), reason: error.message, at_ms: now_ms() });
                    });
                }
                None => {
                    tracing::debug!(%node, version = %in_force, "node ACKed");
                    acked = Some((p.documents.clone(), p.identities.clone()));
                    control.update_node(node, session, |s| {
                        s.version = Some(in_force.clone());
                        s.acked_at_ms = Some(now_ms());
                    });
                }
            }
            continue;
        }
        tokio::select! {
            changed = payloads.changed() => if changed.is_err() { return "server stopping".into() },
            message = inbound.message() => match message {
                Ok(Some(_)) => {}
                Ok(None) => return "closed by the node".into(),
                Err(e) => return e.to_string(),
            },
        }
    }
}

/// The payload's numbers as the wire carries them: all, or those `known` does not have (none
/// when they are the very same table, as they are for most changes).
fn wire_identities(ids: &Arc<Identities>, known: Option<&Arc<Identities>>) -> Vec<palisade_api::v1::NumberedIdentity> {
    if known.is_some_and(|k| Arc::ptr_eq(k, ids)) {
        return vec![];
    }
    ids.iter()
        .filter(|(labels, id)| known.is_none_or(|k| k.get(labels) != Some(*id)))
        .map(|(l, id)| palisade_api::v1::NumberedIdentity {
            id,
            namespace: l.namespace.clone(),
            service_account: l.service_account.clone(),
            labels: l.labels.clone(),
        })
        .collect()
}

fn wire_key(key: &palisade_model::key::ResourceKey) -> palisade_api::v1::ResourceKey {
    palisade_api::v1::ResourceKey {
        kind: key.kind.clone(),
        namespace: key.namespace.clone().unwrap_or_default(),
        name: key.name.clone(),
    }
}
