//! Flow events: every verdict the kernel takes (from the `EVENTS` ring buffer) and every
//! connection the proxies carry. Each event is counted in metrics, logged (target `flows`
//! for verdicts, `access` for finished connections), kept in a bounded recent history and
//! broadcast to live subscribers of the admin API (`/flows?follow=1`).
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use palisade_ebpf_common::*;
use palisade_policy::Snapshot;
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::metrics::{Direction, Metrics};

const HISTORY: usize = 4096;

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
}

pub struct FlowHub {
    node: String,
    metrics: Arc<Metrics>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    recent: Mutex<VecDeque<Arc<FlowEvent>>>,
    live: broadcast::Sender<Arc<FlowEvent>>,
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl FlowHub {
    pub fn new(node: String, metrics: Arc<Metrics>, snapshot: watch::Receiver<Arc<Snapshot>>) -> Self {
        FlowHub {
            node,
            metrics,
            snapshot,
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
        (s.identity_name(src_identity), s.identity_name(dst_identity), s.describe_rule(rule, dst_identity))
    }

    /// A verdict from the kernel ring buffer.
    pub fn record_kernel(&self, raw: &FlowEventRaw) {
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
        let (src_identity, dst_identity, policy) = self.describe(raw.src_identity, raw.dst_identity, raw.rule);
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
                hub.record_kernel(&raw);
            }
        }
        guard.clear_ready();
    }
}
