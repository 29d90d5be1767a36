//! Any CONNECT head the HTTP/2 layer could hand over, from bytes read leniently as a text
//! head: a first line `METHOD TARGET`, then `name: value` lines. What `http` refuses is dropped
//! (h2 refuses it before the server sees it). `parse_connect` and the `forwarded` parser read
//! the rest: nothing may panic, and an accepted authority must be exactly the request's.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use palisade_mesh::hbone::request::{forwarded_for, parse_connect};

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let first = lines.next().unwrap_or_default();
    let (method, target) = match first.iter().position(|&b| b == b' ') {
        Some(i) => (&first[..i], &first[i + 1..]),
        None => (first, &b""[..]),
    };
    let Ok(method) = http::Method::from_bytes(method) else { return };
    // `ip:port` parses as an authority-form URI, as CONNECT's target is.
    let Ok(uri) = http::Uri::try_from(target) else { return };
    let mut headers = http::HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(&line[..colon]), http::HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let head = parse_connect(&method, &uri, &headers);
    if let Ok(addr) = head.authority {
        assert_eq!(method, http::Method::CONNECT, "a {method} request was accepted");
        let authority = uri.authority().expect("an accepted request has an authority");
        assert_eq!(authority.as_str().parse::<SocketAddr>().ok(), Some(addr), "{authority} read as {addr}");
    }
    if let Some(addr) = forwarded_for(head.forwarded.as_deref()) {
        let text = head.forwarded.as_deref().unwrap_or_default();
        assert!(text.to_ascii_lowercase().contains("for="), "{addr} read from {text:?}");
    }
    // Any text at all, also what `http` would not let through as a header value.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = forwarded_for(Some(text));
    }
});
