//! `trellis-demo` keeps working: it starts a mesh, makes its mTLS call and
//! prints the success line.

use std::process::Stdio;
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};
use tokio::io::AsyncReadExt;
use trellis_tests::patience;

/// The line the demo prints when its call crossed the mesh.
const SUCCESS: &str = "mTLS call succeeded";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_starts_and_its_call_succeeds() -> anyhow::Result<()> {
    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_trellis-demo"))
        .arg("--exit-after-check")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = demo.id();
    let mut stdout = demo.stdout.take().expect("stdout is piped");
    let mut stderr = demo.stderr.take().expect("stderr is piped");
    let (mut out, mut err) = (String::new(), String::new());
    let run = async {
        let (read_out, read_err, status) = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err),
            demo.wait()
        );
        read_out?;
        read_err?;
        anyhow::Ok(status?)
    };
    let Ok(status) = tokio::time::timeout(patience(Duration::from_secs(120)), run).await else {
        // SIGTERM first, so the demo stops the mesh it started.
        if let Some(pid) = pid.and_then(|p| Pid::from_raw(p as i32)) {
            let _ = kill_process(pid, Signal::TERM);
            let _ = tokio::time::timeout(Duration::from_secs(10), demo.wait()).await;
        }
        anyhow::bail!("trellis-demo --exit-after-check did not exit:\n{out}\n{err}");
    };
    let status = status?;

    assert!(
        status.success(),
        "trellis-demo failed ({status}):\n{out}\n{err}"
    );
    assert!(out.contains(SUCCESS), "no success line in:\n{out}\n{err}");
    Ok(())
}
