//! `palisade serve` and the commands that talk to it (`apply`, `delete`, `get`). The CLI
//! finds its server the way kubectl finds its cluster: `--socket`, else the context file
//! (`$PALISADE_CONFIG`, else `~/.palisade/config`: JSON `{"socket": "/path/to/admin.sock"}`,
//! written by `cargo xtask sandbox up`). The admin socket is owner-only (0600, root): being
//! able to open it is the authentication.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use palisade_server::admin::{Request, Response, SourceFile, call};

pub const DEFAULT_ADMIN_SOCKET: &str = "/var/run/palisade/palisade.sock";

#[derive(Subcommand)]
pub enum ControlCommand {
    /// Run the control plane: serve the store's resources to every ztunnel (mutual TLS, node
    /// credentials) and the admin API to this CLI.
    Serve {
        /// Where resources live: a directory of YAML (watched; `apply` writes into its
        /// `applied/`), or `etcd://host:port[,host:port…]` for replicas sharing one etcd.
        #[arg(long)]
        store: String,
        /// The CA directory (`palisade ca init`): the server's own credential is issued from it.
        #[arg(long, env = "PALISADE_CA_DIR")]
        ca_dir: PathBuf,
        #[arg(long, env = "PALISADE_TRUST_DOMAIN", default_value = palisade_mesh::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Where ztunnels connect.
        #[arg(long, default_value = "0.0.0.0:15010")]
        listen: SocketAddr,
        /// The admin socket (owner-only).
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        /// How often the store directory is checked for changes, in milliseconds.
        #[arg(long, default_value_t = 200)]
        poll_ms: u64,
        /// Also serve the CA (what `palisade ca serve` does) on this address, authorizing
        /// nodes by the workloads of the resources in force — needed with an etcd store,
        /// whose workloads no inventory file lists.
        #[arg(long)]
        ca_listen: Option<SocketAddr>,
        /// Lifetime of workload certificates, in seconds (with `--ca-listen`).
        #[arg(long, default_value_t = 86_400)]
        workload_ttl_secs: u64,
    },
    /// Create or replace the resources of FILEs (or directories), all or none.
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Remove the resources named in FILEs, all or none.
    Delete {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List resources of a kind (all kinds when none), or `nodes`: every node with the version
    /// it has in force and its last NACK.
    Get {
        kind: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "yaml")]
        output: Output,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Json,
    Yaml,
}

#[derive(clap::Args)]
pub struct ServerArgs {
    /// The server's admin socket (default: from the context file).
    #[arg(long, env = "PALISADE_SOCKET")]
    socket: Option<PathBuf>,
    /// How long `apply`/`delete` wait for every node to put the change in force, in seconds
    /// (0: do not wait).
    #[arg(long, default_value_t = 10)]
    wait_secs: u64,
}

