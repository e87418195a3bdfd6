//! The `zebu` binary: `server` (manager + node in one process), `manager`, `node`, the CLI verbs
//! over the REST API, and the bare `replica` and `engine` processes of the data path.

mod backup_cli;
mod cli;
mod filehook;
mod image_cli;
mod node_http;
mod services;
mod system_cli;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use zebu_engine::{Engine, EngineConfig, EngineHook, LogHook, ReplicaService};
use zebu_types::{ByteSize, Generation};

#[derive(Parser)]
#[command(
    name = "zebu",
    version,
    about = "Replicated block storage with snapshots, served over NBD"
)]
struct Cli {
    #[command(flatten)]
    global: cli::Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// All-in-one: the manager and one node in one process, on an embedded store.
    Server(services::ServerArgs),
    /// The control plane: REST API, controllers and scheduler.
    Manager(services::ManagerArgs),
    /// A node agent, or `node list|get` against the API.
    Node(services::NodeArgs),
    /// Volumes: create, list, get, delete, expand, attach, detach.
    #[command(subcommand)]
    Volume(cli::VolumeCmd),
    /// Replicas: list, delete.
    #[command(subcommand)]
    Replica(cli::ReplicaCmd),
    /// Snapshots of attached volumes: create, list, delete.
    #[command(subcommand)]
    Snapshot(cli::SnapshotCmd),
    /// Settings: list, set.
    #[command(subcommand)]
    Setting(cli::SettingCmd),
    /// Backup targets: create, update, list, get, delete, sync.
    #[command(subcommand)]
    BackupTarget(backup_cli::TargetCmd),
    /// Backups: create, list, get, delete, verify.
    #[command(subcommand)]
    Backup(backup_cli::BackupCmd),
    /// Backing images (read-only bases under volumes): create, list, get, update, delete,
    /// download.
    #[command(subcommand)]
    BackingImage(image_cli::ImageCmd),
    /// System backups (settings, targets, backing images, every volume with its backup):
    /// create, list, get, delete.
    #[command(subcommand)]
    SystemBackup(system_cli::SystemBackupCmd),
    /// System restores from a system backup: create, list, get, delete.
    #[command(subcommand)]
    SystemRestore(system_cli::SystemRestoreCmd),
    /// Serve one replica of a volume over the replica protocol (bare data path, no manager).
    ReplicaServer {
        /// Directory holding the replica's files (created when missing).
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Volume the replica belongs to.
        #[arg(long)]
        volume: String,
        /// Volume size for a new replica (e.g. 1GiB).
        #[arg(long)]
        size: ByteSize,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Allocation granularity of a new replica.
        #[arg(long, default_value = "64KiB")]
        cluster_size: ByteSize,
    },
    /// Run a volume's engine over replica processes and export it over NBD (no manager).
    Engine {
        #[arg(long)]
        volume: String,
        #[arg(long)]
        size: ByteSize,
        /// A replica as NAME=HOST:PORT; repeat for each.
        #[arg(long = "replica", required = true)]
        replicas: Vec<String>,
        #[arg(long, default_value = "127.0.0.1:10809")]
        nbd_listen: String,
        /// Session generation; replicas refuse a session older than one they accepted.
        #[arg(long)]
        generation: u64,
        /// Seconds before a replica that does not answer counts as failed.
        #[arg(long, default_value_t = 10)]
        io_timeout: u64,
        /// File where replica failures are recorded durably (the control plane's role).
        #[arg(long)]
        state_file: Option<std::path::PathBuf>,
    },
}

