//! W3C Trace Context: the waypoint takes part in the trace as one hop. A valid incoming
//! `traceparent` keeps its trace id and flags and gets a new parent id (ours); a missing or
//! malformed one is replaced by a fresh trace, not sampled, since the waypoint records no
//! spans itself.
use http::{HeaderMap, HeaderName, HeaderValue};
use rand::Rng;

/// A name made once: inserting by `&str` would allocate it per request.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// A trace id, 32 lower-case hex digits, kept inline (no allocation per request).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceId([u8; 32]);

impl TraceId {
    pub fn as_str(&self) -> &str {
        // Only hex digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Trace id and flags of a valid version-00 header.
fn parse(value: &str) -> Option<(&str, &str)> {
    let mut parts = value.split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let valid = version == "00"
        && parts.next().is_none()
        && is_hex(trace, 32)
        && is_hex(parent, 16)
        && is_hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    valid.then_some((trace, flags))
}

/// Sets the outgoing `traceparent`; returns the trace id for the access log. Written into
/// one stack buffer (once per request: `format!` of its three parts cost more than the rest).
pub fn propagate(headers: &mut HeaderMap) -> TraceId {
    let mut rng = rand::rng();
    // 00-<trace id: 32>-<parent id: 16>-<flags: 2>
    let mut value = *b"00-00000000000000000000000000000000-0000000000000000-00";
    let incoming = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(parse);
    match incoming {
        Some((trace, flags)) => {
            value[3..35].copy_from_slice(trace.as_bytes());
            value[53..].copy_from_slice(flags.as_bytes());
        }
        None => hex(&mut value[3..35], rng.random_range(1..=u128::MAX)),
    }
    hex(&mut value[36..52], u128::from(rng.random_range(1..=u64::MAX)));
    let mut trace = [0; 32];
    trace.copy_from_slice(&value[3..35]);
    headers.insert(TRACEPARENT, HeaderValue::from_bytes(&value).expect("hex digits and dashes are a valid header"));
    TraceId(trace)
}

/// `v`'s low hex digits, lower case, filling `out`.
fn hex(out: &mut [u8], mut v: u128) {
    for digit in out.iter_mut().rev() {
        *digit = b"0123456789abcdef"[(v & 0xf) as usize];
        v >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_trace_replaces_parent_or_starts_one() {
        let mut h = HeaderMap::new();
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert(TRACEPARENT, incoming.parse().unwrap());
        assert_eq!(propagate(&mut h).as_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let out = h[TRACEPARENT].to_str().unwrap().to_string();
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && out.ends_with("-01"));
        assert_ne!(out, incoming);
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, "garbage".parse().unwrap());
        let trace = propagate(&mut h);
        assert!(parse(h[TRACEPARENT].to_str().unwrap()).is_some_and(|(t, _)| t == trace.as_str()));
    }
}
