//! System backup and restore with real processes: the Longhorn #10058 flow on a manager with
//! three nodes (volumes on two targets, the extra target deleted before the restore), volume
//! backup policies, a standby volume, a backing image, deleting one system backup among others
//! sharing its name's prefix, a disaster restore on a fresh server, and the #10740 race (target
//! sync every second) with the manager SIGKILLed mid-backup and mid-restore.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const IMAGE_SERVER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/image_server.py"
);

fn cli(api: &str, token: &str, args: &[&str]) -> String {
    let (ok, out, err) = zebu_cli(api, token, args);
    assert!(ok, "zebu {args:?}: {err}");
    out
}

fn get(api: &str, token: &str, args: &[&str]) -> Value {
    json_of(&cli(api, token, args))
}

fn file_url(p: &Path) -> String {
    format!("file://{}", p.display())
}

/// Writes `mib` MiB of pseudo-random data tagged `tag` into a volume through NBD.
fn fill(tmp: &Path, uri: &str, mib: usize, tag: u64) {
    let f = tmp.join(format!("fill-{tag}"));
    std::fs::write(&f, block_data(tag, tag, mib << 20)).expect("data");
    write_at(uri, &f, "0", &(mib << 20).to_string());
}

fn wait_node_count(api: &str, token: &str, n: usize) {
    wait_for("nodes up", 60, || {
        let ns = get(api, token, &["node", "list", "-o", "json"]);
        (ns.as_array()?
            .iter()
            .filter(|x| x["status"]["state"] == "up")
            .count()
            >= n)
            .then_some(())
    });
}

fn system_backup_volume<'a>(sb: &'a Value, name: &str) -> &'a Value {
    sb["status"]["volumes"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("volume {name} not in {sb}"))
}

