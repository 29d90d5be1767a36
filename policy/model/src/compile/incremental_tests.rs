//! The incremental compiler against the from-scratch compile: after every step of a random
//! sequence of changes, both snapshots decide every connection alike and hold the same cells
//! (modulo rule and block numbering, which the incremental one keeps stable).
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use palisade_ebpf_common::RULE_EGRESS_DEFAULT_DENY;

use super::*;
use crate::key::ResourceKey;
use crate::load::{Located, parse_str};

const TD: &str = "cluster.local";
const SLOTS: usize = 8;
const NAMESPACES: usize = 3;
const PORTS: [u16; 5] = [22, 80, 8080, 8090, 9090];

/// xorshift64*: deterministic, enough for choosing.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

fn workload(rng: &mut Rng, slot: usize) -> String {
    let ns = slot % NAMESPACES;
    let mut labels = format!("app: {}", rng.pick(&["a", "b", "c"]));
    if rng.chance(40) {
        labels.push_str(&format!(", tier: {}", rng.pick(&["x", "y"])));
    }
    let mut addresses = format!("10.0.0.{}", slot + 1);
    if rng.chance(25) {
        addresses.push_str(&format!(", 10.0.1.{}", slot + 1));
    }
    let ports: Vec<&str> =
        ["{name: http, containerPort: 80}", "{name: http, containerPort: 8080}", "{name: grpc, containerPort: 9090}"]
            .into_iter()
            .filter(|_| rng.chance(40))
            .take(2)
            .collect();
    let sa = rng.pick(&["sa0", "sa1"]);
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w{slot}, namespace: ns{ns}}}\n\
         spec: {{serviceAccount: {sa}, node: n1, labels: {{{labels}}}, addresses: [{addresses}], ports: [{}]}}\n",
        ports.join(", ")
    )
}

fn namespace(rng: &mut Rng, n: usize) -> String {
    let team = rng.pick(&["t0", "t1"]);
    if rng.chance(50) {
        let action = rng.pick(&["Allow", "Deny"]);
        format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {{name: ns{n}, labels: {{team: {team}}}}}\n\
             spec: {{defaultAction: {action}}}\n"
        )
    } else {
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{n}, labels: {{team: {team}}}}}\n")
    }
}

const SEG_PEERS: [&str; 8] = [
    "{namespace: ns1, matchLabels: {app: b}}",
    "{namespace: ns0, serviceAccount: sa0}",
    "{matchLabels: {app: a}}",
    "{namespaces: [ns0, ns2]}",
    "{ipBlocks: [10.0.0.0/29]}",
    "{ipBlocks: [192.0.2.0/24]}",
    "{namespaceSelector: {matchLabels: {team: t0}}}",
    "{notNamespaces: [ns1]}",
];

/// Egress only: a Service as destination (its endpoints).
const SERVICE_PEERS: [&str; 2] = ["{service: svc0}", "{service: svc1, namespace: ns1}"];

fn seg_rule(rng: &mut Rng, field: &str) -> String {
    let peer = match field == "to" && rng.chance(25) {
        true => rng.pick(&SERVICE_PEERS),
        false => rng.pick(&SEG_PEERS),
    };
    let ports = rng.pick(&["[80]", "[80, 8080]", "[]", "[9090]"]);
    let not_ports = if rng.chance(15) { ", notPorts: [22]" } else { "" };
    format!("  - {{{field}: [{peer}], ports: {ports}{not_ports}}}\n")
}

fn segmentation(rng: &mut Rng, k: usize) -> String {
    let ns = k % NAMESPACES;
    let selector = rng.pick(&["{matchLabels: {app: a}}", "{matchLabels: {app: b}}", "{}", "{matchLabels: {tier: x}}"]);
    let action = rng.pick(&["Allow", "Allow", "Deny"]);
    let mode = if rng.chance(10) { "Audit" } else { "Enforce" };
    let mut out = format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: sp{k}, namespace: ns{ns}}}\n\
         spec:\n  selector: {selector}\n  action: {action}\n  mode: {mode}\n"
    );
    let (ingress, egress) = match rng.below(3) {
        0 => (true, false),
        1 => (false, true),
        _ => (true, true),
    };
    if ingress {
        out.push_str("  rules:\n");
        for _ in 0..1 + rng.below(2) {
            out.push_str(&seg_rule(rng, "from"));
        }
    }
    if egress {
        out.push_str("  egress:\n");
        for _ in 0..1 + rng.below(2) {
            out.push_str(&seg_rule(rng, "to"));
        }
    }
    out
}

