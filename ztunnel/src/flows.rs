//! Flow events: every verdict the kernel takes (from the `EVENTS` ring buffer) and every
//! connection the proxies carry. Each event is counted in metrics, logged (target `flows`
//! for verdicts, `access` for finished connections), kept in a bounded recent history and
//! broadcast to live subscribers of the admin API (`/flows?follow=1`).
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::atomic::Ordering;

use palisade_ebpf_common::*;
use palisade_model::Snapshot;
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::metrics::{Direction, Metrics};

/// Recent events kept for `GET /flows` (the live stream has no history). Each event holds
/// about 0.5 KiB of strings and addresses: 1,024 of them bound what an idle ztunnel keeps
/// after a load to about 0.5 MiB (4,096 kept about 2 MiB).
const HISTORY: usize = 1024;
/// What naming a rule needs of a verdict (the names do not depend on the action).
fn verdict_of(src_identity: u32, dst_identity: u32, rule: u32) -> palisade_model::Verdict {
    palisade_model::Verdict { action: palisade_model::Action::Allow, rule, src_identity, dst_identity }
}

/// Policy generations kept to name kernel events with the snapshot that decided them. A
/// generation lives at least one poll interval (200 ms by default) and ztunnel reads the ring
/// within milliseconds, so 16 generations leave a wide margin.
const KEPT_GENERATIONS: usize = 16;
/// How long an event of a generation not yet recorded waits for it (the kernel switches to a
/// generation some milliseconds before its snapshot is recorded here).
const GENERATION_WAIT: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

/// How a proxied connection crossed between ztunnels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Plain TCP (destinations outside the mesh, plaintext sources, or no CA configured).
    Tcp,
    /// HTTP/2 CONNECT over mutual TLS.
    Hbone,
}

/// Where the event was observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Observer {
    /// A verdict taken by a kernel program, at connect() or at the inbound socket lookup.
    Kernel,
    /// A connection ztunnel proxied, reported when it ends.
    Proxy,
}

#[derive(Clone, Debug, Serialize)]
pub struct FlowEvent {
    pub time_unix_ms: u64,
    pub node: String,
    pub observer: Observer,
    pub direction: Direction,
    pub verdict: Verdict,
    /// The rule (or default) that decided.
    pub policy: String,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_identity: String,
    pub dst_identity: String,
    /// Bytes the client sent / received (proxy events).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: f64,
    /// Why a proxied connection ended abnormally, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Proxy events: how the connection crossed between ztunnels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    /// HBONE: the SPIFFE ID the peer proved with its certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_spiffe_id: Option<String>,
    /// Audit mode: the rule that would have denied this allowed connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<String>,
    /// Kernel events: the policy generation that decided (identities and rule are named with
    /// that generation's snapshot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_generation: Option<u32>,
}

/// The snapshots of the last few policy generations, so that a kernel verdict is named with
/// the policy that took it even when a newer one is in force by the time its event is read.
#[derive(Default)]
pub struct Generations {
    recent: Mutex<VecDeque<(u32, Arc<Snapshot>)>>,
    recorded: tokio::sync::Notify,
}

impl Generations {
    /// Records the snapshot of `generation` (replacing an earlier record of the same number:
    /// a failed write reuses it).
    pub fn record(&self, generation: u32, snapshot: Arc<Snapshot>) {
        {
            let mut recent = self.recent.lock().expect("generations lock");
            recent.retain(|(g, _)| *g != generation);
            if recent.len() == KEPT_GENERATIONS {
                recent.pop_front();
            }
            recent.push_back((generation, snapshot));
        }
        self.recorded.notify_waiters();
    }

    pub fn get(&self, generation: u32) -> Option<Arc<Snapshot>> {
        let recent = self.recent.lock().expect("generations lock");
        recent.iter().rev().find(|(g, _)| *g == generation).map(|(_, s)| s.clone())
    }

