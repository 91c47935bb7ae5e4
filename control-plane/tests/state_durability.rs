//! The embedded store's state when the control plane's volume fills up, or
//! the control plane is killed (SIGKILL) in the middle of its writes: what
//! a client was answered is kept, what failed wrote nothing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use common::*;
use tonic::Code;
use trellis_proto::admin::v1::ListIssuedCertificatesRequest;
use trellis_proto::identity::v1::{CertifyRequest, certify_request::Proof};

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

fn worker(n: usize) -> String {
    format!("spiffe://cluster.local/ns/default/sa/worker-{n}")
}

/// A state dir on a tmpfs of its own, mounted in a private mount
/// namespace that a holder process keeps alive across control plane
/// restarts. Needs root (CAP_SYS_ADMIN) and util-linux's `unshare` and
/// `nsenter`; elsewhere the test says `skipped: needs root`, and fails
/// under CI.
struct SmallVolume {
    holder: Child,
    tmp: Arc<tempfile::TempDir>,
}

impl SmallVolume {
    fn new(size: &str) -> Self {
        let tmp = Arc::new(tempfile::tempdir().unwrap());
        let state = tmp.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let mut holder = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount -t tmpfs -o size=\"$1\",mode=0700 trellis-state \"$2\" || exit 1; \
                 echo mounted; exec sleep 3600",
            )
            .args(["sh", size])
            .arg(&state)
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare runs (util-linux)");
        let mut line = String::new();
        BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "mounted",
            "a tmpfs in a private mount namespace needs root: {:?}",
            holder.try_wait()
        );
        Self { holder, tmp }
    }

    /// Where the test sees the state dir: through the holder's root.
    fn seen(&self, name: &str) -> PathBuf {
        let state = self.tmp.path().join("state");
        PathBuf::from(format!(
            "/proc/{}/root{}",
            self.holder.id(),
            state.display()
        ))
        .join(name)
    }

    fn start(&self) -> ControlPlane {
        let pid = self.holder.id().to_string();
        ControlPlane::start_via(
            self.tmp.clone(),
            &["nsenter", "-t", &pid, "-m", "--"],
            Some(self.seen("")),
            &[],
        )
    }

    /// Fills the volume with a file of its own; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.seen("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xa5u8; 64 * 1024];
        loop {
            if let Err(e) = file.write_all(&chunk).and_then(|()| file.sync_all()) {
                assert_eq!(e.raw_os_error(), Some(28), "ENOSPC expected: {e}");
                break;
            }
        }
        path
    }
}

