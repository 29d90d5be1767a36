//! The HBONE hop between ztunnels. Outbound: a captured connection to a mesh workload becomes
//! a CONNECT stream on a pooled mTLS connection to the destination pod's 15008, presenting the
//! source pod's certificate and requiring the destination's identity. Inbound: ztunnel's
//! listener on 15008 inside each enrolled pod presents that pod's certificate, authorizes each
//! stream by the client's proven identity, then connects to the application inside the pod.
//! A pod served by a waypoint for workload traffic (`istio.io/waypoint-for: workload` or
//! `all`) accepts tunnels only from a waypoint serving it ([`bypass`]): a source that goes
//! around the waypoint (a ztunnel that does not know it, an older one, a hostile peer with a
//! valid certificate) is refused even when the destination's L4 policy would allow it, since
//! the waypoint's L7 policy would then never be enforced.
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;
use palisade_mesh::accept::Acceptor;
use palisade_mesh::hbone::pool::{ConnectRequest, Pool, PoolKey};
use palisade_mesh::hbone::request::forwarded_for;
use palisade_mesh::hbone::server::{InboundStream, serve_connection_admitted};
use palisade_mesh::hbone::{ALPN, HboneError, PORT, Progress, pump, pump_counted};
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::secrets::SecretManager;
use palisade_mesh::tls::server_config;
use palisade_model::{Action, Decision, Snapshot};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::{Decided, Finished, PodNet, ProxyCtx, connect_from, record, socket_reset};
use crate::flows::{Transport, Verdict};
use crate::limits;
use crate::metrics::Direction;

/// Identity and tunnelling, present when ztunnel has a CA.
pub struct Mesh {
    pub secrets: Arc<SecretManager>,
    pub pool: Pool,
    pub trust_domain: String,
}

/// The SPIFFE ID of the mesh workload at `ip`, if there is one.
pub fn workload_identity(snapshot: &Snapshot, ip: IpAddr, trust_domain: &str) -> Option<SpiffeId> {
    let id = snapshot.identity(snapshot.identity_of(ip))?;
    Some(SpiffeId::new(trust_domain, &id.labels.namespace, &id.labels.service_account))
}

fn short(id: &SpiffeId) -> String {
    format!("{}/{}", id.namespace, id.service_account)
}

/// Carries one captured connection to a mesh workload through HBONE: to the workload's own
/// HBONE port, or `via` a waypoint (whose identity is then `dst_id`), the CONNECT authority
/// staying the original destination.
#[allow(clippy::too_many_arguments)]
pub(super) async fn outbound(
    ctx: &ProxyCtx,
    pod: &PodNet,
    client: TcpStream,
    client_port: u16,
    dst: SocketAddr,
    via: Option<SocketAddr>,
    dst_id: SpiffeId,
    decided: Decided,
) {
    let (Some(mesh), Some((src_id, credential))) = (ctx.mesh.as_ref(), pod.identity.as_ref()) else { return };
    let started = Instant::now();
    ctx.metrics.connection_opened(Direction::Outbound);
    let _ = client.set_nodelay(true);
    // A waypoint's HBONE address, else the destination pod's own.
    let endpoint = via.unwrap_or(SocketAddr::new(dst.ip(), PORT));
    let key = PoolKey { src: src_id.clone(), dst: dst_id.clone(), endpoint };
    let src = SocketAddr::new(pod.ip, client_port);
    let request = ConnectRequest { authority: dst, forwarded_for: src };
    let bundle = mesh.secrets.bundle();
    let (_, _, policy) = ctx.hub.describe(decided.src_identity, decided.dst_identity, decided.rule);
    let mut finished = Finished {
        direction: Direction::Outbound,
        verdict: Verdict::Allow,
        src,
        dst,
        src_identity: short(src_id),
        dst_identity: short(&dst_id),
        policy,
        transport: Transport::Hbone,
        // Set only once the destination has proven `dst_id` (the pool requires it).
        peer: None,
        sent: 0,
        received: 0,
        started,
        error: None,
        audit: None,
    };
    match mesh.pool.connect(key, credential.clone(), &bundle, || connect_from(pod, endpoint), request).await {
        Ok(tunnel) => {
            ctx.health.succeeded(dst);
            finished.peer = Some(dst_id.to_string());
            let pumped = pump(client, tunnel.send, tunnel.recv).await;
            drop(tunnel.slot);
            finished.sent = pumped.to_tunnel;
            finished.received = pumped.from_tunnel;
            finished.error = pumped.error;
        }
        Err(e) => {
            ctx.metrics.proxy_error(Direction::Outbound);
            let _ = socket_reset(&client);
            // Unreachable, or its workload refused (503): not a policy answer (401).
            if !matches!(&e, HboneError::Status { status, .. } if *status == StatusCode::UNAUTHORIZED) {
                ctx.health.failed(dst);
            }
            match &e {
                // The handshake completed, so the destination proved `dst_id`, then refused.
                HboneError::Status { status, .. } => {
                    finished.peer = Some(dst_id.to_string());
                    if *status == StatusCode::UNAUTHORIZED {
                        finished.verdict = Verdict::Deny;
                        finished.policy = "denied by the destination's authorization".into();
                    }
                }
                HboneError::H2(_) => finished.peer = Some(dst_id.to_string()),
                _ => {}
            }
            finished.error = Some(match e.identity_mismatch() {
                // Another workload (or an impostor with a certificate of the mesh) answered at
                // the destination's address: refused, and the event says who it was.
                Some((expected, got)) => {
                    finished.verdict = Verdict::Deny;
                    finished.policy = "refused: the destination did not prove its identity".into();
                    format!("peer identity mismatch: expected {expected}, got {got}")
                }
                None => e.to_string(),
            });
        }
    }
    ctx.metrics.connection_closed(Direction::Outbound, finished.sent, finished.received);
    record(ctx, finished);
}

