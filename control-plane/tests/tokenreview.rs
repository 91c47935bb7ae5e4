//! Kubernetes ServiceAccount tokens checked with TokenReview: the reviewer on
//! its own, against a stand-in API server.
//!
//! No Kubernetes API server can run on these machines. Each test stands up a
//! local HTTPS server (`tokenreview_api`) that answers TokenReviews with the
//! API server responses in `fixtures/k8s/tokenreview/` and records every
//! request it gets, so the tests check what the control plane sent too.

mod common;
mod tokenreview_api;

use std::time::Duration;

use tokenreview_api::*;
use trellis_control_plane::authn::tokenreview::{ReviewError, TokenReviewer};

/// No Kubernetes API server can run here; the fake answers with the stand-in
/// API server response for an authenticated projected token of shop/web.
/// The request must be the TokenReview the API server expects.
#[tokio::test]
async fn an_authenticated_token_gives_the_service_accounts_identity() {
    let api = FakeApi::start(by_token).await;
    let account = api.reviewer().review(WEB_TOKEN, None).await.unwrap();
    assert_eq!(account.spiffe_id.as_str(), WEB);
    assert_eq!(account.namespace, "shop");
    assert_eq!(account.service_account, "web");

    let requests = api.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/apis/authentication.k8s.io/v1/tokenreviews");
    assert_eq!(request.headers["authorization"], format!("Bearer {BEARER}"));
    assert_eq!(request.headers["content-type"], "application/json");
    assert_eq!(request.body["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(request.body["kind"], "TokenReview");
    assert_eq!(request.body["spec"]["token"], WEB_TOKEN);
    assert_eq!(
        request.body["spec"]["audiences"],
        serde_json::json!(["trellis"])
    );
}

/// No Kubernetes API server can run here; the fake answers with the stand-in
/// API server response for an expired token (not authenticated, with an error).
#[tokio::test]
async fn an_unauthenticated_token_is_refused_with_the_api_servers_reason() {
    let api = FakeApi::start(by_token).await;
    let e = api
        .reviewer()
        .review(EXPIRED_TOKEN, None)
        .await
        .unwrap_err();
    assert!(matches!(e, ReviewError::NotAuthenticated(_)), "{e}");
    assert!(e.is_callers_fault());
    assert!(e.to_string().contains("has expired"), "{e}");
    assert!(
        !e.to_string().contains(EXPIRED_TOKEN),
        "never echo the token: {e}"
    );
}

/// No Kubernetes API server can run here; the fake answers with the stand-in
/// API server response of an authentication without audience `trellis`.
#[tokio::test]
async fn a_token_for_another_audience_is_refused() {
    let api = FakeApi::start(by_token).await;
    let e = api
        .reviewer()
        .review(API_AUDIENCE_TOKEN, None)
        .await
        .unwrap_err();
    assert!(matches!(e, ReviewError::WrongAudience(_)), "{e}");
    assert!(e.is_callers_fault());
    assert!(e.to_string().contains("audience \"trellis\""), "{e}");
}

/// No Kubernetes API server can run here; the fakes answer with the stand-in
/// API server Status objects of a refused request (401: our bearer token;
/// 403: our RBAC). That is the control plane's problem, not the caller's.
#[tokio::test]
async fn api_server_refusals_are_not_the_callers_fault() {
    let unauthorized = FakeApi::start(|_| (401, "unauthorized-401.json")).await;
    let e = unauthorized
        .reviewer()
        .review(WEB_TOKEN, None)
        .await
        .unwrap_err();
    assert!(matches!(e, ReviewError::Refused { code: 401, .. }), "{e}");
    assert!(!e.is_callers_fault());

    let forbidden = FakeApi::start(|_| (403, "forbidden-403.json")).await;
    let e = forbidden
        .reviewer()
        .review(WEB_TOKEN, None)
        .await
        .unwrap_err();
    assert!(matches!(e, ReviewError::Refused { code: 403, .. }), "{e}");
    assert!(e.to_string().contains("cannot create resource"), "{e}");
    assert!(e.to_string().contains("RBAC"), "{e}");
}

/// No Kubernetes API server can run here; the fake answers with stand-in API
/// server responses and counts the reviews it gets. A token the API server
/// refused is refused again without a review, as an accepted one is
/// accepted, each for a short while.
#[tokio::test]
async fn answers_are_cached_briefly() {
    let api = FakeApi::start(by_token).await;
    let reviewer = api.reviewer();
    reviewer.review(WEB_TOKEN, None).await.unwrap();
    reviewer.review(WEB_TOKEN, None).await.unwrap();
    assert_eq!(api.requests().len(), 1, "the second review is cached");

    for _ in 0..2 {
        let e = reviewer.review(EXPIRED_TOKEN, None).await.unwrap_err();
        assert!(matches!(e, ReviewError::NotAuthenticated(_)), "{e}");
        assert!(e.to_string().contains("has expired"), "{e}");
    }
    assert_eq!(api.requests().len(), 2, "the refusal is cached");

    let uncached = api.reviewer().with_cache_ttl(Duration::ZERO);
    uncached.review(WEB_TOKEN, None).await.unwrap();
    uncached.review(WEB_TOKEN, None).await.unwrap();
    uncached.review(EXPIRED_TOKEN, None).await.unwrap_err();
    uncached.review(EXPIRED_TOKEN, None).await.unwrap_err();
    assert_eq!(api.requests().len(), 6);

    let short = api.reviewer().with_cache_ttl(Duration::from_millis(200));
    short.review(WEB_TOKEN, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    short.review(WEB_TOKEN, None).await.unwrap();
    assert_eq!(api.requests().len(), 8, "an entry ends with its TTL");
}

/// No Kubernetes API server can run here; the stand-in answers with the
/// recorded responses. Reviews one after another, as pods starting
/// together make, reuse one TLS connection to the API server, whether the
/// token was accepted or not; a connection the API server closed is
/// replaced.
#[tokio::test]
async fn reviews_reuse_the_connection_to_the_api_server() {
    let api = FakeApi::start(by_token).await;
    let reviewer = api.reviewer().with_cache_ttl(Duration::ZERO);
    for _ in 0..3 {
        reviewer.review(WEB_TOKEN, None).await.unwrap();
        reviewer.review(EXPIRED_TOKEN, None).await.unwrap_err();
    }
    assert_eq!(api.requests().len(), 6, "every review was asked");
    assert_eq!(api.connections(), 1, "one connection for six reviews");

    // Another reviewer (another control plane) has connections of its own.
    let other = api.reviewer().with_cache_ttl(Duration::ZERO);
    other.review(WEB_TOKEN, None).await.unwrap();
    assert_eq!(api.connections(), 2);
}

/// An API server that closes a kept connection as the next review arrives
/// (its idle timeout passing as the review is sent): the review is asked
/// again on a new connection and answered, not failed. A raw TLS server, so
/// the close can come after the request was read, the worst moment.
#[tokio::test]
async fn a_kept_connection_the_api_server_closed_is_replaced() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use trellis_control_plane::authn::tokenreview::KubeApi;

    /// Reads one request (head and Content-Length body); false at EOF.
    async fn read_request(tls: &mut (impl AsyncReadExt + Unpin)) -> bool {
        let mut data = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if data.len() >= end + 4 + length {
                    return true;
                }
            }
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        }
    }

    let cert = common::serving::ServingCert::new("fake kubernetes CA");
    let acceptor = cert.acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counting = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            counting.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut tls = acceptor.accept(tcp).await.unwrap();
                if !read_request(&mut tls).await {
                    return;
                }
                let body = fixture("authenticated.json");
                let answer = format!(
                    "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\n\r\n{body}",
                    body.len()
                );
                tls.write_all(answer.as_bytes()).await.unwrap();
                tls.flush().await.unwrap();
                // The next request on this connection is read, never answered.
                read_request(&mut tls).await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), &cert.ca_pem).unwrap();
    std::fs::write(dir.path().join("token"), BEARER).unwrap();
    let api = KubeApi::resolve(
        Some(&format!("https://{addr}")),
        Some(&dir.path().join("ca.crt")),
        Some(&dir.path().join("token")),
        &trellis_core::flags::AsTyped,
    )
    .unwrap();
    let reviewer = TokenReviewer::new(&api, td())
        .unwrap()
        .with_cache_ttl(Duration::ZERO);
    for review in 1..=3 {
        let account = reviewer.review(WEB_TOKEN, None).await;
        assert_eq!(
            account
                .unwrap_or_else(|e| panic!("review {review}: {e}"))
                .spiffe_id
                .to_string(),
            WEB
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        4,
        "one connection for the issuer keys (this server has none), then one a review"
    );
}

