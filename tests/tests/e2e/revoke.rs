//! Revoking an identity whose sidecar proves itself with join tokens: the
//! sidecar stops offering its certificate at the first refused renewal and
//! proves its token file instead, so a new token written there enrols it
//! again while the revoked certificate is still valid, without a restart.
//! And sidecars refuse a revoked identity as a peer as soon as they hold
//! the snapshot the revocation is in, until it is removed.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_tests::{EchoApp, Mesh, Sidecar, eventually, http};

use crate::{Pair, SOON};

/// Long enough that a renewal (at about half of it) and a few retries
/// after it end well before the first certificate expires.
const TTL: Duration = Duration::from_secs(60);

/// The serial and expiry (Unix seconds) of the certificate `sidecar` serves,
/// from `/config`.
async fn certificate(sidecar: &Sidecar) -> anyhow::Result<(String, u64)> {
    let config = sidecar.config().await?;
    let expires = config
        .pointer("/certificate/expires_at_unix")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| anyhow::anyhow!("no certificate.expires_at_unix in /config: {config}"))?;
    Ok((sidecar.cert_serial().await?, expires))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_sidecar_takes_a_new_join_token_before_its_certificate_expires()
-> anyhow::Result<()> {
    let mesh = Mesh::builder().cert_ttl(TTL).start().await?;
    let mut web = mesh.sidecar("web").start().await?;
    let id = web.identity().to_string();
    let (revoked_serial, revoked_expiry) = certificate(&web).await?;
    mesh.ctl(["identity", "revoke", id.as_str()]).await?;

    // Its renewal is refused as revoked; the token it started with was
    // used, so it says what to do, and keeps reading the file.
    web.process()
        .wait_for_log(
            "the join token was already used: write a new one to --token-file",
            TTL,
        )
        .await?;
    let token = mesh.token(&id).await?;
    std::fs::write(web.token_file(), token)?;

    let (serial, expiry) = eventually("web to hold a new certificate", TTL, || async {
        let (serial, expiry) = certificate(&web).await?;
        anyhow::ensure!(serial != revoked_serial, "still {serial}");
        anyhow::Ok((serial, expiry))
    })
    .await?;
    // Every certificate lives TTL from its issuance: the new one was issued
    // while the revoked one was still valid, not once it had expired.
    let issued = expiry - TTL.as_secs();
    assert!(
        issued < revoked_expiry,
        "certificate {serial} was issued at {issued}, once the revoked {revoked_serial} had \
         expired at {revoked_expiry}"
    );
    let log = web.process().log();
    let warned = log
        .lines()
        .filter(|l| l.contains("its identity was revoked; proving the token instead"))
        .count();
    assert_eq!(warned, 1, "the revocation is warned about once:\n{log}");
    web.process().ensure_running()?;
    Ok(())
}

/// How many of `sidecar`'s `direction` (`inbound` or `outbound`)
/// handshakes failed for `reason`, or for any reason with `None`.
async fn handshake_failures(
    sidecar: &Sidecar,
    direction: &str,
    reason: Option<&str>,
) -> anyhow::Result<f64> {
    let mut labels = vec![("direction", direction)];
    labels.extend(reason.map(|reason| ("reason", reason)));
    Ok(sidecar
        .metrics()
        .await?
        .counter("trellis_handshake_failures_total", &labels))
}

