//! The long-running processes: `zebu server` (manager + one node), `zebu manager`, `zebu node`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use zebu_manager::client::ApiClient;
use zebu_manager::controller::{Manager, load_or_create_token};
use zebu_manager::store::RedbStore;
use zebu_node::{NodeAgent, NodeConfig};

use crate::bind_listener;
use crate::cli;
use crate::node_http;

#[derive(Args)]
pub struct ServerArgs {
    /// Data directory: store, API token, replicas.
    #[arg(long, default_value = "./zebu-data")]
    data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:9500")]
    api_listen: String,
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd_listen: String,
    /// Name of the built-in node.
    #[arg(long, default_value = "local")]
    name: String,
}

#[derive(Args)]
pub struct ManagerArgs {
    #[arg(long, default_value = "./zebu-data")]
    data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:9500")]
    api_listen: String,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct NodeArgs {
    #[command(subcommand)]
    cmd: Option<cli::NodeCmd>,
    /// Manager URL.
    #[arg(long)]
    manager: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Host the node's replica servers listen on.
    #[arg(long, default_value = "127.0.0.1")]
    listen: String,
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd_listen: String,
    #[arg(long)]
    name: Option<String>,
    /// Where the node serves /metrics and its backing-image copies to peers (an unspecified
    /// address is reported to peers with the --listen host).
    #[arg(long, default_value = "127.0.0.1:9501")]
    metrics_listen: String,
}

async fn start_manager(
    data_dir: &std::path::Path,
    api_listen: &str,
    local: Option<String>,
) -> Result<(Arc<Manager>, String, String)> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    let token = load_or_create_token(data_dir).context("API token")?;
    let store = Arc::new(RedbStore::open(&data_dir.join("store.redb")).context("open the store")?);
    let m = Manager::new(store, token.clone(), local).context("initialise the store")?;
    tokio::spawn(m.clone().run());
    tokio::spawn(m.clone().run_backup_sync());
    tokio::spawn(m.clone().run_wakeups());
    tokio::spawn(m.clone().run_system_tasks());
    let l = bind_listener("--api-listen", api_listen).await?;
    let addr = l.local_addr()?.to_string();
    let app = zebu_manager::api::router(m.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(l, app).await {
            tracing::error!(error = %e, "API server failed");
        }
    });
    println!("api listening on {addr}");
    Ok((m, addr, token))
}

async fn until_signal() -> Result<()> {
    tokio::signal::ctrl_c().await.context("signal handler")?;
    Ok(())
}

pub async fn server(a: ServerArgs) -> Result<()> {
    let (m, addr, token) = start_manager(&a.data_dir, &a.api_listen, Some(a.name.clone())).await?;
    let api = ApiClient::new(&format!("http://{addr}"), &token)?;
    let nbd = bind_listener("--nbd-listen", &a.nbd_listen).await?;
    // The built-in node's copies are served on a port of their own (uploads arrive there).
    let http = bind_listener("the node's transfer server", "127.0.0.1:0").await?;
    let cfg = NodeConfig {
        name: a.name,
        data_dir: a.data_dir.join("node"),
        listen_host: "127.0.0.1".into(),
        nbd_listen: a.nbd_listen,
        heartbeat: zebu_node::HEARTBEAT,
        io_timeout: Duration::from_secs(10),
        transfer_address: http.local_addr()?.to_string(),
    };
    let agent = NodeAgent::start(cfg, api, nbd, Arc::new(zebu_transfer::BackupTargets)).await?;
    node_http::serve(agent.clone(), token, http).await?;
    let weak = Arc::downgrade(&agent);
    m.add_metrics(Box::new(move || {
        weak.upgrade().map(|a| a.metrics_text()).unwrap_or_default()
    }));
    println!("nbd listening on {}", agent.nbd_addr());
    until_signal().await
}

/// `--listen` is the host replica servers bind (each on a port of its own): a host name or an
/// address without a port, that this machine can listen on.
async fn check_listen_host(host: &str) -> Result<()> {
    if host.parse::<std::net::SocketAddr>().is_ok()
        || host
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.contains(':') && p.parse::<u16>().is_ok())
    {
        bail!(
            "--listen {host}: takes a host without a port (each replica listens on a port of its own)"
        );
    }
    let probe = std::net::TcpListener::bind((host, 0))
        .with_context(|| format!("--listen {host}: this machine cannot listen there"))?;
    drop(probe);
    Ok(())
}

pub async fn manager(a: ManagerArgs) -> Result<()> {
    start_manager(&a.data_dir, &a.api_listen, None).await?;
    until_signal().await
}

pub async fn node(g: &cli::Global, a: NodeArgs) -> Result<()> {
    if let Some(cmd) = a.cmd {
        return cli::node(g, cmd).await;
    }
    let (Some(manager), Some(data_dir)) = (a.manager, a.data_dir) else {
        bail!(
            "zebu node needs --manager URL and --data-dir DIR (or a subcommand: list, get, update, evict, delete)"
        );
    };
    let token = match &g.token {
        Some(t) => t.clone(),
        None => bail!("zebu node needs the manager's API token: --token or ZEBU_TOKEN"),
    };
    let name = match a.name {
        Some(n) => n,
        None => std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_lowercase())
            .unwrap_or_else(|_| "node".into()),
    };
    zebu_types::validate_name(&name).with_context(|| format!("--name {name:?}"))?;
    check_listen_host(&a.listen).await?;
    let api = ApiClient::new(&manager, &token)?;
    // Every listener is bound before the node registers, so a bad flag ends here.
    let nbd = bind_listener("--nbd-listen", &a.nbd_listen).await?;
    let metrics = bind_listener("--metrics-listen", &a.metrics_listen).await?;
    let transfer_address = node_http::reachable(metrics.local_addr()?, &a.listen);
    let cfg = NodeConfig {
        name,
        data_dir,
        listen_host: a.listen,
        nbd_listen: a.nbd_listen,
        heartbeat: zebu_node::HEARTBEAT,
        io_timeout: Duration::from_secs(10),
        transfer_address,
    };
    let agent = NodeAgent::start(cfg, api, nbd, Arc::new(zebu_transfer::BackupTargets)).await?;
    println!("nbd listening on {}", agent.nbd_addr());
    let maddr = node_http::serve(agent, token, metrics).await?;
    println!("metrics listening on {maddr}");
    until_signal().await
}