/// Binds a listener with SO_REUSEADDR, so a restarted process gets its old port back at once.
/// Binds the address a flag names; errors name the flag.
pub async fn bind_listener(flag: &str, addr: &str) -> Result<tokio::net::TcpListener> {
    let sa: std::net::SocketAddr = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("{flag} {addr}: not HOST:PORT that resolves"))?
        .next()
        .with_context(|| format!("{flag} {addr}: resolves to nothing"))?;
    let sock = if sa.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(sa)
        .with_context(|| format!("{flag} {addr}: cannot listen there"))?;
    sock.listen(1024)
        .with_context(|| format!("{flag} {addr}: cannot listen there"))
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ZEBU_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// `backing-image download NAME --output FILE` names a file, while everywhere else `--output`
/// (`-o`) is the output format: after `backing-image download` the long form is read as the file.
fn args() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let at = args
        .windows(2)
        .position(|w| w[0] == "backing-image" && w[1] == "download");
    if let Some(i) = at {
        for a in args.iter_mut().skip(i + 2) {
            if *a == "--output" {
                *a = "--output-file".into();
            } else if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--output=")) {
                *a = format!("--output-file={v}").into();
            }
        }
    }
    args
}

fn main() {
    let cli = Cli::parse_from(args());
    init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zebu: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("zebu: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Server(args) => services::server(args).await,
        Cmd::Manager(args) => services::manager(args).await,
        Cmd::Node(args) => services::node(&cli.global, args).await,
        Cmd::Volume(c) => cli::volume(&cli.global, c).await,
        Cmd::Replica(c) => cli::replica(&cli.global, c).await,
        Cmd::Snapshot(c) => cli::snapshot(&cli.global, c).await,
        Cmd::Setting(c) => cli::setting(&cli.global, c).await,
        Cmd::BackupTarget(c) => backup_cli::target(&cli.global, c).await,
        Cmd::Backup(c) => backup_cli::backup(&cli.global, c).await,
        Cmd::BackingImage(c) => image_cli::image(&cli.global, c).await,
        Cmd::SystemBackup(c) => system_cli::system_backup(&cli.global, c).await,
        Cmd::SystemRestore(c) => system_cli::system_restore(&cli.global, c).await,
        Cmd::ReplicaServer {
            dir,
            volume,
            size,
            listen,
            cluster_size,
        } => {
            zebu_types::validate_name(&volume)?;
            let cs = u32::try_from(cluster_size.0).context("cluster size too large")?;
            let svc = tokio::task::spawn_blocking(move || {
                ReplicaService::open_or_create(&dir, &volume, size.0, cs, None)
            })
            .await??;
            let l = bind_listener("--listen", &listen).await?;
            println!("replica listening on {}", l.local_addr()?);
            tokio::select! {
                r = svc.serve(l) => r.context("replica server failed"),
                _ = tokio::signal::ctrl_c() => Ok(()),
            }
        }
        Cmd::Engine {
            volume,
            size,
            replicas,
            nbd_listen,
            generation,
            io_timeout,
            state_file,
        } => {
            zebu_types::validate_name(&volume)?;
            let mut reps = Vec::new();
            for r in &replicas {
                let Some((n, a)) = r.split_once('=') else {
                    bail!("replica {r:?} must be NAME=HOST:PORT");
                };
                reps.push((n.to_string(), a.to_string()));
            }
            let hook: Arc<dyn EngineHook> = match state_file {
                Some(p) => Arc::new(filehook::FileHook::open(p)?),
                None => Arc::new(LogHook::default()),
            };
            let cfg = EngineConfig {
                volume: volume.clone(),
                generation: Generation(generation),
                size: size.0,
                io_timeout: Duration::from_secs(io_timeout),
            };
            let engine = Engine::open(cfg, &reps, hook)
                .await
                .context("no replica could be opened")?;
            let _healer = engine.spawn_healer(reps, Duration::from_millis(500));
            let exports = Arc::new(zebu_nbd::Exports::new());
            exports.insert(&volume, engine.clone());
            let l = bind_listener("--nbd-listen", &nbd_listen).await?;
            println!("nbd listening on {}", l.local_addr()?);
            tokio::select! {
                r = zebu_nbd::serve(l, exports) => r.context("NBD server failed"),
                _ = tokio::signal::ctrl_c() => {
                    engine.flush().await.ok();
                    Ok(())
                }
            }
        }
    }
}