const NP_PEERS: [&str; 5] = [
    "{podSelector: {matchLabels: {app: a}}}",
    "{namespaceSelector: {matchLabels: {team: t1}}}",
    "{namespaceSelector: {}, podSelector: {matchLabels: {app: c}}}",
    "{ipBlock: {cidr: 10.0.0.0/28, except: [10.0.0.4/30]}}",
    "{ipBlock: {cidr: 198.51.100.0/24}}",
];

fn np_rule(rng: &mut Rng, field: &str) -> String {
    let ports = rng.pick(&["[{port: http}]", "[{port: 80}]", "[{port: 8000, endPort: 8100}]", "[]", "[{port: grpc}]"]);
    if rng.chance(20) {
        return format!("  - ports: {ports}\n");
    }
    format!("  - {{{field}: [{}], ports: {ports}}}\n", rng.pick(&NP_PEERS))
}

fn network_policy(rng: &mut Rng, k: usize) -> String {
    let ns = k % NAMESPACES;
    let selector = rng.pick(&["{matchLabels: {app: a}}", "{matchLabels: {app: b}}", "{}"]);
    let types = rng.pick(&["[Ingress]", "[Egress]", "[Ingress, Egress]"]);
    let mut out = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np{k}, namespace: ns{ns}}}\n\
         spec:\n  podSelector: {selector}\n  policyTypes: {types}\n"
    );
    for (kind, field) in [("Ingress", "from"), ("Egress", "to")] {
        if types.contains(kind) && rng.chance(80) {
            out.push_str(&format!("  {}:\n", kind.to_lowercase()));
            for _ in 0..rng.below(3) {
                out.push_str(&np_rule(rng, field));
            }
            if out.ends_with(":\n") {
                out.push_str(&np_rule(rng, field));
            }
        }
    }
    out
}

fn service(rng: &mut Rng, k: usize) -> String {
    let ns = k % NAMESPACES;
    let app = rng.pick(&["a", "b"]);
    let target = rng.pick(&["http", "8080", "grpc"]);
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc{k}, namespace: ns{ns}}}\nspec:\n  clusterIP: 10.96.0.{}\n  \
         selector: {{app: {app}}}\n  ports:\n  - {{name: web, port: 80, targetPort: {target}}}\n  - {{port: 90, targetPort: 9090}}\n",
        k + 1
    )
}

fn parse(text: &str) -> Located {
    parse_str(Path::new("gen.yaml"), text).expect("generated YAML parses").remove(0)
}

fn random_resource(rng: &mut Rng) -> Located {
    let text = match rng.below(10) {
        0..=2 => {
            let i = rng.below(SLOTS);
            workload(rng, i)
        }
        3 => {
            let i = rng.below(NAMESPACES);
            namespace(rng, i)
        }
        4..=6 => {
            let i = rng.below(5);
            segmentation(rng, i)
        }
        7 | 8 => {
            let i = rng.below(4);
            network_policy(rng, i)
        }
        _ => {
            let i = rng.below(2);
            service(rng, i)
        }
    };
    parse(&text)
}

/// A rule by what it is, not by its number.
fn rule_name(s: &Snapshot, n: u32) -> String {
    if n >= RULE_EGRESS_DEFAULT_DENY {
        return format!("#{n}");
    }
    match s.rules.get(n) {
        Some(r) => format!("{} {} {:?} {}", r.kind, r.policy, r.direction, r.index),
        None => format!("unknown rule {n}"),
    }
}

fn id_name(s: &Snapshot, id: u32) -> String {
    match s.identity(id) {
        Some(i) => format!("{:?}", i.labels),
        None => s.identity_name(id),
    }
}