/// No Kubernetes API server can run here; the fake authenticates any token
/// with the stand-in API server response. A token whose own `exp` has
/// passed is never cached, whatever the TTL.
#[tokio::test]
async fn the_cache_never_outlives_the_tokens_expiry() {
    let api = FakeApi::start(|_| (201, "authenticated.json")).await;
    let reviewer = api.reviewer();
    let expired = jwt_expiring_at(unix_now() - 1);
    reviewer.review(&expired, None).await.unwrap();
    reviewer.review(&expired, None).await.unwrap();
    assert_eq!(api.requests().len(), 2);

    let fresh = jwt_expiring_at(unix_now() + 600);
    reviewer.review(&fresh, None).await.unwrap();
    reviewer.review(&fresh, None).await.unwrap();
    assert_eq!(api.requests().len(), 3);
}

/// No Kubernetes API server can run here: an API server that is not there,
/// one that never answers, and one whose certificate is not from --kube-ca.
#[tokio::test]
async fn an_api_server_out_of_reach_is_unavailable() {
    // Below the ephemeral range, so no parallel test's socket takes it.
    let gone = common::ports::free_addr();
    let api = FakeApi::start(by_token).await;
    let mut unreachable = api.api();
    unreachable.url = format!("https://{gone}").parse().unwrap();
    let e = TokenReviewer::new(&unreachable, td())
        .unwrap()
        .review(WEB_TOKEN, None)
        .await
        .unwrap_err();
    assert!(matches!(e, ReviewError::Unreachable(_)), "{e}");
    assert!(!e.is_callers_fault());

    let hung = FakeApi::start_with(by_token, true).await;
    let e = hung
        .reviewer()
        .with_timeout(Duration::from_millis(300))
        .review(WEB_TOKEN, None)
        .await
        .unwrap_err();
    assert!(matches!(e, ReviewError::Unreachable(_)), "{e}");
    assert!(e.to_string().contains("within 300 milliseconds"), "{e}");

    let other = FakeApi::start(by_token).await;
    let mut untrusted = api.api();
    untrusted.ca = other.ca();
    let e = TokenReviewer::new(&untrusted, td())
        .unwrap()
        .review(WEB_TOKEN, None)
        .await
        .unwrap_err();
    assert!(matches!(e, ReviewError::Unreachable(_)), "{e}");
    assert!(e.to_string().contains("TLS"), "{e}");
    assert!(
        api.requests().is_empty(),
        "nothing was sent to an unverified server"
    );
}

