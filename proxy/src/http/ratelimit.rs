//! Rate limits in force on this sidecar ([`RateLimits`]), compiled from the
//! snapshot's `RateLimitPolicy`s: token buckets of `burst` requests that
//! refill at `requestsPerSecond`, one per key (caller, path, or both); and
//! the tower layer that applies them to each request ([`RateLimitLayer`]):
//! over a limit, the request is answered 429 with `Retry-After` (gRPC:
//! `RESOURCE_EXHAUSTED`), counted in `trellis_rate_limited_total`, and
//! never reaches the inner service.
//!
//! The layer reads the limits from the connection's policy `watch` channel
//! when the stack is polled for readiness, and only when they changed, so
//! a request takes no lock to find them.
//!
//! Buckets live in sharded maps (a short lock on one of [`SHARDS`] maps per
//! request, never held across an await) with at most [`MAX_KEYS`] keys per
//! shard: when a shard is full, buckets that have refilled completely are
//! dropped first (they hold no state worth keeping), and if none has, the
//! shard starts over. Internal callers are limited like external ones.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use trellis_core::SpiffeId;
use trellis_core::policy::{
    IdPattern, LimitKey, PathPattern, RateLimitPolicy, SelectorScope, ValidationContext,
    counts_path, routed_bytes, routed_segments, validate_rate_limit_with,
};
use trellis_core::refusal::token;
use trellis_proto::policy::v1 as pb;

use super::proxy::{Exchange, GrpcCode, LocalBody, local};
use super::{Check, Guard, GuardLayer};
use crate::metrics::Metrics;
use crate::policy::Policies;

pub const SHARDS: usize = 16;
pub const MAX_KEYS: usize = 4096;

/// Every rate limit that selects this workload.
#[derive(Debug, Default)]
pub struct RateLimits {
    limits: Box<[Limit]>,
    /// What the limits in force, stored before a check got stricter, fail
    /// of it and how they are enforced instead: `(namespace/name, what)`.
    relaxed: Box<[(Arc<str>, String)]>,
}

struct Limit {
    name: Arc<str>,
    rate: f64,
    burst: f64,
    key: LimitKey,
    /// Empty: every request.
    paths: Box<[PathPattern]>,
    /// See [`RateLimitPolicy::reads_paths`].
    reads_paths: bool,
    hasher: RandomState,
    shards: Box<[Mutex<HashMap<u64, Bucket>>]>,
    counter: Counter,
}

impl std::fmt::Debug for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limit")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A request over a limit.
#[derive(Debug)]
pub struct Limited {
    /// `namespace/name` of the RateLimitPolicy.
    pub policy: Arc<str>,
    /// When a token will be there again.
    pub retry_after: Duration,
}

/// Why the rate limits of a snapshot cannot be enforced.
#[derive(Debug, thiserror::Error)]
#[error("rate_limits[{index}] ({name}): {reason}")]
pub struct InvalidRateLimit {
    pub index: usize,
    pub name: String,
    pub reason: String,
}

