//! Compilation of the example (`example.yaml`): a 90/10 split, a regular-expression route, a
//! redirect, authorization on a Service and on the waypoint, a ring-hash traffic policy, and
//! the index ztunnel reads; and route precedence.
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use super::config::*;
use super::{compile_waypoints, waypoint_index};
use crate::load::{Batch, Located, parse_into};
use crate::validate::check_batch;

const EXAMPLE: &str = include_str!("example.yaml");

fn load(text: &str) -> Vec<Located> {
    let mut b = Batch::default();
    parse_into(&mut b, Path::new("example.yaml"), text);
    let findings = check_batch(&b);
    assert!(findings.is_empty(), "{:#?}", findings.iter().map(ToString::to_string).collect::<Vec<_>>());
    b.resources
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn endpoint(workload: &str, address: &str, sa: &str) -> BackendEndpoint {
    BackendEndpoint {
        workload: format!("shop/{workload}"),
        address: addr(address),
        identity: format!("spiffe://example.org/ns/shop/sa/{sa}"),
    }
}

#[test]
fn the_example_validates_without_findings_and_compiles() {
    let resources = load(EXAMPLE);
    let configs = compile_waypoints(&resources, "example.org");
    assert_eq!(configs.keys().collect::<Vec<_>>(), ["shop/waypoint"]);
    let config = &configs["shop/waypoint"];
    assert_eq!(config.name, "shop/waypoint");
    let served: Vec<(&str, SocketAddr)> = config.services.iter().map(|s| (s.service.as_str(), s.vip)).collect();
    assert_eq!(
        served,
        [
            ("shop/reviews", addr("10.96.0.20:9080")),
            ("shop/web", addr("10.96.0.10:80")),
            ("shop/web-v1", addr("10.96.0.11:80")),
            ("shop/web-v2", addr("10.96.0.12:80")),
        ]
    );
    let web = &config.services[1];
    assert_eq!(web.hosts, ["web.shop.svc.cluster.local", "web.shop", "web"]);

    // Precedence: the exact path, the regular expression, the longer prefix, then `/`.
    let order: Vec<(&str, &PathMatch)> =
        web.routes.iter().map(|r| (r.name.as_str(), r.matches[0].path.as_ref().unwrap())).collect();
    assert_eq!(
        order,
        [
            ("shop/web#3", &PathMatch::Exact("/healthz".into())),
            ("shop/web#1", &PathMatch::Regex("/items/[0-9]+".into())),
            ("shop/web#2", &PathMatch::Prefix("/old".into())),
            ("shop/web#0", &PathMatch::Prefix("/".into())),
        ]
    );

    // The 90/10 split, each backend resolved to its endpoints and their identities.
    let split = &web.routes[3];
    let weights: Vec<(&str, u32, &[BackendEndpoint])> =
        split.backends.iter().map(|b| (b.backend.name.as_str(), b.weight, &b.backend.endpoints[..])).collect();
    assert_eq!(
        weights,
        [
            ("shop/web-v1:80", 90, &[endpoint("web-v1-0", "10.0.2.1:8080", "web")][..]),
            ("shop/web-v2:80", 10, &[endpoint("web-v2-0", "10.0.2.2:8080", "web")][..]),
        ]
    );
    assert_eq!(
        split.filters,
        [Filter::ResponseHeaders(HeaderModifier {
            add: vec![("x-served-via".into(), "waypoint".into())],
            ..Default::default()
        })]
    );

    // The regular-expression route: GET only, timeouts and retries as written.
    let items = &web.routes[1];
    assert_eq!(items.matches[0].method.as_deref(), Some("GET"));
    assert_eq!(items.request_timeout, Some(Duration::from_secs(2)));
    assert_eq!(items.backend_timeout, Some(Duration::from_millis(500)));
    assert_eq!(
        items.retry,
        Some(RetryPolicy {
            attempts: 3,
            codes: vec![502, 503],
            backoff: Duration::from_millis(50),
            non_idempotent: false
        })
    );
    assert_eq!(
        web.routes[2].filters,
        [Filter::Redirect(Redirect {
            path: Some(PathRewrite::Prefix("/new".into())),
            status: 301,
            ..Default::default()
        })]
    );
    // Without a route, the Service's own endpoints.
    assert_eq!(
        web.default_backend.endpoints,
        [endpoint("web-v1-0", "10.0.2.1:8080", "web"), endpoint("web-v2-0", "10.0.2.2:8080", "web")]
    );

    // Authorization: the waypoint-wide DENY applies to every Service, the ALLOW to `web` only.
    let names = |s: &ServiceL7| s.authorization.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(web), ["shop/no-admin", "shop/web-readers"]);
    assert_eq!(names(&config.services[0]), ["shop/no-admin"]);
    let readers = &web.authorization[1];
    assert_eq!(readers.action, AuthzAction::Allow);
    assert_eq!(readers.rules[0].from[0].namespaces, ["front"]);
    assert_eq!(readers.rules[0].to[0].methods, ["GET", "HEAD"]);
    assert_eq!(web.authorization[0].action, AuthzAction::Deny);
    assert_eq!(web.authorization[0].rules[0].to[0].paths, ["/admin*"]);

    // Traffic policy: ring hash on a (lower-cased) header, limits, outlier detection.
    let reviews = &config.services[0];
    let traffic = &reviews.traffic;
    assert_eq!(traffic.name.as_deref(), Some("shop/reviews"));
    assert_eq!(traffic.load_balancer, LoadBalancer::RingHash(HashKey::Header("x-user".into())));
    assert_eq!(traffic.limits.max_connections, Some(100));
    assert_eq!(traffic.limits.max_pending_requests, Some(10));
    assert_eq!(traffic.limits.max_active_requests, Some(200));
    assert_eq!(
        traffic.outlier,
        Some(OutlierDetection {
            consecutive_5xx: Some(3),
            consecutive_gateway_errors: None,
            interval: Duration::from_secs(5),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 50,
        })
    );
    assert_eq!(
        (traffic.connect_timeout, traffic.idle_timeout),
        (Some(Duration::from_secs(1)), Some(Duration::from_secs(300)))
    );
    assert_eq!(reviews.default_backend.traffic, *traffic, "a backend carries its Service's policy");
    assert_eq!(reviews.default_backend.endpoints.len(), 2);
    assert_eq!(web.traffic, TrafficPolicy::default());
}

