//! L7 rules: methods, paths, headers and gRPC matches of `to` entries, the
//! two levels of decision (connection and request), and validation against
//! opaque ports.

use http::HeaderMap;
use trellis_core::SpiffeId;
use trellis_core::TrustDomain;
use trellis_core::policy::{
    DefaultPolicy, HttpRequest, OpaquePorts, PolicySet, ValidationContext, Verdict, explain,
    load_source, validate_proto,
};
use trellis_proto::policy::v1 as proto;

const API: &str = "spiffe://cluster.local/ns/default/sa/api";
const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn policies(yaml: &str) -> Vec<proto::Policy> {
    let loaded = load_source("test.yaml", yaml, &td());
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    loaded
        .policies
        .iter()
        .map(|p| p.policy.to_proto())
        .collect()
}

fn policy(name: &str, action: &str, to: &str) -> String {
    format!(
        "---\napiVersion: trellis.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  selector: {{spiffeIds: [\"{API}\"]}}\n  action: {action}\n  rules:\n    - from: [{{spiffeId: \"{WEB}\"}}]\n      to: {to}\n"
    )
}

fn set(yaml: &str) -> PolicySet {
    PolicySet::compile(&id(API), &policies(yaml), DefaultPolicy::Deny).unwrap()
}

fn request(set: &PolicySet, port: u16, method: &str, path: &str, headers: &HeaderMap) -> String {
    let req = HttpRequest {
        method,
        path,
        headers,
    };
    set.decide_request(&id(WEB), port, &req).to_string()
}

#[test]
fn an_l7_allow_admits_http_requests_it_matches_and_no_raw_connection() {
    let set = set(&policy(
        "web-to-api",
        "ALLOW",
        "[{ports: [8080], methods: [GET], paths: [\"/users/{id}\", \"/public/*\"]}]",
    ));
    let h = HeaderMap::new();
    assert_eq!(
        request(&set, 8080, "GET", "/users/7", &h),
        "allow by default/web-to-api rule 0"
    );
    assert_eq!(
        request(&set, 8080, "GET", "/public/a/b", &h),
        "allow by default/web-to-api rule 0"
    );
    assert_eq!(
        request(&set, 8080, "POST", "/users/7", &h),
        "deny by default:deny"
    );
    assert_eq!(
        request(&set, 8080, "GET", "/users/7/posts", &h),
        "deny by default:deny"
    );
    assert_eq!(
        request(&set, 9090, "GET", "/users/7", &h),
        "deny by default:deny"
    );

    // At L4 the rule cannot match (raw TCP on 8080 stays denied), but the
    // connection may carry HTTP requests the rule allows.
    let l4 = set.decide(&id(WEB), 8080);
    assert_eq!(l4.verdict, Verdict::Deny);
    assert!(set.admits_requests(&l4, &id(WEB), 8080));
    assert!(!set.admits_requests(&set.decide(&id(WEB), 9090), &id(WEB), 9090));
}

#[test]
fn an_l7_deny_does_not_block_the_connection_only_its_requests() {
    let yaml = policy("web-to-api", "ALLOW", "[{ports: [8080]}]")
        + &policy("no-admin", "DENY", "[{paths: [\"/admin/*\"]}]");
    let set = set(&yaml);
    assert!(set.decide(&id(WEB), 8080).is_allowed());
    let h = HeaderMap::new();
    assert_eq!(
        request(&set, 8080, "GET", "/", &h),
        "allow by default/web-to-api rule 0"
    );
    assert_eq!(
        request(&set, 8080, "GET", "/admin/x", &h),
        "deny by default/no-admin rule 0"
    );
    assert_eq!(
        request(&set, 8080, "GET", "/admin", &h),
        "deny by default/no-admin rule 0"
    );
}

#[test]
fn an_l4_deny_also_denies_every_request_and_admits_none() {
    let yaml = policy("web-to-api", "ALLOW", "[{ports: [8080], methods: [GET]}]")
        + &policy("block", "DENY", "[{ports: [8080]}]");
    let set = set(&yaml);
    let l4 = set.decide(&id(WEB), 8080);
    assert!(!set.admits_requests(&l4, &id(WEB), 8080));
    let h = HeaderMap::new();
    assert_eq!(
        request(&set, 8080, "GET", "/", &h),
        "deny by default/block rule 0"
    );
}