/// No Kubernetes API server can run here; the fake answers with the stand-in
/// API server response and records the bearer token of each request. The
/// kubelet rotates the control plane's token in its file; the reviewer
/// re-reads it.
#[tokio::test]
async fn the_bearer_token_file_is_re_read() {
    let api = FakeApi::start(|_| (201, "authenticated.json")).await;
    let reviewer = api
        .reviewer()
        .with_cache_ttl(Duration::ZERO)
        .with_bearer_reload(Duration::from_millis(100));
    reviewer.review(&jwt_of("first"), None).await.unwrap();
    std::fs::write(api.token_file(), "rotated-token\n").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    reviewer.review(&jwt_of("second"), None).await.unwrap();
    std::fs::write(api.token_file(), "").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    reviewer.review(&jwt_of("third"), None).await.unwrap();
    let bearers: Vec<String> = api
        .requests()
        .iter()
        .map(|r| r.headers["authorization"].clone())
        .collect();
    assert_eq!(
        bearers,
        [
            format!("Bearer {BEARER}"),
            "Bearer rotated-token".into(),
            "Bearer rotated-token".into(),
        ],
        "an unreadable or empty file keeps the last token"
    );
}

/// No Kubernetes API server can run here; the fake records requests, and an
/// empty token must not make one.
#[tokio::test]
async fn empty_tokens_never_reach_the_api_server() {
    let api = FakeApi::start(by_token).await;
    let e = api.reviewer().review("  \n", None).await.unwrap_err();
    assert!(matches!(e, ReviewError::Empty), "{e}");
    assert!(api.requests().is_empty());
}

