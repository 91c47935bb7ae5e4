//! Where each flag's value came from: the command line, or the flag's
//! environment twin (`TRELLIS_DRAIN_TIMEOUT` for `--drain-timeout`). A
//! value refused from the twin is said naming the variable as well as the
//! flag: the operator did not type the flag and would look for it on the
//! command line in vain (a pod's env, a unit file or a shell's profile set
//! it). clap's own refusals are said by
//! [`trellis_core::escape::environment_refusal`], as the control plane's
//! and trellisctl's are; those of the sidecar's own checks, and of
//! `trellis-proxy init`'s, by [`Given`].

use std::ffi::OsString;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};

use super::{Cli, InvalidFlag};

/// Parsed flags with where each came from.
pub struct Given {
    command: clap::Command,
    matches: ArgMatches,
}

impl Given {
    /// `args` (argv, the program name first) parsed into a [`Cli`], with
    /// where each value came from; or clap's refusal.
    pub fn parse(args: &[OsString]) -> Result<(Cli, Given), clap::Error> {
        let mut command = Cli::command();
        let matches = command.try_get_matches_from_mut(args)?;
        let cli = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut command))?;
        Ok((cli, Given { command, matches }))
    }

    /// The environment variable the value of `--flag` (`flag` without its
    /// dashes, of the sidecar or of the subcommand run) was read from, if it
    /// was not given on the command line.
    fn twin(&self, flag: &str) -> Option<String> {
        let (mut command, mut matches) = (&self.command, &self.matches);
        loop {
            if let Some(arg) = (command.get_arguments()).find(|arg| arg.get_long() == Some(flag)) {
                let twin = arg.get_env()?;
                return (matches.value_source(arg.get_id().as_str())
                    == Some(ValueSource::EnvVariable))
                .then(|| twin.to_string_lossy().into_owned());
            }
            let (name, sub) = matches.subcommand()?;
            command = command.find_subcommand(name)?;
            matches = sub;
        }
    }

    /// How an error names `--flag`: so, or as `TRELLIS_FLAG (--flag)` when
    /// its value came from that variable.
    pub fn name(&self, flag: &str) -> String {
        match self.twin(flag) {
            Some(twin) => format!("{twin} (--{flag})"),
            None => format!("--{flag}"),
        }
    }

    /// The refusal of the value of `--flag` for `reason`: `invalid --flag:
    /// REASON`, or `invalid value in TRELLIS_FLAG (--flag): REASON` when it
    /// came from that variable.
    pub fn refused(&self, flag: &str, reason: impl std::fmt::Display) -> String {
        match self.twin(flag) {
            Some(twin) => format!("invalid value in {twin} (--{flag}): {reason}"),
            None => format!("invalid --{flag}: {reason}"),
        }
    }

    /// What to say of `e`, a sidecar's flag refused by its own checks.
    pub fn refusal(&self, e: &InvalidFlag) -> String {
        self.refused(e.flag, &e.reason)
    }
}
