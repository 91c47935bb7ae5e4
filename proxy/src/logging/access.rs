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
//!
//! A runtime thread gathers its lines in one buffer of its own and hands
//! them to the writer thread together, before it parks ([`hand_over`]):
//! no allocation and no queue operation a line on a busy sidecar, and a
//! quiet one hands each line over as soon as its request is done. A thread
//! that has not parked yet (or any thread, without the sidecar's logging
//! installed) hands each line over at once.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Typical line length: one allocation per line, no regrowth.
const LINE_CAPACITY: usize = 384;
/// A thread hands its lines over once they hold this many bytes...
const GATHER_BYTES: usize = 16 * 1024;
/// ...or once the first of them is this old, even if it has not parked:
/// the writer thread's own interval.
const GATHER_AGE: Duration = trellis_core::logging::batched::FLUSH_INTERVAL;

/// Where finished lines go: handed over whole, not copied.
pub trait Lines: Send + Sync + 'static {
    /// `count` whole lines, newlines included.
    fn lines(&self, bytes: Vec<u8>, count: usize);
}

/// The access log's stream, once the sidecar's logging is installed.
static OUT: OnceLock<Box<dyn Lines>> = OnceLock::new();

/// Sends every access-log line from now on to `out` (the first call wins).
pub fn install(out: impl Lines) {
    let _ = OUT.set(Box::new(out));
}

/// The lines a runtime thread wrote since it last handed them over.
struct Gathered {
    bytes: Vec<u8>,
    lines: usize,
    /// When the first of them was stamped.
    since: SystemTime,
    /// How large the last batch was: the next buffer is made that large.
    last: usize,
}

thread_local! {
    /// This thread's gathered lines; `None` until it first parks.
    static GATHERED: RefCell<Option<Gathered>> = const { RefCell::new(None) };
}

impl Gathered {
    /// The buffer to write the next line at the end of.
    fn buffer(&mut self, now: SystemTime) -> Vec<u8> {
        if self.lines == 0 {
            self.since = now;
            if self.bytes.capacity() == 0 {
                self.bytes = Vec::with_capacity(self.last.clamp(LINE_CAPACITY, GATHER_BYTES));
            }
        }
        std::mem::take(&mut self.bytes)
    }

    /// Takes back the buffer with one more line at its end; the lines to
    /// hand over, if they are enough or old enough.
    fn put_back(&mut self, bytes: Vec<u8>, stamped: SystemTime) -> Option<(Vec<u8>, usize)> {
        self.restore(bytes);
        self.lines += 1;
        let old = stamped
            .duration_since(self.since)
            .is_ok_and(|age| age >= GATHER_AGE);
        (self.bytes.len() >= GATHER_BYTES || old).then(|| self.take())
    }

    /// Takes back the buffer a line was written in, all of it kept. If a
    /// line started while another was being written, the buffer here is
    /// the later one's: both are kept, whole.
    fn restore(&mut self, bytes: Vec<u8>) {
        if self.bytes.is_empty() {
            self.bytes = bytes;
        } else {
            self.bytes.extend_from_slice(&bytes);
        }
    }

    /// Everything gathered, if anything.
    fn take(&mut self) -> (Vec<u8>, usize) {
        self.last = self.bytes.len();
        (
            std::mem::take(&mut self.bytes),
            std::mem::take(&mut self.lines),
        )
    }
}

/// Hands the lines this thread gathered to the access log's writer, and
/// has it gather its lines from now on: each runtime thread of the sidecar
/// calls this before it parks and as it stops, and the main thread once
/// its runtime is shut down.
pub fn hand_over() {
    let Some(out) = OUT.get() else {
        return;
    };
    let batch = GATHERED.with_borrow_mut(|gathered| match gathered {
        Some(gathered) if gathered.lines > 0 => Some(gathered.take()),
        Some(_) => None,
        None => {
            *gathered = Some(Gathered {
                bytes: Vec::new(),
                lines: 0,
                since: UNIX_EPOCH,
                last: 0,
            });
            None
        }
    });
    if let Some((bytes, lines)) = batch {
        out.lines(bytes, lines);
    }
}

/// One line being written, after its `message`.
pub struct Line {
    /// Where the line is written: from `start` on, after the lines the
    /// thread gathered before it, if it gathers.
    buf: Vec<u8>,
    start: usize,
    /// The line's stamp, if it goes back to the thread's gathered lines.
    gathered: Option<SystemTime>,
}

