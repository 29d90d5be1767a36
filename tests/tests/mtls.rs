//! Mutual TLS between workloads with certificates from the real CA, over real sockets:
//! a good pair handshakes and each side sees the other's SPIFFE ID; a certificate from another
//! CA, an expired one, one outside the trust domain, and a server that is not the expected
//! workload are each refused.
mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use palisade_mesh::identity::SpiffeId;
use palisade_mesh::tls::{CredentialSlot, TrustBundle, client_config, no_sni, peer_identity, server_config};
use support::ca::{TestCa, id};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs one handshake + echo; returns what each side saw, or the first error.
async fn handshake(
    server_cred: Arc<CredentialSlot>,
    server_bundle: TrustBundle,
    client_cred: Arc<CredentialSlot>,
    client_bundle: TrustBundle,
    expect_server: SpiffeId,
) -> Result<(SpiffeId, SpiffeId), String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(server_cred, &server_bundle, &[b"h2"]).unwrap());
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| format!("server: {e}"))?;
        let client_id = peer_identity(tls.get_ref().1).ok_or("no client identity")?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        tls.shutdown().await.ok();
        Ok::<_, String>(client_id)
    });
    let connector = tokio_rustls::TlsConnector::from(
        client_config(Some(client_cred), &client_bundle, Some(expect_server), &[b"h2"]).unwrap(),
    );
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let client = async {
        let mut tls = connector.connect(no_sni(), tcp).await.map_err(|e| format!("client: {e}"))?;
        let server_id = peer_identity(tls.get_ref().1).ok_or("no server identity")?;
        tls.write_all(b"hello").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.map_err(|e| format!("client read: {e}"))?;
        assert_eq!(&buf, b"hello");
        Ok::<_, String>(server_id)
    };
    let client_result = tokio::time::timeout(Duration::from_secs(5), client).await.expect("handshake bounded");
    let server_result = tokio::time::timeout(Duration::from_secs(5), server).await.expect("server bounded").unwrap();
    match (client_result, server_result) {
        (Ok(server_id), Ok(client_id)) => Ok((server_id, client_id)),
        (c, s) => Err(format!("{} / {}", c.err().unwrap_or_default(), s.err().unwrap_or_default())),
    }
}

#[tokio::test]
async fn mutual_tls_proves_both_identities() {
    let ca = TestCa::new("good", "cluster.local");
    let (web, db) = (id("shop", "web"), id("shop", "db"));
    let (server_id, client_id) =
        handshake(ca.issue(&db, None), ca.bundle(), ca.issue(&web, None), ca.bundle(), db.clone()).await.unwrap();
    assert_eq!(server_id, db);
    assert_eq!(client_id, web);
}

#[tokio::test]
async fn bad_client_certificates_are_refused() {
    let ca = TestCa::new("main", "cluster.local");
    let other = TestCa::new("other", "cluster.local");
    let foreign_domain = TestCa::new("foreign", "cluster.local");
    let (web, db) = (id("shop", "web"), id("shop", "db"));
    let now = SystemTime::now();
    let expired = ca.issue(&web, Some((now - Duration::from_secs(7200), now - Duration::from_secs(3600))));
    let outsider = foreign_domain.issue(&SpiffeId::new("evil.example", "shop", "web"), None);

    let cases = [
        ("another CA", other.issue(&web, None), "server: invalid peer certificate"),
        ("expired", expired, "Expired"),
        ("outside the trust domain", outsider, "outside trust domain"),
    ];
    for (what, client_cred, reason) in cases {
        // The server trusts `ca` (and, for the trust-domain case, the foreign CA's root too,
        // so that only the SPIFFE ID can be the reason for the refusal).
        let mut pem = ca.ca.bundle_pem();
        pem.push_str(&foreign_domain.ca.bundle_pem());
        let server_bundle = TrustBundle::from_pem(&pem, "cluster.local").unwrap();
        let result = handshake(ca.issue(&db, None), server_bundle, client_cred, ca.bundle(), db.clone()).await;
        let err = result.expect_err(&format!("a client certificate from {what} was accepted"));
        assert!(err.contains(reason), "{what}: refused for the wrong reason: {err}");
    }
}

#[tokio::test]
async fn a_server_that_is_not_the_expected_workload_is_refused() {
    let ca = TestCa::new("expect", "cluster.local");
    let (web, db, impostor) = (id("shop", "web"), id("shop", "db"), id("shop", "cache"));
    let result = handshake(ca.issue(&impostor, None), ca.bundle(), ca.issue(&web, None), ca.bundle(), db).await;
    let err = result.expect_err("an impostor server was accepted");
    assert!(err.contains("client"), "{err}");
}
