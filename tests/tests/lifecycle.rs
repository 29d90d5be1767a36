//! Lifecycle: ztunnel leaves its pinned programs enforcing when it stops (gracefully or
//! killed), and a sandbox leaves nothing behind after teardown (pins included), also when the
//! test using it fails.
mod support;

use std::path::Path;

use support::*;

/// Program attached to a cgroup, as bpftool lists them.
fn cgroup_programs(cgroup: &Path) -> String {
    palisade_sandbox::sys::run("bpftool", &["cgroup", "show", cgroup.to_str().unwrap()]).expect("bpftool cgroup show")
}

#[test]
fn ztunnel_exit_leaves_every_program_enforcing() {
    let mut cluster = mesh(2, 1, "");
    let c1 = cluster.pod("p1-1").unwrap().cgroup.clone();
    let c2 = cluster.pod("p2-1").unwrap().cgroup.clone();
    let attached = |c: &Path| {
        let listed = cgroup_programs(c);
        ["connect4", "connect6", "sock_ops"].iter().all(|p| listed.contains(p))
    };
    assert!(attached(&c1) && attached(&c2));
    let _s = serve(&cluster, "p2-1", 8080);
    // Graceful stop on node 1, SIGKILL on node 2: both leave everything attached (pinned).
    let status = cluster.stop_ztunnel("node-1", libc::SIGTERM).unwrap();
    assert!(status.success(), "ztunnel exit on SIGTERM: {status}");
    cluster.stop_ztunnel("node-2", libc::SIGKILL).unwrap();
    assert!(attached(&c1) && attached(&c2), "{}\n{}", cgroup_programs(&c1), cgroup_programs(&c2));
    // Without a ztunnel, pods cannot talk at all: fail closed, never directly.
    let r = connect(&cluster, "p1-1", &format!("{}:8080", cluster.pod("p2-1").unwrap().ip), 10);
    assert_eq!(r["ok"], false, "{r}");
}

fn leftovers(id: &str) -> Vec<String> {
    let mut left: Vec<String> = palisade_sandbox::cluster::list_netns()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&format!("plsd-{id}-")))
        .collect();
    let cgroup = palisade_sandbox::sys::cgroup2_root().unwrap().join(format!("plsd-{id}"));
    if cgroup.exists() {
        left.push(cgroup.display().to_string());
    }
    let pins = palisade_sandbox::cluster::pin_root(id);
    if pins.exists() {
        left.push(pins.display().to_string());
    }
    let state = palisade_sandbox::test_state_dir(id);
    if state.exists() {
        left.push(state.display().to_string());
    }
    left
}

#[test]
fn nothing_remains_after_teardown_even_when_the_test_fails() {
    let mut id = String::new();
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = mesh(2, 2, "");
        id = cluster.info.id.clone();
        let _server = serve(&cluster, "p2-2", 8080);
        assert!(!leftovers(&id).is_empty(), "the cluster exists while it runs");
        panic!("a failing test");
    }));
    assert!(failed.is_err());
    assert!(leftovers(&id).is_empty(), "left behind: {:?}", leftovers(&id));
}
