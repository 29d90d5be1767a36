//! HBONE between ztunnels: what crosses the wire is TLS, identities are proven, the CA signs
//! only for the asking node's workloads, streams share a bounded set of pooled connections,
//! and certificate renewal under traffic loses nothing.
mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use palisade_mesh::ca_api::{SignRequest, new_key_and_csr};
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::tls::{Credential, CredentialSlot, TrustBundle};
use support::*;

fn pattern(i: u64) -> u8 {
    // Same generator as palisade-probe.
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

#[test]
fn cross_node_traffic_is_tls_only_on_the_wire() {
    let cluster = mesh(2, 1, "");
    let _server = serve(&cluster, "p2-1", 8080);
    let fabric = format!("plsd-{}-fab", cluster.info.id);
    let pcap = cluster.info.state_dir.join("fabric.pcap");
    let mut tshark = Command::new("ip")
        .args(["netns", "exec", &fabric, "tshark", "-q", "-i", "br0", "-f", "tcp", "-w"])
        .arg(&pcap)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tshark (cargo xtask setup installs it)");
    // tshark says "Capturing on 'br0'" once it listens.
    let mut stderr = std::io::BufReader::new(tshark.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("Capturing on") {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0, "tshark exited before capturing");
    }
    // dumpcap announces itself slightly before packets flow into the file.
    std::thread::sleep(Duration::from_millis(500));
    let dst = format!("{}:8080", cluster.pod("p2-1").unwrap().ip);
    let r = connect(&cluster, "p1-1", &dst, 1 << 20);
    assert_eq!(r["verified"], true, "{r}");
    std::thread::sleep(Duration::from_millis(1000));
    // SAFETY: kill(2) on our child; SIGINT makes tshark flush and exit.
    unsafe { libc::kill(tshark.id() as i32, libc::SIGINT) };
    let _ = tshark.wait();

    let raw = std::fs::read(&pcap).expect("capture file");
    // 1 MiB went each way; the capture must hold most of it to prove anything.
    assert!(raw.len() > 3 << 19, "the capture holds the transfer ({} bytes)", raw.len());
    // No aligned 32-byte piece of the first 64 KiB the application sent appears on the wire
    // (a plaintext segment would carry many of them).
    let sent: Vec<u8> = (0..65536u64).map(pattern).collect();
    let pieces: std::collections::HashSet<&[u8]> = sent.chunks(32).collect();
    assert!(!raw.windows(32).any(|w| pieces.contains(w)), "application bytes crossed the node link in the clear");
    let tshark_count = |filter: &str| -> usize {
        let out = Command::new("tshark")
            .args([
                "-r",
                pcap.to_str().unwrap(),
                "-d",
                "tcp.port==15008,tls",
                "-d",
                "tcp.port==15012,tls",
                "-2",
                "-R",
                filter,
            ])
            .output()
            .expect("tshark read");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if filter.contains('!') && !text.is_empty() {
            eprintln!("packets matching {filter}:\n{text}");
        }
        text.lines().count()
    };
    // Every TCP payload between the nodes is on the HBONE port (or the CA's), both TLS only;
    // nothing went to the application's port.
    assert_eq!(tshark_count("tcp.port == 8080"), 0, "plaintext connection to the application port on the wire");
    assert_eq!(
        tshark_count("tcp.len > 0 && !(tcp.port == 15008 || tcp.port == 15012)"),
        0,
        "TCP payload outside the mTLS ports on the wire"
    );
    assert!(tshark_count("tls.record.version") > 10, "expected TLS records on the wire");
}

#[test]
fn a_node_cannot_obtain_certificates_for_another_nodes_workloads() {
    let cluster = mesh(2, 1, "");
    let dir = cluster.info.state_dir.join("credential-node-1");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let node1 = CredentialSlot::new(Credential::from_pem(&read("node.pem"), &read("node-key.pem")).unwrap());
    let bundle = TrustBundle::from_pem(&read("bundle.pem"), "cluster.local").unwrap();
    let netns = cluster.node("node-1").unwrap().netns.clone();
    let results = palisade_sandbox::sys::in_netns(&netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let client =
                palisade_mesh::ca_client::CaClient::new(palisade_sandbox::cluster::CA_ADDR.parse().unwrap(), node1);
            let ask = |sa: &str| {
                let (_, csr_pem) = new_key_and_csr().unwrap();
                SignRequest { identity: SpiffeId::new("cluster.local", "default", sa), csr_pem }
            };
            let own = client.sign(&bundle, &ask("p1-1")).await.map(|_| ()).map_err(|e| e.to_string());
            let other = client.sign(&bundle, &ask("p2-1")).await.map(|_| ()).map_err(|e| e.to_string());
            (own, other)
        })
    })
    .unwrap();
    assert!(results.0.is_ok(), "node-1 must get its own workload's certificate: {:?}", results.0);
    let err = results.1.expect_err("node-1 obtained a certificate for a workload of node-2");
    assert!(err.contains("403") && err.contains("node-1"), "{err}");
    let ca_log = std::fs::read_to_string(cluster.info.state_dir.join("ca.log")).unwrap();
    assert!(
        ca_log.lines().any(|l| l.contains("refused") && l.contains("node-1") && l.contains("sa/p2-1")),
        "the refusal is logged with the requesting node:\n{ca_log}"
    );
}

