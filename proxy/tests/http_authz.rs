//! Per-request authorization end to end: L7 rules decide each HTTP request
//! and gRPC call, a denied one is answered by the sidecar (403 naming the
//! rule, or PERMISSION_DENIED) without reaching the app, and the other
//! requests on the same connection go on.

mod common;

use std::time::Duration;

use common::control_plane::FakeControlPlane;
use common::grpc::{self, GrpcApp};
use common::http::*;
use common::sidecar::sidecar;
use common::*;
use trellis_proto::policy::v1 as policy_pb;

const CERT_TTL: Duration = Duration::from_secs(3600);

/// A policy protecting `ns/b/sa/api` with one rule from `ns/a/sa/web`
/// whose `to` is `to` (YAML flow syntax).
fn policy(name: &str, action: &str, to: &str) -> policy_pb::Policy {
    api_policy(
        name,
        action,
        &format!("{{from: [{{spiffeId: \"spiffe://{TD}/ns/a/sa/web\"}}], to: {to}}}"),
    )
}

/// GET `path` with `headers` on `c`: the answer's status and body.
async fn send(
    c: &mut Client1,
    path: &str,
    headers: &[(&str, &str)],
) -> (::http::StatusCode, String) {
    text(c.send_request(get(path, headers)).await.unwrap()).await
}

#[tokio::test]
async fn a_denied_path_gets_403_naming_the_rule_and_the_connection_goes_on() {
    let (cp, app, s) = app_behind_sidecar().await;
    let policies = vec![
        policy("web-to-api", "ALLOW", "[{methods: [GET]}]"),
        policy("no-admin", "DENY", "[{paths: [\"/admin/*\"]}]"),
    ];
    push_to(&cp, snapshot(1, "deny", policies), 1).await;

    let mut c = h1(&cp, s.inbound, &web()).await;
    let (status, body) = send(&mut c, "/admin/users", &[]).await;
    assert_eq!(status, 403);
    assert_eq!(body, "trellis: denied by policy b/no-admin rule 0\n");
    let (status, body) = send(&mut c, "/users/7", &[]).await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (200, "GET /users/7 HTTP/1.1")
    );
    let post = ::http::Request::post("/users/7")
        .header("host", "api")
        .body(http_body_util::Full::new(bytes::Bytes::from("x")))
        .unwrap();
    let (status, body) = text(c.send_request(post).await.unwrap()).await;
    assert_eq!(status, 403);
    assert_eq!(
        body,
        "trellis: denied by policy default:deny: no policy allows this request\n"
    );
    let (status, _) = send(&mut c, "/a/../admin/x", &[]).await;
    assert_eq!(status, 400, "a path that is not normalized is refused");
    let (status, _) = send(&mut c, "/", &[]).await;
    assert_eq!(status, 200, "the connection still serves requests");
    assert_eq!(
        app.seen.paths(),
        ["/users/7", "/"],
        "the app saw a denied request"
    );

    assert!(s.has_sample(
        "trellis_decisions_total{action=\"deny\",policy=\"b/no-admin\"}",
        1
    ));
}

/// Routers commonly take `/admin/` and `/admin;x` (a path parameter, as
/// servlet containers read it) for `/admin`: a DENY of `/admin` denies
/// them too, while an ALLOW of a path allows only that path as sent.
#[tokio::test]
async fn a_deny_covers_the_spellings_an_app_routes_as_the_same_path() {
    let (cp, app, s) = app_behind_sidecar().await;
    let policies = vec![
        policy("no-admin", "DENY", "[{paths: [\"/admin\"]}]"),
        policy(
            "only-users",
            "ALLOW",
            "[{paths: [\"/users\", \"/admin/*\", \"/administrator\"]}]",
        ),
    ];
    push_to(&cp, snapshot(1, "deny", policies), 1).await;

    let mut c = h1(&cp, s.inbound, &web()).await;
    for (path, status, body) in [
        (
            "/admin",
            403,
            "trellis: denied by policy b/no-admin rule 0\n",
        ),
        (
            "/admin/",
            403,
            "trellis: denied by policy b/no-admin rule 0\n",
        ),
        (
            "/admin;jsessionid=1",
            403,
            "trellis: denied by policy b/no-admin rule 0\n",
        ),
        ("/users", 200, "GET /users HTTP/1.1"),
        (
            "/users/",
            403,
            "trellis: denied by policy default:deny: no policy allows this request\n",
        ),
        (
            "/users;x",
            403,
            "trellis: denied by policy default:deny: no policy allows this request\n",
        ),
        ("/administrator", 200, "GET /administrator HTTP/1.1"),
    ] {
        let (got, text) = send(&mut c, path, &[]).await;
        assert_eq!((got.as_u16(), text.as_str()), (status, body), "{path}");
    }
    assert_eq!(app.seen.paths(), ["/users", "/administrator"]);
}

/// Express, ASP.NET Core and other routers ignore the case of a path's
/// letters: a DENY matches a path in any case, so `/ADMIN/x` does not slip
/// past a rule on `/admin/*`, while an ALLOW matches only the path as
/// written in the rule.
#[tokio::test]
async fn a_deny_matches_a_path_in_any_letter_case_and_an_allow_only_as_written() {
    let (cp, app, s) = app_behind_sidecar().await;
    let policies = vec![
        policy("all-get", "ALLOW", "[{methods: [GET]}]"),
        policy("no-admin", "DENY", "[{paths: [\"/admin/*\"]}]"),
        policy(
            "public-post",
            "ALLOW",
            "[{methods: [POST], paths: [\"/public/*\"]}]",
        ),
    ];
    push_to(&cp, snapshot(1, "deny", policies), 1).await;

    let mut c = h1(&cp, s.inbound, &web()).await;
    for path in ["/ADMIN/x", "/Admin", "/aDMIN/"] {
        let (status, body) = send(&mut c, path, &[]).await;
        assert_eq!(
            (status.as_u16(), body.as_str()),
            (403, "trellis: denied by policy b/no-admin rule 0\n"),
            "{path}"
        );
    }
    let post = |path: &str| {
        ::http::Request::post(path)
            .header("host", "api")
            .body(http_body_util::Full::new(bytes::Bytes::from("x")))
            .unwrap()
    };
    let (status, body) = text(c.send_request(post("/public/x")).await.unwrap()).await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (200, "POST /public/x HTTP/1.1")
    );
    let (status, body) = text(c.send_request(post("/PUBLIC/x")).await.unwrap()).await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (
            403,
            "trellis: denied by policy default:deny: no policy allows this request\n"
        )
    );
    assert_eq!(
        app.seen.paths(),
        ["/public/x"],
        "the app saw a denied request"
    );
}

