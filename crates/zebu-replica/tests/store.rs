//! Replica store tests: a model-based property test, crash injection at every sync, format
//! errors, and a long snapshot chain.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use zebu_replica::{
    BaseMeta, CreateOptions, ReplicaStore, SimVfs, SnapshotSpec, StdVfs, StoreError, Vfs,
};
use zebu_types::LayerId;

const BLK: usize = 4096;

fn spec(name: &str, id: u64) -> SnapshotSpec {
    SnapshotSpec {
        name: name.to_string(),
        new_head: LayerId(id),
        created: id,
        user_created: true,
        in_sync: true,
    }
}

fn create(vfs: Arc<dyn Vfs>, dir: &Path, size: u64, cs: u32) -> ReplicaStore {
    ReplicaStore::create(
        vfs,
        dir,
        CreateOptions {
            size,
            cluster_size: cs,
            head: LayerId(1),
            base: None,
        },
    )
    .expect("create")
}

fn fill(tag: u64, len: usize) -> Vec<u8> {
    let mut v = vec![(tag % 251) as u8 ^ 0x5a; len];
    for chunk in v.chunks_mut(BLK) {
        chunk[..8].copy_from_slice(&tag.to_le_bytes());
    }
    v
}

#[derive(Debug, Clone)]
enum Op {
    Write { blk: u64, nblk: u64, odd: bool },
    Zero { blk: u64, nblk: u64, odd: bool },
    Flush,
    Snapshot,
    Delete(usize),
    Merge,
    Step,
    Revert(usize),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u64..64, 1u64..20, any::<bool>()).prop_map(|(blk, nblk, odd)| Op::Write { blk, nblk, odd }),
        2 => (0u64..64, 1u64..20, any::<bool>()).prop_map(|(blk, nblk, odd)| Op::Zero { blk, nblk, odd }),
        1 => Just(Op::Flush),
        2 => Just(Op::Snapshot),
        1 => (0usize..8).prop_map(Op::Delete),
        1 => Just(Op::Merge),
        2 => Just(Op::Step),
        1 => (0usize..8).prop_map(Op::Revert),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Every view (head and each snapshot) always equals a plain in-memory model.
    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let size = 64 * BLK as u64 + 4096 * 3; // not a multiple of the cluster size
        let vfs: Arc<dyn Vfs> = Arc::new(SimVfs::new());
        let dir = PathBuf::from("/r");
        let mut st = create(vfs.clone(), &dir, size, 16384);
        let mut model = vec![0u8; size as usize];
        let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
        let mut next_id = 2u64;
        for (k, op) in ops.into_iter().enumerate() {
            match op {
                Op::Write { blk, nblk, odd } => {
                    let off = blk * BLK as u64 + if odd { 512 } else { 0 };
                    let len = ((nblk as usize) * BLK).min((size - off) as usize);
                    let data = fill(k as u64 + 1, len);
                    st.write(off, &data).expect("write");
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                }
                Op::Zero { blk, nblk, odd } => {
                    let off = blk * BLK as u64 + if odd { 1024 } else { 0 };
                    let len = ((nblk as usize) * BLK).min((size - off) as usize);
                    st.zero(off, len as u64).expect("zero");
                    model[off as usize..off as usize + len].fill(0);
                }
                Op::Flush => st.flush().expect("flush"),
                Op::Snapshot => {
                    let name = format!("s{next_id}");
                    st.snapshot(&spec(&name, next_id)).expect("snapshot");
                    next_id += 1;
                    snaps.push((name, model.clone()));
                }
                Op::Delete(i) => {
                    if !snaps.is_empty() {
                        let (name, _) = snaps.remove(i % snaps.len());
                        st.delete_snapshot(&name).expect("delete");
                    }
                }
                Op::Merge => while st.merge_step(3).expect("merge") {},
                Op::Step => {
                    st.merge_step(2).expect("merge step");
                }
                Op::Revert(i) => {
                    if !snaps.is_empty() {
                        let i = i % snaps.len();
                        let name = snaps[i].0.clone();
                        st.revert(&name, LayerId(next_id), 0).expect("revert");
                        next_id += 1;
                        model = snaps[i].1.clone();
                        snaps.truncate(i + 1);
                    }
                }
                Op::Reopen => {
                    st.flush().expect("flush");
                    drop(st);
                    st = ReplicaStore::open(vfs.clone(), &dir).expect("reopen");
                }
            }
            let mut buf = vec![0u8; size as usize];
            st.read(0, &mut buf).expect("read");
            prop_assert!(buf == model, "head differs after op {}", k);
            for (name, want) in &snaps {
                st.read_snapshot(name, 0, &mut buf).expect("read snapshot");
                prop_assert!(&buf == want, "snapshot {} differs after op {}", name, k);
            }
        }
    }
}