fn verdict(s: &Snapshot, v: &Verdict) -> String {
    format!("{:?} {} {} -> {}", v.action, rule_name(s, v.rule), id_name(s, v.src_identity), id_name(s, v.dst_identity))
}

fn decision(s: &Snapshot, d: &Decision) -> String {
    let part = |p: Option<(Action, u32)>| p.map(|(a, r)| format!("{a:?} {}", rule_name(s, r)));
    format!(
        "{} audit {:?} egress {:?} ingress {:?}",
        verdict(s, &d.verdict),
        d.audit_deny.map(|r| rule_name(s, r)),
        part(d.egress),
        part(d.ingress)
    )
}

fn cells(s: &Snapshot) -> BTreeMap<(String, String, u16, Direction), (Action, String)> {
    s.cells
        .iter()
        .map(|(k, c)| ((id_name(s, k.src), id_name(s, k.dst), k.port, k.direction), (c.action, rule_name(s, c.rule))))
        .collect()
}

/// Both snapshots decide alike for every pair of interesting addresses and port.
fn assert_same(step: usize, inc: &Snapshot, full: &Snapshot) {
    assert_eq!(cells(inc), cells(full), "step {step}: cells");
    assert_eq!(format!("{:?}", inc.identities), format!("{:?}", full.identities), "step {step}: identities");
    assert_eq!(inc.approximations, full.approximations, "step {step}: approximations");
    assert_eq!(inc.services, full.services, "step {step}: services");
    assert_eq!(format!("{:?}", inc.workloads), format!("{:?}", full.workloads), "step {step}: workloads");
    assert_eq!(inc.rules.len(), full.rules.len(), "step {step}: rules");
    let mut addrs: Vec<IpAddr> = full.addresses.keys().copied().collect();
    addrs.extend(full.services.iter().map(|s| s.vip));
    addrs.extend(["10.0.0.200", "192.0.2.7", "198.51.100.9", "10.0.0.5"].map(|a| a.parse::<IpAddr>().unwrap()));
    addrs.sort();
    addrs.dedup();
    for &src in &addrs {
        let proven = full
            .identity(full.identity_of(src))
            .map(|i| (i.labels.namespace.clone(), i.labels.service_account.clone()));
        let proven = proven.as_ref().map(|(n, s)| (n.as_str(), s.as_str()));
        for &dst in &addrs {
            for port in PORTS.iter().chain(&[90]) {
                let (a, b) = (inc.verdict(src, dst, *port), full.verdict(src, dst, *port));
                assert_eq!(verdict(inc, &a), verdict(full, &b), "step {step}: verdict {src} -> {dst}:{port}");
                for who in [proven, None] {
                    let (a, b) = (inc.authorize(src, who, dst, *port), full.authorize(src, who, dst, *port));
                    assert_eq!(
                        decision(inc, &a),
                        decision(full, &b),
                        "step {step}: authorize {src} {who:?} -> {dst}:{port}"
                    );
                }
            }
        }
    }
}

/// Numbers as the control plane's store gives them: every identity ever seen, for good.
fn stored(store: &mut BTreeMap<IdentityLabels, u32>, c: &Compiler, upserts: &[Located]) -> Identities {
    let mut all: Vec<Located> = c.resources().into_iter().cloned().collect();
    all.extend(upserts.iter().cloned());
    for l in identity_labels_of(&all) {
        let next = 300 + store.len() as u32 * 3;
        store.entry(l).or_insert(next);
    }
    Identities::new(store.iter().map(|(l, n)| (l.clone(), *n))).expect("distinct numbers")
}

/// Numbers from a map that numbers some identities only (the rest by rank above it).
fn numbering(rng: &mut Rng, c: &Compiler) -> Identities {
    if rng.chance(50) {
        return Identities::default();
    }
    let owned: Vec<Located> = c.resources().into_iter().cloned().collect();
    let labels = identity_labels_of(&owned);
    let offset = rng.below(7) as u32;
    Identities::new(
        labels
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(i, l)| (l, 400 + offset + (i as u32 * 7) % 50)),
    )
    .unwrap_or_default()
}

