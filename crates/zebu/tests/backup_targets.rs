//! Backup and target correctness end to end, with a `zebu server`, real clients and real targets
//! (a directory, moto_server): blocks lost from a target are uploaded again (and `--full`
//! repairs it), a failed restore does not hold its backup, a failed backup's lease goes at once
//! and failed backups expire, damaged manifests are listed as Error, moved folders vanish, a new
//! URL replaces the listing at once, labels round-trip, secrets appear in no API answer or log,
//! availability follows a paused S3 server, and switching schemes drops foreign options.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn bk(srv: &Server, args: &[&str]) -> Value {
    let mut a = vec!["backup", "create"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--wait", "-o", "json"]);
    let b = json_of(&srv.cli(&a));
    assert_eq!(b["status"]["state"], "Completed", "{b}");
    assert_eq!(b["status"]["progress"], 100);
    b
}

fn blocks(b: &Value) -> (u64, u64, u64) {
    let c = &b["status"]["blocks"];
    (u(&c["uploaded"]), u(&c["present"]), u(&c["zero"]))
}

fn name(b: &Value) -> String {
    b["metadata"]["name"].as_str().expect("name").to_string()
}

/// Writes `mib` MiB of fresh random data at `offset` of the volume.
fn write_random(uri: &str, tmp: &Path, offset_mib: u64, mib: usize) {
    let img = tmp.join(format!("rand-{}.img", rand::random::<u32>()));
    write_file(&img, &[(mib, None)]);
    write_at(uri, &img, &format!("{offset_mib}M"), &format!("{mib}M"));
    let _ = std::fs::remove_file(img);
}

/// Points the `default` target at a directory.
fn set_dir_target(srv: &Server, dir: &Path) {
    srv.cli(&[
        "backup-target",
        "update",
        "default",
        "--url",
        &format!("file://{}", dir.display()),
    ]);
}

fn verify_ok(srv: &Server, backup: &str) {
    let r = json_of(&srv.cli(&["backup", "verify", backup, "--deep", "-o", "json"]));
    assert_eq!(r["ok"], true, "{r}");
}

fn target_json(srv: &Server, t: &str) -> Value {
    json_of(&srv.cli(&["backup-target", "get", t, "-o", "json"]))
}

fn backup_names(srv: &Server, args: &[&str]) -> Vec<String> {
    let mut a = vec!["backup", "list", "-o", "json"];
    a.extend_from_slice(args);
    json_of(&srv.cli(&a))
        .as_array()
        .expect("array")
        .iter()
        .map(name)
        .collect()
}