/// No Kubernetes API server can run here; the stand-in answers each review
/// after 200 ms and counts how many it holds at once. However many Certify
/// calls come with a token, at most [`MAX_REVIEWS_IN_FLIGHT`] reviews are
/// asked of the API server at once, and the others wait their turn and
/// are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_a_bound_of_reviews_are_asked_at_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use trellis_control_plane::authn::tokenreview::MAX_REVIEWS_IN_FLIGHT;

    let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (counting, highest) = (now.clone(), most.clone());
    let record = Arc::new(Mutex::new(Vec::new()));
    let server = common::serving::ApiServer::start(
        &format!("{BEARER}\n"),
        common::serving::Answering::Yes,
        move |req| {
            let (now, most, record) = (counting.clone(), highest.clone(), record.clone());
            async move {
                let held = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(held, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                let answer = serve(req, by_token, &record, &IssuerKeys::default()).await;
                now.fetch_sub(1, Ordering::SeqCst);
                answer
            }
        },
    )
    .await;
    let reviewer = Arc::new(TokenReviewer::new(&server.api(), td()).unwrap());
    let calls = MAX_REVIEWS_IN_FLIGHT * 3;
    let mut reviews = tokio::task::JoinSet::new();
    for i in 0..calls {
        let reviewer = reviewer.clone();
        reviews.spawn(async move {
            reviewer
                .review(&jwt_of(&format!("made-up-{i}")), None)
                .await
        });
    }
    while let Some(review) = reviews.join_next().await {
        let e = review.unwrap().unwrap_err();
        assert!(matches!(e, ReviewError::NotAuthenticated(_)), "{e}");
    }
    let most = most.load(Ordering::SeqCst);
    assert!(
        (1..=MAX_REVIEWS_IN_FLIGHT).contains(&most),
        "{most} reviews were asked at once"
    );
}

