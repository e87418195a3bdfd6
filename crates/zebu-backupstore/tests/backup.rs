//! Backup and restore through the file-system target with in-memory volumes: exact counts, zero
//! blocks, incremental backups, corruption and missing blocks, a target that fails mid-backup,
//! deletion in every order, and a backup racing a delete's block collection.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use zebu_backupstore::backup::{
    BackupError, BackupSpec, Problem, Progress, RestoreSink, SnapshotSource, block_key,
    manifest_key, read_manifest, run_backup, run_restore, verify,
};
use zebu_backupstore::store::{BackupStore, FsStore, ObjectInfo, StoreError};
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
        bandwidth: None,
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

/// Counts existence checks and listings of an inner store.
struct Counting {
    inner: FsStore,
    exists: AtomicU64,
    lists: AtomicU64,
}

impl BackupStore for Counting {
    async fn put_if_absent(&self, key: &str, data: Vec<u8>) -> Result<bool, StoreError> {
        self.inner.put_if_absent(key, data).await
    }
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        self.inner.put(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.exists.fetch_add(1, Ordering::SeqCst);
        self.inner.exists(key).await
    }
    async fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.lists.fetch_add(1, Ordering::SeqCst);
        self.inner.list_meta(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
}

/// Backs up `mib` MiB of random data in `bs`-byte blocks, deletes two referenced blocks from
/// the target, changes one block and backs up incrementally: the lost blocks are uploaded again
/// and counted as uploaded, and the new backup restores and deep-verifies.
async fn lost_blocks_are_uploaded_again(bs: u32, mib: usize) -> (u64, u64) {
    let dir = tempdir();
    let fs = FsStore::open(&dir, true).expect("open");
    let store = Arc::new(Counting {
        inner: fs.clone(),
        exists: AtomicU64::new(0),
        lists: AtomicU64::new(0),
    });
    let mut data = vec![0u8; mib << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let src = Arc::new(Mem(Mutex::new(data.clone())));
    let sp = |name: &str, parent| BackupSpec {
        block_size: bs,
        ..spec(name, parent)
    };
    let m1 = run_backup(
        store.clone(),
        src.clone(),
        sp("b1", None),
        Arc::new(Progress::default()),
    )
    .await
    .expect("backup 1");
    let n = m1.blocks.len();
    // Two blocks the next backup takes over unchanged vanish from the target.
    let lost = [m1.blocks[0].expect("data"), m1.blocks[n - 1].expect("data")];
    for h in &lost {
        std::fs::remove_file(dir.join(block_key(h))).expect("remove block");
    }
    let off = (n / 2) * bs as usize;
    data[off..off + 4096].fill(0x42);
    *src.0.lock().expect("lock") = data.clone();
    store.exists.store(0, Ordering::SeqCst);
    store.lists.store(0, Ordering::SeqCst);
    let p = Arc::new(Progress::default());
    let m2 = run_backup(
        store.clone(),
        src.clone(),
        sp("b2", Some((m1.clone(), vec![(off as u64, 4096)]))),
        p.clone(),
    )
    .await
    .expect("backup 2");
    assert_eq!(
        p.uploaded.load(Ordering::Relaxed),
        3,
        "the changed block and the two lost ones"
    );
    assert_eq!(p.present.load(Ordering::Relaxed), n as u64 - 3);
    assert_eq!(p.done(), n as u64);
    for h in &lost {
        assert!(dir.join(block_key(h)).exists(), "lost block is back");
    }
    assert!(verify(&fs, &m2, true).await.expect("verify").is_empty());
    let sink = Arc::new(Mem(Mutex::new(vec![0xee; data.len()])));
    run_restore(
        Arc::new(fs.clone()),
        &m2,
        sink.clone(),
        false,
        4,
        Arc::new(Progress::default()),
    )
    .await
    .expect("restore");
    assert!(
        *sink.0.lock().expect("lock") == data,
        "restored data differs"
    );
    let counts = (
        store.exists.load(Ordering::SeqCst),
        store.lists.load(Ordering::SeqCst),
    );
    let _ = std::fs::remove_dir_all(dir);
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_backup_uploads_blocks_lost_from_the_target_again() {
    // 16 blocks: each inherited block is asked for.
    let (exists, _) = lost_blocks_are_uploaded_again(1 << 20, 16).await;
    assert!(exists >= 15, "{exists} existence checks");
    // 1024 blocks: the block folders are listed (at most 256 listings, besides the lease's and
    // GC's own), never one request per inherited block.
    let (exists, lists) = lost_blocks_are_uploaded_again(64 << 10, 64).await;
    assert!(
        exists < 10,
        "{exists} existence checks for 1023 inherited blocks"
    );
    assert!(lists <= 256 + 4, "{lists} listings");
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
    async fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.inner.list_meta(prefix).await
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

/// Every stored block key.
async fn stored_blocks<S: BackupStore>(store: &S) -> std::collections::BTreeSet<String> {
    store
        .list("blocks")
        .await
        .expect("list blocks")
        .into_iter()
        .collect()
}

fn referenced_keys(ms: &[&Manifest]) -> std::collections::BTreeSet<String> {
    ms.iter()
        .flat_map(|m| m.referenced())
        .map(|h| block_key(&h))
        .collect()
}

/// Three backups sharing blocks (b2 incremental on b1, b3 of another volume state); deleting
/// them in each of the six orders keeps exactly the blocks the remaining ones reference, and
/// the remaining ones restore intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_backups_in_every_order_keeps_exactly_the_referenced_blocks() {
    use zebu_backupstore::gc::delete_backup;
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    for order in orders {
        let dir = tempdir();
        let store = Arc::new(FsStore::open(&dir, true).expect("open"));
        let mut datas = Vec::new();
        let mut d = volume();
        let src = Arc::new(Mem(Mutex::new(d.clone())));
        let m1 = run_backup(
            store.clone(),
            src,
            spec("b1", None),
            Arc::new(Progress::default()),
        )
        .await
        .expect("b1");
        datas.push(d.clone());
        // b2: 2 MiB rewritten.
        d[(1 << 20)..(3 << 20)].fill(0x5a);
        let src = Arc::new(Mem(Mutex::new(d.clone())));
        let m2 = run_backup(
            store.clone(),
            src,
            spec("b2", Some((m1.clone(), vec![(1 << 20, 2 << 20)]))),
            Arc::new(Progress::default()),
        )
        .await
        .expect("b2");
        datas.push(d.clone());
        // b3: another change on top, full scan.
        d[(9 << 20)..(10 << 20)].fill(0x33);
        let src = Arc::new(Mem(Mutex::new(d.clone())));
        let m3 = run_backup(
            store.clone(),
            src,
            spec("b3", None),
            Arc::new(Progress::default()),
        )
        .await
        .expect("b3");
        datas.push(d.clone());
        let ms = [m1, m2, m3];
        let mut alive = [true; 3];
        assert_eq!(
            stored_blocks(&*store).await,
            referenced_keys(&[&ms[0], &ms[1], &ms[2]])
        );
        for &i in &order {
            let r = delete_backup(&*store, "v1", &ms[i].backup)
                .await
                .expect("delete");
            assert!(!r.deferred, "no backup runs, nothing defers");
            alive[i] = false;
            let rest: Vec<&Manifest> = (0..3).filter(|j| alive[*j]).map(|j| &ms[j]).collect();
            assert_eq!(
                stored_blocks(&*store).await,
                referenced_keys(&rest),
                "order {order:?}, after deleting b{}",
                i + 1
            );
            assert!(
                read_manifest(&*store, "v1", &ms[i].backup)
                    .await
                    .expect("read")
                    .is_none()
            );
            for j in (0..3).filter(|j| alive[*j]) {
                assert!(restore(&store, &ms[j]).await.expect("restore") == datas[j]);
            }
        }
        assert!(
            delete_backup(&*store, "v1", "b1").await.is_err(),
            "deleting a deleted backup is an error"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A source that holds its last block until released.
struct Held {
    data: Vec<u8>,
    gate: tokio::sync::Semaphore,
}

impl SnapshotSource for Held {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        if offset + len == self.data.len() as u64 {
            let _p = self.gate.acquire().await.map_err(|e| e.to_string())?;
        }
        Ok(self.data[offset as usize..(offset + len) as usize].to_vec())
    }
}

/// A store whose first listing of backup leases pauses (after it was taken) until released: a
/// GC that saw no lease while a backup starts.
struct PausedGc {
    inner: FsStore,
    paused: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
    once: std::sync::atomic::AtomicBool,
}

impl BackupStore for PausedGc {
    async fn put_if_absent(&self, key: &str, data: Vec<u8>) -> Result<bool, StoreError> {
        self.inner.put_if_absent(key, data).await
    }
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        self.inner.put(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.exists(key).await
    }
    async fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let r = self.inner.list_meta(prefix).await;
        if prefix == "locks/backups" && !self.once.swap(true, Ordering::SeqCst) {
            self.paused.notify_one();
            let _p = self.release.acquire().await;
        }
        r
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A backup that relies on blocks of a backup being deleted loses nothing, whichever of the two
/// sees the other first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_running_during_a_delete_loses_nothing() {
    use zebu_backupstore::gc::{delete_backup, gc_pass};
    let data = volume();
    // (a) The GC sees the backup's lease: it defers; a later pass collects nothing b2 needs.
    {
        let dir = tempdir();
        let store = Arc::new(FsStore::open(&dir, true).expect("open"));
        let src = Arc::new(Mem(Mutex::new(data.clone())));
        run_backup(
            store.clone(),
            src,
            spec("b1", None),
            Arc::new(Progress::default()),
        )
        .await
        .expect("b1");
        let held = Arc::new(Held {
            data: data.clone(),
            gate: tokio::sync::Semaphore::new(0),
        });
        let p2 = Arc::new(Progress::default());
        let b2 = tokio::spawn(run_backup(
            store.clone(),
            held.clone(),
            spec("b2", None),
            p2.clone(),
        ));
        wait_until("b2 to check its blocks", || p2.done() >= 15).await;
        let r = delete_backup(&*store, "v1", "b1").await.expect("delete b1");
        assert!(r.deferred, "a live lease defers collection: {r:?}");
        assert_eq!(r.deleted_blocks, 0);
        held.gate.add_permits(1);
        let m2 = b2.await.expect("join").expect("b2");
        let r = gc_pass(&*store).await.expect("gc");
        assert!(!r.deferred);
        assert_eq!(r.deleted_blocks, 0, "b2 references every block of b1");
        assert!(restore(&store, &m2).await.expect("restore b2") == data);
        assert!(verify(&*store, &m2, true).await.expect("verify").is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
    // (b) The GC listed no lease, then the backup checked the blocks as present, then the GC
    // deleted them: the backup notices the overlapping run and re-uploads before its manifest.
    {
        let dir = tempdir();
        let fs = FsStore::open(&dir, true).expect("open");
        let store = Arc::new(PausedGc {
            inner: fs.clone(),
            paused: tokio::sync::Notify::new(),
            release: tokio::sync::Semaphore::new(0),
            once: std::sync::atomic::AtomicBool::new(false),
        });
        let src = Arc::new(Mem(Mutex::new(data.clone())));
        run_backup(
            store.clone(),
            src,
            spec("b1", None),
            Arc::new(Progress::default()),
        )
        .await
        .expect("b1");
        let st = store.clone();
        let del = tokio::spawn(async move { delete_backup(&*st, "v1", "b1").await });
        store.paused.notified().await;
        let p2 = Arc::new(Progress::default());
        let src = Arc::new(Mem(Mutex::new(data.clone())));
        let b2 = tokio::spawn(run_backup(store.clone(), src, spec("b2", None), p2.clone()));
        wait_until("b2 to check its blocks", || p2.done() >= 16).await;
        assert_eq!(
            p2.uploaded.load(Ordering::Relaxed),
            0,
            "all present before the GC deletes"
        );
        store.release.add_permits(1);
        let r = del.await.expect("join").expect("delete b1");
        assert!(!r.deferred);
        assert_eq!(r.deleted_blocks, 5, "the GC did delete b1's blocks");
        let m2 = b2.await.expect("join").expect("b2");
        assert_eq!(
            p2.uploaded.load(Ordering::Relaxed),
            5,
            "b2 re-uploaded what the GC removed"
        );
        let fs = Arc::new(fs);
        assert!(restore(&fs, &m2).await.expect("restore b2") == data);
        assert!(verify(&*fs, &m2, true).await.expect("verify").is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
