//! The access log's own JSON writer: one object per request, written
//! straight into the line the batch writer takes. No tracing event, no
//! formatter: the caller's part of the line (its identity and the app's
//! address) is escaped once per connection ([`Line::raw`]), the date of
//! the current second once per second, and numbers are written as digits
//! (the tracing path this replaced cost about 2 us of the server side's
//! CPU a keep-alive request, a sixth of the whole).
//!
//! A line holds `timestamp` (RFC 3339, UTC, microseconds), `level`,
//! `target` (`trellis::access`), `message` (`request`), then the
//! request's fields at the top level in the order they are written;
//! absent fields are left out.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Typical line length: one allocation per line, no regrowth.
const LINE_CAPACITY: usize = 384;

/// Where finished lines go: each is handed over whole, not copied.
pub trait Lines: Send + Sync + 'static {
    fn line(&self, line: Vec<u8>);
}

/// The access log's stream, once the sidecar's logging is installed.
static OUT: OnceLock<Box<dyn Lines>> = OnceLock::new();

/// Sends every access-log line from now on to `out` (the first call wins).
pub fn install(out: impl Lines) {
    let _ = OUT.set(Box::new(out));
}

/// One line being written, after its `message`.
pub struct Line(Vec<u8>);

impl Line {
    /// A line stamped `now`, with its level, target and message.
    pub fn start(now: SystemTime) -> Line {
        let mut line = Vec::with_capacity(LINE_CAPACITY);
        line.extend_from_slice(b"{\"timestamp\":\"");
        rfc3339(&mut line, now);
        line.extend_from_slice(b"\",\"level\":\"INFO\",\"target\":\"");
        line.extend_from_slice(crate::http::ACCESS_TARGET.as_bytes());
        line.extend_from_slice(b"\",\"message\":\"request\"");
        Line(line)
    }

    /// Members written once by [`members`] (`,"key":value`...): the part
    /// that every line of a connection shares.
    pub fn raw(&mut self, members: &[u8]) {
        self.0.extend_from_slice(members);
    }

    fn key(&mut self, key: &str) {
        self.0.extend_from_slice(b",\"");
        self.0.extend_from_slice(key.as_bytes());
        self.0.extend_from_slice(b"\":");
    }

    /// A string member; `None` leaves it out.
    pub fn member<'a>(&mut self, key: &str, value: impl Into<Option<&'a str>>) {
        if let Some(value) = value.into() {
            self.key(key);
            self.0.push(b'"');
            escape_into(&mut self.0, value);
            self.0.push(b'"');
        }
    }

    /// A number member; `None` leaves it out.
    pub fn number(&mut self, key: &str, value: impl Into<Option<u64>>) {
        if let Some(value) = value.into() {
            self.key(key);
            self.0
                .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
        }
    }

    /// `elapsed` in milliseconds, to the microsecond (`1.025`).
    pub fn millis(&mut self, key: &str, elapsed: Duration) {
        self.key(key);
        let micros = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
        self.0
            .extend_from_slice(itoa::Buffer::new().format(micros / 1000).as_bytes());
        let fraction = micros % 1000;
        self.0.extend_from_slice(&[
            b'.',
            b'0' + (fraction / 100) as u8,
            b'0' + (fraction / 10 % 10) as u8,
            b'0' + (fraction % 10) as u8,
        ]);
    }

    /// The line, newline included.
    pub fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(b"}\n");
        self.0
    }

    /// Writes the line to the access log. Where the sidecar's logging is
    /// not installed (the sidecar run as a library), it becomes an event
    /// of target `trellis::access` whose `line` field holds it.
    pub fn write(self) {
        let line = self.finish();
        match OUT.get() {
            Some(out) => out.line(line),
            None => {
                let text = String::from_utf8_lossy(&line[..line.len() - 1]);
                tracing::info!(target: crate::http::ACCESS_TARGET, line = %text, "request");
            }
        }
    }
}

/// The members of a raw part: what [`Line::member`] and [`Line::number`]
/// write, kept to be put in other lines with [`Line::raw`].
pub fn members(write: impl FnOnce(&mut Line)) -> Box<[u8]> {
    let mut part = Line(Vec::new());
    write(&mut part);
    part.0.into_boxed_slice()
}

