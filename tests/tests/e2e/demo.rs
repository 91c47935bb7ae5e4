//! `trellis-demo` keeps working: it starts a mesh, makes its mTLS call and
//! prints the success line, and says so when a program of its mesh dies.

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

/// The pid of the demo's child running the sidecar whose identity ends
/// with `/sa/{name}`.
fn sidecar_pid(demo: u32, name: &str) -> Option<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{demo}/task")).ok()?;
    let children: Vec<i32> = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    let suffix = format!("/sa/{name}");
    children.into_iter().find(|pid| {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        args.windows(2)
            .any(|w| w[0] == b"--identity" && w[1].ends_with(suffix.as_bytes()))
    })
}

/// A sidecar that dies while the demo is up is named, with how it exited
/// and where its log is; the demo stays up, and Ctrl-C still stops it
/// cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_names_a_sidecar_that_exits_and_still_stops_on_ctrl_c() -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_trellis-demo"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = demo.id().expect("the demo is running");
    let demo_pid = Pid::from_raw(pid as i32).expect("a pid is not zero");
    // Both outputs, line by line, as they come.
    let (said, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    for output in [
        Box::new(demo.stdout.take().expect("stdout is piped"))
            as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(demo.stderr.take().expect("stderr is piped")),
    ] {
        let said = said.clone();
        tokio::spawn(async move {
            let mut output = BufReader::new(output).lines();
            while let Ok(Some(line)) = output.next_line().await {
                let _ = said.send(line);
            }
        });
    }
    drop(said);
    let mut seen = String::new();
    let mut until = async |needle: &str| {
        let found = tokio::time::timeout(patience(Duration::from_secs(120)), async {
            while let Some(line) = lines.recv().await {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains(needle) {
                    return true;
                }
            }
            false
        })
        .await;
        anyhow::ensure!(found == Ok(true), "no {needle:?} in:\n{seen}");
        anyhow::Ok(seen.clone())
    };
    let stop = |signal| {
        let _ = kill_process(demo_pid, signal);
    };

    if let Err(e) = until("Press Ctrl-C to stop.").await {
        stop(Signal::TERM);
        return Err(e);
    }
    let api = sidecar_pid(pid, "api").expect("the demo runs the api sidecar as its child");
    kill_process(Pid::from_raw(api).expect("a pid is not zero"), Signal::KILL)?;
    let told = until("press Ctrl-C to stop it").await;
    // Read while the demo is up: stopping removes the mesh's directory.
    let log = told.as_ref().ok().and_then(|told| {
        let path = told
            .split("its log is ")
            .nth(1)?
            .split(", ending:")
            .next()?;
        Some((path.to_string(), std::path::Path::new(path).is_file()))
    });
    stop(Signal::INT);
    let told = told?;
    let status = tokio::time::timeout(Duration::from_secs(30), demo.wait()).await??;
    let all = until("Stopped.").await?;

    assert!(
        told.contains("trellis-demo: sidecar api exited on its own (signal: 9 (SIGKILL))"),
        "{told}"
    );
    let (log, is_file) = log.expect("the log's path is named");
    assert!(
        log.ends_with("sidecar-api.log") && is_file,
        "{log}:\n{told}"
    );
    assert!(status.success(), "the demo failed ({status}):\n{all}");
    Ok(())
}

/// Two meshes on one host (two demos started at once) may both find a
/// preferred port free and both hand it to a sidecar. The one that loses
/// the bind exits; its mesh must not take the winner, which answers on that
/// port, for its own sidecar (the demo then waited for a sidecar that was
/// not running). It starts again on other ports, and is the one serving
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_whose_preferred_port_another_mesh_holds_starts_elsewhere() -> anyhow::Result<()>
{
    let first = trellis_tests::Mesh::builder().start().await?;
    let holder = first.sidecar("web").start().await?;
    let taken = holder.admin().addr();
    let second = trellis_tests::Mesh::builder().start().await?;
    let free = trellis_tests::ports::free_addrs(2);
    let mut started = second
        .sidecar("web")
        .preferred_addrs(free[0], free[1], taken)
        .preferred_unchecked()
        .start()
        .await?;

    let admin = started.admin().addr();
    assert_ne!(
        admin, taken,
        "the other mesh's sidecar was taken for this one"
    );
    // The first start was given the taken port and lost it: this one is
    // the second (the join token file is named after the attempt).
    let token_file = started.token_file().display().to_string();
    assert!(
        token_file.ends_with("web-1.token"),
        "the sidecar was not first started on the taken port: {token_file}"
    );
    started.process().ensure_running()?;
    started.process().ensure_listening(admin)?;
    Ok(())
}