/// IIS URL Rewrite, Zend Framework and older Symfony route a request by
/// `X-Original-URL` or `X-Rewrite-URL` when it has one: a request allowed
/// for `/headers` must not run `/admin` there. Neither reaches the app, in
/// any spelling, whichever way the request comes.
#[tokio::test]
async fn headers_that_override_the_path_never_reach_the_app() {
    let (cp, _app, s) = app_behind_sidecar().await;
    let policies = vec![policy("headers", "ALLOW", "[{paths: [\"/headers\"]}]")];
    push_to(&cp, snapshot(1, "deny", policies), 1).await;

    let overrides = [
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        ("x_original_url", "/admin"),
        ("x-kept", "yes"),
    ];
    let check = |how: &str, status: ::http::StatusCode, names: String| {
        assert_eq!(status, 200, "{how}: {names}");
        let names: Vec<&str> = names.lines().collect();
        assert!(names.contains(&"x-kept"), "{how}: {names:?}");
        for gone in ["x-original-url", "x-rewrite-url", "x_original_url"] {
            assert!(!names.contains(&gone), "{how}: {gone} reached the app");
        }
    };

    // The sidecar's own HTTP/1 forwarder.
    let mut c1 = h1(&cp, s.inbound, &web()).await;
    let (status, names) = send(&mut c1, "/headers", &overrides).await;
    check("HTTP/1.1", status, names);
    // A chunked body: the forwarder too.
    let mut chunked = get("/headers", &overrides);
    *chunked.method_mut() = ::http::Method::POST;
    *chunked.body_mut() = http_body_util::Full::new(bytes::Bytes::from("x"));
    chunked
        .headers_mut()
        .insert("transfer-encoding", "chunked".parse().unwrap());
    let (status, names) = text(c1.send_request(chunked).await.unwrap()).await;
    assert!(names.contains("transfer-encoding"), "not chunked: {names}");
    check("HTTP/1.1 chunked", status, names);
    // `Expect: 100-continue`: the forwarder too.
    let mut expecting = get("/headers", &overrides);
    *expecting.method_mut() = ::http::Method::POST;
    *expecting.body_mut() = http_body_util::Full::new(bytes::Bytes::from("x"));
    expecting
        .headers_mut()
        .insert("expect", "100-continue".parse().unwrap());
    let (status, names) = text(c1.send_request(expecting).await.unwrap()).await;
    check("HTTP/1.1 100-continue", status, names);
    // HTTP/1.0: hyper's HTTP/1 server.
    let mut old = get("/headers", &overrides);
    *old.version_mut() = ::http::Version::HTTP_10;
    let (status, names) = text(c1.send_request(old).await.unwrap()).await;
    check("HTTP/1.0", status, names);
    // HTTP/2.
    let mut c2 = h2(&cp, s.inbound, &web()).await;
    let mut req = get("http://api/headers", &overrides);
    *req.version_mut() = ::http::Version::HTTP_2;
    let (status, names) = text(c2.send_request(req).await.unwrap()).await;
    check("HTTP/2", status, names);
}

/// Apps decode and resolve a path before routing it, so a path that spells
/// `/admin/users` another way is refused with 400 saying what is wrong with
/// it, never decided as the unknown path it looks like; other escapes are
/// decided as sent.
#[tokio::test]
async fn an_encoded_path_gets_400_naming_the_problem_and_never_reaches_the_app() {
    let (cp, app, s) = app_behind_sidecar().await;
    let policies = vec![
        policy("web-to-api", "ALLOW", "[{methods: [GET]}]"),
        policy(
            "no-admin",
            "DENY",
            "[{paths: [\"/admin/*\", \"/old%20admin/*\"]}]",
        ),
    ];
    push_to(&cp, snapshot(1, "deny", policies), 1).await;

    let mut c = h1(&cp, s.inbound, &web()).await;
    for (path, problem) in [
        (
            "/%61dmin/users",
            "path encodes 'a' as %61: send unreserved characters as they are (RFC 3986)",
        ),
        (
            "/admin%2Fusers",
            "path encodes '/' as %2F: an app could read it as a separator",
        ),
        (
            "/%2e%2e/admin/users",
            "path encodes '.' as %2e: send unreserved characters as they are (RFC 3986)",
        ),
        (
            "/admin%5Cusers",
            "path encodes '\\' as %5C: an app could read it as a separator",
        ),
        (
            "/admin\\users",
            "path contains '\\': an app could read it as a separator",
        ),
        (
            // `/admin/users` to a servlet container, which drops `;` before
            // it resolves `..`.
            "/x/..;/admin/users",
            "path has an empty, '.' or '..' segment (';' parameters aside, as servlet \
             containers read them)",
        ),
        (
            "/public/..%00/admin/users",
            "path encodes a control character as %00: an app could cut the path there",
        ),
        (
            "/admin%09/users",
            "path encodes a control character as %09: an app could cut the path there",
        ),
        (
            "/public/%252e%252e/admin/users",
            "path encodes '%' as %25 before two hex digits (%252e): an app that decodes \
             twice could read another path",
        ),
        (
            "/public/%25\u{FF12}\u{FF45}%25\u{FF12}\u{FF45}/admin/users",
            "path encodes '%' as %25 before two hex digits (%252e): an app that decodes \
             twice could read another path",
        ),
        (
            "/public/%c0%ae%c0%ae/admin/users",
            "path has percent escapes that do not decode to UTF-8",
        ),
        (
            "/public/%ef%bc%8e%ef%bc%8e/admin/users",
            "path contains U+FF0E, which an app could read as '.'",
        ),
        (
            "/public/\u{ff0e}\u{ff0e}/admin/users",
            "path contains U+FF0E, which an app could read as '.'",
        ),
        (
            "/admin%ef%bc%8fusers",
            "path contains U+FF0F, which an app could read as '/'",
        ),
        (
            "/admin%e2%88%95users",
            "path contains U+2215, which an app could read as '/'",
        ),
        (
            "/admin%EF%BC%BCusers",
            "path contains U+FF3C, which an app could read as '\\'",
        ),
    ] {
        let (status, body) = send(&mut c, path, &[]).await;
        assert_eq!(
            (status.as_u16(), body.as_str()),
            (400, format!("trellis: {problem}\n").as_str()),
            "{path}"
        );
    }
    let (status, body) = send(&mut c, "/old%20admin/x", &[]).await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (403, "trellis: denied by policy b/no-admin rule 0\n"),
        "other escapes are matched as sent"
    );
    let (status, body) = send(&mut c, "/OLD%20Admin/x", &[]).await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (403, "trellis: denied by policy b/no-admin rule 0\n"),
        "and in any letter case by a DENY"
    );
    let (status, body) = send(&mut c, "/a%20b", &[]).await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (200, "GET /a%20b HTTP/1.1")
    );
    assert_eq!(
        app.seen.paths(),
        ["/a%20b"],
        "the app saw a refused request"
    );
}

