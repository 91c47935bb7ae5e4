//! The control plane process: bad flags, corrupt state, restart on the same
//! state dir, reflection through the real grpcurl, graceful shutdown.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_control_plane::run::MAX_REFLECTION_REQUEST_BYTES;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

/// Runs the control plane on `state` with `args`, which it must refuse as
/// a usage error (exit 64) without making `state`: what it said on stderr.
fn refused_flags(state: &Path, args: &[&str]) -> String {
    let out = Command::new(CP)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr:?}");
    assert!(!state.exists(), "{args:?} must not create the state dir");
    stderr
}

#[test]
fn invalid_flags_exit_64_naming_the_flag_and_touch_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    for (args, names) in [
        (vec!["--cert-ttl", "5s"], "--cert-ttl"),
        (vec!["--cert-ttl", "31d"], "--cert-ttl"),
        (vec!["--no-such-flag"], "--no-such-flag"),
        (vec!["--default-policy", "maybe"], "--default-policy"),
        (vec!["--listen", "not-an-address"], "--listen"),
        (vec!["--trust-domain", "Bad.Domain"], "--trust-domain"),
        (vec!["--ca-cert", "x.pem"], "--ca-key"),
        (vec!["--opaque-ports", "5432,smtp"], "--opaque-ports"),
    ] {
        let stderr = refused_flags(&state, &args);
        assert!(stderr.contains(names), "{args:?}: {stderr}");
    }
    // The environment twin is checked the same way.
    let out = Command::new(CP)
        .arg("--state-dir")
        .arg(&state)
        .env("TRELLIS_OPAQUE_PORTS", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--opaque-ports"));
    assert!(!state.exists());
    // An operator CA that cannot be used is refused as configuration too,
    // naming the flag and its file, before the state dir is made: a file
    // that is missing, one that is not a certificate, a key of another
    // certificate.
    let missing = tmp.path().join("missing.crt").display().to_string();
    let not_pem = tmp.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let not_pem = not_pem.display().to_string();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&p256()).unwrap();
    let (ca_cert, other_key) = (tmp.path().join("ca.crt"), tmp.path().join("other.key"));
    std::fs::write(&ca_cert, ca.pem()).unwrap();
    std::fs::write(&other_key, p256().serialize_pem()).unwrap();
    let (ca_cert, other_key) = (
        ca_cert.display().to_string(),
        other_key.display().to_string(),
    );
    for (cert, key, names) in [
        (
            &missing,
            &other_key,
            format!("--ca-cert {missing}: cannot read it"),
        ),
        (
            &ca_cert,
            &missing,
            format!("--ca-key {missing}: cannot read it"),
        ),
        (
            &not_pem,
            &other_key,
            format!("--ca-cert {not_pem} is not usable"),
        ),
        (
            &ca_cert,
            &other_key,
            format!("--ca-key {other_key} does not match the certificate in {ca_cert}"),
        ),
    ] {
        let args = ["--ca-cert", cert, "--ca-key", key];
        assert_refused_touching_nothing(&state, &args, 64, &names);
    }
    // A lifetime too long is refused saying what is true of revocation:
    // it exists, with the embedded store.
    let stderr = refused_flags(&state, &["--cert-ttl", "1y"]);
    assert!(
        stderr.contains(
            "is longer than the maximum of 30 days: a workload certificate lives until it expires \
             unless its identity is revoked (trellisctl identity revoke, with the embedded \
             store only)"
        ),
        "{stderr}"
    );
    // Every duration flag reads its value as trellisctl's do: a bad one is
    // refused naming the flag and what was given, with examples, and a
    // bound is said in words.
    for (args, says) in [
        (
            ["--cert-ttl", "abc"],
            "--cert-ttl <CERT_TTL>': \"abc\" is not a duration (such as 30s, 10m, 24h)",
        ),
        (
            ["--watch-failure-grace", "20"],
            "--watch-failure-grace <WATCH_FAILURE_GRACE>': \"20\" is not a duration (such as 30s, \
             10m, 24h)",
        ),
        (
            ["--cert-ttl", "5s"],
            "5s is shorter than the minimum of 10 seconds",
        ),
        (
            ["--watch-failure-grace", "500ms"],
            "500ms is shorter than the minimum of 1 second",
        ),
    ] {
        let stderr = refused_flags(&state, &args);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let out = Command::new(CP).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--state-dir"));
    let out = Command::new(CP).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    // --cert-ttl's help says where revocation exists, not that it does not.
    let help = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(!help.contains("never revoked"), "{help}");
    assert!(
        help.contains(
            "with the embedded store `trellisctl identity revoke` makes sidecars refuse an \
             identity's certificates and stops their renewal; with the Kubernetes store a \
             certificate lives until it expires"
        ),
        "{help}"
    );
}

/// An operator CA certificate named `name`, signed by `by` (its own key
/// without one); the PEM, and the key to sign with it.
fn operator_ca(
    name: &str,
    by: Option<&rcgen::Issuer<'_, rcgen::KeyPair>>,
) -> (String, rcgen::KeyPair) {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let key = p256();
    let cert = match by {
        Some(by) => params.signed_by(&key, by).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    (cert.pem(), key)
}

fn issuer_of(pem: &str, key: rcgen::KeyPair) -> rcgen::Issuer<'static, rcgen::KeyPair> {
    rcgen::Issuer::from_ca_cert_pem(pem, key).unwrap()
}

/// An operator chain whose links do not sign each other starts nothing:
/// an intermediate from another root of the same name, or the chain out
/// of order, exits 64 naming the flag, the file and the link, before the
/// state dir is made (it would otherwise issue SVIDs no sidecar accepts).
#[test]
fn an_operator_chain_that_does_not_link_up_exits_64_and_touches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (root, _) = operator_ca("Operator root", None);
    // Another root of the same name: only the signature tells them apart.
    let (other_root, other_root_key) = operator_ca("Operator root", None);
    let other_issuer = issuer_of(&other_root, other_root_key);
    let (middle, middle_key) = operator_ca("Operator intermediate", Some(&other_issuer));
    let middle_issuer = issuer_of(&middle, middle_key);
    let (signing, signing_key) = operator_ca("Operator signing CA", Some(&middle_issuer));
    let key = tmp.path().join("signing.key");
    std::fs::write(&key, signing_key.serialize_pem()).unwrap();
    let key = key.display().to_string();
    for (name, chain, says) in [
        (
            "foreign.pem",
            [&signing, &middle, &root],
            "certificate 3 of the chain (CN=Operator root) did not sign certificate 2: the \
             signature does not verify with its key\n",
        ),
        (
            "unordered.pem",
            [&signing, &root, &middle],
            "certificate 1 of the chain is issued by CN=Operator intermediate, but certificate 2 \
             is CN=Operator root: give the signing CA first, then each certificate's issuer, \
             ending at the root\n",
        ),
    ] {
        let path = tmp.path().join(name);
        std::fs::write(&path, chain.map(String::as_str).concat()).unwrap();
        let path = path.display().to_string();
        let names = format!("error: --ca-cert {path} is not usable: {says}");
        let stderr = assert_refused_touching_nothing(
            &state,
            &["--ca-cert", &path, "--ca-key", &key],
            64,
            &names,
        );
        assert!(stderr.ends_with(&names), "{stderr}");
    }
}

