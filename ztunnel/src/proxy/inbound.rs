//! Inbound plaintext: connections arriving at a pod's address from outside the pod, handed
//! to this listener by the `sk_lookup` program after it allowed them. The accepted socket's
//! local address is the original destination; ztunnel connects to it from inside the pod
//! (over the pod's loopback, which the steering program leaves alone).
//!
//! The exact evaluation runs here too: it refuses what the kernel's cells could only
//! approximate (see `palisade_model::matching`), and registers the connection so that a
//! later policy change can close it.
use std::sync::Arc;

use palisade_mesh::accept::Acceptor;
use palisade_model::Action;
use tokio::net::TcpListener;

use super::{Decided, PodNet, ProxyCtx, Refusal, carry, refuse, socket_reset};
use crate::limits;
use crate::metrics::Direction;

pub async fn serve(listener: TcpListener, pod: Arc<PodNet>, ctx: Arc<ProxyCtx>) {
    let mut acceptor = Acceptor::new(format!("inbound {}", pod.name), listener);
    loop {
        let (client, peer) = acceptor.accept().await;
        // The client's socket and the upstream one inside the pod.
        if !limits::fds().admit(2) {
            let _ = socket_reset(&client);
            continue;
        }
        let Ok(dst) = client.local_addr() else { continue };
        let snapshot = ctx.snapshot.borrow().clone();
        let d = snapshot.authorize_plaintext(peer.ip(), dst.ip(), dst.port(), ctx.mesh.is_some());
        let v = d.verdict;
        // A pod served by a waypoint for workload traffic is reached only through it (HBONE).
        let bypass = snapshot.waypoints.for_workload(dst.ip()).map(|w| {
            format!("refused: {dst} is served by waypoint {} for workload traffic, which plaintext bypasses", w.name)
        });
        let policy = bypass.clone().unwrap_or_else(|| snapshot.describe_rule(v.rule, v.dst_identity));
        if v.action == Action::Deny || bypass.is_some() {
            let why = Refusal {
                src_identity: snapshot.identity_name(v.src_identity),
                dst_identity: snapshot.identity_name(v.dst_identity),
                policy,
            };
            refuse(&ctx, &client, Direction::Inbound, peer, dst, why);
            continue;
        }
        let audit = d.audit_deny.map(|r| snapshot.describe_rule(r, v.dst_identity));
        let registration = ctx.connections.register(peer.ip(), None, dst);
        let (pod, ctx) = (pod.clone(), ctx.clone());
        tokio::spawn(async move {
            let decided = Decided { src_identity: v.src_identity, dst_identity: v.dst_identity, rule: v.rule, audit };
            carry(&ctx, &pod, Direction::Inbound, client, peer, dst, decided, Some(registration)).await;
        });
    }
}
