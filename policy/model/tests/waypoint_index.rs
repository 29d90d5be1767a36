//! The waypoint index a snapshot carries (what ztunnel routes and accepts by) is the same from
//! a full compile and from the incremental compiler, through changes to each kind it reads:
//! a route's backends, the Gateway, a waypoint's Workload, an endpoint's Workload, and the
//! labels that put Workloads behind a waypoint.
use std::net::IpAddr;
use std::path::Path;

use palisade_model::compile::{Compiler, Identities, compile_with};
use palisade_model::key::ResourceKey;
use palisade_model::load::{Located, parse_str};
use palisade_model::resource::Resource;

const EXAMPLE: &str = include_str!("../src/waypoint/example.yaml");
const TD: &str = "example.org";

fn example() -> Vec<Located> {
    parse_str(Path::new("example.yaml"), EXAMPLE).expect("the example parses")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Applies `upserts` and `removals` incrementally and checks the index against a full compile
/// of the same resources; returns the full compile's index.
fn step(
    compiler: &mut Compiler,
    upserts: Vec<Located>,
    removals: &[ResourceKey],
) -> std::sync::Arc<palisade_model::waypoint::WaypointIndex> {
    let incremental = compiler.update(upserts, removals, &Identities::default());
    let all: Vec<Located> = compiler.resources().into_iter().cloned().collect();
    let full = compile_with(&all, TD, &Identities::default());
    assert_eq!(incremental.waypoints, full.waypoints, "incremental and full compiles disagree");
    full.waypoints
}

fn find(resources: &[Located], kind: &str, name: &str) -> Located {
    resources
        .iter()
        .find(|l| l.resource.kind() == kind && l.resource.metadata().name == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the example"))
        .clone()
}

#[test]
fn incremental_and_full_compiles_give_the_same_waypoint_index() {
    let resources = example();
    let mut compiler = Compiler::new(TD);
    let index = step(&mut compiler, resources.clone(), &[]);
    let waypoint_id = format!("spiffe://{TD}/ns/shop/sa/waypoint");
    assert_eq!(index.for_vip(ip("10.96.0.10")).map(|w| w.name.as_str()), Some("shop/waypoint"));
    assert!(index.accepts_from(ip("10.0.2.1"), ip("10.0.1.2"), &waypoint_id));
    // Another address, or another identity, is not the waypoint.
    assert!(!index.accepts_from(ip("10.0.2.1"), ip("10.0.4.1"), &waypoint_id));
    assert!(!index.accepts_from(ip("10.0.2.1"), ip("10.0.1.2"), &format!("spiffe://{TD}/ns/front/sa/frontend")));
    // Not an endpoint of a Service the waypoint serves (the frontend is in `front`).
    assert!(!index.accepts_from(ip("10.0.4.1"), ip("10.0.1.2"), &waypoint_id));

    // A route's backend may select workloads its Service does not: a tunnel to them from the
    // waypoint is accepted too (here a canary Service, in a namespace without the label).
    let extra = parse_str(
        Path::new("canary.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: lab, labels: {}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: lab}\n\
         spec: {gatewayClassName: palisade-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {name: wp-0, namespace: lab}\n\
         spec: {serviceAccount: wp, node: n1, addresses: [10.0.9.1], labels: {gateway.networking.k8s.io/gateway-name: wp}}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {name: api-0, namespace: lab}\n\
         spec: {serviceAccount: api, node: n1, addresses: [10.0.9.2], labels: {app: api}}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {name: canary-0, namespace: lab}\n\
         spec: {serviceAccount: api, node: n1, addresses: [10.0.9.3], labels: {app: canary}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: lab, labels: {istio.io/use-waypoint: wp}}\n\
         spec: {clusterIP: 10.96.9.1, selector: {app: api}, ports: [{port: 80}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: canary, namespace: lab}\n\
         spec: {clusterIP: 10.96.9.2, selector: {app: canary}, ports: [{port: 80}]}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: api, namespace: lab}\n\
         spec: {parentRefs: [{group: \"\", kind: Service, name: api}], rules: [{backendRefs: [{name: canary, port: 80}]}]}\n",
    )
    .expect("the canary resources parse");
    let route = ResourceKey::of(&extra.last().unwrap().resource);
    let lab_wp = format!("spiffe://{TD}/ns/lab/sa/wp");
    let index = step(&mut compiler, extra, &[]);
    assert!(index.accepts_from(ip("10.0.9.3"), ip("10.0.9.1"), &lab_wp), "the route's backend");
    assert!(index.for_vip(ip("10.96.9.2")).is_none(), "the backend's own VIP is not behind the waypoint");
    let index = step(&mut compiler, vec![], &[route]);
    assert!(!index.accepts_from(ip("10.0.9.3"), ip("10.0.9.1"), &lab_wp), "no route, no backend");

    // The waypoint's Workload moves to another address.
    let mut moved = find(&resources, "Workload", "waypoint-0");
    if let Resource::Workload { spec, .. } = &mut moved.resource {
        spec.addresses = vec![ip("10.0.1.9")];
    }
    let index = step(&mut compiler, vec![moved.clone()], &[]);
    assert!(index.accepts_from(ip("10.0.2.1"), ip("10.0.1.9"), &waypoint_id));
    assert!(!index.accepts_from(ip("10.0.2.1"), ip("10.0.1.2"), &waypoint_id));

    // An endpoint goes away: no longer accepted for it.
    let v2 = ResourceKey::of(&find(&resources, "Workload", "web-v2-0").resource);
    let index = step(&mut compiler, vec![], &[v2]);
    assert!(!index.accepts_from(ip("10.0.2.2"), ip("10.0.1.9"), &waypoint_id));

    // The Gateway goes away: no waypoint serves anything.
    let gateway = ResourceKey::of(&find(&resources, "Gateway", "waypoint").resource);
    let index = step(&mut compiler, vec![], &[gateway]);
    assert!(index.for_vip(ip("10.96.0.10")).is_none());
    assert!(!index.accepts_from(ip("10.0.2.1"), ip("10.0.1.9"), &waypoint_id));

    // It comes back.
    let index = step(&mut compiler, vec![find(&resources, "Gateway", "waypoint")], &[]);
    assert!(index.for_vip(ip("10.96.0.10")).is_some());
}

fn with_labels(mut l: Located, labels: &[(&str, &str)]) -> Located {
    let meta = match &mut l.resource {
        Resource::Gateway { metadata, .. }
        | Resource::Workload { metadata, .. }
        | Resource::Namespace { metadata, .. } => metadata,
        other => panic!("no labels here: {}", other.kind()),
    };
    meta.labels.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    l
}

/// Workload traffic (`istio.io/waypoint-for`, use-waypoint on a Workload): the incremental
/// compiler follows the Gateway's label, a Workload's own label and its Namespace's.
#[test]
fn workload_traffic_is_indexed_alike_by_incremental_and_full_compiles() {
    let resources = example();
    let mut compiler = Compiler::new(TD);
    let index = step(&mut compiler, resources.clone(), &[]);
    assert!(index.for_workload(ip("10.0.2.1")).is_none(), "a Service waypoint by default");

    let gateway = find(&resources, "Gateway", "waypoint");
    let index = step(&mut compiler, vec![with_labels(gateway.clone(), &[("istio.io/waypoint-for", "all")])], &[]);
    assert_eq!(index.for_workload(ip("10.0.2.1")).map(|w| w.name.as_str()), Some("shop/waypoint"));
    assert!(index.for_workload(ip("10.0.1.2")).is_none(), "not the waypoint's own workload");
    assert!(index.for_vip(ip("10.96.0.10")).is_some());

    // A workload opts out with its own label; the namespace's waypoint still serves the rest.
    let v1 = find(&resources, "Workload", "web-v1-0");
    let index = step(&mut compiler, vec![with_labels(v1.clone(), &[("istio.io/use-waypoint", "none")])], &[]);
    assert!(index.for_workload(ip("10.0.2.1")).is_none());
    assert!(index.for_workload(ip("10.0.2.2")).is_some());

    // The frontend's namespace has no waypoint; its own label puts it behind shop's.
    let frontend = find(&resources, "Workload", "frontend-0");
    let labels = [("istio.io/use-waypoint", "waypoint"), ("istio.io/use-waypoint-namespace", "shop")];
    let index = step(&mut compiler, vec![with_labels(frontend, &labels)], &[]);
    assert_eq!(index.for_workload(ip("10.0.4.1")).map(|w| w.name.as_str()), Some("shop/waypoint"));

    // Back to a Service waypoint: no workload is served.
    let index = step(&mut compiler, vec![gateway], &[]);
    assert!(index.workloads.is_empty());
}