impl RateLimits {
    /// The limits among `raw` that select `local`, validated.
    pub fn compile(
        raw: &[pb::RateLimit],
        local: &SpiffeId,
        metrics: &Metrics,
    ) -> Result<Self, InvalidRateLimit> {
        let mut limits = Vec::new();
        let mut relaxed = Vec::new();
        // Stored documents: valid when stored, they are enforced even if a
        // check got stricter since (see `ValidationContext::stored`). The
        // namespace scope of the selector is the control plane's check.
        let context = ValidationContext {
            stored: true,
            scope: SelectorScope::Unchecked,
            ..ValidationContext::default()
        };
        for (index, p) in raw.iter().enumerate() {
            let invalid = |reason: String| InvalidRateLimit {
                index,
                name: format!("{}/{}", p.namespace, p.name),
                reason,
            };
            let doc = RateLimitPolicy::from_proto(p).map_err(|v| invalid(v.to_string()))?;
            let warnings = validate_rate_limit_with(&doc, &context).map_err(|vs| {
                invalid(
                    vs.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            })?;
            let selected = doc
                .spec
                .selector
                .spiffe_ids
                .iter()
                .filter_map(|s| IdPattern::parse(s).ok())
                .any(|pattern| pattern.matches(local));
            if !selected {
                continue;
            }
            let name: Arc<str> = format!("{}/{}", p.namespace, p.name).into();
            relaxed.extend(warnings.iter().map(|v| (name.clone(), v.to_string())));
            let paths = doc
                .spec
                .matches
                .iter()
                .flatten()
                .flat_map(|m| &m.paths)
                .map(|text| PathPattern::parse_stored(text).expect("validated path").0)
                .collect();
            limits.push(Limit {
                counter: metrics.rate_limited_counter(&name),
                name,
                rate: doc.spec.limit.enforced_rate(),
                burst: doc.spec.limit.burst as f64,
                key: doc.spec.key,
                paths,
                reads_paths: doc.reads_paths(),
                hasher: RandomState::new(),
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            });
        }
        Ok(Self {
            limits: limits.into(),
            relaxed: relaxed.into(),
        })
    }

    /// See [`Policies::relaxed`].
    pub fn relaxed(&self) -> impl Iterator<Item = (&str, String)> {
        self.relaxed
            .iter()
            .map(|(name, what)| (&**name, what.clone()))
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Whether some limit looks at the request path (it matches paths, or
    /// keys buckets by route): then a path an app could read as another
    /// must be refused before it gets here, or it would escape the limit.
    pub fn reads_paths(&self) -> bool {
        self.limits.iter().any(|l| l.reads_paths)
    }

    /// Takes a token for a request from `source` to `path` from every limit
    /// that applies; the first limit without one refuses the request.
    pub fn check(&self, source: &SpiffeId, path: &str) -> Result<(), Limited> {
        let now = Instant::now();
        for limit in &self.limits {
            // A limit counts every spelling an app routes to a path it names
            // (`/login/`, `/login;x`), as a DENY rule matches them; `policy
            // explain` says which limits count a request by the same check.
            if !counts_path(&limit.paths, path) {
                continue;
            }
            if let Err(retry_after) = limit.take(source, path, now) {
                limit.counter.inc();
                return Err(Limited {
                    policy: limit.name.clone(),
                    retry_after,
                });
            }
        }
        Ok(())
    }
}

impl Limit {
    fn take(&self, source: &SpiffeId, path: &str, now: Instant) -> Result<(), Duration> {
        let mut hasher = self.hasher.build_hasher();
        if self.key != LimitKey::Route {
            source.as_str().hash(&mut hasher);
        }
        if self.key != LimitKey::Source {
            hash_path(path, &mut hasher);
        }
        let key = hasher.finish();
        let mut shard = self.shards[key as usize % SHARDS]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if shard.len() >= MAX_KEYS && !shard.contains_key(&key) {
            shard.retain(|_, b| self.refilled(b, now) < self.burst);
            if shard.len() >= MAX_KEYS {
                shard.clear();
            }
        }
        let bucket = shard.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        bucket.tokens = self.refilled(bucket, now);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(retry_after((1.0 - bucket.tokens) / self.rate))
        }
    }

    fn refilled(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        (bucket.tokens + elapsed * self.rate).min(self.burst)
    }
}

/// Feeds `path` to `hasher` as apps read it for routing: without a
/// trailing `/`, without the parameters of its segments (`;` raw or
/// `%3B`) and without the `.`s and spaces a segment ends in (`/search/q/`,
/// `/search/q;1`, `/search/q%3B1`, `/search/q.` and `/search/q%20` are
/// `/search/q` to many routers and file systems), and in lower case
/// (ASCII letters only), so `/LOGIN` and `/login` (one path to routers
/// that ignore case, and to the path matches of a limit), or `/a%3ab`,
/// `/a%3Ab` and `/a:b` (its escapes decoded, as apps read it), or
/// `/\u{FF41}`, `/\u{1D41A}` and `/a` (characters apps normalizing
/// Unicode or ignoring its case read as ASCII read as that ASCII), share a
/// route's bucket instead of counting apart: a caller
/// cannot get a fresh bucket by spelling a path another way. Escapes an
/// app could read as another path altogether (`%2F`, an encoded
/// unreserved character) never get here: they are refused while a limit
/// reads paths. No allocation: the path goes through a small buffer on
/// the stack.
fn hash_path(path: &str, hasher: &mut impl Hasher) {
    for segment in routed_segments(path, true) {
        hasher.write(b"/");
        hash_lower_case(segment, hasher);
    }
    hasher.write_u8(0xff);
}

/// Feeds `text` to `hasher` with its escapes decoded, the characters apps
/// read as ASCII folded into it and its ASCII letters in lower case.
fn hash_lower_case(text: &str, hasher: &mut impl Hasher) {
    let mut buf = [0u8; 64];
    let mut len = 0;
    for byte in routed_bytes(text) {
        buf[len] = byte.to_ascii_lowercase();
        len += 1;
        if len == buf.len() {
            hasher.write(&buf);
            len = 0;
        }
    }
    hasher.write(&buf[..len]);
}

/// The longest wait a refused caller is told: a day, what the slowest rate
/// validation accepts takes to refill a token.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

/// `seconds` until a token is there again, as a wait of at most
/// [`MAX_RETRY_AFTER`]: never a panic on the request path, whatever rate
/// reached the limiter.
fn retry_after(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds)
        .unwrap_or(MAX_RETRY_AFTER)
        .min(MAX_RETRY_AFTER)
}

/// Wraps a service in [`RateLimit`].
pub type RateLimitLayer = GuardLayer<Limiting>;

impl RateLimitLayer {
    /// Limits requests from `peer` by the rate limits of the policies
    /// `policies` holds.
    pub fn new(peer: SpiffeId, policies: watch::Receiver<Option<Arc<Policies>>>) -> Self {
        GuardLayer {
            check: Limiting { peer },
            policies,
        }
    }
}

/// Answers requests over a rate limit; passes the others to `S`.
pub type RateLimit<S> = Guard<Limiting, S>;

/// The check [`RateLimit`] makes of each request from `peer`.
#[derive(Clone)]
pub struct Limiting {
    peer: SpiffeId,
}

impl Check for Limiting {
    /// 429 for `exchange` if it is over a limit, its entry saying which.
    fn refusal<B>(
        &self,
        policies: Option<&Policies>,
        exchange: &mut Exchange<B>,
    ) -> Option<Response<LocalBody>> {
        let limits = policies.map(|p| &p.rate_limits);
        let limited = match limits {
            Some(limits) if !limits.is_empty() => limits
                .check(&self.peer, exchange.request.uri().path())
                .err()?,
            _ => return None,
        };
        let response = too_many_requests(exchange.grpc, &limited);
        exchange.entry.outcome = "rate_limited";
        exchange.entry.limit = Some(limited.policy);
        exchange.entry.log_refusal();
        Some(response)
    }
}

/// 429 naming the limit, with `Retry-After` in whole seconds (at least 1);
/// for gRPC, `RESOURCE_EXHAUSTED`.
fn too_many_requests(grpc: bool, limited: &Limited) -> Response<LocalBody> {
    let mut response = local(
        grpc,
        StatusCode::TOO_MANY_REQUESTS,
        GrpcCode::ResourceExhausted,
        token::RATE_LIMITED,
        format!("rate limited by policy {}", limited.policy),
    );
    let seconds = limited.retry_after.as_secs_f64().ceil().max(1.0) as u64;
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(rps: f64, burst: u32, key: &str) -> pb::RateLimit {
        pb::RateLimit {
            name: "l".into(),
            namespace: "n".into(),
            selector: Some(pb::Selector {
                spiffe_ids: vec!["spiffe://td/ns/b/sa/api".into()],
            }),
            requests_per_second: rps,
            burst,
            key: key.into(),
            matches: vec![pb::RateLimitMatch {
                paths: vec!["/search/*".into()],
            }],
        }
    }

    fn api() -> SpiffeId {
        SpiffeId::parse("spiffe://td/ns/b/sa/api").unwrap()
    }

    fn limits(rps: f64, burst: u32, key: &str) -> RateLimits {
        RateLimits::compile(&[raw(rps, burst, key)], &api(), &Metrics::new()).unwrap()
    }

    #[test]
    fn refuses_after_the_burst_per_key_and_only_matching_paths() {
        let l = limits(0.001, 2, "source");
        let a = SpiffeId::parse("spiffe://td/ns/a/sa/a").unwrap();
        let b = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        assert!(l.check(&a, "/search/x").is_ok());
        assert!(l.check(&a, "/search/y").is_ok());
        let limited = l.check(&a, "/search/z").unwrap_err();
        assert_eq!(&*limited.policy, "n/l");
        assert!(limited.retry_after > Duration::from_secs(1));
        assert!(
            l.check(&b, "/search/x").is_ok(),
            "another caller has its own bucket"
        );
        assert!(
            l.check(&a, "/other").is_ok(),
            "paths outside the match are not limited"
        );
    }

    /// Escapes whose hex digits differ only in case are one path to an
    /// app, and so are paths whose letters do to routers that ignore
    /// case: a route's bucket cannot be dodged by writing them otherwise.
    #[test]
    fn a_route_is_one_bucket_whatever_the_case_of_its_escapes() {
        let l = limits(0.001, 1, "route");
        let a = SpiffeId::parse("spiffe://td/ns/a/sa/a").unwrap();
        assert!(l.check(&a, "/search/caf%c3%a9").is_ok());
        for spelling in [
            "/search/caf%C3%A9",
            "/search/caf%c3%A9",
            "/search/caf%C3%a9",
            "/search/caf\u{e9}",
            "/Search/CAF%c3%a9;x/",
        ] {
            assert!(l.check(&a, spelling).is_err(), "{spelling} counted apart");
        }
        assert!(
            l.check(&a, "/search/cafe").is_ok(),
            "another path has its own bucket"
        );
        for spelling in ["/SEARCH/CAFE", "/Search/Cafe;x/"] {
            assert!(l.check(&a, spelling).is_err(), "{spelling} counted apart");
        }
        assert!(l.check(&a, "/search/a:b").is_ok());
        for spelling in ["/search/a%3Ab", "/SEARCH/A%3ab"] {
            assert!(l.check(&a, spelling).is_err(), "{spelling} counted apart");
        }
        let long = format!("/search/{}", "a".repeat(100));
        assert!(l.check(&a, &long).is_ok());
        assert!(
            l.check(&a, &long.to_ascii_uppercase()).is_err(),
            "a segment longer than the buffer counts as one too"
        );
        let escaped = format!("/search/{}%3A{}", "a".repeat(62), "b".repeat(70));
        assert!(l.check(&a, &escaped.replace("%3A", ":")).is_ok());
        assert!(
            l.check(&a, &escaped).is_err(),
            "an escape across the buffer's end counts decoded"
        );
        // U+FB01 folds into two bytes across the buffer's end, and each
        // U+247D (3 bytes) into four, `(10)`: a fold longer than what it
        // stands for still counts as the text it folds into.
        let folded = format!(
            "/search/{}\u{FB01}{}",
            "a".repeat(63),
            "\u{247D}".repeat(30)
        );
        assert!(
            l.check(
                &a,
                &format!("/search/{}fi{}", "a".repeat(63), "(10)".repeat(30))
            )
            .is_ok()
        );
        assert!(
            l.check(&a, &folded).is_err(),
            "a fold across the buffer's end counts as its text"
        );
    }

    /// A trailing `/`, a segment parameter (`;` raw or `%3B`), `.`s or
    /// spaces ending a segment (U+00A0 among them), or characters apps
    /// read as ASCII (fullwidth and mathematical letters, U+0131, and
    /// U+1D6A4, which NFKC reads as U+0131), is the
    /// same path to many routers (Windows file systems drop those `.`s and
    /// spaces; NFKC folds the characters into ASCII): it neither escapes a
    /// limit nor gets a bucket of its own.
    #[test]
    fn another_spelling_of_a_path_is_limited_as_the_path() {
        let a = SpiffeId::parse("spiffe://td/ns/a/sa/a").unwrap();
        let mut login = raw(0.001, 1, "source");
        login.matches[0].paths = vec!["/login".into()];
        let l = RateLimits::compile(&[login], &api(), &Metrics::new()).unwrap();
        assert!(l.check(&a, "/login").is_ok());
        for spelling in [
            "/login/",
            "/login;jsessionid=1",
            "/LOGIN",
            "/Login/",
            "/login.",
            "/LOGIN../",
            "/login%3Bx",
            "/login%20",
            "/\u{FF4C}\u{FF4F}\u{FF47}\u{FF49}\u{FF4E}",
            "/%EF%BC%ACOGIN",
            "/\u{1D425}og\u{0131}n",
            "/log\u{1D6A4}n",
            "/login\u{00A0}",
        ] {
            assert!(
                l.check(&a, spelling).is_err(),
                "{spelling} escaped the limit"
            );
        }

        let l = limits(0.001, 1, "route");
        assert!(l.check(&a, "/search/q").is_ok());
        for spelling in [
            "/search/q/",
            "/search/q;1",
            "/search/q;2",
            "/search;x/q",
            "/search/q/;x",
            "/search/q.",
            "/search/q..;x",
            "/search./q",
            "/search/q%3b1",
            "/search/q%20.",
            "/search/\u{FF51}",
            "/search/\u{1D42A}",
            "/search/q%C2%A0",
        ] {
            assert!(
                l.check(&a, spelling).is_err(),
                "{spelling} got a bucket of its own"
            );
        }
        assert!(
            l.check(&a, "/search/q2").is_ok(),
            "another path has its own"
        );
    }

    #[test]
    fn route_keys_share_a_bucket_across_callers() {
        let l = limits(0.001, 1, "route");
        let a = SpiffeId::parse("spiffe://td/ns/a/sa/a").unwrap();
        let b = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        assert!(l.check(&a, "/search/x").is_ok());
        assert!(l.check(&b, "/search/x").is_err());
        assert!(l.check(&b, "/search/y").is_ok());
    }

    /// A snapshot carries stored limits: one stored before rates below a
    /// day were refused is enforced at one a day, and said so, rather than
    /// making the sidecar refuse every snapshot.
    #[test]
    fn a_stored_rate_below_one_request_per_day_is_enforced_at_one_a_day() {
        let l = RateLimits::compile(&[raw(1e-9, 1, "source")], &api(), &Metrics::new()).unwrap();
        assert_eq!(l.limits[0].rate, 1.0 / 86_400.0);
        let relaxed: Vec<_> = l.relaxed().collect();
        assert_eq!(
            relaxed,
            [(
                "n/l",
                "warning: spec.limit.requestsPerSecond: requestsPerSecond 1e-9 is below one request per day (1/86400); stored before such rates were refused, it is enforced as one request per day".to_owned()
            )]
        );
        let a = SpiffeId::parse("spiffe://td/ns/a/sa/a").unwrap();
        assert!(l.check(&a, "/search/x").is_ok());
        let limited = l.check(&a, "/search/x").unwrap_err();
        assert!(
            limited.retry_after > Duration::from_secs(86_399),
            "{:?}",
            limited.retry_after
        );
    }

    /// Validation keeps such rates out; should one get in all the same, a
    /// refused caller is told to wait a day, and the request path never
    /// panics computing it.
    #[test]
    fn the_wait_is_capped_at_a_day_and_never_panics() {
        let a = SpiffeId::parse("spiffe://td/ns/a/sa/a").unwrap();
        for rate in [1e-300, f64::MIN_POSITIVE, 1e-9] {
            let mut l = limits(1.0, 1, "source");
            l.limits[0].rate = rate;
            assert!(l.check(&a, "/search/x").is_ok());
            let limited = l.check(&a, "/search/x").unwrap_err();
            assert_eq!(limited.retry_after, MAX_RETRY_AFTER, "{rate}");
        }
        let slowest = limits(1.0 / 86_400.0, 1, "source");
        assert!(slowest.check(&a, "/search/x").is_ok());
        let limited = slowest.check(&a, "/search/x").unwrap_err();
        assert!(
            limited.retry_after > Duration::from_secs(86_000),
            "{limited:?}"
        );
        assert!(limited.retry_after <= MAX_RETRY_AFTER, "{limited:?}");
    }

    /// The layer over a service that counts its calls and answers 200.
    #[tokio::test]
    async fn the_layer_answers_over_the_limit_itself_and_never_calls_the_service() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        use http::Request;
        use tower::{Layer, Service, ServiceExt};

        use crate::http::testing::{connection, counting_app, exchange};

        let metrics = Arc::new(Metrics::new());
        let policies = Policies::compile_in(
            1,
            &api(),
            "allow-mesh".into(),
            Vec::new(),
            vec![raw(0.001, 1, "source")],
            &Default::default(),
            &metrics,
        )
        .unwrap();
        let (_keep, policies) = watch::channel(Some(Arc::new(policies)));
        let web = SpiffeId::parse("spiffe://td/ns/a/sa/web").unwrap();
        let conn = connection(&metrics, &web, &policies);
        let calls = Arc::new(AtomicUsize::new(0));
        let app = counting_app(&calls);
        let mut service = RateLimitLayer::new(web, policies).layer(app);
        let exchange =
            |grpc: bool| exchange(&conn, Request::get("/search/q").body(()).unwrap(), grpc);

        let first = service.ready().await.unwrap().call(exchange(false)).await;
        assert_eq!(first.unwrap().status(), StatusCode::OK);
        assert_eq!(calls.load(Ordering::Relaxed), 1);

        let limited = service.ready().await.unwrap().call(exchange(false)).await;
        let limited = limited.unwrap();
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        let retry_after: u64 = limited.headers()[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry_after >= 1, "Retry-After {retry_after}");

        let grpc = service.ready().await.unwrap().call(exchange(true)).await;
        let grpc = grpc.unwrap();
        assert_eq!(
            grpc.status(),
            StatusCode::OK,
            "gRPC errors travel in trailers"
        );
        assert_eq!(grpc.headers()["grpc-status"], "8");
        assert_eq!(
            grpc.headers()["grpc-message"],
            "trellis: rate limited by policy n/l"
        );
        assert_eq!(
            calls.load(Ordering::Relaxed),
            1,
            "the service was called over the limit"
        );

        drop((limited, grpc));
        let text = metrics.encode();
        for sample in [
            "trellis_rate_limited_total{policy=\"n/l\"} 2",
            "trellis_requests_total{status=\"4xx\",decision=\"rate_limited\"} 1",
            "trellis_requests_total{status=\"2xx\",decision=\"rate_limited\"} 1",
        ] {
            assert!(text.contains(sample), "{sample} missing from\n{text}");
        }
    }
}
