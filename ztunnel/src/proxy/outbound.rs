//! Outbound: connections of a pod's applications, redirected by `connect4`/`connect6` to
//! 127.0.0.1:15001 (or [::1]:15001) inside the pod. The original destination comes from the
//! `ORIG_DST` map, keyed by the pod's netns cookie and the client's port.
//!
//! A destination that is a Service's virtual address and port is first resolved to one of its
//! endpoints ([`resolve_service`]); the connection then goes on exactly as one made to that
//! endpoint directly.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use palisade_mesh::accept::Acceptor;
use palisade_model::Action;
use tokio::net::{TcpListener, TcpStream};

use super::hbone::{self, workload_identity};
use super::{Decided, PodNet, ProxyCtx, Refusal, carry, refuse, socket_reset};
use crate::datapath::orig_dst_addr;
use crate::limits;
use crate::metrics::Direction;

pub async fn serve(listener: TcpListener, pod: Arc<PodNet>, ctx: Arc<ProxyCtx>) {
    let mut acceptor = Acceptor::new(format!("outbound {}", pod.name), listener);
    loop {
        let (client, peer) = acceptor.accept().await;
        // The client's socket and the upstream one (or a share of a pooled HBONE connection).
        if !limits::fds().admit(2) {
            let _ = socket_reset(&client);
            continue;
        }
        let Some(orig) = ctx.orig_dst.get(pod.netns.cookie(), peer.port()) else {
            // Not captured by our programs (someone dialled 15001 directly): refuse.
            ctx.metrics.missing_orig_dst();
            tracing::warn!(pod = %pod.name, %peer, "no original destination for outbound connection; closing");
            continue;
        };
        let mut dst = orig_dst_addr(&orig);
        let mut dst_identity = orig.dst_identity;
        let snapshot = ctx.snapshot.borrow().clone();
        if snapshot.service_at(dst).is_some() {
            let Some(endpoint) = resolve_service(&ctx, &pod, &client, &snapshot, dst) else { continue };
            dst = endpoint;
            dst_identity = snapshot.identity_of(endpoint.ip());
        }
        // Mesh workloads are reached through HBONE when this pod has an identity.
        let tunnel_to = match (&ctx.mesh, &pod.identity) {
            (Some(mesh), Some(_)) => workload_identity(&snapshot, dst.ip(), &mesh.trust_domain),
            _ => None,
        };
        let (pod, ctx) = (pod.clone(), ctx.clone());
        tokio::spawn(async move {
            let decided = Decided { src_identity: orig.src_identity, dst_identity, rule: orig.rule, audit: None };
            match tunnel_to {
                Some(dst_id) => hbone::outbound(&ctx, &pod, client, peer.port(), dst, dst_id, decided).await,
                None => {
                    if egress_allowed(&ctx, &pod, &client, dst) {
                        carry(&ctx, &pod, Direction::Outbound, client, peer, dst, decided, None).await
                    }
                }
            }
        });
    }
}

/// Round robin over the allowed endpoints, one counter for every Service of the node: each
/// connection takes the next endpoint of its Service's allowed list.
static NEXT_ENDPOINT: AtomicUsize = AtomicUsize::new(0);

/// One endpoint of the Service at `vip` (its VIP:port) that the exact evaluation allows this pod
/// to reach (its egress and the endpoint's ingress); the endpoints come with the snapshot, so a
/// connection in flight keeps the one it got. None allowed (or none at all): the client is
/// reset, with a deny event that names the Service, and `None`.
fn resolve_service(
    ctx: &ProxyCtx,
    pod: &PodNet,
    client: &TcpStream,
    snapshot: &palisade_model::Snapshot,
    vip: SocketAddr,
) -> Option<SocketAddr> {
    let proven = pod.identity.as_ref().map(|(id, _)| (id.namespace.as_str(), id.service_account.as_str()));
    let choice = snapshot.service_choice(pod.ip, proven, vip)?;
    if !choice.allowed.is_empty() {
        let n = NEXT_ENDPOINT.fetch_add(1, Ordering::Relaxed);
        return Some(choice.allowed[n % choice.allowed.len()].address);
    }
    let (src_identity, policy) = match &choice.first_denied {
        Some((endpoint, d)) => (
            snapshot.identity_name(d.verdict.src_identity),
            format!(
                "service {}: no endpoint allowed (e.g. {} at {}: {})",
                choice.service.name,
                endpoint.workload,
                endpoint.address,
                snapshot.describe_verdict(&d.verdict)
            ),
        ),
        None => (
            snapshot.identity_name(snapshot.identity_of(pod.ip)),
            format!("service {}: no endpoints", choice.service.name),
        ),
    };
    let why = Refusal { src_identity, dst_identity: format!("service:{}", choice.service.name), policy };
    refuse(ctx, client, Direction::Outbound, SocketAddr::new(pod.ip, 0), vip, why);
    None
}

/// The exact egress evaluation for a destination outside the mesh. The kernel's cells may
/// allow more than a policy does (a peer that covers only some of an identity's addresses, long
/// port ranges, named ports that differ between workloads); a mesh destination re-checks at
/// its own ztunnel, but nothing else would here. Refused: reset, with a deny event.
fn egress_allowed(ctx: &ProxyCtx, pod: &PodNet, client: &TcpStream, dst: SocketAddr) -> bool {
    let snapshot = ctx.snapshot.borrow().clone();
    let proven = pod.identity.as_ref().map(|(id, _)| (id.namespace.as_str(), id.service_account.as_str()));
    let d = snapshot.authorize(pod.ip, proven, dst.ip(), dst.port());
    if d.verdict.action == Action::Allow {
        return true;
    }
    let why = Refusal {
        src_identity: snapshot.identity_name(d.verdict.src_identity),
        dst_identity: snapshot.identity_name(d.verdict.dst_identity),
        policy: snapshot.describe_verdict(&d.verdict),
    };
    refuse(ctx, client, Direction::Outbound, SocketAddr::new(pod.ip, 0), dst, why);
    false
}
