//! Reading the head of an HBONE CONNECT request: pure functions over the method, URI and
//! headers, so the server and the fuzzer run the same code on untrusted input.
use std::net::SocketAddr;

/// What the server needs from a CONNECT request's head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectHead {
    /// `:authority` as `ip:port`, or the reason the request is unusable.
    pub authority: Result<SocketAddr, String>,
    /// The raw `forwarded` header, when it is valid text.
    pub forwarded: Option<String>,
    /// The raw `traceparent` header, when it is valid text.
    pub traceparent: Option<String>,
}

/// Reads a request head. Anything but `CONNECT` to a literal `ip:port` gets an error in
/// `authority` (the server answers 400); the optional headers are kept only when they are
/// visible ASCII, as `http::HeaderValue::to_str` defines it.
pub fn parse_connect(method: &http::Method, uri: &http::Uri, headers: &http::HeaderMap) -> ConnectHead {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let authority = if method != http::Method::CONNECT {
        Err(format!("method {method} is not CONNECT"))
    } else {
        uri.authority()
            .ok_or_else(|| "missing :authority".to_string())
            .and_then(|a| a.as_str().parse::<SocketAddr>().map_err(|_| format!(":authority {a} is not ip:port")))
    };
    ConnectHead { authority, forwarded: header("forwarded"), traceparent: header("traceparent") }
}

/// The client address of a `forwarded` header (RFC 7239): the `for` parameter of its first
/// element (the original client; later elements are proxies), when it is an `ip:port`
/// (`"[v6]:port"` for IPv6). Parameter names are case-insensitive; values may be quoted;
/// white space is allowed around `;` and `,` but not around `=` (RFC 7239's grammar).
/// Anything else (an obfuscated identifier, an address without a port) gives `None`.
pub fn forwarded_for(header: Option<&str>) -> Option<SocketAddr> {
    let first = header?.split(',').next()?;
    first.split(';').find_map(|pair| {
        let (name, value) = pair.trim_start().split_once('=')?;
        if !name.eq_ignore_ascii_case("for") {
            return None;
        }
        let value = value.trim_end();
        let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
        value.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, uri: &str, headers: &[(&str, &str)]) -> ConnectHead {
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), http::HeaderValue::from_str(v).unwrap());
        }
        parse_connect(&method.parse().unwrap(), &uri.parse().unwrap(), &map)
    }

    #[test]
    fn a_connect_to_ip_port_is_read_with_its_headers() {
        let h =
            head("CONNECT", "10.0.0.1:8080", &[("forwarded", "for=\"10.0.0.2:4000\""), ("traceparent", "00-ab-cd-01")]);
        assert_eq!(h.authority, Ok("10.0.0.1:8080".parse().unwrap()));
        assert_eq!(h.forwarded.as_deref(), Some("for=\"10.0.0.2:4000\""));
        assert_eq!(h.traceparent.as_deref(), Some("00-ab-cd-01"));
        assert_eq!(head("CONNECT", "[fd00::1]:443", &[]).authority, Ok("[fd00::1]:443".parse().unwrap()));
    }

    #[test]
    fn other_methods_and_names_are_refused_with_the_reason() {
        let get = head("GET", "https://10.0.0.1:8080/", &[]).authority.unwrap_err();
        assert!(get.contains("GET is not CONNECT"), "{get}");
        let name = head("CONNECT", "example.com:80", &[]).authority.unwrap_err();
        assert!(name.contains("example.com:80 is not ip:port"), "{name}");
        let no_port = head("CONNECT", "/path", &[]).authority.unwrap_err();
        assert!(no_port.contains("missing :authority"), "{no_port}");
    }

    #[test]
    fn headers_that_are_not_text_are_dropped() {
        let mut map = http::HeaderMap::new();
        map.insert("forwarded", http::HeaderValue::from_bytes(b"for=\xff").unwrap());
        let h = parse_connect(&http::Method::CONNECT, &"10.0.0.1:1".parse().unwrap(), &map);
        assert_eq!(h.forwarded, None);
    }

    #[test]
    fn forwarded_for_takes_the_first_hops_address() {
        let cases: &[(&str, Option<&str>)] = &[
            ("for=\"10.0.0.2:4000\"", Some("10.0.0.2:4000")),
            ("for=10.0.0.2:4000", Some("10.0.0.2:4000")),
            ("proto=https; For=\"[fd00::2]:53\";by=x", Some("[fd00::2]:53")),
            ("for=\"10.0.0.2:1\", for=\"10.0.0.3:2\"", Some("10.0.0.2:1")),
            ("by=\"10.0.0.9:1\"", None),
            ("for=10.0.0.2", None),
            ("for=_hidden", None),
            ("for=\"", None),
            ("xfor=10.0.0.2:4000", None),
            // Found by fuzzing: white space around `=` is no forwarded-pair.
            ("for =\"[fd00::b]:1\"", None),
            ("for= 10.0.0.2:4000", None),
            (" for=10.0.0.2:4000 ;by=x", Some("10.0.0.2:4000")),
            ("", None),
        ];
        for (header, want) in cases {
            assert_eq!(forwarded_for(Some(header)), want.map(|w| w.parse().unwrap()), "{header}");
        }
        assert_eq!(forwarded_for(None), None);
    }
}
