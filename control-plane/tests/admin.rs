//! The Admin API and trellisctl against the real control plane: only the
//! operator identity may call it, tokens print alone, workloads (with the
//! opaque ports their sidecars declare) and issued certificates list.

mod common;

use common::connections::{
    REFUSAL, assert_one_answer_then_closed, closed_among, closed_within, connect_from, hold,
    loopback,
};
use common::*;
use tonic::Code;
use trellis_proto::admin::v1::ListWorkloadsRequest;
use trellis_proto::admin::v1::admin_client::AdminClient;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const API: &str = "spiffe://cluster.local/ns/default/sa/api";

#[tokio::test]
async fn token_create_prints_only_the_token() {
    let cp = ControlPlane::start(&[]);
    let out = cp.ctl(&["token", "create", "--spiffe-id", WEB, "--ttl", "10m"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout:?}");
    let token = lines[0];
    let secret = token.strip_prefix("trellis-join-").expect("token prefix");
    assert!(secret.len() >= 32 && secret.chars().all(|c| c.is_ascii_hexdigit()));
    // The token works, and never reached the log.
    cp.certify(csr_for(&p256(), WEB), Some(token), None, "")
        .await
        .expect("the printed token proves the identity");
    assert!(!cp.log().contains(secret), "the token must not be logged");
}

#[tokio::test]
async fn token_create_refuses_bad_input() {
    let cp = ControlPlane::start(&[]);
    // Only the control plane knows its trust domain: one outside it is
    // refused by the call.
    let out = cp.ctl(&[
        "token",
        "create",
        "--spiffe-id",
        "spiffe://other.org/ns/a/sa/b",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("outside trust domain"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one-line error: {stderr}");
    assert!(out.stdout.is_empty());
    // Any other bad ID is a usage error, as the control plane says it.
    for (id, names) in [
        ("not-an-id", "a SPIFFE ID must start with \"spiffe://\""),
        (
            "spiffe://cluster.local/trellis/admin",
            "it is reserved for the control plane",
        ),
        ("spiffe://cluster.local", "it names the trust domain itself"),
    ] {
        let out = cp.ctl(&["token", "create", "--spiffe-id", id]);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(64), "{id}: {stderr}");
        assert!(
            stderr.starts_with(&format!(
                "error: invalid value '{id}' for '--spiffe-id <SPIFFE_ID>': {names}"
            )),
            "{id}: {stderr}"
        );
        assert!(out.stdout.is_empty());
    }
    let out = cp.ctl(&["token", "create"]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "a missing --spiffe-id is a usage error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--spiffe-id"));
    // A lifetime out of bounds is a usage error saying it as it was given
    // and the bound in words, not in the API's seconds.
    for (ttl, problem) in [
        ("25h", "\"25h\" is longer than the maximum of 1 day"),
        ("2days", "\"2days\" is longer than the maximum of 1 day"),
        ("0", "\"0\" is shorter than the minimum of 1 second"),
        ("0s", "\"0s\" is shorter than the minimum of 1 second"),
        ("1.5s", "\"1.5s\" is not a whole number of seconds"),
    ] {
        let out = cp.ctl(&["token", "create", "--spiffe-id", WEB, "--ttl", ttl]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{ttl}: {stderr}");
        assert!(
            stderr.contains("--ttl") && stderr.contains(problem),
            "{ttl}: {stderr}"
        );
        assert!(!stderr.contains("ttl_seconds"), "{ttl}: {stderr}");
        assert!(out.stdout.is_empty(), "{ttl}");
    }
}

/// The help says what `trellisctl` is and what each group takes.
#[test]
fn help_says_what_trellisctl_is() {
    let help = |args: &[&str]| {
        let out = std::process::Command::new(CTL).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let top = help(&["--help"]);
    assert!(
        top.starts_with("The command line client of the Trellis control plane: "),
        "{top}"
    );
    assert!(
        top.contains("policy     Policies (AuthorizationPolicy and RateLimitPolicy documents)"),
        "{top}"
    );
    let policy = help(&["policy", "--help"]);
    assert!(
        policy.starts_with("Policies (AuthorizationPolicy and RateLimitPolicy documents): "),
        "{policy}"
    );
}

/// Every duration flag reads its value alike: a bad one is a usage error
/// naming what was given, with examples; a good one is said back in words.
#[test]
fn duration_flags_are_read_and_said_in_words() {
    let cp = ControlPlane::start(&[]);
    for (args, given) in [
        (
            &["token", "create", "--spiffe-id", WEB, "--ttl", "abc"][..],
            "abc",
        ),
        (&["check", "--expiry-warning", "x"][..], "x"),
        (&["policy", "delete", "default/web", "--wait=20"][..], "20"),
        (
            &["policy", "apply", "-f", "policy.yaml", "--wait=soon"][..],
            "soon",
        ),
    ] {
        let out = cp.ctl(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "\"{given}\" is not a duration (such as 30s, 10m, 24h)"
            )),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }

    // The signing CA's root expires within ten years, so within 20.
    let out = cp.ctl(&["check", "--expiry-warning", "20y"]);
    let report = String::from_utf8(out.stdout).unwrap();
    assert!(
        report.lines().any(|l| l.starts_with("warn")
            && l.contains("the signing CA's root ")
            && l.ends_with(", within 20 years: rotate it")),
        "{report}"
    );
}

/// `check` warns of an operator credential about to expire and says how to
/// get a new one, and doing what it says gives one: a restart alone does
/// not, as the credential is issued again only within a day of its expiry.
#[test]
fn check_says_how_to_renew_the_operator_credential() {
    let cp = ControlPlane::start(&[]);
    // The credential lasts a year, so it expires within two.
    let out = cp.ctl(&["check", "--expiry-warning", "2y"]);
    let report = String::from_utf8(out.stdout).unwrap();
    let line = report
        .lines()
        .find(|l| l.starts_with("warn") && l.contains("the operator credential expires at"))
        .unwrap_or_else(|| panic!("no warning of the operator credential: {report}"));
    assert!(
        line.ends_with("delete admin.crt from its state dir and restart it"),
        "{line}"
    );

    let cert = cp.state_dir.join("admin.crt");
    let before = std::fs::read(&cert).unwrap();
    let tmp = cp.tmp.clone();
    cp.stop();
    let cp = ControlPlane::start_in(tmp.clone(), &[]);
    assert_eq!(
        std::fs::read(&cert).unwrap(),
        before,
        "a restart alone issued a new operator credential"
    );
    cp.stop();
    std::fs::remove_file(&cert).unwrap();
    let cp = ControlPlane::start_in(tmp, &[]);
    assert_ne!(
        std::fs::read(&cert).unwrap(),
        before,
        "no new operator credential"
    );
    let out = cp.ctl(&["policy", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn only_the_operator_identity_may_call_admin() {
    let cp = ControlPlane::start(&[]);
    let workload = enroll(&cp, WEB, "").await;
    let channel = trellis_core::grpc::connect(
        &cp.grpc,
        std::sync::Arc::new(cp.client_config(Some(&workload))),
    )
    .await
    .unwrap();
    let err = AdminClient::new(channel)
        .list_workloads(ListWorkloadsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let channel =
        trellis_core::grpc::connect(&cp.grpc, std::sync::Arc::new(cp.client_config(None)))
            .await
            .unwrap();
    let err = AdminClient::new(channel)
        .list_workloads(ListWorkloadsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
}

/// The lines of `log` that hold every one of `parts`.
fn lines_with<'a>(log: &'a str, parts: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .collect()
}

/// Each refused Admin call is logged once by the control plane, naming the
/// method, the caller and the code (WARN for a caller the API does not
/// allow, INFO for the operator's own mistake), never what the call
/// carried besides its request (a bearer token in its metadata); and every
/// call is counted by method and code.
#[tokio::test]
async fn refused_admin_calls_are_logged_once_and_counted() {
    if std::process::Command::new("grpcurl")
        .arg("-version")
        .output()
        .is_err()
    {
        common::machine::skip("skipped: grpcurl not installed");
        return;
    }
    const BEARER: &str = "tr3llis-bearer-never-logged";
    let cp = ControlPlane::start(&[]);
    // The operator deletes a policy that is not there, as `grpcurl` with
    // the operator's credential, sending a token it has no use for.
    let grpcurl = || {
        let mut command = std::process::Command::new("grpcurl");
        command
            .arg("-cacert")
            .arg(cp.state_dir.join("bundle.pem"))
            .arg("-cert")
            .arg(cp.state_dir.join("admin.crt"))
            .arg("-key")
            .arg(cp.state_dir.join("admin.key"))
            .args(["-H", &format!("authorization: Bearer {BEARER}")]);
        command
    };
    let out = grpcurl()
        .args(["-d", r#"{"namespace":"shop","name":"missing"}"#])
        .arg(format!("localhost:{}", cp.port()))
        .arg("trellis.admin.v1.Admin/DeletePolicy")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("NotFound"), "{stderr}");
    let line = cp.wait_for_line("the refused DeletePolicy's line", |l| {
        l.contains("admin call refused") && l.contains("method=\"DeletePolicy\"")
    });
    assert!(line.contains(" INFO "), "{line}");
    assert!(
        line.contains("caller=spiffe://cluster.local/trellis/admin "),
        "{line}"
    );
    assert!(line.contains("code=\"NotFound\""), "{line}");
    assert!(
        line.contains("detail=\"policy shop/missing not found\""),
        "{line}"
    );

    // An invalid document, as `trellisctl policy apply` sends it.
    let err = cp
        .admin_client()
        .await
        .apply_policy(trellis_proto::admin::v1::ApplyPolicyRequest {
            document: "kind: Nonsense\n".into(),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let invalid = cp.wait_for_line("the refused ApplyPolicy's line", |l| {
        l.contains("admin call refused") && l.contains("method=\"ApplyPolicy\"")
    });
    assert!(invalid.contains(" INFO "), "{invalid}");
    assert!(invalid.contains("code=\"InvalidArgument\""), "{invalid}");

    // A sidecar's identity, twice, and a caller without a certificate.
    let workload = enroll(&cp, WEB, "").await;
    for identity in [Some(&workload), Some(&workload), None] {
        let channel =
            trellis_core::grpc::connect(&cp.grpc, std::sync::Arc::new(cp.client_config(identity)))
                .await
                .unwrap();
        AdminClient::new(channel)
            .list_workloads(ListWorkloadsRequest::default())
            .await
            .unwrap_err();
    }
    let denied = cp.wait_for_line("the refused sidecar's line", |l| {
        l.contains("admin call refused") && l.contains("code=\"PermissionDenied\"")
    });
    assert!(denied.contains(" WARN "), "{denied}");
    assert!(denied.contains("method=\"ListWorkloads\""), "{denied}");
    assert!(denied.contains(&format!("caller={WEB} ")), "{denied}");
    assert!(denied.contains("client=127.0.0.1:"), "{denied}");
    assert!(
        denied.contains(&format!("detail=\"{WEB} may not call the Admin API; only ")),
        "{denied}"
    );
    let anonymous = cp.wait_for_line("the refused anonymous caller's line", |l| {
        l.contains("admin call refused") && l.contains("code=\"Unauthenticated\"")
    });
    assert!(anonymous.contains(" WARN "), "{anonymous}");
    assert!(anonymous.contains("caller=anonymous "), "{anonymous}");

    let metrics = cp.metrics();
    for (method, code, count) in [
        ("DeletePolicy", "NotFound", 1),
        ("ApplyPolicy", "InvalidArgument", 1),
        ("ListWorkloads", "PermissionDenied", 2),
        ("ListWorkloads", "Unauthenticated", 1),
    ] {
        let series =
            format!("trellis_admin_calls_total{{method=\"{method}\",code=\"{code}\"}} {count}\n");
        assert!(metrics.contains(&series), "no {series} in {metrics}");
    }
    assert!(
        metrics.contains("trellis_admin_calls_total{method=\"CreateJoinToken\",code=\"OK\"} 1\n"),
        "{metrics}"
    );

    let log = cp.log();
    // Each refusal once: the sidecar's second, within the window of its
    // first, only counted; the caller check no longer logs one of its own.
    assert_eq!(
        lines_with(&log, &["code=\"PermissionDenied\""]).len(),
        1,
        "{log}"
    );
    assert!(!log.contains("refused a call from an identity"), "{log}");
    assert_eq!(
        lines_with(&log, &["method=\"DeletePolicy\""]).len(),
        1,
        "{log}"
    );
    assert!(!log.contains(BEARER), "{log}");
}

/// Each Admin call that changes state logs its success naming its
/// caller, as a refused call's line does, so the log says who created a
/// join token, revoked an identity or took its revocation away, applied
/// or deleted a policy. The calls go over mTLS with the operator's
/// credential, as `trellisctl` makes them; the token stays out of the log.
#[tokio::test]
async fn state_changing_admin_calls_are_logged_naming_the_caller() {
    use trellis_proto::admin::v1::{
        CreateJoinTokenRequest, DeletePolicyRequest, RevokeIdentityRequest, UnrevokeIdentityRequest,
    };
    let cp = ControlPlane::start(&[]);
    let mut admin = cp.admin_client().await;
    let token = admin
        .create_join_token(CreateJoinTokenRequest {
            spiffe_id: WEB.into(),
            ttl_seconds: 600,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    admin
        .revoke_identity(RevokeIdentityRequest {
            spiffe_id: WEB.into(),
            reason: "key copied off node-3".into(),
        })
        .await
        .unwrap();
    admin
        .unrevoke_identity(UnrevokeIdentityRequest {
            spiffe_id: WEB.into(),
        })
        .await
        .unwrap();
    let document = policy::allow("web-to-api", API, WEB, 8080);
    policy::apply(&mut admin, &document, false).await.unwrap();
    admin
        .delete_policy(DeletePolicyRequest {
            namespace: "default".into(),
            name: "web-to-api".into(),
            kind: String::new(),
        })
        .await
        .unwrap();

    for message in [
        "created a join token",
        "revoked an identity",
        "removed an identity's revocation",
        "policies applied",
        "policy deleted",
    ] {
        let line = cp.wait_for_line(message, |l| l.contains(message));
        assert!(line.contains(" INFO "), "{line}");
        assert!(
            line.split(' ')
                .any(|field| field == "caller=spiffe://cluster.local/trellis/admin"),
            "{line}"
        );
    }
    let secret = token.strip_prefix("trellis-join-").unwrap();
    assert!(!cp.log().contains(secret), "the token must not be logged");
}

#[tokio::test]
async fn workloads_lists_a_certified_workload() {
    let cp = ControlPlane::start(&[]);
    let out = cp.ctl(&["workloads"]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("SPIFFE ID"), "{table}");
    assert_eq!(
        table.lines().count(),
        1,
        "only the header before any Certify"
    );

    enroll(&cp, WEB, "127.0.0.1:15006").await;
    let out = cp.ctl(&["workloads"]);
    let table = String::from_utf8(out.stdout).unwrap();
    let header = table.lines().next().unwrap();
    for column in [
        "SPIFFE ID",
        "ADDRESS",
        "CERT EXPIRES",
        "ACKED VERSION",
        "CONNECTED",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let row = table.lines().nth(1).expect("one workload row");
    assert!(
        row.starts_with(WEB) && row.contains("127.0.0.1:15006"),
        "{row}"
    );

    let out = cp.ctl(&["workloads", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["spiffe_id"], WEB);
    assert_eq!(json[0]["address"], "127.0.0.1:15006");
    assert_eq!(json[0]["connected"], false);
}

/// `trellisctl workloads` shows the ports each identity's connected
/// sidecars declare opaque themselves: every one any of them declares,
/// once, sorted; `-` for an identity with none connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_shows_the_opaque_ports_its_sidecars_declare() {
    let cp = ControlPlane::start(&[]);
    enroll(&cp, WEB, "127.0.0.1:15006").await;
    let api = enroll(&cp, API, "127.0.0.1:7101").await;
    let mut declaring = Watcher::open_declaring(&cp, &api, "127.0.0.1:7101", &[6379, 5432])
        .await
        .unwrap();
    declaring.next().await;
    let mut other = Watcher::open_declaring(&cp, &api, "127.0.0.1:7102", &[5432, 25])
        .await
        .unwrap();
    other.next().await;

    let out = cp.ctl(&["workloads"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{table}");
    let header = table.lines().next().unwrap();
    assert!(header.trim_end().ends_with("OPAQUE PORTS"), "{header}");
    let row = |id: &str| {
        let line = table.lines().find(|l| l.starts_with(id));
        let line = line.unwrap_or_else(|| panic!("no row for {id} in\n{table}"));
        line.split_whitespace().last().unwrap().to_owned()
    };
    assert_eq!(row(API), "25,5432,6379", "{table}");
    assert_eq!(row(WEB), "-", "{table}");

    let out = cp.ctl(&["workloads", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let of = |id: &str| {
        let listed = json
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["spiffe_id"] == id);
        listed.unwrap_or_else(|| panic!("no {id} in {json}"))["opaque_ports"].clone()
    };
    assert_eq!(of(API), serde_json::json!([25, 5432, 6379]));
    assert_eq!(of(WEB), serde_json::json!([]));
}

#[tokio::test]
async fn ctl_without_credentials_is_a_usage_error() {
    let out = std::process::Command::new(CTL)
        .args(["workloads"])
        .env_remove("TRELLIS_STATE_DIR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--state-dir"));
}

/// A group of subcommands called without one is a usage error (exit 64,
/// the group's help on stderr), as `trellisctl` alone is: a script whose
/// subcommand came out empty does not pass for having run it. Help asked
/// for is still printed to stdout with exit 0.
#[tokio::test]
async fn ctl_group_without_a_subcommand_is_a_usage_error() {
    for group in ["policy", "identity", "token"] {
        let out = std::process::Command::new(CTL)
            .args(["--state-dir", "/nonexistent", group])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{group}: {stderr}");
        assert!(
            stderr.contains(&format!("Usage: trellisctl {group} ")),
            "{group}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{group}");
        let help = std::process::Command::new(CTL)
            .args([group, "--help"])
            .output()
            .unwrap();
        assert!(help.status.success(), "{group} --help");
        assert!(
            String::from_utf8_lossy(&help.stdout).contains(&format!("Usage: trellisctl {group} ")),
            "{group} --help"
        );
    }
}

/// `--control-plane` without a port would be dialled on 443, never the
/// control plane's 15012: refused before anything is dialled, naming the
/// flag and what it takes.
#[tokio::test]
async fn ctl_refuses_a_control_plane_address_without_a_port() {
    for (address, problem) in [
        ("trellis-control-plane.trellis.svc", "expected host:port"),
        ("https://trellis-control-plane:15012", "has a scheme"),
    ] {
        let out = std::process::Command::new(CTL)
            .args(["--control-plane", address, "--state-dir", "/nonexistent"])
            .arg("workloads")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{address}: {stderr}");
        assert!(stderr.contains("--control-plane"), "{address}: {stderr}");
        assert!(stderr.contains(problem), "{address}: {stderr}");
    }
}

/// What an operator gets wrong most: credentials of another control plane
/// (its bundle, or its operator certificate), a key that is not the
/// certificate's, the admin port instead of the gRPC one, a control plane
/// that is not running, a name that does not resolve. Each is one line
/// that names the file or the address to check and says what is wrong
/// with it, each cause once.
#[tokio::test]
async fn ctl_names_the_credential_or_address_it_cannot_use() {
    let cp = ControlPlane::start(&[]);
    let other = ControlPlane::start(&[]);
    let file = |cp: &ControlPlane, name: &str| cp.state_dir.join(name).display().to_string();
    // Below the ephemeral range, so no parallel test's socket takes it.
    let stopped = common::ports::free_addr().to_string();
    // trellisctl's flags: the address, and the credential in a state dir
    // or as three files (bundle, certificate, key).
    let in_dir = |addr: &str, dir: &ControlPlane| {
        let dir = dir.state_dir.display().to_string();
        vec![
            "--control-plane".into(),
            addr.to_string(),
            "--state-dir".into(),
            dir,
        ]
    };
    let files = |bundle: String, cert: String, key: String| {
        let addr = cp.grpc.clone();
        [
            "--control-plane",
            &addr,
            "--ca",
            &bundle,
            "--cert",
            &cert,
            "--key",
            &key,
        ]
        .map(String::from)
        .to_vec()
    };
    // `.invalid` never resolves (RFC 6761): no network is asked.
    let unresolvable = "nohost.invalid:15012";
    let cases: [(Vec<String>, Vec<String>); 6] = [
        (
            in_dir(&cp.grpc, &other),
            vec![
                format!("not issued by the CA in {}", file(&other, "bundle.pem")),
                "UnknownIssuer".into(),
            ],
        ),
        (
            files(
                file(&cp, "bundle.pem"),
                file(&other, "admin.crt"),
                file(&other, "admin.key"),
            ),
            vec![format!(
                "the control plane at {} refused the operator certificate {}",
                cp.grpc,
                file(&other, "admin.crt")
            )],
        ),
        (
            files(
                file(&cp, "bundle.pem"),
                file(&cp, "admin.crt"),
                file(&other, "admin.key"),
            ),
            vec![format!(
                "{}: not the private key of the certificate in {}",
                file(&other, "admin.key"),
                file(&cp, "admin.crt")
            )],
        ),
        (
            in_dir(&cp.admin, &cp),
            vec![
                format!("{}: it does not answer in TLS", cp.admin),
                "gRPC address".into(),
            ],
        ),
        (
            in_dir(&stopped, &cp),
            vec![format!("{stopped}: nothing listens there")],
        ),
        (
            in_dir(unresolvable, &cp),
            vec![
                format!("{unresolvable}: the name nohost.invalid does not resolve ("),
                "failed to lookup address information".into(),
            ],
        ),
    ];
    for (args, expected) in cases {
        let out = std::process::Command::new(CTL)
            .args(&args)
            .arg("workloads")
            .output()
            .unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
        for part in expected {
            assert!(stderr.contains(&part), "{args:?}: {part:?} in {stderr}");
        }
        // Each cause is said once.
        let mut said = std::collections::HashSet::new();
        for part in stderr.trim_end().split(": ") {
            assert!(said.insert(part), "{args:?}: {part:?} twice in {stderr}");
        }
    }
    // Nothing was refused in a way that changed the control plane.
    let out = cp.ctl(&["workloads"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--control-plane` at a server of the mesh that is not the control
/// plane (a sidecar's inbound port, which presents the workload's SVID
/// from the same CA): one line naming the identity it presented and the
/// one expected, and what to give instead, in words, never the verifier's
/// Rust debug form (`Other(OtherError(UnexpectedId { .. }))`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_says_which_identity_answered_in_place_of_the_control_plane() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:15006").await;
    let config = rustls::ServerConfig::builder_with_provider(trellis_core::tls::provider())
        .with_protocol_versions(trellis_core::tls::PROTOCOL_VERSIONS)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(web.chain.clone(), web.key_der())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sidecar = listener.local_addr().unwrap().to_string();
    let serving = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            // trellisctl ends the handshake when it sees the identity.
            let _ = acceptor.accept(tcp).await;
        }
    });
    let out = tokio::process::Command::new(CTL)
        .args(["--control-plane", &sidecar, "--state-dir"])
        .arg(&cp.state_dir)
        .arg("workloads")
        .output()
        .await
        .unwrap();
    serving.abort();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    for part in [
        format!("cannot reach the control plane at {sidecar}"),
        "not the control plane".to_string(),
        "gRPC address".to_string(),
        format!("peer presented {WEB}, expected spiffe://cluster.local/trellis/control-plane"),
    ] {
        assert!(stderr.contains(&part), "{part:?} in {stderr}");
    }
    for debug in ["Other(", "UnexpectedId", "SpiffeId("] {
        assert!(!stderr.contains(debug), "{debug:?} in {stderr}");
    }
    let mut said = std::collections::HashSet::new();
    for part in stderr.trim_end().split(": ") {
        assert!(said.insert(part), "{part:?} twice in {stderr}");
    }
}

/// A control plane on an IPv6 address, written `[::1]:PORT` as it logs
/// it: trellisctl dials it (with the sidecar's dial, which took the
/// brackets for part of a host name).
#[tokio::test]
async fn ctl_reaches_a_control_plane_on_an_ipv6_address() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        common::machine::note("skipped: no IPv6 loopback");
        return;
    }
    let cp = ControlPlane::start(&["--listen", "[::1]:0"]);
    assert!(cp.grpc.starts_with("[::1]:"), "{}", cp.grpc);
    let out = cp.ctl(&["workloads"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("SPIFFE ID"));
}

/// The serial number of an SVID's leaf as openssl prints it: uppercase hex
/// pairs joined by colons.
fn openssl_serial(svid: &Svid) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(svid.chain[0].as_ref()).unwrap();
    cert.raw_serial_as_string().to_uppercase()
}

fn log_serial(svid: &Svid) -> String {
    openssl_serial(svid).replace(':', "").to_lowercase()
}

#[tokio::test]
async fn certs_lists_what_was_issued_newest_first_by_identity_or_serial() {
    let cp = ControlPlane::start(&[]);
    let first = enroll(&cp, WEB, "").await;
    let api = enroll(&cp, API, "").await;
    let second = enroll(&cp, WEB, "").await;

    let out = cp.ctl(&["certs"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "a header and three certificates:\n{table}");
    for column in ["SERIAL", "SPIFFE ID", "ISSUED", "EXPIRES"] {
        assert!(lines[0].contains(column), "{table}");
    }
    for (line, (svid, id)) in lines[1..]
        .iter()
        .zip([(&second, WEB), (&api, API), (&first, WEB)])
    {
        assert!(
            line.starts_with(&log_serial(svid)) && line.contains(id),
            "newest first:\n{table}"
        );
    }

    let out = cp.ctl(&["certs", "--spiffe-id", WEB, "-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["serial"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [log_serial(&second), log_serial(&first)]);
    assert!(json[0]["not_after_unix"].as_i64() > json[0]["issued_at_unix"].as_i64());

    // Found by the serial as openssl prints it.
    let out = cp.ctl(&["certs", "--serial", &openssl_serial(&first), "-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1, "{json}");
    assert_eq!(json[0]["spiffe_id"], WEB);
    assert_eq!(json[0]["serial"], log_serial(&first).as_str());

    // A limit keeps the newest and says that more match.
    let out = cp.ctl(&["certs", "--limit", "1"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert_eq!(table.lines().count(), 2, "{table}");
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .starts_with(&log_serial(&second))
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--limit"));

    // A serial that is not hex is a usage error naming the flag.
    let out = cp.ctl(&["certs", "--serial", "serial=4A3B"]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.starts_with("error: invalid value 'serial=4A3B' for '--serial <SERIAL>'"),
        "{stderr}"
    );
}

/// A flag's value the control plane would refuse, where `trellisctl` can
/// tell without it, is a usage error (exit 64) naming the flag and what it
/// takes, before any credential is read or call made: no state dir is
/// there to read.
#[test]
fn values_the_control_plane_would_refuse_are_usage_errors() {
    let reason = "a".repeat(1025);
    for (args, says) in [
        (
            &["certs", "--serial", "zz"][..],
            "invalid value 'zz' for '--serial <SERIAL>': serial \"zz\" is not a serial number: \
             hex digits, with or without colons, such as 4A:3B:00:FF",
        ),
        (
            &["certs", "--spiffe-id", "web"],
            "invalid value 'web' for '--spiffe-id <SPIFFE_ID>': a SPIFFE ID must start with",
        ),
        (
            &["identity", "revoke", "spiffe://cluster.local"],
            "invalid value 'spiffe://cluster.local' for '<SPIFFE_ID>': it names the trust \
             domain itself",
        ),
        (
            &[
                "identity",
                "unrevoke",
                "spiffe://cluster.local/trellis/admin",
            ],
            "for '<SPIFFE_ID>': it is reserved for the control plane",
        ),
        (
            &["identity", "revoke", WEB, "--reason", "two\nlines"],
            "invalid value 'two\\nlines' for '--reason <REASON>': reason \"two\\nlines\" holds \
             a control character",
        ),
        (
            &["identity", "revoke", WEB, "--reason", &reason],
            "reason is 1025 bytes long; at most 1024 are kept",
        ),
        (
            &[
                "policy", "explain", "--from", "web", "--to", API, "--port", "80",
            ],
            "invalid value 'web' for '--from <ID>': a SPIFFE ID must start with",
        ),
        (
            &[
                "policy",
                "explain",
                "--from",
                WEB,
                "--to",
                "spiffe://",
                "--port",
                "80",
            ],
            "invalid value 'spiffe://' for '--to <ID>': the trust domain is empty",
        ),
        (
            &["policy", "get", "web"],
            "invalid value 'web' for '<NAME>': \"web\" is not NAMESPACE/NAME",
        ),
        (
            &["policy", "delete", "default/"],
            "invalid value 'default/' for '<NAME>': \"default/\" is not NAMESPACE/NAME",
        ),
    ] {
        let stderr = offline(args);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("/nonexistent"), "{args:?}: {stderr}");
    }
}

/// `trellisctl` with `args` and no state dir to read, which must refuse
/// them as a usage error: exit 64, stdout empty, stderr starting with
/// `error: `, which is returned.
fn offline(args: &[&str]) -> String {
    let out = std::process::Command::new(CTL)
        .args(["--state-dir", "/nonexistent"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
    assert!(stderr.starts_with("error: "), "{args:?}: {stderr:?}");
    assert!(out.stdout.is_empty(), "{args:?}");
    stderr
}

/// A refused value is said back with its control characters escaped,
/// whoever refuses it (clap or `trellisctl`): a value that would drive
/// the terminal (from a script, or a copied manifest) cannot. The rest of
/// clap's text stays as it is.
#[test]
fn refused_values_are_said_with_control_characters_escaped() {
    let red = "\x1b[31mx";
    for (args, says) in [
        (
            &["token", "create", "--spiffe-id", WEB, "--ttl", red][..],
            "error: invalid value '\\u{1b}[31mx' for '--ttl <TTL>': \"\\u{1b}[31mx\" is not a \
             duration (such as 30s, 10m, 24h)\n",
        ),
        (
            &["token", "create", "--spiffe-id", WEB, "--ttl", "1\r2"],
            "error: invalid value '1\\r2' for '--ttl <TTL>': ",
        ),
        (
            &["workloads", "-o", red],
            "error: invalid value '\\u{1b}[31mx' for '--output <OUTPUT>'\n  \
             [possible values: table, json]\n",
        ),
        (
            &["certs", "--serial", "\u{202e}4a"],
            "error: invalid value '\\u{202e}4a' for '--serial <SERIAL>'",
        ),
        (&[red], "error: unrecognized subcommand '\\u{1b}[31mx'\n"),
        (
            &["policy", "lint", "--x\x07"],
            "error: unexpected argument '--x\\u{7}' found\n\n  \
             tip: to pass '--x\\u{7}' as a value, use '-- --x\\u{7}'\n",
        ),
    ] {
        let stderr = offline(args);
        assert!(stderr.starts_with(says), "{args:?}: {stderr:?}");
        assert!(
            !stderr.contains(['\x1b', '\r', '\x07', '\u{202e}']),
            "{args:?}: {stderr:?}"
        );
        assert!(
            stderr.ends_with("For more information, try '--help'.\n"),
            "{args:?}: {stderr}"
        );
    }
    // And a directory named in a usage error of `trellisctl`'s own.
    let dir = tempfile::tempdir().unwrap();
    let named = dir.path().join("p\x1b[2Jolicies");
    std::fs::create_dir(&named).unwrap();
    let out = std::process::Command::new(CTL)
        .args(["policy", "lint"])
        .arg(&named)
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(64), "{stderr:?}");
    assert!(
        stderr.contains("p\\u{1b}[2Jolicies: no policy file"),
        "{stderr:?}"
    );
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
    // A diagnostic naming a file in it.
    std::fs::write(named.join("x\x1b[2J.yaml"), "x: 1\n").unwrap();
    let out = std::process::Command::new(CTL)
        .args(["policy", "lint"])
        .arg(&named)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stdout:?}");
    assert!(
        stdout.contains("p\\u{1b}[2Jolicies/x\\u{1b}[2J.yaml:1:1: missing field"),
        "{stdout:?}"
    );
    assert!(!stdout.contains('\x1b'), "{stdout:?}");
    // A credential file that cannot be read.
    let out = std::process::Command::new(CTL)
        .args(["--ca", "ca\x1b[2J.pem", "--cert", "a.pem", "--key", "a.key"])
        .arg("workloads")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stderr:?}");
    assert!(
        stderr.starts_with("error: cannot read ca\\u{1b}[2J.pem: "),
        "{stderr:?}"
    );
}

/// The credential files trellisctl cannot use are named with their
/// control characters escaped, in every error that names them: a key
/// that is not the certificate's, a bundle of another CA, an operator
/// certificate the control plane refuses.
#[tokio::test]
async fn credential_paths_in_errors_are_said_escaped() {
    let cp = ControlPlane::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    // A file named with a line feed and an escape sequence: its path as
    // given, and as the operator is to see it.
    let odd = |name: &str, content: &[u8]| {
        let path = dir.path().join(format!("{name}\n\x1b[2J"));
        std::fs::write(&path, content).unwrap();
        let shown = dir.path().join(format!("{name}\\n\\u{{1b}}[2J"));
        (path.display().to_string(), shown.display().to_string())
    };
    let own = |name: &str| cp.state_dir.join(name).display().to_string();
    let (bundle, cert, key) = (own("bundle.pem"), own("admin.crt"), own("admin.key"));

    // Another CA, and an operator certificate of the trust domain it signed.
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_ca = rcgen::Issuer::new(params.clone(), p256());
    let other_root = params.self_signed(other_ca.key()).unwrap();
    let mut leaf = rcgen::CertificateParams::default();
    leaf.subject_alt_names = vec![uri("spiffe://cluster.local/trellis/admin")];
    let leaf_key = p256();
    let leaf = leaf.signed_by(&leaf_key, &other_ca).unwrap();

    let (copied_cert, copied_cert_shown) = odd("admin.crt", &std::fs::read(&cert).unwrap());
    let (other_bundle, other_bundle_shown) = odd("bundle.pem", other_root.pem().as_bytes());
    let (foreign_cert, foreign_cert_shown) = odd("foreign.crt", leaf.pem().as_bytes());
    let foreign_key = dir.path().join("foreign.key");
    std::fs::write(&foreign_key, leaf_key.serialize_pem()).unwrap();
    let foreign_key = foreign_key.display().to_string();
    for (files, says) in [
        (
            [&bundle, &copied_cert, &foreign_key],
            format!(": not the private key of the certificate in {copied_cert_shown}\n"),
        ),
        (
            [&other_bundle, &cert, &key],
            format!("not issued by the CA in {other_bundle_shown}"),
        ),
        (
            [&bundle, &foreign_cert, &foreign_key],
            format!(
                "the control plane at {} refused the operator certificate {foreign_cert_shown}: ",
                cp.grpc
            ),
        ),
    ] {
        let [ca, cert, key] = files;
        let out = std::process::Command::new(CTL)
            .args(["--control-plane", &cp.grpc, "--ca", ca, "--cert", cert])
            .args(["--key", key, "workloads"])
            .output()
            .unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{files:?}: {stderr:?}");
        assert!(stderr.contains(&says), "{files:?}: {stderr:?}");
        assert!(!stderr.contains('\x1b'), "{files:?}: {stderr:?}");
    }
}

/// What the control plane sends back, names, SPIFFE IDs, reasons, its
/// refusals, is printed with its control characters escaped, by every
/// command that prints it: none can drive the terminal. The store holds a
/// workload, a revocation and a policy named with an ANSI escape (written
/// before the control plane starts, as an older version or a restored
/// database could hold them); `-o json` stays JSON, the text as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_control_plane_sends_is_printed_escaped() {
    use trellis_control_plane::store::embedded::{DB_FILE, EmbeddedStore};
    use trellis_control_plane::store::{IssuedCertRecord, Store, WorkloadRecord};
    use trellis_proto::policy::v1::{Action, Policy, Rule, Selector};

    const RED: &str = "spiffe://cluster.local/ns/default/sa/red\x1b[31m";
    const RED_SHOWN: &str = "spiffe://cluster.local/ns/default/sa/red\\u{1b}[31m";
    let (tmp, state) = empty_state_dir();
    {
        let store = EmbeddedStore::open(&state.join(DB_FILE)).unwrap();
        let now = trellis_control_plane::unix_now();
        let issued = IssuedCertRecord {
            serial_hex: "0a".into(),
            spiffe_id: RED.into(),
            not_after_unix: now + 3600,
            issued_at_unix: now,
        };
        let workload = WorkloadRecord::new(RED, ["10.0.0.9:15006".to_string()], now + 3600, now);
        store
            .queue_issuance(None, &issued, &workload, &std::sync::Arc::default())
            .await
            .unwrap()
            .unwrap();
        store.revoke(RED, "clears\x1b[2J the screen").unwrap();
        let policy = Policy {
            name: "p\x1b[31m".into(),
            namespace: "default".into(),
            selector: Some(Selector {
                spiffe_ids: vec!["spiffe://cluster.local/ns/default/*".into()],
            }),
            action: Action::Deny.into(),
            rules: vec![Rule::default()],
            ..Policy::default()
        };
        store.apply_documents(&[policy], &[], false).unwrap();
    }
    let cp = tokio::task::spawn_blocking(move || ControlPlane::start_in(tmp, &[]))
        .await
        .unwrap();

    let printed = |args: &[&str]| {
        let out = cp.ctl(args);
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            !stdout.contains('\x1b') && !stderr.contains('\x1b'),
            "{args:?}: {stdout:?} {stderr:?}"
        );
        format!("{stdout}{stderr}")
    };
    for (args, shows) in [
        (&["workloads"][..], RED_SHOWN),
        (&["certs"], RED_SHOWN),
        (&["identity", "revocations"], "clears\\u{1b}[2J the screen"),
        (&["policy", "list"], "default/p\\u{1b}[31m"),
        (
            &[
                "policy", "explain", "--from", API, "--to", WEB, "--port", "80",
            ],
            "default/p\\u{1b}[31m",
        ),
        (
            &["policy", "get", "default/q\x1b[31m"],
            "name: invalid name \"q\\u{1b}[31m\": must be a DNS-1123 label",
        ),
        // Stored under a name no write takes, it can still be read.
        (
            &["policy", "get", "default/p\x1b[31m"],
            "name: \"p\\u001b[31m\"",
        ),
    ] {
        let text = printed(args);
        assert!(text.contains(shows), "{args:?}: {text}");
    }

    // JSON stays JSON, with the text as it is.
    let out = cp.ctl(&["policy", "list", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["policies"][0]["policy"], "default/p\x1b[31m");
    let out = cp.ctl(&["workloads", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["spiffe_id"], RED);
}

/// A mesh whose ListWorkloads answer passes gRPC's usual 4 MiB (12,000
/// workloads of 16 addresses each, about 5 MB): `trellisctl workloads`
/// still lists every one. The workloads are written into the embedded store
/// before the control plane starts on it, as its Certify would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_lists_a_mesh_whose_answer_passes_4_mib() {
    use trellis_control_plane::store::embedded::{DB_FILE, EmbeddedStore};
    use trellis_control_plane::store::{IssuedCertRecord, Store, WorkloadRecord};

    const WORKLOADS: usize = 12_000;
    let (tmp, state) = empty_state_dir();
    {
        let store = EmbeddedStore::open(&state.join(DB_FILE)).unwrap();
        let now = trellis_control_plane::unix_now();
        let mut answers = Vec::with_capacity(WORKLOADS);
        for i in 0..WORKLOADS {
            let spiffe_id = format!("spiffe://cluster.local/ns/scale/sa/w{i}");
            let issued = IssuedCertRecord {
                serial_hex: format!("{i:032x}"),
                spiffe_id: spiffe_id.clone(),
                not_after_unix: now + 3600,
                issued_at_unix: now,
            };
            let workload = WorkloadRecord::new(
                spiffe_id,
                (0..16).map(|a| format!("[fd00::{i:x}:{a:x}]:15006")),
                now + 3600,
                now,
            );
            let abandoned = std::sync::Arc::default();
            answers.push(store.queue_issuance(None, &issued, &workload, &abandoned));
        }
        for answer in answers {
            answer.await.unwrap().unwrap();
        }
    }
    let cp = tokio::task::spawn_blocking(move || ControlPlane::start_in(tmp, &[]))
        .await
        .unwrap();

    let out = cp.ctl(&["workloads", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), WORKLOADS);
    assert!(
        listed
            .iter()
            .all(|w| w["addresses"].as_array().unwrap().len() == 16)
    );
}

/// `GET /live` on the admin port from `from`: whether it answered 200.
async fn live(admin: std::net::SocketAddr, from: std::net::IpAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = connect_from(from, admin).await;
    if tcp
        .write_all(b"GET /live HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(REFUSAL, tcp.read_to_end(&mut answer)).await;
    matches!(read, Ok(Ok(_))) && answer.starts_with(b"HTTP/1.1 200")
}

/// The admin HTTP port, which every pod can reach, limits its connections
/// as the sidecar's does: one that sends nothing is closed after the head
/// timeout; past the cap of one client address, and past the total cap,
/// new ones are closed as they come; once the held ones close, a new one
/// is served.
#[tokio::test]
async fn the_admin_http_port_limits_its_connections() {
    use trellis_control_plane::admin_http::{
        HEAD_TIMEOUT, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT,
    };
    let cp = ControlPlane::start(&[]);
    let admin = cp.admin.parse().unwrap();
    let mut idle = connect_from(loopback(1), admin).await;
    let closed = closed_within(&mut idle, HEAD_TIMEOUT + PATIENCE)
        .await
        .expect("a connection that sends nothing is closed");
    assert!(
        closed >= HEAD_TIMEOUT / 2,
        "closed by the head timeout, not at once: {closed:?}"
    );

    let mut held = hold(loopback(1), admin, MAX_CONNECTIONS_PER_CLIENT).await;
    let mut extra = connect_from(loopback(1), admin).await;
    assert!(
        closed_within(&mut extra, REFUSAL).await.is_some(),
        "one address holds at most {MAX_CONNECTIONS_PER_CLIENT} connections"
    );
    let addresses = u8::try_from(MAX_CONNECTIONS / MAX_CONNECTIONS_PER_CLIENT).unwrap();
    for last in 2..=addresses {
        held.extend(hold(loopback(last), admin, MAX_CONNECTIONS_PER_CLIENT).await);
    }
    assert_eq!(held.len(), MAX_CONNECTIONS);
    // Full: an address holding none (the kubelet's) is served all the same,
    // and one connection of an address holding the most makes way for it.
    let other = loopback(addresses + 1);
    assert!(
        live(admin, other).await,
        "a full port kept out a new address"
    );
    assert_eq!(
        closed_among(&mut held, REFUSAL).await,
        1,
        "at most {MAX_CONNECTIONS} connections are served at once"
    );

    drop(held);
    eventually_async(
        "a new connection served once the held ones closed",
        || async move { live(admin, other).await.then_some(()) },
    )
    .await;
}

/// The admin port's answers, each with its content type: only `/metrics`
/// is Prometheus text; `/live`, `/ready` and a path it does not serve are
/// plain text, the last naming the paths it does, as the sidecar's admin
/// port does.
#[test]
fn the_admin_http_port_types_only_metrics_as_prometheus_text() {
    let cp = ControlPlane::start(&[]);
    let get = |path: &str| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-w", "\n%{http_code} %{content_type}"])
            .arg(format!("http://{}{path}", cp.admin))
            .output()
            .expect("curl runs");
        let answer = String::from_utf8(out.stdout).unwrap();
        let (body, status) = answer.rsplit_once('\n').expect("a status line");
        (status.to_owned(), body.to_owned())
    };
    let plain = "text/plain; charset=utf-8";
    assert_eq!(get("/live"), (format!("200 {plain}"), "live\n".into()));
    assert_eq!(get("/ready"), (format!("200 {plain}"), "ready\n".into()));
    assert_eq!(
        get("/nope"),
        (
            format!("404 {plain}"),
            "not found: try /live /ready /metrics\n".into()
        )
    );
    let (status, body) = get("/metrics");
    assert_eq!(status, "200 text/plain; version=0.0.4; charset=utf-8");
    assert!(body.contains("# TYPE "), "{body}");
}

/// A request head the admin port refuses is answered in words, as the
/// sidecar's admin port answers one: a header line without a colon 400, a
/// target too long for curl's request 414, each naming what was wrong,
/// and the connection closed. A bad head later on a kept-alive connection
/// gets the same answer. Each is counted by its kind, and logged as
/// a warning naming the client, never a header's value (a token may be
/// in one).
#[tokio::test]
async fn the_admin_http_port_answers_a_malformed_head_in_words() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use trellis_control_plane::admin_http::MALFORMED;
    let cp = ControlPlane::start(&[]);
    let admin = cp.admin.parse().unwrap();
    let answer_to = |from: u8, request: &'static [u8]| async move {
        let mut tcp = connect_from(loopback(from), admin).await;
        tcp.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer))
            .await
            .expect("answered and closed")
            .unwrap();
        String::from_utf8(answer).unwrap()
    };

    let answer = answer_to(
        7,
        b"GET /metrics HTTP/1.1\r\nhost: admin\r\nauthorization: Bearer admin-secret-7f3a\r\n\
          no colon here\r\n\r\n",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with(
            "\r\nconnection: close\r\n\r\nmalformed header line: not a field name and a colon \
             (a line without a colon, or a space before it)\n"
        ),
        "{answer}"
    );

    let out = std::process::Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .arg(format!("http://{admin}/{}", "a".repeat(70_000)))
        .output()
        .expect("curl runs");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "request target exceeds the limit of 65534 bytes\n\n414"
    );

    // The first heads are served, a body that reads as a head passed as a
    // body; the malformed head after them is answered as a first one is.
    let answer = answer_to(
        8,
        b"GET /live HTTP/1.1\r\nhost: admin\r\ncontent-length: 14\r\n\r\nGET / HTTP/1.1\
          GET /live HTTP/1.1\r\nhost: admin\r\n\r\nGET /live HTTP/1.1\r\nhost admin\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{answer}");
    assert!(
        answer.contains("live\nHTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with(
            "\r\nconnection: close\r\n\r\nmalformed header line: not a field name and a colon \
             (a line without a colon, or a space before it)\n"
        ),
        "{answer}"
    );

    eventually("the refused heads counted", || {
        let metrics = cp.metrics();
        let counted = ["malformed\"} 2\n", "target_too_long\"} 1\n"]
            .map(|c| format!("trellis_admin_malformed_requests_total{{reason=\"{c}"));
        counted.iter().all(|c| metrics.contains(c)).then_some(())
    });
    let line = cp.wait_for_line("the refused head logged", |l| {
        l.contains(MALFORMED) && l.contains("peer=127.0.0.7:")
    });
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("answered 400: malformed header line"),
        "{line}"
    );
    assert!(!cp.log().contains("admin-secret-7f3a"), "{}", cp.log());
}

/// A chunked request body is followed to its end, as a `Content-Length`
/// one is: the malformed head after it on the kept-alive connection is
/// answered in words, not with hyper's bare status, and counted and
/// logged once. (The port reads no body: hyper keeps the connection only
/// when it can skip the body at once, as it can an empty one.)
#[tokio::test]
async fn the_admin_http_port_checks_the_head_after_a_chunked_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use trellis_control_plane::admin_http::MALFORMED;
    let cp = ControlPlane::start(&[]);
    let admin = cp.admin.parse().unwrap();
    let mut tcp = connect_from(loopback(13), admin).await;
    tcp.write_all(
        b"POST /live HTTP/1.1\r\nhost: admin\r\ntransfer-encoding: chunked\r\n\r\n\
          0;x=y\r\n\r\nGET /live HTTP/1.1\r\nhost admin\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
        "{answer}"
    );
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 2, "{answer}");
    assert!(
        answer.contains("GET or HEAD only\nHTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with(
            "\r\nconnection: close\r\n\r\nmalformed header line: not a field name and a colon \
             (a line without a colon, or a space before it)\n"
        ),
        "{answer}"
    );

    eventually("the refused head counted", || {
        cp.metrics()
            .contains("trellis_admin_malformed_requests_total{reason=\"malformed\"} 1\n")
            .then_some(())
    });
    let line = cp.wait_for_line("the refused head logged", |l| {
        l.contains(MALFORMED) && l.contains("peer=127.0.0.13:")
    });
    assert!(
        line.contains("answered 400: malformed header line"),
        "{line}"
    );
}

/// A request head begun and not whole within the admin port's head
/// timeout is answered 408 in words, the first head of a connection or a
/// later one on a kept-alive connection, counted and logged; a connection
/// idle that long is closed without a word.
#[tokio::test]
async fn the_admin_http_port_answers_a_stalled_head_408() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use trellis_control_plane::admin_http::{HEAD_TIMEOUT, MALFORMED};
    let cp = ControlPlane::start(&[]);
    let admin = cp.admin.parse().unwrap();
    let stalled = |from: u8, request: &'static [u8]| async move {
        let mut tcp = connect_from(loopback(from), admin).await;
        tcp.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(
            HEAD_TIMEOUT + Duration::from_secs(10),
            tcp.read_to_end(&mut answer),
        )
        .await
        .expect("answered and closed")
        .unwrap();
        String::from_utf8(answer).unwrap()
    };
    let timed_out = "HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n\
                     content-length: 39\r\nconnection: close\r\n\r\n\
                     request head did not arrive within 5 s\n";
    let (first, later, idle) = tokio::join!(
        stalled(10, b"GET /live HTTP/1.1\r\nhost: ad"),
        stalled(
            11,
            b"GET /live HTTP/1.1\r\nhost: admin\r\n\r\nGET /live HTTP/1.1\r\nhost: ad"
        ),
        stalled(12, b"GET /live HTTP/1.1\r\nhost: admin\r\n\r\n"),
    );
    assert_eq!(first, timed_out);
    assert!(later.starts_with("HTTP/1.1 200 OK\r\n"), "{later}");
    assert!(later.ends_with(&format!("live\n{timed_out}")), "{later}");
    assert!(idle.starts_with("HTTP/1.1 200 OK\r\n"), "{idle}");
    assert!(idle.ends_with("live\n"), "{idle}");

    eventually("the stalled heads counted", || {
        let metrics = cp.metrics();
        metrics
            .contains("trellis_admin_malformed_requests_total{reason=\"malformed\"} 2\n")
            .then_some(())
    });
    let line = cp.wait_for_line("the stalled head logged", |l| {
        l.contains(MALFORMED) && l.contains("answered 408:")
    });
    assert!(
        line.contains("answered 408: request head did not arrive within 5 s"),
        "{line}"
    );
}

/// A bare CR (a CR not followed by LF) in a header line is named as the
/// sidecar names it, in the answer and the warning, and the connection
/// closed: some servers end a line there, so what follows it is not what
/// an app would read. Never the header's value.
#[tokio::test]
async fn the_admin_http_port_names_a_bare_cr_in_a_header_line() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use trellis_control_plane::admin_http::MALFORMED;
    let cp = ControlPlane::start(&[]);
    let mut tcp = connect_from(loopback(9), cp.admin.parse().unwrap()).await;
    tcp.write_all(
        b"GET /metrics HTTP/1.1\r\nhost: admin\r\n\
          authorization: Bearer admin-secret\rx-smuggled: 9c1e\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with(
            "\r\nconnection: close\r\n\r\n\
             malformed header line: a bare CR (a CR not followed by LF)\n"
        ),
        "{answer}"
    );
    let line = cp.wait_for_line("the refused head logged", |l| {
        l.contains(MALFORMED) && l.contains("peer=127.0.0.9:")
    });
    assert!(
        line.contains("answered 400: malformed header line: a bare CR"),
        "{line}"
    );
    let log = cp.log();
    assert!(
        !log.contains("admin-secret") && !log.contains("9c1e"),
        "{log}"
    );
}

/// A method the admin port does not take is answered 405 saying which it
/// does, in `Allow` (RFC 9110 section 15.5.6), as curl shows it.
#[test]
fn the_admin_http_port_s_405_says_what_is_allowed() {
    let cp = ControlPlane::start(&[]);
    let out = std::process::Command::new("curl")
        .args(["-s", "-i", "-X", "POST"])
        .arg(format!("http://{}/live", cp.admin))
        .output()
        .expect("curl runs");
    let answer = String::from_utf8(out.stdout).unwrap();
    assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nallow: get, head\r\n"),
        "{answer}"
    );
}

/// The admin port switches protocols for nothing, and after a request
/// hyper's server may switch for (an HTTP/1.1 `Upgrade`, a `CONNECT`) no
/// later head on the connection would be checked: its answer says
/// `connection: close` (in HTTP/1.0 to an HTTP/1.0 `CONNECT`) and the
/// connection ends with it, so a second request on it is never served.
/// The same request without an `Upgrade` leaves the connection open.
#[tokio::test]
async fn the_admin_http_port_ends_a_connection_after_an_upgrade_or_connect() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cp = ControlPlane::start(&[]);
    let admin = cp.admin.parse().unwrap();
    for (from, first, status) in [
        (
            20,
            "GET /live HTTP/1.1\r\nhost: admin\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            "HTTP/1.1 200 ",
        ),
        (
            21,
            "GET /live HTTP/1.1\r\nhost: admin\r\nupgrade: websocket\r\n\r\n",
            "HTTP/1.1 200 ",
        ),
        (
            22,
            "CONNECT admin:15014 HTTP/1.1\r\nhost: admin:15014\r\n\r\n",
            "HTTP/1.1 405 ",
        ),
        (
            23,
            "CONNECT admin:15014 HTTP/1.0\r\nhost: admin:15014\r\nconnection: keep-alive\r\n\r\n",
            "HTTP/1.0 405 ",
        ),
    ] {
        let mut tcp = connect_from(loopback(from), admin).await;
        // The second request asks to close, so that a connection that
        // goes on after the first answer ends after the second.
        let second = "GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n";
        tcp.write_all(format!("{first}{second}").as_bytes())
            .await
            .unwrap();
        let mut read = Vec::new();
        tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut read))
            .await
            .expect("answered and closed")
            .unwrap();
        assert_one_answer_then_closed(first, status, read);
    }
    // Without an `Upgrade` the connection goes on after the answer.
    let mut tcp = connect_from(loopback(24), admin).await;
    tcp.write_all(
        b"GET /live HTTP/1.1\r\nhost: admin\r\n\r\n\
          GET /live HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut read = String::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_string(&mut read))
        .await
        .expect("answered and closed")
        .unwrap();
    assert_eq!(read.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{read}");
}

/// A request whose head had begun to arrive on the admin port (part of it
/// written, read by the port) when SIGTERM came is answered once the rest
/// comes, after the port stopped accepting, as the connection's last
/// (`connection: close`), and the control plane exits 0; a connection
/// that sent nothing is closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_request_begun_before_sigterm_is_answered_as_the_last() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let cp = ControlPlane::start(&[]);
    let admin = cp.admin.clone();
    let mut silent = tokio::net::TcpStream::connect(&admin).await.unwrap();
    let mut begun = tokio::net::TcpStream::connect(&admin).await.unwrap();
    begun.write_all(b"GET /live HTTP/1.1\r\nho").await.unwrap();
    // Read by the port before the signal.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let log = cp.log.clone();
    let exit = tokio::spawn(cp.stop_async());
    eventually_async("the ports to stop accepting", || {
        let stopped = log.lock().unwrap().contains("no new connections");
        async move { stopped.then_some(()) }
    })
    .await;
    let patience = Duration::from_secs(2);
    assert!(
        closed_within(&mut silent, patience).await.is_some(),
        "a connection that sent nothing was still open {patience:?} after the port stopped"
    );

    begun
        .write_all(b"st: a\r\n\r\n")
        .await
        .expect("the connection whose head had begun is still open after SIGTERM");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), begun.read_to_end(&mut answer))
        .await
        .expect("the request begun before SIGTERM was answered, and the connection closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("\r\n\r\nlive\n"),
        "the request begun before SIGTERM was not answered: {answer:?}\n{}",
        log.lock().unwrap()
    );
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "the answer says the connection closes: {answer}"
    );
    assert!(exit.await.unwrap().success(), "SIGTERM exits 0");
}

/// A `--state-dir` with no `bundle.pem` (a typo, or the directory above
/// the state dir, or a file) is refused saying what `--state-dir` must
/// be, not only that a file is missing; a state dir that lost only
/// `bundle.pem` or `admin.crt` is named as it is.
#[test]
fn a_state_dir_without_a_bundle_says_what_state_dir_must_be() {
    let cp = ControlPlane::start(&[]);
    // What `trellisctl workloads` says on failing (exit 1), given
    // `--state-dir dir`, or the control plane's own when `None`.
    let refused = |dir: Option<&std::path::Path>| {
        let out = match dir {
            Some(dir) => std::process::Command::new(CTL)
                .args(["--control-plane", &cp.grpc, "--state-dir"])
                .arg(dir)
                .arg("workloads")
                .output()
                .unwrap(),
            None => cp.ctl(&["workloads"]),
        };
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{stderr:?}");
        stderr
    };
    let parent = cp.state_dir.parent().expect("the state dir has a parent");
    assert_eq!(
        refused(Some(parent)),
        format!(
            "error: cannot read {}/bundle.pem: no such file or directory: --state-dir names no \
             control plane's state dir: give the one the control plane was started with, where \
             it writes bundle.pem, admin.crt and admin.key\n",
            parent.display()
        )
    );

    // A file given for the state dir is no state dir either.
    let file = cp.state_dir.join("admin.crt");
    assert_eq!(
        refused(Some(&file)),
        format!(
            "error: cannot read {}/bundle.pem: not a directory: --state-dir names no control \
             plane's state dir: give the one the control plane was started with, where it \
             writes bundle.pem, admin.crt and admin.key\n",
            file.display()
        )
    );

    // The state dir itself, without its bundle.pem: it is the control
    // plane's, and only that file is missing.
    let bundle = cp.state_dir.join("bundle.pem");
    let kept = cp.state_dir.join("bundle.pem.kept");
    std::fs::rename(&bundle, &kept).unwrap();
    let stderr = refused(None);
    std::fs::rename(&kept, &bundle).unwrap();
    assert_eq!(
        stderr,
        format!(
            "error: cannot read {}: no such file or directory\n",
            bundle.display()
        )
    );

    // The state dir itself, without its admin.crt.
    std::fs::remove_file(cp.state_dir.join("admin.crt")).unwrap();
    assert_eq!(
        refused(None),
        format!(
            "error: cannot read {}/admin.crt: no such file or directory\n",
            cp.state_dir.display()
        )
    );
}