/// A caller revoked after it got session tickets offers one on its next
/// call: the server's sidecar, whose TLS configs seal tickets with a new
/// key once a revocation covers more, refuses the ticket, and refuses the
/// full handshake that follows with the alert `certificate_revoked`. The
/// caller's app is answered naming the revocation, not told of a close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_is_refused_by_the_server_sidecar_until_unrevoked() -> anyhow::Result<()> {
    let mut pair = Pair::start(Mesh::start().await?).await?;
    // A caller with no tickets, revoked after web: refused with the alert
    // once the server's TLS configs hold both revocations.
    let other = pair
        .mesh
        .sidecar("other")
        .route_to(&pair.server)
        .start()
        .await?;
    let web = pair.client.identity().to_string();
    let answer = http::get(pair.route(), "/before").await?.success()?;
    assert_eq!(answer.body, "hello from api");
    assert_eq!(
        handshake_failures(&pair.server, "inbound", Some("revoked")).await?,
        0.0
    );

    pair.mesh.ctl(["identity", "revoke", web.as_str()]).await?;
    let other_id = other.identity().to_string();
    pair.mesh
        .ctl(["identity", "revoke", other_id.as_str()])
        .await?;
    let alert = "it holds this sidecar's certificate as revoked (alert_certificate_revoked)";
    let other_route = other.route_addr(pair.server.identity());
    eventually(
        "the server sidecar's TLS configs to hold the revocations",
        SOON,
        || async {
            let answer = http::get(other_route, "/other").await?;
            anyhow::ensure!(answer.body.contains(alert), "{answer:?}");
            anyhow::Ok(())
        },
    )
    .await?;

    // web's tickets were sealed with the key the revocation replaced: its
    // next call makes a full handshake, refused with the alert, which
    // web's sidecar names to its app.
    let answer = http::get(pair.route(), "/after").await?;
    assert_eq!(answer.status, 502, "{answer:?}");
    assert_eq!(
        answer
            .headers
            .get("trellis-proxy-error")
            .map(|v| v.as_bytes()),
        Some(&b"peer_refused"[..]),
        "{answer:?}"
    );
    let to = pair.server.inbound_addr();
    assert_eq!(
        answer.body,
        format!("trellis: outbound call to {to} refused by its sidecar: {alert}\n")
    );
    let metrics = pair.client.metrics().await?;
    let not_resumed = metrics.counter(
        "trellis_tls_resumptions_abandoned_total",
        &[("reason", "not_resumed")],
    );
    assert_eq!(not_resumed, 1.0, "web's ticket was not refused");
    let told = metrics.counter(
        "trellis_handshake_failures_total",
        &[
            ("direction", "outbound"),
            ("reason", "alert_certificate_revoked"),
        ],
    );
    assert_eq!(told, 1.0, "web's sidecar did not count the alert");
    let reached: Vec<_> = pair.api.requests().into_iter().map(|r| r.path).collect();
    assert!(
        !reached.contains(&"/after".to_string()),
        "a revoked caller reached the app: {reached:?}"
    );
    // Logged for each revoked caller, web's refusal after other's.
    let line = pair
        .server
        .wait_for_log(
            &format!("the caller's identity is revoked peer={web} "),
            SOON,
        )
        .await?;
    assert!(line.contains("reason=revoked"), "{line}");
    assert!(line.contains(&format!("peer {web} is revoked")), "{line}");
    assert!(handshake_failures(&pair.server, "inbound", Some("revoked")).await? >= 2.0);

    pair.mesh
        .ctl(["identity", "unrevoke", web.as_str()])
        .await?;

    eventually("web to reach api again", SOON, || async {
        let answer = http::get(pair.route(), "/again").await?.success()?;
        anyhow::ensure!(answer.body == "hello from api", "{answer:?}");
        anyhow::Ok(())
    })
    .await?;
    pair.client.process().ensure_running()?;
    pair.server.process().ensure_running()?;
    Ok(())
}

/// A revoked caller with no session to resume makes a full handshake,
/// which the server's sidecar refuses with the alert
/// `certificate_revoked`: the caller's app is answered 502 naming the
/// alert, the caller's sidecar logs and counts the refusal by its peer,
/// and the server's sidecar logs it naming the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_caller_is_told_by_the_server_sidecar_that_it_is_revoked() -> anyhow::Result<()> {
    let mut pair = Pair::start(Mesh::start().await?).await?;
    let web = pair.client.identity().to_string();
    pair.mesh.ctl(["identity", "revoke", web.as_str()]).await?;
    eventually(
        "the server sidecar to hold the revocation",
        SOON,
        || async {
            let listed = listed_revocation(&pair.server, &web).await?;
            anyhow::ensure!(listed.is_some(), "{web} not listed");
            anyhow::Ok(())
        },
    )
    .await?;

    // Its TLS configs follow the snapshot the revocation came in: until
    // they do, a call is only closed after its handshake.
    let alert = "it holds this sidecar's certificate as revoked (alert_certificate_revoked)";
    let answer = eventually("the call to be refused with the alert", SOON, || async {
        let answer = http::get(pair.route(), "/revoked").await?;
        anyhow::ensure!(answer.body.contains(alert), "{answer:?}");
        anyhow::Ok(answer)
    })
    .await?;
    assert_eq!(answer.status, 502, "{answer:?}");
    let to = pair.server.inbound_addr();
    assert_eq!(
        answer.body,
        format!("trellis: outbound call to {to} refused by its sidecar: {alert}\n")
    );
    let line = pair
        .client
        .wait_for_log("outbound connection refused by the server's sidecar", SOON)
        .await?;
    assert!(line.contains("reason=alert_certificate_revoked"), "{line}");
    let refused = pair.client.metrics().await?.counter(
        "trellis_connections_total",
        &[("direction", "outbound"), ("outcome", "refused_by_peer")],
    );
    assert!(refused >= 1.0, "{refused} refused_by_peer");
    let line = pair
        .server
        .wait_for_log("the caller's identity is revoked", SOON)
        .await?;
    assert!(line.contains(&format!("peer={web} ")), "{line}");
    assert!(line.contains("reason=revoked"), "{line}");
    assert!(handshake_failures(&pair.server, "inbound", Some("revoked")).await? >= 1.0);
    let reached: Vec<_> = pair.api.requests().into_iter().map(|r| r.path).collect();
    assert!(
        reached.is_empty(),
        "a revoked caller reached the app: {reached:?}"
    );
    Ok(())
}

