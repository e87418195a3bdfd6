//! Replica and node failures with real processes: a manager and three node agents, a writer
//! that records every acknowledged block and its latency, replicas deleted back to back (the
//! last complete copy is refused), a stalled replica node dropped after the replica timeout, a
//! manager SIGKILLed with a replica node killed while it is down, robustness under I/O.
//!
//! Over 800 lines on purpose: every failure scenario shares one cluster harness and one writer.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const BLK: usize = 64 * 1024;
const BLOCKS: u64 = 512; // 32 MiB

/// What the writer saw: the last tag acknowledged per block, the slowest write, the errors.
#[derive(Default)]
struct Written {
    acked: HashMap<u64, u64>,
    slowest: Duration,
    errors: Vec<String>,
    writes: u64,
}

/// Writes blocks through one NBD connection until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Written>,
}

impl Writer {
    fn start(addr: &str, volume: &str, first_tag: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let (addr, volume, s) = (addr.to_string(), volume.to_string(), stop.clone());
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("rt");
            let mut w = Written::default();
            let mut c = match rt.block_on(zebu_nbd::client::NbdClient::connect(&addr, &volume)) {
                Ok(c) => c,
                Err(e) => {
                    w.errors.push(format!("connect: {e}"));
                    return w;
                }
            };
            let mut tag = first_tag;
            while !s.load(Ordering::SeqCst) {
                tag += 1;
                let blk = (tag * 7919) % BLOCKS;
                let t0 = Instant::now();
                let r = rt.block_on(c.write(blk * BLK as u64, &block_data(blk, tag, BLK), false));
                w.slowest = w.slowest.max(t0.elapsed());
                match r {
                    Ok(()) => {
                        w.acked.insert(blk, tag);
                        w.writes += 1;
                    }
                    Err(e) => {
                        w.errors.push(format!("write of block {blk}: {e}"));
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if let Err(e) = rt.block_on(c.flush()) {
                w.errors.push(format!("flush: {e}"));
            }
            w
        });
        Writer { stop, handle }
    }

    fn finish(self) -> Written {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("writer thread")
    }
}

struct Cluster {
    tmp: TempDir,
    mgr: Proc,
    listen: String,
    token: String,
    nodes: Vec<Option<Proc>>,
}

impl Cluster {
    fn start(nodes: usize) -> Cluster {
        let tmp = TempDir::new("failures");
        let listen = format!("127.0.0.1:{}", free_port());
        let (mgr, token) = manager_proc(&tmp.path().join("manager"), &listen);
        let mut c = Cluster {
            tmp,
            mgr,
            listen,
            token,
            nodes: Vec::new(),
        };
        for i in 1..=nodes {
            c.nodes.push(Some(c.node(i)));
        }
        c.cli(&["setting", "set", "node-down-timeout", "3"]);
        wait_for("every node up", 30, || {
            (c.nodes_up() == nodes).then_some(())
        });
        c
    }

    fn node(&self, i: usize) -> Proc {
        node_proc(
            &format!("n{i}"),
            &self.listen,
            &self.token,
            &self.tmp.path().join(format!("n{i}")),
        )
    }

    fn cli(&self, args: &[&str]) -> String {
        let (ok, out, err) = zebu_cli(&self.listen, &self.token, args);
        assert!(ok, "zebu {args:?}: {err}");
        out
    }

    fn nodes_up(&self) -> usize {
        json_of(&self.cli(&["node", "list", "-o", "json"]))
            .as_array()
            .map(|a| a.iter().filter(|x| x["status"]["state"] == "up").count())
            .unwrap_or(0)
    }

    fn volume(&self, name: &str) -> Value {
        json_of(&self.cli(&["volume", "get", name, "-o", "json"]))
    }

    fn replicas(&self, volume: &str) -> Vec<Value> {
        json_of(&self.cli(&["replica", "list", "--volume", volume, "-o", "json"]))
            .as_array()
            .expect("array")
            .clone()
    }

