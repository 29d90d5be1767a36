//! Outbound: connections of a pod's applications, redirected by `connect4`/`connect6` to
//! 127.0.0.1:15001 (or [::1]:15001) inside the pod. The original destination comes from the
//! `ORIG_DST` map, keyed by the pod's netns cookie and the client's port.
//!
//! A destination that is a Service's virtual address and port is first resolved to one of its
//! endpoints ([`resolve_service`]); the connection then goes on exactly as one made to that
//! endpoint directly.
//!
//! A Service served by a waypoint (`istio.io/use-waypoint`) is not resolved here: the
//! connection goes over HBONE to one of the waypoint's workloads ([`waypoint_for`]), with the
//! VIP:port as the CONNECT authority, requiring the waypoint's identity; the waypoint routes,
//! enforces the destination's L4 and L7 policy against this pod's proven identity, and picks
//! the endpoint. This pod's egress is checked here as for any Service (allowed when it allows
//! some endpoint). As Istio's ztunnel does for a Service waypoint, only traffic addressed to
//! the VIP takes this path: a connection made to an endpoint's own address goes straight to it,
//! unless that endpoint's Workload is itself served by a waypoint for workload traffic
//! (`istio.io/waypoint-for: workload` or `all`, [`WaypointIndex::for_workload`]): then the
//! connection, whether dialled to the Workload's address or resolved from a Service without a
//! waypoint, goes over HBONE to that waypoint with the Workload's address:port as the CONNECT
//! authority, exactly as VIP traffic does. Its ztunnel refuses any tunnel to it that does not
//! come from a waypoint, so going around the waypoint is not an option anyway.
//!
//! [`WaypointIndex::for_workload`]: palisade_model::waypoint::WaypointIndex::for_workload
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use palisade_mesh::accept::Acceptor;
use palisade_model::Action;
use palisade_model::waypoint::WaypointRef;
use tokio::net::{TcpListener, TcpStream};

