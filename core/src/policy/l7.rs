//! L7 matches of a `to` entry: HTTP methods, paths, headers and gRPC
//! services, their syntax (checked by `validate`) and how they match one
//! request (used by `engine`).
//!
//! Paths are matched on the request path as sent, without the query:
//! `/x` exactly, `/x/*` that path and everything under it, and templates
//! where `{name}` stands for exactly one non-empty segment
//! (`/users/{id}` matches `/users/7`, not `/users/7/posts` nor `/users/`;
//! `/users/{id}/*` matches both of the first two). A DENY or AUDIT rule
//! also matches the spellings routers commonly take for the same path,
//! with a trailing `/`, with segment parameters (`/admin;x`, and
//! `/admin%3Bx`, as apps that decode first read it), in any ASCII letter
//! case (`/ADMIN`), with characters escaped or not (`/items%3Apurge` is
//! `/items:purge`), with characters apps read as ASCII (`/\u{FF41}dmin`
//! and `/\u{1D41A}dmin`, which Unicode NFKC folds into `/admin`,
//! `/\u{FB01}les`, which it folds into `/files`, and `/adm\u{0131}n` and
//! `/ADM\u{0130}N`, which Unicode case rules read as `/admin`) and with
//! `.`s or spaces ending a segment (`/admin.`, `/admin%20`, and
//! `/admin\u{00A0}`, a space once normalized, which Windows file systems
//! drop); an ALLOW rule only the path as sent. A
//! gRPC match is a path match on `/<service>/<method>`. Header names are
//! case-insensitive and values exact; a header sent more than once matches
//! an ALLOW rule only if every value does, a DENY or AUDIT rule if any
//! does, or any element of a comma-separated one (`L7Match::matches`).
//!
//! Apps decode and resolve a path before routing it, so a path that names
//! the same resource in another spelling must not reach them past a rule
//! written for the plain one. While rules or rate limits match on paths,
//! the proxy refuses ([`check_path`]) paths with `.`/`..` or empty
//! segments (`/a/../admin`), counting a segment's parameters out (servlet
//! containers drop `;x` before they resolve dot segments, so `/a/..;/admin`
//! is `/admin` to them), a percent-encoded unreserved character
//! (`/%61dmin`: RFC 3986 says those are decoded, so no rule written as
//! sent could match), an encoded `/` or `\` (`/admin%2Fx`), a raw `\`, a
//! `%` not followed by two hex digits, an encoded control character
//! (`%00`-`%1F`, `%7F`: `/admin%00.png` is `/admin` to an app cutting at
//! NUL), an encoded `%` before two hex digits (`%252e`: `.` to an app
//! that decodes twice), or before characters NFKC folds into them
//! (`%25\u{FF12}\u{FF45}` is `%252e` once normalized), escapes that do not decode to UTF-8 (`%c0%ae`,
//! an overlong `.` some decoders take), and a character, raw or encoded,
//! that an app could fold into text holding a `.`, `/`, `\`, `;`, `%`,
//! `?` or `#` (`%ef%bc%8e`, U+FF0E, is `.` after Unicode NFKC
//! normalization, U+2025 is `..`, U+2488 is `1.`, U+037E is `;` and
//! U+2100 is `a/c`). Other escapes (`%20`) are
//! matched as sent by an ALLOW rule, their hex digits in either case, and
//! decoded by a DENY or AUDIT rule, as apps route them.

use std::fmt;

use http::{HeaderMap, HeaderValue};

use super::ascii_folds::ASCII_FOLDS;
use super::document::{Action, Destination, GrpcMatch};

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
    /// Could never match as written (see [`PathPattern::parse_stored`]).
    nothing: bool,
}

impl PathPattern {
    /// Parses a path pattern, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        match Self::parse_stored(text)? {
            (_, Some(never)) => Err(never),
            (pattern, None) => Ok(pattern),
        }
    }

    /// Parses a path pattern that was accepted before patterns that could
    /// never match were refused (a stored document): such a pattern
    /// compiles to one that matches nothing, with the reason [`parse`]
    /// refuses it. That is safe: requests with such a path are refused
    /// before rules see them. Any other problem is still an error.
    ///
    /// [`parse`]: Self::parse
    pub fn parse_stored(text: &str) -> Result<(Self, Option<String>), String> {
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
        let never = check_escapes(text).err().map(|problem| {
            format!("path {text:?} could never match: {problem} (requests with it are refused)")
        });
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
        Ok((
            Self {
                segments: segments.into(),
                prefix,
                nothing: never.is_some(),
            },
            never,
        ))
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
        self.matches_segments(parts, false)
    }

    /// Whether `path`, or a spelling of it that apps commonly route to
    /// the same handler, matches: without a trailing `/` (`/admin/` is
    /// `/admin` to many routers), without the parameters of its
    /// segments (`/admin;x` is `/admin` to servlet containers), in any
    /// ASCII letter case (`/ADMIN` is `/admin` to Express, ASP.NET Core
    /// and other routers that ignore case), with its escapes decoded
    /// (`/items%3Apurge` is `/items:purge` to apps, which decode a path
    /// before routing it, and `/admin%3Bx` is `/admin;x`), with the
    /// characters apps read as ASCII read as that ASCII (`/\u{FF41}dmin`
    /// and `/\u{1D41A}dmin` are `/admin` to apps applying NFKC,
    /// `/adm\u{0131}n` to apps ignoring case with Unicode rules:
    /// [`routed_bytes`]), and without the `.`s and spaces ending a segment
    /// (`/admin.`, `/admin%20` and `/admin\u{00A0}` are `/admin` to Windows
    /// file systems, and so to IIS).
    /// What a DENY or AUDIT rule
    /// matches, so that another spelling does not slip past it; an ALLOW
    /// rule matches only the path as sent. A pattern whose literal holds a
    /// `;` still matches the path it spells.
    pub fn matches_as_routed(&self, path: &str) -> bool {
        path.starts_with('/')
            && (self.matches_segments(routed_segments(path, false), true)
                || (parameters_at(path).is_some()
                    && self.matches_segments(routed_segments(path, true), true)))
    }

    /// Whether the segments `parts` match; with `any_case`, literals match
    /// as apps route them, escapes decoded and in any ASCII letter case.
    fn matches_segments<'a>(
        &self,
        mut parts: impl Iterator<Item = &'a str>,
        any_case: bool,
    ) -> bool {
        if self.nothing {
            return false;
        }
        for segment in &self.segments {
            let Some(part) = parts.next() else {
                return false;
            };
            let ok = match segment {
                Segment::Literal(lit) => match any_case {
                    true => segment_routes_as(lit, part),
                    false => segment_is(lit, part),
                },
                Segment::Param => !part.is_empty(),
            };
            if !ok {
                return false;
            }
        }
        self.prefix || parts.next().is_none()
    }
}

/// The segments of `path` (after its leading `/`) as apps commonly route
/// it: without a final empty one, so `/admin/` is `/admin` and `/` has
/// none, each without the `.`s and spaces it ends in (and the characters
/// folding into a space, like U+00A0), so `/admin.`, `/admin%20` and
/// `/admin%C2%A0` are `/admin`, and with `without_parameters`, each without
/// what follows a `;` (raw or `%3B`) in it, so `/admin;x/` and
/// `/admin%3Bx` are `/admin` too. What DENY and AUDIT rules
/// match (in any ASCII letter case, [`PathPattern::matches_as_routed`]),
/// and what a rate limit keys a route's bucket by (likewise), so that
/// another spelling neither slips past a rule nor gets a fresh bucket.
pub fn routed_segments(path: &str, without_parameters: bool) -> impl Iterator<Item = &str> {
    let rest = path.strip_prefix('/').unwrap_or(path);
    let mut segments = rest
        .split('/')
        .map(move |segment| match without_parameters {
            true => self::without_parameters(segment),
            false => segment,
        })
        .map(without_trailing_dots)
        .peekable();
    std::iter::from_fn(move || {
        let segment = segments.next()?;
        match segment.is_empty() && segments.peek().is_none() {
            true => None,
            false => Some(segment),
        }
    })
}

/// `segment` without the `.`s and spaces (raw or `%20`, or a character an
/// app normalizing the path reads as a space, [`without_a_folded_space`])
/// it ends in, as Windows file systems (and so IIS and apps serving files
/// from them) read it: `admin.`, `admin..`, `admin%20` and
/// `admin\u{00A0}` are `admin`. A segment of dots
/// and spaces alone is left whole, so that a template's `{name}` still
/// matches it.
fn without_trailing_dots(segment: &str) -> &str {
    let mut rest = segment;
    loop {
        let trimmed = rest.trim_end_matches(['.', ' ']);
        let trimmed = trimmed.strip_suffix("%20").unwrap_or(trimmed);
        let trimmed = without_a_folded_space(trimmed);
        if trimmed.len() == rest.len() {
            break;
        }
        rest = trimmed;
    }
    match rest {
        "" => segment,
        trimmed => trimmed,
    }
}

/// `segment` without its parameters: what follows its first `;`, raw or
/// escaped (`%3B`), as servlet containers read it (`admin;x` is `admin`)
/// and, for `%3B`, apps that decode a path before they drop parameters
/// (`admin%3Bx` is `admin` to them).
fn without_parameters(segment: &str) -> &str {
    match parameters_at(segment) {
        Some(at) => &segment[..at],
        None => segment,
    }
}

