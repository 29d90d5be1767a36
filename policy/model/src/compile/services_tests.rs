//! Services: endpoints from the selector, target ports by number and name, validation, and
//! the choice among endpoints by the exact evaluation.
use std::net::SocketAddr;
use std::path::Path;

use super::*;
use crate::load::{Batch, parse_into, parse_str};

const MESH: &str = r#"
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {name: web-a, namespace: shop}
spec: {serviceAccount: web, labels: {app: web}, node: n1, addresses: [10.1.0.1], ports: [{name: http, containerPort: 8080}]}
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {name: web-b, namespace: shop}
spec: {serviceAccount: web, labels: {app: web, tier: b}, node: n2, addresses: [10.1.0.2], ports: [{name: http, containerPort: 9090}]}
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {name: web-other, namespace: other}
spec: {serviceAccount: web, labels: {app: web}, node: n2, addresses: [10.2.0.9], ports: [{name: http, containerPort: 8080}]}
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {name: client, namespace: shop}
spec: {serviceAccount: client, labels: {app: client}, node: n1, addresses: [10.1.0.3]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: admin, port: 81, targetPort: 7000}
"#;

fn snapshot(extra: &str) -> Snapshot {
    let text = format!("{MESH}---\n{extra}");
    compile(&parse_str(Path::new("svc.yaml"), &text).expect("parses"))
}

fn at(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn endpoints(s: &Snapshot, vip: &str) -> Vec<String> {
    s.service_at(at(vip))
        .expect("a service")
        .1
        .endpoints
        .iter()
        .map(|e| format!("{} {}", e.workload, e.address))
        .collect()
}

#[test]
fn endpoints_are_the_selected_workloads_of_the_namespace_with_resolved_ports() {
    let s = snapshot("");
    // By name: each workload's own container port; never a workload of another namespace.
    assert_eq!(endpoints(&s, "10.96.0.10:80"), ["shop/web-a 10.1.0.1:8080", "shop/web-b 10.1.0.2:9090"]);
    assert_eq!(endpoints(&s, "10.96.0.10:81"), ["shop/web-a 10.1.0.1:7000", "shop/web-b 10.1.0.2:7000"]);
    assert!(s.service_at(at("10.96.0.10:82")).is_none(), "not a port of the service");
    assert!(s.service_at(at("10.96.0.11:80")).is_none(), "not a VIP");
}

#[test]
fn choice_keeps_only_endpoints_the_exact_evaluation_allows() {
    let open = snapshot("");
    let c = open.service_choice("10.1.0.3".parse().unwrap(), None, at("10.96.0.10:80")).unwrap();
    assert_eq!(c.allowed.len(), 2);
    assert!(c.first_denied.is_none());
    // Egress of the client allows web-b only (by its label and its own target port).
    let egress = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: out, namespace: shop}\n\
        spec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  \
        - to: [{podSelector: {matchLabels: {tier: b}}}]\n    ports: [{port: 9090}]\n";
    let one = snapshot(egress);
    let c = one.service_choice("10.1.0.3".parse().unwrap(), None, at("10.96.0.10:80")).unwrap();
    assert_eq!(c.allowed.iter().map(|e| e.workload.as_str()).collect::<Vec<_>>(), ["shop/web-b"]);
    assert_eq!(c.first_denied.as_ref().unwrap().0.workload, "shop/web-a");
    // On port 81 (target 7000) the policy allows none of them.
    let c = one.service_choice("10.1.0.3".parse().unwrap(), None, at("10.96.0.10:81")).unwrap();
    assert!(c.allowed.is_empty());
    assert_eq!(c.service.name, "shop/web");
    // The kernel (the VIP's own cells): connect() to VIP:80 passes, to VIP:81 is EPERM.
    let client = "10.1.0.3".parse().unwrap();
    let vip = "10.96.0.10".parse().unwrap();
    assert_eq!(one.verdict(client, vip, 80).action, Action::Allow);
    assert_eq!(one.verdict(client, vip, 81).action, Action::Deny);
    assert_eq!(one.identity_name(one.verdict(client, vip, 81).dst_identity), "service:shop/web");
    assert_eq!(one.authorize(client, None, vip, 81).verdict.action, Action::Deny);
}

#[test]
fn ingress_of_the_endpoint_counts_too() {
    let deny_a = "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: no-a, namespace: shop}\n\
        spec: {selector: {matchLabels: {app: web}}, action: Deny, rules: [{ports: [8080]}]}\n";
    let s = snapshot(deny_a);
    let c = s.service_choice("10.1.0.3".parse().unwrap(), None, at("10.96.0.10:80")).unwrap();
    assert_eq!(c.allowed.iter().map(|e| e.workload.as_str()).collect::<Vec<_>>(), ["shop/web-b"]);
}

fn findings(extra: &str) -> Vec<String> {
    let mut b = Batch::default();
    parse_into(&mut b, Path::new("svc.yaml"), &format!("{MESH}---\n{extra}"));
    crate::validate::check_batch(&b).iter().map(|f| f.to_string()).collect()
}

