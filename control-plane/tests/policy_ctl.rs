//! `trellisctl policy` against the real control plane, and `policy lint`
//! offline, over the fixture files in `tests/fixtures/policies`.

mod common;

use std::path::PathBuf;

use common::policy::{API, WEB};
use common::*;
use trellis_control_plane::api::admin::MAX_ADMIN_REQUEST_BYTES;
use trellis_control_plane::ctl::policy::STDIN;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/policies")
}

/// `trellisctl policy lint` with `args`: offline, no --control-plane or
/// credentials needed.
fn lint(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(CTL)
        .args(["policy", "lint"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn lint_reports_exit_codes_and_lines() {
    let cp = ControlPlane::start(&[]);
    let lints = fixtures().join("lint");
    let good = lint(&[lints.join("good").as_os_str()]);
    assert_eq!(
        good.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&good.stdout)
    );
    assert!(good.stdout.is_empty());

    let all = lint(&[lints.as_os_str(), "-R".as_ref()]);
    assert_eq!(all.status.code(), Some(1));
    let stdout = String::from_utf8(all.stdout).unwrap();
    let lines: Vec<String> = stdout
        .lines()
        .map(|l| l.replace(&lints.display().to_string(), "LINT"))
        .collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines[0].starts_with(
            "LINT/bad/bad-spiffe-id.yaml:12:21: spec.rules[0].from[0].spiffeId: invalid SPIFFE ID"
        ),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with(
            "LINT/bad/port-out-of-range.yaml:27:25: spec.rules[0].to[0].ports[1]: port 70000"
        ),
        "{lines:?}"
    );
    assert!(
        lines[2].starts_with("LINT/bad/unknown-field.yaml:10:3: spec.rulez: unknown field"),
        "{lines:?}"
    );
    assert!(String::from_utf8_lossy(&all.stderr).contains("3 errors"));

    let missing = lint(&[lints.join("missing.yaml").as_os_str()]);
    assert_eq!(missing.status.code(), Some(1));

    // Files without a document: refused as `policy apply` refuses them.
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "# nothing yet\n").unwrap();
    let no_documents =
        "no AuthorizationPolicy or RateLimitPolicy documents found in the given files";
    let linted = lint(&[empty.as_os_str()]);
    let stderr = String::from_utf8_lossy(&linted.stderr);
    assert_eq!(linted.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains(no_documents), "{stderr}");
    let applied = cp.ctl(&["policy", "apply", "-f", empty.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&applied.stderr);
    assert_eq!(applied.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains(no_documents), "{stderr}");

    let other_td = lint(&[
        lints.join("good").as_os_str(),
        "--trust-domain".as_ref(),
        "example.org".as_ref(),
    ]);
    assert_eq!(
        other_td.status.code(),
        Some(1),
        "IDs of another trust domain"
    );
    drop(cp);
}

/// A file of several documents, two of them not YAML we read: lint names
/// each of those by file, document number, line and column, and still
/// checks the others, listing their diagnostics too, in one run (exit 1).
/// `apply` of that file lists the same and applies nothing.
#[test]
fn lint_reports_every_document_that_does_not_parse() {
    let cp = ControlPlane::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("team.yaml");
    let unclosed = policy_text("unclosed", 80).replace("namespace: default}", "namespace: default");
    let duplicate =
        policy_text("duplicate", 80).replace("action: ALLOW", "action: ALLOW\n  action: DENY");
    let text = [
        unclosed,
        policy_text("wide", 70000),
        duplicate,
        policy_text("fine", 80),
    ]
    .join("---\n");
    std::fs::write(&file, &text).unwrap();
    let name = file.display().to_string();

    let linted = lint(&[file.as_os_str()]);
    let stdout = String::from_utf8(linted.stdout).unwrap();
    let stderr = String::from_utf8(linted.stderr).unwrap();
    assert_eq!(linted.status.code(), Some(1), "{stdout}{stderr}");
    let expected = [
        format!(
            "{name}:4:5: document 1: YAML syntax error: while parsing a flow mapping, did not \
             find expected ',' or '}}'"
        ),
        format!("{name}:15:26: spec.rules[0].to[0].ports[0]: port 70000 is out of range 1..=65535"),
        format!("{name}:23:3: document 3: duplicate key \"action\""),
    ];
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected, "{stdout}");
    assert_eq!(stderr, "3 errors, 0 warnings\n");

    let applied = cp.ctl(&["policy", "apply", "-f", &name]);
    assert_eq!(applied.status.code(), Some(1));
    let expected = format!(
        "{}nothing applied: fix the errors above\n",
        expected.map(|l| l + "\n").concat()
    );
    assert_eq!(String::from_utf8_lossy(&applied.stderr), expected);
    assert!(applied.stdout.is_empty());
    let listed = cp.ctl(&["policy", "list", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["policies"], serde_json::json!([]));
}

/// `policy lint` reads files only: its help lists none of the flags that
/// name the control plane or the operator credential, and one given, before
/// or after its name, is refused naming it; their environment variables,
/// which an operator's shell may export, are ignored. The subcommands that
/// talk to the control plane keep them all.
#[test]
fn lint_takes_no_control_plane_or_credential_flags() {
    let good = fixtures().join("lint").join("good");
    let flags = ["--control-plane", "--state-dir", "--ca", "--cert", "--key"];
    let help = lint(&["--help".as_ref()]);
    assert_eq!(help.status.code(), Some(0));
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("--trust-domain"), "{help}");
    for flag in flags {
        assert!(!help.contains(flag), "{flag} in {help}");
    }
    let run = |args: &[&str]| {
        std::process::Command::new(CTL)
            .args(args)
            .arg(&good)
            .env("TRELLIS_STATE_DIR", "/nonexistent")
            .env("TRELLIS_CERT", "/nonexistent/admin.crt")
            .output()
            .unwrap()
    };
    for args in [
        &["policy", "lint", "--cert", "x"][..],
        &["policy", "lint", "--cert=x"],
        &["--cert", "x", "policy", "lint"],
        &["policy", "--cert", "x", "lint"],
    ] {
        let refused = run(args);
        assert_eq!(refused.status.code(), Some(64), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&refused.stderr),
            "error: --cert: policy lint reads files only and never connects to a control \
             plane: it takes no --control-plane, --state-dir, --ca, --cert or --key\n",
            "{args:?}"
        );
        assert!(refused.stdout.is_empty(), "{args:?}");
    }
    for flag in flags {
        let refused = run(&["policy", "lint", flag, "127.0.0.1:1"]);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(64), "{flag}: {stderr}");
        assert!(stderr.starts_with(&format!("error: {flag}: ")), "{stderr}");
    }
    let linted = run(&["policy", "lint"]);
    let stderr = String::from_utf8_lossy(&linted.stderr);
    assert_eq!(linted.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "0 errors, 0 warnings\n");

    for command in [
        &["policy", "list"][..],
        &["workloads"],
        &["token", "create"],
    ] {
        let out = std::process::Command::new(CTL)
            .args(command)
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8(out.stdout).unwrap();
        for flag in flags {
            assert!(help.contains(&format!("{flag} <")), "{flag} not in {help}");
        }
        assert!(help.contains("[env: TRELLIS_CERT="), "{help}");
    }
    // Still taken after the subcommand's name, and read from the
    // environment.
    let out = std::process::Command::new(CTL)
        .args(["policy", "list", "--state-dir", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: cannot read /nonexistent/bundle.pem: no such file or directory: --state-dir names no \
         control plane's state dir: give the one the control plane was started with, where it \
         writes bundle.pem, admin.crt and admin.key\n"
    );
    let out = std::process::Command::new(CTL)
        .args(["policy", "list"])
        .env("TRELLIS_STATE_DIR", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: cannot read /nonexistent/bundle.pem: no such file or directory: TRELLIS_STATE_DIR (--state-dir) names no \
         control plane's state dir: give the one the control plane was started with, where it \
         writes bundle.pem, admin.crt and admin.key\n"
    );
}