/// Where the first `;` of `text` is, raw or escaped as `%3B` (either case).
fn parameters_at(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    bytes.iter().enumerate().find_map(|(at, &b)| {
        let escaped = b == b'%'
            && bytes.get(at + 1) == Some(&b'3')
            && matches!(bytes.get(at + 2), Some(b'b' | b'B'));
        (b == b';' || escaped).then_some(at)
    })
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

/// Whether the request segment `part` is the literal `lit`: byte for
/// byte, except that the hex digits of a `%XX` escape match in either case
/// (`%3a` is `%3A`, RFC 3986 section 6.2.2.1).
fn segment_is(lit: &str, part: &str) -> bool {
    let (lit, part) = (lit.as_bytes(), part.as_bytes());
    lit == part
        || (lit.len() == part.len()
            && lit.iter().zip(part).enumerate().all(|(i, (a, b))| {
                a == b
                    || (a.is_ascii_hexdigit()
                        && a.eq_ignore_ascii_case(b)
                        && lit[i.saturating_sub(2)..i].contains(&b'%'))
            }))
}

/// Whether the request segment `part` is the literal `lit` as an app
/// routes both: each `%XX` escape read as the byte it stands for (apps
/// decode a path before routing it, so `/items%3Apurge` is
/// `/items:purge` to them), each character apps read as ASCII as that
/// ASCII ([`routed_bytes`]), ASCII letters in either case, and `.`s and spaces
/// ending either left out. What a DENY
/// or AUDIT rule's literal matches ([`PathPattern::matches_as_routed`]).
/// The escapes that could stand for a separator or a dot are refused
/// before rules see a path ([`check_path`]). Allocates nothing.
fn segment_routes_as(lit: &str, part: &str) -> bool {
    let lit = without_trailing_dots(lit);
    let plain = |text: &str| text.is_ascii() && !text.contains('%');
    if plain(lit) && plain(part) {
        return lit.eq_ignore_ascii_case(part);
    }
    let lit = routed_bytes(lit).map(|b| b.to_ascii_lowercase());
    lit.eq(routed_bytes(part).map(|b| b.to_ascii_lowercase()))
}

/// The bytes of `text` as an app that decodes and normalizes a path
/// reads them: each well-formed `%XX` escape decoded (any other `%` is
/// itself), and each character past ASCII, raw or escaped, that an app
/// could read as ASCII text read as that text (`ascii_fold`):
/// `\u{FF41}`, `%EF%BD%81` (fullwidth) and `\u{1D41A}` (mathematical
/// bold) as `a`, `\u{0131}` (dotless i) as `i`, `\u{FB01}` (a ligature)
/// as `fi`. The characters that would fold into text with a `.`, `/`,
/// `\`, `;`, `%`, `?` or `#` never get here: a path with one is refused
/// while rules or limits read paths ([`check_path`]). What DENY, AUDIT
/// and rate-limit path matches compare, and what a rate limit keys a
/// route's bucket by. ASCII bytes go through as they are, with no look-up;
/// allocates nothing.
pub fn routed_bytes(text: &str) -> impl Iterator<Item = u8> + '_ {
    let mut bytes = decoded_bytes(text);
    // The bytes read ahead to see whether they are a character that folds;
    // each is looked at as the start of one in its turn, so a byte that
    // starts none (`%EF` before a raw U+FF41) leaves the next free to.
    let mut ahead = [0u8; 4];
    let mut ahead_len = 0;
    // What is left to yield of the last character folded.
    let mut folded: &'static [u8] = &[];
    std::iter::from_fn(move || {
        if let Some((&byte, rest)) = folded.split_first() {
            folded = rest;
            return Some(byte);
        }
        if ahead_len == 0 {
            let byte = bytes.next()?;
            if byte.is_ascii() {
                return Some(byte);
            }
            ahead[0] = byte;
            ahead_len = 1;
        }
        let need = utf8_len(ahead[0]);
        while ahead_len < need {
            let Some(byte) = bytes.next() else { break };
            ahead[ahead_len] = byte;
            ahead_len += 1;
        }
        if need > 1
            && ahead_len >= need
            && let Ok(utf8) = std::str::from_utf8(&ahead[..need])
            && let Some(fold) = utf8.chars().next().and_then(ascii_fold)
            && let Some((&byte, rest)) = fold.as_bytes().split_first()
        {
            ahead.copy_within(need.., 0);
            ahead_len -= need;
            folded = rest;
            return Some(byte);
        }
        let byte = ahead[0];
        ahead.copy_within(1.., 0);
        ahead_len -= 1;
        Some(byte)
    })
}

/// How many bytes the UTF-8 character starting with `lead` has; 0 if
/// `lead` starts none.
fn utf8_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7F => 1,
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => 0,
    }
}

/// The ASCII text an app could read the character `c` past ASCII as, if
/// any: its Unicode NFKC form when that is all ASCII (`\u{FF41}`,
/// `\u{1D41A}`, `\u{24D0}` and `\u{00AA}` are `a`, `\u{017F}` is `s`,
/// U+212A KELVIN SIGN is `K`, U+00A0 and U+2000 to U+200A are a space,
/// `\u{FB01}` is `fi`, `\u{338F}` is `kg`, `\u{216B}` is `XII`), or its
/// upper or lower case when that is (`\u{0131}` upper-cases to `I`,
/// `\u{00DF}` to `SS`, and `\u{0130}` lower-cases to `i` in the simple
/// mapping of Java's `equalsIgnoreCase` and .NET), or what it is read as
/// once NFKC or a case mapping has made another character of it, as an
/// app normalizing a path and then ignoring its case reads it
/// (`\u{1D6A4}` is `\u{0131}` to NFKC, and so `i`; `\u{1E9E}` lower-cases
/// to `\u{00DF}`, and so is `ss`). A binary search of a
/// table generated from Unicode's data (and checked against it by a test
/// walking every code point); allocates nothing.
///
/// A character folding into several ASCII characters is read as all of
/// them rather than refused: refusing would deny real paths holding a
/// ligature or a unit sign (`/\u{FB01}les`, `/2\u{338F}`) outright,
/// while reading them lets a DENY of `/files` deny `/\u{FB01}les` and
/// nothing else.
fn ascii_fold(c: char) -> Option<&'static str> {
    let at = ASCII_FOLDS
        .binary_search_by_key(&c, |&(folds, _)| folds)
        .ok()?;
    Some(ASCII_FOLDS[at].1)
}

/// The bytes of `text` with each well-formed `%XX` escape decoded, as an
/// app reads a path segment before routing it; any other `%` is itself.
/// What [`routed_bytes`] folds characters in. Allocates nothing.
fn decoded_bytes(text: &str) -> impl Iterator<Item = u8> + '_ {
    let bytes = text.as_bytes();
    let mut at = 0;
    std::iter::from_fn(move || {
        let byte = *bytes.get(at)?;
        if byte == b'%'
            && let Some(&[h, l]) = bytes.get(at + 1..at + 3)
            && h.is_ascii_hexdigit()
            && l.is_ascii_hexdigit()
        {
            at += 3;
            return Some(decode(&[byte, h, l]));
        }
        at += 1;
        Some(byte)
    })
}

/// Why the proxy will not decide on a request path: an app could read it
/// as another path than the one rules compare (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathProblem {
    /// An empty, `.` or `..` segment, parameters (`;x`) aside.
    Segment,
    /// `%XX` encoding an unreserved character (ALPHA, DIGIT, `-._~`).
    EncodedUnreserved([u8; 3]),
    /// `%2F`: an encoded `/`.
    EncodedSlash([u8; 3]),
    /// `%5C`: an encoded `\`.
    EncodedBackslash([u8; 3]),
    /// A raw `\`.
    Backslash,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// `%00`-`%1F` or `%7F`: an encoded control character.
    EncodedControl([u8; 3]),
    /// `%25` and two hex digits, as an app normalizing the path reads
    /// them (`%25\u{FF12}\u{FF45}` is `%252e`): a `%` escape encoded again.
    DoubleEncoded([u8; 5]),
    /// Escapes that do not decode to UTF-8 (overlong, cut short, or a
    /// byte that starts no character).
    NotUtf8,
    /// A character, raw or encoded, that an app could fold into ASCII
    /// text holding a `.`, `/`, `\`, `;`, `%`, `?` or `#` (`look_alike`).
    LookAlike(char, &'static str),
}

impl fmt::Display for PathProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = |escape: &[u8]| String::from_utf8_lossy(escape).into_owned();
        match self {
            Self::Segment => f.write_str(
                "path has an empty, '.' or '..' segment (';' parameters aside, as servlet \
                 containers read them)",
            ),
            Self::EncodedUnreserved(escape) => {
                let c = char::from(decode(escape));
                write!(
                    f,
                    "path encodes {c:?} as {}: send unreserved characters as they are (RFC 3986)",
                    text(escape)
                )
            }
            Self::EncodedSlash(escape) => write!(
                f,
                "path encodes '/' as {}: an app could read it as a separator",
                text(escape)
            ),
            Self::EncodedBackslash(escape) => write!(
                f,
                "path encodes '\\' as {}: an app could read it as a separator",
                text(escape)
            ),
            Self::Backslash => {
                f.write_str("path contains '\\': an app could read it as a separator")
            }
            Self::BadEscape => f.write_str("path has a '%' not followed by two hex digits"),
            Self::EncodedControl(escape) => write!(
                f,
                "path encodes a control character as {}: an app could cut the path there",
                text(escape)
            ),
            Self::DoubleEncoded(escape) => write!(
                f,
                "path encodes '%' as %25 before two hex digits ({}): an app that decodes \
                 twice could read another path",
                text(escape)
            ),
            Self::NotUtf8 => f.write_str("path has percent escapes that do not decode to UTF-8"),
            Self::LookAlike(c, like) => write!(
                f,
                "path contains U+{:04X}, which an app could read as '{like}'",
                u32::from(*c)
            ),
        }
    }
}

/// The byte a well-formed `%XX` escape stands for.
fn decode(escape: &[u8; 3]) -> u8 {
    let digit = |b: u8| (b as char).to_digit(16).expect("checked hex digit") as u8;
    digit(escape[1]) << 4 | digit(escape[2])
}

/// The ASCII characters that make a character folding into text with
/// one of them refused ([`look_alike`]): a separator or a dot segment
/// (`.`, `/`, `\`), dots a segment ends in (`/admin\u{2488}` is
/// `/admin1.`, `/admin1` on Windows), a segment parameter
/// (`/admin\u{FF1B}x` is `/admin;x`, `/admin` to a servlet container), an
/// escape decoded again (`\u{FF05}61` is `%61`, `a`), or the end of the
/// path (`?`, `#`).
const REFUSED_IN_FOLDS: [char; 7] = ['.', '/', '\\', ';', '%', '?', '#'];

/// Characters that the "best fit" mapping of Windows code pages reads as
/// `/` or `\`, which NFKC leaves as they are.
const BEST_FIT_LOOK_ALIKES: [(char, &str); 6] = [
    ('\u{2044}', "/"),  // FRACTION SLASH
    ('\u{2215}', "/"),  // DIVISION SLASH
    ('\u{2216}', "\\"), // SET MINUS
    ('\u{29F5}', "\\"), // REVERSE SOLIDUS OPERATOR
    ('\u{29F8}', "/"),  // BIG SOLIDUS
    ('\u{29F9}', "\\"), // BIG REVERSE SOLIDUS
];

