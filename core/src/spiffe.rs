//! SPIFFE IDs and trust domains, parsed once and valid afterwards.
//!
//! The rules are those of the SPIFFE ID specification: scheme `spiffe`, a
//! trust domain of lower-case letters, digits, `.`, `-` and `_`, and a path of
//! non-empty segments of letters, digits, `.`, `-` and `_` (never `.` or `..`),
//! with no query, fragment, port or user info.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

const SCHEME: &str = "spiffe://";
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const MAX_ID_LEN: usize = 2048;

/// Why a string is not a SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSpiffeId {
    #[error("a SPIFFE ID must start with \"spiffe://\"")]
    Scheme,
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    #[error("the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} characters")]
    TrustDomainTooLong,
    #[error("the trust domain may hold only a-z, 0-9, '.', '-' and '_' (found {0:?})")]
    TrustDomainChar(char),
    #[error("a SPIFFE ID is at most {MAX_ID_LEN} characters")]
    TooLong,
    #[error("the path has an empty segment (\"//\" or a trailing \"/\")")]
    EmptySegment,
    #[error("the path may not hold \".\" or \"..\" segments")]
    DotSegment,
    #[error("the path may hold only a-z, A-Z, 0-9, '.', '-' and '_' (found {0:?})")]
    PathChar(char),
}

/// A trust domain: the name of one mesh's root of trust, e.g. `cluster.local`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

impl TrustDomain {
    pub fn new(name: &str) -> Result<Self, InvalidSpiffeId> {
        if name.is_empty() {
            return Err(InvalidSpiffeId::EmptyTrustDomain);
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(InvalidSpiffeId::TrustDomainTooLong);
        }
        if let Some(c) = name
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(InvalidSpiffeId::TrustDomainChar(c));
        }
        Ok(Self(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<td>` as a string, the trust domain's own ID.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = InvalidSpiffeId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

/// A valid SPIFFE ID, such as `spiffe://cluster.local/ns/default/sa/web`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole ID as written, `spiffe://td/path`.
    id: Arc<str>,
    /// Byte offset of the path (or the end of the string when it has none).
    path_start: usize,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, InvalidSpiffeId> {
        if s.len() > MAX_ID_LEN {
            return Err(InvalidSpiffeId::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(InvalidSpiffeId::Scheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        TrustDomain::new(td)?;
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                match segment {
                    "" => return Err(InvalidSpiffeId::EmptySegment),
                    "." | ".." => return Err(InvalidSpiffeId::DotSegment),
                    _ => {}
                }
                if let Some(c) = segment
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
                {
                    return Err(InvalidSpiffeId::PathChar(c));
                }
            }
        }
        Ok(Self {
            id: s.into(),
            path_start: SCHEME.len() + td.len(),
        })
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service-account>`, the ID of a workload.
    pub fn workload(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, InvalidSpiffeId> {
        Self::parse(&format!("{SCHEME}{td}/ns/{namespace}/sa/{service_account}"))
    }

    /// `spiffe://<td>/trellis/control-plane`.
    pub fn control_plane(td: &TrustDomain) -> Self {
        Self::parse(&format!("{SCHEME}{td}/trellis/control-plane"))
            .expect("a valid trust domain makes a valid control-plane ID")
    }

    /// `spiffe://<td>/trellis/admin`, the operators' identity.
    pub fn admin(td: &TrustDomain) -> Self {
        Self::parse(&format!("{SCHEME}{td}/trellis/admin"))
            .expect("a valid trust domain makes a valid admin ID")
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    pub fn trust_domain_str(&self) -> &str {
        &self.id[SCHEME.len()..self.path_start]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().into())
    }

    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_str() == td.as_str()
    }

    /// The path, starting with `/`, or empty.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    /// The namespace of a `/ns/<ns>/...` workload ID.
    pub fn namespace(&self) -> Option<&str> {
        let mut segments = self.path().strip_prefix('/')?.split('/');
        match (segments.next(), segments.next()) {
            (Some("ns"), Some(ns)) => Some(ns),
            _ => None,
        }
    }

    /// The service account of a `/ns/<ns>/sa/<sa>` workload ID.
    pub fn service_account(&self) -> Option<&str> {
        let mut segments = self.path().strip_prefix('/')?.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(_), Some("sa"), Some(sa), None) => Some(sa),
            _ => None,
        }
    }
}

impl FromStr for SpiffeId {
    type Err = InvalidSpiffeId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workload_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain_str(), "cluster.local");
        assert_eq!(id.path(), "/ns/default/sa/web");
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(id.service_account(), Some("web"));
        assert!(id.is_member_of(&TrustDomain::new("cluster.local").unwrap()));
        assert!(!id.is_member_of(&TrustDomain::new("other.local").unwrap()));
    }

    #[test]
    fn builds_well_known_ids() {
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(
            SpiffeId::control_plane(&td).as_str(),
            "spiffe://example.org/trellis/control-plane"
        );
        assert_eq!(
            SpiffeId::admin(&td).as_str(),
            "spiffe://example.org/trellis/admin"
        );
        assert_eq!(
            SpiffeId::workload(&td, "prod", "api").unwrap().as_str(),
            "spiffe://example.org/ns/prod/sa/api"
        );
        assert_eq!(SpiffeId::admin(&td).namespace(), None);
    }

    #[test]
    fn rejects_invalid_ids() {
        use InvalidSpiffeId::*;
        let cases = [
            ("http://cluster.local/ns/a", Scheme),
            ("spiffe://", EmptyTrustDomain),
            ("spiffe:///ns/a", EmptyTrustDomain),
            ("spiffe://Cluster.local/ns/a", TrustDomainChar('C')),
            ("spiffe://cluster.local:8080/ns/a", TrustDomainChar(':')),
            ("spiffe://user@cluster.local/ns/a", TrustDomainChar('@')),
            ("spiffe://cluster.local/ns//a", EmptySegment),
            ("spiffe://cluster.local/ns/a/", EmptySegment),
            ("spiffe://cluster.local/ns/../a", DotSegment),
            ("spiffe://cluster.local/ns/a?x=1", PathChar('?')),
            ("spiffe://cluster.local/ns/a#frag", PathChar('#')),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input), Err(want), "{input}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        assert_eq!(SpiffeId::parse(&long), Err(TooLong));
    }

    #[test]
    fn trust_domain_only_id_has_no_path() {
        let id = SpiffeId::parse("spiffe://cluster.local").unwrap();
        assert_eq!(id.path(), "");
        assert_eq!(id.namespace(), None);
    }
}
