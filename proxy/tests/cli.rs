//! The `trellis-proxy` binary: invalid configuration exits 64 naming the
//! flag before any port is bound; a valid one binds, serves the admin
//! endpoints while it has no certificate, drains on SIGTERM, and logs at
//! the level `TRELLIS_LOG` sets. It raises its soft open-files limit to
//! the hard one before it binds.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");
const ID: &str = "spiffe://td.test/ns/a/sa/web";

/// The flags no sidecar starts without (an identity, a trust bundle and a
/// token file), then `extra`.
fn with_required<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--identity", ID];
    args.extend(common::sidecar::credential_flags());
    args.extend_from_slice(extra);
    args
}

fn proxy(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_clear()
        .output()
        .expect("run trellis-proxy")
}

#[test]
fn invalid_flags_exit_64_naming_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&["--inbound", "nope"], "--inbound"),
        (&["--app", "localhost"], "--app"),
        (&["--outbound", "1.2.3.4"], "--outbound"),
        (&["--admin", ":99999"], "--admin"),
        (&["--route", "127.0.0.1:9000=spiffe://td.test/x"], "--route"),
        (
            &["--route", "127.0.0.1:9000=not-an-id@127.0.0.1:1"],
            "--route",
        ),
        (
            &["--trust-bundle", "/nonexistent/bundle.pem"],
            "--trust-bundle",
        ),
        (&["--token-file", "/nonexistent/token"], "--token-file"),
        (&["--token-type", "password"], "--token-type"),
        (
            &[
                "--token-type",
                "service-account",
                "--token-file",
                "/nonexistent/token",
            ],
            "--token-file",
        ),
        (&["--drain-timeout", "soon"], "--drain-timeout"),
        (&["--log-format", "xml"], "--log-format"),
        (
            &["--close-denied-connections", "maybe"],
            "--close-denied-connections",
        ),
        (&["--advertise-address", "x"], "--advertise-address"),
        (&["--opaque-ports", "3306-3310"], "--opaque-ports"),
        (&["--control-plane", "nohost"], "--control-plane"),
        (&["--control-plane", "https://cp:15012"], "--control-plane"),
        (&["--control-plane", "::1:15012"], "--control-plane"),
        (&["--control-plane", "cp:15012/path"], "--control-plane"),
        (&["--no-such-flag"], "--no-such-flag"),
        // A plaintext listener off loopback would lend the identity.
        (
            &[
                "--route",
                "0.0.0.0:9000=spiffe://td.test/ns/b/sa/c@10.0.0.2:15006",
            ],
            "--allow-non-loopback-listeners",
        ),
        (
            &["--outbound", "0.0.0.0:15001"],
            "--allow-non-loopback-listeners",
        ),
    ];
    let [bundle_flag, bundle, token_flag, token] = common::sidecar::credential_flags();
    for (extra, flag) in cases {
        let mut args = vec!["--identity", ID];
        args.extend_from_slice(extra);
        // Valid credential files, unless the case is about one of them.
        if !extra.contains(&bundle_flag) {
            args.extend([bundle_flag, bundle]);
        }
        if !extra.contains(&token_flag) {
            args.extend([token_flag, token]);
        }
        let out = proxy(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{extra:?}: {stderr}");
        assert!(
            stderr.contains(flag),
            "{extra:?} should name {flag}: {stderr}"
        );
        assert!(stderr.starts_with("error: "), "{extra:?}: {stderr}");
        assert!(!stderr.contains("os error"), "{extra:?}: {stderr}");
    }
    // Without a trust bundle or a token the sidecar could never certify.
    for (args, flag) in [
        (["--identity", ID, token_flag, token], "--trust-bundle"),
        (["--identity", ID, bundle_flag, bundle], "--token-file"),
    ] {
        let out = proxy(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains("is required"),
            "{stderr}"
        );
    }
    let out = proxy(&["--identity", "http://td/x"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--identity"));
    let out = proxy(&[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--identity"));
    // Environment twins are checked the same way.
    let out = Command::new(BIN)
        .args(["--identity", ID])
        .env_clear()
        .env("TRELLIS_CLOSE_DENIED_CONNECTIONS", "maybe")
        .output()
        .expect("run trellis-proxy");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--close-denied-connections"));
}

/// A first start with no flags names every flag the sidecar cannot start
/// without, in one line, rather than one more at each run.
#[test]
fn a_start_without_flags_names_every_required_one_at_once() {
    let out = proxy(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: invalid --identity: is required: this workload's SPIFFE ID"),
        "{stderr}"
    );
    assert!(
        stderr.ends_with("; --trust-bundle and --token-file are missing too\n"),
        "{stderr}"
    );
    // One missing names itself alone.
    let out = proxy(&["--identity", ID, "--token-file", "/nonexistent"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.starts_with("error: invalid --trust-bundle: is required: the PEM roots")
            && !stderr.contains("missing too"),
        "{stderr}"
    );
}

/// Every duration flag reads its value as the control plane's and
/// `trellisctl`'s do: a bad one is refused naming the flag and what was
/// given, with examples.
#[test]
fn a_bad_duration_is_refused_in_the_words_of_every_binary() {
    for flag in ["--drain-timeout", "--drain-idle", "--tcp-user-timeout"] {
        for bad in ["soon", "20"] {
            let out = proxy(&with_required(&[flag, bad]));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{flag} {bad}: {stderr}");
            assert!(
                stderr.contains(&format!(
                    "invalid {flag}: \"{bad}\" is not a duration (such as 30s, 10m, 24h)"
                )),
                "{flag} {bad}: {stderr}"
            );
        }
    }
}

/// `trellis-proxy ARGS` with only the environment variables `env` set.
fn proxy_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run trellis-proxy")
}

/// A value refused from a flag's environment twin, by clap or by the
/// sidecar's own checks (init's too), names the variable, where the
/// operator must look, beside the flag; exit 64 as ever. Given on the
/// command line, the same value is said as the flag's, even with the
/// variable set to it.
#[test]
fn a_refused_environment_value_names_its_variable() {
    let with_required = with_required(&[]);
    let cases: [(&[&str], &str, &str, &str, &str); 6] = [
        // clap's refusals
        (
            &with_required,
            "TRELLIS_OPAQUE_PORTS",
            "5432,0",
            "error: invalid value '0' in TRELLIS_OPAQUE_PORTS (--opaque-ports): \"0\" is not a \
             port (1-65535)\n",
            "--opaque-ports",
        ),
        (
            &["init", "--dry-run"],
            "TRELLIS_BACKEND",
            "iptables",
            "error: invalid value 'iptables' in TRELLIS_BACKEND (--backend): possible values: \
             auto, nft, legacy\n",
            "--backend",
        ),
        // the sidecar's own checks
        (
            &with_required,
            "TRELLIS_DRAIN_TIMEOUT",
            "soon",
            "error: invalid value in TRELLIS_DRAIN_TIMEOUT (--drain-timeout): \"soon\" is not a \
             duration (such as 30s, 10m, 24h)\n",
            "--drain-timeout",
        ),
        (
            &with_required,
            "TRELLIS_INBOUND",
            "127.0.0.1:0,nope",
            "error: invalid value in TRELLIS_INBOUND (--inbound): ",
            "--inbound",
        ),
        (
            &["init", "--dry-run", "--exclude-outbound-dns"],
            "TRELLIS_RESOLV_CONF",
            "/nonexistent/resolv.conf",
            "error: invalid value in TRELLIS_RESOLV_CONF (--resolv-conf): \
             /nonexistent/resolv.conf: no such file or directory\n",
            "--resolv-conf",
        ),
        (
            &["init", "--dry-run"],
            "TRELLIS_INBOUND_PORT",
            "15001",
            "error: invalid flags: TRELLIS_INBOUND_PORT (--inbound-port) and --outbound-port are \
             both 15001\n",
            "--inbound-port",
        ),
    ];
    for (args, twin, value, says, flag) in cases {
        let out = proxy_with(args, &[(twin, value)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{twin}={value}: {stderr}");
        assert!(stderr.starts_with(says), "{twin}={value}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{twin}={value}: {stderr}");

        // On the command line: the flag's, the variable unnamed.
        let mut given = args.to_vec();
        given.extend([flag, value]);
        let out = proxy_with(&given, &[(twin, value)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains(flag) && !stderr.contains(twin),
            "{flag} {value}: {stderr}"
        );
    }
}

/// A refusal that names a second flag names that one's variable too when
/// its value came from there: the operator looking for `--drain-timeout`
/// on the command line would not find it. From argv, the flags alone.
#[test]
fn a_refusal_naming_another_flag_names_its_variable_too() {
    // The arguments, the environment, and what is said.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 3] = [
        (
            &["--drain-idle", "30s"],
            &[("TRELLIS_DRAIN_TIMEOUT", "10s")],
            "error: invalid --drain-idle: 30s is longer than TRELLIS_DRAIN_TIMEOUT \
             (--drain-timeout) 10s: every drain would last the whole timeout\n",
        ),
        (
            &[],
            &[
                ("TRELLIS_DRAIN_TIMEOUT", "10s"),
                ("TRELLIS_DRAIN_IDLE", "30s"),
            ],
            "error: invalid value in TRELLIS_DRAIN_IDLE (--drain-idle): 30s is longer than \
             TRELLIS_DRAIN_TIMEOUT (--drain-timeout) 10s: every drain would last the whole \
             timeout\n",
        ),
        (
            &["--drain-idle", "30s", "--drain-timeout", "10s"],
            &[],
            "error: invalid --drain-idle: 30s is longer than --drain-timeout 10s: every drain \
             would last the whole timeout\n",
        ),
    ];
    for (args, env, says) in cases {
        let out = proxy_with(&with_required(args), env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}: {stderr}");
        assert_eq!(stderr, says, "{args:?} {env:?}");
    }
}

/// The flags `--help` marks "(required)" are those the sidecar cannot
/// start without: given all the others, it exits 64 naming the one left
/// out.
#[test]
fn help_marks_each_flag_the_sidecar_cannot_start_without() {
    let out = proxy(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let [bundle_flag, bundle, token_flag, token] = common::sidecar::credential_flags();
    let required = [
        ("--identity", ID),
        (bundle_flag, bundle),
        (token_flag, token),
    ];
    for (flag, _) in required {
        // The flag's entry: its line and the lines of text below it, up to
        // the next flag's.
        let mut lines = help
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(flag));
        let first = lines.next().unwrap_or_else(|| panic!("{flag} in {help}"));
        let entry: Vec<&str> = std::iter::once(first)
            .chain(lines.take_while(|l| !l.trim_start().starts_with('-')))
            .collect();
        let entry = entry.join("\n");
        assert!(entry.contains("(required)"), "{entry}");
        let others: Vec<&str> = required
            .iter()
            .filter(|(f, _)| *f != flag)
            .flat_map(|(f, v)| [*f, *v])
            .collect();
        let out = proxy(&others);
        assert_eq!(out.status.code(), Some(64), "without {flag}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "without {flag}: {stderr}");
    }
}

#[test]
fn invalid_configuration_is_reported_before_binding() {
    // The admin port is taken: a bind would fail with exit 1, so exit 64
    // shows the configuration was refused before any bind.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = taken.local_addr().unwrap().to_string();
    let free = "127.0.0.1:0";
    let [bundle_flag, bundle, token_flag, token] = common::sidecar::credential_flags();
    let base = [
        "--identity",
        ID,
        "--inbound",
        free,
        "--outbound",
        free,
        "--admin",
        &admin,
        bundle_flag,
        bundle,
        token_flag,
        token,
    ];
    let mut bad = base.to_vec();
    bad.extend(["--route", "bad"]);
    assert_eq!(proxy(&bad).status.code(), Some(64));
    let out = proxy(&base);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("error: --admin"));
}

/// A listener address in use fails the start (exit 1) naming its flag
/// and address, said once as the last line on stderr in the OS's words,
/// as the control plane says it: not also logged, and without the OS's
/// error number.
#[test]
fn a_port_in_use_is_said_once_as_the_last_line_naming_its_flag() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let route = format!("{busy}=spiffe://td.test/ns/b/sa/api@127.0.0.1:1");
    for flag in ["--inbound", "--outbound", "--admin", "--route"] {
        let mut args = with_required(&common::sidecar::LOOPBACK_LISTENERS);
        match flag {
            "--route" => args.extend(["--route", &route]),
            _ => {
                let at = args.iter().position(|a| *a == flag).unwrap();
                args[at + 1] = &busy;
            }
        }
        let out = proxy(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {stderr}");
        assert_eq!(
            stderr.lines().last(),
            Some(format!("error: {flag} {busy}: address already in use").as_str()),
            "{flag}: {stderr}"
        );
        assert_eq!(stderr.matches(&busy).count(), 1, "{flag}: {stderr}");
        assert!(!stderr.contains("ERROR"), "{flag}: {stderr}");
        assert!(!stderr.contains("os error"), "{flag}: {stderr}");
    }
}

/// `trellis-proxy init` speaks as the sidecar does: a failure is one line,
/// `error: ...`, exiting 64 for invalid flags; a warning is
/// `warning: ...`. Neither is prefixed with the program's name.
#[test]
fn init_says_its_failure_and_warnings_as_the_sidecar_does() {
    let out = proxy(&["init", "--inbound-port", "15001"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert_eq!(
        stderr,
        "error: invalid flags: --inbound-port and --outbound-port are both 15001\n"
    );

    // A dry run changes nothing, and works where the nat table cannot be read.
    let out = proxy(&["init", "--proxy-uid", "0", "--ipv6", "off", "--dry-run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        ["warning: --proxy-uid 0 exempts everything running as root from the mesh"]
    );
}

/// A resolv.conf `init --exclude-outbound-dns` cannot use is refused as the
/// sidecar refuses its own files: one line naming the flag, the file and
/// what is wrong with it, in words (no `os error`), exit 64; nothing done.
#[test]
fn an_unusable_resolv_conf_is_refused_naming_the_flag_and_the_file() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let (latin1, search_only, secret) = (at("latin1.conf"), at("search.conf"), at("secret.conf"));
    std::fs::write(&latin1, b"nameserver 10.96.0.10\n# caf\xe9\n").unwrap();
    std::fs::write(&search_only, "search svc.cluster.local\n").unwrap();
    std::fs::write(&secret, "nameserver 10.96.0.10\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();
    let missing = at("missing.conf");
    let directory = dir.path().to_str().unwrap().to_owned();
    let cases = [
        (&missing, format!("{missing}: no such file or directory")),
        (&directory, format!("{directory}: is a directory")),
        (&secret, format!("{secret}: permission denied")),
        (&latin1, format!("{latin1} line 2 is not UTF-8 text")),
        (
            &search_only,
            format!(
                "{search_only} names no nameserver, so --exclude-outbound-dns could not let DNS \
                 past the sidecar"
            ),
        ),
    ];
    for (path, why) in cases {
        let mut init = Command::new(BIN);
        init.args([
            "init",
            "--exclude-outbound-dns",
            "--dry-run",
            "--resolv-conf",
            path,
        ])
        .env_clear();
        if path == &secret && common::machine::is_root() {
            // Root reads any file: the sidecar's user reads it here.
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            init.uid(65534).gid(65534);
        }
        let out = init.output().expect("run trellis-proxy init");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr, format!("error: invalid --resolv-conf: {why}\n"));
        assert_eq!(out.status.code(), Some(64), "{path}: {stderr}");
        assert!(out.stdout.is_empty(), "{path}: rules written");
    }
}

/// `trellis-proxy init --dry-run | head -1`: the reader of the rules goes
/// away after their first line. init ends as `ls` does in a shell, and as
/// `trellisctl` does: exit 141, no error said.
#[test]
fn a_dry_run_into_a_pipe_closed_early_ends_quietly() {
    // More rules than a pipe holds (64 KiB): init is still writing when
    // the reader goes away.
    let cidrs: Vec<String> = (0..4000)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
        .collect();
    let mut child = Command::new(BIN)
        .args([
            "init",
            "--dry-run",
            "--ipv6",
            "off",
            "--exclude-outbound-cidrs",
        ])
        .arg(cidrs.join(","))
        .env_clear()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run trellis-proxy init");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with('#'), "{first:?}");
    // Dropped here: the pipe's read end closes.
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr, "", "said on stderr");
    assert_eq!(output.status.code(), Some(141), "{stderr}");
}

/// Reads the child's stderr lines on a thread.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Every line up to and including the first containing `needle`.
fn lines_until(rx: &mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return seen;
                }
            }
            Err(_) => panic!("no log line containing {needle:?}"),
        }
    }
}

fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str) -> String {
    lines_until(rx, needle).pop().expect("the line found")
}

fn field(line: &str, name: &str) -> String {
    let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
    line[start..].split_whitespace().next().unwrap().to_string()
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the proxy did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A sidecar whose control plane does not answer (Certify fails and is
/// retried), with `env` as its whole environment; its stderr piped.
struct Unanswered {
    process: common::Running,
    _dir: tempfile::TempDir,
    /// Holds the control plane's port, so no listener of a test running
    /// beside this one is given it.
    _control_plane: socket2::Socket,
}

fn start_unanswered(env: &[(&str, &str)]) -> Unanswered {
    start_unanswered_under(&[], env)
}

/// [`start_unanswered`], the sidecar started by `wrapper` (a program and
/// its arguments, which executes the command line that follows them) when
/// it is not empty.
fn start_unanswered_under(wrapper: &[&str], env: &[(&str, &str)]) -> Unanswered {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, common::Ca::new().root_pem()).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "  secret-join-token\n").unwrap();
    // Nothing listens there: a socket bound to the port and never
    // listening holds it, and a connection to it is refused.
    let held = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    held.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let control_plane = held.local_addr().unwrap().as_socket().unwrap();
    let mut command = match wrapper {
        [] => Command::new(BIN),
        [program, args @ ..] => {
            let mut command = Command::new(program);
            command.args(args).arg(BIN);
            command
        }
    };
    let child = command
        .args(["--identity", ID])
        .args(common::sidecar::LOOPBACK_LISTENERS)
        .args(["--drain-timeout", "5s"])
        .args([
            "--route",
            &format!("127.0.0.1:0=spiffe://td.test/ns/b/sa/api@{control_plane}"),
        ])
        .arg("--control-plane")
        .arg(control_plane.to_string())
        .arg("--trust-bundle")
        .arg(&bundle)
        .arg("--token-file")
        .arg(&token)
        .env_clear()
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Unanswered {
        process: common::Running(child),
        _dir: dir,
        _control_plane: held,
    }
}

#[test]
fn serves_admin_without_a_certificate_and_drains_on_sigterm() {
    let mut sidecar = start_unanswered(&[]);
    let child = &mut sidecar.process.0;
    let rx = lines(child);
    let listening = wait_for_line(&rx, "listening");
    let admin: SocketAddr = field(&listening, "admin").parse().unwrap();
    let failed = wait_for_line(&rx, "certify failed");
    assert!(failed.contains("nothing listens there"), "{failed}");

    assert_eq!(get(admin, "/live").0, 200);
    let (status, body) = get(admin, "/ready");
    assert_eq!(status, 503);
    assert!(body.contains("no certificate yet"), "{body}");
    let (_, metrics) = get(admin, "/metrics");
    assert!(
        metrics.contains(
            "trellis_certificate_renewals_total{outcome=\"error\",reason=\"unreachable\"} "
        ),
        "{metrics}"
    );
    let (status, config) = get(admin, "/config");
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["identity"], ID);
    assert_eq!(
        config["routes"][0]["spiffe_id"],
        "spiffe://td.test/ns/b/sa/api"
    );
    assert!(!config.to_string().contains("secret-join-token"));

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert_eq!(wait_exit(child).code(), Some(0));
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(rest.iter().all(|l| !l.contains("secret-join-token")));
}

#[test]
fn trellis_log_sets_the_level_and_a_bad_filter_is_reported() {
    // At warn, the info line "listening" is left out; the retried Certify
    // (a warning) is not.
    let mut quiet = start_unanswered(&[("TRELLIS_LOG", "warn")]);
    let rx = lines(&mut quiet.process.0);
    let seen = lines_until(&rx, "certify failed");
    assert!(
        seen.iter().all(|l| !l.contains("listening")),
        "an info line at TRELLIS_LOG=warn: {seen:#?}"
    );

    // A filter that cannot be read is named, and the sidecar logs at info.
    let mut bad = start_unanswered(&[("TRELLIS_LOG", "trellis_proxy=loud")]);
    let rx = lines(&mut bad.process.0);
    let warning = wait_for_line(&rx, "TRELLIS_LOG is not a log filter");
    assert!(warning.contains("trellis_proxy=loud"), "{warning}");
    wait_for_line(&rx, "listening");
}

/// With `--log-format json` each line on stderr is one flat object a log
/// pipeline can index: `timestamp`, `level`, `target`, `message` and every
/// field at the top level, numbers as numbers and a list as one plain
/// string.
#[test]
fn json_log_lines_are_flat_objects() {
    let mut sidecar = start_unanswered(&[("TRELLIS_LOG_FORMAT", "json")]);
    let rx = lines(&mut sidecar.process.0);
    let objects: Vec<serde_json::Map<String, serde_json::Value>> =
        lines_until(&rx, "certify failed")
            .iter()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"))
            })
            .collect();
    for object in &objects {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(object[key].is_string(), "no top-level {key}: {object:?}");
        }
        assert!(!object.contains_key("fields"), "nested fields: {object:?}");
    }
    let find = |message: &str| {
        objects
            .iter()
            .find(|o| o["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} in {objects:#?}"))
    };

    let raised = find("open-files limit raised to the hard limit");
    assert_eq!(raised["level"], "INFO");
    assert!(
        raised["open_files"].as_u64().is_some_and(|n| n > 0),
        "{raised:?}"
    );

    let listening = find("listening");
    assert_eq!(listening["identity"], ID);
    // The one --route, by the address it was bound to.
    let routes = listening["routes"].as_str().expect("routes as a string");
    let route: SocketAddr = routes
        .parse()
        .unwrap_or_else(|e| panic!("routes {routes:?}: {e}"));
    assert_ne!(route.port(), 0, "{routes}");

    let failed = find("certify failed");
    assert_eq!(failed["level"], "WARN");
    assert!(failed["error"].is_string(), "{failed:?}");
}

