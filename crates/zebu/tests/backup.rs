//! Backups end to end with real processes and clients: a `zebu server`, qemu-io and nbdcopy on
//! the volumes, a directory target and an S3 target (moto_server behind a cuttable proxy), the
//! CLI with `-o json` counts, restores compared by whole-volume checksums, verify, corruption,
//! deletion, two targets with re-sync, and a server SIGKILLed mid-backup.
//!
//! Over 800 lines on purpose: one test binary for the backup and DR scenarios, which share their helpers.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

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
    // An unmounted target (its directory gone) is unavailable, never "no backups".
    let off = tmp.path().join("tb.unmounted");
    std::fs::rename(&tb, &off).expect("unmount");
    let (ok, _, err) = zebu_cli(srv.api(), &srv.token, &["backup-target", "sync", "extra"]);
    assert!(!ok && err.contains("unavailable"), "{err}");
    let t = json_of(&srv.cli(&["backup-target", "get", "extra", "-o", "json"]));
    assert_eq!(t["status"]["available"], false);
    let l = json_of(&srv.cli(&["backup", "list", "--target", "extra", "-o", "json"]));
    assert_eq!(l.as_array().map(Vec::len), Some(1), "its backups stay: {l}");
    let (ok, _, err) = zebu_cli(
        srv.api(),
        &srv.token,
        &["backup", "create", "v1", "--target", "extra"],
    );
    assert!(!ok && err.contains("unavailable"), "{err}");
    std::fs::rename(&off, &tb).expect("mount");
    srv.cli(&["backup-target", "sync", "extra"]);
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

fn vol(srv: &Server, name: &str) -> Value {
    json_of(&srv.cli(&["volume", "get", name, "-o", "json"]))
}

/// Waits until a standby volume holds `backup`.
fn wait_restored(srv: &Server, name: &str, backup: &str) -> Value {
    wait_for(&format!("{name} to restore {backup}"), 120, || {
        let v = vol(srv, name);
        (v["status"]["restore"]["lastRestoredBackup"] == backup
            && v["status"]["restore"]["state"] == "completed")
            .then_some(v)
    })
}

fn snapshot_names(srv: &Server, name: &str) -> Vec<String> {
    json_of(&srv.cli(&["snapshot", "list", name, "-o", "json"]))
        .as_array()
        .expect("array")
        .iter()
        .map(|s| s["name"].as_str().expect("name").to_string())
        .collect()
}

/// Activates a standby volume, attaches it and returns its whole-volume hash.
fn activate_hash(srv: &Server, tmp: &Path, name: &str) -> (String, String) {
    let v = json_of(&srv.cli(&["volume", "activate", name, "-o", "json"]));
    assert_eq!(v["spec"]["standby"], false, "{v}");
    let uri = srv.cli(&["volume", "attach", name]).trim().to_string();
    (volume_hash(tmp, &uri), uri)
}

