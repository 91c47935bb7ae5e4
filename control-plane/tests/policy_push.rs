//! Discovery pushes of policies against the real control plane: a change
//! reaches only the sidecars whose workloads a policy selects, a burst of
//! changes is coalesced into fewer snapshots, and the acknowledged versions
//! in ListWorkloads follow.

mod common;

use common::policy::*;
use common::*;
use trellis_proto::admin::v1::{ListWorkloadsResponse, SnapshotSync, Workload};
use trellis_proto::discovery::v1::watch_request::Kind;
use trellis_proto::discovery::v1::{Ack, Endpoint, EndpointChanges, Nack, Snapshot, WatchRequest};

fn has_endpoint(snapshot: &Snapshot, id: &str) -> bool {
    snapshot.endpoints.iter().any(|e| e.spiffe_id == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_policy_changes_reaches_only_the_selected_sidecar_coalesced() {
    const BURST: usize = 20;
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7121").await;
    let db = enroll(&cp, DB, "127.0.0.1:7122").await;
    let mut web_watch = Watcher::open(&cp, &web, "127.0.0.1:7121").await;
    let mut db_watch = Watcher::open(&cp, &db, "127.0.0.1:7122").await;
    let web_first = web_watch.next().await;
    let db_first = db_watch.next().await;
    assert!(web_first.policies.is_empty() && db_first.policies.is_empty());

    // Twenty policies selecting web, applied at once.
    let mut applies = Vec::new();
    for i in 0..BURST {
        let mut admin = cp.admin_client().await;
        let document = allow(&format!("p{i}"), WEB, API, 8000 + i as u32);
        applies.push(tokio::spawn(async move {
            apply(&mut admin, &document, false).await.unwrap()
        }));
    }
    let mut last_version = 0;
    for handle in applies {
        last_version = last_version.max(handle.await.unwrap().snapshot_version);
    }

    // Web receives them in fewer snapshots than changes, the last holding
    // all twenty at a version that includes every apply.
    let mut received = Vec::new();
    loop {
        let snapshot = web_watch.next().await;
        let done = snapshot.policies.len() == BURST;
        received.push(snapshot);
        if done {
            break;
        }
    }
    let last = received.last().unwrap();
    eprintln!(
        "{BURST} changes reached web in {} snapshots",
        received.len()
    );
    assert!(last.version >= last_version);
    // Coalesced: some snapshot carried more than one change, so there are
    // fewer snapshots than changes (a bound on counts, not on time; a busy
    // machine gives more snapshots, never one per change).
    assert!(
        received.len() < BURST,
        "{} snapshots for {BURST} changes: not coalesced",
        received.len()
    );
    let mut seen = web_first.policies.len();
    let mut jumps = 0;
    for snapshot in &received {
        assert!(
            snapshot.policies.len() > seen,
            "a snapshot without a change"
        );
        jumps += usize::from(snapshot.policies.len() > seen + 1);
        seen = snapshot.policies.len();
    }
    assert!(jumps > 0, "every snapshot carried a single change");
    let acked = eventually_async("web's ACK in ListWorkloads", || async {
        let listed = cp.workloads().await;
        let w = listed.into_iter().find(|w| w.spiffe_id == WEB)?;
        (w.acked_version == last.version).then_some(w.acked_version)
    })
    .await;
    assert!(acked >= last_version);

    // A change both sidecars see: db's next snapshot is that one, with no
    // policy, so no policy snapshot reached it before.
    enroll(&cp, API, "127.0.0.1:7123").await;
    let db_next = db_watch.next().await;
    assert!(has_endpoint(&db_next, API), "{db_next:?}");
    assert!(db_next.policies.is_empty());
    let web_next = web_watch.next().await;
    assert!(has_endpoint(&web_next, API));
    assert_eq!(web_next.policies.len(), BURST);

    // Db's acked version stayed where its content did.
    let listed = cp.workloads().await;
    let db_listed = listed.iter().find(|w| w.spiffe_id == DB).unwrap();
    assert!(db_listed.acked_version <= db_next.version);
}

/// A sidecar that takes `endpoints_version` is not sent the endpoints it
/// holds: after it acknowledged a snapshot, a policy change refers to that
/// snapshot's endpoints. While a snapshot is unanswered, or after the
/// endpoints changed, the next one carries them all; a sidecar that did not
/// ask for references always gets them.
#[tokio::test]
async fn a_policy_change_refers_to_the_endpoints_the_sidecar_holds() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7131").await;
    let mut web_watch =
        Watcher::open_with(&cp, &web, "127.0.0.1:7131", Takes::EndpointsVersion).await;
    let mut old_watch = Watcher::open(&cp, &web, "127.0.0.1:7131").await;
    let first = web_watch.next().await;
    assert_eq!(first.endpoints_version, 0);
    assert!(has_endpoint(&first, WEB));
    // An identity is as synced as its least synced stream: the old-style
    // stream answers too, so the ACKs seen are both streams'.
    old_watch.next().await;
    // The ACK travels on the stream, the change on an Admin connection:
    // the control plane has the ACK before the change is made.
    acked(&cp, WEB, first.version).await;

    let mut admin = cp.admin_client().await;
    apply(&mut admin, &allow("p1", WEB, API, 8001), false)
        .await
        .unwrap();
    let second = web_watch.next().await;
    assert_eq!(second.policies.len(), 1);
    assert_eq!(second.endpoints_version, first.version);
    assert!(second.endpoints.is_empty(), "{second:?}");
    let old = old_watch.next().await;
    assert_eq!((old.policies.len(), old.endpoints_version), (1, 0));
    assert!(has_endpoint(&old, WEB), "without the flag: every endpoint");
    acked(&cp, WEB, second.version).await;

    // Unanswered: the sidecar may hold it or not, so the next one is whole.
    apply(&mut admin, &allow("p2", WEB, API, 8002), false)
        .await
        .unwrap();
    let third = web_watch.receive().await;
    assert_eq!(third.endpoints_version, second.version);
    apply(&mut admin, &allow("p3", WEB, API, 8003), false)
        .await
        .unwrap();
    let fourth = web_watch.next().await;
    assert_eq!((fourth.policies.len(), fourth.endpoints_version), (3, 0));
    assert!(has_endpoint(&fourth, WEB));

    // New endpoints are sent whole.
    enroll(&cp, DB, "127.0.0.1:7132").await;
    let fifth = web_watch.next().await;
    assert_eq!(fifth.endpoints_version, 0);
    assert!(has_endpoint(&fifth, WEB) && has_endpoint(&fifth, DB));
}

/// Every answer counts, not only the last snapshot's. A sidecar that
/// accepts a snapshot after the next one went out, then refuses that next
/// one, holds the one it accepted: the next change refers to it, never to
/// the one before (which the sidecar would refuse, change after change).
#[tokio::test]
async fn a_reference_names_the_snapshot_accepted_while_another_was_on_its_way() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7135").await;
    let mut web_watch =
        Watcher::open_with(&cp, &web, "127.0.0.1:7135", Takes::EndpointsVersion).await;
    let first = web_watch.next().await;
    acked(&cp, WEB, first.version).await;

    let mut admin = cp.admin_client().await;
    apply(&mut admin, &allow("p1", WEB, API, 8001), false)
        .await
        .unwrap();
    let second = web_watch.receive().await;
    apply(&mut admin, &allow("p2", WEB, API, 8002), false)
        .await
        .unwrap();
    let third = web_watch.receive().await;
    assert!(third.version > second.version);
    let answer = |kind| WatchRequest { kind: Some(kind) };
    web_watch
        .acks
        .send(answer(Kind::Ack(Ack {
            version: second.version,
            warnings: Vec::new(),
        })))
        .await
        .unwrap();
    web_watch
        .acks
        .send(answer(Kind::Nack(Nack {
            version: third.version,
            reason: "refused for the test".into(),
        })))
        .await
        .unwrap();
    eventually_async("both answers in ListWorkloads", || async {
        let listed = cp.workloads().await;
        let w = listed.into_iter().find(|w| w.spiffe_id == WEB)?;
        (w.acked_version == second.version && !w.last_nack.is_empty()).then_some(())
    })
    .await;

    apply(&mut admin, &allow("p3", WEB, API, 8003), false)
        .await
        .unwrap();
    let fourth = web_watch.next().await;
    assert_eq!(
        fourth.endpoints_version, second.version,
        "the reference must name what the sidecar holds"
    );
    assert_eq!(fourth.policies.len(), 3);
}

