//! ztunnel's configuration: flags or environment, one typed struct, logged at start-up and
//! served by `/config_dump`.
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use serde::Serialize;

#[derive(Clone, Debug, Parser, Serialize)]
#[command(name = "ztunnel", about = "Palisade node agent: eBPF capture, in-kernel L4 policy, mesh proxies")]
pub struct Config {
    /// Name of the node this ztunnel serves.
    #[arg(long, env = "PALISADE_NODE")]
    pub node: String,
    /// Policy and workload resources (YAML files or directories), reloaded on change.
    #[arg(long = "policy", env = "PALISADE_POLICY", value_delimiter = ',')]
    pub policy: Vec<PathBuf>,
    /// The control plane (`palisade serve`), instead of `--policy` files; repeat for replicas
    /// (tried in turn when one is unreachable).
    #[arg(long = "control-plane", env = "PALISADE_CONTROL_PLANE", value_delimiter = ',', conflicts_with = "policy")]
    pub control_plane: Vec<SocketAddr>,
    /// Unix socket of the enrollment API.
    #[arg(long, env = "PALISADE_ENROLL_SOCKET", default_value = "/var/run/palisade/ztunnel.sock")]
    pub enroll_socket: PathBuf,
    /// Admin API (flows, config dump).
    #[arg(long, env = "PALISADE_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics.
    #[arg(long, env = "PALISADE_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Readiness probe.
    #[arg(long, env = "PALISADE_READY_ADDR", default_value = "0.0.0.0:15021")]
    pub ready_addr: SocketAddr,
    /// How often the policy files are checked for changes, in milliseconds.
    #[arg(long, env = "PALISADE_POLICY_POLL_MS", default_value_t = 200)]
    pub policy_poll_ms: u64,
    /// The certificate authority (`palisade ca serve`). Required unless `--insecure-plaintext`.
    #[arg(long, env = "PALISADE_CA_ADDR", required_unless_present = "insecure_plaintext")]
    pub ca_addr: Option<SocketAddr>,
    /// Run without a CA: no workload identities, traffic between pods in plain TCP, identity
    /// taken from addresses. Only for trials; logged loudly at start-up.
    #[arg(long, env = "PALISADE_INSECURE_PLAINTEXT", conflicts_with = "ca_addr")]
    pub insecure_plaintext: bool,
    /// Where maps and links are pinned (bpffs; mounted at /sys/fs/bpf when none is). They
    /// outlive ztunnel: the kernel keeps enforcing while it restarts.
    #[arg(long, env = "PALISADE_PIN_DIR", default_value = "/sys/fs/bpf/palisade")]
    pub pin_dir: PathBuf,
    /// Enrollments survive restarts here (`pods.json`); the hand-over socket of upgrades
    /// (`handoff.sock`) lives here too.
    #[arg(long, env = "PALISADE_STATE_DIR", default_value = "/var/run/palisade/state")]
    pub state_dir: PathBuf,
    /// Directory with this node's credential for the CA (node.pem, node-key.pem) and the
    /// initial trust bundle (bundle.pem).
    #[arg(long, env = "PALISADE_NODE_CREDENTIAL_DIR", default_value = "/var/run/palisade/node")]
    pub node_credential_dir: PathBuf,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "PALISADE_TRUST_DOMAIN", default_value = palisade_mesh::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// How often the trust bundle is fetched from the CA, in seconds.
    #[arg(long, env = "PALISADE_BUNDLE_REFRESH_SECS", default_value_t = 60)]
    pub bundle_refresh_secs: u64,
    /// How long a graceful shutdown waits for connections in flight, in seconds.
    #[arg(long, env = "PALISADE_DRAIN_SECS", default_value_t = 5)]
    pub drain_secs: u64,
    /// After handing its listeners to a newer ztunnel (upgrade), how long this one keeps
    /// carrying its established connections before it exits, in seconds.
    #[arg(long, env = "PALISADE_UPGRADE_DRAIN_SECS", default_value_t = 3600)]
    pub upgrade_drain_secs: u64,
    /// Threads of the proxy runtime. By default half the cores this process may use (its
    /// cgroup's CPU quota counts), at least one and at most two (Istio's ztunnel default):
    /// ztunnel shares the node with the workloads it carries, and on a 2-core node a second
    /// worker cost more in wake-ups between the two threads than it gave (one worker measured
    /// +9 to +22 % req/s through a waypoint, +15 % bulk throughput and +12 % new connections/s
    /// on 2 cores; see bench/ANALYSIS.md).
    #[arg(long, env = "PALISADE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "PALISADE_LOG_JSON")]
    pub log_json: bool,
}

impl Config {
    /// The proxy runtime's worker threads: `--worker-threads`, else half the usable cores
    /// (1 or 2).
    pub fn workers(&self) -> usize {
        self.worker_threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
            (cores / 2).clamp(1, 2)
        })
    }
}