/// One step of the crash workload.
fn crash_workload(
    st: &mut ReplicaStore,
    step: usize,
) -> zebu_replica::Result<Option<&'static str>> {
    let size = st.size();
    match step % 11 {
        3 => st.flush().map(|_| Some("flush")),
        6 => st
            .snapshot(&spec(&format!("s{step}"), 100 + step as u64))
            .map(|_| Some("snapshot")),
        9 => {
            let names: Vec<String> = st
                .layers()
                .iter()
                .filter_map(|l| l.meta.name.clone())
                .filter(|n| {
                    !st.layers()
                        .iter()
                        .any(|l| l.meta.deleting && l.meta.name.as_ref() == Some(n))
                })
                .collect();
            if let Some(n) = names.first() {
                st.delete_snapshot(n)?;
            }
            while st.merge_step(2)? {}
            Ok(Some("merge"))
        }
        7 => {
            let blk = (step as u64 * 7) % 30;
            st.zero(blk * BLK as u64, 5 * BLK as u64).map(|_| None)
        }
        _ => {
            let blk = (step as u64 * 13) % 36;
            let n = 1 + step % 6;
            let len = (n * BLK).min((size - blk * BLK as u64) as usize);
            st.write(blk * BLK as u64, &fill(step as u64 + 1, len))
                .map(|_| None)
        }
    }
}

/// Per 4 KiB block: the tags a crash may legitimately leave there (0 = zeros).
type Candidates = Vec<BTreeSet<u64>>;

fn apply_to_candidates(c: &mut Candidates, step: usize, size: u64) {
    match step % 11 {
        3 | 6 | 9 => {}
        7 => {
            let blk = (step as u64 * 7) % 30;
            for b in blk..blk + 5 {
                c[b as usize].insert(0);
            }
        }
        _ => {
            let blk = (step as u64 * 13) % 36;
            let n = 1 + step % 6;
            let nb = (n as u64).min(size / BLK as u64 - blk);
            for b in blk..blk + nb {
                c[b as usize].insert(step as u64 + 1);
            }
        }
    }
}

fn block_tag(b: &[u8]) -> Option<u64> {
    if b.iter().all(|x| *x == 0) {
        return Some(0);
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&b[..8]);
    let tag = u64::from_le_bytes(t);
    (fill(tag, BLK) == b).then_some(tag)
}