/// A sidecar that takes `endpoint_changes` is sent, when endpoints join
/// or leave, only what changed since the snapshot it accepted last: a
/// joining workload is one endpoint, and so is a second sidecar of it at
/// another address (the first stays; an address leaves only when it
/// expires, which the discovery tests cover). The control plane's metrics
/// count the snapshots, and their bytes, by how they carried the
/// endpoints.
#[tokio::test]
async fn a_sidecar_that_takes_changes_is_sent_only_the_endpoints_that_changed() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7161").await;
    enroll(&cp, API, "127.0.0.1:7162").await;
    let mut web_watch =
        Watcher::open_with(&cp, &web, "127.0.0.1:7161", Takes::EndpointChanges).await;
    let first = web_watch.next().await;
    assert_eq!(
        (first.endpoints_version, &first.endpoint_changes),
        (0, &None)
    );
    assert!(has_endpoint(&first, WEB) && has_endpoint(&first, API));
    acked(&cp, WEB, first.version).await;

    enroll(&cp, DB, "127.0.0.1:7163").await;
    let second = web_watch.next().await;
    assert_eq!(second.endpoints_version, first.version);
    assert!(second.endpoints.is_empty(), "{second:?}");
    let endpoint = |address: &str, id: &str| Endpoint {
        address: address.into(),
        spiffe_id: id.into(),
    };
    assert_eq!(
        second.endpoint_changes,
        Some(EndpointChanges {
            endpoints: vec![endpoint("127.0.0.1:7163", DB)],
            ..EndpointChanges::default()
        })
    );
    acked(&cp, WEB, second.version).await;

    // A second sidecar of db, at another address: it joins, the first stays.
    enroll(&cp, DB, "127.0.0.1:7164").await;
    let third = web_watch.next().await;
    assert_eq!(third.endpoints_version, second.version);
    assert_eq!(
        third.endpoint_changes,
        Some(EndpointChanges {
            endpoints: vec![endpoint("127.0.0.1:7164", DB)],
            ..EndpointChanges::default()
        })
    );

    let metrics = cp.metrics();
    let sent = |endpoints: &str| {
        let prefix = format!("trellis_snapshots_sent_total{{endpoints=\"{endpoints}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"))
    };
    assert_eq!((sent("full"), sent("changes")), (1, 2), "{metrics}");
    assert!(metrics.contains("trellis_snapshot_bytes_sent_total{endpoints=\"changes\"} "));
}

