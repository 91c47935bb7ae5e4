//! The admin port is reachable from every pod of the cluster (it is the
//! kubelet's probe target): a client cannot hold its connections open
//! without sending requests, nor open more than its share, nor more than
//! the sidecar serves at once, and clients that hold every slot make way
//! for one that holds none. A connection refused so is counted and
//! logged.

mod common;

use std::time::Duration;

use common::http::*;
use common::sidecar::Logs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_proxy::admin::{
    HEAD_TIMED_OUT, HEAD_TIMEOUT, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT,
};

/// Reads until the server closes the connection, or fails after `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut seen = Vec::new();
    tokio::time::timeout(within, tcp.read_to_end(&mut seen))
        .await
        .expect("the admin port kept the connection open")
        .ok();
    seen
}

#[tokio::test]
async fn a_client_that_sends_nothing_is_closed() {
    let (_cp, _app, s) = app_behind_sidecar().await;
    let within = HEAD_TIMEOUT + Duration::from_secs(5);

    // Half a request head, then nothing.
    let mut partial = TcpStream::connect(s.admin).await.unwrap();
    partial.write_all(b"GET /live HTTP/1.1\r\n").await.unwrap();
    // A keep-alive connection left idle after its answer.
    let mut idle = TcpStream::connect(s.admin).await.unwrap();
    idle.write_all(b"GET /live HTTP/1.1\r\nhost: admin\r\n\r\n")
        .await
        .unwrap();

    let answer = String::from_utf8(closed_within(&mut idle, within).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("live\n"), "{answer}");
    // The half head is answered 408, in words, as the forwarder answers it.
    let (status, head, body) = split(&closed_within(&mut partial, within).await);
    assert_eq!(status, "HTTP/1.1 408 Request Timeout");
    assert!(
        head.contains("\r\ntrellis-proxy-error: request_timeout\r\n"),
        "{head}"
    );
    assert_eq!(body, format!("trellis: {HEAD_TIMED_OUT}\n"));
}

/// A connection to `admin` from the loopback address `127.0.0.<host>`.
async fn connect_from(host: u8, admin: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, host], 0).into()).unwrap();
    socket.connect(admin).await.unwrap()
}

/// A connection from `127.0.0.<host>`, served once before it is kept.
async fn served_from(host: u8, admin: std::net::SocketAddr) -> TcpStream {
    let mut tcp = connect_from(host, admin).await;
    tcp.write_all(b"GET /live HTTP/1.1\r\nhost: admin\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    tcp
}

/// As many connections from `127.0.0.<host>` as one address may hold,
/// each served once before it is kept.
async fn share_of(host: u8, admin: std::net::SocketAddr) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_CLIENT {
        held.push(served_from(host, admin).await);
    }
    held
}

