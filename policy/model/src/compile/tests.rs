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

/// (source, proven identity, destination, port, expected action, expected rule)
type AuthzCase<'a> = (&'a str, Option<(&'a str, &'a str)>, &'a str, u16, Action, &'a str);

fn check_authz(s: &Snapshot, cases: &[AuthzCase]) {
    for (src, proven, dst, port, action, rule) in cases {
        let d = s.authorize(ip(src), *proven, ip(dst), *port);
        let described = s.describe_rule(d.verdict.rule, d.verdict.dst_identity);
        assert_eq!((d.verdict.action, described.as_str()), (*action, *rule), "{src} {proven:?} -> {dst}:{port}");
    }
}

const IDENTITY_POLICIES: &str = r#"apiVersion: palisade.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: db-access, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: Allow
  rules:
  - from: [{principals: ["cluster.local/ns/shop/sa/*"]}]
    ports: [5432]
  - from: [{ipBlocks: ["192.0.2.0/24"], notIpBlocks: ["192.0.2.128/25"]}]
    ports: [5432]
---
apiVersion: palisade.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: no-ops, namespace: shop}
spec:
  action: Deny
  rules:
  - from: [{namespaces: [ops]}]
---
apiVersion: palisade.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: web-not-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: Allow
  rules:
  - from: [{notNamespaces: [ops]}]
    notPorts: [9000]
"#;

#[test]
fn identity_rules_principals_namespaces_blocks_and_negations() {
    let s = snapshot(IDENTITY_POLICIES);
    check_authz(
        &s,
        &[
            // Principal glob; the proven identity counts.
            ("10.0.1.10", Some(("shop", "web")), "10.0.2.10", 5432, Action::Allow, "shop/db-access rule 0"),
            ("10.0.1.10", None, "10.0.2.10", 5432, Action::Allow, "shop/db-access rule 0"),
            (
                "10.0.1.10",
                Some(("shop", "web")),
                "10.0.2.10",
                22,
                Action::Deny,
                "default deny (selected by Allow policy shop/db-access)",
            ),
            // ipBlocks and their negation.
            ("192.0.2.7", None, "10.0.2.10", 5432, Action::Allow, "shop/db-access rule 1"),
            (
                "192.0.2.200",
                None,
                "10.0.2.10",
                5432,
                Action::Deny,
                "default deny (selected by Allow policy shop/db-access)",
            ),
            (
                "198.51.100.1",
                None,
                "10.0.2.10",
                5432,
                Action::Deny,
                "default deny (selected by Allow policy shop/db-access)",
            ),
            // A certificate used from an address where its workload does not run.
            (
                "10.0.2.11",
                Some(("shop", "web")),
                "10.0.2.10",
                5432,
                Action::Deny,
                "the proven identity is not the workload at the source address",
            ),
            // Namespace deny beats every allow.
            ("10.0.2.11", None, "10.0.1.10", 80, Action::Deny, "shop/no-ops rule 0"),
            ("10.0.2.11", Some(("ops", "probe")), "10.0.2.10", 5432, Action::Deny, "shop/no-ops rule 0"),
            // notNamespaces / notPorts.
            ("192.0.2.7", None, "10.0.1.10", 80, Action::Allow, "shop/web-not-admin rule 0"),
            (
                "10.0.2.10",
                None,
                "10.0.1.10",
                9000,
                Action::Deny,
                "default deny (selected by Allow policy shop/web-not-admin)",
            ),
        ],
    );
    assert!(s.approximations.iter().any(|a| a.contains("web-not-admin rule 0")), "{:?}", s.approximations);
}