use palisade_mesh::hbone::PORT;
use palisade_mesh::identity::SpiffeId;

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
        if snapshot.service_at(dst).is_some() && snapshot.waypoints.for_vip(dst.ip()).is_some() {
            let Some((via, waypoint_id)) = waypoint_for(&ctx, &pod, &client, &snapshot, dst) else { continue };
            let (pod, ctx) = (pod.clone(), ctx.clone());
            let dst_identity = orig.dst_identity;
            tokio::spawn(async move {
                let decided = Decided { src_identity: orig.src_identity, dst_identity, rule: orig.rule, audit: None };
                hbone::outbound(&ctx, &pod, client, peer.port(), dst, Some(via), waypoint_id, decided).await
            });
            continue;
        }
        if snapshot.service_at(dst).is_some() {
            let Some(endpoint) = resolve_service(&ctx, &pod, &client, &snapshot, dst) else { continue };
            dst = endpoint;
            dst_identity = snapshot.identity_of(endpoint.ip());
        }
        if let Some(waypoint) = snapshot.waypoints.for_workload(dst.ip()) {
            let Some((via, waypoint_id)) = workload_waypoint(&ctx, &pod, &client, &snapshot, dst, waypoint) else {
                continue;
            };
            let (pod, ctx) = (pod.clone(), ctx.clone());
            tokio::spawn(async move {
                let decided = Decided { src_identity: orig.src_identity, dst_identity, rule: orig.rule, audit: None };
                hbone::outbound(&ctx, &pod, client, peer.port(), dst, Some(via), waypoint_id, decided).await
            });
            continue;
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
                Some(dst_id) => hbone::outbound(&ctx, &pod, client, peer.port(), dst, None, dst_id, decided).await,
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
/// to reach (its egress and the endpoint's ingress), healthy if any is; the endpoints come with the snapshot, so a
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
        // Healthy ones first ([`super::health`]); all of them when none is. No list is built
        // per connection: the n-th healthy one is found by counting.
        let n = NEXT_ENDPOINT.fetch_add(1, Ordering::Relaxed);
        let healthy = |e: &&&palisade_model::compile::Endpoint| ctx.health.healthy(e.address);
        let count = choice.allowed.iter().filter(healthy).count();
        return match count {
            0 => Some(choice.allowed[n % choice.allowed.len()].address),
            _ => choice.allowed.iter().filter(healthy).nth(n % count).map(|e| e.address),
        };
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

/// Where a connection to `vip` (a VIP:port its waypoint serves) goes: one of the waypoint's
/// workloads (round robin, first address of each), at HBONE's port, and the identity it must
/// prove. `None` when this pod's egress allows no endpoint of the Service, when the waypoint
/// has no workload, or when this pod cannot tunnel (no CA): the client is reset with a deny
/// event, since going around the waypoint would skip the policy it enforces.
fn waypoint_for(
    ctx: &ProxyCtx,
    pod: &PodNet,
    client: &TcpStream,
    snapshot: &palisade_model::Snapshot,
    vip: SocketAddr,
) -> Option<(SocketAddr, SpiffeId)> {
    let waypoint = snapshot.waypoints.for_vip(vip.ip())?;
    let (service, port) = snapshot.service_at(vip)?;
    let refusal = |policy: String, src_identity: String| {
        let why = Refusal { src_identity, dst_identity: format!("service:{}", service.name), policy };
        refuse(ctx, client, Direction::Outbound, SocketAddr::new(pod.ip, 0), vip, why);
    };
    let own = snapshot.identity_name(snapshot.identity_of(pod.ip));
    if ctx.mesh.is_none() || pod.identity.is_none() {
        refusal(
            format!("service {}: served by waypoint {}, which only HBONE reaches", service.name, waypoint.name),
            own,
        );
        return None;
    }
    // Only this pod's egress: the destination's ingress is the waypoint's to enforce, against
    // this pod's proven identity (the kernel's VIP cells read egress alone, likewise).
    let proven = pod.identity.as_ref().map(|(id, _)| (id.namespace.as_str(), id.service_account.as_str()));
    let mut denied = None;
    let allowed = port.endpoints.iter().any(|e| {
        let d = snapshot.authorize(pod.ip, proven, e.address.ip(), e.address.port());
        let ok = matches!(d.egress, Some((Action::Allow, _)));
        if !ok && denied.is_none() {
            denied = Some((e, d));
        }
        ok
    });
    if !allowed {
        let (src_identity, policy) = match denied {
            Some((e, d)) => (
                snapshot.identity_name(d.verdict.src_identity),
                format!(
                    "service {}: egress allows no endpoint (e.g. {} at {}: {})",
                    service.name,
                    e.workload,
                    e.address,
                    snapshot.describe_verdict(&d.verdict)
                ),
            ),
            None => (own, format!("service {}: no endpoints", service.name)),
        };
        refusal(policy, src_identity);
        return None;
    }
    match waypoint_target(waypoint) {
        Some(target) => Some(target),
        None => {
            refusal(format!("service {}: waypoint {} has no workload", service.name, waypoint.name), own);
            None
        }
    }
}

/// One of the waypoint's workloads (round robin, first address of each) at HBONE's port, and
/// the identity it must prove.
fn waypoint_target(waypoint: &WaypointRef) -> Option<(SocketAddr, SpiffeId)> {
    let targets: Vec<_> =
        waypoint.workloads.iter().filter_map(|w| Some((*w.addresses.first()?, &w.identity))).collect();
    let parsed = |(addr, id): (std::net::IpAddr, &String)| Some((SocketAddr::new(addr, PORT), id.parse().ok()?));
    let n = NEXT_ENDPOINT.fetch_add(1, Ordering::Relaxed);
    targets.get(n % targets.len().max(1)).copied().and_then(parsed)
}

/// Where a connection to `dst`, the address of a Workload that `waypoint` serves for workload
/// traffic, goes: one of the waypoint's workloads and the identity it must prove. `None`
/// (the client reset, with a deny event) when this pod's egress does not allow `dst`, when
/// the waypoint has no workload, or when this pod cannot tunnel: there is no way around the
/// waypoint, the destination's ztunnel would refuse it.
fn workload_waypoint(
    ctx: &ProxyCtx,
    pod: &PodNet,
    client: &TcpStream,
    snapshot: &palisade_model::Snapshot,
    dst: SocketAddr,
    waypoint: &WaypointRef,
) -> Option<(SocketAddr, SpiffeId)> {
    let own = snapshot.identity_name(snapshot.identity_of(pod.ip));
    let dst_name = snapshot.identity_name(snapshot.identity_of(dst.ip()));
    let refusal = |policy: String, src_identity: String| {
        let why = Refusal { src_identity, dst_identity: dst_name.clone(), policy };
        refuse(ctx, client, Direction::Outbound, SocketAddr::new(pod.ip, 0), dst, why);
    };
    if ctx.mesh.is_none() || pod.identity.is_none() {
        refusal(format!("{dst}: served by waypoint {}, which only HBONE reaches", waypoint.name), own);
        return None;
    }
    // Only this pod's egress: the destination's ingress is the waypoint's to enforce, against
    // this pod's proven identity.
    let proven = pod.identity.as_ref().map(|(id, _)| (id.namespace.as_str(), id.service_account.as_str()));
    let d = snapshot.authorize(pod.ip, proven, dst.ip(), dst.port());
    if !matches!(d.egress, Some((Action::Allow, _))) {
        let policy = format!("{dst}: egress does not allow it ({})", snapshot.describe_verdict(&d.verdict));
        refusal(policy, snapshot.identity_name(d.verdict.src_identity));
        return None;
    }
    let target = waypoint_target(waypoint);
    if target.is_none() {
        refusal(format!("{dst}: served by waypoint {}, which has no workload", waypoint.name), own);
    }
    target
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