/// Apps decode a path before routing it (`%3B` then starting a segment's
/// parameters), some read characters as the ASCII Unicode NFKC folds them
/// into (fullwidth and mathematical letters, circled letters, `\u{017F}`,
/// ligatures) or ignore case with Unicode rules (`\u{0131}` is `I`,
/// `\u{0130}` is `i`, and so is `\u{1D6A4}`, `\u{0131}` once normalized),
/// and Windows file systems (so IIS) drop the `.`s and
/// spaces a segment ends in, U+00A0 among them once normalized: a DENY
/// written one way catches the other spellings, over HTTP/1.1 and HTTP/2
/// alike, raw UTF-8 included, and none reaches the app. A character NFKC
/// folds into letters around a `/`, `;`, `.`, `...` or `%` is refused with
/// 400 naming it.
#[tokio::test]
async fn a_deny_catches_an_escaped_spelling_over_http1_and_http2() {
    let (cp, app, s) = app_behind_sidecar().await;
    let policies = vec![
        policy("web-to-api", "ALLOW", "[{methods: [GET]}]"),
        policy(
            "no-purge",
            "DENY",
            "[{paths: [\"/v1/items:purge\", \"/caf%C3%A9/*\", \"/admin/*\", \"/secret\", \"/files\"]}]",
        ),
    ];
    push_to(&cp, snapshot(1, "deny", policies), 1).await;

    let denied = "trellis: denied by policy b/no-purge rule 0\n";
    let mut c1 = h1(&cp, s.inbound, &web()).await;
    let mut c2 = h2(&cp, s.inbound, &web()).await;
    for http2 in [false, true] {
        let mut send = async |path: &str| {
            let (c1, c2) = (&mut c1, &mut c2);
            let answer = match http2 {
                false => c1.send_request(get(path, &[])).await,
                true => {
                    let mut req = get(&format!("http://api{path}"), &[]);
                    *req.version_mut() = ::http::Version::HTTP_2;
                    c2.send_request(req).await
                }
            };
            let (status, body) = text(answer.unwrap()).await;
            (status.as_u16(), body)
        };
        for path in [
            "/v1/items%3Apurge",
            "/V1/Items%3apurge",
            "/caf\u{e9}/menu",
            "/CAF%c3%a9",
            "/admin.",
            "/admin../keys",
            "/\u{FF41}\u{FF44}\u{FF4D}\u{FF49}\u{FF4E}",
            "/%EF%BC%A1DMIN/keys",
            "/admin%3Bx",
            "/admin%3bx/keys",
            "/admin%20",
            "/admin.%20/keys",
            "/\u{1D41A}dmin",
            "/%F0%9D%90%9Admin/keys",
            "/\u{24D0}dmin",
            "/adm\u{0131}n",
            "/ADM\u{0130}N/keys",
            "/\u{017F}ecret",
            "/admin\u{00A0}",
            "/admin%C2%A0/keys",
            "/\u{FB01}les",
            "/adm\u{1D6A4}n/keys",
            "/ADM%F0%9D%9A%A4N",
        ] {
            assert_eq!(
                send(path).await,
                (403, denied.into()),
                "{path}, HTTP/2: {http2}"
            );
        }
        for path in [
            "/\u{2100}/keys",
            "/x%E2%84%85y",
            "/admin%CD%BEx",
            "/admin\u{FF1B}x",
            "/admin%E2%80%A6",
            "/%EF%BC%8561dmin",
            "/public/\u{2024}\u{2024}/admin",
            "/admin%EF%B9%92",
            "/admin\u{2488}",
        ] {
            let (status, body) = send(path).await;
            assert_eq!(status, 400, "{path}, HTTP/2: {http2}");
            assert!(
                body.contains("which an app could read as "),
                "{path}: {body}"
            );
        }
        assert_eq!(send("/v1/items").await.0, 200, "HTTP/2: {http2}");
    }
    assert_eq!(
        app.seen.paths(),
        ["/v1/items", "/v1/items"],
        "the app saw a denied request"
    );
}

/// A rate limit on `/search/*` cannot be escaped by spelling the path
/// another way, even with no L7 rule in force.
#[tokio::test]
async fn an_encoded_path_cannot_escape_a_rate_limit() {
    let (cp, app, s) = app_behind_sidecar().await;
    let mut snap = snapshot(1, "allow-mesh", vec![]);
    snap.rate_limits = vec![api_rate_limit("search", 0.01, 1, "/search/*")];
    push_to(&cp, snap, 1).await;

    let mut c = h1(&cp, s.inbound, &web()).await;
    let (status, _) = send(&mut c, "/search/q", &[]).await;
    assert_eq!(status, 200);
    let (status, _) = send(&mut c, "/search/q", &[]).await;
    assert_eq!(status, 429);
    for path in ["/%73earch/q", "/x/../search/q"] {
        let (status, _) = send(&mut c, path, &[]).await;
        assert_eq!(status, 400, "{path}");
    }
    let (status, _) = send(&mut c, "/other", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(app.seen.paths(), ["/search/q", "/other"]);
}

/// Most apps read the first value of a header sent twice: a second copy
/// must not buy a request an ALLOW, while a DENY matches any copy, or any
/// element of a list on one line.
#[tokio::test]
async fn a_repeated_header_cannot_help_a_request_get_allowed() {
    let (cp, app, s) = app_behind_sidecar().await;
    let policies = vec![
        policy("canary", "ALLOW", "[{headers: {x-env: canary}}]"),
        policy("no-debug", "DENY", "[{headers: {x-debug: \"on\"}}]"),
    ];
    push_to(&cp, snapshot(1, "deny", policies), 1).await;

    let mut c = h1(&cp, s.inbound, &web()).await;
    let (status, _) = send(&mut c, "/one", &[("x-env", "canary")]).await;
    assert_eq!(status, 200);
    let (status, body) = send(&mut c, "/two", &[("x-env", "prod"), ("x-env", "canary")]).await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (
            403,
            "trellis: denied by policy default:deny: no policy allows this request\n"
        )
    );
    let (status, body) = send(
        &mut c,
        "/three",
        &[("x-env", "canary"), ("x-debug", "off"), ("x-debug", "on")],
    )
    .await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (403, "trellis: denied by policy b/no-debug rule 0\n")
    );
    // One line may carry a list: `on` in it is `x-debug` sent with `on`,
    // and an allowed value in a list is not the allowed value.
    let (status, body) = send(
        &mut c,
        "/four",
        &[("x-env", "canary"), ("x-debug", "off,  on")],
    )
    .await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (403, "trellis: denied by policy b/no-debug rule 0\n")
    );
    let (status, _) = send(&mut c, "/five", &[("x-env", "canary, prod")]).await;
    assert_eq!(status, 403);
    let (status, _) = send(
        &mut c,
        "/six",
        &[("x-env", "canary"), ("x-debug", "off, once")],
    )
    .await;
    assert_eq!(status, 200, "no element is `on`");
    assert_eq!(
        app.seen.paths(),
        ["/one", "/six"],
        "the app saw a denied request"
    );
}

