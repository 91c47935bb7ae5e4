//! The access log's own JSON writer: one object per request, written
//! straight into the line the batch writer takes, without the general
//! formatter's intermediate maps and strings (it was about a tenth of the
//! server side's CPU per keep-alive request).
//!
//! A line holds `timestamp` (RFC 3339, UTC, microseconds), `level`,
//! `target`, `message`, then the event's fields at the top level in the
//! order they were given; `None` fields are left out, non-finite numbers
//! are `null`.

use std::fmt::{self, Write as _};
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Typical line length: one allocation per line, no regrowth.
const LINE_CAPACITY: usize = 384;

/// Where finished lines go: each is handed over whole, not copied.
pub trait Lines: Send + Sync + 'static {
    fn line(&self, line: Vec<u8>);
}

/// Writes each event it sees as one JSON line to its [`Lines`].
pub struct AccessLayer<L> {
    out: L,
}

impl<L> AccessLayer<L> {
    pub fn new(out: L) -> Self {
        AccessLayer { out }
    }
}

impl<S: Subscriber, L: Lines> Layer<S> for AccessLayer<L> {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        self.out.line(format_line(event, SystemTime::now()));
    }
}

/// One event as a JSON line, newline included.
fn format_line(event: &Event<'_>, now: SystemTime) -> Vec<u8> {
    let meta = event.metadata();
    let mut line = Json(Vec::with_capacity(LINE_CAPACITY));
    line.0.extend_from_slice(b"{\"timestamp\":\"");
    rfc3339(&mut line.0, now);
    line.0.extend_from_slice(b"\",\"level\":\"");
    line.0.extend_from_slice(meta.level().as_str().as_bytes());
    line.0.extend_from_slice(b"\",\"target\":");
    line.string(meta.target());
    event.record(&mut line);
    line.0.extend_from_slice(b"}\n");
    line.0
}

/// A JSON object being written, after its first member.
struct Json(Vec<u8>);

impl Json {
    fn key(&mut self, field: &Field) {
        self.0.push(b',');
        self.string(field.name());
        self.0.push(b':');
    }

    fn string(&mut self, s: &str) {
        self.0.push(b'"');
        escape_into(&mut self.0, s);
        self.0.push(b'"');
    }
}

impl Visit for Json {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        self.string(value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.0, "{value}");
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.0, "{value}");
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        if value.is_finite() {
            let _ = write!(self.0, "{value}");
        } else {
            self.0.extend_from_slice(b"null");
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.0
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    /// `%value` and `?value` fields: their text, escaped as it is written.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field);
        self.0.push(b'"');
        let _ = write!(Escaping(&mut self.0), "{value:?}");
        self.0.push(b'"');
    }
}

/// Escapes what is written into it as the inside of a JSON string.
struct Escaping<'a>(&'a mut Vec<u8>);

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
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

/// `now` as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (a clock set before 1970 reads
/// as 1970: the formatter refuses earlier times).
fn rfc3339(out: &mut Vec<u8>, now: SystemTime) {
    let now = now.max(UNIX_EPOCH);
    let _ = write!(out, "{}", humantime::format_rfc3339_micros(now));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tracing_subscriber::layer::SubscriberExt;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Lines for Captured {
        fn line(&self, line: Vec<u8>) {
            self.0.lock().unwrap().extend_from_slice(&line);
        }
    }

    fn logged(emit: impl FnOnce()) -> String {
        let out = Captured::default();
        let subscriber = tracing_subscriber::registry().with(AccessLayer::new(out.clone()));
        tracing::subscriber::with_default(subscriber, emit);
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn a_request_is_one_json_object_with_its_fields_at_the_top_level() {
        let peer = "spiffe://cluster.local/ns/a/sa/web";
        let method = http::Method::POST;
        let none: Option<&str> = None;
        let text = logged(|| {
            tracing::info!(
                target: "trellis::access",
                source = %peer,
                method = %method,
                path = "/a \"quoted\"\\path\n\u{1}",
                status = 200u16,
                bytes_in = 5u64,
                duration_ms = 1.5f64,
                slow = false,
                policy = none,
                rule = Some("r1"),
                "request"
            );
        });
        assert!(
            text.ends_with('\n') && text.lines().count() == 1,
            "{text:?}"
        );
        let line: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(line["target"], "trellis::access");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "request");
        assert_eq!(line["source"], peer);
        assert_eq!(line["method"], "POST");
        assert_eq!(line["path"], "/a \"quoted\"\\path\n\u{1}");
        assert_eq!(line["status"], 200);
        assert_eq!(line["bytes_in"], 5);
        assert_eq!(line["duration_ms"], 1.5);
        assert_eq!(line["slow"], false);
        assert_eq!(line["rule"], "r1");
        assert!(
            line.get("policy").is_none(),
            "None fields are left out: {line}"
        );
        let ts = line["timestamp"].as_str().unwrap();
        assert!(ts.len() == 27 && ts.ends_with('Z'), "{ts}");
    }

    #[test]
    fn non_finite_numbers_are_null() {
        let text = logged(|| tracing::info!(target: "trellis::access", d = f64::NAN, "x"));
        let line: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(line["d"].is_null(), "{line}");
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
        assert_eq!(at(1_795_996_800 + 3_723, 0), "2026-11-30T01:02:03.000000Z");
        let mut before_1970 = Vec::new();
        rfc3339(&mut before_1970, UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(before_1970, b"1970-01-01T00:00:00.000000Z");
    }
}
