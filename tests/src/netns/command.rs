//! Running short commands to the end: their output, or an error that
//! quotes what they printed. Never leaves a process behind (a command that
//! outlives its timeout is killed).

use std::ffi::{OsStr, OsString};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, ensure};

use super::COMMAND_TIMEOUT;
use crate::binaries::{Launcher, Program};
use crate::patience::patience;

pub(super) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a short command to the end; fails with its stderr unless it exits 0.
pub(super) fn run_ok(command: &mut Command) -> anyhow::Result<Output> {
    let shown = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    ensure!(
        output.status.success(),
        "{shown} failed ({}): {}{}",
        output.status,
        text(&output.stderr),
        text(&output.stdout)
    );
    Ok(output)
}

/// Runs a command to the end without blocking the runtime, killed after
/// `COMMAND_TIMEOUT`; returns its output whatever its exit status.
pub async fn output(command: Command) -> anyhow::Result<Output> {
    let shown = format!("{command:?}");
    let run = tokio::process::Command::from(command)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(patience(COMMAND_TIMEOUT), run)
        .await
        .with_context(|| format!("{shown} did not finish"))?
        .with_context(|| format!("cannot run {shown}"))
}

/// The program and leading arguments that run `program` with `launcher`.
pub(super) fn program_argv(launcher: &Launcher, program: Program) -> Vec<OsString> {
    let command = launcher.command(program);
    std::iter::once(command.get_program().to_owned())
        .chain(command.get_args().map(OsStr::to_owned))
        .collect()
}
