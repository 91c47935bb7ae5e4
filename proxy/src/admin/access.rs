//! Who may use which endpoint of the admin port.
//!
//! The port listens on the pod IP (the kubelet's probes reach it there)
//! and is never intercepted, so every pod of the cluster reaches it
//! without a certificate. What it serves to them is only what the kubelet
//! and Prometheus need: `/live`, `/ready`, `/metrics` and the app's probes.
//!
//! - `/config` names the sidecar's identity, policies, the services it
//!   knows and the control plane: it is served to loopback peers only (an
//!   operator's `kubectl port-forward`, which connects from inside the
//!   pod; the image has no curl to `kubectl exec`).
//! - The app's lifecycle hooks (`/app-health/<container>/post-start` and
//!   `pre-stop`) make the app do something (drain, register): the kubelet
//!   calls them from an address that varies with the CNI, so they are run
//!   only for a request carrying the pod's hook token in
//!   [`HOOK_TOKEN_HEADER`], which the injector wrote both into the
//!   rewritten hooks and into the sidecar's `--hook-token`. A sidecar
//!   given no token (a pod injected before tokens) runs them for anyone,
//!   as it did, and says so once at start.
//!
//! The token is compared in constant time and never written to a log, an
//! answer or `/config`.

use std::fmt;
use std::net::IpAddr;

use http::HeaderValue;

pub use trellis_core::app_health::{HOOK_KINDS, HOOK_TOKEN_HEADER};

/// The admin path only loopback peers are served.
pub const CONFIG_PATH: &str = "/config";

/// The secret a lifecycle hook's request must carry; its `Debug` and
/// `Display` never show it.
#[derive(Clone)]
pub struct HookToken(String);

impl HookToken {
    /// Checks `--hook-token`: non-empty, and a valid header value.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err("is empty".into());
        }
        if HeaderValue::from_str(raw).is_err() || !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be printable ASCII without spaces (it is sent as a header)".into());
        }
        Ok(HookToken(raw.to_owned()))
    }

    /// Whether `given` is this token, in time independent of where they
    /// differ.
    fn matches(&self, given: &[u8]) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(self.0.as_bytes(), given).is_ok()
    }
}

impl fmt::Debug for HookToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HookToken(<redacted>)")
    }
}

/// Why a request to the admin port is refused (403); the `Display` is the
/// answer's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "forbidden: {CONFIG_PATH} is served on loopback only; reach it from inside the pod: \
         kubectl port-forward <pod> {port}, then curl http://127.0.0.1:{port}/config"
    )]
    ConfigNotLoopback {
        /// The admin port the request came to, which the answer names.
        port: u16,
    },
    #[error(
        "forbidden: a lifecycle hook runs only with the pod's hook token in the \
         {HOOK_TOKEN_HEADER} header, which this request does not carry"
    )]
    HookTokenMissing,
    #[error(
        "forbidden: the {HOOK_TOKEN_HEADER} header does not carry the pod's hook token; \
         a lifecycle hook runs only with it"
    )]
    HookTokenWrong,
}

/// Whether `path` is one of the app's lifecycle hooks.
pub fn is_hook(path: &str) -> bool {
    path.strip_prefix(super::probes::PATH_PREFIX)
        .and_then(|rest| rest.rsplit_once('/'))
        .is_some_and(|(container, kind)| !container.is_empty() && HOOK_KINDS.contains(&kind))
}

/// Whether a request for `path` from `peer` to the admin port `port`,
/// carrying `hook_header` in [`HOOK_TOKEN_HEADER`], is served, given the
/// sidecar's hook token.
pub fn check(
    path: &str,
    peer: IpAddr,
    port: u16,
    hook_header: Option<&HeaderValue>,
    token: Option<&HookToken>,
) -> Result<(), Refusal> {
    if path == CONFIG_PATH && !peer.to_canonical().is_loopback() {
        return Err(Refusal::ConfigNotLoopback { port });
    }
    if is_hook(path)
        && let Some(token) = token
    {
        match hook_header {
            None => return Err(Refusal::HookTokenMissing),
            Some(given) if !token.matches(given.as_bytes()) => {
                return Err(Refusal::HookTokenWrong);
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn config_is_served_to_loopback_peers_only() {
        for peer in ["127.0.0.1", "127.0.0.5", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(
                check("/config", ip(peer), 15020, None, None),
                Ok(()),
                "{peer}"
            );
        }
        for peer in ["10.1.2.3", "192.0.2.2", "fd00::2", "::ffff:10.1.2.3"] {
            assert_eq!(
                check("/config", ip(peer), 15020, None, None),
                Err(Refusal::ConfigNotLoopback { port: 15020 }),
                "{peer}"
            );
        }
        // The image has no curl to run with `kubectl exec`: the operator
        // is told to forward the admin port the request came to.
        let said = Refusal::ConfigNotLoopback { port: 15021 }.to_string();
        assert_eq!(
            said,
            "forbidden: /config is served on loopback only; reach it from inside the pod: \
             kubectl port-forward <pod> 15021, then curl http://127.0.0.1:15021/config"
        );
    }

    #[test]
    fn probes_and_health_are_served_to_anyone() {
        let token = HookToken::parse("s3cret").unwrap();
        for path in [
            "/live",
            "/ready",
            "/metrics",
            "/app-health/web/liveness",
            "/app-health/web/readiness",
            "/app-health/web/startup",
            "/app-health/pre-stop/readiness",
        ] {
            assert_eq!(
                check(path, ip("10.1.2.3"), 15020, None, Some(&token)),
                Ok(()),
                "{path}"
            );
        }
    }

    #[test]
    fn a_hook_runs_only_with_the_pods_token() {
        let token = HookToken::parse("s3cret").unwrap();
        let right = HeaderValue::from_static("s3cret");
        let wrong = HeaderValue::from_static("s3cres");
        let longer = HeaderValue::from_static("s3cret0");
        for path in ["/app-health/web/pre-stop", "/app-health/web/post-start"] {
            // From anywhere, loopback included: the kubelet's address is
            // not known.
            for peer in ["10.1.2.3", "127.0.0.1"] {
                let peer = ip(peer);
                assert_eq!(check(path, peer, 15020, Some(&right), Some(&token)), Ok(()));
                assert_eq!(
                    check(path, peer, 15020, None, Some(&token)),
                    Err(Refusal::HookTokenMissing)
                );
                for bad in [&wrong, &longer] {
                    assert_eq!(
                        check(path, peer, 15020, Some(bad), Some(&token)),
                        Err(Refusal::HookTokenWrong)
                    );
                }
            }
        }
        assert!(
            Refusal::HookTokenMissing
                .to_string()
                .contains("x-trellis-hook-token header")
        );
        assert!(
            Refusal::HookTokenWrong
                .to_string()
                .contains("x-trellis-hook-token header does not carry")
        );
    }

    /// A pod injected before hook tokens has none: its hooks run as they
    /// did.
    #[test]
    fn without_a_token_hooks_run_as_before() {
        assert_eq!(
            check(
                "/app-health/web/pre-stop",
                ip("10.1.2.3"),
                15020,
                None,
                None
            ),
            Ok(())
        );
    }

    #[test]
    fn a_token_never_shows_and_must_be_a_header_value() {
        let token = HookToken::parse(" s3cret\n").unwrap();
        assert!(token.matches(b"s3cret"));
        assert_eq!(format!("{token:?}"), "HookToken(<redacted>)");
        for bad in ["", "  ", "a b", "caf\u{e9}"] {
            assert!(HookToken::parse(bad).is_err(), "{bad:?}");
        }
    }
}
