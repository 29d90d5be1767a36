//! The waypoint binary's configuration: flags or environment, one typed struct, logged at
//! start-up.
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use serde::Serialize;

#[derive(Clone, Debug, Parser, Serialize)]
#[command(name = "waypoint", about = "Palisade waypoint: the L7 proxy of the Services that use it, over HBONE")]
pub struct Config {
    /// Name of this waypoint's Gateway (class palisade-waypoint) in `--namespace`.
    #[arg(long, env = "PALISADE_GATEWAY")]
    pub gateway: String,
    /// Namespace of the Gateway and of the waypoint's own workload.
    #[arg(long, env = "PALISADE_NAMESPACE")]
    pub namespace: String,
    /// Service account the waypoint's pods run as: its identity is
    /// spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
    #[arg(long, env = "PALISADE_SERVICE_ACCOUNT")]
    pub service_account: String,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "PALISADE_TRUST_DOMAIN", default_value = palisade_mesh::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// The certificate authority (`palisade ca serve`).
    #[arg(long, env = "PALISADE_CA_ADDR")]
    pub ca_addr: SocketAddr,
    /// Directory with the credential the waypoint shows the CA and the initial trust bundle
    /// (bundle.pem): waypoint.pem and waypoint-key.pem, bound to the waypoint's own identity
    /// (`palisade ca waypoint-credential`); else node.pem and node-key.pem, its node's
    /// credential (compatibility: it could ask for any identity on the node).
    #[arg(long, env = "PALISADE_CREDENTIAL_DIR", default_value = "/var/run/palisade/waypoint")]
    pub credential_dir: PathBuf,
    /// Resources (YAML files or directories), polled for changes.
    #[arg(long = "policy", env = "PALISADE_POLICY", value_delimiter = ',', required_unless_present = "control_plane")]
    pub policy: Vec<PathBuf>,
    /// The control plane (`palisade serve`), instead of `--policy` files; repeat for replicas.
    /// The waypoint subscribes with its own certificate as `waypoint <ns>/<gateway>`.
    #[arg(long = "control-plane", env = "PALISADE_CONTROL_PLANE", value_delimiter = ',', conflicts_with = "policy")]
    pub control_plane: Vec<SocketAddr>,
    /// With `--control-plane`: the content in force is saved here, and a waypoint that starts
    /// while the control plane is unreachable starts from it.
    #[arg(long, env = "PALISADE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// HBONE listener (the waypoint's clients are the source ztunnels).
    #[arg(long, env = "PALISADE_LISTEN", default_value = "0.0.0.0:15008")]
    pub listen: SocketAddr,
    /// Admin listener: `/metrics` (Prometheus) and `/ready`. Nothing else is served there.
    #[arg(long, env = "PALISADE_ADMIN_ADDR", default_value = "127.0.0.1:15020")]
    pub admin: SocketAddr,
    /// Debug listener: `/flows`, the recent requests with both identities, the route and the
    /// rule that decided. Keep it on localhost: flows name identities and policy.
    #[arg(long, env = "PALISADE_DEBUG_ADDR", default_value = "127.0.0.1:15000")]
    pub debug: SocketAddr,
    /// How often the policy files are checked for changes, in milliseconds.
    #[arg(long, env = "PALISADE_POLICY_POLL_MS", default_value_t = 200)]
    pub policy_poll_ms: u64,
    /// How long start-up waits for the waypoint's first certificate, in seconds.
    #[arg(long, env = "PALISADE_CERTIFICATE_WAIT_SECS", default_value_t = 30)]
    pub certificate_wait_secs: u64,
    /// How often the trust bundle is fetched from the CA, in seconds.
    #[arg(long, env = "PALISADE_BUNDLE_REFRESH_SECS", default_value_t = 60)]
    pub bundle_refresh_secs: u64,
    /// How long a graceful shutdown waits for connections in flight, in seconds.
    #[arg(long, env = "PALISADE_DRAIN_SECS", default_value_t = 5)]
    pub drain_secs: u64,
    /// Threads of the proxy runtime. One (the default) runs everything on a single-threaded
    /// runtime: no wake-ups between worker threads, which at 1,000 req/s cost more than the
    /// requests' own work (measured on 2 cores: 17 % less CPU at 1,000 req/s and 5 % more
    /// req/s at the maximum than two workers). More threads serve more than a core's worth
    /// of traffic; replicas of the waypoint do too.
    #[arg(long, env = "PALISADE_WAYPOINT_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "PALISADE_LOG_JSON")]
    pub log_json: bool,
}

impl Config {
    /// `namespace/gateway`, the waypoint's name in the compiled configuration.
    pub fn waypoint_name(&self) -> String {
        format!("{}/{}", self.namespace, self.gateway)
    }
}
