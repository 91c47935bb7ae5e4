//! What the benchmark reads from and sets on the machine: CPU time, context
//! switches and resident memory of a process (`/proc/<pid>/stat`,
//! `/proc/<pid>/status`),
//! pinning a process to one core (`taskset -a -c -p`, all its threads), the
//! open-files limit, a description of the machine for the report, and how
//! much of its start-up symbol order a sidecar executable holds.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// The fields of `/proc/<pid>/stat` after the command name: the state
/// (field 3, 1-based) first, then the parent (4), and so on. The name may
/// hold spaces and parentheses, so the fields start after the last ')'.
pub fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User + system CPU seconds a process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    // utime and stime are fields 14 and 15 (1-based), the 12th and 13th
    // after the name.
    let fields = stat_fields(pid)?;
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// Resident memory of a process in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_number(&status, "VmRSS")
}

/// The number of field `name` of a `/proc/.../status` text (the first word
/// after `name:`, so `VmRSS:   1234 kB` is 1234).
fn status_number(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Context switches of every thread of a process, from
/// `/proc/<pid>/task/*/status`: so far ([`switches`]), or between two
/// readings ([`Switches::since`]). Threads that ended are not counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Switches {
    /// A thread gave up its core to wait (for a socket, a timer, a lock):
    /// how often the process went to sleep.
    pub voluntary: u64,
    /// The scheduler took a thread's core while it still had work.
    pub involuntary: u64,
}

impl Switches {
    /// What happened between `before` and `self`.
    pub fn since(self, before: Switches) -> Switches {
        Switches {
            voluntary: self.voluntary.saturating_sub(before.voluntary),
            involuntary: self.involuntary.saturating_sub(before.involuntary),
        }
    }

    pub fn add(&mut self, other: Switches) {
        self.voluntary += other.voluntary;
        self.involuntary += other.involuntary;
    }
}

/// The context switches of all of a process's threads so far.
pub fn switches(pid: u32) -> Option<Switches> {
    let mut total = Switches::default();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        // A thread that ended since the listing is not counted.
        if let Some(thread) = std::fs::read_to_string(task.ok()?.path().join("status"))
            .ok()
            .as_deref()
            .and_then(parse_switches)
        {
            total.add(thread);
        }
    }
    Some(total)
}

/// The context switches of one thread's `status`.
fn parse_switches(status: &str) -> Option<Switches> {
    Some(Switches {
        voluntary: status_number(status, "voluntary_ctxt_switches")?,
        involuntary: status_number(status, "nonvoluntary_ctxt_switches")?,
    })
}

/// The host's CPU time, in clock ticks of all cores together, from the
/// first line of `/proc/stat`: so far ([`host_ticks`]), or between two
/// readings ([`HostTicks::since`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostTicks {
    /// User, nice, system, irq, softirq and steal.
    pub busy: u64,
    /// Busy, idle and iowait.
    pub total: u64,
    /// Steal: time this machine's cores had work but the hypervisor ran
    /// something else on the physical CPU (0 outside a virtual machine).
    /// A run that stalls while the host steals is waiting for the host,
    /// not for the proxies.
    pub stolen: u64,
    /// How many intervals between two readings this sums (0 for a reading
    /// itself): an interval shorter than a clock tick still counts as
    /// read, though its ticks are all 0.
    pub intervals: u32,
}

impl HostTicks {
    /// What was spent between `before` and `self`.
    pub fn since(self, before: HostTicks) -> HostTicks {
        HostTicks {
            busy: self.busy.saturating_sub(before.busy),
            total: self.total.saturating_sub(before.total),
            stolen: self.stolen.saturating_sub(before.stolen),
            intervals: 1,
        }
    }

    /// Adds `other` (an interval) to this sum of intervals.
    pub fn add(&mut self, other: HostTicks) {
        self.busy += other.busy;
        self.total += other.total;
        self.stolen += other.stolen;
        self.intervals += other.intervals;
    }

    /// The share of the host's CPU time that was busy.
    pub fn busy_share(self) -> Option<f64> {
        (self.total > 0).then(|| self.busy as f64 / self.total as f64)
    }

    /// The CPU time stolen, in milliseconds (of all cores together).
    pub fn stolen_ms(self) -> f64 {
        self.stolen as f64 * 1000.0 / TICKS_PER_SECOND
    }

    /// For a sum of intervals: the CPU time stolen over them, when any
    /// interval was read (a round shorter than a clock tick too, whose
    /// ticks are all 0).
    pub fn stolen_ms_if_read(self) -> Option<f64> {
        (self.intervals > 0).then(|| self.stolen_ms())
    }

