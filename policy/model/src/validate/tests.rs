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