/// A path the operator gave is said back with its control characters
/// escaped in every configuration error that names it: a file name from
/// a script or a directory listing cannot drive the terminal.
#[test]
fn paths_in_configuration_errors_are_said_escaped() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    // Escaped as the operator sees it: `\n`, `\u{1b}`.
    let path = |name: &str| {
        let escaped = name.replace('\n', "\\n").replace('\x1b', "\\u{1b}");
        (
            tmp.path().join(name).display().to_string(),
            tmp.path().join(escaped).display().to_string(),
        )
    };
    let (missing, missing_shown) = path("gone\n\x1b[2J.pem");
    let (garbage, garbage_shown) = path("not\n\x1b[2Jpem.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let (kube_ca, _) = operator_ca("Kubernetes CA", None);
    let (kube_ca_path, _) = path("kube-ca.crt");
    std::fs::write(&kube_ca_path, kube_ca).unwrap();
    let kube = [
        "--identity-provider",
        "kubernetes",
        "--kube-api",
        "https://127.0.0.1:6443",
    ];
    let webhook = [
        "--webhook",
        "127.0.0.1:0",
        "--webhook-cert",
        &missing,
        "--webhook-key",
        &garbage,
    ];
    let cases: [(Vec<&str>, String); 7] = [
        (
            [&webhook[..], &["--inject-config", &missing]].concat(),
            format!("--inject-config {missing_shown}: "),
        ),
        (
            vec!["--trust-anchors", &missing],
            format!("--trust-anchors {missing_shown}: cannot read it"),
        ),
        (
            webhook.to_vec(),
            format!("--webhook-cert {missing_shown}: "),
        ),
        (
            vec!["--ca-cert", &missing, "--ca-key", &kube_ca_path],
            format!("--ca-cert {missing_shown}: cannot read it"),
        ),
        (
            vec!["--ca-cert", &garbage, "--ca-key", &kube_ca_path],
            format!("--ca-cert {garbage_shown} is not usable: "),
        ),
        (
            [
                &kube[..],
                &["--kube-ca", &missing, "--kube-token-file", "/nonexistent"],
            ]
            .concat(),
            format!("--kube-ca {missing_shown}: "),
        ),
        (
            [
                &kube[..],
                &["--kube-ca", &kube_ca_path, "--kube-token-file", &missing],
            ]
            .concat(),
            format!("--kube-token-file {missing_shown}: "),
        ),
    ];
    for (args, names) in cases {
        let stderr = assert_refused_touching_nothing(&state, &args, 64, &names);
        assert!(!stderr.contains('\x1b'), "{args:?}: {stderr:?}");
    }
    // A start on `state` that fails, exit 1: what it said.
    let failed_start = |state: &str| {
        let out = Command::new(CP)
            .arg("--state-dir")
            .arg(state)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .env_remove("TRELLIS_LOG")
            .output()
            .unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{stderr:?}");
        stderr
    };
    // A state dir that is a file: the start fails, exit 1.
    let stderr = failed_start(&garbage);
    assert!(
        stderr.ends_with(&format!(
            "error: state dir {garbage_shown} exists and is not a directory\n"
        )),
        "{stderr:?}"
    );
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
    // A database that cannot be opened (its path is a directory) in a state
    // dir whose path holds a newline and ESC: the start fails, exit 1.
    let (dirty, dirty_shown) = path("state\n\x1b[2J");
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dirty)
            .unwrap();
    }
    std::fs::create_dir(std::path::Path::new(&dirty).join("trellis.redb")).unwrap();
    let stderr = failed_start(&dirty);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("error: database {dirty_shown}/trellis.redb: ")),
        "{stderr:?}"
    );
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
}

/// A value refused from a flag's environment twin is said with the
/// variable's name, which is where the operator must look: the flag alone
/// names nothing on the command line. Given on the command line, the same
/// value is said as the flag's, even with the variable set.
#[test]
fn a_refused_environment_value_names_its_variable() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    for (twin, value, says) in [
        (
            "TRELLIS_CERT_TTL",
            "abc",
            "error: invalid value 'abc' in TRELLIS_CERT_TTL (--cert-ttl): \"abc\" is not a \
             duration (such as 30s, 10m, 24h)\n",
        ),
        (
            "TRELLIS_LOG_FORMAT",
            "xml",
            "error: invalid value 'xml' in TRELLIS_LOG_FORMAT (--log-format): possible values: \
             text, json\n",
        ),
        (
            "TRELLIS_OPAQUE_PORTS",
            "5432,0",
            "error: invalid value '0' in TRELLIS_OPAQUE_PORTS (--opaque-ports): \"0\" is not a \
             port (1-65535)\n",
        ),
    ] {
        let out = Command::new(CP)
            .arg("--state-dir")
            .arg(&state)
            .env(twin, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{twin}: {stderr}");
        assert_eq!(stderr, says);
        assert!(!state.exists());
    }
    let stderr = refused_flags(&state, &["--cert-ttl", "xyz"]);
    assert!(
        stderr.starts_with("error: invalid value 'xyz' for '--cert-ttl <CERT_TTL>'"),
        "{stderr}"
    );
}