/// The environment variables of the flags `policy lint` does not take
/// may hold anything, values those flags would refuse included (an
/// operator's shell may export a stale one): lint reports as without them.
/// The subcommands that read them refuse such a value naming the variable,
/// unless its flag is given.
#[test]
fn lint_ignores_connection_variables_whatever_they_hold() {
    let lints = fixtures().join("lint");
    let bad = [
        ("TRELLIS_CONTROL_PLANE", "foo"),
        ("TRELLIS_STATE_DIR", ""),
        ("TRELLIS_CA", ""),
        ("TRELLIS_CERT", ""),
        ("TRELLIS_KEY", ""),
    ];
    for paths in [vec![lints.join("good")], vec![lints.clone(), "-R".into()]] {
        let plain = lint(&paths.iter().map(|p| p.as_os_str()).collect::<Vec<_>>());
        for (name, value) in [bad[0], ("TRELLIS_CONTROL_PLANE", "")]
            .into_iter()
            .chain(bad)
        {
            let linted = std::process::Command::new(CTL)
                .args(["policy", "lint"])
                .args(&paths)
                .env(name, value)
                .output()
                .unwrap();
            assert_eq!(
                linted.status.code(),
                plain.status.code(),
                "{name}={value:?}"
            );
            assert_eq!(
                String::from_utf8_lossy(&linted.stderr),
                String::from_utf8_lossy(&plain.stderr),
                "{name}={value:?}"
            );
            assert_eq!(linted.stdout, plain.stdout, "{name}={value:?}");
        }
        let all_bad = std::process::Command::new(CTL)
            .args(["policy", "lint"])
            .args(&paths)
            .envs(bad)
            .output()
            .unwrap();
        assert_eq!(all_bad.status.code(), plain.status.code());
        assert_eq!(all_bad.stdout, plain.stdout);
    }

    let remote = |args: &[&str], env: (&str, &str)| {
        let out = std::process::Command::new(CTL)
            .args(args)
            .env(env.0, env.1)
            .output()
            .unwrap();
        assert!(out.stdout.is_empty());
        (out.status.code(), String::from_utf8(out.stderr).unwrap())
    };
    assert_eq!(
        remote(&["policy", "list"], ("TRELLIS_CONTROL_PLANE", "foo")),
        (
            Some(64),
            "error: invalid value 'foo' in TRELLIS_CONTROL_PLANE (--control-plane): expected \
             host:port\n"
                .to_owned()
        )
    );
    for (name, flag) in [
        ("TRELLIS_STATE_DIR", "--state-dir"),
        ("TRELLIS_CA", "--ca"),
        ("TRELLIS_CERT", "--cert"),
        ("TRELLIS_KEY", "--key"),
    ] {
        assert_eq!(
            remote(&["workloads"], (name, "")),
            (
                Some(64),
                format!(
                    "error: {name} ({flag}) is set but empty: set it to a value for {flag}, or \
                     unset it\n"
                )
            )
        );
    }
    // The flag given, its variable is not read.
    let unreadable = "error: cannot read /nonexistent/bundle.pem: no such file or directory: --state-dir names no \
         control plane's state dir: give the one the control plane was started with, where it \
         writes bundle.pem, admin.crt and admin.key\n";
    for args in [
        &["--control-plane", "127.0.0.1:1", "policy", "list"][..],
        &["policy", "list", "--control-plane", "127.0.0.1:1"],
    ] {
        let args = [args, &["--state-dir", "/nonexistent"]].concat();
        assert_eq!(
            remote(&args, ("TRELLIS_CONTROL_PLANE", "foo")),
            (Some(1), unreadable.to_owned())
        );
    }
    let files = [
        "--ca",
        "/nonexistent/ca.pem",
        "--cert",
        "/nonexistent/c.pem",
        "--key",
    ];
    assert_eq!(
        remote(
            &[&["policy", "list"], &files[..], &["/nonexistent/k.pem"]].concat(),
            ("TRELLIS_CA", "")
        ),
        (
            Some(1),
            "error: cannot read /nonexistent/ca.pem: no such file or directory\n".to_owned()
        )
    );
}