/// Whether a connection from `127.0.0.<host>` is closed unserved.
async fn refused_from(host: u8, admin: std::net::SocketAddr) -> bool {
    let mut over = connect_from(host, admin).await;
    let _ = over
        .write_all(b"GET /live HTTP/1.1\r\nhost: admin\r\n\r\n")
        .await;
    closed_within(&mut over, Duration::from_secs(5))
        .await
        .is_empty()
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let (_cp, _app, s) = app_behind_sidecar().await;

    // One address takes its share; the next from it is refused, while
    // another address (the kubelet's) is still served.
    let mut held = share_of(2, s.admin).await;
    assert!(
        refused_from(2, s.admin).await,
        "one address took more than its share"
    );
    held.push(served_from(3, s.admin).await);

    // Many addresses together reach the limit of the whole port.
    let mut host = 3;
    while held.len() < MAX_CONNECTIONS {
        if held.len() % MAX_CONNECTIONS_PER_CLIENT == 0 {
            host += 1;
        }
        held.push(served_from(host, s.admin).await);
    }
    // Full: an address holding none (the kubelet's, with its probes) is
    // served all the same, and the oldest connection of an address holding
    // the most makes way for it.
    let _kubelet = served_from(host + 1, s.admin).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut closed = 0;
    for tcp in &mut held {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_millis(5), tcp.read_to_end(&mut rest));
        if read.await.is_ok() {
            closed += 1;
        }
    }
    assert_eq!(closed, 1, "a connection beyond the limit was served");

    // One closes: a new one is served again.
    drop(held.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut tcp = TcpStream::connect(s.admin).await.unwrap();
        let _ = tcp
            .write_all(b"GET /live HTTP/1.1\r\nconnection: close\r\n\r\n")
            .await;
        let answer = closed_within(&mut tcp, Duration::from_secs(10)).await;
        if answer.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no connection was served after one closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A connection refused past the limits is counted by the limit that
/// refused it, in the sidecar's own `/metrics`, and logged as a warning
/// naming the client and the limit, once per limit per
/// `REFUSAL_LOG_PAUSE`: a kubelet probe refused there restarts the pod or
/// takes it out of its Service, so it must not go unseen.
#[tokio::test]
async fn connections_past_the_limits_are_counted_and_warned() {
    let (logs, _guard) = Logs::capture(false);
    let (_cp, _app, s) = app_behind_sidecar().await;

    // Past the share of 127.0.0.2, twice.
    let mut held = share_of(2, s.admin).await;
    assert!(
        refused_from(2, s.admin).await,
        "past the share of one address"
    );
    assert!(
        refused_from(2, s.admin).await,
        "past the share of one address"
    );
    // Every slot taken, 127.0.0.3 holding one fewer than the others: no
    // address holds two more than it, to take a slot from.
    for _ in 1..MAX_CONNECTIONS_PER_CLIENT {
        held.push(served_from(3, s.admin).await);
    }
    let mut host = 4;
    while held.len() < MAX_CONNECTIONS {
        for _ in 0..MAX_CONNECTIONS_PER_CLIENT.min(MAX_CONNECTIONS - held.len()) {
            held.push(served_from(host, s.admin).await);
        }
        host += 1;
    }
    assert!(refused_from(3, s.admin).await, "past the total");

    // Scraped from 127.0.0.1, which holds none: the full port makes way.
    let scraped = s.get("/metrics").await;
    assert!(scraped.starts_with("HTTP/1.1 200 "), "{scraped}");
    for (reason, count) in [("per_client", 2), ("total", 1)] {
        let counted =
            format!("trellis_admin_connections_refused_total{{reason=\"{reason}\"}} {count}\n");
        assert!(scraped.contains(&counted), "{counted}in\n{scraped}");
    }

    let refusals = |reason: &str| -> Vec<String> {
        let reason = format!("reason={reason} ");
        logs.lines()
            .into_iter()
            .filter(|l| l.contains("admin connection refused") && l.contains(&reason))
            .collect()
    };
    let per_client = refusals("per_client");
    assert_eq!(
        per_client.len(),
        1,
        "one line a limit a pause: {per_client:#?}"
    );
    let total = refusals("total");
    assert_eq!(total.len(), 1, "{total:#?}");
    for (line, client, limit) in [
        (
            &per_client[0],
            "client=127.0.0.2:",
            format!("{MAX_CONNECTIONS_PER_CLIENT} connections are open from this address already"),
        ),
        (
            &total[0],
            "client=127.0.0.3:",
            format!("{MAX_CONNECTIONS} connections are open already"),
        ),
    ] {
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains(client), "the line names the client: {line}");
        assert!(line.contains(&limit), "the line names the limit: {line}");
        assert!(!line.contains("suppressed"), "{line}");
    }
    drop(held);
}