fn escape_into(out: &mut Vec<u8>, s: &str) {
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&s.as_bytes()[plain..i]);
        if escaped.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.extend_from_slice(escaped);
        }
        plain = i + 1;
    }
    out.extend_from_slice(&s.as_bytes()[plain..]);
}

thread_local! {
    /// The second last stamped on this thread, and its date and time
    /// (`YYYY-MM-DDTHH:MM:SS`).
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// `now` as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (a clock set before 1970 reads
/// as 1970: the formatter refuses earlier times).
fn rfc3339(out: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(second, date)| {
        if *second != secs {
            date.clear();
            let at = UNIX_EPOCH + Duration::from_secs(secs);
            let _ = write!(date, "{}", humantime::format_rfc3339_seconds(at));
            // The `Z` comes after the fraction.
            date.pop();
            *second = secs;
        }
        out.extend_from_slice(date.as_bytes());
    });
    let micros = since.subsec_micros();
    let mut digits = [b'.', b'0', b'0', b'0', b'0', b'0', b'0', b'Z'];
    let mut rest = micros;
    for d in digits[1..7].iter_mut().rev() {
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    out.extend_from_slice(&digits);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(line: Vec<u8>) -> serde_json::Value {
        let text = String::from_utf8(line).unwrap();
        assert!(
            text.ends_with('\n') && text.lines().count() == 1,
            "{text:?}"
        );
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn a_request_is_one_json_object_with_its_fields_at_the_top_level() {
        let peer = "spiffe://cluster.local/ns/a/sa/web";
        let caller = members(|l| {
            l.member("source", peer);
            l.member("destination", "127.0.0.1:8080");
        });
        let mut line = Line::start(SystemTime::now());
        line.raw(&caller);
        line.member("method", "POST");
        line.member("path", "/a \"quoted\"\\path\n\u{1}\t\r");
        line.number("status", 200);
        line.number("bytes_in", 5);
        line.millis("duration_ms", Duration::from_micros(1_500));
        line.member("policy", None);
        line.number("rule", None);
        line.member("protocol", "http1");
        let line = parsed(line.finish());
        assert_eq!(line["target"], "trellis::access");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "request");
        assert_eq!(line["source"], peer);
        assert_eq!(line["destination"], "127.0.0.1:8080");
        assert_eq!(line["method"], "POST");
        assert_eq!(line["path"], "/a \"quoted\"\\path\n\u{1}\t\r");
        assert_eq!(line["status"], 200);
        assert_eq!(line["bytes_in"], 5);
        assert_eq!(line["duration_ms"], 1.5);
        assert_eq!(line["protocol"], "http1");
        for absent in ["policy", "rule"] {
            assert!(
                line.get(absent).is_none(),
                "None fields are left out: {line}"
            );
        }
        let ts = line["timestamp"].as_str().unwrap();
        assert!(ts.len() == 27 && ts.ends_with('Z'), "{ts}");
    }

    #[test]
    fn durations_are_milliseconds_to_the_microsecond() {
        let millis = |elapsed| {
            let mut line = Line(Vec::new());
            line.millis("d", elapsed);
            String::from_utf8(line.0).unwrap()
        };
        assert_eq!(millis(Duration::ZERO), ",\"d\":0.000");
        assert_eq!(millis(Duration::from_nanos(999)), ",\"d\":0.000");
        assert_eq!(millis(Duration::from_micros(7)), ",\"d\":0.007");
        assert_eq!(millis(Duration::from_micros(1_025)), ",\"d\":1.025");
        assert_eq!(millis(Duration::from_secs(90)), ",\"d\":90000.000");
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let at = |secs: u64, micros: u64| {
            let mut out = Vec::new();
            rfc3339(
                &mut out,
                UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros),
            );
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        // A leap day, and the last second of a leap year.
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_735_689_599, 999_999), "2024-12-31T23:59:59.999999Z");
        // The same second again (the date kept from the line before), then
        // the next one.
        assert_eq!(at(1_735_689_599, 12), "2024-12-31T23:59:59.000012Z");
        assert_eq!(at(1_735_689_600, 0), "2025-01-01T00:00:00.000000Z");
        assert_eq!(at(1_795_996_800 + 3_723, 0), "2026-11-30T01:02:03.000000Z");
        let mut before_1970 = Vec::new();
        rfc3339(&mut before_1970, UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(before_1970, b"1970-01-01T00:00:00.000000Z");
    }
}