/// CGI and WSGI servers (Python's `wsgiref`, for one) make one variable
/// of `x-debug` and `x_debug`, `HTTP_X_DEBUG`: a copy sent with `_` for
/// `-` is a copy of the header, for a DENY rule and for an ALLOW rule.
#[tokio::test]
async fn a_header_spelled_with_underscores_is_the_same_header() {
    let (cp, app, s) = app_behind_sidecar().await;
    let policies = vec![
        policy("canary", "ALLOW", "[{headers: {x-env: canary}}]"),
        policy("no-debug", "DENY", "[{headers: {x-debug: \"on\"}}]"),
    ];
    push_to(&cp, snapshot(1, "deny", policies), 1).await;

    let mut c = h1(&cp, s.inbound, &web()).await;
    let (status, body) = send(&mut c, "/one", &[("x-env", "canary"), ("x_debug", "on")]).await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (403, "trellis: denied by policy b/no-debug rule 0\n")
    );
    let (status, body) = send(&mut c, "/two", &[("x-env", "canary"), ("x_env", "prod")]).await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (
            403,
            "trellis: denied by policy default:deny: no policy allows this request\n"
        )
    );
    let (status, _) = send(&mut c, "/three", &[("x_env", "canary"), ("x_debug", "off")]).await;
    assert_eq!(status, 200, "x_env is x-env, and no copy of x-debug is on");
    assert_eq!(app.seen.paths(), ["/three"], "the app saw a denied request");
}

#[tokio::test]
async fn new_policies_decide_the_next_request_on_an_open_connection() {
    let (cp, _app, s) = app_behind_sidecar().await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
    let mut c1 = h1(&cp, s.inbound, &web()).await;
    let mut c2 = h2(&cp, s.inbound, &web()).await;
    let h2_get = |path: &str| {
        let mut req = get(&format!("http://api{path}"), &[]);
        *req.version_mut() = ::http::Version::HTTP_2;
        req
    };
    let (status, _) = send(&mut c1, "/admin/x", &[]).await;
    assert_eq!(status, 200);
    let (status, _) = text(c2.send_request(h2_get("/admin/x")).await.unwrap()).await;
    assert_eq!(status, 200);

    let policies = vec![policy("no-admin", "DENY", "[{paths: [\"/admin/*\"]}]")];
    push_to(&cp, snapshot(2, "allow-mesh", policies), 1).await;
    let (status, body) = send(&mut c1, "/admin/x", &[]).await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (403, "trellis: denied by policy b/no-admin rule 0\n")
    );
    let (status, _) = text(c2.send_request(h2_get("/admin/x")).await.unwrap()).await;
    assert_eq!(status, 403);
    let (status, _) = text(c2.send_request(h2_get("/other")).await.unwrap()).await;
    assert_eq!(
        status, 200,
        "the open connections still serve what is allowed"
    );

    // The policy renamed, its rule now second: a denial on the open
    // connections names the policy and rule that decided it now, not
    // the text of the set before, HTTP/1.1 and HTTP/2 alike.
    let web_admin = format!(
        "{{from: [{{spiffeId: \"spiffe://{TD}/ns/a/sa/web\"}}], to: [{{paths: [\"/admin/*\"]}}]}}"
    );
    let rules = format!("{{to: [{{paths: [/metrics]}}]}}\n    - {web_admin}");
    let policies = vec![api_policy("admin-off", "DENY", &rules)];
    push_to(&cp, snapshot(3, "allow-mesh", policies), 1).await;
    let denied = "trellis: denied by policy b/admin-off rule 1\n";
    let (status, body) = send(&mut c1, "/admin/x", &[]).await;
    assert_eq!((status.as_u16(), body.as_str()), (403, denied));
    let (status, body) = text(c2.send_request(h2_get("/admin/x")).await.unwrap()).await;
    assert_eq!((status.as_u16(), body.as_str()), (403, denied));
    let (status, body) = send(&mut c1, "/metrics", &[]).await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (403, "trellis: denied by policy b/admin-off rule 0\n")
    );
}

/// Writes `request` raw on a fresh mTLS connection and reads the answer.
async fn raw_request(
    cp: &FakeControlPlane,
    inbound: std::net::SocketAddr,
    request: &[u8],
) -> String {
    use tokio::io::AsyncWriteExt;
    let mut tls = connect(cp, inbound, &web()).await;
    tls.write_all(request).await.unwrap();
    String::from_utf8_lossy(&read_to_end(&mut tls).await.unwrap()).into_owned()
}

#[tokio::test]
async fn a_request_behind_empty_lines_is_still_decided() {
    let (cp, app, s) = app_behind_sidecar().await;
    let policies = vec![policy("no-admin", "DENY", "[{paths: [\"/admin/*\"]}]")];
    push_to(&cp, snapshot(1, "allow-mesh", policies), 1).await;

    // HTTP servers skip empty lines before a request line (RFC 9112), so
    // they must not turn the request into bytes that skip the rules.
    let answer = raw_request(
        &cp,
        s.inbound,
        b"\r\n\r\nGET /admin/users HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.ends_with("trellis: denied by policy b/no-admin rule 0\n"),
        "{answer}"
    );
    assert!(
        app.seen.paths().is_empty(),
        "the app saw the denied request"
    );
}

#[tokio::test]
async fn only_l7_rules_allow_http_and_never_raw_bytes() {
    let (cp, _app, s) = app_behind_sidecar().await;
    let policies = vec![policy("web-to-api", "ALLOW", "[{paths: [/health]}]")];
    push_to(&cp, snapshot(1, "deny", policies), 1).await;

    let mut c = h1(&cp, s.inbound, &web()).await;
    let (status, _) = send(&mut c, "/health", &[]).await;
    assert_eq!(status, 200);
    let (status, _) = send(&mut c, "/other", &[]).await;
    assert_eq!(status, 403);

    // Not HTTP: no rule allows the connection itself.
    let mut tls = connect(&cp, s.inbound, &web()).await;
    assert!(round_trip(&mut tls, b"\x00\x01raw").await.is_err());
}

