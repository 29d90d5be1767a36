//! HTTP/1.1 Upgrade (WebSocket, `Connection: upgrade`) through the waypoint, and CONNECT.
//!
//! An upgrade is authorized and routed like any request (`proxy` calls [`forward`] once the
//! route's backend is chosen and its active-request unit taken); then it goes to one
//! endpoint over a fresh HTTP/1.1 connection opened under the backend's connection limits —
//! never pooled, retried or mirrored, since after a 101 the connection belongs to the new
//! protocol. On 101 both upgraded streams are joined by a bidirectional copy, bounded by the
//! engine's idle timeout, which holds the request's limit units until either side closes; it
//! is one request with status 101 in the access log and metrics, logged when the tunnel ends.
//! Any other answer goes back as an ordinary response.
//!
//! `Upgrade: h2c` is not an upgrade here: the request is forwarded without it (the server
//! answers in HTTP/1.1), because an upgraded h2c connection would carry requests that no
//! route or authorization policy saw (h2c smuggling). CONNECT is answered 501
//! ([`refuse_connect`]). HTTP/2's extended CONNECT (RFC 8441, WebSocket over HTTP/2) is not
//! advertised (no SETTINGS_ENABLE_CONNECT_PROTOCOL), so conforming clients open an HTTP/1.1
//! connection for WebSocket instead, and an HTTP/2 stream that sends `:protocol` anyway is
//! reset by the HTTP/2 layer as malformed.
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use palisade_model::waypoint::config::{HeaderModifier, TrafficPolicy};
use tokio::time::Instant;

use crate::access_log::AccessRecord;
use crate::balance::{BackendState, InFlight};
use crate::body::{ProxyBody, Tracked, boxed, empty, full};
use crate::detect::{Activity, Watched};
use crate::engine::{Downstream, Inner};
use crate::filters;
use crate::forward::strip_hop_by_hop;
use crate::limits::{Guard, OVERFLOW_HEADER};
use crate::outlier::Outcome;
use crate::pool::SendError;
use crate::proxy::finish;

/// Whether `proxy` hands the request here: an HTTP/1.1 upgrade other than h2c.
pub(crate) fn wanted<B>(req: &Request<B>) -> bool {
    upgrade_token(req.version(), req.headers()).is_some()
}

/// The answer to a CONNECT (`serve` sends it before any routing: the waypoint tunnels no
/// arbitrary TCP through HTTP), with its access-log line.
pub(crate) fn refuse_connect<B>(inner: &Inner, down: &Downstream, req: &Request<B>) -> Response<ProxyBody> {
    let rec = AccessRecord {
        status: StatusCode::NOT_IMPLEMENTED.as_u16(),
        complete: true,
        ..AccessRecord::of_request(down, req)
    };
    finish(inner, rec, Instant::now());
    let mut resp = Response::new(full("CONNECT is not supported by the waypoint\n"));
    *resp.status_mut() = StatusCode::NOT_IMPLEMENTED;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// The protocol an HTTP/1.1 request asks to switch to, if it does (RFC 9110 §7.8: an
/// `Upgrade` field listed in `Connection`).
fn upgrade_token(version: Version, headers: &HeaderMap) -> Option<&HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let token = headers.get(UPGRADE)?;
    let listed = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let h2c = token.to_str().is_ok_and(|t| t.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c")));
    (listed && !h2c).then_some(token)
}

/// What `proxy` decided for the request.
pub(crate) struct Exchange<'a> {
    pub inner: &'a Arc<Inner>,
    pub down: &'a Downstream,
    pub state: &'a BackendState,
    pub traffic: &'a TrafficPolicy,
    /// The ring-hash key, if the backend hashes.
    pub key: Option<u64>,
    /// The route's backend timeout: for the upstream's answer (101 or other).
    pub timeout: Option<Duration>,
    pub response_headers: Option<&'a HeaderModifier>,
    /// The backend's active-request unit, held for the tunnel's life.
    pub active: Guard,
    pub rec: AccessRecord,
    pub start: Instant,
}

impl Exchange<'_> {
    fn local(mut self, status: StatusCode, body: &'static str) -> Response<ProxyBody> {
        self.rec.status = status.as_u16();
        self.rec.complete = true;
        finish(self.inner, self.rec, self.start);
        let mut resp = Response::new(full(body));
        *resp.status_mut() = status;
        resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        resp
    }
}

