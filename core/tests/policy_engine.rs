//! The decision engine as the sidecar and `policy explain` use it, from
//! policies written as operators write them.

use trellis_core::SpiffeId;
use trellis_core::TrustDomain;
use trellis_core::policy::{
    CompileError, DefaultPolicy, Explanation, OpaquePorts, PolicySet, Reason, Verdict, explain,
    load_source, selects,
};
use trellis_proto::policy::v1 as proto;

const API: &str = "spiffe://cluster.local/ns/default/sa/api";
const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const PROM: &str = "spiffe://cluster.local/ns/monitoring/sa/prometheus";
const LEGACY: &str = "spiffe://cluster.local/ns/legacy/sa/old";
const ADMIN: &str = "spiffe://cluster.local/trellis/admin";

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// Validated protobuf policies from YAML documents.
fn policies(yaml: &str) -> Vec<proto::Policy> {
    let td = TrustDomain::new("cluster.local").unwrap();
    let loaded = load_source("test.yaml", yaml, &td);
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    loaded
        .policies
        .iter()
        .map(|p| p.policy.to_proto())
        .collect()
}

/// One policy document for the api workload.
fn policy(name: &str, action: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: trellis.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  selector: {{spiffeIds: [\"{API}\"]}}\n  action: {action}\n  rules:\n{rules}"
    )
}

fn set(yaml: &str, default: DefaultPolicy) -> PolicySet {
    PolicySet::compile(&id(API), &policies(yaml), default).unwrap()
}

#[test]
fn default_deny_blocks_everything() {
    let set = set("", DefaultPolicy::Deny);
    let decision = set.decide(&id(WEB), 8080);
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(decision.policy_label(), "default:deny");
    assert_eq!(decision.rule(), None);
    assert_eq!(decision.to_string(), "deny by default:deny");
}

#[test]
fn allow_lets_one_identity_in_and_keeps_another_out() {
    let yaml = policy(
        "web-to-api",
        "ALLOW",
        &format!("    - from: [{{spiffeId: \"{WEB}\"}}]\n      to: [{{ports: [8080]}}]\n"),
    );
    let set = set(&yaml, DefaultPolicy::Deny);
    let allowed = set.decide(&id(WEB), 8080);
    assert!(allowed.is_allowed());
    assert_eq!(allowed.to_string(), "allow by default/web-to-api rule 0");
    assert_eq!(set.decide(&id(PROM), 8080).verdict, Verdict::Deny);
    assert_eq!(set.decide(&id(WEB), 9090).verdict, Verdict::Deny);
}

#[test]
fn deny_beats_allow_whatever_the_names() {
    let yaml = [
        policy("a-allow-all", "ALLOW", "    - {}\n"),
        policy(
            "z-deny-legacy",
            "DENY",
            "    - from: [{namespace: legacy}]\n",
        ),
    ]
    .concat();
    let set = set(&yaml, DefaultPolicy::AllowMesh);
    let denied = set.decide(&id(LEGACY), 8080);
    assert_eq!(denied.verdict, Verdict::Deny);
    assert_eq!(denied.policy_label(), "default/z-deny-legacy");
    assert_eq!(
        set.decide(&id(WEB), 8080).policy_label(),
        "default/a-allow-all"
    );
}

#[test]
fn audit_never_changes_the_verdict_but_is_reported() {
    let yaml = [
        policy(
            "allow-web",
            "ALLOW",
            &format!("    - from: [{{spiffeId: \"{WEB}\"}}]\n"),
        ),
        policy(
            "audit-9090",
            "AUDIT",
            "    - to: [{ports: [8080]}]\n    - to: [{ports: [9090]}]\n",
        ),
        policy("audit-all", "AUDIT", "    - {}\n"),
    ]
    .concat();
    let set = set(&yaml, DefaultPolicy::Deny);

    let allowed = set.decide(&id(WEB), 9090);
    assert_eq!(allowed.verdict, Verdict::Allow);
    assert_eq!(
        allowed.to_string(),
        "allow by default/allow-web rule 0; would deny by default/audit-9090 rule 1, default/audit-all rule 0"
    );

    let denied = set.decide(&id(PROM), 9090);
    assert_eq!(denied.verdict, Verdict::Deny);
    assert_eq!(denied.reason, Reason::Default(DefaultPolicy::Deny));
    // Denied anyway: an AUDIT rule reports only what is allowed today.
    assert_eq!(denied.audits, []);

    // With only AUDIT policies, the default still decides.
    let only_audit = set_of_audit_only();
    assert_eq!(only_audit.decide(&id(WEB), 1).verdict, Verdict::Allow);
    assert_eq!(only_audit.decide(&id(WEB), 1).audits.len(), 1);
}

fn set_of_audit_only() -> PolicySet {
    set(
        &policy("audit-all", "AUDIT", "    - {}\n"),
        DefaultPolicy::AllowMesh,
    )
}

#[test]
fn each_default_mode() {
    let deny = set("", DefaultPolicy::Deny);
    let same_ns = set("", DefaultPolicy::AllowSameNamespace);
    let mesh = set("", DefaultPolicy::AllowMesh);
    let outsider = "spiffe://other.org/ns/default/sa/web";
    let cases = [
        (WEB, [Verdict::Deny, Verdict::Allow, Verdict::Allow]),
        (PROM, [Verdict::Deny, Verdict::Deny, Verdict::Allow]),
        (ADMIN, [Verdict::Deny, Verdict::Deny, Verdict::Allow]),
        (outsider, [Verdict::Deny, Verdict::Deny, Verdict::Deny]),
    ];
    for (source, want) in cases {
        let got = [&deny, &same_ns, &mesh].map(|s| s.decide(&id(source), 8080).verdict);
        assert_eq!(got, want, "{source}");
    }
    assert_eq!(
        mesh.decide(&id(WEB), 1).policy_label(),
        "default:allow-mesh"
    );
    for mode in [
        DefaultPolicy::Deny,
        DefaultPolicy::AllowSameNamespace,
        DefaultPolicy::AllowMesh,
    ] {
        assert_eq!(mode.to_string().parse::<DefaultPolicy>(), Ok(mode));
    }
    assert!("allow".parse::<DefaultPolicy>().is_err());
}

#[test]
fn prefix_namespace_and_trust_domain_sources() {
    let yaml = [
        policy("prefix", "ALLOW", "    - from: [{spiffeId: \"spiffe://cluster.local/ns/default/*\"}]\n      to: [{ports: [1]}]\n"),
        policy("namespace", "ALLOW", "    - from: [{namespace: monitoring}]\n      to: [{ports: [2]}]\n"),
        policy("domain", "ALLOW", "    - from: [{trustDomain: cluster.local}]\n      to: [{ports: [3]}]\n"),
    ]
    .concat();
    let set = set(&yaml, DefaultPolicy::Deny);
    let allowed = |source: &str, port| set.decide(&id(source), port).is_allowed();
    assert!(allowed(WEB, 1));
    assert!(!allowed(PROM, 1));
    assert!(allowed(PROM, 2));
    assert!(!allowed(WEB, 2));
    assert!(!allowed("spiffe://cluster.local/ns/monitoringx/sa/a", 2));
    assert!(allowed(ADMIN, 3));
}

#[test]
fn the_first_matching_rule_decides_across_ports() {
    let rules = "    - to: [{ports: [8080]}]\n    - {}\n    - to: [{ports: [8080, 9090]}]\n";
    let set = set(&policy("p", "ALLOW", rules), DefaultPolicy::Deny);
    assert_eq!(set.decide(&id(WEB), 8080).rule(), Some(0));
    assert_eq!(set.decide(&id(WEB), 9090).rule(), Some(1));
    let any_first = set_with_rules("    - {}\n    - to: [{ports: [8080]}]\n");
    assert_eq!(any_first.decide(&id(WEB), 8080).rule(), Some(0));
}

fn set_with_rules(rules: &str) -> PolicySet {
    set(&policy("p", "ALLOW", rules), DefaultPolicy::Deny)
}

#[test]
fn compile_ignores_policies_for_other_workloads() {
    let mut all = policies(&policy("for-api", "DENY", "    - {}\n"));
    let mut other = all[0].clone();
    other.name = "for-web".into();
    other.selector = Some(proto::Selector {
        spiffe_ids: vec!["spiffe://cluster.local/ns/default/sa/web".into()],
    });
    all.push(other.clone());
    assert!(selects(&all[0], &id(API)));
    assert!(!selects(&other, &id(API)));
    let set = PolicySet::compile(&id(API), &all, DefaultPolicy::Deny).unwrap();
    assert_eq!(set.policy_names().collect::<Vec<_>>(), ["default/for-api"]);
}

#[test]
fn compile_rejects_an_invalid_policy_with_a_reason() {
    let mut bad = policies(&policy("p", "ALLOW", "    - {}\n"));
    bad[0].rules[0].to.push(proto::Destination {
        ports: vec![70000],
        ..Default::default()
    });
    let err = PolicySet::compile(&id(API), &bad, DefaultPolicy::Deny).unwrap_err();
    assert_eq!(
        err.to_string(),
        "policy default/p is invalid: spec.rules[0].to[0].ports[0]: port 70000 is out of range 1..=65535"
    );

    let mut twice = policies(&policy("p", "ALLOW", "    - {}\n"));
    twice.push(twice[0].clone());
    let err = PolicySet::compile(&id(API), &twice, DefaultPolicy::Deny).unwrap_err();
    assert_eq!(err, CompileError::Duplicate("default/p".into()));
}

#[test]
fn explain_names_the_deciding_rule_and_why() {
    let mut yaml = [
        policy("web-to-api", "ALLOW", &format!("    - from: [{{namespace: monitoring}}]\n    - from: [{{spiffeId: \"{WEB}\"}}]\n      to: [{{ports: [8080]}}]\n")),
        policy("deny-legacy", "DENY", "    - from: [{namespace: legacy}]\n"),
    ]
    .concat();
    yaml.push_str(&policy("for-web", "DENY", "    - {}\n").replace("sa/api", "sa/web"));
    let all = policies(&yaml);
    let e = explain(
        &id(WEB),
        &id(API),
        8080,
        &all,
        DefaultPolicy::Deny,
        &OpaquePorts::default(),
    )
    .unwrap();
    assert_eq!(e.decision.verdict, Verdict::Allow);
    let deciding = e.deciding_rule().unwrap();
    assert_eq!(
        (&*deciding.policy, deciding.rule),
        ("default/web-to-api", 1)
    );
    let text = e.to_string();
    let expected = [
        format!("{WEB} -> {API} port 8080: allow by default/web-to-api rule 1"),
        "  default/deny-legacy (DENY): selects the destination".into(),
        "    rule 0: does not match: no source matches (rule names namespace legacy); any port"
            .into(),
        "  default/for-web (DENY): does not select the destination".into(),
        "  default/web-to-api (ALLOW): selects the destination".into(),
        "    rule 0: does not match: no source matches (rule names namespace monitoring); any port"
            .into(),
        format!("    rule 1: matches: source matches spiffeId {WEB}; port 8080 is listed"),
        "decided by default/web-to-api rule 1".into(),
    ];
    assert_eq!(text.lines().collect::<Vec<_>>(), expected);

    // Over the Admin API and back, it prints the same.
    let back = Explanation::from_proto(&e.to_proto()).unwrap();
    assert_eq!(back, e);

    let by_default = explain(
        &id(WEB),
        &id(API),
        9090,
        &all,
        DefaultPolicy::Deny,
        &OpaquePorts::default(),
    )
    .unwrap();
    assert_eq!(by_default.deciding_rule(), None);
    assert!(
        by_default
            .to_string()
            .ends_with("no rule decided: mesh default deny\n")
    );
}

#[test]
fn explain_agrees_with_decide_everywhere() {
    let yaml = [
        policy(
            "a",
            "ALLOW",
            "    - from: [{namespace: default}]\n      to: [{ports: [1, 2]}]\n",
        ),
        policy(
            "b",
            "DENY",
            &format!("    - from: [{{spiffeId: \"{WEB}\"}}]\n      to: [{{ports: [2]}}]\n"),
        ),
        policy("c", "AUDIT", "    - to: [{ports: [3]}]\n"),
    ]
    .concat();
    let all = policies(&yaml);
    for default in [
        DefaultPolicy::Deny,
        DefaultPolicy::AllowSameNamespace,
        DefaultPolicy::AllowMesh,
    ] {
        let set = PolicySet::compile(&id(API), &all, default).unwrap();
        for source in [WEB, PROM, LEGACY, ADMIN, API] {
            for port in 1..=4 {
                let e = explain(
                    &id(source),
                    &id(API),
                    port,
                    &all,
                    default,
                    &OpaquePorts::default(),
                )
                .unwrap();
                let decision = set.decide(&id(source), port);
                assert_eq!(e.decision, decision, "{source} {port}");
                if let Some(r) = e.deciding_rule() {
                    let trace = e.policies.iter().find(|p| p.policy == r.policy).unwrap();
                    assert!(trace.rules[r.rule].matched);
                }
            }
        }
    }
}

#[test]
fn policy_sets_can_be_shared_across_connections() {
    fn shared<T: Send + Sync + 'static>() {}
    shared::<PolicySet>();
    shared::<trellis_core::policy::Decision>();
}
