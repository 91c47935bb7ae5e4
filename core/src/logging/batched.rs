//! A log stream (the access log on stdout, the sidecar's own log on
//! stderr) written by a thread of its own, in batches, so that a request
//! or a connection that logs costs no system call and never waits on the
//! disk or a slow log collector.
//!
//! Logging only moves the formatted line into a queue: no lock, and no
//! system call unless the writer thread sleeps waiting for a first line
//! after an idle spell. The thread writes everything queued, then rests
//! for [`FLUSH_INTERVAL`] while new lines gather, so a busy sidecar makes
//! one `write` per interval instead of one per line and a quiet one
//! writes each line at once. At most [`MAX_PENDING`] lines wait: beyond
//! that a line is dropped and counted (reported on the sidecar's log, at
//! most once per batch) rather than growing memory or holding up a
//! request. Dropping the [`Flush`] guard writes what is queued and stops
//! the thread.

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer thread lets lines gather after writing a batch.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(20);
/// Lines that may wait for the writer thread; more are dropped.
pub const MAX_PENDING: usize = 65_536;

/// The writer thread's batch buffer: one `write` holds this much.
const BATCH: usize = 64 * 1024;

/// Hands lines to a stream's writer thread; a [`MakeWriter`] for a layer
/// of the subscriber.
#[derive(Clone)]
pub struct Batched {
    lines: Sender<Lines>,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    pending: AtomicUsize,
    dropped: AtomicU64,
}

/// Writes what is queued and stops the writer thread when dropped.
pub struct Flush {
    lines: Sender<Lines>,
    thread: Option<JoinHandle<()>>,
}

impl Batched {
    /// Starts the thread `name` writing to `out`. Keep the [`Flush`] until
    /// exit.
    pub fn start<W: Write + Send + 'static>(name: &str, out: W) -> io::Result<(Batched, Flush)> {
        let (tx, rx) = mpsc::channel();
        let counts = Arc::new(Counts::default());
        let thread = std::thread::Builder::new()
            .name(name.into())
            .stack_size(64 * 1024)
            .spawn({
                let counts = counts.clone();
                move || write_batches(rx, out, &counts)
            })?;
        let writer = Batched {
            lines: tx.clone(),
            counts,
        };
        let flush = Flush {
            lines: tx,
            thread: Some(thread),
        };
        Ok((writer, flush))
    }

    /// Queues one line; an empty one is ignored (on the queue, an empty
    /// line is what tells the thread to stop).
    pub fn send(&self, line: Vec<u8>) {
        self.send_lines(line, 1);
    }

    /// Queues `count` whole lines gathered in one buffer, counted as that
    /// many against [`MAX_PENDING`] (all of them are dropped if they do
    /// not fit).
    pub fn send_lines(&self, bytes: Vec<u8>, count: usize) {
        if bytes.is_empty() || count == 0 {
            return;
        }
        if self.counts.pending.fetch_add(count, Ordering::Relaxed) + count > MAX_PENDING {
            self.counts.pending.fetch_sub(count, Ordering::Relaxed);
            self.counts
                .dropped
                .fetch_add(count as u64, Ordering::Relaxed);
            return;
        }
        if self.lines.send(Lines { bytes, count }).is_err() {
            // The thread is gone (exiting): nothing will write them.
            self.counts.pending.fetch_sub(count, Ordering::Relaxed);
        }
    }
}

/// What the queue carries: whole lines, and how many.
struct Lines {
    bytes: Vec<u8>,
    count: usize,
}

