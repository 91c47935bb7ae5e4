//! Text that Trellis's programs print but did not write themselves (a path
//! or a value the operator gave, a name from a certificate, what the
//! control plane sent), made safe for a terminal. Every error or
//! diagnostic of `trellis-control-plane`, `trellisctl` and `trellis-proxy`
//! that says such text back goes through here: none may write a control
//! character to the operator's terminal.

use std::path::Path;

/// A path as errors name it: [`escape_controls`] of its text.
pub fn shown(path: &Path) -> String {
    escape_controls(&path.display().to_string())
}

/// `e` with what the user gave that it quotes (a refused value, an unknown
/// argument or subcommand) shown with its control characters escaped
/// ([`escape_controls`]): clap prints them as given, and a value may come
/// from a script or a copied manifest. Nothing else of clap's text changes.
/// Every binary's flag errors go through it.
pub fn escape_given(mut e: clap::Error) -> clap::Error {
    use clap::builder::StyledStr;
    use clap::error::{ContextKind, ContextValue};
    let mut given = Vec::new();
    for kind in [
        ContextKind::InvalidValue,
        ContextKind::InvalidArg,
        ContextKind::InvalidSubcommand,
    ] {
        if let Some(ContextValue::String(raw)) = e.get(kind) {
            let escaped = escape_controls(raw);
            if escaped != *raw {
                given.push((raw.clone(), escaped.clone()));
                e.insert(kind, ContextValue::String(escaped));
            }
        }
    }
    // The tips (`to pass '...' as a value, use '-- ...'`) quote it too.
    if let Some(ContextValue::StyledStrs(tips)) = e.get(ContextKind::Suggested) {
        let tips = tips
            .iter()
            .map(|tip| {
                let mut text = tip.ansi().to_string();
                for (raw, escaped) in &given {
                    text = text.replace(raw.as_str(), escaped);
                }
                StyledStr::from(text)
            })
            .collect();
        e.insert(ContextKind::Suggested, ContextValue::StyledStrs(tips));
    }
    e
}

/// What to say instead of `e` when the value it refuses came from a flag's
/// environment twin (`TRELLIS_CERT_TTL` for `--cert-ttl`), not from `args`,
/// the command line of `command`: clap names the flag alone, which the
/// operator did not give and would look for on the command line in vain.
/// The words name both, as `invalid value 'abc' in TRELLIS_CERT_TTL
/// (--cert-ttl): ...` and then the value parser's reason or the values
/// allowed, the value escaped ([`escape_controls`]). `None` for any other
/// error, or a value given on the command line.
///
/// Use it for the refusals clap makes while taking the flags; a program's
/// own checks, run on the values clap took, name each flag with
/// [`FlagNames::name`](crate::flags::FlagNames::name) instead (the rule of
/// [`flags`](crate::flags)).
pub fn environment_refusal(
    e: &clap::Error,
    command: &clap::Command,
    args: &[std::ffi::OsString],
) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return None;
    }
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        e.get(ContextKind::InvalidArg),
        e.get(ContextKind::InvalidValue),
    ) else {
        return None;
    };
    let long = arg.split_whitespace().next()?.strip_prefix("--")?;
    let flag = flag_named(command, long)?;
    let twin = flag.get_env()?;
    let set = std::env::var_os(twin)?;
    let set = set.to_string_lossy();
    // A list flag's value is refused an element at a time.
    let from_twin = *set == **value
        || (flag
            .get_value_delimiter()
            .is_some_and(|d| set.split(d).any(|v| v == value)));
    if !from_twin || given_on(args, long, flag.get_short()) {
        return None;
    }
    let why = match e.kind() {
        ErrorKind::InvalidValue => match e.get(ContextKind::ValidValue) {
            Some(ContextValue::Strings(allowed)) => {
                format!("possible values: {}", allowed.join(", "))
            }
            _ => "not a value it takes".to_owned(),
        },
        _ => std::error::Error::source(e).map_or_else(String::new, |why| why.to_string()),
    };
    Some(format!(
        "invalid value '{}' in {} (--{long}): {why}",
        escape_controls(value),
        twin.to_string_lossy()
    ))
}

/// The flag `--long` of `command` or of any of its subcommands that has an
/// environment twin.
fn flag_named<'a>(command: &'a clap::Command, long: &str) -> Option<&'a clap::Arg> {
    (command.get_arguments())
        .find(|arg| arg.get_long() == Some(long) && arg.get_env().is_some())
        .or_else(|| (command.get_subcommands()).find_map(|sub| flag_named(sub, long)))
}

/// Whether `args` give the flag `--long` (or `-short`) a value themselves.
fn given_on(args: &[std::ffi::OsString], long: &str, short: Option<char>) -> bool {
    let short = short.map(|c| format!("-{c}"));
    args.iter().skip(1).map(|a| a.to_string_lossy()).any(|a| {
        let a = a.as_ref();
        a.strip_prefix("--")
            .is_some_and(|rest| rest == long || rest.starts_with(&format!("{long}=")))
            || short
                .as_deref()
                .is_some_and(|s| !a.starts_with("--") && a.starts_with(s))
    })
}

/// `text` with its control characters, and those that reorder text
/// (bidirectional overrides and isolates), escaped as Rust writes them
/// (`\u{1b}`, `\n`); any other character as it is. Every text `trellisctl`
/// prints that it did not write itself, what the user gave or what the
/// control plane sent (names, SPIFFE IDs, messages, warnings), goes through
/// it, so none can drive the terminal; `-o json` output is JSON as
/// serialized.
pub fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            c if c.is_control() => out.extend(c.escape_debug()),
            '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                out.extend(c.escape_unicode())
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_reordering_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(
            escape_controls("\u{1b}[31mx\nd\u{e9}j\u{e0} \u{202e}"),
            "\\u{1b}[31mx\\nd\u{e9}j\u{e0} \\u{202e}"
        );
        assert_eq!(shown(Path::new("/tmp/\u{1b}[31mx")), "/tmp/\\u{1b}[31mx");
    }
}
