//! The node agent: owns the replicas under its data directory and the engines of volumes attached
//! to it, serves their NBD exports, and converges on what the manager assigns it on every
//! heartbeat, including the backups and restores of those engines. On restart it re-opens the
//! replicas it finds on disk; intact data is never rebuilt from scratch.

pub mod backup;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Mutex;
use zebu_api::client::ApiClient;
use zebu_api::model::*;
use zebu_engine::engine::BoxFut;
use zebu_engine::{Engine, EngineConfig, EngineHook, Mode, ReplicaService};
use zebu_nbd::Exports;
use zebu_replica::DEFAULT_CLUSTER_SIZE;
use zebu_types::Generation;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub data_dir: PathBuf,
    /// Host the replica servers bind to (and report as their address).
    pub listen_host: String,
    pub nbd_listen: String,
    pub heartbeat: Duration,
    pub io_timeout: Duration,
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
}

struct RunningReplica {
    svc: Arc<ReplicaService>,
    addr: String,
}

struct RunningEngine {
    engine: Arc<Engine>,
    generation: u64,
    healer: tokio::task::JoinHandle<()>,
    restore: Option<backup::RestoreTask>,
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
    backups: Mutex<HashMap<String, backup::BackupTask>>,
    /// Backups waiting for their snapshot, since when.
    waiting: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Wakes the heartbeat loop (a local backup or restore finished).
    wake: Arc<tokio::sync::Notify>,
    /// Replicas whose stores cannot be opened, with the reason: reported, not retried.
    broken: Mutex<HashMap<String, String>>,
    /// Engines that could not start on their last attempt: volume → (generation, reason).
    engine_errors: Mutex<HashMap<String, (u64, String)>>,
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
            out.available = st.f_bavail as u64 * st.f_frsize as u64;
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
    ) -> Result<Arc<NodeAgent>, NodeError> {
        zebu_types::validate_name(&cfg.name).map_err(|e| NodeError::Setup(e.to_string()))?;
        std::fs::create_dir_all(cfg.data_dir.join("replicas"))?;
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
            waiting: Mutex::new(HashMap::new()),
            wake: Arc::new(tokio::sync::Notify::new()),
            broken: Mutex::new(HashMap::new()),
            engine_errors: Mutex::new(HashMap::new()),
        });
        agent.open_existing().await;
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
            match self.start_replica(&name, vol.trim(), 0).await {
                Ok(()) => {}
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

    async fn start_replica(&self, name: &str, volume: &str, size: u64) -> Result<(), NodeError> {
        if self.replicas.lock().await.contains_key(name) {
            return Ok(());
        }
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
            )
        })
        .await
        .map_err(|e| NodeError::Setup(e.to_string()))?
        .map_err(|e| NodeError::BrokenStore(e.to_string()))?;
        let l = TcpListener::bind((self.cfg.listen_host.as_str(), 0)).await?;
        let addr = l.local_addr()?.to_string();
        tokio::spawn(svc.clone().serve(l));
        tracing::info!(replica = name, volume, %addr, "replica serving");
        // Report it at once rather than at the next heartbeat.
        self.wake.notify_one();
        self.replicas
            .lock()
            .await
            .insert(name.to_string(), RunningReplica { svc, addr });
        Ok(())
    }

    async fn delete_replica(&self, name: &str) {
        if let Some(r) = self.replicas.lock().await.remove(name) {
            r.svc.shutdown();
        }
        self.broken.lock().await.remove(name);
        let dir = self.replica_dir(name);
        match std::fs::remove_dir_all(&dir) {
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
        let mut engines = Vec::new();
        for (vol, e) in self.engines.lock().await.iter() {
            // A finished revert is reported with the chain read after it.
            let revert = e.revert.as_ref().and_then(RevertTask::report);
            let snapshots = snapshot_infos(&e.engine).await;
            engines.push(EngineReport {
                restore: e.restore.as_ref().map(|r| r.report()),
                revert,
                snapshots,
                volume: vol.clone(),
                generation: e.generation,
                nbd_uri: format!("nbd://{}/{vol}", self.nbd_addr),
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
        }
        let backups = self
            .backups
            .lock()
            .await
            .iter()
            .map(|(name, t)| t.report(name))
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
            disks: vec![disk_status(&self.cfg.data_dir)],
            replicas,
            engines,
        }
    }

    async fn tick(&self) {
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
        for ra in &a.replicas {
            if self.broken.lock().await.contains_key(&ra.name) {
                continue;
            }
            match self.start_replica(&ra.name, &ra.volume, ra.size).await {
                Ok(()) => {}
                Err(NodeError::BrokenStore(why)) => {
                    self.mark_broken(&ra.name, &why).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(replica = %ra.name, error = %e, "cannot start replica");
                    continue;
                }
            }
            if let Some(r) = self.replicas.lock().await.get(&ra.name) {
                let cur = r.svc.read_store().size();
                if ra.size > cur
                    && let Err(e) = r.svc.write_store().expand(ra.size)
                {
                    tracing::error!(replica = %ra.name, error = %e, "cannot expand replica");
                }
            }
        }
        // Engines first: one that stops flushes to its replicas before any of them goes.
        self.reconcile_engines(&a.engines).await;
        self.reconcile_snapshots(&a.snapshots).await;
        self.reconcile_backups(&a.backups).await;
        for name in &a.delete_replicas {
            self.delete_replica(name).await;
        }
    }

    /// Takes the snapshots that should exist and deletes the ones that should not.
    async fn reconcile_snapshots(&self, ops: &[SnapshotOp]) {
        let engines = self.engines.lock().await;
        for op in ops {
            let Some(e) = engines.get(&op.volume) else {
                continue;
            };
            let have = snapshot_infos(&e.engine)
                .await
                .iter()
                .any(|s| s.name == op.name);
            let res = match (op.delete, have) {
                (false, false) => e
                    .engine
                    .snapshot(Some(op.name.clone()), true)
                    .await
                    .map(|_| ()),
                (true, true) => e.engine.delete_snapshot(&op.name).await,
                _ => Ok(()),
            };
            if let Err(err) = res {
                tracing::warn!(volume = %op.volume, snapshot = %op.name, error = %err, "snapshot operation failed");
            }
        }
    }

    /// Starts assigned backups, settles ones a restart interrupted, and forgets finished ones
    /// the manager has recorded.
    async fn reconcile_backups(&self, orders: &[BackupOrder]) {
        let engines = self.engines.lock().await;
        let mut tasks = self.backups.lock().await;
        let mut waiting = self.waiting.lock().await;
        tasks.retain(|name, t| {
            let keep = orders.iter().any(|o| &o.name == name);
            if !keep && !t.finished() {
                t.handle.abort();
            }
            keep
        });
        waiting.retain(|name, _| orders.iter().any(|o| &o.name == name));
        for o in orders {
            if tasks.contains_key(&o.name) {
                continue;
            }
            let Some(e) = engines.get(&o.volume) else {
                continue;
            };
            if o.state == BackupState::InProgress {
                tasks.insert(
                    o.name.clone(),
                    backup::settle_interrupted(o.clone(), self.cfg.name.clone(), self.wake.clone()),
                );
                continue;
            }
            // A snapshot taken for the backup may arrive with the next assignments.
            let have = snapshot_infos(&e.engine)
                .await
                .iter()
                .any(|s| s.name == o.snapshot);
            let since = *waiting
                .entry(o.name.clone())
                .or_insert_with(tokio::time::Instant::now);
            if !have && since.elapsed() < Duration::from_secs(30) {
                continue;
            }
            waiting.remove(&o.name);
            tasks.insert(
                o.name.clone(),
                backup::start_backup(e.engine.clone(), o.clone(), self.wake.clone()),
            );
        }
    }

    async fn reconcile_engines(&self, wanted: &[EngineSpec]) {
        let mut engines = self.engines.lock().await;
        // Stop engines no longer assigned (or assigned with a new generation).
        let stale: Vec<String> = engines
            .iter()
            .filter(|(v, e)| {
                !wanted
                    .iter()
                    .any(|w| &w.volume == *v && w.generation == e.generation)
            })
            .map(|(v, _)| v.clone())
            .collect();
        for v in stale {
            if let Some(e) = engines.remove(&v) {
                self.exports.remove(&v);
                if let Err(err) = e.engine.flush().await {
                    tracing::warn!(volume = %v, error = %err, "flush while stopping the engine failed");
                }
                e.engine.stop().await;
                e.healer.abort();
                tracing::info!(volume = %v, "engine stopped");
            }
        }
        for w in wanted {
            let desired: Vec<(String, String)> = w
                .replicas
                .iter()
                .map(|r| (r.name.clone(), r.address.clone()))
                .collect();
            if let Some(e) = engines.get_mut(&w.volume) {
                e.engine.set_desired(desired);
                if let Some(snap) = &w.revert
                    && e.revert.as_ref().is_none_or(|t| &t.snapshot != snap)
                {
                    e.revert = Some(RevertTask::start(e.engine.clone(), snap, self.wake.clone()));
                }
                // Online expansion: the engine grows every replica in its set.
                if w.size > e.engine.size() {
                    match e.engine.expand(w.size).await {
                        Ok(()) => {
                            tracing::info!(volume = %w.volume, size = w.size, "volume expanded")
                        }
                        Err(err) => {
                            tracing::warn!(volume = %w.volume, size = w.size, error = %err, "cannot expand the volume yet")
                        }
                    }
                }
                // An engine that rebuilt a detached volume is exported once it is attached here.
                let exported = self.exports.get(&w.volume).is_some();
                if w.frontend && !exported {
                    self.exports.insert(&w.volume, e.engine.clone());
                    tracing::info!(volume = %w.volume, "volume exported");
                } else if !w.frontend && exported {
                    self.exports.remove(&w.volume);
                }
                if let Some(r) = &w.restore {
                    // A new order replaces a finished task; a running one completes first.
                    // A restore that completed is not run again for the same backup (the order's
                    // `from` moving to it is no reason); a failed one is, once `from` moves.
                    let start = match &e.restore {
                        None => true,
                        Some(t) => {
                            t.finished()
                                && (t.backup != r.backup || (t.from != r.from && !t.succeeded()))
                        }
                    };
                    if start {
                        e.restore = Some(backup::start_restore(
                            e.engine.clone(),
                            r.clone(),
                            8,
                            self.wake.clone(),
                        ));
                    }
                }
                continue;
            }
            let candidates: Vec<(String, String)> = w
                .replicas
                .iter()
                .filter(|r| r.candidate)
                .map(|r| (r.name.clone(), r.address.clone()))
                .collect();
            let cfg = EngineConfig {
                volume: w.volume.clone(),
                generation: Generation(w.generation),
                size: w.size,
                io_timeout: if w.replica_timeout > 0 {
                    Duration::from_secs(w.replica_timeout)
                } else {
                    self.cfg.io_timeout
                },
            };
            let hook = Arc::new(ApiHook {
                api: self.api.clone(),
            });
            match Engine::open(cfg, &candidates, hook).await {
                Ok(engine) => {
                    let healer = engine.spawn_healer(desired, Duration::from_millis(500));
                    if w.frontend {
                        self.exports.insert(&w.volume, engine.clone());
                    }
                    let restore = w.restore.as_ref().map(|r| {
                        backup::start_restore(engine.clone(), r.clone(), 8, self.wake.clone())
                    });
                    let revert = w
                        .revert
                        .as_ref()
                        .map(|snap| RevertTask::start(engine.clone(), snap, self.wake.clone()));
                    self.engine_errors.lock().await.remove(&w.volume);
                    tracing::info!(volume = %w.volume, generation = w.generation, "engine started");
                    self.wake.notify_one();
                    engines.insert(
                        w.volume.clone(),
                        RunningEngine {
                            engine,
                            generation: w.generation,
                            healer,
                            restore,
                            revert,
                        },
                    );
                }
                Err(e) => {
                    let msg = e.to_string();
                    let fresh = self
                        .engine_errors
                        .lock()
                        .await
                        .insert(w.volume.clone(), (w.generation, msg.clone()))
                        .is_none_or(|(_, m)| m != msg);
                    if fresh {
                        tracing::warn!(volume = %w.volume, error = %msg, "engine cannot start yet");
                    }
                }
            }
        }
    }
}
