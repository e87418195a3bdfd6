//! Engine tests over real TCP connections to in-process replica servers: replication, snapshots
//! (read-back through revert, delete of a middle snapshot), rebuild with checksum skipping, stale
//! generations, and malformed frames.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use zebu_engine::proto::{ErrorCode, Request, Response};
use zebu_engine::{
    ClientError, Engine, EngineConfig, LogHook, Mode, ReplicaClient, ReplicaService,
};
use zebu_types::Generation;

const SIZE: u64 = 32 << 20;

fn tempdir() -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "zebu-engine-test-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&p).expect("mkdir");
    p
}

struct Cluster {
    dir: PathBuf,
    replicas: Vec<(String, String)>,
    services: Vec<Arc<ReplicaService>>,
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start_replica(
    dir: &std::path::Path,
    i: usize,
) -> (
    Arc<ReplicaService>,
    String,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let rdir = dir.join(format!("r{i}"));
    let svc = ReplicaService::open_or_create(&rdir, "vol", SIZE, 65536, None).expect("replica");
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let t = tokio::spawn(svc.clone().serve(l));
    (svc, addr, t)
}

async fn cluster(n: usize) -> Cluster {
    let dir = tempdir();
    let mut c = Cluster {
        dir: dir.clone(),
        replicas: vec![],
        services: vec![],
        tasks: vec![],
    };
    for i in 0..n {
        let (svc, addr, t) = start_replica(&dir, i).await;
        c.replicas.push((format!("r{i}"), addr));
        c.services.push(svc);
        c.tasks.push(t);
    }
    c
}

fn cfg(generation: u64) -> EngineConfig {
    EngineConfig {
        volume: "vol".into(),
        generation: Generation(generation),
        size: SIZE,
        io_timeout: Duration::from_secs(5),
    }
}

fn pattern(tag: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| tag ^ (i as u8).wrapping_mul(31))
            .collect::<Vec<u8>>(),
    )
}

async fn whole(engine: &Engine) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIZE as usize);
    let mut off = 0;
    while off < SIZE {
        out.extend_from_slice(&engine.read(off, 4 << 20).await.expect("read"));
        off += 4 << 20;
    }
    out
}

