//! What the injector and the sidecar agree on for the app's probes and
//! lifecycle hooks under strict mTLS: the injector rewrites each to an
//! `httpGet` on the sidecar's admin port under [`PATH_PREFIX`], and a
//! rewritten hook's path ends in one of [`HOOK_KINDS`] and carries the
//! pod's hook token in [`HOOK_TOKEN_HEADER`]; the sidecar serves those
//! paths and reads that header.

/// The prefix of every admin path a rewritten probe or hook calls:
/// `/app-health/<container>/<kind>`.
pub const PATH_PREFIX: &str = "/app-health/";

/// The header a rewritten lifecycle hook carries the pod's hook token in.
pub const HOOK_TOKEN_HEADER: &str = "x-trellis-hook-token";

/// The path segment of a rewritten `postStart` hook.
pub const POST_START: &str = "post-start";

/// The path segment of a rewritten `preStop` hook.
pub const PRE_STOP: &str = "pre-stop";

/// The path segments of the app's lifecycle hooks
/// (`/app-health/<container>/<kind>`), as the injector writes them and
/// the sidecar tells a hook from a probe.
pub const HOOK_KINDS: [&str; 2] = [POST_START, PRE_STOP];
