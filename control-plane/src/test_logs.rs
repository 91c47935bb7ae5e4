//! The lines code under test logs, formatted as the control plane's own
//! subscriber formats them (text without colours, or JSON), captured on
//! the test's thread.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tracing::subscriber::DefaultGuard;

/// What was logged while the guard [`capture`] returned was alive.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().expect("not poisoned").clone()).expect("UTF-8 logs")
    }

    /// The text lines holding `message` with the field `reason="REASON"`,
    /// as the throttled warnings of failed handshakes are logged.
    fn reason_lines(&self, message: &str, reason: &str) -> Vec<String> {
        let reason = format!("reason=\"{reason}\"");
        self.text()
            .lines()
            .filter(|l| l.contains(message) && l.contains(&reason))
            .map(str::to_string)
            .collect()
    }

    /// Asserts that each of `reasons` was logged once under `message`, as
    /// the first of a reason's throttled warnings is: a warning naming the
    /// peer (on loopback), with no count of lines suppressed. Returns those
    /// lines, in the order of `reasons`.
    pub fn assert_first_warnings(&self, message: &str, reasons: &[&str]) -> Vec<String> {
        reasons
            .iter()
            .map(|reason| {
                let mut lines = self.reason_lines(message, reason);
                assert_eq!(lines.len(), 1, "one line for {reason}: {lines:#?}");
                let line = lines.remove(0);
                assert!(line.contains("WARN"), "{line}");
                assert!(line.contains("peer=127.0.0.1:"), "{line}");
                assert!(!line.contains("suppressed"), "{line}");
                line
            })
            .collect()
    }

    /// Asserts what a port with connection limits logs after refusing
    /// connections from 127.0.0.1 past its per-address limit of
    /// `per_client`, then one from 127.0.0.2 with all `total` slots taken:
    /// one throttled warning for each limit, naming the client and the
    /// limit it met.
    pub fn assert_limit_refusals(&self, message: &str, per_client: usize, total: usize) {
        let [from_client] = &self.assert_first_warnings(message, &["per_client"])[..] else {
            unreachable!("one line a reason");
        };
        assert!(
            from_client.contains(&format!(
                "{per_client} connections are open from this address already"
            )),
            "the line names the limit: {from_client}"
        );
        let lines = self.reason_lines(message, "total");
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains("WARN")
                && lines[0].contains("peer=127.0.0.2:")
                && lines[0].contains(&format!("{total} connections are open already")),
            "{}",
            lines[0]
        );
    }

    /// Asserts that `reason` was logged twice under `message`, the second
    /// line saying `suppressed` lines were not logged between them: what a
    /// throttled warning writes once its pause has passed.
    pub fn assert_next_warning(&self, message: &str, reason: &str, suppressed: usize) {
        let lines = self.reason_lines(message, reason);
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            lines[1].contains(&format!("suppressed={suppressed}")),
            "{}",
            lines[1]
        );
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures what this thread logs (`json`: as JSON lines) until the guard
/// is dropped. A current-thread runtime's tasks log on the test's thread.
pub fn capture(json: bool) -> (Captured, DefaultGuard) {
    let captured = Captured::default();
    let writer = {
        let captured = captured.clone();
        move || captured.clone()
    };
    let guard = if json {
        tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .json()
                .with_writer(writer)
                .finish(),
        )
    } else {
        tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(writer)
                .finish(),
        )
    };
    (captured, guard)
}
