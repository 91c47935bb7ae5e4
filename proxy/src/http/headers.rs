//! Header rules of the proxy: hop-by-hop headers (RFC 9110 section 7.6.1)
//! are removed in both directions, and the caller's verified identity is
//! put in [`PEER_IDENTITY`] after any copy the caller sent is removed (in
//! any spelling an app could read as it: [`remove_forged`]), with the
//! headers some frameworks route by instead of the path
//! ([`URL_OVERRIDES`]).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The header that carries the caller's verified SPIFFE ID to the app. The
/// sidecar removes every copy a client sends (also spelled with `_` for
/// `-`) and sets the one value it verified in the mTLS handshake, so an app
/// behind Trellis can trust it.
pub const PEER_IDENTITY: HeaderName = HeaderName::from_static(IDENTITY_NAME);
const IDENTITY_NAME: &str = "x-trellis-peer-identity";

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Fields no `Connection` token removes: they frame the message or name
/// its target. A proxy that dropped `Content-Length` because `Connection`
/// named it would pass the body on unframed, and the next hop would read
/// it as requests of its own (request smuggling); an answer would lose
/// its framing the same way.
pub const NEVER_NAMED_AWAY: [&str; 3] = ["content-length", "transfer-encoding", "host"];

/// Whether `name` is one of [`NEVER_NAMED_AWAY`].
pub fn never_named_away(name: &[u8]) -> bool {
    NEVER_NAMED_AWAY
        .iter()
        .any(|kept| name.eq_ignore_ascii_case(kept.as_bytes()))
}

/// The size of an HTTP/2 request's header list as HTTP/2 counts it (RFC
/// 9113 section 6.5.2, SETTINGS_MAX_HEADER_LIST_SIZE), read off the
/// request as the caller sent it, by the function `policy explain` uses
/// ([`h2_header_list_size`](trellis_core::policy::l7::h2_header_list_size)).
pub fn h2_header_list_size<B>(request: &http::Request<B>) -> usize {
    let uri = request.uri();
    trellis_core::policy::l7::h2_header_list_size(
        request.method().as_str(),
        uri.scheme_str(),
        uri.authority().map(|a| a.as_str()),
        uri.path_and_query().map(|p| p.as_str()),
        request.headers(),
    )
}

/// Whether `headers` ask to switch protocols (`Connection: upgrade` with an
/// `Upgrade` header), on HTTP/1.1. An upgrade to `h2c` is not passed on:
/// what follows it is HTTP/2 requests the sidecar would copy as bytes,
/// undecided, so the app gets the request without it instead.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && has_token(headers, header::CONNECTION, "upgrade")
        && !has_token(headers, header::UPGRADE, "h2c")
}

/// The comma-separated tokens of one header value, without parameters
/// (`Connection: keep-alive, x-secret` is `keep-alive` and `x-secret`).
pub fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(|t| {
        t.split(|&b| b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii()
    })
}

/// The tokens of every `name` header ([`list`]); values that are not
/// visible ASCII are skipped.
fn tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| list(v.as_bytes()))
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// `Connection` tokens that need no lookup: headers removed anyway, and
/// `close`. The usual `Connection: keep-alive` then costs no allocation.
const REMOVED_ANYWAY: [&str; 8] = [
    "close",
    "keep-alive",
    "upgrade",
    "te",
    "transfer-encoding",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Removes the hop-by-hop headers: `Connection` and every header it names
/// (but [`NEVER_NAMED_AWAY`]), `Keep-Alive`, `Proxy-*`, `TE` (except its `trailers`, which gRPC needs
/// end to end and which the sidecar honours by passing trailers on),
/// `Transfer-Encoding` (and a `Content-Length` sent beside it), and
/// `Upgrade` unless `upgrading` (then `Connection: upgrade` is kept with
/// it).
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    // Read first: a client sending TE also names it in `Connection`.
    let te_trailers = has_token(headers, header::TE, "trailers");
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = tokens(headers, header::CONNECTION)
            .filter(|t| {
                !never_named_away(t)
                    && !REMOVED_ANYWAY
                        .iter()
                        .any(|r| t.eq_ignore_ascii_case(r.as_bytes()))
            })
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for name in named {
            headers.remove(&name);
        }
        headers.remove(header::CONNECTION);
    }
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    headers.remove(header::PROXY_AUTHENTICATE);
    headers.remove(header::PROXY_AUTHORIZATION);
    // A message that came framed by Transfer-Encoding was read by it, and
    // leaves decoded: a Content-Length beside it describes neither, so it
    // goes too (RFC 9112, section 6.3). hyper drops it from requests; an
    // app's answer keeps it unless removed here, and the caller would get
    // a length its body does not have.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrading {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Writes a request's `Content-Length` as the number it says, without
/// leading zeros: the one spelling every app reads alike (an app that
/// reads `010` as octal would take eight bytes for the body where the
/// sidecar took ten, and the rest as a request of its own). The forwarder
/// writes the length so itself; this does it for what hyper's server
/// read, which checked the value is digits and kept one field of several
/// with the same value, but as the caller spelled it.
pub fn length_without_zeros(headers: &mut HeaderMap) {
    let Some(value) = headers.get(header::CONTENT_LENGTH) else {
        return;
    };
    let digits = value.as_bytes();
    let zeros = digits.iter().take_while(|d| **d == b'0').count();
    if zeros == 0 || digits.len() == 1 {
        return;
    }
    let number = &digits[zeros.min(digits.len() - 1)..];
    if let Ok(number) = HeaderValue::from_bytes(number) {
        headers.insert(header::CONTENT_LENGTH, number);
    }
}