/// Crash at every sync of a workload of writes, zeroes, flushes, snapshots and merges: the replica
/// always reopens, and every block holds its last flushed value or a value written after it.
#[test]
fn crash_at_every_sync_reopens_consistent() {
    let size = 40 * BLK as u64;
    let steps = 60;
    // Count the syncs of a clean run.
    let total = {
        let vfs = SimVfs::new();
        let mut st = create(Arc::new(vfs.clone()), Path::new("/r"), size, 8192);
        for s in 0..steps {
            crash_workload(&mut st, s).expect("clean run");
        }
        vfs.syncs()
    };
    assert!(total > 50, "workload too small: {total} syncs");
    let mut checked = 0;
    for n in 1..=total {
        let vfs = SimVfs::new();
        let mut st = create(Arc::new(vfs.clone()), Path::new("/r"), size, 8192);
        let base_syncs = vfs.syncs();
        if n <= base_syncs {
            continue;
        }
        vfs.crash_at_sync(n);
        let blocks = (size as usize) / BLK;
        // `durable`: the content as of the last acknowledged flush; `cands`: what else may be there.
        let mut durable: Vec<u64> = vec![0; blocks];
        let mut cands: Candidates = vec![BTreeSet::new(); blocks];
        let mut cur: Vec<u64> = vec![0; blocks];
        for s in 0..steps {
            apply_to_candidates(&mut cands, s, size);
            // Track the current value for when a flush completes.
            let before = cur.clone();
            match s % 11 {
                3 | 6 | 9 => {}
                7 => {
                    let blk = (s as u64 * 7) % 30;
                    for b in blk..blk + 5 {
                        cur[b as usize] = 0;
                    }
                }
                _ => {
                    let blk = (s as u64 * 13) % 36;
                    let nb = ((1 + s % 6) as u64).min(size / BLK as u64 - blk);
                    for b in blk..blk + nb {
                        cur[b as usize] = s as u64 + 1;
                    }
                }
            }
            let _ = before;
            match crash_workload(&mut st, s) {
                Ok(Some(_)) => {
                    // Flush, snapshot and merge each make everything before them durable.
                    durable = cur.clone();
                    for c in cands.iter_mut() {
                        c.clear();
                    }
                }
                Ok(None) => {}
                Err(_) => break,
            }
        }
        assert!(vfs.has_crashed(), "crash point {n} was not reached");
        drop(st);
        for seed in 0..3 {
            let img = vfs.crash_image(seed * 7919 + n);
            let mut st = ReplicaStore::open(Arc::new(img), Path::new("/r"))
                .unwrap_or_else(|e| panic!("crash at sync {n} (seed {seed}): reopen failed: {e}"));
            let mut first = vec![0u8; size as usize];
            st.read(0, &mut first).expect("read after crash");
            // A partial write into every other cluster must not expose stale bytes beside it:
            // the blocks not written read as they did right after the reopen.
            const NEW: u64 = 999_999;
            for b in (0..blocks).step_by(4) {
                st.write((b * BLK) as u64, &fill(NEW, BLK))
                    .expect("write after crash");
            }
            let mut buf = vec![0u8; size as usize];
            st.read(0, &mut buf).expect("read after crash");
            for (b, chunk) in buf.chunks(BLK).enumerate() {
                let tag = block_tag(chunk);
                let ok = if b % 4 == 0 {
                    tag == Some(NEW)
                } else if chunk != &first[b * BLK..(b + 1) * BLK] {
                    false
                } else {
                    tag.is_some_and(|t| t == durable[b] || cands[b].contains(&t))
                };
                assert!(
                    ok,
                    "crash at sync {n} (seed {seed}): block {b} holds {tag:?}, want {} or one of {:?}",
                    durable[b], cands[b]
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} crash images checked");
    println!("crash test: {total} sync points, {checked} crash images checked");
}

#[test]
fn unknown_version_and_corruption_are_clear_errors() {
    let tmp = tempdir();
    let dir = tmp.join("r");
    let mut st = create(Arc::new(StdVfs), &dir, 1 << 20, 65536);
    st.write(0, &[7u8; 4096]).expect("write");
    st.flush().expect("flush");
    drop(st);
    let chain = std::fs::read(dir.join("chain")).expect("read chain");
    // Unknown version.
    let bumped = String::from_utf8_lossy(&chain).replacen("ZEBUCHAIN 1 ", "ZEBUCHAIN 9 ", 1);
    std::fs::write(dir.join("chain"), bumped.as_bytes()).expect("write");
    match ReplicaStore::open(Arc::new(StdVfs), &dir) {
        Err(StoreError::UnsupportedVersion {
            found: 9,
            supported: 1,
            ..
        }) => {}
        other => panic!("want UnsupportedVersion, got {:?}", other.err()),
    }
    // A flipped byte in the body.
    let mut bad = chain.clone();
    let last = bad.len() - 2;
    bad[last] ^= 0x20;
    std::fs::write(dir.join("chain"), &bad).expect("write");
    match ReplicaStore::open(Arc::new(StdVfs), &dir) {
        Err(StoreError::Corrupt { why, .. }) => assert!(why.contains("checksum"), "{why}"),
        other => panic!("want Corrupt, got {:?}", other.err()),
    }
    // Restore the chain; corrupt the layer map's header.
    std::fs::write(dir.join("chain"), &chain).expect("write");
    let map = dir.join(format!("layer-{}.map", LayerId(1)));
    let mut m = std::fs::read(&map).expect("read map");
    m[0] = b'X';
    std::fs::write(&map, &m).expect("write");
    let err = ReplicaStore::open(Arc::new(StdVfs), &dir)
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("bad magic"), "{err}");
    // Garbage files never panic the opener.
    std::fs::write(dir.join("chain"), b"\xff\xfe garbage").expect("write");
    assert!(ReplicaStore::open(Arc::new(StdVfs), &dir).is_err());
    let _ = std::fs::remove_dir_all(&tmp);
}

fn tempdir() -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "zebu-replica-test-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&p).expect("mkdir");
    p
}

/// A chain of 1,000 snapshots opens and reads correctly; reports the index memory.
#[test]
fn thousand_snapshot_chain() {
    let tmp = tempdir();
    let dir = tmp.join("r");
    let size: u64 = 64 << 20;
    let mut st = create(Arc::new(StdVfs), &dir, size, 65536);
    let mut expect: HashMap<u64, u64> = HashMap::new();
    for i in 0..1000u64 {
        let off = (i * 37 % 1024) * 65536;
        st.write(off, &fill(i + 1, BLK)).expect("write");
        expect.insert(off, i + 1);
        st.snapshot(&spec(&format!("snap-{i}"), 1000 + i))
            .expect("snapshot");
    }
    drop(st);
    let t = std::time::Instant::now();
    let st = ReplicaStore::open(Arc::new(StdVfs), &dir).expect("reopen");
    let open_ms = t.elapsed().as_millis();
    assert_eq!(st.layers().len(), 1001);
    let mut buf = vec![0u8; size as usize];
    st.read(0, &mut buf).expect("read");
    for c in 0..1024u64 {
        let off = c * 65536;
        let want = expect.get(&off).copied().unwrap_or(0);
        assert_eq!(
            block_tag(&buf[off as usize..off as usize + BLK]),
            Some(want),
            "cluster {c}"
        );
    }
    // A middle snapshot sees only what was written before it.
    let mut b = vec![0u8; BLK];
    st.read_snapshot("snap-500", 500 * 37 % 1024 * 65536, &mut b)
        .expect("read snap");
    assert_eq!(block_tag(&b), Some(501));
    let mem = st.index_memory();
    println!("1000-layer chain of a 64 MiB volume: open {open_ms} ms, index memory {mem} bytes");
    // Index memory per TiB for a 10-layer chain, fully allocated: one bit per 64 KiB cluster.
    let per_tib_10 = 10 * (1u64 << 40) / 65536 / 8;
    assert!(per_tib_10 <= 32 << 20);
    drop(st);
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A file system that stores no data (reads are zeros, writes vanish) but keeps names and sizes:
/// enough to drive the store's index over a 1 TiB volume without a 1 TiB file.
#[derive(Default)]
struct NullVfs {
    files: std::sync::Mutex<HashMap<PathBuf, Arc<NullFile>>>,
}

#[derive(Default)]
struct NullFile {
    len: std::sync::atomic::AtomicU64,
    // Small files (journals, the chain) are kept so the store can read them back.
    small: std::sync::Mutex<Vec<u8>>,
}

impl zebu_replica::VFile for NullFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        buf.fill(0);
        let s = self.small.lock().expect("lock");
        if (off as usize) < s.len() {
            let n = (s.len() - off as usize).min(buf.len());
            buf[..n].copy_from_slice(&s[off as usize..off as usize + n]);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        let end = off + buf.len() as u64;
        self.len.fetch_max(end, std::sync::atomic::Ordering::SeqCst);
        if end <= 64 << 20 {
            let mut s = self.small.lock().expect("lock");
            if s.len() < end as usize {
                s.resize(end as usize, 0);
            }
            s[off as usize..end as usize].copy_from_slice(buf);
        }
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.len.load(std::sync::atomic::Ordering::SeqCst))
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.len.store(len, std::sync::atomic::Ordering::SeqCst);
        self.small.lock().expect("lock").truncate(len as usize);
        Ok(())
    }
    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn punch(&self, _off: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
}

impl Vfs for NullVfs {
    fn open(&self, path: &Path, create: bool) -> std::io::Result<Arc<dyn zebu_replica::VFile>> {
        let mut f = self.files.lock().expect("lock");
        match f.get(path) {
            Some(x) => Ok(x.clone()),
            None if create => {
                let x = Arc::new(NullFile::default());
                f.insert(path.to_path_buf(), x.clone());
                Ok(x)
            }
            None => Err(std::io::ErrorKind::NotFound.into()),
        }
    }
    fn exists(&self, path: &Path) -> bool {
        self.files.lock().expect("lock").contains_key(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        let mut f = self.files.lock().expect("lock");
        let x = f.remove(from).ok_or(std::io::ErrorKind::NotFound)?;
        f.insert(to.to_path_buf(), x);
        Ok(())
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        self.files.lock().expect("lock").remove(path);
        Ok(())
    }
    fn sync_dir(&self, _dir: &Path) -> std::io::Result<()> {
        Ok(())
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        Ok(self
            .files
            .lock()
            .expect("lock")
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect())
    }
    fn create_dir_all(&self, _dir: &Path) -> std::io::Result<()> {
        Ok(())
    }
}

/// Index memory of a 10-layer chain over a 1 TiB volume stays ≤ 32 MiB. Every layer gets one
/// write in every 256 MiB span, which instantiates every bitmap chunk: the same memory as a fully
/// allocated layer.
#[test]
fn index_memory_per_tib_ten_layers() {
    let tib = 1u64 << 40;
    let vfs: Arc<dyn Vfs> = Arc::new(NullVfs::default());
    let mut st = create(vfs.clone(), Path::new("/m"), tib, 65536);
    let clusters = tib / 65536;
    for i in 0..10u64 {
        for c in (0..clusters).step_by(4096) {
            st.write(c * 65536 + i * 65536, &[1u8; 4096])
                .expect("write");
        }
        st.snapshot(&spec(&format!("m{i}"), 10 + i))
            .expect("snapshot");
    }
    let mem = st.index_memory();
    println!("10-layer chain over 1 TiB, every bitmap chunk present: {mem} bytes of index");
    assert!(
        mem <= 32 << 20,
        "index memory {mem} bytes exceeds 32 MiB per TiB"
    );
    // The same index comes back on reopen.
    drop(st);
    let st = ReplicaStore::open(vfs, Path::new("/m")).expect("reopen");
    assert_eq!(st.index_memory(), mem);
}

/// Deleting the snapshot right below a small head folds the head down into it: the cost is the
/// head's data, writes during the fold are kept, and the snapshot's layer becomes the head.
#[test]
fn delete_below_head_folds_the_head_down() {
    let vfs: Arc<dyn Vfs> = Arc::new(SimVfs::new());
    let dir = PathBuf::from("/f");
    let mut st = create(vfs.clone(), &dir, 4 << 20, 65536);
    st.write(0, &fill(1, 4 << 20)).expect("write");
    st.snapshot(&spec("big", 2)).expect("snapshot");
    st.write(65536, &fill(2, 3 * BLK)).expect("write");
    st.write(3 << 20, &fill(3, BLK)).expect("write");
    st.delete_snapshot("big").expect("delete");
    assert!(st.merge_step(1).expect("step"), "more to do");
    // A write to a cluster already copied down, during the fold.
    st.write(65536 + 512, &fill(4, 512)).expect("write");
    while st.merge_step(1).expect("step") {}
    let layers = st.layers();
    assert_eq!(layers.len(), 1, "{layers:?}");
    assert_eq!(
        layers[0].meta.id,
        LayerId(1),
        "the snapshot's layer became the head"
    );
    let mut want = fill(1, 4 << 20);
    want[65536..65536 + 3 * BLK].copy_from_slice(&fill(2, 3 * BLK));
    want[(3 << 20)..(3 << 20) + BLK].copy_from_slice(&fill(3, BLK));
    want[65536 + 512..65536 + 1024].copy_from_slice(&fill(4, 512));
    let mut got = vec![0u8; 4 << 20];
    st.read(0, &mut got).expect("read");
    assert!(got == want);
    st.flush().expect("flush");
    drop(st);
    let st = ReplicaStore::open(vfs, &dir).expect("reopen");
    st.read(0, &mut got).expect("read");
    assert!(got == want, "after reopen");
}

/// A backing image under the layers: read where no layer holds a cluster, zeros past its end,
/// copied up by partial writes, hidden by zeroing, kept by snapshots and a reopen; a base file of
/// the wrong length is a clear error.
#[test]
fn a_backing_image_reads_through_until_written() {
    let tmp = tempdir();
    let cs: u32 = 64 << 10;
    let base_len: usize = (1 << 20) + 1000;
    let image: Vec<u8> = (0..base_len).map(|i| (i * 7 % 251) as u8 + 1).collect();
    let base_path = tmp.join("image.raw");
    std::fs::write(&base_path, &image).expect("image");
    let base = BaseMeta {
        name: "img".into(),
        checksum: "00".into(),
        size: base_len as u64,
        path: base_path.clone(),
    };
    let size: u64 = 4 << 20;
    let dir = tmp.join("r");
    let vfs: Arc<dyn Vfs> = Arc::new(StdVfs);
    let too_small = ReplicaStore::create(
        vfs.clone(),
        &tmp.join("small"),
        CreateOptions {
            size: 1 << 20,
            cluster_size: cs,
            head: LayerId(1),
            base: Some(base.clone()),
        },
    );
    assert!(
        matches!(&too_small, Err(StoreError::Invalid(m)) if m.contains("backing image")),
        "a volume smaller than its image is refused"
    );
    let mut s = ReplicaStore::create(
        vfs.clone(),
        &dir,
        CreateOptions {
            size,
            cluster_size: cs,
            head: LayerId(1),
            base: Some(base.clone()),
        },
    )
    .expect("create");
    let mut expect = image.clone();
    expect.resize(size as usize, 0);
    let whole = |s: &ReplicaStore| {
        let mut b = vec![0u8; size as usize];
        s.read(0, &mut b).expect("read");
        b
    };
    assert!(whole(&s) == expect, "the image, then zeros");
    // A partial write inside a base cluster keeps the base's bytes around it.
    s.write(100, &[9u8; 10]).expect("write");
    expect[100..110].fill(9);
    // A write past the base's end inside its last cluster.
    s.write(base_len as u64 + 4, &[8u8; 4]).expect("write");
    expect[base_len + 4..base_len + 8].fill(8);
    // Zeroing a whole cluster of the base hides it.
    s.zero(2 * cs as u64, cs as u64).expect("zero");
    expect[2 * cs as usize..3 * cs as usize].fill(0);
    assert!(whole(&s) == expect);
    s.snapshot(&spec("s1", 2)).expect("snapshot");
    s.write(3 * cs as u64, &[7u8; 4096]).expect("write");
    let mut snap = vec![0u8; size as usize];
    s.read_snapshot("s1", 0, &mut snap).expect("read snapshot");
    assert!(
        snap == expect,
        "the snapshot sees the base and its own writes"
    );
    expect[3 * cs as usize..3 * cs as usize + 4096].fill(7);
    assert!(whole(&s) == expect);
    // Block status: the base's clusters count as data.
    let alloc = s.allocation(0, size).expect("allocation");
    assert_eq!(alloc[0], (17 * cs as u64, true), "{alloc:?}");
    s.flush().expect("flush");
    drop(s);
    let s = ReplicaStore::open(vfs.clone(), &dir).expect("reopen");
    assert_eq!(s.base().map(|b| b.name.as_str()), Some("img"));
    assert!(whole(&s) == expect, "the same after a reopen");
    drop(s);
    std::fs::write(&base_path, &image[..1000]).expect("truncate");
    let e = ReplicaStore::open(vfs, &dir).err().expect("refused");
    assert!(
        matches!(&e, StoreError::Corrupt { why, .. } if why.contains("backing image")),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(tmp);
}
