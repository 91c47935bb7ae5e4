//! Where Trellis's time goes, printed with the results (issue 7: where
//! Trellis falls short, "a profile of where the time goes"). `perf record`
//! samples both Trellis sidecars, and both proxies of Envoy's pair to read
//! them against, with the software `cpu-clock` event (a virtual machine
//! often has no hardware counters) through one extra round of the
//! one-stream bulk scenario, one of the keep-alive scenario, one of the
//! HTTP/2 scenario and one of the new-connection scenario. The extra
//! rounds run after the measured ones, so no figure of the run is taken
//! with the profiler attached. Each side's samples are summed by object
//! (the kernel, the proxy's executable, libc) and by function, and its call
//! graphs say how many were TCP pacing its connections (see
//! [`sum_samples`]).

use std::collections::HashMap;
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
    /// Its samples, summed (in the JSON beside the fields above).
    #[serde(flatten)]
    pub summed: Summed,
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

    /// Sums the samples in `data` by object and by function, and counts
    /// those TCP spent pacing, from one reading of its call graphs.
    pub async fn sum(&self, data: &Path) -> anyhow::Result<Summed> {
        let script = self.read(data, &["script", "-F", "ip,sym,dso"]).await?;
        sum_samples(&script).context("perf script printed no samples")
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

/// A side's samples, summed from its call graphs ([`sum_samples`]).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Summed {
    pub samples: u64,
    /// Share of the samples in each object (`[kernel.kallsyms]`, the
    /// proxy's executable, `libc.so.6`, ...), largest first.
    pub objects: Vec<Share>,
    /// The [`TOP`] functions with the most samples, largest first.
    pub functions: Vec<Share>,
    /// Share of the samples in TCP's own pacing.
    pub pacing_percent: f64,
}

/// Sums a `perf script -F ip,sym,dso` of call graphs: each sample a run of
/// indented frames (`ffffffff8226e079 _raw_spin_unlock_irqrestore
/// ([kernel.kallsyms])`), the sampled function first, a blank line after
/// it. A sample counts for its first frame's function and object, as
/// `perf report --no-children` counts it, and towards TCP's pacing when
/// it was taken at `_raw_spin_unlock_irqrestore` called straight from
/// `tcp_write_xmit`. That is where `tcp_write_xmit` stops a connection
/// that is ahead of the pace its congestion control set (BBR paces every
/// connection, loopback included) and arms the connection's timer, with
/// interrupts off; the samples that fell meanwhile are counted as
/// interrupts come back on. A proxy pays it for its own connections and
/// for those its softirqs push on (a peer's, when an ACK it sends frees
/// the peer's window). `None` when there is no sample.
pub fn sum_samples(script: &str) -> Option<Summed> {
    let mut objects: HashMap<&str, u64> = HashMap::new();
    let mut functions: HashMap<(&str, &str), u64> = HashMap::new();
    let (mut samples, mut pacing) = (0u64, 0u64);
    // How deep in the current sample's frames the line is, and whether its
    // first frame is where interrupts came back on.
    let (mut depth, mut unlock) = (0usize, false);
    for line in script.lines() {
        let line = line.trim();
        if line.is_empty() {
            depth = 0;
            continue;
        }
        let (function, object) = frame(line);
        depth += 1;
        match depth {
            1 => {
                samples += 1;
                *objects.entry(object).or_default() += 1;
                *functions.entry((object, function)).or_default() += 1;
                unlock = function == "_raw_spin_unlock_irqrestore";
            }
            2 if unlock && function == "tcp_write_xmit" => pacing += 1,
            _ => {}
        }
    }
    if samples == 0 {
        return None;
    }
    let percent = |n: u64| (10_000.0 * n as f64 / samples as f64).round() / 100.0;
    let objects = largest_first(objects)
        .map(|(object, n)| Share {
            name: object.to_string(),
            object: None,
            percent: percent(n),
        })
        .collect();
    let functions = largest_first(functions)
        .take(TOP)
        .map(|((object, function), n)| Share {
            name: function.to_string(),
            object: Some(object.to_string()),
            percent: percent(n),
        })
        .collect();
    Some(Summed {
        samples,
        objects,
        functions,
        pacing_percent: 100.0 * pacing as f64 / samples as f64,
    })
}

/// The counts of `counted`, most first (ties in the keys' order, so that
/// a profile reads the same each time it is summed).
fn largest_first<K: Ord>(counted: HashMap<K, u64>) -> impl Iterator<Item = (K, u64)> {
    let mut counted: Vec<(K, u64)> = counted.into_iter().collect();
    counted.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counted.into_iter()
}

