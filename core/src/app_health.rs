//! What the injector and the sidecar agree on for the app's probes and
//! lifecycle hooks under strict mTLS: the injector rewrites each to an
//! `httpGet` on the sidecar's admin port under [`PATH_PREFIX`], and a
//! rewritten hook carries the pod's hook token in [`HOOK_TOKEN_HEADER`];
//! the sidecar serves those paths and reads that header.

/// The prefix of every admin path a rewritten probe or hook calls:
/// `/app-health/<container>/<kind>`.
pub const PATH_PREFIX: &str = "/app-health/";

/// The header a rewritten lifecycle hook carries the pod's hook token in.
pub const HOOK_TOKEN_HEADER: &str = "x-trellis-hook-token";