#[test]
fn lost_blocks_are_uploaded_again_full_repairs_and_a_failed_restore_does_not_hold_its_backup() {
    let tmp = TempDir::new("bk-lost");
    let srv = Server::start(&tmp.path().join("data"));
    let bt = tmp.path().join("target");
    set_dir_target(&srv, &bt);
    srv.cli(&[
        "volume",
        "create",
        "v1",
        "--size",
        "64MiB",
        "--replicas",
        "1",
        "--wait",
    ]);
    let v = json_of(&srv.cli(&["volume", "get", "v1", "-o", "json"]));
    assert_eq!(
        v["spec"]["backupTarget"], "default",
        "the target used is shown"
    );
    let uri = srv.cli(&["volume", "attach", "v1"]).trim().to_string();
    write_random(&uri, tmp.path(), 0, 16);
    let b1 = bk(&srv, &["v1"]);
    assert_eq!(blocks(&b1), (8, 0, 24));
    let first = files_under(&bt.join("blocks"));
    assert_eq!(first.len(), 8);
    write_random(&uri, tmp.path(), 32, 2);
    assert_eq!(blocks(&bk(&srv, &["v1"])), (1, 8, 23));
    write_random(&uri, tmp.path(), 40, 2);
    assert_eq!(blocks(&bk(&srv, &["v1"])), (1, 9, 22));

    // A block the next backup takes over unchanged is lost from the target.
    std::fs::remove_file(&first[0]).expect("remove block");
    write_random(&uri, tmp.path(), 48, 2);
    let b4 = bk(&srv, &["v1"]);
    assert_eq!(
        blocks(&b4),
        (2, 9, 21),
        "the changed block and the lost one are uploaded"
    );
    assert!(first[0].exists(), "the lost block is back");
    verify_ok(&srv, &name(&b4));
    verify_ok(&srv, &name(&b1));
    let h4 = volume_hash(tmp.path(), &uri);
    assert_eq!(restore_hash(&srv, tmp.path(), "r4", &name(&b4)), h4);

    // --full reads every block and repairs what the target lost.
    std::fs::remove_file(&first[1]).expect("remove block");
    let full = bk(&srv, &["v1", "--full"]);
    assert_eq!(full["spec"]["full"], true);
    assert_eq!(blocks(&full), (1, 10, 21));
    assert!(first[1].exists(), "--full uploaded the lost block");
    verify_ok(&srv, &name(&b1));
    assert_eq!(restore_hash(&srv, tmp.path(), "rf", &name(&full)), h4);

    // A restore that failed does not hold its backup.
    std::fs::remove_file(&first[2]).expect("remove block");
    let (ok, _, err) = zebu_cli(
        srv.api(),
        &srv.token,
        &[
            "volume",
            "create",
            "bad",
            "--from-backup",
            &name(&b1),
            "--replicas",
            "1",
            "--wait",
        ],
    );
    assert!(!ok && err.contains("missing"), "{err}");
    let v = json_of(&srv.cli(&["volume", "get", "bad", "-o", "json"]));
    assert_eq!(v["status"]["restore"]["state"], "error", "{v}");
    srv.cli(&["backup", "delete", &name(&b1)]);
    let (ok, _, _) = zebu_cli(srv.api(), &srv.token, &["backup", "get", &name(&b1)]);
    assert!(!ok, "the backup is gone");
    srv.cli(&["volume", "delete", "bad"]);
    srv.cli(&["volume", "detach", "v1"]);
}

fn lease_files(bt: &Path) -> Vec<PathBuf> {
    files_under(&bt.join("locks/backups"))
}

