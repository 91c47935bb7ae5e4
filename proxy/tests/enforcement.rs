//! Enforcement, end to end inside one process: a whole sidecar, its real
//! flags, a fake control plane pushing snapshots over real gRPC, clients
//! with real SVIDs. Zero trust (nothing before the first snapshot), DENY
//! over ALLOW over the mesh default, AUDIT logged and never enforced, open
//! connections closed by a new policy (unless told not to), invalid
//! policies NACKed with the last good ones still enforced, and every
//! decision logged and counted by action and policy.

mod common;

use std::time::Duration;

use common::control_plane::FakeControlPlane;
use common::http::snapshot;
use common::sidecar::{Logs, TestSidecar, sidecar};
use common::*;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use trellis_core::SpiffeId;
use trellis_proto::discovery::v1::{self as pb, watch_request::Kind};
use trellis_proto::policy::v1 as policy_pb;

const CERT_TTL: Duration = Duration::from_secs(3600);

/// A policy protecting the sidecar under test whose one rule lets in
/// `spiffe://td.test<from>`.
fn policy(name: &str, action: &str, from: &str) -> policy_pb::Policy {
    api_policy(
        name,
        action,
        &format!("{{from: [{{spiffeId: \"spiffe://{TD}{from}\"}}]}}"),
    )
}

async fn acked(cp: &FakeControlPlane, snapshot: pb::Snapshot) {
    let version = snapshot.version;
    let answer = cp.push_and_wait(snapshot).await;
    assert!(
        matches!(&answer, Kind::Ack(a) if a.version == version),
        "{answer:?}"
    );
}

/// The sidecar under test (`ns/b/sa/api`, with the flags `extra`) in front
/// of an echo app, against a fake control plane.
async fn protected_echo(extra: &[&str]) -> (FakeControlPlane, EchoApp, TestSidecar) {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = echo_app().await;
    let s = sidecar(&cp, app.addr, extra).await;
    (cp, app, s)
}