    /// Whether `generation` is newer than every recorded one (being put in force right now).
    fn ahead(&self, generation: u32) -> bool {
        let recent = self.recent.lock().expect("generations lock");
        // Generations count up and wrap; "newer" is a positive wrapping distance.
        recent.back().is_none_or(|(newest, _)| (generation.wrapping_sub(*newest) as i32) > 0)
    }

    /// The snapshot of `generation`, waiting up to `wait` when it is about to be recorded.
    pub async fn wait_for(&self, generation: u32, wait: Duration) -> Option<Arc<Snapshot>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.recorded.notified();
            tokio::pin!(notified);
            // Registered before the check, so a record made in between is not missed.
            notified.as_mut().enable();
            if let Some(s) = self.get(generation) {
                return Some(s);
            }
            if !self.ahead(generation) || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

pub struct FlowHub {
    node: String,
    metrics: Arc<Metrics>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    generations: Arc<Generations>,
    recent: Mutex<VecDeque<Arc<FlowEvent>>>,
    live: broadcast::Sender<Arc<FlowEvent>>,
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl FlowHub {
    pub fn new(
        node: String,
        metrics: Arc<Metrics>,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        generations: Arc<Generations>,
    ) -> Self {
        FlowHub {
            node,
            metrics,
            snapshot,
            generations,
            recent: Mutex::new(VecDeque::with_capacity(HISTORY)),
            live: broadcast::channel(1024).0,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FlowEvent>> {
        self.live.subscribe()
    }

    pub fn recent(&self) -> Vec<FlowEvent> {
        self.recent.lock().expect("flow history").iter().map(|e| FlowEvent::clone(e)).collect()
    }

    /// Names identities and the deciding rule with the snapshot in force.
    pub fn describe(&self, src_identity: u32, dst_identity: u32, rule: u32) -> (String, String, String) {
        let s = self.snapshot.borrow();
        (
            s.identity_name(src_identity),
            s.identity_name(dst_identity),
            s.describe_verdict(&verdict_of(src_identity, dst_identity, rule)),
        )
    }

    /// Names a kernel verdict with the snapshot of the generation that took it; when that
    /// generation is no longer known, with the policy in force, and the rule says so.
    fn describe_kernel(&self, raw: &FlowEventRaw, decided: Option<Arc<Snapshot>>) -> (String, String, String) {
        let (s, fallback) = match decided {
            Some(s) => (s, None),
            None => (self.snapshot.borrow().clone(), Some(self.metrics.policy_generation.load(Ordering::Relaxed))),
        };
        let (src, dst) = (s.identity_name(raw.src_identity), s.identity_name(raw.dst_identity));
        let mut rule = s.describe_verdict(&verdict_of(raw.src_identity, raw.dst_identity, raw.rule));
        if let Some(current) = fallback {
            tracing::debug!(generation = raw.generation, "kernel event of a generation no longer known");
            rule.push_str(&format!(
                " (decided by policy generation {}, named with generation {current})",
                raw.generation
            ));
        }
        (src, dst, rule)
    }

    /// A verdict from the kernel ring buffer, named with the snapshot of its generation.
    pub fn record_kernel(&self, raw: &FlowEventRaw) {
        let decided = self.generations.get(raw.generation);
        self.record_kernel_with(raw, decided);
    }

    fn record_kernel_with(&self, raw: &FlowEventRaw, decided: Option<Arc<Snapshot>>) {
        let (direction, verdict) = match raw.kind {
            EVENT_CONNECT_ALLOW => (Direction::Outbound, Verdict::Allow),
            EVENT_CONNECT_DENY => (Direction::Outbound, Verdict::Deny),
            EVENT_INBOUND_ALLOW => (Direction::Inbound, Verdict::Allow),
            EVENT_INBOUND_DENY => (Direction::Inbound, Verdict::Deny),
            other => {
                tracing::warn!(kind = other, "unknown kernel flow event kind");
                return;
            }
        };
        self.metrics.verdict(direction, verdict == Verdict::Deny);
        let (src_identity, dst_identity, policy) = self.describe_kernel(raw, decided);
        self.record(FlowEvent {
            time_unix_ms: now_unix_ms(),
            node: self.node.clone(),
            observer: Observer::Kernel,
            direction,
            verdict,
            policy,
            src: SocketAddr::new(ip_from_addr(raw.src_addr), raw.src_port),
            dst: SocketAddr::new(ip_from_addr(raw.dst_addr), raw.dst_port),
            src_identity,
            dst_identity,
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: 0.0,
            error: None,
            transport: None,
            peer_spiffe_id: None,
            audit: None,
            policy_generation: Some(raw.generation),
        });
    }

    pub fn record(&self, event: FlowEvent) {
        self.metrics.flow_event();
        if let Some(audit) = &event.audit {
            self.metrics.audit_would_deny();
            tracing::warn!(target: "audit", src = %event.src, dst = %event.dst, src_identity = %event.src_identity, rule = %audit, "audit: would be denied");
        }
        match event.observer {
            Observer::Kernel => tracing::info!(
                target: "flows",
                direction = ?event.direction,
                verdict = ?event.verdict,
                src = %event.src,
                dst = %event.dst,
                src_identity = %event.src_identity,
                dst_identity = %event.dst_identity,
                policy = %event.policy,
                "verdict"
            ),
            Observer::Proxy => tracing::info!(
                target: "access",
                direction = ?event.direction,
                src = %event.src,
                dst = %event.dst,
                src_identity = %event.src_identity,
                dst_identity = %event.dst_identity,
                policy = %event.policy,
                bytes_sent = event.bytes_sent,
                bytes_received = event.bytes_received,
                duration_ms = event.duration_ms,
                error = event.error.as_deref().unwrap_or(""),
                transport = ?event.transport,
                peer = event.peer_spiffe_id.as_deref().unwrap_or(""),
                "connection complete"
            ),
        }
        let event = Arc::new(event);
        {
            let mut recent = self.recent.lock().expect("flow history");
            if recent.len() == HISTORY {
                recent.pop_front();
            }
            recent.push_back(event.clone());
        }
        // No subscriber is not an error.
        let _ = self.live.send(event);
    }
}

/// Drains the kernel's `EVENTS` ring buffer into the hub for as long as ztunnel runs.
pub async fn drain_kernel_events(ring: aya::maps::RingBuf<aya::maps::MapData>, hub: Arc<FlowHub>) {
    // SAFETY: the ring buffer owns its fd and is moved into the AsyncFd, which deregisters
    // it before dropping it; nothing else closes that fd.
    let mut fd = match unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
    {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the kernel event ring; kernel verdicts will not be reported");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "kernel event ring failed");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<FlowEventRaw>() {
                // SAFETY: the kernel wrote a FlowEventRaw; the read is unaligned-safe.
                let raw = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEventRaw>()) };
                let decided = match hub.generations.get(raw.generation) {
                    Some(s) => Some(s),
                    None => hub.generations.wait_for(raw.generation, GENERATION_WAIT).await,
                };
                hub.record_kernel_with(&raw, decided);
            }
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use palisade_model::Action;

    use super::*;

    const WORKLOADS: &str = "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {name: web, namespace: shop}\n\
        spec: {serviceAccount: web, labels: {app: web}, node: n1, addresses: [10.0.1.10]}\n---\n\
        apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {name: db, namespace: shop}\n\
        spec: {serviceAccount: db, labels: {app: db}, node: n2, addresses: [10.0.2.10]}\n---\n";

    fn snapshot(extra: &str) -> Arc<Snapshot> {
        let text = format!("{WORKLOADS}{extra}");
        let resources = palisade_model::load::parse_str(Path::new("t.yaml"), &text).expect("parses");
        palisade_model::validate::validate(&resources).expect("valid");
        Arc::new(palisade_model::compile(&resources))
    }

    fn policy(name: &str, action: &str, from_sa: &str) -> String {
        format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  selector: {{matchLabels: {{app: db}}}}\n  action: {action}\n  rules:\n  \
             - {{from: [{{serviceAccount: {from_sa}}}]}}\n---\n"
        )
    }