#[test]
fn a_failed_backup_drops_its_lease_at_once_collection_follows_and_failed_backups_expire() {
    let tmp = TempDir::new("bk-lease");
    let srv = Server::start(&tmp.path().join("data"));
    let bt = tmp.path().join("target");
    set_dir_target(&srv, &bt);
    // Size settings take units; a bad value names what is expected and changes nothing.
    let (ok, _, err) = zebu_cli(
        srv.api(),
        &srv.token,
        &["setting", "set", "backup-bandwidth-limit", "4XB"],
    );
    assert!(!ok && err.trim().lines().count() == 1, "{err}");
    assert!(err.contains("expected") && err.contains("MiB"), "{err}");
    let setting = |n: &str| -> String {
        json_of(&srv.cli(&["setting", "list", "-o", "json"]))
            .as_array()
            .expect("array")
            .iter()
            .find(|s| s["metadata"]["name"] == n)
            .map(|s| s["value"].as_str().expect("value").to_string())
            .expect("setting")
    };
    assert_eq!(setting("backup-bandwidth-limit"), "0");
    srv.cli(&["setting", "set", "backup-bandwidth-limit", "4MiB"]);
    assert_eq!(setting("backup-bandwidth-limit"), "4194304");
    srv.cli(&["setting", "set", "backup-bandwidth-limit", "0"]);

    let uri = srv.volume("v1", "32MiB", 1);
    write_random(&uri, tmp.path(), 0, 24);
    let b0 = bk(&srv, &["v1"]);
    assert_eq!(blocks(&b0).0, 12);
    let b0_blocks = files_under(&bt.join("blocks"));
    // 4 blocks only b0 will reference.
    write_random(&uri, tmp.path(), 0, 8);
    srv.cli(&["setting", "set", "backup-bandwidth-limit", "1MiB"]);
    let b1 = srv.cli(&["backup", "create", "v1"]).trim().to_string();
    wait_for("the running backup's lease", 30, || {
        (!lease_files(&bt).is_empty()).then_some(())
    });
    // Deleting b0 while b1 holds its lease defers the collection of b0's blocks.
    srv.cli(&["backup", "delete", &name(&b0)]);
    assert_eq!(files_under(&bt.join("gc/pending")).len(), 1);
    assert!(
        b0_blocks.iter().all(|p| p.exists()),
        "collection is deferred"
    );
    // The target loses its marker (an unmounted share): b1 fails, and its lease cannot be
    // removed yet.
    let marker = bt.join("zebu-backupstore.json");
    let aside = tmp.path().join("marker.aside");
    std::fs::rename(&marker, &aside).expect("move marker");
    wait_for("the backup to fail", 60, || {
        let b = json_of(&srv.cli(&["backup", "get", &b1, "-o", "json"]));
        (b["status"]["state"] == "Error").then_some(())
    });
    let t = wait_for("the target to show unavailable", 30, || {
        let t = target_json(&srv, "default");
        (t["status"]["available"] == false).then_some(t)
    });
    assert!(
        !t["status"]["message"].as_str().unwrap_or("").is_empty(),
        "{t}"
    );
    // Refused with one line that says "unavailable" once.
    let (ok, _, err) = zebu_cli(srv.api(), &srv.token, &["backup", "create", "v1"]);
    assert!(!ok && err.trim().lines().count() == 1, "{err}");
    assert_eq!(err.matches("unavailable").count(), 1, "{err}");
    assert_eq!(err.matches("backup target").count(), 1, "{err}");
    // The share comes back: the lease goes and b0's blocks are collected within seconds, not
    // after the lease's two-minute expiry.
    std::fs::rename(&aside, &marker).expect("marker back");
    wait_for(
        "the failed backup's lease to go and collection to run",
        20,
        || {
            (lease_files(&bt).is_empty()
                && files_under(&bt.join("gc/pending")).is_empty()
                && b0_blocks.iter().all(|p| !p.exists()))
            .then_some(())
        },
    );
    wait_for("the target to be available again", 20, || {
        (target_json(&srv, "default")["status"]["available"] == true).then_some(())
    });
    // Failed backups are deleted after their retention.
    srv.cli(&["setting", "set", "failed-backup-ttl", "1"]);
    wait_for("the failed backup to expire", 30, || {
        let (ok, _, _) = zebu_cli(srv.api(), &srv.token, &["backup", "get", &b1]);
        (!ok).then_some(())
    });
    srv.cli(&["setting", "set", "backup-bandwidth-limit", "0"]);
    let b2 = bk(&srv, &["v1"]);
    verify_ok(&srv, &name(&b2));
    srv.cli(&["volume", "detach", "v1"]);
}

