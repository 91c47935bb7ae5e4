//! What the `trellis-proxy init` tests share: preconditions, `init` and iptables inside a
//! network namespace, and the child processes the tests run there.
//!
//! Work inside a namespace runs in a child process: `ip netns exec NS <exe> ...`, where
//! `<exe>` is the `trellis-proxy` binary (`init ...`) when it dispatches the subcommand, and
//! otherwise the test executable re-run as its `child_process_entry` test, which calls
//! [`child_process_entry`]: the library's `init::execute`, or a listener or client for the
//! redirect test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use clap::Parser;
use trellis_proxy::init::{Family, InitArgs};

use super::Running;
use super::machine::{is_root, runs, skip};
use super::netns::Netns;

pub const ROLE: &str = "TRELLIS_INIT_TEST_ROLE";
pub const ARGS: &str = "TRELLIS_INIT_TEST_ARGS";
pub const AS_UID: &str = "TRELLIS_INIT_TEST_UID";
pub const WITH_PATH: &str = "TRELLIS_INIT_TEST_PATH";
pub const SEP: char = '\u{1f}';

// ---------------------------------------------------------------------------------------
// Preconditions and namespaces

/// Whether this machine can run the tests; says why not when it cannot
/// (see [`skip`]: under CI, fails the test instead).
pub fn can_run() -> bool {
    if !is_root() {
        skip("skipped: needs root");
        return false;
    }
    let iptables = ["iptables-nft-save", "iptables-legacy-save"]
        .iter()
        .any(|p| runs(p, &["--version"]) || runs(p, &["-V"]));
    if !iptables {
        skip("skipped: iptables not installed");
        return false;
    }
    if !runs("ip", &["-V"]) {
        skip("skipped: iproute2 not installed");
        return false;
    }
    true
}

/// What these tests do in a namespace of their own.
impl Netns {
    /// Runs `trellis-proxy init ARGS` inside the namespace.
    pub fn init(&self, args: &[&str]) -> Output {
        match proxy_binary_with_init() {
            Some(binary) => self.exec(binary).arg("init").args(args).output().unwrap(),
            None => self.child("init", args).output().unwrap(),
        }
    }