    /// Policy A denies web → db. Policy B, in force when the event is read, adds a workload
    /// that sorts first (so every identity number moves) and puts another rule first.
    fn a_then_b() -> (Arc<Snapshot>, Arc<Snapshot>) {
        let a = snapshot(&policy("deny-web", "Deny", "web"));
        let b = snapshot(&format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: audit, namespace: aaa}}\n\
             spec: {{serviceAccount: audit, node: n1, addresses: [10.0.1.20]}}\n---\n{}{}",
            policy("allow-audit", "Allow", "audit"),
            policy("deny-web", "Deny", "web")
        ));
        (a, b)
    }

    fn hub(current: Arc<Snapshot>, generations: Arc<Generations>) -> FlowHub {
        let metrics = Arc::new(Metrics::default());
        FlowHub::new("n1".into(), metrics, watch::channel(current).0.subscribe(), generations)
    }

    fn deny_event(s: &Snapshot, generation: u32) -> FlowEventRaw {
        let v = s.verdict("10.0.1.10".parse().unwrap(), "10.0.2.10".parse().unwrap(), 5432);
        assert_eq!(v.action, Action::Deny);
        FlowEventRaw {
            kind: EVENT_CONNECT_DENY,
            family: AF_INET,
            src_addr: addr_from_ip("10.0.1.10".parse().unwrap()),
            dst_addr: addr_from_ip("10.0.2.10".parse().unwrap()),
            dst_port: 5432,
            src_identity: v.src_identity,
            dst_identity: v.dst_identity,
            rule: v.rule,
            generation,
            ..Default::default()
        }
    }

    #[test]
    fn a_kernel_event_is_named_by_the_generation_that_decided_it() {
        let (a, b) = a_then_b();
        // The newest snapshot names the same numbers differently: that was the bug.
        let raw = deny_event(&a, 7);
        assert_ne!(b.describe_rule(raw.rule, raw.dst_identity), a.describe_rule(raw.rule, raw.dst_identity));
        assert_ne!(b.identity_name(raw.src_identity), "shop/web");
        let generations = Arc::new(Generations::default());
        generations.record(7, a);
        generations.record(8, b.clone());
        let hub = hub(b, generations);
        hub.record_kernel(&raw);
        let ev = hub.recent().pop().expect("an event");
        assert_eq!(ev.verdict, Verdict::Deny);
        assert_eq!(ev.policy, "shop/deny-web rule 0");
        assert_eq!((ev.src_identity.as_str(), ev.dst_identity.as_str()), ("shop/web", "shop/db"));
        assert_eq!(ev.policy_generation, Some(7));
    }

    #[test]
    fn an_event_of_a_forgotten_generation_says_which_policy_named_it() {
        let (a, b) = a_then_b();
        let generations = Arc::new(Generations::default());
        for g in 10..10 + KEPT_GENERATIONS as u32 {
            generations.record(g, b.clone());
        }
        let hub = hub(b, generations);
        hub.metrics.policy_generation.store(25, Ordering::Relaxed);
        hub.record_kernel(&deny_event(&a, 3));
        let ev = hub.recent().pop().expect("an event");
        assert!(ev.policy.ends_with("(decided by policy generation 3, named with generation 25)"), "{}", ev.policy);
    }

    #[tokio::test]
    async fn an_event_of_a_generation_being_recorded_waits_for_it() {
        let (a, b) = a_then_b();
        let generations = Arc::new(Generations::default());
        generations.record(1, a.clone());
        // Older than everything recorded and unknown: no wait.
        assert!(generations.wait_for(0, Duration::from_secs(30)).await.is_none());
        let later = generations.clone();
        let recorder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            later.record(2, b);
        });
        let found = generations.wait_for(2, Duration::from_secs(30)).await.expect("generation 2 recorded");
        assert_eq!(found.identity_name(256), "aaa/audit");
        recorder.await.unwrap();
        // Kept generations are a bounded ring.
        for g in 3..40 {
            generations.record(g, a.clone());
        }
        assert!(generations.get(1).is_none() && generations.get(39).is_some());
    }
}
