//! Where the Trellis programs come from: the real binaries beside the running
//! executable (tests), or the running executable itself (the demo).
//!
//! This module only builds `Command`s; it never starts anything.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// One of the programs the harness runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    ControlPlane,
    Ctl,
    Proxy,
}

impl Program {
    pub const ALL: [Program; 3] = [Program::ControlPlane, Program::Ctl, Program::Proxy];

    /// The binary's file name (without the platform suffix).
    pub fn binary_name(self) -> &'static str {
        match self {
            Program::ControlPlane => "trellis-control-plane",
            Program::Ctl => "trellisctl",
            Program::Proxy => "trellis-proxy",
        }
    }

    /// The workspace packages whose sources the binary is built from.
    fn source_dirs(self) -> &'static [&'static str] {
        match self {
            Program::ControlPlane | Program::Ctl => {
                &["control-plane/src", "core/src", "proto/src", "proto/proto"]
            }
            Program::Proxy => &["proxy/src", "core/src", "proto/src", "proto/proto"],
        }
    }

    /// The hidden first argument that makes a self-executing binary (the
    /// demo) run this program instead of itself.
    pub fn self_exec_arg(self) -> &'static str {
        match self {
            Program::ControlPlane => "__trellis-control-plane",
            Program::Ctl => "__trellisctl",
            Program::Proxy => "__trellis-proxy",
        }
    }

    /// The program a hidden first argument names, if it names one.
    pub fn from_self_exec_arg(arg: &OsStr) -> Option<Program> {
        Program::ALL
            .into_iter()
            .find(|p| OsStr::new(p.self_exec_arg()) == arg)
    }
}

/// How the harness runs a [`Program`].
#[derive(Clone, Debug)]
pub enum Launcher {
    /// Real binaries in this directory (`target/<profile>/`).
    Binaries(PathBuf),
    /// This executable with the program's hidden first argument; its `main`
    /// must dispatch on [`Program::from_self_exec_arg`].
    SelfExec(PathBuf),
}

impl Launcher {
    /// The workspace binaries beside the running executable. A test
    /// executable lives in `target/<profile>/deps/`, the binaries one level up.
    /// `TRELLIS_BIN_DIR` overrides the directory.
    ///
    /// Fails, naming the binary and how to build it, when one is missing or
    /// older than a source file it is built from (`cargo test -p
    /// trellis-tests` does not rebuild the other packages' binaries, and a
    /// test must not pass or fail against yesterday's code).
    pub fn from_build_dir() -> anyhow::Result<Launcher> {
        let (dir, check_fresh) = match std::env::var_os("TRELLIS_BIN_DIR") {
            Some(dir) => (PathBuf::from(dir), false),
            None => (build_dir()?, true),
        };
        for program in Program::ALL {
            let path = binary_path(&dir, program);
            if !path.is_file() {
                bail!(
                    "the binary `{}` was not found at {}; build it with `cargo build --workspace` \
                     (or set TRELLIS_BIN_DIR to the directory that holds it)",
                    program.binary_name(),
                    path.display()
                );
            }
            if let Some(source) = check_fresh.then(|| newer_source(&path, program)).flatten() {
                bail!(
                    "the binary `{}` at {} is older than {}; rebuild it with \
                     `cargo build --workspace` (or run `cargo test --workspace`)",
                    program.binary_name(),
                    path.display(),
                    source.display()
                );
            }
        }
        Ok(Launcher::Binaries(dir))
    }

    /// The running executable, re-executed with a hidden first argument.
    pub fn self_exec() -> anyhow::Result<Launcher> {
        let exe = std::env::current_exe().context("cannot find the running executable")?;
        Ok(Launcher::SelfExec(exe))
    }

    /// A command that runs `program`; the caller adds its arguments.
    pub fn command(&self, program: Program) -> Command {
        match self {
            Launcher::Binaries(dir) => Command::new(binary_path(dir, program)),
            Launcher::SelfExec(exe) => {
                let mut command = Command::new(exe);
                command.arg(program.self_exec_arg());
                command
            }
        }
    }

    /// The executable of `program`, when it runs from one of its own.
    pub fn executable(&self, program: Program) -> Option<PathBuf> {
        match self {
            Launcher::Binaries(dir) => Some(binary_path(dir, program)),
            Launcher::SelfExec(_) => None,
        }
    }

    /// How a person would run `program` by hand, for printed instructions.
    pub fn describe(&self, program: Program) -> String {
        match self {
            Launcher::Binaries(dir) => binary_path(dir, program).display().to_string(),
            Launcher::SelfExec(exe) => format!("{} {}", exe.display(), program.self_exec_arg()),
        }
    }
}

fn build_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let mut dir = exe
        .parent()
        .context("the running executable has no parent directory")?;
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir = dir.parent().unwrap_or(dir);
    }
    Ok(dir.to_path_buf())
}

/// A source file of the workspace (where this crate was compiled) that
/// changed after `binary` was built, if any. Without the sources (the tests
/// run elsewhere) nothing is reported.
fn newer_source(binary: &Path, program: Program) -> Option<PathBuf> {
    let built = std::fs::metadata(binary).and_then(|m| m.modified()).ok()?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    program
        .source_dirs()
        .iter()
        .find_map(|dir| newer_file(&workspace.join(dir), built))
}

fn newer_file(dir: &Path, than: std::time::SystemTime) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.filter_map(Result::ok) {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() && entry.file_name() != "target" {
            if let Some(found) = newer_file(&path, than) {
                return Some(found);
            }
        } else if kind.is_file() && is_source(&path) {
            let modified = entry.metadata().and_then(|m| m.modified());
            if modified.is_ok_and(|m| m > than) {
                return Some(path);
            }
        }
    }
    None
}

fn is_source(path: &Path) -> bool {
    matches!(
        path.extension().and_then(OsStr::to_str),
        Some("rs" | "proto" | "toml")
    )
}

fn binary_path(dir: &Path, program: Program) -> PathBuf {
    dir.join(format!(
        "{}{}",
        program.binary_name(),
        std::env::consts::EXE_SUFFIX
    ))
}
