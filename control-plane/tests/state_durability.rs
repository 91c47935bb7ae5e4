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

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

fn worker(n: usize) -> String {
    format!("spiffe://cluster.local/ns/default/sa/worker-{n}")
}

/// A state dir on a tmpfs of its own, mounted in a private mount
/// namespace that a holder process keeps alive across control plane
/// restarts. Needs root (CAP_SYS_ADMIN) and `unshare`/`nsenter`.
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
