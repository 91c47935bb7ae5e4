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