#[test]
fn sync_lists_damaged_manifests_as_error_a_new_url_replaces_the_listing_and_labels_round_trip() {
    let tmp = TempDir::new("bk-sync");
    let srv = Server::start(&tmp.path().join("data"));
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    set_dir_target(&srv, &a);
    let uri = srv.volume("v1", "16MiB", 1);
    write_random(&uri, tmp.path(), 0, 4);
    let a1 = bk(&srv, &["v1", "--label", "env=prod", "--label", "tier=gold"]);
    let a1n = name(&a1);
    assert_eq!(a1["metadata"]["labels"]["env"], "prod", "{a1}");
    assert_eq!(a1["metadata"]["labels"]["tier"], "gold", "{a1}");
    let (ok, _, err) = zebu_cli(
        srv.api(),
        &srv.token,
        &["backup", "create", "v1", "--label", "bad key=x"],
    );
    assert!(!ok && err.contains("label"), "{err}");
    // A copy of the store with a1 only.
    must(
        "cp",
        &["-a", a.to_str().expect("utf8"), b.to_str().expect("utf8")],
    );
    write_random(&uri, tmp.path(), 4, 4);
    let a2n = name(&bk(&srv, &["v1"]));
    assert_eq!(
        backup_names(&srv, &["--label", "env=prod"]),
        vec![a1n.clone()]
    );
    assert_eq!(
        backup_names(&srv, &["--label", "env=prod", "--label", "tier=gold"]),
        vec![a1n.clone()]
    );
    assert!(backup_names(&srv, &["--label", "env=dev"]).is_empty());
    let got = json_of(&srv.cli(&["backup", "get", &a1n, "-o", "json"]));
    assert_eq!(got["metadata"]["labels"]["env"], "prod");

    // a2's manifest is overwritten with garbage: the next sync lists it as Error.
    std::fs::write(
        a.join(format!("volumes/v1/backups/{a2n}.manifest")),
        b"not a manifest at all",
    )
    .expect("garble");
    srv.cli(&["backup-target", "sync", "default"]);
    let a2 = json_of(&srv.cli(&["backup", "get", &a2n, "-o", "json"]));
    assert_eq!(a2["status"]["state"], "Error", "{a2}");
    assert!(
        a2["status"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("damaged"),
        "{a2}"
    );
    wait_for("lastBackup to fall back to a1", 10, || {
        let v = json_of(&srv.cli(&["volume", "get", "v1", "-o", "json"]));
        (v["status"]["lastBackup"] == a1n.as_str()).then_some(())
    });
    verify_ok(&srv, &a1n);

    // A new URL: the listing is the new store's when the update returns, labels included.
    set_dir_target(&srv, &b);
    assert_eq!(
        backup_names(&srv, &["--target", "default"]),
        vec![a1n.clone()]
    );
    let got = json_of(&srv.cli(&["backup", "get", &a1n, "-o", "json"]));
    assert_eq!(got["status"]["state"], "Completed");
    assert_eq!(
        got["metadata"]["labels"]["env"], "prod",
        "labels kept: {got}"
    );
    assert_eq!(
        got["metadata"]["labels"]["tier"], "gold",
        "labels kept: {got}"
    );
    assert_eq!(
        backup_names(&srv, &["--label", "env=prod"]),
        vec![a1n.clone()]
    );

    // The volume's folder is renamed: its backups are gone after a sync.
    std::fs::rename(b.join("volumes/v1"), b.join("volumes/v1-moved")).expect("rename");
    wait_for("the moved folder's backups to be gone", 20, || {
        srv.cli(&["backup-target", "sync", "default"]);
        backup_names(&srv, &["--volume", "v1"])
            .is_empty()
            .then_some(())
    });
    assert!(backup_names(&srv, &[]).is_empty());
    srv.cli(&["volume", "detach", "v1"]);
}

/// GETs an API path with the token; the body as text.
fn api_get(srv: &Server, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(srv.api()).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        srv.token
    )
    .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "GET {path}: {out}");
    out
}

fn signal(pid: u32, sig: &str) {
    must("kill", &[sig, &pid.to_string()]);
}

