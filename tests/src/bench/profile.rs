//! Where Trellis's time goes, printed with the results (issue 7: where
//! Trellis falls short, "a profile of where the time goes"). `perf record`
//! samples both Trellis sidecars, and both proxies of Envoy's pair to read
//! them against, with the software `cpu-clock` event (a virtual machine
//! often has no hardware counters) through one extra round of the
//! one-stream bulk scenario and one of the keep-alive scenario. The extra
//! rounds run after the measured ones, so no figure of the run is taken
//! with the profiler attached. Each side's samples are summed by object
//! (the kernel, the proxy's executable, libc) and by function, and its call
//! graphs say how many were TCP pacing its connections (see
//! [`pacing_percent`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

use super::system::find_program;

/// Samples a second on each proxy: few enough to cost it little, enough
/// for a round of a few seconds to name its hot functions.
pub const FREQUENCY: u32 = 999;
/// How many functions are kept for each side.
pub const TOP: usize = 8;
/// How long `perf record` is given to attach before the round starts, and
/// to write its file after it is told to stop.
const ATTACH: Duration = Duration::from_millis(300);
const FINISH: Duration = Duration::from_secs(30);

/// The profile of a run: each side's samples in each profiled scenario, or
/// why none was taken.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Profiles {
    /// How the samples were taken.
    pub tool: String,
    pub sides: Vec<SideProfile>,
    /// Why there is no profile (perf not installed or not allowed to
    /// sample here, Trellis not run) or why part of it is missing.
    pub not_taken: Option<String>,
}

/// One proxy's samples during one profiled round.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SideProfile {
    /// The pair: "trellis" or "envoy".
    pub contender: String,
    pub scenario: String,
    /// "client" or "server".
    pub side: String,
    pub samples: u64,
    /// Share of the samples in each object (`[kernel.kallsyms]`, the
    /// proxy's executable, `libc.so.6`, ...), largest first.
    pub objects: Vec<Share>,
    /// The [`TOP`] functions with the most samples, largest first.
    pub functions: Vec<Share>,
    /// Share of the samples in TCP's own pacing ([`pacing_percent`]);
    /// `None` when the call graphs could not be read.
    pub pacing_percent: Option<f64>,
}

/// A share of a side's samples.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Share {
    pub name: String,
    /// The object a function is in (`None` for an object's own share).
    pub object: Option<String>,
    pub percent: f64,
}

/// `perf`, found on `PATH` and allowed to sample here.
pub struct Perf {
    path: PathBuf,
}

