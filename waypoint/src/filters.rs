//! Gateway API filters: header modifiers, redirect and URL rewrite. (Mirroring is in
//! `proxy`, since it sends a request.) The control plane validated names and values; one that
//! still does not fit HTTP is skipped with a warning rather than failing the request.
use http::header::{HOST, LOCATION};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, Uri};
use palisade_model::waypoint::config::{HeaderModifier, PathRewrite, Redirect};

use crate::body::{ProxyBody, empty};

fn pair(name: &str, value: &str) -> Option<(HeaderName, HeaderValue)> {
    match (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
        (Ok(n), Ok(v)) => Some((n, v)),
        _ => {
            tracing::warn!(header = name, "header modifier names an invalid header; skipped");
            None
        }
    }
}

/// Gateway API order: set, then add, then remove.
pub fn modify_headers(m: &HeaderModifier, headers: &mut HeaderMap) {
    for (name, value) in &m.set {
        if let Some((n, v)) = pair(name, value) {
            headers.insert(n, v);
        }
    }
    for (name, value) in &m.add {
        if let Some((n, v)) = pair(name, value) {
            headers.append(n, v);
        }
    }
    for name in &m.remove {
        headers.remove(name.as_str());
    }
}

/// The path after a rewrite. `prefix` is the route's matched `PathPrefix` (a prefix
/// replacement needs it; without one the path is left alone).
pub fn rewrite_path(rewrite: &PathRewrite, path: &str, prefix: Option<&str>) -> String {
    match rewrite {
        PathRewrite::Full(p) => p.clone(),
        PathRewrite::Prefix(replacement) => {
            let Some(prefix) = prefix else { return path.to_string() };
            let rest = &path[prefix.trim_end_matches('/').len().min(path.len())..];
            let replacement = replacement.trim_end_matches('/');
            match (replacement.is_empty(), rest.is_empty()) {
                (true, true) => "/".to_string(),
                (true, false) => rest.to_string(),
                (false, _) => format!("{replacement}{rest}"),
            }
        }
    }
}

/// Replaces the path of `uri`, keeping its query.
pub fn with_path(uri: &Uri, path: &str) -> Uri {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = pq.parse().ok();
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// The request's host: the URI authority (HTTP/2, absolute form) or the Host header.
pub fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> &'a str {
    uri.authority().map(|a| a.as_str()).or_else(|| headers.get(HOST).and_then(|h| h.to_str().ok())).unwrap_or_default()
}

/// The redirect answer. Unset parts keep the request's (scheme defaults to `http`, since
/// the waypoint only sees plaintext HTTP inside the mesh tunnel).
pub fn redirect(r: &Redirect, uri: &Uri, headers: &HeaderMap, prefix: Option<&str>) -> Response<ProxyBody> {
    let scheme = r.scheme.clone().unwrap_or_else(|| "http".into());
    let host = request_host(uri, headers);
    let bare = host.rsplit_once(':').filter(|(_, p)| p.parse::<u16>().is_ok()).map_or(host, |(h, _)| h);
    let hostname = r.hostname.clone().unwrap_or_else(|| bare.to_string());
    let default_port = if scheme == "https" { 443 } else { 80 };
    let port = match r.port {
        Some(p) if p != default_port => format!(":{p}"),
        _ => String::new(),
    };
    let path = r.path.as_ref().map_or_else(|| uri.path().to_string(), |p| rewrite_path(p, uri.path(), prefix));
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let location = format!("{scheme}://{hostname}{port}{path}{query}");
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
    let mut resp = Response::new(empty());
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(LOCATION, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rewrites() {
        let p = |r: &str, path, prefix| rewrite_path(&PathRewrite::Prefix(r.into()), path, Some(prefix));
        assert_eq!(p("/v2", "/v1/users", "/v1"), "/v2/users");
        assert_eq!(p("/", "/v1/users", "/v1"), "/users");
        assert_eq!(p("/", "/v1", "/v1"), "/");
        assert_eq!(p("/new/", "/old/", "/old/"), "/new/");
    }

    #[test]
    fn header_modifier_order() {
        let mut h = HeaderMap::new();
        h.insert("a", "1".parse().unwrap());
        h.insert("gone", "x".parse().unwrap());
        let m = HeaderModifier {
            set: vec![("a".into(), "2".into())],
            add: vec![("a".into(), "3".into())],
            remove: vec!["gone".into()],
        };
        modify_headers(&m, &mut h);
        let a: Vec<_> = h.get_all("a").iter().collect();
        assert_eq!(a, ["2", "3"]);
        assert!(!h.contains_key("gone"));
    }
}
