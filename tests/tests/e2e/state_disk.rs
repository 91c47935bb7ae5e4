//! The control plane's embedded database on a volume that fills up.
//!
//! The state dir is put on a small tmpfs (mounting needs root; elsewhere the
//! test says `skipped: needs root`, and fails under CI), the volume is
//! filled, and writes go on through the real `trellisctl`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use trellis_tests::machine::is_root;
use trellis_tests::{Mesh, eventually};

use crate::SOON;

/// A tmpfs mounted over a directory, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> anyhow::Result<Tmpfs> {
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()?;
        anyhow::ensure!(
            status.success(),
            "mount tmpfs on {}: {status}",
            dir.display()
        );
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Copies the files of `from` into `to` (the state dir holds no subdirectories).
fn copy_files(from: &Path, to: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))
            .with_context(|| format!("copying {}", entry.path().display()))?;
    }
    Ok(())
}

/// Writes to `path` until the volume is full.
fn fill(path: &Path) -> anyhow::Result<()> {
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = file.write_all(&chunk).and_then(|()| file.sync_data()) {
            anyhow::ensure!(
                e.raw_os_error() == Some(28),
                "filling {}: {e}",
                path.display()
            );
            return Ok(());
        }
    }
}

/// A write that fails on a full volume leaves redb refusing every later
/// write until the file is reopened, even once space is back. The control
/// plane stops (exit 1) naming the database and the error, rather than
/// answering every Certify with an error until its sidecars' certificates
/// expire; started again after space is freed, it serves writes, with what
/// was written before the failure kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_volume_stops_the_control_plane_and_a_restart_recovers() -> anyhow::Result<()>
{
    if !is_root() {
        trellis_tests::machine::skip("skipped: needs root (mounts a tmpfs)");
        return Ok(());
    }
    let mut mesh = Mesh::start().await?;
    let before = mesh.spiffe_id("default", "before");
    mesh.token(&before).await?;
    mesh.stop_control_plane()?;

    // The state so far, moved onto a 16 MiB volume.
    let state = mesh.state_dir().to_path_buf();
    let saved = tempfile::tempdir()?;
    copy_files(&state, saved.path())?;
    let volume = Tmpfs::mount(&state, "16m")?;
    copy_files(saved.path(), &state)?;
    mesh.restart_control_plane().await?;

    let filler = state.join("filler");
    fill(&filler)?;
    let mut refused = None;
    for i in 0..50 {
        if let Err(e) = mesh
            .token(&mesh.spiffe_id("default", &format!("full-{i}")))
            .await
        {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.context("every token was stored on a full volume")?;
    let process = mesh
        .control_plane()
        .process()
        .context("no control plane process")?;
    let status = eventually("the control plane to stop", SOON, || {
        let status = process.try_exit_status();
        async move { status.context("still running") }
    })
    .await?;
    assert_eq!(status.code(), Some(1), "{status}");
    let log = process.log();
    assert!(
        log.contains("the state database failed a write"),
        "the log names the failure: {log}"
    );
    assert!(
        log.contains("trellis.redb"),
        "the log names the database: {log}"
    );
    drop(refused);

    std::fs::remove_file(&filler)?;
    mesh.restart_control_plane().await?;
    mesh.token(&mesh.spiffe_id("default", "after")).await?;
    mesh.stop_control_plane()?;
    drop(volume);
    Ok(())
}