#[test]
fn entries_match_separately_not_merged() {
    let set = set(&policy(
        "web-to-api",
        "ALLOW",
        "[{ports: [80], paths: [/a]}, {ports: [81]}]",
    ));
    let h = HeaderMap::new();
    assert!(request(&set, 80, "GET", "/a", &h).starts_with("allow"));
    assert!(request(&set, 80, "GET", "/b", &h).starts_with("deny"));
    assert!(request(&set, 81, "GET", "/b", &h).starts_with("allow"));
    assert!(set.decide(&id(WEB), 81).is_allowed());
    assert!(!set.decide(&id(WEB), 80).is_allowed());
}

#[test]
fn headers_and_grpc_match() {
    let set = set(&policy(
        "web-to-api",
        "ALLOW",
        "[{headers: {X-Env: prod}}, {grpc: {service: pkg.Greeter, method: SayHello}}, {grpc: {service: pkg.Health}}]",
    ));
    let mut prod = HeaderMap::new();
    prod.insert("x-env", "prod".parse().unwrap());
    let mut dev = HeaderMap::new();
    dev.insert("x-env", "dev".parse().unwrap());
    assert!(request(&set, 1, "GET", "/", &prod).starts_with("allow"));
    assert!(request(&set, 1, "GET", "/", &dev).starts_with("deny"));
    let none = HeaderMap::new();
    assert!(request(&set, 1, "POST", "/pkg.Greeter/SayHello", &none).starts_with("allow"));
    assert!(request(&set, 1, "POST", "/pkg.Greeter/SayBye", &none).starts_with("deny"));
    assert!(request(&set, 1, "POST", "/pkg.Health/Check", &none).starts_with("allow"));
}

#[test]
fn l7_matches_on_an_opaque_port_are_refused() {
    let p = &policies(&policy(
        "web-to-api",
        "ALLOW",
        "[{ports: [8080, 5432], methods: [GET]}]",
    ))[0];
    assert!(validate_proto(p, &td()).is_ok());
    let context = ValidationContext {
        opaque_ports: vec![5432],
        ..ValidationContext::default()
    };
    let errors = trellis_core::policy::convert::validate_proto_in(p, &td(), &context).unwrap_err();
    assert_eq!(
        errors[0].to_string(),
        "spec.rules[0].to[0].ports[1]: port 5432 is declared opaque: its traffic is never parsed as HTTP, so methods, paths, headers and grpc cannot be enforced on it"
    );
    let e = PolicySet::compile_in(
        &id(API),
        std::slice::from_ref(p),
        DefaultPolicy::Deny,
        &context,
    )
    .unwrap_err();
    assert!(e.to_string().contains("5432 is declared opaque"), "{e}");
}