#[test]
fn a_thousand_concurrent_connections_share_a_bounded_pool() {
    let cluster = mesh(2, 1, "");
    let _server = serve(&cluster, "p2-1", 8080);
    let dst = format!("{}:8080", cluster.pod("p2-1").unwrap().ip);
    // `--together`: every connection holds until all 1,000 have echoed, so 1,000 streams are
    // open at one moment; without the pool's bound they could not all get there.
    let r = connect_with(&cluster, "p1-1", &dst, 16 << 10, &["--parallel", "1000", "--together"]);
    assert_eq!(r["verified_count"], 1000, "{r}");
    assert_eq!(r["all_live_at_once"], true, "the 1,000 streams were never open at the same time: {r}");
    // At most 100 streams per connection, and a new connection only when the others are full.
    let opened = metric(&cluster, "node-1", "palisade_hbone_connections_opened_total");
    assert_eq!(opened, 10.0, "{opened} HBONE connections for 1,000 concurrent streams");
}

#[test]
fn certificate_renewal_under_traffic_loses_no_connection_and_no_byte() {
    let id = palisade_sandbox::unique_test_id();
    let mut spec = palisade_sandbox::ClusterSpec::uniform(&id, palisade_sandbox::test_state_dir(&id), 2, 1);
    spec.ztunnel = Some(palisade_sandbox::workspace_bin("ztunnel").unwrap());
    // Renewal at half life: every ~3 s.
    spec.workload_ttl = Duration::from_secs(6);
    let cluster = start_spec(spec);
    let _server = serve(&cluster, "p2-1", 8080);
    let dst = format!("{}:8080", cluster.pod("p2-1").unwrap().ip);
    // One long connection (8 MiB paced over ~10 s) while new connections keep coming.
    let long = paced_transfer(&cluster, &dst, 8 << 20, 80);
    let mut short = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        short.push(connect(&cluster, "p1-1", &dst, 50_000));
        std::thread::sleep(Duration::from_millis(200));
    }
    let long = long.join().unwrap();
    assert_eq!(long["verified"], true, "the long connection across renewals: {long}");
    for r in &short {
        assert_eq!(r["verified"], true, "a connection during renewals: {r}");
    }
    let ca_log = std::fs::read_to_string(cluster.info.state_dir.join("ca.log")).unwrap();
    let renewals =
        ca_log.lines().filter(|l| l.contains("signed workload certificate") && l.contains("sa/p1-1")).count();
    assert!(renewals >= 3, "p1-1's certificate was issued {renewals} times in 10 s with a 6 s lifetime");
    // Each renewal retires the pooled connection: new streams were carried by handshakes made
    // with the renewed certificates, not by one connection opened at the start.
    let opened = metric(&cluster, "node-1", "palisade_hbone_connections_opened_total");
    assert!(opened >= 3.0, "only {opened} HBONE connections across {renewals} renewals");
}