/// A frame's function and object, the object named as `perf report` names
/// it (`[kernel.kallsyms]`, `libc.so.6`: an executable or a library by its
/// file name). The object is the line's last bracketed part; a line
/// without one is counted in `[unknown]`.
fn frame(line: &str) -> (&str, &str) {
    // The address first.
    let rest = line.split_once(' ').map_or("", |(_, rest)| rest.trim());
    let Some(inner) = rest.strip_suffix(')') else {
        return (rest, "[unknown]");
    };
    // The '(' that opens the object, which may hold brackets of its own
    // ("memfd:x (deleted)").
    let mut open = 1usize;
    for (at, c) in inner.char_indices().rev() {
        match c {
            ')' => open += 1,
            '(' => open -= 1,
            _ => {}
        }
        if open == 0 {
            let path = &inner[at + 1..];
            let name = path.rsplit('/').next().unwrap_or(path);
            return (inner[..at].trim_end(), name);
        }
    }
    (rest, "[unknown]")
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

    /// Real `perf script -F ip,sym,dso` output of sidecars' call graphs,
    /// frames cut short: TCP pacing the load generator's connection in the
    /// softirq of a sidecar's read; the loopback delivery, with a
    /// `tcp_write_xmit` frame further up; a sample of one frame; a copy in
    /// libc twice; the key exchange in the sidecar's executable (a library
    /// path and an executable path, each named by its file name).
    const SCRIPT: &str = "\n\tffffffff8226e079 _raw_spin_unlock_irqrestore ([kernel.kallsyms])\n\
        \tffffffff8208760b tcp_write_xmit ([kernel.kallsyms])\n\
        \tffffffff82088375 __tcp_push_pending_frames ([kernel.kallsyms])\n\
        \tffffffff8207eb84 tcp_rcv_established ([kernel.kallsyms])\n\
        \t          10a974 __libc_recv (/usr/lib/x86_64-linux-gnu/libc.so.6)\n\n\
        \n\tffffffff8226e079 _raw_spin_unlock_irqrestore ([kernel.kallsyms])\n\
        \tffffffff8136979d handle_softirqs ([kernel.kallsyms])\n\
        \tffffffff813691ab do_softirq.part.0 ([kernel.kallsyms])\n\
        \tffffffff8208760b tcp_write_xmit ([kernel.kallsyms])\n\n\
        \n\tffffffff8226e079 _raw_spin_unlock_irqrestore ([kernel.kallsyms])\n\n\
        \n\t          16db75 __memmove_avx512_unaligned_erms (/usr/lib/x86_64-linux-gnu/libc.so.6)\n\
        \t    560b97e29e80 [unknown] ([unknown])\n\n\
        \n\t          16db75 __memmove_avx512_unaligned_erms (/usr/lib/x86_64-linux-gnu/libc.so.6)\n\n\
        \n\t         1849556 Lcurve25519_x25519_scalarloop (/usr/local/bin/trellis-proxy)\n\
        \t         17151f1 aws_lc_0_47_0_X25519 (/usr/local/bin/trellis-proxy)\n\n";

    fn share(name: &str, object: Option<&str>, percent: f64) -> Share {
        Share {
            name: name.into(),
            object: object.map(Into::into),
            percent,
        }
    }

    #[test]
    fn sums_each_sample_by_its_first_frames_object_and_function() {
        let summed = sum_samples(SCRIPT).unwrap();
        assert_eq!(summed.samples, 6);
        assert_eq!(
            summed.objects,
            [
                share("[kernel.kallsyms]", None, 50.0),
                share("libc.so.6", None, 33.33),
                share("trellis-proxy", None, 16.67),
            ]
        );
        assert_eq!(
            summed.functions,
            [
                share(
                    "_raw_spin_unlock_irqrestore",
                    Some("[kernel.kallsyms]"),
                    50.0
                ),
                share("__memmove_avx512_unaligned_erms", Some("libc.so.6"), 33.33),
                share(
                    "Lcurve25519_x25519_scalarloop",
                    Some("trellis-proxy"),
                    16.67
                ),
            ]
        );
        assert_eq!(sum_samples(""), None);
        assert_eq!(sum_samples("\n\n"), None);
    }

    #[test]
    fn counts_the_samples_tcp_spent_pacing_from_their_call_graphs() {
        // One of six: the unlock straight under tcp_write_xmit. Not the
        // one whose tcp_write_xmit is further up, nor a lone unlock.
        let percent = |script: &str| sum_samples(script).unwrap().pacing_percent;
        assert_eq!(percent(SCRIPT), 100.0 / 6.0);
        assert_eq!(
            percent(&SCRIPT.replace("tcp_write_xmit", "tcp_sendmsg")),
            0.0
        );
    }

    #[test]
    fn keeps_the_busiest_functions_largest_first() {
        // TOP + 2 functions, function i sampled i + 1 times.
        let script: String = (0..TOP + 2)
            .flat_map(|i| (0..=i).map(move |_| format!("\n\t1234 f{i} (/bin/app)\n\n")))
            .collect();
        let summed = sum_samples(&script).unwrap();
        let names: Vec<&str> = summed.functions.iter().map(|f| f.name.as_str()).collect();
        let expected: Vec<String> = (2..TOP + 2).rev().map(|i| format!("f{i}")).collect();
        assert_eq!(names, expected);
        assert_eq!(summed.objects, [share("app", None, 100.0)]);
    }

    #[test]
    fn names_a_frames_object_by_its_last_bracketed_part() {
        assert_eq!(
            frame("ffffffff8208760b tcp_write_xmit ([kernel.kallsyms])"),
            ("tcp_write_xmit", "[kernel.kallsyms]")
        );
        assert_eq!(
            frame("7f78000001de [unknown] ([unknown])"),
            ("[unknown]", "[unknown]")
        );
        // Brackets in the function and in the object.
        assert_eq!(
            frame("1a2b <impl (x)>::f (/memfd:jit (deleted))"),
            ("<impl (x)>::f", "memfd:jit (deleted)")
        );
        assert_eq!(frame("1a2b f"), ("f", "[unknown]"));
        assert_eq!(
            frame("1a2b f (unbalanced))"),
            ("f (unbalanced))", "[unknown]")
        );
        assert_eq!(object_name("[kernel.kallsyms]"), "kernel");
        assert_eq!(object_name("trellis-proxy"), "trellis-proxy");
    }
}