    fn engine_generation(&self, volume: &str) -> u64 {
        let rt = tokio::runtime::Runtime::new().expect("rt");
        let api =
            zebu_manager::client::ApiClient::new(&format!("http://{}", self.listen), &self.token)
                .expect("client");
        let engines: Vec<Value> = rt.block_on(api.get("/v1/engines")).expect("engines");
        engines
            .iter()
            .find(|e| e["spec"]["volume"] == volume)
            .and_then(|e| e["spec"]["generation"].as_u64())
            .expect("engine")
    }

    fn wait_robustness(&self, volume: &str, want: &str, secs: u64) -> Duration {
        let t0 = Instant::now();
        wait_for(&format!("volume {volume} {want}"), secs, || {
            (self.volume(volume)["status"]["robustness"] == want).then_some(())
        });
        t0.elapsed()
    }

    /// Attaches `volume` on `node`; returns the NBD server's address.
    fn attach(&self, volume: &str, node: &str) -> String {
        let uri = self
            .cli(&["volume", "attach", volume, "--node", node])
            .trim()
            .to_string();
        uri.trim_start_matches("nbd://")
            .split('/')
            .next()
            .expect("addr")
            .to_string()
    }

    /// Waits until the volume has three replicas, every one RW and not failed.
    fn wait_all_rw(&self, volume: &str, what: &str) {
        wait_for(what, 120, || {
            let reps = self.replicas(volume);
            (reps.len() == 3
                && reps
                    .iter()
                    .all(|r| r["status"]["mode"] == "RW" && r["status"].get("failedAt").is_none()))
            .then_some(())
        });
    }