/// The admin port's 403s are the sidecar's own answers, and say so as its
/// others do: `trellis-proxy-error: denied`, beside the text saying why.
/// What it serves carries none.
#[tokio::test]
async fn a_refused_admin_request_is_marked_as_the_sidecar_s_answer() {
    use common::control_plane::FakeControlPlane;
    use common::sidecar::sidecar;
    use hyper_util::rt::TokioIo;
    let cp = FakeControlPlane::start(Duration::from_secs(3600)).await;
    let app = http_app().await;
    let s = sidecar(&cp, app.addr, &["--hook-token", "the-pods-hook-token"]).await;

    let tcp = TokioIo::new(TcpStream::connect(s.admin).await.unwrap());
    let (mut admin, conn) = hyper::client::conn::http1::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let hook = "/app-health/app/pre-stop";
    let response = admin.send_request(get(hook, &[])).await.unwrap();
    let marked = response.headers().get("trellis-proxy-error").cloned();
    let (status, body) = text(response).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.starts_with(
            "trellis: forbidden: a lifecycle hook runs only with the pod's hook token"
        ),
        "{body}"
    );
    assert_eq!(marked.as_ref().map(|v| v.as_bytes()), Some(&b"denied"[..]));

    let response = admin.send_request(get("/live", &[])).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(!response.headers().contains_key("trellis-proxy-error"));
}

/// The admin port's 404 (a path it serves nothing at, an app probe path
/// with no probe) and 405 (a method other than GET or HEAD) are its own
/// answers too, each with a token of its own, beside the text saying why;
/// the 405 says in `Allow` what is allowed.
#[tokio::test]
async fn the_admin_port_s_404_and_405_name_what_was_wrong() {
    use common::control_plane::FakeControlPlane;
    use common::sidecar::sidecar;
    use hyper_util::rt::TokioIo;
    let cp = FakeControlPlane::start(Duration::from_secs(3600)).await;
    let app = http_app().await;
    let s = sidecar(&cp, app.addr, &[]).await;

    let tcp = TokioIo::new(TcpStream::connect(s.admin).await.unwrap());
    let (mut admin, conn) = hyper::client::conn::http1::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let post = |path: &str| {
        let mut req = get(path, &[]);
        *req.method_mut() = ::http::Method::POST;
        req
    };
    for (req, status, token, said) in [
        (
            get("/nope", &[]),
            404,
            "not_found",
            "trellis: not found: try /live /ready /metrics /config\n",
        ),
        (
            get("/app-health/app/nothing", &[]),
            404,
            "not_found",
            "trellis: no app probe at /app-health/app/nothing\n",
        ),
        (
            post("/live"),
            405,
            "method_not_allowed",
            "trellis: GET only\n",
        ),
        (
            post("/app-health/app/nothing"),
            405,
            "method_not_allowed",
            "trellis: GET only\n",
        ),
    ] {
        let what = format!("{} {}", req.method(), req.uri());
        let response = admin.send_request(req).await.unwrap();
        let marked = response.headers().get("trellis-proxy-error").cloned();
        let allow = response.headers().get("allow").cloned();
        let (got, body) = text(response).await;
        assert_eq!((got.as_u16(), body.as_str()), (status, said), "{what}");
        assert_eq!(
            marked.as_ref().and_then(|v| v.to_str().ok()),
            Some(token),
            "{what}"
        );
        // A 405 says what is allowed (RFC 9110 section 15.5.6).
        let allowed = (status == 405).then_some("GET, HEAD");
        assert_eq!(
            allow.as_ref().and_then(|v| v.to_str().ok()),
            allowed,
            "{what}"
        );
    }

    // As curl shows it (run off the runtime the sidecar is served on).
    let url = format!("http://{}/live", s.admin);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-s", "-i", "-X", "POST", &url])
            .output()
            .expect("curl runs")
    })
    .await
    .unwrap();
    let answer = String::from_utf8(out.stdout).unwrap();
    assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nallow: get, head\r\n"),
        "{answer}"
    );
}

