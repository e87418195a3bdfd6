//! The `zebu` CLI over the manager's REST API: volumes, replicas, nodes and settings, with
//! `-o json` for machines and tables for people. Errors exit non-zero with one line.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;
use zebu_manager::client::ApiClient;
use zebu_manager::model::{Node, Replica, ReplicaState, Setting, Volume, VolumeState};
use zebu_types::ByteSize;

#[derive(Args, Clone)]
pub struct Global {
    /// Manager API URL.
    #[arg(
        long,
        global = true,
        env = "ZEBU_API",
        default_value = "http://127.0.0.1:9500"
    )]
    pub api: String,
    /// API token (default: the file ./zebu-data/api-token).
    #[arg(long, global = true, env = "ZEBU_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        default_value = "table"
    )]
    pub output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a volume.
    Create {
        name: String,
        #[arg(long, required_unless_present = "from_backup")]
        size: Option<ByteSize>,
        /// Restore this backup into the new volume (its size is the backup's unless --size).
        #[arg(long)]
        from_backup: Option<String>,
        /// The backup target the volume backs up to (default: `default`).
        #[arg(long)]
        backup_target: Option<String>,
        /// Keep following the newest backup of the same volume (disaster recovery); needs
        /// --from-backup. `volume activate` makes it a normal volume.
        #[arg(long, requires = "from_backup")]
        standby: bool,
        /// A ready backing image under the volume (--size at least its size).
        #[arg(long, conflicts_with = "from_backup")]
        backing_image: Option<String>,
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        /// Wait until every replica is running (and a restore is complete).
        #[arg(long)]
        wait: bool,
    },
    List,
    Get {
        name: String,
    },
    /// Delete a detached volume and every replica of it; waits until the files are gone.
    Delete {
        name: String,
    },
    /// Grow a detached volume.
    Expand {
        name: String,
        #[arg(long)]
        size: ByteSize,
    },
    /// Attach a volume; prints its NBD URI alone on stdout.
    Attach {
        name: String,
        #[arg(long)]
        node: Option<String>,
    },
    Detach {
        name: String,
    },
    /// Make a standby volume a normal one: syncs its target, waits until the newest backup is
    /// restored, then switches it.
    Activate {
        name: String,
        /// Seconds to wait before giving up.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Restart a faulted volume from the replica given (compare FLUSH in `replica list`).
    Salvage {
        name: String,
        #[arg(long)]
        replica: String,
    },
    /// Wait until the volume is healthy (attached) or settled (detached), showing rebuild
    /// progress bars on stderr.
    Wait {
        name: String,
        /// Seconds to wait before giving up.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Take a snapshot of an attached volume; prints its name.
    Create {
        volume: String,
        #[arg(long)]
        name: Option<String>,
    },
    List {
        volume: String,
    },
    /// Delete a snapshot; its data is merged away in the background.
    Delete {
        volume: String,
        name: String,
    },
    /// Revert a detached volume to a snapshot (newer snapshots and data are discarded).
    Revert {
        volume: String,
        name: String,
        /// Seconds to wait for the revert before giving up.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

#[derive(Subcommand)]
pub enum ReplicaCmd {
    List {
        #[arg(long)]
        volume: Option<String>,
    },
    /// Delete a replica; refused when it is the volume's last complete copy.
    Delete {
        name: String,
        /// Delete it even when it is the last complete copy: the volume's data is lost.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum NodeCmd {
    List,
    Get {
        name: String,
    },
    /// Change whether new replicas may go to a node, or start/stop evicting it.
    Update {
        name: String,
        /// Allow new replicas on the node.
        #[arg(long)]
        scheduling: Option<bool>,
        /// Move every replica away (true), or stop doing so (false).
        #[arg(long)]
        evict: Option<bool>,
    },
    /// Move every replica off a node, one at a time, each new copy complete before the old one
    /// goes; no new replicas are placed there.
    Evict {
        name: String,
    },
    /// Delete a node that holds no replicas and runs no engines.
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum SettingCmd {
    List,
    Set { name: String, value: String },
}

pub(crate) fn client(g: &Global) -> Result<ApiClient> {
    let token = match &g.token {
        Some(t) => t.clone(),
        None => std::fs::read_to_string("zebu-data/api-token")
            .map(|t| t.trim().to_string())
            .context("no API token: pass --token, set ZEBU_TOKEN, or run where ./zebu-data/api-token exists")?,
    };
    Ok(ApiClient::new(&g.api, &token)?)
}

/// Polls `path` until `status` says it is done, with a progress bar (0–100) and its line on
/// stderr; gives up after `secs`, naming the last state.
pub(crate) async fn wait_progress<T: serde::de::DeserializeOwned>(
    api: &ApiClient,
    path: &str,
    secs: u64,
    status: impl Fn(&T) -> (bool, u32, String),
) -> Result<T> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut last = String::new();
    loop {
        let o: T = api.get(path).await?;
        let (done, progress, line) = status(&o);
        if done {
            if tty {
                eprintln!();
            }
            return Ok(o);
        }
        let line = format!("{line} {}", bar(u64::from(progress), 100));
        if line != last {
            if tty {
                eprint!("\r{line}\x1b[K");
            } else {
                eprintln!("{line}");
            }
            let _ = std::io::stderr().flush();
            last = line;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("gave up waiting after {secs} s: {last}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// One object: as JSON with `-o json`, else through `show` (a table of one row).
pub(crate) fn print_one<T: serde::Serialize>(
    g: &Global,
    v: T,
    show: impl FnOnce(&Global, &[T]) -> Result<()>,
) -> Result<()> {
    if g.output == Output::Json {
        print_json(&v)
    } else {
        show(g, &[v])
    }
}

/// A deleted object: as JSON with `-o json`, else one line saying so.
pub(crate) fn print_deleted<T: serde::Serialize>(g: &Global, v: &T, what: &str) -> Result<()> {
    if g.output == Output::Json {
        print_json(v)
    } else {
        println!("{what} deleted");
        Ok(())
    }
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!(
        "{}",
        line(headers.iter().map(|h| h.to_string()).collect()).trim_end()
    );
    for r in rows {
        println!("{}", line(r).trim_end());
    }
}

pub(crate) fn enum_str<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn show_volumes(g: &Global, vols: &[Volume]) -> Result<()> {
    if g.output == Output::Json {
        return print_json(&vols);
    }
    table(
        &[
            "NAME",
            "SIZE",
            "REPLICAS",
            "STATE",
            "ROBUSTNESS",
            "NODE",
            "NBD",
        ],
        vols.iter()
            .map(|v| {
                vec![
                    v.metadata.name.clone(),
                    ByteSize(v.spec.size).to_string(),
                    v.spec.replicas.to_string(),
                    enum_str(&v.status.state),
                    enum_str(&v.status.robustness),
                    v.status.node.clone().unwrap_or_default(),
                    v.status.nbd_uri.clone().unwrap_or_default(),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub(crate) async fn wait_volume(
    api: &ApiClient,
    name: &str,
    what: &str,
    secs: u64,
    done: impl Fn(&Volume) -> bool,
) -> Result<Volume> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    // A reason the volume reports for waiting ends the wait once it has stood this long.
    const REASON_GRACE: Duration = Duration::from_secs(20);
    let mut reason_since: Option<(String, tokio::time::Instant)> = None;
    loop {
        let v: Volume = api.get(&format!("/v1/volumes/{name}")).await?;
        if done(&v) {
            return Ok(v);
        }
        let msg = v.status.message.clone();
        match &reason_since {
            _ if msg.is_empty() => reason_since = None,
            Some((m, at)) if *m == msg => {
                if at.elapsed() >= REASON_GRACE {
                    bail!("volume {name} is not {what}: {msg}");
                }
            }
            _ => reason_since = Some((msg.clone(), tokio::time::Instant::now())),
        }
        if tokio::time::Instant::now() >= deadline {
            let why = if msg.is_empty() {
                String::new()
            } else {
                format!(": {msg}")
            };
            bail!(
                "volume {name} is still not {what} after {secs}s (state {}){why}",
                enum_str(&v.status.state)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn volume(g: &Global, cmd: VolumeCmd) -> Result<()> {
    let api = client(g)?;
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            from_backup,
            backup_target,
            standby,
            backing_image,
            replicas,
            wait,
        } => {
            let mut body = json!({"name": name, "replicas": replicas});
            if let Some(b) = &backing_image {
                body["backingImage"] = json!(b);
            }
            if let Some(s) = size {
                body["size"] = json!(s.0);
            }
            if let Some(b) = &from_backup {
                body["fromBackup"] = json!(b);
            }
            if let Some(t) = &backup_target {
                body["backupTarget"] = json!(t);
            }
            if standby {
                body["standby"] = json!(true);
            }
            let mut v: Volume = api.post("/v1/volumes", &body).await?;
            if wait && from_backup.is_some() {
                v = crate::backup_cli::wait_restore(g, &api, &name).await?;
            } else if wait {
                v = wait_volume(&api, &name, "ready", 300, |v| {
                    v.status.state != VolumeState::Creating
                })
                .await?;
            }
            if g.output == Output::Json {
                print_json(&v)
            } else {
                show_volumes(g, &[v])
            }
        }
        VolumeCmd::List => {
            let vols: Vec<Volume> = api.get("/v1/volumes").await?;
            show_volumes(g, &vols)
        }
        VolumeCmd::Get { name } => {
            let v: Volume = api.get(&format!("/v1/volumes/{name}")).await?;
            if g.output == Output::Json {
                print_json(&v)
            } else {
                show_volumes(g, &[v])
            }
        }
        VolumeCmd::Delete { name } => {
            let _: Volume = api.delete(&format!("/v1/volumes/{name}")).await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
            loop {
                match api.get::<Volume>(&format!("/v1/volumes/{name}")).await {
                    Err(e) if e.code() == Some("NotFound") => break,
                    Err(e) => return Err(e.into()),
                    Ok(_) if tokio::time::Instant::now() >= deadline => {
                        bail!(
                            "volume {name} is marked for deletion but some replica files are not removed yet (a node may be down)"
                        )
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
            if g.output == Output::Json {
                print_json(&json!({"deleted": name}))
            } else {
                println!("volume {name} deleted");
                Ok(())
            }
        }
        VolumeCmd::Expand { name, size } => {
            let v: Volume = api
                .post(
                    &format!("/v1/volumes/{name}/expand"),
                    &json!({"size": size.0}),
                )
                .await?;
            if g.output == Output::Json {
                print_json(&v)
            } else {
                show_volumes(g, &[v])
            }
        }
        VolumeCmd::Attach { name, node } => {
            let body = match node {
                Some(n) => json!({"node": n}),
                None => json!({}),
            };
            let _: Volume = api
                .post(&format!("/v1/volumes/{name}/attach"), &body)
                .await?;
            let v = wait_volume(&api, &name, "attached", 300, |v| {
                v.status.state == VolumeState::Attached && v.status.nbd_uri.is_some()
            })
            .await?;
            if g.output == Output::Json {
                print_json(&v)
            } else {
                println!("{}", v.status.nbd_uri.unwrap_or_default());
                Ok(())
            }
        }
        VolumeCmd::Wait { name, timeout } => {
            let v = wait_healthy(g, &api, &name, timeout).await?;
            if g.output == Output::Json {
                print_json(&v)
            } else {
                show_volumes(g, &[v])
            }
        }
        VolumeCmd::Salvage { name, replica } => {
            let v: Volume = api
                .post(
                    &format!("/v1/volumes/{name}/salvage"),
                    &json!({"replica": replica}),
                )
                .await?;
            if g.output == Output::Json {
                print_json(&v)
            } else {
                println!("volume {name} restarts from replica {replica}");
                Ok(())
            }
        }
        VolumeCmd::Activate { name, timeout } => {
            let _: Volume = api
                .post(&format!("/v1/volumes/{name}/activate"), &json!({}))
                .await?;
            let v = crate::backup_cli::wait_activated(g, &api, &name, timeout).await?;
            if g.output == Output::Json {
                print_json(&v)
            } else {
                show_volumes(g, &[v])
            }
        }
        VolumeCmd::Detach { name } => {
            let _: Volume = api
                .post(&format!("/v1/volumes/{name}/detach"), &json!({}))
                .await?;
            let v = wait_volume(&api, &name, "detached", 300, |v| {
                v.status.state == VolumeState::Detached
            })
            .await?;
            if g.output == Output::Json {
                print_json(&v)
            } else {
                show_volumes(g, &[v])
            }
        }
    }
}

pub(crate) fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

pub(crate) fn bar(done: u64, total: u64) -> String {
    let pct = (done.min(total) * 100).checked_div(total).unwrap_or(0) as usize;
    format!(
        "[{}{}] {pct:>3}%",
        "#".repeat(pct / 5),
        ".".repeat(20 - pct / 5)
    )
}

async fn wait_healthy(g: &Global, api: &ApiClient, name: &str, secs: u64) -> Result<Volume> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut last = String::new();
    let mut last_print = tokio::time::Instant::now();
    loop {
        let v: Volume = api.get(&format!("/v1/volumes/{name}")).await?;
        let reps: Vec<Replica> = api.get(&format!("/v1/replicas?volume={name}")).await?;
        let settled = match v.status.state {
            VolumeState::Attached => {
                v.status.robustness == zebu_manager::model::Robustness::Healthy
            }
            VolumeState::Detached => reps.iter().all(|r| r.status.state == ReplicaState::Running),
            _ => false,
        };
        if settled {
            if tty && !last.is_empty() {
                eprintln!();
            }
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "volume {name} is not healthy after {secs}s (state {}, robustness {})",
                enum_str(&v.status.state),
                enum_str(&v.status.robustness)
            );
        }
        // One line per replica that is not RW yet.
        let lines: Vec<String> = reps
            .iter()
            .filter(|r| r.status.mode != Some(zebu_manager::model::ReplicaMode::RW))
            .map(|r| {
                let done = r.status.rebuild_copied + r.status.rebuild_skipped;
                format!(
                    "{} on {}: {} {}/{} ({} copied)",
                    r.metadata.name,
                    r.spec.node,
                    bar(done, r.status.rebuild_total),
                    mib(done),
                    mib(r.status.rebuild_total),
                    mib(r.status.rebuild_copied),
                )
            })
            .collect();
        let text = if lines.is_empty() {
            format!("volume {name}: {}", enum_str(&v.status.state))
        } else {
            lines.join(" | ")
        };
        if g.output == Output::Table {
            if tty {
                eprint!("\r\x1b[2K{text}");
                let _ = std::io::stderr().flush();
            } else if text != last && last_print.elapsed() >= Duration::from_secs(2) {
                eprintln!("{text}");
                last_print = tokio::time::Instant::now();
            }
        }
        last = text;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub async fn replica(g: &Global, cmd: ReplicaCmd) -> Result<()> {
    let api = client(g)?;
    let reps: Vec<Replica> = match cmd {
        ReplicaCmd::List { volume } => {
            let q = volume.map(|v| format!("?volume={v}")).unwrap_or_default();
            api.get(&format!("/v1/replicas{q}")).await?
        }
        ReplicaCmd::Delete { name, force } => {
            let path = if force {
                format!("/v1/replicas/{name}?force=true")
            } else {
                format!("/v1/replicas/{name}")
            };
            let r: Replica = api.delete(&path).await?;
            if force {
                eprintln!(
                    "replica {name} of volume {} deleted; if it was the last complete copy, the volume's data is lost",
                    r.spec.volume
                );
            }
            vec![r]
        }
    };
    if g.output == Output::Json {
        return print_json(&reps);
    }
    table(
        &[
            "NAME", "VOLUME", "NODE", "MODE", "STATE", "FLUSH", "ADDRESS", "MESSAGE",
        ],
        reps.iter()
            .map(|r| {
                vec![
                    r.metadata.name.clone(),
                    r.spec.volume.clone(),
                    r.spec.node.clone(),
                    r.status.mode.map(|m| enum_str(&m)).unwrap_or_default(),
                    enum_str(&r.status.state),
                    r.status.flush_seq.to_string(),
                    r.status.address.clone().unwrap_or_default(),
                    r.status.message.clone(),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub async fn snapshot(g: &Global, cmd: SnapshotCmd) -> Result<()> {
    use zebu_manager::model::{Snapshot, SnapshotInfo};
    let api = client(g)?;
    match cmd {
        SnapshotCmd::Create { volume, name } => {
            let body = match name {
                Some(n) => json!({"name": n}),
                None => json!({}),
            };
            let sn: Snapshot = api
                .post(&format!("/v1/volumes/{volume}/snapshots"), &body)
                .await?;
            let name = sn.spec.name.clone();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            loop {
                let list: Vec<SnapshotInfo> =
                    api.get(&format!("/v1/volumes/{volume}/snapshots")).await?;
                if let Some(info) = list.into_iter().find(|i| i.name == name && i.created > 0) {
                    return if g.output == Output::Json {
                        print_json(&info)
                    } else {
                        println!("{name}");
                        Ok(())
                    };
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!(
                        "snapshot {name} of volume {volume} was requested but is not taken after 120s"
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        SnapshotCmd::List { volume } => {
            let list: Vec<SnapshotInfo> =
                api.get(&format!("/v1/volumes/{volume}/snapshots")).await?;
            if g.output == Output::Json {
                return print_json(&list);
            }
            table(
                &["NAME", "CREATED", "PARENT", "USER", "SIZE"],
                list.iter()
                    .map(|i| {
                        vec![
                            i.name.clone(),
                            i.created.to_string(),
                            i.parent.clone(),
                            i.user_created.to_string(),
                            mib(i.size),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        SnapshotCmd::Revert {
            volume,
            name,
            timeout,
        } => {
            use zebu_manager::model::RevertState;
            let _: Volume = api
                .post(
                    &format!("/v1/volumes/{volume}/snapshots/{name}/revert"),
                    &json!({}),
                )
                .await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
            loop {
                let v: Volume = api.get(&format!("/v1/volumes/{volume}")).await?;
                match v.status.revert.as_ref() {
                    Some(r) if r.snapshot == name && r.state == RevertState::Done => {
                        return if g.output == Output::Json {
                            print_json(&v)
                        } else {
                            println!("volume {volume} reverted to snapshot {name}");
                            Ok(())
                        };
                    }
                    Some(r) if r.snapshot == name && r.state == RevertState::Error => {
                        bail!("revert of volume {volume} to {name} failed: {}", r.error);
                    }
                    _ => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!(
                        "volume {volume} is not reverted to {name} after {timeout}s (no replica node with a complete copy up?)"
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        SnapshotCmd::Delete { volume, name } => {
            let _: Snapshot = api
                .delete(&format!("/v1/volumes/{volume}/snapshots/{name}"))
                .await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            loop {
                let list: Vec<SnapshotInfo> =
                    api.get(&format!("/v1/volumes/{volume}/snapshots")).await?;
                if !list.iter().any(|i| i.name == name) {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!("snapshot {name} of volume {volume} is still there after 120s");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if g.output == Output::Json {
                print_json(&json!({"deleted": name}))
            } else {
                println!("snapshot {name} deleted");
                Ok(())
            }
        }
    }
}

pub async fn node(g: &Global, cmd: NodeCmd) -> Result<()> {
    let api = client(g)?;
    let list = matches!(cmd, NodeCmd::List);
    let nodes: Vec<Node> = match cmd {
        NodeCmd::List => api.get("/v1/nodes").await?,
        NodeCmd::Get { name } => vec![api.get(&format!("/v1/nodes/{name}")).await?],
        NodeCmd::Update {
            name,
            scheduling,
            evict,
        } => {
            if scheduling.is_none() && evict.is_none() {
                bail!("nothing to change: give --scheduling true|false or --evict true|false");
            }
            let mut body = json!({});
            if let Some(s) = scheduling {
                body["allowScheduling"] = json!(s);
            }
            if let Some(e) = evict {
                body["evict"] = json!(e);
            }
            vec![api.put(&format!("/v1/nodes/{name}"), &body).await?]
        }
        NodeCmd::Evict { name } => vec![
            api.post(&format!("/v1/nodes/{name}/evict"), &json!({}))
                .await?,
        ],
        NodeCmd::Delete { name } => {
            let n: Node = api.delete(&format!("/v1/nodes/{name}")).await?;
            if g.output == Output::Json {
                return print_json(&n);
            }
            println!("node {name} deleted");
            return Ok(());
        }
    };
    if g.output == Output::Json {
        // One node is printed as the object the API returns; a list as an array.
        return match (list, nodes.first()) {
            (false, Some(n)) => print_json(n),
            _ => print_json(&nodes),
        };
    }
    table(
        &["NAME", "STATE", "SCHEDULING", "EVICT", "ADDRESS", "NBD"],
        nodes
            .iter()
            .map(|n| {
                vec![
                    n.metadata.name.clone(),
                    enum_str(&n.status.state),
                    n.spec.allow_scheduling.to_string(),
                    n.spec.evict.to_string(),
                    n.status.address.clone(),
                    n.status.nbd_address.clone(),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub async fn setting(g: &Global, cmd: SettingCmd) -> Result<()> {
    let api = client(g)?;
    let one = matches!(cmd, SettingCmd::Set { .. });
    let list: Vec<Setting> = match cmd {
        SettingCmd::List => api.get("/v1/settings").await?,
        SettingCmd::Set { name, value } => vec![
            api.put(&format!("/v1/settings/{name}"), &json!({"value": value}))
                .await?,
        ],
    };
    if g.output == Output::Json {
        return match (one, list.first()) {
            (true, Some(s)) => print_json(s),
            _ => print_json(&list),
        };
    }
    table(
        &["NAME", "VALUE"],
        list.iter()
            .map(|s| vec![s.metadata.name.clone(), s.value.clone()])
            .collect(),
    );
    Ok(())
}
