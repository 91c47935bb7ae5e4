//! Authorization policy end to end: the control plane at `--default-policy
//! deny`, an app `api` behind its sidecar, and two callers, `web` and
//! `intruder`, each with a route to it. Policies are applied with the real
//! `trellisctl`; every assertion on traffic comes after the api sidecar has
//! acknowledged the snapshot version that holds the change (read from
//! `trellisctl workloads -o json`), never after a sleep.

use std::path::PathBuf;

use trellis_tests::http::HttpConnection;
use trellis_tests::policy::{self, PolicyDoc, stream};
use trellis_tests::{HttpApp, Mesh, Sidecar, eventually, http};

use crate::SOON;

/// Fields drop in order: sidecars stop before the control plane.
struct Setup {
    web: Sidecar,
    intruder: Sidecar,
    server: Sidecar,
    api: HttpApp,
    mesh: Mesh,
}

impl Setup {
    async fn start() -> anyhow::Result<Setup> {
        let mesh = Mesh::builder().default_policy(Some("deny")).start().await?;
        let api = HttpApp::start("api").await?;
        let server = mesh.sidecar("api").app(api.addr()).start().await?;
        let web = mesh.sidecar("web").route_to(&server).start().await?;
        let intruder = mesh.sidecar("intruder").route_to(&server).start().await?;
        Ok(Setup {
            web,
            intruder,
            server,
            api,
            mesh,
        })
    }

    fn api_id(&self) -> &str {
        self.server.identity()
    }

    /// The port the api sidecar authorizes on: its app's.
    fn port(&self) -> u16 {
        self.api.addr().port()
    }

    /// One request from `caller` to api over a new connection.
    async fn call(&self, caller: &Sidecar) -> anyhow::Result<String> {
        let addr = caller.route_addr(self.api_id());
        Ok(http::get(addr, "/").await?.success()?.body)
    }

    async fn assert_allowed(&self, caller: &Sidecar) {
        match self.call(caller).await {
            Ok(body) => assert_eq!(body, self.api.greeting()),
            Err(e) => panic!(
                "{} should reach api: {e:#}\napi sidecar log:\n{}",
                caller.name(),
                self.server.log()
            ),
        }
    }

    /// `caller`'s request is refused by api's sidecar, and the caller is
    /// told so by `policy` (`default:deny`, told that no policy allows the
    /// request, or `NS/NAME rule N`).
    async fn assert_denied(&self, caller: &Sidecar, policy: &str) {
        let addr = caller.route_addr(self.api_id());
        let response = http::get(addr, "/").await;
        let answer = match policy {
            "default:deny" => {
                "trellis: denied by policy default:deny: no policy allows this request\n".to_owned()
            }
            named => format!("trellis: denied by policy {named}\n"),
        };
        match response {
            Ok(r) if r.status == ::http::StatusCode::FORBIDDEN => assert_eq!(
                r.body,
                answer,
                "{} was refused by another policy",
                caller.name()
            ),
            other => panic!(
                "{} should be refused by {policy}, got {other:?}\napi sidecar log:\n{}",
                caller.name(),
                self.server.log()
            ),
        }
    }

    /// Applies `documents` and waits until api enforces them.
    async fn apply(&self, documents: &[PolicyDoc]) -> anyhow::Result<u64> {
        policy::apply_and_wait(&self.mesh, self.api_id(), &stream(documents)).await
    }