/// The URL (`http://ADDR/PATH`) of the `curl` line the demo prints with
/// `comment` after its `#`.
fn curl_line(printed: &str, comment: &str) -> Option<(std::net::SocketAddr, String)> {
    let line = printed
        .lines()
        .find(|line| line.trim_start().starts_with("curl ") && line.contains(comment))?;
    let url = line.split_whitespace().find(|w| w.starts_with("http://"))?;
    let rest = url.strip_prefix("http://")?;
    let (addr, path) = rest.split_at(rest.find('/')?);
    Some((addr.parse().ok()?, path.to_string()))
}

/// The demo shows what a denial looks like: the `curl` it prints for a call
/// no policy allows is answered 403 by the sidecar, in its own words, and a
/// denial on the second hop (once `web-to-api` is deleted with the
/// `trellisctl` command it prints) reaches the caller as api's sidecar
/// worded it, not as a bare status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_shows_what_a_denial_looks_like() -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    use trellis_tests::http;

    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_trellis-demo"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let demo_pid =
        Pid::from_raw(demo.id().expect("the demo is running") as i32).expect("a pid is not zero");
    let mut stdout = BufReader::new(demo.stdout.take().expect("stdout is piped")).lines();
    let mut printed = String::new();
    let up = tokio::time::timeout(patience(Duration::from_secs(120)), async {
        while let Some(line) = stdout.next_line().await? {
            printed.push_str(&line);
            printed.push('\n');
            if line.contains("Press Ctrl-C to stop.") {
                return anyhow::Ok(true);
            }
        }
        anyhow::Ok(false)
    })
    .await;
    let checked = async {
        anyhow::ensure!(
            matches!(up, Ok(Ok(true))),
            "the demo did not come up:\n{printed}"
        );
        let (denied, path) = curl_line(&printed, "denied (403)")
            .ok_or_else(|| anyhow::anyhow!("no curl line for a denial in:\n{printed}"))?;
        let answer = http::get(denied, &path).await?;
        anyhow::ensure!(
            answer.status == 403
                && answer
                    .headers
                    .get("trellis-proxy-error")
                    .map(|v| v.as_bytes())
                    == Some(b"denied")
                && answer
                    .body
                    .starts_with("trellis: denied by policy default:deny"),
            "the denial line's call was answered {} {:?} {:?}",
            answer.status,
            answer.headers,
            answer.body
        );

        let ctl_line = printed
            .lines()
            .find(|line| line.trim_end().ends_with(" policy list"))
            .ok_or_else(|| anyhow::anyhow!("no `policy list` line in:\n{printed}"))?;
        let mut ctl = ctl_line
            .trim()
            .strip_suffix(" policy list")
            .unwrap_or_default()
            .split_whitespace();
        let program = ctl.next().unwrap_or_default();
        let deleted = tokio::process::Command::new(program)
            .args(ctl)
            .args(["policy", "delete", "demo/web-to-api", "--wait"])
            .output()
            .await?;
        anyhow::ensure!(
            deleted.status.success(),
            "policy delete failed: {}",
            String::from_utf8_lossy(&deleted.stderr)
        );
        let (entry, path) = curl_line(&printed, "two mTLS hops")
            .ok_or_else(|| anyhow::anyhow!("no two-hop curl line in:\n{printed}"))?;
        let answer = http::get(entry, &path).await?;
        anyhow::ensure!(
            answer.status == 502
                && answer
                    .body
                    .contains("403 Forbidden: trellis: denied by policy default:deny"),
            "with web-to-api deleted the two-hop call was answered {} {:?}",
            answer.status,
            answer.body
        );
        anyhow::Ok(())
    }
    .await;

    let _ = kill_process(demo_pid, Signal::INT);
    let status = tokio::time::timeout(Duration::from_secs(30), demo.wait()).await??;
    checked?;
    assert!(status.success(), "the demo failed ({status})");
    Ok(())
}
