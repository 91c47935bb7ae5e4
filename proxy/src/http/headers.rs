//! Header rules of the proxy: hop-by-hop headers (RFC 9110 section 7.6.1)
//! are removed in both directions, and the caller's verified identity is
//! put in [`PEER_IDENTITY`] after any copy the caller sent is removed.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The header that carries the caller's verified SPIFFE ID to the app. The
/// sidecar removes every copy a client sends and sets the one value it
/// verified in the mTLS handshake, so an app behind Trellis can trust it.
pub const PEER_IDENTITY: HeaderName = HeaderName::from_static("x-trellis-peer-identity");

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether `headers` ask to switch protocols (`Connection: upgrade` with an
/// `Upgrade` header), on HTTP/1.1.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes the hop-by-hop headers: `Connection` and every header it names,
/// `Keep-Alive`, `Proxy-*`, `TE` (except `TE: trailers`, which gRPC needs
/// end to end), `Transfer-Encoding`, and `Upgrade` unless `upgrading`
/// (then `Connection: upgrade` is kept with it).
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            if !(upgrading && name == header::UPGRADE) {
                headers.remove(&name);
            }
        }
        headers.remove(header::CONNECTION);
    }
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    headers.remove(header::PROXY_AUTHENTICATE);
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(header::TRANSFER_ENCODING);
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
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

/// Replaces every client-sent [`PEER_IDENTITY`] with the verified one.
pub fn set_identity(headers: &mut HeaderMap, identity: &HeaderValue) {
    // `insert` removes every previous value of the name.
    headers.insert(PEER_IDENTITY, identity.clone());
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
}