#[tokio::test]
async fn a_denied_grpc_method_gets_permission_denied() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = GrpcApp::start().await.unwrap();
    let p = pair(&cp, app.addr(), &[]).await;
    let policies = vec![
        policy(
            "web-to-api",
            "ALLOW",
            "[{grpc: {service: trellis.identity.v1.Identity}}, {grpc: {service: trellis.discovery.v1.Discovery}}]",
        ),
        policy(
            "no-watch",
            "DENY",
            "[{grpc: {service: trellis.discovery.v1.Discovery, method: Watch}}]",
        ),
    ];
    push_to(&cp, snapshot(1, "deny", policies), 2).await;
    let channel = grpc::channel(p.route).await.unwrap();

    let status = grpc::watch_versions(channel.clone()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        status.message(),
        "trellis: denied by policy b/no-watch rule 0"
    );

    let chain = grpc::certify(channel).await.unwrap();
    assert_eq!(chain, [b"ok".to_vec()]);
}

/// An HTTP/1.1 request names its host in `Host` or in an absolute-form
/// target (RFC 9112 section 3.2): curl's request in origin form without a
/// `Host` is refused 400 with the words (its access-log line `invalid`, the
/// words as `problem`), and one in absolute form without a `Host` has its
/// authority read by the rules, so a DENY of `host: admin` denies
/// `http://admin/users/7` as it denies the same request over HTTP/2. The
/// app sees neither.
#[tokio::test]
async fn an_http1_request_names_its_host_or_is_refused() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = http_app().await;
    let p = pair(&cp, app.addr, &[]).await;
    let no_admin = api_policy("no-admin", "DENY", "{to: [{headers: {host: admin}}]}");
    push_to(&cp, snapshot(1, "allow-mesh", vec![no_admin]), 2).await;
    let url = format!("http://{}/users/7", p.route);
    let curled = |more: &'static [&'static str]| {
        let url = url.clone();
        async move {
            let mut args = vec!["--http1.1", "-H", "Host:", "-w", "\n%{http_code}"];
            args.extend(more);
            args.push(&url);
            curl(&args).await
        }
    };

    let Some(out) = curled(&[]).await else {
        return;
    };
    let missing = "missing Host header: an HTTP/1.1 request names its host in one (or in an \
                   absolute-form target)";
    assert_eq!(out, format!("trellis: {missing}\n\n400"));
    let access = logs.wait_for(&["trellis::access", "missing Host"]).await;
    assert!(
        access.contains(&format!(
            r#""decision":"invalid","protocol":"http1","problem":"{missing}""#
        )),
        "{access}"
    );

    let out = curled(&["--request-target", "http://admin/users/7"]).await;
    assert_eq!(
        out.unwrap(),
        "trellis: denied by policy b/no-admin rule 0\n\n403"
    );
    assert!(app.seen.paths().is_empty(), "{:?}", app.seen.paths());
}

/// A caller that no policy lets in on the port at all, through its own
/// sidecar: each request gets 403 naming the deciding policy (HTTP/1.1 and
/// HTTP/2 alike), or saying that none allowed it under the mesh default,
/// as a request refused by an L7 rule does, instead of a connection closed
/// without a word; the app is never dialled.
#[tokio::test]
async fn a_caller_denied_outright_is_told_which_policy_refused_it() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = http_app().await;
    let p = pair(&cp, app.addr, &[]).await;
    let url = format!("http://{}/users/7", p.route);
    let status_and_body = ["-w", "\n%{http_code}"];

    push_to(&cp, snapshot(1, "deny", vec![]), 2).await;
    let mut args = vec!["--http1.1", url.as_str()];
    args.extend(status_and_body);
    let Some(out) = curl(&args).await else {
        return;
    };
    assert_eq!(
        out,
        "trellis: denied by policy default:deny: no policy allows this request\n\n403"
    );
    let mut args = vec!["--http2-prior-knowledge", url.as_str()];
    args.extend(status_and_body);
    let out = curl(&args).await.unwrap();
    assert_eq!(
        out,
        "trellis: denied by policy default:deny: no policy allows this request\n\n403"
    );

    let no_web = api_policy(
        "no-web",
        "DENY",
        &format!("{{from: [{{spiffeId: \"spiffe://{TD}/ns/a/sa/web\"}}]}}"),
    );
    push_to(&cp, snapshot(2, "allow-mesh", vec![no_web]), 2).await;
    let mut args = vec!["--http1.1", url.as_str()];
    args.extend(status_and_body);
    let out = curl(&args).await.unwrap();
    assert_eq!(out, "trellis: denied by policy b/no-web rule 0\n\n403");

    // A default that allows some callers says why this one is not of them:
    // `ns/a/sa/web` calling into `ns/b`.
    push_to(&cp, snapshot(3, "allow-same-namespace", vec![]), 2).await;
    let mut args = vec!["--http1.1", url.as_str()];
    args.extend(status_and_body);
    let out = curl(&args).await.unwrap();
    assert_eq!(
        out,
        "trellis: denied by policy default:allow-same-namespace: no policy allows this \
         request, and its caller is not of this workload's namespace\n\n403"
    );

    assert!(
        app.seen.paths().is_empty(),
        "a denied caller reached the app"
    );
    assert!(p.server.has_sample(
        "trellis_decisions_total{action=\"deny\",policy=\"default:deny\"}",
        2
    ));
    assert!(p.server.has_sample(
        "trellis_decisions_total{action=\"deny\",policy=\"b/no-web\"}",
        1
    ));
}

/// The same for a gRPC caller: PERMISSION_DENIED naming the policy, not
/// UNAVAILABLE as for a control plane that is down.
#[tokio::test]
async fn a_grpc_caller_denied_outright_gets_permission_denied() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = GrpcApp::start().await.unwrap();
    let p = pair(&cp, app.addr(), &[]).await;
    push_to(&cp, snapshot(1, "deny", vec![]), 2).await;
    let channel = grpc::channel(p.route).await.unwrap();
    let status = grpc::certify(channel).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        status.message(),
        "trellis: denied by policy default:deny: no policy allows this request"
    );
}

/// An app that reads one line, keeps it, answers `ok` and closes.
async fn line_app() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = received.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut tcp = tokio::io::BufReader::new(tcp);
                let mut line = Vec::new();
                if tcp.read_until(b'\n', &mut line).await.is_ok() {
                    kept.lock().unwrap().extend_from_slice(&line);
                    let _ = tcp.get_mut().write_all(b"ok\n").await;
                }
            });
        }
    });
    (addr, received)
}