/// A value the control plane's own checks refuse (after clap took the
/// flags) names its variable too when it came from there, and so does
/// any other flag the refusal names whose value came from its variable;
/// from the command line, the flags alone. Exit 64, nothing created.
#[test]
fn its_own_checks_name_the_variable_a_refused_value_came_from() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    // The environment, the arguments, and what is said.
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
    let cases: [Case<'_>; 6] = [
        (
            &[("TRELLIS_INJECT_CONFIG", "inject.json")],
            &[],
            "error: TRELLIS_INJECT_CONFIG (--inject-config) configures the injection webhook: \
             it needs --webhook (with --webhook-cert and --webhook-key)\n",
        ),
        (
            &[],
            &["--inject-config", "inject.json"],
            "error: --inject-config configures the injection webhook: it needs --webhook (with \
             --webhook-cert and --webhook-key)\n",
        ),
        (
            &[("TRELLIS_CA_SECRET", "mesh-ca")],
            &[],
            "error: TRELLIS_CA_SECRET (--ca-secret) is only used with --store kubernetes\n",
        ),
        (
            &[("TRELLIS_STORE", "kubernetes")],
            &["--ca-secret", "mesh-ca"],
            "error: TRELLIS_STORE (--store) kubernetes needs --identity-provider kubernetes: \
             the Kubernetes store keeps no join tokens, sidecars prove themselves with \
             ServiceAccount tokens\n",
        ),
        (
            &[("TRELLIS_RENEWAL_PROOF", "token")],
            &["--identity-provider", "join-token"],
            "error: TRELLIS_RENEWAL_PROOF (--renewal-proof) token needs --identity-provider \
             kubernetes: without it no workload has a ServiceAccount token to prove, and \
             renewals prove the current certificate\n",
        ),
        (
            &[("TRELLIS_IDENTITY_PROVIDER", "join-token")],
            &["--renewal-proof", "token"],
            "error: --renewal-proof token needs TRELLIS_IDENTITY_PROVIDER \
             (--identity-provider) kubernetes: without it no workload has a ServiceAccount \
             token to prove, and renewals prove the current certificate\n",
        ),
    ];
    for (env, args, says) in cases {
        let out = Command::new(CP)
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{env:?} {args:?}: {stderr}");
        assert_eq!(stderr, says, "{env:?} {args:?}");
        assert!(
            !state.exists(),
            "{env:?} {args:?} must not create the state dir"
        );
    }
}

/// A start that fails once the flags are accepted (here on a state dir
/// others can read) exits 1 saying why once, as the last line on stderr,
/// as an invalid flag is said.
#[test]
fn a_failed_start_says_why_once_as_the_last_line() {
    use std::os::unix::fs::PermissionsExt;

    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(CP)
        .arg("--state-dir")
        .arg(&state)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env_remove("TRELLIS_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let why = format!(
        "state dir {} is accessible by group or others (mode 755); run `chmod 700` on it",
        state.display()
    );
    assert_eq!(stderr.matches(&why).count(), 1, "{why:?} once in {stderr}");
    assert_eq!(
        stderr.lines().last(),
        Some(format!("error: {why}").as_str())
    );
}

/// A port in use fails the start (exit 1) naming its flag and address,
/// before the state dir is made: no CA is generated for a control plane
/// that cannot serve. The last line says so in the OS's words, without
/// its error number.
#[test]
fn a_port_in_use_exits_naming_its_flag_and_touches_nothing() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let certs = common::webhook::WebhookCerts::new();
    let (cert, key) = (certs.path("tls.crt"), certs.path("tls.key"));
    let state = certs.dir.path().join("state");
    for flag in ["--listen", "--admin", "--webhook"] {
        let mut args = [
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--webhook",
            "127.0.0.1:0",
            "--webhook-cert",
            &cert,
            "--webhook-key",
            &key,
        ];
        let at = args.iter().position(|a| *a == flag).unwrap();
        args[at + 1] = &busy;
        let names = format!("{flag} {busy}: ");
        let stderr = assert_refused_touching_nothing(&state, &args, 1, &names);
        assert_eq!(
            stderr.lines().last(),
            Some(format!("error: {names}address already in use").as_str()),
            "{stderr}"
        );
        assert!(!stderr.contains("os error"), "{stderr}");
    }
}

/// A second control plane on the state dir of a running one (on ports of
/// its own) exits 1 saying that another process holds the database and
/// what to do, not redb's "Cannot acquire lock"; the running one serves on,
/// and the second wrote nothing there first (its trust anchors, another
/// bundle, leave `bundle.pem` as the running one wrote it).
#[test]
fn a_state_dir_in_use_names_the_running_control_plane() {
    let cp = ControlPlane::start(&[]);
    let files = ["bundle.pem", "ca.crt", "ca.key", "admin.crt", "admin.key"];
    let read_all = || files.map(|f| std::fs::read(cp.state_dir.join(f)).unwrap());
    let before = read_all();
    let (anchor, _) = operator_ca("Another root", None);
    let anchors = cp.tmp.path().join("anchors.pem");
    std::fs::write(&anchors, anchor).unwrap();
    let out = Command::new(CP)
        .arg("--state-dir")
        .arg(&cp.state_dir)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--trust-anchors")
        .arg(&anchors)
        .env_remove("TRELLIS_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let why = format!(
        "error: database {}: another process has it open: is a control plane already running \
         with this --state-dir? Stop it, or give this one a state dir of its own",
        cp.state_dir.join("trellis.redb").display()
    );
    assert_eq!(stderr.lines().last(), Some(why.as_str()), "{stderr}");
    assert!(
        read_all() == before,
        "the state dir's files must be as the running control plane wrote them"
    );
    assert_eq!(cp.ready().0, 200, "the running control plane serves on");
}

#[test]
fn a_corrupt_ca_key_is_reported_and_left_alone() {
    let cp = ControlPlane::start(&[]);
    let tmp = cp.tmp.clone();
    assert!(cp.stop().success());
    let key = tmp.path().join("state/ca.key");
    std::fs::write(&key, b"-----BEGIN PRIVATE KEY-----\nnot base64\n").unwrap();
    let before = std::fs::read(&key).unwrap();
    let out = Command::new(CP)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ca.key"), "{stderr}");
    assert_eq!(
        std::fs::read(&key).unwrap(),
        before,
        "ca.key must be byte-identical"
    );
}