/// Connects as `client`, retrying while the sidecar has no certificate yet.
async fn connect(
    cp: &FakeControlPlane,
    s: &TestSidecar,
    client: &SpiffeId,
) -> TlsStream<TcpStream> {
    let config = cp.ca.client_config(Some((&cp.ca, client)));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tls_connect(s.inbound, config.clone()).await {
            Ok(stream) => return stream,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "no handshake: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Whether the sidecar lets `client` through to the echo app.
async fn gets_through(cp: &FakeControlPlane, s: &TestSidecar, client: &SpiffeId) -> bool {
    let mut stream = connect(cp, s, client).await;
    round_trip(&mut stream, b"ping").await.is_ok()
}

fn other() -> SpiffeId {
    id("/ns/a/sa/other")
}

fn decisions(action: &str, policy: &str) -> String {
    format!("trellis_decisions_total{{action=\"{action}\",policy=\"{policy}\"}}")
}

#[tokio::test]
async fn denies_everything_before_the_first_snapshot() {
    let (logs, _guard) = Logs::capture(false);
    let (cp, app, s) = protected_echo(&[]).await;

    assert!(!gets_through(&cp, &s, &web()).await);
    assert_eq!(*app.accepted.borrow(), 0, "the app was dialled");
    logs.wait_for(&[
        "inbound connection denied: no policy snapshot yet",
        &format!("peer={}", web()),
        "policy=default:no-snapshot",
    ])
    .await;
    assert!(s.has_sample(&decisions("deny", "default:no-snapshot"), 1));
    assert!(s.get("/ready").await.contains("no discovery snapshot yet"));
}

#[tokio::test]
async fn the_default_deny_blocks_and_logs_json_fields() {
    let (logs, _guard) = Logs::capture(true);
    let (cp, app, s) = protected_echo(&[]).await;
    acked(&cp, snapshot(1, "deny", vec![])).await;

    assert!(!gets_through(&cp, &s, &web()).await);
    assert_eq!(*app.accepted.borrow(), 0, "the app was dialled");
    let port = app.addr.port();
    eventually("a JSON line naming the default", || {
        logs.lines().iter().any(|line| {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                return false;
            };
            let f = &v["fields"];
            f["message"] == "inbound connection denied"
                && f["peer"] == web().as_str()
                && f["port"] == port
                && f["decision"] == "deny"
                && f["policy"] == "default:deny"
                && f["rule"].is_null()
        })
    })
    .await;
}

#[tokio::test]
async fn an_allow_lets_one_identity_in_and_keeps_another_out() {
    let (logs, _guard) = Logs::capture(false);
    let (cp, app, s) = protected_echo(&[]).await;
    acked(
        &cp,
        snapshot(1, "deny", vec![policy("web-in", "ALLOW", "/ns/a/sa/web")]),
    )
    .await;

    assert!(gets_through(&cp, &s, &web()).await);
    assert!(!gets_through(&cp, &s, &other()).await);
    assert_eq!(*app.accepted.borrow(), 1, "only web reached the app");
    let port = format!("port={}", app.addr.port());
    logs.wait_for(&[
        "inbound connection allowed",
        &format!("peer={}", web()),
        &port,
        "decision=allow",
        "policy=b/web-in",
        "rule=0",
    ])
    .await;
    logs.wait_for(&[
        "inbound connection denied",
        &format!("peer={}", other()),
        "decision=deny",
        "policy=default:deny",
    ])
    .await;
}

#[tokio::test]
async fn deny_beats_allow() {
    let (logs, _guard) = Logs::capture(false);
    let (cp, app, s) = protected_echo(&[]).await;
    let policies = vec![
        policy("web-in", "ALLOW", "/ns/a/sa/web"),
        policy("zz-no-web", "DENY", "/ns/a/sa/web"),
    ];
    acked(&cp, snapshot(1, "allow-mesh", policies)).await;

    assert!(!gets_through(&cp, &s, &web()).await);
    assert_eq!(*app.accepted.borrow(), 0, "the app was dialled");
    // The mesh default still lets everyone else in.
    assert!(gets_through(&cp, &s, &other()).await);
    logs.wait_for(&[
        "inbound connection denied",
        &format!("peer={}", web()),
        "policy=b/zz-no-web",
        "rule=0",
    ])
    .await;
}

/// An AUDIT rule lets the connection through and warns it would deny it,
/// naming the peer, the port and the AUDIT policy and rule, and nothing
/// more: it reports only allowed connections, so it carries no verdict.
#[tokio::test]
async fn audit_passes_and_logs_would_deny() {
    let (logs, _guard) = Logs::capture(true);
    let (cp, app, s) = protected_echo(&[]).await;
    let policies = vec![
        policy("web-in", "ALLOW", "/ns/a/sa/web"),
        policy("audit-web", "AUDIT", "/ns/a/sa/web"),
    ];
    acked(&cp, snapshot(1, "deny", policies)).await;

    assert!(gets_through(&cp, &s, &web()).await);
    let line = logs.wait_for(&["would deny"]).await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["level"], "WARN", "{line}");
    assert_eq!(
        v["fields"],
        serde_json::json!({
            "message": "inbound connection: would deny (AUDIT, not enforced)",
            "peer": web().as_str(),
            "port": app.addr.port(),
            "app": app.addr.to_string(),
            "decision": "audit",
            "policy": "b/audit-web",
            "rule": 0,
        }),
        "{line}"
    );
    assert!(s.has_sample(&decisions("audit", "b/audit-web"), 1));
    assert!(s.has_sample(&decisions("allow", "b/web-in"), 1));
}

