//! Workload traffic through a waypoint on the sandbox, the real way: namespace `shop` uses the
//! waypoint `shop/waypoint`, and once that waypoint's Gateway says `istio.io/waypoint-for: all`
//! a captured client's connection made straight to a pod address of `shop` goes through its
//! ztunnel over HBONE to the waypoint (CONNECT authority = the pod's ip:port), which enforces
//! the AuthorizationPolicy attached to the waypoint before it forwards to the pod. The pod's
//! ztunnel then accepts tunnels only from the waypoint: a tunnel opened straight to it with a
//! client's valid certificate, which its L4 policy allows, is refused, and one that was open
//! before the change is closed.
//!
//! Before the label (a Service waypoint, Istio's default) the same direct traffic bypasses the
//! waypoint, as with Istio: the test shows that first, so the label is what makes the
//! difference.
//!
//! Layout: node 1 runs `client` and the waypoint; node 2 runs `web` (an HTTP/1.1 server on
//! 8080).
mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use palisade_ca::authority::CertificateAuthority;
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::tls::{Credential, CredentialSlot, TrustBundle, client_config, no_sni};
use palisade_sandbox::{Cluster, ClusterSpec, PodTemplate};
use serde_json::Value;
use support::l7::*;
use support::*;

const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";

/// `shop` uses the waypoint; the waypoint denies `/admin…` to everyone (a policy attached to
/// the waypoint `Gateway`, so it applies to the pods it serves too); L4 lets `client` reach
/// `web` (so a refusal below is the waypoint rule's, not L4's).
const POLICY: &str = "apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/use-waypoint: waypoint}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]
---
apiVersion: palisade.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: client-to-web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: Allow
  rules: [{from: [{namespace: shop, serviceAccount: client}]}]
---
";

fn pod(name: &str, app: &str) -> PodTemplate {
    let mut t = PodTemplate::new(name, "shop", name);
    t.labels = [("app".to_string(), app.to_string())].into();
    t.ports = vec![("http".to_string(), 8080)];
    t
}

fn cluster() -> Cluster {
    let id = palisade_sandbox::unique_test_id();
    let mut spec = ClusterSpec::uniform(&id, palisade_sandbox::test_state_dir(&id), 0, 0);
    spec.nodes = vec![vec![pod("client", "client")], vec![pod("web", "web")]];
    spec.policy = POLICY.to_string();
    start_with_waypoint(spec)
}