#[test]
fn the_index_tells_ztunnel_which_waypoint_serves_a_vip_and_an_endpoint() {
    let resources = load(EXAMPLE);
    let index = waypoint_index(&resources, "example.org");
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let w = index.for_vip(ip("10.96.0.10")).expect("web is served");
    assert_eq!(w.name, "shop/waypoint");
    assert_eq!(w.workloads.len(), 1);
    assert_eq!(w.workloads[0].addresses, [ip("10.0.1.2")]);
    assert_eq!(w.workloads[0].identity, "spiffe://example.org/ns/shop/sa/waypoint");
    assert!(index.for_vip(ip("10.0.2.1")).is_none(), "a workload address is not a VIP");
    let id = "spiffe://example.org/ns/shop/sa/waypoint";
    assert!(index.accepts_from(ip("10.0.2.1"), ip("10.0.1.2"), id));
    assert!(!index.accepts_from(ip("10.0.2.1"), ip("10.0.4.1"), id), "the waypoint's identity from another address");
    assert!(!index.accepts_from(ip("10.0.2.1"), ip("10.0.1.2"), "spiffe://example.org/ns/front/sa/frontend"));
    assert!(!index.accepts_from(ip("10.0.4.1"), ip("10.0.1.2"), id), "frontend is behind no waypoint");
}

/// Gateway API precedence across matches of several rules and routes, whatever their order in
/// the files: exact, regex, longest prefix; then method, more headers, more query parameters;
/// then route name and rule order.
#[test]
fn routes_follow_gateway_api_precedence() {
    let rule = |m: &str| format!("  - matches: [{m}]\n    backendRefs: [{{name: web, port: 80}}]\n");
    let route = |name: &str, rules: &[&str]| {
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  parentRefs: [{{group: \"\", kind: Service, name: web}}]\n  rules:\n{}",
            rules.iter().map(|m| rule(m)).collect::<String>()
        )
    };
    let text = format!(
        "{EXAMPLE}{}{}",
        route(
            "b",
            &[
                "{path: {type: PathPrefix, value: /a}}",
                "{path: {type: PathPrefix, value: /a}, headers: [{name: x, value: '1'}]}",
                "{path: {type: PathPrefix, value: /a/b/}}",
                "{path: {type: PathPrefix, value: /a}, method: POST}",
            ]
        ),
        route(
            "a",
            &[
                "{path: {type: PathPrefix, value: /a}, queryParams: [{name: q, value: '1'}]}",
                "{path: {type: Exact, value: /z}}",
                "{path: {type: PathPrefix, value: /a}}",
                "{path: {type: PathPrefix, value: /a}, headers: [{name: x, value: '1'}, {name: y, value: '2'}]}",
            ]
        ),
    )
    .replace(
        "  - group: \"\"\n    kind: Service\n    name: web\n    port: 80\n",
        "  - {group: \"\", kind: Service, name: nothing}\n",
    );
    // (The example's own route now attaches to no Service of this test: only a and b count.)
    let text = text.replace(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: web\n",
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: unused\n",
    );
    let mut b = Batch::default();
    parse_into(&mut b, Path::new("p.yaml"), &text);
    let configs = compile_waypoints(&b.resources, "cluster.local");
    let web = configs["shop/waypoint"].services.iter().find(|s| s.service == "shop/web").unwrap();
    let order: Vec<&str> = web.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        order,
        [
            "shop/a#1", // Exact /z
            "shop/b#2", // the longest prefix, /a/b/
            "shop/b#3", // /a with a method
            "shop/a#3", // /a with two headers
            "shop/b#1", // /a with one header
            "shop/a#0", // /a with a query parameter
            "shop/a#2", // /a: route a before route b
            "shop/b#0",
        ]
    );
}

/// The control plane stores a resource as its serialised YAML and reads it back with the
/// loader: every waypoint kind must come back equal.
#[test]
fn the_waypoint_kinds_round_trip_through_their_yaml() {
    for r in load(EXAMPLE) {
        let text = serde_yaml::to_string(&r.resource).unwrap();
        let back = crate::load::parse_str(Path::new("stored.yaml"), &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].resource, r.resource, "{text}");
    }
}