    /// Adds the interval from `before` to now to this sum of intervals and
    /// returns it; nothing when either reading could not be taken.
    pub fn add_since(&mut self, before: Option<HostTicks>) -> Option<HostTicks> {
        let interval = host_ticks()?.since(before?);
        self.add(interval);
        Some(interval)
    }
}

/// The host's CPU time so far (see [`HostTicks`]).
pub fn host_ticks() -> Option<HostTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_host_ticks(stat.lines().next()?)
}

fn parse_host_ticks(line: &str) -> Option<HostTicks> {
    let mut fields = line.strip_prefix("cpu ")?.split_whitespace();
    let mut next = || fields.next().and_then(|f| f.parse::<u64>().ok());
    let (user, nice, system, idle) = (next()?, next()?, next()?, next()?);
    let (iowait, irq, softirq) = (next()?, next()?, next()?);
    let stolen = next().unwrap_or(0);
    let busy = user + nice + system + irq + softirq + stolen;
    Some(HostTicks {
        busy,
        total: busy + idle + iowait,
        stolen,
        intervals: 0,
    })
}

/// Number of online CPUs.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// An executable called `name` on `PATH`, if there is one.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// How processes are pinned in this run.
#[derive(Clone, Debug)]
pub enum Pinning {
    /// `taskset` pins every thread of proxy `i` of a pair to core `i`.
    Taskset(PathBuf),
    /// Nothing is pinned (no `taskset`, one core, or `--no-pin`).
    Off(String),
}

impl Pinning {
    pub fn detect(wanted: bool) -> Pinning {
        if !wanted {
            return Pinning::Off("--no-pin".into());
        }
        if cpus() < 2 {
            return Pinning::Off("one core".into());
        }
        match find_program("taskset") {
            Some(path) => Pinning::Taskset(path),
            None => Pinning::Off("taskset not installed (util-linux)".into()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Pinning::Taskset(_) => format!(
                "client-side proxy on core 0, server-side proxy on core 1 (`taskset -a -c -p`, every thread), \
                 load generator and app unpinned on all {} cores",
                cpus()
            ),
            Pinning::Off(why) => format!("not pinned ({why})"),
        }
    }

    /// Pins every thread of `pid` to `core` (modulo the number of cores).
    /// Threads started later inherit the mask from the thread that starts
    /// them. A thread that exits while taskset walks the list makes it fail,
    /// so it is tried a few times.
    pub fn pin(&self, pid: u32, core: usize) -> anyhow::Result<()> {
        let Pinning::Taskset(taskset) = self else {
            return Ok(());
        };
        let core = core % cpus();
        let mut last = String::new();
        for _ in 0..10 {
            let out = Command::new(taskset)
                .args(["-a", "-c", "-p", &core.to_string(), &pid.to_string()])
                .output()?;
            if out.status.success() {
                return Ok(());
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        anyhow::bail!("taskset -a -c -p {core} {pid} failed: {last}")
    }
}

/// Raises the soft open-files limit to `wanted` (and the hard limit when
/// allowed), so the run and the proxies it starts can hold many
/// connections. Returns the soft limit in force afterwards.
pub fn raise_open_files(wanted: u64) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let current = now.current.unwrap_or(u64::MAX);
    if current >= wanted {
        return current;
    }
    let maximum = now.maximum.unwrap_or(u64::MAX);
    // Root may raise the hard limit too; otherwise go as far as it allows.
    let raised = Rlimit {
        current: Some(wanted),
        maximum: Some(maximum.max(wanted)),
    };
    if setrlimit(Resource::Nofile, raised).is_err() {
        let capped = Rlimit {
            current: Some(wanted.min(maximum)),
            maximum: now.maximum,
        };
        let _ = setrlimit(Resource::Nofile, capped);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// `MemAvailable` of `/proc/meminfo`, in MiB.
pub fn available_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// The machine, by its properties.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_mib: u64,
    pub kernel: String,
    /// What an idle core does (the kernel's cpuidle driver): in a virtual
    /// machine, whether it halts at once (and waking it goes through the
    /// host) or polls a while first. A woken proxy's wait is part of every
    /// pair's tail.
    pub cpu_idle: String,
    /// The host's TCP congestion control, which every loopback connection
    /// of the run (each hop of each pair, and direct's one) uses. BBR
    /// paces what a connection sends with a timer of its own, loopback
    /// included, and that costs each sender CPU and bounds its rate.
    pub tcp_congestion: String,
}

impl Machine {
    pub fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_mib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let cpu_idle = describe_idle(
            read("/sys/devices/system/cpu/cpuidle/current_driver").as_deref(),
            read("/sys/module/haltpoll/parameters/guest_halt_poll_ns").as_deref(),
        );
        let tcp_congestion =
            describe_congestion(read("/proc/sys/net/ipv4/tcp_congestion_control").as_deref());
        Machine {
            cpus: cpus(),
            cpu_model,
            memory_mib,
            kernel,
            cpu_idle,
            tcp_congestion,
        }
    }
}

/// The cpuidle driver, and with `haltpoll` (a KVM guest's) how long an
/// idle core polls before it halts.
fn describe_idle(driver: Option<&str>, halt_poll_ns: Option<&str>) -> String {
    match (driver.map(str::trim), halt_poll_ns.map(str::trim)) {
        (None | Some(""), _) => "unknown".into(),
        (Some("haltpoll"), Some("0")) => "haltpoll, halts at once (guest_halt_poll_ns 0)".into(),
        (Some("haltpoll"), Some(ns)) => {
            format!("haltpoll, polls up to {ns} ns before it halts (guest_halt_poll_ns)")
        }
        (Some(driver), _) => driver.into(),
    }
}

/// The host's default TCP congestion control, and whether it paces
/// loopback connections.
fn describe_congestion(name: Option<&str>) -> String {
    match name.map(str::trim) {
        None | Some("") => "unknown".into(),
        Some("bbr") => "bbr, which paces loopback connections too".into(),
        Some(name) => name.into(),
    }
}

/// The list of functions the sidecar is linked with first
/// (`proxy/build.rs`, made by `scripts/symbol-order.sh`).
const SYMBOL_ORDER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../proxy/link/symbol-order.txt"
);

/// What a sidecar executable holds of its start-up order
/// (`proxy/link/symbol-order.txt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymbolOrder {
    /// The functions the list names.
    pub listed: usize,
    /// How many of them the executable defines.
    pub defined: usize,
    /// How many of those it lays out first: all of them when the linker
    /// took the list.
    pub first: usize,
}

