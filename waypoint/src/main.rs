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
//! - `--credential-dir`: `node.pem`, `node-key.pem` (the credential shown to the CA) and
//!   `bundle.pem`, laid out as ztunnel's `--node-credential-dir`.
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
//! How the waypoint authenticates to the CA: with the node credential of the node its pod runs
//! on (the CA signs an identity for a node only when a Workload with that identity is
//! scheduled there, and the waypoint's Workload is). That is more than the waypoint needs: the
//! node credential could ask for any identity on that node. The least-privilege option is a
//! credential bound to the waypoint's one identity (Istio: the pod's own service-account
//! token, verified by the CA with the API server); until the CA accepts such a credential,
//! give the waypoint's pod the node credential only through a volume readable by it alone, and
//! schedule waypoints where that is acceptable.
use clap::Parser;
use palisade_waypoint::app::Config;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a collector gets plain `key=value` text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if config.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(palisade_waypoint::app::run(config))
}
