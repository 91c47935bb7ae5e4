//! The access log and request metrics: one JSON line per request with the
//! fields operators rely on, and bounded request series.

mod common;

use std::time::Duration;

use common::control_plane::FakeControlPlane;
use common::http::*;
use common::sidecar::{Logs, sidecar};
use common::*;

const CERT_TTL: Duration = Duration::from_secs(3600);

/// The access-log lines the sidecar wrote. Run as a library, with no
/// stream of its own installed, it logs each line as an event whose `line`
/// field holds the line as it would have gone to stdout.
fn access_lines(logs: &Logs) -> Vec<serde_json::Value> {
    logs.lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "trellis::access")
        .map(|v| {
            let line = v["fields"]["line"].as_str().expect("a line field");
            serde_json::from_str(line).expect("the line is JSON")
        })
        .collect()
}

#[tokio::test]
async fn every_request_gets_one_json_access_line_and_is_counted() {
    let (logs, _guard) = Logs::capture(true);
    let (cp, app, s) = app_behind_sidecar().await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
    let web = id("/ns/a/sa/web");

    let mut c = h1(&cp, s.inbound, &web).await;
    let post = ::http::Request::post("/echo?token=secret")
        .header("host", "api")
        .body(http_body_util::Full::new(bytes::Bytes::from("12345")))
        .unwrap();
    let (status, body) = text(c.send_request(post).await.unwrap()).await;
    assert_eq!(status, 200);
    eventually("an access line", || access_lines(&logs).len() == 1).await;

    let f = &access_lines(&logs)[0];
    assert!(f["timestamp"].as_str().unwrap().ends_with('Z'), "{f}");
    assert_eq!(f["target"], "trellis::access");
    assert_eq!(f["message"], "request");
    assert_eq!(f["source"], web.to_string());
    assert_eq!(f["destination"], app.addr.to_string());
    assert_eq!(f["method"], "POST");
    assert_eq!(f["path"], "/echo", "the query must not be logged");
    assert_eq!(f["status"], 200);
    assert_eq!(f["bytes_in"], 5);
    assert_eq!(f["bytes_out"], body.len() as u64);
    assert!(f["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(f["decision"], "allow");
    assert_eq!(f["policy"], "default:allow-mesh");
    assert_eq!(f["protocol"], "http1");

    let metrics = s.metrics.encode();
    assert!(
        metrics.contains("trellis_requests_total{status=\"2xx\",decision=\"allow\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("trellis_request_duration_seconds_count 1"));
    // One decision a request: the connection's own is not counted on top.
    let decided = "trellis_decisions_total{action=\"allow\",policy=\"default:allow-mesh\"}";
    assert!(s.has_sample(decided, 1), "{metrics}");

    // A path of any length makes a line of bounded length: cut, with the
    // whole path's length.
    let long = format!("/{}", "é".repeat(20_000));
    let get = ::http::Request::get(long.as_str())
        .header("host", "api")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let (status, _) = text(c.send_request(get).await.unwrap()).await;
    assert_eq!(status, 200);
    eventually("a second access line", || access_lines(&logs).len() == 2).await;
    let f = &access_lines(&logs)[1];
    let path = f["path"].as_str().unwrap();
    assert!(path.ends_with('…'), "{path}");
    assert!(long.starts_with(path.trim_end_matches('…')));
    assert!(path.len() <= 2048 + '…'.len_utf8(), "{}", path.len());
    assert_eq!(f["path_length"], long.len() as u64);
    assert!(s.has_sample(decided, 2), "{}", s.metrics.encode());
}

#[tokio::test]
async fn the_access_log_can_be_switched_off() {
    let (logs, _guard) = Logs::capture(true);
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = http_app().await;
    let s = sidecar(&cp, app.addr, &["--access-log", "false"]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
    let mut c = h1(&cp, s.inbound, &web()).await;
    let (status, _) = text(c.send_request(get("/", &[])).await.unwrap()).await;
    assert_eq!(status, 200);
    eventually("the request counted", || {
        s.metrics
            .encode()
            .contains("trellis_requests_total{status=\"2xx\",decision=\"allow\"} 1")
    })
    .await;
    assert!(access_lines(&logs).is_empty());
}

#[tokio::test]
async fn a_request_the_caller_abandons_is_counted_without_a_status() {
    use tokio::io::AsyncWriteExt;
    let (cp, app, s) = app_behind_sidecar().await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
    let mut tls = connect(&cp, s.inbound, &web()).await;
    tls.write_all(b"GET /hang HTTP/1.1\r\nhost: api\r\n\r\n")
        .await
        .unwrap();
    eventually("the app got the request", || app.seen.paths() == ["/hang"]).await;
    drop(tls);
    eventually("the abandoned request counted with status none", || {
        s.has_sample(
            "trellis_requests_total{status=\"none\",decision=\"allow\"}",
            1,
        )
    })
    .await;
    assert!(s.has_sample(
        "trellis_requests_total{status=\"1xx\",decision=\"allow\"}",
        0
    ));
}

/// A chunked request body counts as its payload, without its chunk
/// framing, as a body framed by its length does.
#[tokio::test]
async fn a_chunked_body_counts_its_payload() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (logs, _guard) = Logs::capture(true);
    let (cp, _app, s) = app_behind_sidecar().await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
    let mut tls = connect(&cp, s.inbound, &web()).await;
    tls.write_all(
        b"POST /echo HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
          5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer))
        .await
        .expect("the answer and the close")
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"), "{answer:?}");
    eventually("an access line", || access_lines(&logs).len() == 1).await;
    let f = &access_lines(&logs)[0];
    assert_eq!(
        (f["method"].as_str(), f["status"].as_u64()),
        (Some("POST"), Some(200))
    );
    assert_eq!(f["bytes_in"], 11, "{f}");
}
