//! The node agent: owns the replicas under its data directory and the engines of volumes attached
//! to it, serves their NBD exports, and converges on what the manager assigns it on every
//! heartbeat, including the backups and restores of those engines. On restart it re-opens the
//! replicas it finds on disk; intact data is never rebuilt from scratch.

mod images;
mod supervisor;
pub mod transfer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Mutex;
use zebu_api::client::ApiClient;
use zebu_api::model::*;
use zebu_engine::engine::BoxFut;
use zebu_engine::{Engine, EngineHook, Mode, ReplicaService};
use zebu_nbd::Exports;
use zebu_replica::DEFAULT_CLUSTER_SIZE;
use zebu_types::Generation;

pub use images::{Copies, Upload, sha512_file};
pub use transfer::{BackupHandle, RestoreHandle, Transfers};

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub data_dir: PathBuf,
    /// Host the replica servers bind to (and report as their address).
    pub listen_host: String,
    pub nbd_listen: String,
    /// Heartbeats come this often when nothing happens ([`HEARTBEAT`] by default), and at once
    /// when the manager has work for this node or something here finished.
    pub heartbeat: Duration,
    pub io_timeout: Duration,
    /// Where this node serves backing-image copies to peers and the manager (`host:port`).
    pub transfer_address: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Setup(String),
    /// A replica's store cannot be opened (damaged or missing files): retrying will not help.
    #[error("{0}")]
    BrokenStore(String),
    /// A replica's backing-image copy is not (or no longer) ready here: it opens once it is.
    #[error("{0}")]
    BaseMissing(String),
}

/// What the manager wants on this node for one volume; applied in order by its supervisor.
#[derive(Debug, Clone, Default, PartialEq)]
struct VolumeOrders {
    replicas: Vec<ReplicaAssignment>,
    engine: Option<EngineSpec>,
    snapshots: Vec<SnapshotOp>,
    backups: Vec<BackupOrder>,
    delete_replicas: Vec<String>,
}

impl VolumeOrders {
    fn is_empty(&self) -> bool {
        *self == VolumeOrders::default()
    }
}

/// A backup task on this node with its volume.
type VolumeBackup = (String, Box<dyn BackupHandle>);

/// The default heartbeat interval: with `node-down-timeout` at 10 s a node misses ten before it
/// counts as down; work never waits for it (the long-poll and local events wake the loop).
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a heartbeat waits for an engine's snapshot list before it reports the last one.
const SNAPSHOT_READ_TIMEOUT: Duration = Duration::from_secs(1);

struct RunningReplica {
    svc: Arc<ReplicaService>,
    addr: String,
    volume: String,
}

struct RunningEngine {
    engine: Arc<Engine>,
    generation: u64,
    healer: tokio::task::JoinHandle<()>,
    restore: Option<Box<dyn RestoreHandle>>,
    revert: Option<RevertTask>,
}

/// A snapshot revert running in an engine; the outcome is `Some("")` on success.
struct RevertTask {
    snapshot: String,
    outcome: Arc<std::sync::Mutex<Option<String>>>,
}

impl RevertTask {
    fn start(engine: Arc<Engine>, snapshot: &str, wake: Arc<tokio::sync::Notify>) -> RevertTask {
        let outcome = Arc::new(std::sync::Mutex::new(None));
        let (o, name) = (outcome.clone(), snapshot.to_string());
        tokio::spawn(async move {
            let res = match engine.revert(&name).await {
                Ok(()) => match engine.flush().await {
                    Ok(()) => String::new(),
                    Err(e) => format!("flush after the revert: {e}"),
                },
                Err(e) => e.to_string(),
            };
            if res.is_empty() {
                tracing::info!(volume = %engine.volume(), snapshot = %name, "volume reverted");
            } else {
                tracing::warn!(volume = %engine.volume(), snapshot = %name, error = %res, "revert failed");
            }
            if let Ok(mut o) = o.lock() {
                *o = Some(res);
            }
            wake.notify_one();
        });
        RevertTask {
            snapshot: snapshot.to_string(),
            outcome,
        }
    }

