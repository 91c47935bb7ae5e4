//! Rate limits in force on this sidecar ([`RateLimits`]), compiled from the
//! snapshot's `RateLimitPolicy`s: token buckets of `burst` requests that
//! refill at `requestsPerSecond`, one per key (caller, path, or both).
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

use prometheus_client::metrics::counter::Counter;
use trellis_core::SpiffeId;
use trellis_core::policy::{
    IdPattern, LimitKey, PathPattern, RateLimitPolicy, validate_rate_limit,
};
use trellis_proto::policy::v1 as pb;

use crate::metrics::Metrics;

pub const SHARDS: usize = 16;
pub const MAX_KEYS: usize = 4096;

/// Every rate limit that selects this workload.
#[derive(Debug, Default)]
pub struct RateLimits {
    limits: Box<[Limit]>,
}

struct Limit {
    name: Arc<str>,
    rate: f64,
    burst: f64,
    key: LimitKey,
    /// Empty: every request.
    paths: Box<[PathPattern]>,
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
        for (index, p) in raw.iter().enumerate() {
            let invalid = |reason: String| InvalidRateLimit {
                index,
                name: format!("{}/{}", p.namespace, p.name),
                reason,
            };
            let doc = RateLimitPolicy::from_proto(p).map_err(|v| invalid(v.to_string()))?;
            validate_rate_limit(&doc).map_err(|vs| {
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
            let paths = doc
                .spec
                .matches
                .iter()
                .flatten()
                .flat_map(|m| &m.paths)
                .map(|text| PathPattern::parse(text).expect("validated path"))
                .collect();
            limits.push(Limit {
                counter: metrics.rate_limited_counter(&name),
                name,
                rate: doc.spec.limit.requests_per_second,
                burst: doc.spec.limit.burst as f64,
                key: doc.spec.key,
                paths,
                hasher: RandomState::new(),
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            });
        }
        Ok(Self {
            limits: limits.into(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Takes a token for a request from `source` to `path` from every limit
    /// that applies; the first limit without one refuses the request.
    pub fn check(&self, source: &SpiffeId, path: &str) -> Result<(), Limited> {
        let now = Instant::now();
        for limit in &self.limits {
            if !limit.paths.is_empty() && !limit.paths.iter().any(|p| p.matches(path)) {
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
            path.hash(&mut hasher);
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
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }

    fn refilled(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        (bucket.tokens + elapsed * self.rate).min(self.burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rps: f64, burst: u32, key: &str) -> RateLimits {
        let raw = pb::RateLimit {
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
        };
        let local = SpiffeId::parse("spiffe://td/ns/b/sa/api").unwrap();
        RateLimits::compile(&[raw], &local, &Metrics::new()).unwrap()
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

    #[test]
    fn route_keys_share_a_bucket_across_callers() {
        let l = limits(0.001, 1, "route");
        let a = SpiffeId::parse("spiffe://td/ns/a/sa/a").unwrap();
        let b = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        assert!(l.check(&a, "/search/x").is_ok());
        assert!(l.check(&b, "/search/x").is_err());
        assert!(l.check(&b, "/search/y").is_ok());
    }
}
