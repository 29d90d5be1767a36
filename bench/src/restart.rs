//! Restarts and upgrades, measured: how many established connections survive an upgrade under
//! load, and the longest windows in which a denied connection succeeded (target: none) or an
//! allowed one failed, across an upgrade and across `kill -9` followed by a restart.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use palisade_sandbox::Cluster;
use serde_json::Value;

use crate::Options;
use crate::measure::echo_server;
use crate::stats::Figure;

const GROUP: &str = "restart";
const ALLOWED_PORT: u16 = 8080;
const DENIED_PORT: u16 = 9090;

/// Outcomes of back-to-back connection attempts, with the time each one started.
struct Attempts(Vec<(Instant, bool)>);

impl Attempts {
    /// Longest time from a first outcome equal to `bad` to the next attempt that was not.
    fn longest_window(&self, bad: bool) -> Duration {
        let (mut longest, mut since) = (Duration::ZERO, None);
        for (t, ok) in &self.0 {
            match (*ok == bad, since) {
                (true, None) => since = Some(*t),
                (false, Some(s)) => {
                    longest = longest.max(t.duration_since(s));
                    since = None;
                }
                _ => {}
            }
        }
        if let (Some(s), Some((last, _))) = (since, self.0.last()) {
            longest = longest.max(last.duration_since(s));
        }
        longest
    }

    fn count(&self, ok: bool) -> usize {
        self.0.iter().filter(|(_, o)| *o == ok).count()
    }
}

fn connect(view: &Cluster, options: &Options, pod: &str, to: &str, bytes: u64, extra: &[&str]) -> Result<Value> {
    let out = view
        .command(pod, &options.bins.probe)?
        .args(["connect", "--to", to, "--bytes", &bytes.to_string(), "--timeout-ms", "2000"])
        .args(extra)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("probe output {text:?}"))
}

/// Connects again and again from `pod` to `to` until `stop`.
fn attempts(
    cluster: &Cluster,
    options: &Options,
    pod: &str,
    to: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Attempts> {
    let (view, options, pod) = (Cluster::attach(cluster.info.clone()), options.clone(), pod.to_string());
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let ok = connect(&view, &options, &pod, &to, 100, &[]).is_ok_and(|r| r["verified"] == true);
            seen.push((t, ok));
        }
        Attempts(seen)
    })
}

/// Upgrades both nodes under load, then kills node 1's ztunnel and restarts it.
pub fn restarts(options: &Options) -> Result<Vec<Figure>> {
    let policy = format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: no-{DENIED_PORT}, namespace: default}}\n\
         spec: {{selector: {{matchLabels: {{app: p1-2}}}}, action: Deny, rules: [{{from: [{{namespace: default, \
         serviceAccount: p1-1}}], ports: [{DENIED_PORT}]}}]}}\n"
    );
    let mut cluster = crate::measure::cluster(options, 2, 2, true, &policy)?;
    let _servers = [
        echo_server(&cluster, options, "p2-1", ALLOWED_PORT)?,
        echo_server(&cluster, options, "p1-2", ALLOWED_PORT)?,
        echo_server(&cluster, options, "p1-2", DENIED_PORT)?,
    ];
    let remote = format!("{}:{ALLOWED_PORT}", cluster.pod("p2-1")?.ip);
    let local = cluster.pod("p1-2")?.ip.clone();
    let (allowed_local, denied_local) = (format!("{local}:{ALLOWED_PORT}"), format!("{local}:{DENIED_PORT}"));
    let streams = options.sizes.restart_streams;

    // 1. Upgrade both nodes while `streams` paced connections run and new ones keep coming.
    let stop = Arc::new(AtomicBool::new(false));
    let paced: Vec<_> = (0..streams)
        .map(|_| {
            let (view, options, remote) = (Cluster::attach(cluster.info.clone()), options.clone(), remote.clone());
            std::thread::spawn(move || {
                connect(&view, &options, "p1-1", &remote, 3 << 20, &["--pace-ms", "100", "--timeout-ms", "60000"])
                    .is_ok_and(|r| r["verified"] == true)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let new_conns = attempts(&cluster, options, "p1-2", remote.clone(), stop.clone());
    for node in ["node-1", "node-2"] {
        cluster.start_new_ztunnel(node)?;
    }
    let survived = paced.into_iter().filter_map(|t| t.join().ok()).filter(|ok| *ok).count();
    stop.store(true, Ordering::Relaxed);
    let during_upgrade = new_conns.join().map_err(|_| anyhow::anyhow!("attempt thread panicked"))?;

    // 2. kill -9 node 1's ztunnel, restart it at once; denied and allowed attempts throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let denied = attempts(&cluster, options, "p1-1", denied_local, stop.clone());
    let allowed = attempts(&cluster, options, "p1-1", allowed_local, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    cluster.stop_ztunnel("node-1", libc::SIGKILL)?;
    cluster.start_new_ztunnel("node-1")?;
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let denied = denied.join().map_err(|_| anyhow::anyhow!("attempt thread panicked"))?;
    let allowed = allowed.join().map_err(|_| anyhow::anyhow!("attempt thread panicked"))?;

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(vec![
        Figure::mesh_only(GROUP, "established connections alive after upgrading both nodes", "of", &[survived as f64])
            .target(&format!("{streams} of {streams}")),
        Figure::mesh_only(
            GROUP,
            "new connections failed during the upgrades",
            "conns",
            &[during_upgrade.count(false) as f64],
        )
        .target(&format!("0 of {}", during_upgrade.0.len())),
        Figure::mesh_only(
            GROUP,
            "kill -9 + restart: longest window a denied connection succeeded",
            "ms",
            &[ms(denied.longest_window(true))],
        )
        .target(&format!("none ({} successes of {} tries)", denied.count(true), denied.0.len())),
        Figure::mesh_only(
            GROUP,
            "kill -9 + restart: longest window allowed connections failed",
            "ms",
            &[ms(allowed.longest_window(false))],
        ),
        Figure::mesh_only(
            GROUP,
            "upgrade: longest window new connections failed",
            "ms",
            &[ms(during_upgrade.longest_window(false))],
        ),
    ])
}