#[tokio::test]
async fn a_new_policy_closes_an_open_connection_it_denies() {
    let (logs, _guard) = Logs::capture(false);
    let (cp, _app, s) = protected_echo(&[]).await;
    acked(
        &cp,
        snapshot(1, "deny", vec![policy("web-in", "ALLOW", "/ns/a/sa/web")]),
    )
    .await;
    let mut open = connect(&cp, &s, &web()).await;
    assert_eq!(round_trip(&mut open, b"before").await.unwrap(), b"before");

    acked(
        &cp,
        snapshot(2, "deny", vec![policy("no-web", "DENY", "/ns/a/sa/web")]),
    )
    .await;
    // The sidecar closes it: the read ends (EOF or reset) without waiting
    // for the 10 s timeout.
    let _ = read_to_end(&mut open).await;
    assert!(round_trip(&mut open, b"after").await.is_err());
    logs.wait_for(&[
        "open inbound connection closed",
        &format!("peer={}", web()),
        "policy=b/no-web",
        "rule=0",
        "version=2",
    ])
    .await;
    assert!(s.has_sample(
        "trellis_connections_total{direction=\"inbound\",outcome=\"closed_by_policy\"}",
        1
    ));
    assert!(s.has_sample(&decisions("deny", "b/no-web"), 1));
}

#[tokio::test]
async fn open_connections_stay_when_closing_is_off() {
    let (cp, _app, s) = protected_echo(&["--close-denied-connections", "false"]).await;
    acked(
        &cp,
        snapshot(1, "deny", vec![policy("web-in", "ALLOW", "/ns/a/sa/web")]),
    )
    .await;
    let mut open = connect(&cp, &s, &web()).await;
    assert_eq!(round_trip(&mut open, b"before").await.unwrap(), b"before");

    acked(&cp, snapshot(2, "deny", vec![])).await;
    // New connections follow the new policy at once...
    assert!(!gets_through(&cp, &s, &web()).await);
    // ...while the open one is left alone.
    assert_eq!(round_trip(&mut open, b"after").await.unwrap(), b"after");
    assert!(
        s.get("/config")
            .await
            .contains("\"close_denied_connections\": false")
    );
}

#[tokio::test]
async fn an_invalid_policy_is_nacked_and_the_previous_stays_enforced() {
    let (cp, _app, s) = protected_echo(&[]).await;
    acked(
        &cp,
        snapshot(1, "deny", vec![policy("web-in", "ALLOW", "/ns/a/sa/web")]),
    )
    .await;

    let mut invalid = policy("other-in", "ALLOW", "/ns/a/sa/other");
    invalid.rules[0].to = vec![policy_pb::Destination {
        ports: vec![70000],
        ..Default::default()
    }];
    let answer = cp.push_and_wait(snapshot(2, "deny", vec![invalid])).await;
    let Kind::Nack(nack) = answer else {
        panic!("not a NACK: {answer:?}");
    };
    assert!(
        nack.reason
            .starts_with("policies: policy b/other-in is invalid")
            && nack.reason.contains("70000"),
        "{}",
        nack.reason
    );
    let answer = cp.push_and_wait(snapshot(3, "open-door", vec![])).await;
    let Kind::Nack(nack) = answer else {
        panic!("not a NACK: {answer:?}");
    };
    assert!(
        nack.reason
            .starts_with("mesh.default_policy: unknown default policy \"open-door\""),
        "{}",
        nack.reason
    );

    assert!(gets_through(&cp, &s, &web()).await);
    assert!(!gets_through(&cp, &s, &other()).await);
    let config = s.get("/config").await;
    assert!(config.contains("\"snapshot_version\": 1"), "{config}");
    assert!(config.contains("\"b/web-in\""), "{config}");
    assert!(!config.contains("other-in"), "{config}");
}

