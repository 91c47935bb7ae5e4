//! SPIFFE ID patterns: an exact ID, or a prefix written `spiffe://td/path/*`.
//!
//! This module owns how selectors and `spiffeId` sources name identities, for
//! both validation and matching, so the two can never disagree. The only
//! wildcard is a trailing `/*`; anything else with `*` is refused.

use std::fmt;
use std::sync::Arc;

use crate::spiffe::{InvalidSpiffeId, SpiffeId};

/// An exact SPIFFE ID or an ID prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdPattern {
    Exact(SpiffeId),
    /// Matches every ID starting with `base` followed by `/`:
    /// `spiffe://td/ns/web/*` matches `spiffe://td/ns/web/sa/a` and
    /// never `spiffe://td/ns/web` itself.
    Prefix {
        base: SpiffeId,
        /// `base` with the trailing `/`, precomputed for matching.
        prefix: Arc<str>,
    },
}

/// Why a string is not an [`IdPattern`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPattern {
    #[error("invalid SPIFFE ID {0:?}: {1}")]
    Id(String, InvalidSpiffeId),
    #[error("invalid SPIFFE ID pattern {0:?}: the only wildcard allowed is a trailing \"/*\"")]
    Wildcard(String),
}

impl IdPattern {
    pub fn parse(text: &str) -> Result<Self, InvalidPattern> {
        let (base, prefix) = match text.strip_suffix("/*") {
            Some(base) => (base, true),
            None => (text, false),
        };
        if base.contains('*') {
            return Err(InvalidPattern::Wildcard(text.to_owned()));
        }
        let id = SpiffeId::parse(base).map_err(|e| InvalidPattern::Id(text.to_owned(), e))?;
        Ok(if prefix {
            Self::Prefix {
                prefix: format!("{id}/").into(),
                base: id,
            }
        } else {
            Self::Exact(id)
        })
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(exact) => exact == id,
            Self::Prefix { prefix, .. } => id.as_str().starts_with(&**prefix),
        }
    }

    pub fn trust_domain_str(&self) -> &str {
        match self {
            Self::Exact(id) | Self::Prefix { base: id, .. } => id.trust_domain_str(),
        }
    }

    /// Whether every ID this pattern matches starts with `prefix` (which
    /// ends in `/`): the same string comparison as [`matches`](Self::matches),
    /// so a pattern within `spiffe://td/ns/a/` can never match an ID
    /// outside it.
    pub fn within(&self, prefix: &str) -> bool {
        match self {
            Self::Exact(id) => id.as_str().starts_with(prefix),
            Self::Prefix { prefix: own, .. } => own.starts_with(prefix),
        }
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::Prefix { base, .. } => write!(f, "{base}/*"),
        }
    }
}

/// The longest DNS-1123 label, in bytes (RFC 1123 section 2.1): the most a
/// Kubernetes namespace, or a name [`is_dns_label`] accepts, may be. All its
/// characters are ASCII, so bytes and characters count alike.
pub const MAX_DNS_LABEL_BYTES: usize = 63;

/// Whether `name` is a DNS-1123 label, as Kubernetes names and namespaces are.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= MAX_DNS_LABEL_BYTES
        && bytes.iter().all(|b| edge(b) || *b == b'-')
        && bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
}

/// What [`is_dns_label`] requires, as errors say it.
pub const DNS_LABEL_RULE: &str = "must be a DNS-1123 label: at most 63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit";

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn exact_and_prefix_matching() {
        let exact = IdPattern::parse("spiffe://td/ns/a/sa/web").unwrap();
        assert!(exact.matches(&id("spiffe://td/ns/a/sa/web")));
        assert!(!exact.matches(&id("spiffe://td/ns/a/sa/web2")));

        let prefix = IdPattern::parse("spiffe://td/ns/a/*").unwrap();
        assert!(prefix.matches(&id("spiffe://td/ns/a/sa/web")));
        assert!(!prefix.matches(&id("spiffe://td/ns/a")));
        assert!(!prefix.matches(&id("spiffe://td/ns/ab/sa/web")));
        assert_eq!(prefix.to_string(), "spiffe://td/ns/a/*");

        let whole_domain = IdPattern::parse("spiffe://td/*").unwrap();
        assert!(whole_domain.matches(&id("spiffe://td/trellis/admin")));
        assert!(!whole_domain.matches(&id("spiffe://td2/trellis/admin")));
    }

    #[test]
    fn within_a_prefix_means_every_match_is_under_it() {
        let ns = "spiffe://td/ns/a/";
        for inside in [
            "spiffe://td/ns/a/sa/web",
            "spiffe://td/ns/a/*",
            "spiffe://td/ns/a/sa/*",
        ] {
            assert!(IdPattern::parse(inside).unwrap().within(ns), "{inside}");
        }
        for outside in [
            "spiffe://td/ns/a",
            "spiffe://td/ns/ab/sa/web",
            "spiffe://td/ns/ab/*",
            "spiffe://td/ns/*",
            "spiffe://td/*",
            "spiffe://td/ns/b/sa/web",
            "spiffe://td2/ns/a/sa/web",
        ] {
            assert!(!IdPattern::parse(outside).unwrap().within(ns), "{outside}");
        }
    }

    #[test]
    fn refuses_other_wildcards_and_bad_ids() {
        for bad in [
            "spiffe://td/ns/*/sa/web",
            "spiffe://td/ns/a*",
            "spiffe://td/*/*",
        ] {
            assert_eq!(
                IdPattern::parse(bad),
                Err(InvalidPattern::Wildcard(bad.into()))
            );
        }
        let err = IdPattern::parse("spiffe://Bad").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid SPIFFE ID \"spiffe://Bad\": ")
        );
    }

    #[test]
    fn dns_labels() {
        for good in ["default", "a", "web-2", "0"] {
            assert!(is_dns_label(good), "{good}");
        }
        for bad in ["", "Web", "-a", "a-", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        assert!(is_dns_label(&"a".repeat(MAX_DNS_LABEL_BYTES)));
        assert!(!is_dns_label(&"a".repeat(MAX_DNS_LABEL_BYTES + 1)));
        // The rule in words names the same bound.
        let bound = format!("at most {MAX_DNS_LABEL_BYTES} characters");
        assert!(DNS_LABEL_RULE.contains(&bound), "{DNS_LABEL_RULE}");
    }
}