/// Writes `request` on a new connection to `admin` and reads the answer
/// up to the close: its status line, its head, and its body.
async fn answer_to(admin: std::net::SocketAddr, request: &[u8]) -> (String, String, String) {
    let mut tcp = TcpStream::connect(admin).await.unwrap();
    // A head over the bound may be answered before all of it is written.
    let _ = tcp.write_all(request).await;
    split(&closed_within(&mut tcp, Duration::from_secs(10)).await)
}

/// An answer's status line, head and body.
fn split(answer: &[u8]) -> (String, String, String) {
    let answer = String::from_utf8(answer.to_vec()).unwrap();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an answer: {answer:?}"));
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// A request head the admin port cannot read is answered in words, as the
/// sidecar's forwarder answers it: the status (400, 431, 414), the
/// text naming what was wrong, `trellis-proxy-error: invalid_request`,
/// and the connection closed. Each is counted by its kind and logged as a
/// warning naming the client and the fault, once per kind per pause, and
/// never with what the head carried (the hook token among it).
#[tokio::test]
async fn a_malformed_admin_request_head_is_answered_in_words_counted_and_warned() {
    use trellis_proxy::http::h1::{HEAD_TOO_LARGE, MAX_REQUEST_HEAD, MAX_TARGET, TARGET_TOO_LONG};
    let (logs, _guard) = Logs::capture(false);
    let (_cp, _app, s) = app_behind_sidecar().await;

    let no_colon = "malformed header line: not a field name and a colon (a line without a \
                    colon, or a space before it)";
    let big = format!(
        "GET /live HTTP/1.1\r\nhost: admin\r\nx-big: {}\r\n\r\n",
        "a".repeat(MAX_REQUEST_HEAD)
    );
    for (request, status, why) in [
        (
            "GET /app-health/app/pre-stop HTTP/1.1\r\nx-trellis-hook-token: the-pods-hook-token\r\n\
             broken line\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
            no_colon,
        ),
        (
            "GET /live HTTP/1.2\r\nhost: admin\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
            "malformed request line: not HTTP/1.0 or HTTP/1.1",
        ),
        (
            "GET /live\rHTTP/1.1\r\nhost: admin\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
            "malformed request line: a bare CR (a CR not followed by LF)",
        ),
        (
            big.as_str(),
            "HTTP/1.1 431 Request Header Fields Too Large",
            HEAD_TOO_LARGE,
        ),
    ] {
        let (got, head, body) = answer_to(s.admin, request.as_bytes()).await;
        assert_eq!(got, status, "{why}");
        assert!(
            head.contains("\r\ntrellis-proxy-error: invalid_request\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nconnection: close"), "{head}");
        assert_eq!(body, format!("trellis: {why}\n"));
    }

    // Too long a target, as an operator's curl sends it.
    let url = format!(
        "http://{}/live?{}",
        s.admin,
        "a".repeat(MAX_TARGET - "/live?".len() + 1)
    );
    let curled = curl(&["-i", &url]).await;
    if let Some(answer) = &curled {
        let (got, head, body) = split(answer.as_bytes());
        assert_eq!(got, "HTTP/1.1 414 URI Too Long");
        assert!(
            head.contains("\r\ntrellis-proxy-error: invalid_request\r\n"),
            "{head}"
        );
        assert_eq!(body, format!("trellis: {TARGET_TOO_LONG}\n"));
    }

    // A good probe on a new connection is served as before.
    let live = s.get("/live").await;
    assert!(live.starts_with("HTTP/1.1 200 "), "{live}");
    let scraped = s.get("/metrics").await;
    let mut kinds = vec![("malformed", 3), ("head_too_large", 1)];
    if curled.is_some() {
        kinds.push(("target_too_long", 1));
    }
    for (reason, count) in kinds {
        let counted =
            format!("trellis_admin_malformed_requests_total{{reason=\"{reason}\"}} {count}\n");
        assert!(scraped.contains(&counted), "{counted}in\n{scraped}");
    }

    let warned = |reason: &str| -> Vec<String> {
        let reason = format!("reason=\"{reason}\"");
        logs.lines()
            .into_iter()
            .filter(|l| l.contains(trellis_proxy::admin::MALFORMED) && l.contains(&reason))
            .collect()
    };
    let malformed = warned("malformed");
    assert_eq!(
        malformed.len(),
        1,
        "one line a kind a pause: {malformed:#?}"
    );
    let line = &malformed[0];
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("client=127.0.0.1:"), "{line}");
    assert!(line.contains(no_colon), "{line}");
    assert_eq!(warned("head_too_large").len(), 1);
    assert!(
        !logs
            .lines()
            .iter()
            .any(|l| l.contains("the-pods-hook-token")),
        "a header value was logged"
    );
}

