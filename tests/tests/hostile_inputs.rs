//! The certificate authority and the policy loader against hostile or broken input, with the
//! real `palisade` binary on loopback: a CA whose descriptors run out keeps serving; a CA whose
//! inventory goes bad (or absurdly deep) keeps its last good one; the control plane's own
//! identities are never issued to a node; `palisade validate` refuses endless and deeply
//! nested files at once.
mod support;

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use palisade_mesh::ca_api::{CONTROL_PLANE_NAMESPACE, SignRequest, ca_identity, new_key_and_csr};
use palisade_mesh::ca_client::{CaClient, CaClientError};
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::tls::{Credential, CredentialSlot, TrustBundle};
use support::ca_serve::{CaServe, palisade};

const TD: &str = "cluster.local";
/// Bounds a wait for something that happens at once when the code is right, so that a
/// regression fails the test instead of hanging it.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn workload(name: &str, ns: &str, sa: &str, ip: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{serviceAccount: {sa}, node: node-1, addresses: [{ip}]}}\n---\n"
    )
}

/// A resource whose line 4 nests 100,000 levels deep (200 KB): serde_yaml parses it for
/// minutes (its time is quadratic in the depth).
fn deeply_nested() -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {{name: a}}\nx: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    )
}

/// `palisade ca serve` as a child process in a scratch directory (removed on drop, the
/// process killed, also when the test panics).
struct CaProcess {
    serve: CaServe,
    root: PathBuf,
}

