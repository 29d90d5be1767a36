//! Workload traffic through a waypoint: `istio.io/waypoint-for` on the waypoint, use-waypoint
//! on Workloads (their own label wins over their Namespace's), what ztunnel's index says, what
//! the waypoint's configuration gets, and the findings about each.
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use super::config::{AuthzAction, ServiceL7};
use super::{compile_waypoints, waypoint_index};
use crate::load::{Batch, Located, parse_into};
use crate::validate::{Finding, Severity, check_batch};

const TD: &str = "example.org";
const WAYPOINT_ID: &str = "spiffe://example.org/ns/shop/sa/waypoint";

/// Namespace `shop` uses waypoint `shop/waypoint` (its `istio.io/waypoint-for` is `FOR`, no
/// label when empty); `web-0` (10.0.2.1, fd00::21) listens on `http` 8080 and Service `web`
/// also reaches it on 9090; `db-0` declares no port and no Service selects it; a DENY policy
/// on the waypoint and an ALLOW one on Service `web`, and a route on `web`.
fn base(waypoint_for: &str) -> String {
    let labels = match waypoint_for {
        "" => String::new(),
        v => format!("\n  labels:\n    istio.io/waypoint-for: {v}"),
    };
    format!(
        "\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/use-waypoint: waypoint
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: shop{labels}
spec:
  gatewayClassName: palisade-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {{name: waypoint-0, namespace: shop}}
spec:
  serviceAccount: waypoint
  node: n1
  addresses: [10.0.1.2]
  labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {{name: web-0, namespace: shop}}
spec:
  serviceAccount: web
  node: n1
  addresses: [10.0.2.1, fd00::21]
  labels: {{app: web}}
  ports: [{{name: http, containerPort: 8080}}]
---
apiVersion: palisade.dev/v1alpha1
kind: Workload
metadata: {{name: db-0, namespace: shop}}
spec:
  serviceAccount: db
  node: n1
  addresses: [10.0.3.1]
  labels: {{app: db}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  clusterIP: 10.96.0.10
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}, {{name: admin, port: 90, targetPort: 9090}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: waypoint-deny, namespace: shop}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}}]
  action: DENY
  rules: [{{to: [{{operation: {{paths: [/admin]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: web-allow, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: \"\", name: web}}]
  action: ALLOW
  rules: [{{from: [{{source: {{namespaces: [shop]}}}}]}}]
"
    )
}

const ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: web}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
";

fn load(text: &str) -> (Vec<Located>, Vec<Finding>) {
    let mut b = Batch::default();
    parse_into(&mut b, Path::new("w.yaml"), text);
    let findings = check_batch(&b);
    (b.resources, findings)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn shown(findings: &[Finding]) -> Vec<String> {
    findings.iter().map(|f| format!("{} [{}]", f, f.field)).collect()
}

/// The one finding whose message contains `part`, else a panic listing them all.
fn finding<'a>(findings: &'a [Finding], part: &str) -> &'a Finding {
    let hits: Vec<&Finding> = findings.iter().filter(|f| f.message.contains(part)).collect();
    assert_eq!(hits.len(), 1, "one finding with {part:?}: {:#?}", shown(findings));
    hits[0]
}

/// The 1-based line of `w.yaml` holding `needle` after the line holding `after`.
fn line_of(text: &str, after: &str, needle: &str) -> usize {
    let start = text.lines().position(|l| l.contains(after)).expect("anchor present");
    start + text.lines().skip(start).position(|l| l.contains(needle)).expect("needle present") + 1
}

#[test]
fn waypoint_for_all_serves_the_services_and_the_workloads_of_its_namespace() {
    let (resources, findings) = load(&format!("{}---\n{ROUTE}", base("all")));
    // `db-0` is served but has no port the waypoint could serve: a warning, no error.
    assert!(findings.iter().all(|f| !f.is_error()), "{:#?}", shown(&findings));
    let no_port = finding(&findings, "declares no TCP port");
    assert_eq!((no_port.severity, no_port.resource.as_str()), (Severity::Warning, "Workload shop/db-0"));

    let index = waypoint_index(&resources, TD);
    assert_eq!(index.for_vip(ip("10.96.0.10")).map(|w| w.name.as_str()), Some("shop/waypoint"));
    for addr in ["10.0.2.1", "fd00::21", "10.0.3.1", "::ffff:10.0.2.1"] {
        assert_eq!(index.for_workload(ip(addr)).map(|w| w.name.as_str()), Some("shop/waypoint"), "{addr}");
    }
    // The waypoint's own workload never uses a waypoint; an address of no workload has none.
    assert!(index.for_workload(ip("10.0.1.2")).is_none());
    assert!(index.for_workload(ip("10.0.9.9")).is_none());
    // The destination accepts the waypoint from its address, and nothing else as the waypoint.
    assert!(index.accepts_from(ip("10.0.3.1"), ip("10.0.1.2"), WAYPOINT_ID));
    assert!(!index.accepts_from(ip("10.0.3.1"), ip("10.0.2.1"), WAYPOINT_ID));
    assert!(!index.accepts_from(ip("10.0.3.1"), ip("10.0.1.2"), "spiffe://example.org/ns/shop/sa/web"));

    let configs = compile_waypoints(&resources, TD);
    let config = &configs["shop/waypoint"];
    let entries: Vec<(&str, SocketAddr)> = config.services.iter().map(|s| (s.service.as_str(), s.vip)).collect();
    // The Service's VIP ports, then one entry per address and known port of each Workload.
    assert_eq!(
        entries,
        [
            ("shop/web", "10.96.0.10:80".parse().unwrap()),
            ("shop/web", "10.96.0.10:90".parse().unwrap()),
            ("workload:shop/web-0", "10.0.2.1:8080".parse().unwrap()),
            ("workload:shop/web-0", "10.0.2.1:9090".parse().unwrap()),
            ("workload:shop/web-0", "[fd00::21]:8080".parse().unwrap()),
            ("workload:shop/web-0", "[fd00::21]:9090".parse().unwrap()),
        ]
    );
    let direct: &ServiceL7 = &config.services[2];
    // One endpoint, the Workload itself, with the identity it must prove.
    let ends: Vec<(SocketAddr, &str)> =
        direct.default_backend.endpoints.iter().map(|e| (e.address, e.identity.as_str())).collect();
    assert_eq!(ends, [("10.0.2.1:8080".parse().unwrap(), "spiffe://example.org/ns/shop/sa/web")]);
    // The waypoint's policy applies; the Service's policy and route are about its VIP.
    let authz: Vec<(&str, AuthzAction)> = direct.authorization.iter().map(|a| (a.name.as_str(), a.action)).collect();
    assert_eq!(authz, [("shop/waypoint-deny", AuthzAction::Deny)]);
    assert!(direct.routes.is_empty());
    let vip = &config.services[0];
    assert_eq!(vip.authorization.len(), 2, "the VIP keeps both policies");
    assert_eq!(vip.routes.len(), 1);
}

#[test]
fn waypoint_for_service_is_the_default_and_serves_no_workload() {
    for label in ["", "service"] {
        let (resources, findings) = load(&base(label));
        assert!(findings.is_empty(), "{label:?}: {:#?}", shown(&findings));
        let index = waypoint_index(&resources, TD);
        assert!(index.for_vip(ip("10.96.0.10")).is_some());
        assert!(index.for_workload(ip("10.0.2.1")).is_none(), "{label:?}");
        assert!(index.workloads.is_empty());
        // Still an endpoint of the served Service: the waypoint's tunnels are accepted.
        assert!(index.accepts_from(ip("10.0.2.1"), ip("10.0.1.2"), WAYPOINT_ID));
        let configs = compile_waypoints(&resources, TD);
        assert!(configs["shop/waypoint"].services.iter().all(|s| !s.service.starts_with("workload:")));
    }
}

#[test]
fn a_workload_label_naming_a_service_waypoint_is_a_warning_that_it_has_no_effect() {
    let text = base("service").replace(
        "  labels: {app: db}\n",
        "  labels: {app: db}\n---\napiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: cache-0\n  namespace: shop\n  labels: {istio.io/use-waypoint: waypoint}\nspec: {serviceAccount: cache, node: n1, addresses: [10.0.4.1]}\n",
    );
    let (resources, findings) = load(&text);
    let f = finding(&findings, "no effect for workload traffic");
    assert_eq!((f.severity, f.field.as_str()), (Severity::Warning, "metadata.labels"));
    assert_eq!(f.line, line_of(&text, "name: cache-0", "istio.io/use-waypoint"));
    assert!(f.message.contains("istio.io/waypoint-for: service"), "{f}");
    assert!(waypoint_index(&resources, TD).for_workload(ip("10.0.4.1")).is_none());
}

#[test]
fn waypoint_for_workload_takes_no_service_traffic() {
    let (resources, findings) = load(&base("workload"));
    let index = waypoint_index(&resources, TD);
    assert!(index.for_vip(ip("10.96.0.10")).is_none());
    assert!(index.for_workload(ip("10.0.2.1")).is_some());
    // An L7 resource on the Service would not be enforced: an error naming why (here the
    // Service's AuthorizationPolicy, then a route).
    let f = finding(&findings, "it serves no Service traffic");
    assert!(f.is_error() && f.resource == "AuthorizationPolicy shop/web-allow", "{f}");
    assert_eq!(findings.iter().filter(|f| f.is_error()).count(), 1, "{:#?}", shown(&findings));
    let (_, findings) = load(&format!("{}---\n{ROUTE}", base("workload")));
    let errors: Vec<&str> = findings.iter().filter(|f| f.is_error()).map(|f| f.resource.as_str()).collect();
    assert_eq!(errors, ["AuthorizationPolicy shop/web-allow", "HTTPRoute shop/web"]);
    // A Service's own label naming it: a warning.
    let text = base("workload").replace(
        "metadata: {name: web, namespace: shop}\nspec:\n  clusterIP",
        "metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}\nspec:\n  clusterIP",
    );
    let (_, findings) = load(&text);
    let f = finding(&findings, "no effect for Service traffic");
    assert_eq!((f.severity, f.resource.as_str()), (Severity::Warning, "Service shop/web"));
}

#[test]
fn waypoint_for_none_serves_nothing() {
    let (resources, _) = load(&base("none"));
    let index = waypoint_index(&resources, TD);
    assert!(index.vips.is_empty() && index.workloads.is_empty() && index.endpoints.is_empty());
}

#[test]
fn a_bad_waypoint_for_value_is_an_error_at_its_line() {
    let text = base("workloads");
    let (resources, findings) = load(&text);
    let f = finding(&findings, "is not one of service, workload, all, none");
    assert!(f.is_error(), "{f}");
    assert_eq!((f.resource.as_str(), f.field.as_str()), ("Gateway shop/waypoint", "metadata.labels"));
    assert_eq!(f.line, line_of(&text, "kind: Gateway", "labels:"));
    assert!(f.to_string().starts_with(&format!("w.yaml:{}", f.line)), "{f}");
    // Nothing is guessed for it: it serves nothing.
    assert!(waypoint_index(&resources, TD).for_vip(ip("10.96.0.10")).is_none());
}

#[test]
fn the_workload_label_wins_over_the_namespace_label() {
    // A second waypoint for all in `lab`, named from `shop` with use-waypoint-namespace; one
    // workload opts out of its namespace's waypoint.
    let text = format!(
        "{}---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {{name: edge, namespace: lab, labels: {{istio.io/waypoint-for: all}}}}\n\
         spec: {{gatewayClassName: palisade-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: edge-0, namespace: lab}}\n\
         spec: {{serviceAccount: edge, node: n1, addresses: [10.0.8.1], labels: {{gateway.networking.k8s.io/gateway-name: edge}}}}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: api-0, namespace: shop}}\n\
         spec: {{serviceAccount: api, node: n1, addresses: [10.0.5.1], ports: [{{containerPort: 80}}], labels: {{istio.io/use-waypoint: edge, istio.io/use-waypoint-namespace: lab}}}}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: out-0, namespace: shop, labels: {{istio.io/use-waypoint: none}}}}\n\
         spec: {{serviceAccount: out, node: n1, addresses: [10.0.6.1], ports: [{{containerPort: 80}}]}}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: self-0, namespace: shop}}\n\
         spec: {{serviceAccount: waypoint, node: n1, addresses: [10.0.7.1], labels: {{gateway.networking.k8s.io/gateway-name: waypoint, istio.io/use-waypoint: waypoint}}}}\n",
        base("all")
    );
    let (resources, findings) = load(&text);
    assert!(findings.iter().all(|f| !f.is_error()), "{:#?}", shown(&findings));
    let ignored = finding(&findings, "a waypoint's own workload never uses a waypoint");
    assert_eq!((ignored.resource.as_str(), ignored.field.as_str()), ("Workload shop/self-0", "spec.labels"));
    let index = waypoint_index(&resources, TD);
    let by = |a: &str| index.for_workload(ip(a)).map(|w| w.name.clone());
    assert_eq!(by("10.0.5.1").as_deref(), Some("lab/edge"));
    assert_eq!(by("10.0.6.1"), None);
    assert_eq!(by("10.0.7.1"), None);
    assert_eq!(by("10.0.2.1").as_deref(), Some("shop/waypoint"));
    // Only the waypoint serving it may carry traffic to it.
    assert!(index.accepts_from(ip("10.0.5.1"), ip("10.0.8.1"), "spiffe://example.org/ns/lab/sa/edge"));
    assert!(!index.accepts_from(ip("10.0.5.1"), ip("10.0.1.2"), WAYPOINT_ID));
    let configs = compile_waypoints(&resources, TD);
    let edge: Vec<SocketAddr> = configs["lab/edge"].services.iter().map(|s| s.vip).collect();
    assert_eq!(edge, ["10.0.5.1:80".parse::<SocketAddr>().unwrap()]);
    // The waypoint's DENY policy is in `shop`, about `shop/waypoint`: not `lab/edge`'s.
    assert!(configs["lab/edge"].services[0].authorization.is_empty());
}