impl Drop for Flush {
    fn drop(&mut self) {
        let _ = self.lines.send(Lines {
            bytes: Vec::new(),
            count: 0,
        });
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_batches<W: Write>(lines: Receiver<Lines>, out: W, counts: &Counts) {
    let mut out = io::BufWriter::with_capacity(BATCH, out);
    let mut reported = 0;
    // Blocks only when nothing is queued: the first line after a quiet
    // spell is written at once.
    while let Ok(first) = lines.recv() {
        let mut stop = first.bytes.is_empty();
        let mut written = first.count;
        let _ = out.write_all(&first.bytes);
        while !stop {
            match lines.try_recv() {
                Ok(next) if next.bytes.is_empty() => stop = true,
                Ok(next) => {
                    written += next.count;
                    let _ = out.write_all(&next.bytes);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => stop = true,
            }
        }
        if let Err(e) = out.flush() {
            tracing::warn!(error = %e, "writing a log stream");
        }
        // Counted as pending until written: the bound covers the batch.
        counts.pending.fetch_sub(written, Ordering::Relaxed);
        let dropped = counts.dropped.load(Ordering::Relaxed);
        if dropped != reported {
            tracing::warn!(
                dropped_total = dropped,
                "log lines dropped: their output is not keeping up"
            );
            reported = dropped;
        }
        if stop {
            return;
        }
        std::thread::sleep(FLUSH_INTERVAL);
    }
}

/// One event's output, sent as one line when the formatter is done.
pub struct Line<'a> {
    to: &'a Batched,
    bytes: Vec<u8>,
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        self.to.send(std::mem::take(&mut self.bytes));
    }
}

impl<'a> MakeWriter<'a> for Batched {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            to: self,
            bytes: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// An in-memory stdout that also counts the `write` calls reaching it.
    #[derive(Clone, Default)]
    struct Recorded(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Recorded {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut r = self.0.lock().unwrap();
            r.0.extend_from_slice(buf);
            r.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A stdout that accepts no byte until released, then records them.
    struct Stuck(Arc<Mutex<()>>, Recorded);

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            drop(self.0.lock().unwrap());
            self.1.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn line(w: &Batched, text: &str) {
        let mut l = w.make_writer();
        l.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn every_line_is_written_whole_and_in_order_by_the_time_flush_returns() {
        let out = Recorded::default();
        let (w, flush) = Batched::start("test", out.clone()).unwrap();
        let mut expected = String::new();
        for i in 0..5_000 {
            let text = format!("{{\"n\":{i}}}\n");
            line(&w, &text);
            expected.push_str(&text);
        }
        drop(flush);
        let (bytes, writes) = out.0.lock().unwrap().clone();
        assert_eq!(String::from_utf8(bytes).unwrap(), expected);
        assert!(
            writes < 5_000,
            "lines must reach stdout in batches, not one write each ({writes} writes)"
        );
    }

    #[test]
    fn an_empty_line_is_ignored_and_does_not_stop_the_writer() {
        let out = Recorded::default();
        let (w, flush) = Batched::start("test", out.clone()).unwrap();
        w.send(Vec::new());
        line(&w, "after\n");
        drop(flush);
        assert_eq!(out.0.lock().unwrap().0, b"after\n");
    }

    #[test]
    fn a_line_on_a_quiet_sidecar_is_written_without_waiting_for_more() {
        let out = Recorded::default();
        let (w, _flush) = Batched::start("test", out.clone()).unwrap();
        line(&w, "one\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while out.0.lock().unwrap().0.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the line never reached stdout"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(out.0.lock().unwrap().0, b"one\n");
    }

    #[test]
    fn lines_beyond_the_bound_are_dropped_and_counted_not_queued() {
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let (w, flush) = Batched::start("test", Stuck(gate.clone(), Recorded::default())).unwrap();
        // Lines the thread took stay counted until written, so exactly
        // the bound is held whether they wait in the queue or its batch.
        for _ in 0..MAX_PENDING + 100 {
            line(&w, "x\n");
        }
        assert_eq!(w.counts.dropped.load(Ordering::Relaxed), 100);
        assert_eq!(w.counts.pending.load(Ordering::Relaxed), MAX_PENDING);
        drop(held);
        drop(flush);
        assert_eq!(w.counts.pending.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn gathered_lines_count_as_lines_against_the_bound() {
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let out = Recorded::default();
        let (w, flush) = Batched::start("test", Stuck(gate.clone(), out.clone())).unwrap();
        w.send_lines(b"a\nb\nc\n".to_vec(), 3);
        for _ in 0..MAX_PENDING - 4 {
            line(&w, "x\n");
        }
        // One place is left: two lines gathered together do not fit, and
        // are dropped together.
        w.send_lines(b"d\ne\n".to_vec(), 2);
        assert_eq!(w.counts.dropped.load(Ordering::Relaxed), 2);
        w.send_lines(b"f\n".to_vec(), 1);
        assert_eq!(w.counts.pending.load(Ordering::Relaxed), MAX_PENDING);
        drop(held);
        drop(flush);
        assert_eq!(w.counts.pending.load(Ordering::Relaxed), 0);
        let written = out.0.lock().unwrap().0.clone();
        assert!(written.starts_with(b"a\nb\nc\nx\n") && written.ends_with(b"x\nf\n"));
        assert_eq!(written.len(), 2 * MAX_PENDING);
    }
}
