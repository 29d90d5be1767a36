//! Test bed for the `waypoint` binary over real HBONE: a real CA (`palisade_ca`) serving on
//! 127.0.0.1 with the test's resources as inventory, the waypoint process with a node
//! credential, backends behind small HBONE servers standing in for the destination ztunnels,
//! and HBONE clients with workload certificates. Each bed takes its own loopback /24
//! (127.a.b.0) so tests in parallel never share a port; everything stops when the bed drops.
#![allow(dead_code)]
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use palisade_ca::authority::CertificateAuthority;
use palisade_ca::server::CaService;
use palisade_mesh::ca_api::new_key_and_csr;
use palisade_mesh::hbone::pool::{ConnectRequest, Pool, PoolKey};
use palisade_mesh::hbone::server::{InboundStream, serve_connection};
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::tls::{Credential, CredentialSlot, TrustBundle, server_config};
use palisade_waypoint::tunnel::TunnelIo;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

pub const TD: &str = "cluster.local";
/// The Service VIP clients dial (never dialled for real: it is only the CONNECT authority).
pub const VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80);
pub const TARGET_PORT: u16 = 8080;

pub fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa)
}

pub async fn bounded<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f).await.expect("test did not finish within its time bound")
}

pub struct AbortOnDrop(pub JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A loopback /24 of this bed: `127.a.b.<host>`.
#[derive(Clone, Copy)]
pub struct Net([u8; 3]);

impl Net {
    fn fresh() -> Net {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = (std::process::id() * 8 + NEXT.fetch_add(1, Ordering::Relaxed)) & 0xffff;
        Net([127, ((n >> 8) as u8).max(1), n as u8])
    }
    pub fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(self.0[0], self.0[1], self.0[2], host))
    }
    pub fn addr(&self, host: u8, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(host), port)
    }
}

/// Hosts of a bed.
pub const CA: u8 = 1;
pub const WAYPOINT: u8 = 2;
pub const FRONTEND: u8 = 10;
pub const INTRUDER: u8 = 11;
pub const WEB_V1: u8 = 20;
pub const WEB_V2: u8 = 21;

/// The bed's resources: `shop` uses the waypoint; `web` routes `/v2…` to `web-v2`, the rest
/// to `web-v1`; the `web` workloads admit only `front/frontend` at L4.
pub fn resources(net: Net) -> String {
    let ip = |h| net.ip(h);
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/use-waypoint: waypoint}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: front}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: other}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: shop}}
spec:
  gatewayClassName: palisade-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {{name: waypoint-0, namespace: shop}}
spec:
  serviceAccount: waypoint
  node: node-1
  addresses: [{wp}]
  labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {{name: web-v1-0, namespace: shop}}
spec:
  serviceAccount: web
  node: node-1
  addresses: [{v1}]
  labels: {{app: web, version: v1}}
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {{name: web-v2-0, namespace: shop}}
spec:
  serviceAccount: web
  node: node-2
  addresses: [{v2}]
  labels: {{app: web, version: v2}}
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {{name: frontend-0, namespace: front}}
spec:
  serviceAccount: frontend
  node: node-2
  addresses: [{fe}]
  labels: {{app: frontend}}
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {{name: intruder-0, namespace: other}}
spec:
  serviceAccount: intruder
  node: node-2
  addresses: [{intr}]
  labels: {{app: intruder}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  clusterIP: {vip}
  selector: {{app: web}}
  ports: [{{name: http, port: {vport}, targetPort: {tport}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web-v1, namespace: shop}}
spec:
  clusterIP: 10.96.0.11
  selector: {{app: web, version: v1}}
  ports: [{{name: http, port: 80, targetPort: {tport}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web-v2, namespace: shop}}
spec:
  clusterIP: 10.96.0.12
  selector: {{app: web, version: v2}}
  ports: [{{name: http, port: 80, targetPort: {tport}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web, namespace: shop}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web, port: {vport}}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /v2}}}}]
    backendRefs: [{{name: web-v2, port: 80}}]
  - backendRefs: [{{name: web-v1, port: 80}}]
---
apiVersion: palisade.dev/v1alpha1
kind: SegmentationPolicy
metadata: {{name: web-from-front, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: Allow
  rules:
  - from: [{{namespace: front, serviceAccount: frontend}}]
    ports: [{tport}]
"#,
        wp = ip(WAYPOINT),
        v1 = ip(WEB_V1),
        v2 = ip(WEB_V2),
        fe = ip(FRONTEND),
        intr = ip(INTRUDER),
        vip = VIP.ip(),
        vport = VIP.port(),
        tport = TARGET_PORT,
    )
}

