use std::path::Path;

use crate::load::parse_str;
use crate::resource::Resource;
use crate::validate::validate;

#[test]
fn network_policy_and_namespace_load_as_kubernetes_writes_them() {
    let text = r#"apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {team: a}
  annotations: {note: "kubernetes metadata is accepted"}
spec: {finalizers: [kubernetes]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web
  annotations: {a: b}
spec:
  podSelector:
    matchExpressions: [{key: app, operator: In, values: [web]}]
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: a}}
      podSelector: {matchLabels: {role: client}}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    ports: [{port: http}, {protocol: TCP, port: 8000, endPort: 8010}]
  egress:
  - ports: [{protocol: UDP, port: 53}]
"#;
    let resources = parse_str(Path::new("k.yaml"), text).expect("parses");
    validate(&resources).expect("valid");
    let Resource::NetworkPolicy { metadata, spec, .. } = &resources[1].resource else { panic!("not a NetworkPolicy") };
    // As kubectl: no namespace means `default`.
    assert_eq!(metadata.namespace.as_deref(), Some("default"));
    assert_eq!(resources[1].origin.line, 9);
    let t = super::translate("default", spec);
    let ingress = t.ingress.expect("ingress");
    assert_eq!(ingress[0].peers.len(), 2);
    assert!(ingress[0].peers[0].namespace.is_none() && ingress[0].peers[0].namespace_selector.is_some());
    // The UDP-only egress rule matches no TCP connection, and is reported.
    let egress = t.egress.expect("egress");
    assert_eq!(egress[0].ports, vec![crate::matching::PortMatch::Never]);
    assert_eq!(t.notes.len(), 1, "{:?}", t.notes);
    assert!(t.notes[0].field == "spec.egress[0].ports[0].protocol" && t.notes[0].message.contains("not enforced"));
    let Resource::Namespace { metadata, .. } = &resources[0].resource else { panic!("not a Namespace") };
    assert_eq!(metadata.labels.get("team").map(String::as_str), Some("a"));
}

#[test]
fn policy_types_default_as_kubernetes() {
    let spec = |yaml: &str| -> k8s_openapi::api::networking::v1::NetworkPolicySpec {
        serde_yaml::from_str(yaml).expect("spec")
    };
    assert_eq!(super::policy_types(&spec("{podSelector: {}}")), (true, false));
    assert_eq!(super::policy_types(&spec("{podSelector: {}, egress: []}")), (true, false));
    assert_eq!(super::policy_types(&spec("{podSelector: {}, egress: [{}]}")), (true, true));
    assert_eq!(super::policy_types(&spec("{podSelector: {}, policyTypes: [Egress]}")), (false, true));
}

#[test]
fn every_problem_of_a_network_policy_is_reported() {
    let text = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: shop}
spec:
  podSelector: {matchExpressions: [{key: app, operator: Like, values: [x]}]}
  policyTypes: [Sideways]
  ingress:
  - from: [{}, {ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}, podSelector: {}}]
    ports: [{port: 70000}, {port: Not_A_Name}, {port: 90, endPort: 80}, {protocol: ICMP}]
  egress:
  - to: [{ipBlock: {cidr: nonsense}}, {namespaceSelector: {matchExpressions: [{key: a, operator: In}]}}]
"#;
    let resources = parse_str(Path::new("bad.yaml"), text).expect("parses");
    let problems: Vec<String> = validate(&resources).expect_err("invalid").0.iter().map(|p| p.to_string()).collect();
    let expected = [
        "spec.policyTypes[0]",
        "spec.podSelector.matchExpressions[0].operator",
        "spec.ingress[0].from[0]: a peer needs",
        "spec.ingress[0].from[1]: ipBlock cannot be combined",
        "spec.ingress[0].ports[0].port: 70000",
        "spec.ingress[0].ports[1].port",
        "spec.ingress[0].ports[2].endPort",
        "spec.ingress[0].ports[3].protocol",
        "spec.egress[0].to[0].ipBlock.cidr",
        "spec.egress[0].to[1].namespaceSelector.matchExpressions[0].values",
    ];
    for e in expected {
        assert!(
            problems.iter().any(|p| p.contains(e) && p.starts_with("bad.yaml:1: NetworkPolicy shop/bad")),
            "{e}: {problems:#?}"
        );
    }
    assert_eq!(problems.len(), expected.len(), "{problems:#?}");
}
