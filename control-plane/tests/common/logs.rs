//! What code under test logs in the test's own process (a store, a
//! reviewer), as the control plane's subscriber writes it in text without
//! colours, captured on the test's thread: a current-thread runtime's
//! tasks log there too.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tracing::subscriber::DefaultGuard;

/// What was logged while the guard [`capture`] returned was alive.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).expect("UTF-8 logs")
    }

    /// The WARN lines holding `containing`.
    pub fn warnings(&self, containing: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(" WARN ") && l.contains(containing))
            .map(str::to_owned)
            .collect()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures what this thread logs until the guard is dropped.
pub fn capture() -> (Logs, DefaultGuard) {
    let logs = Logs::default();
    let writer = logs.clone();
    let guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    );
    (logs, guard)
}
