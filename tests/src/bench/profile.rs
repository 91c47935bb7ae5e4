//! Where Trellis's time goes, printed with the results (issue 7: where
//! Trellis falls short, "a profile of where the time goes"). `perf record`
//! samples both Trellis sidecars, and both proxies of Envoy's pair to read
//! them against, with the software `cpu-clock` event (a virtual machine
//! often has no hardware counters) through one extra round of the
//! one-stream bulk scenario and one of the keep-alive scenario. The extra
//! rounds run after the measured ones, so no figure of the run is taken
//! with the profiler attached. Each side's samples are summed by object
//! (the kernel, the proxy's executable, libc) and by function.

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
            "perf record -e cpu-clock -F {FREQUENCY}, each proxy (every thread), through one \
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
                .args(["record", "-q", "-e", "cpu-clock", "-F"])
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

    async fn report_text(&self, data: &Path, sort: &str) -> anyhow::Result<String> {
        let output = Command::new(&self.path)
            .args(["report", "--stdio", "--no-children", "-q", "-n", "-t", ";"])
            .args(["--sort", sort, "-i"])
            .arg(data)
            .stdin(Stdio::null())
            .output()
            .await
            .context("running perf report")?;
        anyhow::ensure!(
            output.status.success(),
            "perf report failed ({}): {}",
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