/// Sends an upgrade request to one endpoint and, on 101, joins the two connections.
pub(crate) async fn forward(mut x: Exchange<'_>, mut req: Request<Incoming>) -> Response<ProxyBody> {
    x.rec.attempts = 1;
    let Some(ep) = x.state.pick(x.key, &[]) else {
        return x.local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n");
    };
    x.rec.upstream(&ep);
    if let Some(gate) = &x.inner.admission
        && let Err(refusal) = gate.admit(x.down, &ep.endpoint)
    {
        tracing::debug!(%refusal, "upgrade refused by the destination's L4 policy");
        x.rec.authz_verdict = "deny";
        x.rec.authz_rule = Some(format!("l4:{}", refusal.rule));
        return x.local(StatusCode::FORBIDDEN, "RBAC: access denied\n");
    }
    let in_flight = ep.start();
    let endpoint = ep.endpoint.address;
    let connected = async {
        let (io, connection) = x.inner.pool.open(x.state, &ep, x.traffic).await?;
        let (sender, conn) =
            http1::handshake(TokioIo::new(io)).await.map_err(|source| SendError::Handshake { endpoint, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%endpoint, error = %e, "upstream upgrade connection ended");
            }
        });
        Ok::<_, SendError>((sender, connection))
    };
    let (mut sender, connection) = match connected.await {
        Ok(c) => c,
        Err(SendError::Overflow(o)) => {
            crate::proxy::count_overflow(x.inner, &mut x.rec, &o);
            let mut resp = x.local(StatusCode::SERVICE_UNAVAILABLE, "upstream overflow\n");
            resp.headers_mut().insert(OVERFLOW_HEADER, HeaderValue::from_static(o.limit.name()));
            return resp;
        }
        Err(e) => {
            tracing::debug!(error = %e, "upgrade: upstream connect failed");
            if x.state.record(&ep, Outcome::Failed) {
                x.inner.metrics.ejections.inc();
            }
            return x.local(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error\n");
        }
    };

    let downstream = hyper::upgrade::on(&mut req);
    let sent = sender.send_request(upstream_request(req, endpoint));
    let answered = match x.timeout {
        Some(limit) => tokio::time::timeout(limit, sent).await.map_err(|_| ()),
        None => Ok(sent.await),
    };
    let failed = |x: &Exchange<'_>| {
        if x.state.record(&ep, Outcome::Failed) {
            x.inner.metrics.ejections.inc();
        }
    };
    let mut resp = match answered {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            tracing::debug!(%endpoint, error = %e, "upgrade: upstream request failed");
            failed(&x);
            return x.local(StatusCode::BAD_GATEWAY, "upstream reset\n");
        }
        Err(()) => {
            failed(&x);
            return x.local(StatusCode::GATEWAY_TIMEOUT, "upstream timeout\n");
        }
    };
    if x.state.record(&ep, Outcome::Status(resp.status().as_u16())) {
        x.inner.metrics.ejections.inc();
    }
    x.rec.status = resp.status().as_u16();
    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let upstream = switched.then(|| hyper::upgrade::on(&mut resp));
    let (mut head, body) = resp.into_parts();
    let token = head.headers.get(UPGRADE).cloned();
    strip_hop_by_hop(&mut head.headers);
    if let Some(m) = x.response_headers {
        filters::modify_headers(m, &mut head.headers);
    }
    let held = Held { _active: x.active, _in_flight: in_flight, _connection: connection };
    let (inner, rec, start) = (Arc::clone(x.inner), x.rec, x.start);
    let Some(upstream) = upstream else {
        // Not switched: an ordinary response (the connection closes after it).
        let tracked = Tracked::new(body, held, crate::proxy::finisher(inner, rec, start));
        return Response::from_parts(head, boxed(tracked));
    };
    head.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(token) = token {
        head.headers.insert(UPGRADE, token);
    }
    let idle_timeout = inner.settings.idle_timeout;
    tokio::spawn(async move {
        let mut rec = rec;
        match tokio::join!(downstream, upstream) {
            (Ok(down), Ok(up)) => {
                let activity = Activity::default();
                let mut down = Watched::new(TokioIo::new(down), activity.clone());
                let mut up = TokioIo::new(up);
                tokio::select! {
                    copied = tokio::io::copy_bidirectional(&mut down, &mut up) => rec.complete = copied.is_ok(),
                    () = crate::serve::idle(&activity, idle_timeout) => {
                        tracing::debug!(%endpoint, "upgraded connection idle; closing");
                    }
                }
            }
            (down, up) => tracing::debug!(
                %endpoint,
                downstream = ?down.err(),
                upstream = ?up.err(),
                "upgrade did not complete on both sides"
            ),
        }
        drop(held);
        finish(&inner, rec, start);
    });
    Response::from_parts(head, empty())
}

/// What an upgraded exchange holds until it ends: the backend's active-request unit, the
/// endpoint's in-flight count (least request), the connection-limit unit.
struct Held {
    _active: Guard,
    _in_flight: InFlight,
    _connection: Guard,
}

/// The upgrade request as the endpoint gets it: origin form, a Host header, hop-by-hop
/// headers removed and the upgrade itself (`Connection: upgrade`, `Upgrade`) put back.
fn upstream_request(req: Request<Incoming>, endpoint: std::net::SocketAddr) -> Request<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let token = parts.headers.get(UPGRADE).cloned();
    let host = filters::request_host(&parts.uri, &parts.headers).to_string();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(http::header::TE);
    if !parts.headers.contains_key(HOST) {
        let authority = if host.is_empty() { endpoint.to_string() } else { host };
        if let Ok(v) = HeaderValue::from_str(&authority) {
            parts.headers.insert(HOST, v);
        }
    }
    parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(token) = token {
        parts.headers.insert(UPGRADE, token);
    }
    parts.uri = Uri::from(parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
    parts.version = Version::HTTP_11;
    Request::from_parts(parts, boxed(body))
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;

    fn request(method: Method, version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::builder().method(method).version(version).uri("/chat");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap()
    }

    #[test]
    fn an_upgrade_is_an_http1_upgrade_listed_in_connection_and_not_h2c() {
        let ws = [("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")];
        assert!(wanted(&request(Method::GET, Version::HTTP_11, &ws)));
        assert!(!wanted(&request(Method::GET, Version::HTTP_2, &ws)), "HTTP/2 has no Upgrade");
        assert!(!wanted(&request(Method::GET, Version::HTTP_11, &[("upgrade", "websocket")])), "not in Connection");
        let h2c = [("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c")];
        assert!(!wanted(&request(Method::GET, Version::HTTP_11, &h2c)), "h2c would bypass L7 policy");
        assert!(!wanted(&request(Method::GET, Version::HTTP_11, &[])));
    }
}