/// Reads one answer with a `content-length` off a kept-alive connection.
async fn next_answer(tcp: &mut TcpStream) -> (String, String) {
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.ends_with(b"\r\n\r\n") {
        assert_eq!(tcp.read(&mut byte).await.unwrap(), 1, "closed mid-answer");
        seen.push(byte[0]);
    }
    let head = String::from_utf8(seen).unwrap().to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("a length")
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0u8; length];
    tcp.read_exact(&mut body).await.unwrap();
    (head, String::from_utf8(body).unwrap())
}

/// A kept-alive admin connection serves one request after another, one
/// with a body among them. A malformed head later on it is answered as a
/// first head is: in words, with `trellis-proxy-error: invalid_request`,
/// and the connection closed; a later head begun and not whole within
/// [`HEAD_TIMEOUT`] is answered 408 with `request_timeout`, as a first one
/// is. Each is counted once and logged, as answered in words.
#[tokio::test]
async fn a_later_head_on_a_kept_alive_admin_connection_gets_the_first_head_s_answer() {
    let (logs, _guard) = Logs::capture(false);
    let (_cp, _app, s) = app_behind_sidecar().await;

    let mut tcp = TcpStream::connect(s.admin).await.unwrap();
    for request in [
        &b"GET /live HTTP/1.1\r\nhost: admin\r\n\r\n"[..],
        b"GET /live HTTP/1.1\r\nhost: admin\r\ncontent-length: 14\r\n\r\nGET / HTTP/1.1",
        b"GET /live HTTP/1.1\r\nhost: admin\r\n\r\n",
    ] {
        tcp.write_all(request).await.unwrap();
        let (head, body) = next_answer(&mut tcp).await;
        assert!(head.starts_with("http/1.1 200 "), "{head}");
        assert_eq!(body, "live\n");
    }
    tcp.write_all(b"GET /live HTTP/1.1\r\nhost: admin\r\nbroken line\r\n\r\n")
        .await
        .unwrap();
    let (status, head, body) = split(&closed_within(&mut tcp, Duration::from_secs(10)).await);
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    assert!(
        head.contains("\r\ntrellis-proxy-error: invalid_request\r\n"),
        "{head}"
    );
    assert_eq!(
        body,
        "trellis: malformed header line: not a field name and a colon (a line without a \
         colon, or a space before it)\n"
    );
    let line = logs
        .wait_for(&[trellis_proxy::admin::MALFORMED, "reason=\"malformed\""])
        .await;
    assert!(line.contains("client=127.0.0.1:"), "{line}");
    assert!(!line.contains("status only"), "{line}");

    // A second head begun, and not finished.
    let mut stalled = TcpStream::connect(s.admin).await.unwrap();
    stalled
        .write_all(b"GET /live HTTP/1.1\r\nhost: admin\r\n\r\nGET /live HTTP/1.1\r\nhost: ad")
        .await
        .unwrap();
    let (head, body) = next_answer(&mut stalled).await;
    assert!(head.starts_with("http/1.1 200 "), "{head}");
    assert_eq!(body, "live\n");
    let within = HEAD_TIMEOUT + Duration::from_secs(5);
    let (status, head, body) = split(&closed_within(&mut stalled, within).await);
    assert_eq!(status, "HTTP/1.1 408 Request Timeout");
    assert!(
        head.contains("\r\ntrellis-proxy-error: request_timeout\r\n"),
        "{head}"
    );
    assert_eq!(body, format!("trellis: {HEAD_TIMED_OUT}\n"));

    let scraped = s.get("/metrics").await;
    let counted = "trellis_admin_malformed_requests_total{reason=\"malformed\"} 2\n";
    assert!(scraped.contains(counted), "{counted}in\n{scraped}");
}