/// Waits until ListWorkloads, at the version served, shows web and db as
/// `want` says.
async fn sync_until(
    cp: &ControlPlane,
    what: &str,
    want: impl Fn(&ListWorkloadsResponse, &Workload, &Workload) -> bool,
) -> ListWorkloadsResponse {
    eventually_async(what, || async {
        let response = cp.list_workloads().await;
        want(&response, listed(&response, WEB), listed(&response, DB)).then_some(response)
    })
    .await
}

/// ListWorkloads and `trellisctl workloads` say whether each sidecar holds
/// what the control plane serves now. A change that concerns only web is
/// not sent to db, and db is synced at the new version all the same (its
/// acknowledged version stays behind, which alone looks stale); web is
/// pending until it answers, synced once it accepts, refused (with its
/// reason, escaped) once it refuses; a closed stream is not connected. The
/// control plane's metrics count the connected ones by state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_say_which_sidecars_hold_the_current_snapshot() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7141").await;
    let db = enroll(&cp, DB, "127.0.0.1:7142").await;
    let mut web_watch = Watcher::open(&cp, &web, "127.0.0.1:7141").await;
    let mut db_watch = Watcher::open(&cp, &db, "127.0.0.1:7142").await;
    web_watch.next().await;
    let db_first = db_watch.next().await;
    sync_until(&cp, "both synced", |r, web, db| {
        r.snapshot_version == db_first.version
            && web.sync() == SnapshotSync::Synced
            && db.sync() == SnapshotSync::Synced
    })
    .await;

    let mut admin = cp.admin_client().await;
    apply(&mut admin, &allow("p1", WEB, API, 8001), false)
        .await
        .unwrap();
    let second = web_watch.receive().await;
    assert_eq!(second.policies.len(), 1);
    let now = sync_until(
        &cp,
        "web pending, db synced at the new version",
        |r, web, db| {
            r.snapshot_version == second.version
                && web.sync() == SnapshotSync::Pending
                && db.sync() == SnapshotSync::Synced
        },
    )
    .await;
    let (web_listed, db_listed) = (listed(&now, WEB), listed(&now, DB));
    assert_eq!(db_listed.acked_version, db_first.version);
    assert_eq!(db_listed.synced_version, second.version);
    assert_ne!(db_first.version, second.version);
    assert_eq!(web_listed.synced_version, db_first.version);
    let table = String::from_utf8(cp.ctl(&["workloads"]).stdout).unwrap();
    assert!(
        table.lines().next().unwrap().contains("SNAPSHOT"),
        "{table}"
    );
    assert!(row_of(&table, WEB).contains("pending"), "{table}");
    assert!(row_of(&table, DB).contains("synced"), "{table}");

    web_watch
        .acks
        .send(WatchRequest {
            kind: Some(Kind::Ack(Ack {
                version: second.version,
                warnings: Vec::new(),
            })),
        })
        .await
        .unwrap();
    sync_until(&cp, "web synced once it accepted", |r, web, _| {
        r.snapshot_version == second.version && web.sync() == SnapshotSync::Synced
    })
    .await;

    apply(&mut admin, &allow("p2", WEB, API, 8002), false)
        .await
        .unwrap();
    let third = web_watch.receive().await;
    web_watch
        .acks
        .send(WatchRequest {
            kind: Some(Kind::Nack(Nack {
                version: third.version,
                reason: "policy p2: \u{1b}[2J unknown field".into(),
            })),
        })
        .await
        .unwrap();
    let now = sync_until(&cp, "web refused, db synced", |r, web, db| {
        r.snapshot_version == third.version
            && web.sync() == SnapshotSync::Refused
            && db.sync() == SnapshotSync::Synced
    })
    .await;
    assert_eq!(listed(&now, WEB).synced_version, second.version);
    let out = cp.ctl(&["workloads"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(row_of(&table, WEB).contains("refused"), "{table}");
    assert!(
        table.contains(&format!(
            "{WEB} refused its newest snapshot: policy p2: \\u{{1b}}[2J unknown field\n"
        )),
        "the reason, escaped: {table}"
    );
    let out = cp.ctl(&["workloads", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entry = |id: &str| {
        json.as_array()
            .and_then(|a| a.iter().find(|w| w["spiffe_id"] == id))
            .cloned()
            .unwrap_or_else(|| panic!("{id} not in {json}"))
    };
    assert_eq!(entry(WEB)["snapshot"], "refused");
    assert_eq!(entry(DB)["snapshot"], "synced");
    assert_eq!(entry(DB)["synced_version"], third.version);
    let metrics = cp.metrics();
    for line in [
        "trellis_sidecar_snapshots{state=\"synced\"} 1\n",
        "trellis_sidecar_snapshots{state=\"pending\"} 0\n",
        "trellis_sidecar_snapshots{state=\"refused\"} 1\n",
    ] {
        assert!(metrics.contains(line), "no {line:?} in {metrics}");
    }

    drop(db_watch);
    sync_until(&cp, "db not connected", |_, _, db| {
        db.sync() == SnapshotSync::NotConnected
    })
    .await;
    assert!(
        cp.metrics()
            .contains("trellis_sidecar_snapshots{state=\"synced\"} 0\n"),
        "a closed stream is no longer counted"
    );
}

/// The row of `table` that starts with `id`.
/// Pods that share an identity (a Deployment's replicas share its
/// ServiceAccount) each have their own Watch stream: the identity is
/// listed as synced only once every stream holds the current version,
/// refused while one refuses it, and one pod's ACK does not clear the
/// other's refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_is_as_synced_as_its_least_synced_stream() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7171").await;
    let db = enroll(&cp, DB, "127.0.0.1:7172").await;
    let mut db_watch = Watcher::open(&cp, &db, "127.0.0.1:7172").await;
    db_watch.next().await;
    let mut one = Watcher::open(&cp, &web, "127.0.0.1:7171").await;
    let mut two = Watcher::open(&cp, &web, "127.0.0.1:7171").await;
    one.next().await;
    let first = two.receive().await;
    sync_until(
        &cp,
        "web pending while one pod has not answered",
        |r, web, _| r.snapshot_version == first.version && web.sync() == SnapshotSync::Pending,
    )
    .await;

    let answer = |kind| WatchRequest { kind: Some(kind) };
    two.acks
        .send(answer(Kind::Nack(Nack {
            version: first.version,
            reason: "refused for the test".into(),
        })))
        .await
        .unwrap();
    sync_until(&cp, "web refused while one pod refuses", |_, web, _| {
        web.sync() == SnapshotSync::Refused && web.last_nack == "refused for the test"
    })
    .await;

    // A change the first pod accepts: `--wait` does not take its ACK for
    // the identity's, since the second pod still holds the refusal.
    let one_task = tokio::spawn(async move {
        loop {
            one.next().await;
        }
    });
    let (code, stderr) = ctl_apply(&cp, &allow("p1", WEB, API, 8001), &["--wait=2s"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "  {WEB} refused its newest snapshot: refused for the test\n"
        )),
        "{stderr}"
    );
    let second = two.receive().await;
    assert_eq!(second.policies.len(), 1);
    two.acks
        .send(answer(Kind::Ack(Ack {
            version: second.version,
            warnings: Vec::new(),
        })))
        .await
        .unwrap();
    sync_until(&cp, "web synced once both pods hold it", |r, web, _| {
        r.snapshot_version == second.version && web.sync() == SnapshotSync::Synced
    })
    .await;
    one_task.abort();
}

fn row_of<'a>(table: &'a str, id: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("no row for {id} in {table}"))
}

