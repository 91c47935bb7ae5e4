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
//!
//! A thread that stays busy without parking (a runtime thread under load
//! parks only when it runs out of ready tasks) hands its lines over itself
//! when they are enough or old enough, but only as it writes its next
//! line. So that its last lines never wait for a request that may not
//! come, a sweeper thread takes the lines of any thread that has started
//! no line for a whole `SWEEP` interval (20 ms). Each thread's buffer is
//! behind a lock of its own for that: taken twice a line by its thread and
//! by the sweeper once a look, so it is all but never contended. The
//! sweeper starts with the first line a thread gathers, looks often only
//! while lines are held, and sleeps once none are written
//! (`sweep_forever`).

use std::cell::{OnceCell, RefCell};
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, OnceLock, PoisonError};
use std::thread::Thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Typical line length: one allocation per line, no regrowth.
const LINE_CAPACITY: usize = 384;
/// A thread hands its lines over once they hold this many bytes...
const GATHER_BYTES: usize = 16 * 1024;
/// ...or once the first of them is this old, even if it has not parked:
/// the writer thread's own interval.
const GATHER_AGE: Duration = trellis_core::logging::batched::FLUSH_INTERVAL;
/// How often the sweeper looks at what the threads gathered. (Longer in
/// this crate's unit tests, so that a test thread that stalls between two
/// of its lines is not swept under its assertions.)
#[cfg(not(test))]
const SWEEP: Duration = GATHER_AGE;
#[cfg(test)]
const SWEEP: Duration = Duration::from_secs(2);
/// How often the sweeper looks while lines are written but none is held
/// at its looks: threads that park between requests hand their lines over
/// themselves, and a thread that stops parking has its lines swept within
/// about this long.
#[cfg(not(test))]
const GLANCE: Duration = Duration::from_secs(1);
#[cfg(test)]
const GLANCE: Duration = Duration::from_secs(3);

/// Where finished lines go: handed over whole, not copied.
pub trait Lines: Send + Sync + 'static {
    /// `count` whole lines, newlines included.
    fn lines(&self, bytes: Vec<u8>, count: usize);
}

/// The access log's stream, once the sidecar's logging is installed.
static OUT: OnceLock<Box<dyn Lines>> = OnceLock::new();

/// Sends every access-log line from now on to `out` (the first call
/// wins).
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
    /// Lines started and not yet written or dropped: while any is, the
    /// buffer is the line's.
    writing: usize,
    /// Lines ever started on the thread, and as many as the sweeper saw at
    /// its last look: the thread has started none since if they are equal.
    started: u64,
    swept: u64,
}

impl Default for Gathered {
    fn default() -> Self {
        Gathered {
            bytes: Vec::new(),
            lines: 0,
            since: UNIX_EPOCH,
            last: 0,
            writing: 0,
            started: 0,
            swept: 0,
        }
    }
}

/// A thread's gathered lines, shared with the sweeper.
type Shelf = Mutex<Gathered>;