/// `/config`, as an operator's curl fetches it, says when the certificate
/// became valid and when it expires in RFC 3339 beside the Unix seconds,
/// each agreeing with the other, and ends with a newline as the port's
/// other answers do; the `certificate issued` line says the expiry both
/// ways too.
#[tokio::test]
async fn config_says_the_certificate_s_times_in_rfc3339_and_ends_with_a_newline() {
    let (logs, _guard) = Logs::capture(false);
    let (_cp, _app, s) = app_behind_sidecar().await;
    let issued = logs.wait_for(&["certificate issued"]).await;
    let Some(body) = curl(&[&format!("http://{}/config", s.admin)]).await else {
        return;
    };
    assert!(body.ends_with("}\n"), "{body:?}");
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    let certificate = &config["certificate"];
    for (unix, rfc3339) in [
        ("not_before_unix", "not_before"),
        ("expires_at_unix", "expires_at"),
    ] {
        let seconds = certificate[unix]
            .as_u64()
            .unwrap_or_else(|| panic!("{body}"));
        let said = certificate[rfc3339]
            .as_str()
            .unwrap_or_else(|| panic!("{body}"));
        let at = humantime::parse_rfc3339(said).unwrap_or_else(|e| panic!("{said}: {e}"));
        assert_eq!(
            at,
            std::time::UNIX_EPOCH + Duration::from_secs(seconds),
            "{rfc3339} {said} is not {unix} {seconds}"
        );
    }
    let expires_at = certificate["expires_at"].as_str().unwrap();
    let seconds = certificate["expires_at_unix"].as_u64().unwrap();
    assert!(
        issued.contains(&format!(" expires_at={seconds} "))
            && issued.contains(&format!(" expires={expires_at} ")),
        "{issued}"
    );
}

/// The admin port switches protocols for nothing, and after a request
/// hyper's server may switch for (an HTTP/1.1 `Upgrade`, a `CONNECT`) no
/// later head would be checked: its answer says `connection: close` and
/// the connection ends with it, so a second request on it is never
/// served.
#[tokio::test]
async fn an_admin_connection_ends_after_an_upgrade_or_connect_it_does_not_switch() {
    let (_cp, _app, s) = app_behind_sidecar().await;
    for first in [
        "GET /live HTTP/1.1\r\nHost: admin\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        "GET /live HTTP/1.1\r\nHost: admin\r\nUpgrade: websocket\r\n\r\n",
        "CONNECT admin:15020 HTTP/1.1\r\nHost: admin:15020\r\n\r\n",
        "CONNECT admin:15020 HTTP/1.0\r\nHost: admin:15020\r\nConnection: keep-alive\r\n\r\n",
    ] {
        let mut tcp = TcpStream::connect(s.admin).await.unwrap();
        tcp.write_all(format!("{first}GET /live HTTP/1.1\r\nHost: admin\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let read = closed_within(&mut tcp, Duration::from_secs(10)).await;
        let read = String::from_utf8(read).unwrap();
        let answers = read.lines().filter(|l| l.starts_with("HTTP/1.")).count();
        assert_eq!(answers, 1, "{first:?}: {read}");
        assert!(
            read.to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{first:?}: {read}"
        );
    }
    // The same request without an `Upgrade` keeps the connection open.
    let mut tcp = TcpStream::connect(s.admin).await.unwrap();
    tcp.write_all(b"GET /live HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = next_answer(&mut tcp).await;
    assert!(!head.contains("connection: close"), "{head}");
    assert_eq!(body, "live\n");
}