/// What an app could read the character `c` past ASCII as, if that holds
/// a `.`, `/`, `\`, `;`, `%`, `?` or `#` ([`REFUSED_IN_FOLDS`]): its ASCII
/// fold ([`ascii_fold`]; Unicode NFKC normalization, as Python's IDNA and
/// some frameworks apply it: U+FF0E and U+2024 are `.`, U+2025 is `..`,
/// U+2100 is `a/c`, U+037E is `;`, U+2488 is `1.`), or what Windows "best
/// fit" maps it to ([`BEST_FIT_LOOK_ALIKES`]). A path with one is refused
/// while rules or limits read paths; every other character an app reads
/// as ASCII is matched as that ASCII by DENY, AUDIT and limit paths
/// ([`routed_bytes`]).
fn look_alike(c: char) -> Option<&'static str> {
    if let Some(&(_, like)) = BEST_FIT_LOOK_ALIKES.iter().find(|(look, _)| *look == c) {
        return Some(like);
    }
    ascii_fold(c).filter(|fold| fold.contains(REFUSED_IN_FOLDS))
}

/// What a `CONNECT` request is answered, with 501, whatever the rules: a
/// tunnel would carry requests no policy decides.
pub const CONNECT_REFUSED: &str = "CONNECT is not forwarded: a tunnel would carry requests no policy decides \
     (declare the port opaque to pass its connections as TCP)";

/// What a request with more than one `Host` is answered, with 400.
pub const MORE_THAN_ONE_HOST: &str = "more than one Host header";
/// What a request whose `Host` names another host or port than its target
/// is answered, with 400.
pub const HOST_DIFFERS: &str = "Host header differs from the authority of the request target";
/// What an HTTP/1.1 request without a `Host` is answered, with 400 (RFC
/// 9112 section 3.2): one in absolute form has its target's authority as
/// its `Host`, one in origin form names no host at all.
pub const MISSING_HOST: &str = "missing Host header: an HTTP/1.1 request names its host in one \
     (or in an absolute-form target)";
/// What a request whose target authority has a userinfo part (`user@`)
/// is answered, with 400 (RFC 9110 section 4.2.4, RFC 9113 section
/// 8.3.1): it would be the `Host` the rules and the app read.
pub const AUTHORITY_USERINFO: &str =
    "the authority of the request target has a userinfo part ('@'), which HTTP does not send";

/// What is wrong with a request's `Host` (in `headers`), if anything (RFC
/// 9112 section 3.2, RFC 9113 section 8.3.1): more than one, one naming
/// another host or port than the request's `target` authority does (an
/// absolute-form HTTP/1.1 target, or HTTP/2's `:authority`; `None` for an
/// origin-form target, which names none), none where the request must
/// have one (`required`: an HTTP/1.1 request whose target names no
/// authority), or a `target` authority with a userinfo part. An app and
/// the rules could read such a request as meant for different hosts, or
/// for none, so the proxy answers it with 400 before any rule, and
/// `policy explain` says so.
pub fn host_problem(
    headers: &HeaderMap,
    target: Option<&http::uri::Authority>,
    required: bool,
) -> Option<&'static str> {
    if target.is_some_and(|target| target.as_str().contains('@')) {
        return Some(AUTHORITY_USERINFO);
    }
    let mut hosts = headers.get_all(http::header::HOST).iter();
    let Some(host) = hosts.next() else {
        return required.then_some(MISSING_HOST);
    };
    if hosts.next().is_some() {
        return Some(MORE_THAN_ONE_HOST);
    }
    let target = target?;
    // The usual case, a Host made from the authority (HTTP/2's, by the
    // sidecar) or written as it, needs no parse.
    if host
        .as_bytes()
        .eq_ignore_ascii_case(target.as_str().as_bytes())
    {
        return None;
    }
    // A userinfo part (`user@api`, which `host()` leaves out) is no part
    // of the target's authority: it names another.
    let same = http::uri::Authority::try_from(host.as_bytes()).is_ok_and(|host| {
        !host.as_str().contains('@')
            && host.host().eq_ignore_ascii_case(target.host())
            && host.port_u16() == target.port_u16()
    });
    (!same).then_some(HOST_DIFFERS)
}

/// The largest HTTP/1.1 request head the sidecar reads (its request line
/// and header lines, each with its CRLF, and the empty line ending it,
/// [`http1_head_size`]): a longer one is answered 431
/// ([`HEAD_TOO_LARGE`]) before anything else is checked.
pub const MAX_REQUEST_HEAD: usize = 8192 + 4096 * 100;
/// What a head over [`MAX_REQUEST_HEAD`] is told.
pub const HEAD_TOO_LARGE: &str = "request head exceeds the sidecar's 408 KiB limit";
const _: () = assert!(
    MAX_REQUEST_HEAD == 408 * 1024,
    "HEAD_TOO_LARGE names the bound"
);

/// The longest HTTP/1.1 request target the sidecar takes (hyper's bound,
/// and the `http` crate's): a longer one is answered 414
/// ([`TARGET_TOO_LONG`]).
pub const MAX_TARGET: usize = u16::MAX as usize - 1;
/// What a target over [`MAX_TARGET`] is told.
pub const TARGET_TOO_LONG: &str = "request target exceeds the sidecar's limit of 65534 bytes";
const _: () = assert!(MAX_TARGET == 65534, "TARGET_TOO_LONG names the bound");
/// What an HTTP/1.1 request target with a raw `#` is answered, with 400,
/// whatever the rules: no request target carries a fragment (RFC 9112
/// section 3.2), and one the sidecar took would reach the app with the
/// fragment dropped, another target than the one sent. `%23` is a `#`
/// in a path or query, and is forwarded.
pub const TARGET_FRAGMENT: &str = "request target contains '#': a request carries no fragment \
     (send a '#' in a path or query as %23)";

/// What the sidecar refuses in an HTTP/1.1 request `target` as sent (its
/// path and query, or the whole of an absolute-form one), before any
/// rule: a raw `#` ([`TARGET_FRAGMENT`]). `policy explain` asks the same.
pub fn target_problem(target: &str) -> Option<&'static str> {
    target.contains('#').then_some(TARGET_FRAGMENT)
}
/// The most header fields of an HTTP/1.1 request the sidecar takes
/// (hyper's server's bound): more are answered 431 ([`TOO_MANY_FIELDS`]).
pub const MAX_REQUEST_HEADERS: usize = 100;
/// What a head with more than [`MAX_REQUEST_HEADERS`] fields is told.
pub const TOO_MANY_FIELDS: &str = "request head exceeds the sidecar's limit of 100 header fields";
const _: () = assert!(
    MAX_REQUEST_HEADERS == 100,
    "TOO_MANY_FIELDS names the bound"
);

/// A bound of the sidecar on an HTTP/1.1 request head, over which it
/// answers the request itself, before anything else is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadLimit {
    /// More than [`MAX_REQUEST_HEADERS`] fields: 431.
    Fields,
    /// A head longer than [`MAX_REQUEST_HEAD`]: 431.
    Size,
    /// A request target longer than [`MAX_TARGET`]: 414.
    Target,
}

impl HeadLimit {
    /// The bound a whole HTTP/1.1 head with `fields` header fields,
    /// `head` bytes long (as [`http1_head_size`] counts it) and a request
    /// target (path and query) of `target` bytes is over, if any, in the
    /// order the sidecar finds them: the fields as it parses them, then the
    /// head's length, then the target's.
    pub fn http1(fields: usize, head: usize, target: usize) -> Option<Self> {
        if fields > MAX_REQUEST_HEADERS {
            Some(Self::Fields)
        } else if head > MAX_REQUEST_HEAD {
            Some(Self::Size)
        } else if target > MAX_TARGET {
            Some(Self::Target)
        } else {
            None
        }
    }

    /// The status the sidecar answers with.
    pub fn status(self) -> http::StatusCode {
        match self {
            Self::Fields | Self::Size => http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Target => http::StatusCode::URI_TOO_LONG,
        }
    }

    /// What the sidecar's answer says.
    pub fn why(self) -> &'static str {
        match self {
            Self::Fields => TOO_MANY_FIELDS,
            Self::Size => HEAD_TOO_LARGE,
            Self::Target => TARGET_TOO_LONG,
        }
    }
}

/// The largest header list of an HTTP/2 request the sidecar forwards, as
/// HTTP/2 counts it ([`h2_header_list_size`]): a larger one is answered
/// 431 ([`H2_HEADERS_TOO_LARGE`]) before anything else is checked.
pub const H2_MAX_HEADER_LIST: usize = 16 * 1024;
/// What an HTTP/2 request whose header list is over
/// [`H2_MAX_HEADER_LIST`] is answered, with 431.
pub const H2_HEADERS_TOO_LARGE: &str = "request headers (the path and pseudo-headers among them, 32 bytes more for each field) \
     exceed the sidecar's 16 KiB limit";
const _: () = assert!(
    H2_MAX_HEADER_LIST == 16 * 1024,
    "H2_HEADERS_TOO_LARGE names the bound"
);

/// The bound HTTP/2 itself reads a request's header list to in the
/// sidecar (advertised to callers as SETTINGS_MAX_HEADER_LIST_SIZE), four
/// times [`H2_MAX_HEADER_LIST`] so that the sidecar's own bound trips
/// first. h2 refuses a list of this size or more ([`h2_header_list_size`])
/// itself: 431 with no body, on that stream only, before the sidecar's
/// code sees the request (nothing is logged or counted); one over
/// [`H2_HEADER_LIST_ABUSE`], or a header block sent in more than six
/// CONTINUATION frames, ends the whole connection instead.
pub const H2_HEADER_LIST_READ: usize = 4 * H2_MAX_HEADER_LIST;
/// How large a header list h2 reads before it ends the connection with
/// GOAWAY `ENHANCE_YOUR_CALM` instead of refusing the one request: four
/// times [`H2_HEADER_LIST_READ`].
pub const H2_HEADER_LIST_ABUSE: usize = 4 * H2_HEADER_LIST_READ;
/// What `policy explain` says of an HTTP/2 request whose header list
/// reaches [`H2_HEADER_LIST_READ`], answered 431: not the sidecar's words,
/// as its answer has none.
pub const H2_HEADERS_REFUSED_BY_HTTP2: &str = "request headers (counted as HTTP/2 counts them) reach \
     the HTTP/2 layer's 64 KiB bound: it refuses the request itself, before any rule, with no \
     body, and the sidecar logs nothing (a header block sent in more than six \
     CONTINUATION frames ends the connection instead)";
/// What `policy explain` says of an HTTP/2 request whose header list is
/// over [`H2_HEADER_LIST_ABUSE`]: nothing answers it.
pub const H2_HEADERS_END_CONNECTION: &str = "request headers (counted as HTTP/2 counts them) exceed \
     256 KiB: the HTTP/2 layer ends the whole connection (GOAWAY ENHANCE_YOUR_CALM) before any \
     rule, answering no request, and the sidecar logs nothing";