#[test]
fn a_root_rotation_never_drops_the_mesh() {
    let id = palisade_sandbox::unique_test_id();
    let mut spec = palisade_sandbox::ClusterSpec::uniform(&id, palisade_sandbox::test_state_dir(&id), 2, 1);
    spec.ztunnel = Some(palisade_sandbox::workspace_bin("ztunnel").unwrap());
    spec.workload_ttl = Duration::from_secs(4);
    let cluster = start_spec(spec);
    let _server = serve(&cluster, "p2-1", 8080);
    let dst = format!("{}:8080", cluster.pod("p2-1").unwrap().ip);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (view, dst, stop) = (palisade_sandbox::Cluster::attach(cluster.info.clone()), dst.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut results = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                results.push(connect(&view, "p1-1", &dst, 20_000));
                std::thread::sleep(Duration::from_millis(100));
            }
            results
        })
    };
    let palisade = palisade_sandbox::workspace_bin("palisade").unwrap();
    let ca = |step: &str| {
        let ca_dir = cluster.info.state_dir.join("ca");
        let out = Command::new(&palisade).args(["ca", "--dir", ca_dir.to_str().unwrap(), step]).output().unwrap();
        assert!(out.status.success(), "palisade ca {step}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let roots = |node: &str| -> u64 {
        let dump: serde_json::Value = serde_json::from_str(&cluster.admin_get(node, "/config_dump").unwrap()).unwrap();
        dump["trust_bundle_roots"].as_u64().unwrap_or(0)
    };
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    std::thread::sleep(Duration::from_secs(1));
    // Step 1: the new root reaches every ztunnel's bundle before it signs anything.
    ca("rotate");
    wait("both nodes to trust two roots", &|| roots("node-1") == 2 && roots("node-2") == 2);
    // Step 2: it signs; renewals (every ~2 s) move both workloads to it.
    let opened = || metric(&cluster, "node-1", "palisade_hbone_connections_opened_total");
    ca("activate");
    let ca_log = || std::fs::read_to_string(cluster.info.state_dir.join("ca.log")).unwrap_or_default();
    wait("certificates from the new root", &|| {
        let log = ca_log();
        ["sa/p1-1", "sa/p2-1"].iter().all(|sa| log.lines().any(|l| l.contains(sa) && l.contains("root=2")))
    });
    // Renewed certificates retire pooled connections: the next stream needs a handshake in
    // which both ends present certificates of the new root.
    let before = opened();
    wait("a handshake with the new certificates", &|| opened() > before);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = prober.join().unwrap();
    assert!(results.len() > 10, "too few probes: {}", results.len());
    for r in &results {
        assert_eq!(r["verified"], true, "a connection failed during the rotation: {r}");
    }
}

#[test]
fn ztunnel_keeps_working_with_its_certificates_while_the_ca_is_down() {
    let mut cluster = mesh(2, 2, "");
    let _s1 = serve(&cluster, "p2-1", 8080);
    let _s2 = serve(&cluster, "p2-2", 8080);
    let dst: std::collections::HashMap<_, _> =
        ["p2-1", "p2-2"].map(|pod| (pod, format!("{}:8080", cluster.pod(pod).unwrap().ip))).into();
    assert_eq!(connect(&cluster, "p1-1", &dst["p2-1"], 10_000)["verified"], true);
    let opened =
        |cluster: &palisade_sandbox::Cluster| metric(cluster, "node-1", "palisade_hbone_connections_opened_total");
    let before = opened(&cluster);
    cluster.stop_ca().unwrap();
    // New handshakes (a destination not yet pooled) as well as pooled streams.
    for pod in ["p2-2", "p2-1", "p2-2", "p2-1"] {
        let r = connect(&cluster, "p1-1", &dst[pod], 10_000);
        assert_eq!(r["verified"], true, "with the CA down, to {pod}: {r}");
    }
    assert!(opened(&cluster) > before, "no new HBONE handshake was made while the CA was down");
}

#[test]
fn graceful_shutdown_drains_streams_in_flight() {
    let mut cluster = mesh(2, 1, "");
    let _server = serve(&cluster, "p2-1", 8080);
    let dst = format!("{}:8080", cluster.pod("p2-1").unwrap().ip);
    // ~1.6 s of paced transfer through node-2's HBONE listener.
    let long = paced_transfer(&cluster, &dst, 1 << 20, 100);
    wait_flow(&cluster, "node-1", |f| f["observer"] == "kernel" && f["dst"] == dst.as_str());
    std::thread::sleep(Duration::from_millis(300));
    let status = cluster.stop_ztunnel("node-2", libc::SIGTERM).unwrap();
    assert!(status.success(), "ztunnel exit: {status}");
    let r = long.join().unwrap();
    assert_eq!(r["verified"], true, "the stream in flight was cut by the shutdown: {r}");
}

