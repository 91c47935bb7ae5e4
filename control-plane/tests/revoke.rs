//! Revoking an identity against the real control plane and `trellisctl`:
//! a revoked SPIFFE ID's certificates no longer renew, across a restart,
//! while a new join token still gets it a certificate that renews; a bad
//! request is refused and changes nothing.

mod common;

use common::*;
use tonic::Code;
use trellis_proto::admin::v1::{
    ListRevocationsRequest, RevokeIdentityRequest, UnrevokeIdentityRequest,
};
use trellis_proto::discovery::v1::Subscribe;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const DB: &str = "spiffe://cluster.local/ns/default/sa/db";

/// `trellisctl ARGS`, which must succeed; its stdout.
fn ctl_ok(cp: &ControlPlane, args: &[&str]) -> String {
    let out = cp.ctl(args);
    assert!(
        out.status.success(),
        "trellisctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A renewal of `svid`'s identity with the certificate as its proof.
async fn renew(cp: &ControlPlane, id: &str, svid: &Svid) -> Result<Svid, tonic::Status> {
    let key = p256();
    let response = cp.certify(csr_for(&key, id), None, Some(svid), "").await?;
    Ok(Svid::issued(key, response))
}

fn revoked_total(metrics: &str) -> usize {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("trellis_certify_failures_total{reason=\"revoked\"} "))
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_identity_renews_only_with_a_certificate_issued_after() {
    let cp = ControlPlane::start(&[]);
    let stolen = enroll(&cp, WEB, "").await;
    let other = enroll(&cp, DB, "").await;

    let said = ctl_ok(
        &cp,
        &[
            "identity",
            "revoke",
            WEB,
            "--reason",
            "key copied off node-3",
        ],
    );
    assert!(said.starts_with(&format!("revoked {WEB} at ")), "{said}");

    let err = renew(&cp, WEB, &stolen).await.err().expect("refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Named for the sidecar, which proves its token at once on it.
    assert_eq!(
        err.metadata()
            .get(trellis_core::grpc::REFUSAL_KEY)
            .map(|v| v.to_str().unwrap()),
        Some("revoked"),
        "{err:?}"
    );
    let listed = ctl_ok(&cp, &["identity", "revocations", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let entry = &listed.as_array().expect("an array")[..];
    assert_eq!(entry.len(), 1, "{listed}");
    assert_eq!(entry[0]["spiffe_id"], WEB);
    assert_eq!(entry[0]["reason"], "key copied off node-3");
    let revoked_at = entry[0]["revoked_at"].as_str().unwrap();
    assert!(
        err.message().contains(WEB) && err.message().contains(revoked_at),
        "the refusal names the ID and when it was revoked ({revoked_at}): {}",
        err.message()
    );
    assert_eq!(revoked_total(&cp.metrics()), 1);
    // Nothing else is revoked.
    renew(&cp, DB, &other).await.expect("db still renews");

    // A new join token proves the identity again, and its certificate
    // renews.
    let fresh = enroll(&cp, WEB, "").await;
    let renewed = renew(&cp, WEB, &fresh)
        .await
        .expect("a fresh certificate renews");
    // `certs` marks the revoked certificate; newest first.
    let certs = ctl_ok(&cp, &["certs", "--spiffe-id", WEB, "-o", "json"]);
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    let revoked: Vec<_> = certs
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["revoked"].as_bool().unwrap())
        .collect();
    assert_eq!(revoked, [false, false, true], "{certs}");
    let table = ctl_ok(&cp, &["certs", "--spiffe-id", WEB]);
    assert!(
        table.lines().next().unwrap().ends_with("REVOKED"),
        "{table}"
    );

    // The revocation is stored: it outlives a restart.
    let tmp = cp.tmp.clone();
    assert!(cp.stop_async().await.success());
    let cp = ControlPlane::start_in(tmp, &[]);
    let err = renew(&cp, WEB, &stolen).await.err().expect("refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains(revoked_at), "{}", err.message());
    renew(&cp, WEB, &renewed)
        .await
        .expect("a certificate issued after the revocation renews");
    let table = ctl_ok(&cp, &["identity", "revocations"]);
    let row = table
        .lines()
        .find(|l| l.starts_with(WEB))
        .unwrap_or_else(|| panic!("{WEB} listed: {table}"));
    assert!(
        row.contains(revoked_at) && row.contains("key copied off node-3"),
        "{table}"
    );

    // Unrevoked, the old certificate renews again; a second unrevoke says
    // there is nothing to remove.
    ctl_ok(&cp, &["identity", "unrevoke", WEB]);
    renew(&cp, WEB, &stolen)
        .await
        .expect("renews once unrevoked");
    let out = cp.ctl(&["identity", "unrevoke", WEB]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{WEB} is not revoked")),
        "{stderr}"
    );
    assert_eq!(
        ctl_ok(&cp, &["identity", "revocations", "-o", "json"]).trim(),
        "[]"
    );
}

/// A removal of what is not there (an unrevoke of an ID not revoked, a
/// delete of a policy of either kind that does not exist) is refused
/// NOT_FOUND and leaves the state dir's database byte for byte as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_removal_leaves_the_database_file_as_it_was() {
    let cp = ControlPlane::start(&[]);
    enroll(&cp, WEB, "127.0.0.1:7000").await;
    let database = cp.state_dir.join("trellis.redb");
    let before = std::fs::read(&database).unwrap();
    for (args, names) in [
        (
            &["identity", "unrevoke", WEB][..],
            format!("{WEB} is not revoked"),
        ),
        (
            &["policy", "delete", "default/nope"][..],
            "policy default/nope not found".to_owned(),
        ),
        (
            &[
                "policy",
                "delete",
                "--kind",
                "RateLimitPolicy",
                "default/nope",
            ][..],
            "default/nope not found".to_owned(),
        ),
    ] {
        let out = cp.ctl(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(&names), "{args:?}: {stderr}");
        assert!(
            std::fs::read(&database).unwrap() == before,
            "{args:?} changed {}",
            database.display()
        );
    }
}

/// Revoking again moves the revocation to now, so a certificate issued
/// between the two revocations stops renewing too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_again_covers_the_certificates_issued_since() {
    let cp = ControlPlane::start(&[]);
    enroll(&cp, WEB, "").await;
    let mut admin = cp.admin_client().await;
    let revoke = || RevokeIdentityRequest {
        spiffe_id: WEB.into(),
        reason: String::new(),
    };
    let first = admin.revoke_identity(revoke()).await.unwrap().into_inner();
    let between = enroll(&cp, WEB, "").await;
    renew(&cp, WEB, &between)
        .await
        .expect("issued after the first revocation");
    let second = admin.revoke_identity(revoke()).await.unwrap().into_inner();
    let first_at = first.revocation.unwrap().revoked_at_unix;
    assert_eq!(second.previously_revoked_at_unix, first_at);
    assert!(second.revocation.unwrap().revoked_at_unix > first_at);
    let err = renew(&cp, WEB, &between).await.err().expect("refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_revocation_is_refused_and_changes_nothing() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "").await;
    let mut admin = cp.admin_client().await;
    for (id, reason, says) in [
        ("web", "", "spiffe_id \"web\""),
        (
            "spiffe://other.example/ns/default/sa/web",
            "",
            "outside trust domain cluster.local",
        ),
        (
            "spiffe://cluster.local",
            "",
            "names the trust domain itself",
        ),
        (
            "spiffe://cluster.local/trellis/control-plane",
            "",
            "reserved for the control plane",
        ),
        (WEB, "two\nlines", "control character"),
        (WEB, &"x".repeat(1025), "1025 bytes"),
    ] {
        let err = admin
            .revoke_identity(RevokeIdentityRequest {
                spiffe_id: id.into(),
                reason: reason.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{id}: {err:?}");
        assert!(err.message().contains(says), "{id}: {}", err.message());
    }
    let err = admin
        .unrevoke_identity(UnrevokeIdentityRequest {
            spiffe_id: "spiffe://other.example/ns/default/sa/web".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // As trellisctl says it.
    let out = cp.ctl(&["identity", "revoke", "spiffe://other.example/ns/a/sa/b"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: invalid argument: spiffe_id ")
            && stderr.contains("outside trust domain"),
        "{stderr}"
    );
    // A reason that would drive the terminal is refused before any call,
    // and said back escaped, naming the flag.
    let out = cp.ctl(&["identity", "revoke", WEB, "--reason", "a\x1b[31mred"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with(
            "error: invalid value 'a\\u{1b}[31mred' for '--reason <REASON>': reason \
             \"a\\u{1b}[31mred\" holds a control character; give one line of text\n"
        ),
        "{out:?}"
    );

    let listed = admin
        .list_revocations(ListRevocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.revocations.is_empty(), "{listed:?}");
    renew(&cp, WEB, &web).await.expect("nothing was revoked");
}

/// Revoking a SPIFFE ID this control plane never issued a certificate to
/// (a typo, or revoking ahead) is stored, and trellisctl says so with a
/// warning to check the spelling; an ID that has a certificate gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_id_never_issued_a_certificate_warns_of_its_spelling() {
    let cp = ControlPlane::start(&[]);
    enroll(&cp, WEB, "").await;
    let typo = "spiffe://cluster.local/ns/default/sa/wbe";

    let said = ctl_ok(&cp, &["identity", "revoke", typo]);
    let lines: Vec<&str> = said.lines().collect();
    assert!(
        lines[0].starts_with(&format!("revoked {typo} at ")),
        "{said}"
    );
    assert_eq!(
        lines[1..],
        [format!(
            "  warning: no certificate has been issued to {typo} by this control plane: check \
             the spelling of the SPIFFE ID (the revocation is stored all the same)"
        )],
        "{said}"
    );
    revoked_at_listed(&cp, typo);

    let said = ctl_ok(&cp, &["identity", "revoke", WEB]);
    assert!(!said.contains("warning"), "{said}");
}

/// The time `trellisctl identity revocations` shows for `id`'s revocation.
fn revoked_at_listed(cp: &ControlPlane, id: &str) -> String {
    let listed = ctl_ok(cp, &["identity", "revocations", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let entry = (listed.as_array().unwrap().iter())
        .find(|r| r["spiffe_id"] == id)
        .unwrap_or_else(|| panic!("{id} is not listed: {listed}"));
    entry["revoked_at"].as_str().unwrap().to_owned()
}

/// Asserts `status` is the refusal of a certificate of `id` revoked at
/// `revoked_at`, as Certify refuses a renewal by it.
fn assert_refused_as_revoked(status: &tonic::Status, id: &str, revoked_at: &str) {
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(
        (status.metadata().get(trellis_core::grpc::REFUSAL_KEY)).map(|v| v.to_str().unwrap()),
        Some("revoked"),
        "{status:?}"
    );
    assert!(
        status
            .message()
            .starts_with(&format!("{id} was revoked at {revoked_at} (")),
        "names the identity and when it was revoked ({revoked_at}): {}",
        status.message()
    );
}

/// A thief holding a revoked certificate and its key cannot renew it, and
/// cannot subscribe with it either: the Watch is refused before anything
/// (endpoints, policies, revocations) is sent. A certificate issued after
/// the revocation watches as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_opens_no_watch() {
    let cp = ControlPlane::start(&[]);
    let stolen = enroll(&cp, WEB, "127.0.0.1:7001").await;
    enroll(&cp, DB, "127.0.0.1:7002").await;
    ctl_ok(&cp, &["identity", "revoke", WEB]);
    let revoked_at = revoked_at_listed(&cp, WEB);

    let refused = Watcher::subscribe(&cp, &stolen, Subscribe::default())
        .await
        .err()
        .expect("a revoked certificate opens no Watch");
    assert_refused_as_revoked(&refused, WEB, &revoked_at);
    let answer = cp.list_workloads().await;
    assert!(!listed(&answer, WEB).connected, "{answer:?}");

    let fresh = enroll(&cp, WEB, "127.0.0.1:7001").await;
    let mut watcher = Watcher::open(&cp, &fresh, "127.0.0.1:7001").await;
    let snapshot = watcher.next().await;
    assert_eq!(snapshot.endpoints.len(), 2, "{snapshot:?}");
}

/// Streams already open when their certificate is revoked end with the
/// refusal a new Watch gets, and the workload is no longer listed as
/// connected; other streams go on, and are sent the revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_ends_the_streams_of_the_certificates_it_covers() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7001").await;
    let db = enroll(&cp, DB, "127.0.0.1:7002").await;
    let mut web_stream = Watcher::open(&cp, &web, "127.0.0.1:7001").await;
    let mut db_stream = Watcher::open(&cp, &db, "127.0.0.1:7002").await;
    web_stream.next().await;
    db_stream.next().await;
    eventually_async("both streams to be listed as connected", || async {
        let answer = cp.list_workloads().await;
        (listed(&answer, WEB).connected && listed(&answer, DB).connected).then_some(())
    })
    .await;

    ctl_ok(&cp, &["identity", "revoke", WEB]);
    let revoked_at = revoked_at_listed(&cp, WEB);

    let ended = tokio::time::timeout(PATIENCE, web_stream.snapshots.message())
        .await
        .expect("the stream ends in time")
        .expect_err("the stream ends with an error, sending nothing more");
    assert_refused_as_revoked(&ended, WEB, &revoked_at);
    let told = db_stream.next().await;
    let revoked: Vec<&str> = told
        .revocations
        .iter()
        .map(|r| r.spiffe_id.as_str())
        .collect();
    assert_eq!(revoked, [WEB], "{told:?}");
    eventually_async("web to be listed as no longer connected", || async {
        let answer = cp.list_workloads().await;
        assert!(listed(&answer, DB).connected, "{answer:?}");
        (!listed(&answer, WEB).connected).then_some(())
    })
    .await;
    assert!(
        cp.log().contains("reason=\"certificate revoked\""),
        "the closing line says why: {}",
        cp.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_marks_a_revoked_identity_as_certs_does() {
    let cp = ControlPlane::start(&[]);
    enroll(&cp, WEB, "127.0.0.1:7001").await;
    enroll(&cp, DB, "127.0.0.1:7002").await;
    let before = ctl_ok(&cp, &["workloads"]);
    assert!(!before.contains("REVOKED"), "{before}");

    ctl_ok(&cp, &["identity", "revoke", WEB]);

    let table = ctl_ok(&cp, &["workloads"]);
    let header = table.lines().next().unwrap();
    assert!(header.trim_end().ends_with("REVOKED"), "{table}");
    let row = |id: &str| {
        table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("no row for {id}:\n{table}"))
            .split_whitespace()
            .last()
            .unwrap()
            .to_string()
    };
    assert_eq!(row(WEB), "yes", "{table}");
    assert_eq!(row(DB), "no", "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&ctl_ok(&cp, &["workloads", "-o", "json"])).unwrap();
    let revoked: Vec<(&str, bool)> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["spiffe_id"].as_str().unwrap(),
                w["revoked"].as_bool().unwrap(),
            )
        })
        .collect();
    assert!(
        revoked.contains(&(WEB, true)) && revoked.contains(&(DB, false)),
        "{revoked:?}"
    );
    let certs = ctl_ok(&cp, &["certs", "--spiffe-id", WEB]);
    let rows: Vec<&str> = certs.lines().filter(|l| l.contains(WEB)).collect();
    assert!(!rows.is_empty(), "{certs}");
    assert!(
        rows.iter().all(|l| l.trim_end().ends_with("yes")),
        "{certs}"
    );

    ctl_ok(&cp, &["identity", "unrevoke", WEB]);
    let after = ctl_ok(&cp, &["workloads"]);
    assert!(!after.contains("REVOKED"), "{after}");
}

/// A revoked sidecar's stream ends, so `trellisctl check` counts it no
/// longer connected, and has no connected revoked sidecar to warn of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_counts_a_revoked_sidecar_no_longer_connected() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7001").await;
    let db = enroll(&cp, DB, "127.0.0.1:7002").await;
    let mut streams = Vec::new();
    for (svid, inbound) in [(&web, "127.0.0.1:7001"), (&db, "127.0.0.1:7002")] {
        let mut stream = Watcher::open(&cp, svid, inbound).await;
        stream.next().await;
        streams.push(stream.answer_all());
    }
    // Once both sidecars hold the snapshot served (a revocation is sent
    // in a new one).
    let check = |connected: &str| {
        tokio::task::block_in_place(|| {
            eventually("the sidecars to hold the current snapshot", || {
                let check = cp.ctl(&["check"]);
                let report = String::from_utf8_lossy(&check.stdout).into_owned();
                (report.contains(&format!("{connected} hold the current snapshot")))
                    .then_some((report, check.status.success()))
            })
        })
    };
    let (report, passed) = check("2 of 2 connected sidecars");
    assert!(passed && !report.contains("revoked"), "{report}");

    ctl_ok(&cp, &["identity", "revoke", WEB]);
    let (report, passed) = check("1 of 1 connected sidecar");
    assert!(passed, "{report}");
    assert!(!report.contains("is connected, but"), "{report}");
    for stream in streams {
        stream.abort();
    }
}