/// Anyone may send Certify a made-up token. One that cannot be a
/// ServiceAccount token the API server would accept is refused, saying
/// which check failed and never echoing it, without a review: not shaped
/// as a JWT, or its unverified payload expired or for another audience.
/// No Kubernetes API server can run here; the stand-in records requests.
#[tokio::test]
async fn tokens_that_cannot_be_valid_never_reach_the_api_server() {
    use base64::Engine as _;
    let api = FakeApi::start(by_token).await;
    let reviewer = api.reviewer();
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let header = b64(r#"{"alg":"RS256"}"#);
    let with_payload = |payload: &str| format!("{header}.{}.c2ln", b64(payload));
    let not_a_jwt = |why: &str| {
        format!(
            "the service account token is not a JWT: {why}; a ServiceAccount token is three \
             base64url parts separated by dots, the second a JSON object"
        )
    };
    for (token, says) in [
        (
            "garbage-17".to_owned(),
            not_a_jwt("it does not have three parts"),
        ),
        (
            "a.b.c.d".to_owned(),
            not_a_jwt("it does not have three parts"),
        ),
        (
            "a.b+c.d".to_owned(),
            not_a_jwt("a part is empty or holds characters base64url does not use"),
        ),
        (
            format!("{header}..c2ln"),
            not_a_jwt("a part is empty or holds characters base64url does not use"),
        ),
        (
            with_payload("[1,2]"),
            not_a_jwt("its payload is not a JSON object"),
        ),
        (
            format!("{header}.bm90IGpzb24.c2ln"),
            not_a_jwt("its payload is not a JSON object"),
        ),
        (
            jwt_expiring_at(unix_now() - 3600),
            "the service account token expired (its exp claim is past); the kubelet renews a \
             projected token before then: read the token file again"
                .to_owned(),
        ),
        (
            with_payload(r#"{"aud":["https://kubernetes.default.svc"],"exp":4102444800}"#),
            "the service account token is not for audience \"trellis\" (its aud claim does \
             not include it); mount a projected token with audience \"trellis\""
                .to_owned(),
        ),
        (
            with_payload(r#"{"aud":"vault","exp":4102444800}"#),
            "the service account token is not for audience \"trellis\" (its aud claim does \
             not include it); mount a projected token with audience \"trellis\""
                .to_owned(),
        ),
    ] {
        let e = reviewer.review(&token, None).await.unwrap_err();
        assert_eq!(e.to_string(), says, "{token}");
        assert!(e.is_callers_fault(), "{token}");
    }
    assert!(api.requests().is_empty(), "{:?}", api.requests());
    // Shaped right, for us and not expired: the API server decides.
    reviewer
        .review(&with_payload(r#"{"aud":"trellis"}"#), None)
        .await
        .unwrap_err();
    assert_eq!(api.requests().len(), 1);
}

/// Every turn to ask the API server taken (it never answers): a review is
/// refused saying the control plane is busy reviewing tokens, not that the
/// API server cannot be reached, and nothing more is asked of it. No
/// Kubernetes API server can run here; the stand-in accepts connections
/// and never answers.
#[tokio::test]
async fn a_review_finding_every_turn_taken_says_the_control_plane_is_busy() {
    use std::sync::Arc;
    use trellis_control_plane::authn::tokenreview::MAX_REVIEWS_IN_FLIGHT;
    let api = FakeApi::start_with(by_token, true).await;
    // The held reviews never time out, however slow the machine: a turn
    // given back before the check would let its review through.
    let reviewer = Arc::new(
        api.reviewer()
            .with_turn_wait(Duration::ZERO)
            .with_timeout(Duration::from_secs(3600)),
    );
    let mut held = tokio::task::JoinSet::new();
    for i in 0..MAX_REVIEWS_IN_FLIGHT {
        let reviewer = reviewer.clone();
        held.spawn(async move { reviewer.review(&jwt_of(&format!("held-{i}")), None).await });
    }
    // Each review opens its connection once it has its turn; the first
    // connection is the fetch of the issuer keys, never answered either.
    connections_reach(&api, MAX_REVIEWS_IN_FLIGHT + 1).await;
    let e = reviewer.review(WEB_TOKEN, None).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "the control plane is busy reviewing service account tokens: all \
             {MAX_REVIEWS_IN_FLIGHT} of its TokenReview turns stayed taken for 0 seconds; try \
             again"
        )
    );
    assert!(!e.is_callers_fault());
    assert_eq!(e.reason().token(), "token_reviews_busy");
    assert_eq!(api.connections(), MAX_REVIEWS_IN_FLIGHT + 1);
    held.abort_all();
}

/// A caller sending made-up tokens, each different and each passing the
/// checks made before a review, holds at most its share of the turns: past
/// [`MAX_REVIEWS_PER_CLIENT`] reviews in progress from its address, one
/// more is refused at once naming that limit, without waiting for a turn
/// nor asking the API server, while a pod at another address still gets
/// its review asked. Once the caller's reviews end, its address gets
/// reviews again. No Kubernetes API server can run here; the stand-in
/// accepts connections and never answers, so each review asked holds its
/// turn and its connection.
#[tokio::test]
async fn one_client_address_holds_only_its_share_of_the_turns() {
    use futures::FutureExt as _;
    use std::net::IpAddr;
    use std::sync::Arc;
    use trellis_control_plane::authn::tokenreview::MAX_REVIEWS_PER_CLIENT;
    let api = FakeApi::start_with(by_token, true).await;
    // Reviews asked stay asked for the whole test.
    let reviewer = Arc::new(api.reviewer().with_timeout(Duration::from_secs(3600)));
    let flooding: IpAddr = "10.244.1.9".parse().unwrap();
    let new_pod: IpAddr = "10.244.2.4".parse().unwrap();
    let mut held = tokio::task::JoinSet::new();
    for i in 0..MAX_REVIEWS_PER_CLIENT {
        let reviewer = reviewer.clone();
        held.spawn(async move {
            let token = jwt_of(&format!("made-up-{i}"));
            reviewer.review(&token, Some(flooding)).await
        });
    }
    // The first connection is the fetch of the issuer keys, never answered.
    connections_reach(&api, MAX_REVIEWS_PER_CLIENT + 1).await;
    let e = reviewer
        .review(&jwt_of("made-up-past-the-share"), Some(flooding))
        .now_or_never()
        .expect("refused at once, not waiting for a turn")
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "this client address already has {MAX_REVIEWS_PER_CLIENT} service account token \
             reviews in progress, the most one address may have at once; try again once they \
             are answered"
        )
    );
    assert!(!e.is_callers_fault());
    assert_eq!(e.reason().token(), "token_reviews_per_client");
    assert_eq!(api.connections(), MAX_REVIEWS_PER_CLIENT + 1);

    // Another address is not refused, and its review is asked.
    let review_from = |client: IpAddr| {
        let reviewer = reviewer.clone();
        Box::pin(async move { reviewer.review(WEB_TOKEN, Some(client)).await })
    };
    let mut pod = review_from(new_pod);
    assert!(futures::poll!(pod.as_mut()).is_pending(), "refused");
    let pod = tokio::spawn(pod);
    connections_reach(&api, MAX_REVIEWS_PER_CLIENT + 2).await;
    pod.abort();

    // Its reviews ended, the flooding address has its whole share again.
    held.abort_all();
    while held.join_next().await.is_some() {}
    let mut again = review_from(flooding);
    assert!(futures::poll!(again.as_mut()).is_pending(), "refused");
}

/// A token signed by a key the cluster publishes goes on to the review,
/// RS256 and ES256 alike, and the keys are fetched once for both. No
/// Kubernetes API server can run here: the API server is simulated with
/// recorded responses (the stand-in serves a key set shaped as the API
/// server serves it, and answers the reviews with the stand-in responses).
#[tokio::test]
async fn a_token_signed_by_a_published_key_goes_on_to_the_review() {
    let api = FakeApi::start(|_| (201, "authenticated.json")).await;
    let (rsa, p256) = (Signer::rsa(), Signer::p256());
    api.keys.publish(jwks(&[("rsa-1", &rsa), ("ec-1", &p256)]));
    let reviewer = api.reviewer();
    for token in [rsa.token("rsa-1", "a"), p256.token("ec-1", "b")] {
        let account = reviewer.review(&token, None).await.unwrap();
        assert_eq!(account.spiffe_id.as_str(), WEB);
    }
    assert_eq!(api.requests().len(), 2, "both tokens were reviewed");
    assert_eq!(api.keys.fetches(), 1);
}

/// Anyone may send Certify a token signed by a key of their own, each with
/// a fresh subject: it is refused, naming why, without a review, RS256 and
/// ES256 alike, and the same token again costs nothing more. No Kubernetes
/// API server can run here: the API server is simulated with recorded
/// responses, and the stand-in records every review asked.
#[tokio::test]
async fn a_token_signed_by_another_key_is_refused_without_a_review() {
    let api = FakeApi::start(|_| (201, "authenticated.json")).await;
    let (rsa, p256) = (Signer::rsa(), Signer::p256());
    api.keys.publish(jwks(&[("rsa-1", &rsa), ("ec-1", &p256)]));
    let reviewer = api.reviewer();
    let forged = [
        Signer::rsa().token("rsa-1", "forged-1"),
        Signer::p256().token("ec-1", "forged-2"),
    ];
    for token in &forged {
        for _ in 0..2 {
            let e = reviewer.review(token, None).await.unwrap_err();
            assert_eq!(
                e.to_string(),
                "the token's signature does not verify against the cluster's service account \
                 issuer keys"
            );
            assert!(e.is_callers_fault());
            assert_eq!(e.reason().token(), "sa_token_bad_signature");
        }
    }
    assert!(
        api.requests().is_empty(),
        "no TokenReview was asked: {:?}",
        api.requests()
    );
    assert_eq!(api.keys.fetches(), 1);
}

/// Keys rotate: a token naming a key ID the fetched set lacks fetches the
/// set exactly once more, and is reviewed if the key is there now, refused
/// naming the key if not. Within `KEYS_REFETCH` of the last fetch, made-up
/// key IDs fetch nothing. No Kubernetes API server can run here: the API
/// server is simulated with recorded responses, the stand-in counting the
/// fetches of its key set.
#[tokio::test]
async fn an_unknown_key_id_fetches_the_keys_once_more() {
    let api = FakeApi::start(|_| (201, "authenticated.json")).await;
    let (old, new) = (Signer::rsa(), Signer::rsa());
    api.keys.publish(jwks(&[("old", &old)]));
    let reviewer = api.reviewer();
    reviewer.review(&old.token("old", "a"), None).await.unwrap();
    assert_eq!(api.keys.fetches(), 1);
    let e = reviewer
        .review(&new.token("new", "b"), None)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "the token is signed by key \"new\", which the cluster does not publish"
    );
    assert_eq!(e.reason().token(), "sa_token_bad_signature");
    assert_eq!(api.keys.fetches(), 1, "fetched 30 s ago at most: no fetch");

    // A reviewer held to no least time between fetches.
    let rotating = api.reviewer().with_keys_refetch(Duration::ZERO);
    rotating.review(&old.token("old", "c"), None).await.unwrap();
    assert_eq!(api.keys.fetches(), 2);
    api.keys.publish(jwks(&[("old", &old), ("new", &new)]));
    rotating.review(&new.token("new", "d"), None).await.unwrap();
    assert_eq!(api.keys.fetches(), 3, "exactly one fetch for the new key");
    let e = rotating
        .review(&new.token("gone", "e"), None)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "the token is signed by key \"gone\", which the cluster does not publish"
    );
    assert_eq!(api.keys.fetches(), 4, "one fetch, then refused");
    assert_eq!(
        api.requests().len(),
        3,
        "the refused ones were not reviewed"
    );
}