/// Serves the HBONE listener of one pod until `shutdown`; then open connections drain.
pub async fn serve_inbound(
    listener: TcpListener,
    pod: Arc<PodNet>,
    ctx: Arc<ProxyCtx>,
    shutdown: watch::Receiver<bool>,
) {
    let (Some(mesh), Some((_, credential))) = (ctx.mesh.as_ref(), pod.identity.as_ref()) else { return };
    let mut bundles = mesh.secrets.watch_bundle();
    let make_tls = |bundle: &palisade_mesh::tls::TrustBundle| server_config(credential.clone(), bundle, &[ALPN]);
    let mut tls = match make_tls(&bundles.borrow_and_update()) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(pod = %pod.name, error = %e, "cannot build the HBONE server configuration");
            return;
        }
    };
    let handler = {
        let (ctx, pod) = (ctx.clone(), pod.clone());
        Arc::new(move |stream: InboundStream| handle(ctx.clone(), pod.clone(), stream))
    };
    let mut stop = shutdown.clone();
    let mut acceptor = Acceptor::new(format!("hbone {}", pod.name), listener);
    let mut refused = 0u32;
    loop {
        tokio::select! {
            (tcp, peer) = acceptor.accept() => {
                // Over a bound, close at once (a reset: no TIME_WAIT is kept for a flood), so
                // that the accept queue keeps moving for legitimate clients.
                let admitted = limits::hbone_handshakes().try_admit(peer.ip());
                // The tunnel's socket and the first stream's upstream socket.
                let Some(permit) = admitted.ok().filter(|_| limits::fds().admit(2)) else {
                    let _ = socket_reset(&tcp);
                    refused = refused.wrapping_add(1);
                    // A flood keeps the backlog full, so accept() never waits and this loop
                    // would refuse a whole coop budget of connections (128) before the worker
                    // turned to established connections: on one worker, legitimate requests
                    // would wait behind the flood.
                    if refused.is_multiple_of(limits::REFUSALS_PER_YIELD) {
                        tokio::task::yield_now().await;
                    }
                    continue;
                };
                if bundles.has_changed().unwrap_or(false)
                    && let Ok(t) = make_tls(&bundles.borrow_and_update())
                {
                    tls = t;
                }
                tokio::spawn(serve_connection_admitted(tcp, permit, tls.clone(), handler.clone(), shutdown.clone()));
            }
            _ = stop.changed() => return,
        }
    }
}

/// The decision for a tunnel from a waypoint that serves the destination
/// ([`palisade_model::waypoint::WaypointIndex::accepts_from`]: the proven identity and the tunnel's
/// source address are one of its workloads'). The destination's L4 policy is not evaluated
/// against the waypoint's identity: the waypoint evaluated it against the original source's
/// proven identity before forwarding (with its L7 policy), and the waypoint's own identity
/// would answer a different question (is the waypoint allowed?) that would force every policy
/// to name the waypoint. Istio differs here: its ztunnel evaluates a destination's
/// workload-selected (L4) policies against the connection's peer, which for waypoint traffic
/// is the waypoint, and asks users to attach policies to the waypoint instead; Palisade's
/// waypoint enforces the destination's L4 policy itself, so no rule has to name it.
fn waypoint_decision(snapshot: &Snapshot, src: IpAddr, dst: IpAddr) -> Decision {
    let verdict = palisade_model::Verdict {
        action: Action::Allow,
        rule: palisade_ebpf_common::RULE_DEFAULT_ALLOW,
        src_identity: snapshot.identity_of(src),
        dst_identity: snapshot.identity_of(dst),
    };
    Decision { verdict, audit_deny: None, egress: None, ingress: None }
}

/// Why a tunnel that does not come from a waypoint serving `dst` is refused: `dst`'s Workload
/// is served by a waypoint for workload traffic, which this tunnel went around. `None` when
/// `dst` has no such waypoint (today's rules apply).
fn bypass(snapshot: &Snapshot, dst: SocketAddr) -> Option<String> {
    let waypoint = snapshot.waypoints.for_workload(dst.ip())?;
    Some(format!(
        "refused: {dst} is served by waypoint {} for workload traffic and accepts tunnels only from it (this one bypassed it)",
        waypoint.name
    ))
}