/// Headers that IIS URL Rewrite, Zend Framework and older Symfony read as
/// the request's path in place of the one it was sent to: an app honouring
/// them would run `/admin` for a request the rules allowed as
/// `/public/x`. No caller of the mesh may set them; the sidecar removes
/// them from requests before rules see them.
pub const URL_OVERRIDES: [&str; 2] = ["x-original-url", "x-rewrite-url"];

/// Replaces every client-sent [`PEER_IDENTITY`] with the verified one, and
/// removes the [`URL_OVERRIDES`].
pub fn set_identity(headers: &mut HeaderMap, identity: &HeaderValue) {
    remove_forged(headers);
    headers.insert(PEER_IDENTITY, identity.clone());
}

/// Removes every field an app could read as [`PEER_IDENTITY`] or one of
/// the [`URL_OVERRIDES`]: the name itself and its spellings with `_` for
/// `-`, which CGI and WSGI servers (Python's `wsgiref`, PHP's FastCGI, for
/// some) turn into the same variable (`HTTP_X_TRELLIS_PEER_IDENTITY`,
/// joined to the sidecar's value or in its place). Costs a look at each
/// field name, and nothing more unless a caller sent such a field.
pub fn remove_forged(headers: &mut HeaderMap) {
    headers.remove(PEER_IDENTITY);
    let caller_set = |name: &HeaderName| {
        let name = name.as_str().as_bytes();
        reads_as(name, IDENTITY_NAME) || URL_OVERRIDES.iter().any(|o| reads_as(name, o))
    };
    if headers.keys().any(caller_set) {
        let forged: Vec<HeaderName> = headers.keys().filter(|n| caller_set(n)).cloned().collect();
        for name in forged {
            headers.remove(name);
        }
    }
}

/// Whether a (lower-case) field name is `canonical` with some of its `-`
/// written `_`, or `canonical` itself.
fn reads_as(name: &[u8], canonical: &str) -> bool {
    let canonical = canonical.as_bytes();
    name.len() == canonical.len()
        && name
            .iter()
            .zip(canonical)
            .all(|(&b, &i)| b == i || (b == b'_' && i == b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn a_length_reaches_the_app_without_leading_zeros() {
        for (sent, passed) in [
            ("005", "5"),
            ("010", "10"),
            ("00", "0"),
            ("0", "0"),
            ("40", "40"),
        ] {
            let mut h = map(&[("content-length", sent)]);
            length_without_zeros(&mut h);
            let lengths: Vec<_> = h.get_all("content-length").iter().collect();
            assert_eq!(lengths, [passed], "{sent}");
        }
        let mut none = map(&[("x-length", "005")]);
        length_without_zeros(&mut none);
        assert_eq!(none, map(&[("x-length", "005")]));
    }

    #[test]
    fn a_length_sent_beside_transfer_encoding_goes_with_it() {
        let mut h = map(&[("content-length", "5"), ("transfer-encoding", "chunked")]);
        remove_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
        let mut h = map(&[("content-length", "5")]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h["content-length"], "5", "a length alone is the framing");
    }

    #[test]
    fn removes_connection_and_the_headers_it_names() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "basic x"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn connection_cannot_name_away_the_framing_or_the_host() {
        let mut h = map(&[
            ("connection", "Content-Length, host, x-secret"),
            ("content-length", "98"),
            ("host", "api"),
            ("x-secret", "1"),
        ]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h["content-length"], "98", "{h:?}");
        assert_eq!(h["host"], "api", "{h:?}");
        assert_eq!(h.len(), 2, "{h:?}");
    }

    #[test]
    fn keeps_te_trailers_and_the_upgrade_when_upgrading() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
        ]);
        assert!(is_upgrade(&h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn keeps_te_trailers_that_connection_names_or_that_come_with_other_codings() {
        let mut h = map(&[("connection", "TE"), ("te", "trailers")]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers");
        assert_eq!(h.len(), 1, "{h:?}");
        let mut h = map(&[("te", "gzip;q=0.5, Trailers")]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn an_h2c_upgrade_is_not_an_upgrade_and_is_removed() {
        let mut h = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
        ]);
        assert!(!is_upgrade(&h));
        remove_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn replaces_a_spoofed_identity() {
        let mut h = map(&[
            ("x-trellis-peer-identity", "spiffe://evil/ns/x/sa/y"),
            ("x-trellis-peer-identity", "spiffe://evil/ns/x/sa/z"),
        ]);
        let real = HeaderValue::from_static("spiffe://td/ns/a/sa/web");
        set_identity(&mut h, &real);
        let all: Vec<_> = h.get_all(PEER_IDENTITY).iter().collect();
        assert_eq!(all, [&real]);
    }

    #[test]
    fn url_overrides_are_removed_in_any_spelling() {
        let mut h = map(&[
            ("x-original-url", "/admin"),
            ("x_rewrite_url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("x-original-url-extra", "kept"),
        ]);
        set_identity(&mut h, &HeaderValue::from_static("spiffe://td/ns/a/sa/web"));
        let mut names: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        names.sort();
        assert_eq!(names, ["x-original-url-extra", "x-trellis-peer-identity"]);
    }

    #[test]
    fn replaces_a_spoofed_identity_spelled_with_underscores() {
        let mut h = map(&[
            ("x_trellis_peer_identity", "spiffe://evil/ns/x/sa/y"),
            ("x-trellis_peer-identity", "spiffe://evil/ns/x/sa/z"),
            ("x_trellis_peer_identity_", "kept"),
            ("x-trellis-peer-identit_", "kept"),
        ]);
        let real = HeaderValue::from_static("spiffe://td/ns/a/sa/web");
        set_identity(&mut h, &real);
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h[PEER_IDENTITY], real);
    }
}
