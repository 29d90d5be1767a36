//! How long the incremental compiler takes at the bench's scale (10,000 workloads, 10,000
//! policies, 100,000 rules) for one changed policy or workload, against a full compile.
//! `cargo run --release -p palisade-model --example incremental_timing`
use std::path::Path;
use std::time::{Duration, Instant};

use palisade_model::compile::{Compiler, Identities, compile_with, identity_labels_of};
use palisade_model::key::ResourceKey;
use palisade_model::load::{Batch, Located, parse_into, parse_str};

const WORKLOADS: usize = 10_000;
const RULES_PER_POLICY: usize = 10;
const PER_NAMESPACE: usize = 100;

fn workload(i: usize, app: &str) -> String {
    let (ns, w) = (i / PER_NAMESPACE, i % PER_NAMESPACE);
    let ip = format!("10.100.{}.{}", i / 250, i % 250 + 1);
    format!(
        "---\napiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w{w}, namespace: ns{ns}}}\n\
         spec: {{serviceAccount: sa{w}, node: bench-node, labels: {{app: {app}}}, addresses: [{ip}]}}\n"
    )
}

fn policy(i: usize, selector: &str, first_port: usize) -> String {
    let (ns, w) = (i / PER_NAMESPACE, i % PER_NAMESPACE);
    let mut y = format!(
        "---\napiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: p{w}, namespace: ns{ns}}}\n\
         spec:\n  selector: {{matchLabels: {{app: {selector}}}}}\n  action: Allow\n  rules:\n"
    );
    for j in 0..RULES_PER_POLICY {
        let from = (w + j + 1) % PER_NAMESPACE;
        y.push_str(&format!(
            "  - {{from: [{{namespace: ns{ns}, serviceAccount: sa{from}}}], ports: [{}]}}\n",
            first_port + j
        ));
    }
    y
}

fn one(text: &str) -> Located {
    parse_str(Path::new("change.yaml"), text).expect("parses").remove(0)
}

fn time<T>(what: &str, f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let out = f();
    let took = t.elapsed();
    println!("{what}: {took:?}");
    (out, took)
}

fn main() {
    let mut y = String::new();
    for i in 0..WORKLOADS {
        y.push_str(&workload(i, &format!("w{}", i % PER_NAMESPACE)));
    }
    for i in 0..WORKLOADS {
        y.push_str(&policy(i, &format!("w{}", i % PER_NAMESPACE), 8000));
    }
    let mut batch = Batch::default();
    let docs: Vec<&str> = y.split("---\n").filter(|d| !d.is_empty()).collect();
    for (i, chunk) in docs.chunks(5000).enumerate() {
        let text = chunk.iter().map(|d| format!("---\n{d}")).collect::<String>();
        parse_into(&mut batch, Path::new(&format!("x{i}.yaml")), &text);
    }
    // Numbered by the control plane's store, as ztunnel receives them (a new workload with
    // known labels renumbers nothing). "other" is the label a workload below moves to.
    let mut labels: Vec<_> = identity_labels_of(&batch.resources).into_iter().collect();
    let mut moved = labels.iter().find(|l| l.namespace == "ns12").expect("ns12").clone();
    moved.labels.insert("app".into(), "other".into());
    moved.service_account = "sa34".into();
    labels.push(moved);
    let ids = Identities::new(labels.into_iter().enumerate().map(|(i, l)| (l, 256 + i as u32))).expect("numbers");
    let (full, _) = time("full compile_with", || compile_with(&batch.resources, "cluster.local", &ids));
    let mut compiler = Compiler::new("cluster.local");
    let (first, _) =
        time("Compiler: first update (everything)", || compiler.update(batch.resources.clone(), &[], &ids));
    assert_eq!(first.cells.len(), full.cells.len());
    println!("cells {}, rules {}", first.cells.len(), first.rules.len());

    let mut worst = Duration::ZERO;
    for round in 0..5 {
        let i = 4321 + round * 97;
        let (s, t) = time("one policy: its ports changed", || {
            compiler.update(vec![one(&policy(i, &format!("w{}", i % PER_NAMESPACE), 9000 + round))], &[], &ids)
        });
        worst = worst.max(t);
        assert_eq!(s.cells.len(), full.cells.len());
    }
    let i = 777;
    time("one policy: its selector changed (isolation moves)", || {
        compiler.update(vec![one(&policy(i, "nobody", 8000))], &[], &ids)
    });
    let new = policy(99 * PER_NAMESPACE + 99, "w1", 7000).replace("name: p99,", "name: zz-new,");
    time("one policy added", || compiler.update(vec![one(&new)], &[], &ids));
    let key = ResourceKey::of(&one(&new).resource);
    time("one policy removed", || compiler.update(vec![], &[key], &ids));
    time("one workload: its labels changed", || compiler.update(vec![one(&workload(1234, "other"))], &[], &ids));
    time("one workload: back", || compiler.update(vec![one(&workload(1234, "w34"))], &[], &ids));
    println!("worst one-policy update: {worst:?}");
}
