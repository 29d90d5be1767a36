//! Large transfers through the capture path are byte-exact, with half-close both ways.
mod support;

use support::*;

#[test]
fn one_gibibyte_cross_node_is_byte_exact() {
    let cluster = mesh(2, 1, "");
    let _server = serve(&cluster, "p2-1", 7000);
    let dst = format!("{}:7000", cluster.pod("p2-1").unwrap().ip);
    const GIB: u64 = 1 << 30;
    // The probe sends 1 GiB, half-closes, and checks the echo byte for byte; the echo server
    // only closes after reading EOF, so both directions' half-close crosses both ztunnels.
    let r = connect(&cluster, "p1-1", &dst, GIB);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["sent"], GIB, "{r}");
    assert_eq!(r["received"], GIB, "{r}");
    assert_eq!(r["verified"], true, "{r}");
    let out = wait_flow(&cluster, "node-1", |f| f["observer"] == "proxy" && f["dst"] == dst.as_str());
    assert_eq!(out["bytes_sent"], GIB, "{out}");
    assert_eq!(out["bytes_received"], GIB, "{out}");
    eprintln!("1 GiB echoed through two ztunnels in {:.0} ms", r["total_ms"].as_f64().unwrap());
}