#[test]
fn random_changes_compile_like_a_full_compile() {
    for seed in [0x9e37_79b9_7f4a_7c15_u64, 42, 7_777_777] {
        let mut rng = Rng(seed);
        let mut compiler = Compiler::new(TD);
        let mut store = BTreeMap::new();
        for step in 0..200 {
            let mut upserts = Vec::new();
            let mut removals = Vec::new();
            for _ in 0..1 + rng.below(3) {
                let held = compiler.resources();
                if !held.is_empty() && rng.chance(30) {
                    removals.push(ResourceKey::of(&held[rng.below(held.len())].resource));
                } else {
                    upserts.push(random_resource(&mut rng));
                }
            }
            // Phases: the compiler's own numbers, a partial map, the store's map.
            let ids = match step / 25 % 3 {
                0 => Identities::default(),
                1 => numbering(&mut rng, &compiler),
                _ => stored(&mut store, &compiler, &upserts),
            };
            let inc = compiler.update(upserts, &removals, &ids);
            let owned: Vec<Located> = compiler.resources().into_iter().cloned().collect();
            let full = compile_with(&owned, TD, &ids);
            assert_same(step, &inc, &full);
        }
    }
}

#[test]
fn a_first_update_numbers_as_the_full_compile_does() {
    let mut rng = Rng(5);
    let resources: Vec<Located> = (0..40).map(|_| random_resource(&mut rng)).collect();
    let mut compiler = Compiler::new(TD);
    let inc = compiler.update(resources, &[], &Identities::default());
    let owned: Vec<Located> = compiler.resources().into_iter().cloned().collect();
    let full = compile_with(&owned, TD, &Identities::default());
    assert_eq!(inc.cells, full.cells);
    assert_eq!(inc.rules, full.rules);
    assert_eq!(format!("{:?}", inc.cidrs), format!("{:?}", full.cidrs));
}

#[test]
fn adding_or_removing_a_policy_keeps_the_other_numbers() {
    let mut rng = Rng(11);
    let mut compiler = Compiler::new(TD);
    let mut resources: Vec<Located> = (0..SLOTS).map(|slot| parse(&workload(&mut rng, slot))).collect();
    resources.extend((0..5).map(|k| parse(&segmentation(&mut rng, k))));
    let before = compiler.update(resources, &[], &Identities::default());
    // A policy sorting before every other one (namespace ns0, name "a…").
    let first = parse(
        "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: a-first, namespace: ns0}\n\
         spec:\n  selector: {}\n  action: Allow\n  rules:\n  - {from: [{ipBlocks: [0.0.0.0/1]}], ports: [80]}\n",
    );
    let key = ResourceKey::of(&first.resource);
    let added = compiler.update(vec![first], &[], &Identities::default());
    let numbers = |s: &Snapshot| -> BTreeMap<String, u32> {
        s.policies.iter().map(|p| (format!("{}/{:?}", p.name, p.direction), p.first_rule)).collect()
    };
    let (b, a) = (numbers(&before), numbers(&added));
    assert!(b.iter().all(|(k, n)| a.get(k) == Some(n)), "{b:?} {a:?}");
    let blocks = |s: &Snapshot| -> Vec<(String, u32)> { s.cidrs.iter().map(|c| (c.cidr.to_string(), c.id)).collect() };
    assert!(blocks(&before).iter().all(|c| blocks(&added).contains(c)), "{:?} {:?}", blocks(&before), blocks(&added));
    // The other policies' cells keep their numbers: only cells the new policy wins differ.
    for (k, _) in before.cells.iter().filter(|(k, c)| added.cells.get(k) != Some(c)) {
        let winner = added.cells.get(k).map(|c| rule_name(&added, c.rule));
        assert!(winner.as_deref().is_some_and(|w| w.contains("ns0/a-first")), "{k:?}: {winner:?}");
    }
    let removed = compiler.update(vec![], &[key], &Identities::default());
    assert_eq!(numbers(&removed), b);
    assert_eq!(removed.cells, before.cells);
}