#[test]
fn graceful_shutdown_refuses_new_streams_and_ends_at_its_deadline() {
    let mut cluster = mesh(2, 1, "");
    let _server = serve(&cluster, "p2-1", 8080);
    let dst = format!("{}:8080", cluster.pod("p2-1").unwrap().ip);
    // ~20 s of paced transfer: longer than the drain deadline (5 s by default).
    let long = paced_transfer(&cluster, &dst, 1 << 20, 1250);
    wait_flow(&cluster, "node-1", |f| f["observer"] == "kernel" && f["dst"] == dst.as_str());
    std::thread::sleep(Duration::from_millis(300));
    let pid = cluster.ztunnel_pid("node-2").unwrap();
    // SAFETY: kill(2) on the sandbox's own ztunnel.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(500));
    let during = connect(&cluster, "p1-1", &dst, 10_000);
    assert_ne!(during["verified"], true, "a new stream was accepted while draining: {during}");
    let signalled = std::time::Instant::now();
    let status = cluster.stop_ztunnel("node-2", 0).unwrap();
    let waited = signalled.elapsed();
    assert!(status.success(), "ztunnel exit: {status}");
    assert!(waited < Duration::from_secs(8), "ztunnel drained for {waited:?}, past its 5 s deadline");
    let r = long.join().unwrap();
    assert_ne!(r["verified"], true, "a 20 s stream finished although the drain deadline is 5 s: {r}");
}

#[test]
fn the_hbone_listener_refuses_bad_client_certificates() {
    use palisade_ca::authority::CertificateAuthority;
    use palisade_mesh::hbone::pool::{ConnectRequest, Pool, PoolKey};

    let cluster = mesh(2, 1, "");
    let _server = serve(&cluster, "p2-1", 8080);
    let state = cluster.info.state_dir.clone();
    let bundle_pem = std::fs::read_to_string(state.join("credential-node-1/bundle.pem")).unwrap();
    // The sandbox's own CA (its root is on disk) and an unrelated one.
    let mesh_ca = CertificateAuthority::open(&state.join("ca"), "cluster.local").unwrap();
    let other_ca = CertificateAuthority::init(&state.join("other-ca"), "cluster.local").unwrap().0;
    let me = SpiffeId::new("cluster.local", "default", "p1-1");
    let issue = |ca: &CertificateAuthority, id: &SpiffeId, expired: bool| {
        let (key, csr) = new_key_and_csr().unwrap();
        let now = std::time::SystemTime::now();
        let chain = if expired {
            ca.sign_workload_between(&csr, id, now - Duration::from_secs(7200), now - Duration::from_secs(3600))
                .unwrap()
                .0
        } else {
            ca.sign_workload(&csr, id).unwrap().0
        };
        CredentialSlot::new(Credential::from_pem(&chain, &key).unwrap())
    };
    let cases = vec![
        ("the mesh CA", issue(&mesh_ca, &me, false)),
        ("another CA", issue(&other_ca, &me, false)),
        ("the mesh CA, expired", issue(&mesh_ca, &me, true)),
        ("outside the trust domain", issue(&mesh_ca, &SpiffeId::new("evil.example", "default", "p1-1"), false)),
    ];
    let p2 = cluster.pod("p2-1").unwrap().ip.parse::<std::net::IpAddr>().unwrap();
    let p1_netns = cluster.pod("p1-1").unwrap().netns.clone();
    // From p1-1's network namespace (its address), but not its cgroup: not captured.
    let outcomes = palisade_sandbox::sys::in_netns(&p1_netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let bundle = TrustBundle::from_pem(&bundle_pem, "cluster.local").unwrap();
            let mut outcomes = Vec::new();
            for (what, credential) in cases {
                let pool = Pool::new(Default::default());
                let endpoint = std::net::SocketAddr::new(p2, 15008);
                let key = PoolKey {
                    src: SpiffeId::new("cluster.local", "default", "p1-1"),
                    dst: SpiffeId::new("cluster.local", "default", "p2-1"),
                    endpoint,
                };
                let request =
                    ConnectRequest { authority: std::net::SocketAddr::new(p2, 8080), forwarded_for: endpoint };
                let connect =
                    pool.connect(key, credential, &bundle, || tokio::net::TcpStream::connect(endpoint), request);
                let result = tokio::time::timeout(Duration::from_secs(10), connect).await.expect("bounded");
                outcomes.push((what, result.map(|_| ()).map_err(|e| e.to_string())));
            }
            outcomes
        })
    })
    .unwrap();
    for (what, outcome) in outcomes {
        if what == "the mesh CA" {
            assert!(outcome.is_ok(), "a valid certificate was refused: {outcome:?}");
        } else {
            // Refused by TLS itself, not answered 401 after a handshake it should have failed.
            let err = outcome.expect_err(&format!("a client certificate from {what} was accepted by ztunnel"));
            assert!(!err.contains("401"), "{what}: the handshake succeeded and only authorization refused: {err}");
        }
    }
}