/// The cluster's resources with the waypoint's Gateway labelled `istio.io/waypoint-for:
/// <value>` (the sandbox writes Gateways without labels), put in force on both nodes.
fn label_waypoint(cluster: &Cluster, value: &str) {
    let plain = "kind: Gateway\nmetadata: {name: waypoint, namespace: shop}\n";
    let yaml = cluster.policy_yaml(POLICY);
    assert!(yaml.contains(plain), "the sandbox's Gateway is not written as expected:\n{yaml}");
    let labelled = format!(
        "kind: Gateway\nmetadata: {{name: waypoint, namespace: shop, labels: {{istio.io/waypoint-for: {value}}}}}\n"
    );
    let nodes = ["node-1", "node-2"];
    let before: Vec<u64> = nodes.iter().map(|n| cluster.policy_generation(n).expect("generation")).collect();
    let file = &cluster.info.policy_file;
    let tmp = file.with_extension("yaml.tmp");
    std::fs::write(&tmp, yaml.replace(plain, &labelled)).expect("write the policy");
    std::fs::rename(&tmp, file).expect("replace the policy");
    let deadline = Instant::now() + Duration::from_secs(15);
    for (node, old) in nodes.iter().zip(before) {
        while cluster.policy_generation(node).expect("generation") <= old {
            assert!(Instant::now() < deadline, "{node} did not put the labelled Gateway in force");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `count` GETs of `path` from `pod` to `to`; the probe's report (statuses, bodies, errors).
fn get(cluster: &Cluster, pod: &str, to: &str, path: &str, count: usize) -> Value {
    let count = count.to_string();
    probe_report(cluster, pod, &["http-get", "--to", to, "--path", path, "--count", &count, "--timeout-ms", "5000"])
}

/// An HTTP/1.1 server in `pod` answering every request with the pod's name.
fn http_server(cluster: &Cluster, pod: &str) -> Proc {
    probe_server(cluster, pod, &["http-serve", "--port", "8080", "--name", pod])
}

/// What a hand-made tunnel needs: a certificate for `ns/sa` signed by the cluster's CA, the
/// trust bundle, and the identity the destination must prove.
struct TunnelSpec {
    credential: std::sync::Arc<CredentialSlot>,
    bundle_pem: String,
    dst: IpAddr,
    dst_id: SpiffeId,
}

fn tunnel_spec(cluster: &Cluster, (ns, sa): (&str, &str), dst_pod: &str) -> TunnelSpec {
    let state = cluster.info.state_dir.clone();
    let bundle_pem = std::fs::read_to_string(state.join("credential-node-1/bundle.pem")).unwrap();
    let ca = CertificateAuthority::open(&state.join("ca"), "cluster.local").unwrap();
    let (key, csr) = palisade_mesh::ca_api::new_key_and_csr().unwrap();
    let chain = ca.sign_workload(&csr, &SpiffeId::new("cluster.local", ns, sa)).unwrap().0;
    let credential = CredentialSlot::new(Credential::from_pem(&chain, &key).unwrap());
    let pod = cluster.pod(dst_pod).unwrap();
    TunnelSpec {
        credential,
        bundle_pem,
        dst: pod.ip.parse().unwrap(),
        dst_id: SpiffeId::new("cluster.local", &pod.namespace, &pod.service_account),
    }
}

/// Opens one HBONE CONNECT to `dst:8080` at `dst:15008` from network namespace `netns` (not
/// the pod's cgroup: nothing captures it, exactly as a peer that goes around its ztunnel),
/// and reports its status on `status`. When it is 200 the tunnel is held until the other side
/// ends it (`Ok(how)`) or `hold` passes (`Err`).
fn tunnel(
    netns: &str,
    spec: TunnelSpec,
    status: mpsc::Sender<Result<u16, String>>,
    hold: Duration,
) -> Result<String, String> {
    palisade_sandbox::sys::in_netns(netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let bundle = TrustBundle::from_pem(&spec.bundle_pem, "cluster.local").unwrap();
            let tls = client_config(Some(spec.credential), &bundle, Some(spec.dst_id), &[b"h2"]).unwrap();
            let opened = tokio::time::timeout(Duration::from_secs(10), connect(spec.dst, tls)).await;
            let (mut body, _send) = match opened.unwrap_or(Err("timed out".into())) {
                Ok((200, body, send)) => {
                    let _ = status.send(Ok(200));
                    (body, send)
                }
                Ok((other, _, _)) => {
                    let _ = status.send(Ok(other));
                    return Ok(format!("status {other}"));
                }
                Err(e) => {
                    let _ = status.send(Err(e.clone()));
                    return Err(e);
                }
            };
            match tokio::time::timeout(hold, body.data()).await {
                Ok(None) => Ok("ended".to_string()),
                Ok(Some(Err(e))) => Ok(format!("reset: {e}")),
                Ok(Some(Ok(data))) => Err(format!("unexpected data from the server: {data:?}")),
                Err(_) => Err(format!("still open after {hold:?}")),
            }
        })
    })
    .map_err(|e| e.to_string())?
}

async fn connect(
    dst: IpAddr,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> Result<(u16, h2::RecvStream, h2::SendStream<bytes::Bytes>), String> {
    let tcp = tokio::net::TcpStream::connect(SocketAddr::new(dst, 15008)).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(tls).connect(no_sni(), tcp).await.map_err(|e| e.to_string())?;
    let (client, connection) = h2::client::handshake(tls).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut client = client.ready().await.map_err(|e| e.to_string())?;
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("{dst}:8080"))
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, send) = client.send_request(request, false).map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    Ok((status, response.into_body(), send))
}

/// One tunnel's status (not held).
fn tunnel_status(netns: &str, spec: TunnelSpec) -> Result<u16, String> {
    let (tx, rx) = mpsc::channel();
    let _ = tunnel(netns, spec, tx, Duration::ZERO);
    rx.recv_timeout(Duration::from_secs(15)).unwrap_or(Err("no status".into()))
}