thread_local! {
    /// This thread's gathered lines; unset until it first parks.
    static SHELF: OnceCell<Arc<Shelf>> = const { OnceCell::new() };
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Gathered {
    /// The buffer to write the next line at the end of.
    fn buffer(&mut self, now: SystemTime) -> Vec<u8> {
        self.started += 1;
        self.writing += 1;
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
        self.writing = self.writing.saturating_sub(1);
        if self.bytes.is_empty() {
            self.bytes = bytes;
        } else {
            self.bytes.extend_from_slice(&bytes);
        }
    }

    /// Whether it holds no line, nor one being written.
    fn is_empty(&self) -> bool {
        self.lines == 0 && self.writing == 0
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
    SHELF.with(|shelf| {
        let shelf = shelf.get_or_init(|| {
            let shelf = Arc::new(Shelf::default());
            let mut shelves = lock(&SWEEPER.shelves);
            // The empty shelves of threads that have ended go as a new
            // one comes (the sweeper forgets them too, but only as it
            // looks): a blocking thread calls this as it stops, and a
            // sidecar whose blocking threads come and go while its
            // sweeper sleeps must not keep a shelf for each.
            shelves.retain(|kept| Arc::strong_count(kept) > 1 || !lock(kept).is_empty());
            shelves.push(shelf.clone());
            shelf
        });
        let mut gathered = lock(shelf);
        if gathered.lines > 0 && gathered.writing == 0 {
            // Sent under the lock, so the sweeper cannot send later lines
            // of this thread ahead of these.
            let (bytes, lines) = gathered.take();
            out.lines(bytes, lines);
        }
    });
}

/// The sweeper's state: every thread's shelf, and how it waits for its
/// next look.
struct Sweeper {
    shelves: Mutex<Vec<Arc<Shelf>>>,
    thread: OnceLock<Thread>,
    /// [`LOOKING`], [`GLANCING`] or [`ASLEEP`].
    pace: AtomicU8,
}

/// Lines are held: the next look is after [`SWEEP`].
const LOOKING: u8 = 0;
/// None are held, but some were written since the look before: the next
/// look is after [`GLANCE`].
const GLANCING: u8 = 1;
/// None written since the look before: no look until a thread starts
/// gathering again and wakes the sweeper.
const ASLEEP: u8 = 2;

static SWEEPER: Sweeper = Sweeper {
    shelves: Mutex::new(Vec::new()),
    thread: OnceLock::new(),
    pace: AtomicU8::new(ASLEEP),
};

/// The sweeper thread. It looks every [`SWEEP`] while any thread holds
/// lines, every [`GLANCE`] while lines are written but handed over by
/// their threads, and sleeps once none has been written since its last
/// look: a sidecar whose threads park between requests never has it woken
/// on a request's way, and an idle one never has it woken at all.
fn sweep_forever() {
    let _ = SWEEPER.thread.set(std::thread::current());
    let Some(out) = OUT.get() else {
        return;
    };
    // Started by the first thread to gather a line, which has woken it.
    let mut pace = ASLEEP;
    loop {
        match pace {
            LOOKING => std::thread::sleep(SWEEP),
            GLANCING => std::thread::park_timeout(GLANCE),
            _ => {
                while SWEEPER.pace.load(Ordering::Acquire) == ASLEEP {
                    std::thread::park();
                }
                // Woken as a thread starts gathering: its lines are looked
                // at from the next interval on.
                std::thread::sleep(SWEEP);
            }
        }
        // Said before the shelves are looked at under their locks: a
        // thread that starts a line after the look, behind the same lock,
        // sees it and wakes the sweeper.
        SWEEPER.pace.store(ASLEEP, Ordering::Release);
        pace = sweep(&**out);
        if pace != ASLEEP {
            SWEEPER.pace.store(pace, Ordering::Release);
        }
    }
}

/// One look at every shelf: the lines of a thread that has started none
/// since the last look are handed over. Returns how to wait for the next
/// look. Shelves of threads that have ended are forgotten once empty.
fn sweep(out: &dyn Lines) -> u8 {
    let mut pace = ASLEEP;
    lock(&SWEEPER.shelves).retain(|shelf| {
        let mut gathered = lock(shelf);
        let quiet = gathered.started == gathered.swept;
        if gathered.lines > 0 && gathered.writing == 0 && quiet {
            let (bytes, lines) = gathered.take();
            out.lines(bytes, lines);
        }
        gathered.swept = gathered.started;
        let holds = !gathered.is_empty();
        if holds {
            pace = LOOKING;
        } else if !quiet {
            pace = pace.min(GLANCING);
        }
        holds || Arc::strong_count(shelf) > 1
    });
    pace
}

/// Wakes the sweeper if it sleeps, and starts it the first time: a
/// thread calls this as it starts a line with nothing gathered. (Started
/// only then, a sidecar that serves no HTTP has no sweeper.)
fn wake_sweeper() {
    if SWEEPER.pace.load(Ordering::Relaxed) != ASLEEP
        || SWEEPER
            .pace
            .compare_exchange(ASLEEP, GLANCING, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    if let Some(sweeper) = SWEEPER.thread.get() {
        sweeper.unpark();
        return;
    }
    static START: Once = Once::new();
    START.call_once(|| {
        let started = std::thread::Builder::new()
            .name("access-sweep".into())
            .spawn(sweep_forever);
        if let Err(e) = started {
            // The lines of a thread that never parks then wait for its
            // next line: late, never lost.
            tracing::warn!(error = %e, "starting the access log's sweeper thread");
        }
    });
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
            SHELF.with(|shelf| {
                shelf.get().map(|shelf| {
                    let mut gathered = lock(shelf);
                    let first = gathered.is_empty();
                    (gathered.buffer(now), first)
                })
            })
        });
        let (mut line, gathered) = match gathering {
            Some((buf, first)) => {
                if first {
                    wake_sweeper();
                }
                (buf, Some(now))
            }
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

    /// A string member of at most `max` bytes of `value` (cut at a
    /// character boundary, ending in `…`), followed, when it was cut, by
    /// `<key>_length`, the length of the whole value. What a caller
    /// chooses (a request's path) cannot make a line of any size: lines
    /// wait in a queue bounded by their number.
    pub fn member_up_to(&mut self, key: &str, value: &str, max: usize) {
        if value.len() <= max {
            return self.member(key, value);
        }
        let mut end = max;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        self.key(key);
        self.buf.push(b'"');
        escape_into(&mut self.buf, &value[..end]);
        self.buf.extend_from_slice("…\"".as_bytes());
        self.number(&[key, "_length"].concat(), value.len() as u64);
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
            SHELF.with(|shelf| {
                let Some(shelf) = shelf.get() else {
                    out.lines(line, 1);
                    return;
                };
                let mut gathered = lock(shelf);
                if let Some((bytes, lines)) = gathered.put_back(line, stamped) {
                    out.lines(bytes, lines);
                }
            });
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
            SHELF.with(|shelf| {
                if let Some(shelf) = shelf.get() {
                    lock(shelf).restore(buf);
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

    /// Waits until the sweeper has found nothing written and sleeps.
    fn until_the_sweeper_sleeps() {
        let waiting = std::time::Instant::now();
        while SWEEPER.pace.load(Ordering::Acquire) != ASLEEP {
            assert!(
                waiting.elapsed() < GLANCE + 3 * SWEEP + Duration::from_secs(10),
                "the sweeper never went to sleep"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A runtime thread under load may never park; its last lines must
    /// not wait for a next one.
    #[test]
    fn the_lines_of_a_thread_that_neither_parks_nor_writes_again_are_swept() {
        recorded();
        // The sweeper sleeps once it finds nothing gathered: the thread's
        // first line must wake it.
        until_the_sweeper_sleeps();
        std::thread::spawn(|| {
            hand_over();
            let now = SystemTime::now();
            request("/busy-a", now);
            request("/busy-b", now);
            assert!(batches("/busy-").is_empty(), "gathered at first");
            // Busy with other work from now on: no line, no park.
            let started = std::time::Instant::now();
            while batches("/busy-").is_empty() {
                assert!(
                    started.elapsed() < 3 * SWEEP + Duration::from_secs(10),
                    "the lines stayed with the thread"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(
                started.elapsed() >= SWEEP / 2,
                "swept only once the thread had been quiet a while"
            );
            // The thread goes on gathering after its lines were swept, and
            // its next lines come after them.
            request("/busy-c", now);
            hand_over();
            let paths = |names: &[&str]| names.iter().map(|p| p.to_string()).collect::<Vec<_>>();
            assert_eq!(
                batches("/busy-"),
                [
                    (paths(&["/busy-a", "/busy-b"]), 2),
                    (paths(&["/busy-c"]), 1)
                ]
            );
        })
        .join()
        .unwrap();
    }

    /// Blocking threads come and go, and each hands over as it stops.
    #[test]
    fn threads_that_have_ended_leave_no_shelf_behind_while_the_sweeper_sleeps() {
        recorded();
        until_the_sweeper_sleeps();
        let ended: Vec<_> = (0..20)
            .map(|_| {
                std::thread::spawn(|| {
                    hand_over();
                    SHELF.with(|shelf| Arc::downgrade(shelf.get().unwrap()))
                })
                .join()
                .unwrap()
            })
            .collect();
        let kept = ended
            .iter()
            .filter(|shelf| shelf.upgrade().is_some())
            .count();
        assert!(kept <= 1, "{kept} shelves of ended threads kept");
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
