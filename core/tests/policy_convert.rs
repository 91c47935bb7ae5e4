//! Documents through their protobuf form and back, as `policy apply` stores
//! them and `policy get` prints them.

use std::path::PathBuf;

use trellis_core::TrustDomain;
use trellis_core::policy::{
    Document, document_from_proto, lint_source, load_paths, validate_proto,
};

#[test]
fn every_good_fixture_round_trips_through_proto_and_yaml() {
    let td = TrustDomain::new("cluster.local").unwrap();
    let loaded = load_paths(&[PathBuf::from("tests/fixtures/policies/good")], &td);
    assert!(!loaded.policies.is_empty());
    for loaded in &loaded.policies {
        let proto = loaded.policy.to_proto();
        let back = document_from_proto(&proto).unwrap();
        assert_eq!(&back, loaded.policy.policy(), "{}", loaded.policy.key());
        assert_eq!(validate_proto(&proto, &td).as_ref(), Ok(&loaded.policy));

        let yaml = Document::AuthorizationPolicy(back).to_yaml();
        assert_eq!(lint_source("printed.yaml", &yaml, &td), [], "{yaml}");
    }
}

#[test]
fn printed_yaml_reads_like_the_issue_example() {
    let td = TrustDomain::new("cluster.local").unwrap();
    let loaded = load_paths(
        &[PathBuf::from(
            "tests/fixtures/policies/good/web-to-api.yaml",
        )],
        &td,
    );
    let doc = document_from_proto(&loaded.policies[0].policy.to_proto()).unwrap();
    assert_eq!(
        Document::AuthorizationPolicy(doc).to_yaml(),
        "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: web-to-api
  namespace: default
spec:
  selector:
    spiffeIds:
      - spiffe://cluster.local/ns/default/sa/api
  action: ALLOW
  rules:
    - from:
        - spiffeId: spiffe://cluster.local/ns/default/sa/web
        - namespace: monitoring
      to:
        - ports: [8080]
"
    );
}