/// Longhorn's `test_restore_inc`, black-box: three standby volumes follow a volume's backups by
/// incremental restore; each is activated at a different backup and must equal the volume at
/// that backup. Then growth, and lastBackup falling back as backups are deleted.
#[test]
fn standby_volumes_follow_backups_incrementally_and_activate() {
    let tmp = TempDir::new("dr");
    let srv = Server::start(&tmp.path().join("data"));
    let url = format!("file://{}", tmp.path().join("drt").display());
    srv.cli(&["backup-target", "create", "dr", "--url", &url]);
    srv.cli(&[
        "volume",
        "create",
        "v",
        "--size",
        "32MiB",
        "--replicas",
        "2",
        "--backup-target",
        "dr",
        "--wait",
    ]);
    let uri = srv.cli(&["volume", "attach", "v"]).trim().to_string();
    let r4 = tmp.path().join("r4.img");
    write_file(&r4, &[(4, None)]);
    write_at(&uri, &r4, "0", "4M");
    srv.cli(&["snapshot", "create", "v", "--name", "s0"]);
    let b0 = backup_json(&srv, &["v", "--snapshot", "s0"]);
    let b0n = b0["metadata"]["name"].as_str().expect("name").to_string();
    let h0 = volume_hash(tmp.path(), &uri);

    for dr in ["dr0", "dr1", "dr2"] {
        srv.cli(&[
            "volume",
            "create",
            dr,
            "--from-backup",
            &b0n,
            "--standby",
            "--replicas",
            "2",
            "--wait",
        ]);
        let v = wait_restored(&srv, dr, &b0n);
        assert_eq!(v["spec"]["standby"], true);
        assert!(v["status"].get("nbdUri").is_none(), "no frontend: {v}");
        assert_eq!(v["status"]["lastBackup"], b0n.as_str());
        assert_eq!(v["status"]["restore"]["requestedBackup"], b0n.as_str());
        assert_eq!(
            snapshot_names(&srv, dr),
            vec![format!("restore-{b0n}"), "volume-head".to_string()]
        );
    }
    // Everything a standby volume must refuse, each with one clear line.
    let refuse = |args: &[&str], word: &str| {
        let (ok, out, err) = zebu_cli(srv.api(), &srv.token, args);
        assert!(!ok, "{args:?} must be refused: {out}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(word), "{args:?}: {err}");
    };
    refuse(&["volume", "attach", "dr0"], "standby");
    refuse(&["snapshot", "create", "dr0"], "standby");
    refuse(&["snapshot", "delete", "dr0", "x"], "standby");
    refuse(&["backup", "create", "dr0"], "standby");
    refuse(&["volume", "expand", "dr0", "--size", "64MiB"], "standby");
    refuse(&["backup-target", "delete", "dr"], "dr0");
    refuse(
        &[
            "backup-target",
            "update",
            "dr",
            "--url",
            "file:///nonexistent",
        ],
        "standby",
    );
    refuse(&["volume", "activate", "v"], "not a standby");
    let (h, _) = activate_hash(&srv, tmp.path(), "dr0");
    assert_eq!(h, h0, "dr0 equals v at backup0");

    // data1: 2 MiB of zeros at 0.
    let out = must(
        "qemu-io",
        &["-f", "raw", &uri, "-c", "write -z 0 2M", "-c", "flush"],
    );
    assert!(!out.contains("failed"), "{out}");
    let b1 = backup_json(&srv, &["v"]);
    let b1n = b1["metadata"]["name"].as_str().expect("name").to_string();
    let h1 = volume_hash(tmp.path(), &uri);
    let v = wait_restored(&srv, "dr1", &b1n);
    assert_eq!(v["status"]["lastBackup"], b1n.as_str());
    assert_eq!(v["status"]["restore"]["requestedBackup"], b1n.as_str());
    wait_for("dr1's snapshot list to be current", 30, || {
        (snapshot_names(&srv, "dr1") == vec![format!("restore-{b1n}"), "volume-head".to_string()])
            .then_some(())
    });
    let (h, dr1_uri) = activate_hash(&srv, tmp.path(), "dr1");
    assert_eq!(h, h1, "dr1 equals v at backup1");
    let out = must("qemu-io", &["-f", "raw", &dr1_uri, "-c", "read -P 0 0 2M"]);
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "{out}"
    );

    // data2: 1 MiB random at 0.
    let r1 = tmp.path().join("r1.img");
    write_file(&r1, &[(1, None)]);
    write_at(&uri, &r1, "0", "1M");
    let b2 = backup_json(&srv, &["v"]);
    let b2n = b2["metadata"]["name"].as_str().expect("name").to_string();
    let h2 = volume_hash(tmp.path(), &uri);
    wait_restored(&srv, "dr2", &b2n);
    let (h, dr2_uri) = activate_hash(&srv, tmp.path(), "dr2");
    assert_eq!(h, h2, "dr2 equals v at backup2");
    // An ordinary volume now: detach, attach, write, back up.
    srv.cli(&["volume", "detach", "dr2"]);
    let dr2_uri2 = srv.cli(&["volume", "attach", "dr2"]).trim().to_string();
    assert_eq!(dr2_uri, dr2_uri2);
    let out = must(
        "qemu-io",
        &[
            "-f",
            "raw",
            &dr2_uri2,
            "-c",
            "write -P 0x3c 8M 1M",
            "-c",
            "read -P 0x3c 8M 1M",
        ],
    );
    assert!(
        !out.contains("failed") && !out.contains("verification"),
        "{out}"
    );
    backup_json(&srv, &["dr2"]);
    for d in ["dr0", "dr1", "dr2"] {
        srv.cli(&["volume", "detach", d]);
    }

    // Growth: the source grows and is backed up; the standby grows and matches.
    srv.cli(&[
        "volume",
        "create",
        "dr3",
        "--from-backup",
        &b2n,
        "--standby",
        "--replicas",
        "2",
        "--wait",
    ]);
    wait_restored(&srv, "dr3", &b2n);
    srv.cli(&["volume", "detach", "v"]);
    srv.cli(&["volume", "expand", "v", "--size", "64MiB"]);
    let uri = srv.cli(&["volume", "attach", "v"]).trim().to_string();
    write_at(&uri, &r1, "40M", "1M");
    let b3 = backup_json(&srv, &["v"]);
    let b3n = b3["metadata"]["name"].as_str().expect("name").to_string();
    let v = wait_restored(&srv, "dr3", &b3n);
    assert_eq!(u(&v["spec"]["size"]), 64 << 20, "the standby grew: {v}");
    // Deleting the newest backup (a bad one): the standby follows the newest that still
    // exists, backwards, and past backup2's end it reads zeros.
    srv.cli(&["backup", "delete", &b3n]);
    wait_for("lastBackup to fall back", 30, || {
        (vol(&srv, "dr3")["status"]["lastBackup"] == b2n.as_str()).then_some(())
    });
    wait_restored(&srv, "dr3", &b2n);
    for b in [&b0n, &b1n, &b2n] {
        srv.cli(&["backup", "delete", b]);
    }
    wait_for("lastBackup to clear", 30, || {
        vol(&srv, "dr3")["status"]
            .get("lastBackup")
            .is_none()
            .then_some(())
    });
    let v = vol(&srv, "dr3");
    assert_eq!(v["status"]["restore"]["lastRestoredBackup"], b2n.as_str());
    let (_, uri) = activate_hash(&srv, tmp.path(), "dr3");
    let img = tmp.path().join("dr3.img");
    must("nbdcopy", &[&uri, img.to_str().expect("utf8")]);
    let bytes = std::fs::read(&img).expect("read image");
    assert_eq!(bytes.len(), 64 << 20);
    assert_eq!(
        blake3::hash(&bytes[..32 << 20]).to_hex().to_string(),
        h2,
        "dr3 equals v at backup2, still activatable without backups"
    );
    assert!(
        bytes[32 << 20..].iter().all(|b| *b == 0),
        "zeros past backup2's end"
    );
}