impl Drop for SmallVolume {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// The SPIFFE IDs of the issued-certificate log.
async fn logged_ids(cp: &ControlPlane) -> Vec<String> {
    let mut admin = cp.admin_client().await;
    let answer = admin
        .list_issued_certificates(ListIssuedCertificatesRequest {
            limit: 10_000,
            ..ListIssuedCertificatesRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    answer
        .certificates
        .into_iter()
        .map(|c| c.spiffe_id)
        .collect()
}

/// A Certify whose write meets a full volume answers UNAVAILABLE naming
/// the database and the error, writes nothing (its token still works),
/// and the control plane exits 1 saying so; once the space is back, a
/// start on the same state dir has every earlier write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_volume_fails_the_write_as_unavailable_and_loses_nothing() {
    if !common::machine::is_root() {
        common::machine::skip("skipped: needs root (mounts a tmpfs)");
        return;
    }
    let volume = SmallVolume::new("6m");
    let cp = volume.start();
    enroll(&cp, WEB, "127.0.0.1:9000").await;
    let mut tokens = Vec::new();
    for n in 0..200 {
        tokens.push(cp.token(&worker(n), 0).await);
    }
    let filler = volume.fill();

    let mut certified = vec![WEB.to_string()];
    let mut refused = None;
    for (n, token) in tokens.iter().enumerate() {
        let key = p256();
        match cp
            .certify(csr_for(&key, &worker(n)), Some(token), None, "")
            .await
        {
            Ok(_) => certified.push(worker(n)),
            Err(status) => {
                refused = Some((n, status));
                break;
            }
        }
    }
    let (failed, status) = refused.expect("a Certify on a full volume fails");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // As the control plane names it, in its own mount namespace.
    let database = volume.tmp.path().join("state/trellis.redb");
    let database = database.display().to_string();
    for words in [
        database.as_str(),
        "No space left on device",
        "nothing was written",
        "free space on its volume",
    ] {
        assert!(status.message().contains(words), "{words:?} in {status:?}");
    }
    let log = cp.log.clone();
    assert_eq!(cp.exited().code(), Some(1), "{}", log.lock().unwrap());
    // Its last line says why, and what to do.
    let last = eventually("the last line of the log after exit", || {
        let text = log.lock().unwrap().clone();
        let last = text.lines().last().unwrap_or_default().to_owned();
        last.starts_with("error: ").then_some(text)
    });
    assert!(
        last.contains("the state database failed a write")
            && last.lines().last().unwrap().contains(&database)
            && last
                .lines()
                .last()
                .unwrap()
                .contains("free the volume's space"),
        "{last}"
    );

    std::fs::remove_file(filler).unwrap();
    let cp = volume.start();
    let mut logged = logged_ids(&cp).await;
    logged.sort();
    certified.sort();
    assert_eq!(logged, certified, "every answered issuance, and no other");
    // The failed call used nothing: its token certifies now.
    cp.certify(
        csr_for(&p256(), &worker(failed)),
        Some(&tokens[failed]),
        None,
        "",
    )
    .await
    .expect("the token of the failed Certify is unused");
}

/// SIGKILL while many Certify calls with join tokens are in flight: after a
/// restart every certificate a client received is in the issued log, a
/// token whose Certify was answered cannot be used again, and a token
/// whose call got no answer was used if and only if its issuance is in the
/// log (the token and the issuance commit together).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_issuances_keeps_every_answered_one_and_each_token_used_once() {
    const CALLS: usize = 200;
    const CLIENTS: usize = 16;
    let cp = ControlPlane::start(&[]);
    let mut tokens = Vec::new();
    for n in 0..CALLS {
        tokens.push(cp.token(&worker(n), 0).await);
    }
    let cp = Arc::new(cp);
    let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel();
    // Clients each certifying their share in turn, connected first: the
    // kill is to find calls in flight (and calls not yet made), not dials.
    let mut calls = Vec::new();
    for client in 0..CLIENTS {
        let mut identity = cp.identity_client(None).await;
        let (answers, tokens) = (answers.clone(), tokens.clone());
        calls.push(tokio::spawn(async move {
            for n in (client..CALLS).step_by(CLIENTS) {
                let answer = identity
                    .certify(CertifyRequest {
                        csr: csr_for(&p256(), &worker(n)),
                        proof: Some(Proof::JoinToken(tokens[n].clone())),
                        ..CertifyRequest::default()
                    })
                    .await;
                let _ = answers.send((n, answer.is_ok()));
            }
        }));
    }
    drop(answers);
    // Killed once some have been answered, with others in flight.
    let mut ok = std::collections::BTreeSet::new();
    while let Some((n, certified)) = answered.recv().await {
        if certified {
            ok.insert(n);
        }
        if ok.len() == 30 {
            break;
        }
    }
    cp.kill_hard();
    for call in calls {
        call.await.unwrap();
    }
    while let Some((n, certified)) = answered.recv().await {
        if certified {
            ok.insert(n);
        }
    }
    assert!(ok.len() < CALLS, "the kill came after every call: {ok:?}");
    let tmp = cp.tmp.clone();
    drop(Arc::into_inner(cp).expect("every call is over"));

    let cp = ControlPlane::start_in(tmp, &[]);
    let logged: std::collections::BTreeSet<String> = logged_ids(&cp).await.into_iter().collect();
    for (n, token) in tokens.iter().enumerate() {
        let again = cp
            .certify(csr_for(&p256(), &worker(n)), Some(token), None, "")
            .await;
        let in_log = logged.contains(&worker(n));
        if ok.contains(&n) {
            assert!(
                in_log,
                "worker-{n} was answered a certificate the log lacks"
            );
        }
        match again {
            Ok(_) => assert!(
                !in_log,
                "worker-{n}'s token certified again after its issuance was logged"
            ),
            Err(status) => {
                assert_eq!(
                    status.message(),
                    "join token was already used",
                    "{status:?}"
                );
                assert!(
                    in_log,
                    "worker-{n}'s token is used but its issuance is not logged"
                );
            }
        }
    }
}

/// SIGKILL while policy sets are being applied: after a restart each
/// applied set (one ApplyPolicy of many documents) is there whole or not
/// at all, and every set whose ApplyPolicy was answered is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_policy_applies_leaves_no_set_half_applied() {
    use common::policy::{allow, apply};
    const SETS: usize = 60;
    const PER_SET: usize = 40;
    const CLIENTS: usize = 6;
    let cp = Arc::new(ControlPlane::start(&[]));
    let set = |s: usize| {
        (0..PER_SET)
            .map(|p| allow(&format!("set-{s}-{p}"), WEB, &worker(p), 8000 + p as u32))
            .collect::<Vec<_>>()
            .join("---\n")
    };
    let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel();
    // Clients each applying their share in turn, connected first: the kill
    // is to find applies in flight (and applies not yet made), not dials.
    let mut calls = Vec::new();
    for client in 0..CLIENTS {
        let mut admin = cp.admin_client().await;
        let answers = answers.clone();
        let documents: Vec<_> = (client..SETS)
            .step_by(CLIENTS)
            .map(|s| (s, set(s)))
            .collect();
        calls.push(tokio::spawn(async move {
            for (s, document) in documents {
                let answer = apply(&mut admin, &document, false).await;
                let _ = answers.send((s, answer.is_ok()));
            }
        }));
    }
    drop(answers);
    let mut applied = std::collections::BTreeSet::new();
    while let Some((s, ok)) = answered.recv().await {
        if ok {
            applied.insert(s);
        }
        if applied.len() == 5 {
            break;
        }
    }
    cp.kill_hard();
    for call in calls {
        call.await.unwrap();
    }
    while let Some((s, ok)) = answered.recv().await {
        if ok {
            applied.insert(s);
        }
    }
    assert!(applied.len() < SETS, "the kill came after every apply");
    let tmp = cp.tmp.clone();
    drop(Arc::into_inner(cp).expect("every call is over"));

    let cp = ControlPlane::start_in(tmp, &[]);
    let mut admin = cp.admin_client().await;
    let stored = admin
        .list_policies(trellis_proto::admin::v1::ListPoliciesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut per_set = vec![0usize; SETS];
    for policy in &stored.policies {
        let s: usize = policy.name.split('-').nth(1).unwrap().parse().unwrap();
        per_set[s] += 1;
    }
    for (s, count) in per_set.iter().enumerate() {
        assert!(
            *count == 0 || *count == PER_SET,
            "set {s} is half applied: {count} of {PER_SET} policies"
        );
        if applied.contains(&s) {
            assert_eq!(*count, PER_SET, "set {s} was answered as applied");
        }
    }
}
