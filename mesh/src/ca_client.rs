//! Client of the CA's HTTP API (see [`crate::ca_api`]): HTTP/1.1 over mutual TLS with the
//! node credential. One request per connection: certificate requests are rare (a renewal per
//! identity every twelve hours by default).
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::ca_api::{SignRequest, SignResponse, ca_identity};
use crate::tls::{CredentialSlot, TrustBundle, client_config, no_sni};

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("CA {addr}: {detail}")]
    Transport { addr: SocketAddr, detail: String },
    #[error("CA {addr} refused ({status}): {body}")]
    Refused { addr: SocketAddr, status: u16, body: String },
}

#[derive(Clone)]
pub struct CaClient {
    addr: SocketAddr,
    node_credential: Arc<CredentialSlot>,
}

impl CaClient {
    pub fn new(addr: SocketAddr, node_credential: Arc<CredentialSlot>) -> Self {
        CaClient { addr, node_credential }
    }

    pub async fn sign(&self, bundle: &TrustBundle, request: &SignRequest) -> Result<SignResponse, CaClientError> {
        let body = serde_json::to_vec(request).expect("request serializes");
        let (status, body) = self.call(bundle, "POST", "/v1/sign", &body).await?;
        if status != 200 {
            return Err(CaClientError::Refused {
                addr: self.addr,
                status,
                body: String::from_utf8_lossy(&body).into(),
            });
        }
        serde_json::from_slice(&body).map_err(|e| self.transport(format!("bad response: {e}")))
    }

    /// The CA's current trust bundle (PEM).
    pub async fn bundle(&self, bundle: &TrustBundle) -> Result<String, CaClientError> {
        let (status, body) = self.call(bundle, "GET", "/v1/bundle", &[]).await?;
        if status != 200 {
            return Err(CaClientError::Refused {
                addr: self.addr,
                status,
                body: String::from_utf8_lossy(&body).into(),
            });
        }
        String::from_utf8(body).map_err(|_| self.transport("bundle is not UTF-8".into()))
    }

    fn transport(&self, detail: String) -> CaClientError {
        CaClientError::Transport { addr: self.addr, detail }
    }

    async fn call(
        &self,
        bundle: &TrustBundle,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), CaClientError> {
        let config = client_config(
            Some(self.node_credential.clone()),
            bundle,
            Some(ca_identity(&bundle.trust_domain)),
            &[b"http/1.1"],
        )
        .map_err(|e| self.transport(e.to_string()))?;
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(self.addr).await.map_err(|e| e.to_string())?;
            let mut tls =
                tokio_rustls::TlsConnector::from(config).connect(no_sni(), tcp).await.map_err(|e| e.to_string())?;
            let head = format!(
                "{method} {path} HTTP/1.1\r\nhost: palisade-ca\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            tls.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
            tls.write_all(body).await.map_err(|e| e.to_string())?;
            let mut response = Vec::new();
            // The server closes after the response (connection: close); a missing TLS
            // close_notify is tolerated once the body is complete.
            let _ = tls.read_to_end(&mut response).await;
            parse_response(&response)
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| self.transport("timed out".into()))?
            .map_err(|e| self.transport(e))
    }
}

fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("incomplete response")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "response head is not UTF-8")?;
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("bad status line")?;
    let body = raw[split + 4..].to_vec();
    let length = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>()))
        .transpose()
        .map_err(|_| "bad content-length")?;
    match length {
        Some(n) if body.len() < n => Err("truncated response body".into()),
        Some(n) => Ok((status, body[..n].to_vec())),
        None => Ok((status, body)),
    }
}
