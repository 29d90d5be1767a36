//! ztunnel's Prometheus metrics: a fixed set of atomic counters, rendered in the text format.
//! The label sets are small and known in advance, so no registry is needed.
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    fn index(self) -> usize {
        self as usize
    }
    fn label(i: usize) -> &'static str {
        ["outbound", "inbound"][i]
    }
}

#[derive(Default)]
pub struct Metrics {
    /// [direction][allow=0, deny=1]: verdicts taken in the kernel.
    verdicts: [[AtomicU64; 2]; 2],
    proxied: [AtomicU64; 2],
    proxy_errors: [AtomicU64; 2],
    active: [AtomicI64; 2],
    /// [direction][sent=0, received=1], seen from the client of the connection.
    bytes: [[AtomicU64; 2]; 2],
    missing_orig_dst: AtomicU64,
    pub enrolled_pods: AtomicI64,
    pub policy_generation: AtomicU64,
    policy_reloads_ok: AtomicU64,
    policy_reloads_failed: AtomicU64,
    /// Distinct failures to read the policy files (a lasting one counts once).
    policy_read_errors: AtomicU64,
    flow_events: AtomicU64,
    audit_would_deny: AtomicU64,
    /// Last successful reload, microseconds / count.
    policy_compile_us: AtomicU64,
    policy_apply_us: AtomicU64,
    policy_cells: AtomicU64,
    policy_identities: AtomicU64,
}