/// The soft and hard open-files limits of process `pid`, as
/// `/proc/PID/limits` shows them.
fn open_files_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open-files line in:\n{limits}"));
    let mut values = line["Max open files".len()..].split_whitespace();
    let soft = values.next().unwrap().to_string();
    let hard = values.next().unwrap().to_string();
    (soft, hard)
}

/// Started with a soft limit of 256 under a hard one of 8,192 (what a
/// container runtime's 1,024 stands for here), the sidecar raises the soft
/// limit to the hard one before it binds, and says so.
#[test]
fn raises_the_open_files_limit_to_the_hard_limit() {
    let prlimit = Command::new("prlimit").arg("--version").output();
    if !prlimit.is_ok_and(|o| o.status.success()) {
        common::machine::skip("skipped: util-linux prlimit not installed");
        return;
    }
    let mut sidecar = start_unanswered_under(&["prlimit", "--nofile=256:8192"], &[]);
    let child = &mut sidecar.process.0;
    let rx = lines(child);
    let seen = lines_until(&rx, "listening");
    // prlimit executes the sidecar in its own process: the child is it.
    assert_eq!(
        open_files_limits(child.id()),
        ("8192".to_string(), "8192".to_string()),
        "the soft limit was not raised to the hard one"
    );
    let raised = seen
        .iter()
        .find(|l| l.contains("open-files limit raised"))
        .unwrap_or_else(|| {
            panic!("no line about the open-files limit before listening: {seen:#?}")
        });
    assert_eq!(field(raised, "open_files"), "8192", "{raised}");
}