/// Whether `identity` is a waypoint workload's.
fn is_waypoint(snapshot: &Snapshot, identity: &str) -> bool {
    snapshot.waypoints.waypoints.values().flat_map(|w| &w.workloads).any(|w| w.identity == identity)
}

async fn handle(ctx: Arc<ProxyCtx>, pod: Arc<PodNet>, stream: InboundStream) {
    let started = Instant::now();
    let dst = match &stream.authority {
        Ok(a) if a.ip() == pod.ip => *a,
        Ok(a) => {
            tracing::info!(pod = %pod.name, authority = %a, "HBONE request for another address refused");
            stream.reject(StatusCode::BAD_REQUEST);
            return;
        }
        Err(e) => {
            tracing::info!(pod = %pod.name, error = %e, "malformed HBONE request");
            stream.reject(StatusCode::BAD_REQUEST);
            return;
        }
    };
    // The tunnel comes from the source pod's own address (ztunnel dials from inside the pod),
    // so `forwarded` may only add the client's port; an address that disagrees is ignored.
    let src = forwarded_for(stream.forwarded_for.as_deref())
        .filter(|f| f.ip() == stream.peer_addr.ip())
        .unwrap_or(stream.peer_addr);
    let snapshot = ctx.snapshot.borrow().clone();
    let proven = (stream.peer.namespace.clone(), stream.peer.service_account.clone());
    let peer_id = stream.peer.to_string();
    let from_waypoint = snapshot.waypoints.accepts_from(dst.ip(), stream.peer_addr.ip(), &peer_id);
    let decision = match from_waypoint {
        true => waypoint_decision(&snapshot, stream.peer_addr.ip(), dst.ip()),
        false => snapshot.authorize(stream.peer_addr.ip(), Some((&proven.0, &proven.1)), dst.ip(), dst.port()),
    };
    let verdict = &decision.verdict;
    // A waypoint's identity carries others' traffic: it is accepted only by destinations that
    // waypoint serves, never evaluated as a client of its own elsewhere.
    let stray_waypoint = !from_waypoint && is_waypoint(&snapshot, &peer_id);
    let bypassed = match from_waypoint {
        true => None,
        false => bypass(&snapshot, dst),
    };
    let allowed = verdict.action == Action::Allow && !stray_waypoint && bypassed.is_none();
    let policy = match (from_waypoint, stray_waypoint, bypassed) {
        (true, _, _) => format!(
            "from a waypoint serving {dst}: the destination's L4 and L7 policy was enforced there against the original source"
        ),
        (_, true, _) => format!("refused: {peer_id} is a waypoint that does not serve {dst}"),
        (_, _, Some(why)) => why,
        _ => snapshot.describe_rule(verdict.rule, verdict.dst_identity),
    };
    ctx.metrics.verdict(Direction::Inbound, !allowed);
    let mut finished = Finished {
        direction: Direction::Inbound,
        verdict: if allowed { Verdict::Allow } else { Verdict::Deny },
        src,
        dst,
        src_identity: short(&stream.peer),
        dst_identity: snapshot.identity_name(verdict.dst_identity),
        policy,
        transport: Transport::Hbone,
        peer: Some(stream.peer.to_string()),
        sent: 0,
        received: 0,
        started,
        error: None,
        audit: decision.audit_deny.map(|r| snapshot.describe_rule(r, verdict.dst_identity)),
    };
    if !allowed {
        stream.reject(StatusCode::UNAUTHORIZED);
        record(&ctx, finished);
        return;
    }
    let mut registration = match from_waypoint {
        true => ctx.connections.register_from_waypoint(stream.peer_addr.ip(), peer_id, dst),
        false => ctx.connections.register(stream.peer_addr.ip(), Some(proven), dst),
    };
    ctx.metrics.connection_opened(Direction::Inbound);
    match connect_from(&pod, dst).await {
        Err(e) => {
            ctx.metrics.proxy_error(Direction::Inbound);
            stream.reject(StatusCode::SERVICE_UNAVAILABLE);
            finished.error = Some(format!("connect {dst}: {e}"));
        }
        Ok(upstream) => match stream.accept() {
            Ok((send, recv)) => {
                // Counted as bytes move, so a connection closed by a policy change reports
                // what it carried until then.
                let progress = Progress::default();
                tokio::select! {
                    pumped = pump_counted(upstream, send, recv, &progress) => finished.error = pumped.error,
                    reason = registration.until_closed() => finished.error = Some(reason),
                }
                // Seen from the client: what it sent arrived from the tunnel.
                finished.sent = progress.from_tunnel.load(std::sync::atomic::Ordering::Relaxed);
                finished.received = progress.to_tunnel.load(std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => finished.error = Some(format!("answer CONNECT: {e}")),
        },
    }
    ctx.metrics.connection_closed(Direction::Inbound, finished.sent, finished.received);
    record(&ctx, finished);
}
