//! Rate limits end to end: a RateLimitPolicy pushed in the snapshot
//! answers 429 with Retry-After once the burst is spent (gRPC:
//! RESOURCE_EXHAUSTED), counts it, and lets requests through again once
//! tokens refill.

mod common;

use std::time::{Duration, Instant};

use common::http::*;
use common::*;
use trellis_proto::policy::v1 as policy_pb;

fn limit(rps: f64, burst: u32) -> policy_pb::RateLimit {
    api_rate_limit("api-limit", rps, burst, "/search/*")
}

#[tokio::test]
async fn answers_429_after_the_burst_and_recovers() {
    let (cp, _app, s) = app_behind_sidecar().await;
    let mut snap = snapshot(1, "allow-mesh", vec![]);
    snap.rate_limits = vec![limit(5.0, 3)];
    push_to(&cp, snap, 1).await;

    let mut c = h1(&cp, s.inbound, &web()).await;
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..10 {
        let response = c.send_request(get("/search/q", &[])).await.unwrap();
        let retry_after = response.headers().get("retry-after").cloned();
        let (status, body) = text(response).await;
        statuses.push(status.as_u16());
        if status == 429 {
            limited = Some((retry_after, body));
            break;
        }
    }
    let (retry_after, body) = limited.unwrap_or_else(|| panic!("never limited: {statuses:?}"));
    assert!(
        statuses.len() >= 4,
        "limited before the burst was spent: {statuses:?}"
    );
    assert!(retry_after.is_some(), "no Retry-After");
    assert_eq!(body, "trellis: rate limited by policy b/api-limit\n");
    let (status, _) = text(c.send_request(get("/other", &[])).await.unwrap()).await;
    assert_eq!(status, 200, "paths outside the match are not limited");
    assert!(
        s.metrics
            .encode()
            .contains("trellis_rate_limited_total{policy=\"b/api-limit\"}"),
    );

    // Tokens refill: the same caller gets through again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = text(c.send_request(get("/search/q", &[])).await.unwrap()).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_limited_grpc_call_gets_resource_exhausted() {
    let (cp, _app, s) = app_behind_sidecar().await;
    let mut snap = snapshot(1, "allow-mesh", vec![]);
    let mut l = limit(0.01, 1);
    l.matches.clear();
    snap.rate_limits = vec![l];
    push_to(&cp, snap, 1).await;
    let mut c = h1(&cp, s.inbound, &web()).await;
    let grpc = || get("/pkg.S/M", &[("content-type", "application/grpc")]);
    let first = c.send_request(grpc()).await.unwrap();
    assert!(
        !first.headers().contains_key("grpc-status"),
        "the first call is the app's"
    );
    let _ = text(first).await;
    let second = c.send_request(grpc()).await.unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["grpc-status"], "8");
    assert_eq!(
        second.headers()["grpc-message"],
        "trellis: rate limited by policy b/api-limit"
    );
}