/// A damaged database (a page overwritten, the file cut short) stops the
/// start with exit 1 and one last line naming the file, the damage and
/// what to do, not a panic; the file is left byte for byte as it was.
#[test]
fn a_damaged_database_is_reported_with_what_to_do_and_left_alone() {
    let cp = ControlPlane::start(&[]);
    let tmp = cp.tmp.clone();
    assert!(cp.stop().success());
    let state = tmp.path().join("state");
    let database = state.join("trellis.redb");
    let good = std::fs::read(&database).unwrap();
    let mut overwritten = good.clone();
    overwritten[8192..8192 + 32].fill(b'X');
    let cut = good[..good.len() / 2].to_vec();
    for (damage, bytes) in [("a page overwritten", overwritten), ("cut short", cut)] {
        std::fs::write(&database, &bytes).unwrap();
        let (code, stderr) = refused_start(&state);
        assert_eq!(code, Some(1), "{damage}: {stderr}");
        assert!(!stderr.contains("panicked"), "{damage}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        let names = format!("error: database {}: DB corrupted: ", database.display());
        assert!(last.starts_with(&names), "{damage}: {last}");
        assert!(
            last.ends_with(
                "; the file is left as it is: restore the state dir from a backup taken while \
                 the control plane was stopped, or move the file aside to start with an empty \
                 store"
            ),
            "{damage}: {last}"
        );
        assert!(
            std::fs::read(&database).unwrap() == bytes,
            "{damage}: the file changed"
        );
    }
    std::fs::write(&database, &good).unwrap();
    assert!(ControlPlane::start_in(tmp, &[]).stop().success());
}

/// An emptied database beside the CA (a copy or restore cut short) is not
/// taken for a new one, which would drop every policy without a word: the
/// start exits 1 saying so, the file stays empty; removed, it starts anew.
#[test]
fn an_emptied_database_beside_a_ca_is_refused() {
    let cp = ControlPlane::start(&[]);
    let tmp = cp.tmp.clone();
    assert!(cp.stop().success());
    let state = tmp.path().join("state");
    let database = state.join("trellis.redb");
    std::fs::write(&database, b"").unwrap();
    let (code, stderr) = refused_start(&state);
    assert_eq!(code, Some(1), "{stderr}");
    let why = format!(
        "error: database {}: the file is empty, though the state dir holds a CA and the \
         operator credential (admin.crt), which are written only once the database is made: the \
         state it held is lost (a copy or restore cut short?); it is left as it is: restore the \
         state dir from a backup taken while the control plane was stopped, or remove the empty \
         file to start with an empty store",
        database.display()
    );
    assert_eq!(stderr.lines().last(), Some(why.as_str()), "{stderr}");
    assert_eq!(std::fs::metadata(&database).unwrap().len(), 0);
    std::fs::remove_file(&database).unwrap();
    assert!(ControlPlane::start_in(tmp, &[]).stop().success());
}

/// Releases before the database was made first generated the CA, then the
/// database, then the operator credential: one killed on its first start
/// while redb made the file left it empty beside the CA and no credential.
/// A lived state dir whose database was emptied and credential lost leaves
/// the same files, so the start is refused, saying both and what to do for
/// each; once the empty file is removed, it starts keeping the CA.
#[test]
fn an_empty_database_beside_a_ca_but_no_credential_is_refused_until_removed() {
    let (tmp, state) = empty_state_dir();
    let database = state.join("trellis.redb");
    std::fs::write(&database, b"").unwrap();
    let ca = std::fs::read(state.join("ca.crt")).unwrap();
    let (code, stderr) = refused_start(&state);
    assert_eq!(code, Some(1), "{stderr}");
    let why = format!(
        "error: database {}: the file is empty beside a CA but no operator credential \
         (admin.crt, admin.key), and it is left as it is: if this state dir never served (a first \
         start of an earlier release killed while making the database leaves just this, holding \
         nothing), remove the empty file to start; if it served a mesh, its database was emptied \
         and its credential lost or moved, and its policies, join tokens and revocations are \
         gone: restore the state dir from a backup taken while the control plane was stopped",
        database.display()
    );
    assert_eq!(stderr.lines().last(), Some(why.as_str()), "{stderr}");
    assert_eq!(std::fs::metadata(&database).unwrap().len(), 0);
    assert!(!state.join("admin.crt").exists());
    std::fs::remove_file(&database).unwrap();
    let cp = ControlPlane::start_in(tmp.clone(), &[]);
    assert!(cp.stop().success());
    assert!(std::fs::metadata(&database).unwrap().len() > 0);
    assert_eq!(std::fs::read(state.join("ca.crt")).unwrap(), ca);
    assert!(state.join("admin.crt").exists());
}

/// A mesh that revoked an identity, whose database is then emptied and
/// whose operator credential is moved away, is not started on a new empty
/// database: that would drop the revocation (and every policy) without a
/// word, and the revoked identity would renew again.
#[test]
fn an_emptied_database_of_a_lived_mesh_without_its_credential_is_refused() {
    let cp = ControlPlane::start(&[]);
    let out = cp.ctl(&["identity", "revoke", WEB, "--reason", "stolen"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tmp = cp.tmp.clone();
    assert!(cp.stop().success());
    let state = tmp.path().join("state");
    let database = state.join("trellis.redb");
    std::fs::File::create(&database).unwrap();
    for name in ["admin.crt", "admin.key"] {
        std::fs::rename(state.join(name), tmp.path().join(name)).unwrap();
    }
    let (code, stderr) = refused_start(&state);
    assert_eq!(code, Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    let said = format!("error: database {}: the file is empty", database.display());
    assert!(last.starts_with(&said), "{stderr}");
    assert!(
        last.contains("restore the state dir from a backup"),
        "{stderr}"
    );
    assert_eq!(std::fs::metadata(&database).unwrap().len(), 0);
}

/// A write killed between making its temporary file and renaming it into
/// place leaves `.NAME.tmp-PID`; the next start has another pid, so it
/// removes those of its own pattern (and logs each), and nothing else.
#[test]
fn a_start_removes_temporary_files_crashed_writes_left() {
    let cp = ControlPlane::start(&[]);
    let tmp = cp.tmp.clone();
    assert!(cp.stop().success());
    let state = tmp.path().join("state");
    let stale = [
        ".ca.key.tmp-4194303",
        ".bundle.pem.tmp-1",
        ".admin.crt.tmp-77",
    ];
    let kept = [".notes.tmp-5", "ca.key.bak"];
    for name in stale.iter().chain(&kept) {
        std::fs::write(state.join(name), b"half").unwrap();
    }
    let cp = ControlPlane::start_in(tmp, &[]);
    for name in stale {
        assert!(!state.join(name).exists(), "{name} left");
        let said = format!("{}", state.join(name).display());
        assert!(cp.log().contains(&said), "{said} not in {}", cp.log());
    }
    for name in kept {
        assert!(state.join(name).exists(), "{name} removed");
    }
    assert!(cp.stop().success());
}

/// The state dir's lock (`flock` on the directory) is held by a running
/// control plane on the embedded store for as long as it runs, and free
/// once it stops, so that a control plane on the Kubernetes store, whose
/// only guard it is, never starts there removing its live temporary
/// files. One started while another process (this test) holds it leaves
/// the temporary files it finds, which may be that process's writes in
/// progress, and says why.
#[test]
fn the_state_dir_lock_is_held_while_running_and_a_held_one_keeps_temp_files() {
    use std::fs::{File, TryLockError};
    let cp = ControlPlane::start(&[]);
    let tmp = cp.tmp.clone();
    let state = tmp.path().join("state");
    let probe = File::open(&state).unwrap();
    assert!(
        matches!(probe.try_lock(), Err(TryLockError::WouldBlock)),
        "a running control plane holds the state dir's lock"
    );
    assert!(cp.stop().success());
    probe.try_lock().expect("the lock freed at exit");

    // Another process's write in progress, as a control plane on the
    // Kubernetes store, holding the lock, would have it.
    let live = ".bundle.pem.tmp-4194303";
    std::fs::write(state.join(live), b"half").unwrap();
    let cp = ControlPlane::start_in(tmp, &[]);
    assert!(
        state.join(live).exists(),
        "{live} removed under a held lock"
    );
    let said = "another process holds the state dir's lock (is a second control plane running \
                with this --state-dir?): temporary files a crash left there are not removed";
    assert!(cp.log().contains(said), "{said} not in {}", cp.log());
    drop(probe);
    assert!(cp.stop().success());
}

/// A state dir another user owns (0700, so this one cannot even look in)
/// is refused at once, naming both users and what to do, not with the
/// database's "permission denied". The control plane runs as `nobody`
/// (65534) on a state dir root made; needs root to do so.
#[test]
fn a_state_dir_another_user_owns_is_refused_naming_both() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !common::machine::is_root() {
        common::machine::skip("skipped: needs root (runs the control plane as another user)");
        return;
    }
    let cp = ControlPlane::start(&[]);
    let tmp = cp.tmp.clone();
    assert!(cp.stop().success());
    // The state dir's parent must let nobody find it.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = tmp.path().join("state");
    let out = Command::new("timeout")
        .args(["60", CP])
        .arg("--state-dir")
        .arg(&state)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env_remove("TRELLIS_LOG")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let why = format!(
        "error: state dir {0} is owned by uid 0, not by uid 65534 the control plane runs as \
         (its owner could read or replace the CA key there); run `chown -R 65534 {0}` on it, or \
         run the control plane as uid 0",
        state.display()
    );
    assert_eq!(stderr.lines().last(), Some(why.as_str()), "{stderr}");
}

/// A CA key (or operator key) in the state dir that group or others can
/// read, as a careless restore from a backup leaves it, stops the start:
/// exit 1 naming the file, its mode and the fix, the key never in the
/// message, and the file left as it was (its mode included).
#[test]
fn a_key_file_others_can_read_is_refused_and_left_alone() {
    use std::os::unix::fs::PermissionsExt;
    let cp = ControlPlane::start(&[]);
    let tmp = cp.tmp.clone();
    assert!(cp.stop().success());
    let state = tmp.path().join("state");
    for name in ["ca.key", "admin.key"] {
        let key = state.join(name);
        let pem = std::fs::read_to_string(&key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (code, stderr) = refused_start(&state);
        assert_eq!(code, Some(1), "{stderr}");
        let why = format!(
            "error: {} holds a private key but is accessible by group or others (mode 644); run \
             `chmod 600` on it (and consider whether it leaked)",
            key.display()
        );
        assert_eq!(stderr.lines().last(), Some(why.as_str()), "{stderr}");
        let body = pem.lines().nth(1).unwrap();
        assert!(!stderr.contains(body), "key material in {stderr}");
        assert_eq!(std::fs::read_to_string(&key).unwrap(), pem);
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "{name}'s mode is the operator's to fix");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    assert!(ControlPlane::start_in(tmp, &[]).stop().success());
}

/// A state dir as Kubernetes' `fsGroup` leaves a volume (setgid, 2770, the
/// key files 0660, all of a group the control plane runs with) starts,
/// with a warning that the group can read the CA key; the same modes
/// without the setgid bit, as a host's `chmod 770` leaves them (on a host
/// the group is often a shared one), are refused.
#[test]
fn a_state_dir_open_to_its_fs_group_starts_warning_and_a_plain_group_one_is_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let cp = ControlPlane::start(&[]);
    let tmp = cp.tmp.clone();
    assert!(cp.stop().success());
    let state = tmp.path().join("state");
    let chmod = |path: &std::path::Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    for name in ["ca.key", "admin.key"] {
        chmod(&state.join(name), 0o660);
    }
    chmod(&state, 0o770);
    let (code, stderr) = refused_start(&state);
    assert_eq!(code, Some(1), "{stderr}");
    let why = format!(
        "error: state dir {} is accessible by group or others (mode 770); run `chmod 700` on it",
        state.display()
    );
    assert_eq!(stderr.lines().last(), Some(why.as_str()), "{stderr}");
    chmod(&state, 0o2770);
    let gid = std::fs::metadata(&state).unwrap().gid();
    let cp = ControlPlane::start_in(tmp, &[]);
    let warned = format!(
        "the state dir and its key files are open to group {gid}, which the control plane runs \
         with (a setgid directory, as Kubernetes' fsGroup leaves a volume): every process \
         running with that group can read the CA key and replace the state dir's files"
    );
    assert!(cp.log().contains(&warned), "{warned:?} not in {}", cp.log());
    assert!(cp.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_ca_tokens_and_workloads() {
    let cp = ControlPlane::start(&[]);
    let bundle = std::fs::read(cp.state_dir.join("bundle.pem")).unwrap();
    let admin_cert = std::fs::read(cp.state_dir.join("admin.crt")).unwrap();
    enroll(&cp, WEB, "127.0.0.1:9000").await;
    let spare = cp.token("spiffe://cluster.local/ns/default/sa/db", 0).await;
    let tmp = cp.tmp.clone();
    assert!(cp.stop_async().await.success(), "SIGTERM exits 0");

    let cp = ControlPlane::start_in(tmp, &[]);
    assert_eq!(
        std::fs::read(cp.state_dir.join("bundle.pem")).unwrap(),
        bundle
    );
    assert_eq!(
        std::fs::read(cp.state_dir.join("admin.crt")).unwrap(),
        admin_cert
    );
    let workloads = cp.workloads().await;
    assert_eq!(workloads.len(), 1);
    assert_eq!(workloads[0].address, "127.0.0.1:9000");
    cp.certify(
        csr_for(&p256(), "spiffe://cluster.local/ns/default/sa/db"),
        Some(&spare),
        None,
        "",
    )
    .await
    .expect("a token made before the restart still works");
}

#[test]
fn grpcurl_lists_the_services_through_reflection() {
    if Command::new("grpcurl").arg("-version").output().is_err() {
        common::machine::skip("skipped: grpcurl not installed");
        return;
    }
    let cp = ControlPlane::start(&[]);
    let out = Command::new("grpcurl")
        .arg("-cacert")
        .arg(cp.state_dir.join("bundle.pem"))
        .arg(format!("localhost:{}", cp.port()))
        .arg("list")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for service in [
        "trellis.identity.v1.Identity",
        "trellis.discovery.v1.Discovery",
        "trellis.admin.v1.Admin",
    ] {
        assert!(
            stdout.lines().any(|l| l == service),
            "{service} missing:\n{stdout}"
        );
    }
}

/// `grpcurl describe` of a symbol whose name makes the request larger
/// than reflection reads is told the limit, not left with an empty answer.
#[test]
fn grpcurl_is_told_the_reflection_request_limit() {
    if Command::new("grpcurl").arg("-version").output().is_err() {
        common::machine::skip("skipped: grpcurl not installed");
        return;
    }
    let cp = ControlPlane::start(&[]);
    let symbol = format!("trellis.{}", "a".repeat(MAX_REFLECTION_REQUEST_BYTES));
    let out = Command::new("grpcurl")
        .arg("-cacert")
        .arg(cp.state_dir.join("bundle.pem"))
        .arg(format!("localhost:{}", cp.port()))
        .arg("describe")
        .arg(&symbol)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let told = format!(
        "code = ResourceExhausted desc = a reflection request may be at most {MAX_REFLECTION_REQUEST_BYTES} bytes; this one is larger"
    );
    assert!(stderr.contains(&told), "{told} missing:\n{stderr}");
}

#[test]
fn a_plaintext_client_is_refused_and_logged() {
    let cp = ControlPlane::start(&[]);
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "5",
            "-w",
            "%{http_code}",
            &format!("http://{}/", cp.grpc),
        ])
        .output()
        .unwrap();
    // curl is told what the port is, not sent a TLS alert it cannot read.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "this is the Trellis control plane's gRPC port: it speaks only TLS (a client must trust \
         the mesh's bundle.pem, as trellisctl and the sidecars do)\n400"
    );
    eventually("the handshake failure in the log", || {
        cp.log()
            .lines()
            .any(|l| l.contains("TLS handshake failed") && l.contains("not_tls"))
            .then_some(())
    });
    assert!(
        cp.metrics()
            .contains("trellis_tls_handshake_failures_total{reason=\"not_tls\"} 1")
    );
}

/// Plaintext clients in a row - a scanner, a client in a retry loop -
/// write one warning, not one each: the next one comes no sooner than 10 s
/// later, saying how many were not logged. The metric counts every one.
#[tokio::test]
async fn a_flood_of_plaintext_clients_logs_one_warning() {
    const FLOOD: usize = 40;
    let cp = ControlPlane::start(&[]);
    let started = std::time::Instant::now();
    for _ in 0..FLOOD {
        let mut tcp = tokio::net::TcpStream::connect(&cp.grpc).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: cp\r\n\r\n")
            .await
            .unwrap();
        // Answered, then closed.
        tcp.read_to_end(&mut Vec::new()).await.unwrap();
    }
    let counted = format!("trellis_tls_handshake_failures_total{{reason=\"not_tls\"}} {FLOOD}\n");
    eventually("every failure counted", || {
        cp.metrics().contains(&counted).then_some(())
    });
    // A failure is counted once its line, if any, is queued for the log,
    // which is written in order: once a line logged after them is there,
    // so is every line of theirs.
    let refused = cp
        .certify(csr_for(&p256(), WEB), Some("not-a-token"), None, "")
        .await;
    assert!(refused.is_err(), "{refused:?}");
    eventually("the refused Certify in the log", || {
        cp.log().contains("certify refused").then_some(())
    });
    assert!(
        started.elapsed() < trellis_control_plane::server::REFUSAL_LOG_PAUSE,
        "the flood took the whole pause: the test proves nothing"
    );
    let log = cp.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("TLS handshake failed") && l.contains("not_tls"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one warning for {FLOOD} failures: {lines:#?}"
    );
    assert!(
        lines[0].contains("WARN") && lines[0].contains("peer=127.0.0.1:"),
        "{}",
        lines[0]
    );
    assert!(!lines[0].contains("suppressed"), "{}", lines[0]);
}

/// `grpcurl -plaintext` against the TLS port, the mistake everyone makes
/// once, gets UNAVAILABLE saying what the port wants, not a closed
/// connection.
#[test]
fn grpcurl_without_tls_is_told_the_port_speaks_tls() {
    if Command::new("grpcurl").arg("-version").output().is_err() {
        common::machine::skip("skipped: grpcurl not installed");
        return;
    }
    let cp = ControlPlane::start(&[]);
    let out = Command::new("grpcurl")
        .args(["-plaintext", "-max-time", "10", &cp.grpc, "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "code = Unavailable desc = this is the Trellis control plane's gRPC port: it speaks \
             only TLS"
        ),
        "{stderr}"
    );
}

#[test]
fn admin_port_reports_live_and_ready() {
    let cp = ControlPlane::start(&[]);
    for path in ["/live", "/ready"] {
        let out = Command::new("curl")
            .args(["-sf", &format!("http://{}{path}", cp.admin)])
            .output()
            .unwrap();
        assert!(out.status.success(), "{path}");
    }
}

/// The ready line says the store as `--store` takes it, so that a search
/// of the logs for the flag's value finds it.
#[test]
fn the_ready_line_names_the_store_as_the_flag_does() {
    let cp = ControlPlane::start(&[]);
    assert_eq!(cp.ready_field("store"), "embedded", "{}", cp.log());
}

/// With `--log-format json` each line on stderr is one flat object a log
/// pipeline can index: `timestamp`, `level`, `target`, `message` and every
/// field at the top level, counts as numbers and the trust bundle's
/// description as a plain string.
#[test]
fn json_log_lines_are_flat_objects() {
    let cp = ControlPlane::start(&["--log-format", "json"]);
    let log = cp.log();
    let objects: Vec<serde_json::Map<String, serde_json::Value>> = log
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"))
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
            .unwrap_or_else(|| panic!("no {message:?} in {log}"))
    };

    let raised = find("open-files limit raised to the hard limit");
    assert_eq!(raised["level"], "INFO");
    assert!(
        raised["open_files"].as_u64().is_some_and(|n| n > 0),
        "{raised:?}"
    );

    let loaded = find("trust bundle loaded");
    assert_eq!(loaded["roots"], 1, "{loaded:?}");
    let bundle = loaded["bundle"].as_str().expect("bundle as a string");
    // Quoted once, as JSON quotes any string: not a debug-printed one.
    assert!(
        bundle.starts_with("O=Trellis, CN=Trellis root CA cluster.local ") && bundle.ends_with(')'),
        "{bundle:?}"
    );

    let ready = find("control plane ready");
    assert_eq!(ready["level"], "INFO");
    assert_eq!(ready["store"], "embedded");
    let grpc = ready["grpc"].as_str().expect("grpc as a string");
    assert!(grpc.parse::<std::net::SocketAddr>().is_ok(), "{grpc:?}");
}

/// Clients that connect and never say a word wait in tasks of their own and
/// take none of the limited handshake turns: more of them than there are
/// turns still leave a normal client served at once, not after their
/// 10-second handshake deadline.
#[tokio::test]
async fn silent_clients_do_not_block_others() {
    let cp = ControlPlane::start(&[]);
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(tokio::net::TcpStream::connect(&cp.grpc).await.unwrap());
    }
    let token = cp.token(WEB, 0).await;
    let served = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        cp.certify(csr_for(&p256(), WEB), Some(&token), None, ""),
    )
    .await
    .unwrap_or_else(|_| panic!("served before the silent clients' deadline\n{}", cp.log()));
    served.expect("a normal client is served meanwhile");
    drop(silent);
}