#[test]
fn longhorn_10058_flow_restores_data_from_both_targets_after_the_extra_one_is_deleted() {
    let tmp = TempDir::new("sb-10058");
    let (mgr, token) = manager_proc(&tmp.path().join("mgr"), "127.0.0.1:0");
    let api = mgr.addr.clone();
    let _nodes: Vec<Proc> = (1..=3)
        .map(|i| {
            node_proc(
                &format!("n{i}"),
                &api,
                &token,
                &tmp.path().join(format!("n{i}")),
            )
        })
        .collect();
    wait_node_count(&api, &token, 3);
    let (t1, t2) = (tmp.path().join("t1"), tmp.path().join("t2"));
    cli(
        &api,
        &token,
        &[
            "backup-target",
            "update",
            "default",
            "--url",
            &file_url(&t1),
        ],
    );
    cli(
        &api,
        &token,
        &["backup-target", "create", "extra", "--url", &file_url(&t2)],
    );
    cli(
        &api,
        &token,
        &[
            "volume",
            "create",
            "vol-a",
            "--size",
            "64MiB",
            "--replicas",
            "3",
            "--wait",
        ],
    );
    cli(
        &api,
        &token,
        &[
            "volume",
            "create",
            "vol-b",
            "--size",
            "64MiB",
            "--replicas",
            "3",
            "--backup-target",
            "extra",
            "--wait",
        ],
    );
    let ua = cli(&api, &token, &["volume", "attach", "vol-a", "--node", "n1"])
        .trim()
        .to_string();
    let ub = cli(&api, &token, &["volume", "attach", "vol-b", "--node", "n2"])
        .trim()
        .to_string();
    fill(tmp.path(), &ua, 10, 1);
    fill(tmp.path(), &ub, 10, 2);
    let (ha, hb) = (volume_hash(tmp.path(), &ua), volume_hash(tmp.path(), &ub));
    // vol-b also backed up to the extra target last; vol-a stays attached, vol-b is detached.
    cli(
        &api,
        &token,
        &["backup", "create", "vol-b", "--target", "extra", "--wait"],
    );
    cli(&api, &token, &["volume", "detach", "vol-b"]);
    cli(&api, &token, &["system-backup", "create", "sb", "--wait"]);
    let sb = get(&api, &token, &["system-backup", "get", "sb", "-o", "json"]);
    assert_eq!(sb["status"]["state"], "ready");
    for (v, t) in [("vol-a", "default"), ("vol-b", "extra")] {
        let e = system_backup_volume(&sb, v);
        assert_eq!(e["backupTarget"], t, "{e}");
        let b = e["backup"].as_str().expect("backup");
        let bk = get(&api, &token, &["backup", "get", b, "-o", "json"]);
        assert_eq!(bk["status"]["state"], "Completed");
        assert_eq!(bk["spec"]["target"], t);
        assert_eq!(
            e["manifestChecksum"].as_str().map(str::len),
            Some(64),
            "{e}"
        );
    }
    assert!(t1.join("system-backups/sb/system-backup.json").exists());
    cli(&api, &token, &["volume", "detach", "vol-a"]);
    for v in ["vol-a", "vol-b"] {
        cli(&api, &token, &["volume", "delete", v]);
    }
    cli(&api, &token, &["backup-target", "delete", "extra"]);
    cli(
        &api,
        &token,
        &[
            "system-restore",
            "create",
            "r",
            "--system-backup",
            "sb",
            "--wait",
        ],
    );
    let r = get(&api, &token, &["system-restore", "get", "r", "-o", "json"]);
    assert_eq!(r["status"]["state"], "completed", "{r}");
    let result = |kind: &str, name: &str| {
        r["status"]["results"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["kind"] == kind && x["name"] == name))
            .map(|x| x["result"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert_eq!(result("backup target", "extra"), "restored");
    assert_eq!(result("backup target", "default"), "skipped: exists");
    assert_eq!(result("volume", "vol-a"), "restored");
    assert_eq!(result("volume", "vol-b"), "restored");
    for (v, want) in [("vol-a", &ha), ("vol-b", &hb)] {
        let uri = cli(&api, &token, &["volume", "attach", v, "--node", "n3"])
            .trim()
            .to_string();
        assert_eq!(
            &volume_hash(tmp.path(), &uri),
            want,
            "{v} after the system restore"
        );
        cli(&api, &token, &["volume", "detach", v]);
    }
    // A second restore finds everything there.
    cli(
        &api,
        &token,
        &[
            "system-restore",
            "create",
            "r2",
            "--system-backup",
            "sb",
            "--wait",
        ],
    );
    let r2 = get(&api, &token, &["system-restore", "get", "r2", "-o", "json"]);
    assert!(
        r2["status"]["results"]
            .as_array()
            .is_some_and(|a| a.iter().all(|x| x["result"] == "skipped: exists")),
        "{r2}"
    );
}

/// The image server serving `dir` on loopback.
fn image_server(dir: &Path) -> Proc {
    let mut cmd = Command::new("python3");
    cmd.arg(IMAGE_SERVER).arg(dir).arg("0");
    Proc::start_cmd("image-server", cmd)
}

#[test]
fn policies_standby_images_prefix_safe_delete_and_a_disaster_restore_on_a_fresh_server() {
    let tmp = TempDir::new("sb-disaster");
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    write_file(&www.join("base.raw"), &[(4, None), (4, Some(0)), (4, None)]);
    let http = image_server(&www);
    let (t1, t2) = (tmp.path().join("t1"), tmp.path().join("t2"));
    let a = Server::start(&tmp.path().join("a"));
    let (api, token) = (a.api().to_string(), a.token.clone());
    let c = |args: &[&str]| cli(&api, &token, args);
    c(&[
        "backup-target",
        "update",
        "default",
        "--url",
        &file_url(&t1),
    ]);
    c(&["backup-target", "create", "extra", "--url", &file_url(&t2)]);
    c(&["setting", "set", "backup-concurrency", "5"]);
    c(&[
        "backing-image",
        "create",
        "img",
        "--url",
        &format!("http://{}/base.raw", http.addr),
        "--wait",
    ]);
    c(&[
        "volume",
        "create",
        "v1",
        "--size",
        "16MiB",
        "--backing-image",
        "img",
        "--replicas",
        "1",
        "--wait",
    ]);
    c(&[
        "volume",
        "create",
        "v2",
        "--size",
        "16MiB",
        "--replicas",
        "1",
        "--wait",
    ]);
    let u1 = c(&["volume", "attach", "v1"]).trim().to_string();
    let u2 = c(&["volume", "attach", "v2"]).trim().to_string();
    let patch = tmp.path().join("patch");
    std::fs::write(&patch, block_data(7, 7, 1 << 20)).expect("patch");
    write_at(&u1, &patch, "1048576", "1048576");
    fill(tmp.path(), &u2, 3, 4);
    let (h1, h2) = (volume_hash(tmp.path(), &u1), volume_hash(tmp.path(), &u2));
    // v2 backed up, then a standby volume following it.
    let b2 = c(&["backup", "create", "v2", "--wait"]).trim().to_string();
    c(&["volume", "detach", "v2"]);
    c(&[
        "volume",
        "create",
        "v2-dr",
        "--from-backup",
        &b2,
        "--standby",
        "--replicas",
        "1",
        "--wait",
    ]);

    // disabled: no backups made; v1 (never backed up) is not restorable, v2 keeps b2.
    c(&[
        "system-backup",
        "create",
        "sb-off",
        "--volume-backup-policy",
        "disabled",
        "--wait",
    ]);
    let sb = get(
        &api,
        &token,
        &["system-backup", "get", "sb-off", "-o", "json"],
    );
    assert_eq!(
        system_backup_volume(&sb, "v1")["backup"],
        Value::Null,
        "{sb}"
    );
    assert!(
        system_backup_volume(&sb, "v1")["note"]
            .as_str()
            .unwrap_or_default()
            .contains("not restorable")
    );
    assert_eq!(system_backup_volume(&sb, "v2")["backup"], b2.as_str());
    let made = |name: &str| {
        get(
            &api,
            &token,
            &[
                "backup",
                "list",
                "--label",
                &format!("system-backup={name}"),
                "-o",
                "json",
            ],
        )
        .as_array()
        .map(Vec::len)
        .unwrap_or(0)
    };
    // Only the backing image's backup (images are backed up whatever the volume policy).
    assert_eq!(made("sb-off"), 1);
    assert_eq!(sb["status"]["backingImages"][0]["created"], true);
    // if-not-present: v2 was written to after b2 (detached since then), v1 never backed up:
    // both get one; the standby volume none; the image's backup is reused.
    c(&["system-backup", "create", "sb", "--wait"]);
    let sb = get(&api, &token, &["system-backup", "get", "sb", "-o", "json"]);
    assert_eq!(system_backup_volume(&sb, "v1")["created"], true);
    assert_eq!(system_backup_volume(&sb, "v2")["created"], true);
    assert_eq!(system_backup_volume(&sb, "v2-dr")["standby"], true);
    assert_eq!(system_backup_volume(&sb, "v2-dr")["backup"], Value::Null);
    assert_eq!(made("sb"), 2, "v1 and v2: {sb}");
    assert_eq!(sb["status"]["backingImages"][0]["name"], "img");
    assert_eq!(sb["status"]["backingImages"][0]["created"], Value::Null);
    // Again: v2, detached since that backup, keeps it; v1 (attached) gets a new one.
    c(&["system-backup", "create", "sb-again", "--wait"]);
    let again = get(
        &api,
        &token,
        &["system-backup", "get", "sb-again", "-o", "json"],
    );
    assert_eq!(
        system_backup_volume(&again, "v2")["backup"],
        system_backup_volume(&sb, "v2")["backup"]
    );
    assert_eq!(made("sb-again"), 1, "v1 only: {again}");
    // always: every volume but the standby one, and the image's backup is reused.
    c(&[
        "system-backup",
        "create",
        "sb-1",
        "--volume-backup-policy",
        "always",
        "--wait",
    ]);
    let sb1 = get(
        &api,
        &token,
        &["system-backup", "get", "sb-1", "-o", "json"],
    );
    assert_eq!(made("sb-1"), 2, "v1 and v2: {sb1}");
    assert_eq!(sb1["status"]["backingImages"][0]["created"], Value::Null);
    c(&[
        "system-backup",
        "create",
        "sb2",
        "--volume-backup-policy",
        "disabled",
        "--wait",
    ]);
    // Deleting sb leaves sb-1 and sb2 (names sharing its prefix) alone.
    c(&["system-backup", "delete", "sb"]);
    assert!(
        !t1.join("system-backups/sb")
            .join("system-backup.json")
            .exists()
    );
    for n in ["sb-1", "sb2", "sb-off", "sb-again"] {
        assert!(
            t1.join("system-backups")
                .join(n)
                .join("system-backup.json")
                .exists(),
            "{n}"
        );
    }
    c(&["backup-target", "sync", "default"]);
    let names: Vec<String> = get(&api, &token, &["system-backup", "list", "-o", "json"])
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    x["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(names, ["sb-1", "sb-again", "sb-off", "sb2"]);
    let (ok, _, err) = zebu_cli(&api, &token, &["system-backup", "create", "bad name"]);
    assert!(!ok && err.lines().count() == 1, "{err}");
    drop(a);

    // Disaster: a fresh server on the same target finds the system backups and restores one.
    let b = Server::start(&tmp.path().join("b"));
    let (api, token) = (b.api().to_string(), b.token.clone());
    let c = |args: &[&str]| cli(&api, &token, args);
    c(&[
        "backup-target",
        "update",
        "default",
        "--url",
        &file_url(&t1),
    ]);
    c(&["backup-target", "sync", "default"]);
    let sb1 = get(
        &api,
        &token,
        &["system-backup", "get", "sb-1", "-o", "json"],
    );
    assert_eq!(sb1["status"]["state"], "ready");
    // The disabled one first: v1 had no backup then, so it is reported as not restorable and
    // the restore ends in error naming it; the rest comes back.
    let (ok, _, err) = zebu_cli(
        &api,
        &token,
        &[
            "system-restore",
            "create",
            "r0",
            "--system-backup",
            "sb-off",
            "--wait",
        ],
    );
    assert!(!ok && err.contains("volume \"v1\""), "{err}");
    let r0 = get(&api, &token, &["system-restore", "get", "r0", "-o", "json"]);
    let v1 = r0["status"]["results"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|x| x["kind"] == "volume" && x["name"] == "v1")
        })
        .map(|x| x["result"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    assert!(v1.starts_with("failed: no backup was recorded"), "{r0}");
    c(&[
        "system-restore",
        "create",
        "r",
        "--system-backup",
        "sb-1",
        "--wait",
    ]);
    let r = get(&api, &token, &["system-restore", "get", "r", "-o", "json"]);
    assert_eq!(r["status"]["state"], "completed", "{r}");
    let s = get(&api, &token, &["setting", "list", "-o", "json"]);
    assert!(
        s.as_array().is_some_and(|a| a
            .iter()
            .any(|x| x["metadata"]["name"] == "backup-concurrency" && x["value"] == "5")),
        "{s}"
    );
    let t = get(
        &api,
        &token,
        &["backup-target", "get", "extra", "-o", "json"],
    );
    assert_eq!(t["spec"]["url"], file_url(&t2));
    let img = get(&api, &token, &["backing-image", "get", "img", "-o", "json"]);
    assert_eq!(img["status"]["state"], "ready");
    let dr = get(&api, &token, &["volume", "get", "v2-dr", "-o", "json"]);
    assert_eq!(dr["spec"]["standby"], true);
    for (v, want) in [("v1", &h1), ("v2", &h2)] {
        let uri = c(&["volume", "attach", v]).trim().to_string();
        assert_eq!(&volume_hash(tmp.path(), &uri), want, "{v}");
        c(&["volume", "detach", v]);
    }
    assert_eq!(
        get(&api, &token, &["volume", "get", "v1", "-o", "json"])["spec"]["backingImage"],
        "img"
    );
}

/// A manager on a fixed port (so nodes find it again after a restart) and one node.
struct Cluster {
    dir: PathBuf,
    port: u16,
    mgr: Proc,
    token: String,
    _node: Proc,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let port = free_port();
        let (mgr, token) = manager_proc(&dir.join("mgr"), &format!("127.0.0.1:{port}"));
        let node = node_proc("n1", &mgr.addr, &token, &dir.join("n1"));
        wait_node_count(&mgr.addr, &token, 1);
        Cluster {
            dir: dir.to_path_buf(),
            port,
            mgr,
            token,
            _node: node,
        }
    }

    fn api(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn restart_manager(&mut self) {
        self.mgr.kill();
        self.mgr = manager_proc(&self.dir.join("mgr"), &self.api()).0;
    }

    /// Polls an object until its state is final; returns it.
    fn wait_final(&self, kind: &str, name: &str, finals: &[&str], secs: u64) -> Value {
        wait_for(&format!("{kind} {name} to finish"), secs, || {
            let (ok, out, _) =
                zebu_cli(&self.api(), &self.token, &[kind, "get", name, "-o", "json"]);
            let v = if ok { json_of(&out) } else { return None };
            finals
                .iter()
                .any(|f| v["status"]["state"] == *f)
                .then_some(v)
        })
    }
}

#[test]
fn target_sync_every_second_and_manager_kills_never_leave_a_system_backup_or_restore_stuck() {
    let tmp = TempDir::new("sb-race");
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    write_file(&www.join("base.raw"), &[(6, None)]);
    let http = image_server(&www);
    let mut c = Cluster::start(tmp.path());
    let t1 = tmp.path().join("t1");
    let run = |c: &Cluster, args: &[&str]| cli(&c.api(), &c.token, args);
    run(
        &c,
        &[
            "backup-target",
            "update",
            "default",
            "--url",
            &file_url(&t1),
            "--poll-interval",
            "1",
        ],
    );
    run(&c, &["setting", "set", "system-backup-timeout", "120"]);
    run(
        &c,
        &[
            "backing-image",
            "create",
            "img",
            "--url",
            &format!("http://{}/base.raw", http.addr),
            "--wait",
        ],
    );
    run(
        &c,
        &[
            "volume",
            "create",
            "v",
            "--size",
            "16MiB",
            "--backing-image",
            "img",
            "--replicas",
            "1",
            "--wait",
        ],
    );
    let uri = run(&c, &["volume", "attach", "v"]).trim().to_string();
    fill(tmp.path(), &uri, 2, 9);
    let want = volume_hash(tmp.path(), &uri);
    run(&c, &["volume", "detach", "v"]);
    // #10740: the target syncs every second while system backups (with the image's backup)
    // run; every one reaches ready.
    for i in 0..20 {
        let name = format!("race-{i}");
        // "always" makes a volume backup each time.
        run(
            &c,
            &[
                "system-backup",
                "create",
                &name,
                "--volume-backup-policy",
                "always",
            ],
        );
        let sb = c.wait_final("system-backup", &name, &["ready", "error"], 120);
        assert_eq!(sb["status"]["state"], "ready", "{sb}");
        assert_eq!(sb["status"]["progress"], 100);
        // The image's backup made this round goes, so the next round makes another one while
        // the target syncs.
        let ib = &sb["status"]["backingImages"][0];
        assert_eq!(ib["created"], true, "{sb}");
        run(
            &c,
            &[
                "backup",
                "delete",
                ib["backup"].as_str().expect("image backup"),
            ],
        );
    }
    // The manager SIGKILLed at a random point of 10 system backups: each ends ready, or in
    // error with a reason, never stuck in a middle phase.
    let mut rng = rand::random::<u64>() | 1;
    let mut next = |max: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % max
    };
    let mut ready = 0;
    for i in 0..10 {
        let name = format!("kill-{i}");
        run(
            &c,
            &[
                "system-backup",
                "create",
                &name,
                "--volume-backup-policy",
                "always",
            ],
        );
        std::thread::sleep(Duration::from_millis(next(2000)));
        c.restart_manager();
        let sb = c.wait_final("system-backup", &name, &["ready", "error"], 180);
        if sb["status"]["state"] == "ready" {
            ready += 1;
        } else {
            assert!(
                !sb["status"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .is_empty(),
                "{sb}"
            );
        }
    }
    assert!(
        ready >= 5,
        "only {ready} of 10 system backups survived a manager restart"
    );
    // And at a random point of 10 restores (the volume deleted before each): completed with
    // the same data, or error with a reason.
    for i in 0..10 {
        run(&c, &["volume", "delete", "v"]);
        let name = format!("restore-{i}");
        run(
            &c,
            &[
                "system-restore",
                "create",
                &name,
                "--system-backup",
                "race-0",
            ],
        );
        std::thread::sleep(Duration::from_millis(next(2000)));
        c.restart_manager();
        let r = c.wait_final("system-restore", &name, &["completed", "error"], 180);
        assert_eq!(r["status"]["state"], "completed", "{r}");
        let uri = run(&c, &["volume", "attach", "v"]).trim().to_string();
        assert_eq!(volume_hash(tmp.path(), &uri), want, "round {i}");
        run(&c, &["volume", "detach", "v"]);
    }
}