/// A Service over shop's workloads (VIP 10.96.0.1: 80 → 5432, 22 → 22), egress of ops/probe
/// to db:5432 only, and a Deny of web's egress to any destination on port 80 — the VIP's port,
/// not its endpoints' (the kernel must not read it for the VIP).
const SERVICE_EGRESS: &str = r#"---
apiVersion: v1
kind: Service
metadata: {name: all, namespace: shop}
spec:
  clusterIP: 10.96.0.1
  selector: {}
  ports: [{name: sql, port: 80, targetPort: 5432}, {name: ssh, port: 22}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: probe-out, namespace: ops}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress: [{to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}], ports: [{port: 5432}]}]
---
apiVersion: palisade.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: web-no-80, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: Deny
  egress: [{ports: [80]}]
"#;

#[test]
fn kernel_cells_never_deny_what_the_exact_evaluation_allows() {
    let sources = ["10.0.1.10", "10.0.2.10", "10.0.2.11", "192.0.2.7", "192.0.2.200", "198.51.100.1"];
    let dsts = ["10.0.1.10", "10.0.2.10", "10.0.2.11", "10.96.0.1"];
    for (policies, exact_too) in
        [(IDENTITY_POLICIES.to_string(), true), (format!("{IDENTITY_POLICIES}{SERVICE_EGRESS}"), false)]
    {
        let s = snapshot(&policies);
        for src in sources {
            for dst in dsts {
                for port in [22, 80, 5432, 9000] {
                    let kernel = s.verdict(ip(src), ip(dst), port);
                    let exact = s.authorize(ip(src), None, ip(dst), port).verdict;
                    if kernel.action == Action::Deny {
                        assert_eq!(exact.action, Action::Deny, "kernel denies what is allowed: {src} -> {dst}:{port}");
                    }
                    // notPorts is the only approximation in the first policy set.
                    if exact_too && port != 9000 {
                        assert_eq!(
                            kernel.action, exact.action,
                            "{src} -> {dst}:{port}: kernel {kernel:?} exact {exact:?}"
                        );
                    }
                }
            }
        }
    }
    // The VIP's own cells: web's Deny on port 80 does not touch VIP:80 (endpoints on 5432);
    // ops/probe's egress allows VIP:80 (db:5432) but not VIP:22 (no endpoint: EPERM); db's
    // ingress refuses ops, which the kernel leaves to db's end (exact: denied).
    let s = snapshot(&format!("{IDENTITY_POLICIES}{SERVICE_EGRESS}"));
    assert_eq!(s.verdict(ip("10.0.1.10"), ip("10.96.0.1"), 80).action, Action::Allow);
    assert_eq!(s.verdict(ip("10.0.1.10"), ip("10.0.2.10"), 80).action, Action::Deny, "the Deny holds elsewhere");
    assert_eq!(s.verdict(ip("10.0.2.11"), ip("10.96.0.1"), 80).action, Action::Allow);
    assert_eq!(s.authorize(ip("10.0.2.11"), None, ip("10.96.0.1"), 80).verdict.action, Action::Deny);
    assert_eq!(s.verdict(ip("10.0.2.11"), ip("10.96.0.1"), 22).action, Action::Deny);
    assert_eq!(s.authorize(ip("10.0.2.11"), None, ip("10.96.0.1"), 22).verdict.action, Action::Deny);
}

#[test]
fn audit_mode_reports_without_enforcing() {
    let s = snapshot(
        r#"apiVersion: palisade.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: trial, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: Deny
  mode: Audit
  rules: [{from: [{namespaces: [ops]}]}]
"#,
    );
    let d = s.authorize(ip("10.0.2.11"), None, ip("10.0.2.10"), 5432);
    assert_eq!(d.verdict.action, Action::Allow);
    assert_eq!(d.audit_deny.map(|r| s.describe_rule(r, d.verdict.dst_identity)), Some("shop/trial rule 0".into()));
    // The kernel does not hold audit policies.
    assert_eq!(s.verdict(ip("10.0.2.11"), ip("10.0.2.10"), 5432).action, Action::Allow);
    assert_eq!(s.authorize(ip("10.0.1.10"), None, ip("10.0.2.10"), 5432).audit_deny, None);
}
