//! Backup and restore of one snapshot, independent of where the blocks come from or go to:
//! blocks are read from a [`SnapshotSource`], hashed, deduplicated against the store, compressed
//! and uploaded with bounded concurrency; the manifest is written last. A block counts as uploaded
//! only after its write is confirmed (or its presence is); the result is Completed only once the
//! manifest is durable. Restore checks every block's hash.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::block::{self, BlockHash, Codec};
use crate::gc::Lease;
use crate::manifest::Manifest;
use crate::store::{BackupStore, StoreError};

/// Where a snapshot's bytes come from (an engine reading a snapshot's view).
pub trait SnapshotSource: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read(&self, offset: u64, len: u64) -> impl Future<Output = Result<Vec<u8>, String>> + Send;
}

/// Where restored bytes go (an engine writing to every replica of a new volume).
pub trait RestoreSink: Send + Sync + 'static {
    fn write(&self, offset: u64, data: Vec<u8>) -> impl Future<Output = Result<(), String>> + Send;
    fn zero(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), String>> + Send;
}

/// Counters a caller can watch while a backup or restore runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub total: AtomicU64,
    /// Blocks whose upload was confirmed.
    pub uploaded: AtomicU64,
    /// Blocks already in the store (or unchanged since the parent backup).
    pub present: AtomicU64,
    pub zero: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub bytes_stored: AtomicU64,
    /// Blocks restored.
    pub restored: AtomicU64,
}

impl Progress {
    /// One confirmed upload of `len` plain bytes stored as `stored` bytes.
    fn count_upload(&self, len: u64, stored: u64) {
        self.uploaded.fetch_add(1, Ordering::Relaxed);
        self.bytes_uploaded.fetch_add(len, Ordering::Relaxed);
        self.bytes_stored.fetch_add(stored, Ordering::Relaxed);
    }

