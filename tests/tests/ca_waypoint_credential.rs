//! A waypoint's credential bound to its one identity, against the real `palisade` binary on
//! loopback over real mutual TLS: `palisade ca waypoint-credential` issues only a waypoint's
//! identity; the CA renews a waypoint's identity for a certificate of that same identity and
//! refuses everything else a workload certificate asks (another identity, a non-waypoint
//! identity renewing itself, an identity that stopped being a waypoint's); expired and foreign
//! certificates never get past the handshake. Node credentials keep working as before.
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use palisade_ca::authority::CertificateAuthority;
use palisade_mesh::ca_api::{SignRequest, new_key_and_csr};
use palisade_mesh::ca_client::{CaClient, CaClientError};
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::tls::{Credential, CredentialSlot, TrustBundle};
use support::ca_serve::{CaServe, palisade};

const TD: &str = "cluster.local";
/// Bounds waits for what happens at once when the code is right, so a regression fails the
/// test instead of hanging it.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa)
}

/// Waypoint `wp` of namespace shop (its Workload runs as shop/waypoint), an ordinary workload
/// shop/web, and a second waypoint `other` running as shop/other; all on node-1.
fn inventory(with_gateway: bool) -> String {
    let workload = |name: &str, sa: &str, ip: &str, gateway: Option<&str>| {
        let labels = gateway.map(|g| format!("gateway.networking.k8s.io/gateway-name: {g}")).unwrap_or_default();
        format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{serviceAccount: {sa}, node: node-1, addresses: [{ip}], labels: {{{labels}}}}}\n---\n"
        )
    };
    let gateway = |name: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  gatewayClassName: palisade-waypoint\n  listeners:\n  - {{name: mesh, port: 15008, protocol: HBONE}}\n---\n"
        )
    };
    let mut out = workload("wp", "waypoint", "10.0.0.1", Some("wp"));
    out += &workload("web", "web", "10.0.0.2", None);
    out += &workload("other", "other", "10.0.0.3", Some("other"));
    out += &gateway("other");
    if with_gateway {
        out += &gateway("wp");
    }
    out
}

/// A CA directory with node-1's credential and the inventory, and (once started) `palisade ca
/// serve` over it; the directory is removed and the process killed on drop (panics included).
struct Bed {
    root: PathBuf,
    ca: Option<CaServe>,
}

