//! L7 matches of a `to` entry: HTTP methods, paths, headers and gRPC
//! services, their syntax (checked by `validate`) and how they match one
//! request (used by `engine`).
//!
//! Paths are matched on the request path as sent, without the query:
//! `/x` exactly, `/x/*` that path and everything under it, and templates
//! where `{name}` stands for exactly one non-empty segment
//! (`/users/{id}` matches `/users/7`, not `/users/7/posts` nor `/users/`;
//! `/users/{id}/*` matches both of the first two). A gRPC match is a path
//! match on `/<service>/<method>`. Header names are case-insensitive and
//! values exact. The proxy refuses paths with `.`/`..` or empty segments
//! before matching, so `/a/../admin` cannot slip past a rule on `/admin`.

use http::HeaderMap;

use super::document::{Destination, GrpcMatch};

/// The attributes of one HTTP request that rules match on.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The path without the query.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// One segment of a path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    /// `{name}`: any one non-empty segment.
    Param,
}

/// A compiled path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    segments: Box<[Segment]>,
    /// Ends in `/*`: the path and everything under it.
    prefix: bool,
}

impl PathPattern {
    /// Parses a path pattern, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("path {text:?} must start with '/'"));
        };
        if let Some(bad) = text
            .chars()
            .find(|c| c.is_ascii_control() || c.is_whitespace() || matches!(c, '?' | '#'))
        {
            return Err(format!(
                "path {text:?} must not contain {bad:?} (queries are not matched)"
            ));
        }
        let (rest, prefix) = match rest.strip_suffix("/*") {
            Some(base) => (base, true),
            None if rest == "*" => ("", true),
            None => (rest, false),
        };
        let mut segments = Vec::new();
        if !rest.is_empty() {
            for segment in rest.split('/') {
                segments.push(parse_segment(text, segment)?);
            }
        }
        Ok(Self {
            segments: segments.into(),
            prefix,
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        if rest.is_empty() {
            // "/" has no segments.
            parts.next();
        }
        for segment in &self.segments {
            let Some(part) = parts.next() else {
                return false;
            };
            let ok = match segment {
                Segment::Literal(lit) => **lit == *part,
                Segment::Param => !part.is_empty(),
            };
            if !ok {
                return false;
            }
        }
        self.prefix || parts.next().is_none()
    }
}

fn parse_segment(text: &str, segment: &str) -> Result<Segment, String> {
    if segment.is_empty() || segment == "." || segment == ".." {
        return Err(format!(
            "path {text:?} has an empty, '.' or '..' segment (requests with those are refused)"
        ));
    }
    if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "path {text:?}: template parameter {segment:?} must be {{name}} with letters, digits or '_'"
            ));
        }
        return Ok(Segment::Param);
    }
    if segment.contains(['{', '}']) {
        return Err(format!(
            "path {text:?}: a template parameter must be a whole segment, like /users/{{id}}"
        ));
    }
    if segment.contains('*') {
        return Err(format!(
            "path {text:?}: '*' is only allowed as a final \"/*\" segment"
        ));
    }
    Ok(Segment::Literal(segment.into()))
}

/// Whether `path` is one the proxy decides on: no `.`/`..` or empty
/// segments (a trailing `/` is fine).
pub fn is_normalized(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    rest.is_empty()
        || !rest
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
}

/// RFC 9110 `token`.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Checks one method; `Err` says why it is not one.
pub fn check_method(method: &str) -> Result<(), String> {
    if !is_token(method) {
        return Err(format!("{method:?} is not an HTTP method token"));
    }
    if method.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(format!(
            "{method:?}: methods are case-sensitive, write {:?}",
            method.to_ascii_uppercase()
        ));
    }
    Ok(())
}

/// Checks a gRPC service or method name.
pub fn check_grpc_name(name: &str, dots: bool) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || (dots && c == '.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
}

/// The compiled L7 part of one `to` entry: every set attribute must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct L7Match {
    methods: Box<[Box<str>]>,
    paths: Box<[PathPattern]>,
    /// Lower-case names.
    headers: Box<[(Box<str>, Box<str>)]>,
}

impl L7Match {
    /// The L7 part of a validated entry, or `None` when it has none.
    pub fn compile(d: &Destination) -> Option<Self> {
        if !d.has_l7() {
            return None;
        }
        let mut paths: Vec<PathPattern> = d
            .paths
            .iter()
            .flatten()
            .map(|p| PathPattern::parse(p).expect("validated path"))
            .collect();
        if let Some(GrpcMatch { service, method }) = &d.grpc {
            let text = match method {
                Some(method) => format!("/{service}/{method}"),
                None => format!("/{service}/*"),
            };
            paths.push(PathPattern::parse(&text).expect("validated gRPC names"));
        }
        Some(Self {
            methods: d
                .methods
                .iter()
                .flatten()
                .map(|m| m.as_str().into())
                .collect(),
            paths: paths.into(),
            headers: d
                .headers
                .iter()
                .flatten()
                .map(|(k, v)| (k.to_ascii_lowercase().into(), v.as_str().into()))
                .collect(),
        })
    }

    pub fn matches(&self, req: &HttpRequest<'_>) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| **m == *req.method))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(req.path)))
            && self.headers.iter().all(|(name, value)| {
                req.headers
                    .get_all(&**name)
                    .iter()
                    .any(|v| v.as_bytes() == value.as_bytes())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, path: &str) -> bool {
        PathPattern::parse(pattern).unwrap().matches(path)
    }

    #[test]
    fn exact_prefix_and_template_paths() {
        assert!(matches("/x", "/x"));
        assert!(!matches("/x", "/x/y"));
        assert!(!matches("/x", "/xy"));
        assert!(matches("/x/*", "/x"));
        assert!(matches("/x/*", "/x/y/z"));
        assert!(!matches("/x/*", "/xy"));
        assert!(matches("/users/{id}", "/users/7"));
        assert!(!matches("/users/{id}", "/users/7/posts"));
        assert!(!matches("/users/{id}", "/users/"));
        assert!(matches("/users/{id}/*", "/users/7/posts"));
        assert!(matches("/*", "/anything"));
        assert!(matches("/", "/"));
        assert!(!matches("/", "/a"));
    }

    #[test]
    fn rejects_bad_patterns() {
        for bad in [
            "x", "/a//b", "/a/./b", "/a/{}", "/a/{id", "/a/x{id}", "/a*", "/a?x=1",
        ] {
            assert!(PathPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn normalized_paths() {
        assert!(is_normalized("/"));
        assert!(is_normalized("/a/b/"));
        assert!(!is_normalized("/a//b"));
        assert!(!is_normalized("/a/../admin"));
        assert!(!is_normalized("/./a"));
    }
}