    /// A 3-replica 32 MiB volume attached to n1, filled; returns the NBD address.
    fn attached_volume(&self, name: &str) -> (String, HashMap<u64, u64>) {
        self.cli(&[
            "volume",
            "create",
            name,
            "--size",
            "32MiB",
            "--replicas",
            "3",
            "--wait",
        ]);
        let addr = self.attach(name, "n1");
        self.wait_robustness(name, "healthy", 60);
        let rt = tokio::runtime::Runtime::new().expect("rt");
        let mut c = rt
            .block_on(zebu_nbd::client::NbdClient::connect(&addr, name))
            .expect("nbd");
        let mut acked = HashMap::new();
        for blk in 0..BLOCKS {
            rt.block_on(c.write(blk * BLK as u64, &block_data(blk, 0, BLK), false))
                .expect("fill");
            acked.insert(blk, 0);
        }
        rt.block_on(c.flush()).expect("flush");
        (addr, acked)
    }
}

/// Reads every block back through a new connection and compares it with the last acknowledged
/// write.
fn check_data(addr: &str, volume: &str, acked: &HashMap<u64, u64>) {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let mut c = rt
        .block_on(zebu_nbd::client::NbdClient::connect(addr, volume))
        .expect("nbd");
    for (blk, tag) in acked {
        let got = rt
            .block_on(c.read(blk * BLK as u64, BLK as u32))
            .expect("read");
        assert!(
            got == block_data(*blk, *tag, BLK),
            "block {blk} lost its acknowledged write {tag}"
        );
    }
}

#[test]
fn replicas_deleted_back_to_back_keep_the_last_copy_and_a_stalled_node_leaves_after_the_timeout() {
    let c = Cluster::start(3);
    let (addr, mut acked) = c.attached_volume("vol");
    let names: Vec<String> = c
        .replicas("vol")
        .iter()
        .map(|r| r["metadata"]["name"].as_str().expect("name").to_string())
        .collect();
    assert_eq!(names.len(), 3);
    let w = Writer::start(&addr, "vol", 1_000);
    std::thread::sleep(Duration::from_millis(300));
    // Three deletes back to back under writes: the first two go (a rebuild of the first one's
    // replacement runs meanwhile), the third is the last complete copy.
    c.cli(&["replica", "delete", &names[0]]);
    c.cli(&["replica", "delete", &names[1]]);
    let (ok, _, err) = zebu_cli(&c.listen, &c.token, &["replica", "delete", &names[2]]);
    assert!(!ok, "the last complete copy was deleted");
    assert!(
        err.trim().lines().count() == 1 && err.contains("last complete copy"),
        "{err}"
    );
    c.wait_robustness("vol", "healthy", 120);
    let got = w.finish();
    assert!(got.errors.is_empty(), "writes failed: {:?}", got.errors);
    assert!(got.writes > 50, "the writer made progress: {}", got.writes);
    assert!(
        got.slowest < Duration::from_secs(5),
        "a write stalled for {:?}",
        got.slowest
    );
    acked.extend(got.acked);
    check_data(&addr, "vol", &acked);

    // A replica node that stops answering leaves the set after the replica timeout, not the
    // default 10 s, and the writes go on.
    c.cli(&["setting", "set", "engine-replica-timeout", "2"]);
    c.cli(&["volume", "detach", "vol"]);
    wait_for("detached", 30, || {
        (c.volume("vol")["status"]["state"] == "detached").then_some(())
    });
    c.cli(&["volume", "attach", "vol", "--node", "n1"]);
    c.wait_robustness("vol", "healthy", 60);
    let victim = c
        .replicas("vol")
        .iter()
        .find(|r| r["spec"]["node"] != "n1")
        .map(|r| r["spec"]["node"].as_str().expect("node").to_string())
        .expect("a replica off n1");
    let idx: usize = victim.trim_start_matches('n').parse().expect("index");
    let pid = c.nodes[idx - 1].as_ref().expect("node").child.id();
    let w = Writer::start(&addr, "vol", 1_000_000);
    std::thread::sleep(Duration::from_millis(300));
    must("kill", &["-STOP", &pid.to_string()]);
    c.wait_robustness("vol", "degraded", 15);
    std::thread::sleep(Duration::from_millis(500));
    let got = w.finish();
    must("kill", &["-CONT", &pid.to_string()]);
    assert!(got.errors.is_empty(), "writes failed: {:?}", got.errors);
    assert!(
        got.slowest < Duration::from_secs(5),
        "a write waited {:?} for the stalled replica",
        got.slowest
    );
    acked.extend(got.acked);
    c.wait_robustness("vol", "healthy", 120);
    check_data(&addr, "vol", &acked);
}

#[test]
fn a_manager_restart_with_a_replica_node_killed_meanwhile_restarts_no_engine() {
    let mut c = Cluster::start(3);
    let (addr, mut acked) = c.attached_volume("vol");
    let generation = c.engine_generation("vol");
    let w = Writer::start(&addr, "vol", 1_000);
    std::thread::sleep(Duration::from_millis(300));
    // A replica node SIGKILLed under I/O: degraded within 2 s.
    if let Some(mut p) = c.nodes[2].take() {
        p.kill();
    }
    let took = c.wait_robustness("vol", "degraded", 10);
    assert!(
        took < Duration::from_secs(2),
        "degraded only after {took:?}"
    );
    c.nodes[2] = Some(c.node(3));
    c.wait_robustness("vol", "healthy", 120);
    // The manager is SIGKILLed, n3 dies while it is down, the manager comes back after twice
    // the node-down timeout (writes wait meanwhile: n3's failure cannot be recorded).
    c.mgr.kill();
    if let Some(mut p) = c.nodes[2].take() {
        p.kill();
    }
    std::thread::sleep(Duration::from_secs(6));
    let log = c.tmp.path().join("manager-restarted.log");
    let (mgr, _) = manager_logged(&c.tmp.path().join("manager"), &c.listen, Some(&log));
    c.mgr = mgr;
    c.wait_robustness("vol", "degraded", 30);
    let text = wait_for("n3 to be judged down after the restart", 30, || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("marking it down").then_some(text)
    });
    // A second of slack for any other (wrong) verdict to show.
    std::thread::sleep(Duration::from_secs(1));
    let text = std::fs::read_to_string(&log).unwrap_or(text);
    let downs: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("marking it down"))
        .collect();
    assert!(
        downs.iter().all(|l| l.contains("n3")),
        "only n3 is judged down after the restart: {downs:?}"
    );
    assert!(!text.contains("salvage"), "{text}");
    assert_eq!(
        c.engine_generation("vol"),
        generation,
        "the engine was restarted"
    );
    assert_eq!(c.volume("vol")["status"]["state"], "attached");
    // The failed replica comes back and is rebuilt; the client's connection never dropped.
    c.nodes[2] = Some(c.node(3));
    c.wait_robustness("vol", "healthy", 120);
    let got = w.finish();
    assert!(
        got.errors.is_empty(),
        "the client saw errors: {:?}",
        got.errors
    );
    assert_eq!(c.engine_generation("vol"), generation);
    acked.extend(got.acked);
    check_data(&addr, "vol", &acked);
    // Every replica node gone: faulted.
    for n in c.nodes.iter_mut() {
        if let Some(mut p) = n.take() {
            p.kill();
        }
    }
    c.wait_robustness("vol", "faulted", 30);
}

