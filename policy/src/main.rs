//! `palisade`: validate configuration and explain verdicts. The control-plane server arrives
//! with its own issue.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Show the verdict the mesh gives a connection, and the rule that decides it.
    Explain {
        /// YAML files or directories.
        #[arg(long = "config", required = true)]
        paths: Vec<PathBuf>,
        /// Source address.
        #[arg(long)]
        from: IpAddr,
        /// Destination address and port.
        #[arg(long)]
        to: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate { paths } => palisade_policy::load_snapshot(&paths).map(|s| {
            println!(
                "ok: {} workloads, {} identities, {} rules, {} policy cells",
                s.workloads.len(),
                s.identities.len(),
                s.rules.len(),
                s.cells.len()
            );
        }),
        Command::Explain { paths, from, to } => palisade_policy::load_snapshot(&paths).map(|s| {
            let v = s.verdict(from, to.ip(), to.port());
            println!(
                "{:?}: {from} ({}) -> {to} ({}) decided by {}",
                v.action,
                s.identity_name(v.src_identity),
                s.identity_name(v.dst_identity),
                s.describe_rule(v.rule, v.dst_identity)
            );
        }),
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