/// Request lines only a lenient server accepts (`HTTP/1.2`, which Go's
/// server accepts; two spaces or tabs, which Python's accepts) are HTTP to
/// the sidecar, which refuses them (400) before any reaches the app. Bytes
/// that are not HTTP cannot be held to a DENY rule's HTTP conditions, so
/// such a rule denies the connection whole, naming itself. With no such
/// rule, bytes that are not HTTP pass.
#[tokio::test]
async fn bytes_that_are_not_http_do_not_pass_a_deny_rule_with_http_conditions() {
    use tokio::io::AsyncWriteExt;
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let (app, received) = line_app().await;
    let s = sidecar(&cp, app, &[]).await;
    let policies = vec![policy("no-admin", "DENY", "[{paths: [\"/admin/*\"]}]")];
    push_to(&cp, snapshot(1, "allow-mesh", policies), 1).await;

    let send = async |bytes: &[u8]| {
        let mut tls = connect(&cp, s.inbound, &web()).await;
        tls.write_all(bytes).await.unwrap();
        read_to_end(&mut tls).await.unwrap_or_default()
    };
    for line in [
        &b"GET /admin/users HTTP/1.2\r\nhost: api\r\n\r\n"[..],
        b"GET  /admin/users HTTP/1.1\r\nhost: api\r\n\r\n",
        b"GET\t/admin/users\tHTTP/1.1\r\nhost: api\r\n\r\n",
    ] {
        let answer = send(line).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 400 "),
            "{:?} was answered: {:?}",
            String::from_utf8_lossy(line),
            String::from_utf8_lossy(&answer)
        );
    }
    let answer = send(b"hello\n").await;
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
    assert!(
        received.lock().unwrap().is_empty(),
        "bytes reached the app past the DENY rule: {:?}",
        String::from_utf8_lossy(&received.lock().unwrap())
    );
    logs.wait_for(&[
        "the rule has HTTP conditions on this port and the connection is not HTTP",
        "policy=b/no-admin",
    ])
    .await;

    // A DENY rule with no HTTP conditions for this caller: bytes pass.
    let policies = vec![policy("no-admin", "DENY", "[{ports: [1]}]")];
    push_to(&cp, snapshot(2, "allow-mesh", policies), 1).await;
    assert_eq!(send(b"hello\n").await, b"ok\n");
    assert_eq!(received.lock().unwrap().as_slice(), b"hello\n");
}

/// Request lines Python's `http.server` reads as requests (it splits the
/// line on any whitespace, so blanks before the method or after the
/// version and a vertical tab, form feed or lone CR between the words
/// count, and it takes `GET /path` with no version as HTTP/0.9, headers
/// and all) are HTTP to the sidecar, which refuses them (400): with no
/// rule reading HTTP on the port, bytes that are not HTTP pass, and these
/// would reach such an app as a request with an identity header of the
/// caller's own.
#[tokio::test]
async fn what_python_reads_as_a_request_never_reaches_the_app_as_bytes() {
    use tokio::io::AsyncWriteExt;
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let (app, received) = line_app().await;
    let s = sidecar(&cp, app, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;

    const FORGED: &str = "x-trellis-peer-identity: spiffe://td/ns/prod/sa/admin\r\n\r\n";
    for line in [
        &b"GET /whoami\r\n"[..],
        b" GET /whoami HTTP/1.1\r\n",
        b"GET /whoami HTTP/1.1 \r\n",
        b"GET\x0b/whoami\x0cHTTP/1.1\r\n",
        b"GET\r/whoami\rHTTP/1.1\n",
        b"GET\x1f/whoami\xa0HTTP/1.1\r\n",
    ] {
        let mut tls = connect(&cp, s.inbound, &web()).await;
        tls.write_all(&[line, FORGED.as_bytes()].concat())
            .await
            .unwrap();
        let answer = read_to_end(&mut tls).await.unwrap_or_default();
        assert!(
            answer.starts_with(b"HTTP/1.1 400 "),
            "{:?} was answered: {:?}",
            String::from_utf8_lossy(line),
            String::from_utf8_lossy(&answer)
        );
    }
    assert!(
        received.lock().unwrap().is_empty(),
        "bytes reached the app with a forged identity: {:?}",
        String::from_utf8_lossy(&received.lock().unwrap())
    );

    // A line protocol's lines still pass as bytes.
    let mut tls = connect(&cp, s.inbound, &web()).await;
    tls.write_all(b"get key\r\n").await.unwrap();
    assert_eq!(read_to_end(&mut tls).await.unwrap(), b"ok\n");
}

/// A snapshot carries stored documents. One stored before path patterns
/// that could never match and rates below one a day were refused is still
/// enforced (ACKed): such a path matches nothing (and requests with it
/// get 400 anyway), the rate is raised to one a day, the rest of the
/// policy holds, and the sidecar says once what it relaxed.
#[tokio::test]
async fn a_stored_policy_that_newer_checks_refuse_is_enforced_as_far_as_it_can_be() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let (cp, app, s) = app_behind_sidecar().await;
    let mut no_admin = policy(
        "no-admin",
        "DENY",
        "[{paths: [\"/admin/*\", \"/placeholder\", \"/placeholder\"]}]",
    );
    no_admin.rules[0].to[0].paths[1] = "/files/a%2Fb".into();
    no_admin.rules[0].to[0].paths[2] = "/%7Euser/*".into();
    let mut snap = snapshot(
        1,
        "allow-mesh",
        vec![
            no_admin,
            policy("web-to-api", "ALLOW", "[{methods: [GET]}]"),
        ],
    );
    snap.rate_limits = vec![api_rate_limit("slow", 1e-9, 1, "/slow/*")];
    push_to(&cp, snap, 1).await;

    let mut c = h1(&cp, s.inbound, &web()).await;
    let (status, body) = send(&mut c, "/admin/users", &[]).await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (403, "trellis: denied by policy b/no-admin rule 0\n")
    );
    let (status, _) = send(&mut c, "/files/a%2Fb", &[]).await;
    assert_eq!(status, 400);
    let (status, _) = send(&mut c, "/slow/x", &[]).await;
    assert_eq!(status, 200);
    let response = c.send_request(get("/slow/x", &[])).await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "86400");
    let (status, _) = send(&mut c, "/users/7", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(app.seen.paths(), ["/slow/x", "/users/7"]);
    logs.wait_for(&[
        "stored policy fails a check added since it was stored",
        "policy=b/no-admin",
        "spec.rules[0].to[0].paths[1]",
        "/files/a%2Fb",
    ])
    .await;
    logs.wait_for(&[
        "stored policy fails a check added since it was stored",
        "policy=b/slow",
        "enforced as one request per day",
    ])
    .await;
}