impl CaProcess {
    /// Starts a CA whose inventory is `inventory`; `max_files` lowers its RLIMIT_NOFILE.
    fn start(name: &str, inventory: &str, max_files: Option<u64>) -> CaProcess {
        let root = std::env::temp_dir().join(format!("plsd-hostile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let ca_dir = root.join("ca");
        let run = |args: &[&str]| {
            let out = Command::new(palisade()).arg("ca").arg("--dir").arg(&ca_dir).args(args).output().unwrap();
            assert!(out.status.success(), "palisade ca {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&["init"]);
        run(&["node-credential", "--node", "node-1", "--out", root.join("node-1").to_str().unwrap()]);
        std::fs::write(root.join("inventory.yaml"), inventory).unwrap();
        let serve = CaServe::start(&ca_dir, &root.join("inventory.yaml"), root.join("ca.log"), max_files);
        CaProcess { serve, root }
    }

    fn log(&self) -> String {
        self.serve.log()
    }

    fn wait_log(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.serve.wait_log(what, pred)
    }

    fn assert_alive(&mut self) {
        self.serve.assert_alive();
    }

    fn client(&self) -> (CaClient, TrustBundle) {
        let dir = self.root.join("node-1");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        let credential = Credential::from_pem(&read("node.pem"), &read("node-key.pem")).unwrap();
        let bundle = TrustBundle::from_pem(&read("bundle.pem"), TD).unwrap();
        (CaClient::new(self.serve.addr, CredentialSlot::new(credential)), bundle)
    }

    /// Asks for a certificate for `id` as node-1.
    async fn sign(&self, id: &SpiffeId) -> Result<(), CaClientError> {
        let (client, bundle) = self.client();
        let (_key, csr_pem) = new_key_and_csr().unwrap();
        client.sign(&bundle, &SignRequest { identity: id.clone(), csr_pem }).await.map(|_| ())
    }

    fn write_inventory(&self, text: &str) {
        // Written in place (not renamed): the CA must cope with a half-bad file too.
        std::fs::write(self.root.join("inventory.yaml"), text).unwrap();
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// `n` TCP connections to `to` from `from` that never say anything.
async fn idle_connections(from: Ipv4Addr, to: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::new();
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
        out.push(socket.connect(to).await.unwrap());
    }
    out
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_keeps_serving_when_idle_connections_exhaust_its_descriptors() {
    let mut ca = CaProcess::start("fds", &workload("web", "shop", "web", "10.0.0.1"), Some(64));
    let web = id("shop", "web");
    ca.sign(&web).await.expect("signing before the flood");

    // 100 idle connections from one address: beyond 16 they are closed at once, so the CA
    // keeps its descriptors and a client from elsewhere is served while they stay open.
    let one_source = idle_connections(Ipv4Addr::new(127, 0, 0, 2), ca.serve.addr, 100).await;
    ca.sign(&web).await.expect("signing while one address holds 100 idle connections");
    ca.assert_alive();
    drop(one_source);

    // 100 from ten addresses: within the per-source bound, but past the 64 descriptors the
    // CA may open. accept() fails with EMFILE; the CA must wait it out, not exit.
    let mut many_sources = Vec::new();
    for i in 0..10 {
        many_sources.extend(idle_connections(Ipv4Addr::new(127, 0, 0, 10 + i), ca.serve.addr, 10).await);
    }
    ca.wait_log("an accept failure", |l| l.contains("accept failed") && l.contains("Too many open files"));
    ca.assert_alive();
    drop(many_sources);
    ca.sign(&web).await.expect("signing after the descriptors came back");
    ca.assert_alive();
}

#[tokio::test]
async fn the_ca_keeps_its_last_good_inventory() {
    let good = format!("{}{}", workload("web", "shop", "web", "10.0.0.1"), workload("db", "shop", "db", "10.0.0.2"));
    let mut ca = CaProcess::start("inventory", &good, None);
    let (web, api) = (id("shop", "web"), id("shop", "api"));
    ca.sign(&web).await.expect("signing with a good inventory");

    // Nested too deep to parse in reasonable time: refused at once, the old inventory serves.
    ca.write_inventory(&deeply_nested());
    ca.wait_log("the deep inventory to be refused", |l| l.contains("nested deeper than the limit"));
    ca.sign(&web).await.expect("signing for a scheduled identity with a deeply nested inventory");

    // Plain garbage, then a missing file: the same.
    ca.write_inventory("apiVersion: palisade.dev/v1alpha1\nkind: [Workload\n");
    ca.wait_log("the broken inventory to be logged", |l| {
        l.contains("workload inventory unusable") && l.contains("inventory.yaml:")
    });
    ca.sign(&web).await.expect("signing for a scheduled identity with a broken inventory");
    match ca.sign(&api).await {
        Err(CaClientError::Refused { status: 403, .. }) => {}
        other => panic!("an unscheduled identity with a broken inventory: {other:?}"),
    }
    std::fs::remove_file(ca.root.join("inventory.yaml")).unwrap();
    ca.wait_log("the missing inventory to be logged", |l| {
        l.contains("workload inventory unusable") && l.contains("cannot read")
    });
    ca.sign(&web).await.expect("signing for a scheduled identity with the inventory missing");

    // A good inventory again is picked up at once.
    ca.write_inventory(&format!("{good}{}", workload("api", "shop", "api", "10.0.0.3")));
    ca.sign(&api).await.expect("signing for a newly scheduled identity");
    ca.assert_alive();
}

#[tokio::test]
async fn the_ca_never_issues_control_plane_identities_to_a_node() {
    let ca_id = ca_identity(TD);
    let inventory = format!(
        "{}{}{}",
        workload("ca", &ca_id.namespace, &ca_id.service_account, "10.0.0.9"),
        workload("ctl", CONTROL_PLANE_NAMESPACE, "controller", "10.0.0.8"),
        workload("web", "shop", "web", "10.0.0.1"),
    );
    let ca = CaProcess::start("system", &inventory, None);
    ca.sign(&id("shop", "web")).await.expect("an ordinary scheduled identity");
    for (who, expect) in [
        (ca_id.clone(), "the CA's own serving identity"),
        (id(CONTROL_PLANE_NAMESPACE, "controller"), "control plane's namespace palisade-system"),
    ] {
        match ca.sign(&who).await {
            Err(CaClientError::Refused { status: 403, body, .. }) => assert!(body.contains(expect), "{who}: {body}"),
            other => panic!("{who} was not refused with 403: {other:?}"),
        }
    }
    assert!(ca.log().contains("never issued"), "refusals are logged:\n{}", ca.log());
}

/// Removes a scratch directory when dropped, also when the test panics.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `palisade validate` on `path`; returns its stderr once it failed (it must).
fn validate_fails(path: &Path) -> String {
    let mut child = Command::new(palisade())
        .arg("validate")
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + HANG_GUARD;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("palisade validate {} did not finish", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success(), "palisade validate {} succeeded", path.display());
    stderr
}

#[test]
fn validate_refuses_endless_and_deeply_nested_files() {
    let err = validate_fails(Path::new("/dev/zero"));
    assert!(err.contains("/dev/zero") && err.contains("larger than the limit") && err.contains("8 MiB"), "{err}");

    let dir = RemoveOnDrop(std::env::temp_dir().join(format!("plsd-hostile-validate-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let deep = dir.0.join("deep.yaml");
    std::fs::write(&deep, deeply_nested()).unwrap();
    let err = validate_fails(&deep);
    assert!(err.contains(&format!("{}:4: refused: YAML nested deeper than the limit of 64", deep.display())), "{err}");
}
