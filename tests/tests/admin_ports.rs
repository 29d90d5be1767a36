//! The admin API stays on localhost: the metrics and readiness listeners, which bind every
//! address of the node, answer only `/metrics` and `/healthz/ready`. Flows and the config dump
//! (every workload, identity and rule of the node) are not readable from the node network or
//! from a pod.
mod support;

use std::io::{Read, Write};
use std::time::Duration;

use support::*;

/// One GET over a socket made in `netns`: `Ok((status, body))`, or the connect/read error.
fn get(netns: &str, addr: &str, path: &str) -> Result<(u16, String), String> {
    let (addr, path) = (addr.to_string(), path.to_string());
    palisade_sandbox::sys::in_netns(netns, move || {
        let sock: std::net::SocketAddr = addr.parse().unwrap();
        let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).map_err(|e| format!("GET {path} on {addr}: {e}"))?;
        let status = buf.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or(format!("no status in {buf:?}"))?;
        Ok((status, buf))
    })
    .expect("enter netns")
}

/// Checks, from `netns`, what each port of the node at `ip` answers.
fn check_ports_from(netns: &str, ip: &str, from: &str) {
    let metrics = format!("{ip}:15020");
    let ready = format!("{ip}:15021");
    let (status, body) = get(netns, &metrics, "/metrics").unwrap();
    assert_eq!(status, 200, "{from}: /metrics on {metrics}: {body}");
    assert!(body.contains("palisade_"), "{from}: /metrics on {metrics} is not the metrics: {body}");
    assert_eq!(get(netns, &metrics, "/stats/prometheus").unwrap().0, 200, "{from}: Prometheus alias on {metrics}");
    let (status, body) = get(netns, &ready, "/healthz/ready").unwrap();
    assert_eq!(status, 200, "{from}: /healthz/ready on {ready}: {body}");
    for (addr, path) in [
        (&metrics, "/config_dump"),
        (&metrics, "/flows"),
        (&metrics, "/flows?follow=1"),
        (&metrics, "/healthz/ready"),
        (&ready, "/config_dump"),
        (&ready, "/flows"),
        (&ready, "/flows?follow=1"),
        (&ready, "/metrics"),
    ] {
        let (status, body) = get(netns, addr, path).unwrap_or_else(|e| panic!("{from}: {e}"));
        assert_eq!(status, 404, "{from}: GET {path} on {addr} must be refused:\n{body}");
        assert!(!body.contains("spiffe://") && !body.contains("policy_generation"), "{from}: {path} leaked: {body}");
    }
    let admin = format!("{ip}:15000");
    assert!(get(netns, &admin, "/config_dump").is_err(), "{from}: the admin API answers on {admin}");
}

#[test]
fn metrics_and_readiness_ports_serve_nothing_else_and_admin_stays_on_localhost() {
    let cluster = mesh(1, 1, "");
    // Some flows, so that a leak would have something to show.
    let _server = serve(&cluster, "p1-1", 8080);
    let node = cluster.node("node-1").unwrap().clone();
    let pod = cluster.pod("p1-1").unwrap().clone();
    // The node network: another host would reach these addresses the same way.
    check_ports_from(&node.netns, &node.ip, "node netns via its own address");
    // A pod: the node's address and the pod's gateway (an address of the node).
    check_ports_from(&pod.netns, &node.ip, "pod p1-1 via the node address");
    check_ports_from(&pod.netns, "10.244.1.1", "pod p1-1 via its gateway");
    // The admin API itself still serves everything on localhost.
    let (status, body) = get(&node.netns, "127.0.0.1:15000", "/config_dump").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("policy_generation"), "{body}");
    for path in ["/flows", "/metrics", "/healthz/ready"] {
        assert_eq!(get(&node.netns, "127.0.0.1:15000", path).unwrap().0, 200, "admin {path}");
    }
}