impl Metrics {
    pub fn verdict(&self, direction: Direction, denied: bool) {
        self.verdicts[direction.index()][denied as usize].fetch_add(1, Relaxed);
    }
    pub fn connection_opened(&self, direction: Direction) {
        self.proxied[direction.index()].fetch_add(1, Relaxed);
        self.active[direction.index()].fetch_add(1, Relaxed);
    }
    pub fn connection_closed(&self, direction: Direction, sent: u64, received: u64) {
        let d = direction.index();
        self.active[d].fetch_sub(1, Relaxed);
        self.bytes[d][0].fetch_add(sent, Relaxed);
        self.bytes[d][1].fetch_add(received, Relaxed);
    }
    pub fn active_connections(&self) -> i64 {
        self.active.iter().map(|a| a.load(Relaxed)).sum()
    }
    /// Proxied connections that have ended, both directions.
    pub fn closed_connections(&self) -> u64 {
        let opened: u64 = self.proxied.iter().map(|p| p.load(Relaxed)).sum();
        let active: i64 = self.active.iter().map(|a| a.load(Relaxed)).sum();
        opened.saturating_sub(active.max(0) as u64)
    }
    pub fn proxy_error(&self, direction: Direction) {
        self.proxy_errors[direction.index()].fetch_add(1, Relaxed);
    }
    pub fn missing_orig_dst(&self) {
        self.missing_orig_dst.fetch_add(1, Relaxed);
    }
    pub fn policy_reload(&self, ok: bool) {
        if ok { &self.policy_reloads_ok } else { &self.policy_reloads_failed }.fetch_add(1, Relaxed);
    }
    pub fn policy_read_error(&self) {
        self.policy_read_errors.fetch_add(1, Relaxed);
    }
    pub fn policy_applied(&self, stats: &crate::datapath::ApplyStats) {
        self.policy_compile_us.store((stats.compile_ms * 1e3) as u64, Relaxed);
        self.policy_apply_us.store((stats.elapsed_ms * 1e3) as u64, Relaxed);
        self.policy_cells.store(stats.cells as u64, Relaxed);
        self.policy_identities.store(stats.identities as u64, Relaxed);
    }
    pub fn audit_would_deny(&self) {
        self.audit_would_deny.fetch_add(1, Relaxed);
    }
    pub fn flow_event(&self) {
        self.flow_events.fetch_add(1, Relaxed);
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, i128)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let per_direction = |values: &[AtomicU64; 2]| -> Vec<(String, i128)> {
            (0..2)
                .map(|d| (format!("{{direction=\"{}\"}}", Direction::label(d)), values[d].load(Relaxed).into()))
                .collect()
        };
        let two_way = |values: &[[AtomicU64; 2]; 2], key: &str, names: [&str; 2]| -> Vec<(String, i128)> {
            let mut v = Vec::new();
            for (d, row) in values.iter().enumerate() {
                for (name, value) in names.iter().zip(row) {
                    let labels = format!("{{direction=\"{}\",{key}=\"{name}\"}}", Direction::label(d));
                    v.push((labels, value.load(Relaxed).into()));
                }
            }
            v
        };
        let single = |v: i128| vec![(String::new(), v)];
        family(
            "palisade_verdicts_total",
            "counter",
            "L4 verdicts taken in the kernel.",
            &two_way(&self.verdicts, "verdict", ["allow", "deny"]),
        );
        family(
            "palisade_proxied_connections_total",
            "counter",
            "Connections carried by ztunnel.",
            &per_direction(&self.proxied),
        );
        family(
            "palisade_proxy_errors_total",
            "counter",
            "Connections ztunnel could not carry.",
            &per_direction(&self.proxy_errors),
        );
        let active: Vec<(String, i128)> = (0..2)
            .map(|d| (format!("{{direction=\"{}\"}}", Direction::label(d)), self.active[d].load(Relaxed).into()))
            .collect();
        family("palisade_active_connections", "gauge", "Connections ztunnel carries now.", &active);
        family(
            "palisade_proxied_bytes_total",
            "counter",
            "Bytes carried, as the connection's client sees them.",
            &two_way(&self.bytes, "way", ["sent", "received"]),
        );
        family(
            "palisade_missing_original_destination_total",
            "counter",
            "Captured connections closed because their original destination was not found.",
            &single(self.missing_orig_dst.load(Relaxed).into()),
        );
        family(
            "palisade_enrolled_pods",
            "gauge",
            "Pods captured by this ztunnel.",
            &single(self.enrolled_pods.load(Relaxed).into()),
        );
        family(
            "palisade_policy_generation",
            "gauge",
            "Generation of the policy in force in the kernel.",
            &single(self.policy_generation.load(Relaxed).into()),
        );
        family(
            "palisade_policy_reloads_total",
            "counter",
            "Policy reloads by result.",
            &[
                ("{result=\"ok\"}".into(), self.policy_reloads_ok.load(Relaxed).into()),
                ("{result=\"rejected\"}".into(), self.policy_reloads_failed.load(Relaxed).into()),
            ],
        );
        family(
            "palisade_policy_reload_errors_total",
            "counter",
            "Times the policy files became unreadable (missing, over a limit); a lasting failure counts once.",
            &single(self.policy_read_errors.load(Relaxed).into()),
        );
        family(
            "palisade_flow_events_total",
            "counter",
            "Flow events recorded.",
            &single(self.flow_events.load(Relaxed).into()),
        );
        family(
            "palisade_audit_would_deny_total",
            "counter",
            "Allowed connections an Audit-mode policy would deny.",
            &single(self.audit_would_deny.load(Relaxed).into()),
        );
        let seconds = |us: &AtomicU64| format!("{:.6}", us.load(Relaxed) as f64 / 1e6);
        for (name, help, value) in [
            (
                "palisade_policy_compile_seconds",
                "Last reload: reading, validating and compiling the resources.",
                seconds(&self.policy_compile_us),
            ),
            (
                "palisade_policy_apply_seconds",
                "Last reload: writing the kernel maps and switching generation.",
                seconds(&self.policy_apply_us),
            ),
            ("palisade_policy_cells", "Policy cells in the kernel.", self.policy_cells.load(Relaxed).to_string()),
            (
                "palisade_policy_address_entries",
                "Address entries in the kernel's identity trie.",
                self.policy_identities.load(Relaxed).to_string(),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        crate::limits::render(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_each_sample_under_its_family() {
        let m = Metrics::default();
        m.verdict(Direction::Outbound, true);
        m.connection_opened(Direction::Inbound);
        m.connection_closed(Direction::Inbound, 10, 20);
        let text = m.render();
        let deny = text.find("palisade_verdicts_total{direction=\"outbound\",verdict=\"deny\"} 1").unwrap();
        let header = text.find("# TYPE palisade_verdicts_total counter").unwrap();
        assert!(header < deny, "{text}");
        assert!(text.contains("palisade_proxied_bytes_total{direction=\"inbound\",way=\"received\"} 20"), "{text}");
        assert!(text.contains("palisade_active_connections{direction=\"inbound\"} 0"), "{text}");
    }
}