impl Line {
    /// A line stamped `now`, with its level, target and message.
    pub fn start(now: SystemTime) -> Line {
        let gathering = OUT.get().and_then(|_| {
            GATHERED.with_borrow_mut(|g| g.as_mut().map(|gathered| gathered.buffer(now)))
        });
        let (mut line, gathered) = match gathering {
            Some(buf) => (buf, Some(now)),
            None => (Vec::with_capacity(LINE_CAPACITY), None),
        };
        let start = line.len();
        line.extend_from_slice(b"{\"timestamp\":\"");
        rfc3339(&mut line, now);
        line.extend_from_slice(b"\",\"level\":\"INFO\",\"target\":\"");
        line.extend_from_slice(crate::http::ACCESS_TARGET.as_bytes());
        line.extend_from_slice(b"\",\"message\":\"request\"");
        Line {
            buf: line,
            start,
            gathered,
        }
    }

    /// A line of members only, for [`members`].
    fn part() -> Line {
        Line {
            buf: Vec::new(),
            start: 0,
            gathered: None,
        }
    }

    /// Members written once by [`members`] (`,"key":value`...): the part
    /// that every line of a connection shares.
    pub fn raw(&mut self, members: &[u8]) {
        self.buf.extend_from_slice(members);
    }

    fn key(&mut self, key: &str) {
        self.buf.extend_from_slice(b",\"");
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.extend_from_slice(b"\":");
    }

    /// A string member; `None` leaves it out.
    pub fn member<'a>(&mut self, key: &str, value: impl Into<Option<&'a str>>) {
        if let Some(value) = value.into() {
            self.key(key);
            self.buf.push(b'"');
            escape_into(&mut self.buf, value);
            self.buf.push(b'"');
        }
    }

    /// A number member; `None` leaves it out.
    pub fn number(&mut self, key: &str, value: impl Into<Option<u64>>) {
        if let Some(value) = value.into() {
            self.key(key);
            self.buf
                .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
        }
    }

    /// `elapsed` in milliseconds, to the microsecond (`1.025`).
    pub fn millis(&mut self, key: &str, elapsed: Duration) {
        self.key(key);
        let micros = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
        self.buf
            .extend_from_slice(itoa::Buffer::new().format(micros / 1000).as_bytes());
        let fraction = micros % 1000;
        self.buf.extend_from_slice(&[
            b'.',
            b'0' + (fraction / 100) as u8,
            b'0' + (fraction / 10 % 10) as u8,
            b'0' + (fraction % 10) as u8,
        ]);
    }

    /// Writes the line to the access log: to the thread's gathered
    /// lines, or at once. Where the sidecar's logging is not installed
    /// (the sidecar run as a library), it becomes an event of target
    /// `trellis::access` whose `line` field holds it.
    pub fn write(mut self) {
        let (mut line, start, gathered) = (
            std::mem::take(&mut self.buf),
            self.start,
            self.gathered.take(),
        );
        line.extend_from_slice(b"}\n");
        let out = OUT.get();
        if let (Some(out), Some(stamped)) = (out, gathered) {
            let full = GATHERED.with_borrow_mut(|g| match g {
                Some(gathered) => gathered.put_back(line, stamped),
                None => Some((line, 1)),
            });
            if let Some((bytes, lines)) = full {
                out.lines(bytes, lines);
            }
            return;
        }
        match out {
            Some(out) => out.lines(line, 1),
            None => {
                let text = String::from_utf8_lossy(&line[start..line.len() - 1]);
                tracing::info!(target: crate::http::ACCESS_TARGET, line = %text, "request");
            }
        }
    }
}

/// A line dropped unwritten gives the thread's gathered lines back
/// without it.
impl Drop for Line {
    fn drop(&mut self) {
        if self.gathered.take().is_some() {
            let mut buf = std::mem::take(&mut self.buf);
            buf.truncate(self.start);
            GATHERED.with_borrow_mut(|g| {
                if let Some(gathered) = g {
                    gathered.restore(buf);
                }
            });
        }
    }
}