/// Waits until the waypoint's access log has a line with every one of `parts`; returns it.
fn access_log_line(cluster: &Cluster, parts: &[&str]) -> String {
    let log = cluster.waypoint_log("waypoint");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_string();
        }
        assert!(Instant::now() < deadline, "no access log line with {parts:?} in:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn direct_pod_traffic_goes_through_a_workload_waypoint_and_nothing_bypasses_it() {
    let cluster = cluster();
    let _server = http_server(&cluster, "web");
    let web = cluster.pod("web").unwrap().ip.clone();
    let web_dst = format!("{web}:8080");
    let client_netns = cluster.pod("client").unwrap().netns.clone();

    // A Service waypoint (no label): straight to the pod bypasses it, as with Istio, and a
    // tunnel made by hand with the client's certificate is accepted by the pod's ztunnel.
    let bypass = get(&cluster, "client", &web_dst, "/admin/users", 1);
    assert_eq!(count(&bypass, "bodies", "web"), 1, "{bypass}");
    let (opened_tx, opened) = mpsc::channel();
    let held = {
        let spec = tunnel_spec(&cluster, ("shop", "client"), "web");
        let netns = client_netns.clone();
        std::thread::spawn(move || tunnel(&netns, spec, opened_tx, Duration::from_secs(20)))
    };
    let status = opened.recv_timeout(Duration::from_secs(15)).expect("the held tunnel reports its status");
    assert_eq!(status, Ok(200), "a direct tunnel before the waypoint serves workloads");

    // The waypoint now serves the workloads of `shop` too.
    label_waypoint(&cluster, "all");

    // The tunnel that went around it is closed, and the pod's ztunnel says why.
    let ended = held.join().expect("the tunnel thread");
    assert!(ended.is_ok(), "the direct tunnel stayed open: {ended:?}");
    let closed = wait_flow(&cluster, "node-2", |f| {
        f["direction"] == "inbound"
            && f["peer_spiffe_id"] == CLIENT_ID
            && f["error"].as_str().unwrap_or_default().contains("served by waypoint shop/waypoint for workload traffic")
    });
    assert_eq!(closed["dst"], web_dst.as_str(), "{closed}");

    // The same request to the pod's address now meets the waypoint's policy: 403. (The
    // waypoint follows the policy file on its own schedule: wait until it serves the pod.)
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = get(&cluster, "client", &web_dst, "/admin/users", 1);
        if count(&r, "statuses", "403") == 1 {
            break;
        }
        assert_eq!(count(&r, "bodies", "web"), 0, "the pod answered /admin/users once the waypoint serves it: {r}");
        assert!(Instant::now() < deadline, "no 403 from the waypoint for {web_dst}: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let denied = get(&cluster, "client", &web_dst, "/admin/users", 3);
    assert_eq!(count(&denied, "statuses", "403"), 3, "{denied}");
    let allowed = get(&cluster, "client", &web_dst, "/", 3);
    assert_eq!(count(&allowed, "bodies", "web"), 3, "{allowed}");

    // The waypoint's access log and flows name the rule and the client's proven identity.
    let line = access_log_line(&cluster, &["/admin/users", "403"]);
    assert!(line.contains("no-admin"), "the access log line does not name the rule: {line}");
    assert!(line.contains(CLIENT_ID), "{line}");
    let flows = cluster.waypoint_flows("waypoint").expect("the waypoint's flows");
    let flow = flows.as_array().into_iter().flatten().find(|f| f["path"] == "/admin/users" && f["status"] == 403);
    let flow = flow.unwrap_or_else(|| panic!("no flow event for the denied request in {flows}"));
    assert!(flow["rule"].as_str().is_some_and(|r| r.contains("no-admin")), "{flow}");
    assert_eq!(flow["src_identity"], CLIENT_ID, "{flow}");

    // The client's ztunnel sent it to the waypoint (its identity proven), for the pod's address.
    wait_flow(&cluster, "node-1", |f| {
        f["observer"] == "proxy"
            && f["direction"] == "outbound"
            && f["dst"] == web_dst.as_str()
            && f["peer_spiffe_id"] == WAYPOINT_ID
            && f["verdict"] == "allow"
    });

    // A tunnel straight to the pod's ztunnel with the client's valid certificate, from the
    // client's own address, which L4 allows: refused, naming the bypassed waypoint.
    let status = tunnel_status(&client_netns, tunnel_spec(&cluster, ("shop", "client"), "web"));
    assert_eq!(status, Ok(401), "a tunnel around the waypoint");
    let refused = wait_flow(&cluster, "node-2", |f| {
        f["verdict"] == "deny"
            && f["peer_spiffe_id"] == CLIENT_ID
            && f["policy"].as_str().unwrap_or_default().contains("bypassed")
    });
    assert!(refused["policy"].as_str().unwrap_or_default().contains("shop/waypoint"), "{refused}");
    // The waypoint itself, from its own address, is accepted.
    let waypoint_netns = cluster.waypoint("waypoint").unwrap().netns.clone();
    let status = tunnel_status(&waypoint_netns, tunnel_spec(&cluster, ("shop", "waypoint"), "web"));
    assert_eq!(status, Ok(200), "the waypoint's own tunnel");
}