/// The context file's path.
pub fn context_file() -> Option<PathBuf> {
    std::env::var_os("PALISADE_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".palisade/config")))
}

fn socket(args: &ServerArgs) -> anyhow::Result<PathBuf> {
    if let Some(s) = &args.socket {
        return Ok(s.clone());
    }
    let Some(file) = context_file() else { return Ok(PathBuf::from(DEFAULT_ADMIN_SOCKET)) };
    match std::fs::read_to_string(&file) {
        Ok(text) => {
            let context: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{}: not a palisade context", file.display()))?;
            let socket = context["socket"].as_str().with_context(|| format!("{}: no \"socket\"", file.display()))?;
            Ok(PathBuf::from(socket))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PathBuf::from(DEFAULT_ADMIN_SOCKET)),
        Err(e) => Err(e).with_context(|| format!("read {}", file.display())),
    }
}

fn read_inputs(paths: &[PathBuf]) -> anyhow::Result<Vec<SourceFile>> {
    let files = palisade_model::load::policy_files(paths)?;
    files
        .iter()
        .map(|f| {
            let text = palisade_model::load::read_bounded(f)?;
            Ok(SourceFile { name: f.display().to_string(), text })
        })
        .collect()
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn ask(args: &ServerArgs, request: Request) -> anyhow::Result<Response> {
    let socket = socket(args)?;
    let response = runtime()?.block_on(call(&socket, &request)).with_context(|| {
        format!("no palisade server at {} (start one with `palisade serve`, or set --socket)", socket.display())
    })?;
    if !response.errors.is_empty() {
        for e in &response.errors {
            eprintln!("{e}");
        }
        bail!(
            "{} problem{}; nothing changed",
            response.errors.len(),
            if response.errors.len() == 1 { "" } else { "s" }
        );
    }
    Ok(response)
}

pub fn run(command: ControlCommand) -> anyhow::Result<()> {
    match command {
        ControlCommand::Serve {
            store,
            ca_dir,
            trust_domain,
            listen,
            admin_socket,
            poll_ms,
            ca_listen,
            workload_ttl_secs,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
                )
                .init();
            let ca = palisade_ca::authority::CertificateAuthority::open(&ca_dir, &trust_domain)?;
            runtime()?.block_on(async {
                let store: Arc<dyn palisade_server::store::Store> = if store.starts_with("etcd://") {
                    Arc::new(palisade_server::store::etcd::EtcdStore::open(&store).await?)
                } else {
                    let dir = Path::new(&store);
                    Arc::new(palisade_server::store::dir::DirStore::open(dir, Duration::from_millis(poll_ms))?)
                };
                let workload_ttl = Duration::from_secs(workload_ttl_secs);
                let config = palisade_server::ServeConfig { listen, admin_socket, ca_dir, ca_listen, workload_ttl };
                palisade_server::serve(config, store, ca).await?;
                Ok(())
            })
        }
        ControlCommand::Apply { files, server } | ControlCommand::Delete { files, server }
            if files.iter().any(|f| !Path::new(f).exists()) =>
        {
            let _ = server;
            bail!("{}: no such file", files.iter().find(|f| !f.exists()).expect("checked").display())
        }
        ControlCommand::Apply { files, server } => {
            let wait_secs = (server.wait_secs > 0).then_some(server.wait_secs);
            let r = ask(&server, Request::Apply { files: read_inputs(&files)?, wait_secs })?;
            report_change("applied", &r, wait_secs)
        }
        ControlCommand::Delete { files, server } => {
            let wait_secs = (server.wait_secs > 0).then_some(server.wait_secs);
            let r = ask(&server, Request::Delete { files: read_inputs(&files)?, wait_secs })?;
            report_change("deleted", &r, wait_secs)
        }
        ControlCommand::Get { kind, output, server } if kind.as_deref() == Some("nodes") => {
            let r = ask(&server, Request::Nodes)?;
            if let Output::Json = output {
                println!("{}", serde_json::to_string_pretty(&r.nodes)?);
                return Ok(());
            }
            println!("{:<16} {:<10} {:<16} LAST NACK", "NODE", "CONNECTED", "VERSION");
            for n in &r.nodes {
                let nack = n.last_nack.as_ref().map(|k| format!("{}: {}", k.version, k.reason)).unwrap_or_default();
                println!("{:<16} {:<10} {:<16} {nack}", n.node, n.connected, n.version.as_deref().unwrap_or("-"));
            }
            if let Some(e) = &r.store_error {
                println!("store {}: not pushed: {e}", r.store.as_deref().unwrap_or("?"));
            }
            Ok(())
        }
        ControlCommand::Get { kind, output, server } => {
            let r = ask(&server, Request::Get { kind })?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&r.resources)?),
                Output::Yaml => {
                    // One document per resource, as `apply -f` reads them back.
                    for resource in &r.resources {
                        print!("---\n{}", serde_yaml::to_string(resource)?);
                    }
                }
            }
            Ok(())
        }
    }
}

fn report_change(what: &str, r: &Response, wait: Option<u64>) -> anyhow::Result<()> {
    let revision = r.revision.map_or("?".into(), |v| v.to_string());
    if r.not_in_force.is_empty() {
        match wait {
            Some(_) => println!("{what}: revision {revision}, in force on every connected node"),
            None => println!("{what}: revision {revision}"),
        }
        return Ok(());
    }
    println!("{what}: revision {revision}; not in force on:");
    for n in &r.not_in_force {
        println!("  {n}");
    }
    bail!("{} node(s) did not put revision {revision} in force", r.not_in_force.len())
}
