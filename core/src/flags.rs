//! Where each flag's value came from: the command line, or the flag's
//! environment twin (`TRELLIS_DRAIN_TIMEOUT` for `--drain-timeout`). A
//! value refused from the twin is said naming the variable as well as the
//! flag: the operator did not type the flag and would look for it on the
//! command line in vain (a pod's env, a unit file or a shell's profile set
//! it). clap's own refusals are said by
//! [`environment_refusal`](crate::escape::environment_refusal); those of a
//! program's own checks, after clap took the flags, by [`Given`]: each
//! check names every flag it speaks of with [`FlagNames::name`] (or through
//! [`FlagNames`]) as it writes its words, never by rewriting them after.
//! Every binary (`trellis-proxy`, `trellis-control-plane`, `trellisctl`)
//! says them so.

use std::ffi::OsString;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};

/// Flags as clap took them, with where each value came from.
pub struct Given {
    command: clap::Command,
    matches: ArgMatches,
}

impl Given {
    /// `args` (argv, the program name first) parsed into `P`, with where
    /// each value came from; or clap's refusal.
    pub fn parse<P: CommandFactory + FromArgMatches>(
        args: &[OsString],
    ) -> Result<(P, Given), clap::Error> {
        let mut command = P::command();
        let matches = command.try_get_matches_from_mut(args)?;
        let parsed = P::from_arg_matches(&matches).map_err(|e| e.format(&mut command))?;
        Ok((parsed, Given { command, matches }))
    }

    /// `matches` that `command` took (itself changed as the program needed,
    /// an environment variable left unread), with where each came from.
    pub fn new(command: clap::Command, matches: ArgMatches) -> Given {
        Given { command, matches }
    }

    /// The environment variable the value of `--flag` (`flag` without its
    /// dashes, of the program or of the subcommand run) was read from, if
    /// it was not given on the command line.
    pub fn twin(&self, flag: &str) -> Option<String> {
        let (mut command, mut matches) = (&self.command, &self.matches);
        loop {
            if let Some(arg) = (command.get_arguments()).find(|arg| arg.get_long() == Some(flag)) {
                let twin = arg.get_env()?;
                let id = arg.get_id().as_str();
                let from_env = matches.try_contains_id(id).unwrap_or(false)
                    && matches.value_source(id) == Some(ValueSource::EnvVariable);
                return from_env.then(|| twin.to_string_lossy().into_owned());
            }
            let (name, sub) = matches.subcommand()?;
            command = command.find_subcommand(name)?;
            matches = sub;
        }
    }

    /// The refusal of the value of `--flag` for `reason`: `invalid --flag:
    /// REASON`, or `invalid value in TRELLIS_FLAG (--flag): REASON` when it
    /// came from that variable, as clap's refusals say it. `reason` is said
    /// as it is: any other flag it names was named by [`FlagNames::name`]
    /// where it was written.
    pub fn refused(&self, flag: &str, reason: impl std::fmt::Display) -> String {
        match self.twin(flag) {
            Some(twin) => format!("invalid value in {twin} (--{flag}): {reason}"),
            None => format!("invalid --{flag}: {reason}"),
        }
    }
}

/// How a refusal names a flag (`flag` without its dashes). The words are
/// made where the refusal is: a value quoted in it (a path, a URL) is never
/// read back for flags.
pub trait FlagNames {
    /// `--flag`, or how the operator gave it.
    fn name(&self, flag: &str) -> String;
}

/// Names `--flag` so, or as `TRELLIS_FLAG (--flag)` when its value came
/// from that variable.
impl FlagNames for Given {
    fn name(&self, flag: &str) -> String {
        match self.twin(flag) {
            Some(twin) => format!("{twin} (--{flag})"),
            None => format!("--{flag}"),
        }
    }
}

/// Every flag named as typed, `--flag`: for a check run with no [`Given`]
/// (a library caller or a test that built the values itself), where no
/// value came from an environment variable.
pub struct AsTyped;

impl FlagNames for AsTyped {
    fn name(&self, flag: &str) -> String {
        format!("--{flag}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `PATH` is set wherever tests run: a flag reading it has a value
    /// from the environment without the test setting one.
    #[derive(clap::Parser)]
    struct Flags {
        #[arg(long, env = "PATH")]
        timeout: Option<String>,
        #[arg(long, env = "TRELLIS_FLAGS_TEST_UNSET")]
        idle: Option<String>,
    }

    #[test]
    fn flags_from_the_environment_are_named_with_their_variable() {
        let args: Vec<OsString> = ["x", "--idle", "5s"].iter().map(Into::into).collect();
        let (_, given) = Given::parse::<Flags>(&args).unwrap();
        assert_eq!(given.name("idle"), "--idle");
        assert_eq!(given.name("timeout"), "PATH (--timeout)");
        assert_eq!(
            given.refused(
                "idle",
                format!("5s is longer than {} 1s", given.name("timeout"))
            ),
            "invalid --idle: 5s is longer than PATH (--timeout) 1s"
        );
        // A value quoted in the reason is said as it is.
        assert_eq!(
            given.refused("idle", "/etc/--timeout/x is missing"),
            "invalid --idle: /etc/--timeout/x is missing"
        );
        assert_eq!(
            given.refused("timeout", "too long"),
            "invalid value in PATH (--timeout): too long"
        );
        let args: Vec<OsString> = ["x", "--timeout=1s"].iter().map(Into::into).collect();
        let (_, given) = Given::parse::<Flags>(&args).unwrap();
        assert_eq!(given.name("timeout"), "--timeout");
        assert_eq!(AsTyped.name("timeout"), "--timeout");
    }
}
