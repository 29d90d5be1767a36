//! The etcd store against a real etcd (Debian's `etcd-server`), one member per test on free
//! ports of 127.0.0.1: apply, list, delete and watch; batches are all or nothing; two stores
//! on one etcd (two `palisade serve` replicas) see the same content at the same revision and
//! give every identity one number; on a sandbox, two `palisade serve` replicas on one etcd
//! serve one snapshot and a ztunnel fails over from one to the other.
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use palisade_model::compile::{FIRST_WORKLOAD_IDENTITY, IdentityLabels};
use palisade_model::load;
use palisade_model::resource::Resource;
use palisade_sandbox::etcd::Etcd;
use palisade_sandbox::{Cluster, ClusterSpec};
use palisade_server::store::etcd::EtcdStore;
use palisade_server::store::{Change, Listing, ResourceKey, Revision, Store, StoreError};
use serde_json::{Value, json};

/// Bounds every wait for a watch (a hang fails the test instead of blocking the suite).
const WAIT: Duration = Duration::from_secs(20);

/// A state directory for one test, removed at the end (also when the test fails).
struct StateDir(PathBuf);

impl StateDir {
    fn new() -> StateDir {
        let dir = palisade_sandbox::test_state_dir(&palisade_sandbox::unique_test_id());
        std::fs::create_dir_all(&dir).unwrap();
        StateDir(dir)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn resource(text: &str) -> Resource {
    load::parse_str(Path::new("test.yaml"), text).unwrap().remove(0).resource
}

fn namespace(name: &str) -> Resource {
    resource(&format!("apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {{name: {name}}}\n"))
}

fn workload(name: &str, ip: &str) -> Resource {
    resource(&format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  serviceAccount: {name}\n  node: node1\n  addresses: [{ip}]\n  labels: {{app: {name}}}\n"
    ))
}

fn names(listing: &Listing) -> Vec<String> {
    let mut names: Vec<String> = listing.resources.iter().map(|l| ResourceKey::of(&l.resource).to_string()).collect();
    names.sort();
    names
}

async fn open(etcd: &Etcd) -> EtcdStore {
    let url = etcd.endpoint().replace("http://", "etcd://");
    EtcdStore::open(&url).await.unwrap_or_else(|e| panic!("open {url}: {e}"))
}

/// Waits until the store has published `revision` (or a newer one).
async fn published(store: &EtcdStore, revision: Revision) {
    let mut watch = store.watch();
    tokio::time::timeout(WAIT, watch.wait_for(|r| *r >= revision))
        .await
        .unwrap_or_else(|_| panic!("revision {revision} not published within {WAIT:?}; at {}", *store.watch().borrow()))
        .unwrap();
}

fn etcdctl(etcd: &Etcd, args: &[&str]) -> String {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(etcd.endpoint())
        .args(args)
        .output()
        .expect("run etcdctl (Debian package etcd-client, installed by `cargo xtask setup`)");
    assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn etcd_store_apply_list_delete_and_watch() {
    let state = StateDir::new();
    let etcd = Etcd::start(&state.0).unwrap();
    let store = open(&etcd).await;
    assert!(store.describe().starts_with("etcd:http://127.0.0.1:"), "{}", store.describe());

    let empty = store.list().await.unwrap();
    assert!(empty.resources.is_empty());
    let batch = vec![
        Change::Put(namespace("team-a")),
        Change::Put(workload("web", "10.1.0.1")),
        Change::Put(workload("db", "10.1.0.2")),
    ];
    let first = store.apply(empty.revision, batch).await.unwrap();
    assert!(first > empty.revision);
    published(&store, first).await;

    let listing = store.list().await.unwrap();
    assert_eq!(listing.revision, first, "the listing's revision is the one the batch was written at");
    assert_eq!(names(&listing), ["Namespace team-a", "Workload default/db", "Workload default/web"]);
    let web = listing.resources.iter().find(|l| l.resource.metadata().name == "web").unwrap();
    assert_eq!(web.resource, workload("web", "10.1.0.1"), "round trip through etcd");
    assert_eq!(web.origin.to_string(), "etcd:/palisade/resources/Workload/default/web:1");
    // The keys are where the layout says, as YAML anyone can read with etcdctl.
    let keys = etcdctl(&etcd, &["get", "--prefix", "--keys-only", "/palisade/resources/"]);
    assert!(keys.contains("/palisade/resources/Namespace/team-a"), "{keys}");
    assert!(
        etcdctl(&etcd, &["get", "--print-value-only", "/palisade/resources/Workload/default/db"]).contains("10.1.0.2")
    );

    // Replace one, delete another: one new revision.
    let second = store
        .apply(
            first,
            vec![Change::Put(workload("web", "10.1.0.9")), Change::Delete(ResourceKey::of(&workload("db", "")))],
        )
        .await
        .unwrap();
    assert!(second > first);
    published(&store, second).await;
    let listing = store.list().await.unwrap();
    assert_eq!(listing.revision, second);
    assert_eq!(names(&listing), ["Namespace team-a", "Workload default/web"]);

    // Deletes alone move the revision too (the marker), so watchers notice them.
    let third = store.apply(second, vec![Change::Delete(ResourceKey::of(&namespace("team-a")))]).await.unwrap();
    assert!(third > second);
    published(&store, third).await;
    assert_eq!(store.list().await.unwrap().revision, third);
}

#[tokio::test]
async fn etcd_store_refused_batches_change_nothing() {
    let state = StateDir::new();
    let etcd = Etcd::start(&state.0).unwrap();
    let store = open(&etcd).await;
    let rev = store.apply(0, vec![Change::Put(workload("web", "10.1.0.1"))]).await.unwrap();
    let before = store.list().await.unwrap();

    // A stale revision: somebody changed the store since the batch was validated.
    let stale = store.apply(rev - 1, vec![Change::Put(workload("late", "10.1.0.3"))]).await;
    assert!(matches!(stale, Err(StoreError::Conflict { actual, .. }) if actual == rev), "{stale:?}");
    // One bad change spoils the batch: the good put beside it is not written.
    let missing = store
        .apply(
            rev,
            vec![Change::Put(workload("new", "10.1.0.4")), Change::Delete(ResourceKey::of(&workload("gone", "")))],
        )
        .await;
    match missing {
        Err(e @ StoreError::NotFound { .. }) => assert!(e.to_string().contains("Workload default/gone"), "{e}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    // A batch larger than one etcd transaction may be (128 operations by default) is refused
    // whole, with the limit to raise.
    let big: Vec<Change> =
        (0..200).map(|i| Change::Put(workload(&format!("w{i}"), &format!("10.2.0.{}", i % 250)))).collect();
    match store.apply(rev, big).await {
        Err(e @ StoreError::Backend { .. }) => assert!(e.to_string().contains("--max-txn-ops"), "{e}"),
        other => panic!("expected etcd to refuse the transaction, got {other:?}"),
    }

    let after = store.list().await.unwrap();
    assert_eq!(after.revision, before.revision, "nothing was written");
    assert_eq!(names(&after), names(&before));
}

#[tokio::test]
async fn etcd_store_two_replicas_see_one_content_and_race_safely() {
    let state = StateDir::new();
    let etcd = Etcd::start(&state.0).unwrap();
    let a = open(&etcd).await;
    let b = open(&etcd).await;
    let start = a.list().await.unwrap().revision;

    let rev = a.apply(start, vec![Change::Put(workload("web", "10.1.0.1"))]).await.unwrap();
    // B learns of A's write through its watch, and lists what A wrote at the same revision.
    published(&b, rev).await;
    let (la, lb) = (a.list().await.unwrap(), b.list().await.unwrap());
    assert_eq!((la.revision, names(&la)), (lb.revision, names(&lb)));
    assert_eq!(lb.resources[0].resource, workload("web", "10.1.0.1"));

    // Both validated against the same revision: exactly one batch wins.
    let (ra, rb) = tokio::join!(
        a.apply(rev, vec![Change::Put(workload("from-a", "10.1.0.2"))]),
        b.apply(rev, vec![Change::Put(workload("from-b", "10.1.0.3"))]),
    );
    let won = [ra.is_ok(), rb.is_ok()];
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "a: {ra:?}, b: {rb:?}");
    let loser = if ra.is_ok() { rb } else { ra };
    assert!(matches!(loser, Err(StoreError::Conflict { .. })), "{loser:?}");
    let listing = b.list().await.unwrap();
    assert_eq!(listing.resources.len(), 2, "{:?}", names(&listing));
}

#[tokio::test]
async fn etcd_store_names_bad_values_by_key_and_notices_hand_deletes() {
    let state = StateDir::new();
    let etcd = Etcd::start(&state.0).unwrap();
    let store = open(&etcd).await;
    let rev = store.apply(0, vec![Change::Put(workload("web", "10.1.0.1"))]).await.unwrap();

    // Deleted by hand: the watch sees it and the revision every replica computes moves on.
    etcdctl(&etcd, &["del", "/palisade/resources/Workload/default/web"]);
    // The delete (rev + 1), then the watcher's marker (rev + 2).
    published(&store, rev + 2).await;
    let listing = store.list().await.unwrap();
    assert!(listing.resources.is_empty());
    assert!(listing.revision > rev, "a hand delete moves the revision: {} after {rev}", listing.revision);

    // A value that is not a resource, and one under the wrong key: both named, with lines.
    etcdctl(&etcd, &["put", "/palisade/resources/Workload/default/bad", "kind: Workload\nmetadata: [oops\n"]);
    let elsewhere = "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: real}\n";
    etcdctl(&etcd, &["put", "/palisade/resources/Namespace/other", elsewhere]);
    let err = store.list().await.expect_err("bad values").to_string();
    assert!(err.contains("etcd:/palisade/resources/Workload/default/bad:"), "{err}");
    assert!(err.contains("etcd:/palisade/resources/Namespace/other:1: holds Namespace real"), "{err}");
}

#[tokio::test]
async fn etcd_store_identities_are_stable_across_replicas_and_restarts() {
    let state = StateDir::new();
    let etcd = Etcd::start(&state.0).unwrap();
    let ident = |sa: &str, app: &str| IdentityLabels {
        namespace: "default".into(),
        service_account: sa.into(),
        labels: [("app".to_string(), app.to_string())].into(),
    };
    let (web, db, cache) = (ident("web", "web"), ident("db", "db"), ident("cache", "cache"));
    {
        let a = open(&etcd).await;
        let numbers = a.assign_identities(&[web.clone(), db.clone()]).await.unwrap();
        assert_eq!(numbers[&web], FIRST_WORKLOAD_IDENTITY);
        assert_eq!(numbers[&db], FIRST_WORKLOAD_IDENTITY + 1);
        // Another replica: known identities keep their numbers, a new one does not renumber them.
        let b = open(&etcd).await;
        let numbers = b.assign_identities(&[cache.clone(), db.clone(), web.clone()]).await.unwrap();
        assert_eq!(
            (numbers[&web], numbers[&db], numbers[&cache]),
            (FIRST_WORKLOAD_IDENTITY, FIRST_WORKLOAD_IDENTITY + 1, FIRST_WORKLOAD_IDENTITY + 2)
        );

        // Two replicas numbering the same 150 new identities at once (several transactions
        // each): one number per identity, no number twice.
        let many: Vec<IdentityLabels> = (0..150).map(|i| ident(&format!("sa{i}"), "x")).collect();
        let reversed: Vec<IdentityLabels> = many.iter().rev().cloned().collect();
        let (na, nb) = tokio::join!(a.assign_identities(&many), b.assign_identities(&reversed));
        let (na, nb) = (na.unwrap(), nb.unwrap());
        assert_eq!(na, nb);
        let mut numbers: Vec<u32> = a.identities().await.unwrap().into_values().collect();
        numbers.sort();
        numbers.dedup();
        assert_eq!(numbers.len(), 153, "every identity has its own number");
    }
    // Every replica gone, etcd restarted: the numbers are still there.
    let mut etcd = etcd;
    etcd.restart().unwrap();
    let c = open(&etcd).await;
    let numbers = c.assign_identities(std::slice::from_ref(&db)).await.unwrap();
    assert_eq!(numbers[&db], FIRST_WORKLOAD_IDENTITY + 1);
    assert_eq!(c.identities().await.unwrap().len(), 153);
}

#[tokio::test]
async fn etcd_store_rides_out_an_etcd_restart() {
    let state = StateDir::new();
    let mut etcd = Etcd::start(&state.0).unwrap();
    let store = open(&etcd).await;
    let rev = store.apply(0, vec![Change::Put(workload("web", "10.1.0.1"))]).await.unwrap();

    etcd.kill();
    let down = store.list().await.expect_err("etcd is down").to_string();
    assert!(down.contains("etcd:http://127.0.0.1:"), "the error names the store: {down}");
    etcd.restart().unwrap();

    // The watch comes back by itself and sees writes made by another replica.
    let other = open(&etcd).await;
    let next = other.apply(rev, vec![Change::Put(workload("db", "10.1.0.2"))]).await.unwrap();
    published(&store, next).await;
    assert_eq!(names(&store.list().await.unwrap()), ["Workload default/db", "Workload default/web"]);
}

/// Every node's status as replica `i` sees it, by node name (a node is connected to one
/// replica at a time).
fn replica_nodes(cluster: &Cluster, i: usize) -> BTreeMap<String, Value> {
    let answer = cluster.replica_admin(i, &json!({"op": "nodes"})).unwrap();
    let nodes = answer["nodes"].as_array().cloned().unwrap_or_default();
    nodes.into_iter().map(|n| (n["node"].as_str().unwrap().to_string(), n)).collect()
}

/// Replica `i`'s resources and the revision it read them at (`palisade get -o json`).
fn get(cluster: &Cluster, i: usize) -> Value {
    cluster.replica_admin(i, &json!({"op": "get"})).unwrap()
}

/// Whether `node` is connected to replica `i` now.
fn connected(cluster: &Cluster, i: usize, node: &str) -> bool {
    replica_nodes(cluster, i).get(node).is_some_and(|n| n["connected"] == true)
}

/// Waits until `node` is connected to replica `i` with `revision` (or later) in force.
fn wait_in_force(cluster: &Cluster, i: usize, node: &str, revision: u64) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = replica_nodes(cluster, i).remove(node).unwrap_or(Value::Null);
        let version = status["version"].as_str().and_then(|v| v.parse::<u64>().ok());
        if status["connected"] == true && version.is_some_and(|v| v >= revision) {
            return status;
        }
        assert!(Instant::now() < deadline, "{node} has not put revision {revision} in force via replica {i}: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn etcd_two_replicas_serve_one_snapshot_and_a_ztunnel_fails_over() {
    let id = palisade_sandbox::unique_test_id();
    let mut spec = ClusterSpec::uniform(&id, palisade_sandbox::test_state_dir(&id), 2, 1);
    spec.ztunnel = Some(palisade_sandbox::workspace_bin("ztunnel").expect("ztunnel binary"));
    spec.etcd_replicas = 2;
    let mut cluster = support::start_spec(spec);
    let _server = support::serve(&cluster, "p2-1", 9090);
    let dst = format!("{}:9090", cluster.pod("p2-1").unwrap().ip);
    assert_eq!(support::connect(&cluster, "p1-1", &dst, 10)["verified"], true);

    // Both replicas read the same content at the same revision from etcd.
    let (first, second) = (get(&cluster, 0), get(&cluster, 1));
    assert!(first["revision"].as_u64().is_some_and(|r| r > 0), "{first}");
    assert_eq!(first["revision"], second["revision"]);
    assert_eq!(first["resources"], second["resources"]);
    let revision = first["revision"].as_u64().unwrap();

    // Each node follows one replica; find node-1's, and check both replicas' nodes agree.
    let deadline = Instant::now() + WAIT;
    let serving = loop {
        let on: Vec<usize> = (0..2).filter(|i| connected(&cluster, *i, "node-1")).collect();
        if let [i] = on.as_slice() {
            break *i;
        }
        assert!(Instant::now() < deadline, "node-1 is connected to {on:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for node in ["node-1", "node-2"] {
        let deadline = Instant::now() + WAIT;
        let i = loop {
            if let Some(i) = (0..2).find(|i| connected(&cluster, *i, node)) {
                break i;
            }
            assert!(Instant::now() < deadline, "{node} is connected to no replica");
            std::thread::sleep(Duration::from_millis(50));
        };
        wait_in_force(&cluster, i, node, revision);
    }

    // node-1's replica dies; the survivor takes a new apply and node-1 gets it from there.
    cluster.stop_replica(serving).unwrap();
    let survivor = 1 - serving;
    // The survivor serves the same version for the same content, so node-1 reconnects to it
    // with that version in force (and nothing to rewrite).
    let status = wait_in_force(&cluster, survivor, "node-1", revision);
    assert_eq!(status["version"], revision.to_string(), "{status}");
    let deny = "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: no-9090, namespace: default}\n\
                spec:\n  selector: {matchLabels: {app: p2-1}}\n  action: Deny\n  rules:\n  - from: [{namespace: default}]\n    ports: [9090]\n";
    let answer = cluster
        .replica_admin(survivor, &json!({"op": "apply", "files": [{"name": "deny.yaml", "text": deny}]}))
        .unwrap();
    assert_eq!(answer["errors"], json!([]), "{answer}");
    let applied = answer["revision"].as_u64().expect("revision");
    assert!(applied > revision);
    for node in ["node-1", "node-2"] {
        wait_in_force(&cluster, survivor, node, applied);
    }
    let r = support::connect(&cluster, "p1-1", &dst, 10);
    assert_eq!(r["errno"], 1, "the policy applied through the survivor is enforced at the source (EPERM): {r}");

    // The dead replica comes back and serves the same snapshot as the survivor.
    cluster.start_replica(serving).unwrap();
    let (back, other) = (get(&cluster, serving), get(&cluster, survivor));
    assert_eq!((back["revision"].as_u64(), &back["resources"]), (Some(applied), &other["resources"]));
}

/// `palisade serve --ca-listen`: the CA beside the control plane authorizes a node by the
/// workloads of the resources in force, so a workload that exists only in etcd (no inventory
/// file lists it) gets its certificate on its node once applied — and only there.
#[test]
fn the_ca_beside_the_control_plane_signs_for_workloads_applied_to_etcd() {
    use palisade_mesh::ca_api::{SignRequest, new_key_and_csr};
    use palisade_mesh::ca_client::{CaClient, CaClientError};
    use palisade_mesh::identity::SpiffeId;
    use palisade_mesh::tls::{Credential, CredentialSlot, TrustBundle};

    support::require_root();
    let state = StateDir::new();
    let etcd = Etcd::start(&state.0).unwrap();
    let palisade = palisade_sandbox::workspace_bin("palisade").unwrap();
    let ca_dir = state.0.join("ca");
    let run = |args: &[&str]| {
        let out = Command::new(&palisade).arg("ca").arg("--dir").arg(&ca_dir).args(args).output().unwrap();
        assert!(out.status.success(), "palisade ca {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["init"]);
    for node in ["node1", "node2"] {
        run(&["node-credential", "--node", node, "--out", state.0.join(node).to_str().unwrap()]);
    }
    let socket = state.0.join("palisade.sock");
    let log_file = state.0.join("serve.log");
    let ca_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ca_addr: std::net::SocketAddr = format!("127.0.0.1:{ca_port}").parse().unwrap();
    let child = Command::new(&palisade)
        .args(["serve", "--store", &format!("etcd://{}", etcd.endpoint().trim_start_matches("http://"))])
        .arg("--ca-dir")
        .arg(&ca_dir)
        .args(["--listen", "127.0.0.1:0", "--ca-listen", &ca_addr.to_string()])
        .arg("--admin-socket")
        .arg(&socket)
        .env("NO_COLOR", "1")
        .stdout(std::fs::File::create(&log_file).unwrap())
        .stderr(std::fs::File::create(state.0.join("serve.err")).unwrap())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(child);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let sign = |node: &str, id: &SpiffeId| {
        let dir = state.0.join(node);
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        let credential = Credential::from_pem(&read("node.pem"), &read("node-key.pem")).unwrap();
        let bundle = TrustBundle::from_pem(&read("bundle.pem"), "cluster.local").unwrap();
        let client = CaClient::new(ca_addr, CredentialSlot::new(credential));
        let (_key, csr_pem) = new_key_and_csr().unwrap();
        let request = SignRequest { identity: id.clone(), csr_pem };
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), client.sign(&bundle, &request)).await.expect("CA answers")
        })
    };
    let web = SpiffeId::new("cluster.local", "default", "web");
    // Up, with nothing in the store: no workload is scheduled anywhere.
    let deadline = Instant::now() + WAIT;
    loop {
        match sign("node1", &web) {
            Err(CaClientError::Refused { status: 403, .. }) => break,
            other => assert!(Instant::now() < deadline, "before any workload: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let file = state.0.join("web.yaml");
    std::fs::write(
        &file,
        "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {name: web, namespace: default}\n\
         spec: {serviceAccount: web, node: node1, addresses: [10.1.0.5]}\n",
    )
    .unwrap();
    let out = Command::new(&palisade)
        .args(["apply", "-f", file.to_str().unwrap(), "--socket", socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "apply: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Applied to etcd: node1 (its node) gets the certificate, node2 does not.
    sign("node1", &web).unwrap_or_else(|e| panic!("web on node1 after apply: {e}"));
    match sign("node2", &web) {
        Err(CaClientError::Refused { status: 403, .. }) => {}
        other => panic!("web is not on node2: {other:?}"),
    }
}
