//! One network namespace ([`Netns`]), the commands run inside it, as root
//! or as another UID, and the test's own in-process servers run inside it
//! ([`NetnsRuntime`]). A namespace is deleted when its handle drops;
//! nothing here touches the machine's own namespace.

use std::ffi::OsStr;
use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use super::command::{run_ok, text};
use super::tools::{Tools, as_user_args};

/// A network namespace that exists while this value does.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace `trellis-<pid>-<n>-<label>` with `lo` up.
    pub fn new(label: &str) -> anyhow::Result<Netns> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("trellis-{}-{n}-{label}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let netns = Netns { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NS ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(|_| ())
    }

    /// `ip netns exec NS PROGRAM`, as root, without the caller's `TRELLIS_*`
    /// and proxy variables (flags are passed explicitly; a web proxy would
    /// take the clients' requests elsewhere).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy().to_ascii_lowercase();
            let trellis = name.starts_with("trellis_") && name != "trellis_log";
            if trellis || name.ends_with("_proxy") {
                command.env_remove(key);
            }
        }
        command
    }

    /// `program` inside the namespace as `uid` (and the same GID, no
    /// supplementary groups), through setpriv: `ip` itself needs root.
    pub fn command_as(&self, uid: u32, program: impl AsRef<OsStr>) -> anyhow::Result<Command> {
        let tools = Tools::get().map_err(anyhow::Error::msg)?;
        let mut command = self.command(&tools.setpriv);
        command.args(as_user_args(uid)).arg(program);
        Ok(command)
    }

    /// The nat table rules that mention Trellis chains, as every iptables
    /// backend that works here prints them (`iptables-nft-save`,
    /// `ip6tables-legacy-save`, ...), each line prefixed by the program.
    pub fn trellis_nat_rules(&self) -> String {
        let mut rules = String::new();
        for program in [
            "iptables-nft-save",
            "iptables-legacy-save",
            "ip6tables-nft-save",
            "ip6tables-legacy-save",
        ] {
            let Ok(out) = self.command(program).args(["-t", "nat"]).output() else {
                continue;
            };
            if !out.status.success() {
                continue;
            }
            for line in text(&out.stdout).lines() {
                if line.contains("TRELLIS") {
                    // Chain lines carry packet counters; keep name and policy.
                    let line = line.split(" [").next().unwrap_or(line);
                    rules.push_str(&format!("{program}: {line}\n"));
                }
            }
        }
        rules
    }

    /// A tokio runtime whose threads live in this namespace, for a server
    /// of the test's own (a stand-in API server) that a program in the
    /// namespace must reach at its loopback: a socket keeps the namespace
    /// of the thread that made it, so whatever its tasks bind or dial is
    /// here, while the test's own threads stay where they are.
    pub fn runtime(&self) -> anyhow::Result<NetnsRuntime> {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
        let netns = Arc::new(OwnedFd::from(file));
        // Entered once here first, so a failure is an error, not a panic in
        // a worker thread.
        let probe = netns.clone();
        std::thread::spawn(move || {
            move_into_link_name_space(probe.as_fd(), Some(LinkNameSpaceType::Network))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread entering {} panicked", self.name))?
        .with_context(|| format!("cannot enter the network namespace {}", self.name))?;
        let name = self.name.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("in-{}", self.name))
            .enable_all()
            .on_thread_start(move || {
                if let Err(e) =
                    move_into_link_name_space(netns.as_fd(), Some(LinkNameSpaceType::Network))
                {
                    panic!("cannot enter the network namespace {name}: {e}");
                }
            })
            .build()?;
        Ok(NetnsRuntime {
            runtime: Some(runtime),
        })
    }
}

/// A tokio runtime running inside one network namespace (see
/// [`Netns::runtime`]); its tasks stop when it drops.
#[derive(Debug)]
pub struct NetnsRuntime {
    // Taken on drop: a runtime must be shut down without blocking when the
    // test's own runtime drops it.
    runtime: Option<tokio::runtime::Runtime>,
}

impl NetnsRuntime {
    /// Runs `future` on a thread in the namespace and waits for its output:
    /// whatever it binds, it binds there, and tasks it spawns run there.
    pub async fn run<F>(&self, future: F) -> anyhow::Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let runtime = self.runtime.as_ref().expect("running until dropped");
        runtime
            .spawn(future)
            .await
            .context("the task in the namespace failed")
    }
}

impl Drop for NetnsRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
