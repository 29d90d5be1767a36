//! gRPC-shaped HTTP/2 (prior knowledge, h2c) for the waypoint's tests: a unary call is a POST
//! with `content-type: application/grpc` and `te: trailers`, a length-prefixed message, and
//! the status in the response's trailers.
//!
//! ```text
//! palisade-probe h2-serve --port P --name NAME      answers each call: message NAME, trailers
//!                                                   grpc-status 0 and grpc-message NAME
//! palisade-probe h2-get --to IP:PORT [--count N] [--timeout-ms T]
//! ```
//! `h2-get` makes N calls on one connection and prints
//! `{"statuses": {..}, "grpc_status": {..}, "messages": {..}, "errors": n, "last_error": ..}`.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::json;

use crate::arg;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

/// A gRPC message: compressed flag, big-endian length, bytes.
fn frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(message.len() as u32);
    b.put_slice(message);
    b.freeze()
}

pub fn serve(args: &[String]) {
    let port: u16 = arg(args, "--port").and_then(|p| p.parse().ok()).unwrap_or(8080);
    let name = arg(args, "--name").unwrap_or("probe").to_string();
    runtime().block_on(async move {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await.expect("bind");
        println!("listening {port}");
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let name = name.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else { return };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let name = name.clone();
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                        }
                        let response =
                            http::Response::builder().status(200).header("content-type", "application/grpc").body(())?;
                        let mut send = respond.send_response(response, false)?;
                        send.send_data(frame(name.as_bytes()), false)?;
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        trailers.insert("grpc-message", http::HeaderValue::from_str(&name)?);
                        send.send_trailers(trailers)?;
                        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
                    });
                }
            });
        }
    });
}

pub fn get(args: &[String]) -> serde_json::Value {
    let to: SocketAddr = arg(args, "--to").and_then(|a| a.parse().ok()).expect("--to IP:PORT");
    let count: usize = arg(args, "--count").and_then(|c| c.parse().ok()).unwrap_or(1);
    let timeout = Duration::from_millis(arg(args, "--timeout-ms").and_then(|t| t.parse().ok()).unwrap_or(5000));
    let (mut statuses, mut grpc, mut messages) =
        (BTreeMap::<String, u64>::new(), BTreeMap::<String, u64>::new(), BTreeMap::<String, u64>::new());
    let (mut errors, mut last_error) = (0u64, None::<String>);
    runtime().block_on(async {
        let client = async {
            let tcp = tokio::net::TcpStream::connect(to).await?;
            let (client, conn) = h2::client::handshake(tcp).await?;
            tokio::spawn(conn);
            Ok::<_, Box<dyn std::error::Error>>(client)
        };
        let mut client = match tokio::time::timeout(timeout, client).await.unwrap_or(Err("connect timed out".into())) {
            Ok(c) => c,
            Err(e) => {
                errors = count as u64;
                last_error = Some(e.to_string());
                return;
            }
        };
        for _ in 0..count {
            match tokio::time::timeout(timeout, call(&mut client, to)).await.unwrap_or(Err("timed out".into())) {
                Ok((status, code, message)) => {
                    *statuses.entry(status.to_string()).or_default() += 1;
                    *grpc.entry(code).or_default() += 1;
                    *messages.entry(message).or_default() += 1;
                }
                Err(e) => {
                    errors += 1;
                    last_error = Some(e.to_string());
                }
            }
        }
    });
    json!({"statuses": statuses, "grpc_status": grpc, "messages": messages, "errors": errors, "last_error": last_error})
}

/// One unary call: the HTTP status, the trailer's grpc-status, and the message (from the body
/// when it came whole in one frame, else the trailer's grpc-message).
async fn call(
    client: &mut h2::client::SendRequest<Bytes>,
    to: SocketAddr,
) -> Result<(u16, String, String), Box<dyn std::error::Error>> {
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{to}/probe.Probe/Call"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let mut ready = client.clone().ready().await?;
    let (response, mut send) = ready.send_request(request, false)?;
    send.send_data(frame(b"ping"), true)?;
    let response = response.await?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut data = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await?.ok_or("no trailers")?;
    let code = trailers.get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("none").to_string();
    let message = if data.len() >= 5 { String::from_utf8_lossy(&data[5..]).into_owned() } else { String::new() };
    let in_trailer = trailers.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or_default();
    Ok((status, code, if message == in_trailer { message } else { format!("{message}|{in_trailer}") }))
}
