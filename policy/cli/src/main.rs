//! `palisade`: validate configuration, explain verdicts, and run the certificate authority.
//! The control-plane server (snapshot streaming) arrives with its own issue.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use palisade_model::compile::Direction;

mod control;
mod validate;

#[derive(Parser)]
#[command(name = "palisade", about = "Palisade policy control plane and CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check resources; every problem is printed with its file, line and field.
    Validate {
        /// YAML files or directories.
        #[arg(required_unless_present = "files")]
        paths: Vec<PathBuf>,
        /// The same, kubectl style (`validate -f FILE`); offline, like the positional form.
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
    },
    /// Show the verdict the mesh gives a connection, and the rule that decides it.
    Explain {
        /// YAML files or directories.
        #[arg(long = "config", required = true)]
        paths: Vec<PathBuf>,
        /// Source address.
        #[arg(long)]
        from: IpAddr,
        /// The source's proven identity, `namespace/serviceaccount` (as HBONE proves it).
        #[arg(long)]
        principal: Option<String>,
        /// Destination address and port.
        #[arg(long)]
        to: SocketAddr,
        /// The mesh's trust domain (principals in policies are matched within it).
        #[arg(long, env = "PALISADE_TRUST_DOMAIN", default_value = palisade_mesh::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    #[command(flatten)]
    Control(control::ControlCommand),
    /// The mesh certificate authority.
    Ca {
        /// Directory of the CA's roots (created by `init` only, never regenerated).
        #[arg(long, env = "PALISADE_CA_DIR")]
        dir: PathBuf,
        #[arg(long, env = "PALISADE_TRUST_DOMAIN", default_value = palisade_mesh::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the root if there is none, and print the trust bundle.
    Init,
    /// Print the trust bundle (every trusted root).
    Bundle,
    /// Rotation, step 1: add a new root to the trust bundle; it does not sign yet.
    Rotate,
    /// Rotation, step 2 (once every ztunnel has the new bundle): the new root signs.
    Activate,
    /// Write a node credential (node.pem, node-key.pem) and the bundle (bundle.pem) to OUT.
    NodeCredential {
        #[arg(long)]
        node: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a waypoint's bootstrap credential (waypoint.pem, waypoint-key.pem) and the bundle
    /// (bundle.pem) to OUT: a certificate of the waypoint's own identity, with which it renews
    /// itself at the CA (instead of its node's credential). Refused unless the identity is a
    /// waypoint's in the inventory (a Gateway of class palisade-waypoint whose Workloads run
    /// as it).
    WaypointCredential {
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        /// Resource files (as `serve --inventory`) that must make this identity a waypoint's.
        #[arg(long = "inventory", required = true)]
        inventory: Vec<PathBuf>,
        /// Lifetime of the bootstrap certificate, in hours. The waypoint needs it until its
        /// first certificate and at every restart; it renews itself after that.
        #[arg(long, default_value_t = 24 * 365)]
        ttl_hours: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Serve certificate requests from ztunnels (and waypoints renewing themselves).
    Serve {
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: SocketAddr,
        /// Resource files naming each workload's node (node authorization).
        #[arg(long = "inventory", required = true)]
        inventory: Vec<PathBuf>,
        /// Lifetime of workload certificates, in seconds.
        #[arg(long, default_value_t = 86_400)]
        workload_ttl_secs: u64,
    },
}

fn ca_command(dir: PathBuf, trust_domain: String, command: CaCommand) -> anyhow::Result<()> {
    use palisade_ca::authority::CertificateAuthority;
    if let CaCommand::Init = command {
        let (ca, created) = CertificateAuthority::init(&dir, &trust_domain)?;
        match created {
            true => {
                eprintln!("created root 1 in {} (keep this directory: it is the mesh's root of trust)", dir.display())
            }
            false => eprintln!("root CA already in {}: nothing created", dir.display()),
        }
        print!("{}", ca.bundle_pem());
        return Ok(());
    }
    let mut ca = CertificateAuthority::open(&dir, &trust_domain)?;
    match command {
        CaCommand::Init => unreachable!("handled above"),
        CaCommand::Bundle => print!("{}", ca.bundle_pem()),
        CaCommand::Rotate => println!(
            "root {} added to the trust bundle (pending); run `palisade ca activate` once every ztunnel has it",
            ca.rotate(&dir)?
        ),
        CaCommand::Activate => match ca.activate(&dir)? {
            Some(n) => println!("root {n} now signs; older roots stay trusted"),
            None => println!("no pending root"),
        },
        CaCommand::NodeCredential { node, out } => {
            write_credential(&out, "node", ca.node_credential(&node)?, &ca.bundle_pem())?;
            println!("node credential for {node} written to {}", out.display());
        }
        CaCommand::WaypointCredential { namespace, service_account, inventory, ttl_hours, out } => {
            use palisade_ca::server::{inventory::Schedule, waypoint_credential};
            let id = palisade_mesh::identity::SpiffeId::new(&trust_domain, &namespace, &service_account);
            let schedule = Schedule::from_resources(&palisade_model::load::load_paths(&inventory)?);
            let ttl = std::time::Duration::from_secs(ttl_hours.saturating_mul(3600));
            let credential = waypoint_credential(&ca, &schedule, &id, ttl)?;
            write_credential(&out, "waypoint", credential, &ca.bundle_pem())?;
            println!("waypoint credential for {id} written to {}", out.display());
        }
        CaCommand::Serve { listen, inventory, workload_ttl_secs } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
                )
                .init();
            ca.workload_ttl = std::time::Duration::from_secs(workload_ttl_secs);
            let service = std::sync::Arc::new(palisade_ca::server::CaService::new(ca, dir, inventory));
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(listen).await?;
                palisade_ca::server::serve(listener, service).await
            })?;
        }
    }
    Ok(())
}