#[test]
fn ctl_applies_files_all_or_nothing_and_explains() {
    let cp = ControlPlane::start(&[]);
    let lint = fixtures().join("lint");
    let out = cp.ctl(&[
        "policy",
        "apply",
        "-f",
        lint.join("good").to_str().unwrap(),
        "-f",
        lint.join("bad/port-out-of-range.yaml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("port-out-of-range.yaml:27:25: spec.rules[0].to[0].ports[1]"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing applied"), "{stderr}");
    let out = cp.ctl(&["policy", "list", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["policies"], serde_json::json!([]));

    let out = cp.ctl(&[
        "policy",
        "apply",
        "--dry-run",
        "-f",
        lint.join("good").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("default/web-to-api: would be created"),
        "{stdout}"
    );
    assert!(stdout.contains("dry run"), "{stdout}");

    let out = cp.ctl(&["policy", "apply", "-f", lint.join("good").to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    for key in [
        "data/audit-db",
        "default/web-to-api",
        "default/deny-untrusted",
    ] {
        assert!(stdout.contains(&format!("{key}: created")), "{stdout}");
    }

    let out = cp.ctl(&["policy", "get", "default/web-to-api"]);
    assert!(out.status.success());
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(yaml.starts_with("# revision 1\n"), "{yaml}");
    assert!(yaml.contains("kind: AuthorizationPolicy"), "{yaml}");
    // What `get` prints applies again, unchanged.
    let file = cp.tmp.path().join("got.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let out = cp.ctl(&["policy", "apply", "-f", file.to_str().unwrap()]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("default/web-to-api: unchanged (revision 1)"),
        "{stdout}"
    );

    let out = cp.ctl(&["policy", "list"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(table.contains("default/deny-untrusted"), "{table}");

    let out = cp.ctl(&[
        "policy",
        "explain",
        "--from",
        "spiffe://cluster.local/ns/monitoring/sa/prom",
        "--to",
        API,
        "--port",
        "8080",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trace = String::from_utf8(out.stdout).unwrap();
    assert!(
        trace.contains("decided by default/web-to-api rule 0"),
        "{trace}"
    );
    assert!(!trace.contains("is opaque"), "{trace}");

    // A delete says its snapshot version as an apply does, with the epoch
    // it was set in, as `check` says the one served.
    let out = cp.ctl(&["policy", "delete", "default/web-to-api"]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let deleted = stdout
        .lines()
        .find_map(|l| l.strip_prefix("snapshot version "))
        .unwrap_or_else(|| panic!("no snapshot version in {stdout}"));
    let (_, epoch) = deleted.split_once('@').expect("version@epoch");
    assert_eq!(epoch.len(), 16, "{deleted}");
    let check = String::from_utf8(cp.ctl(&["check"]).stdout).unwrap();
    assert!(
        check.contains(&format!("serving snapshot {deleted}\n")),
        "{deleted}: {check}"
    );
    let out = cp.ctl(&["policy", "apply", "-f", file.to_str().unwrap()]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let applied = stdout
        .lines()
        .find_map(|l| l.split_once(", snapshot version ").map(|(_, v)| v))
        .unwrap_or_else(|| panic!("no snapshot version in {stdout}"));
    assert!(
        applied.ends_with(&format!("@{epoch}")),
        "{applied}: {stdout}"
    );
    cp.ctl(&["policy", "delete", "default/web-to-api"]);

    let out = cp.ctl(&["policy", "delete", "default/web-to-api"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: not found: policy default/web-to-api not found\n"
    );
    let out = cp.ctl(&["policy", "get", "no-slash"]);
    assert_eq!(out.status.code(), Some(64));
}

/// A policy with `name` in `namespace`, selecting `WEB`; a bad document
/// when `port` is not a port.
/// A policy file too large for one ApplyPolicy request (a valid policy
/// padded with a comment past the control plane's limit) is refused with
/// the limit in words, exit 1, and nothing applied.
#[test]
fn apply_of_a_file_past_the_request_limit_says_the_limit() {
    let cp = ControlPlane::start(&[]);
    let file = cp.tmp.path().join("huge.yaml");
    let mut text = policy_text("web-in", 8080);
    text.push('#');
    text.push_str(&"x".repeat(MAX_ADMIN_REQUEST_BYTES));
    text.push('\n');
    std::fs::write(&file, text).unwrap();

    let out = cp.ctl(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        format!(
            "error: resource exhausted: an ApplyPolicy request may be at most \
             {MAX_ADMIN_REQUEST_BYTES} bytes; this one is larger\n"
        )
    );
    let out = cp.ctl(&["policy", "list", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["policies"], serde_json::json!([]));
}

/// A refusal only the control plane finds (a selector outside the
/// policy's namespace) names the file and line it is at, whatever line
/// ends the files read before it use: YAML reads a CR alone as a line end.
#[test]
fn apply_names_the_line_after_a_file_with_carriage_return_line_ends() {
    let cp = ControlPlane::start(&[]);
    let dir = cp.tmp.path().join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    let old_mac =
        format!("# saved with CR line ends\r{}", policy_text("a", 80)).replace('\n', "\r");
    std::fs::write(dir.join("a.yaml"), old_mac).unwrap();
    std::fs::write(dir.join("b.yaml"), policy_text("b", 80)).unwrap();
    let outside = policy_text("c", 80).replace("ns/default/sa/web", "ns/other/sa/web");
    std::fs::write(dir.join("c.yaml"), outside).unwrap();

    let out = cp.ctl(&["policy", "apply", "-f", dir.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let at = format!(
        "{}:5:26: spec.selector.spiffeIds[0]: ",
        dir.join("c.yaml").display()
    );
    assert!(stderr.starts_with(&at), "{at} in {stderr}");
    let out = cp.ctl(&["policy", "list", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["policies"], serde_json::json!([]));
}

fn policy_text(name: &str, port: u32) -> String {
    format!(
        "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{spiffeIds: [\"{WEB}\"]}}
  action: ALLOW
  rules: [{{to: [{{ports: [{port}]}}]}}]
"
    )
}

/// `-f DIR` (and `lint DIR`) reads the directory's own `*.yaml`, `*.yml`
/// and `*.json` files, not hidden ones, as kubectl does; `-R` its
/// subdirectories' too, in sorted order, never following a symbolic link
/// into a directory (a link loop ends). A directory with none is a usage
/// error naming it, before any credential is read.
#[test]
fn a_directory_is_read_as_kubectl_reads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let top = tmp.path().join("policies");
    let write = |path: &str, text: &str| {
        let path = top.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("a.yaml", &policy_text("a", 80));
    // Never read: not a policy file's name, or hidden.
    write("notes.txt", "not: [yaml");
    write(".draft.yaml", "not: [yaml");
    write(".git/config.yaml", "not: [yaml");
    // Read with -R only.
    write("team/z/z.yml", &policy_text("z", 70000));
    write("team/deeper/b.json", &policy_text("b", 70001));
    std::os::unix::fs::symlink("..", top.join("team/loop")).unwrap();

    let own = lint(&[top.as_os_str()]);
    assert_eq!(own.status.code(), Some(0), "{own:?}");
    assert_eq!(
        String::from_utf8_lossy(&own.stderr),
        "0 errors, 0 warnings\n"
    );

    let all = lint(&[top.as_os_str(), "-R".as_ref()]);
    assert_eq!(all.status.code(), Some(1), "{all:?}");
    let stdout = String::from_utf8(all.stdout).unwrap();
    let files: Vec<&str> = stdout
        .lines()
        .map(|l| l.split(':').next().unwrap())
        .collect();
    let team = top.join("team");
    assert_eq!(
        files,
        [
            team.join("deeper/b.json").display().to_string(),
            team.join("z/z.yml").display().to_string()
        ],
        "{stdout}"
    );

    // The subdirectory alone holds no file of its own.
    let empty = lint(&[team.as_os_str()]);
    let stderr = String::from_utf8_lossy(&empty.stderr);
    assert_eq!(empty.status.code(), Some(64), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "error: {}: no policy file (*.yaml, *.yml, *.json, not hidden) in it \
             (-R reads its subdirectories too)\n",
            team.display()
        )
    );
    write("drafts/.wip.yaml", &policy_text("wip", 80));
    write("drafts/.old/x.yaml", &policy_text("x", 80));
    let hidden_only = top.join("drafts");
    let empty = lint(&[hidden_only.as_os_str(), "--recursive".as_ref()]);
    let stderr = String::from_utf8_lossy(&empty.stderr);
    assert_eq!(empty.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.ends_with(" in it or its subdirectories\n"),
        "{stderr}"
    );
    // `apply` refuses it alike, before reading any credential.
    let out = std::process::Command::new(CTL)
        .args(["--state-dir", "/nonexistent", "policy", "apply", "-f"])
        .arg(&team)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("(-R reads its subdirectories too)"),
        "{stderr}"
    );
    assert!(!stderr.contains("/nonexistent"), "{stderr}");

    // `apply -f DIR` applies the directory's own files; `-R` the rest.
    write("team/z/z.yml", &policy_text("z", 81));
    write("team/deeper/b.json", &policy_text("b", 82));
    let cp = ControlPlane::start(&[]);
    let top_arg = top.to_str().unwrap();
    let out = cp.ctl(&["policy", "apply", "-f", top_arg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.starts_with("AuthorizationPolicy default/a: created"),
        "{stdout}"
    );
    assert_eq!(stdout.matches(": created").count(), 1, "{stdout}");
    let out = cp.ctl(&["policy", "apply", "-R", "-f", top_arg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let outcomes: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split(" (").next())
        .filter(|l| l.starts_with("AuthorizationPolicy"))
        .collect();
    assert_eq!(
        outcomes,
        [
            "AuthorizationPolicy default/a: unchanged",
            "AuthorizationPolicy default/b: created",
            "AuthorizationPolicy default/z: created",
        ],
        "{stdout}"
    );
}

/// Applies `default/no-admin`, which denies `WEB` the path `/admin` of
/// `API` on every port.
fn deny_admin(cp: &ControlPlane) {
    let deny = cp.tmp.path().join("no-admin.yaml");
    let document = common::policy::allow("no-admin", API, WEB, 8080)
        .replace("ALLOW", "DENY")
        .replace("- ports: [8080]", "- paths: [/admin]");
    std::fs::write(&deny, document).unwrap();
    let out = cp.ctl(&["policy", "apply", "-f", deny.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `trellisctl policy explain` prints for a connection from `from` to
/// `to` on port 8080, with `extra` flags; it must succeed.
fn explained(cp: &ControlPlane, from: &str, to: &str, extra: &[&str]) -> String {
    let args = [
        "policy", "explain", "--from", from, "--to", to, "--port", "8080",
    ];
    let out = cp.ctl(&[&args[..], &with_host(extra)].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `extra` flags of `policy explain`, with `--header 'Host: api'` when they
/// name an HTTP/1.1 request in origin form without a `Host`, as every
/// HTTP/1.1 client sends one (the sidecar refuses a request without).
fn with_host<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = extra.to_vec();
    let origin_form = (extra.windows(2))
        .any(|w| w[0] == "--path" && !w[1].starts_with("http://") && !w[1].starts_with("HTTP"));
    let named = extra
        .iter()
        .any(|a| a.to_ascii_lowercase().starts_with("host:"));
    if origin_form && !named && !extra.contains(&"--http2") {
        args.extend(["--header", "Host: api"]);
    }
    args
}

/// `policy explain --opaque-ports` explains a destination whose sidecar
/// is not connected now as if it declared those ports opaque: an L7 DENY
/// denies the whole connection on them, and the trace says the port is
/// opaque because the request named it. A number that is not a port is a
/// usage error naming the flag, before any call.
#[test]
fn explain_takes_the_opaque_ports_of_a_sidecar_not_connected() {
    let cp = ControlPlane::start(&[]);
    deny_admin(&cp);
    let explain = |extra: &[&str]| {
        let args = [
            "policy", "explain", "--from", WEB, "--to", API, "--port", "5432",
        ];
        cp.ctl(&[&args[..], extra].concat())
    };

    let parsed = explain(&[]);
    let trace = String::from_utf8(parsed.stdout).unwrap();
    assert!(
        trace.contains("no rule decided: mesh default deny"),
        "{trace}"
    );
    assert!(!trace.contains("is opaque"), "{trace}");

    let out = explain(&["--opaque-ports", "6379,5432"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trace = String::from_utf8(out.stdout).unwrap();
    assert!(
        trace.contains("decided by default/no-admin rule 0"),
        "{trace}"
    );
    assert!(
        trace.contains("port 5432 is opaque (never parsed as HTTP): named in the request"),
        "{trace}"
    );
    let out = explain(&["--opaque-ports", "5432", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["verdict"], "deny", "{json}");
    assert_eq!(json["opaque"]["requested"], true, "{json}");
    assert_eq!(json["opaque"]["mesh"], false, "{json}");

    for bad in ["0", "70000"] {
        let out = explain(&["--opaque-ports", &format!("5432,{bad}")]);
        assert_eq!(out.status.code(), Some(64), "{bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--opaque-ports")
                && stderr.contains(&format!("\"{bad}\" is not a port (1-65535)")),
            "{stderr}"
        );
    }
}

/// A policy's `ports` are the app's ports, never the sidecar's own: `policy
/// explain --port` of one of those explains as asked (exit 0) but warns on
/// stderr which port of the sidecar it is, and `policy lint` warns of a
/// rule naming one at its line (exit 0: a warning refuses nothing). The
/// app's port gets no warning.
#[test]
fn explain_and_lint_warn_of_the_sidecars_own_ports() {
    use trellis_core::policy::{SIDECAR_ADMIN_PORT, SIDECAR_INBOUND_PORT, SIDECAR_OUTBOUND_PORT};
    let cp = ControlPlane::start(&[]);
    let explain = |port: u16| {
        let port = port.to_string();
        let args = [
            "policy", "explain", "--from", WEB, "--to", API, "--port", &port,
        ];
        let out = cp.ctl(&args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(0), "{port}: {stderr}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(stdout.contains("mesh default deny"), "{port}: {stdout}");
        stderr
    };
    for (port, which) in [
        (SIDECAR_INBOUND_PORT, "inbound"),
        (SIDECAR_OUTBOUND_PORT, "outbound"),
        (SIDECAR_ADMIN_PORT, "admin"),
    ] {
        let stderr = explain(port);
        assert!(
            stderr.starts_with(&format!(
                "warning: --port {port} is the sidecar's {which} port, which no connection is \
                 decided on: a policy's ports are the app's ports"
            )),
            "{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
    assert_eq!(explain(8080), "");

    let file = cp.tmp.path().join("inbound-port.yaml");
    let document = common::policy::allow("inbound-port", API, WEB, 8080).replace(
        "- ports: [8080]",
        &format!("- ports: [8080, {SIDECAR_INBOUND_PORT}]"),
    );
    std::fs::write(&file, &document).unwrap();
    let linted = lint(&[file.as_os_str()]);
    let stdout = String::from_utf8(linted.stdout).unwrap();
    assert_eq!(linted.status.code(), Some(0), "{stdout}");
    let line = document
        .lines()
        .position(|l| l.contains("- ports:"))
        .unwrap()
        + 1;
    assert!(
        stdout.starts_with(&format!("{}:{line}:", file.display()))
            && stdout.contains(&format!(
                "warning: spec.rules[0].to[0].ports[1]: {SIDECAR_INBOUND_PORT} is the sidecar's \
             inbound port"
            )),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
}

/// `policy explain --port` takes a port as `--opaque-ports` does: 0 and
/// numbers past 65535 are usage errors naming the flag and the range,
/// before any credential is read or call made.
#[test]
fn explain_refuses_a_port_that_is_not_one() {
    for bad in ["0", "70000"] {
        let out = std::process::Command::new(CTL)
            .args(["--state-dir", "/nonexistent", "policy", "explain"])
            .args(["--from", WEB, "--to", API, "--port", bad])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{bad}: {stderr}");
        assert!(
            stderr.contains("--port")
                && stderr.contains(&format!("\"{bad}\" is not a port (1-65535)")),
            "{bad}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{bad}");
    }
}

/// Every flag's environment twin works as the flag does: a twin that says
/// "no dry run" does not refuse `--wait` as if a dry run were asked, while
/// a dry run and a wait asked together are still refused (exit 64); and
/// `certs` takes `TRELLIS_SERIAL` and `TRELLIS_LIMIT`.
#[tokio::test]
async fn environment_twins_work_as_their_flags() {
    let cp = ControlPlane::start(&[]);
    let good = fixtures().join("lint").join("good");
    let out = cp
        .ctl_command(&["policy", "apply", "-f", good.to_str().unwrap(), "--wait=5s"])
        .env("TRELLIS_DRY_RUN", "false")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("every connected sidecar holds snapshot"),
        "{stderr}"
    );

    let out = cp
        .ctl_command(&["policy", "apply", "-f", good.to_str().unwrap(), "--wait"])
        .env("TRELLIS_DRY_RUN", "true")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--dry-run") && stderr.contains("--wait"),
        "{stderr}"
    );

    // Two workloads enrolled: the serial picks one, the limit keeps one.
    enroll(
        &cp,
        "spiffe://cluster.local/ns/default/sa/web",
        "127.0.0.1:7191",
    )
    .await;
    enroll(
        &cp,
        "spiffe://cluster.local/ns/default/sa/db",
        "127.0.0.1:7192",
    )
    .await;
    let certs = |env: (&str, &str)| -> Vec<serde_json::Value> {
        let out = cp
            .ctl_command(&["certs", "-o", "json"])
            .env(env.0, env.1)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    let all = certs(("TRELLIS_OUTPUT", "json"));
    assert_eq!(all.len(), 2, "{all:?}");
    let oldest = all[1]["serial"].as_str().unwrap();
    let picked = certs(("TRELLIS_SERIAL", oldest));
    assert_eq!(picked.len(), 1);
    assert_eq!(picked[0]["serial"], all[1]["serial"]);
    let newest = certs(("TRELLIS_LIMIT", "1"));
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0]["serial"], all[0]["serial"]);
    let out = cp
        .ctl_command(&["certs", "-o", "json"])
        .env("TRELLIS_LIMIT", "0")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "TRELLIS_LIMIT is read and checked"
    );
}

/// A value refused from an environment twin is said with the variable's
/// name (exit 64, before any call): `TRELLIS_OUTPUT=yaml` in a shell's
/// profile is found from the error, not searched for on the command line.
/// A flag given on the command line wins over its twin.
#[test]
fn a_refused_environment_value_names_its_variable() {
    let ctl = |args: &[&str], twin: &str, value: &str| {
        std::process::Command::new(CTL)
            .args([
                "--control-plane",
                "127.0.0.1:1",
                "--state-dir",
                "/nonexistent",
            ])
            .args(args)
            .env(twin, value)
            .output()
            .unwrap()
    };
    for (args, twin, value, says) in [
        (
            &["workloads"][..],
            "TRELLIS_OUTPUT",
            "yaml",
            "error: invalid value 'yaml' in TRELLIS_OUTPUT (--output): possible values: table, \
             json\n",
        ),
        (
            &["token", "create", "--spiffe-id", WEB][..],
            "TRELLIS_TTL",
            "1500ms",
            "error: invalid value '1500ms' in TRELLIS_TTL (--ttl): \"1500ms\" is not a whole \
             number of seconds\n",
        ),
    ] {
        let out = ctl(args, twin, value);
        assert_eq!(out.status.code(), Some(64), "{twin}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), says);
        assert!(out.stdout.is_empty());
    }
    // Given on the command line, the flag's value is the one read (and,
    // here, refused as the flag's).
    let out = ctl(&["workloads", "-o", "xml"], "TRELLIS_OUTPUT", "yaml");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr.starts_with("error: invalid value 'xml' for '--output <OUTPUT>'"),
        "{stderr}"
    );
}

/// trellisctl's own checks (after clap took the flags) name the variable
/// a refused value came from, beside its flag, and so any other flag they
/// name; exit 64 before any call. From the command line, the flags alone.
#[test]
fn its_own_checks_name_the_variable_a_refused_value_came_from() {
    let ctl = |args: &[&str], env: &[(&str, &str)]| {
        std::process::Command::new(CTL)
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let credentials = ["--ca", "ca.pem", "--cert", "op.pem", "--key", "op.key"];
    let remote = [
        &["--control-plane", "127.0.0.1:1", "workloads"][..],
        &credentials,
    ]
    .concat();
    let lint = ["policy", "lint", "/nonexistent/policies.yaml"];
    // The arguments, the environment, and what is said.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 4] = [
        (
            &remote,
            &[("TRELLIS_STATE_DIR", "/nonexistent")],
            "error: TRELLIS_STATE_DIR (--state-dir) cannot be combined with --ca/--cert/--key\n",
        ),
        (
            &[&remote[..], &["--state-dir", "/nonexistent"]].concat(),
            &[],
            "error: --state-dir cannot be combined with --ca/--cert/--key\n",
        ),
        (
            &lint,
            &[("TRELLIS_TRUST_DOMAIN", "Bad Domain")],
            "error: TRELLIS_TRUST_DOMAIN (--trust-domain) \"Bad Domain\": ",
        ),
        (
            &[&lint[..], &["--trust-domain", "Bad Domain"]].concat(),
            &[],
            "error: --trust-domain \"Bad Domain\": ",
        ),
    ];
    for (args, env, says) in cases {
        let out = ctl(args, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}: {stderr}");
        assert!(stderr.starts_with(says), "{args:?} {env:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(out.stdout.is_empty());
    }
}

/// `--wait 30s`, as one types a flag's value, is refused (exit 64, nothing
/// written) saying that the duration goes after an `=`, for `apply` and
/// `delete` alike, instead of clap's "unexpected argument '30s'".
#[test]
fn a_wait_duration_after_a_space_is_told_to_take_an_equals_sign() {
    for args in [
        &["policy", "apply", "-f", "policies.yaml", "--wait", "30s"][..],
        &["policy", "delete", "default/web-to-api", "--wait", "30s"][..],
    ] {
        let out = std::process::Command::new(CTL)
            .args([
                "--control-plane",
                "127.0.0.1:1",
                "--state-dir",
                "/nonexistent",
            ])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert_eq!(
            stderr,
            "error: --wait takes its duration after an '=': give --wait=30s (\"30s\" after a \
             space is no argument of this command)\n"
        );
        assert!(out.stdout.is_empty());
    }
}

/// `trellisctl policy lint DIR | head -1`: the reader of stdout goes away
/// before the listing is written. trellisctl ends as `ls` does in a shell
/// (exit 141, no panic), still saying its summary on stderr.
#[test]
fn lint_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let policy =
        std::fs::read_to_string(fixtures().join("lint/bad/port-out-of-range.yaml")).unwrap();
    for i in 0..1100 {
        let named = policy
            .replace("name: fine", &format!("name: fine-{i}"))
            .replace("name: bad-port", &format!("name: bad-port-{i}"));
        std::fs::write(dir.path().join(format!("policy-{i:04}.yaml")), named).unwrap();
    }
    // More than a pipe holds (64 KiB), so the writer meets the closed end
    // whenever it starts writing.
    let whole = lint(&[dir.path().as_os_str()]);
    assert_eq!(whole.status.code(), Some(1));
    assert!(whole.stdout.len() > 64 * 1024, "{}", whole.stdout.len());

    let mut child = std::process::Command::new(CTL)
        .args(["policy", "lint"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr, "1100 errors, 0 warnings\n");
    assert_eq!(output.status.code(), Some(141), "{stderr}");
}

/// `policy explain` says what the policies alone do not: a revoked source
/// (or destination) is refused by every sidecar whatever they say, named
/// with the time of its revocation before the trace, and the connection's
/// outcome is "refused"; the rate limits selecting the destination are
/// listed after the decision, applying to the HTTP requests of a port
/// parsed as HTTP and to none on an opaque one.
#[test]
fn explain_names_revocations_and_rate_limits() {
    let cp = ControlPlane::start(&["--default-policy", "allow-mesh"]);
    let limit = cp.tmp.path().join("slow.yaml");
    let document = format!(
        "apiVersion: trellis.io/v1alpha1
kind: RateLimitPolicy
metadata: {{name: slow, namespace: default}}
spec:
  selector: {{spiffeIds: [\"{API}\"]}}
  limit: {{requestsPerSecond: 0.5, burst: 2}}
  match: [{{paths: [\"/users/*\"]}}, {{paths: [/login]}}]
"
    );
    std::fs::write(&limit, document).unwrap();
    let out = cp.ctl(&["policy", "apply", "-f", limit.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let explain = |from: &str, to: &str, extra: &[&str]| explained(&cp, from, to, extra);
    let json = |from: &str, to: &str| -> serde_json::Value {
        serde_json::from_str(&explain(from, to, &["-o", "json"])).unwrap()
    };
    let verdict = format!("{WEB} -> {API} port 8080: allow by default:allow-mesh\n");
    let limited = "rate limits on the HTTP requests of port 8080:\n  \
                   default/slow: 0.5/s burst 2 per source, on paths /users/*, /login\n";

    let text = explain(WEB, API, &[]);
    assert!(text.starts_with(&verdict), "{text}");
    assert!(text.ends_with(limited), "{text}");
    let answer = json(WEB, API);
    assert_eq!(answer["outcome"], "allow", "{answer}");
    assert_eq!(answer["revocations"], serde_json::json!([]), "{answer}");
    assert_eq!(
        answer["rate_limits"],
        serde_json::json!([{
            "policy": "default/slow",
            "requests_per_second": 0.5,
            "burst": 2,
            "key": "source",
            "paths": ["/users/*", "/login"],
            "counts_request": null,
        }]),
        "{answer}"
    );
    // With a request named, the limit says whether it counts it: its
    // paths as apps route them (another spelling too), and only a
    // request that gets to the rate limits.
    let limit = "default/slow: 0.5/s burst 2 per source, on paths /users/*, /login";
    for (path, counting) in [
        ("/LOGIN/", "counts request GET /LOGIN/".to_owned()),
        (
            "/other",
            "does not count request GET /other (no path of it matches)".to_owned(),
        ),
        (
            "/a/%2e%2e/login",
            "does not count request GET /a/%2e%2e/login (it does not get to the rate \
             limits)"
                .to_owned(),
        ),
    ] {
        let text = explain(WEB, API, &["--path", path]);
        assert!(
            text.ends_with(&format!("  {limit}: {counting}\n")),
            "{text}"
        );
    }
    let answer: serde_json::Value =
        serde_json::from_str(&explain(WEB, API, &["--path", "/users/7", "-o", "json"])).unwrap();
    assert_eq!(answer["rate_limits"][0]["counts_request"], true, "{answer}");
    // The limit selects api, not web.
    let text = explain(API, WEB, &[]);
    assert!(
        text.ends_with("rate limits: none selects the destination\n"),
        "{text}"
    );

    let out = cp.ctl(&["identity", "revoke", WEB]);
    assert!(out.status.success());
    let listed = cp.ctl(&["identity", "revocations", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let revoked_at = listed[0]["revoked_at"].as_str().unwrap().to_owned();
    let revoked_at_unix = listed[0]["revoked_at_unix"].clone();
    assert!(revoked_at.ends_with('Z'), "{listed}");

    let refused = |role: &str| {
        format!(
            "{role} {WEB} is revoked since {revoked_at}: every sidecar refuses it (its \
             certificates issued at or before then), whatever the policies say\n\
             decision: refused (revoked); the policies alone would decide:\n"
        )
    };
    let text = explain(WEB, API, &[]);
    assert!(
        text.starts_with(&format!("{}{verdict}", refused("source"))),
        "{text}"
    );
    assert!(text.ends_with(limited), "{text}");
    let answer = json(WEB, API);
    assert_eq!(answer["outcome"], "refused", "{answer}");
    // The policies' own verdict is kept as it was.
    assert_eq!(answer["verdict"], "allow", "{answer}");
    assert_eq!(
        answer["revocations"],
        serde_json::json!([{
            "spiffe_id": WEB,
            "role": "source",
            "revoked_at": revoked_at,
            "revoked_at_unix": revoked_at_unix,
        }]),
        "{answer}"
    );
    // A revoked destination is refused by its callers' sidecars.
    let text = explain(API, WEB, &[]);
    assert!(text.starts_with(&refused("destination")), "{text}");
    assert_eq!(json(API, WEB)["outcome"], "refused");
    // An opaque port carries no HTTP requests for a limit to count.
    let text = explain(WEB, API, &["--opaque-ports", "8080"]);
    assert!(
        text.ends_with(
            "rate limits selecting the destination (none applies on port 8080: it is \
             opaque, it carries no HTTP requests):\n  \
             default/slow: 0.5/s burst 2 per source, on paths /users/*, /login\n"
        ),
        "{text}"
    );
}

/// `policy explain` evaluates no HTTP request: it says so, naming the
/// rules whose HTTP conditions the sidecar checks on each request, and
/// names none on an opaque port, where such conditions fail closed whole.
/// What it does decide is the DENY's: HTTP requests denied per request by
/// its rule, a connection that is not HTTP denied by it, and on an opaque
/// port the whole connection denied by it.
#[test]
fn explain_says_which_http_conditions_it_did_not_evaluate() {
    let cp = ControlPlane::start(&["--default-policy", "allow-mesh"]);
    deny_admin(&cp);
    let explain = |extra: &[&str]| explained(&cp, WEB, API, extra);
    let text = explain(&[]);
    assert_eq!(
        text,
        format!(
            "{WEB} -> {API} port 8080: allow by default:allow-mesh, except HTTP requests \
             denied per request by default/no-admin rule 0\n  \
             a connection that is not HTTP: deny by default/no-admin rule 0 (its HTTP \
             conditions cannot be checked on bytes)\n  \
             default/no-admin (DENY): selects the destination\n    \
             rule 0: decided per HTTP request: source matches spiffeId {WEB}; any port, \
             with L7 matches\n\
             no rule decided: mesh default allow-mesh\n\
             not evaluated: the HTTP conditions (methods, paths, headers, gRPC calls) of \
             default/no-admin rule 0, which the sidecar checks on each request\n\
             rate limits: none selects the destination\n"
        )
    );
    let json: serde_json::Value = serde_json::from_str(&explain(&["-o", "json"])).unwrap();
    assert_eq!(
        json["not_evaluated"],
        serde_json::json!([{"policy": "default/no-admin", "rule": 0}]),
        "{json}"
    );
    let per_request = &json["per_request"];
    assert_eq!(
        per_request["denied_by"],
        serde_json::json!({"policy": "default/no-admin", "rule": 0}),
        "{json}"
    );
    assert_eq!(per_request["allowed_by"], serde_json::Value::Null, "{json}");
    assert_eq!(per_request["not_http"]["verdict"], "deny", "{json}");
    let text = explain(&["--opaque-ports", "8080"]);
    assert!(
        text.starts_with(&format!(
            "{WEB} -> {API} port 8080: deny by default/no-admin rule 0\n"
        )),
        "{text}"
    );
    assert!(!text.contains("not evaluated"), "{text}");
}

/// `policy explain --method --path --header` decides one HTTP request as
/// the destination's sidecar would, by the same code: the answer names the
/// deciding rule and what the request gets, and no rule's HTTP conditions
/// are left unevaluated. ALLOW paths match as sent, DENY paths in any
/// letter case; a path the sidecar refuses is answered as refused, saying
/// why; a header that is not `NAME: VALUE` is a usage error naming the
/// flag, before any call.
#[test]
fn explain_decides_an_http_request_as_the_sidecar_would() {
    let cp = ControlPlane::start(&[]);
    apply_reads_and_no_admin(&cp);
    let explain = |extra: &[&str]| {
        let args = [
            "policy", "explain", "--from", WEB, "--to", API, "--port", "8080",
        ];
        cp.ctl(&[&args[..], &with_host(extra)].concat())
    };
    let text = |extra: &[&str]| {
        let out = explain(extra);
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let request_line = |extra: &[&str]| {
        let text = text(extra);
        assert!(!text.contains("not evaluated"), "{text}");
        let line = text.lines().find(|l| l.starts_with("  request "));
        line.unwrap_or_else(|| panic!("no request line: {text}"))
            .to_owned()
    };

    assert_eq!(
        request_line(&["--method", "GET", "--path", "/api/x?q=1"]),
        "  request GET /api/x: allow by default/api-reads rule 0 (passed to the app)"
    );
    assert_eq!(
        request_line(&["--method", "GET", "--path", "/ADMIN/x"]),
        "  request GET /ADMIN/x: deny by default/no-admin rule 0 (answered 403)"
    );
    // An ALLOW path matches only as sent.
    assert_eq!(
        request_line(&["--path", "/API/x"]),
        "  request GET /API/x: deny by default:deny: no policy allows this request (answered 403)"
    );
    assert_eq!(
        request_line(&["--method", "POST", "--path", "/api/x", "--header", "x-a: 1"]),
        "  request POST /api/x: deny by default:deny: no policy allows this request (answered 403)"
    );
    let refused = text(&["--method", "GET", "--path", "/api/%2e%2e/admin/x"]);
    assert!(
        refused.contains(
            "  request GET /api/%2e%2e/admin/x: refused (answered 400): path encodes '.' as \
             %2e: send unreserved characters as they are (RFC 3986)\n"
        ),
        "{refused}"
    );
    // The rules' HTTP conditions were not checked against a refused path.
    assert!(refused.contains("not evaluated"), "{refused}");
    // The control plane confirms it sized the request as HTTP/2: no
    // warning.
    let out = explain(&["--http2", "--path", "/api/x"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    // A query is matched by no rule, but counts towards the head's bound
    // as the sidecar counts it: here the HTTP/2 header list's.
    let long = format!("/api/x?q={}", "q".repeat(16 * 1024));
    let refused = text(&["--http2", "--path", &long]);
    assert!(
        refused.contains(
            "  request GET /api/x: refused (answered 431): request headers (the path and \
             pseudo-headers among them, 32 bytes more for each field) exceed the sidecar's \
             16 KiB limit\n"
        ),
        "{refused}"
    );

    let out = explain(&["--path", "/admin/x", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let request = &json["request"];
    assert_eq!(request["outcome"], "deny", "{json}");
    assert_eq!(request["status"], 403, "{json}");
    assert_eq!(
        request["deciding_rule"],
        serde_json::json!({"policy": "default/no-admin", "rule": 0}),
        "{json}"
    );
    assert_eq!(json["not_evaluated"], serde_json::json!([]), "{json}");
    // Without a request, the connection alone, as before.
    let out = explain(&["-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["request"], serde_json::Value::Null, "{json}");
    assert_eq!(json["not_evaluated"].as_array().map(Vec::len), Some(2));

    for (bad, error) in [
        (
            &["--path", "/api/x", "--header", "x-token"][..],
            "invalid value 'x-token' for '--header <NAME: VALUE>': \"x-token\" is not NAME: \
             VALUE (no ':')",
        ),
        (
            &["--path", "/api/x", "--method", "G T"][..],
            "invalid value 'G T' for '--method <M>': \"G T\" is not an HTTP method (a token \
             such as GET)",
        ),
        (&["--method", "GET"][..], "--path <PATH>"),
    ] {
        let out = explain(bad);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{bad:?}: {stderr}");
        assert!(stderr.contains(error), "{bad:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{bad:?}");
    }
}

/// A `--header` that `policy explain` refuses is named by the header's
/// name, never its value, which may be a credential: the usage error says
/// which header is wrong and why, before any call, and nothing of the value
/// reaches stderr.
#[test]
fn explain_never_says_back_a_refused_header_value() {
    let secret = "s3cr3t-t0ken";
    for (header, says) in [
        (
            format!("Authorization: Bearer {secret}\u{1}"),
            "invalid value 'Authorization: (value not shown)' for '--header <NAME: VALUE>': \
             the value of \"Authorization\" is not a header value",
        ),
        (
            format!("Bad Name: {secret}"),
            "invalid value 'Bad Name: (value not shown)' for '--header <NAME: VALUE>': \
             \"Bad Name\" is not a header name",
        ),
        (
            format!("Bearer {secret}"),
            "invalid value 'Bearer (the rest not shown)' for '--header <NAME: VALUE>': \
             \"Bearer\" is not NAME: VALUE (no ':')",
        ),
    ] {
        let out = std::process::Command::new(CTL)
            .args([
                "--control-plane",
                "127.0.0.1:1",
                "--state-dir",
                "/nonexistent",
            ])
            .args([
                "policy", "explain", "--from", WEB, "--to", API, "--port", "8080",
            ])
            .args(["--path", "/api/x", "--header", &header])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{header:?}: {stderr}");
        assert!(stderr.starts_with(&format!("error: {says}\n")), "{stderr}");
        assert!(
            !stderr.contains(secret),
            "the value was said back: {stderr}"
        );
        assert!(out.stdout.is_empty());
    }
}

/// An API reads policy (GET on `/api/*` from WEB on port 8080) and a DENY
/// on `/admin/*`, applied to `cp` with `trellisctl policy apply`.
fn apply_reads_and_no_admin(cp: &ControlPlane) {
    let reads = common::policy::allow("api-reads", API, WEB, 8080).replace(
        "- ports: [8080]",
        "- {ports: [8080], methods: [GET], paths: [\"/api/*\"]}",
    );
    let deny = common::policy::allow("no-admin", API, WEB, 8080)
        .replace("ALLOW", "DENY")
        .replace("- ports: [8080]", "- paths: [\"/admin/*\"]");
    let file = cp.tmp.path().join("http.yaml");
    std::fs::write(&file, format!("{reads}---\n{deny}")).unwrap();
    let out = cp.ctl(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The request line `policy explain` prints from WEB to API on 8080 with
/// `extra` flags (it must succeed).
fn request_line(cp: &ControlPlane, extra: &[&str]) -> String {
    let text = explained(cp, WEB, API, extra);
    let line = text.lines().find(|l| l.starts_with("  request "));
    line.unwrap_or_else(|| panic!("no request line: {text}"))
        .to_owned()
}

/// An HTTP/2 header list the sidecar's HTTP/2 layer refuses itself (64 KiB
/// or more as HTTP/2 counts it) never reaches the sidecar's code: the
/// answer says so (431, no body, nothing logged) instead of quoting the
/// sidecar's 16 KiB refusal, which a list just under it still gets; one
/// over 256 KiB ends the connection, and nothing answers it.
#[test]
fn explain_says_the_http2_layer_refuses_a_header_list_past_its_bound() {
    let cp = ControlPlane::start(&[]);
    // `:method GET`, `:scheme http` and `:path` take 122 bytes besides the
    // target.
    let list = |size: usize| format!("/x?{}", "q".repeat(size - 122 - "/x?".len()));
    let own = "  request GET /x: refused (answered 431): request headers (the path and \
               pseudo-headers among them, 32 bytes more for each field) exceed the sidecar's \
               16 KiB limit";
    let http2_layer = "request headers (counted as HTTP/2 counts them) reach the HTTP/2 \
                       layer's 64 KiB bound: it refuses the request itself, before any rule, \
                       with no body, and the sidecar logs nothing (a header block sent in more \
                       than six CONTINUATION frames ends the connection instead)";
    let just_under = list(64 * 1024 - 1);
    assert_eq!(request_line(&cp, &["--http2", "--path", &just_under]), own);
    let at_bound = list(64 * 1024);
    assert_eq!(
        request_line(&cp, &["--http2", "--path", &at_bound]),
        format!("  request GET /x: refused (answered 431): {http2_layer}")
    );
    let json = explained(
        &cp,
        WEB,
        API,
        &["--http2", "--path", &at_bound, "-o", "json"],
    );
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["request"]["outcome"], "refused", "{json}");
    assert_eq!(json["request"]["status"], 431, "{json}");
    assert_eq!(json["request"]["refusal"], http2_layer, "{json}");
    // The same as HTTP/1.1 is decided: its bounds are other.
    assert_eq!(
        request_line(&cp, &["--path", &at_bound]),
        "  request GET /x: deny by default:deny: no policy allows this request (answered 403)"
    );

    // Over 256 KiB, in headers each short enough for a command line.
    let big = format!("x-big: {}", "b".repeat(90 * 1024));
    let mut args = vec!["--http2", "--path", "/x"];
    for _ in 0..3 {
        args.extend(["--header", &big]);
    }
    assert_eq!(
        request_line(&cp, &args),
        "  request GET /x: refused (no answer): request headers (counted as HTTP/2 counts \
         them) exceed 256 KiB: the HTTP/2 layer ends the whole connection (GOAWAY \
         ENHANCE_YOUR_CALM) before any rule, answering no request, and the sidecar logs nothing"
    );
    args.extend(["-o", "json"]);
    let json: serde_json::Value = serde_json::from_str(&explained(&cp, WEB, API, &args)).unwrap();
    assert_eq!(json["request"]["outcome"], "refused", "{json}");
    assert_eq!(json["request"]["status"], serde_json::Value::Null, "{json}");
}

/// An absolute-form HTTP/1.1 target is taken as the sidecar takes it: the
/// rules match its path, a `Host` naming another host or port than its
/// authority is refused with 400, and it counts whole towards the bound
/// on the target. HTTP/2 has no such form: a usage error, before any call.
#[test]
fn explain_takes_an_absolute_form_target_as_the_sidecar_does() {
    let cp = ControlPlane::start(&[]);
    apply_reads_and_no_admin(&cp);
    let line = |extra: &[&str]| request_line(&cp, extra);
    assert_eq!(
        line(&["--path", "http://api:8080/api/x?q=1"]),
        "  request GET /api/x: allow by default/api-reads rule 0 (passed to the app)"
    );
    assert_eq!(
        line(&["--path", "http://api:8080/admin/x"]),
        "  request GET /admin/x: deny by default/no-admin rule 0 (answered 403)"
    );
    for host in ["api:8080", "API:8080"] {
        assert_eq!(
            line(&[
                "--path",
                "http://api:8080/api/x",
                "--header",
                &format!("Host: {host}")
            ]),
            "  request GET /api/x: allow by default/api-reads rule 0 (passed to the app)",
            "{host}"
        );
    }
    for host in ["web:8080", "api", "api:80"] {
        assert_eq!(
            line(&[
                "--path",
                "http://api:8080/api/x",
                "--header",
                &format!("Host: {host}")
            ]),
            "  request GET /api/x: refused (answered 400): Host header differs from the \
             authority of the request target",
            "{host}"
        );
    }
    // An origin-form target names no authority: any one Host goes, and
    // none is refused, as the sidecar refuses it; an absolute-form one
    // without a `Host` has its authority as one, unless that has a
    // userinfo part.
    assert_eq!(
        line(&["--path", "/api/x", "--header", "Host: web:8080"]),
        "  request GET /api/x: allow by default/api-reads rule 0 (passed to the app)"
    );
    let no_host = cp.ctl(&[
        "policy", "explain", "--from", WEB, "--to", API, "--port", "8080", "--path", "/api/x",
    ]);
    assert!(no_host.status.success());
    assert!(
        String::from_utf8_lossy(&no_host.stdout).contains(
            "\n  request GET /api/x: refused (answered 400): missing Host header: an HTTP/1.1 \
             request names its host in one (or in an absolute-form target); to explain a request \
             that names one, add --header 'Host: NAME'\n"
        ),
        "{}",
        String::from_utf8_lossy(&no_host.stdout)
    );
    assert_eq!(
        line(&["--path", "http://user@api:8080/api/x"]),
        "  request GET /api/x: refused (answered 400): the authority of the request target has \
         a userinfo part ('@'), which HTTP does not send"
    );
    // The whole target counts towards the sidecar's 65,534 bytes.
    let target = |len: usize| {
        let head = "http://api:8080/api/x?q=";
        format!("{head}{}", "q".repeat(len - head.len()))
    };
    assert_eq!(
        line(&["--path", &target(65_534)]),
        "  request GET /api/x: allow by default/api-reads rule 0 (passed to the app)"
    );
    assert_eq!(
        line(&["--path", &target(65_535)]),
        "  request GET /api/x: refused (answered 414): request target exceeds the sidecar's \
         limit of 65534 bytes"
    );

    let args = [
        "policy", "explain", "--from", WEB, "--to", API, "--port", "8080",
    ];
    let out = cp.ctl(&[&args[..], &["--http2", "--path", "http://api/api/x"]].concat());
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: --path \"http://api/api/x\": an absolute-form target is HTTP/1.1's: for HTTP/2 \
         give its path, and its authority as a Host header (which stands for :authority)\n"
    );
    assert!(out.stdout.is_empty());
    let out = cp.ctl(&[&args[..], &["--path", "mailto:a@b"]].concat());
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "invalid value 'mailto:a@b' for '--path <PATH>': \"mailto:a@b\" is not a request \
             target (a path starting with '/', '*', or an absolute URI such as \
             http://host:port/path; no spaces or control characters)"
        ),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--path @FILE` reads a target too long for a command line (one argument
/// is at most 128 KiB on Linux) from FILE, and `@-` from standard input,
/// one line end after it left out; a file that cannot be read, or does not
/// hold a target, is a usage error naming it, before any call.
#[test]
fn explain_reads_a_long_target_from_a_file() {
    let cp = ControlPlane::start(&[]);
    apply_reads_and_no_admin(&cp);
    let long = format!("/api/x?q={}", "q".repeat(409 * 1024));
    assert!(long.len() > 128 * 1024);
    let file = cp.tmp.path().join("target.txt");
    std::fs::write(&file, format!("{long}\r\n")).unwrap();
    let at_file = format!("@{}", file.display());
    let too_large = "  request GET /api/x: refused (answered 431): request head exceeds the \
                     sidecar's 408 KiB limit";
    assert_eq!(request_line(&cp, &["--path", &at_file]), too_large);
    // A target that fits is decided as given on the command line.
    std::fs::write(&file, "/admin/x\n").unwrap();
    assert_eq!(
        request_line(&cp, &["--path", &at_file]),
        "  request GET /admin/x: deny by default/no-admin rule 0 (answered 403)"
    );

    let args = [
        "policy", "explain", "--from", WEB, "--to", API, "--port", "8080", "--path", "@-",
    ];
    let mut child = cp
        .ctl_command(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        std::io::Write::write_all(&mut stdin, long.as_bytes()).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("{too_large}\n")), "{text}");

    let missing = cp.tmp.path().join("missing.txt");
    let bad = cp.tmp.path().join("bad.txt");
    std::fs::write(&bad, "api/x\n").unwrap();
    for (path, error) in [
        (
            &missing,
            format!(
                "{}: cannot read: no such file or directory",
                missing.display()
            ),
        ),
        (
            &bad,
            format!(
                "{}: \"api/x\" is not a request target (a path starting with '/', '*', or an \
                 absolute URI such as http://host:port/path; no spaces or control characters)",
                bad.display()
            ),
        ),
    ] {
        let at = format!("@{}", path.display());
        let out = cp.ctl(&[&args[..8], &["--path", &at]].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "invalid value '{at}' for '--path <PATH>': {error}\n"
            )),
            "{stderr}"
        );
        assert!(out.stdout.is_empty());
    }
}

/// A `#` in an HTTP/1.1 target is refused with 400 as the sidecar refuses
/// it, whatever the target's length and wherever the `#` is (no rule is
/// asked), and `%23` is matched as sent; with `--http2`, whose layer
/// drops a `#` before the sidecar reads the path, it is a usage error.
#[test]
fn explain_refuses_a_fragment_mark_in_a_target_at_any_length() {
    let cp = ControlPlane::start(&[]);
    apply_reads_and_no_admin(&cp);
    let line = |extra: &[&str]| request_line(&cp, extra);
    let refused = |path: &str| {
        format!(
            "  request GET {path}: refused (answered 400): request target contains '#': a \
             request carries no fragment (send a '#' in a path or query as %23)"
        )
    };
    let long = format!("/api/{}#/../admin/x", "a".repeat(20 * 1024));
    let long_query = format!("/api/x?q={}#x", "q".repeat(20 * 1024));
    let cases = [
        ("/api/x#/../admin/x", "/api/x#/../admin/x"),
        ("/admin#", "/admin#"),
        (long.as_str(), long.as_str()),
        ("/api/x?q=1#x", "/api/x"),
        (long_query.as_str(), "/api/x"),
        ("http://api:8080/api/x#x", "/api/x#x"),
        ("http://api:8080#x", "/#x"),
    ];
    for (target, path) in cases {
        assert_eq!(line(&["--path", target]), refused(path), "{target}");
    }
    assert_eq!(
        line(&["--path", "/api/a%23b"]),
        "  request GET /api/a%23b: allow by default/api-reads rule 0 (passed to the app)"
    );
    let args = [
        "policy", "explain", "--from", WEB, "--to", API, "--port", "8080",
    ];
    let out = cp.ctl(&[&args[..], &["--http2", "--path", "/api/x#y"]].concat());
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: --path \"/api/x#y\": HTTP/2's layer drops a '#' in :path and what follows it \
         before the sidecar reads the path: give the path without it (a '#' in a path or query \
         is %23)\n"
    );
}

/// Runs `command` with `input` on its standard input, which it may stop
/// reading early (a refusal): the write's own error is not the test's.
fn with_stdin(mut command: std::process::Command, input: &[u8]) -> std::process::Output {
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = std::io::Write::write_all(&mut stdin, &input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// `trellisctl policy lint ARGS` with `input` on standard input.
fn lint_stdin(args: &[&str], input: &str) -> std::process::Output {
    let mut command = std::process::Command::new(CTL);
    command.args(["policy", "lint"]).args(args);
    with_stdin(command, input.as_bytes())
}

/// The keys of the policies `policy list -o json` shows.
fn listed_keys(cp: &ControlPlane) -> Vec<String> {
    let out = cp.ctl(&["policy", "list", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (listed["policies"].as_array().unwrap().iter())
        .map(|p| p["policy"].as_str().unwrap().to_owned())
        .collect()
}

/// `policy apply -f -` reads the documents from standard input (`helm
/// template ... | trellisctl policy apply -f -`), alone or among files,
/// its documents in its place among the paths; a mistake on it, found
/// here or by the control plane, is said at `<stdin>:line:column` and
/// nothing is applied; `-` twice, and more than the control plane reads in
/// one request, are refused before anything is sent.
#[test]
fn apply_reads_standard_input_for_a_dash() {
    let cp = ControlPlane::start(&[]);
    let apply = |args: &[&str], input: &str| {
        let command = cp.ctl_command(&[&["policy", "apply"][..], args].concat());
        with_stdin(command, input.as_bytes())
    };
    // Invalid on stdin: nothing of it, or of the file beside it, applied.
    let file = cp.tmp.path().join("a.yaml");
    std::fs::write(&file, policy_text("a", 80)).unwrap();
    let file = file.to_str().unwrap();
    let two = [policy_text("b", 80), policy_text("c", 70000)].join("---\n");
    let out = apply(&["-f", file, "-f", "-"], &two);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "<stdin>:15:26: spec.rules[0].to[0].ports[0]: port 70000 is out of range 1..=65535\n\
         nothing applied: fix the errors above\n"
    );
    // One only the control plane finds, past the file read before it.
    let outside = policy_text("c", 80).replace("ns/default/sa/web", "ns/other/sa/web");
    let out = apply(&["-f", file, "-f", "-"], &outside);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("<stdin>:5:26: spec.selector.spiffeIds[0]: "),
        "{stderr}"
    );
    assert_eq!(listed_keys(&cp), Vec::<String>::new());

    // `-` takes its place among the paths.
    let dry = apply(&["--dry-run", "-f", "-", "-f", file], &policy_text("b", 80));
    let stdout = String::from_utf8_lossy(&dry.stdout);
    assert!(dry.status.success(), "{dry:?}");
    let outcomes: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split(" (").next())
        .collect();
    assert_eq!(
        outcomes[..2],
        [
            "AuthorizationPolicy default/b: would be created",
            "AuthorizationPolicy default/a: would be created"
        ],
        "{stdout}"
    );
    let out = apply(
        &["-R", "-f", file, "-f", "-", "-o", "json"],
        &two.replace("70000", "81"),
    );
    assert!(out.status.success(), "{out:?}");
    let applied: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = (applied["results"].as_array().unwrap().iter())
        .map(|r| r["policy"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default/a", "default/b", "default/c"]);
    assert_eq!(listed_keys(&cp), ["default/a", "default/b", "default/c"]);

    let out = apply(&["-f", "-"], &policy_text("d", 80));
    assert!(out.status.success(), "{out:?}");
    assert!(listed_keys(&cp).contains(&"default/d".to_owned()));

    // Refused before anything is read or sent.
    let out = apply(&["-f", "-", "-f", file, "-f", "-"], &policy_text("e", 80));
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: - (standard input) is given twice: it can be read only once (a file named - \
         is ./-)\n"
    );
    let mut huge = policy_text("e", 80);
    huge.push('#');
    huge.push_str(&"x".repeat(MAX_ADMIN_REQUEST_BYTES));
    let out = apply(&["-f", "-"], &huge);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "error: <stdin>: more than {MAX_ADMIN_REQUEST_BYTES} bytes (4 MiB), the most the \
             control plane reads in one ApplyPolicy request: nothing applied; give the \
             documents a few at a time\n"
        )
    );
    // An empty stdin is an empty file.
    let out = apply(&["-f", "-"], "");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: no AuthorizationPolicy or RateLimitPolicy documents found in the given files: \
         <stdin>\n"
    );
    assert_eq!(listed_keys(&cp).len(), 4);

    let help = String::from_utf8(cp.ctl(&["policy", "apply", "--help"]).stdout).unwrap();
    assert!(help.contains("| trellisctl policy apply -f -"), "{help}");
}

/// `policy lint -` checks the documents on standard input as a file's,
/// among files and with `-R`; a file named `-` is `./-`.
#[test]
fn lint_reads_standard_input_for_a_dash() {
    let bad = fixtures().join("lint/bad/unknown-field.yaml");
    let text = std::fs::read_to_string(&bad).unwrap();
    let out = lint_stdin(&["-"], &text);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.starts_with("<stdin>:10:3: spec.rulez: unknown field"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");

    let dir = tempfile::tempdir().unwrap();
    let port = fixtures().join("lint/bad/port-out-of-range.yaml");
    let port = port.to_str().unwrap();
    let lines = |args: &[&str]| {
        let out = lint_stdin(args, &text);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        (String::from_utf8(out.stdout).unwrap().lines())
            .map(|l| l.split(':').next().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(lines(&[port, "-"]), [port, "<stdin>"]);
    assert_eq!(lines(&["-", port, "-R"]), ["<stdin>", port]);

    let out = lint_stdin(&["-", "-"], &text);
    assert_eq!(out.status.code(), Some(64), "{out:?}");

    let good = std::fs::read_to_string(fixtures().join("lint/good/web-to-api.yaml")).unwrap();
    std::fs::write(dir.path().join("-"), &good).unwrap();
    let mut command = std::process::Command::new(CTL);
    command
        .current_dir(dir.path())
        .args(["policy", "lint", "./-"]);
    let out = with_stdin(command, text.as_bytes());
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let help = lint(&["--help".as_ref()]);
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("| trellisctl policy lint -"), "{help}");
}

/// A file whose path is `<stdin>`, the name standard input goes by, is
/// named `./<stdin>` in diagnostics, found here or by the control plane,
/// with `-` beside it or not, so that none reads as standard input's.
#[test]
fn a_file_named_as_standard_input_is_told_apart_from_it() {
    let cp = ControlPlane::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let unknown = fixtures().join("lint/bad/unknown-field.yaml");
    let unknown = std::fs::read_to_string(&unknown).unwrap();
    let port = fixtures().join("lint/bad/port-out-of-range.yaml");
    std::fs::write(dir.path().join(STDIN), std::fs::read(port).unwrap()).unwrap();
    let named = |args: &[&str], input: &str| {
        let mut command = std::process::Command::new(CTL);
        command
            .current_dir(dir.path())
            .args(["policy", "lint"])
            .args(args);
        let out = with_stdin(command, input.as_bytes());
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        (String::from_utf8(out.stdout).unwrap().lines())
            .map(|l| l.split(':').next().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(named(&[STDIN, "-"], &unknown), ["./<stdin>", "<stdin>"]);
    assert_eq!(named(&["-", STDIN], &unknown), ["<stdin>", "./<stdin>"]);
    assert_eq!(named(&[STDIN], ""), ["./<stdin>"]);

    // The control plane's finding names it so too; nothing is applied.
    let outside = policy_text("a", 80).replace("ns/default/sa/web", "ns/other/sa/web");
    std::fs::write(dir.path().join(STDIN), outside).unwrap();
    let mut command = cp.ctl_command(&["policy", "apply", "-f", STDIN, "-f", "-"]);
    command.current_dir(dir.path());
    let out = with_stdin(command, policy_text("b", 80).as_bytes());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("./<stdin>:5:26: spec.selector.spiffeIds[0]: "),
        "{stderr}"
    );
    assert_eq!(listed_keys(&cp), Vec::<String>::new());
}

/// Standard input that `-` cannot read as documents is refused naming
/// `<stdin>` and why, by `apply` and `lint` alike, before anything is sent,
/// so that nothing is applied, not even the valid file given beside it: a
/// directory (reading it fails) and bytes that are not UTF-8 text; and a
/// closed standard input (the process is given /dev/null in its place),
/// or /dev/null itself, which `-` cannot have been meant to read, as a
/// usage error.
#[test]
fn unreadable_standard_input_is_refused_naming_it() {
    use std::process::{Command, Stdio};
    let cp = ControlPlane::start(&[]);
    let file = cp.tmp.path().join("a.yaml");
    std::fs::write(&file, policy_text("a", 80)).unwrap();
    let file = file.to_str().unwrap();
    // `policy apply -f FILE -f -`, then `policy lint FILE -`.
    let commands = || {
        let mut lint = Command::new(CTL);
        lint.args(["policy", "lint", file, "-"]);
        [
            cp.ctl_command(&["policy", "apply", "-f", file, "-f", "-"]),
            lint,
        ]
    };
    let closed = |command: &Command| {
        let mut shell = Command::new("sh");
        shell
            .args(["-c", r#"exec "$0" "$@" <&-"#])
            .arg(command.get_program())
            .args(command.get_args());
        shell.output().unwrap()
    };
    let refused = |out: std::process::Output, code: i32, said: &str| {
        assert_eq!(out.status.code(), Some(code), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), said);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    };
    const CLOSED: &str = "error: <stdin>: standard input is closed (or /dev/null), so - has \
                          nothing to read: pipe the documents in, or leave - out\n";
    for mut command in commands() {
        command.stdin(std::fs::File::open(cp.tmp.path()).unwrap());
        let out = command.output().unwrap();
        refused(out, 1, "error: <stdin>: cannot read: is a directory\n");
    }
    for command in commands() {
        // A valid document, but for a comment's bytes.
        let mut input = policy_text("b", 80).into_bytes();
        input.extend_from_slice(b"# \xff\xfe\n");
        let out = with_stdin(command, &input);
        refused(out, 1, "error: <stdin>: cannot read: not UTF-8 text\n");
    }
    for command in commands() {
        refused(closed(&command), 64, CLOSED);
    }
    for mut command in commands() {
        let out = command.stdin(Stdio::null()).output().unwrap();
        refused(out, 64, CLOSED);
    }
    assert_eq!(listed_keys(&cp), Vec::<String>::new());
    // The file alone is applied: what stopped it was standard input.
    let out = cp.ctl(&["policy", "apply", "-f", file]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(listed_keys(&cp), ["default/a"]);
}

/// Files that hold no document are refused naming them, a few and then
/// how many more, standard input among them.
#[test]
fn files_without_documents_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, "# nothing yet\n").unwrap();
        paths.push(path.display().to_string());
    }
    let one = lint_stdin(&[&paths[0]], "");
    assert_eq!(one.status.code(), Some(64), "{one:?}");
    let start =
        "error: no AuthorizationPolicy or RateLimitPolicy documents found in the given files";
    assert_eq!(
        String::from_utf8_lossy(&one.stderr),
        format!("{start}: {}\n", paths[0])
    );
    let mut args: Vec<&str> = paths.iter().map(String::as_str).collect();
    args.insert(1, "-");
    let all = lint_stdin(&args, "# nor here\n");
    assert_eq!(all.status.code(), Some(64), "{all:?}");
    assert_eq!(
        String::from_utf8_lossy(&all.stderr),
        format!("{start}: {}, <stdin>, {} and 2 more\n", paths[0], paths[1])
    );
}

/// `trellisctl policy get` and `delete` of a namespace or name no policy
/// could have print the control plane's refusal naming the field and the
/// rule, as a refused request (exit 1), not as a policy not found; a name
/// too long is named by its length, not printed back.
#[test]
fn get_and_delete_of_a_name_no_policy_could_have_say_why() {
    let cp = ControlPlane::start(&[]);
    const RULE: &str = "must be a DNS-1123 label: at most 63 characters of a-z, 0-9 and '-', \
                        starting and ending with a letter or digit";
    let long = format!("default/{}", "a".repeat(300));
    for (policy, says) in [
        (
            "Default!/web-to-api",
            format!("namespace: invalid namespace \"Default!\": {RULE}"),
        ),
        (
            long.as_str(),
            format!("name: invalid name (300 bytes long): {RULE}"),
        ),
    ] {
        for verb in ["get", "delete"] {
            let out = cp.ctl(&["policy", verb, policy]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{verb} {policy}: {stderr}");
            assert_eq!(stderr, format!("error: invalid argument: {says}\n"));
            assert!(out.stdout.is_empty());
        }
    }
}