#[tokio::test]
async fn serves_with_an_operator_supplied_root() {
    let tmp = tempfile::tempdir().unwrap();
    operator_root(tmp.path(), "/O=Operator/CN=Operator root");
    let cert = tmp.path().join("root.crt");
    let key = tmp.path().join("root.key");
    let (cert_arg, key_arg) = (cert.display().to_string(), key.display().to_string());
    let cp = ControlPlane::start(&["--ca-cert", &cert_arg, "--ca-key", &key_arg]);
    let root = rustls_pki_types::CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(cp.bundle(), vec![root]);
    assert!(
        !cp.state_dir.join("ca.key").exists(),
        "the operator key is not copied"
    );
    let token = cp.token(WEB, 0).await;
    let response = cp
        .certify(csr_for(&p256(), WEB), Some(&token), None, "")
        .await
        .expect("certify under the operator root");
    assert_eq!(response.trust_bundle, vec![cp.bundle()[0].to_vec()]);
}

fn openssl(args: &[&str], dir: &std::path::Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl req` flags for a new P-256 key, written unencrypted.
const P256_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

/// An operator's self-signed root CA named `subject`, valid 30 days, made
/// by openssl in `dir` as `root.crt` and `root.key`.
fn operator_root(dir: &Path, subject: &str) {
    let mut root = vec!["req", "-x509", "-days", "30", "-subj", subject];
    root.extend(P256_KEY);
    root.extend([
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        "root.key",
        "-out",
        "root.crt",
    ]);
    openssl(&root, dir);
}

#[tokio::test]
async fn signs_with_an_operator_supplied_intermediate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    operator_root(dir, "/CN=Operator root");
    let mut csr = vec!["req", "-new", "-subj", "/CN=Operator intermediate"];
    csr.extend(P256_KEY);
    csr.extend(["-keyout", "int.key", "-out", "int.csr"]);
    openssl(&csr, dir);
    std::fs::write(
        dir.join("int.ext"),
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "int.csr",
            "-CA",
            "root.crt",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-days",
            "20",
            "-extfile",
            "int.ext",
            "-out",
            "int.crt",
        ],
        dir,
    );
    let chain = [
        std::fs::read(dir.join("int.crt")).unwrap(),
        std::fs::read(dir.join("root.crt")).unwrap(),
    ]
    .concat();
    std::fs::write(dir.join("chain.pem"), chain).unwrap();

    let (cert_arg, key_arg) = (
        dir.join("chain.pem").display().to_string(),
        dir.join("int.key").display().to_string(),
    );
    let cp = ControlPlane::start(&["--ca-cert", &cert_arg, "--ca-key", &key_arg]);
    let root = rustls_pki_types::CertificateDer::pem_file_iter(dir.join("root.crt"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(cp.bundle(), vec![root], "the bundle holds the root only");
    // trellisctl's operator credential chains through the intermediate too.
    let token = cp.token(WEB, 0).await;
    let response = cp
        .certify(csr_for(&p256(), WEB), Some(&token), None, "")
        .await
        .expect("certify under the intermediate");
    assert_eq!(response.chain.len(), 2, "leaf, then the intermediate");
    write_pem(&dir.join("leaf.pem"), &response.chain[0]);
    openssl(
        &[
            "verify",
            "-CAfile",
            "root.crt",
            "-untrusted",
            "int.crt",
            "leaf.pem",
        ],
        dir,
    );

    // The intermediate expires before its root: nothing issued outlives
    // it, not even the year-long operator credential, and the metric says
    // when it expires.
    let not_after = |path: &std::path::Path| {
        let der = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        cert.validity().not_after.timestamp()
    };
    let intermediate_ends = not_after(&dir.join("int.crt"));
    assert!(intermediate_ends < not_after(&dir.join("root.crt")));
    assert_eq!(
        not_after(&cp.state_dir.join("admin.crt")),
        intermediate_ends
    );
    assert!(not_after(&dir.join("leaf.pem")) <= intermediate_ends);
    let gauge = format!("trellis_ca_signing_expiry_timestamp_seconds {intermediate_ends}\n");
    assert!(cp.metrics().contains(&gauge), "{}", cp.metrics());
}

/// The control plane's log is written by a thread of its own in batches;
/// a burst of issuances followed at once by SIGTERM loses no line: every
/// `issued SVID` line and the last word, `control plane stopped`, are on
/// stderr when the process has exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_log_lines_is_written_whole_before_exit() {
    const BURST: usize = 40;
    let cp = ControlPlane::start(&[]);
    let ids: Vec<String> = (0..BURST)
        .map(|i| format!("spiffe://cluster.local/ns/burst/sa/w{i:02}"))
        .collect();
    let mut tokens = Vec::new();
    for id in &ids {
        tokens.push(cp.token(id, 0).await);
    }
    let cp = Arc::new(cp);
    let mut calls = tokio::task::JoinSet::new();
    for (id, token) in ids.iter().cloned().zip(tokens) {
        let cp = cp.clone();
        calls.spawn(async move {
            cp.certify(csr_for(&p256(), &id), Some(&token), None, "")
                .await
                .expect("certify with a fresh token");
        });
    }
    while let Some(call) = calls.join_next().await {
        call.unwrap();
    }
    let cp = Arc::into_inner(cp).expect("no call holds the control plane");
    let log = cp.log.clone();
    assert!(cp.stop_async().await.success(), "SIGTERM exits 0");
    let text = ControlPlane::log_after_exit(&log);
    for id in &ids {
        assert!(
            text.lines()
                .any(|l| l.contains("issued SVID") && l.contains(id.as_str())),
            "no `issued SVID` line for {id}:\n{text}"
        );
    }
}

/// A refused flag value is said back with its control characters escaped,
/// as trellisctl says it: clap would print a carriage return or a line
/// feed as given, and take an escape sequence's ESC out but leave the
/// rest. The rest of clap's text stays as it is.
#[test]
fn refused_flag_values_are_said_with_control_characters_escaped() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    for (args, says) in [
        (
            &["--cert-ttl", "\x1b[31mx"][..],
            "error: invalid value '\\u{1b}[31mx' for '--cert-ttl <CERT_TTL>': \"\\u{1b}[31mx\" \
             is not a duration (such as 30s, 10m, 24h)\n",
        ),
        (
            &["--log-format", "json\rtext"],
            "error: invalid value 'json\\rtext' for '--log-format <LOG_FORMAT>'\n",
        ),
        (
            &["--default-policy", "deny\n\u{202e}allow"],
            "error: invalid value 'deny\\n\\u{202e}allow' for '--default-policy ",
        ),
        (
            &["--no-such-flag\x07"],
            "error: unexpected argument '--no-such-flag\\u{7}' found\n",
        ),
    ] {
        let stderr = refused_flags(&state, args);
        assert!(stderr.starts_with(says), "{args:?}: {stderr:?}");
        assert!(
            !stderr.contains(['\x1b', '\r', '\x07', '\u{202e}']),
            "{args:?}: {stderr:?}"
        );
        assert!(
            stderr.ends_with("For more information, try '--help'.\n"),
            "{args:?}: {stderr:?}"
        );
    }
}

/// The commands of the README's `sh` block under `heading`, each split into
/// words as a shell splits them (single quotes, a backslash before a
/// newline, `#` comments), with each command's comment.
fn readme_commands(heading: &str) -> Vec<(Vec<String>, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("read README.md");
    let after = &readme[readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("the README has no heading {heading:?}"))..];
    let block = &after[after.find("```sh\n").expect("a sh block") + 6..];
    let block = &block[..block.find("```").expect("the sh block ends")];
    let mut commands = Vec::new();
    let (mut words, mut word, mut comment) = (Vec::new(), None::<String>, String::new());
    let mut chars = block.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    w.push(q);
                }
            }
            '\\' if chars.peek() == Some(&'\n') => {
                chars.next();
                words.extend(word.take());
            }
            '#' if word.is_none() => {
                for q in chars.by_ref() {
                    if q == '\n' {
                        break;
                    }
                    comment.push(q);
                }
                commands.push((std::mem::take(&mut words), std::mem::take(&mut comment)));
            }
            '\n' => {
                words.extend(word.take());
                if !words.is_empty() {
                    commands.push((std::mem::take(&mut words), String::new()));
                }
            }
            c if c.is_whitespace() => words.extend(word.take()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    commands.retain(|(words, _)| !words.is_empty());
    commands
}