#[test]
fn validation_names_each_service_problem_at_its_field() {
    let f = findings(
        "apiVersion: v1\nkind: Service\nmetadata: {name: novip, namespace: shop}\nspec:\n  selector: {app: web}\n  ports: [{port: 80}]\n",
    );
    assert_eq!(f.len(), 1, "{f:#?}");
    assert!(f[0].starts_with("svc.yaml:") && f[0].contains("Service shop/novip: spec"), "{f:#?}");
    assert!(f[0].contains("required: the Service's virtual address"), "{f:#?}");
    assert!(!f[0].contains("warning"), "an error: {f:#?}");

    let taken = "apiVersion: v1\nkind: Service\nmetadata: {name: taken, namespace: shop}\nspec: {clusterIP: 10.1.0.1, selector: {app: web}}\n";
    let f = findings(taken);
    assert!(
        f.iter().any(|l| l.contains("spec.clusterIP: 10.1.0.1 is already the address of workload web-a")),
        "{f:#?}"
    );

    let odd = "apiVersion: v1\nkind: Service\nmetadata: {name: odd, namespace: shop}\nspec:\n  clusterIP: 10.96.0.20\n  \
         selector: {app: web}\n  ports:\n  - {port: 80, targetPort: grpc}\n  - {port: 53, protocol: UDP}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: shop}\nspec:\n  clusterIP: 10.96.0.21\n  \
         selector:\n    app: nothing\n  ports: [{port: 80}]\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: headless, namespace: shop}\nspec:\n  clusterIP: None\n  \
         selector: {app: web}\n";
    let f = findings(odd);
    assert_eq!(f.len(), 4, "{f:#?}");
    assert!(f.iter().all(|l| l.contains(": warning: ")), "warnings only: {f:#?}");
    // Each finding is at its own field's line.
    let text = format!("{MESH}---\n{odd}");
    let line_of = |field_text: &str| {
        let at = text.find(field_text).unwrap_or_else(|| panic!("{field_text:?} in the text"));
        format!("svc.yaml:{}:", text[..at].matches('\n').count() + 1)
    };
    let line = |needle: &str| f.iter().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}: {f:#?}"));
    assert!(
        line("spec.ports[0].targetPort: does not resolve on web-a, web-b")
            .starts_with(&line_of("- {port: 80, targetPort: grpc}")),
        "{f:#?}"
    );
    assert!(line("spec.ports[1].protocol: UDP is not enforced").starts_with(&line_of("- {port: 53")), "{f:#?}");
    assert!(
        line("Service shop/empty: spec.selector: selects no workload")
            .starts_with(&line_of("selector:\n    app: nothing")),
        "{f:#?}"
    );
    assert!(line("Service shop/headless: spec.clusterIP: headless").starts_with(&line_of("clusterIP: None")), "{f:#?}");
    // A headless Service has no VIP in the snapshot.
    assert!(
        snapshot("apiVersion: v1\nkind: Service\nmetadata: {name: h, namespace: shop}\nspec: {clusterIP: None}\n")
            .services
            .len()
            == 1
    );
}

/// `to: [{service: web}]`: the Service's endpoints (and through them its VIP), in the policy's
/// namespace unless the peer names one; never a workload the Service does not select.
#[test]
fn egress_to_a_service_reaches_its_endpoints_and_nothing_else() {
    let s = snapshot(
        "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: client-out, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: client}}\n  action: Allow\n  egress:\n  - to: [{service: web}]\n",
    );
    let client: IpAddr = "10.1.0.3".parse().unwrap();
    let allowed = |dst: &str, port: u16| {
        let dst: IpAddr = dst.parse().unwrap();
        let exact = s.authorize(client, Some(("shop", "client")), dst, port).verdict.action == Action::Allow;
        let kernel = s.verdict(client, dst, port).action == Action::Allow;
        assert!(kernel || !exact, "the kernel denies what the exact evaluation allows: {dst}:{port}");
        exact
    };
    assert!(allowed("10.1.0.1", 8080) && allowed("10.1.0.2", 9090), "both endpoints");
    assert!(!allowed("10.2.0.9", 8080), "same labels, another namespace: not an endpoint");
    assert!(!allowed("10.9.9.9", 80), "the world");
    // The VIP: egress allows some endpoint, so the kernel lets connect() through.
    assert_eq!(s.verdict(client, "10.96.0.10".parse().unwrap(), 80).action, Action::Allow);
    let other = snapshot(
        "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: client-out, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: client}}\n  action: Allow\n  egress:\n  - to: [{service: web, namespace: other}]\n",
    );
    assert_eq!(
        other.authorize(client, Some(("shop", "client")), "10.1.0.1".parse().unwrap(), 8080).verdict.action,
        Action::Deny
    );
}

#[test]
fn a_service_as_a_source_is_an_error_and_an_unknown_one_a_warning() {
    let f = findings(
        "apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: p, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: web}}\n  action: Allow\n  rules:\n  - from: [{service: web}]\n  egress:\n  - to: [{service: nope}]\n",
    );
    assert!(f.iter().any(|f| f.contains("spec.rules[0].from[0].service") && f.contains("never a source")), "{f:#?}");
    assert!(
        f.iter().any(|f| f.contains("spec.egress[0].to[0].service") && f.contains("no Service shop/nope")),
        "{f:#?}"
    );
}