#[tokio::test]
async fn decisions_are_counted_by_action_and_policy() {
    let (cp, _app, s) = protected_echo(&[]).await;
    let policies = vec![
        policy("web-in", "ALLOW", "/ns/a/sa/web"),
        policy("audit-web", "AUDIT", "/ns/a/sa/web"),
        policy("no-intruder", "DENY", "/ns/a/sa/intruder"),
    ];
    acked(&cp, snapshot(1, "deny", policies)).await;

    for _ in 0..2 {
        assert!(gets_through(&cp, &s, &web()).await);
    }
    assert!(!gets_through(&cp, &s, &other()).await);
    assert!(!gets_through(&cp, &s, &id("/ns/a/sa/intruder")).await);
    let metrics = s.get("/metrics").await;
    for (series, value) in [
        (decisions("allow", "b/web-in"), 2),
        (decisions("audit", "b/audit-web"), 2),
        (decisions("deny", "default:deny"), 1),
        (decisions("deny", "b/no-intruder"), 1),
        (decisions("allow", "default:deny"), 0),
    ] {
        let sample = format!("{series} {value}\n");
        assert!(
            metrics.contains(&sample),
            "{sample} missing from\n{metrics}"
        );
    }
}

/// A version names its content only with the epoch the control plane set
/// it in (one whose database was restored from an older copy sets the
/// same versions again, in another epoch): a reconnecting sidecar names
/// both, so that it is sent nothing only when it holds what is served.
/// `/config` shows both too, the epoch in hex, and so does the log.
#[tokio::test]
async fn a_reconnecting_sidecar_names_the_version_it_holds_with_its_epoch() {
    const EPOCH: u64 = 0x9f3a_5c1e_0b7d_2e64;
    let (logs, _guard) = Logs::capture(false);
    let (cp, _app, s) = protected_echo(&[]).await;
    let held = pb::Snapshot {
        version_epoch: EPOCH,
        ..snapshot(1, "deny", vec![])
    };
    acked(&cp, held).await;
    let config = s.get("/config").await;
    assert!(config.contains("\"snapshot_version\": 1,"), "{config}");
    assert!(
        config.contains("\"snapshot_version_epoch\": \"9f3a5c1e0b7d2e64\""),
        "{config}"
    );
    let subscribes = cp.seen.lock().unwrap().subscribes.len();
    cp.drop_streams();
    eventually("a reconnection", || {
        cp.seen.lock().unwrap().subscribes.len() > subscribes
    })
    .await;
    assert_eq!(cp.seen.lock().unwrap().subscribes, [(0, 0), (1, EPOCH)]);
    logs.wait_for(&[
        "discovery stream open",
        "last_version=1 last_version_epoch=9f3a5c1e0b7d2e64",
    ])
    .await;
}

#[tokio::test]
async fn keeps_enforcing_across_a_control_plane_reconnect() {
    let (logs, _guard) = Logs::capture(false);
    let (cp, _app, s) = protected_echo(&[]).await;
    acked(
        &cp,
        snapshot(1, "deny", vec![policy("web-in", "ALLOW", "/ns/a/sa/web")]),
    )
    .await;
    let mut open = connect(&cp, &s, &web()).await;
    assert_eq!(round_trip(&mut open, b"before").await.unwrap(), b"before");

    // The control plane goes away; the sidecar reconnects from version 1
    // and gets the same snapshot again.
    let answers = cp.seen.lock().unwrap().answers.len();
    cp.drop_streams();
    let answer = cp.answer_after(answers, 1).await;
    assert!(matches!(answer, Kind::Ack(_)), "{answer:?}");
    assert_eq!(cp.seen.lock().unwrap().subscribes, [(0, 0), (1, 0)]);
    assert!(
        logs.find(&["snapshot applied", "version=1", "policies_changed=false"])
            .is_some(),
        "{:?}",
        logs.lines()
    );

    // Nothing was reset: the open connection lives, the policy holds.
    assert_eq!(round_trip(&mut open, b"after").await.unwrap(), b"after");
    assert!(gets_through(&cp, &s, &web()).await);
    assert!(!gets_through(&cp, &s, &other()).await);
}

