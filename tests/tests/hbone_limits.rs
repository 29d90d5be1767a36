//! The HBONE server's HTTP/2 limits over real mutual TLS on loopback: a CONNECT whose header
//! list is larger than `MAX_HEADER_LIST_SIZE` is refused before any handler sees it (a 431 and
//! a stream reset; a header block that keeps growing ends the connection), and the server goes
//! on serving ordinary requests, on the same connection and on new ones.
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use palisade_mesh::hbone::MAX_HEADER_LIST_SIZE;
use palisade_mesh::hbone::server::{InboundStream, serve_connection};
use palisade_mesh::tls::{client_config, no_sni, server_config};
use support::ca::{TestCa, id};
use tokio::net::{TcpListener, TcpStream};

/// An HBONE server that answers 200 to every CONNECT it is handed, counting them.
async fn hbone_server(ca: &TestCa) -> (SocketAddr, Arc<AtomicUsize>) {
    let tls = server_config(ca.issue(&id("shop", "db"), None), &ca.bundle(), &[palisade_mesh::hbone::ALPN]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let count = handled.clone();
    let (keep, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _keep = keep;
        let handler = Arc::new(move |stream: InboundStream| {
            count.fetch_add(1, Ordering::SeqCst);
            async move {
                if let Ok((_send, mut recv)) = stream.accept() {
                    while let Some(Ok(_)) = recv.data().await {}
                }
            }
        });
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve_connection(tcp, tls.clone(), handler.clone(), shutdown.clone()));
        }
    });
    (addr, handled)
}

/// A CONNECT to `10.0.0.1:8080` carrying `padding` bytes of extra headers (in 1 KiB values).
fn connect(padding: usize) -> http::Request<()> {
    let mut request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("10.0.0.1:8080")
        .header("forwarded", "for=\"10.0.0.2:4000\"");
    for i in 0..padding.div_ceil(1024) {
        request = request.header(format!("x-padding-{i}"), "p".repeat(1024));
    }
    request.body(()).unwrap()
}

/// Sends `requests` one after the other on one new HBONE connection: the status of each, or
/// the error that ended its stream (or the connection).
async fn exchange(ca: &TestCa, server: SocketAddr, requests: Vec<http::Request<()>>) -> Vec<Result<u16, String>> {
    let tls = client_config(Some(ca.issue(&id("shop", "web"), None)), &ca.bundle(), Some(id("shop", "db")), &[b"h2"])
        .unwrap();
    let tcp = TcpStream::connect(server).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls).connect(no_sni(), tcp).await.expect("TLS with the HBONE server");
    let (mut client, connection) = h2::client::handshake(tls).await.expect("HTTP/2 with the HBONE server");
    tokio::spawn(connection);
    let mut out = Vec::new();
    for request in requests {
        let sent = async {
            client = client.clone().ready().await.map_err(|e| e.to_string())?;
            let (response, _send) = client.send_request(request, false).map_err(|e| e.to_string())?;
            // Keep the request stream open (as a tunnel would) until the answer is in.
            let status = response.await.map(|r| r.status().as_u16()).map_err(|e| e.to_string());
            drop(_send);
            status
        };
        out.push(tokio::time::timeout(Duration::from_secs(10), sent).await.expect("an answer in time"));
    }
    out
}

#[tokio::test]
async fn an_oversized_connect_head_is_refused_and_the_server_keeps_serving() {
    let ca = TestCa::new("hbone-limits", "cluster.local");
    let (server, handled) = hbone_server(&ca).await;
    let limit = MAX_HEADER_LIST_SIZE as usize;

    // Just over the limit: this stream is refused, the connection goes on.
    let same = exchange(&ca, server, vec![connect(limit + 1024), connect(0)]).await;
    assert!(matches!(&same[0], Ok(431) | Err(_)), "an oversized CONNECT was answered {:?}", same[0]);
    assert_eq!(same[1], Ok(200), "the connection stopped serving after a refused stream: {same:?}");
    assert_eq!(handled.load(Ordering::SeqCst), 1, "the oversized request reached the handler");

    // Far over it (a header block spanning CONTINUATION frames): refused as well.
    let flood = exchange(&ca, server, vec![connect(64 * limit)]).await;
    assert!(matches!(&flood[0], Ok(431) | Err(_)), "a 1 MiB CONNECT head was answered {:?}", flood[0]);
    assert_eq!(handled.load(Ordering::SeqCst), 1, "the 1 MiB request reached the handler");

    // A request within the limit, on a new connection.
    let fresh = exchange(&ca, server, vec![connect(limit / 2)]).await;
    assert_eq!(fresh, vec![Ok(200)]);
    assert_eq!(handled.load(Ordering::SeqCst), 2);
}
