//! The HBONE listener of a real ztunnel speaks the protocol as Istio describes it: TLS 1.3
//! only, ALPN `h2`, the destination workload's certificate without SNI, and CONNECT answered
//! 200 only once the upstream connection is up, 503 when it cannot be made, 400 for a request
//! that is not a CONNECT to this pod (401, the authorization deny, is in `authorization.rs`).
mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use palisade_ca::authority::CertificateAuthority;
use palisade_mesh::identity::SpiffeId;
use palisade_mesh::tls::{Credential, CredentialSlot, TrustBundle, client_config, no_sni, peer_identity};
use support::*;

/// What the client learned from one TLS session with the listener.
#[derive(Debug)]
struct Session {
    version: Option<rustls::ProtocolVersion>,
    alpn: Option<Vec<u8>>,
    server: Option<SpiffeId>,
    /// Status of each request, in order; `Err` when the stream failed.
    statuses: Vec<Result<u16, String>>,
    /// The echo through the first (CONNECT-to-the-application) stream.
    echoed: Vec<u8>,
}

async fn session(
    endpoint: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    requests: Vec<http::Request<()>>,
) -> Result<Session, String> {
    let tcp = tokio::net::TcpStream::connect(endpoint).await.map_err(|e| e.to_string())?;
    let tls_stream = tokio_rustls::TlsConnector::from(tls).connect(no_sni(), tcp).await.map_err(|e| e.to_string())?;
    let state = tls_stream.get_ref().1;
    let (version, alpn, server) =
        (state.protocol_version(), state.alpn_protocol().map(<[u8]>::to_vec), peer_identity(state));
    let (mut client, connection) = h2::client::handshake(tls_stream).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let (mut statuses, mut echoed) = (Vec::new(), Vec::new());
    for (i, request) in requests.into_iter().enumerate() {
        client = client.ready().await.map_err(|e| e.to_string())?;
        let (response, mut send) = client.send_request(request, false).map_err(|e| e.to_string())?;
        let response = match response.await {
            Ok(r) => r,
            Err(e) => {
                statuses.push(Err(e.to_string()));
                continue;
            }
        };
        statuses.push(Ok(response.status().as_u16()));
        if i == 0 && response.status() == http::StatusCode::OK {
            send.send_data(Bytes::from_static(b"through the tunnel"), true).map_err(|e| e.to_string())?;
            let mut body = response.into_body();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.map_err(|e| e.to_string())?;
                let _ = body.flow_control().release_capacity(chunk.len());
                echoed.extend_from_slice(&chunk);
            }
        }
    }
    Ok(Session { version, alpn, server, statuses, echoed })
}

fn connect_to(authority: &str) -> http::Request<()> {
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .header("forwarded", "for=\"198.51.100.1:4000\"")
        .body(())
        .unwrap()
}

/// Accepts any server certificate: only for offering a protocol the listener must refuse.
#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

#[test]
fn the_hbone_listener_speaks_istio_hbone() {
    let cluster = mesh(2, 1, "");
    let _server = serve(&cluster, "p2-1", 8080);
    let state = cluster.info.state_dir.clone();
    let bundle_pem = std::fs::read_to_string(state.join("credential-node-1/bundle.pem")).unwrap();
    let ca = CertificateAuthority::open(&state.join("ca"), "cluster.local").unwrap();
    let (key, csr) = palisade_mesh::ca_api::new_key_and_csr().unwrap();
    let chain = ca.sign_workload(&csr, &SpiffeId::new("cluster.local", "default", "p1-1")).unwrap().0;
    let credential = CredentialSlot::new(Credential::from_pem(&chain, &key).unwrap());
    let p2: IpAddr = cluster.pod("p2-1").unwrap().ip.parse().unwrap();
    let endpoint = SocketAddr::new(p2, 15008);
    let expected = SpiffeId::new("cluster.local", "default", "p2-1");
    // From p1-1's network namespace (its address, as a tunnel from p1-1 would come).
    let p1_netns = cluster.pod("p1-1").unwrap().netns.clone();
    let (mesh_session, tls12) = palisade_sandbox::sys::in_netns(&p1_netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let bundle = TrustBundle::from_pem(&bundle_pem, "cluster.local").unwrap();
            let tls = client_config(Some(credential.clone()), &bundle, Some(expected), &[b"h2"]).unwrap();
            let requests = vec![
                connect_to(&format!("{p2}:8080")),
                connect_to(&format!("{p2}:8081")), // nothing listens there
                connect_to("192.0.2.1:8080"),      // not this pod
                http::Request::builder().method(http::Method::GET).uri(format!("https://{p2}:8080/")).body(()).unwrap(),
            ];
            let bounded = |f| tokio::time::timeout(Duration::from_secs(10), f);
            let mesh_session = bounded(session(endpoint, tls, requests)).await.expect("bounded");
            // The same client certificate, offering TLS 1.2 only.
            let mut tls12 = rustls::ClientConfig::builder_with_provider(palisade_mesh::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS12])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnything))
                .with_client_cert_resolver(credential);
            tls12.alpn_protocols = vec![b"h2".to_vec()];
            let tls12 = bounded(session(endpoint, Arc::new(tls12), vec![])).await.expect("bounded");
            (mesh_session, tls12)
        })
    })
    .unwrap();

    let s = mesh_session.expect("an HBONE session with a valid mesh certificate");
    assert_eq!(s.version, Some(rustls::ProtocolVersion::TLSv1_3), "{s:?}");
    assert_eq!(s.alpn.as_deref(), Some(&b"h2"[..]), "{s:?}");
    assert_eq!(
        s.server.as_ref().map(ToString::to_string).as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/p2-1")
    );
    assert_eq!(s.statuses, vec![Ok(200), Ok(503), Ok(400), Ok(400)], "{s:?}");
    assert_eq!(s.echoed, b"through the tunnel", "{s:?}");
    let err = tls12.expect_err("the listener accepted TLS 1.2");
    assert!(err.to_lowercase().contains("protocolversion") || err.contains("version"), "{err}");
}