/// The README's grpcurl examples (The gRPC API), run as written against a
/// real control plane, its state dir for `state` and its port for 15012:
/// each succeeds, `list` names the services its comment names, and the
/// Admin calls answer what they are for; without the operator credential
/// an Admin call is `Unauthenticated`, as the README says.
#[test]
fn the_readmes_grpcurl_examples_run_as_written() {
    if Command::new("grpcurl").arg("-version").output().is_err() {
        common::machine::skip("skipped: grpcurl not installed");
        return;
    }
    let cp = ControlPlane::start(&[]);
    let commands = readme_commands("### The gRPC API");
    assert!(commands.len() >= 4, "{commands:?}");
    let run = |words: &[String]| {
        assert_eq!(words[0], "grpcurl", "{words:?}");
        let args: Vec<String> = words[1..]
            .iter()
            .map(|w| match w.strip_prefix("state/") {
                Some(file) => cp.state_dir.join(file).display().to_string(),
                None => w.replace("127.0.0.1:15012", &cp.grpc),
            })
            .collect();
        let out = Command::new("grpcurl").args(&args).output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), said)
    };
    for (words, comment) in &commands {
        let (ok, said) = run(words);
        assert!(ok, "{words:?} failed: {said}");
        let call = words.last().unwrap();
        if call == "list" {
            for service in comment.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                assert!(
                    said.lines().any(|l| l.ends_with(&format!(".{service}"))),
                    "`list` does not name {service}, as the README's comment says: {said}"
                );
            }
        }
        if call.ends_with("/ListWorkloads") {
            assert!(said.contains("\"snapshotVersion\""), "{said}");
            // Without the operator credential.
            // Each word but `-cert`, `-key` and the file after each.
            let credential = |i: usize| ["-cert", "-key"].contains(&words[i].as_str());
            let anonymous: Vec<String> = (0..words.len())
                .filter(|&i| !credential(i) && (i == 0 || !credential(i - 1)))
                .map(|i| words[i].clone())
                .collect();
            let (ok, said) = run(&anonymous);
            assert!(
                !ok && said.contains("Code: Unauthenticated"),
                "{anonymous:?}: {said}"
            );
        }
        if call.ends_with("/Explain") {
            assert!(said.contains("\"verdict\": \"deny\""), "{said}");
        }
    }
}