/// SIGKILL of the server (manager and the node with every DR replica) while a standby volume
/// applies 64 MiB of changes: after the restart the restore resumes and the volume equals the
/// backup. A backup whose block is missing fails the restore clearly and leaves the last good
/// data.
#[test]
fn standby_restore_survives_a_sigkill_and_a_missing_block_keeps_the_last_good_state() {
    let tmp = TempDir::new("dr-kill");
    let data = tmp.path().join("data");
    let mut srv = Server::start(&data);
    let bt = tmp.path().join("t");
    srv.cli(&[
        "backup-target",
        "update",
        "default",
        "--url",
        &format!("file://{}", bt.display()),
    ]);
    let uri = srv.volume("v", "128MiB", 1);
    let img = tmp.path().join("a.img");
    write_file(&img, &[(16, None)]);
    write_at(&uri, &img, "0", "16M");
    let b0 = backup_json(&srv, &["v"]);
    let b0n = b0["metadata"]["name"].as_str().expect("name").to_string();
    srv.cli(&[
        "volume",
        "create",
        "dr",
        "--from-backup",
        &b0n,
        "--standby",
        "--replicas",
        "2",
        "--wait",
    ]);
    wait_restored(&srv, "dr", &b0n);
    // 64 MiB of changes, applied slowly enough to kill the server halfway.
    write_file(&img, &[(64, None)]);
    write_at(&uri, &img, "32M", "64M");
    srv.cli(&["setting", "set", "backup-bandwidth-limit", "16777216"]);
    let b1 = backup_json(&srv, &["v"]);
    let b1n = b1["metadata"]["name"].as_str().expect("name").to_string();
    let h1 = volume_hash(tmp.path(), &uri);
    wait_for("the incremental restore to be under way", 60, || {
        let v = vol(&srv, "dr");
        (v["status"]["restore"]["requestedBackup"] == b1n.as_str()
            && v["status"]["restore"]["state"] == "restoring"
            && u(&v["status"]["restore"]["progress"]) >= 10)
            .then_some(())
    });
    srv.proc.kill();
    srv = Server::start(&data);
    let v = wait_restored(&srv, "dr", &b1n);
    assert_eq!(v["spec"]["standby"], true);
    srv.cli(&["setting", "set", "backup-bandwidth-limit", "0"]);
    // The NBD port of the restarted server differs.
    let v = json_of(&srv.cli(&["volume", "wait", "v", "-o", "json"]));
    let uri = v["status"]["nbdUri"].as_str().expect("uri").to_string();

    // A backup with a missing block: the restore fails naming it; the data stays at b1.
    write_file(&img, &[(4, None)]);
    write_at(&uri, &img, "0", "4M");
    let b2 = backup_json(&srv, &["v"]);
    let b2n = b2["metadata"]["name"].as_str().expect("name").to_string();
    let m1 = zebu_backupstore::Manifest::decode(
        &std::fs::read(bt.join(format!("volumes/v/backups/{b1n}.manifest"))).expect("m1"),
    )
    .expect("m1");
    let m2 = zebu_backupstore::Manifest::decode(
        &std::fs::read(bt.join(format!("volumes/v/backups/{b2n}.manifest"))).expect("m2"),
    )
    .expect("m2");
    let only2: Vec<_> = m2
        .referenced()
        .difference(&m1.referenced())
        .copied()
        .collect();
    assert!(!only2.is_empty());
    let _ = wait_restored(&srv, "dr", &b2n);
    // A new standby from b1, created after one of b2's blocks is gone: its step to b2 fails.
    let victim = bt.join(zebu_backupstore::backup::block_key(&only2[0]));
    std::fs::remove_file(&victim).expect("remove block");
    srv.cli(&[
        "volume",
        "create",
        "dr3",
        "--from-backup",
        &b1n,
        "--standby",
        "--replicas",
        "1",
        "--wait",
    ]);
    let failed = wait_for("dr3's incremental restore to fail", 60, || {
        let v = vol(&srv, "dr3");
        (v["status"]["restore"]["state"] == "error").then_some(v)
    });
    let err = failed["status"]["restore"]["error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(err.contains(&only2[0].to_hex()), "names the block: {err}");
    assert_eq!(
        failed["status"]["restore"]["lastRestoredBackup"],
        b1n.as_str()
    );
    let (ok, _, msg) = zebu_cli(srv.api(), &srv.token, &["volume", "activate", "dr3"]);
    assert!(
        !ok && msg.contains(&only2[0].to_hex()),
        "activation fails with the reason: {msg}"
    );
    // The data of dr3 is still b1's: make it activatable by deleting b2, then compare.
    srv.cli(&["backup", "delete", &b2n]);
    let (h, _) = activate_hash(&srv, tmp.path(), "dr3");
    assert_eq!(h, h1, "dr3 kept its last good state (backup1)");
    // dr had reached b2; with b2 deleted it follows the newest backup that exists, b1.
    let v = wait_restored(&srv, "dr", &b1n);
    assert_eq!(v["status"]["restore"]["lastRestoredBackup"], b1n.as_str());
    let (h, _) = activate_hash(&srv, tmp.path(), "dr");
    assert_eq!(h, h1, "dr followed back to backup1");
}

/// A manager and two node agents; a standby volume with a replica on each node. SIGKILL the node
/// holding a DR replica but not the engine during one incremental restore, then the engine's node
/// during the next: each restore resumes and the activated volume equals the source.
#[test]
fn standby_restore_across_nodes_survives_killing_either_node() {
    let tmp = TempDir::new("dr-nodes");
    let (mgr, token) = manager_proc(&tmp.path().join("manager"), "127.0.0.1:0");
    let cli = |args: &[&str]| {
        let (ok, out, err) = zebu_cli(&mgr.addr, &token, args);
        assert!(ok, "zebu {args:?}: {err}");
        out
    };
    let dirs: Vec<std::path::PathBuf> = (1..=2).map(|i| tmp.path().join(format!("n{i}"))).collect();
    let mut nodes: Vec<Proc> = (0..2)
        .map(|i| node_proc(&format!("n{}", i + 1), &mgr.addr, &token, &dirs[i]))
        .collect();
    wait_for("two nodes up", 30, || {
        let n = json_of(&cli(&["node", "list", "-o", "json"]));
        (n.as_array()
            .map(|a| a.iter().filter(|x| x["status"]["state"] == "up").count())
            == Some(2))
        .then_some(())
    });
    let bt = tmp.path().join("t");
    cli(&[
        "backup-target",
        "update",
        "default",
        "--url",
        &format!("file://{}", bt.display()),
    ]);
    cli(&[
        "volume",
        "create",
        "v",
        "--size",
        "128MiB",
        "--replicas",
        "1",
        "--wait",
    ]);
    let mut uri = cli(&["volume", "attach", "v", "--node", "n1"])
        .trim()
        .to_string();
    let img = tmp.path().join("a.img");
    write_file(&img, &[(16, None)]);
    write_at(&uri, &img, "0", "16M");
    let backup = |args: &[&str]| -> String {
        let mut a = vec!["backup", "create"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--wait", "-o", "json"]);
        let b = json_of(&cli(&a));
        assert_eq!(b["status"]["state"], "Completed", "{b}");
        b["metadata"]["name"].as_str().expect("name").to_string()
    };
    let b0 = backup(&["v"]);
    cli(&[
        "volume",
        "create",
        "dr",
        "--from-backup",
        &b0,
        "--standby",
        "--replicas",
        "2",
        "--wait",
    ]);
    let dr = |field: &str| -> Value {
        let v = json_of(&cli(&["volume", "get", "dr", "-o", "json"]));
        v["status"]["restore"][field].clone()
    };
    wait_for("dr to hold b0", 60, || {
        (dr("lastRestoredBackup") == b0.as_str()).then_some(())
    });
    let reps = json_of(&cli(&["replica", "list", "--volume", "dr", "-o", "json"]));
    let mut placed: Vec<String> = reps
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["spec"]["node"].as_str().unwrap_or("").to_string())
        .collect();
    placed.sort();
    assert_eq!(placed, vec!["n1", "n2"], "one DR replica per node");
    let engine_node = || -> String {
        let api = zebu_manager::client::ApiClient::new(&format!("http://{}", mgr.addr), &token)
            .expect("client");
        let rt = tokio::runtime::Runtime::new().expect("rt");
        let es: Vec<Value> = rt.block_on(api.get("/v1/engines")).expect("engines");
        es.iter()
            .find(|e| e["spec"]["volume"] == "dr")
            .and_then(|e| e["spec"]["node"].as_str())
            .expect("dr engine")
            .to_string()
    };
    cli(&["setting", "set", "backup-bandwidth-limit", "16777216"]);
    let mut want = String::new();
    for round in 0..2 {
        // 64 MiB of changes; kill the replica-only node, then the engine's node.
        write_file(&img, &[(64, None)]);
        write_at(&uri, &img, "32M", "64M");
        let b = backup(&["v"]);
        want = volume_hash(tmp.path(), &uri);
        wait_for("the incremental restore to be under way", 60, || {
            (dr("requestedBackup") == b.as_str()
                && dr("state") == "restoring"
                && u(&dr("progress")) >= 10)
                .then_some(())
        });
        let en = engine_node();
        let victim = if round == 0 {
            if en == "n1" { 1 } else { 0 }
        } else if en == "n1" {
            0
        } else {
            1
        };
        nodes[victim].kill();
        nodes[victim] = node_proc(
            &format!("n{}", victim + 1),
            &mgr.addr,
            &token,
            &dirs[victim],
        );
        wait_for("dr to hold the new backup", 120, || {
            (dr("lastRestoredBackup") == b.as_str() && dr("state") == "completed").then_some(())
        });
        // The source's node may have been the one restarted: its NBD address changed.
        let v = json_of(&cli(&["volume", "wait", "v", "-o", "json"]));
        uri = v["status"]["nbdUri"].as_str().expect("uri").to_string();
        assert_eq!(volume_hash(tmp.path(), &uri), want);
    }
    cli(&["setting", "set", "backup-bandwidth-limit", "0"]);
    let v = json_of(&cli(&["volume", "activate", "dr", "-o", "json"]));
    assert_eq!(v["spec"]["standby"], false);
    let dr_uri = cli(&["volume", "attach", "dr", "--node", "n2"])
        .trim()
        .to_string();
    json_of(&cli(&["volume", "wait", "dr", "-o", "json"]));
    // Reads alternate between the two replicas, so a whole-volume match means both hold it.
    assert_eq!(volume_hash(tmp.path(), &dr_uri), want);
}
