use std::path::Path;

use super::*;
use crate::load::parse_str;

const WORKLOADS: &str = r#"
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {name: web, namespace: shop}
spec: {serviceAccount: web, labels: {app: web}, node: n1, addresses: [10.0.1.10]}
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {name: db, namespace: shop}
spec: {serviceAccount: db, labels: {app: db}, node: n2, addresses: [10.0.2.10]}
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {name: probe, namespace: ops}
spec: {serviceAccount: probe, node: n2, addresses: [10.0.2.11]}
"#;

fn snapshot(policies: &str) -> Snapshot {
    let text = format!("{WORKLOADS}---\n{policies}");
    let resources = parse_str(Path::new("t.yaml"), &text).expect("parses");
    crate::validate::validate(&resources).expect("valid");
    compile(&resources)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// (source, destination, port, expected action, expected rule description)
type Case<'a> = (&'a str, &'a str, u16, Action, &'a str);

fn check(s: &Snapshot, cases: &[Case]) {
    for (src, dst, port, action, rule) in cases {
        let v = s.verdict(ip(src), ip(dst), *port);
        let described = s.describe_rule(v.rule, v.dst_identity);
        assert_eq!((v.action, described.as_str()), (*action, *rule), "{src} -> {dst}:{port}");
    }
}

#[test]
fn no_policy_allows_by_default() {
    let s = snapshot("");
    check(&s, &[("10.0.1.10", "10.0.2.10", 5432, Action::Allow, "default allow (namespace shop default Allow)")]);
}

#[test]
fn namespace_default_deny_and_allow_rule() {
    let s = snapshot(
        r#"apiVersion: palisade.dev/v1alpha1
kind: Namespace
metadata: {name: shop}
spec: {defaultAction: Deny}
---
apiVersion: palisade.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: web-to-db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: Allow
  rules: [{from: [{serviceAccount: web, namespace: shop}], ports: [5432]}]
"#,
    );
    check(
        &s,
        &[
            ("10.0.1.10", "10.0.2.10", 5432, Action::Allow, "shop/web-to-db rule 0"),
            ("10.0.1.10", "10.0.2.10", 22, Action::Deny, "default deny (namespace shop default Deny)"),
            ("10.0.2.11", "10.0.2.10", 5432, Action::Deny, "default deny (namespace shop default Deny)"),
            ("192.0.2.1", "10.0.1.10", 80, Action::Deny, "default deny (namespace shop default Deny)"),
            // ops has no namespace default: allowed.
            ("10.0.1.10", "10.0.2.11", 9000, Action::Allow, "default allow (namespace ops default Allow)"),
        ],
    );
}

#[test]
fn deny_beats_allow_and_allow_isolates_selected() {
    let s = snapshot(
        r#"apiVersion: palisade.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: a-allow-shop, namespace: shop}
spec:
  action: Allow
  rules: [{from: [{namespace: shop}]}]
---
apiVersion: palisade.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: b-no-ssh, namespace: shop}
spec:
  action: Deny
  rules: [{ports: [22]}]
"#,
    );
    check(
        &s,
        &[
            ("10.0.1.10", "10.0.2.10", 5432, Action::Allow, "shop/a-allow-shop rule 0"),
            ("10.0.1.10", "10.0.2.10", 22, Action::Deny, "shop/b-no-ssh rule 0"),
            ("10.0.2.11", "10.0.2.10", 5432, Action::Deny, "default deny (selected by Allow policy shop/a-allow-shop)"),
        ],
    );
}

#[test]
fn rule_numbers_do_not_depend_on_file_order() {
    let a = "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: a, namespace: shop}\nspec: {action: Deny, rules: [{ports: [1]}]}\n";
    let b = "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: b, namespace: shop}\nspec: {action: Deny, rules: [{ports: [2]}]}\n";
    let ab = snapshot(&format!("{a}---\n{b}"));
    let ba = snapshot(&format!("{b}---\n{a}"));
    assert_eq!(ab.rules, ba.rules);
    assert_eq!(ab.cells, ba.cells);
}