/// The key set out of reach (403: the control plane's ServiceAccount may
/// not read it; or not a key set) is not the caller's fault: tokens go on
/// to the review as before, and a warning says why, once for many reviews.
/// No Kubernetes API server can run here: the API server is simulated with
/// recorded responses (a recorded 403 Status for the key set).
#[tokio::test]
async fn keys_out_of_reach_leave_tokens_to_the_review_with_a_warning() {
    let (logs, _guard) = common::logs::capture();
    let api = FakeApi::start(by_token).await;
    api.keys.answer(403, fixture("jwks-forbidden-403.json"));
    let reviewer = api.reviewer();
    let account = reviewer.review(WEB_TOKEN, None).await.unwrap();
    assert_eq!(account.spiffe_id.as_str(), WEB);
    let e = reviewer.review(&jwt_of("other"), None).await.unwrap_err();
    assert!(matches!(e, ReviewError::NotAuthenticated(_)), "{e}");
    assert_eq!(api.requests().len(), 2, "both tokens were reviewed");
    assert_eq!(api.keys.fetches(), 1);
    let warnings = logs.warnings("cannot get the cluster's service account issuer keys");
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("/openid/v1/jwks answered 403")
            && warnings[0].contains("cannot get path")
            && warnings[0].contains("system:service-account-issuer-discovery"),
        "{}",
        warnings[0]
    );
    assert!(!warnings[0].contains(BEARER), "{}", warnings[0]);

    let malformed = FakeApi::start(by_token).await;
    malformed.keys.publish("<html>".into());
    malformed.reviewer().review(WEB_TOKEN, None).await.unwrap();
    assert_eq!(malformed.requests().len(), 1);
    let warnings = logs.warnings("not a JSON Web Key Set");
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
}