    /// This test executable, inside the namespace, as [`child_process_entry`] in `role`.
    pub fn child(&self, role: &str, args: &[&str]) -> Command {
        let exe = std::env::current_exe().unwrap();
        let mut command = self.exec(exe.to_str().unwrap());
        command
            .args([
                "child_process_entry",
                "--exact",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env(ROLE, role)
            .env(ARGS, args.join(&SEP.to_string()));
        command
    }

    /// The nat table as the backend `init` picks (nft where it works) prints it, without
    /// the comment lines that carry timestamps.
    pub fn nat(&self, family: Family) -> String {
        let prefix = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        for backend in ["nft", "legacy"] {
            let out = self
                .exec(&format!("{prefix}-{backend}-save"))
                .args(["-t", "nat"])
                .output();
            if let Some(out) = out.ok().filter(|o| o.status.success()) {
                return text(&out.stdout)
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(|l| format!("{l}\n"))
                    .collect();
            }
        }
        panic!("no {prefix}-save works in {}", self.name);
    }

    /// Feeds `input` to the restore program of the backend `init` picks.
    pub fn restore(&self, family: Family, input: &str) {
        let prefix = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let backend = if runs(format!("{prefix}-nft-save"), &["-V"]) {
            "nft"
        } else {
            "legacy"
        };
        let mut child = self
            .exec(&format!("{prefix}-{backend}-restore"))
            .arg("--noflush")
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
    }
}

/// The nat table as one backend's save program prints it inside `ns`, without comment
/// lines; `None` when that program does not work there.
pub fn nat_of(ns: &Netns, program: &str) -> Option<String> {
    table_of(ns, program, "nat")
}

/// `table` as one backend's save program prints it inside `ns`, without comment lines;
/// `None` when that program does not work there.
pub fn table_of(ns: &Netns, program: &str, table: &str) -> Option<String> {
    let out = ns.exec(program).args(["-t", table]).output().ok()?;
    out.status.success().then(|| {
        text(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    })
}

/// Where `program` is on this machine's PATH.
pub fn on_path(program: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The `trellis-proxy` binary, if it already dispatches `init`.
pub fn proxy_binary_with_init() -> Option<&'static str> {
    let binary = env!("CARGO_BIN_EXE_trellis-proxy");
    let help = Command::new(binary)
        .args(["init", "--help"])
        .output()
        .ok()?;
    (help.status.success() && text(&help.stdout).contains("--proxy-uid")).then_some(binary)
}

pub fn ipv6_usable(ns: &Netns) -> bool {
    ns.exec("ip6tables-nft-save")
        .args(["-t", "nat"])
        .output()
        .is_ok_and(|o| o.status.success())
        || ns
            .exec("ip6tables-legacy-save")
            .args(["-t", "nat"])
            .output()
            .is_ok_and(|o| o.status.success())
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "init failed ({}): {}{}",
        out.status,
        text(&out.stderr),
        text(&out.stdout)
    );
    text(&out.stdout)
}

pub fn lines_with(table: &str, needle: &str) -> Vec<String> {
    table
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Redirection, for real: a pod namespace and a peer namespace joined by a veth pair

/// Starts a listener inside `ns` on `port` (IPv4 and IPv6) that answers every connection
/// with `NAME local=ADDR orig=ADDR`.
pub fn serve(ns: &Netns, port: u16, name: &str) -> Running {
    start(ns, "serve", port, name)
}

/// Starts a UDP responder inside `ns` on `port` (IPv4) that answers every datagram with
/// `NAME local=PORT`.
pub fn serve_udp(ns: &Netns, port: u16, name: &str) -> Running {
    start(ns, "serve-udp", port, name)
}

/// Runs the child `role` serving `port` as `name` inside `ns`, once it says it is ready.
fn start(ns: &Netns, role: &str, port: u16, name: &str) -> Running {
    let mut child = ns
        .child(role, &[&port.to_string(), name])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let running = Running(child);
    loop {
        match lines.next() {
            Some(Ok(line)) if line == "ready" => return running,
            Some(Ok(_)) => continue,
            other => panic!("{role} {name} on {port} did not start: {other:?}"),
        }
    }
}

/// Connects from inside `ns` (as `uid` when given) and returns what the server said.
pub fn connect(ns: &Netns, to: &str, uid: Option<u32>) -> String {
    ask(ns, "connect", to, uid)
}

/// Sends one datagram from inside `ns` (as `uid` when given) and returns the answer, or
/// `error: ...` when sending or receiving failed (a datagram dropped in `OUTPUT` is
/// refused to the sender at once: "Operation not permitted").
pub fn send_udp(ns: &Netns, to: &str, uid: Option<u32>) -> String {
    ask(ns, "send-udp", to, uid)
}

/// Runs the client child `role` towards `to` inside `ns` (as `uid` when given) and returns
/// the answer it printed, or all it printed when there was none.
fn ask(ns: &Netns, role: &str, to: &str, uid: Option<u32>) -> String {
    let mut command = ns.child(role, &[to]);
    if let Some(uid) = uid {
        command.env(AS_UID, uid.to_string());
    }
    let out = command.output().unwrap();
    text(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("reply: ").or(l.strip_prefix("udp ")))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("no reply: {}{}", text(&out.stdout), text(&out.stderr)))
}

// ---------------------------------------------------------------------------------------
// The child process

/// The entry point of the child processes, selected by environment variables; each test
/// executable that uses [`Netns::child`] calls it from a `#[test]` named
/// `child_process_entry`. Without those variables it does nothing.
pub fn child_process_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let args: Vec<String> = std::env::var(ARGS)
        .unwrap_or_default()
        .split(SEP)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();

    // Run the same role again as another user or with another PATH (in the same
    // namespace: `ip` itself must not run with those).
    let uid = std::env::var(AS_UID).ok();
    let path = std::env::var_os(WITH_PATH);
    if uid.is_some() || path.is_some() {
        let mut again = Command::new(std::env::current_exe().unwrap());
        again
            .args(std::env::args().skip(1))
            .env_remove(AS_UID)
            .env_remove(WITH_PATH);
        if let Some(uid) = uid {
            let uid: u32 = uid.parse().unwrap();
            again.uid(uid).gid(uid);
        }
        if let Some(path) = path {
            again.env("PATH", path);
        }
        let status = again.status().unwrap();
        std::process::exit(status.code().unwrap_or(1));
    }

    match role.as_str() {
        "init" => {
            #[derive(Parser)]
            struct Cli {
                #[command(flatten)]
                args: InitArgs,
            }
            let cli = Cli::parse_from(std::iter::once("init".to_owned()).chain(args));
            std::io::stdout().flush().unwrap();
            // What `init::run` does, with the exit code `ExitCode` keeps opaque.
            let code = match trellis_proxy::init::execute(&cli.args, &mut std::io::stdout()) {
                Ok(()) => 0,
                Err(error) => {
                    eprintln!("error: {error}");
                    i32::from(error.exit_code())
                }
            };
            std::io::stdout().flush().unwrap();
            std::process::exit(code);
        }
        "serve" => serve_forever(args[0].parse().unwrap(), &args[1]),
        "serve-udp" => {
            let port: u16 = args[0].parse().unwrap();
            let socket = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port))).unwrap();
            println!("ready");
            std::io::stdout().flush().unwrap();
            let mut buf = [0u8; 512];
            loop {
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    let answer = format!("{} local={port}", args[1]);
                    let _ = socket.send_to(answer.as_bytes(), from);
                }
            }
        }
        "send-udp" => {
            let to: SocketAddr = args[0].parse().unwrap();
            let exchange = || -> std::io::Result<String> {
                let socket = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0)))?;
                socket.set_read_timeout(Some(Duration::from_secs(3)))?;
                socket.send_to(b"ping", to)?;
                let mut buf = [0u8; 512];
                let n = socket.recv(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
            };
            match exchange() {
                Ok(reply) => println!("reply: {}", reply.trim()),
                Err(e) => println!("udp error: {e}"),
            }
            std::process::exit(0);
        }
        "connect" => {
            let to: SocketAddr = args[0].parse().unwrap();
            match talk(to) {
                Ok(reply) => println!("reply: {}", reply.trim()),
                Err(e) => println!("error: {e}"),
            }
            std::process::exit(0);
        }
        other => panic!("unknown role {other}"),
    }
}