#[test]
fn a_replica_whose_data_file_vanished_is_replaced_at_once_with_one_log_line() {
    let mut c = Cluster::start(3);
    let (addr, acked) = c.attached_volume("vol");
    let old: String = c
        .replicas("vol")
        .iter()
        .find(|r| r["spec"]["node"] == "n3")
        .and_then(|r| r["metadata"]["name"].as_str().map(str::to_string))
        .expect("a replica on n3");
    if let Some(mut p) = c.nodes[2].take() {
        p.kill();
    }
    let store = c.tmp.path().join(format!("n3/replicas/{old}/store"));
    let data: Vec<_> = files_under(&store)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".data"))
        .collect();
    assert!(!data.is_empty(), "no data file under {}", store.display());
    for p in &data {
        std::fs::remove_file(p).expect("remove data file");
    }
    let log = c.tmp.path().join("n3.log");
    let t0 = Instant::now();
    c.nodes[2] = Some(node_logged(
        "n3",
        &c.listen,
        &c.token,
        &c.tmp.path().join("n3"),
        Some(&log),
    ));
    wait_for("the broken replica to be replaced", 30, || {
        let reps = c.replicas("vol");
        (reps.len() == 3 && reps.iter().all(|r| r["metadata"]["name"] != old.as_str()))
            .then_some(())
    });
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "replaced only after {took:?}"
    );
    c.wait_robustness("vol", "healthy", 120);
    std::thread::sleep(Duration::from_secs(2));
    let text = std::fs::read_to_string(&log).expect("log");
    let lines = text
        .lines()
        .filter(|l| l.contains(&old) && l.contains("cannot open"))
        .count();
    assert_eq!(lines, 1, "one log line for the broken replica:\n{text}");
    assert!(!store.exists(), "the broken replica's files are removed");
    check_data(&addr, "vol", &acked);
}

/// Samples a volume's complete copies (RW, not failed, not being deleted) until stopped;
/// returns the fewest seen.
fn watch_rw(
    listen: &str,
    token: &str,
    volume: &str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    let (listen, token, volume) = (listen.to_string(), token.to_string(), volume.to_string());
    std::thread::spawn(move || {
        let mut fewest = usize::MAX;
        while !stop.load(Ordering::SeqCst) {
            let (ok, out, _) = zebu_cli(
                &listen,
                &token,
                &["replica", "list", "--volume", &volume, "-o", "json"],
            );
            if ok {
                let rw = json_of(&out)
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter(|r| {
                                r["status"]["mode"] == "RW"
                                    && r["status"].get("failedAt").is_none()
                                    && r["metadata"].get("deletionRequested").is_none()
                            })
                            .count()
                    })
                    .unwrap_or(0);
                fewest = fewest.min(rw);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        fewest
    })
}

fn replica_nodes(c: &Cluster, volume: &str) -> Vec<String> {
    let mut n: Vec<String> = c
        .replicas(volume)
        .iter()
        .map(|r| r["spec"]["node"].as_str().unwrap_or("").to_string())
        .collect();
    n.sort();
    n
}