/// A sidecar whose certificate expires while the control plane is away
/// (renewals failing since half its life) refuses new connections as
/// having no certificate, rather than presenting one every peer refuses:
/// a caller is answered `access_denied`, counted as
/// `no_local_certificate`, and the expiry is logged once, as an error.
/// Once the control plane is back, the next renewal serves again, with
/// no restart.
#[tokio::test]
async fn a_certificate_that_expires_during_an_outage_refuses_then_recovers() {
    let (logs, _guard) = Logs::capture(false);
    let cp = FakeControlPlane::start(Duration::from_secs(4)).await;
    let app = echo_app().await;
    let s = sidecar(&cp, app.addr, &[]).await;
    acked(&cp, snapshot(1, "allow-mesh", vec![])).await;
    assert!(gets_through(&cp, &s, &web()).await);
    cp.go_down();
    let config: serde_json::Value = serde_json::from_str(
        s.get("/config")
            .await
            .split_once("\r\n\r\n")
            .expect("an HTTP answer")
            .1,
    )
    .unwrap();
    let expires = config["certificate"]["expires_at_unix"].as_i64().unwrap();
    let serial = config["certificate"]["serial"].as_str().unwrap().to_owned();

    past(expires).await;
    let client = cp.ca.client_config(Some((&cp.ca, &web())));
    for _ in 0..3 {
        let refused = tls_connect(s.inbound, client.clone()).await.unwrap_err();
        assert!(
            refused.to_string().contains("AccessDenied"),
            "refused otherwise than as not ready: {refused}"
        );
    }
    let no_certificate =
        "trellis_handshake_failures_total{direction=\"inbound\",reason=\"no_local_certificate\"}";
    assert!(s.has_sample(no_certificate, 3), "{}", s.metrics.encode());
    let expired = "this sidecar's certificate expired without being renewed";
    let said = logs.wait_for(&[expired, &format!("serial={serial}")]).await;
    assert!(said.contains("ERROR"), "{said}");
    let times = logs.lines().iter().filter(|l| l.contains(expired)).count();
    assert_eq!(times, 1, "{:?}", logs.lines());
    // The refusals say why there is no certificate: not a start-up's.
    logs.wait_for(&["inbound connection refused: this sidecar's certificate expired, not renewed"])
        .await;

    cp.come_back();
    // Renewal retries back off to a few seconds by now.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tls_connect(s.inbound, client.clone()).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "no handshake once the control plane was back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gets_through(&cp, &s, &web()).await);
}

/// A control plane away for many retries is warned of once, not at every
/// retry: one `certify failed` while the failure repeats unchanged, and
/// for discovery one line as the stream is lost and one as reconnecting
/// fails; every failed renewal is still counted, and once the control
/// plane is back a new outage is warned of again.
#[tokio::test]
async fn an_outage_is_warned_of_once_not_at_every_retry() {
    let (logs, _guard) = Logs::capture(false);
    let cp = FakeControlPlane::start(Duration::from_secs(4)).await;
    let app = echo_app().await;
    let s = sidecar(&cp, app.addr, &[]).await;
    acked(&cp, snapshot(1, "deny", vec![])).await;
    let unreachable =
        "trellis_certificate_renewals_total{outcome=\"error\",reason=\"unreachable\"} ";
    let failed = || {
        s.metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(unreachable)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let warned = |what: &str| {
        logs.lines()
            .iter()
            .filter(|l| l.contains(" WARN ") && l.contains(what))
            .count()
    };

    cp.go_down();
    // Renewal is due at about half of the 4 s lifetime; retries come 0.5
    // to 1 s, 1 to 2 s and 2 to 4 s after each failure.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while failed() < 4 || cp.seen.lock().unwrap().closed_while_down < 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} failed renewals; {:?}",
            failed(),
            logs.lines()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(warned("certify failed"), 1, "{:?}", logs.lines());
    assert_eq!(warned("discovery stream lost"), 2, "{:?}", logs.lines());

    cp.come_back();
    logs.wait_for(&["certificate issued", "renewal=true"]).await;
    let renewed = failed();
    cp.go_down();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while failed() == renewed {
        assert!(std::time::Instant::now() < deadline, "no failed renewal");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(warned("certify failed"), 2, "{:?}", logs.lines());
}
