//! End-to-end tests of the data path with real processes and real clients: qemu-io, nbdinfo,
//! nbdcopy, nbdfuse + a loop device + ext4, SIGKILL of replicas and engines.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use zebu_nbd::client::NbdClient;

#[test]
fn server_three_replicas_with_real_clients() {
    let tmp = TempDir::new("clients");
    let data = tmp.path().join("data");
    let srv = Server::start(&data);
    let uri = srv.volume("v1", "512MiB", 3);
    assert!(
        uri.starts_with("nbd://127.0.0.1:") && uri.ends_with("/v1"),
        "{uri}"
    );
    let out = must("nbdinfo", &["--json", &uri]);
    assert!(out.contains("\"export-size\": 536870912"), "{out}");
    let out = must(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xa5 0 4M",
            "-c",
            "write -P 0x3c 1000000 77777",
            "-c",
            "read -P 0xa5 0 1000000",
            "-c",
            "read -P 0x3c 1000000 77777",
            "-c",
            "write -z 8M 2M",
            "-c",
            "read -P 0 8M 2M",
            "-c",
            "write -P 0x11 -f 16M 64k",
            "-c",
            "discard 16M 64k",
            "-c",
            "read -P 0 16M 64k",
            "-c",
            "flush",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    // 256 MiB of random data in and back out.
    let src = tmp.path().join("random.img");
    let dst = tmp.path().join("back.img");
    must(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", src.display()),
            "bs=1M",
            "count=256",
            "status=none",
        ],
    );
    must("nbdcopy", &[src.to_str().expect("utf8"), &uri]);
    must(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            dst.to_str().expect("utf8"),
        ],
    );
    let back = std::fs::read(&dst).expect("read back");
    let want = file_hash(&src);
    assert_eq!(
        blake3::hash(&back[..256 << 20]).to_hex().to_string(),
        want,
        "data read back differs"
    );
    // nbdcopy out as well, to a second file.
    let dst2 = tmp.path().join("back2.img");
    must("nbdcopy", &[&uri, dst2.to_str().expect("utf8")]);
    let back2 = std::fs::read(&dst2).expect("read back");
    assert_eq!(blake3::hash(&back2[..256 << 20]).to_hex().to_string(), want);
    // base:allocation: the unwritten tail is reported as a hole.
    let map = must("nbdinfo", &["--map", &uri]);
    assert!(map.contains("hole"), "{map}");
}

#[test]
fn ext4_through_nbdfuse_and_a_loop_device() {
    let tmp = TempDir::new("ext4");
    let data = tmp.path().join("data");
    let srv = Server::start(&data);
    let uri = srv.volume("fs1", "256MiB", 3);
    let g = FsGuard::attach(tmp.path(), &uri, 256 << 20);
    let (mnt, loopdev) = (g.mnt.clone(), g.loop_dev().to_string());
    must("mkfs.ext4", &["-q", &loopdev]);
    must("mount", &[&loopdev, mnt.to_str().expect("utf8")]);
    let mut want = HashMap::new();
    for i in 0..20u64 {
        let len = 1000 + (i as usize * 211_717) % (3 << 20);
        let content = block_data(i, 77, len);
        let p = mnt.join(format!("file-{i}"));
        std::fs::write(&p, &content).expect("write file");
        want.insert(
            format!("file-{i}"),
            blake3::hash(&content).to_hex().to_string(),
        );
    }
    must("umount", &[mnt.to_str().expect("utf8")]);
    let out = must("fsck.ext4", &["-f", "-n", &loopdev]);
    assert!(
        !out.contains("UNEXPECTED") && !out.contains("Fix?"),
        "{out}"
    );
    must("mount", &[&loopdev, mnt.to_str().expect("utf8")]);
    for (name, h) in &want {
        assert_eq!(
            &file_hash(&mnt.join(name)),
            h,
            "{name} differs after remount"
        );
    }
    drop(g);
}

fn replica_args(dir: &std::path::Path, i: usize, listen: &str, size: &str) -> Vec<String> {
    vec![
        "replica-server".into(),
        "--dir".into(),
        dir.join(format!("r{i}")).to_string_lossy().into_owned(),
        "--volume".into(),
        "kv".into(),
        "--size".into(),
        size.into(),
        "--listen".into(),
        listen.into(),
    ]
}

fn start_replica(dir: &std::path::Path, i: usize, listen: &str, size: &str) -> Proc {
    let a = replica_args(dir, i, listen, size);
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    Proc::start(&format!("replica-{i}"), &refs)
}

fn start_engine(replicas: &[Proc], generation: u64, size: &str, state: &std::path::Path) -> Proc {
    let mut a: Vec<String> = vec![
        "engine".into(),
        "--volume".into(),
        "kv".into(),
        "--size".into(),
        size.into(),
        "--nbd-listen".into(),
        "127.0.0.1:0".into(),
        "--generation".into(),
        generation.to_string(),
        "--state-file".into(),
        state.to_string_lossy().into_owned(),
    ];
    for r in replicas {
        a.push("--replica".into());
        a.push(format!("{}={}", r.name, r.addr));
    }
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    Proc::start("engine", &refs)
}

fn failed_set(state: &std::path::Path) -> Option<Vec<String>> {
    let b = std::fs::read(state).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
    Some(
        v.get("failed")?
            .as_array()?
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
    )
}

const BLK: usize = 64 * 1024;

