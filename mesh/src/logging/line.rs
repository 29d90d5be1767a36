//! Lines formatted by hand for the one record written per request (the waypoint's access
//! log), in the shape the subscriber prints for an event with the same fields, text or JSON,
//! so that readers and tests see one format. `tracing-subscriber`'s formatter records every
//! field through its visitor, a `dyn Debug` call and its style and padding wrappers; with
//! twenty fields that was 7 % of the waypoint's CPU at 1,000 req/s (profiled). Here each value
//! is written once, straight into one buffer that goes to the same batched writer. Callers
//! check `tracing::enabled!` for their target first, so `RUST_LOG` still decides.
//! The buffer is the thread's own and is reused line after line: no allocation per line.
use std::cell::Cell;
use std::fmt::Display;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

/// The largest buffer a thread keeps between lines.
const KEEP: usize = 4096;

thread_local! {
    /// The last line's buffer, kept for the thread's next line.
    static SPARE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// One INFO line: `Line::new`, fields in order, then `emit`.
pub struct Line<'a> {
    /// UTF-8 throughout: only `str` and `Display` output is written.
    out: Vec<u8>,
    target: &'a str,
    json: bool,
}

impl<'a> Line<'a> {
    /// A line of `target` with `message`, stamped now, in the process's log format.
    pub fn new(target: &'a str, message: &str) -> Line<'a> {
        Line::start(target, message, super::json())
    }

    fn start(target: &'a str, message: &str, json: bool) -> Line<'a> {
        let mut out = SPARE.take();
        out.clear();
        out.reserve(1024);
        if json {
            out.extend_from_slice(b"{\"timestamp\":\"");
            timestamp(&mut out);
            out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"message\":");
            json_string(&mut out, message);
        } else {
            timestamp(&mut out);
            out.extend_from_slice(b"  INFO ");
            out.extend_from_slice(target.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(message.as_bytes());
        }
        Line { out, target, json }
    }

    fn name(&mut self, name: &str) {
        let (before, after): (&[u8], &[u8]) = if self.json { (b",\"", b"\":") } else { (b" ", b"=") };
        self.out.extend_from_slice(before);
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(after);
    }

    /// A string field: quoted and escaped, as the subscriber writes a `&str` field.
    pub fn str(mut self, name: &str, value: &str) -> Self {
        self.name(name);
        if self.json {
            json_string(&mut self.out, value);
        } else if value.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\') {
            // Printable ASCII without quotes or backslashes (identities, names, rules): what
            // `Debug` would write, without its per-char escaping pass.
            self.out.push(b'"');
            self.out.extend_from_slice(value.as_bytes());
            self.out.push(b'"');
        } else {
            let _ = write!(self.out, "{value:?}");
        }
        self
    }

    /// A field recorded by `Display` (`%value`): bare in text, a string in JSON.
    pub fn display(mut self, name: &str, value: impl Display) -> Self {
        self.name(name);
        if self.json {
            // Display output of addresses and methods has nothing to escape, but a value
            // from outside might: format first, then escape.
            json_string(&mut self.out, &value.to_string());
        } else {
            let _ = write!(self.out, "{value}");
        }
        self
    }

    /// A string recorded by `Display` (`%value`), as [`Line::display`] writes it without
    /// going through `fmt`.
    pub fn bare(mut self, name: &str, value: &str) -> Self {
        self.name(name);
        if self.json {
            json_string(&mut self.out, value);
        } else {
            self.out.extend_from_slice(value.as_bytes());
        }
        self
    }

    /// An address recorded by `Display`, or `-` for none: as [`Line::display`] writes it,
    /// IPv4 digits written directly (two or three addresses per request).
    pub fn addr(mut self, name: &str, addr: Option<SocketAddr>) -> Self {
        let Some(SocketAddr::V4(a)) = addr else {
            return match addr {
                Some(a) => self.display(name, a),
                None => self.bare(name, "-"),
            };
        };
        self.name(name);
        if self.json {
            self.out.push(b'"');
        }
        for (i, octet) in a.ip().octets().into_iter().enumerate() {
            if i > 0 {
                self.out.push(b'.');
            }
            decimal(&mut self.out, octet.into());
        }
        self.out.push(b':');
        decimal(&mut self.out, a.port().into());
        if self.json {
            self.out.push(b'"');
        }
        self
    }

    /// A duration in milliseconds to the microsecond (`12.345`): a number in both formats,
    /// written without float formatting.
    pub fn millis(mut self, name: &str, d: Duration) -> Self {
        self.name(name);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        match u32::try_from(micros / 1000) {
            Ok(ms) => decimal(&mut self.out, ms),
            Err(_) => {
                let _ = write!(self.out, "{}", micros / 1000);
            }
        }
        self.out.push(b'.');
        zero_padded(&mut self.out, (micros % 1000) as u32, 3);
        self
    }

    /// A number or boolean field: bare in both formats.
    pub fn value(mut self, name: &str, value: impl Display) -> Self {
        self.name(name);
        let _ = write!(self.out, "{value}");
        self
    }

    /// Hands the line to the process's log writer (stderr if logging was not set up).
    pub fn emit(self) {
        let line = self.finish();
        super::write_line(&line);
        // A rare huge line (a long path) is not kept for the thread's life.
        if line.capacity() <= KEEP {
            SPARE.set(line);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.json {
            self.out.extend_from_slice(b"},\"target\":");
            json_string(&mut self.out, self.target);
            self.out.push(b'}');
        }
        self.out.push(b'\n');
        self.out
    }
}

/// UTC now, as the subscriber stamps its lines: `2026-12-05T13:40:01.123456Z`.
fn timestamp(out: &mut Vec<u8>) {
    stamp(out, time::OffsetDateTime::now_utc());
}

fn stamp(out: &mut Vec<u8>, now: time::OffsetDateTime) {
    let parts: [(u32, usize, u8); 7] = [
        (now.year().clamp(0, 9999) as u32, 4, b'-'),
        (u8::from(now.month()).into(), 2, b'-'),
        (now.day().into(), 2, b'T'),
        (now.hour().into(), 2, b':'),
        (now.minute().into(), 2, b':'),
        (now.second().into(), 2, b'.'),
        (now.microsecond(), 6, b'Z'),
    ];
    for (value, width, then) in parts {
        zero_padded(out, value, width);
        out.push(then);
    }
}

/// `value` in `width` decimal digits, zero-padded (`value` fits).
fn zero_padded(out: &mut Vec<u8>, mut value: u32, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for digit in out[start..].iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// `value` in decimal, no padding.
fn decimal(out: &mut Vec<u8>, value: u32) {
    let width = value.checked_ilog10().unwrap_or(0) as usize + 1;
    zero_padded(out, value, width);
}

fn json_string(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping, written in place; writing into a Vec cannot fail.
    let _ = serde_json::to_writer(out, s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_escaped_strings_are_written_as_debug_writes_them() {
        for value in ["spiffe://td/ns/a/sa/b", "ns/r#rule", "-", "a \"b\"", "back\\slash", "tab\t", "é", ""] {
            let text = String::from_utf8(Line::start("t", "m", false).str("f", value).finish()).unwrap();
            assert!(text.ends_with(&format!(" f={value:?}\n")), "{value:?}: {text}");
        }
    }

    #[test]
    fn stamps_are_zero_padded_to_the_microsecond() {
        let mut out = Vec::new();
        let day = time::Date::from_calendar_date(2026, time::Month::January, 2).unwrap();
        let at = day.with_hms_micro(3, 4, 5, 6).unwrap().assume_utc();
        stamp(&mut out, at);
        assert_eq!(String::from_utf8(out).unwrap(), "2026-01-02T03:04:05.000006Z");
        let mut out = Vec::new();
        decimal(&mut out, 0);
        decimal(&mut out, 65535);
        assert_eq!(out, b"065535");
    }

    fn fields(line: Line<'_>) -> String {
        let bytes = line
            .str("who", "spiffe://td/ns/a/sa/b \"x\"\n")
            .display("addr", std::net::SocketAddr::from(([10, 0, 0, 1], 80)))
            .addr("v4", Some(SocketAddr::from(([10, 200, 0, 9], 15008))))
            .addr("v6", Some("[fd00::1]:8080".parse().unwrap()))
            .addr("none", None)
            .bare("path", "/a b\"c")
            .value("status", 200u16)
            .value("complete", true)
            .value("ms", 1.5f64)
            .millis("took", Duration::from_micros(12_045))
            .finish();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn text_lines_have_the_subscribers_shape() {
        let text = fields(Line::start("access", "request", false));
        let (stamp, rest) = text.split_once("  ").unwrap();
        assert_eq!(stamp.len(), "2026-12-05T13:40:01.123456Z".len(), "{text}");
        assert!(stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T', "{text}");
        assert_eq!(
            rest,
            "INFO access: request who=\"spiffe://td/ns/a/sa/b \\\"x\\\"\\n\" addr=10.0.0.1:80 v4=10.200.0.9:15008 \
             v6=[fd00::1]:8080 none=- path=/a b\"c status=200 complete=true ms=1.5 took=12.045\n"
        );
    }

    #[test]
    fn json_lines_are_one_object_in_the_subscribers_layout() {
        let text = fields(Line::start("access", "request", true));
        assert!(text.ends_with("}\n") && text.lines().count() == 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "access");
        assert_eq!(v["fields"]["message"], "request");
        assert_eq!(v["fields"]["who"], "spiffe://td/ns/a/sa/b \"x\"\n");
        assert_eq!(v["fields"]["addr"], "10.0.0.1:80");
        assert_eq!(v["fields"]["v4"], "10.200.0.9:15008");
        assert_eq!(v["fields"]["v6"], "[fd00::1]:8080");
        assert_eq!(v["fields"]["none"], "-");
        assert_eq!(v["fields"]["path"], "/a b\"c");
        assert_eq!(v["fields"]["status"], 200);
        assert_eq!(v["fields"]["complete"], true);
        assert_eq!(v["fields"]["ms"], 1.5);
        assert_eq!(v["fields"]["took"], 12.045);
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}
