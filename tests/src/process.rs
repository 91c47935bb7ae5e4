//! Child processes the harness owns: output captured to a log file that tests
//! can search, and a teardown that always runs (SIGTERM, then SIGKILL after a
//! grace period), also when a test panics.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustix::process::{Pid, Signal, kill_process};

use crate::patience::eventually;

/// How long a child gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running child whose stdout and stderr both go to one log file.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
    tail_on_drop: bool,
}

impl ChildProcess {
    /// Starts `command` with its output appended to `log` (created if absent,
    /// so a restarted program keeps one log).
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> anyhow::Result<ChildProcess> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open log file {}", log.display()))?;
        let err = out.try_clone()?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", command.get_program()))?;
        Ok(ChildProcess {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            exited: None,
            tail_on_drop: true,
        })
    }

    /// Whether dropping the handle prints the end of the log to stderr (the
    /// default: libtest shows it only for a failing test). Always printed
    /// when dropped by a panic.
    pub fn set_tail_on_drop(&mut self, on: bool) {
        self.tail_on_drop = on;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the child has written so far, without terminal colour
    /// codes (so `peer=...` matches however the program styles its fields).
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|bytes| strip_ansi(&String::from_utf8_lossy(&bytes)))
            .unwrap_or_default()
    }

    /// The last `n` lines of the log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The exit status if the child has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Fails, with the end of the log, if the child has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.try_exit_status() {
            None => Ok(()),
            Some(status) => anyhow::bail!(
                "{} exited ({status}); the end of its log ({}):\n{}",
                self.name,
                self.log.display(),
                self.log_tail(30)
            ),
        }
    }

    /// Fails unless this child itself listens on `addr`: a port another
    /// process took between the harness choosing it and the child binding
    /// it answers too, but from the wrong program (the child then exits,
    /// unable to bind it).
    pub fn ensure_listening(&self, addr: SocketAddr) -> anyhow::Result<()> {
        let listening = crate::sockets::listening(self.pid())
            .with_context(|| format!("cannot list the sockets of {}", self.name))?;
        anyhow::ensure!(
            listening.contains(&addr),
            "{addr} answers, but {} does not listen on it (yet)",
            self.name
        );
        Ok(())
    }

    /// Waits until the log contains `needle` and returns the first line that
    /// contains it. Fails early if the child exits first.
    pub async fn wait_for_log(
        &mut self,
        needle: &str,
        patience: Duration,
    ) -> anyhow::Result<String> {
        let what = format!("{} to log {needle:?}", self.name);
        eventually(&what, patience, || {
            let found = self
                .log()
                .lines()
                .find(|line| line.contains(needle))
                .map(str::to_string);
            let exited = self.try_exit_status();
            let result = match (found, exited) {
                (Some(line), _) => Ok(line),
                (None, Some(status)) => Err(anyhow::anyhow!("it exited ({status})")),
                (None, None) => Err(anyhow::anyhow!("not yet")),
            };
            std::future::ready(result)
        })
        .await
        .with_context(|| {
            format!(
                "the end of the log of {}:\n{}",
                self.name,
                self.log_tail(30)
            )
        })
    }

    /// Sends a signal unless the child has already exited.
    pub fn signal(&mut self, signal: Signal) -> anyhow::Result<()> {
        if self.try_exit_status().is_some() {
            return Ok(());
        }
        kill_process(Pid::from_child(&self.child), signal)
            .with_context(|| format!("cannot signal {}", self.name))
    }

    /// SIGTERM, then SIGKILL if the child is still running after `grace`.
    /// Returns how it exited. Blocking: it is also the `Drop` path.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_exit_status() {
            return Ok(status);
        }
        self.signal(Signal::TERM)?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_exit_status() {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let status = self.child.wait()?;
        self.exited = Some(status);
        Ok(status)
    }
}

/// `text` without ANSI escape sequences (`ESC [ ... final-byte`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.stop(STOP_GRACE);
        if self.tail_on_drop || std::thread::panicking() {
            // If the test failed, what the child said is the best clue.
            eprintln!(
                "--- the end of the log of {} ({}) ---\n{}\n---",
                self.name,
                self.log.display(),
                self.log_tail(40)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::strip_ansi;

    #[test]
    fn strips_colour_codes() {
        let styled = "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[3mpeer\u{1b}[0m\u{1b}[2m=\u{1b}[0mspiffe://td/ns/a/sa/b";
        assert_eq!(strip_ansi(styled), "2026  INFO peer=spiffe://td/ns/a/sa/b");
    }
}