/// Reads the whole volume from one replica directly.
async fn replica_image(addr: &str, generation: u64) -> Vec<u8> {
    let c = ReplicaClient::connect(addr, "vol", Generation(generation), Duration::from_secs(5))
        .await
        .expect("connect");
    let mut out = Vec::new();
    let mut off = 0;
    while off < SIZE {
        match c
            .call(&Request::Read {
                offset: off,
                len: 4 << 20,
            })
            .await
            .expect("read")
        {
            Response::Data(d) => out.extend_from_slice(&d),
            other => panic!("unexpected {other:?}"),
        }
        off += 4 << 20;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_revert_and_delete() {
    let c = cluster(3).await;
    let engine = Engine::start(cfg(1), &c.replicas, Arc::new(LogHook::default()))
        .await
        .expect("start");
    engine
        .write(0, pattern(1, 1 << 20), false)
        .await
        .expect("write");
    engine
        .write(5 << 20, pattern(2, 100_000), false)
        .await
        .expect("write");
    let s1 = whole(&engine).await;
    engine
        .snapshot(Some("s1".into()), true)
        .await
        .expect("snap");
    engine
        .write(512 << 10, pattern(3, 1 << 20), false)
        .await
        .expect("write");
    engine.zero(5 << 20, 65536, false).await.expect("zero");
    let s2 = whole(&engine).await;
    engine
        .snapshot(Some("s2".into()), true)
        .await
        .expect("snap");
    engine
        .write(7 << 20, pattern(4, 300_000), true)
        .await
        .expect("write");
    let s3 = whole(&engine).await;
    engine
        .snapshot(Some("s3".into()), true)
        .await
        .expect("snap");
    engine
        .write(100, pattern(5, 5000), false)
        .await
        .expect("write");
    let head = whole(&engine).await;
    // Delete the middle snapshot; wait until every replica merged it.
    engine.delete_snapshot("s2").await.expect("delete");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let merged = c.services.iter().all(|s| !s.read_store().merge_pending());
        if merged {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "merge did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for svc in &c.services {
        let names: Vec<_> = svc
            .read_store()
            .layers()
            .iter()
            .filter_map(|l| l.meta.name.clone())
            .collect();
        assert_eq!(names, vec!["s1".to_string(), "s3".to_string()]);
    }
    assert!(
        whole(&engine).await == head,
        "head view changed after deleting s2"
    );
    // Each snapshot's data, through revert.
    engine.revert("s3").await.expect("revert s3");
    assert!(
        whole(&engine).await == s3,
        "s3 view differs after deleting s2"
    );
    engine.revert("s1").await.expect("revert s1");
    assert!(whole(&engine).await == s1, "s1 view differs");
    let _ = s2;
    // All replicas agree.
    engine.flush().await.expect("flush");
    let a = replica_image(&c.replicas[0].1, 1).await;
    for (_, addr) in &c.replicas[1..] {
        assert!(replica_image(addr, 1).await == a);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_copies_only_what_differs() {
    let mut c = cluster(3).await;
    let hook = Arc::new(LogHook::default());
    let engine = Engine::start(cfg(1), &c.replicas, hook.clone())
        .await
        .expect("start");
    for i in 0..16u64 {
        engine
            .write(i << 20, pattern(i as u8, 1 << 20), false)
            .await
            .expect("write");
    }
    engine
        .snapshot(Some("base".into()), true)
        .await
        .expect("snap");
    // Replica r2 goes away (its server stops and its connections drop).
    c.services[2].shutdown();
    drop(c.services.pop());
    // Force the engine to notice: the replica's connection is still open until its tasks end, so
    // replace the process-like boundary by killing the listener and waiting for a failed write.
    let (svc2, addr2, t2) = {
        // Writes continue while r2 is "down": the engine drops it when its connection fails.
        let mut fails = 0;
        for i in 0..4u64 {
            if engine
                .write((20 + i) << 20, pattern(40 + i as u8, 1 << 20), false)
                .await
                .is_err()
            {
                fails += 1;
            }
        }
        assert_eq!(fails, 0, "writes must keep succeeding");
        start_replica(&c.dir, 2).await
    };
    let _ = svc2;
    c.tasks.push(t2);
    assert!(
        engine
            .replicas()
            .iter()
            .any(|r| r.name == "r2" && r.mode == Mode::ERR)
    );
    let events = hook.events.lock().map(|e| e.clone()).unwrap_or_default();
    assert!(
        events.iter().any(|e| e.starts_with("failed r2")),
        "{events:?}"
    );
    // The returning replica is rebuilt by comparing checksums.
    let stats = engine.add_replica("r2", &addr2).await.expect("rebuild");
    println!("rebuild: {stats:?}");
    assert!(
        stats.skipped >= 16 << 20,
        "the unchanged base must be skipped: {stats:?}"
    );
    assert!(
        stats.copied <= 8 << 20,
        "only changed data may be copied: {stats:?}"
    );
    let modes: Vec<Mode> = engine.replicas().iter().map(|r| r.mode).collect();
    assert!(
        modes.iter().filter(|m| **m == Mode::RW).count() >= 3,
        "{modes:?}"
    );
    engine.flush().await.expect("flush");
    let a = replica_image(&c.replicas[0].1, 1).await;
    assert!(
        replica_image(&addr2, 1).await == a,
        "rebuilt replica differs"
    );
    // The rebuild's own snapshot is folded away on every replica.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let layers = engine.layers().await.expect("layers");
        let names: Vec<_> = layers.iter().filter_map(|l| l.meta.name.clone()).collect();
        let merged = c.services.iter().all(|s| !s.read_store().merge_pending());
        if merged && names == vec!["base".to_string()] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rebuild snapshot left behind: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        replica_image(&addr2, 1).await == a,
        "rebuilt replica differs after the fold"
    );
    assert!(
        replica_image(&c.replicas[0].1, 1).await == a,
        "source changed after the fold"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_generation_is_refused_and_fenced() {
    let c = cluster(1).await;
    let old = Engine::start(cfg(3), &c.replicas, Arc::new(LogHook::default()))
        .await
        .expect("start");
    old.write(0, pattern(1, 4096), false).await.expect("write");
    let new = Engine::start(cfg(4), &c.replicas, Arc::new(LogHook::default()))
        .await
        .expect("start new");
    new.write(0, pattern(2, 4096), false)
        .await
        .expect("write new");
    // The old session is fenced on its next I/O.
    let e = old
        .write(0, pattern(3, 4096), false)
        .await
        .expect_err("old engine must be fenced");
    assert!(e.to_string().contains("newer engine"), "{e}");
    // A session older than the newest is refused at connect.
    match ReplicaClient::connect(
        &c.replicas[0].1,
        "vol",
        Generation(2),
        Duration::from_secs(5),
    )
    .await
    {
        Err(ClientError::Remote {
            code: ErrorCode::StaleGeneration,
            ..
        }) => {}
        Err(other) => panic!("want a stale-generation refusal, got {other}"),
        Ok(_) => panic!("want a stale-generation refusal, got a session"),
    }
    // The wrong volume is refused.
    assert!(
        ReplicaClient::connect(
            &c.replicas[0].1,
            "other",
            Generation(9),
            Duration::from_secs(5)
        )
        .await
        .is_err()
    );
    assert_eq!(
        &new.read(0, 4096).await.expect("read")[..],
        &pattern(2, 4096)[..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_the_connection() {
    let c = cluster(1).await;
    let addr = c.replicas[0].1.clone();
    for junk in [
        vec![0u8; 13],                                           // length below the header
        vec![0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0, 0, 0, 0, 0, 1], // absurd length
        vec![0, 0, 0, 9, 99, 0, 0, 0, 0, 0, 0, 0, 1],            // unknown kind
        vec![0, 0, 0, 12, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3],   // truncated hello
    ] {
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        s.write_all(&junk).await.expect("send");
        let mut b = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("must close");
        assert!(
            matches!(n, Ok(0) | Err(_)),
            "connection should close, got {n:?}"
        );
    }
    // The server still serves.
    let engine = Engine::start(cfg(1), &c.replicas, Arc::new(LogHook::default()))
        .await
        .expect("start");
    engine
        .write(0, pattern(9, 4096), true)
        .await
        .expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_replica_left_fails_io() {
    let mut c = cluster(1).await;
    let hook = Arc::new(LogHook::default());
    let engine = Engine::start(
        EngineConfig {
            io_timeout: Duration::from_secs(2),
            ..cfg(1)
        },
        &c.replicas,
        hook.clone(),
    )
    .await
    .expect("start");
    engine
        .write(0, pattern(1, 4096), false)
        .await
        .expect("write");
    for s in c.services.drain(..) {
        s.shutdown();
    }
    // Give aborted connection tasks a moment to drop their sockets, bounded by a deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match engine.write(0, pattern(2, 4096), false).await {
            Err(e) => {
                assert!(
                    e.to_string().contains("no healthy replica")
                        || e.to_string().contains("replica"),
                    "{e}"
                );
                break;
            }
            Ok(()) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "I/O kept succeeding with no replica"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(engine.read(0, 4096).await.is_err());
    let events = hook.events.lock().map(|e| e.clone()).unwrap_or_default();
    assert!(
        events.iter().any(|e| e.starts_with("failed r0")),
        "{events:?}"
    );
}

/// An engine's snapshot as a backup source.
struct SnapSource {
    engine: Arc<Engine>,
    name: String,
}

impl zebu_backupstore::backup::SnapshotSource for SnapSource {
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

/// An engine as a restore destination (writes reach every replica).
struct EngineSink(Arc<Engine>);

impl zebu_backupstore::backup::RestoreSink for EngineSink {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_a_snapshot_and_restore_it_into_another_volume() {
    use std::sync::atomic::Ordering;
    use zebu_backupstore::backup::{BackupSpec, Progress, run_backup, run_restore};
    let src = cluster(3).await;
    let engine = Engine::start(cfg(1), &src.replicas, Arc::new(LogHook::default()))
        .await
        .expect("start");
    for i in 0..6u64 {
        engine
            .write(i * (3 << 20), pattern(i as u8 + 1, 1 << 20), false)
            .await
            .expect("write");
    }
    engine
        .snapshot(Some("s1".into()), true)
        .await
        .expect("snapshot");
    let s1 = whole(&engine).await;
    // Later writes must not leak into the backup of s1.
    for i in 0..4u64 {
        engine
            .write(i << 20, pattern(99 + i as u8, 1 << 20), false)
            .await
            .expect("write");
    }
    engine
        .snapshot(Some("s2".into()), true)
        .await
        .expect("snapshot");
    let dir = tempdir();
    let store =
        Arc::new(zebu_backupstore::FsStore::open(&dir.join("target"), true).expect("target"));
    let spec = |backup: &str, snapshot: &str, parent| BackupSpec {
        volume: "vol".into(),
        backup: backup.into(),
        snapshot: snapshot.into(),
        block_size: 1 << 20,
        codec: zebu_backupstore::Codec::Zstd,
        parent,
        concurrency: 4,
        created: 0,
        labels: Default::default(),
        bandwidth: None,
    };
    let p1 = Arc::new(Progress::default());
    let source = Arc::new(SnapSource {
        engine: engine.clone(),
        name: "s1".into(),
    });
    let m1 = run_backup(store.clone(), source, spec("b1", "s1", None), p1.clone())
        .await
        .expect("backup s1");
    assert_eq!(p1.uploaded.load(Ordering::Relaxed), 6);
    assert_eq!(p1.zero.load(Ordering::Relaxed), 32 - 6);
    // Incremental: only what changed between s1 and s2 is read and uploaded.
    let cs = 65536u64;
    let changed: Vec<(u64, u64)> = engine
        .diff("s1", Some("s2"))
        .await
        .expect("diff")
        .iter()
        .map(|r| (r.start * cs, r.len * cs))
        .collect();
    let p2 = Arc::new(Progress::default());
    let source = Arc::new(SnapSource {
        engine: engine.clone(),
        name: "s2".into(),
    });
    run_backup(
        store.clone(),
        source,
        spec("b2", "s2", Some((m1.clone(), changed))),
        p2.clone(),
    )
    .await
    .expect("backup s2");
    assert_eq!(
        p2.uploaded.load(Ordering::Relaxed),
        4,
        "the 4 MiB written after s1"
    );
    // Restore b1 into a new volume with two replicas.
    let dst = cluster(2).await;
    let target = Engine::start(cfg(1), &dst.replicas, Arc::new(LogHook::default()))
        .await
        .expect("start target");
    run_restore(
        store.clone(),
        &m1,
        Arc::new(EngineSink(target.clone())),
        true,
        4,
        Arc::new(Progress::default()),
    )
    .await
    .expect("restore");
    assert!(
        whole(&target).await == s1,
        "the restored volume differs from snapshot s1"
    );
    target.flush().await.expect("flush");
    let a = replica_image(&dst.replicas[0].1, 1).await;
    assert!(
        replica_image(&dst.replicas[1].1, 1).await == a,
        "restored replicas differ"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A session's write and its generation check happen under one lock: once a newer session is
/// accepted (Hello takes the same lock), no write of the older one lands, however the two race.
#[test]
fn a_stale_sessions_write_never_lands_after_a_newer_session_is_accepted() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempdir();
    let svc =
        ReplicaService::open_or_create(&dir.join("r"), "vol", SIZE, 65536, None).expect("replica");
    let block = |b: u8| Bytes::from(vec![b; 4096]);
    let mut landed_late = 0;
    for round in 0..400u64 {
        let (old, new) = (Generation(2 * round + 1), Generation(2 * round + 2));
        svc.write_store()
            .accept_generation(old)
            .expect("accept old");
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (svc.clone(), stop.clone());
        let writer = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let r = s.execute(
                    old,
                    Request::Write {
                        offset: 0,
                        fua: false,
                        data: block(0xaa),
                    },
                );
                if !matches!(r, Response::Ok) {
                    break;
                }
            }
        });
        std::thread::sleep(Duration::from_micros(50 + round % 200));
        svc.write_store()
            .accept_generation(new)
            .expect("accept new");
        let r = svc.execute(
            new,
            Request::Write {
                offset: 0,
                fua: false,
                data: block(0xbb),
            },
        );
        assert!(matches!(r, Response::Ok), "{r:?}");
        // Let the stale writer try again before it stops.
        std::thread::sleep(Duration::from_micros(200));
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
        let mut buf = vec![0u8; 4096];
        svc.read_store().read(0, &mut buf).expect("read");
        if buf[0] != 0xbb {
            landed_late += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        landed_late, 0,
        "a stale session's write landed after the newer session's"
    );
}
