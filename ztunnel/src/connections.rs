//! Live connections at their destination, re-checked whenever the policy changes: those the
//! new policy denies are closed at once (well within a second of the reload), and their flow
//! events say why. A destination that a waypoint now serves for workload traffic keeps only
//! the tunnels that come from a waypoint serving it.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use palisade_model::{Action, Snapshot};
use tokio::sync::watch;

struct Tracked {
    src: IpAddr,
    /// The certificate-proven (namespace, service account) of the source, if any.
    proven: Option<(String, String)>,
    dst: SocketAddr,
    close: watch::Sender<Option<String>>,
    /// A tunnel from a waypoint (its SPIFFE ID): re-checked by whether that waypoint still
    /// serves `dst` (it enforces the destination's policy itself).
    waypoint: Option<String>,
}

#[derive(Default)]
pub struct Connections {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Tracked>>,
}

/// Keeps a connection registered; unregisters it when dropped.
pub struct Registration {
    id: u64,
    connections: Arc<Connections>,
    /// Becomes `Some(reason)` when the connection must close.
    pub closed: watch::Receiver<Option<String>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.connections.live.lock().expect("connections lock").remove(&self.id);
    }
}

impl Registration {
    /// Resolves with the reason once the connection must close.
    pub async fn until_closed(&mut self) -> String {
        loop {
            if let Some(reason) = self.closed.borrow_and_update().clone() {
                return reason;
            }
            if self.closed.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

impl Connections {
    pub fn register(self: &Arc<Self>, src: IpAddr, proven: Option<(String, String)>, dst: SocketAddr) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = watch::channel(None);
        self.live.lock().expect("connections lock").insert(id, Tracked { src, proven, dst, close, waypoint: None });
        Registration { id, connections: self.clone(), closed }
    }

    /// Registers a tunnel that waypoint `identity` (at `src`) carries to `dst`.
    pub fn register_from_waypoint(self: &Arc<Self>, src: IpAddr, identity: String, dst: SocketAddr) -> Registration {
        let registration = self.register(src, None, dst);
        if let Some(t) = self.live.lock().expect("connections lock").get_mut(&registration.id) {
            t.waypoint = Some(identity);
        }
        registration
    }

    /// Closes every connection `snapshot` denies; returns how many.
    pub fn revalidate(&self, snapshot: &Snapshot) -> usize {
        let live = self.live.lock().expect("connections lock");
        let mut closed = 0;
        for t in live.values() {
            if let Some(waypoint) = &t.waypoint {
                if !snapshot.waypoints.accepts_from(t.dst.ip(), t.src, waypoint) {
                    t.close.send_replace(Some(format!("closed: {waypoint} no longer serves {}", t.dst)));
                    closed += 1;
                }
                continue;
            }
            if let Some(w) = snapshot.waypoints.for_workload(t.dst.ip()) {
                let reason = format!("closed: {} is now served by waypoint {} for workload traffic", t.dst, w.name);
                t.close.send_replace(Some(reason));
                closed += 1;
                continue;
            }
            let proven = t.proven.as_ref().map(|(ns, sa)| (ns.as_str(), sa.as_str()));
            let d = snapshot.authorize(t.src, proven, t.dst.ip(), t.dst.port());
            if d.verdict.action == Action::Deny {
                let reason = format!(
                    "closed: policy now denies it ({})",
                    snapshot.describe_rule(d.verdict.rule, d.verdict.dst_identity)
                );
                t.close.send_replace(Some(reason));
                closed += 1;
            }
        }
        closed
    }
}

/// Re-checks live connections after every policy change.
pub async fn revalidate_on_change(connections: Arc<Connections>, mut snapshots: watch::Receiver<Arc<Snapshot>>) {
    while snapshots.changed().await.is_ok() {
        let snapshot = snapshots.borrow_and_update().clone();
        let closed = connections.revalidate(&snapshot);
        if closed > 0 {
            tracing::info!(closed, "closed established connections the new policy denies");
        }
    }
}