/// Only a path a rule or rate limit compares could be read as another one
/// by the app: `%2F` in an ID passes where no rule on the port matches
/// paths, and gets 400 where one does.
#[tokio::test]
async fn an_encoded_slash_is_refused_only_where_a_rule_matches_paths_on_the_port() {
    let (cp, app, s) = app_behind_sidecar().await;
    let port = app.addr.port();
    let allow = || policy("web-to-api", "ALLOW", "[{methods: [GET]}]");
    push_to(&cp, snapshot(1, "deny", vec![allow()]), 1).await;
    let mut c = h1(&cp, s.inbound, &web()).await;
    let (status, _) = send(&mut c, "/group%2Fproject", &[]).await;
    assert_eq!(status, 200, "a methods-only rule does not read paths");

    let elsewhere = policy("no-admin", "DENY", "[{ports: [1], paths: [\"/admin/*\"]}]");
    push_to(&cp, snapshot(2, "deny", vec![allow(), elsewhere]), 1).await;
    let (status, _) = send(&mut c, "/group%2Fproject", &[]).await;
    assert_eq!(status, 200, "a path rule on another port does not either");

    // AUDIT is a dry run: it never changes what a request gets.
    let dry_run = policy(
        "try-no-admin",
        "AUDIT",
        &format!("[{{ports: [{port}], paths: [\"/admin/*\"]}}]"),
    );
    push_to(&cp, snapshot(3, "deny", vec![allow(), dry_run]), 1).await;
    let (status, _) = send(&mut c, "/group%2Fproject", &[]).await;
    assert_eq!(status, 200, "an AUDIT path rule refused a request");

    let here = policy(
        "no-admin",
        "DENY",
        &format!("[{{ports: [{port}], paths: [\"/admin/*\"]}}]"),
    );
    push_to(&cp, snapshot(4, "deny", vec![allow(), here]), 1).await;
    let (status, body) = send(&mut c, "/group%2Fproject", &[]).await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (
            400,
            "trellis: path encodes '/' as %2F: an app could read it as a separator\n"
        )
    );
    assert_eq!(
        app.seen.paths(),
        ["/group%2Fproject", "/group%2Fproject", "/group%2Fproject"]
    );
}

/// AUDIT is the dry run of DENY: where a DENY rule with HTTP conditions
/// would deny a connection that is not HTTP, an AUDIT rule logs "would
/// deny" naming itself and the bytes still pass.
#[tokio::test]
async fn bytes_that_are_not_http_are_logged_by_an_audit_rule_with_http_conditions() {
    use tokio::io::AsyncWriteExt;
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let (app, received) = line_app().await;
    let s = sidecar(&cp, app, &[]).await;
    let policies = vec![policy("try-no-admin", "AUDIT", "[{paths: [\"/admin/*\"]}]")];
    push_to(&cp, snapshot(1, "allow-mesh", policies), 1).await;

    let mut tls = connect(&cp, s.inbound, &web()).await;
    tls.write_all(b"hello\n").await.unwrap();
    assert_eq!(read_to_end(&mut tls).await.unwrap_or_default(), b"ok\n");
    assert_eq!(received.lock().unwrap().as_slice(), b"hello\n");
    logs.wait_for(&[
        "inbound connection is not HTTP: would deny (AUDIT, not enforced)",
        "policy=b/try-no-admin",
        "rule=0",
    ])
    .await;
}

/// An HTTP/2 request for `path`, for a connection from [`h2`].
fn h2_get(path: &str) -> ::http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut req = get(&format!("http://api{path}"), &[]);
    *req.version_mut() = ::http::Version::HTTP_2;
    req
}

/// The part of the captured text line holding `message` from the message
/// on (timestamp, level and target left out), or a failure showing every
/// line.
async fn logged(logs: &common::sidecar::Logs, message: &str) -> String {
    let line = logs.wait_for(&[message]).await;
    let (_, rest) = line.split_once(": ").expect("a target before the message");
    rest.to_owned()
}

/// Before the first policy snapshot, a caller is denied as no mesh
/// default would deny it: the answer says that the sidecar has no
/// snapshot (HTTP/1.1 and HTTP/2 alike), and the access log, the log line
/// and the metric name `default:no-snapshot`, never `default:deny`.
#[tokio::test]
async fn a_request_before_the_first_snapshot_is_told_there_is_none() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = http_app().await;
    let p = pair(&cp, app.addr, &[]).await;
    let no_snapshot = "denied: this sidecar has no policy snapshot yet (see its log for why)";
    let issued = "trellis_certificate_renewals_total{outcome=\"ok\"}";
    eventually("both sidecars have their certificates", || {
        p.server.has_sample(issued, 1) && p.client.has_sample(issued, 1)
    })
    .await;

    for (version, path) in [
        ("--http1.1", "/users/7"),
        ("--http2-prior-knowledge", "/users/8"),
    ] {
        let url = format!("http://{}{path}", p.route);
        let Some(out) = curl(&[version, &url, "-w", "\n%{http_code}"]).await else {
            return;
        };
        assert_eq!(out, format!("trellis: {no_snapshot}\n\n403"), "{version}");
    }

    let port = app.addr.port();
    assert_eq!(
        logged(&logs, "inbound request denied").await,
        format!(
            "inbound request denied: no policy snapshot yet peer={} port={port} method=GET \
             path=/users/7 decision=deny policy=default:no-snapshot",
            web()
        )
    );
    for protocol in ["http1", "h2"] {
        let protocol_member = format!(r#""protocol":"{protocol}""#);
        let access = logs.wait_for(&["trellis::access", &protocol_member]).await;
        assert!(
            access.contains(&format!(
                r#""decision":"deny","policy":"default:no-snapshot","protocol":"{protocol}","problem":"{no_snapshot}"}}"#
            )),
            "{access}"
        );
    }
    assert_eq!(
        logs.lines()
            .iter()
            .filter(|l| l.contains("inbound request denied"))
            .count(),
        1,
        "a second denial within the pause is only counted"
    );
    assert!(p.server.has_sample(
        "trellis_decisions_total{action=\"deny\",policy=\"default:no-snapshot\"}",
        2
    ));
    let metrics = p.server.metrics.encode();
    assert!(!metrics.contains("default:deny"), "{metrics}");
    assert!(
        app.seen.paths().is_empty(),
        "a denied request reached the app"
    );
}