pub fn talk(to: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

pub fn serve_forever(port: u16, name: &str) -> ! {
    use socket2::{Domain, Socket, Type};
    let mut listeners = Vec::new();
    for (domain, addr) in [
        (Domain::IPV4, SocketAddr::from(([0, 0, 0, 0], port))),
        (Domain::IPV6, SocketAddr::from(([0u16; 8], port))),
    ] {
        let socket = Socket::new(domain, Type::STREAM, None).unwrap();
        if domain == Domain::IPV6 {
            socket.set_only_v6(true).unwrap();
        }
        socket.set_reuse_address(true).unwrap();
        // IPv6 may be off in the namespace: serve IPv4 alone then.
        if socket.bind(&addr.into()).is_err() && domain == Domain::IPV6 {
            continue;
        }
        socket.listen(64).unwrap();
        listeners.push((domain, std::net::TcpListener::from(socket)));
    }
    println!("ready");
    std::io::stdout().flush().unwrap();
    let name = name.to_owned();
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|(domain, listener)| {
            let name = name.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let sock = socket2::SockRef::from(&stream);
                    let orig = if domain == Domain::IPV4 {
                        sock.original_dst_v4()
                    } else {
                        sock.original_dst_v6()
                    };
                    let orig = orig
                        .ok()
                        .and_then(|a| a.as_socket())
                        .map_or("-".to_owned(), |a| a.to_string());
                    let local = stream
                        .local_addr()
                        .map_or("-".to_owned(), |a| a.to_string());
                    let _ = (&stream)
                        .write_all(format!("{name} local={local} orig={orig}\n").as_bytes());
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    std::process::exit(0);
}