/// A destination: an HBONE server on `ip:15008` with the backend workload's certificate,
/// serving HTTP/1.1 and HTTP/2 on each CONNECT to `ip:TARGET_PORT`. It answers `<name>` and
/// records the SPIFFE ID each tunnel proved.
pub struct Destination {
    pub name: &'static str,
    pub peers: Arc<Mutex<Vec<String>>>,
    pub hits: Arc<AtomicU32>,
    _task: AbortOnDrop,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl Destination {
    pub fn hits(&self) -> u32 {
        self.hits.load(Ordering::SeqCst)
    }
}

pub struct Bed {
    pub net: Net,
    pub dir: PathBuf,
    pub authority: CertificateAuthority,
    pub bundle: TrustBundle,
    pub policy: PathBuf,
    waypoint: Option<Child>,
    _ca: AbortOnDrop,
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(mut child) = self.waypoint.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bed {
    /// CA (serving), credentials and resources on disk; the waypoint not started yet.
    pub async fn new(name: &str) -> Bed {
        let net = Net::fresh();
        let dir = std::env::temp_dir().join(format!("plsd-wp-{name}-{}-{}", std::process::id(), net.0[1]));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("node")).unwrap();
        let ca_dir = dir.join("ca");
        let authority = CertificateAuthority::init(&ca_dir, TD).unwrap().0;
        let policy = dir.join("policy.yaml");
        std::fs::write(&policy, resources(net)).unwrap();
        let (chain, key) = authority.node_credential("node-1").unwrap();
        std::fs::write(dir.join("node/node.pem"), chain).unwrap();
        std::fs::write(dir.join("node/node-key.pem"), key).unwrap();
        std::fs::write(dir.join("node/bundle.pem"), authority.bundle_pem()).unwrap();
        let bundle = TrustBundle::from_pem(&authority.bundle_pem(), TD).unwrap();
        let service = CaService::new(CertificateAuthority::open(&ca_dir, TD).unwrap(), ca_dir, vec![policy.clone()]);
        let listener = TcpListener::bind(net.addr(CA, 15012)).await.unwrap();
        let ca = tokio::spawn(async move {
            let _ = palisade_ca::server::serve(listener, Arc::new(service)).await;
        });
        Bed { net, dir, authority, bundle, policy, waypoint: None, _ca: AbortOnDrop(ca) }
    }

    pub fn issue(&self, id: &SpiffeId) -> Arc<CredentialSlot> {
        let (key, csr) = new_key_and_csr().unwrap();
        let (chain, _) = self.authority.sign_workload(&csr, id).unwrap();
        CredentialSlot::new(Credential::from_pem(&chain, &key).unwrap())
    }

    pub fn admin(&self) -> SocketAddr {
        self.net.addr(WAYPOINT, 15020)
    }

    pub fn waypoint_hbone(&self) -> SocketAddr {
        self.net.addr(WAYPOINT, 15008)
    }

    /// Starts the `waypoint` binary on the bed's policy file and waits for `/ready`.
    pub async fn start_waypoint(&mut self) {
        let policy = self.policy.to_string_lossy().into_owned();
        self.start_waypoint_with(&["--policy", &policy]).await
    }

