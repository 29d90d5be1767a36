//! Capture: pod-to-pod TCP goes through ztunnel on both ends with its original destination,
//! in both directions, with half-close and large transfers.
mod support;

use support::*;

#[test]
fn same_node_and_cross_node_connections_go_through_ztunnel() {
    let cluster = mesh(2, 2, "");
    let _s12 = serve(&cluster, "p1-2", 8080);
    let _s21 = serve(&cluster, "p2-1", 9090);
    let same = cluster.pod("p1-2").unwrap().ip.clone();
    let cross = cluster.pod("p2-1").unwrap().ip.clone();
    let src = cluster.pod("p1-1").unwrap().ip.clone();

    for (dst, node_of_dst) in [(format!("{same}:8080"), "node-1"), (format!("{cross}:9090"), "node-2")] {
        let r = connect(&cluster, "p1-1", &dst, 100_000);
        assert_eq!(r["ok"], true, "{dst}: {r}");
        assert_eq!(r["verified"], true, "{dst}: {r}");
        // The client believes it talks to the destination itself.
        assert_eq!(r["peer"], dst.as_str());
        // Outbound ztunnel carried it, to the original destination.
        let out = wait_flow(&cluster, "node-1", |f| {
            f["observer"] == "proxy" && f["direction"] == "outbound" && f["dst"] == dst.as_str()
        });
        assert_eq!(out["bytes_sent"], 100_000, "{out}");
        assert_eq!(out["bytes_received"], 100_000, "{out}");
        assert_eq!(out["src_identity"], "default/p1-1");
        // Inbound ztunnel of the destination carried it too, from the source pod's address.
        let inb = wait_flow(&cluster, node_of_dst, |f| {
            f["observer"] == "proxy" && f["direction"] == "inbound" && f["dst"] == dst.as_str()
        });
        assert!(inb["src"].as_str().unwrap().starts_with(&format!("{src}:")), "{inb}");
        // The client's own port comes with the tunnel (`forwarded`). (The client's socket is
        // bound on loopback, where connect4 sent it; its port is the one the pod uses.)
        let client_port = r["local"].as_str().unwrap().rsplit(':').next().unwrap();
        assert_eq!(inb["src"], format!("{src}:{client_port}"), "{inb} / {r}");
        assert_eq!(inb["bytes_received"], 100_000, "{inb}");
        // Between enrolled pods the hop is HBONE, and each side saw the other's proven identity.
        let dst_sa = if node_of_dst == "node-1" { "p1-2" } else { "p2-1" };
        assert_eq!(out["transport"], "hbone", "{out}");
        assert_eq!(out["peer_spiffe_id"], format!("spiffe://cluster.local/ns/default/sa/{dst_sa}"), "{out}");
        assert_eq!(inb["transport"], "hbone", "{inb}");
        assert_eq!(inb["peer_spiffe_id"], "spiffe://cluster.local/ns/default/sa/p1-1", "{inb}");
        // The destination's access log names the client's proven identity too.
        let log = cluster.node(node_of_dst).unwrap().log.clone();
        let logged = || {
            std::fs::read_to_string(&log).unwrap_or_default().lines().any(|l| {
                l.contains(" access: ")
                    && l.contains("direction=Inbound")
                    && l.contains(&format!("dst={dst}"))
                    && l.contains("peer=\"spiffe://cluster.local/ns/default/sa/p1-1\"")
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !logged() {
            assert!(std::time::Instant::now() < deadline, "no inbound access log line for {dst} in {}", log.display());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // The source's kernel took the verdict at connect().
        wait_flow(&cluster, "node-1", |f| {
            f["observer"] == "kernel"
                && f["direction"] == "outbound"
                && f["dst"] == dst.as_str()
                && f["verdict"] == "allow"
        });
    }
}