/// Writes `<stem>.pem`, `<stem>-key.pem` (owner-only: it is a credential) and `bundle.pem`.
fn write_credential(
    out: &std::path::Path,
    stem: &str,
    (cert, key): (String, String),
    bundle: &str,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let key_path = out.join(format!("{stem}-key.pem"));
    // Replaced, not rewritten in place, so that the mode holds for an existing file too.
    let _ = std::fs::remove_file(&key_path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .and_then(|mut f| f.write_all(key.as_bytes()))
        .with_context(|| format!("write {}", key_path.display()))?;
    for (name, text) in [(format!("{stem}.pem"), cert.as_str()), ("bundle.pem".into(), bundle)] {
        std::fs::write(out.join(&name), text).with_context(|| format!("write {}", out.join(&name).display()))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Control(command) = cli.command {
        return match control::run(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Validate { mut paths, files } = cli.command {
        paths.extend(files);
        return match validate::run(&paths, palisade_model::compile::DEFAULT_TRUST_DOMAIN) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Ca { dir, trust_domain, command } = cli.command {
        return match ca_command(dir, trust_domain, command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let result = match cli.command {
        Command::Validate { .. } => unreachable!("handled above"),
        Command::Explain { paths, from, principal, to, trust_domain } => {
            palisade_model::load_snapshot_for(&paths, &trust_domain).map(|s| {
                let proven = principal.as_deref().and_then(|p| p.split_once('/'));
                let d = s.authorize(from, proven, to.ip(), to.port());
                let v = &d.verdict;
                let who = match principal {
                    Some(p) => format!("{p}, proven"),
                    None => s.identity_name(v.src_identity),
                };
                println!(
                    "{:?}: {from} ({who}) -> {to} ({}) decided by {}",
                    v.action,
                    s.identity_name(v.dst_identity),
                    s.describe_verdict(v)
                );
                // Both ends must consent: say what each direction decided.
                for (direction, part) in [(Direction::Egress, d.egress), (Direction::Ingress, d.ingress)]
                    .into_iter()
                    .filter_map(|(d, p)| Some((d, p?)))
                {
                    println!("  {}", s.describe_direction(direction, part, v));
                }
                if let Some(rule) = d.audit_deny {
                    println!("audit: would be denied by {}", s.describe_rule(rule, v.dst_identity));
                }
                let kernel = s.verdict(from, to.ip(), to.port());
                // Egress is checked at the source's connect(), ingress at the destination; the
                // kernel holds both (see ARCHITECTURE.md), so this line is about precision only.
                if kernel.action != v.action {
                    println!("in the kernel: {:?} at connect(); ztunnel's proxy decides the rest", kernel.action);
                }
            })
        }
        Command::Ca { .. } | Command::Control(_) => unreachable!("handled above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprint!("error: {e}");
            if !e.to_string().ends_with('\n') {
                eprintln!();
            }
            ExitCode::FAILURE
        }
    }
}