/// The control plane cannot know the ports one sidecar declares opaque,
/// so a valid policy may bring L7 matches onto them. Compiled for such a
/// sidecar, the set is not refused: on those ports a DENY rule's L7 entry
/// denies the whole connection (naming the policy), an AUDIT one reports
/// it as "would deny", an ALLOW one allows nothing; other ports keep the
/// L7 matches as written. Each such rule is reported.
#[test]
fn l7_matches_on_a_sidecars_own_opaque_port_fail_closed() {
    let yaml = [
        policy(
            "no-admin",
            "DENY",
            "[{ports: [8080, 5432], paths: [/admin]}]",
        ),
        policy("dry-run", "AUDIT", "[{ports: [5432], methods: [DELETE]}]"),
        policy(
            "web-to-api",
            "ALLOW",
            "[{ports: [5432, 8080], methods: [GET]}, {ports: [9090]}]",
        ),
    ]
    .concat();
    let compile = |opaque: &[u16]| {
        PolicySet::compile_with_opaque(
            &id(API),
            &policies(&yaml),
            DefaultPolicy::Deny,
            &ValidationContext::default(),
            opaque,
        )
        .unwrap()
    };
    let set = compile(&[5432]);
    let web = id(WEB);
    let on_db = set.decide(&web, 5432);
    // Denied anyway: the AUDIT rule reports only what is allowed.
    assert_eq!(on_db.to_string(), "deny by default/no-admin rule 0");
    let dry_run = PolicySet::compile_with_opaque(
        &id(API),
        &policies(&policy(
            "dry-run",
            "AUDIT",
            "[{ports: [5432], methods: [DELETE]}]",
        )),
        DefaultPolicy::AllowMesh,
        &ValidationContext::default(),
        &[5432],
    )
    .unwrap();
    assert_eq!(
        dry_run.decide(&web, 5432).to_string(),
        "allow by default:allow-mesh; would deny by default/dry-run rule 0"
    );
    assert!(!set.admits_requests(&on_db, &web, 5432));
    // Another source is not named by the DENY rule; the ALLOW rule's
    // L7 entry allows no connection on the opaque port either.
    let other = id("spiffe://cluster.local/ns/default/sa/other");
    assert_eq!(set.decide(&other, 5432).to_string(), "deny by default:deny");
    let without_deny = PolicySet::compile_with_opaque(
        &id(API),
        &policies(&policy(
            "web-to-api",
            "ALLOW",
            "[{ports: [5432, 8080], methods: [GET]}, {ports: [9090]}]",
        )),
        DefaultPolicy::Deny,
        &ValidationContext::default(),
        &[5432],
    )
    .unwrap();
    let decision = without_deny.decide(&web, 5432);
    assert_eq!(decision.to_string(), "deny by default:deny");
    assert!(!without_deny.admits_requests(&decision, &web, 5432));
    // The other ports are decided as written.
    let h = HeaderMap::new();
    assert_eq!(
        set.decide(&web, 9090).to_string(),
        "allow by default/web-to-api rule 0"
    );
    assert_eq!(
        request(&set, 8080, "GET", "/admin", &h),
        "deny by default/no-admin rule 0"
    );
    assert_eq!(
        request(&set, 8080, "GET", "/", &h),
        "allow by default/web-to-api rule 0"
    );
    let on_http = set.decide(&web, 8080);
    assert_eq!(on_http.to_string(), "deny by default:deny");
    assert!(set.admits_requests(&on_http, &web, 8080));
    assert!(set.matches_paths_on(8080) && !set.matches_paths_on(5432));

    let reported: Vec<String> = set
        .opaque_fallbacks()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        reported,
        [
            "default/dry-run rule 0 has HTTP conditions on port 5432, which this sidecar declares \
             opaque (never parsed as HTTP); instead, it reports as \"would deny\" every \
             connection the rule's sources make to it",
            "default/no-admin rule 0 has HTTP conditions on port 5432, which this sidecar declares \
             opaque (never parsed as HTTP); instead, it denies every connection the rule's \
             sources make to it",
            "default/web-to-api rule 0 has HTTP conditions on port 5432, which this sidecar \
             declares opaque (never parsed as HTTP); instead, it allows no connection to it",
        ]
    );
    // Without opaque ports of its own, nothing changes.
    let plain = compile(&[]);
    assert!(plain.opaque_fallbacks().is_empty());
    assert_eq!(plain.decide(&web, 5432).to_string(), "deny by default:deny");
    assert!(plain.admits_requests(&plain.decide(&web, 5432), &web, 5432));
}