#[test]
fn evicting_a_node_moves_its_replica_one_complete_copy_at_a_time_and_detached_volumes_rebuild_offline()
 {
    let mut c = Cluster::start(4);
    c.cli(&["node", "update", "n4", "--scheduling", "false"]);
    let (addr, mut acked) = c.attached_volume("vol");
    assert_eq!(
        replica_nodes(&c, "vol"),
        vec!["n1", "n2", "n3"],
        "nothing on n4"
    );
    c.cli(&["node", "update", "n4", "--scheduling", "true"]);
    let w = Writer::start(&addr, "vol", 1_000);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_rw(&c.listen, &c.token, "vol", stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let n = json_of(&c.cli(&["node", "evict", "n3", "-o", "json"]));
    assert_eq!(n["spec"]["evict"], true, "{n}");
    assert_eq!(n["spec"]["allowScheduling"], false, "{n}");
    wait_for("the replica to move from n3 to n4", 120, || {
        (replica_nodes(&c, "vol") == ["n1", "n2", "n4"]
            && c.volume("vol")["status"]["robustness"] == "healthy")
            .then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    let fewest = watcher.join().expect("watcher");
    assert!(
        fewest >= 2,
        "the volume went down to {fewest} complete copies"
    );
    let got = w.finish();
    assert!(got.errors.is_empty(), "writes failed: {:?}", got.errors);
    acked.extend(got.acked);
    check_data(&addr, "vol", &acked);

    // A node with replicas or engines cannot be deleted; the evicted one can, once it is gone.
    let (ok, _, err) = zebu_cli(&c.listen, &c.token, &["node", "delete", "n1"]);
    assert!(!ok && err.contains("holds replicas"), "{err}");
    if let Some(mut p) = c.nodes[2].take() {
        p.kill();
    }
    wait_for("n3 down", 30, || (c.nodes_up() == 3).then_some(()));
    c.cli(&["node", "delete", "n3"]);
    let (ok, _, _) = zebu_cli(&c.listen, &c.token, &["node", "get", "n3"]);
    assert!(!ok, "n3 is gone");

    // Offline rebuild: a detached volume whose replica node was down is rebuilt without an attach.
    c.cli(&["volume", "detach", "vol"]);
    wait_for("detached", 30, || {
        (c.volume("vol")["status"]["state"] == "detached").then_some(())
    });
    if let Some(mut p) = c.nodes[1].take() {
        p.kill();
    }
    wait_for("n2's replica failed", 30, || {
        c.replicas("vol")
            .iter()
            .any(|r| r["spec"]["node"] == "n2" && r["status"].get("failedAt").is_some())
            .then_some(())
    });
    c.nodes[1] = Some(c.node(2));
    c.wait_all_rw("vol", "every replica complete again while detached");
    assert_eq!(c.volume("vol")["status"]["state"], "detached");
    let addr2 = c.attach("vol", "n2");
    check_data(&addr2, "vol", &acked);
}

#[test]
fn an_attached_volume_grows_online_under_fio_with_its_data_checked() {
    let tmp = TempDir::new("expand");
    let srv = Server::start(&tmp.path().join("data"));
    let uri = srv.volume("vol", "32MiB", 2);
    let fio = std::process::Command::new("fio")
        .args([
            "--name=grow",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=64k",
            "--size=32M",
            "--time_based",
            "--runtime=6",
            "--iodepth=4",
            "--verify=crc32c",
            "--verify_backlog=16",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fio (the test command installs it)");
    std::thread::sleep(Duration::from_secs(2));
    let v = json_of(&srv.cli(&["volume", "expand", "vol", "--size", "64MiB", "-o", "json"]));
    assert_eq!(u(&v["spec"]["size"]), 64 << 20, "{v}");
    let out = fio.wait_with_output().expect("fio");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("verify:"),
        "fio failed:\n{text}"
    );
    // New connections see the new size; every replica grew.
    wait_for("the new size on a new connection", 30, || {
        let (ok, out) = run("nbdinfo", &["--size", &uri]);
        (ok && out.trim() == (64u64 << 20).to_string()).then_some(())
    });
    wait_for("every replica grown", 30, || {
        json_of(&srv.cli(&["replica", "list", "--volume", "vol", "-o", "json"]))
            .as_array()?
            .iter()
            .all(|r| r["spec"]["size"].as_u64() == Some(64 << 20))
            .then_some(())
    });
    let out = must(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x5a 48M 1M",
            "-c",
            "read -P 0x5a 48M 1M",
        ],
    );
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "{out}"
    );
    let before = volume_hash(tmp.path(), &uri);
    srv.cli(&["volume", "detach", "vol"]);
    let uri = srv.cli(&["volume", "attach", "vol"]).trim().to_string();
    assert_eq!(
        volume_hash(tmp.path(), &uri),
        before,
        "the data survives a re-attach"
    );
    // Standby and transitional volumes are still refused.
    srv.cli(&["volume", "detach", "vol"]);
}

#[test]
fn a_faulted_detached_volume_is_salvaged_from_the_replica_chosen() {
    let mut c = Cluster::start(3);
    let (addr, acked) = c.attached_volume("vol");
    let (ok, _, err) = zebu_cli(
        &c.listen,
        &c.token,
        &["volume", "salvage", "vol", "--replica", "whatever"],
    );
    assert!(!ok && err.contains("not faulted"), "{err}");
    c.cli(&["volume", "detach", "vol"]);
    wait_for("detached", 30, || {
        (c.volume("vol")["status"]["state"] == "detached").then_some(())
    });
    // Every node down at once, then back: no complete copy is known any more.
    for n in c.nodes.iter_mut() {
        if let Some(mut p) = n.take() {
            p.kill();
        }
    }
    wait_for("every replica failed", 30, || {
        c.replicas("vol")
            .iter()
            .all(|r| r["status"].get("failedAt").is_some())
            .then_some(())
    });
    for i in 1..=3 {
        c.nodes[i - 1] = Some(c.node(i));
    }
    wait_for("every node up", 30, || (c.nodes_up() == 3).then_some(()));
    let v = wait_for("faulted", 30, || {
        let v = c.volume("vol");
        (v["status"]["robustness"] == "faulted").then_some(v)
    });
    assert_eq!(v["status"]["state"], "detached", "{v}");
    let table = c.cli(&["replica", "list", "--volume", "vol"]);
    assert!(table.contains("FLUSH"), "{table}");
    let reps = c.replicas("vol");
    let chosen = reps
        .iter()
        .max_by_key(|r| r["status"]["flushSeq"].as_u64().unwrap_or(0))
        .and_then(|r| r["metadata"]["name"].as_str())
        .expect("a replica")
        .to_string();
    c.cli(&["volume", "salvage", "vol", "--replica", &chosen]);
    c.wait_all_rw("vol", "every replica complete again");
    let addr2 = c.attach("vol", "n1");
    assert_ne!(addr2, "", "{addr}");
    check_data(&addr2, "vol", &acked);
}

#[test]
fn a_replica_back_after_the_wait_is_reused_by_a_delta_rebuild() {
    let mut c = Cluster::start(3);
    c.cli(&["setting", "set", "replica-soft-anti-affinity", "false"]);
    c.cli(&["setting", "set", "replica-replenishment-wait-interval", "2"]);
    let (addr, mut acked) = c.attached_volume("vol");
    let old = c
        .replicas("vol")
        .iter()
        .find(|r| r["spec"]["node"] == "n3")
        .and_then(|r| r["metadata"]["name"].as_str().map(str::to_string))
        .expect("replica on n3");
    if let Some(mut p) = c.nodes[2].take() {
        p.kill();
    }
    // 40 blocks (2.5 MiB) change while n3 is away.
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let mut cl = rt
        .block_on(zebu_nbd::client::NbdClient::connect(&addr, "vol"))
        .expect("nbd");
    for blk in 0..40u64 {
        rt.block_on(cl.write(blk * BLK as u64, &block_data(blk, 7, BLK), false))
            .expect("write");
        acked.insert(blk, 7);
    }
    rt.block_on(cl.flush()).expect("flush");
    wait_for("n3's replica failed", 30, || {
        c.replicas("vol")
            .iter()
            .any(|r| r["metadata"]["name"] == old.as_str() && r["status"].get("failedAt").is_some())
            .then_some(())
    });
    // Well past the replenishment wait; no other node may take a replacement.
    std::thread::sleep(Duration::from_secs(4));
    c.nodes[2] = Some(c.node(3));
    c.wait_robustness("vol", "healthy", 120);
    let r = wait_for("the rebuild figures of the returning replica", 30, || {
        c.replicas("vol")
            .into_iter()
            .find(|r| r["spec"]["node"] == "n3" && r["status"]["rebuildTotal"].as_u64() > Some(0))
    });
    assert_eq!(
        r["metadata"]["name"],
        old.as_str(),
        "the old replica was reused"
    );
    let copied = r["status"]["rebuildCopied"].as_u64().unwrap_or(u64::MAX);
    assert!(
        copied < 16 << 20,
        "a delta rebuild copies what changed, not the 32 MiB volume: {copied}"
    );
    check_data(&addr, "vol", &acked);
}

fn qemu_io(addr: &str, volume: &str, cmd: &str) {
    let out = must(
        "qemu-io",
        &["-f", "raw", &format!("nbd://{addr}/{volume}"), "-c", cmd],
    );
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "{cmd}: {out}"
    );
}

#[test]
fn snapshot_revert_of_a_detached_volume_and_a_replica_down_meanwhile_is_rebuilt() {
    let mut c = Cluster::start(3);
    let (addr, _) = c.attached_volume("vol");
    qemu_io(&addr, "vol", "write -P 0x11 0 4M");
    c.cli(&["snapshot", "create", "vol", "--name", "s1"]);
    qemu_io(&addr, "vol", "write -P 0x22 0 4M");
    c.cli(&["snapshot", "create", "vol", "--name", "s2"]);
    qemu_io(&addr, "vol", "write -P 0x33 0 2M");
    let (ok, _, err) = zebu_cli(&c.listen, &c.token, &["snapshot", "revert", "vol", "s1"]);
    assert!(
        !ok && err.trim().lines().count() == 1 && err.contains("detach"),
        "{err}"
    );
    c.cli(&["volume", "detach", "vol"]);
    wait_for("detached", 30, || {
        (c.volume("vol")["status"]["state"] == "detached").then_some(())
    });
    // n3 is down while the volume reverts.
    if let Some(mut p) = c.nodes[2].take() {
        p.kill();
    }
    wait_for("n3 down", 30, || (c.nodes_up() == 2).then_some(()));
    let out = c.cli(&["snapshot", "revert", "vol", "s1"]);
    assert!(out.contains("reverted"), "{out}");
    let v = c.volume("vol");
    assert_eq!(v["status"]["revert"]["state"], "done", "{v}");
    let names: Vec<String> = json_of(&c.cli(&["snapshot", "list", "vol", "-o", "json"]))
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .collect();
    assert!(
        names.contains(&"s1".to_string()) && !names.contains(&"s2".to_string()),
        "{names:?}"
    );
    // n3 returns with the newer data: it is rebuilt before anything reads it.
    c.nodes[2] = Some(c.node(3));
    c.wait_all_rw("vol", "n3's replica rebuilt from the reverted copies");
    // Only n3's replica left: it must hold the snapshot's bytes.
    for i in [0, 1] {
        if let Some(mut p) = c.nodes[i].take() {
            p.kill();
        }
    }
    wait_for("n1 and n2 down", 30, || (c.nodes_up() == 1).then_some(()));
    let addr3 = c.attach("vol", "n3");
    wait_for("attached on n3", 60, || {
        (c.volume("vol")["status"]["state"] == "attached").then_some(())
    });
    qemu_io(&addr3, "vol", "read -P 0x11 0 4M");
}

#[test]
fn bad_node_flags_end_at_start_with_one_line_and_the_node_never_registers() {
    let c = Cluster::start(0);
    let dir = c.tmp.path().join("bad");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_addr = busy.local_addr().expect("addr").to_string();
    let manager = format!("http://{}", c.listen);
    for (flag_args, flag) in [
        (vec!["--listen", "127.0.0.1:19601"], "--listen"),
        (
            vec!["--metrics-listen", busy_addr.as_str()],
            "--metrics-listen",
        ),
        (vec!["--nbd-listen", busy_addr.as_str()], "--nbd-listen"),
        (
            vec!["--nbd-listen", "no-such-host.invalid:1"],
            "--nbd-listen",
        ),
    ] {
        let mut args = vec![
            "node",
            "--manager",
            manager.as_str(),
            "--data-dir",
            dir.to_str().expect("utf8"),
            "--name",
            "bad",
        ];
        for (f, default) in [
            ("--nbd-listen", "127.0.0.1:0"),
            ("--metrics-listen", "127.0.0.1:0"),
        ] {
            if !flag_args.contains(&f) {
                args.extend([f, default]);
            }
        }
        args.extend(flag_args);
        let out = std::process::Command::new(ZEBU)
            .args(&args)
            .env("ZEBU_TOKEN", &c.token)
            .env("ZEBU_LOG", "warn")
            .output()
            .expect("run zebu node");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(
            err.trim().lines().count() == 1 && err.contains(flag),
            "{args:?}: {err}"
        );
    }
    let (ok, _, _) = zebu_cli(&c.listen, &c.token, &["node", "get", "bad"]);
    assert!(!ok, "a node that failed its flags registered");
    drop(busy);
}

/// One volume's engine start that hangs on a stalled replica node holds up neither the node's
/// heartbeats nor another volume attached on the same node.
#[test]
fn an_engine_start_stuck_on_a_stalled_replica_holds_up_no_other_volume() {
    let c = Cluster::start(2);
    // The stalled node must stay "up" for the length of the test, and the engine's connect to
    // it must hang for longer than the other volume needs to attach.
    c.cli(&["setting", "set", "node-down-timeout", "120"]);
    c.cli(&["setting", "set", "engine-replica-timeout", "60"]);
    // "slow" keeps its one replica on n2, "fast" on n1.
    c.cli(&["node", "update", "n1", "--scheduling", "false"]);
    c.cli(&[
        "volume",
        "create",
        "slow",
        "--size",
        "16MiB",
        "--replicas",
        "1",
        "--wait",
    ]);
    c.cli(&["node", "update", "n1", "--scheduling", "true"]);
    c.cli(&["node", "update", "n2", "--scheduling", "false"]);
    c.cli(&[
        "volume",
        "create",
        "fast",
        "--size",
        "16MiB",
        "--replicas",
        "1",
        "--wait",
    ]);
    assert_eq!(replica_nodes(&c, "slow"), vec!["n2".to_string()]);
    assert_eq!(replica_nodes(&c, "fast"), vec!["n1".to_string()]);
    let pid = c.nodes[1].as_ref().expect("n2").child.id();
    must("kill", &["-STOP", &pid.to_string()]);
    let api = c.listen.clone();
    let token = c.token.clone();
    // Attach "slow" on n1: its engine's connect to n2 hangs.
    let slow = std::thread::spawn(move || {
        zebu_cli(&api, &token, &["volume", "attach", "slow", "--node", "n1"])
    });
    std::thread::sleep(Duration::from_secs(2));
    let beat = |c: &Cluster| {
        json_of(&c.cli(&["node", "get", "n1", "-o", "json"]))["status"]["lastHeartbeat"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = beat(&c);
    let t0 = Instant::now();
    let addr = c.attach("fast", "n1");
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "attaching fast waited {took:?} behind slow's engine start"
    );
    qemu_io(&addr, "fast", "write -P 7 0 64k");
    wait_for("n1 heartbeats while slow's engine start hangs", 10, || {
        (beat(&c) > before).then_some(())
    });
    assert_eq!(
        c.volume("slow")["status"]["state"],
        "attaching",
        "slow cannot attach while its only replica is stalled"
    );
    must("kill", &["-CONT", &pid.to_string()]);
    let (ok, out, err) = slow.join().expect("attach thread");
    assert!(ok, "slow attaches once n2 answers again: {err}");
    assert!(out.contains("nbd://"), "{out}");
}
