//! The long-running processes: `zebu server` (manager + one node), `zebu manager`, `zebu node`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use zebu_control::client::ApiClient;
use zebu_control::controller::{Manager, load_or_create_token};
use zebu_control::store::RedbStore;
use zebu_node::{NodeAgent, NodeConfig};

use crate::bind_listener;
use crate::cli;

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
    cmd: Option<NodeSub>,
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
}

#[derive(Subcommand)]
enum NodeSub {
    List,
    Get { name: String },
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
    let l = bind_listener(api_listen).await?;
    let addr = l.local_addr()?.to_string();
    let app = zebu_control::api::router(m.clone());
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
    let (_m, addr, token) = start_manager(&a.data_dir, &a.api_listen, Some(a.name.clone())).await?;
    let api = ApiClient::new(&format!("http://{addr}"), &token)?;
    let nbd = bind_listener(&a.nbd_listen).await?;
    let cfg = NodeConfig {
        name: a.name,
        data_dir: a.data_dir.join("node"),
        listen_host: "127.0.0.1".into(),
        nbd_listen: a.nbd_listen,
        heartbeat: Duration::from_millis(500),
        io_timeout: Duration::from_secs(10),
    };
    let agent = NodeAgent::start(cfg, api, nbd).await?;
    println!("nbd listening on {}", agent.nbd_addr());
    until_signal().await
}

pub async fn manager(a: ManagerArgs) -> Result<()> {
    start_manager(&a.data_dir, &a.api_listen, None).await?;
    until_signal().await
}

pub async fn node(g: &cli::Global, a: NodeArgs) -> Result<()> {
    match a.cmd {
        Some(NodeSub::List) => return cli::node(g, cli::NodeCmd::List).await,
        Some(NodeSub::Get { name }) => return cli::node(g, cli::NodeCmd::Get { name }).await,
        None => {}
    }
    let (Some(manager), Some(data_dir)) = (a.manager, a.data_dir) else {
        bail!("zebu node needs --manager URL and --data-dir DIR (or a subcommand: list, get)");
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
    zebu_types::validate_name(&name)?;
    let api = ApiClient::new(&manager, &token)?;
    let nbd = bind_listener(&a.nbd_listen).await?;
    let cfg = NodeConfig {
        name,
        data_dir,
        listen_host: a.listen,
        nbd_listen: a.nbd_listen,
        heartbeat: Duration::from_millis(500),
        io_timeout: Duration::from_secs(10),
    };
    let agent = NodeAgent::start(cfg, api, nbd).await?;
    println!("nbd listening on {}", agent.nbd_addr());
    until_signal().await
}