/// An echo app behind an `echo` sidecar and a `caller` sidecar with a
/// route to it, with a connection of the caller's app open through both.
/// Fields drop in order: the connection closes before the sidecars stop.
struct EchoPair {
    /// Open, its first bytes echoed.
    open: TcpStream,
    client: Sidecar,
    server: Sidecar,
    echo: EchoApp,
}

/// Starts an [`EchoPair`] in `mesh`.
async fn echo_pair(mesh: &Mesh) -> anyhow::Result<EchoPair> {
    let echo = EchoApp::start().await?;
    let server = mesh.sidecar("echo").app(echo.addr()).start().await?;
    let client = mesh.sidecar("caller").route_to(&server).start().await?;
    let mut open = TcpStream::connect(client.route_addr(server.identity())).await?;
    // Bytes no one takes for HTTP: copied as they are.
    let ping = [0u8, 1, 2, 3];
    open.write_all(&ping).await?;
    let mut answer = [9; 4];
    open.read_exact(&mut answer).await?;
    assert_eq!(answer, ping);
    Ok(EchoPair {
        open,
        client,
        server,
        echo,
    })
}

/// Asserts that `open` is closed soon, with nothing more to read; `what`
/// names it.
async fn assert_closed(mut open: TcpStream, what: &str) {
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(SOON, open.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "{what} is still open");
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_closes_the_open_connections_of_the_caller_and_refuses_a_revoked_server()
-> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let EchoPair {
        open,
        mut client,
        mut server,
        echo,
    } = echo_pair(&mesh).await?;
    let (caller, echo_id) = (client.identity().to_string(), server.identity().to_string());
    let route = client.route_addr(server.identity());

    // The caller's connection, open before the revocation, is closed by
    // the server's sidecar once it holds the revocation.
    mesh.ctl(["identity", "revoke", caller.as_str()]).await?;
    assert_closed(open, "the revoked caller's open connection").await;
    let line = server
        .wait_for_log(
            "open inbound connection closed: the caller's identity is revoked",
            SOON,
        )
        .await?;
    assert!(line.contains(&caller), "{line}");
    mesh.ctl(["identity", "unrevoke", caller.as_str()]).await?;

    // A revoked server is refused by the caller's sidecar: nothing of the
    // app's reaches it.
    mesh.ctl(["identity", "revoke", echo_id.as_str()]).await?;
    // Counted once the caller's sidecar holds the revocation: a call it
    // dialled before then reached the app, as it should have.
    holds_revocation(&client, &echo_id).await?;
    let before = echo.connections();
    eventually("the caller to refuse the revoked server", SOON, || async {
        let mut tcp = TcpStream::connect(route).await?;
        let _ = tcp.write_all(&[0, 1, 2, 3]).await;
        let _ = tcp.shutdown().await;
        let mut back = Vec::new();
        let _ = tcp.read_to_end(&mut back).await;
        anyhow::ensure!(back.is_empty(), "the revoked server echoed {back:?}");
        let refused = handshake_failures(&client, "outbound", Some("revoked")).await?;
        anyhow::ensure!(refused >= 1.0, "{refused} refused as revoked");
        anyhow::Ok(())
    })
    .await?;
    // The dial's own refusal, not one by the server's sidecar: a call made
    // before it dropped the caller's revocation from its TLS configs was
    // refused with the alert `certificate_revoked`.
    let line = client
        .wait_for_log("outbound connection refused remote=", SOON)
        .await?;
    assert!(line.contains("reason=revoked"), "{line}");
    assert!(
        line.contains(&format!("peer {echo_id} is revoked")),
        "{line}"
    );
    assert_eq!(
        echo.connections(),
        before,
        "the app behind the revoked server was reached"
    );
    client.process().ensure_running()?;
    Ok(())
}