/// The members of a raw part: what [`Line::member`] and [`Line::number`]
/// write, kept to be put in other lines with [`Line::raw`].
pub fn members(write: impl FnOnce(&mut Line)) -> Box<[u8]> {
    let mut part = Line::part();
    write(&mut part);
    std::mem::take(&mut part.buf).into_boxed_slice()
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
    use std::sync::Mutex;

    impl Line {
        /// The line alone, newline included.
        fn finish(mut self) -> Vec<u8> {
            self.buf.extend_from_slice(b"}\n");
            self.buf.split_off(self.start)
        }
    }

    /// What reached the access log's stream, batch by batch: the stream
    /// of every test of this binary, installed once.
    struct Recorded(Mutex<Vec<(Vec<u8>, usize)>>);

    impl Lines for &'static Recorded {
        fn lines(&self, bytes: Vec<u8>, count: usize) {
            self.0.lock().unwrap().push((bytes, count));
        }
    }

    fn recorded() -> &'static Recorded {
        static RECORDED: OnceLock<&'static Recorded> = OnceLock::new();
        RECORDED.get_or_init(|| {
            let recorded: &'static Recorded = Box::leak(Box::new(Recorded(Mutex::new(Vec::new()))));
            install(recorded);
            recorded
        })
    }

    /// Writes a line whose path is `path`, stamped `at`.
    fn request(path: &str, at: SystemTime) {
        let mut line = Line::start(at);
        line.member("path", path);
        line.number("status", 200);
        line.write();
    }

    /// The batches that reached the stream holding lines whose path
    /// starts with `tag`: each batch's paths, and the count it came with.
    fn batches(tag: &str) -> Vec<(Vec<String>, usize)> {
        recorded()
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(bytes, _)| String::from_utf8_lossy(bytes).contains(tag))
            .map(|(bytes, count)| {
                let paths = bytes
                    .split_inclusive(|b| *b == b'\n')
                    .map(|line| parsed(line.to_vec())["path"].as_str().unwrap().to_owned())
                    .collect();
                (paths, *count)
            })
            .collect()
    }

    #[test]
    fn a_thread_that_parks_hands_its_lines_over_together_and_each_line_is_whole() {
        recorded();
        std::thread::spawn(|| {
            let now = SystemTime::now();
            // Before the thread first parks: at once, alone.
            request("/park-a", now);
            assert_eq!(batches("/park-"), [(vec!["/park-a".to_owned()], 1)]);
            hand_over();
            request("/park-b", now);
            request("/park-c", now);
            assert_eq!(
                batches("/park-").len(),
                1,
                "gathered until the thread parks"
            );
            hand_over();
            hand_over();
            request("/park-d", now);
            hand_over();
            // A line dropped unwritten loses none gathered before it.
            request("/park-e", now);
            drop(Line::start(now));
            request("/park-f", now);
            hand_over();
            let paths = |names: &[&str]| names.iter().map(|p| p.to_string()).collect::<Vec<_>>();
            assert_eq!(
                batches("/park-"),
                [
                    (paths(&["/park-a"]), 1),
                    (paths(&["/park-b", "/park-c"]), 2),
                    (paths(&["/park-d"]), 1),
                    (paths(&["/park-e", "/park-f"]), 2),
                ]
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn gathered_lines_are_handed_over_once_large_or_old_without_a_park() {
        recorded();
        std::thread::spawn(|| {
            hand_over();
            let now = SystemTime::now();
            let mut written = 0;
            while batches("/large-").is_empty() {
                request(&format!("/large-{written}"), now);
                written += 1;
                assert!(written < GATHER_BYTES, "never handed over");
            }
            let [(paths, count)] = &batches("/large-")[..] else {
                panic!("one batch");
            };
            assert_eq!((paths.len(), *count), (written, written));
            assert!(
                written > GATHER_BYTES / 200,
                "{written} lines is not {GATHER_BYTES} bytes"
            );

            request("/old-1", now);
            assert!(batches("/old-").is_empty());
            request("/old-2", now + GATHER_AGE);
            assert_eq!(
                batches("/old-").len(),
                1,
                "the first line waited long enough"
            );
            assert_eq!(batches("/old-")[0].1, 2);
        })
        .join()
        .unwrap();
    }

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
            let mut line = Line::part();
            line.millis("d", elapsed);
            String::from_utf8(std::mem::take(&mut line.buf)).unwrap()
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
