//! Random small meshes (workloads, namespaces, segmentation policies drawn from a small
//! vocabulary so that names, labels, principals and address blocks collide often) through the
//! validator and the compiler, then the promise the kernel cells make: they never deny a
//! connection that the exact evaluation (`Snapshot::authorize`) allows. Also: proving the
//! identity of the workload at the source address changes nothing about the decision.
#![no_main]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use palisade_model::load::{Located, Origin};
use palisade_model::resource::{
    API_VERSION, EgressRule, Metadata, NAMESPACE_NAME_LABEL, NamespaceSpec, Peer, Resource, Rule, SegmentationSpec,
    Selector, WorkloadSpec,
};
use palisade_model::{Action, Mode, compile, validate};

const NAMESPACES: &[&str] = &["a", "b", "c"];
const ACCOUNTS: &[&str] = &["x", "y", "z"];
const LABEL_KEYS: &[&str] = &["app", "tier"];
const LABEL_VALUES: &[&str] = &["web", "db"];
/// Workload addresses; `::ffff:10.0.0.6` is the v4-mapped form of `10.0.0.6`.
const ADDRESSES: &[&str] =
    &["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.5", "10.0.0.6", "10.0.1.1", "fd00::1", "fd00::2", "::ffff:10.0.0.6"];
/// Sources that are no workload's address (some inside the blocks below).
const OUTSIDERS: &[&str] = &["10.0.0.9", "192.0.2.7", "198.51.100.1", "198.51.100.200", "fd00::9", "2001:db8::1"];
const BLOCKS: &[&str] = &[
    "10.0.0.0/29",
    "10.0.0.4/30",
    "10.0.0.0/8",
    "10.0.0.1",
    "192.0.2.0/24",
    "0.0.0.0/0",
    "fd00::/64",
    "::/0",
    // The v4-mapped form of an address block reads its prefix as IPv4 (`/104` would be refused).
    "::ffff:10.0.0.4/30",
    "198.51.100.0/25",
];
const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/a/sa/x",
    "spiffe://cluster.local/ns/b/sa/*",
    "*",
    "cluster.local/ns/*/sa/y",
    "other.domain/ns/a/sa/x",
    "cluster.local/ns/c/*",
];
const PORTS: &[u16] = &[22, 80, 443, 5432, 8080];

fn pick<T: Copy>(from: &[T], i: u8) -> T {
    from[usize::from(i) % from.len()]
}

fn names(from: &[&str], picks: &[u8]) -> Vec<String> {
    picks.iter().take(3).map(|&i| pick(from, i).to_string()).collect()
}

fn labels(picks: &[(u8, u8)]) -> BTreeMap<String, String> {
    picks.iter().take(2).map(|&(k, v)| (pick(LABEL_KEYS, k).into(), pick(LABEL_VALUES, v).into())).collect()
}

#[derive(Arbitrary, Debug)]
struct Input {
    workloads: Vec<WorkloadIn>,
    namespaces: Vec<(u8, bool)>,
    policies: Vec<PolicyIn>,
    port: u16,
}