impl Perf {
    /// Finds `perf` and checks, with a one-command recording in `dir`, that
    /// it may sample: in a container or with a strict
    /// `kernel.perf_event_paranoid` it may not.
    pub async fn detect(dir: &Path) -> Result<Perf, String> {
        let path = find_program("perf").ok_or(
            "perf is not installed (Debian: linux-perf; scripts/install-bench-tools.sh installs it)",
        )?;
        let probe = dir.join("perf-probe.data");
        let output = Command::new(&path)
            .args(["record", "-q", "-e", "cpu-clock", "-o"])
            .arg(&probe)
            .args(["--", "true"])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("{} did not start: {e}", path.display()))?;
        let _ = std::fs::remove_file(&probe);
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let why = stderr
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no message");
            return Err(format!(
                "perf cannot sample here ({}): {}",
                output.status,
                why.trim()
            ));
        }
        Ok(Perf { path })
    }

    pub fn describe() -> String {
        format!(
            "perf record -g -e cpu-clock -F {FREQUENCY}, each proxy (every thread), through one \
             extra round of each scenario after the measured ones"
        )
    }

    /// Samples each of `pids` into its own file in `dir` (named after
    /// `label` and the pid) while `during` runs; returns its result and
    /// the files, in the order of `pids`.
    pub async fn record<T>(
        &self,
        pids: &[u32],
        dir: &Path,
        label: &str,
        during: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<(T, Vec<PathBuf>)> {
        let mut recorders: Vec<(Child, PathBuf)> = Vec::new();
        for pid in pids {
            let data = dir.join(format!("perf-{label}-{pid}.data"));
            let child = Command::new(&self.path)
                .args(["record", "-q", "-g", "-e", "cpu-clock", "-F"])
                .arg(FREQUENCY.to_string())
                .arg("-p")
                .arg(pid.to_string())
                .arg("-o")
                .arg(&data)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting perf record on process {pid}"))?;
            recorders.push((child, data));
        }
        tokio::time::sleep(ATTACH).await;
        let result = during.await;
        let mut files = Vec::new();
        for (child, data) in recorders {
            // SIGINT: perf writes out what it sampled and exits.
            let pid = child.id().and_then(|id| i32::try_from(id).ok());
            if let Some(pid) = pid.and_then(rustix::process::Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
            }
            let output = tokio::time::timeout(FINISH, child.wait_with_output())
                .await
                .context("perf record did not finish writing its samples")??;
            if !output.status.success() && !data.exists() {
                anyhow::bail!(
                    "perf record failed ({}): {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            files.push(data);
        }
        Ok((result?, files))
    }

    /// Sums the samples in `data` by object and by function.
    pub async fn report(&self, data: &Path) -> anyhow::Result<(u64, Vec<Share>, Vec<Share>)> {
        let objects = self.report_text(data, "dso").await?;
        let functions = self.report_text(data, "dso,sym").await?;
        let objects = parse_report(&objects);
        let samples = objects.iter().map(|line| line.samples).sum();
        Ok((
            samples,
            objects.into_iter().map(Line::into_share).collect(),
            parse_report(&functions)
                .into_iter()
                .take(TOP)
                .map(Line::into_share)
                .collect(),
        ))
    }

    /// The share of the samples in `data` that were TCP pacing a
    /// connection ([`pacing_percent`]), read from their call graphs.
    pub async fn pacing(&self, data: &Path) -> anyhow::Result<f64> {
        let script = self.read(data, &["script", "-F", "ip,sym"]).await?;
        pacing_percent(&script).context("perf script printed no samples")
    }

    async fn report_text(&self, data: &Path, sort: &str) -> anyhow::Result<String> {
        let args = ["report", "--stdio", "--no-children", "-q", "-n", "-t", ";"];
        self.read(data, &[&args[..], &["-g", "none", "--sort", sort]].concat())
            .await
    }

    /// What `perf` with `args` (its command first) prints of `data`.
    async fn read(&self, data: &Path, args: &[&str]) -> anyhow::Result<String> {
        let command = args.first().copied().unwrap_or_default();
        let output = Command::new(&self.path)
            .args(args)
            .arg("-i")
            .arg(data)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running perf {command}"))?;
        anyhow::ensure!(
            output.status.success(),
            "perf {command} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// A line of `perf report -n -t ';'`: share, samples, object and, when
/// sorted by function too, the function.
#[derive(Debug, PartialEq)]
struct Line {
    percent: f64,
    samples: u64,
    object: String,
    function: Option<String>,
}

impl Line {
    fn into_share(self) -> Share {
        match self.function {
            Some(function) => Share {
                name: function,
                object: Some(self.object),
                percent: self.percent,
            },
            None => Share {
                name: self.object,
                object: None,
                percent: self.percent,
            },
        }
    }
}

/// The lines of a `perf report --stdio -q -n -t ';'`, in its order (most
/// samples first); lines that are not one are skipped.
fn parse_report(text: &str) -> Vec<Line> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(';').map(str::trim);
            let percent = fields.next()?.strip_suffix('%')?.parse().ok()?;
            let samples = fields.next()?.parse().ok()?;
            let object = fields.next()?.to_string();
            // "[k] name" in the kernel, "[.] name" in user space.
            let function = fields.next().map(|f| {
                f.strip_prefix("[k] ")
                    .or_else(|| f.strip_prefix("[.] "))
                    .unwrap_or(f)
                    .to_string()
            });
            Some(Line {
                percent,
                samples,
                object,
                function,
            })
        })
        .collect()
}

/// The share of the samples in a `perf script -F ip,sym` of call graphs
/// (each sample a run of indented frames, the sampled function first, a
/// blank line after it) that TCP spent pacing: sampled at
/// `_raw_spin_unlock_irqrestore` called straight from `tcp_write_xmit`.
/// That is where `tcp_write_xmit` stops a connection that is ahead of the
/// pace its congestion control set (BBR paces every connection, loopback
/// included) and arms the connection's timer, with interrupts off; the
/// samples that fell meanwhile are counted as interrupts come back on. A
/// proxy pays it for its own connections and for those its softirqs push
/// on (a peer's, when an ACK it sends frees the peer's window). `None`
/// when there is no sample.
pub fn pacing_percent(script: &str) -> Option<f64> {
    let (mut samples, mut pacing) = (0u64, 0u64);
    // How deep in the current sample's frames the line is, and whether its
    // first frame is where interrupts came back on.
    let (mut depth, mut unlock) = (0usize, false);
    for line in script.lines() {
        // "ffffffff8226e079 _raw_spin_unlock_irqrestore"; "" between samples.
        let line = line.trim();
        if line.is_empty() {
            depth = 0;
            continue;
        }
        let function = line.split_once(' ').map_or(line, |(_, f)| f.trim());
        depth += 1;
        match depth {
            1 => {
                samples += 1;
                unlock = function == "_raw_spin_unlock_irqrestore";
            }
            2 if unlock && function == "tcp_write_xmit" => pacing += 1,
            _ => {}
        }
    }
    (samples > 0).then(|| 100.0 * pacing as f64 / samples as f64)
}

/// An object's name as the table prints it.
pub fn object_name(object: &str) -> &str {
    match object {
        "[kernel.kallsyms]" => "kernel",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real `perf report` output (a server-side sidecar under keep-alive,
    /// sorted by object, then by object and function).
    const BY_OBJECT: &str = " 68.92% ; 3936       ;[kernel.kallsyms]\n \
                             24.25% ; 1385       ;trellis-proxy    \n \
                             6.08%  ; 347        ;libc.so.6        \n \
                             0.75%  ; 43         ;[vdso]           \n\n\n";
    const BY_FUNCTION: &str = " 23.81% ; 1360       ;[kernel.kallsyms];[k] finish_task_switch.isra.0\n \
         2.31%  ; 132        ;trellis-proxy    ;[.] trellis_proxy::http::h1::one_request::{{closure}}\n \
         2.14%  ; 122        ;libc.so.6        ;[.] __memmove_avx512_unaligned_erms\n\n";

    /// Real `perf script -F ip,sym` output of a client-side sidecar's call
    /// graphs under bulk data, frames cut short: TCP pacing the load
    /// generator's connection in the softirq of the sidecar's read, the
    /// loopback delivery (with a `tcp_write_xmit` frame put further up), a
    /// copy in user space, and a sample of one frame.
    const SCRIPT: &str = "\n\tffffffff8226e079 _raw_spin_unlock_irqrestore\n\
        \tffffffff8208760b tcp_write_xmit\n\
        \tffffffff82088375 __tcp_push_pending_frames\n\
        \tffffffff8207eb84 tcp_rcv_established\n\
        \t          10a974 __libc_recv\n\n\
        \n\tffffffff8226e079 _raw_spin_unlock_irqrestore\n\
        \tffffffff8136979d handle_softirqs\n\
        \tffffffff813691ab do_softirq.part.0\n\
        \tffffffff8208760b tcp_write_xmit\n\n\
        \n\t          16db75 __memmove_avx512_unaligned_erms\n\
        \t    560b97e29e80 [unknown]\n\n\
        \n\tffffffff8226e079 _raw_spin_unlock_irqrestore\n\n";

    #[test]
    fn counts_the_samples_tcp_spent_pacing_from_their_call_graphs() {
        // One of four: the unlock straight under tcp_write_xmit. Not the
        // one whose tcp_write_xmit is further up, nor a lone unlock.
        assert_eq!(pacing_percent(SCRIPT), Some(25.0));
        assert_eq!(
            pacing_percent(&SCRIPT.replace("tcp_write_xmit", "tcp_sendmsg")),
            Some(0.0)
        );
        assert_eq!(pacing_percent(""), None);
        assert_eq!(pacing_percent("\n\n"), None);
    }

    #[test]
    fn reads_the_shares_of_each_object_and_function() {
        let objects = parse_report(BY_OBJECT);
        assert_eq!(objects.len(), 4);
        assert_eq!(
            objects[0],
            Line {
                percent: 68.92,
                samples: 3936,
                object: "[kernel.kallsyms]".into(),
                function: None,
            }
        );
        assert_eq!(objects.iter().map(|l| l.samples).sum::<u64>(), 5711);
        assert_eq!(
            objects.into_iter().nth(1).unwrap().into_share(),
            Share {
                name: "trellis-proxy".into(),
                object: None,
                percent: 24.25
            }
        );
        let functions: Vec<Share> = parse_report(BY_FUNCTION)
            .into_iter()
            .map(Line::into_share)
            .collect();
        assert_eq!(
            functions,
            [
                Share {
                    name: "finish_task_switch.isra.0".into(),
                    object: Some("[kernel.kallsyms]".into()),
                    percent: 23.81
                },
                Share {
                    name: "trellis_proxy::http::h1::one_request::{{closure}}".into(),
                    object: Some("trellis-proxy".into()),
                    percent: 2.31
                },
                Share {
                    name: "__memmove_avx512_unaligned_erms".into(),
                    object: Some("libc.so.6".into()),
                    percent: 2.14
                },
            ]
        );
        assert!(parse_report("# a comment\nnot a line\n").is_empty());
        assert_eq!(object_name("[kernel.kallsyms]"), "kernel");
        assert_eq!(object_name("trellis-proxy"), "trellis-proxy");
    }
}
