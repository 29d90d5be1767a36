use std::path::Path;

use super::*;
use crate::load::parse_into;

const NS: &str = "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: x}\n";

fn batch(text: &str) -> Batch {
    let mut b = Batch::default();
    parse_into(&mut b, Path::new("c.yaml"), text);
    b
}

fn findings(text: &str) -> Vec<String> {
    check_batch(&batch(text)).iter().map(|p| p.to_string()).collect()
}

#[test]
fn reports_every_problem_with_its_place() {
    let problems = findings(
        "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {name: a, namespace: x}\n\
         spec: {serviceAccount: s, node: n1, addresses: [10.0.0.1]}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {name: b, namespace: x}\n\
         spec: {serviceAccount: s, node: n1, addresses: [10.0.0.1]}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: P, namespace: x}\n\
         spec: {action: Deny, rules: [{ports: [0]}]}\n",
    );
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(problems[0].starts_with("c.yaml:9: Workload x/b: spec.addresses[0]: 10.0.0.1 is already"), "{problems:#?}");
    assert!(problems[0].ends_with("(c.yaml:4)"), "the first owner's own field: {problems:#?}");
    assert!(problems[1].starts_with("c.yaml:13: SegmentationPolicy x/P: metadata.name"), "{problems:#?}");
    assert!(
        problems[2].starts_with("c.yaml:14: SegmentationPolicy x/P: spec.rules[0].ports[0]: port 0"),
        "{problems:#?}"
    );
}

#[test]
fn without_texts_findings_name_the_document() {
    let resources = crate::load::parse_str(
        Path::new("c.yaml"),
        "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata:\n  name: X\n",
    )
    .unwrap();
    let Err(Invalid(p)) = validate(&resources) else { panic!("X is no DNS name") };
    assert_eq!((p[0].line, p[0].field.as_str()), (1, "metadata.name"));
}

#[test]
fn valid_configuration_passes() {
    assert!(findings(&format!("{NS}spec: {{defaultAction: Deny}}\n")).is_empty());
}

#[test]
fn a_deny_that_covers_an_allow_shadows_it_and_says_where() {
    let text = format!(
        "{NS}---\n\
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {{name: w, namespace: x}}
spec: {{serviceAccount: s, node: n, addresses: [10.0.0.1], labels: {{app: web}}}}
---
apiVersion: palisade.dev/v1alpha1
kind: SegmentationPolicy
metadata: {{name: allow, namespace: x}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: Allow
  rules:
  - from: [{{namespace: x, serviceAccount: s}}]
    ports: [80]
  - from: [{{namespace: x}}]
    ports: [443]
---
apiVersion: palisade.dev/v1alpha1
kind: SegmentationPolicy
metadata: {{name: deny, namespace: x}}
spec:
  action: Deny
  rules:
  - from: [{{namespace: x}}]
    ports: [80, 8080]
"
    );
    let got = check_batch(&batch(&text));
    assert_eq!(got.len(), 1, "{got:#?}");
    let f = &got[0];
    assert_eq!((f.severity, f.line, f.field.as_str()), (Severity::Warning, 17, "spec.rules[0]"), "{f}");
    assert!(f.message.contains("SegmentationPolicy x/deny spec.rules[0] (c.yaml:28)"), "{f}");
}

#[test]
fn rules_that_can_never_match_are_named() {
    let text = format!(
        "{NS}---\n\
apiVersion: palisade.dev/v1alpha1
kind: SegmentationPolicy
metadata: {{name: p, namespace: x}}
spec:
  action: Deny
  rules:
  - ports: [80]
    notPorts: [80]
  - from:
    - namespaces: [x]
      notNamespaces: [x]
"
    );
    let got: Vec<(usize, String)> = check_batch(&batch(&text)).iter().map(|f| (f.line, f.field.clone())).collect();
    assert_eq!(got, [(11, "spec.rules[0].ports".to_string()), (14, "spec.rules[1].from[0]".to_string())]);
}

#[test]
fn network_policy_references_and_unenforced_ports_are_warnings_at_their_fields() {
    let text = format!(
        "{NS}---\n\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: np, namespace: x}}
spec:
  podSelector: {{matchLabels: {{app: none}}}}
  ingress:
  - from:
    - namespaceSelector: {{matchLabels: {{team: ghosts}}}}
    ports:
    - port: http
    - port: 53
      protocol: UDP
"
    );
    let got: Vec<(usize, Severity, String)> =
        check_batch(&batch(&text)).iter().map(|f| (f.line, f.severity, f.field.clone())).collect();
    let w = Severity::Warning;
    assert_eq!(
        got,
        [
            (9, w, "spec.podSelector".to_string()),
            (12, w, "spec.ingress[0].from[0].namespaceSelector".to_string()),
            (14, w, "spec.ingress[0].ports[0].port".to_string()),
            (16, w, "spec.ingress[0].ports[1].protocol".to_string()),
        ]
    );
}

/// One label selector, read in different namespaces and with different accounts: each peer
/// gets its own answer although the matching of a selector is done once and reused.
#[test]
fn a_repeated_selector_is_answered_for_each_peer() {
    let workload = |name: &str, ns: &str, sa: &str, ip: &str| {
        format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{serviceAccount: {sa}, node: n, addresses: [{ip}], labels: {{app: web}}}}\n---\n"
        )
    };
    let policy = |name: &str, ns: &str, peer: &str| {
        format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{action: Allow, rules: [{{from: [{peer}]}}]}}\n---\n"
        )
    };
    let text = [
        workload("w1", "a", "s1", "10.0.0.1"),
        workload("w2", "b", "s2", "10.0.0.2"),
        policy("p1", "a", "{matchLabels: {app: web}}"),
        policy("p2", "b", "{matchLabels: {app: web}}"),
        policy("p3", "a", "{matchLabels: {app: web}, serviceAccount: s1}"),
        policy("p4", "a", "{matchLabels: {app: web}, serviceAccount: s2}"),
        policy("p5", "b", "{matchLabels: {app: web}, serviceAccount: s3, namespaceSelector: {}}"),
    ]
    .concat();
    let got: Vec<String> = check_batch(&batch(&text))
        .iter()
        .map(|f| {
            let message = f.message.split(" (a label selector").next().unwrap_or_default();
            format!("{} {}: {message}", f.resource, f.field)
        })
        .collect();
    let rule = "spec.rules[0].from[0]";
    assert_eq!(
        got,
        [
            format!("SegmentationPolicy a/p1 {rule}.matchLabels: matches workloads of namespace \"a\" only"),
            format!("SegmentationPolicy b/p2 {rule}.matchLabels: matches workloads of namespace \"b\" only"),
            format!("SegmentationPolicy a/p4 {rule}.matchLabels: matches workloads of namespace \"a\" only"),
            format!("SegmentationPolicy a/p4 {rule}.serviceAccount: no workload runs as \"s2\" there (yet)"),
            format!("SegmentationPolicy b/p5 {rule}.matchLabels: selects no workload (yet): this peer matches nothing"),
        ]
    );
    let names = |i: usize| check_batch(&batch(&text))[i].message.rsplit("not those of ").next().map(str::to_string);
    assert!(names(0).is_some_and(|m| m.starts_with("b:")), "{:?}", names(0));
    assert!(names(1).is_some_and(|m| m.starts_with("a:")), "{:?}", names(1));
    assert!(names(2).is_some_and(|m| m.starts_with("b:")), "{:?}", names(2));
}