#[test]
fn secrets_stay_hidden_availability_follows_a_paused_s3_server_and_schemes_switch_cleanly() {
    let tmp = TempDir::new("bk-s3");
    let s3 = moto("zebu-bk");
    let log = tmp.path().join("server.log");
    let srv = Server::start_logged(&tmp.path().join("data"), Some(&log));
    let secret = format!("SeKrIt{:016x}", rand::random::<u64>());
    let endpoint = format!("endpoint=http://127.0.0.1:{}", s3.port);
    let secret_opt = format!("secret-access-key={secret}");
    let s3_opts = [
        "--option",
        endpoint.as_str(),
        "--option",
        "access-key-id=AKIAZEBUTEST",
        "--option",
        secret_opt.as_str(),
        "--option",
        "path-style=true",
        "--option",
        "region=us-east-1",
    ];
    let mut args = vec!["backup-target", "create", "s3t", "--url", "s3://zebu-bk/p"];
    args.extend_from_slice(&s3_opts);
    srv.cli(&args);
    assert_eq!(target_json(&srv, "s3t")["status"]["available"], true);
    srv.cli(&[
        "volume",
        "create",
        "v1",
        "--size",
        "16MiB",
        "--replicas",
        "1",
        "--backup-target",
        "s3t",
        "--wait",
    ]);
    let uri = srv.cli(&["volume", "attach", "v1"]).trim().to_string();
    write_random(&uri, tmp.path(), 0, 8);

    // The S3 server stops answering during a backup: the target shows unavailable with the
    // reason, then available again by itself, and the backup completes.
    srv.cli(&["setting", "set", "backup-bandwidth-limit", "1MiB"]);
    let b1 = srv.cli(&["backup", "create", "v1"]).trim().to_string();
    wait_for("the backup to start uploading", 30, || {
        let b = json_of(&srv.cli(&["backup", "get", &b1, "-o", "json"]));
        (u(&b["status"]["blocks"]["uploaded"]) > 0).then_some(())
    });
    signal(s3.child.id(), "-STOP");
    let paused = wait_for("the target to show unavailable", 45, || {
        let t = target_json(&srv, "s3t");
        (t["status"]["available"] == false).then_some(t)
    });
    signal(s3.child.id(), "-CONT");
    assert!(
        !paused["status"]["message"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "{paused}"
    );
    wait_for("the target to be available again", 45, || {
        (target_json(&srv, "s3t")["status"]["available"] == true).then_some(())
    });
    srv.cli(&["setting", "set", "backup-bandwidth-limit", "0"]);
    let b = wait_for("the backup to finish", 120, || {
        let b = json_of(&srv.cli(&["backup", "get", &b1, "-o", "json"]));
        b["status"]["state"]
            .as_str()
            .is_some_and(|s| s == "Completed" || s == "Error")
            .then_some(b)
    });
    assert_eq!(b["status"]["state"], "Completed", "{b}");
    verify_ok(&srv, &b1);

    // A standby volume keeps an engine with a restore order (and so the target) running.
    srv.cli(&[
        "volume",
        "create",
        "dr",
        "--from-backup",
        &b1,
        "--standby",
        "--replicas",
        "1",
        "--wait",
    ]);
    let engines = api_get(&srv, "/v1/engines");
    assert!(engines.contains("\"restore\""), "{engines}");
    let mut seen = String::new();
    for (method, path) in zebu_manager::api::ROUTES {
        if *method == "get" && !path.contains('{') && *path != "/v1/openapi.json" {
            seen.push_str(&api_get(&srv, path));
        }
    }
    for path in [
        "/v1/backup-targets/s3t",
        "/v1/volumes/dr",
        "/v1/volumes/v1",
        &format!("/v1/backups/{b1}"),
    ] {
        seen.push_str(&api_get(&srv, path));
    }
    for args in [
        &["backup-target", "list", "-o", "json"][..],
        &["backup-target", "get", "s3t"][..],
        &["volume", "list", "-o", "json"][..],
        &["backup", "list"][..],
    ] {
        seen.push_str(&srv.cli(args));
    }
    assert!(
        seen.contains("(hidden)"),
        "the secret option is listed as hidden"
    );
    assert!(!seen.contains(&secret), "a secret is in an API answer");

    // Switching a target from S3 to a directory drops the S3 options and says which.
    let mut args = vec!["backup-target", "create", "s3u", "--url", "s3://zebu-bk/q"];
    args.extend_from_slice(&s3_opts);
    srv.cli(&args);
    let dir = tmp.path().join("fs-target");
    let (ok, _, err) = zebu_cli(
        srv.api(),
        &srv.token,
        &[
            "backup-target",
            "update",
            "s3u",
            "--url",
            &format!("file://{}", dir.display()),
        ],
    );
    assert!(ok, "{err}");
    for opt in [
        "endpoint",
        "access-key-id",
        "secret-access-key",
        "path-style",
        "region",
    ] {
        assert!(
            err.contains(opt),
            "the dropped option {opt} is named: {err}"
        );
    }
    let t = target_json(&srv, "s3u");
    assert_eq!(t["spec"]["options"], serde_json::json!({}), "{t}");
    assert_eq!(t["status"]["available"], true, "{t}");
    let mut args = vec!["backup-target", "update", "s3u", "--url", "s3://zebu-bk/q"];
    args.extend_from_slice(&s3_opts);
    srv.cli(&args);
    assert_eq!(target_json(&srv, "s3u")["status"]["available"], true);
    srv.cli(&[
        "backup-target",
        "update",
        "s3u",
        "--clear-options",
        "--option",
        endpoint.as_str(),
        "--option",
        "path-style=true",
    ]);
    let t = target_json(&srv, "s3u");
    assert_eq!(
        t["spec"]["options"].as_object().map(|o| o.len()),
        Some(2),
        "{t}"
    );
    srv.cli(&["volume", "detach", "v1"]);
    drop(srv);
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("backup completed"), "the log was captured");
    assert!(!text.contains(&secret), "a secret is in the log");
}
