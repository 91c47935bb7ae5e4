//! The policy half of the Admin API against the real control plane over
//! real gRPC: apply, get, list, delete, dry runs, refusals that name the
//! field and change nothing, the admin-only guard, persistence across
//! restarts, and Explain.

mod common;

use std::sync::Arc;

use common::policy::*;
use common::*;
use tonic::Code;
use trellis_control_plane::api::policy::policy_errors_of;
use trellis_core::policy::Explanation;
use trellis_proto::admin::v1::admin_client::AdminClient;
use trellis_proto::admin::v1::{ExplainRequest, ListWorkloadsRequest, PolicyOutcome};
use trellis_proto::policy::v1::OpaquePortOrigin;

/// The epoch the control plane's snapshot versions are set in, as
/// ListWorkloads reports it (the embedded store sets one, never 0, each
/// time it is opened).
async fn served_epoch(admin: &mut AdminClient<tonic::transport::Channel>) -> u64 {
    let answer = admin
        .list_workloads(ListWorkloadsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_ne!(answer.snapshot_version_epoch, 0, "{answer:?}");
    answer.snapshot_version_epoch
}

#[tokio::test]
async fn apply_get_list_delete() {
    let cp = ControlPlane::start(&[]);
    enroll(&cp, API, "127.0.0.1:7101").await;
    enroll(&cp, WEB, "127.0.0.1:7102").await;
    let mut admin = cp.admin_client().await;
    let two = format!(
        "{}---\n{}",
        allow("web-to-api", API, WEB, 8080),
        allow("api-to-web", WEB, API, 9090)
    );

    let created = apply(&mut admin, &two, false).await.unwrap();
    assert!(!created.dry_run);
    assert_eq!(created.generation, 1);
    // The write's version names its snapshot with the epoch it was set in.
    let epoch = served_epoch(&mut admin).await;
    assert_eq!(created.snapshot_version_epoch, epoch);
    let outcomes: Vec<_> = created
        .results
        .iter()
        .map(|r| (r.name.as_str(), r.revision, r.outcome()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("web-to-api", 1, PolicyOutcome::Created),
            ("api-to-web", 1, PolicyOutcome::Created)
        ]
    );
    assert_eq!(created.results[0].selected_workloads, [API]);
    assert_eq!(created.results[1].selected_workloads, [WEB]);

    // The same content again changes nothing, not even the counters.
    let again = apply(&mut admin, &two, false).await.unwrap();
    assert!(
        again
            .results
            .iter()
            .all(|r| r.outcome() == PolicyOutcome::Unchanged && r.revision == 1)
    );
    assert_eq!(
        (
            again.generation,
            again.snapshot_version,
            again.snapshot_version_epoch
        ),
        (created.generation, created.snapshot_version, epoch)
    );

    // A change is a new revision and a new snapshot version.
    let updated = apply(&mut admin, &allow("web-to-api", API, WEB, 8443), false)
        .await
        .unwrap();
    assert_eq!(updated.results[0].outcome(), PolicyOutcome::Updated);
    assert_eq!(updated.results[0].revision, 2);
    assert_eq!(updated.generation, 2);
    assert!(updated.snapshot_version > created.snapshot_version);
    assert_eq!(updated.snapshot_version_epoch, epoch);

    let got = admin
        .get_policy(get("default", "web-to-api", ""))
        .await
        .unwrap()
        .into_inner();
    let policy = got.policy.unwrap();
    assert_eq!(policy.revision, 2);
    assert_eq!(policy.rules[0].to[0].ports, [8443]);
    assert!(got.yaml.contains("name: web-to-api"), "{}", got.yaml);
    assert!(got.yaml.contains("8443"), "{}", got.yaml);

    let listed = list(&mut admin).await;
    let names: Vec<_> = listed.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["api-to-web", "web-to-api"]);
    assert_eq!(listed.generation, 2);

    let deleted = admin
        .delete_policy(delete("default", "web-to-api", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.generation, 3);
    assert_eq!(deleted.snapshot_version_epoch, epoch);
    let err = admin
        .delete_policy(delete("default", "web-to-api", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("default/web-to-api"), "{err:?}");
    let err = admin
        .get_policy(get("default", "web-to-api", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // JSON is accepted as well.
    let json = r#"{"apiVersion": "trellis.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "from-json", "namespace": "data"},
        "spec": {"selector": {"spiffeIds": ["spiffe://cluster.local/ns/data/*"]},
                 "action": "DENY", "rules": [{"from": [{"namespace": "default"}]}]}}"#;
    let created = apply(&mut admin, json, false).await.unwrap();
    assert_eq!(created.results[0].name, "from-json");
    assert_eq!(created.results[0].outcome(), PolicyOutcome::Created);
}

#[tokio::test]
async fn an_invalid_policy_is_refused_at_its_field_and_the_stored_one_stays() {
    let cp = ControlPlane::start(&[]);
    let mut admin = cp.admin_client().await;
    let good = allow("web-to-api", API, WEB, 8080);
    let stored = apply(&mut admin, &good, false).await.unwrap();

    // Port 70000 is on line 14, column 19 of the document.
    let bad = allow("web-to-api", API, WEB, 70000);
    let err = apply(&mut admin, &bad, false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("document:14:19: spec.rules[0].to[0].ports[0]: port 70000 is out of range"),
        "{}",
        err.message()
    );
    let details = policy_errors_of(&err).expect("structured details");
    assert_eq!(details.errors.len(), 1);
    let e = &details.errors[0];
    let violation = e.violation.as_ref().unwrap();
    assert_eq!(violation.path, "spec.rules[0].to[0].ports[0]");
    assert!(!violation.warning);
    assert_eq!((e.line, e.column), (14, 19));

    // A batch with one bad document stores none of them.
    let batch = format!(
        "{}---\n{bad}",
        allow("another", WEB, API, 9090).replace("default", "other")
    );
    let err = apply(&mut admin, &batch, false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("document:29:19"),
        "{}",
        err.message()
    );

    let listed = list(&mut admin).await;
    assert_eq!(listed.policies.len(), 1);
    assert_eq!(listed.generation, stored.generation);
    let policy = listed.policies[0].clone();
    assert_eq!(policy.revision, 1);
    assert_eq!(policy.rules[0].to[0].ports, [8080]);

    for (document, needle) in [
        ("", "holds no AuthorizationPolicy"),
        ("apiVersion: v2\n", "apiVersion"),
        ("{ not yaml", "document:"),
    ] {
        let err = apply(&mut admin, document, false).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{document:?}: {err:?}");
        assert!(err.message().contains(needle), "{document:?}: {err:?}");
    }
}

/// Thirty errors would not fit in the headers a client accepts (16 KiB by
/// default): the refusal lists the first ones and counts the rest.
#[tokio::test]
async fn a_refusal_with_many_errors_reaches_the_client_whole() {
    let cp = ControlPlane::start(&["--opaque-ports", "5432"]);
    let mut admin = cp.admin_client().await;
    let rules: String = (0..30)
        .map(|i| format!("    - to: [{{ports: [5432], paths: [\"/p{i}\"]}}]\n"))
        .collect();
    let document = allow("many", API, WEB, 5432).replace(
        "    - from:\n        - spiffeId: spiffe://cluster.local/ns/default/sa/web\n      to:\n        - ports: [5432]\n",
        &rules,
    );
    assert!(document.ends_with("paths: [\"/p29\"]}]\n"), "{document}");

    let err = apply(&mut admin, &document, false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let message = err.message();
    assert!(
        message.starts_with(
            "invalid policy (30 errors): \
             document:11:21: spec.rules[0].to[0].ports[0]: port 5432 is declared opaque"
        ),
        "{message}"
    );
    assert!(
        message.contains("; document:12:21: spec.rules[1]"),
        "{message}"
    );
    let errors = policy_errors_of(&err).expect("structured details").errors;
    let listed = errors.len() - 1;
    assert!((5..30).contains(&listed), "{errors:?}");
    let more = format!(
        "and {} more errors (run `trellisctl policy lint` for all)",
        30 - listed
    );
    assert!(message.ends_with(&format!("; {more}")), "{message}");
    assert_eq!((errors[0].line, errors[0].column), (11, 21));
    assert_eq!(errors[listed].line, 0);
    assert_eq!(errors[listed].violation.as_ref().unwrap().message, more);
    assert_eq!(list(&mut admin).await.generation, 0);
}

/// A hostile document of an error every few bytes: validation keeps a
/// thousand and counts the rest, and the refusal counts them all. A
/// document of more list items than any policy has is refused before it is
/// read, as reading it would take hundreds of megabytes.
#[tokio::test]
async fn a_document_of_an_error_every_few_bytes_is_refused_with_all_counted() {
    let cp = ControlPlane::start(&[]);
    let mut admin = cp.admin_client().await;
    let ports = vec!["0"; 2_000_000].join(",");
    let document = allow("many", API, WEB, 8080).replace("8080", &ports);
    assert!(document.len() > 3_000_000);
    let err = apply(&mut admin, &document, false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("document:14:")
            && err
                .message()
                .contains("more than 50000 list items in one document"),
        "{}",
        err.message()
    );
    assert_eq!(list(&mut admin).await.generation, 0);

    let ports = vec!["0"; 45_000].join(",");
    let document = allow("many", API, WEB, 8080).replace("8080", &ports);

    let err = apply(&mut admin, &document, false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let message = err.message();
    assert!(
        message.starts_with(
            "invalid policy (45000 errors): \
             document:14:19: spec.rules[0].to[0].ports[0]: port 0 is out of range 1..=65535; "
        ),
        "{message}"
    );
    let listed = policy_errors_of(&err)
        .expect("structured details")
        .errors
        .len()
        - 1;
    assert!(
        message.ends_with(&format!(
            "; and {} more errors (run `trellisctl policy lint` for all)",
            45_000 - listed
        )),
        "{message}"
    );
    assert_eq!(list(&mut admin).await.generation, 0);
}

/// Valid policies keep a thousand warnings between them; each result says
/// how many of its own were left out.
#[tokio::test]
async fn warnings_past_the_cap_are_counted_in_each_result() {
    let cp = ControlPlane::start(&[]);
    let mut admin = cp.admin_client().await;
    let ports = vec!["8080"; 601].join(", ");
    let documents: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|name| allow(name, API, WEB, 8080).replace("8080", &ports))
        .collect();

    let applied = apply(&mut admin, &documents.join("---\n"), true)
        .await
        .unwrap();
    let counts: Vec<usize> = applied.results.iter().map(|r| r.warnings.len()).collect();
    assert_eq!(counts, [600, 401, 1]);
    let last = |i: usize| {
        let w = applied.results[i].warnings.last().unwrap();
        (w.path.as_str(), w.message.as_str(), w.warning)
    };
    assert_eq!(
        last(1),
        (
            "",
            "and 200 more warnings (run `trellisctl policy lint` for all)",
            true
        )
    );
    assert_eq!(
        last(2).1,
        "and 600 more warnings (run `trellisctl policy lint` for all)"
    );
}

#[tokio::test]
async fn a_dry_run_reports_selected_workloads_and_stores_nothing() {
    let cp = ControlPlane::start(&[]);
    enroll(&cp, API, "127.0.0.1:7111").await;
    enroll(&cp, DB, "127.0.0.1:7112").await;
    let mut admin = cp.admin_client().await;
    // Selecting the workloads of every namespace is for the root namespace.
    let root = "trellis-system";
    let before = apply(
        &mut admin,
        &allow_in(root, "web-to-api", API, WEB, 8080),
        false,
    )
    .await
    .unwrap();

    let wide = allow_in(root, "web-to-api", "spiffe://cluster.local/ns/*", WEB, 8080);
    let dry = apply(&mut admin, &wide, true).await.unwrap();
    assert!(dry.dry_run);
    assert_eq!(dry.results[0].outcome(), PolicyOutcome::Updated);
    assert_eq!(dry.results[0].revision, 2, "the revision it would get");
    let mut selected = dry.results[0].selected_workloads.clone();
    selected.sort();
    assert_eq!(selected, [DB, API]);
    assert_eq!(
        (
            dry.generation,
            dry.snapshot_version,
            dry.snapshot_version_epoch
        ),
        (
            before.generation,
            before.snapshot_version,
            served_epoch(&mut admin).await
        )
    );

    let got = admin
        .get_policy(get(root, "web-to-api", ""))
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(got.revision, 1);
    assert_eq!(got.selector.unwrap().spiffe_ids, [API]);

    let new = apply(&mut admin, &allow("new", DB, WEB, 1), true)
        .await
        .unwrap();
    assert_eq!(new.results[0].outcome(), PolicyOutcome::Created);
    let err = admin.get_policy(get("data", "new", "")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// An ApplyPolicy of thousands of policies is logged in one INFO line,
/// counting them by outcome and naming the first few it changed, with the
/// snapshot version (its epoch in hex, as the other lines give it) and the
/// caller; not in a line per policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_apply_is_logged_in_one_line() {
    const POLICIES: usize = 3000;
    let cp = ControlPlane::start(&[]);
    let mut admin = cp.admin_client().await;
    let document = |port_of: &dyn Fn(usize) -> u32, count: usize| {
        (0..count)
            .map(|i| allow(&format!("p{i:04}"), API, WEB, port_of(i)))
            .collect::<Vec<_>>()
            .join("---\n")
    };
    let summaries = |log: &str| {
        log.lines()
            .filter(|l| l.contains("policies applied"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let answer = apply(&mut admin, &document(&|_| 8080, POLICIES), false)
        .await
        .unwrap();
    let epoch = format!("{:016x}", served_epoch(&mut admin).await);
    let line = cp.wait_for_line("the apply's line", |l| l.contains("policies applied"));
    assert!(line.contains(" INFO "), "{line}");
    for field in [
        format!("created={POLICIES} "),
        "updated=0 ".to_owned(),
        "unchanged=0 ".to_owned(),
        format!("snapshot_version={} ", answer.snapshot_version),
        format!("snapshot_version_epoch={epoch} "),
        "caller=spiffe://cluster.local/trellis/admin ".to_owned(),
        "changed=AuthorizationPolicy default/p0000, AuthorizationPolicy default/p0001, \
         AuthorizationPolicy default/p0002, AuthorizationPolicy default/p0003, \
         AuthorizationPolicy default/p0004, and 2995 more"
            .to_owned(),
    ] {
        assert!(line.contains(&field), "no {field:?} in {line}");
    }

    // Two changed, one more, the rest as they were.
    let port_of = |i: usize| if i == 7 || i == 2000 { 9090 } else { 8080 };
    let answer = apply(&mut admin, &document(&port_of, POLICIES + 1), false)
        .await
        .unwrap();
    let second = eventually("the second apply's line", || {
        summaries(&cp.log()).get(1).cloned()
    });
    for field in [
        "created=1 ".to_owned(),
        "updated=2 ".to_owned(),
        format!("unchanged={} ", POLICIES - 2),
        format!("snapshot_version={} ", answer.snapshot_version),
        "changed=AuthorizationPolicy default/p0007, AuthorizationPolicy default/p2000, \
         AuthorizationPolicy default/p3000"
            .to_owned(),
    ] {
        assert!(second.contains(&field), "no {field:?} in {second}");
    }
    let log = cp.log();
    assert_eq!(summaries(&log).len(), 2, "{log}");
    let per_policy = log.lines().filter(|l| l.contains("policy applied")).count();
    assert_eq!(per_policy, 0, "a line per policy at INFO");
}

#[tokio::test]
async fn a_sidecar_identity_may_not_apply_policies() {
    let cp = ControlPlane::start(&[]);
    let workload = enroll(&cp, WEB, "").await;
    let channel =
        trellis_core::grpc::connect(&cp.grpc, Arc::new(cp.client_config(Some(&workload))))
            .await
            .unwrap();
    let mut as_sidecar = AdminClient::new(channel);
    let err = apply(&mut as_sidecar, &allow("sneaky", WEB, WEB, 1), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains(WEB), "{err:?}");
    let err = as_sidecar
        .explain(ExplainRequest {
            source: WEB.into(),
            destination: API.into(),
            port: 80,
            opaque_ports: Vec::new(),
            request: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let mut admin = cp.admin_client().await;
    let listed = list(&mut admin).await;
    assert!(listed.policies.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_survive_a_restart() {
    let cp = ControlPlane::start(&[]);
    let mut admin = cp.admin_client().await;
    apply(&mut admin, &allow("web-to-api", API, WEB, 8080), false)
        .await
        .unwrap();
    let applied = apply(&mut admin, &allow("web-to-api", API, WEB, 8081), false)
        .await
        .unwrap();
    drop(admin);
    let tmp = cp.tmp.clone();
    assert!(cp.stop_async().await.success());

    let cp = ControlPlane::start_in(tmp, &[]);
    let mut admin = cp.admin_client().await;
    let listed = list(&mut admin).await;
    assert_eq!(listed.generation, applied.generation);
    assert_eq!(listed.policies.len(), 1);
    assert_eq!(listed.policies[0].revision, 2);
    assert_eq!(listed.policies[0].rules[0].to[0].ports, [8081]);
}

/// On one of the mesh's opaque ports, a DENY rule's HTTP conditions
/// without `ports` cannot be checked: the explanation says the rule denies
/// the whole connection there, as the sidecars enforce it.
#[tokio::test]
async fn explain_says_an_l7_deny_fails_closed_on_a_mesh_opaque_port() {
    let cp = ControlPlane::start(&["--opaque-ports", "5432"]);
    let mut admin = cp.admin_client().await;
    let deny = allow("no-admin", API, WEB, 8080)
        .replace("ALLOW", "DENY")
        .replace("- ports: [8080]", "- paths: [/admin]");
    apply(&mut admin, &deny, false).await.unwrap();
    let explanation = admin
        .explain(ExplainRequest {
            source: WEB.into(),
            destination: API.into(),
            port: 5432,
            opaque_ports: Vec::new(),
            request: None,
        })
        .await
        .unwrap()
        .into_inner()
        .explanation
        .unwrap();
    assert_eq!(explanation.verdict, "deny");
    let rule = explanation.deciding_rule.unwrap();
    assert_eq!((rule.policy.as_str(), rule.rule), ("default/no-admin", 0));
    let why = &explanation.policies[0].rules[0].why;
    assert!(
        why.ends_with(
            "port 5432 is opaque (never parsed as HTTP): the rule's HTTP conditions cannot be \
             matched there, so the rule denies the whole connection"
        ),
        "{why}"
    );
}

/// On a port parsed as HTTP, a rule's HTTP conditions are checked on each
/// request, as the sidecars enforce them: `trellisctl policy explain` says
/// so of an L7 DENY without `ports` and of an L7 ALLOW naming the port,
/// and never that a rule whose source and port match "does not match".
#[tokio::test]
async fn explain_says_l7_rules_are_decided_per_request_on_a_parsed_port() {
    let cp = ControlPlane::start(&[]);
    let mut admin = cp.admin_client().await;
    let deny = allow("no-admin", API, WEB, 8080)
        .replace("ALLOW", "DENY")
        .replace("- ports: [8080]", "- paths: [/admin]");
    let reads = allow("reads", API, WEB, 8080).replace(
        "- ports: [8080]",
        "- ports: [8080]\n          methods: [GET]",
    );
    apply(&mut admin, &format!("{deny}---\n{reads}"), false)
        .await
        .unwrap();

    let explained = cp.ctl(&[
        "policy", "explain", "--from", WEB, "--to", API, "--port", "8080",
    ]);
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(explained.status.success(), "{text}");
    assert!(!text.contains("does not match"), "{text}");
    assert!(
        text.contains(&format!(
            "  default/no-admin (DENY): selects the destination\n    rule 0: decided per HTTP \
             request: source matches spiffeId {WEB}; any port, with L7 matches\n"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "  default/reads (ALLOW): selects the destination\n    rule 0: decided per HTTP \
             request: source matches spiffeId {WEB}; port 8080 is listed with L7 matches\n"
        )),
        "{text}"
    );

    // Another source matches neither rule, whatever its requests.
    let other = "spiffe://cluster.local/ns/default/sa/other";
    let explained = cp.ctl(&[
        "policy", "explain", "--from", other, "--to", API, "--port", "8080",
    ]);
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(explained.status.success(), "{text}");
    assert!(!text.contains("decided per HTTP request"), "{text}");
    assert!(
        text.contains("rule 0: does not match: no source matches"),
        "{text}"
    );
}

/// The verdict line of `trellisctl policy explain` says when L7 rules of
/// matching policies decide the HTTP requests on a port parsed as HTTP one
/// by one, as the sidecar does, and what a connection that is not HTTP
/// gets; `-o json` and the Admin API's answer carry it as `per_request`.
/// On an opaque port the connection's verdict is the whole story.
#[tokio::test]
async fn explain_verdict_names_the_l7_rules_that_decide_requests() {
    let cp = ControlPlane::start(&[]);
    let mut admin = cp.admin_client().await;
    // An ALLOW with only HTTP conditions, under the mesh's default deny.
    let reads = allow("reads", API, WEB, 8080).replace("- ports: [8080]", "- paths: [/api]");
    apply(&mut admin, &reads, false).await.unwrap();
    let args = [
        "policy", "explain", "--from", WEB, "--to", API, "--port", "8080",
    ];
    let explained = cp.ctl(&args);
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(explained.status.success(), "{text}");
    assert!(
        text.starts_with(&format!(
            "{WEB} -> {API} port 8080: deny by default:deny, except HTTP requests allowed per \
             request by default/reads rule 0\n  a connection that is not HTTP: deny by \
             default:deny: no policy allows this connection (the connection is admitted for \
             HTTP requests only)\n"
        )),
        "{text}"
    );
    let json = cp.ctl(&[&args[..], &["-o", "json"]].concat());
    assert!(json.status.success(), "{json:?}");
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["verdict"], "deny", "{json}");
    assert_eq!(
        json["denied_because"], "no policy allows this connection",
        "{json}"
    );
    assert_eq!(
        json["per_request"],
        serde_json::json!({
            "allowed_by": {"policy": "default/reads", "rule": 0},
            "denied_by": null,
            "audited_by": [],
            "not_http": {
                "verdict": "deny",
                "decided_by": "default:deny",
                "deciding_rule": null,
                "audits": [],
                "denied_because": "no policy allows this connection",
            },
        }),
        "{json}"
    );

    // Held opaque, the port never carries requests: the ALLOW allows
    // nothing there.
    let opaque = cp.ctl(&[&args[..], &["--opaque-ports", "8080", "-o", "json"]].concat());
    assert!(opaque.status.success(), "{opaque:?}");
    let opaque: serde_json::Value = serde_json::from_slice(&opaque.stdout).unwrap();
    assert_eq!(opaque["per_request"], serde_json::Value::Null, "{opaque}");
    let trace = opaque["trace"].as_str().unwrap();
    assert!(
        trace.starts_with(&format!(
            "{WEB} -> {API} port 8080: deny by default:deny: no policy allows this \
             connection\n  port"
        )),
        "{trace}"
    );

    // A DENY with only HTTP conditions under an ALLOW of the connection.
    let deny = allow("no-admin", API, WEB, 8080)
        .replace("ALLOW", "DENY")
        .replace("- ports: [8080]", "- paths: [/admin]");
    let both = format!("{}---\n{deny}", allow("web-to-api", API, WEB, 8080));
    apply(&mut admin, &both, false).await.unwrap();
    let explained = cp.ctl(&args);
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(explained.status.success(), "{text}");
    assert!(
        text.starts_with(&format!(
            "{WEB} -> {API} port 8080: allow by default/web-to-api rule 0, except HTTP requests \
             denied per request by default/no-admin rule 0\n  a connection that is not HTTP: \
             deny by default/no-admin rule 0 (its HTTP conditions cannot be checked on bytes)\n"
        )),
        "{text}"
    );
    let answer = explain_web_to_api(&mut admin, 8080).await;
    assert_eq!(answer.verdict, "allow");
    let per_request = answer.per_request.unwrap();
    assert_eq!(per_request.allowed_by, None);
    let denied_by = per_request.denied_by.unwrap();
    assert_eq!(
        (denied_by.policy.as_str(), denied_by.rule),
        ("default/no-admin", 0)
    );

    // An AUDIT with only HTTP conditions: the sidecar reports the requests
    // they match as "would deny", and a connection that is not HTTP whole
    // (here denied by the DENY first).
    let watch = allow("watch", API, WEB, 8080)
        .replace("ALLOW", "AUDIT")
        .replace("- ports: [8080]", "- paths: [/debug]");
    apply(&mut admin, &watch, false).await.unwrap();
    let explained = cp.ctl(&args);
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(explained.status.success(), "{text}");
    assert!(
        text.starts_with(&format!(
            "{WEB} -> {API} port 8080: allow by default/web-to-api rule 0, except HTTP requests \
             denied per request by default/no-admin rule 0; HTTP requests audited per request \
             by default/watch rule 0\n  a connection that is not HTTP: deny by default/no-admin \
             rule 0 (its HTTP conditions cannot be checked on bytes)\n"
        )),
        "{text}"
    );
    let json = cp.ctl(&[&args[..], &["-o", "json"]].concat());
    assert!(json.status.success(), "{json:?}");
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(
        json["per_request"]["audited_by"],
        serde_json::json!([{"policy": "default/watch", "rule": 0}]),
        "{json}"
    );
    let answer = explain_web_to_api(&mut admin, 8080).await;
    let audited: Vec<_> = (answer.per_request.unwrap().audited_by.iter())
        .map(|r| (r.policy.clone(), r.rule))
        .collect();
    assert_eq!(audited, [("default/watch".to_owned(), 0)]);
}

/// A port the destination's connected sidecars declare opaque themselves
/// is opaque to Explain too, as those sidecars enforce it: an L7 DENY
/// denies the whole connection there. The explanation says where the port
/// came from, and that the sidecars disagree when only some declare it;
/// once they are gone, the port is a port like any other again.
#[tokio::test]
async fn explain_knows_the_opaque_ports_of_the_destinations_sidecars() {
    let cp = ControlPlane::start(&[]);
    let mut admin = cp.admin_client().await;
    let deny = allow("no-admin", API, WEB, 5432)
        .replace("ALLOW", "DENY")
        .replace("- ports: [5432]", "- paths: [/admin]");
    let both = format!("{}---\n{deny}", allow("web-to-api", API, WEB, 5432));
    apply(&mut admin, &both, false).await.unwrap();
    let parsed = explain_web_to_api(&mut admin, 5432).await;
    assert_eq!(parsed.verdict, "allow");
    assert_eq!(parsed.opaque, None);

    let api = enroll(&cp, API, "127.0.0.1:7101").await;
    let mut declaring = Watcher::open_declaring(&cp, &api, "127.0.0.1:7101", &[5432, 6379])
        .await
        .unwrap();
    // Its stream is open once it sends the first snapshot.
    declaring.next().await;
    let opaque = explain_web_to_api(&mut admin, 5432).await;
    assert_eq!(opaque.verdict, "deny", "{opaque:?}");
    let rule = opaque.deciding_rule.as_ref().unwrap();
    assert_eq!((rule.policy.as_str(), rule.rule), ("default/no-admin", 0));
    assert_eq!(
        opaque.opaque,
        Some(OpaquePortOrigin {
            mesh: false,
            declaring_sidecars: 1,
            connected_sidecars: 1,
            requested: false,
        })
    );
    let text = Explanation::from_proto(&opaque).unwrap().to_string();
    assert!(
        text.contains(
            "port 5432 is opaque (never parsed as HTTP): declared by the destination's sidecar \
             (its --opaque-ports)"
        ),
        "{text}"
    );
    // Another port is still parsed as HTTP.
    assert_eq!(explain_web_to_api(&mut admin, 8080).await.opaque, None);

    // A second pod of the identity that does not declare it: they disagree.
    let mut silent = Watcher::open(&cp, &api, "127.0.0.1:7102").await;
    silent.next().await;
    let disputed = explain_web_to_api(&mut admin, 5432).await;
    let origin = disputed.opaque.unwrap();
    assert_eq!(
        (origin.declaring_sidecars, origin.connected_sidecars),
        (1, 2)
    );
    let text = Explanation::from_proto(&disputed).unwrap().to_string();
    assert!(text.contains("the sidecars disagree"), "{text}");

    drop((declaring, silent));
    let closed = eventually_async("the streams to close", || {
        let mut admin = admin.clone();
        async move {
            let e = explain_web_to_api(&mut admin, 5432).await;
            e.opaque.is_none().then_some(e)
        }
    })
    .await;
    assert_eq!(closed.verdict, "allow");
}

/// A peer replica that does not answer may hold streams of the
/// destination's sidecars, whose opaque ports Explain then does not know:
/// the answer names it, and so do `trellisctl policy explain`'s trace and
/// its JSON, while the ports of the sidecars streaming here still count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_names_a_peer_that_did_not_answer() {
    // Takes connections and never answers: the peer times out.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = silent.local_addr().unwrap().to_string();
    let cp = ControlPlane::start(&["--peers", &peer, "--replica-name", "cp-a"]);
    let mut admin = cp.admin_client().await;
    apply(&mut admin, &allow("web-to-api", API, WEB, 5432), false)
        .await
        .unwrap();
    let api = enroll(&cp, API, "127.0.0.1:7101").await;
    let mut declaring = Watcher::open_declaring(&cp, &api, "127.0.0.1:7101", &[5432])
        .await
        .unwrap();
    declaring.next().await;

    let request = ExplainRequest {
        source: WEB.into(),
        destination: API.into(),
        port: 5432,
        opaque_ports: Vec::new(),
        request: None,
    };
    let answer = admin.explain(request).await.unwrap().into_inner();
    let origin = answer.explanation.unwrap().opaque.unwrap();
    assert_eq!(
        (origin.declaring_sidecars, origin.connected_sidecars),
        (1, 1)
    );
    let [unanswered] = &answer.unanswered_replicas[..] else {
        panic!("{:?}", answer.unanswered_replicas);
    };
    assert_eq!(unanswered.address, peer);
    assert!(!unanswered.not_listening, "{unanswered:?}");
    assert!(
        unanswered.error.contains("no answer within"),
        "{unanswered:?}"
    );

    let args = [
        "policy", "explain", "--from", WEB, "--to", API, "--port", "5432",
    ];
    let explained = cp.ctl(&args);
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(explained.status.success(), "{text}");
    assert!(
        text.contains("declared by the destination's sidecar (its --opaque-ports)"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "replica at {peer} did not answer (no answer within 3 seconds): the opaque ports of the \
             sidecars streaming to it are not known, and one of the destination's may hold the \
             port opaque\n"
        )),
        "{text}"
    );
    let json = cp.ctl(&[&args[..], &["-o", "json"]].concat());
    assert!(json.status.success(), "{json:?}");
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let unanswered = &json["unanswered_replicas"];
    assert_eq!(unanswered.as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(unanswered[0]["address"], peer.as_str());
    assert_eq!(unanswered[0]["not_listening"], false);
}

/// Explain of a connection from WEB to API on `port`.
async fn explain_web_to_api(
    admin: &mut AdminClient<tonic::transport::Channel>,
    port: u32,
) -> trellis_proto::policy::v1::Explanation {
    let request = ExplainRequest {
        source: WEB.into(),
        destination: API.into(),
        port,
        opaque_ports: Vec::new(),
        request: None,
    };
    (admin.explain(request).await)
        .unwrap()
        .into_inner()
        .explanation
        .unwrap()
}

/// A port the request names (`--opaque-ports` of `trellisctl policy
/// explain`, for a sidecar not connected now) is opaque for the
/// destination; a number that is not a port is refused naming the field,
/// as is a sidecar that subscribes declaring one.
#[tokio::test]
async fn explain_takes_opaque_ports_in_the_request_and_refuses_bad_ones() {
    let cp = ControlPlane::start(&[]);
    let mut admin = cp.admin_client().await;
    let deny = allow("no-admin", API, WEB, 5432)
        .replace("ALLOW", "DENY")
        .replace("- ports: [5432]", "- paths: [/admin]");
    apply(&mut admin, &deny, false).await.unwrap();
    let explain = |opaque_ports: Vec<u32>| ExplainRequest {
        source: WEB.into(),
        destination: API.into(),
        port: 5432,
        opaque_ports,
        request: None,
    };
    let what_if = admin
        .explain(explain(vec![6379, 5432]))
        .await
        .unwrap()
        .into_inner()
        .explanation
        .unwrap();
    assert_eq!(what_if.verdict, "deny");
    assert!(what_if.deciding_rule.is_some());
    assert!(what_if.opaque.unwrap().requested);
    let text = Explanation::from_proto(&what_if).unwrap().to_string();
    assert!(
        text.contains("port 5432 is opaque (never parsed as HTTP): named in the request"),
        "{text}"
    );

    for bad in [0, 65536] {
        let err = admin.explain(explain(vec![5432, bad])).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            err.message(),
            format!("opaque_ports: {bad} is not in 1-65535"),
            "{err:?}"
        );
    }

    let api = enroll(&cp, API, "127.0.0.1:7101").await;
    let refused = match Watcher::open_declaring(&cp, &api, "127.0.0.1:7101", &[0]).await {
        Ok(mut watcher) => watcher.snapshots.message().await.unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(
        refused.message(),
        "Subscribe.opaque_ports: 0 is not in 1-65535"
    );
}

#[tokio::test]
async fn explain_names_the_deciding_rule() {
    let cp = ControlPlane::start(&[]);
    let mut admin = cp.admin_client().await;
    apply(&mut admin, &allow("web-to-api", API, WEB, 8080), false)
        .await
        .unwrap();
    let explain = |port| ExplainRequest {
        source: WEB.into(),
        destination: API.into(),
        port,
        opaque_ports: Vec::new(),
        request: None,
    };
    let allowed = admin
        .explain(explain(8080))
        .await
        .unwrap()
        .into_inner()
        .explanation
        .unwrap();
    assert_eq!(allowed.verdict, "allow");
    let rule = allowed.deciding_rule.unwrap();
    assert_eq!((rule.policy.as_str(), rule.rule), ("default/web-to-api", 0));
    assert_eq!(allowed.policies.len(), 1);

    let denied = admin
        .explain(explain(9999))
        .await
        .unwrap()
        .into_inner()
        .explanation
        .unwrap();
    assert_eq!(denied.verdict, "deny");
    assert!(denied.deciding_rule.is_none());
    assert_eq!(denied.default_policy, "deny");

    let err = admin.explain(explain(0)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("port:"), "{err:?}");
    let err = admin
        .explain(ExplainRequest {
            source: "web".into(),
            ..explain(80)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("source:"), "{err:?}");
}

/// GetPolicy and DeletePolicy of a namespace or name no document could have
/// (not a DNS label, empty, longer than 63 bytes) answer INVALID_ARGUMENT
/// naming the field and the rule ApplyPolicy holds names to, not NOT_FOUND:
/// the mistake is the request's. A value too long is named by its length.
/// Of either kind, and the stored policy beside them is untouched.
#[tokio::test]
async fn get_and_delete_of_a_name_no_policy_could_have_are_invalid_arguments() {
    let cp = ControlPlane::start(&[]);
    let mut admin = cp.admin_client().await;
    apply(&mut admin, &allow("web-to-api", API, WEB, 8080), false)
        .await
        .unwrap();
    const RULE: &str = "must be a DNS-1123 label: at most 63 characters of a-z, 0-9 and '-', \
                        starting and ending with a letter or digit";
    let long = "a".repeat(64);
    let huge = "a".repeat(100_000);
    for (namespace, name, says) in [
        (
            "Default!",
            "web-to-api",
            format!("namespace: invalid namespace \"Default!\": {RULE}"),
        ),
        (
            "default",
            "web-to-api-",
            format!("name: invalid name \"web-to-api-\": {RULE}"),
        ),
        ("default", "", "name: must be set".to_owned()),
        ("", "web-to-api", "namespace: must be set".to_owned()),
        (
            "default",
            &long,
            format!("name: invalid name (64 bytes long): {RULE}"),
        ),
        (
            &huge,
            "web-to-api",
            format!("namespace: invalid namespace (100000 bytes long): {RULE}"),
        ),
    ] {
        for kind in ["", "AuthorizationPolicy", "RateLimitPolicy"] {
            let err = admin
                .get_policy(get(namespace, name, kind))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{says}: {err:?}");
            assert_eq!(err.message(), says);
            let err = admin
                .delete_policy(delete(namespace, name, kind))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{says}: {err:?}");
            assert_eq!(err.message(), says);
        }
    }
    let got = admin
        .get_policy(get("default", "web-to-api", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.policy.unwrap().name, "web-to-api");
}
