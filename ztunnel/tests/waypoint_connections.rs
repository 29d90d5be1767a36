//! A tunnel a waypoint carries to an endpoint is registered at the destination like any other
//! and re-checked on every policy change, by its own rule: it stays while that waypoint serves
//! the endpoint (whatever the endpoint's L4 policy says of the waypoint's identity, since the
//! waypoint enforced it against the original source), and closes once it no longer does.
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use palisade_model::compile::compile_for;
use palisade_model::load::parse_str;
use palisade_ztunnel::connections::Connections;

const WAYPOINT: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";

/// `shop/web` (10.0.2.1) behind `shop/waypoint` (10.0.1.2) when `served`; the endpoint's L4
/// policy allows only `shop/client`, never the waypoint's identity.
fn snapshot(served: bool) -> palisade_model::Snapshot {
    let label = if served { "labels: {istio.io/use-waypoint: waypoint}" } else { "labels: {}" };
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: waypoint, namespace: shop}}\n\
         spec: {{gatewayClassName: palisade-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: waypoint-0, namespace: shop}}\n\
         spec: {{serviceAccount: waypoint, node: n1, addresses: [10.0.1.2], labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}}}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: web-0, namespace: shop}}\n\
         spec: {{serviceAccount: web, node: n2, addresses: [10.0.2.1], labels: {{app: web}}}}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: client-0, namespace: shop}}\n\
         spec: {{serviceAccount: client, node: n1, addresses: [10.0.1.3], labels: {{app: client}}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop, {label}}}\n\
         spec: {{clusterIP: 10.96.0.10, selector: {{app: web}}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {{name: only-client, namespace: shop}}\n\
         spec: {{selector: {{matchLabels: {{app: web}}}}, action: Allow, rules: [{{from: [{{namespace: shop, serviceAccount: client}}]}}]}}\n"
    );
    compile_for(&parse_str(Path::new("test.yaml"), &yaml).expect("test resources parse"), "cluster.local")
}

#[test]
fn a_waypoint_tunnel_stays_while_the_waypoint_serves_its_destination() {
    let served = snapshot(true);
    let dst: SocketAddr = "10.0.2.1:8080".parse().unwrap();
    let waypoint_ip = "10.0.1.2".parse().unwrap();
    assert!(served.waypoints.accepts_from(dst.ip(), waypoint_ip, WAYPOINT));
    let connections = Arc::new(Connections::default());
    let tunnel = connections.register_from_waypoint(waypoint_ip, WAYPOINT.into(), dst);
    // The same identity as an ordinary client is denied by the endpoint's policy...
    let as_client = connections.register(waypoint_ip, Some(("shop".into(), "waypoint".into())), dst);
    assert_eq!(connections.revalidate(&served), 1);
    assert!(as_client.closed.borrow().is_some());
    // ...while the waypoint's tunnel stays.
    assert!(tunnel.closed.borrow().is_none(), "{:?}", tunnel.closed.borrow());
    drop(as_client);

    // The Service leaves the waypoint: its tunnels to the endpoint close, saying why.
    assert_eq!(connections.revalidate(&snapshot(false)), 1);
    let reason = tunnel.closed.borrow().clone().expect("closed");
    assert!(reason.contains("no longer serves"), "{reason}");
}
