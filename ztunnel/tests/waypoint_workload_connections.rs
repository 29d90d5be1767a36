//! A destination that a waypoint starts serving for workload traffic (`istio.io/waypoint-for:
//! all`) keeps only tunnels from that waypoint: a client's direct connection, allowed by the
//! L4 policy a moment ago, is closed on the next policy change, and its reason names the
//! waypoint; the waypoint's own tunnel stays.
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use palisade_model::compile::compile_for;
use palisade_model::load::parse_str;
use palisade_ztunnel::connections::Connections;

const WAYPOINT: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";

/// `shop/web-0` (10.0.2.1) in namespace `shop`, which uses `shop/waypoint` (10.0.1.2); the
/// waypoint serves workloads when `waypoint_for` says so. L4 allows `shop/client` to web.
/// (Direct connections: a client's tunnel and a plaintext one by address.)
fn snapshot(waypoint_for: &str) -> palisade_model::Snapshot {
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{istio.io/use-waypoint: waypoint}}}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {{name: waypoint, namespace: shop, labels: {{istio.io/waypoint-for: {waypoint_for}}}}}\n\
         spec: {{gatewayClassName: palisade-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: waypoint-0, namespace: shop}}\n\
         spec: {{serviceAccount: waypoint, node: n1, addresses: [10.0.1.2], labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}}}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: web-0, namespace: shop}}\n\
         spec: {{serviceAccount: web, node: n2, addresses: [10.0.2.1], labels: {{app: web}}, ports: [{{containerPort: 8080}}]}}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: client-0, namespace: shop}}\n\
         spec: {{serviceAccount: client, node: n1, addresses: [10.0.1.3], labels: {{app: client}}}}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: only-client, namespace: shop}}\n\
         spec: {{selector: {{matchLabels: {{app: web}}}}, action: Allow, rules: [{{from: [{{namespace: shop, serviceAccount: client}}]}}]}}\n"
    );
    compile_for(&parse_str(Path::new("test.yaml"), &yaml).expect("test resources parse"), "cluster.local")
}

#[test]
fn direct_connections_close_when_their_destination_becomes_served_for_workload_traffic() {
    let dst: SocketAddr = "10.0.2.1:8080".parse().unwrap();
    let (client_ip, waypoint_ip) = ("10.0.1.3".parse().unwrap(), "10.0.1.2".parse().unwrap());
    let service_only = snapshot("service");
    assert!(service_only.waypoints.for_workload(dst.ip()).is_none());
    let connections = Arc::new(Connections::default());
    let direct = connections.register(client_ip, Some(("shop".into(), "client".into())), dst);
    let plaintext = connections.register(client_ip, None, dst);
    // A Service waypoint: direct traffic bypasses it, as with Istio, and stays.
    assert_eq!(connections.revalidate(&service_only), 0);
    assert!(direct.closed.borrow().is_none());

    let all = snapshot("all");
    assert!(all.waypoints.accepts_from(dst.ip(), waypoint_ip, WAYPOINT));
    let tunnel = connections.register_from_waypoint(waypoint_ip, WAYPOINT.into(), dst);
    assert_eq!(connections.revalidate(&all), 2);
    for (what, c) in [("the tunnel", &direct), ("the plaintext connection", &plaintext)] {
        let reason = c.closed.borrow().clone().unwrap_or_else(|| panic!("{what} is closed"));
        assert!(reason.contains("served by waypoint shop/waypoint for workload traffic"), "{what}: {reason}");
    }
    assert!(tunnel.closed.borrow().is_none(), "{:?}", tunnel.closed.borrow());
}