#[derive(Arbitrary, Debug)]
struct WorkloadIn {
    namespace: u8,
    account: u8,
    labels: Vec<(u8, u8)>,
    addresses: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct PolicyIn {
    namespace: u8,
    selector: Vec<(u8, u8)>,
    deny: bool,
    audit: bool,
    rules: Vec<RuleIn>,
    /// Egress rules (`Some(vec![])`: egress isolation).
    egress: Option<Vec<RuleIn>>,
}

#[derive(Arbitrary, Debug)]
struct RuleIn {
    from: Vec<PeerIn>,
    ports: Vec<u8>,
    not_ports: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct PeerIn {
    namespace: Option<u8>,
    account: Option<u8>,
    labels: Vec<(u8, u8)>,
    namespaces: Vec<u8>,
    not_namespaces: Vec<u8>,
    principals: Vec<u8>,
    not_principals: Vec<u8>,
    ip_blocks: Vec<u8>,
    not_ip_blocks: Vec<u8>,
    /// Namespaces by their implicit name label.
    namespace_selector: Option<Vec<u8>>,
}

fn blocks(picks: &[u8]) -> Vec<palisade_model::cidr::Cidr> {
    picks.iter().take(3).map(|&i| pick(BLOCKS, i).parse().expect("a valid block")).collect()
}

fn peer(p: &PeerIn) -> Peer {
    Peer {
        namespace: p.namespace.map(|i| pick(NAMESPACES, i).into()),
        service_account: p.account.map(|i| pick(ACCOUNTS, i).into()),
        match_labels: labels(&p.labels),
        match_expressions: vec![],
        namespace_selector: p.namespace_selector.as_ref().map(|n| Selector {
            match_labels: names(NAMESPACES, n).into_iter().take(1).map(|n| (NAMESPACE_NAME_LABEL.into(), n)).collect(),
            match_expressions: vec![],
        }),
        namespaces: names(NAMESPACES, &p.namespaces),
        not_namespaces: names(NAMESPACES, &p.not_namespaces),
        principals: names(PRINCIPALS, &p.principals),
        not_principals: names(PRINCIPALS, &p.not_principals),
        ip_blocks: blocks(&p.ip_blocks),
        not_ip_blocks: blocks(&p.not_ip_blocks),
    }
}

fn located(line: usize, resource: Resource) -> Located {
    Located { origin: Origin { file: PathBuf::from("fuzz.yaml"), line }, resource }
}

fn metadata(name: String, namespace: Option<&str>) -> Metadata {
    Metadata { name, namespace: namespace.map(str::to_string), labels: BTreeMap::new() }
}

/// Resources the validator accepts for most inputs: what it would refuse for reasons the
/// compiler never sees (a workload without an address, an address used twice as written, a
/// policy without rules, an empty source) is left out or filled in, so the executions go to
/// the compiler.
fn resources(input: &Input) -> Vec<Located> {
    let mut out = Vec::new();
    let mut taken = std::collections::HashSet::new();
    for (i, w) in input.workloads.iter().take(6).enumerate() {
        let addresses: Vec<IpAddr> = w
            .addresses
            .iter()
            .take(2)
            .map(|&a| pick(ADDRESSES, a).parse().unwrap())
            .filter(|a| taken.insert(*a))
            .collect();
        if addresses.is_empty() {
            continue;
        }
        let spec = WorkloadSpec {
            service_account: pick(ACCOUNTS, w.account).into(),
            labels: labels(&w.labels),
            addresses,
            node: "n1".into(),
            uid: None,
            ports: vec![],
        };
        let metadata = metadata(format!("w{i}"), Some(pick(NAMESPACES, w.namespace)));
        out.push(located(out.len() + 1, Resource::Workload { api_version: API_VERSION.into(), metadata, spec }));
    }
    for &(ns, deny) in input.namespaces.iter().take(3) {
        let spec = NamespaceSpec { default_action: if deny { Action::Deny } else { Action::Allow } };
        let metadata = metadata(pick(NAMESPACES, ns).into(), None);
        out.push(located(out.len() + 1, Resource::Namespace { api_version: API_VERSION.into(), metadata, spec }));
    }
    for (i, p) in input.policies.iter().take(4).enumerate() {
        let mut rules: Vec<Rule> = p
            .rules
            .iter()
            .take(3)
            .map(|r| Rule {
                from: r.from.iter().take(3).map(peer).filter(|p| !p.is_empty()).collect(),
                ports: r.ports.iter().take(2).map(|&i| pick(PORTS, i)).collect(),
                not_ports: r.not_ports.iter().take(2).map(|&i| pick(PORTS, i)).collect(),
            })
            .collect();
        let egress: Option<Vec<EgressRule>> = p.egress.as_ref().map(|e| {
            e.iter()
                .take(3)
                .map(|r| EgressRule {
                    to: r.from.iter().take(3).map(peer).filter(|p| !p.is_empty()).collect(),
                    ports: r.ports.iter().take(2).map(|&i| pick(PORTS, i)).collect(),
                    not_ports: r.not_ports.iter().take(2).map(|&i| pick(PORTS, i)).collect(),
                })
                .collect()
        });
        if rules.is_empty() && egress.is_none() {
            rules.push(Rule::default());
        }
        let spec = SegmentationSpec {
            selector: Selector { match_labels: labels(&p.selector), match_expressions: vec![] },
            action: if p.deny { Action::Deny } else { Action::Allow },
            mode: if p.audit { Mode::Audit } else { Mode::Enforce },
            rules,
            egress,
        };
        let metadata = metadata(format!("p{i}"), Some(pick(NAMESPACES, p.namespace)));
        out.push(located(
            out.len() + 1,
            Resource::SegmentationPolicy { api_version: API_VERSION.into(), metadata, spec },
        ));
    }
    out
}

fuzz_target!(|input: Input| {
    let resources = resources(&input);
    if validate::validate(&resources).is_err() {
        return;
    }
    let snapshot = compile(&resources);
    let used: Vec<IpAddr> = resources
        .iter()
        .filter_map(|r| match &r.resource {
            Resource::Workload { spec, .. } => Some(spec.addresses.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    let outsiders = OUTSIDERS.iter().map(|a| a.parse::<IpAddr>().unwrap());
    // The v4-mapped form of every workload address is the same endpoint.
    let mapped = used.iter().filter_map(|a| match a {
        IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
        IpAddr::V6(_) => None,
    });
    let sources: Vec<IpAddr> = used.iter().copied().chain(outsiders).chain(mapped).collect();
    // Egress rules make destinations outside the mesh worth checking too.
    let destinations: Vec<IpAddr> = used.iter().copied().chain(OUTSIDERS.iter().map(|a| a.parse().unwrap())).collect();
    let ports: Vec<u16> = PORTS.iter().copied().chain([9999, input.port.max(1)]).collect();
    for &src in &sources {
        let at_source = snapshot.identity(snapshot.identity_of(src)).map(|i| i.labels.clone());
        for &dst in &destinations {
            for &port in &ports {
                let kernel = snapshot.verdict(src, dst, port);
                let exact = snapshot.authorize(src, None, dst, port);
                assert!(
                    !(kernel.action == Action::Deny && exact.verdict.action == Action::Allow),
                    "the kernel cells deny {src} -> {dst}:{port} (rule {}), which the exact evaluation allows \
                     (rule {}): {:#?}",
                    snapshot.describe_rule(kernel.rule, kernel.dst_identity),
                    snapshot.describe_rule(exact.verdict.rule, exact.verdict.dst_identity),
                    resources,
                );
                if let Some(l) = &at_source {
                    let proven = snapshot.authorize(src, Some((&l.namespace, &l.service_account)), dst, port);
                    assert_eq!(proven, exact, "proving the identity at {src} changed the decision for {dst}:{port}");
                }
            }
        }
    }
});
