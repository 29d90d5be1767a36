//! Where the time of a cluster-scale policy goes: reads, validates and compiles the bench's
//! synthetic policy (10,000 Workloads in 100 namespaces, 10,000 SegmentationPolicies with
//! 100,000 rules in all) and prints the time of each step. Useful to the next engineer who
//! makes one of them faster: `cargo run --release -p palisade-model --example scale_timing`.
//!
//! The policy is the one of `scale_policy` in bench/src/measure.rs (figure 7); keep the two
//! in step.
use std::path::Path;
use std::time::Instant;

use palisade_model::{compile, load, validate};

const WORKLOADS: usize = 10_000;
const RULES: usize = 100_000;

/// As bench/src/measure.rs `scale_policy` (without its variant comment line).
fn scale_policy(workloads: usize, rules: usize) -> String {
    let per_ns = 100.min(workloads.max(1));
    let rules_per = (rules / workloads.max(1)).max(1);
    let mut y = String::new();
    for i in 0..workloads {
        let (ns, w) = (i / per_ns, i % per_ns);
        let ip = format!("10.100.{}.{}", i / 250, i % 250 + 1);
        y.push_str(&format!(
            "---\napiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w{w}, namespace: ns{ns}}}\n\
             spec: {{serviceAccount: sa{w}, node: bench-node, labels: {{app: w{w}}}, addresses: [{ip}]}}\n"
        ));
    }
    for i in 0..workloads {
        let (ns, w) = (i / per_ns, i % per_ns);
        y.push_str(&format!(
            "---\napiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: p{w}, namespace: ns{ns}}}\n\
             spec:\n  selector: {{matchLabels: {{app: w{w}}}}}\n  action: Allow\n  rules:\n"
        ));
        for j in 0..rules_per {
            let from = (w + j + 1) % per_ns;
            y.push_str(&format!(
                "  - {{from: [{{namespace: ns{ns}, serviceAccount: sa{from}}}], ports: [{}]}}\n",
                8000 + j
            ));
        }
    }
    y
}

fn main() {
    let text = scale_policy(WORKLOADS, RULES);
    // One file holds at most `load::MAX_DOCUMENTS` documents: split as a user would.
    let docs: Vec<&str> = text.split("---\n").filter(|d| !d.is_empty()).collect();
    let files: Vec<String> =
        docs.chunks(load::MAX_DOCUMENTS / 2).map(|c| format!("---\n{}", c.join("---\n"))).collect();

    let t = Instant::now();
    let mut batch = load::Batch::default();
    for (i, file) in files.iter().enumerate() {
        load::parse_into(&mut batch, Path::new(&format!("scale{i}.yaml")), file);
    }
    println!("parse    {:>10.1?}  {} resources, {} problems", t.elapsed(), batch.resources.len(), batch.findings.len());

    let t = Instant::now();
    let verdict = validate::validate_batch(&batch);
    let summary = match &verdict {
        Ok(warnings) => format!("valid, {} warnings", warnings.len()),
        Err(invalid) => format!("{} errors", invalid.0.len()),
    };
    println!("validate {:>10.1?}  {summary}", t.elapsed());
    // The control plane's gate on every change: errors only.
    let t = Instant::now();
    let gate = validate::validate(&batch.resources).is_ok();
    println!("errors only {:>10.1?}  valid: {gate}", t.elapsed());

    let t = Instant::now();
    let snapshot = compile::compile_with(&batch.resources, "cluster.local", &Default::default());
    println!("compile  {:>10.1?}  {} cells", t.elapsed(), snapshot.cells.len());
}