    fn allow_web(&self) -> PolicyDoc {
        PolicyDoc::allow("web-to-api", self.api_id())
            .from(self.web.identity())
            .port(self.port())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_deny_blocks_every_caller() -> anyhow::Result<()> {
    let mut s = Setup::start().await?;
    s.assert_denied(&s.web, "default:deny").await;
    s.assert_denied(&s.intruder, "default:deny").await;
    let line = s
        .server
        .wait_for_log("inbound connection denied", SOON)
        .await?;
    assert!(line.contains("default:deny"), "{line}");
    assert_eq!(
        s.api.connections(),
        0,
        "a denied caller never reaches the app"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_lets_one_identity_in_after_the_ack_and_keeps_another_out() -> anyhow::Result<()> {
    let mut s = Setup::start().await?;
    s.assert_denied(&s.web, "default:deny").await;
    s.apply(&[s.allow_web()]).await?;
    // Enforcement follows the ACK: no retry from here on.
    s.assert_allowed(&s.web).await;
    s.assert_denied(&s.intruder, "default:deny").await;
    let line = s
        .server
        .wait_for_log("inbound connection allowed", SOON)
        .await?;
    assert!(line.contains("default/web-to-api"), "{line}");
    let metrics = s.server.metrics().await?;
    let allowed = metrics.counter(
        "trellis_decisions_total",
        &[("action", "allow"), ("policy", "default/web-to-api")],
    );
    assert!(allowed >= 1.0, "no allow counted for the policy");
    // The change left the mesh endpoints as they were: api still holds all
    // three (sent again, or kept from the version it acknowledged).
    let log = s.server.log();
    let applied = log
        .lines()
        .rfind(|l| l.contains("snapshot applied"))
        .expect("api applied snapshots");
    assert!(applied.contains(" endpoints=3 "), "{applied}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_beats_allow() -> anyhow::Result<()> {
    let mut s = Setup::start().await?;
    let everyone = PolicyDoc::allow("everyone-to-api", s.api_id());
    let not_web = PolicyDoc::deny("deny-web", s.api_id()).from(s.web.identity());
    s.apply(&[everyone, not_web]).await?;
    s.assert_denied(&s.web, "default/deny-web rule 0").await;
    s.assert_allowed(&s.intruder).await;
    let line = s
        .server
        .wait_for_log("inbound connection denied", SOON)
        .await?;
    assert!(line.contains("default/deny-web"), "{line}");
    assert!(line.contains("rule=0"), "{line}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_passes_and_logs_would_deny() -> anyhow::Result<()> {
    let mut s = Setup::start().await?;
    let audit = PolicyDoc::audit("audit-web", s.api_id()).from(s.web.identity());
    s.apply(&[s.allow_web(), audit]).await?;
    s.assert_allowed(&s.web).await;
    let line = s.server.wait_for_log("would deny", SOON).await?;
    assert!(line.contains("default/audit-web"), "{line}");
    s.assert_denied(&s.intruder, "default:deny").await;
    Ok(())
}

/// An AUDIT rule answers what it would deny that is allowed today: a
/// caller denied anyway, whose sidecar's requests are each answered 403 by
/// the denying policy, is neither logged nor counted by it. Once allowed,
/// its connection is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reports_nothing_already_denied() -> anyhow::Result<()> {
    let mut s = Setup::start().await?;
    let audit = PolicyDoc::audit("audit-web", s.api_id()).from(s.web.identity());
    s.apply(std::slice::from_ref(&audit)).await?;
    s.assert_denied(&s.web, "default:deny").await;
    s.assert_denied(&s.web, "default:deny").await;
    // Logged and counted before the 403 was sent.
    s.server
        .wait_for_log("inbound connection denied", SOON)
        .await?;
    let audited = |metrics: &trellis_tests::Metrics| {
        metrics.counter(
            "trellis_decisions_total",
            &[("action", "audit"), ("policy", "default/audit-web")],
        )
    };
    let metrics = s.server.metrics().await?;
    let denied = metrics.counter(
        "trellis_decisions_total",
        &[("action", "deny"), ("policy", "default:deny")],
    );
    assert_eq!(denied, 2.0, "each refused request counts a deny");
    assert_eq!(audited(&metrics), 0.0, "a denied request counted as audit");
    let log = s.server.log();
    assert!(
        !log.contains("would deny"),
        "a denied caller was reported by the AUDIT policy:\n{log}"
    );

    s.apply(&[s.allow_web(), audit]).await?;
    s.assert_allowed(&s.web).await;
    let line = s.server.wait_for_log("would deny", SOON).await?;
    assert!(line.contains("policy=default/audit-web rule=0"), "{line}");
    assert_eq!(audited(&s.server.metrics().await?), 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_returns_to_the_default() -> anyhow::Result<()> {
    let s = Setup::start().await?;
    s.apply(&[s.allow_web()]).await?;
    s.assert_allowed(&s.web).await;
    let version = policy::delete(&s.mesh, "default/web-to-api").await?;
    policy::wait_for_ack(&s.mesh, s.api_id(), version).await?;
    s.assert_denied(&s.web, "default:deny").await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_is_rejected_and_the_previous_version_stays_in_force()
-> anyhow::Result<()> {
    let s = Setup::start().await?;
    let acked = s.apply(&[s.allow_web()]).await?;

    // The same policy, now for intruder on a port that cannot exist: line 12
    // holds `- ports: [70000]`.
    let bad = PolicyDoc::allow("web-to-api", s.api_id())
        .from(s.intruder.identity())
        .to_yaml()
        .replace(
            "    - from:",
            "    - to:\n        - ports: [70000]\n      from:",
        );
    let (file, message) = policy::apply_refused(&s.mesh, &bad).await?;
    let expected = format!(
        "{}:12:19: spec.rules[0].to[0].ports[0]: port 70000 is out of range",
        file.display()
    );
    assert!(message.contains(&expected), "{message}");
    assert!(message.contains("nothing applied"), "{message}");

    let stored = s.mesh.ctl(["policy", "get", "default/web-to-api"]).await?;
    assert!(stored.starts_with("# revision 1\n"), "{stored}");
    assert!(stored.contains(s.web.identity()), "{stored}");
    assert_eq!(policy::acked_version(&s.mesh, s.api_id()).await?, acked);
    s.assert_allowed(&s.web).await;
    s.assert_denied(&s.intruder, "default:deny").await;
    Ok(())
}

/// What api's sidecar logs each time its discovery stream ends or a
/// reconnection fails (`proxy/src/policy/watch.rs`).
const STREAM_LOST: &str = "discovery stream lost; keeping the last good snapshot";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_snapshot_is_enforced_while_the_control_plane_is_down() -> anyhow::Result<()> {
    let mut s = Setup::start().await?;
    s.apply(&[s.allow_web()]).await?;
    let lost_before = s.server.log().matches(STREAM_LOST).count();
    // Killed, not stopped: the sidecars get no goodbye.
    let control_plane = s.mesh.control_plane().process();
    control_plane
        .expect("the control plane runs")
        .signal(rustix::process::Signal::KILL)?;
    s.mesh.stop_control_plane()?;
    // Only once api's sidecar noticed: the stream lost, then at least one
    // reconnection failed, so what it enforces is what it kept.
    let server = &s.server;
    eventually(
        "api's sidecar to lose its stream and fail to reconnect",
        SOON,
        || async move {
            let log = server.log();
            match log.matches(STREAM_LOST).count() - lost_before {
                lost @ 0..2 => Err(format!("{lost} of 2 `{STREAM_LOST}` lines")),
                _ => Ok(()),
            }
        },
    )
    .await?;
    for _ in 0..3 {
        s.assert_allowed(&s.web).await;
        s.assert_denied(&s.intruder, "default:deny").await;
    }
    s.server.process().ensure_running()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_names_the_deciding_rule() -> anyhow::Result<()> {
    let s = Setup::start().await?;
    let not_intruder = PolicyDoc::deny("deny-intruder", s.api_id()).from(s.intruder.identity());
    policy::apply(&s.mesh, &stream(&[s.allow_web(), not_intruder])).await?;
    let explain = async |from: &Sidecar, port: u16| {
        policy::explain(&s.mesh, from.identity(), s.api_id(), port, &[]).await
    };
    let web = explain(&s.web, s.port()).await?;
    assert!(web.contains("allow by default/web-to-api rule 0"), "{web}");
    assert!(
        web.contains("decided by default/web-to-api rule 0"),
        "{web}"
    );
    let intruder = explain(&s.intruder, s.port()).await?;
    assert!(
        intruder.contains("decided by default/deny-intruder rule 0"),
        "{intruder}"
    );
    let elsewhere = explain(&s.web, 1).await?;
    assert!(
        elsewhere.contains("no rule decided: mesh default deny"),
        "{elsewhere}"
    );
    Ok(())
}

/// `trellisctl policy explain` knows the ports the destination's sidecars
/// declared opaque whichever control-plane replica they stream to. Two
/// replicas issue from one CA, each on its own state: the destination's
/// sidecar declares a port opaque to `cp-b`, and `cp-a`, asked, asks its
/// peer, and joins a sidecar of the same identity streaming to itself that
/// does not. With `cp-b` stopped, `cp-a` answers alone, from its own
/// sidecar, and names `cp-b` as not listening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_joins_the_opaque_ports_of_sidecars_on_a_peer_replica() -> anyhow::Result<()> {
    let mut cp_b = Mesh::builder()
        .arg("--replica-name")
        .arg("cp-b")
        .start()
        .await?;
    let cp_a = Mesh::builder()
        .arg("--replica-name")
        .arg("cp-a")
        .arg("--ca-cert")
        .arg(cp_b.state_dir().join("ca.crt"))
        .arg("--ca-key")
        .arg(cp_b.state_dir().join("ca.key"))
        .arg("--peers")
        .arg(cp_b.control_plane_addr().to_string())
        .start()
        .await?;
    let db_port = "5432";
    let db = cp_b
        .sidecar("db")
        .arg("--opaque-ports")
        .arg(db_port)
        .start()
        .await?;
    let (web, db_id) = (cp_a.spiffe_id("default", "web"), db.identity().to_owned());
    let explain = |output: &'static str| {
        cp_a.ctl([
            "policy", "explain", "--from", &web, "--to", &db_id, "--port", db_port, "-o", output,
        ])
    };
    let explain_json = || async {
        let out = explain("json").await?;
        serde_json::from_str::<serde_json::Value>(&out)
            .map_err(|e| anyhow::anyhow!("`policy explain -o json` printed no JSON ({e}): {out}"))
    };

    let explained = explain("table").await?;
    assert!(
        explained.contains(&format!(
            "port {db_port} is opaque (never parsed as HTTP): declared by the destination's \
             sidecar (its --opaque-ports)"
        )),
        "{explained}"
    );
    assert!(!explained.contains("replica"), "{explained}");

    // Another sidecar of the identity, streaming to cp-a, parses the port
    // as HTTP: both streams are counted.
    let _db_2 = cp_a.sidecar("db-2").identity(&db_id).start().await?;
    let explained = explain_json().await?;
    assert_eq!(
        explained["opaque"],
        serde_json::json!({
            "mesh": false,
            "declaring_sidecars": 1,
            "connected_sidecars": 2,
            "requested": false,
        }),
        "{explained}"
    );
    assert_eq!(explained["unanswered_replicas"], serde_json::json!([]));

    cp_b.stop_control_plane()?;
    let cp_b_addr = cp_b.control_plane_addr().to_string();
    let explained = explain("table").await?;
    assert!(!explained.contains("is opaque"), "{explained}");
    assert!(
        explained.contains(&format!("replica at {cp_b_addr} is not listening ("))
            && explained
                .contains("so it is starting, stopping or gone: it holds no sidecar stream\n"),
        "{explained}"
    );
    let explained = explain_json().await?;
    assert_eq!(explained["opaque"], serde_json::Value::Null, "{explained}");
    let unanswered = &explained["unanswered_replicas"];
    assert_eq!(unanswered.as_array().map(Vec::len), Some(1), "{explained}");
    assert_eq!(unanswered[0]["address"], cp_b_addr.as_str());
    assert_eq!(unanswered[0]["not_listening"], true);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_deny_closes_an_open_connection_it_now_denies() -> anyhow::Result<()> {
    let mut s = Setup::start().await?;
    s.apply(&[s.allow_web()]).await?;
    let mut open = HttpConnection::open(s.web.route_addr(s.api_id())).await?;
    assert_eq!(open.get("/before").await?.success()?.body, s.api.greeting());

    let not_web = PolicyDoc::deny("deny-web", s.api_id()).from(s.web.identity());
    s.apply(&[s.allow_web(), not_web]).await?;
    let open = &tokio::sync::Mutex::new(open);
    // Closed or reset: a request that hangs until it times out is not.
    let ended = eventually("the open connection to be closed", SOON, || async move {
        match open.lock().await.get("/after").await {
            Ok(r) => Err(format!("still answered: {}", r.status)),
            Err(e) => Ok(e),
        }
    })
    .await?;
    assert!(closed(&ended), "the connection ended otherwise: {ended:#}");
    let line = s
        .server
        .wait_for_log("open inbound connection closed: new policies deny it", SOON)
        .await?;
    assert!(line.contains("default/deny-web"), "{line}");
    assert!(line.contains("rule=0"), "{line}");
    // Counted right after the line is logged.
    let server = &s.server;
    let closed_by_policy = eventually("the close to be counted", SOON, || async move {
        let counted = server.metrics().await?.counter(
            "trellis_connections_total",
            &[("direction", "inbound"), ("outcome", "closed_by_policy")],
        );
        anyhow::ensure!(counted > 0.0, "not counted yet");
        Ok(counted)
    })
    .await?;
    assert_eq!(closed_by_policy, 1.0);
    s.assert_denied(&s.web, "default/deny-web rule 0").await;
    Ok(())
}

/// Whether a request failed because its connection was closed or reset,
/// rather than timing out or failing otherwise.
fn closed(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        if let Some(e) = cause.downcast_ref::<hyper::Error>() {
            return e.is_closed() || e.is_incomplete_message() || e.is_canceled();
        }
        cause.downcast_ref::<std::io::Error>().is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            )
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lint_over_a_directory_gives_exit_codes_and_lines() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let lint = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/policies/lint");

    let good = policy::ctl_offline(
        &mesh,
        [
            "policy".as_ref(),
            "lint".as_ref(),
            lint.join("good").as_os_str(),
        ],
    )
    .await?;
    assert_eq!(good.status.code(), Some(0), "{good:?}");

    let all = policy::ctl_offline(
        &mesh,
        [
            "policy".as_ref(),
            "lint".as_ref(),
            "-R".as_ref(),
            lint.as_os_str(),
        ],
    )
    .await?;
    assert_eq!(all.status.code(), Some(1), "{all:?}");
    let stdout = String::from_utf8(all.stdout)?;
    let at: Vec<String> = stdout
        .lines()
        .map(|l| {
            let l = l.strip_prefix(&format!("{}/", lint.display())).unwrap_or(l);
            l.split(": ").take(2).collect::<Vec<_>>().join(": ")
        })
        .collect();
    assert_eq!(
        at,
        [
            "bad/bad-spiffe-id.yaml:12:21: spec.rules[0].from[0].spiffeId",
            "bad/port-out-of-range.yaml:27:25: spec.rules[0].to[0].ports[1]",
            "bad/unknown-field.yaml:10:3: spec.rulez",
        ],
        "{stdout}"
    );
    Ok(())
}
