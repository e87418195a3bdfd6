//! Backup and restore through the file-system target with in-memory volumes: exact counts, zero
//! blocks, incremental backups, corruption and missing blocks, and a target that fails mid-backup.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use zebu_backupstore::backup::{
    BackupError, BackupSpec, Problem, Progress, RestoreSink, SnapshotSource, block_key,
    manifest_key, read_manifest, run_backup, run_restore, verify,
};
use zebu_backupstore::store::{BackupStore, FsStore, StoreError};
use zebu_backupstore::{Codec, Manifest};

const BS: u32 = 1 << 20;

fn tempdir() -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "zebu-bk-test-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&p).expect("mkdir");
    p
}

struct Mem(Mutex<Vec<u8>>);

impl SnapshotSource for Mem {
    fn size(&self) -> u64 {
        self.0.lock().expect("lock").len() as u64
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        Ok(self.0.lock().expect("lock")[offset as usize..(offset + len) as usize].to_vec())
    }
}

impl RestoreSink for Mem {
    async fn write(&self, offset: u64, data: Vec<u8>) -> Result<(), String> {
        self.0.lock().expect("lock")[offset as usize..offset as usize + data.len()]
            .copy_from_slice(&data);
        Ok(())
    }
    async fn zero(&self, offset: u64, len: u64) -> Result<(), String> {
        self.0.lock().expect("lock")[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

fn volume() -> Vec<u8> {
    // 4 MiB random, 4 MiB text-like, 8 MiB zeros.
    let mut v = vec![0u8; 16 << 20];
    let mut x: u64 = 0x1234_5678;
    for b in v[..4 << 20].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    // 64 bytes, so every 1 MiB text block is the same and deduplicates.
    let text = b"the quick brown zebu jumps over the lazy longhorn, twice a day. ";
    assert_eq!(text.len(), 64);
    for (i, b) in v[4 << 20..8 << 20].iter_mut().enumerate() {
        *b = text[i % text.len()];
    }
    v
}

fn spec(backup: &str, parent: Option<(Manifest, Vec<(u64, u64)>)>) -> BackupSpec {
    BackupSpec {
        volume: "v1".into(),
        backup: backup.into(),
        snapshot: format!("snap-{backup}"),
        block_size: BS,
        codec: Codec::Zstd,
        parent,
        concurrency: 4,
        created: 1,
        labels: BTreeMap::new(),
    }
}

async fn restore(store: &Arc<FsStore>, m: &Manifest) -> Result<Vec<u8>, BackupError> {
    let sink = Arc::new(Mem(Mutex::new(vec![0xee; m.volume_size as usize])));
    run_restore(
        store.clone(),
        m,
        sink.clone(),
        false,
        4,
        Arc::new(Progress::default()),
    )
    .await?;
    let v = sink.0.lock().expect("lock").clone();
    Ok(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_incremental_backup_and_restore() {
    let dir = tempdir();
    let store = Arc::new(FsStore::open(&dir, true).expect("open"));
    let data = volume();
    let src = Arc::new(Mem(Mutex::new(data.clone())));
    let p1 = Arc::new(Progress::default());
    let m1 = run_backup(store.clone(), src.clone(), spec("b1", None), p1.clone())
        .await
        .expect("backup 1");
    assert_eq!(p1.total.load(Ordering::Relaxed), 16);
    assert_eq!(
        p1.zero.load(Ordering::Relaxed),
        8,
        "zero blocks are not stored"
    );
    assert_eq!(
        p1.uploaded.load(Ordering::Relaxed),
        5,
        "4 random + 1 distinct text block"
    );
    assert_eq!(
        p1.present.load(Ordering::Relaxed),
        3,
        "identical text blocks dedup"
    );
    assert_eq!(store.list("blocks").await.expect("list").len(), 5);
    assert!(p1.bytes_stored.load(Ordering::Relaxed) < p1.bytes_uploaded.load(Ordering::Relaxed));
    assert_eq!(restore(&store, &m1).await.expect("restore 1"), data);
    // Change 2 MiB (blocks 1 and 9) and back up incrementally.
    let mut changed = data.clone();
    for (i, b) in changed[(1 << 20)..(1 << 20) + 4096].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7) ^ 0x5a;
    }
    for b in changed[(9 << 20)..(10 << 20)].iter_mut() {
        *b = 0x77;
    }
    *src.0.lock().expect("lock") = changed.clone();
    let p2 = Arc::new(Progress::default());
    let ranges = vec![(1 << 20, 4096), (9 << 20, 1 << 20)];
    let m2 = run_backup(
        store.clone(),
        src.clone(),
        spec("b2", Some((m1.clone(), ranges))),
        p2.clone(),
    )
    .await
    .expect("backup 2");
    assert_eq!(
        p2.uploaded.load(Ordering::Relaxed),
        2,
        "exactly the changed blocks are uploaded"
    );
    assert_eq!(
        p2.present.load(Ordering::Relaxed) + p2.zero.load(Ordering::Relaxed),
        14
    );
    assert_eq!(m2.parent, "b1");
    assert_eq!(restore(&store, &m2).await.expect("restore 2"), changed);
    assert_eq!(restore(&store, &m1).await.expect("restore 1 again"), data);
    let read = read_manifest(&*store, "v1", "b2")
        .await
        .expect("read")
        .expect("present");
    assert_eq!(read, m2);
    assert!(verify(&*store, &m2, true).await.expect("verify").is_empty());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_missing_blocks_are_named() {
    let dir = tempdir();
    let store = Arc::new(FsStore::open(&dir, true).expect("open"));
    let src = Arc::new(Mem(Mutex::new(volume())));
    let m = run_backup(
        store.clone(),
        src,
        spec("b1", None),
        Arc::new(Progress::default()),
    )
    .await
    .expect("backup");
    let victim = m.blocks[2].expect("block 2 stored");
    let path = dir.join(block_key(&victim));
    let mut bytes = std::fs::read(&path).expect("read block");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, &bytes).expect("corrupt");
    assert!(
        verify(&*store, &m, false).await.expect("verify").is_empty(),
        "shallow verify only checks presence"
    );
    let problems = verify(&*store, &m, true).await.expect("verify deep");
    assert_eq!(problems.len(), 1);
    assert!(matches!(&problems[0], Problem::Corrupt(h, _) if *h == victim));
    let err = restore(&store, &m).await.expect_err("restore must fail");
    assert!(err.to_string().contains(&victim.to_hex()), "{err}");
    std::fs::remove_file(&path).expect("remove");
    assert_eq!(
        verify(&*store, &m, false).await.expect("verify"),
        vec![Problem::Missing(victim)]
    );
    let err = restore(&store, &m).await.expect_err("restore must fail");
    assert!(matches!(err, BackupError::MissingBlock(h) if h == victim));
    let _ = std::fs::remove_dir_all(dir);
}

/// A target that starts failing every write after `budget` successful ones.
struct Flaky {
    inner: FsStore,
    budget: AtomicU64,
}

impl BackupStore for Flaky {
    async fn put_if_absent(&self, key: &str, data: Vec<u8>) -> Result<bool, StoreError> {
        if self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .is_err()
        {
            return Err(StoreError::Io {
                key: key.into(),
                message: "injected failure".into(),
            });
        }
        self.inner.put_if_absent(key, data).await
    }
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        if self.budget.load(Ordering::SeqCst) == 0 {
            return Err(StoreError::Io {
                key: key.into(),
                message: "injected failure".into(),
            });
        }
        self.inner.put(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.exists(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_target_counts_only_landed_blocks_and_a_retry_reuses_them() {
    let dir = tempdir();
    let fs = FsStore::open(&dir, true).expect("open");
    let flaky = Arc::new(Flaky {
        inner: fs.clone(),
        budget: AtomicU64::new(3),
    });
    let src = Arc::new(Mem(Mutex::new(volume())));
    let p = Arc::new(Progress::default());
    let err = run_backup(flaky.clone(), src.clone(), spec("b1", None), p.clone())
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains("injected failure"), "{err}");
    let landed = fs.list("blocks").await.expect("list").len() as u64;
    assert_eq!(
        p.uploaded.load(Ordering::Relaxed),
        landed,
        "uploaded counts only blocks that landed"
    );
    assert!(landed <= 3);
    assert!(
        !fs.exists(&manifest_key("v1", "b1")).await.expect("exists"),
        "no manifest for a failed backup"
    );
    // The target recovers: a new backup uploads only what is missing.
    let store = Arc::new(fs.clone());
    let p2 = Arc::new(Progress::default());
    let m = run_backup(store.clone(), src.clone(), spec("b2", None), p2.clone())
        .await
        .expect("backup");
    assert_eq!(p2.uploaded.load(Ordering::Relaxed), 5 - landed);
    assert!(verify(&*store, &m, true).await.expect("verify").is_empty());
    let _ = std::fs::remove_dir_all(dir);
}