const _: () = assert!(
    H2_HEADER_LIST_READ == 64 * 1024 && H2_HEADER_LIST_ABUSE == 256 * 1024,
    "H2_HEADERS_REFUSED_BY_HTTP2 and H2_HEADERS_END_CONNECTION name the bounds"
);

/// The size of an HTTP/1.1 request head with `method`, `target` and
/// `headers` as a client writes it: `METHOD TARGET HTTP/1.1`, then each
/// header as `name: value`, every line ended by CRLF, then an empty line.
pub fn http1_head_size(method: &str, target: &str, headers: &HeaderMap) -> usize {
    const LINE_END: usize = 2;
    let request_line = method.len() + 1 + target.len() + " HTTP/1.1".len() + LINE_END;
    let fields: usize = (headers.iter())
        .map(|(name, value)| name.as_str().len() + ": ".len() + value.len() + LINE_END)
        .sum();
    request_line + fields + LINE_END
}

/// The size of an HTTP/2 request's header list as HTTP/2 counts it (RFC
/// 9113 section 6.5.2, SETTINGS_MAX_HEADER_LIST_SIZE): each field's name
/// and value, the pseudo-headers among them (`:method`, and `:scheme`,
/// `:authority` and `:path` when the request has them), and 32 bytes for
/// each. No allocation.
pub fn h2_header_list_size(
    method: &str,
    scheme: Option<&str>,
    authority: Option<&str>,
    path: Option<&str>,
    headers: &HeaderMap,
) -> usize {
    const FIELD: usize = 32;
    let pseudo = [
        (":method", Some(method)),
        (":scheme", scheme),
        (":authority", authority),
        (":path", path),
    ];
    let pseudo: usize = (pseudo.iter())
        .filter_map(|(name, value)| value.map(|v| name.len() + v.len() + FIELD))
        .sum();
    let fields: usize = (headers.iter())
        .map(|(name, value)| name.as_str().len() + value.len() + FIELD)
        .sum();
    pseudo + fields
}

/// rule decides it, if it does: only where `reads_paths` (an ALLOW or DENY
/// rule on the request's port, or a rate limit, reads paths; an encoded
/// `/` in an ID is no one's business where nothing compares paths), and
/// never for `OPTIONS *`, which asks about the server as a whole and is
/// decided with `*` as its path, which no path in a rule matches.
pub fn request_path_problem(method: &str, path: &str, reads_paths: bool) -> Option<PathProblem> {
    let asterisk = path == "*" && method == "OPTIONS";
    if !reads_paths || asterisk {
        return None;
    }
    check_path(path).err()
}

/// Whether the proxy decides on `path`, or why not: no `.`/`..` or empty
/// segments (a trailing `/` is fine), what follows a `;` in a segment left
/// out (`..;x` is `..` to a servlet container, and `..%3Bx` to an app that
/// decodes first), and the spaces it ends in (`..%20` and `..\u{00A0}` are
/// `..` to Windows file systems), and no escapes, characters or backslashes an app could
/// read as another path (see the module docs).
pub fn check_path(path: &str) -> Result<(), PathProblem> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PathProblem::Segment);
    };
    check_escapes(path)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if !rest.is_empty()
        && rest.split('/').any(|segment| {
            let s = without_parameters(segment);
            let spaced = without_trailing_spaces(s);
            s.is_empty() || matches!(spaced, "." | "..")
        })
    {
        return Err(PathProblem::Segment);
    }
    Ok(())
}

/// `segment` without the spaces (raw or `%20`, or a character folding into
/// one, [`without_a_folded_space`]) it ends in, which Windows file systems
/// drop: `..%20` and `..%C2%A0` are `..` to them.
fn without_trailing_spaces(segment: &str) -> &str {
    let mut rest = segment;
    loop {
        let trimmed = rest.strip_suffix(' ').or_else(|| rest.strip_suffix("%20"));
        let trimmed = trimmed.unwrap_or_else(|| without_a_folded_space(rest));
        if trimmed.len() == rest.len() {
            return rest;
        }
        rest = trimmed;
    }
}

/// `text` without the character past ASCII it ends in, raw or escaped, if
/// that folds into a space ([`ascii_fold`]: U+00A0 NO-BREAK SPACE, U+2000
/// to U+200A, U+3000 and the like), which an app normalizing the path
/// reads as a space and Windows file systems then drop: `admin\u{00A0}`
/// and `admin%C2%A0` are `admin` to them. Allocates nothing.
fn without_a_folded_space(text: &str) -> &str {
    let is_space = |c: char| !c.is_ascii() && ascii_fold(c) == Some(" ");
    if let Some(c) = text.chars().next_back()
        && is_space(c)
    {
        return &text[..text.len() - c.len_utf8()];
    }
    let bytes = text.as_bytes();
    let mut utf8 = [0u8; 4];
    for escapes in 1..=utf8.len() {
        let Some(at) = bytes.len().checked_sub(3 * escapes) else {
            break;
        };
        let escape = match bytes[at..at + 3] {
            [b'%', h, l] if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => [b'%', h, l],
            _ => break,
        };
        utf8[utf8.len() - escapes] = decode(&escape);
        if let Ok(decoded) = std::str::from_utf8(&utf8[utf8.len() - escapes..])
            && decoded.chars().next().is_some_and(is_space)
        {
            return &text[..at];
        }
    }
    text
}

/// The first escape, character or backslash in `path` that an app could
/// read as another path than the one written. Reads `path` as an app
/// decodes it, one byte at a time (raw or escaped), and each character
/// past ASCII whole, from raw bytes or escapes alike; allocates nothing.
fn check_escapes(path: &str) -> Result<(), PathProblem> {
    let bytes = path.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let (byte, len) = decoded_at(path, at)?;
        at += len;
        if byte.is_ascii() {
            continue;
        }
        // The first byte of a character past ASCII says how many follow.
        let need = match byte {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return Err(PathProblem::NotUtf8),
        };
        let mut utf8 = [byte, 0, 0, 0];
        for slot in &mut utf8[1..need] {
            if at >= bytes.len() {
                return Err(PathProblem::NotUtf8);
            }
            let (next, len) = decoded_at(path, at)?;
            *slot = next;
            at += len;
        }
        // Overlong forms, surrogates and bytes that continue nothing fail
        // here.
        let c = std::str::from_utf8(&utf8[..need])
            .map_err(|_| PathProblem::NotUtf8)?
            .chars()
            .next()
            .expect("one character");
        if let Some(like) = look_alike(c) {
            return Err(PathProblem::LookAlike(c, like));
        }
    }
    Ok(())
}

/// The byte at `at` in `path` as an app decodes it, and how many bytes of
/// `path` it took: itself, or a `%XX` escape; or why an app could read
/// it as another path. An encoded `%` is refused before two hex digits as
/// an app normalizing the path reads what follows ([`routed_bytes`]):
/// `%25\u{FF12}\u{FF46}` is `%252f` to NFKC, `/` decoded twice.
fn decoded_at(path: &str, at: usize) -> Result<(u8, usize), PathProblem> {
    let bytes = path.as_bytes();
    match bytes[at] {
        b'\\' => Err(PathProblem::Backslash),
        b'%' => {
            let escape = match bytes.get(at..at + 3) {
                Some(&[p, h, l]) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => [p, h, l],
                _ => return Err(PathProblem::BadEscape),
            };
            match decode(&escape) {
                b'/' => Err(PathProblem::EncodedSlash(escape)),
                b'\\' => Err(PathProblem::EncodedBackslash(escape)),
                c if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                    Err(PathProblem::EncodedUnreserved(escape))
                }
                c if c.is_ascii_control() => Err(PathProblem::EncodedControl(escape)),
                b'%' => {
                    // The escape is ASCII, so a character starts after it.
                    let mut next = routed_bytes(&path[at + 3..]);
                    match (next.next(), next.next()) {
                        (Some(h), Some(l)) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => {
                            Err(PathProblem::DoubleEncoded([
                                escape[0], escape[1], escape[2], h, l,
                            ]))
                        }
                        _ => Ok((b'%', 3)),
                    }
                }
                c => Ok((c, 3)),
            }
        }
        b => Ok((b, 1)),
    }
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
            .map(|p| PathPattern::parse_stored(p).expect("validated path").0)
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

    /// Whether the entry matches request paths (paths or a gRPC service).
    pub fn reads_paths(&self) -> bool {
        !self.paths.is_empty()
    }

    /// Whether `req` matches, for a rule of a policy with `action`.
    ///
    /// A header sent more than once must never help a request get allowed:
    /// apps mostly read the first value, some the last or all of them. So
    /// for ALLOW a header condition holds only if the header is there and
    /// every value of it matches; for DENY, and AUDIT's "would deny", if
    /// any value matches. HTTP lets one line carry a list
    /// (`x-env: prod, canary` is `x-env` sent twice), and an app that reads
    /// lists sees `canary` in it: so for DENY and AUDIT an element of a
    /// comma-separated value matches too, while for ALLOW the whole value
    /// must (a list is never one allowed value).
    ///
    /// A name with `_` for some `-` (or the other way) is the same header:
    /// CGI and WSGI servers make one variable of both (`x_debug` and
    /// `x-debug` are `HTTP_X_DEBUG`), so a copy sent with the other
    /// spelling counts as a copy ([`same_header`]).
    ///
    /// Paths likewise: an ALLOW rule matches a path as sent, while a DENY
    /// or AUDIT rule matches the spellings an app may route as the same
    /// resource too ([`PathPattern::matches_as_routed`]).
    pub fn matches(&self, req: &HttpRequest<'_>, action: Action) -> bool {
        let path_matches = |p: &PathPattern| match action {
            Action::Allow => p.matches(req.path),
            Action::Deny | Action::Audit => p.matches_as_routed(req.path),
        };
        (self.methods.is_empty() || self.methods.iter().any(|m| **m == *req.method))
            && (self.paths.is_empty() || self.paths.iter().any(path_matches))
            && self.headers.iter().all(|(name, value)| {
                let mut values = same_header(req.headers, name);
                let want = value.as_bytes();
                let is = |v: &HeaderValue| v.as_bytes() == want;
                let holds = |v: &HeaderValue| {
                    is(v)
                        || v.as_bytes()
                            .split(|b| *b == b',')
                            .any(|element| element.trim_ascii() == want)
                };
                match action {
                    Action::Allow => values.next().is_some_and(is) && values.all(is),
                    Action::Deny | Action::Audit => values.any(holds),
                }
            })
    }
}