/// Waits until ListWorkloads shows `id` acknowledging `version`.
async fn acked(cp: &ControlPlane, id: &str, version: u64) {
    eventually_async("the ACK in ListWorkloads", || async {
        let listed = cp.workloads().await;
        let w = listed.into_iter().find(|w| w.spiffe_id == id)?;
        (w.acked_version >= version).then_some(())
    })
    .await;
}

/// `trellisctl policy apply` with `-f` on a file holding `document`, and
/// `extra` flags, run to its end off the runtime's thread (the test's
/// sidecars answer meanwhile): its exit code and stderr.
fn ctl_apply(cp: &ControlPlane, document: &str, extra: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, document).unwrap();
    let mut args = vec!["policy", "apply", "-f", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = tokio::task::block_in_place(|| cp.ctl(&args));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// web and db enrolled on `cp` at `web_at` and `db_at`, each with a stream
/// that has accepted its first snapshot: web's SVID, the task in which its
/// stream accepts every later snapshot (until aborted), and db's stream.
async fn web_accepting_and_db(
    cp: &ControlPlane,
    web_at: &str,
    db_at: &str,
) -> (Svid, tokio::task::JoinHandle<()>, Watcher) {
    let web = enroll(cp, WEB, web_at).await;
    let db = enroll(cp, DB, db_at).await;
    let mut web_watch = Watcher::open(cp, &web, web_at).await;
    let mut db_watch = Watcher::open(cp, &db, db_at).await;
    web_watch.next().await;
    db_watch.next().await;
    let accepting = tokio::spawn(async move {
        loop {
            web_watch.next().await;
        }
    });
    (web, accepting, db_watch)
}

/// `policy apply --wait` (and `policy delete --wait`) returns once every
/// connected sidecar holds the snapshot that carries the write (a sidecar
/// the write does not concern holds it already), fails as soon as a
/// sidecar's refusal stands, naming it and its reason, and fails at its
/// deadline naming a sidecar that has not answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_apply_waits_until_every_connected_sidecar_holds_the_write() {
    let cp = ControlPlane::start(&[]);
    // web accepts whatever it is sent; db refuses it.
    let (web, web_task, mut db_watch) =
        web_accepting_and_db(&cp, "127.0.0.1:7151", "127.0.0.1:7152").await;
    let (refusing_tx, mut refusing) = tokio::sync::mpsc::channel(1);
    let db_task = tokio::spawn(async move {
        loop {
            let snapshot = db_watch.receive().await;
            db_watch
                .acks
                .send(WatchRequest {
                    kind: Some(Kind::Nack(Nack {
                        version: snapshot.version,
                        reason: "rule 0: unknown port name".into(),
                    })),
                })
                .await
                .unwrap();
            let _ = refusing_tx.try_send(());
        }
    });

    let (code, stderr) = ctl_apply(&cp, &allow("p1", WEB, API, 8001), &["--wait=30s"]);
    assert_eq!(code, Some(0), "{stderr}");
    let version = cp.list_workloads().await.snapshot_version;
    assert!(
        stderr.contains(&format!(
            "every connected sidecar holds snapshot {version} or a later one: 2 on 1 replica"
        )),
        "{stderr}"
    );
    // A delete waits the same way.
    // (Off the runtime's thread, so the sidecars answer meanwhile.)
    let deleted =
        tokio::task::block_in_place(|| cp.ctl(&["policy", "delete", "default/p1", "--wait=30s"]));
    let stderr = String::from_utf8_lossy(&deleted.stderr);
    assert!(deleted.status.success(), "{stderr}");
    let version = cp.list_workloads().await.snapshot_version;
    assert!(
        String::from_utf8_lossy(&deleted.stdout).contains(&format!("snapshot version {version}"))
            && stderr.contains(&format!(
                "every connected sidecar holds snapshot {version} or a later one: 2 on 1 replica"
            )),
        "{stderr}"
    );

    let (code, stderr) = ctl_apply(&cp, &allow("p2", DB, API, 8002), &["--wait=30s"]);
    refusing.recv().await.unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    let version = cp.list_workloads().await.snapshot_version;
    assert!(
        stderr.contains(&format!(
            "not every connected sidecar holds snapshot {version}:\n  \
             {DB} refused its newest snapshot: rule 0: unknown port name\n"
        )),
        "ends on the refusal, not at the deadline: {stderr}"
    );

    // web stops answering: a write for it is still on its way at the
    // deadline.
    web_task.abort();
    db_task.abort();
    let silent = Watcher::open(&cp, &web, "127.0.0.1:7151").await;
    let (code, stderr) = ctl_apply(&cp, &allow("p3", WEB, API, 8003), &["--wait=1s"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("holds snapshot")
            && stderr.contains(" after 1 second:\n")
            && stderr.contains(&format!("  {WEB} does not hold it yet\n")),
        "{stderr}"
    );
    drop(silent);

    let (code, stderr) = ctl_apply(&cp, &allow("p4", WEB, API, 8004), &["--dry-run", "--wait"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("--wait") && stderr.contains("--dry-run"),
        "{stderr}"
    );
}

/// A change that follows the write before every sidecar holds it (here a
/// policy for web, while db has not yet answered the write for it) does
/// not keep `--wait` from ending: the control plane serves a later
/// version, and db, once it accepts, holds the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_apply_wait_ends_though_a_later_change_follows_the_write() {
    let cp = ControlPlane::start(&[]);
    let (_, web_task, mut db_watch) =
        web_accepting_and_db(&cp, "127.0.0.1:7161", "127.0.0.1:7162").await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db.yaml");
    std::fs::write(&file, allow("to-db", DB, API, 5432)).unwrap();
    let waiting = cp
        .ctl_command(&[
            "policy",
            "apply",
            "--wait=30s",
            "-f",
            file.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // db is sent the write and holds on to its answer while web's policy
    // makes a later version.
    let written = db_watch.receive().await;
    let mut admin = cp.admin_client().await;
    let later = apply(&mut admin, &allow("to-web", WEB, API, 8080), false)
        .await
        .unwrap()
        .snapshot_version;
    assert_ne!(later, written.version);
    db_watch
        .acks
        .send(WatchRequest {
            kind: Some(Kind::Ack(Ack {
                version: written.version,
                warnings: Vec::new(),
            })),
        })
        .await
        .unwrap();

    let out = tokio::task::spawn_blocking(move || waiting.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "every connected sidecar holds snapshot {} or a later one: 2 on 1 replica",
            written.version
        )),
        "{stderr}"
    );
    web_task.abort();
}
