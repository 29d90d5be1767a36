//! Section 10, the control plane: time from an `apply` call until every node has ACKed the new
//! version, i.e. its kernel maps are switched to it (ztunnel ACKs only after the switch).
//! Measured through the admin API (what `palisade apply` sends, without the CLI's process
//! start), on a 2-node cluster whose ztunnels follow `palisade serve`.
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::Options;
use crate::measure::{cluster, put_store_files, scale_policy};
use crate::stats::Figure;

const GROUP: &str = "10. control plane";

/// One distinct policy per apply, so every apply is a real change for every node.
fn policy(i: usize) -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: bench-apply, namespace: default}}\n\
         spec:\n  selector: {{matchLabels: {{app: p2-1}}}}\n  action: Deny\n  rules:\n  - from: [{{namespace: default}}]\n    ports: [{}]\n",
        10_000 + i
    )
}

/// Applies on a small cluster, then with `scale_workloads` more workloads (and their
/// policies) in the store.
pub fn apply_to_enforced(options: &Options) -> Result<Vec<Figure>> {
    let mut figures = applies(options, 0)?;
    figures.extend(applies(options, options.sizes.scale_workloads)?);
    Ok(figures)
}

fn applies(options: &Options, background: usize) -> Result<Vec<Figure>> {
    let cluster = cluster(options, 2, 1, true, "")?;
    if background > 0 {
        let policy = scale_policy(background, options.sizes.scale_rules, 0);
        put_store_files(&cluster, "scale", &policy, Duration::from_secs(600))?;
    }
    let mut samples = Vec::with_capacity(options.sizes.applies);
    for i in 0..options.sizes.applies {
        let request = serde_json::json!({
            "op": "apply",
            "files": [{"name": "bench.yaml", "text": policy(i)}],
            "wait_secs": 30,
        });
        let started = Instant::now();
        let answer = cluster.admin(&request)?;
        let elapsed = started.elapsed().as_secs_f64() * 1e3;
        let errors = answer["errors"].as_array().map_or(0, Vec::len);
        let pending = answer["not_in_force"].as_array().map_or(0, Vec::len);
        if errors > 0 || pending > 0 {
            bail!("apply {i} not in force on every node: {answer}");
        }
        samples.push(elapsed);
    }
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1];
    let scale = match background {
        0 => String::new(),
        n => format!(", {n} more workloads and {} rules in the store", options.sizes.scale_rules),
    };
    let label = format!("apply → ACKed (maps switched) on both nodes, {} applies{scale}", samples.len());
    let target = if background >= 10_000 { "< 100 ms" } else { "" };
    Ok(vec![
        Figure::mesh_only(GROUP, &format!("{label}: p50"), "ms", &[pct(0.50)]),
        Figure::mesh_only(GROUP, &format!("{label}: p99"), "ms", &[pct(0.99)]).target(target),
        Figure::mesh_only(GROUP, &format!("{label}: each (median [min–max])"), "ms", &samples),
    ])
}
