//! The waypoint index a snapshot carries (what ztunnel routes and accepts by) is the same from
//! a full compile and from the incremental compiler, through changes to each kind it reads:
//! a Service's label, the Gateway, a waypoint's Workload, an endpoint's Workload.
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