/// The values of the header `name` (lower case) in `headers`, with those
/// of the names an app reads as the same: spelled with `_` for some `-`,
/// or the other way. Allocates nothing; the fields of other names are
/// looked through only when a name in the request could be one (it has a
/// `_`, or a `-` where `name` has a `_`).
fn same_header<'a>(
    headers: &'a HeaderMap,
    name: &'a str,
) -> impl Iterator<Item = &'a HeaderValue> + 'a {
    let spelled = headers
        .keys()
        .any(|n| n.as_str().contains('_') || (name.contains('_') && n.as_str().contains('-')));
    let others = spelled.then(|| {
        headers
            .iter()
            .filter(move |(n, _)| n.as_str() != name && reads_as(n.as_str(), name))
            .map(|(_, v)| v)
    });
    headers
        .get_all(name)
        .iter()
        .chain(others.into_iter().flatten())
}

/// Whether the field names `a` and `b` differ at most in `_` for `-`.
fn reads_as(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .all(|(a, b)| a == b || matches!((a, b), (b'_', b'-') | (b'-', b'_')))
}

#[cfg(test)]
mod tests {
    use super::super::ascii_folds::ASCII_FOLDS_UNICODE;
    use super::*;

    fn matches(pattern: &str, path: &str) -> bool {
        PathPattern::parse(pattern).unwrap().matches(path)
    }

    /// A raw `#` anywhere in a target is refused, in its path, its query
    /// or an absolute-form one; `%23` is a `#` in a path and goes.
    #[test]
    fn a_target_with_a_raw_fragment_mark_is_refused() {
        for target in [
            "/public#/../admin",
            "/admin#",
            "/a?q=1#x",
            "http://api:8080/public#x",
        ] {
            assert_eq!(target_problem(target), Some(TARGET_FRAGMENT), "{target}");
        }
        for target in ["/a%23b", "/a?q=%23", "http://api:8080/a%23", "*"] {
            assert_eq!(target_problem(target), None, "{target}");
        }
        assert_eq!(
            TARGET_FRAGMENT,
            "request target contains '#': a request carries no fragment (send a '#' in a path \
             or query as %23)"
        );
    }

    /// A head is sized as a client writes it in HTTP/1.1, and a header
    /// list as HTTP/2 counts it.
    #[test]
    fn a_head_is_sized_as_each_version_counts_it() {
        let mut headers = HeaderMap::new();
        headers.append(http::header::HOST, HeaderValue::from_static("api"));
        headers.append("x-a", HeaderValue::from_static("1"));
        let written = "GET /users HTTP/1.1\r\nhost: api\r\nx-a: 1\r\n\r\n";
        assert_eq!(http1_head_size("GET", "/users", &headers), written.len());
        let list = (7 + 3) + (7 + 4) + (10 + 3) + (5 + 6) + (4 + 3) + (3 + 1) + 6 * 32;
        let size = h2_header_list_size("GET", Some("http"), Some("api"), Some("/users"), &headers);
        assert_eq!(size, list);
    }

    /// An HTTP/1.1 head over several bounds is refused for the first the
    /// sidecar finds: its fields, then its length, then its target's.
    #[test]
    fn an_http1_head_is_refused_for_the_first_bound_it_is_over() {
        let over = |fields, head, target| HeadLimit::http1(fields, head, target);
        let (head, target) = (MAX_REQUEST_HEAD + 1, MAX_TARGET + 1);
        assert_eq!(over(101, head, target), Some(HeadLimit::Fields));
        assert_eq!(over(100, head, target), Some(HeadLimit::Size));
        assert_eq!(over(100, MAX_REQUEST_HEAD, target), Some(HeadLimit::Target));
        assert_eq!(over(100, MAX_REQUEST_HEAD, MAX_TARGET), None);
        assert_eq!(HeadLimit::Target.status().as_u16(), 414);
        assert_eq!(HeadLimit::Fields.status().as_u16(), 431);
    }

    /// A second `Host` is refused whatever the target; one that names
    /// another host or port than the target's authority is refused, one
    /// naming the same in another letter case or with the same port is
    /// not, and an origin-form target (no authority) leaves one alone.
    #[test]
    fn a_host_is_refused_when_doubled_or_naming_another_authority() {
        let hosts = |values: &[&str]| {
            let mut map = HeaderMap::new();
            for v in values {
                map.append(http::header::HOST, HeaderValue::from_str(v).unwrap());
            }
            map
        };
        let api: http::uri::Authority = "api:8080".parse().unwrap();
        let problem = |values: &[&str], target| host_problem(&hosts(values), target, false);
        assert_eq!(problem(&["api", "api"], None), Some(MORE_THAN_ONE_HOST));
        assert_eq!(
            problem(&["api:8080", "api:8080"], Some(&api)),
            Some(MORE_THAN_ONE_HOST)
        );
        assert_eq!(problem(&["other:8080"], Some(&api)), Some(HOST_DIFFERS));
        assert_eq!(problem(&["api:9090"], Some(&api)), Some(HOST_DIFFERS));
        assert_eq!(problem(&["api"], Some(&api)), Some(HOST_DIFFERS));
        assert_eq!(problem(&["user@api:8080"], Some(&api)), Some(HOST_DIFFERS));
        assert_eq!(problem(&["API:8080"], Some(&api)), None);
        assert_eq!(problem(&["other"], None), None);
        assert_eq!(problem(&[], Some(&api)), None);
        assert_eq!(MORE_THAN_ONE_HOST, "more than one Host header");
    }

