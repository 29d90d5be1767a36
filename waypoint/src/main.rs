//! `waypoint`: Palisade's L7 proxy for the Services that use it (Istio's waypoint model).
//!
//! ```text
//! waypoint --gateway <name> --namespace <ns> --service-account <sa> \
//!          --ca-addr <ip:port> --credential-dir <dir> \
//!          (--policy <files or dirs>[,…] | --control-plane <ip:port>[,…]) \
//!          [--trust-domain cluster.local] [--listen 0.0.0.0:15008] [--admin 127.0.0.1:15020]
//! ```
//! Every flag also reads an environment variable (`PALISADE_GATEWAY`, `PALISADE_NAMESPACE`,
//! …; `waypoint --help`). Stable for the sandbox and the end-to-end tests:
//! - `--gateway`/`--namespace`: the waypoint's `Gateway` (class `palisade-waypoint`); its
//!   configuration is `compile_waypoints(…)["<ns>/<gateway>"]`. Start-up fails if the
//!   resources have no such Gateway, or if the Gateway's Workloads run as another identity.
//! - `--service-account`: with `--namespace` and `--trust-domain`, the waypoint's identity
//!   `spiffe://<td>/ns/<ns>/sa/<sa>`; its certificate comes from the CA at `--ca-addr`.
//! - `--credential-dir`: the credential shown to the CA and `bundle.pem`: `waypoint.pem`,
//!   `waypoint-key.pem` (bound to the waypoint's identity, `palisade ca waypoint-credential`;
//!   used whenever present), else `node.pem`, `node-key.pem` (its node's, as ztunnel's
//!   `--node-credential-dir`; kept for compatibility).
//! - `--policy`: resources, loaded, validated and compiled like ztunnel's; polled every
//!   `--policy-poll-ms` (200); a bad change is logged and the last good configuration stays.
//! - `--control-plane`: instead of `--policy`, follow `palisade serve` (port 15010; repeat for
//!   replicas): the waypoint subscribes with its own workload certificate as
//!   `waypoint <ns>/<gateway>` (so `palisade get nodes` lists it), which the server admits only
//!   when that Gateway's Workloads run as the waypoint's identity; each push is validated and
//!   compiled as files are, ACKed once in force, NACKed otherwise. Nothing is served before the
//!   first push is in force, unless `--state-dir` holds the content last in force (saved after
//!   each push), from which a waypoint starts while the control plane is unreachable.
//! - `--listen`: HBONE (mutual TLS, CONNECT to the Service VIP:port the client dialled).
//! - `--admin`: `/metrics` and `/ready` (200 once the certificate, the configuration and the
//!   listener are in place).
//!
//! Upstream, the waypoint opens HBONE to `<endpoint ip>:15008` with CONNECT `<endpoint
//! ip>:<target port>`, proving its own identity and requiring the endpoint's; before it sends
//! to an endpoint it checks the destination's L4 policy against the original client's proven
//! identity (403 / close when denied).
//!
//! How the waypoint authenticates to the CA: with a credential bound to its one identity, as
//! Istio's waypoints use their own service-account token. The operator issues it once
//! (`palisade ca waypoint-credential --namespace N --service-account S --inventory … --out
//! DIR`, refused unless the identity is a waypoint's) and mounts it as Kubernetes would a
//! projected token. It is a workload certificate of that identity: the CA signs, for a caller
//! proving a workload identity X (mutual TLS, chained to the mesh's roots, unexpired), only X
//! itself and only while X is a waypoint's in the resources in force (a `Gateway` of class
//! palisade-waypoint whose Workloads run as X). Once it has its first certificate the waypoint
//! renews with its own current certificate; it reads the mounted one again only when it holds
//! no unexpired certificate of its own (first start, restarts, or the CA unreachable for a
//! whole certificate lifetime). A stolen bound credential can therefore ask for nothing but
//! the waypoint's own identity, and stops working once that identity is no waypoint's. The
//! node credential (`node.pem`) still works, with its cost: it could ask for any identity
//! scheduled on that node.
use clap::Parser;
use palisade_waypoint::app::Config;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let _logging = palisade_mesh::logging::Logging::init(config.log_json);
    // See `Config::worker_threads` for why one thread is the default.
    let runtime = if config.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(config.worker_threads).enable_all().build()?
    };
    runtime.block_on(palisade_waypoint::app::run(config))
}
