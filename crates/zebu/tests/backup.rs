//! Backups end to end with real processes and clients: a `zebu server`, qemu-io and nbdcopy on
//! the volumes, a directory target and an S3 target (moto_server behind a cuttable proxy), the
//! CLI with `-o json` counts, restores compared by whole-volume checksums, verify, corruption,
//! deletion, two targets with re-sync, and a server SIGKILLed mid-backup.

mod common;

use std::io::Write;
use std::path::Path;

use common::*;
use serde_json::Value;

fn json_of(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// BLAKE3 of a whole volume, read through NBD with nbdcopy.
fn volume_hash(tmp: &Path, uri: &str) -> String {
    let out = tmp.join(format!("read-{}.img", rand::random::<u32>()));
    must("nbdcopy", &[uri, out.to_str().expect("utf8")]);
    let h = file_hash(&out);
    let _ = std::fs::remove_file(&out);
    h
}

fn write_file(p: &Path, chunks: &[(usize, Option<u8>)]) {
    // (MiB, None = random | Some(byte) = that byte)
    let mut f = std::fs::File::create(p).expect("create");
    for (mib, fill) in chunks {
        for _ in 0..*mib {
            let buf: Vec<u8> = match fill {
                Some(b) => vec![*b; 1 << 20],
                None => (0..1 << 20).map(|_| rand::random::<u8>()).collect(),
            };
            f.write_all(&buf).expect("write");
        }
    }
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Creates a volume from a backup, waits for the restore, attaches it and returns its hash.
fn restore_hash(srv: &Server, tmp: &Path, name: &str, backup: &str) -> String {
    srv.cli(&[
        "volume",
        "create",
        name,
        "--from-backup",
        backup,
        "--replicas",
        "2",
        "--wait",
    ]);
    let v = json_of(&srv.cli(&["volume", "get", name, "-o", "json"]));
    assert_eq!(v["status"]["restore"]["lastRestoredBackup"], backup);
    assert_eq!(v["status"]["restore"]["progress"], 100);
    let uri = srv.cli(&["volume", "attach", name]).trim().to_string();
    let h = volume_hash(tmp, &uri);
    srv.cli(&["volume", "detach", name]);
    h
}

fn backup_json(srv: &Server, args: &[&str]) -> Value {
    let mut a = vec!["backup", "create"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--wait", "-o", "json"]);
    let b = json_of(&srv.cli(&a));
    assert_eq!(b["status"]["state"], "Completed", "{b}");
    assert_eq!(b["status"]["progress"], 100);
    b
}

#[test]
fn backup_incremental_named_snapshot_restore_verify_corrupt_and_delete_on_a_directory_target() {
    let tmp = TempDir::new("bk-fs");
    let srv = Server::start(&tmp.path().join("data"));
    let bt = tmp.path().join("target");
    let url = format!("file://{}", bt.display());
    // The default target exists with no URL until set.
    let t = json_of(&srv.cli(&["backup-target", "get", "default", "-o", "json"]));
    assert_eq!(t["spec"]["url"], "");
    assert_eq!(t["status"]["available"], false);
    let (ok, _, err) = zebu_cli(srv.api(), &srv.token, &["backup", "create", "nope"]);
    assert!(!ok && err.lines().count() == 1, "{err}");
    srv.cli(&["backup-target", "update", "default", "--url", &url]);
    let t = json_of(&srv.cli(&["backup-target", "get", "default", "-o", "json"]));
    assert_eq!(t["status"]["available"], true, "{t}");

    let uri = srv.volume("v1", "256MiB", 2);
    // 64 MiB random + 64 MiB zeros written; the rest never written.
    let img = tmp.path().join("d1.img");
    write_file(&img, &[(64, None), (64, Some(0))]);
    must("nbdcopy", &[img.to_str().expect("utf8"), &uri]);
    let d1 = volume_hash(tmp.path(), &uri);
    let (ok, _, err) = zebu_cli(
        srv.api(),
        &srv.token,
        &["backup", "create", "v1", "--snapshot", "missing"],
    );
    assert!(!ok && err.contains("missing"), "{err}");

    let b1 = backup_json(&srv, &["v1"]);
    let b1n = b1["metadata"]["name"].as_str().expect("name").to_string();
    let st = &b1["status"];
    assert_eq!(u(&st["blocks"]["total"]), 128, "{b1}");
    assert_eq!(u(&st["blocks"]["uploaded"]), 32);
    assert_eq!(u(&st["blocks"]["present"]), 0);
    assert_eq!(u(&st["blocks"]["zero"]), 96);
    assert_eq!(u(&st["bytes"]["uploaded"]), 64 << 20);
    assert!(u(&st["bytes"]["stored"]) > 60 << 20);
    assert_eq!(b1["spec"]["target"], "default");
    assert!(st["url"].as_str().expect("url").ends_with(".manifest"));
    // No zero block is stored: exactly the 32 random ones.
    assert_eq!(files_under(&bt.join("blocks")).len(), 32);
    let v = json_of(&srv.cli(&["volume", "get", "v1", "-o", "json"]));
    assert_eq!(v["status"]["lastBackup"], b1n.as_str());

    // A named snapshot now, then 4 MiB changed (blocks 5 and 6) and an incremental backup.
    srv.cli(&["snapshot", "create", "v1", "--name", "old"]);
    let chg = tmp.path().join("chg.img");
    write_file(&chg, &[(4, None)]);
    let out = must(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            &format!("write -s {} 10M 4M", chg.display()),
            "-c",
            "flush",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    let d2 = volume_hash(tmp.path(), &uri);
    assert_ne!(d1, d2);
    let b2 = backup_json(&srv, &["v1"]);
    let b2n = b2["metadata"]["name"].as_str().expect("name").to_string();
    let st = &b2["status"];
    assert_eq!(
        u(&st["blocks"]["uploaded"]),
        2,
        "only the changed blocks: {b2}"
    );
    assert_eq!(u(&st["blocks"]["present"]), 30);
    assert_eq!(u(&st["blocks"]["zero"]), 96);
    assert_eq!(u(&st["bytes"]["uploaded"]), 4 << 20);
    assert_eq!(st["parent"], b1n.as_str());
    assert_eq!(files_under(&bt.join("blocks")).len(), 34);
    let v = json_of(&srv.cli(&["volume", "get", "v1", "-o", "json"]));
    assert_eq!(v["status"]["lastBackup"], b2n.as_str());
    // The older named snapshot, after the later writes.
    let b3 = backup_json(&srv, &["v1", "--snapshot", "old"]);
    let b3n = b3["metadata"]["name"].as_str().expect("name").to_string();
    assert_eq!(b3["spec"]["snapshot"], "old");
    assert_eq!(
        u(&b3["status"]["blocks"]["uploaded"]),
        0,
        "all its blocks exist"
    );
    let list = json_of(&srv.cli(&["backup", "list", "--volume", "v1", "-o", "json"]));
    assert_eq!(list.as_array().map(Vec::len), Some(3));

    assert_eq!(restore_hash(&srv, tmp.path(), "r1", &b1n), d1);
    assert_eq!(restore_hash(&srv, tmp.path(), "r2", &b2n), d2);
    assert_eq!(restore_hash(&srv, tmp.path(), "r3", &b3n), d1);
    // A restoring volume cannot be attached, and a restored one is an ordinary volume.
    for r in ["r1", "r2", "r3"] {
        srv.cli(&["volume", "delete", r]);
    }

    // Verify, then corrupt one stored block of b2's changed data.
    let out = srv.cli(&["backup", "verify", &b2n, "--deep"]);
    assert!(out.contains("ok"), "{out}");
    let before: Vec<_> = files_under(&bt.join("blocks"));
    let b1_blocks = before.clone();
    srv.cli(&["backup", "delete", &b1n]);
    // b3 holds b1's data: nothing is collected.
    assert_eq!(files_under(&bt.join("blocks")), b1_blocks);
    // The two blocks only b2 has.
    let m2 = std::fs::read(bt.join(format!("volumes/v1/backups/{b2n}.manifest"))).expect("m2");
    let m2 = zebu_backupstore::Manifest::decode(&m2).expect("decode");
    let m3 = std::fs::read(bt.join(format!("volumes/v1/backups/{b3n}.manifest"))).expect("m3");
    let m3 = zebu_backupstore::Manifest::decode(&m3).expect("decode");
    let only2: Vec<_> = m2
        .referenced()
        .difference(&m3.referenced())
        .copied()
        .collect();
    assert_eq!(only2.len(), 2);
    let victim = bt.join(zebu_backupstore::backup::block_key(&only2[0]));
    let good = std::fs::read(&victim).expect("block");
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&victim, &bad).expect("corrupt");
    let out = srv.cli(&["backup", "verify", &b2n]);
    assert!(
        out.contains("ok"),
        "shallow verify only checks presence: {out}"
    );
    let (ok, out, err) = zebu_cli(srv.api(), &srv.token, &["backup", "verify", &b2n, "--deep"]);
    let hex = only2[0].to_hex();
    assert!(!ok, "{out}");
    assert!(
        out.contains(&hex) && err.contains(&hex),
        "names the block: {out} {err}"
    );
    let (ok, _, err) = zebu_cli(
        srv.api(),
        &srv.token,
        &[
            "volume",
            "create",
            "bad",
            "--from-backup",
            &b2n,
            "--replicas",
            "1",
            "--wait",
        ],
    );
    assert!(!ok, "a restore over a corrupt block fails");
    assert!(err.contains(&hex), "and names it: {err}");
    let (ok, _, err) = zebu_cli(srv.api(), &srv.token, &["volume", "attach", "bad"]);
    assert!(!ok && err.contains("restore"), "{err}");
    srv.cli(&["volume", "delete", "bad"]);
    std::fs::write(&victim, &good).expect("repair");

    // Deleting b3 frees b1's data except what b2 shares; deleting b2 frees everything.
    srv.cli(&["backup", "delete", &b3n]);
    let left: std::collections::BTreeSet<String> = files_under(&bt.join("blocks"))
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    let want: std::collections::BTreeSet<String> = m2
        .referenced()
        .iter()
        .map(|h| format!("{}.blk", h.to_hex()))
        .collect();
    assert_eq!(left, want);
    assert_eq!(restore_hash(&srv, tmp.path(), "r4", &b2n), d2);
    srv.cli(&["backup", "delete", &b2n]);
    assert!(files_under(&bt.join("blocks")).is_empty());
    let list = json_of(&srv.cli(&["backup", "list", "-o", "json"]));
    assert_eq!(list.as_array().map(Vec::len), Some(0));
    let v = json_of(&srv.cli(&["volume", "get", "v1", "-o", "json"]));
    assert!(v["status"].get("lastBackup").is_none(), "{v}");
}

fn backup_state(srv: &Server, name: &str) -> Value {
    json_of(&srv.cli(&["backup", "get", name, "-o", "json"]))
}

#[test]
fn cutting_the_s3_server_mid_backup_ends_in_error_and_a_new_backup_uploads_only_what_is_missing() {
    let tmp = TempDir::new("bk-s3");
    let s3 = moto("zebu");
    let proxy = Proxy::start(s3.port);
    let srv = Server::start(&tmp.path().join("data"));
    let endpoint = format!("endpoint=http://127.0.0.1:{}", proxy.port);
    srv.cli(&[
        "backup-target",
        "create",
        "s3t",
        "--url",
        "s3://zebu/backups",
        "--option",
        &endpoint,
        "--option",
        "path-style=true",
        "--option",
        "region=us-east-1",
        "--option",
        "access-key-id=test",
        "--option",
        "secret-access-key=verysecret",
    ]);
    let t = json_of(&srv.cli(&["backup-target", "get", "s3t", "-o", "json"]));
    assert_eq!(t["status"]["available"], true, "{t}");
    assert_eq!(t["spec"]["options"]["secret-access-key"], "(hidden)");
    assert!(!srv.cli(&["backup-target", "list"]).contains("verysecret"));

    let uri = srv.volume("v1", "256MiB", 1);
    let img = tmp.path().join("d.img");
    write_file(&img, &[(128, None)]);
    must("nbdcopy", &[img.to_str().expect("utf8"), &uri]);
    let want = volume_hash(tmp.path(), &uri);
    // Slow enough to cut it halfway.
    srv.cli(&["setting", "set", "backup-bandwidth-limit", "8388608"]);
    let b1 = srv
        .cli(&["backup", "create", "v1", "--target", "s3t"])
        .trim()
        .to_string();
    wait_for("the first blocks to land", 60, || {
        (u(&backup_state(&srv, &b1)["status"]["blocks"]["uploaded"]) >= 8).then_some(())
    });
    proxy.cut();
    let failed = wait_for("the backup to fail", 120, || {
        let b = backup_state(&srv, &b1);
        (b["status"]["state"] != "InProgress").then_some(b)
    });
    assert_eq!(failed["status"]["state"], "Error", "{failed}");
    assert!(
        !failed["status"]["error"].as_str().unwrap_or("").is_empty(),
        "{failed}"
    );
    assert!(u(&failed["status"]["progress"]) < 100);
    let counted = u(&failed["status"]["blocks"]["uploaded"]);
    // Look at the bucket directly, around the proxy.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let direct = zebu_backupstore::s3::S3Options {
        bucket: "zebu".into(),
        prefix: "backups".into(),
        endpoint: Some(format!("http://127.0.0.1:{}", s3.port)),
        region: "us-east-1".into(),
        access_key_id: "test".into(),
        secret_access_key: "verysecret".into(),
        path_style: true,
        ca_cert: None,
    };
    let (stored, manifests) = rt.block_on(async {
        use zebu_backupstore::BackupStore;
        let s = zebu_backupstore::s3::S3Store::open(&direct, false)
            .await
            .expect("open bucket");
        (
            s.list("blocks").await.expect("list").len() as u64,
            s.list("volumes").await.expect("list").len(),
        )
    });
    assert!(
        counted <= stored,
        "counted {counted} uploads but only {stored} blocks landed"
    );
    assert!(stored < 64, "the cut happened mid-backup ({stored} blocks)");
    assert_eq!(manifests, 0, "no manifest of a failed backup");

    proxy.heal();
    srv.cli(&["setting", "set", "backup-bandwidth-limit", "0"]);
    srv.cli(&["backup-target", "sync", "s3t"]);
    let b2 = backup_json(&srv, &["v1", "--target", "s3t"]);
    let st = &b2["status"];
    assert_eq!(u(&st["blocks"]["uploaded"]), 64 - stored, "{b2}");
    assert_eq!(u(&st["blocks"]["present"]), stored);
    assert_eq!(u(&st["blocks"]["zero"]), 64);
    let b2n = b2["metadata"]["name"].as_str().expect("name").to_string();
    let out = srv.cli(&["backup", "verify", &b2n, "--deep"]);
    assert!(out.contains("ok"), "{out}");
    assert_eq!(restore_hash(&srv, tmp.path(), "r1", &b2n), want);
}

#[test]
fn two_targets_resync_after_recreate_and_a_backup_killed_with_its_server_ends_definite() {
    let tmp = TempDir::new("bk-two");
    let data = tmp.path().join("data");
    let mut srv = Server::start(&data);
    let (ta, tb) = (tmp.path().join("ta"), tmp.path().join("tb"));
    srv.cli(&[
        "backup-target",
        "update",
        "default",
        "--url",
        &format!("file://{}", ta.display()),
    ]);
    let url_b = format!("file://{}", tb.display());
    srv.cli(&[
        "backup-target",
        "create",
        "extra",
        "--url",
        &url_b,
        "--poll-interval",
        "1h",
    ]);
    let uri = srv.volume("v1", "64MiB", 1);
    let img = tmp.path().join("d.img");
    write_file(&img, &[(16, None)]);
    must("nbdcopy", &[img.to_str().expect("utf8"), &uri]);
    let want = volume_hash(tmp.path(), &uri);
    let ba = backup_json(&srv, &["v1"]);
    let bb = backup_json(&srv, &["v1", "--target", "extra"]);
    let bbn = bb["metadata"]["name"].as_str().expect("name").to_string();
    assert_eq!(ba["spec"]["target"], "default");
    assert_eq!(bb["spec"]["target"], "extra");
    assert_eq!(
        u(&bb["status"]["blocks"]["uploaded"]),
        8,
        "a target dedups only within itself"
    );
    let snapshot = |dir: &Path| -> Vec<(std::path::PathBuf, String)> {
        files_under(dir)
            .into_iter()
            .map(|p| {
                let h = file_hash(&p);
                (p, h)
            })
            .collect()
    };
    let before = snapshot(&tb);
    // The default target cannot go; the extra one can, leaving its data alone.
    let (ok, _, err) = zebu_cli(
        srv.api(),
        &srv.token,
        &["backup-target", "delete", "default"],
    );
    assert!(!ok && err.lines().count() == 1, "{err}");
    srv.cli(&["backup-target", "delete", "extra"]);
    let list = json_of(&srv.cli(&["backup", "list", "--target", "extra", "-o", "json"]));
    assert_eq!(list.as_array().map(Vec::len), Some(0));
    let (ok, _, _) = zebu_cli(srv.api(), &srv.token, &["backup", "get", &bbn]);
    assert!(!ok);
    assert_eq!(snapshot(&tb), before, "remote data untouched");
    // Re-created with the same URL: its backup comes back by sync, untouched.
    srv.cli(&[
        "backup-target",
        "create",
        "extra",
        "--url",
        &url_b,
        "--poll-interval",
        "1h",
    ]);
    let back = wait_for("the backup to come back by sync", 60, || {
        let l = json_of(&srv.cli(&["backup", "list", "--target", "extra", "-o", "json"]));
        l.as_array().and_then(|a| a.first().cloned())
    });
    assert_eq!(back["metadata"]["name"], bbn.as_str());
    assert_eq!(back["status"]["state"], "Completed");
    assert_eq!(back["spec"]["volume"], "v1");
    assert_eq!(u(&back["status"]["blocks"]["total"]), 32);
    assert_eq!(
        snapshot(&tb),
        before,
        "sync never writes to the target's backups"
    );
    assert_eq!(restore_hash(&srv, tmp.path(), "r1", &bbn), want);

    // A backup whose process is SIGKILLed ends Completed or Error after the restart.
    write_file(&img, &[(48, None)]);
    must("nbdcopy", &[img.to_str().expect("utf8"), &uri]);
    srv.cli(&["setting", "set", "backup-bandwidth-limit", "2097152"]);
    let bk = srv.cli(&["backup", "create", "v1"]).trim().to_string();
    wait_for("the backup to be under way", 60, || {
        (u(&backup_state(&srv, &bk)["status"]["blocks"]["uploaded"]) >= 2).then_some(())
    });
    srv.proc.kill();
    srv = Server::start(&data);
    let end = wait_for("the interrupted backup to settle", 90, || {
        let b = backup_state(&srv, &bk);
        let s = b["status"]["state"].as_str().unwrap_or("").to_string();
        (s == "Completed" || s == "Error").then_some(b)
    });
    if end["status"]["state"] == "Error" {
        assert!(
            end["status"]["error"]
                .as_str()
                .unwrap_or("")
                .contains("interrupted"),
            "{end}"
        );
    }
    srv.cli(&["setting", "set", "backup-bandwidth-limit", "0"]);
    let v = json_of(&srv.cli(&["volume", "wait", "v1", "-o", "json"]));
    let uri = v["status"]["nbdUri"].as_str().expect("uri").to_string();
    let want2 = volume_hash(tmp.path(), &uri);
    let b = backup_json(&srv, &["v1"]);
    let bn = b["metadata"]["name"].as_str().expect("name").to_string();
    assert_eq!(restore_hash(&srv, tmp.path(), "r2", &bn), want2);
}
