//! Backups and restores a node runs for the engines it hosts, over zebu-backupstore: a snapshot
//! read through the engine becomes a backup (incremental to the newest earlier backup whose
//! snapshot still exists), and a backup is written through the engine to every replica of a new
//! volume. Plugged into the node agent as its [`Transfers`].

mod images;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use zebu_api::model::*;
use zebu_backupstore::backup::{
    BackupSpec, Progress, RestoreOptions, RestoreSink, SnapshotSource, read_manifest, run_backup,
    run_restore_from,
};
use zebu_backupstore::gc::now_ms;
use zebu_backupstore::{Codec, Target, TargetSpec};
use zebu_engine::Engine;
use zebu_node::{BackupHandle, RestoreHandle, Transfers};
use zebu_replica::DEFAULT_CLUSTER_SIZE;

/// The node's [`Transfers`] on backup targets (file system, S3).
pub struct BackupTargets;

impl Transfers for BackupTargets {
    fn start_backup(
        &self,
        engine: Arc<Engine>,
        order: BackupOrder,
        done: Arc<tokio::sync::Notify>,
    ) -> Box<dyn BackupHandle> {
        Box::new(start_backup(engine, order, done))
    }

    fn settle_interrupted(
        &self,
        order: BackupOrder,
        node: String,
        done: Arc<tokio::sync::Notify>,
    ) -> Box<dyn BackupHandle> {
        Box::new(settle_interrupted(order, node, done))
    }

    fn start_restore(
        &self,
        engine: Arc<Engine>,
        order: RestoreOrder,
        concurrency: usize,
        done: Arc<tokio::sync::Notify>,
    ) -> Box<dyn RestoreHandle> {
        Box::new(start_restore(engine, order, concurrency, done))
    }

    fn start_image_backup(
        &self,
        path: std::path::PathBuf,
        order: BackupOrder,
        done: Arc<tokio::sync::Notify>,
    ) -> Box<dyn BackupHandle> {
        Box::new(images::start_image_backup(path, order, done))
    }

    fn restore_image(
        &self,
        target: TargetRef,
        owner: String,
        backup: String,
        path: std::path::PathBuf,
        progress: Arc<dyn Fn(u64, u64) + Send + Sync>,
    ) -> zebu_node::transfer::BoxFuture<Result<u64, String>> {
        Box::pin(images::restore_image(target, owner, backup, path, progress))
    }
}

impl BackupHandle for BackupTask {
    fn report(&self, name: &str) -> BackupReport {
        BackupTask::report(self, name)
    }

    fn finished(&self) -> bool {
        BackupTask::finished(self)
    }

    fn abort(&self) {
        self.handle.abort();
    }
}

impl RestoreHandle for RestoreTask {
    fn report(&self) -> RestoreReport {
        RestoreTask::report(self)
    }

    fn backup(&self) -> &str {
        &self.backup
    }

    fn from(&self) -> &str {
        &self.from
    }

    fn finished(&self) -> bool {
        RestoreTask::finished(self)
    }

    fn succeeded(&self) -> bool {
        RestoreTask::succeeded(self)
    }
}

/// A snapshot's view read through the engine.
struct SnapSource {
    engine: Arc<Engine>,
    name: String,
}

impl SnapshotSource for SnapSource {
    fn size(&self) -> u64 {
        self.engine.size()
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        self.engine
            .read_snapshot(&self.name, offset, len as u32)
            .await
            .map(|b| b.to_vec())
            .map_err(|e| e.to_string())
    }
}

/// Restored bytes written through the engine (so every replica gets them).
struct EngineSink(Arc<Engine>);

impl RestoreSink for EngineSink {
    async fn write(&self, offset: u64, data: Vec<u8>) -> Result<(), String> {
        self.0
            .write(offset, Bytes::from(data), false)
            .await
            .map_err(|e| e.to_string())
    }
    async fn zero(&self, offset: u64, len: u64) -> Result<(), String> {
        self.0
            .zero(offset, len, false)
            .await
            .map_err(|e| e.to_string())
    }
}

async fn open(t: &TargetRef) -> Result<Target, String> {
    let spec = TargetSpec::parse(&t.url, &t.options).map_err(|e| e.to_string())?;
    spec.open(false)
        .await
        .map_err(|e| format!("backup target {:?}: {e}", t.name))
}

/// What a backup task knows besides its counters.
#[derive(Debug, Clone, Default)]
pub struct BackupInfo {
    pub state: BackupState,
    pub error: String,
    pub snapshot: String,
    pub parent: String,
    pub volume_size: u64,
    pub block_size: u64,
    pub created_ms: u64,
    /// Counts taken from a manifest (an interrupted backup found complete).
    pub fixed: Option<BlockCounts>,
}