    fn report(&self) -> Option<RevertReport> {
        let error = self.outcome.lock().ok()?.clone()?;
        Some(RevertReport {
            snapshot: self.snapshot.clone(),
            error,
        })
    }
}

pub struct NodeAgent {
    cfg: NodeConfig,
    api: ApiClient,
    replicas: Mutex<HashMap<String, RunningReplica>>,
    engines: Mutex<HashMap<String, RunningEngine>>,
    exports: Arc<Exports<Engine>>,
    nbd_addr: String,
    /// Backup tasks by backup name, with their volume.
    backups: Mutex<HashMap<String, VolumeBackup>>,
    /// Runs backups and restores (the binary plugs in `zebu-transfer`).
    transfers: Arc<dyn Transfers>,
    /// One supervisor task per volume with work here, fed the volume's latest orders.
    supervisors: std::sync::Mutex<HashMap<String, tokio::sync::watch::Sender<VolumeOrders>>>,
    /// Each engine's snapshot list as last read, reported when a fresh read takes too long.
    last_snapshots: std::sync::Mutex<HashMap<String, Vec<SnapshotInfo>>>,
    /// Backups waiting for their snapshot: since when, and their volume.
    waiting: Mutex<HashMap<String, (tokio::time::Instant, String)>>,
    /// Wakes the heartbeat loop (a local backup or restore finished).
    wake: Arc<tokio::sync::Notify>,
    /// Replicas whose stores cannot be opened, with the reason: reported, not retried.
    broken: Mutex<HashMap<String, String>>,
    /// Engines that could not start on their last attempt: volume → (generation, reason).
    engine_errors: Mutex<HashMap<String, (u64, String)>>,
    /// Backing-image copies under `DATA_DIR/backing-images`.
    copies: Arc<Copies>,
}

/// Reports engine membership changes to the manager, which records them before answering.
struct ApiHook {
    api: ApiClient,
}

impl ApiHook {
    async fn send(&self, ev: ReplicaEvent) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match self.api.post::<_, Replica>("/v1/replica-events", &ev).await {
                Ok(_) => return Ok(()),
                // The replica was deleted: it has left the volume for good.
                Err(e) if e.code() == Some("NotFound") => return Ok(()),
                Err(e) if e.code() == Some("Fenced") => {
                    tracing::warn!(volume = %ev.volume, replica = %ev.replica, reason = %ev.reason, "replica event refused: this engine was superseded");
                    return Err(e.to_string());
                }
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e.to_string()),
                Err(e) => {
                    tracing::warn!(error = %e, "could not record a replica event yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

fn mode_of(m: Mode) -> ReplicaMode {
    match m {
        Mode::RW => ReplicaMode::RW,
        Mode::WO => ReplicaMode::WO,
        Mode::ERR => ReplicaMode::ERR,
    }
}

impl EngineHook for ApiHook {
    fn replica_failed<'a>(
        &'a self,
        volume: &'a str,
        replica: &'a str,
        generation: Generation,
        reason: &'a str,
    ) -> BoxFut<'a, Result<(), String>> {
        Box::pin(self.send(ReplicaEvent {
            volume: volume.into(),
            replica: replica.into(),
            generation: generation.0,
            mode: ReplicaMode::ERR,
            reason: reason.into(),
        }))
    }

    fn replica_mode<'a>(
        &'a self,
        volume: &'a str,
        replica: &'a str,
        generation: Generation,
        mode: Mode,
    ) -> BoxFut<'a, Result<(), String>> {
        Box::pin(self.send(ReplicaEvent {
            volume: volume.into(),
            replica: replica.into(),
            generation: generation.0,
            mode: mode_of(mode),
            reason: String::new(),
        }))
    }
}