/// Waits (async) until `acked` holds at least `n` entries.
async fn until_acked(acked: &Mutex<HashMap<u64, u64>>, n: usize, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while acked.lock().map(|a| a.len()).unwrap_or(0) < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn replica_sigkill_under_writes_then_rebuild() {
    let tmp = TempDir::new("kill");
    let size: u64 = 64 << 20;
    let mut reps: Vec<Proc> = (0..3)
        .map(|i| start_replica(tmp.path(), i, "127.0.0.1:0", "64MiB"))
        .collect();
    let state = tmp.path().join("members.json");
    let eng = start_engine(&reps, 1, "64MiB", &state);
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let blocks = size / BLK as u64;
    // Block -> the last tag acknowledged for it (writers own disjoint blocks).
    let acked: Arc<Mutex<HashMap<u64, u64>>> = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    rt.block_on(async {
        let tags = Arc::new(AtomicU64::new(1));
        let mut writers = Vec::new();
        for w in 0..4u64 {
            let (acked, stop, tags, addr) =
                (acked.clone(), stop.clone(), tags.clone(), eng.addr.clone());
            writers.push(tokio::spawn(async move {
                let mut c = NbdClient::connect(&addr, "kv").await.expect("nbd connect");
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let tag = tags.fetch_add(1, Ordering::SeqCst);
                    let blk = ((i * 7919) % (blocks / 4)) * 4 + w;
                    i += 1;
                    c.write(blk * BLK as u64, &block_data(blk, tag, BLK), false)
                        .await
                        .unwrap_or_else(|e| panic!("write {tag} to block {blk} failed: {e}"));
                    acked.lock().expect("lock").insert(blk, tag);
                }
                c.flush().await.expect("flush");
            }));
        }
        until_acked(&acked, 200, "writes before the kill").await;
        // SIGKILL replica 1 while the writers keep going.
        reps[1].kill();
        let before = acked.lock().expect("lock").len();
        until_acked(&acked, before + 200, "writes with a replica down").await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while failed_set(&state).unwrap_or_default() != vec!["replica-1".to_string()] {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the failure was not recorded"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Bring it back on the same port; the engine rebuilds it while the writes go on.
        let addr1 = reps[1].addr.clone();
        reps[1] = start_replica(tmp.path(), 1, &addr1, "64MiB");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while !failed_set(&state).is_some_and(|f| f.is_empty()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "rebuild did not finish"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let after = acked.lock().expect("lock").len();
        until_acked(
            &acked,
            (after + 100).min(blocks as usize),
            "writes after the rebuild",
        )
        .await;
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.await.expect("writer");
        }
        // Every acknowledged write reads back.
        let mut c = NbdClient::connect(&eng.addr, "kv")
            .await
            .expect("nbd connect");
        let acked = acked.lock().expect("lock").clone();
        for (blk, t) in &acked {
            let got = c.read(blk * BLK as u64, BLK as u32).await.expect("read");
            assert!(
                got == block_data(*blk, *t, BLK),
                "block {blk} lost its acknowledged write {t}"
            );
        }
        // All three replicas are byte-identical.
        let mut hashes = Vec::new();
        for r in &reps {
            hashes.push(replica_hash(&r.addr, "kv", 1, size).await);
        }
        assert!(
            hashes.iter().all(|h| h == &hashes[0]),
            "replicas differ: {hashes:?}"
        );
        println!(
            "{} blocks written and verified; replicas identical",
            acked.len()
        );
    });
    drop(eng);
}

#[test]
fn sigkill_everything_after_flush_keeps_flushed_writes() {
    let tmp = TempDir::new("crash");
    let size: u64 = 32 << 20;
    let blocks = size / BLK as u64;
    let state = tmp.path().join("members.json");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let mut durable: HashMap<u64, u64> = HashMap::new();
    let mut maybe: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut addrs = Vec::new();
    for round in 0..3u64 {
        let reps: Vec<Proc> = (0..3)
            .map(|i| {
                let listen = addrs
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| "127.0.0.1:0".to_string());
                start_replica(tmp.path(), i, &listen, "32MiB")
            })
            .collect();
        addrs = reps.iter().map(|r| r.addr.clone()).collect();
        let eng = start_engine(&reps, round + 1, "32MiB", &state);
        rt.block_on(async {
            let mut c = NbdClient::connect(&eng.addr, "kv").await.expect("connect");
            // What was flushed before the last crash is there; unflushed blocks hold either value.
            for blk in 0..blocks {
                let got = c.read(blk * BLK as u64, BLK as u32).await.expect("read");
                let mut ok = match durable.get(&blk) {
                    Some(t) => got == block_data(blk, *t, BLK),
                    None => got.iter().all(|b| *b == 0),
                };
                for t in maybe.get(&blk).into_iter().flatten() {
                    ok |= got == block_data(blk, *t, BLK);
                }
                assert!(ok, "round {round}: block {blk} lost a flushed write");
                // Settle: whatever is there now is the durable value after the next flush.
                let found = maybe
                    .get(&blk)
                    .into_iter()
                    .flatten()
                    .copied()
                    .find(|t| got == block_data(blk, *t, BLK));
                if let Some(t) = found {
                    durable.insert(blk, t);
                }
            }
            maybe.clear();
            c.flush().await.expect("flush");
            for k in 0..200u64 {
                let tag = round * 1000 + k + 1;
                let blk = (tag * 104_729) % blocks;
                c.write(blk * BLK as u64, &block_data(blk, tag, BLK), false)
                    .await
                    .expect("write");
                durable.insert(blk, tag);
            }
            c.flush().await.expect("flush");
            // These are acknowledged but never flushed.
            for k in 0..50u64 {
                let tag = round * 1000 + 500 + k;
                let blk = (tag * 7) % blocks;
                c.write(blk * BLK as u64, &block_data(blk, tag, BLK), false)
                    .await
                    .expect("write");
                maybe.entry(blk).or_default().push(tag);
            }
        });
        // SIGKILL the engine and every replica right after.
        drop(eng);
        drop(reps);
    }
}