/// A token whose header names `none`, or any algorithm but RS256,
/// ES256, ES384 and ES512, is refused naming it, without a review nor a fetch of the keys.
/// No Kubernetes API server can run here: the API server is simulated with
/// recorded responses, and the stand-in records every review asked.
#[tokio::test]
async fn a_token_with_alg_none_is_refused_without_a_review() {
    use base64::Engine as _;
    let api = FakeApi::start(|_| (201, "authenticated.json")).await;
    api.keys.publish(jwks(&[("k", &Signer::rsa())]));
    let reviewer = api.reviewer();
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let payload = b64(
        r#"{"aud":["trellis"],"exp":4102444800,"sub":"system:serviceaccount:kube-system:admin"}"#,
    );
    for alg in ["none", "HS256"] {
        let header = b64(&format!(r#"{{"alg":"{alg}","kid":"k"}}"#));
        let e = reviewer
            .review(&format!("{header}.{payload}.c2ln"), None)
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the token's signature algorithm \"{alg}\" cannot be verified; a \
                 ServiceAccount token is signed with RS256, ES256, ES384 or ES512"
            )
        );
        assert_eq!(e.reason().token(), "sa_token_bad_signature");
        assert!(e.is_callers_fault());
    }
    assert!(api.requests().is_empty(), "{:?}", api.requests());
    assert_eq!(api.keys.fetches(), 0);
}

/// Waits until the stand-in API server has accepted `n` connections; a
/// minute without them fails the test (a regression must not hang it).
async fn connections_reach(api: &FakeApi, n: usize) {
    let reached = async {
        while api.connections() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), reached)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the API server saw {} of {n} connections",
                api.connections()
            )
        });
}