/// An entry with L7 matches that names no ports has them on every port,
/// opaque ones included (the mesh's or the sidecar's own), where they
/// cannot be checked. Enforced as written it would fail open: a DENY on
/// `/admin` would let its sources through on every opaque port. There it
/// fails closed as a DENY naming the port does: the DENY rule denies the
/// whole connection from its sources (naming the policy), an AUDIT rule
/// reports it as "would deny", an ALLOW rule allows nothing. Ports that are
/// not opaque keep the L7 matches.
#[test]
fn l7_matches_without_ports_fail_closed_on_opaque_ports() {
    let deny = policy("no-admin", "DENY", "[{paths: [/admin]}]");
    let audit = policy("dry-run", "AUDIT", "[{methods: [DELETE]}]");
    let allow = policy("web-to-api", "ALLOW", "[{methods: [GET]}]");
    let compile = |yaml: &str, default, context: &ValidationContext, opaque: &[u16]| {
        PolicySet::compile_with_opaque(&id(API), &policies(yaml), default, context, opaque).unwrap()
    };
    let own = ValidationContext::default();
    // The mesh's opaque ports are refused only to entries naming them.
    let mesh = ValidationContext {
        opaque_ports: vec![5432],
        ..ValidationContext::default()
    };
    let web = id(WEB);
    let h = HeaderMap::new();
    for context in [&own, &mesh] {
        let yaml = [deny.as_str(), &audit].concat();
        let set = compile(&yaml, DefaultPolicy::AllowMesh, context, &[5432]);
        let on_db = set.decide(&web, 5432);
        // Denied anyway: the AUDIT rule reports only what is allowed
        // (alone, below, it reports the connection).
        assert_eq!(on_db.to_string(), "deny by default/no-admin rule 0");
        assert!(!set.admits_requests(&on_db, &web, 5432));
        // A source the rule does not name is not denied.
        let other = id("spiffe://cluster.local/ns/default/sa/other");
        assert!(set.decide(&other, 5432).is_allowed());
        // A port that is not opaque keeps the L7 matches: only /admin.
        assert!(set.decide(&web, 8080).is_allowed());
        assert_eq!(
            request(&set, 8080, "GET", "/admin", &h),
            "deny by default/no-admin rule 0"
        );
        assert_eq!(
            request(&set, 8080, "GET", "/", &h),
            "allow by default:allow-mesh"
        );
        let reported: Vec<String> = (set.opaque_fallbacks().iter())
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            reported,
            [
                "default/dry-run rule 0 has HTTP conditions on every port (an entry names no \
                 ports), and port 5432 is opaque on this sidecar (never parsed as HTTP); there, \
                 it reports as \"would deny\" every connection the rule's sources make to it",
                "default/no-admin rule 0 has HTTP conditions on every port (an entry names no \
                 ports), and port 5432 is opaque on this sidecar (never parsed as HTTP); there, \
                 it denies every connection the rule's sources make to it",
            ]
        );

        // An AUDIT rule alone changes no verdict.
        let dry_run = compile(&audit, DefaultPolicy::AllowMesh, context, &[5432]);
        assert_eq!(
            dry_run.decide(&web, 5432).to_string(),
            "allow by default:allow-mesh; would deny by default/dry-run rule 0"
        );

        // An ALLOW rule's entry allows nothing on the opaque port: not
        // even a connection held to HTTP requests, which it never carries.
        let set = compile(&allow, DefaultPolicy::Deny, context, &[5432]);
        let on_db = set.decide(&web, 5432);
        assert_eq!(on_db.to_string(), "deny by default:deny");
        assert!(!set.admits_requests(&on_db, &web, 5432));
        let on_http = set.decide(&web, 8080);
        assert!(set.admits_requests(&on_http, &web, 8080));
        assert_eq!(
            request(&set, 8080, "GET", "/", &h),
            "allow by default/web-to-api rule 0"
        );
        assert_eq!(set.opaque_fallbacks().len(), 1);
        assert!(
            set.opaque_fallbacks()[0]
                .to_string()
                .ends_with("there, it allows no connection to it"),
            "{}",
            set.opaque_fallbacks()[0]
        );
    }
    // One rule, one report, however many opaque ports and entries.
    let both = policy(
        "no-admin",
        "DENY",
        "[{paths: [/admin]}, {ports: [5432, 8080], methods: [DELETE]}]",
    );
    let set = compile(&both, DefaultPolicy::AllowMesh, &own, &[6379, 5432]);
    assert_eq!(set.opaque_fallbacks().len(), 1);
    assert_eq!(set.opaque_fallbacks()[0].ports, [5432, 6379]);
    assert!(set.opaque_fallbacks()[0].every_port);
    for port in [5432, 6379] {
        assert_eq!(
            set.decide(&web, port).to_string(),
            "deny by default/no-admin rule 0"
        );
    }
}

/// `policy explain` on one of the mesh's opaque ports says why a DENY
/// rule with HTTP conditions and no ports denies the whole connection.
#[test]
fn explain_says_why_l7_matches_deny_on_an_opaque_port() {
    let all = policies(&policy("no-admin", "DENY", "[{paths: [/admin]}]"));
    let default = DefaultPolicy::AllowMesh;
    let e = explain(
        &id(WEB),
        &id(API),
        5432,
        &all,
        default,
        &OpaquePorts::mesh_wide(&[5432]),
    )
    .unwrap();
    assert_eq!(e.decision.to_string(), "deny by default/no-admin rule 0");
    let rule = &e.policies[0].rules[0];
    assert!(rule.matched);
    assert_eq!(
        rule.why,
        format!(
            "source matches spiffeId {WEB}; port 5432 is opaque (never parsed as HTTP): the \
             rule's HTTP conditions cannot be matched there, so the rule denies the whole \
             connection"
        )
    );
    // Elsewhere the rule decides per request.
    let e = explain(
        &id(WEB),
        &id(API),
        8080,
        &all,
        default,
        &OpaquePorts::mesh_wide(&[5432]),
    )
    .unwrap();
    assert!(e.decision.is_allowed());
    assert!(!e.policies[0].rules[0].matched);
}