    /// A request that must have a `Host` (HTTP/1.1 in origin form) is
    /// refused without one, and not when it need not; an authority with
    /// a userinfo part is refused, with or without a `Host`.
    #[test]
    fn a_missing_host_or_a_userinfo_authority_is_refused() {
        let none = HeaderMap::new();
        let mut api = HeaderMap::new();
        api.insert(http::header::HOST, HeaderValue::from_static("api"));
        assert_eq!(host_problem(&none, None, true), Some(MISSING_HOST));
        assert_eq!(host_problem(&none, None, false), None);
        assert_eq!(host_problem(&api, None, true), None);
        let user: http::uri::Authority = "user@api".parse().unwrap();
        assert_eq!(
            host_problem(&api, Some(&user), false),
            Some(AUTHORITY_USERINFO)
        );
        assert_eq!(
            host_problem(&none, Some(&user), false),
            Some(AUTHORITY_USERINFO)
        );
        assert_eq!(
            MISSING_HOST,
            "missing Host header: an HTTP/1.1 request names its host in one \
             (or in an absolute-form target)"
        );
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
    fn a_deny_matches_the_spellings_an_app_routes_as_the_same_path() {
        let routed = |pattern: &str, path: &str| {
            PathPattern::parse(pattern).unwrap().matches_as_routed(path)
        };
        for (pattern, path) in [
            ("/admin", "/admin"),
            ("/admin", "/admin/"),
            ("/admin", "/admin;jsessionid=1"),
            ("/admin", "/admin;x/"),
            ("/admin/*", "/admin;x/users"),
            ("/admin/users", "/admin;a=1/users;b=2"),
            ("/users/{id}", "/users/7/"),
            ("/", "/;x"),
            ("/admin", "/admin/;x"),
            ("/a;b", "/a;b/"),
            ("/admin/*", "/ADMIN/x"),
            ("/admin/*", "/Admin"),
            ("/admin", "/aDmIn;x/"),
            ("/users/{id}/edit", "/Users/7/EDIT"),
            ("/a%3Ab", "/A%3aB"),
        ] {
            assert!(
                routed(pattern, path),
                "{pattern} must match {path} for a DENY"
            );
        }
        for (pattern, path) in [
            ("/admin", "/administrator"),
            ("/admin", "/x;/admin"),
            ("/admin", "/admin/x"),
            ("/users/{id}", "/users/"),
        ] {
            assert!(!routed(pattern, path), "{pattern} matched {path}");
        }
        // An ALLOW keeps to the path as sent.
        assert!(!matches("/admin", "/admin/"));
        assert!(!matches("/admin", "/admin;x"));
        assert!(!matches("/public/*", "/PUBLIC/x"));
        assert!(!matches("/public/*", "/Public"));
    }

    /// Apps decode a path before routing it: a DENY of a path with a
    /// character that may be sent escaped (`:` of a custom method, a
    /// letter past ASCII) must not be passed by sending it escaped, nor a
    /// DENY written escaped by sending it raw. An ALLOW keeps to the path
    /// as sent.
    #[test]
    fn a_deny_matches_a_segment_sent_with_its_characters_escaped() {
        let routed = |pattern: &str, path: &str| {
            PathPattern::parse(pattern).unwrap().matches_as_routed(path)
        };
        for (pattern, path) in [
            ("/v1/items:purge", "/v1/items%3Apurge"),
            ("/v1/items:purge", "/v1/items%3apurge"),
            ("/v1/items:purge", "/V1/ITEMS%3APURGE;x/"),
            ("/v1/items%3Apurge", "/v1/items:purge"),
            ("/caf\u{e9}/*", "/caf%C3%A9/menu"),
            ("/caf%c3%a9", "/caf\u{e9}"),
            ("/users/{id}/a@b", "/users/7/a%40b"),
            ("/a%20b", "/a%20B"),
        ] {
            assert!(
                routed(pattern, path),
                "{pattern} must match {path} for a DENY"
            );
        }
        for (pattern, path) in [
            ("/v1/items:purge", "/v1/items%3Bpurge"),
            ("/v1/items:purge", "/v1/items%3A"),
            ("/a%20b", "/a%2520b"),
            ("/caf\u{e9}", "/caf%C3%89"),
        ] {
            assert!(!routed(pattern, path), "{pattern} matched {path}");
        }
        assert!(!matches("/v1/items:purge", "/v1/items%3Apurge"));
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
    fn refuses_paths_an_app_could_read_as_another() {
        assert_eq!(check_path("/"), Ok(()));
        assert_eq!(check_path("/a/b/"), Ok(()));
        assert_eq!(
            check_path("/a%20b/%25/%3a"),
            Ok(()),
            "other escapes are fine"
        );
        for fine in [
            "/caf%C3%A9",
            "/caf\u{e9}/%e2%82%ac",
            "/%25zz",
            "/50%25",
            "/%F0%9F%98%80",
        ] {
            assert_eq!(check_path(fine), Ok(()), "{fine}");
        }
        assert_eq!(check_path("/a//b"), Err(PathProblem::Segment));
        assert_eq!(check_path("/a/../admin"), Err(PathProblem::Segment));
        assert_eq!(check_path("/./a"), Err(PathProblem::Segment));
        // A servlet container drops `;x` before it resolves dot segments.
        for path in [
            "/public/..;/admin",
            "/x/..;x/admin/users",
            "/.;/a",
            "/a/;x/b",
        ] {
            assert_eq!(check_path(path), Err(PathProblem::Segment), "{path}");
        }
        assert_eq!(check_path("/admin;jsessionid=1/x"), Ok(()));
        for (path, problem) in [
            (
                "/%61dmin/x",
                "path encodes 'a' as %61: send unreserved characters as they are (RFC 3986)",
            ),
            (
                "/%2e%2e/admin",
                "path encodes '.' as %2e: send unreserved characters as they are (RFC 3986)",
            ),
            (
                "/x/%7E",
                "path encodes '~' as %7E: send unreserved characters as they are (RFC 3986)",
            ),
            (
                "/admin%2Fx",
                "path encodes '/' as %2F: an app could read it as a separator",
            ),
            (
                "/admin%2fx",
                "path encodes '/' as %2f: an app could read it as a separator",
            ),
            (
                "/admin%5cx",
                "path encodes '\\' as %5c: an app could read it as a separator",
            ),
            (
                "/admin\\x",
                "path contains '\\': an app could read it as a separator",
            ),
            ("/a%zzb", "path has a '%' not followed by two hex digits"),
            ("/a%u0061", "path has a '%' not followed by two hex digits"),
            ("/a%2", "path has a '%' not followed by two hex digits"),
            (
                "/public/..%00/admin",
                "path encodes a control character as %00: an app could cut the path there",
            ),
            (
                "/admin%1f",
                "path encodes a control character as %1f: an app could cut the path there",
            ),
            (
                "/admin%7F",
                "path encodes a control character as %7F: an app could cut the path there",
            ),
            (
                "/public/%252e%252e/admin",
                "path encodes '%' as %25 before two hex digits (%252e): an app that decodes \
                 twice could read another path",
            ),
            (
                "/public/%c0%ae%c0%ae/admin",
                "path has percent escapes that do not decode to UTF-8",
            ),
            (
                "/caf%e9",
                "path has percent escapes that do not decode to UTF-8",
            ),
            (
                "/a%c3",
                "path has percent escapes that do not decode to UTF-8",
            ),
            (
                "/a%c3%20",
                "path has percent escapes that do not decode to UTF-8",
            ),
            (
                "/a%a9",
                "path has percent escapes that do not decode to UTF-8",
            ),
            (
                "/public/%ef%bc%8e%ef%bc%8e/admin",
                "path contains U+FF0E, which an app could read as '.'",
            ),
            (
                "/public/\u{ff0e}\u{ff0e}/admin",
                "path contains U+FF0E, which an app could read as '.'",
            ),
            (
                "/public/%e2%80%a5/admin",
                "path contains U+2025, which an app could read as '..'",
            ),
            (
                "/public/\u{2025}/admin",
                "path contains U+2025, which an app could read as '..'",
            ),
            (
                "/public/%EF%B8%B0/admin",
                "path contains U+FE30, which an app could read as '..'",
            ),
            (
                "/public%EF%BC%8Fadmin",
                "path contains U+FF0F, which an app could read as '/'",
            ),
            (
                "/public%e2%88%95admin",
                "path contains U+2215, which an app could read as '/'",
            ),
            (
                "/public%ef%bc%bcadmin",
                "path contains U+FF3C, which an app could read as '\\'",
            ),
        ] {
            assert_eq!(check_path(path).unwrap_err().to_string(), problem, "{path}");
        }
    }

    /// NFKC turns U+2100 ACCOUNT OF into `a/c`, a separator between two
    /// letters: an app normalizing `/\u{2100}/keys` routes `/a/c/keys`,
    /// which a DENY of `/a/c/*` must not miss. Each such character, raw
    /// or escaped, is refused like the other look-alikes.
    #[test]
    fn characters_that_fold_into_text_with_a_slash_are_refused() {
        for (c, like) in [
            ('\u{2100}', "a/c"),
            ('\u{2101}', "a/s"),
            ('\u{2105}', "c/o"),
            ('\u{2106}', "c/u"),
        ] {
            let mut utf8 = [0; 4];
            let raw = c.encode_utf8(&mut utf8);
            let escaped: String = raw.bytes().map(|b| format!("%{b:02X}")).collect();
            let problem = PathProblem::LookAlike(c, like);
            for path in [format!("/{raw}/keys"), format!("/x{escaped}y")] {
                assert_eq!(check_path(&path), Err(problem), "{path}");
            }
            assert_eq!(
                problem.to_string(),
                format!(
                    "path contains U+{:04X}, which an app could read as '{like}'",
                    u32::from(c)
                )
            );
        }
        assert_eq!(check_path("/a/c/keys"), Ok(()));
    }

    /// NFKC turns U+037E GREEK QUESTION MARK into `;` (a segment parameter
    /// to a servlet container: `/admin\u{37E}x` is `/admin`), U+2026 into
    /// `...` (dots a segment may end in), U+FF05 into `%` (an escape read
    /// again: `\u{FF05}61` is `a`) and U+FF1F into `?` (the end of the
    /// path). Each such character, raw or escaped, is refused like the
    /// other look-alikes, and the refusal names it.
    #[test]
    fn characters_that_fold_into_a_parameter_an_ellipsis_an_escape_or_an_end_are_refused() {
        for (c, like) in [
            ('\u{037E}', ";"),
            ('\u{FE14}', ";"),
            ('\u{FE54}', ";"),
            ('\u{FF1B}', ";"),
            ('\u{2026}', "..."),
            ('\u{FE19}', "..."),
            ('\u{FE6A}', "%"),
            ('\u{FF05}', "%"),
            ('\u{FE16}', "?"),
            ('\u{FE56}', "?"),
            ('\u{FF1F}', "?"),
            ('\u{2047}', "??"),
            ('\u{2048}', "?!"),
            ('\u{2049}', "!?"),
            ('\u{FE5F}', "#"),
            ('\u{FF03}', "#"),
        ] {
            let mut utf8 = [0; 4];
            let raw = c.encode_utf8(&mut utf8);
            let escaped: String = raw.bytes().map(|b| format!("%{b:02x}")).collect();
            for path in [format!("/admin{raw}x"), format!("/admin/{escaped}")] {
                assert_eq!(
                    check_path(&path).unwrap_err().to_string(),
                    format!(
                        "path contains U+{:04X}, which an app could read as '{like}'",
                        u32::from(c)
                    ),
                    "{path}"
                );
            }
        }
        for fine in ["/admin;x", "/admin...", "/a%20b", "/x%3F", "/x%23"] {
            assert_eq!(check_path(fine), Ok(()), "{fine}");
        }
    }

    /// Windows file systems, and so IIS and apps serving files from them,
    /// drop the `.`s a segment ends in: `/admin.` is `/admin` to them. A
    /// DENY (and a limit's path match) takes such a segment for the one
    /// without them; an ALLOW matches only the path as sent.
    #[test]
    fn a_deny_matches_a_segment_with_trailing_dots_left_out() {
        let routed = |pattern: &str, path: &str| {
            PathPattern::parse(pattern).unwrap().matches_as_routed(path)
        };
        for (pattern, path) in [
            ("/admin", "/admin."),
            ("/admin", "/ADMIN../"),
            ("/admin", "/admin.;x"),
            ("/admin/*", "/admin./keys"),
            ("/admin/keys", "/admin/keys..."),
            ("/v1/items:purge", "/v1/items%3Apurge."),
            ("/admin.", "/admin"),
            ("/users/{id}", "/users/..."),
        ] {
            assert!(
                routed(pattern, path),
                "{pattern} must match {path} for a DENY"
            );
        }
        for (pattern, path) in [
            ("/admin", "/admin.x"),
            ("/admin", "/admin./x"),
            ("/a", "/..."),
        ] {
            assert!(!routed(pattern, path), "{pattern} matched {path}");
        }
        assert!(!matches("/admin", "/admin."));
        assert_eq!(
            routed_segments("/a../b.;x/.../", true).collect::<Vec<_>>(),
            ["a", "b", "..."]
        );
    }

    /// NFKC folds the fullwidth forms of ASCII (U+FF01 to U+FF5E) into
    /// ASCII: an app normalizing `/\u{FF41}dmin` routes `/admin`. A DENY
    /// reads them, raw or escaped, as the ASCII they fold into; an ALLOW
    /// matches only the path as sent.
    #[test]
    fn a_deny_matches_fullwidth_ascii_as_the_ascii_it_folds_into() {
        let routed = |pattern: &str, path: &str| {
            PathPattern::parse(pattern).unwrap().matches_as_routed(path)
        };
        for (pattern, path) in [
            ("/admin", "/\u{FF41}\u{FF44}\u{FF4D}\u{FF49}\u{FF4E}"),
            ("/admin/*", "/%EF%BC%A1DMIN/keys"),
            ("/admin/*", "/a%ef%bd%84min"),
            ("/v1/items:purge", "/v1/items\u{FF1A}purge"),
            ("/v1/items:purge", "/v1/\u{FF49}tems%3Apurge."),
            ("/\u{FF41}dmin", "/ADMIN"),
        ] {
            assert!(
                routed(pattern, path),
                "{pattern} must match {path} for a DENY"
            );
        }
        for (pattern, path) in [
            ("/admin", "/\u{FF41}dmi"),
            ("/admin", "/\u{FF41}\u{FF41}dmin"),
            ("/caf\u{e9}", "/caf\u{FF45}"),
        ] {
            assert!(!routed(pattern, path), "{pattern} matched {path}");
        }
        assert!(!matches("/admin", "/\u{FF41}dmin"));
        let bytes = |text: &str| routed_bytes(text).collect::<Vec<_>>();
        assert_eq!(bytes("x\u{FF01}%EF%BD%9E"), b"x!~");
        for outside in ["\u{FF00}", "\u{FF5F}", "\u{FFE0}", "\u{e9}", "\u{EFBF}"] {
            assert_eq!(bytes(outside), outside.as_bytes(), "{outside:?}");
        }
    }

    /// The folds an app could read a character past ASCII as, computed
    /// from Unicode's data for every code point: its NFKC form when that is
    /// all ASCII, else its upper or lower case when that is (the lower case
    /// of U+0130 is `i` and a combining dot, which simple case mapping
    /// drops), else the same of what NFKC or a case mapping made of it, as
    /// an app normalizing and then ignoring case reads it (U+1D6A4 is
    /// U+0131 to NFKC, and `I` upper-cased; U+1E9E lower-cases to `\u{DF}`,
    /// which upper-cases to `SS`). `ASCII_FOLDS` must be exactly those,
    /// sorted, so that one a new Unicode adds, or one left out, fails here.
    /// With `TRELLIS_WRITE_ASCII_FOLDS=1` the table is written again
    /// instead. Computed once for all the tests that walk it: a character
    /// that NFKC and both case mappings leave as it is (most of them) is
    /// passed over without building any text.
    fn computed_ascii_folds() -> &'static [(char, String)] {
        use unicode_normalization::UnicodeNormalization;
        static FOLDS: std::sync::OnceLock<Vec<(char, String)>> = std::sync::OnceLock::new();
        FOLDS.get_or_init(|| {
            let mut folds = Vec::new();
            for c in '\u{80}'..=char::MAX {
                let itself = |mapped: &mut dyn Iterator<Item = char>| {
                    mapped.next() == Some(c) && mapped.next().is_none()
                };
                if itself(&mut std::iter::once(c).nfkc())
                    && itself(&mut c.to_lowercase())
                    && itself(&mut c.to_uppercase())
                {
                    continue;
                }
                if let Some(fold) = ascii_reading(&c.to_string(), 2) {
                    folds.push((c, fold));
                }
            }
            folds
        })
    }

    /// The ASCII an app could read `text` as (see [`computed_ascii_folds`]),
    /// looking through at most `depth` more rounds of NFKC and case
    /// mapping past the first. Only a character itself, not what a
    /// mapping made of it, is read by its simple lower case: U+01F0
    /// upper-cases to `J` and a combining caron, which no app reads as `j`.
    fn ascii_reading(text: &str, depth: usize) -> Option<String> {
        use unicode_normalization::UnicodeNormalization;
        use unicode_normalization::char::is_combining_mark;
        let nfkc: String = text.nfkc().collect();
        let upper = text.to_uppercase();
        let lower = text.to_lowercase();
        let mut chars = text.chars();
        let itself = chars.next().filter(|_| chars.next().is_none());
        let mut rest = lower.chars();
        let simple_lower = rest
            .next()
            .filter(|first| itself.is_some() && first.is_ascii() && rest.all(is_combining_mark));
        if nfkc.is_ascii() {
            return Some(nfkc);
        } else if lower.is_ascii() {
            return Some(lower);
        } else if upper.is_ascii() {
            return Some(upper.to_ascii_lowercase());
        } else if let Some(first) = simple_lower {
            return Some(first.to_string());
        }
        let depth = depth.checked_sub(1)?;
        [nfkc, lower, upper]
            .into_iter()
            .filter(|mapped| mapped != text)
            .find_map(|mapped| ascii_reading(&mapped, depth))
    }

    /// Whether this toolchain's case mapping (the standard library's
    /// Unicode data) is the one `ASCII_FOLDS` was made with. Another
    /// toolchain's may differ by the characters a newer Unicode adds, which
    /// says nothing of this code: the tests walking every code point then
    /// say they are skipped, and why.
    fn case_mapping_is_the_tables() -> bool {
        let same = char::UNICODE_VERSION == ASCII_FOLDS_UNICODE;
        if !same {
            println!(
                "skipped: ASCII_FOLDS was made with the case mapping of Unicode {:?}, this \
                 toolchain has {:?}; run ascii_folds_are_every_character_apps_read_as_ascii \
                 with TRELLIS_WRITE_ASCII_FOLDS=1 to write it again",
                ASCII_FOLDS_UNICODE,
                char::UNICODE_VERSION
            );
        }
        same
    }

    #[test]
    fn ascii_folds_are_every_character_apps_read_as_ascii() {
        let writing = std::env::var_os("TRELLIS_WRITE_ASCII_FOLDS").is_some();
        if !writing && !case_mapping_is_the_tables() {
            return;
        }
        let want = computed_ascii_folds();
        if writing {
            let mut text = String::from(
                "//! Generated by the test `policy::l7::tests::ascii_folds_are_every_character_apps_read_as_ascii`\n\
                 //! (run it with `TRELLIS_WRITE_ASCII_FOLDS=1` to write this file again); do not edit.\n\n\
                 /// The Unicode version of the case mapping the table was made with.\n\
                 #[cfg(test)]\n",
            );
            text += &format!(
                "pub(super) const ASCII_FOLDS_UNICODE: (u8, u8, u8) = {:?};\n\n\
                 /// Every character past ASCII that an app could read as ASCII text, with\n\
                 /// that text, sorted by character: those whose Unicode NFKC form is all\n\
                 /// ASCII, those whose upper or lower case is, and those whose NFKC form\n\
                 /// or case is a character one of those reads as ASCII.\n\
                 pub(super) static ASCII_FOLDS: [(char, &str); {}] = [\n",
                char::UNICODE_VERSION,
                want.len()
            );
            for (c, fold) in want {
                text += &format!("    ('\\u{{{:04X}}}', {fold:?}),\n", u32::from(*c));
            }
            text += "];\n";
            let file = concat!(env!("CARGO_MANIFEST_DIR"), "/src/policy/ascii_folds.rs");
            std::fs::write(file, text).unwrap();
            return;
        }
        let have: Vec<(char, String)> = ASCII_FOLDS
            .iter()
            .map(|&(c, fold)| (c, fold.to_owned()))
            .collect();
        if let Some(at) = (0..want.len().max(have.len())).find(|&at| want.get(at) != have.get(at)) {
            panic!(
                "ASCII_FOLDS differs from Unicode's data at entry {at}: it has {:?}, Unicode gives {:?} \
                 ({} entries, {} wanted); run this test with TRELLIS_WRITE_ASCII_FOLDS=1 to write it again",
                have.get(at),
                want.get(at),
                have.len(),
                want.len()
            );
        }
        assert!(
            ASCII_FOLDS.is_sorted_by_key(|&(c, _)| c),
            "sorted for the binary search"
        );
        for (c, fold) in want {
            assert_eq!(ascii_fold(*c), Some(fold.as_str()), "{c:?}");
            assert!(
                fold == " " || !fold.contains(' '),
                "U+{:04X} folds into {fold:?}: only a lone space is dropped at a segment's end",
                u32::from(*c)
            );
        }
        for c in ['a', '\u{e9}', '\u{FF00}', '\u{10FFFF}'] {
            assert_eq!(ascii_fold(c), None, "{c:?}");
        }
    }

    /// Every character an app could read as ASCII text with a `.`, `/`,
    /// `\\`, `;`, `%`, `?` or `#` in it is refused, raw or escaped, naming
    /// what it could be read as; every other one a DENY matches as the
    /// ASCII it folds into, and is not refused.
    #[test]
    fn every_character_folding_into_a_refused_character_is_refused_and_the_rest_are_read() {
        // Written out rather than `REFUSED_IN_FOLDS`, so that a character
        // left out of that fails here.
        let refusing = ['.', '/', '\\', ';', '%', '?', '#'];
        if !case_mapping_is_the_tables() {
            return;
        }
        let mut refused = 0;
        for &(c, ref fold) in computed_ascii_folds() {
            let mut utf8 = [0; 4];
            let raw = c.encode_utf8(&mut utf8);
            let escaped: String = raw.bytes().map(|b| format!("%{b:02X}")).collect();
            for path in [format!("/x{raw}y"), format!("/x{escaped}y")] {
                let problem = check_path(&path);
                if fold.contains(refusing) {
                    assert_eq!(
                        problem,
                        Err(PathProblem::LookAlike(c, fold_static(c))),
                        "{path}"
                    );
                } else {
                    assert_eq!(problem, Ok(()), "{path}");
                    let text = format!("x{fold}y");
                    assert!(
                        segment_routes_as(&text.replace(' ', "%20"), &path[1..]),
                        "a DENY of /{text} must match {path}"
                    );
                }
            }
            refused += usize::from(fold.contains(refusing));
        }
        for &(c, like) in &BEST_FIT_LOOK_ALIKES {
            assert_eq!(
                check_path(&format!("/x{c}y")),
                Err(PathProblem::LookAlike(c, like))
            );
        }
        assert_eq!(
            refused, 52,
            "the characters NFKC folds into ASCII text that is refused"
        );
    }

    fn fold_static(c: char) -> &'static str {
        ascii_fold(c).expect("a fold")
    }