pub struct BackupTask {
    pub progress: Arc<Progress>,
    pub info: Arc<Mutex<BackupInfo>>,
    pub handle: tokio::task::JoinHandle<()>,
}

impl BackupTask {
    pub fn report(&self, name: &str) -> BackupReport {
        let i = self.info.lock().map(|i| i.clone()).unwrap_or_default();
        let p = &self.progress;
        let blocks = i.fixed.unwrap_or(BlockCounts {
            total: p.total.load(Ordering::Relaxed),
            uploaded: p.uploaded.load(Ordering::Relaxed),
            present: p.present.load(Ordering::Relaxed),
            zero: p.zero.load(Ordering::Relaxed),
        });
        BackupReport {
            name: name.to_string(),
            state: i.state,
            error: i.error,
            blocks,
            bytes: ByteCounts {
                uploaded: p.bytes_uploaded.load(Ordering::Relaxed),
                stored: p.bytes_stored.load(Ordering::Relaxed),
            },
            snapshot: i.snapshot,
            parent: i.parent,
            volume_size: i.volume_size,
            block_size: i.block_size,
            created_ms: i.created_ms,
        }
    }

    pub fn finished(&self) -> bool {
        self.info.lock().map(|i| i.state.finished()).unwrap_or(true)
    }
}

fn set(info: &Mutex<BackupInfo>, f: impl FnOnce(&mut BackupInfo)) {
    if let Ok(mut i) = info.lock() {
        f(&mut i);
    }
}

/// Starts a backup of `order` on `engine`.
pub fn start_backup(
    engine: Arc<Engine>,
    order: BackupOrder,
    done: Arc<tokio::sync::Notify>,
) -> BackupTask {
    let snapshot = order.snapshot.clone();
    spawn_backup(order.name.clone(), snapshot, done, move |p, i| async move {
        backup(engine, order, p, &i).await
    })
}

/// Runs a backup task: `run` with its counters and info, then the outcome recorded and `done`
/// notified.
pub(crate) fn spawn_backup<F, Fut>(
    name: String,
    snapshot: String,
    done: Arc<tokio::sync::Notify>,
    run: F,
) -> BackupTask
where
    F: FnOnce(Arc<Progress>, Arc<Mutex<BackupInfo>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let progress = Arc::new(Progress::default());
    let info = Arc::new(Mutex::new(BackupInfo {
        state: BackupState::InProgress,
        snapshot,
        ..Default::default()
    }));
    let (p, i) = (progress.clone(), info.clone());
    let handle = tokio::spawn(async move {
        let res = run(p, i.clone()).await;
        set(&i, |i| match res {
            Ok(()) => i.state = BackupState::Completed,
            Err(e) => {
                tracing::warn!(backup = %name, error = %e, "backup failed");
                i.state = BackupState::Error;
                i.error = e;
            }
        });
        done.notify_one();
    });
    BackupTask {
        progress,
        info,
        handle,
    }
}

