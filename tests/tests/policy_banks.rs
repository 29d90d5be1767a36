//! Policy switches are atomic: the kernel keeps two banks of identities and cells and switches
//! between them with one write, writing only the difference each time (ztunnel
//! `datapath::policy_maps`). While a sequence of policies is applied — allows removed, allows
//! added, default deny turned on and off, a deny rule — connections are probed continuously:
//! every probe gets the verdict of a policy in force during the probe, never another one, and
//! after each switch the verdicts are exactly the new policy's (a bank written by difference
//! holds nothing stale from two generations back).
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use support::*;

/// Probes: (client pod, destination port on p2-1).
const PROBES: [(&str, u16); 4] = [("p1-1", 9090), ("p1-1", 9091), ("p1-2", 9090), ("p1-2", 9092)];

/// A policy and the verdict (allowed?) of each of [`PROBES`] under it.
struct Step {
    name: &'static str,
    yaml: String,
    allowed: [bool; 4],
}

fn allow(rules: &[(&str, &[u16])]) -> String {
    let mut y = "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: allow-p2-1, namespace: default}\n\
                 spec:\n  selector: {matchLabels: {app: p2-1}}\n  action: Allow\n  rules:\n"
        .to_string();
    for (sa, ports) in rules {
        let ports: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
        y.push_str(&format!("  - {{from: [{{serviceAccount: {sa}}}], ports: [{}]}}\n", ports.join(", ")));
    }
    y
}

fn steps() -> Vec<Step> {
    let deny = "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: deny-9090, namespace: default}\n\
                spec:\n  selector: {matchLabels: {app: p2-1}}\n  action: Deny\n  rules:\n  - {from: [{serviceAccount: p1-1}], ports: [9090]}\n";
    let open = Step { name: "no policy", yaml: String::new(), allowed: [true; 4] };
    let isolate = Step {
        name: "isolated, p1-1 on 9090 and 9091",
        yaml: allow(&[("p1-1", &[9090, 9091])]),
        allowed: [true, true, false, false],
    };
    let moved = Step {
        name: "9091 removed, p1-2 on 9092 added",
        yaml: allow(&[("p1-1", &[9090]), ("p1-2", &[9092])]),
        allowed: [true, false, false, true],
    };
    let wide = Step {
        name: "allows added",
        yaml: allow(&[("p1-1", &[9090, 9091]), ("p1-2", &[9090, 9092])]),
        allowed: [true; 4],
    };
    let denied = Step { name: "a deny rule, no isolation", yaml: deny.to_string(), allowed: [false, true, true, true] };
    // Each index is applied in turn; the order visits every kind of change in both directions
    // and makes each bank go through several different policies.
    let all = [open, isolate, moved, wide, denied];
    let order = [1, 2, 3, 2, 1, 4, 0, 2, 4, 3, 1, 0, 3, 4, 2, 0];
    order.iter().map(|&i| Step { name: all[i].name, yaml: all[i].yaml.clone(), allowed: all[i].allowed }).collect()
}

/// One probe's outcome and the steps that may have been in force while it ran.
struct Probe {
    probe: usize,
    allowed: bool,
    report: serde_json::Value,
    first_step: usize,
    last_step: usize,
}

#[test]
fn every_probe_gets_the_old_or_the_new_policy_across_bank_switches() {
    let steps = steps();
    let mut cluster = mesh(2, 2, "");
    let _servers: Vec<Server> = [9090, 9091, 9092].iter().map(|p| serve(&cluster, "p2-1", *p)).collect();
    let dst = cluster.pod("p2-1").unwrap().ip.clone();

    // Step 0 is the empty policy the cluster starts with; step i+1 is steps[i]. `done` is the
    // last step in force on every node, `started` the last one being applied.
    let mut expected = vec![[true; 4]];
    expected.extend(steps.iter().map(|s| s.allowed));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probers: Vec<_> = ["p1-1", "p1-2"]
        .into_iter()
        .map(|client| {
            let view = palisade_sandbox::Cluster::attach(cluster.info.clone());
            let (done, started, stop, dst) = (done.clone(), started.clone(), stop.clone(), dst.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    for (probe, (pod, port)) in PROBES.iter().enumerate().filter(|(_, (pod, _))| *pod == client) {
                        let first_step = done.load(Ordering::SeqCst);
                        let report = connect(&view, pod, &format!("{dst}:{port}"), 10);
                        let last_step = started.load(Ordering::SeqCst);
                        let allowed = report["verified"] == true;
                        seen.push(Probe { probe, allowed, report, first_step, last_step });
                    }
                }
                seen
            })
        })
        .collect();

    let mut settled = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        started.store(i + 1, Ordering::SeqCst);
        cluster.set_policy(&step.yaml).unwrap_or_else(|e| panic!("step {} ({}): {e:#}", i + 1, step.name));
        done.store(i + 1, Ordering::SeqCst);
        // Settled: exactly this policy's verdicts.
        for (probe, (pod, port)) in PROBES.iter().enumerate() {
            let r = connect(&cluster, pod, &format!("{dst}:{port}"), 10);
            settled.push((i + 1, step.name, probe, r["verified"] == true, r));
        }
    }
    stop.store(true, Ordering::SeqCst);
    let probes: Vec<Probe> = probers.into_iter().flat_map(|p| p.join().expect("prober thread")).collect();

    for (step, name, probe, allowed, report) in &settled {
        assert_eq!(
            *allowed,
            steps[step - 1].allowed[*probe],
            "after step {step} ({name}) is in force, {:?} got {report}",
            PROBES[*probe]
        );
    }
    let spanning = probes.iter().filter(|p| p.first_step != p.last_step).count();
    assert!(probes.len() >= steps.len(), "too few probes during the switches: {}", probes.len());
    for p in &probes {
        let possible: Vec<bool> = (p.first_step..=p.last_step).map(|s| expected[s][p.probe]).collect();
        assert!(
            possible.contains(&p.allowed),
            "{:?} while steps {}..={} were in force: got {} ({}), which none of them gives",
            PROBES[p.probe],
            p.first_step,
            p.last_step,
            if p.allowed { "allowed" } else { "denied" },
            p.report
        );
    }
    eprintln!("{} probes, {spanning} of them across a switch, {} settled checks", probes.len(), settled.len());
}
