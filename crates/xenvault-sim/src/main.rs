//! `xapi-sim`: runs a simulated XAPI pool. `xapi-sim serve --state DIR …`
//! prints one JSON line (URLs, fingerprint, NBD addresses, credentials,
//! control URL) once it accepts connections, then logs to stderr until
//! SIGTERM or Ctrl-C, and saves its state. See docs/simulator.md.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use xenvault_sim::scenario::{FlagScenario, Scenario, parse_percent, parse_size};
use xenvault_sim::server::{SimConfig, Simulator};

#[derive(Parser)]
#[command(
    name = "xapi-sim",
    version,
    about = "A simulated XAPI pool (XenServer / XCP-ng) for tests and demos"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a pool whose state lives in a directory.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// State directory (created if missing; served again later it continues).
    #[arg(long)]
    state: PathBuf,
    /// Coordinator's plain HTTP address (other ports are picked freely).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// TOML scenario describing the pool (used when the state is new).
    #[arg(long, conflicts_with_all = ["vms", "disk_size", "written", "hosts"])]
    scenario: Option<PathBuf>,
    /// Number of VMs (flags scenario).
    #[arg(long)]
    vms: Option<usize>,
    /// Virtual size of each VM's disk, e.g. 8G, 64M.
    #[arg(long)]
    disk_size: Option<String>,
    /// Share of 64 KiB blocks written with seeded data, e.g. 10%.
    #[arg(long)]
    written: Option<String>,
    /// Number of hosts (the first is the coordinator).
    #[arg(long)]
    hosts: Option<usize>,
    /// NBD purpose of the pool network: nbd (TLS), insecure_nbd, or none.
    #[arg(long, default_value = "insecure_nbd")]
    nbd_purpose: String,
    /// User name.
    #[arg(long, default_value = "root")]
    user: String,
    /// File holding the password (else the saved or a generated one).
    #[arg(long)]
    password_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,xenvault_sim=info")),
        )
        .init();
    let Command::Serve(args) = cli.command;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(serve(args));
    // Do not wait for stray blocking work (e.g. a VDI.data_destroy retry loop).
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let scenario = match &args.scenario {
        Some(path) => Scenario::from_file(path)?,
        None => {
            let mut f = FlagScenario::default();
            if let Some(n) = args.vms {
                f.vms = n;
            }
            if let Some(s) = &args.disk_size {
                f.disk_size = parse_size(s)?;
            }
            if let Some(w) = &args.written {
                f.written = parse_percent(w)?;
            }
            if let Some(h) = args.hosts {
                f.hosts = h;
            }
            f.nbd_purpose = match args.nbd_purpose.as_str() {
                "none" | "" => String::new(),
                "nbd" | "insecure_nbd" => args.nbd_purpose.clone(),
                other => anyhow::bail!("--nbd-purpose {other:?}: use nbd, insecure_nbd or none"),
            };
            Scenario::from_flags(&f)
        }
    };
    let password = match &args.password_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading the password file {}", p.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        ),
        None => None,
    };
    let mut cfg = SimConfig::new(&args.state);
    cfg.listen = args.listen;
    cfg.user = args.user.clone();
    cfg.password = password;
    cfg.scenario = scenario;
    // Install the signal handlers before announcing readiness, so a SIGTERM
    // sent right after the JSON line still stops the simulator cleanly.
    let stop = stop_signals()?;
    let sim = Simulator::start(cfg)
        .await
        .with_context(|| format!("starting the simulator with state {}", args.state.display()))?;
    {
        let line = serde_json::to_string(&sim.info)?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    stop.wait().await?;
    tracing::info!("stopping; saving state");
    sim.shutdown().await.context("saving the state")?;
    Ok(())
}

struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

fn stop_signals() -> anyhow::Result<StopSignals> {
    use tokio::signal::unix::{SignalKind, signal};
    Ok(StopSignals {
        term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
    })
}

impl StopSignals {
    async fn wait(mut self) -> anyhow::Result<()> {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
        Ok(())
    }
}