async fn backup(
    engine: Arc<Engine>,
    order: BackupOrder,
    progress: Arc<Progress>,
    info: &Mutex<BackupInfo>,
) -> Result<(), String> {
    let store = open(&order.target).await?;
    let snaps = snapshot_names(&engine).await?;
    if !snaps.contains(&order.snapshot) {
        return Err(format!(
            "snapshot {:?} does not exist on volume {:?}",
            order.snapshot, order.volume
        ));
    }
    let codec = Codec::parse(&order.codec)
        .ok_or_else(|| format!("unknown compression {:?}", order.codec))?;
    let size = engine.size();
    // Incremental to the newest backup whose snapshot still exists.
    let mut parent = None;
    // A full backup reads every block and checks each against the target.
    let parents: &[(String, String)] = if order.full { &[] } else { &order.parents };
    for (pb, psnap) in parents {
        if psnap.is_empty() || !snaps.contains(psnap) {
            continue;
        }
        let Ok(Some(m)) = read_manifest(&store, &order.volume, pb).await else {
            continue;
        };
        if m.block_size != order.block_size || m.volume_size != size {
            continue;
        }
        let cs = DEFAULT_CLUSTER_SIZE as u64;
        // The clusters that differ between the two snapshots, whichever is older.
        let pi = snaps.iter().position(|x| x == psnap);
        let si = snaps.iter().position(|x| x == &order.snapshot);
        let runs = match pi.cmp(&si) {
            std::cmp::Ordering::Equal => Ok(Vec::new()),
            std::cmp::Ordering::Less => engine.diff(psnap, Some(&order.snapshot)).await,
            std::cmp::Ordering::Greater => engine.diff(&order.snapshot, Some(psnap)).await,
        }
        .map_err(|e| e.to_string())?;
        let changed = runs.iter().map(|r| (r.start * cs, r.len * cs)).collect();
        parent = Some((m, changed));
        break;
    }
    let created = now_ms();
    set(info, |i| {
        i.parent = parent
            .as_ref()
            .map(|(m, _)| m.backup.clone())
            .unwrap_or_default();
        i.volume_size = size;
        i.block_size = order.block_size as u64;
        i.created_ms = created;
    });
    tracing::info!(backup = %order.name, volume = %order.volume, snapshot = %order.snapshot,
        parent = %parent.as_ref().map(|(m, _)| m.backup.as_str()).unwrap_or("-"), "backup started");
    let spec = BackupSpec {
        volume: order.volume.clone(),
        backup: order.name.clone(),
        snapshot: order.snapshot.clone(),
        block_size: order.block_size,
        codec,
        parent,
        concurrency: order.concurrency.max(1) as usize,
        created,
        labels: order.labels.clone(),
        bandwidth: (order.bandwidth > 0).then_some(order.bandwidth),
    };
    let src = Arc::new(SnapSource {
        engine,
        name: order.snapshot.clone(),
    });
    run_backup(Arc::new(store), src, spec, progress)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Settles a backup the manager believes runs here but this process never started (it
/// restarted): Completed if its manifest is in the target, Error otherwise.
pub fn settle_interrupted(
    order: BackupOrder,
    node: String,
    done: Arc<tokio::sync::Notify>,
) -> BackupTask {
    let progress = Arc::new(Progress::default());
    let info = Arc::new(Mutex::new(BackupInfo {
        state: BackupState::InProgress,
        snapshot: order.snapshot.clone(),
        ..Default::default()
    }));
    let i = info.clone();
    let handle = tokio::spawn(async move {
        let found = match open(&order.target).await {
            Ok(store) => read_manifest(&store, &order.volume, &order.name).await,
            Err(e) => {
                set(&i, |i| {
                    i.state = BackupState::Error;
                    i.error = format!("interrupted by a restart of node {node:?}; {e}");
                });
                return;
            }
        };
        set(&i, |i| match found {
            Ok(Some(m)) => {
                let total = m.blocks.len() as u64;
                let zero = m.blocks.iter().filter(|b| b.is_none()).count() as u64;
                i.state = BackupState::Completed;
                i.parent = m.parent.clone();
                i.volume_size = m.volume_size;
                i.block_size = m.block_size as u64;
                i.created_ms = m.created;
                i.fixed = Some(BlockCounts {
                    total,
                    uploaded: 0,
                    present: total - zero,
                    zero,
                });
            }
            Ok(None) => {
                i.state = BackupState::Error;
                i.error = format!(
                    "interrupted by a restart of node {node:?} before its manifest was written"
                );
            }
            Err(e) => {
                i.state = BackupState::Error;
                i.error = format!("interrupted by a restart of node {node:?}; {e}");
            }
        });
        done.notify_one();
    });
    BackupTask {
        progress,
        info,
        handle,
    }
}

/// The name of the snapshot taken once a backup is restored.
pub fn restore_snapshot(backup: &str) -> String {
    format!("restore-{backup}")
}

/// A restore running into an engine.
pub struct RestoreTask {
    pub backup: String,
    pub from: String,
    pub progress: Arc<Progress>,
    /// The restored backup's volume size once done.
    pub outcome: Arc<Mutex<Option<Result<u64, String>>>>,
    pub handle: tokio::task::JoinHandle<()>,
}

impl RestoreTask {
    pub fn report(&self) -> RestoreReport {
        let total = self.progress.total.load(Ordering::Relaxed);
        let done = self.progress.restored.load(Ordering::Relaxed);
        let outcome = self.outcome.lock().ok().and_then(|o| o.clone());
        let (state, error, volume_size) = match outcome {
            None => (RestoreState::Restoring, String::new(), 0),
            Some(Ok(size)) => (RestoreState::Completed, String::new(), size),
            Some(Err(e)) => (RestoreState::Error, e, 0),
        };
        let progress = match state {
            RestoreState::Completed => 100,
            _ if total > 0 => ((done * 100 / total) as u32).min(99),
            _ => 0,
        };
        RestoreReport {
            backup: self.backup.clone(),
            volume_size,
            state,
            progress,
            error,
        }
    }
}

impl RestoreTask {
    pub fn finished(&self) -> bool {
        self.outcome.lock().map(|o| o.is_some()).unwrap_or(true)
    }

    pub fn succeeded(&self) -> bool {
        self.outcome
            .lock()
            .map(|o| matches!(*o, Some(Ok(_))))
            .unwrap_or(false)
    }
}

impl Drop for RestoreTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Restores `order` into `engine` (a new volume: its blocks are all zero already).
pub fn start_restore(
    engine: Arc<Engine>,
    order: RestoreOrder,
    concurrency: usize,
    done: Arc<tokio::sync::Notify>,
) -> RestoreTask {
    let progress = Arc::new(Progress::default());
    let outcome = Arc::new(Mutex::new(None));
    let (p, o) = (progress.clone(), outcome.clone());
    let (backup, from) = (order.backup.clone(), order.from.clone());
    let handle = tokio::spawn(async move {
        let res = restore(engine, &order, p, concurrency).await;
        if let Err(e) = &res {
            tracing::warn!(backup = %order.backup, error = %e, "restore failed");
        }
        if let Ok(mut o) = o.lock() {
            *o = Some(res);
        }
        done.notify_one();
    });
    RestoreTask {
        backup,
        from,
        progress,
        outcome,
        handle,
    }
}

async fn snapshot_names(engine: &Engine) -> Result<Vec<String>, String> {
    Ok(engine
        .layers()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|l| !l.meta.deleting)
        .filter_map(|l| l.meta.name)
        .collect())
}

/// Restores `order` into `engine`: every block, or (with `order.from`, the backup the volume
/// holds) only the blocks that differ. Then the restore snapshot is taken and older restore
/// snapshots are deleted, so the chain is that snapshot and the head. A failed incremental
/// restore reverts to the previous restore snapshot: the volume keeps its last good state.
async fn restore(
    engine: Arc<Engine>,
    order: &RestoreOrder,
    progress: Arc<Progress>,
    concurrency: usize,
) -> Result<u64, String> {
    let store = open(&order.target).await?;
    let m = read_manifest(&store, &order.source_volume, &order.backup)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("backup {:?} is not in the target", order.backup))?;
    let snap = restore_snapshot(&order.backup);
    let names = snapshot_names(&engine).await?;
    if !names.contains(&snap) {
        if m.volume_size > engine.size() {
            tracing::info!(volume = %engine.volume(), size = m.volume_size, "growing the volume to the backup's size");
            engine
                .expand(m.volume_size)
                .await
                .map_err(|e| format!("growing the volume to {} bytes: {e}", m.volume_size))?;
        }
        let old = if order.from.is_empty() || order.from == order.backup {
            None
        } else {
            read_manifest(&store, &order.source_volume, &order.from)
                .await
                .ok()
                .flatten()
        };
        let base = restore_snapshot(&order.from);
        // A new volume reads zeros where nothing was written, unless a backing image shows.
        let fresh =
            order.backing_image.is_empty() && !names.iter().any(|n| n.starts_with("restore-"));
        tracing::info!(volume = %engine.volume(), backup = %order.backup,
            from = %if old.is_some() { order.from.as_str() } else { "-" }, "restore started");
        let sink = Arc::new(EngineSink(engine.clone()));
        let res = run_restore_from(
            Arc::new(store),
            old.as_ref(),
            &m,
            sink,
            RestoreOptions {
                fresh,
                concurrency,
                bandwidth: (order.bandwidth > 0).then_some(order.bandwidth),
            },
            progress,
        )
        .await;
        let res = match res {
            // Past an older, smaller backup's end the volume reads zeros, as that backup did.
            Ok(()) if !fresh && engine.size() > m.volume_size => engine
                .zero(m.volume_size, engine.size() - m.volume_size, false)
                .await
                .map_err(|e| format!("zeroing past the backup's end: {e}")),
            Ok(()) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = res {
            if !order.from.is_empty()
                && names.contains(&base)
                && let Err(re) = engine.revert(&base).await
            {
                tracing::error!(volume = %engine.volume(), error = %re, "cannot revert to the last restored snapshot");
            }
            return Err(format!("restore of backup {:?} failed: {e}", order.backup));
        }
        engine.flush().await.map_err(|e| e.to_string())?;
        engine
            .snapshot(Some(snap.clone()), false)
            .await
            .map_err(|e| format!("taking the restore snapshot: {e}"))?;
    }
    for n in snapshot_names(&engine).await? {
        if n.starts_with("restore-")
            && n != snap
            && let Err(e) = engine.delete_snapshot(&n).await
        {
            tracing::warn!(volume = %engine.volume(), snapshot = %n, error = %e, "cannot delete an older restore snapshot");
        }
    }
    Ok(m.volume_size)
}
