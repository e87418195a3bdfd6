//! Backing-image backups and restores on a node: a ready copy's raw file read as the source of
//! a backup (kept under the owner `bi.<image>`), and a backup written into a new file that then
//! becomes a copy.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use zebu_api::model::*;
use zebu_backupstore::Codec;
use zebu_backupstore::backup::{
    BackupSpec, Progress, RestoreOptions, RestoreSink, SnapshotSource, read_manifest, run_backup,
    run_restore_from,
};
use zebu_backupstore::gc::now_ms;

use crate::{BackupInfo, BackupTask, open, set, spawn_backup};

/// A copy's raw file as a backup source.
struct FileSource {
    file: Arc<std::fs::File>,
    size: u64,
}

impl SnapshotSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        let f = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, offset).map(|()| buf)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("reading the copy at {offset}: {e}"))
    }
}

/// A new file restored into (it starts as all zeros: zero blocks are left as holes).
struct FileSink(Arc<std::fs::File>);

impl RestoreSink for FileSink {
    async fn write(&self, offset: u64, data: Vec<u8>) -> Result<(), String> {
        let f = self.0.clone();
        tokio::task::spawn_blocking(move || f.write_all_at(&data, offset))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("writing the copy at {offset}: {e}"))
    }

    async fn zero(&self, _offset: u64, _len: u64) -> Result<(), String> {
        Ok(())
    }
}

/// Starts a backup of the copy at `path` (the order's volume is the image's owner name).
pub fn start_image_backup(
    path: PathBuf,
    order: BackupOrder,
    done: Arc<tokio::sync::Notify>,
) -> BackupTask {
    spawn_backup(
        order.name.clone(),
        String::new(),
        done,
        move |p, i| async move { image_backup(path, order, p, &i).await },
    )
}

async fn image_backup(
    path: PathBuf,
    order: BackupOrder,
    progress: Arc<Progress>,
    info: &Mutex<BackupInfo>,
) -> Result<(), String> {
    let store = open(&order.target).await?;
    let codec = Codec::parse(&order.codec)
        .ok_or_else(|| format!("unknown compression {:?}", order.codec))?;
    let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let created = now_ms();
    set(info, |i| {
        i.volume_size = size;
        i.block_size = order.block_size as u64;
        i.created_ms = created;
    });
    tracing::info!(backup = %order.name, owner = %order.volume, size, "backing-image backup started");
    let spec = BackupSpec {
        volume: order.volume.clone(),
        backup: order.name.clone(),
        snapshot: String::new(),
        block_size: order.block_size,
        codec,
        // Every block is read; blocks the target has (from any backup) are not uploaded again.
        parent: None,
        concurrency: order.concurrency.max(1) as usize,
        created,
        labels: order.labels.clone(),
        bandwidth: (order.bandwidth > 0).then_some(order.bandwidth),
    };
    let src = Arc::new(FileSource {
        file: Arc::new(file),
        size,
    });
    run_backup(Arc::new(store), src, spec, progress)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Restores backup `backup` of `owner` from `target` into a new file at `path`; returns its size.
/// `progress` gets (blocks done, blocks in all) as it goes.
pub async fn restore_image(
    target: TargetRef,
    owner: String,
    backup: String,
    path: PathBuf,
    progress: Arc<dyn Fn(u64, u64) + Send + Sync>,
) -> Result<u64, String> {
    let store = Arc::new(open(&target).await?);
    let m = read_manifest(&*store, &owner, &backup)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("backup {backup:?} is not on target {:?}", target.name))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.set_len(m.volume_size).map_err(|e| e.to_string())?;
    let file = Arc::new(file);
    let p = Arc::new(Progress::default());
    let total = m.blocks.len() as u64;
    let watch = {
        let (p, f) = (p.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                f(p.restored.load(std::sync::atomic::Ordering::Relaxed), total);
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        })
    };
    let opts = RestoreOptions {
        fresh: true,
        concurrency: 8,
        bandwidth: None,
    };
    let res = run_restore_from(store, None, &m, Arc::new(FileSink(file.clone())), opts, p).await;
    watch.abort();
    res.map_err(|e| e.to_string())?;
    let f = file.clone();
    tokio::task::spawn_blocking(move || f.sync_all())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    progress(total, total);
    Ok(m.volume_size)
}