impl Bed {
    fn new(name: &str) -> Bed {
        let root = std::env::temp_dir().join(format!("plsd-wpcred-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("inventory.yaml"), inventory(true)).unwrap();
        let bed = Bed { root, ca: None };
        let node_1 = bed.path("node-1");
        for args in [vec!["init"], vec!["node-credential", "--node", "node-1", "--out", &node_1]] {
            let out = bed.palisade_ca(&args);
            assert!(out.status.success(), "palisade ca {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        bed
    }

    fn path(&self, name: &str) -> String {
        self.root.join(name).to_str().unwrap().to_string()
    }

    fn palisade_ca(&self, args: &[&str]) -> Output {
        Command::new(palisade()).arg("ca").arg("--dir").arg(self.root.join("ca")).args(args).output().unwrap()
    }

    /// `palisade ca waypoint-credential` for shop/<sa> into `<root>/<sa>`.
    fn waypoint_credential(&self, ns: &str, sa: &str) -> Output {
        let inventory = self.path("inventory.yaml");
        let out = self.path(sa);
        self.palisade_ca(&[
            "waypoint-credential",
            "--namespace",
            ns,
            "--service-account",
            sa,
            "--inventory",
            &inventory,
            "--out",
            &out,
        ])
    }

    fn serve(&mut self) {
        let (ca_dir, inventory) = (self.root.join("ca"), self.root.join("inventory.yaml"));
        self.ca = Some(CaServe::start(&ca_dir, &inventory, self.root.join("ca.log"), None));
    }

    fn ca(&mut self) -> &mut CaServe {
        self.ca.as_mut().expect("the CA serves (Bed::serve)")
    }

    fn bundle(&self) -> TrustBundle {
        TrustBundle::from_pem(&std::fs::read_to_string(self.root.join("node-1/bundle.pem")).unwrap(), TD).unwrap()
    }

    fn read(&self, dir: &str, cert: &str, key: &str) -> Credential {
        let read = |f: &str| std::fs::read_to_string(self.root.join(dir).join(f)).unwrap();
        Credential::from_pem(&read(cert), &read(key)).unwrap()
    }

    /// Asks the CA for `id` showing `credential`; on success, the new credential.
    async fn sign(&self, credential: Credential, id: &SpiffeId) -> Result<Credential, CaClientError> {
        let addr = self.ca.as_ref().expect("the CA serves (Bed::serve)").addr;
        let client = CaClient::new(addr, CredentialSlot::new(credential));
        let (key, csr_pem) = new_key_and_csr().unwrap();
        let response = client.sign(&self.bundle(), &SignRequest { identity: id.clone(), csr_pem }).await?;
        Ok(Credential::from_pem(&response.chain_pem, &key).unwrap())
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.ca = None;
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn assert_forbidden(result: Result<Credential, CaClientError>, what: &str, reason: &str) {
    match result {
        Err(CaClientError::Refused { status: 403, body, .. }) => {
            assert!(body.contains(reason), "{what}: refused, but the reason {body:?} lacks {reason:?}")
        }
        Err(e) => panic!("{what}: expected a 403 naming {reason:?}, got {e}"),
        Ok(c) => panic!("{what}: the CA signed {}", c.uri),
    }
}

fn assert_refused_at_handshake(result: Result<Credential, CaClientError>, what: &str) {
    match result {
        Err(CaClientError::Transport { .. }) => {}
        Err(e) => panic!("{what}: expected the handshake to fail, got {e}"),
        Ok(c) => panic!("{what}: the CA signed {}", c.uri),
    }
}

#[test]
fn the_waypoint_credential_command_issues_only_a_waypoints_identity() {
    let bed = Bed::new("cmd");
    let out = bed.waypoint_credential("shop", "waypoint");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let credential = bed.read("waypoint", "waypoint.pem", "waypoint-key.pem");
    assert_eq!(credential.workload_id(), Some(id("shop", "waypoint")));
    let key_mode = std::fs::metadata(bed.root.join("waypoint/waypoint-key.pem")).unwrap().permissions().mode();
    assert_eq!(key_mode & 0o077, 0, "the key is readable by others: {key_mode:o}");
    let bundle = std::fs::read_to_string(bed.root.join("waypoint/bundle.pem")).unwrap();
    assert_eq!(bundle, std::fs::read_to_string(bed.root.join("node-1/bundle.pem")).unwrap());

    for (ns, sa, reason) in [
        ("shop", "web", "not the identity of a waypoint"),
        ("shop", "nobody", "not the identity of a waypoint"),
        ("palisade-system", "palisade-server", "control plane's namespace"),
    ] {
        let out = bed.waypoint_credential(ns, sa);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{ns}/{sa} got a waypoint credential");
        assert!(stderr.contains(reason), "{ns}/{sa}: {stderr}");
        assert!(!bed.root.join(sa).join("waypoint.pem").exists(), "{ns}/{sa}: a credential was written");
    }
}

#[tokio::test]
async fn a_waypoint_credential_renews_its_own_identity_and_nothing_else() {
    let mut bed = Bed::new("renew");
    let out = bed.waypoint_credential("shop", "waypoint");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    bed.serve();
    let (waypoint, web, other) = (id("shop", "waypoint"), id("shop", "web"), id("shop", "other"));
    let bootstrap = bed.read("waypoint", "waypoint.pem", "waypoint-key.pem");

    // The bootstrap gets the waypoint its certificate, which renews itself in turn.
    let first = bed.sign(bootstrap.clone(), &waypoint).await.expect("the bootstrap credential asks for itself");
    assert_eq!(first.workload_id(), Some(waypoint.clone()));
    let renewed = bed.sign(first.clone(), &waypoint).await.expect("a waypoint certificate renews itself");
    assert_eq!(renewed.workload_id(), Some(waypoint.clone()));

    // Never another identity, scheduled on the waypoint's node or a waypoint's or not.
    for (shown, what) in [(&bootstrap, "bootstrap"), (&renewed, "renewed")] {
        for asked in [&web, &other, &id("shop", "nobody")] {
            let result = bed.sign(shown.clone(), asked).await;
            assert_forbidden(result, &format!("{what} certificate asking for {asked}"), "may only renew");
        }
    }

    // An ordinary workload's certificate (its node asked for it) cannot renew itself.
    let node = bed.read("node-1", "node.pem", "node-key.pem");
    let web_cert = bed.sign(node.clone(), &web).await.expect("node-1 asks for a workload scheduled on it");
    assert_forbidden(
        bed.sign(web_cert, &web).await,
        "a non-waypoint renewing itself",
        "not the identity of a waypoint",
    );
    // The node credential still enrolls the waypoint (compatibility).
    bed.sign(node, &waypoint).await.expect("node-1 asks for the waypoint scheduled on it");

    // Once the Gateway is gone, its identity is no longer a waypoint's: no more renewals.
    std::fs::write(bed.root.join("inventory.yaml"), inventory(false)).unwrap();
    let deadline = Instant::now() + HANG_GUARD;
    let refused = loop {
        match bed.sign(renewed.clone(), &waypoint).await {
            Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => break other,
        }
    };
    assert_forbidden(refused, "a renewal after the Gateway was removed", "not the identity of a waypoint");
    bed.ca().wait_log("the refusal to name the workload that asked", |l| {
        l.contains("refused") && l.contains("caller=workload spiffe://cluster.local/ns/shop/sa/waypoint")
    });
}

#[tokio::test]
async fn expired_and_foreign_workload_certificates_fail_the_handshake() {
    let mut bed = Bed::new("expired");
    bed.serve();
    let waypoint = id("shop", "waypoint");
    let issue = |ca: &CertificateAuthority, validity: Option<(SystemTime, SystemTime)>| {
        let (key, csr) = new_key_and_csr().unwrap();
        let chain = match validity {
            Some((a, b)) => ca.sign_workload_between(&csr, &waypoint, a, b).unwrap().0,
            None => ca.sign_workload(&csr, &waypoint).unwrap().0,
        };
        Credential::from_pem(&chain, &key).unwrap()
    };
    let mesh = CertificateAuthority::open(&bed.root.join("ca"), TD).unwrap();
    // The control: the same root's unexpired certificate is served.
    bed.sign(issue(&mesh, None), &waypoint).await.expect("an unexpired waypoint certificate of the mesh");

    let hour = Duration::from_secs(3600);
    let now = SystemTime::now();
    let expired = issue(&mesh, Some((now - 3 * hour, now - hour)));
    assert_refused_at_handshake(bed.sign(expired, &waypoint).await, "an expired waypoint certificate");

    let foreign_dir = bed.root.join("foreign-ca");
    let foreign = CertificateAuthority::init(&foreign_dir, TD).unwrap().0;
    assert_refused_at_handshake(bed.sign(issue(&foreign, None), &waypoint).await, "a foreign root's certificate");
    // The CA logs a refusal after the client has seen it: wait for both lines.
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let refusals = bed.ca().log().lines().filter(|l| l.contains("CA client refused at TLS")).count();
        if refusals >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the CA logged {refusals} TLS refusals; log:\n{}", bed.ca().log());
        std::thread::sleep(Duration::from_millis(50));
    }
}
