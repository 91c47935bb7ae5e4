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