    pub fn done(&self) -> u64 {
        self.uploaded.load(Ordering::Relaxed)
            + self.present.load(Ordering::Relaxed)
            + self.zero.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BackupError {
    #[error("reading the snapshot at offset {offset}: {message}")]
    Source { offset: u64, message: String },
    #[error("backup target: {0}")]
    Store(#[from] StoreError),
    #[error("block {0} is missing from the backup target")]
    MissingBlock(BlockHash),
    #[error("block {0} in the backup target is unusable: {1}")]
    CorruptBlock(BlockHash, String),
    #[error("{0}")]
    Block(#[from] block::BlockError),
    #[error("manifest: {0}")]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error("writing the restored volume at offset {offset}: {message}")]
    Sink { offset: u64, message: String },
    #[error("invalid backup request: {0}")]
    Invalid(String),
    #[error("{0} not found in the backup target")]
    NotFound(String),
}

pub struct BackupSpec {
    pub volume: String,
    pub backup: String,
    pub snapshot: String,
    pub block_size: u32,
    pub codec: Codec,
    /// The previous backup of this volume and the byte ranges changed since its snapshot; blocks
    /// outside them are taken from the parent without reading. `None`: full scan.
    pub parent: Option<(Manifest, Vec<(u64, u64)>)>,
    pub concurrency: usize,
    pub created: u64,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Upload limit in bytes per second (stored bytes); `None`: unlimited.
    pub bandwidth: Option<u64>,
}

/// Spaces uploads so they average at most `rate` bytes per second.
struct Limiter {
    rate: u64,
    next: std::sync::Mutex<tokio::time::Instant>,
}

impl Limiter {
    async fn take(&self, bytes: u64) {
        let wait = {
            let Ok(mut next) = self.next.lock() else {
                return;
            };
            let now = tokio::time::Instant::now();
            let start = (*next).max(now);
            *next = start + Duration::from_secs_f64(bytes as f64 / self.rate.max(1) as f64);
            start - now
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

pub fn block_key(h: &BlockHash) -> String {
    let hex = h.to_hex();
    format!("blocks/{}/{hex}.blk", &hex[..2])
}

/// Where a backup's manifest lives: `volumes/<volume>/backups/…`, or for the backups of a
/// backing image (owner `bi.<image>`) `backing-images/<image>/backups/…`.
pub fn manifest_key(volume: &str, backup: &str) -> String {
    match zebu_types::owner_image(volume) {
        Some(image) => format!("backing-images/{image}/backups/{backup}.manifest"),
        None => format!("volumes/{volume}/backups/{backup}.manifest"),
    }
}

/// Retries transient target errors with exponential backoff (6 tries, about 6 s in all).
async fn retry<T, F, Fut>(mut f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(100);
    let mut tries = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e @ (StoreError::BadKey(_) | StoreError::Unavailable(_))) => return Err(e),
            Err(e) if tries >= 5 => return Err(e),
            Err(_) => {
                tries += 1;
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

type Joined<T> = Result<Result<T, BackupError>, tokio::task::JoinError>;

/// The result of a finished task, with a panicked or cancelled task as an error.
fn flatten<T>(r: Joined<T>) -> Result<T, BackupError> {
    r.map_err(|e| BackupError::Invalid(e.to_string()))?
}

/// Records a finished block task: its hash in the manifest, or the first error.
fn absorb(
    r: Joined<(u64, Option<BlockHash>, bool)>,
    blocks: &mut [Option<BlockHash>],
    uploaded: &mut [bool],
    first_err: &mut Option<BackupError>,
) {
    match flatten(r) {
        Ok((i, h, up)) => {
            blocks[i as usize] = h;
            uploaded[i as usize] = up;
        }
        Err(e) => {
            first_err.get_or_insert(e);
        }
    }
}

/// Backs up a snapshot; returns the manifest once it is durable in the target.
pub async fn run_backup<S: BackupStore, Src: SnapshotSource>(
    store: Arc<S>,
    src: Arc<Src>,
    spec: BackupSpec,
    progress: Arc<Progress>,
) -> Result<Manifest, BackupError> {
    let bs = spec.block_size as u64;
    if spec.block_size == 0 || !spec.block_size.is_power_of_two() || bs > block::MAX_BLOCK as u64 {
        return Err(BackupError::Invalid(format!(
            "block size {} must be a power of two up to 16 MiB",
            spec.block_size
        )));
    }
    let size = src.size();
    let n = Manifest::block_count(size, spec.block_size);
    progress.total.store(n, Ordering::Relaxed);
    let mut blocks: Vec<Option<BlockHash>> = vec![None; n as usize];
    // Which blocks need reading.
    let mut todo: Vec<u64> = Vec::new();
    match &spec.parent {
        Some((parent, changed))
            if parent.block_size == spec.block_size && parent.volume_size == size =>
        {
            let mut dirty = BTreeSet::new();
            for (off, len) in changed {
                if *len == 0 {
                    continue;
                }
                let first = off / bs;
                let last = (off + len - 1) / bs;
                dirty.extend(first..=last.min(n.saturating_sub(1)));
            }
            for i in 0..n {
                if dirty.contains(&i) {
                    todo.push(i);
                } else {
                    blocks[i as usize] = parent.blocks[i as usize];
                    if parent.blocks[i as usize].is_some() {
                        progress.present.fetch_add(1, Ordering::Relaxed);
                    } else {
                        progress.zero.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        _ => todo.extend(0..n),
    }
    // Claim the blocks this backup relies on before the first existence check.
    let lease = retry(|| Lease::acquire(store.clone(), &spec.volume, &spec.backup)).await?;
    let res = upload(store, src, &spec, progress, &lease, blocks, todo).await;
    lease.release().await;
    res
}

/// Reads, deduplicates and uploads the `todo` blocks, then writes the manifest.
async fn upload<S: BackupStore, Src: SnapshotSource>(
    store: Arc<S>,
    src: Arc<Src>,
    spec: &BackupSpec,
    progress: Arc<Progress>,
    lease: &Lease<S>,
    mut blocks: Vec<Option<BlockHash>>,
    todo: Vec<u64>,
) -> Result<Manifest, BackupError> {
    let bs = spec.block_size as u64;
    let size = src.size();
    let mut uploaded = vec![false; blocks.len()];
    let todo_set: BTreeSet<u64> = todo.iter().copied().collect();
    let inherited: BTreeSet<usize> = (0..blocks.len())
        .filter(|&i| blocks[i].is_some() && !todo_set.contains(&(i as u64)))
        .collect();
    let limiter = spec.bandwidth.map(|rate| {
        Arc::new(Limiter {
            rate,
            next: std::sync::Mutex::new(tokio::time::Instant::now()),
        })
    });
    let sem = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut first_err: Option<BackupError> = None;
    for i in todo {
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BackupError::Invalid("cancelled".into()))?;
        let (store, src, progress, codec, limiter) = (
            store.clone(),
            src.clone(),
            progress.clone(),
            spec.codec,
            limiter.clone(),
        );
        tasks.spawn(async move {
            let _permit = permit;
            let off = i * bs;
            let len = bs.min(size - off);
            let data = read_block(&*src, off, len).await?;
            if block::is_zero(&data) {
                progress.zero.fetch_add(1, Ordering::Relaxed);
                return Ok((i, None, false));
            }
            let h = BlockHash::of(&data);
            let key = block_key(&h);
            if retry(|| store.exists(&key)).await? {
                progress.present.fetch_add(1, Ordering::Relaxed);
                return Ok((i, Some(h), false));
            }
            let enc = block::encode(&data, codec)?;
            let stored = enc.len() as u64;
            if let Some(l) = &limiter {
                l.take(stored).await;
            }
            let wrote = retry(|| store.put_if_absent(&key, enc.clone())).await?;
            // Counted only now that the write is confirmed.
            if wrote {
                progress.count_upload(len, stored);
            } else {
                progress.present.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, BackupError>((i, Some(h), wrote))
        });
        // Collect finished tasks as we go; stop starting new ones at the first error.
        while let Some(r) = tasks.try_join_next() {
            absorb(r, &mut blocks, &mut uploaded, &mut first_err);
        }
        if first_err.is_some() {
            break;
        }
    }
    // Let every started upload finish, so the counts match what landed.
    while let Some(r) = tasks.join_next().await {
        absorb(r, &mut blocks, &mut uploaded, &mut first_err);
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    // Blocks taken over from the parent were never looked at: they may have been lost from the
    // target since. A GC that ran without seeing this backup's lease may also have removed
    // blocks this run found or uploaded. Every such block is checked before the manifest is
    // written, and what is gone is uploaded again from the snapshot.
    let check: BTreeSet<usize> = if retry(|| lease.gc_overlapped()).await? {
        (0..blocks.len()).collect()
    } else {
        inherited
    };
    let wanted: BTreeSet<BlockHash> = check.iter().filter_map(|&i| blocks[i]).collect();
    let missing = missing_blocks(&*store, &wanted).await?;
    if !missing.is_empty() {
        let again: Vec<usize> = check
            .into_iter()
            .filter(|&i| blocks[i].is_some_and(|h| missing.contains(&h)))
            .collect();
        tracing::warn!(
            volume = %spec.volume,
            backup = %spec.backup,
            blocks = again.len(),
            "blocks this backup relies on are missing from the target; uploading them again"
        );
        reupload(
            &*store,
            &*src,
            &mut blocks,
            &uploaded,
            &again,
            bs,
            spec.codec,
            &progress,
        )
        .await?;
    }
    let manifest = Manifest {
        volume: spec.volume.clone(),
        backup: spec.backup.clone(),
        snapshot: spec.snapshot.clone(),
        parent: spec
            .parent
            .as_ref()
            .map(|(p, _)| p.backup.clone())
            .unwrap_or_default(),
        created: spec.created,
        volume_size: size,
        block_size: spec.block_size,
        labels: spec.labels.clone(),
        blocks,
    };
    let key = manifest_key(&spec.volume, &spec.backup);
    let bytes = manifest.encode();
    retry(|| store.put(&key, bytes.clone())).await?;
    Ok(manifest)
}

async fn read_block<Src: SnapshotSource>(
    src: &Src,
    off: u64,
    len: u64,
) -> Result<Vec<u8>, BackupError> {
    src.read(off, len)
        .await
        .map_err(|message| BackupError::Source {
            offset: off,
            message,
        })
}

/// Above this many blocks, [`missing_blocks`] lists the block folders instead of asking for
/// each block.
const LIST_ABOVE: usize = 256;

/// Which of `hashes` are not in the store. Up to [`LIST_ABOVE`] blocks it asks for each one;
/// beyond that it lists only the `blocks/<hh>/` folders the hashes fall in (at most 256
/// listings), so the cost follows the number of blocks, never one request per block on S3.
pub async fn missing_blocks<S: BackupStore>(
    store: &S,
    hashes: &BTreeSet<BlockHash>,
) -> Result<BTreeSet<BlockHash>, BackupError> {
    let mut missing = BTreeSet::new();
    if hashes.len() <= LIST_ABOVE {
        for h in hashes {
            let key = block_key(h);
            if !retry(|| store.exists(&key)).await? {
                missing.insert(*h);
            }
        }
        return Ok(missing);
    }
    let mut by_folder: std::collections::BTreeMap<String, Vec<BlockHash>> = Default::default();
    for h in hashes {
        let key = block_key(h);
        let folder = key
            .rsplit_once('/')
            .map(|(d, _)| d.to_string())
            .unwrap_or_default();
        by_folder.entry(folder).or_default().push(*h);
    }
    for (folder, hs) in by_folder {
        let present: BTreeSet<String> = retry(|| store.list(&folder)).await?.into_iter().collect();
        missing.extend(hs.into_iter().filter(|h| !present.contains(&block_key(h))));
    }
    Ok(missing)
}

/// Uploads the blocks at `indices` again from the snapshot (they went missing from the
/// store). A block counted as present before now counts as uploaded; the manifest takes the
/// snapshot's current bytes, should they differ from what the parent recorded.
#[allow(clippy::too_many_arguments)]
async fn reupload<S: BackupStore, Src: SnapshotSource>(
    store: &S,
    src: &Src,
    blocks: &mut [Option<BlockHash>],
    uploaded: &[bool],
    indices: &[usize],
    bs: u64,
    codec: Codec,
    progress: &Progress,
) -> Result<(), BackupError> {
    let size = src.size();
    for &i in indices {
        let off = i as u64 * bs;
        let len = bs.min(size - off);
        let data = read_block(src, off, len).await?;
        if !uploaded[i] {
            progress.present.fetch_sub(1, Ordering::Relaxed);
        }
        if block::is_zero(&data) {
            blocks[i] = None;
            progress.zero.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let h = BlockHash::of(&data);
        let key = block_key(&h);
        let enc = block::encode(&data, codec)?;
        let stored = enc.len() as u64;
        let wrote = retry(|| store.put_if_absent(&key, enc.clone())).await?;
        blocks[i] = Some(h);
        if uploaded[i] {
            continue; // counted when this run first uploaded it
        }
        if wrote {
            progress.count_upload(len, stored);
        } else {
            progress.present.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Reads a backup's manifest.
pub async fn read_manifest<S: BackupStore>(
    store: &S,
    volume: &str,
    backup: &str,
) -> Result<Option<Manifest>, BackupError> {
    let key = manifest_key(volume, backup);
    match retry(|| store.get(&key)).await? {
        Some(b) => Ok(Some(Manifest::decode(&b)?)),
        None => Ok(None),
    }
}

/// Restores a backup into `sink`, checking every block's hash. Zero blocks are zeroed unless the
/// sink is known to be fresh (all zeros already).
pub async fn run_restore<S: BackupStore, D: RestoreSink>(
    store: Arc<S>,
    manifest: &Manifest,
    sink: Arc<D>,
    fresh: bool,
    concurrency: usize,
    progress: Arc<Progress>,
) -> Result<(), BackupError> {
    let opts = RestoreOptions {
        fresh,
        concurrency,
        bandwidth: None,
    };
    run_restore_from(store, None, manifest, sink, opts, progress).await
}

/// How a restore writes.
#[derive(Debug, Clone, Copy)]
pub struct RestoreOptions {
    /// The sink is all zeros already: zero blocks need no write.
    pub fresh: bool,
    /// Blocks in flight.
    pub concurrency: usize,
    /// Download limit in bytes per second.
    pub bandwidth: Option<u64>,
}

/// Brings a volume that holds backup `old` to backup `manifest`: only the blocks whose entries
/// differ are written (or zeroed, when they became zero or absent). Every block it needs is
/// checked to exist before the first write, so a missing block leaves the volume untouched.
/// Without `old` (or with a different block size) every block is restored.
pub async fn run_restore_from<S: BackupStore, D: RestoreSink>(
    store: Arc<S>,
    old: Option<&Manifest>,
    manifest: &Manifest,
    sink: Arc<D>,
    opts: RestoreOptions,
    progress: Arc<Progress>,
) -> Result<(), BackupError> {
    let RestoreOptions {
        fresh,
        concurrency,
        bandwidth,
    } = opts;
    let limiter = bandwidth.map(|rate| {
        Arc::new(Limiter {
            rate,
            next: std::sync::Mutex::new(tokio::time::Instant::now()),
        })
    });
    let bs = manifest.block_size as u64;
    let base = old.filter(|o| o.block_size == manifest.block_size);
    let todo: Vec<usize> = (0..manifest.blocks.len())
        .filter(|&i| match base {
            Some(o) => o.blocks.get(i).copied().flatten() != manifest.blocks[i],
            None => true,
        })
        .collect();
    progress.total.store(todo.len() as u64, Ordering::Relaxed);
    if base.is_some() {
        for &i in &todo {
            if let Some(h) = manifest.blocks[i] {
                let key = block_key(&h);
                if !retry(|| store.exists(&key)).await? {
                    return Err(BackupError::MissingBlock(h));
                }
            }
        }
    }
    let fresh = fresh && base.is_none();
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in todo {
        let entry = &manifest.blocks[i];
        let off = i as u64 * bs;
        let len = bs.min(manifest.volume_size - off);
        let Some(h) = *entry else {
            if !fresh {
                sink.zero(off, len)
                    .await
                    .map_err(|message| BackupError::Sink {
                        offset: off,
                        message,
                    })?;
            }
            progress.restored.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BackupError::Invalid("cancelled".into()))?;
        let (store, sink, progress, limiter) = (
            store.clone(),
            sink.clone(),
            progress.clone(),
            limiter.clone(),
        );
        tasks.spawn(async move {
            let _permit = permit;
            let key = block_key(&h);
            let stored = retry(|| store.get(&key))
                .await?
                .ok_or(BackupError::MissingBlock(h))?;
            if let Some(l) = &limiter {
                l.take(stored.len() as u64).await;
            }
            let data = block::decode(&stored, &h)
                .map_err(|e| BackupError::CorruptBlock(h, e.to_string()))?;
            if data.len() as u64 != len {
                return Err(BackupError::Invalid(format!(
                    "block {h} has {} bytes, expected {len}",
                    data.len()
                )));
            }
            sink.write(off, data)
                .await
                .map_err(|message| BackupError::Sink {
                    offset: off,
                    message,
                })?;
            progress.restored.fetch_add(1, Ordering::Relaxed);
            Ok::<(), BackupError>(())
        });
        while let Some(r) = tasks.try_join_next() {
            flatten(r)?;
        }
    }
    while let Some(r) = tasks.join_next().await {
        flatten(r)?;
    }
    Ok(())
}

/// A problem `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Missing(BlockHash),
    Corrupt(BlockHash, String),
}

/// Checks that every block a backup references exists; `deep` also re-hashes each one.
pub async fn verify<S: BackupStore>(
    store: &S,
    manifest: &Manifest,
    deep: bool,
) -> Result<Vec<Problem>, BackupError> {
    let mut problems = Vec::new();
    for h in manifest.referenced() {
        let key = block_key(&h);
        if deep {
            match retry(|| store.get(&key)).await? {
                None => problems.push(Problem::Missing(h)),
                Some(b) => {
                    if let Err(e) = block::decode(&b, &h) {
                        problems.push(Problem::Corrupt(h, e.to_string()));
                    }
                }
            }
        } else if !retry(|| store.exists(&key)).await? {
            problems.push(Problem::Missing(h));
        }
    }
    Ok(problems)
}