/// The explanation says where the explained port being opaque comes
/// from: the mesh, the destination's sidecars (saying so when they
/// disagree), or the request.
#[test]
fn explain_says_where_an_opaque_port_comes_from() {
    let all = policies(&policy("no-admin", "DENY", "[{paths: [/admin]}]"));
    let opaque = OpaquePorts {
        mesh: vec![25],
        sidecars: vec![vec![5432], Vec::new()],
        requested: vec![6379],
    };
    let explained = |port| {
        explain(
            &id(WEB),
            &id(API),
            port,
            &all,
            DefaultPolicy::AllowMesh,
            &opaque,
        )
        .unwrap()
    };
    for (port, origin) in [
        (25, "mesh-wide (the control plane's --opaque-ports)"),
        (
            5432,
            "declared by only 1 of the destination's 2 connected sidecars (their \
             --opaque-ports): the sidecars disagree, the other 1 parse it as HTTP and may \
             decide otherwise",
        ),
        (6379, "named in the request"),
    ] {
        let e = explained(port);
        assert_eq!(e.decision.to_string(), "deny by default/no-admin rule 0");
        let text = e.to_string();
        let line = format!("\n  port {port} is opaque (never parsed as HTTP): {origin}\n");
        assert!(text.contains(&line), "{text}");
        let read = trellis_core::policy::Explanation::from_proto(&e.to_proto()).unwrap();
        assert_eq!(read, e);
    }
    let e = explained(8080);
    assert!(e.decision.is_allowed());
    assert_eq!(e.opaque, None);
    assert!(!e.to_string().contains("is opaque"), "{e}");
}

#[test]
fn l7_fields_survive_the_protobuf_round_trip() {
    let p = &policies(&policy(
        "web-to-api",
        "ALLOW",
        "[{ports: [8080], methods: [GET], paths: [/x], headers: {a: b}}, {grpc: {service: pkg.S}}]",
    ))[0];
    let d = &p.rules[0].to;
    assert_eq!(d[0].methods, ["GET"]);
    assert_eq!(d[0].paths, ["/x"]);
    assert_eq!(d[0].headers.get("a").map(String::as_str), Some("b"));
    assert_eq!(d[1].grpc.as_ref().unwrap().service, "pkg.S");
    let back = validate_proto(p, &td()).unwrap();
    assert_eq!(back.to_proto(), *p);
}

#[test]
fn a_path_rule_that_could_never_match_is_refused_at_its_line() {
    let yaml = policy("no-admin", "DENY", "[{paths: [\"/%61dmin/*\"]}]");
    let loaded = load_source("test.yaml", &yaml, &td());
    let diagnostics: Vec<String> = loaded.diagnostics.iter().map(ToString::to_string).collect();
    assert_eq!(
        diagnostics,
        [
            "test.yaml:10:21: spec.rules[0].to[0].paths[0]: path \"/%61dmin/*\" could never match: path encodes 'a' as %61: send unreserved characters as they are (RFC 3986) (requests with it are refused)"
        ]
    );
}

/// Apps mostly read the first value of a header sent twice, some the last:
/// a repeated header must never help a request get allowed.
#[test]
fn a_repeated_header_matches_an_allow_only_if_every_value_does() {
    let set = set(&policy("canary", "ALLOW", "[{headers: {x-env: canary}}]"));
    let headers = |values: &[&str]| {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-env", v.parse().unwrap());
        }
        h
    };
    assert_eq!(
        request(&set, 1, "GET", "/", &headers(&["canary"])),
        "allow by default/canary rule 0"
    );
    assert_eq!(
        request(&set, 1, "GET", "/", &headers(&["canary", "canary"])),
        "allow by default/canary rule 0"
    );
    for values in [&["prod", "canary"][..], &["canary", "prod"], &[]] {
        assert_eq!(
            request(&set, 1, "GET", "/", &headers(values)),
            "deny by default:deny",
            "{values:?}"
        );
    }
}

#[test]
fn a_repeated_header_matches_a_deny_or_audit_if_any_value_does() {
    let yaml = policy("web-to-api", "ALLOW", "[{ports: [1]}]")
        + &policy("no-canary", "DENY", "[{headers: {x-env: canary}}]")
        + &policy("watch-canary", "AUDIT", "[{headers: {x-env: canary}}]");
    let set = set(&yaml);
    let mut h = HeaderMap::new();
    h.append("x-env", "prod".parse().unwrap());
    h.append("x-env", "canary".parse().unwrap());
    // Denied anyway: the AUDIT rule reports only what is allowed.
    assert_eq!(
        request(&set, 1, "GET", "/", &h),
        "deny by default/no-canary rule 0"
    );
    let dry_run = self::set(
        &(policy("web-to-api", "ALLOW", "[{ports: [1]}]")
            + &policy("watch-canary", "AUDIT", "[{headers: {x-env: canary}}]")),
    );
    assert_eq!(
        request(&dry_run, 1, "GET", "/", &h),
        "allow by default/web-to-api rule 0; would deny by default/watch-canary rule 0"
    );
    let mut prod = HeaderMap::new();
    prod.append("x-env", "prod".parse().unwrap());
    assert_eq!(
        request(&set, 1, "GET", "/", &prod),
        "allow by default/web-to-api rule 0"
    );
}
