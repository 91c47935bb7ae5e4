//! The README names every `trellis-proxy-error` token a sidecar writes, and
//! none it does not: a client matching on a token reads them there.

use std::collections::BTreeSet;

use trellis_core::refusal::token;

/// Where the README's paragraph on a sidecar's own answers begins listing
/// the tokens, and the sentence after the last one it explains.
const LIST_STARTS: &str = "a fixed token:";
const LIST_ENDS: &str = "The token stays coarse";

/// Token-like words the listing names that are not tokens: the outbound
/// policy a `denied` call was refused under.
const NOT_TOKENS: &[&str] = &["deny"];

/// The README's text from [`LIST_STARTS`] to [`LIST_ENDS`], its lines
/// joined with spaces (a backticked word may be wrapped).
fn listing(readme: &str) -> String {
    let text = readme.split_whitespace().collect::<Vec<_>>().join(" ");
    let start = text
        .find(LIST_STARTS)
        .unwrap_or_else(|| panic!("README.md no longer says {LIST_STARTS:?}"));
    let rest = &text[start..];
    let end = rest
        .find(LIST_ENDS)
        .unwrap_or_else(|| panic!("README.md no longer says {LIST_ENDS:?} after the tokens"));
    rest[..end].to_owned()
}

/// The backticked words of `text` that read as a token: lowercase letters,
/// digits and underscores (not `/ready`, `GET` or a quoted answer).
fn token_words(text: &str) -> BTreeSet<&str> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| w.starts_with(|c: char| c.is_ascii_lowercase()))
        .filter(|w| {
            w.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .collect()
}

#[test]
fn readme_names_every_proxy_error_token_and_no_other() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("reading README.md");
    let listing = listing(&readme);
    let named: BTreeSet<&str> = token_words(&listing)
        .into_iter()
        .filter(|w| !NOT_TOKENS.contains(w))
        .collect();
    let all: BTreeSet<&str> = token::ALL.iter().copied().collect();
    assert_eq!(all.len(), token::ALL.len(), "a token is in ALL twice");

    let missing: Vec<_> = all.difference(&named).collect();
    let unknown: Vec<_> = named.difference(&all).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "README.md's trellis-proxy-error tokens differ from refusal::token::ALL: \
         not named: {missing:?}; named but never written: {unknown:?}"
    );
}

#[test]
fn every_token_is_a_valid_header_value() {
    for t in token::ALL {
        assert!(
            http::HeaderValue::from_str(t).is_ok() && !t.is_empty(),
            "{t:?} cannot be a trellis-proxy-error value"
        );
    }
}