/// The [`SymbolOrder`] of `sidecar`, read with binutils' `nm`. The list
/// carries hashes of one build's toolchain, lock file and settings: a
/// sidecar built otherwise, or after they changed, holds few of them and
/// idles with more of its code resident.
pub fn symbol_order(sidecar: &Path) -> anyhow::Result<SymbolOrder> {
    use anyhow::Context;
    let list = std::fs::read_to_string(SYMBOL_ORDER)
        .with_context(|| format!("cannot read {SYMBOL_ORDER}"))?;
    let out = Command::new("nm")
        .args(["--defined-only", "--numeric-sort"])
        .arg(sidecar)
        .output()
        .context("cannot run nm (binutils)")?;
    anyhow::ensure!(
        out.status.success(),
        "nm {}: {}",
        sidecar.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let symbols = String::from_utf8_lossy(&out.stdout);
    Ok(symbol_order_of(&list, &symbols))
}

/// [`symbol_order`] of the list `list` and the output of `nm
/// --defined-only --numeric-sort` `symbols`.
fn symbol_order_of(list: &str, symbols: &str) -> SymbolOrder {
    let listed: std::collections::HashSet<&str> = list
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    // Functions (code symbols) by address, each name once.
    let mut seen = std::collections::HashSet::new();
    let functions: Vec<&str> = symbols
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, kind, name) = (fields.next()?, fields.next()?, fields.next()?);
            matches!(kind, "t" | "T" | "w" | "W").then_some(name)
        })
        .filter(|name| seen.insert(*name))
        .collect();
    let defined = functions.iter().filter(|f| listed.contains(*f)).count();
    let first = functions[..defined]
        .iter()
        .filter(|f| listed.contains(*f))
        .count();
    SymbolOrder {
        listed: listed.len(),
        defined,
        first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real `/proc/stat` first line: busy counts user, nice, system,
    /// irq, softirq and steal (guest time is already in user), the total
    /// adds idle and iowait, and steal is what the hypervisor took.
    #[test]
    fn reads_the_hosts_busy_total_and_stolen_ticks() {
        let line = "cpu  2511122 29494 662570 6976286 22863 0 193141 758 0 0";
        let busy = 2511122 + 29494 + 662570 + 193141 + 758;
        let ticks = parse_host_ticks(line).unwrap();
        assert_eq!(
            ticks,
            HostTicks {
                busy,
                total: busy + 6976286 + 22863,
                stolen: 758,
                intervals: 0,
            }
        );
        assert_eq!(parse_host_ticks("cpu0 1 2 3 4 5 6 7 8 0 0"), None);
        // A kernel too old to count steal: none stolen.
        let old = parse_host_ticks("cpu  10 0 10 20 0 0 0").unwrap();
        assert_eq!((old.busy, old.total, old.stolen), (20, 40, 0));

        let later = parse_host_ticks("cpu  2511152 29494 662580 6976346 22863 0 193141 770 0 0");
        let interval = later.unwrap().since(ticks);
        assert_eq!(
            interval,
            HostTicks {
                busy: 52,
                total: 112,
                stolen: 12,
                intervals: 1,
            }
        );
        assert_eq!(interval.stolen_ms(), 120.0);
        let mut sum = HostTicks::default();
        sum.add(interval);
        sum.add(interval);
        assert_eq!((sum.busy, sum.total, sum.stolen), (104, 224, 24));
        assert_eq!(sum.stolen_ms_if_read(), Some(240.0));
        // A round shorter than a clock tick was still read: nothing stolen.
        let mut short = HostTicks::default();
        short.add(ticks.since(ticks));
        assert_eq!(short.stolen_ms_if_read(), Some(0.0));
        assert_eq!(HostTicks::default().stolen_ms_if_read(), None);
        assert_eq!(
            HostTicks {
                busy: 30,
                total: 40,
                stolen: 0,
                intervals: 1,
            }
            .busy_share(),
            Some(0.75)
        );
        assert_eq!(HostTicks::default().busy_share(), None);

        let now = host_ticks().unwrap();
        assert!(now.busy > 0 && now.total >= now.busy && now.busy >= now.stolen);
    }

    /// A thread's `status` as Linux writes it (the lines around the two
    /// counters trimmed): both counters read, the interval between two
    /// readings and a sum; and this process's own threads, which have
    /// slept at least once by the time a test runs.
    #[test]
    fn counts_a_processs_context_switches() {
        let status = "Name:\ttokio-runtime-w\nState:\tS (sleeping)\nTgid:\t4242\n\
                      Cpus_allowed_list:\t0\nvoluntary_ctxt_switches:\t18734\n\
                      nonvoluntary_ctxt_switches:\t291\n";
        let before = parse_switches(status).unwrap();
        assert_eq!(
            before,
            Switches {
                voluntary: 18734,
                involuntary: 291
            }
        );
        assert_eq!(
            parse_switches("Name:\tx\nvoluntary_ctxt_switches:\t1\n"),
            None
        );
        let after = Switches {
            voluntary: 20734,
            involuntary: 300,
        };
        let round = after.since(before);
        assert_eq!((round.voluntary, round.involuntary), (2000, 9));
        let mut sum = round;
        sum.add(round);
        assert_eq!((sum.voluntary, sum.involuntary), (4000, 18));

        std::thread::sleep(std::time::Duration::from_millis(1));
        let own = switches(std::process::id()).unwrap();
        assert!(own.voluntary > 0, "{own:?}");
        assert_eq!(switches(u32::MAX), None);
    }

    #[test]
    fn says_whether_an_idle_core_halts_at_once() {
        assert_eq!(
            describe_idle(Some("haltpoll\n"), Some("0\n")),
            "haltpoll, halts at once (guest_halt_poll_ns 0)"
        );
        assert_eq!(
            describe_idle(Some("haltpoll\n"), Some("200000\n")),
            "haltpoll, polls up to 200000 ns before it halts (guest_halt_poll_ns)"
        );
        assert_eq!(describe_idle(Some("intel_idle\n"), None), "intel_idle");
        assert_eq!(describe_idle(None, None), "unknown");
        assert!(!Machine::describe().cpu_idle.is_empty());
    }

    #[test]
    fn says_whether_tcp_paces_loopback_connections() {
        assert_eq!(
            describe_congestion(Some("bbr\n")),
            "bbr, which paces loopback connections too"
        );
        assert_eq!(describe_congestion(Some("cubic\n")), "cubic");
        assert_eq!(describe_congestion(None), "unknown");
        // Linux always has one.
        assert_ne!(Machine::describe().tcp_congestion, "unknown");
    }

    #[test]
    fn reads_its_own_cpu_and_memory() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(rss_kib(me).is_some_and(|kib| kib > 0));
    }

    #[test]
    fn tells_whether_the_listed_functions_were_laid_out_first() {
        let list = "# made for rustc 1.95\nmain\nstart\nstale_name\n";
        let ordered = "0000000000001000 T main\n0000000000001010 t start\n\
                       0000000000001020 t cold\n0000000000003000 r TABLE\n";
        assert_eq!(
            super::symbol_order_of(list, ordered),
            super::SymbolOrder {
                listed: 3,
                defined: 2,
                first: 2
            }
        );
        let unordered = "0000000000001000 t cold\n0000000000001010 T main\n\
                         0000000000001020 t start\n";
        assert_eq!(
            super::symbol_order_of(list, unordered),
            super::SymbolOrder {
                listed: 3,
                defined: 2,
                first: 1
            }
        );
    }
}