/// With the access log off, a request an L7 rule denies and one a rate
/// limit refuses are still logged: a line each, naming the peer, the
/// request, the outcome and what decided (the policy, and its rule).
#[tokio::test]
async fn l7_denials_and_rate_limits_are_logged_with_the_access_log_off() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = http_app().await;
    let s = sidecar(&cp, app.addr, &["--access-log", "false"]).await;
    let no_admin = policy("no-admin", "DENY", "[{paths: [\"/admin/*\"]}]");
    let mut snap = snapshot(1, "allow-mesh", vec![no_admin]);
    snap.rate_limits = vec![api_rate_limit("slow", 0.01, 1, "/search/*")];
    push_to(&cp, snap, 1).await;
    let (peer, port) = (web(), app.addr.port());

    let mut c1 = h1(&cp, s.inbound, &peer).await;
    let (status, _) = send(&mut c1, "/admin/users", &[]).await;
    assert_eq!(status, 403);
    assert_eq!(
        logged(&logs, "inbound request denied").await,
        format!(
            "inbound request denied peer={peer} port={port} method=GET path=/admin/users \
             decision=deny policy=b/no-admin rule=0"
        )
    );

    let mut c2 = h2(&cp, s.inbound, &peer).await;
    let (status, _) = text(c2.send_request(h2_get("/search/q")).await.unwrap()).await;
    assert_eq!(status, 200, "the burst lets the first through");
    let (status, _) = text(c2.send_request(h2_get("/search/q")).await.unwrap()).await;
    assert_eq!(status, 429);
    assert_eq!(
        logged(&logs, "inbound request rate limited").await,
        format!(
            "inbound request rate limited peer={peer} port={port} method=GET path=/search/q \
             decision=rate_limited policy=b/slow"
        )
    );
    assert!(
        logs.find(&["trellis::access"]).is_none(),
        "the access log is off"
    );
}

/// The refusals of each policy are logged in a pause of their own: a flood
/// denied by one policy does not hide the first denial by another, and
/// the first line of a policy after its pause says how many of its
/// denials were not logged.
#[tokio::test]
async fn each_policy_s_denials_are_logged_in_a_pause_of_their_own() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = http_app().await;
    let s = sidecar(&cp, app.addr, &["--access-log", "false"]).await;
    let no_admin = policy("no-admin", "DENY", "[{paths: [\"/admin/*\"]}]");
    let no_debug = policy("no-debug", "DENY", "[{paths: [\"/debug/*\"]}]");
    push_to(&cp, snapshot(1, "allow-mesh", vec![no_admin, no_debug]), 1).await;
    let (peer, port) = (web(), app.addr.port());
    let denied = |policy: &str| -> Vec<String> {
        let policy = format!(" policy=b/{policy} ");
        logs.lines()
            .into_iter()
            .filter(|l| l.contains("inbound request denied") && l.contains(&policy))
            .map(|l| l.split_once(": ").expect("a target").1.to_owned())
            .collect()
    };

    let mut c = h1(&cp, s.inbound, &peer).await;
    for path in ["/admin/1", "/admin/2", "/debug/1", "/admin/3"] {
        let (status, _) = send(&mut c, path, &[]).await;
        assert_eq!(status, 403, "{path}");
    }
    let line = |path: &str, policy: &str, suppressed: &str| {
        format!(
            "inbound request denied peer={peer} port={port} method=GET path={path} \
             decision=deny policy=b/{policy} rule=0{suppressed}"
        )
    };
    assert_eq!(denied("no-admin"), [line("/admin/1", "no-admin", "")]);
    assert_eq!(
        denied("no-debug"),
        [line("/debug/1", "no-debug", "")],
        "another policy's first denial is logged within the pause"
    );

    // The pause over (tokio's clock, which the throttle reads), the next
    // denial by the first policy reports the two not logged.
    tokio::time::pause();
    tokio::time::advance(trellis_proxy::inbound::REFUSAL_LOG_PAUSE).await;
    tokio::time::resume();
    let mut c = h1(&cp, s.inbound, &peer).await;
    let (status, _) = send(&mut c, "/admin/4", &[]).await;
    assert_eq!(status, 403);
    assert_eq!(
        denied("no-admin"),
        [
            line("/admin/1", "no-admin", ""),
            line("/admin/4", "no-admin", " suppressed=2"),
        ]
    );
    assert_eq!(denied("no-debug").len(), 1);
}

/// Every answer the sidecar makes itself instead of the app carries
/// `trellis-proxy-error` naming why, HTTP/1.1 and HTTP/2 alike, so that it
/// cannot be taken for the app's own; the app's answers carry none.
#[tokio::test]
async fn the_sidecars_own_answers_are_marked_as_its_own() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = http_app().await;
    let s = sidecar(&cp, app.addr, &[]).await;
    let gone_app = common::ports::free_addr();
    let gone = sidecar(&cp, gone_app, &[]).await;
    let no_admin = policy("no-admin", "DENY", "[{paths: [\"/admin/*\"]}]");
    let mut snap = snapshot(1, "allow-mesh", vec![no_admin]);
    snap.rate_limits = vec![api_rate_limit("slow", 0.01, 1, "/search/*")];
    push_to(&cp, snap, 2).await;
    let mark = |response: &::http::Response<hyper::body::Incoming>| {
        let value = response.headers().get("trellis-proxy-error");
        value.map(|v| v.to_str().unwrap().to_owned())
    };

    let mut c1 = h1(&cp, s.inbound, &web()).await;
    let mut c2 = h2(&cp, s.inbound, &web()).await;
    for (path, status, expected) in [
        ("/users/7", 200, None),
        ("/admin/x", 403, Some("denied")),
        ("/a/../admin/x", 400, Some("invalid_request")),
        ("/search/q", 200, None),
        ("/search/q", 429, Some("rate_limited")),
    ] {
        let answer = c1.send_request(get(path, &[])).await.unwrap();
        assert_eq!(
            (answer.status().as_u16(), mark(&answer).as_deref()),
            (status, expected),
            "HTTP/1.1 {path}"
        );
        let _ = text(answer).await;
    }
    for (path, status, expected) in [
        ("/users/7", 200, None),
        ("/admin/x", 403, Some("denied")),
        ("/search/q", 429, Some("rate_limited")),
    ] {
        let answer = c2.send_request(h2_get(path)).await.unwrap();
        assert_eq!(
            (answer.status().as_u16(), mark(&answer).as_deref()),
            (status, expected),
            "HTTP/2 {path}"
        );
        let _ = text(answer).await;
    }

    // The 502 of an app that is not there names it and why.
    let refused =
        format!("trellis: app unreachable: the app at {gone_app} refused the connection\n");
    let mut c1 = h1(&cp, gone.inbound, &web()).await;
    let answer = c1.send_request(get("/users/7", &[])).await.unwrap();
    assert_eq!(
        (answer.status().as_u16(), mark(&answer).as_deref()),
        (502, Some("app_unreachable"))
    );
    assert_eq!(text(answer).await.1, refused, "HTTP/1.1");
    let mut c2 = h2(&cp, gone.inbound, &web()).await;
    let answer = c2.send_request(h2_get("/users/7")).await.unwrap();
    assert_eq!(
        (answer.status().as_u16(), mark(&answer).as_deref()),
        (502, Some("app_unreachable"))
    );
    assert_eq!(text(answer).await.1, refused, "HTTP/2");
}
