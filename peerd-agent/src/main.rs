//! `peerd`: the node agent and its command line.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "peerd", about = "Peer-to-peer content cache for Kubernetes nodes", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent.
    Agent(AgentArgs),
    /// Print the version, and whether this binary carries the kernel programs.
    Version,
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Directory for the content cache and the agent's state.
    #[arg(long, env = "PEERD_DATA_DIR", default_value = "/var/lib/peerd")]
    data_dir: PathBuf,
    /// Log format.
    #[arg(long, env = "PEERD_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Version => {
            println!("peerd {}", env!("CARGO_PKG_VERSION"));
            println!("kernel programs: embedded ({} bytes)", peerd_agent::bpf::object_len());
            Ok(())
        }
        Cmd::Agent(args) => agent(args),
    }
}

fn agent(args: AgentArgs) -> Result<()> {
    let LogFormat::Text = args.log_format;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create data dir {}", args.data_dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        tracing::info!(data_dir = %args.data_dir.display(), "peerd agent started (single node)");
        shutdown_signal().await?;
        tracing::info!("shutting down");
        Ok(())
    })
}

async fn shutdown_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