/// How many of `sidecar`'s outbound handshakes resumed a session.
async fn resumed(sidecar: &Sidecar) -> anyhow::Result<f64> {
    Ok(sidecar.metrics().await?.counter(
        "trellis_tls_handshakes_total",
        &[("direction", "outbound"), ("kind", "resumed")],
    ))
}

/// The revocation of `id` that `sidecar`'s `/config` lists, if it does.
async fn listed_revocation(
    sidecar: &Sidecar,
    id: &str,
) -> anyhow::Result<Option<serde_json::Value>> {
    let config = sidecar.config().await?;
    let listed = config
        .get("revocations")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| anyhow::anyhow!("no revocations list in /config: {config}"))?;
    Ok(listed.iter().find(|r| r["spiffe_id"] == id).cloned())
}

/// Calls api through `pair` twice, the second call resuming the session
/// of the first: the client sidecar then holds api's tickets.
async fn resume_a_session(pair: &Pair) -> anyhow::Result<()> {
    let route = pair.route();
    http::get(route, "/first").await?.success()?;
    let before = resumed(&pair.client).await?;
    http::get(route, "/second").await?.success()?;
    assert!(resumed(&pair.client).await? > before, "no session resumed");
    Ok(())
}

/// Waits for `sidecar` to hold the revocation of `id`.
async fn holds_revocation(sidecar: &Sidecar, id: &str) -> anyhow::Result<()> {
    eventually(
        &format!("sidecar {} to hold the revocation", sidecar.name()),
        SOON,
        || async {
            let listed = listed_revocation(sidecar, id).await?;
            anyhow::ensure!(listed.is_some(), "{id} not listed");
            anyhow::Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certified_again_after_its_revocation_is_dialled_by_resumption()
-> anyhow::Result<()> {
    // Short, so the server's renewal, refused as revoked, comes soon.
    let ttl = Duration::from_secs(20);
    let pair = Pair::start(Mesh::builder().cert_ttl(ttl).start().await?).await?;
    let route = pair.route();
    let api_id = pair.server.identity().to_string();
    resume_a_session(&pair).await?;
    let revoked_serial = pair.server.cert_serial().await?;

    // Revoked, with a new join token waiting in its file: the server's
    // sidecar, refused at its next renewal, proves it and is certified
    // again.
    pair.mesh
        .ctl(["identity", "revoke", api_id.as_str()])
        .await?;
    std::fs::write(pair.server.token_file(), pair.mesh.token(&api_id).await?)?;
    holds_revocation(&pair.client, &api_id).await?;
    // The server's sidecar too: a revocation that covers more gives its
    // inbound configs a new session-ticket key, so a ticket sealed before
    // the revocation reached it would not resume.
    holds_revocation(&pair.server, &api_id).await?;
    eventually("api to hold a new certificate", ttl + SOON, || async {
        let serial = pair.server.cert_serial().await?;
        anyhow::ensure!(serial != revoked_serial, "still {serial}");
        anyhow::Ok(())
    })
    .await?;

    // The tickets of before bring back the revoked certificate: that
    // call begins again with a full handshake, which the new one passes.
    let answer = http::get(route, "/again").await?.success()?;
    assert_eq!(answer.body, "hello from api");
    // And the next call resumes the session it began.
    let before = resumed(&pair.client).await?;
    let answer = http::get(route, "/resumed").await?.success()?;
    assert_eq!(answer.body, "hello from api");
    assert!(
        resumed(&pair.client).await? > before,
        "the call to the server certified again after its revocation did not resume"
    );
    let reached: Vec<_> = pair.api.requests().into_iter().map(|r| r.path).collect();
    assert!(reached.contains(&"/resumed".to_string()), "{reached:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_dial_to_a_revoked_server_counts_one_failure_though_it_tried_a_ticket()
-> anyhow::Result<()> {
    let mut pair = Pair::start(Mesh::start().await?).await?;
    let route = pair.route();
    let api_id = pair.server.identity().to_string();
    resume_a_session(&pair).await?;
    // Both calls are over: no connection is open for the revocation to
    // close (which would count too).
    eventually("the calls' connections to close", SOON, || async {
        let open = pair
            .client
            .metrics()
            .await?
            .counter("trellis_connections_open", &[("direction", "outbound")]);
        anyhow::ensure!(open == 0.0, "{open} open");
        anyhow::Ok(())
    })
    .await?;

    pair.mesh
        .ctl(["identity", "revoke", api_id.as_str()])
        .await?;
    holds_revocation(&pair.client, &api_id).await?;
    let failures = handshake_failures(&pair.client, "outbound", None).await?;

    // One call, refused: its ticket brings back the revoked certificate,
    // and the full handshake that follows finds the same one.
    let answer = http::get(route, "/revoked").await?;
    assert_eq!(answer.status, 502, "{answer:?}");
    let line = pair
        .client
        .wait_for_log("outbound connection refused", SOON)
        .await?;
    assert!(line.contains("reason=revoked"), "{line}");
    let after = handshake_failures(&pair.client, "outbound", None).await?;
    assert_eq!(after - failures, 1.0, "one refused dial, one failure");
    let revoked = handshake_failures(&pair.client, "outbound", Some("revoked")).await?;
    assert_eq!(revoked, 1.0);
    // The session it would not resume shows as such.
    let abandoned = pair.client.metrics().await?.counter(
        "trellis_tls_resumptions_abandoned_total",
        &[("reason", "revoked")],
    );
    assert_eq!(abandoned, 1.0);
    let reached: Vec<_> = pair.api.requests().into_iter().map(|r| r.path).collect();
    assert!(!reached.contains(&"/revoked".to_string()), "{reached:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_of_the_server_closes_the_callers_open_connections_to_it() -> anyhow::Result<()>
{
    let mesh = Mesh::start().await?;
    let EchoPair {
        open,
        mut client,
        server,
        // Held: the app stays up while the connection is watched.
        echo: _echo,
    } = echo_pair(&mesh).await?;
    let echo_id = server.identity().to_string();

    // The caller's sidecar closes the connection it dialled once it holds
    // the revocation of the server's identity (the server's own sidecar
    // has no reason to).
    mesh.ctl(["identity", "revoke", echo_id.as_str()]).await?;
    assert_closed(open, "the open connection to the revoked server").await;
    let line = client
        .wait_for_log(
            "open outbound connection closed: the server's identity is revoked",
            SOON,
        )
        .await?;
    assert!(line.contains(&echo_id), "{line}");
    assert!(line.contains("reason=revoked"), "{line}");
    let closed = client.metrics().await?.counter(
        "trellis_connections_total",
        &[("direction", "outbound"), ("outcome", "closed_by_policy")],
    );
    assert_eq!(closed, 1.0);
    client.process().ensure_running()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_lists_the_revocations_it_enforces_in_config() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let web = mesh.sidecar("web").start().await?;
    // An identity of the mesh's trust domain that no workload holds now.
    let revoked = web.identity().to_string().replace("/sa/web", "/sa/stolen");
    let revoked = revoked.as_str();
    mesh.ctl(["identity", "revoke", revoked]).await?;
    let listed = eventually("web to list the revocation", SOON, || async {
        let listed = listed_revocation(&web, revoked).await?;
        listed.ok_or_else(|| anyhow::anyhow!("{revoked} not listed"))
    })
    .await?;
    // As trellisctl lists it.
    let stored: serde_json::Value =
        serde_json::from_str(&mesh.ctl(["identity", "revocations", "-o", "json"]).await?)?;
    let stored = stored
        .as_array()
        .and_then(|all| all.iter().find(|r| r["spiffe_id"] == revoked))
        .ok_or_else(|| anyhow::anyhow!("{revoked} not revoked: {stored}"))?;
    assert_eq!(
        listed["revoked_at_unix"], stored["revoked_at_unix"],
        "{listed}"
    );
    assert_eq!(listed["revoked_at"], stored["revoked_at"], "{listed}");
    assert!(
        listed["revoked_at"]
            .as_str()
            .is_some_and(|at| at.ends_with('Z')),
        "{listed}"
    );
    Ok(())
}
