//! Route matching: a Service's routes compiled once per configuration (regular expressions
//! built, methods parsed), then matched per request in the precedence order the control plane
//! already sorted them into. A rule's matches are ORed; within a match everything is ANDed
//! (Gateway API).
use std::sync::Arc;

use http::{HeaderMap, Method, Uri};
use palisade_model::waypoint::config::{PathMatch, Route, RouteMatch, StringMatch, ValueMatch, WeightedBackend};
use rand::Rng;
use regex::Regex;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("route {route}: regular expression {pattern:?} does not compile")]
    Regex {
        route: String,
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("route {route}: method {method:?} is not an HTTP method")]
    Method { route: String, method: String },
}

#[derive(Debug)]
enum Str {
    Exact(String),
    Regex(Regex),
}

impl Str {
    fn matches(&self, value: &str) -> bool {
        match self {
            Str::Exact(e) => e == value,
            Str::Regex(r) => r.is_match(value),
        }
    }
}

#[derive(Debug)]
enum Path {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
struct Match {
    path: Option<Path>,
    headers: Vec<(String, Str)>,
    query: Vec<(String, Str)>,
    method: Option<Method>,
}

/// A route ready to match.
#[derive(Debug)]
pub struct CompiledRoute {
    pub route: Route,
    /// `route.name`, shared with the access records and metric labels.
    pub name: Arc<str>,
    matches: Vec<Match>,
}

/// What matched: the route and, when the match was a path prefix, that prefix (a
/// `ReplacePrefixMatch` rewrite replaces it).
#[derive(Debug, Clone, Copy)]
pub struct Matched<'a> {
    pub route: &'a CompiledRoute,
    pub prefix: Option<&'a str>,
}

/// A regex that must match the whole value, as Gateway API and Istio specify.
fn whole(route: &str, pattern: &str) -> Result<Regex, RouteError> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|source| RouteError::Regex {
        route: route.into(),
        pattern: pattern.into(),
        source,
    })
}

fn string(route: &str, m: &ValueMatch) -> Result<(String, Str), RouteError> {
    let value = match &m.value {
        StringMatch::Exact(v) => Str::Exact(v.clone()),
        StringMatch::Regex(p) => Str::Regex(whole(route, p)?),
    };
    Ok((m.name.clone(), value))
}

fn compile_match(route: &str, m: &RouteMatch) -> Result<Match, RouteError> {
    let path = match &m.path {
        None => None,
        Some(PathMatch::Exact(p)) => Some(Path::Exact(p.clone())),
        Some(PathMatch::Prefix(p)) => Some(Path::Prefix(p.clone())),
        Some(PathMatch::Regex(p)) => Some(Path::Regex(whole(route, p)?)),
    };
    let method = match &m.method {
        None => None,
        Some(name) => Some(
            Method::from_bytes(name.as_bytes())
                .map_err(|_| RouteError::Method { route: route.into(), method: name.clone() })?,
        ),
    };
    Ok(Match {
        path,
        headers: m.headers.iter().map(|h| string(route, h)).collect::<Result<_, _>>()?,
        query: m.query.iter().map(|q| string(route, q)).collect::<Result<_, _>>()?,
        method,
    })
}

impl CompiledRoute {
    pub fn compile(route: &Route) -> Result<Self, RouteError> {
        let matches = route.matches.iter().map(|m| compile_match(&route.name, m)).collect::<Result<_, _>>()?;
        Ok(CompiledRoute { route: route.clone(), name: route.name.as_str().into(), matches })
    }
}

/// The weighted choice among a rule's backends; None when every weight is zero (Gateway
/// API: answer 500).
pub fn choose_backend(backends: &[WeightedBackend]) -> Option<&WeightedBackend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = rand::rng().random_range(0..total);
    for b in backends {
        if point < u64::from(b.weight) {
            return Some(b);
        }
        point -= u64::from(b.weight);
    }
    None
}

/// Gateway API's prefix: whole path segments, so `/foo` matches `/foo` and `/foo/bar`, never
/// `/foobar`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Minimal percent-decoding for query matching (`+` is a space in form encoding).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Match {
    fn matches(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<Option<&str>> {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return None;
        }
        let path = uri.path();
        let mut prefix = None;
        match &self.path {
            None => {}
            Some(Path::Exact(p)) if p == path => {}
            Some(Path::Prefix(p)) if prefix_matches(p, path) => prefix = Some(p.as_str()),
            Some(Path::Regex(r)) if r.is_match(path) => {}
            Some(_) => return None,
        }
        for (name, value) in &self.headers {
            let mut values = headers.get_all(name.as_str()).iter().filter_map(|v| v.to_str().ok());
            if !values.any(|v| value.matches(v)) {
                return None;
            }
        }
        if !self.query.is_empty() {
            let pairs: Vec<(String, String)> = uri
                .query()
                .unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k), decode(v))
                })
                .collect();
            for (name, value) in &self.query {
                // Gateway API: when a parameter repeats, the first value is the one matched.
                match pairs.iter().find(|(k, _)| k == name) {
                    Some((_, v)) if value.matches(v) => {}
                    _ => return None,
                }
            }
        }
        Some(prefix)
    }
}

/// A Service's routes in precedence order. A Service without routes has one, `default`: it
/// matches everything and sends to the Service itself, as a GAMMA route attached to its own
/// Service without backends does.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<CompiledRoute>,
}

impl RouteTable {
    pub fn compile(routes: &[Route]) -> Result<Self, RouteError> {
        if routes.is_empty() {
            let default = Route {
                name: "default".into(),
                matches: Vec::new(),
                backends: Vec::new(),
                filters: Vec::new(),
                request_timeout: None,
                backend_timeout: None,
                retry: None,
            };
            return Ok(RouteTable { routes: vec![CompiledRoute::compile(&default)?] });
        }
        Ok(RouteTable { routes: routes.iter().map(CompiledRoute::compile).collect::<Result<_, _>>()? })
    }

    /// The first route with a matching match (a route without matches matches everything).
    pub fn find(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<Matched<'_>> {
        self.routes.iter().find_map(|route| {
            if route.matches.is_empty() {
                return Some(Matched { route, prefix: None });
            }
            route.matches.iter().find_map(|m| m.matches(method, uri, headers)).map(|prefix| Matched { route, prefix })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_by_segment() {
        assert!(prefix_matches("/foo", "/foo"));
        assert!(prefix_matches("/foo", "/foo/bar"));
        assert!(prefix_matches("/foo/", "/foo/bar"));
        assert!(!prefix_matches("/foo", "/foobar"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(decode("a%20b+c"), "a b c");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }
}
