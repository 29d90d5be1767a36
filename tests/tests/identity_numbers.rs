//! Numeric identities on the sandbox: the control plane numbers identities in its store and
//! pushes the numbers, so a new workload applied with `palisade apply` renumbers no existing
//! one on any node, and the numbers survive a restart of `palisade serve`.
mod support;

use std::collections::BTreeMap;
use std::process::Output;

use palisade_sandbox::cluster::Cluster;
use serde_json::Value;
use support::*;

/// Runs the `palisade` CLI with only the context file the sandbox wrote.
fn palisade(cluster: &Cluster, args: &[&str]) -> Output {
    let context = cluster.info.state_dir.join("palisade-context");
    cluster.write_cli_context(&context).unwrap();
    std::process::Command::new(palisade_sandbox::workspace_bin("palisade").unwrap())
        .args(args)
        .env("PALISADE_CONFIG", &context)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Applies one Workload (no pod behind it: only its identity matters here).
fn apply_workload(cluster: &Cluster, namespace: &str, name: &str, ip: &str) {
    let yaml = format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{serviceAccount: {name}, node: node-1, addresses: [{ip}], labels: {{app: {name}}}}}\n"
    );
    let file = cluster.info.state_dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    let out = palisade(cluster, &["apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("in force on every connected node"), "{}", text(&out));
}

/// Each workload's numeric identity as the node's policy snapshot has it (`/config_dump`).
fn numbers_on(cluster: &Cluster, node: &str) -> BTreeMap<String, u64> {
    let dump: Value = serde_json::from_str(&cluster.admin_get(node, "/config_dump").unwrap()).unwrap();
    let policy = &dump["policy"];
    let listed: Vec<u64> = policy["identities"].as_array().unwrap().iter().map(|i| i["id"].as_u64().unwrap()).collect();
    let numbers: BTreeMap<String, u64> = policy["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["name"].as_str().unwrap().to_string(), w["identity"].as_u64().unwrap()))
        .collect();
    for (name, id) in &numbers {
        assert!(
            listed.contains(id),
            "{node}: {name}'s identity {id} is not among the snapshot's identities {listed:?}"
        );
    }
    numbers
}

/// The same numbers on every node.
fn numbers(cluster: &Cluster) -> BTreeMap<String, u64> {
    let one = numbers_on(cluster, "node-1");
    assert_eq!(numbers_on(cluster, "node-2"), one, "both nodes compile with the pushed numbers");
    one
}

#[test]
fn a_new_workload_renumbers_no_other_and_numbers_survive_a_control_plane_restart() {
    let mut cluster = mesh(2, 1, "");
    let namespace = cluster.pod("p1-1").unwrap().namespace.clone();
    let before = numbers(&cluster);
    assert_eq!(before.len(), 2, "{before:?}");

    // `aaa-new` sorts before every existing identity: numbered in sorted order, it would take
    // the first number and move the others up.
    apply_workload(&cluster, &namespace, "aaa-new", "10.254.7.1");
    let after = numbers(&cluster);
    for (name, id) in &before {
        assert_eq!(after[name], *id, "{name} kept its number: {after:?}");
    }
    let max_before = *before.values().max().unwrap();
    assert!(after["aaa-new"] > max_before, "the new identity is numbered above the others: {after:?}");
    assert!(cluster.store_dir().join(".palisade/identities.json").is_file(), "the numbers are kept in the store");

    // A restarted control plane reads the numbers back from the store.
    cluster.restart_control_plane().unwrap();
    wait_until("both nodes reconnected", || {
        let list = cluster.node_statuses().unwrap_or_default();
        list.len() == 2 && list.iter().all(|n| n["connected"] == true)
    });
    apply_workload(&cluster, &namespace, "aab-second", "10.254.7.2");
    let restarted = numbers(&cluster);
    for (name, id) in &after {
        assert_eq!(restarted[name], *id, "{name} kept its number across the restart: {restarted:?}");
    }
    assert!(restarted["aab-second"] > after["aaa-new"], "{restarted:?}");
}

#[test]
fn replicas_on_one_etcd_push_the_same_numbers() {
    let id = palisade_sandbox::unique_test_id();
    let mut spec = palisade_sandbox::ClusterSpec::uniform(&id, palisade_sandbox::test_state_dir(&id), 2, 1);
    spec.ztunnel = Some(palisade_sandbox::workspace_bin("ztunnel").expect("ztunnel binary"));
    spec.etcd_replicas = 2;
    let mut cluster = start_spec(spec);
    let namespace = cluster.pod("p1-1").unwrap().namespace.clone();
    let workload = |name: &str, ip: &str| {
        format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
             spec: {{serviceAccount: {name}, node: node-1, addresses: [{ip}], labels: {{app: {name}}}}}\n"
        )
    };
    let apply_via = |cluster: &Cluster, replica: usize, name: &str, ip: &str| {
        let request =
            serde_json::json!({"op": "apply", "files": [{"name": format!("{name}.yaml"), "text": workload(name, ip)}]});
        let answer = cluster.replica_admin(replica, &request).unwrap();
        assert_eq!(answer["errors"], serde_json::json!([]), "{answer}");
        wait_until("both nodes compiled the new workload", || {
            ["node-1", "node-2"].iter().all(|n| numbers_on(cluster, n).contains_key(name))
        });
    };
    // Every node follows the replica it reached first; whichever, both agree.
    apply_via(&cluster, 0, "aaa-new", "10.254.7.1");
    let first = numbers(&cluster);

    // The replica the nodes follow dies (with nodes on both, `first` already shows that the
    // replicas agree): the nodes move to the other one, whose numbers, read from etcd, must be
    // the ones pushed before.
    let followed = (0..2)
        .find(|i| {
            let answer = cluster.replica_admin(*i, &serde_json::json!({"op": "nodes"})).unwrap();
            answer["nodes"].as_array().is_some_and(|ns| ns.iter().any(|n| n["connected"] == true))
        })
        .expect("the nodes follow a replica");
    let survivor = 1 - followed;
    cluster.stop_replica(followed).unwrap();
    apply_via(&cluster, survivor, "aab-second", "10.254.7.2");
    let second = numbers(&cluster);
    for (name, id) in &first {
        assert_eq!(second[name], *id, "{name}: the survivor pushed another number: {second:?}");
    }
    assert!(second["aab-second"] > first["aaa-new"], "{second:?}");
}

/// Polls `cond` every 50 ms for up to 30 s.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