    /// Starts the `waypoint` binary with `source` (`--policy …` or `--control-plane …`) and
    /// waits for `/ready`.
    pub async fn start_waypoint_with(&mut self, source: &[&str]) {
        let log = std::fs::File::create(self.dir.join("waypoint.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_waypoint"))
            .args(["--gateway", "waypoint", "--namespace", "shop", "--service-account", "waypoint"])
            .arg("--ca-addr")
            .arg(self.net.addr(CA, 15012).to_string())
            .arg("--credential-dir")
            .arg(self.dir.join("node"))
            .args(source)
            .arg("--listen")
            .arg(self.waypoint_hbone().to_string())
            .arg("--admin")
            .arg(self.admin().to_string())
            .arg("--debug")
            .arg(std::net::SocketAddr::new(self.admin().ip(), self.admin().port() + 1).to_string())
            .env("RUST_LOG", "info,palisade_waypoint=debug,palisade_mesh=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the waypoint binary");
        self.waypoint = Some(child);
        for _ in 0..200 {
            if let Ok((StatusCode::OK, _)) = self.get_admin("/ready").await {
                return;
            }
            if let Some(status) = self.waypoint.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("waypoint exited with {status}:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("waypoint not ready after 10 s:\n{}", self.log());
    }

    /// Kills the waypoint process (SIGKILL: nothing is saved on the way out).
    pub fn kill_waypoint(&mut self) {
        if let Some(mut child) = self.waypoint.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("waypoint.log")).unwrap_or_default()
    }

    /// Waits (up to 5 s) until the waypoint's log satisfies `pred`.
    pub async fn wait_for_log(&self, pred: impl Fn(&str) -> bool) -> bool {
        for _ in 0..100 {
            if pred(&self.log()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub async fn get_admin(&self, path: &str) -> Result<(StatusCode, String), String> {
        let tcp = TcpStream::connect(self.admin()).await.map_err(|e| e.to_string())?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get(path).header("host", "admin").body(Full::new(Bytes::new())).unwrap();
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into()))
    }

    /// A destination workload at `host` with identity `shop/web`, answering HTTP.
    pub async fn destination(&self, host: u8, name: &'static str) -> Destination {
        self.destination_serving(host, name, false).await
    }

    /// A destination that echoes the bytes of each tunnel (a TCP service, not HTTP).
    pub async fn echo_destination(&self, host: u8, name: &'static str) -> Destination {
        self.destination_serving(host, name, true).await
    }

    async fn destination_serving(&self, host: u8, name: &'static str, echo: bool) -> Destination {
        let listener = TcpListener::bind(self.net.addr(host, 15008)).await.unwrap();
        let tls = server_config(self.issue(&id("shop", "web")), &self.bundle, &[b"h2"]).unwrap();
        let (peers, hits) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicU32::new(0)));
        let expected = self.net.addr(host, TARGET_PORT);
        let handler = {
            let (peers, hits) = (peers.clone(), hits.clone());
            Arc::new(move |stream: InboundStream| {
                let (peers, hits) = (peers.clone(), hits.clone());
                async move {
                    peers.lock().unwrap().push(stream.peer.to_string());
                    if stream.authority != Ok(expected) {
                        stream.reject(StatusCode::BAD_REQUEST);
                        return;
                    }
                    let Ok((send, recv)) = stream.accept() else { return };
                    if echo {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let (mut rd, mut wr) = tokio::io::split(TunnelIo::new(send, recv, ()));
                        let _ = tokio::io::copy(&mut rd, &mut wr).await;
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
                        return;
                    }
                    let service = service_fn(move |req: Request<Incoming>| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let body = format!("{name} {} {:?}", req.uri().path(), req.version());
                        async move { Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                    });
                    let io = TokioIo::new(TunnelIo::new(send, recv, ()));
                    let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(io, service).await;
                }
            })
        };
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                tokio::spawn(serve_connection(tcp, tls.clone(), handler.clone(), shutdown.clone()));
            }
        });
        Destination { name, peers, hits, _task: AbortOnDrop(task), _stop: stop }
    }

    /// An HBONE client at `host` proving `credential`: one CONNECT to the waypoint for the VIP.
    pub async fn tunnel(&self, host: u8, src: SpiffeId, credential: Arc<CredentialSlot>) -> Result<TunnelIo, String> {
        let pool = Pool::new(Default::default());
        let key = PoolKey { src, dst: id("shop", "waypoint"), endpoint: self.waypoint_hbone() };
        let from = self.net.ip(host);
        let to = self.waypoint_hbone();
        let dial = move || async move {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(from, 0))?;
            socket.connect(to).await
        };
        let request = ConnectRequest { authority: VIP, forwarded_for: SocketAddr::new(from, 40000) };
        let t = pool.connect(key, credential, &self.bundle, dial, request).await.map_err(|e| e.to_string())?;
        Ok(TunnelIo::new(t.send, t.recv, (t.slot, pool)))
    }
}

/// A CONNECT for the VIP from `host` on a connection of its own, with `credential` or with no
/// client certificate at all (which the pool cannot do): the status, or the error.
pub async fn raw_connect(bed: &Bed, host: u8, credential: Option<Arc<CredentialSlot>>) -> Result<StatusCode, String> {
    let expected = Some(id("shop", "waypoint"));
    let tls = palisade_mesh::tls::client_config(credential, &bed.bundle, expected, &[b"h2"]).unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(bed.net.ip(host), 0)).unwrap();
    let tcp = socket.connect(bed.waypoint_hbone()).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(palisade_mesh::tls::no_sni(), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut send, conn) = h2::client::handshake(tls).await.map_err(|e| format!("h2: {e}"))?;
    tokio::spawn(conn);
    let req = Request::builder().method("CONNECT").uri(VIP.to_string()).body(()).unwrap();
    let (resp, _stream) = send.send_request(req, false).map_err(|e| format!("CONNECT: {e}"))?;
    Ok(resp.await.map_err(|e| format!("CONNECT: {e}"))?.status())
}

/// Sends `GET path` over `io` as HTTP/1.1 or HTTP/2 (prior knowledge); status and body.
pub async fn get(io: TunnelIo, path: &str, h2: bool) -> (StatusCode, String) {
    let req = |uri: String| Request::get(uri).header("host", "web.shop").body(Full::new(Bytes::new())).unwrap();
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.unwrap();
        tokio::spawn(conn);
        send.send_request(req(format!("http://web.shop{path}"))).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.unwrap();
        tokio::spawn(conn);
        send.send_request(req(path.to_string())).await.unwrap()
    };
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into())
}