/// The engine's named layers, oldest first, as listed to users (layers being deleted are left out).
async fn snapshot_infos(engine: &Engine) -> Vec<SnapshotInfo> {
    let Ok(layers) = engine.layers().await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut parent = String::new();
    for l in layers {
        let Some(name) = l.meta.name.clone() else {
            continue;
        };
        if l.meta.deleting {
            continue;
        }
        out.push(SnapshotInfo {
            name: name.clone(),
            created: l.meta.created,
            parent: parent.clone(),
            user_created: l.meta.user_created,
            size: l.allocated,
        });
        parent = name;
    }
    out
}

fn disk_status(path: &std::path::Path) -> DiskStatus {
    let mut out = DiskStatus {
        path: path.display().to_string(),
        ..Default::default()
    };
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: statvfs fills a zeroed struct for a valid NUL-terminated path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0 {
            out.capacity = st.f_blocks as u64 * st.f_frsize as u64;
            // In steps of 256 MiB: a report that did not change is answered without work, and
            // every write to the disk would change the exact figure.
            const GRAIN: u64 = 256 << 20;
            out.available = st.f_bavail as u64 * st.f_frsize as u64 / GRAIN * GRAIN;
        }
    }
    out
}

impl NodeAgent {
    /// Starts the agent: the NBD server, the replicas found on disk, and the heartbeat loop.
    pub async fn start(
        cfg: NodeConfig,
        api: ApiClient,
        nbd: TcpListener,
        transfers: Arc<dyn Transfers>,
    ) -> Result<Arc<NodeAgent>, NodeError> {
        zebu_types::validate_name(&cfg.name).map_err(|e| NodeError::Setup(e.to_string()))?;
        std::fs::create_dir_all(cfg.data_dir.join("replicas"))?;
        let wake = Arc::new(tokio::sync::Notify::new());
        let copies = {
            let (dir, token, wake, t) = (
                cfg.data_dir.join("backing-images"),
                api.token().to_string(),
                wake.clone(),
                transfers.clone(),
            );
            tokio::task::spawn_blocking(move || Copies::open(dir, token, wake, t))
                .await
                .map_err(|e| NodeError::Setup(e.to_string()))??
        };
        let nbd_addr = nbd.local_addr()?.to_string();
        let exports = Arc::new(Exports::new());
        tokio::spawn(zebu_nbd::serve(nbd, exports.clone()));
        let agent = Arc::new(NodeAgent {
            cfg,
            api,
            replicas: Mutex::new(HashMap::new()),
            engines: Mutex::new(HashMap::new()),
            exports,
            nbd_addr,
            backups: Mutex::new(HashMap::new()),
            transfers,
            supervisors: Default::default(),
            last_snapshots: Default::default(),
            waiting: Mutex::new(HashMap::new()),
            wake,
            copies,
            broken: Mutex::new(HashMap::new()),
            engine_errors: Mutex::new(HashMap::new()),
        });
        agent.open_existing().await;
        let c = agent.copies.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(images::CHECK_INTERVAL).await;
                let c = c.clone();
                let _ = tokio::task::spawn_blocking(move || c.check_all()).await;
            }
        });
        let a = agent.clone();
        tokio::spawn(async move {
            loop {
                a.tick().await;
                // Next heartbeat at the interval, or at once when the manager has work for this
                // node (long-poll) or a backup or restore here finished.
                let path = format!(
                    "/v1/nodes/{}/wait?timeoutMs={}",
                    a.cfg.name,
                    a.cfg.heartbeat.as_millis()
                );
                let poll = async {
                    if a.api.get::<serde_json::Value>(&path).await.is_err() {
                        tokio::time::sleep(a.cfg.heartbeat).await;
                    }
                };
                tokio::select! {
                    _ = poll => {}
                    _ = a.wake.notified() => {}
                }
                // Bursts of work coalesce.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Ok(agent)
    }

    pub fn nbd_addr(&self) -> &str {
        &self.nbd_addr
    }

    /// The backing-image copies on this node (served to peers by the binary's HTTP server).
    pub fn copies(&self) -> &Arc<Copies> {
        &self.copies
    }

    /// Prometheus text: per-volume I/O of the engines on this node, replica modes and rebuild
    /// progress as the engines see them.
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        zebu_engine::stats::write_headers(&mut out);
        let _ = writeln!(
            out,
            "# HELP zebu_engine_replica_mode Replica mode in the engine's set (1 for the current value)."
        );
        let _ = writeln!(out, "# TYPE zebu_engine_replica_mode gauge");
        let _ = writeln!(
            out,
            "# HELP zebu_engine_rebuild_bytes Rebuild progress of a replica: total, copied and skipped bytes."
        );
        let _ = writeln!(out, "# TYPE zebu_engine_rebuild_bytes gauge");
        for vol in self.exports.names() {
            let Some(engine) = self.exports.get(&vol) else {
                continue;
            };
            engine.stats().render(&vol, &mut out);
            for r in engine.replicas() {
                for m in [Mode::RW, Mode::WO, Mode::ERR] {
                    let _ = writeln!(
                        out,
                        "zebu_engine_replica_mode{{volume=\"{vol}\",replica=\"{}\",mode=\"{}\"}} {}",
                        r.name,
                        m.as_str(),
                        u8::from(r.mode == m)
                    );
                }
                for (kind, v) in [
                    ("total", r.rebuild.total),
                    ("copied", r.rebuild.copied),
                    ("skipped", r.rebuild.skipped),
                ] {
                    let _ = writeln!(
                        out,
                        "zebu_engine_rebuild_bytes{{volume=\"{vol}\",replica=\"{}\",kind=\"{kind}\"}} {v}",
                        r.name
                    );
                }
            }
        }
        out
    }

    fn replica_dir(&self, name: &str) -> PathBuf {
        self.cfg.data_dir.join("replicas").join(name)
    }

    /// Re-opens every replica directory on disk.
    async fn open_existing(&self) {
        let Ok(rd) = std::fs::read_dir(self.cfg.data_dir.join("replicas")) else {
            return;
        };
        for e in rd.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let vol = std::fs::read_to_string(e.path().join("volume")).unwrap_or_default();
            match self.start_replica(&name, vol.trim(), 0, None).await {
                Ok(()) => {}
                Err(NodeError::BaseMissing(why)) => {
                    // Opened when assigned again, once the copy is back.
                    tracing::warn!(replica = %name, %why, "replica waits for its backing image")
                }
                Err(NodeError::BrokenStore(why)) => self.mark_broken(&name, &why).await,
                Err(e) => {
                    tracing::error!(replica = %name, error = %e, "cannot open replica found on disk")
                }
            }
        }
    }

    /// Records a replica whose store cannot be opened: logged once, reported on every
    /// heartbeat, not retried until this process restarts or the replica is deleted.
    async fn mark_broken(&self, name: &str, reason: &str) {
        let fresh = self
            .broken
            .lock()
            .await
            .insert(name.to_string(), reason.to_string())
            .is_none();
        if fresh {
            tracing::error!(replica = %name, reason, "cannot open replica; reporting it as failed");
        }
    }

    async fn start_replica(
        &self,
        name: &str,
        volume: &str,
        size: u64,
        image: Option<&CopyRef>,
    ) -> Result<(), NodeError> {
        if self.replicas.lock().await.contains_key(name) {
            return Ok(());
        }
        let base = match image {
            None => None,
            Some(c) => {
                let (path, size, checksum) =
                    self.copies.ready_path(&c.name, &c.uid).ok_or_else(|| {
                        NodeError::BaseMissing(format!(
                            "backing image {:?} has no ready copy on this node yet",
                            c.name
                        ))
                    })?;
                Some(zebu_replica::BaseMeta {
                    name: c.name.clone(),
                    checksum,
                    size,
                    path,
                })
            }
        };
        let dir = self.replica_dir(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("volume"), volume)?;
        let (d, v) = (dir.clone(), volume.to_string());
        let svc = tokio::task::spawn_blocking(move || {
            ReplicaService::open_or_create(
                &d.join("store"),
                &v,
                size.max(4096),
                DEFAULT_CLUSTER_SIZE,
                base,
            )
        })
        .await
        .map_err(|e| NodeError::Setup(e.to_string()))?
        .map_err(|e| match e {
            zebu_replica::StoreError::BaseMissing { .. } => NodeError::BaseMissing(e.to_string()),
            e => NodeError::BrokenStore(e.to_string()),
        })?;
        let l = TcpListener::bind((self.cfg.listen_host.as_str(), 0)).await?;
        let addr = l.local_addr()?.to_string();
        tokio::spawn(svc.clone().serve(l));
        tracing::info!(replica = name, volume, %addr, "replica serving");
        // Report it at once rather than at the next heartbeat.
        self.wake.notify_one();
        self.replicas.lock().await.insert(
            name.to_string(),
            RunningReplica {
                svc,
                addr,
                volume: volume.to_string(),
            },
        );
        Ok(())
    }

    async fn delete_replica(&self, name: &str) {
        if let Some(r) = self.replicas.lock().await.remove(name) {
            r.svc.shutdown();
        }
        self.broken.lock().await.remove(name);
        let dir = self.replica_dir(name);
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match removed {
            Ok(()) => tracing::info!(replica = name, "replica deleted"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::error!(replica = name, error = %e, "cannot delete replica files"),
        }
    }

    async fn heartbeat(&self) -> Heartbeat {
        let mut replicas = Vec::new();
        for (name, r) in self.replicas.lock().await.iter() {
            let flush_seq = r.svc.read_store().status().flush_seq;
            replicas.push(ReplicaReport {
                name: name.clone(),
                address: r.addr.clone(),
                flush_seq,
            });
        }
        // What the engines report is collected under the lock; their snapshot lists are read
        // after it (a finished revert or restore with the chain read after it), each bounded in
        // time so that a slow replica never holds up the heartbeat.
        let mut engines = Vec::new();
        let mut reads = tokio::task::JoinSet::new();
        for (vol, e) in self.engines.lock().await.iter() {
            let revert = e.revert.as_ref().and_then(RevertTask::report);
            engines.push(EngineReport {
                restore: e.restore.as_ref().map(|r| r.report()),
                revert,
                snapshots: Vec::new(),
                volume: vol.clone(),
                generation: e.generation,
                // Served only once exported: the manager shows the volume attached then.
                nbd_uri: if self.exports.get(vol).is_some() {
                    format!("nbd://{}/{vol}", self.nbd_addr)
                } else {
                    String::new()
                },
                replicas: e
                    .engine
                    .replicas()
                    .into_iter()
                    .map(|r| EngineReplicaReport {
                        name: r.name,
                        mode: mode_of(r.mode),
                        rebuild_copied: r.rebuild.copied,
                        rebuild_skipped: r.rebuild.skipped,
                        rebuild_total: r.rebuild.total,
                    })
                    .collect(),
            });
            let (engine, vol) = (e.engine.clone(), vol.clone());
            reads.spawn(async move {
                let r = tokio::time::timeout(SNAPSHOT_READ_TIMEOUT, snapshot_infos(&engine)).await;
                (vol, r.ok())
            });
        }
        let mut fresh: HashMap<String, Vec<SnapshotInfo>> = HashMap::new();
        while let Some(r) = reads.join_next().await {
            if let Ok((vol, Some(list))) = r {
                fresh.insert(vol, list);
            }
        }
        if let Ok(mut last) = self.last_snapshots.lock() {
            last.retain(|v, _| engines.iter().any(|e| &e.volume == v));
            for er in engines.iter_mut() {
                match fresh.remove(&er.volume) {
                    Some(list) => {
                        last.insert(er.volume.clone(), list.clone());
                        er.snapshots = list;
                    }
                    None => {
                        // Stale list: what depends on a current chain waits for the next beat.
                        er.snapshots = last.get(&er.volume).cloned().unwrap_or_default();
                        er.restore = None;
                        er.revert = None;
                    }
                }
            }
        }
        let backups = self
            .backups
            .lock()
            .await
            .iter()
            .map(|(name, (_, t))| t.report(name))
            .collect();
        let broken_replicas = self
            .broken
            .lock()
            .await
            .iter()
            .map(|(name, reason)| BrokenReplica {
                name: name.clone(),
                reason: reason.clone(),
            })
            .collect();
        let engine_errors = self
            .engine_errors
            .lock()
            .await
            .iter()
            .map(|(volume, (generation, message))| EngineStartError {
                volume: volume.clone(),
                generation: *generation,
                message: message.clone(),
            })
            .collect();
        Heartbeat {
            backups,
            broken_replicas,
            engine_errors,
            address: self.cfg.listen_host.clone(),
            nbd_address: self.nbd_addr.clone(),
            transfer_address: self.cfg.transfer_address.clone(),
            backing_images: self.copies.reports(),
            disks: vec![disk_status(&self.cfg.data_dir)],
            replicas,
            engines,
        }
    }

    /// One heartbeat: the report, then the answer handed to each volume's supervisor. Nothing
    /// here waits for an engine, a replica or a backup.
    async fn tick(self: &Arc<Self>) {
        let hb = self.heartbeat().await;
        let a: Assignments = match self
            .api
            .post(&format!("/v1/nodes/{}/heartbeat", self.cfg.name), &hb)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                return;
            }
        };
        if !a.delete_backing_images.is_empty() {
            let in_use: Vec<String> = self
                .replicas
                .lock()
                .await
                .values()
                .filter_map(|r| r.svc.read_store().base().map(|b| b.name.clone()))
                .collect();
            let (c, refs) = (self.copies.clone(), a.delete_backing_images);
            let _ = tokio::task::spawn_blocking(move || c.delete(&refs, &in_use)).await;
        }
        let mut export_engines = HashMap::new();
        for o in &a.backing_images {
            if let CopySource::Export { volume, .. } = &o.source
                && let Some(e) = self.engines.lock().await.get(volume)
            {
                export_engines.insert(volume.clone(), e.engine.clone());
            }
        }
        self.copies.apply(&a.backing_images, &export_engines);
        let mut orders: HashMap<String, VolumeOrders> = HashMap::new();
        // Volumes with something running here get orders too (empty ones stop it).
        for v in self.engines.lock().await.keys() {
            orders.entry(v.clone()).or_default();
        }
        for (v, _) in self.backups.lock().await.values() {
            orders.entry(v.clone()).or_default();
        }
        for ra in a.replicas {
            orders
                .entry(ra.volume.clone())
                .or_default()
                .replicas
                .push(ra);
        }
        for e in a.engines {
            let v = e.volume.clone();
            orders.entry(v).or_default().engine = Some(e);
        }
        for op in a.snapshots {
            orders
                .entry(op.volume.clone())
                .or_default()
                .snapshots
                .push(op);
        }
        for b in a.backups {
            orders.entry(b.volume.clone()).or_default().backups.push(b);
        }
        let volumes: HashMap<String, String> = self
            .replicas
            .lock()
            .await
            .iter()
            .map(|(n, r)| (n.clone(), r.volume.clone()))
            .collect();
        for name in a.delete_replicas {
            match volumes.get(&name) {
                Some(v) => orders
                    .entry(v.clone())
                    .or_default()
                    .delete_replicas
                    .push(name),
                // Not running here (its store could not be opened): nothing to stop first.
                None => {
                    let agent = self.clone();
                    tokio::spawn(async move { agent.delete_replica(&name).await });
                }
            }
        }
        for (volume, o) in orders {
            self.dispatch(volume, o);
        }
    }
}