    /// Apps applying NFKC read more than fullwidth forms as ASCII, and
    /// apps ignoring case with Unicode rules read `\u{0131}` as `I` and
    /// `\u{0130}` as `i`: a DENY reads each such character, raw or
    /// escaped, as the ASCII it folds into, a ligature as its letters,
    /// and a character folding into a space at a segment's end is dropped
    /// as a space is. An ALLOW matches only the path as sent.
    #[test]
    fn a_deny_matches_characters_apps_read_as_ascii_as_that_ascii() {
        let routed = |pattern: &str, path: &str| {
            PathPattern::parse(pattern).unwrap().matches_as_routed(path)
        };
        for (pattern, path) in [
            ("/admin", "/\u{1D41A}dmin"),
            ("/admin", "/%F0%9D%90%9Admin"),
            ("/admin", "/\u{24D0}dmin"),
            ("/admin", "/\u{24B6}DMIN"),
            ("/admin", "/adm\u{0131}n"),
            ("/admin", "/ADM\u{0130}N"),
            ("/admin", "/adm%C4%B1n"),
            ("/admin", "/\u{00AA}dmi\u{207F}"),
            ("/secret", "/\u{017F}ecret"),
            ("/kube", "/\u{212A}ube"),
            ("/v2", "/v\u{00B2}"),
            ("/admin", "/admin\u{00A0}"),
            ("/admin", "/admin%C2%A0"),
            ("/admin", "/admin\u{2003}.%E3%80%80/"),
            ("/admin/*", "/admin\u{202F}/keys"),
            ("/a%20b", "/a\u{00A0}b"),
            ("/files", "/\u{FB01}les"),
            ("/files", "/%EF%AC%81LES"),
            ("/weight/2kg", "/weight/2\u{338F}"),
            ("/xii", "/\u{216B}"),
            ("/(a)", "/\u{249C}"),
            ("/tel", "/\u{2121}"),
            ("/strasse", "/stra\u{00DF}e"),
            ("/strasse", "/STRA\u{1E9E}E"),
            ("/admin", "/adm\u{1D6A4}n"),
            ("/admin", "/adm%F0%9D%9A%A4n"),
            ("/\u{1D41A}dmin", "/ADMIN"),
        ] {
            assert!(
                routed(pattern, path),
                "{pattern} must match {path} for a DENY"
            );
            assert!(check_path(path).is_ok(), "{path} is refused");
            assert!(
                !matches(pattern, path),
                "an ALLOW of {pattern} allowed {path}"
            );
        }
        for (pattern, path) in [
            ("/admin", "/\u{1D41A}dmi"),
            ("/admin", "/admin\u{00A0}x"),
            ("/admin", "/\u{00A0}admin"),
            ("/fle", "/\u{FB01}le"),
            ("/fi", "/\u{FB01}x"),
            ("/admin", "/\u{1D41A}\u{1D41A}dmin"),
            ("/caf\u{e9}", "/caf\u{1D41E}"),
        ] {
            assert!(!routed(pattern, path), "{pattern} matched {path}");
        }
        let bytes = |text: &str| routed_bytes(text).collect::<Vec<_>>();
        assert_eq!(bytes("\u{1D41A}\u{FB01}%E2%85%AB\u{0131}"), b"afiXIIi");
        assert_eq!(bytes("%F0\u{1D41A}"), [0xF0, b'a']);
        assert_eq!(bytes("%F0%9D%90"), [0xF0, 0x9D, 0x90]);
        assert_eq!(bytes("\u{1F600}\u{24D0}"), [0xF0, 0x9F, 0x98, 0x80, b'a']);
        assert_eq!(
            routed_segments("/a\u{00A0}/b%E2%80%8A.", true).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(
            routed_segments("/\u{00A0}", true).collect::<Vec<_>>(),
            ["\u{00A0}"]
        );
    }

    /// A character an app could read as a `.` or several (U+2024 ONE DOT
    /// LEADER, U+FE52 SMALL FULL STOP, U+2488 `1.`, U+33C2 `a.m.`) is
    /// refused, raw or escaped, naming it; and a character folding into a
    /// space makes a dot segment before it one still (`..\u{00A0}` is `..`
    /// to an app normalizing the path on Windows).
    #[test]
    fn characters_folding_into_dots_are_refused_and_folded_spaces_end_no_dot_segment() {
        for (path, problem) in [
            (
                "/public/\u{2024}\u{2024}/admin",
                "path contains U+2024, which an app could read as '.'",
            ),
            (
                "/public/%EF%B9%92/admin",
                "path contains U+FE52, which an app could read as '.'",
            ),
            (
                "/admin\u{2488}",
                "path contains U+2488, which an app could read as '1.'",
            ),
            (
                "/x%E3%8F%82",
                "path contains U+33C2, which an app could read as 'a.m.'",
            ),
            (
                "/v%F0%9F%84%80",
                "path contains U+1F100, which an app could read as '0.'",
            ),
        ] {
            assert_eq!(check_path(path).unwrap_err().to_string(), problem, "{path}");
        }
        for path in [
            "/public/..\u{00A0}/admin",
            "/public/..%C2%A0/admin",
            "/public/.\u{3000}%20/admin",
        ] {
            assert_eq!(check_path(path), Err(PathProblem::Segment), "{path}");
        }
        for fine in ["/a/\u{00A0}/b", "/a/..x\u{00A0}", "/a%C2%A0b"] {
            assert_eq!(check_path(fine), Ok(()), "{fine}");
        }
    }

    /// An encoded `%` before characters an app reads as two hex digits
    /// once normalized (`%25\u{FF12}\u{FF46}` is `%252f` to NFKC, and `/`
    /// decoded twice) is refused as `%252f` is, raw or escaped, and so
    /// is one before a character folding into two (`\u{FB00}` is `ff`);
    /// one before anything else is a `%` as before.
    #[test]
    fn an_encoded_percent_before_characters_folding_into_hex_digits_is_refused() {
        for (path, digits) in [
            ("/%25\u{FF12}\u{FF46}/admin", *b"2f"),
            ("/%252\u{FF45}%252\u{FF45}/admin", *b"2e"),
            ("/%25%EF%BC%96%EF%BC%91dmin", *b"61"),
            ("/%25\u{1D7D3}\u{1D41C}", *b"5c"),
            ("/%25\u{FB00}", *b"ff"),
            ("/%25\u{00B2}F", *b"2F"),
        ] {
            let [h, l] = digits;
            assert_eq!(
                check_path(path),
                Err(PathProblem::DoubleEncoded([b'%', b'2', b'5', h, l])),
                "{path}"
            );
        }
        assert_eq!(
            check_path("/%25\u{FF12}\u{FF46}").unwrap_err().to_string(),
            "path encodes '%' as %25 before two hex digits (%252f): an app that decodes \
             twice could read another path"
        );
        for fine in [
            "/50%25\u{FF47}",
            "/%25\u{FF12}x",
            "/%25\u{FF12}",
            "/%25\u{00AA}",
        ] {
            assert_eq!(check_path(fine), Ok(()), "{fine}");
        }
    }

    /// The read-ahead folding fullwidth forms looks at each byte as the
    /// start of one, raw or escaped alike: an `EF` that starts none (a lone
    /// `%EF`, U+FFFD, U+FEFF) is itself, and the form after it still folds.
    #[test]
    fn routed_bytes_looks_at_each_byte_as_the_start_of_a_fullwidth_form() {
        let bytes = |text: &str| routed_bytes(text).collect::<Vec<_>>();
        assert_eq!(bytes("%EF%bd%81"), b"a");
        assert_eq!(bytes("%EF\u{FF41}"), [0xEF, b'a']);
        assert_eq!(bytes("%EF%EF%BD%81x"), [0xEF, b'a', b'x']);
        assert_eq!(bytes("%EF%EF%EF%BD%81"), [0xEF, 0xEF, b'a']);
        assert_eq!(bytes("x%EF%BD"), [b'x', 0xEF, 0xBD]);
        assert_eq!(bytes("%EF"), [0xEF]);
        assert_eq!(bytes("\u{FFFD}\u{FF41}"), [0xEF, 0xBF, 0xBD, b'a']);
        assert_eq!(bytes("\u{FEFF}%EF%BD%81"), [0xEF, 0xBB, 0xBF, b'a']);
        assert_eq!(bytes("\u{FF41}\u{FF41}"), b"aa");
    }

    /// An ALLOW matches only the path as sent: none of the spellings a
    /// DENY takes for a path it names is allowed by an ALLOW of that path.
    #[test]
    fn an_allow_matches_none_of_the_spellings_a_deny_takes_for_its_path() {
        for path in [
            "/public.",
            "/public..",
            "/public%20",
            "/public.%20",
            "/public%3Bx",
            "/public%3b",
            "/public;x",
            "/public/",
            "/PUBLIC",
            "/\u{FF50}ublic",
            "/%EF%BD%90ublic",
        ] {
            assert!(
                PathPattern::parse("/public")
                    .unwrap()
                    .matches_as_routed(path),
                "a DENY of /public must match {path}"
            );
            assert!(
                !matches("/public", path),
                "an ALLOW of /public allowed {path}"
            );
            let under = format!("{path}/x");
            if !path.ends_with('/') {
                assert!(!matches("/public/*", &under), "/public/* allowed {under}");
            }
        }
        assert!(matches("/public", "/public"));
        assert!(matches("/public/*", "/public/x"));
    }

    /// Apps that decode a path before they drop its segment parameters
    /// read `/admin%3Bx` as `/admin;x`, so `/admin`: a DENY reads an
    /// escaped `;` as a raw one, and a dot segment with parameters so
    /// written (`..%3B`) is refused as `..;` is.
    #[test]
    fn a_deny_reads_an_escaped_semicolon_as_the_start_of_parameters() {
        let routed = |pattern: &str, path: &str| {
            PathPattern::parse(pattern).unwrap().matches_as_routed(path)
        };
        for (pattern, path) in [
            ("/admin", "/admin%3Bx"),
            ("/admin", "/admin%3bjsessionid=1/"),
            ("/admin/*", "/ADMIN%3Bx/keys"),
            ("/admin/keys", "/admin/keys.%3B"),
        ] {
            assert!(
                routed(pattern, path),
                "{pattern} must match {path} for a DENY"
            );
        }
        for (pattern, path) in [
            ("/admin", "/x%3B/admin"),
            ("/admin", "/admin%3Cx"),
            ("/admin", "/admin%253Bx"),
        ] {
            assert!(!routed(pattern, path), "{pattern} matched {path}");
        }
        assert!(!matches("/admin", "/admin%3Bx"));
        for path in ["/public/..%3B/admin", "/public/..%3bx/admin", "/a/%3Bx/b"] {
            assert_eq!(check_path(path), Err(PathProblem::Segment), "{path}");
        }
        assert_eq!(check_path("/admin%3Bx"), Ok(()));
    }

    /// Windows file systems drop the spaces a segment ends in, as they do
    /// its trailing dots: `/admin%20` is `/admin` to IIS. A DENY takes such
    /// a segment for the one without them, and `..%20` is refused as `..`.
    #[test]
    fn a_deny_matches_a_segment_with_trailing_spaces_left_out() {
        let routed = |pattern: &str, path: &str| {
            PathPattern::parse(pattern).unwrap().matches_as_routed(path)
        };
        for (pattern, path) in [
            ("/admin", "/admin%20"),
            ("/admin", "/ADMIN%20%20/"),
            ("/admin/*", "/admin.%20./keys"),
            ("/admin", "/admin%20;x"),
            ("/users/{id}", "/users/%20"),
        ] {
            assert!(
                routed(pattern, path),
                "{pattern} must match {path} for a DENY"
            );
        }
        for (pattern, path) in [("/admin", "/admin%20x"), ("/admin", "/%20admin")] {
            assert!(!routed(pattern, path), "{pattern} matched {path}");
        }
        assert!(!matches("/admin", "/admin%20"));
        for path in ["/public/..%20/admin", "/public/.%20%20/admin"] {
            assert_eq!(check_path(path), Err(PathProblem::Segment), "{path}");
        }
        assert_eq!(check_path("/a/%20/b"), Ok(()));
    }

    #[test]
    fn escapes_match_in_either_case_and_patterns_that_could_never_match_are_refused() {
        assert!(matches("/a%3Ab/*", "/a%3ab/c"));
        assert!(matches("/a%3ab", "/a%3Ab"));
        assert!(!matches("/a%3Ab", "/a%3Bb"));
        assert!(!matches("/aB", "/ab"), "only escapes ignore case");
        assert_eq!(
            PathPattern::parse("/%61dmin/*").unwrap_err(),
            "path \"/%61dmin/*\" could never match: path encodes 'a' as %61: send unreserved characters as they are (RFC 3986) (requests with it are refused)"
        );
        assert!(PathPattern::parse("/a%2Fb").is_err());
        assert!(PathPattern::parse("/a\\b").is_err());
        assert!(PathPattern::parse("/a%20b").is_ok());
    }
}
