//! How long `Control::change` takes with a large store (a development aid: the bench's
//! control-plane section measures the whole path, this the server's part alone).
//! `cargo run --release -p palisade-server --example change_timing -- [workloads]`
use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade_server::Control;
use palisade_server::store::dir::DirStore;

#[tokio::main]
async fn main() {
    let workloads: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let dir = std::env::temp_dir().join(format!("palisade-change-timing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let per_ns = 100;
    let mut files = vec![String::new(); workloads.div_ceil(1000)];
    for i in 0..workloads {
        let (ns, w) = (i / per_ns, i % per_ns);
        let ip = format!("10.100.{}.{}", i / 250, i % 250 + 1);
        files[i / 1000].push_str(&format!(
            "---\napiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w{w}, namespace: ns{ns}}}\n\
             spec: {{serviceAccount: sa{w}, node: bench-node, labels: {{app: w{w}}}, addresses: [{ip}]}}\n---\n\
             apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: p{w}, namespace: ns{ns}}}\n\
             spec:\n  selector: {{matchLabels: {{app: w{w}}}}}\n  action: Allow\n  rules:\n{}",
            (0..10)
                .map(|j| format!(
                    "  - {{from: [{{namespace: ns{ns}, serviceAccount: sa{}}}], ports: [{}]}}\n",
                    (w + j + 1) % per_ns,
                    8000 + j
                ))
                .collect::<String>()
        ));
    }
    for (i, text) in files.iter().enumerate() {
        std::fs::write(dir.join(format!("scale-{i}.yaml")), text).unwrap();
    }
    let control = Control::new(Arc::new(DirStore::open(&dir, Duration::from_millis(200)).unwrap()));
    tokio::spawn(control.clone().follow_store());
    let mut payloads = control.payload();
    let started = Instant::now();
    payloads.wait_for(Option::is_some).await.unwrap();
    println!("first payload: {:?}", started.elapsed());
    let mut samples = Vec::new();
    for i in 0..20 {
        let text = format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: bench-apply, namespace: ns0}}\n\
             spec:\n  selector: {{matchLabels: {{app: w1}}}}\n  action: Deny\n  rules:\n  - from: [{{namespace: ns0}}]\n    ports: [{}]\n",
            10_000 + i
        );
        let batch = palisade_model::load::parse_str(std::path::Path::new("bench.yaml"), &text).unwrap();
        let t = Instant::now();
        control.change(batch, false).await.unwrap();
        samples.push(t.elapsed());
    }
    samples.sort();
    println!("change: p50 {:?}, max {:?}", samples[10], samples[19]);
    let _ = std::fs::remove_dir_all(&dir);
}
