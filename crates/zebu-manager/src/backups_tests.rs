//! Unit tests of the manager's backup policy without processes: a redb store and a directory
//! target in a temporary directory, manifests written straight into the target, an injected
//! clock for retention.

use std::path::Path;

use zebu_backupstore::backup::manifest_key;
use zebu_backupstore::{BackupStore, FsStore};

use super::*;
use crate::controller::check_setting;
use crate::test_fixture::Fixture;

async fn fixture() -> Fixture {
    crate::test_fixture::fixture("backups").await
}

fn manifest(volume: &str, backup: &str, created: u64) -> Manifest {
    Manifest {
        volume: volume.into(),
        backup: backup.into(),
        snapshot: format!("snap-{backup}"),
        parent: String::new(),
        created,
        volume_size: 8 << 20,
        block_size: 2 << 20,
        labels: [("env".to_string(), "prod".to_string())].into(),
        blocks: vec![None; 4],
    }
}

async fn put(target: &Path, key: &str, bytes: Vec<u8>) {
    let fs = FsStore::open(target, false).expect("open");
    fs.put(key, bytes).await.expect("put");
}

fn backup(m: &Manager, name: &str) -> Option<Backup> {
    store::get::<Backup>(&*m.store, name).expect("get")
}

#[tokio::test]
async fn sync_lists_damaged_manifests_as_error_recovers_them_and_drops_moved_folders() {
    let f = fixture().await;
    put(
        &f.target,
        &manifest_key("v1", "b1"),
        manifest("v1", "b1", 1_000).encode(),
    )
    .await;
    put(
        &f.target,
        &manifest_key("v1", "b2"),
        manifest("v1", "b2", 2_000).encode(),
    )
    .await;
    f.m.sync_target(DEFAULT_TARGET).await.expect("sync");
    let b2 = backup(&f.m, "b2").expect("b2 listed");
    assert_eq!(b2.status.state, BackupState::Completed);
    assert!(!b2.status.manifest_tag.is_empty());
    assert_eq!(
        b2.metadata.labels.get("env").map(String::as_str),
        Some("prod")
    );
    let bv = store::get::<BackupVolume>(&*f.m.store, "default.v1").expect("get");
    assert_eq!(bv.expect("bv").status.last_backup.as_deref(), Some("b2"));

    // Overwritten with garbage: Error with the reason; lastBackup falls back.
    put(&f.target, &manifest_key("v1", "b2"), b"garbage".to_vec()).await;
    f.m.sync_target(DEFAULT_TARGET).await.expect("sync");
    let b2 = backup(&f.m, "b2").expect("b2 listed");
    assert_eq!(b2.status.state, BackupState::Error);
    assert!(b2.status.error.contains("damaged"), "{}", b2.status.error);
    let bv = store::get::<BackupVolume>(&*f.m.store, "default.v1").expect("get");
    assert_eq!(bv.expect("bv").status.last_backup.as_deref(), Some("b1"));
    // Damaged manifests are not failed backups: retention leaves them.
    f.m.put_setting("failed-backup-ttl", "1").expect("setting");
    assert_eq!(f.m.expire_failed_backups(u64::MAX / 2).expect("expire"), 0);

    // Rewritten intact: Completed again.
    put(
        &f.target,
        &manifest_key("v1", "b2"),
        manifest("v1", "b2", 2_000).encode(),
    )
    .await;
    f.m.sync_target(DEFAULT_TARGET).await.expect("sync");
    assert_eq!(
        backup(&f.m, "b2").expect("b2").status.state,
        BackupState::Completed
    );

    // A manifest under another backup's path is not listed.
    put(
        &f.target,
        &manifest_key("v1", "b3"),
        manifest("v9", "b3", 3_000).encode(),
    )
    .await;
    f.m.sync_target(DEFAULT_TARGET).await.expect("sync");
    assert!(backup(&f.m, "b3").is_none());

    // The volume's folder renamed: every backup in it is gone from the listing.
    std::fs::rename(f.target.join("volumes/v1"), f.target.join("volumes/v2")).expect("rename");
    f.m.sync_target(DEFAULT_TARGET).await.expect("sync");
    assert!(backup(&f.m, "b1").is_none());
    assert!(backup(&f.m, "b2").is_none());
    assert!(
        store::get::<BackupVolume>(&*f.m.store, "default.v1")
            .expect("get")
            .is_none()
    );
}

#[tokio::test]
async fn a_failed_listing_keeps_every_backup() {
    let f = fixture().await;
    put(
        &f.target,
        &manifest_key("v1", "b1"),
        manifest("v1", "b1", 1_000).encode(),
    )
    .await;
    f.m.sync_target(DEFAULT_TARGET).await.expect("sync");
    std::fs::remove_file(f.target.join(zebu_backupstore::store::MARKER)).expect("unmount");
    f.m.sync_target(DEFAULT_TARGET).await.expect("sync");
    assert!(
        backup(&f.m, "b1").is_some(),
        "an unavailable target lists nothing away"
    );
    let t = f.m.get_target(DEFAULT_TARGET).expect("target");
    assert!(!t.status.available);
    assert!(
        !t.status.message.contains("unavailable"),
        "{}",
        t.status.message
    );
}

fn failed(name: &str, at: Option<u64>, tag: &str) -> Backup {
    Backup {
        metadata: Meta {
            name: name.into(),
            ..Default::default()
        },
        spec: BackupSpec {
            volume: "v1".into(),
            snapshot: String::new(),
            target: DEFAULT_TARGET.into(),
            full: false,
            offline: false,
        },
        status: BackupStatus {
            state: BackupState::Error,
            failed_at: at,
            manifest_tag: tag.into(),
            ..Default::default()
        },
    }
}

#[tokio::test]
async fn failed_backups_expire_after_their_retention() {
    let f = fixture().await;
    let s = &*f.m.store;
    store::create(s, &failed("old", Some(100), "")).expect("create");
    store::create(s, &failed("young", Some(190), "")).expect("create");
    store::create(s, &failed("damaged", Some(100), "tag")).expect("create");
    let mut ok = failed("ok", None, "");
    ok.status.state = BackupState::Completed;
    store::create(s, &ok).expect("create");
    f.m.put_setting("failed-backup-ttl", "60").expect("setting");
    assert_eq!(f.m.expire_failed_backups(159).expect("expire"), 0);
    assert_eq!(f.m.expire_failed_backups(160).expect("expire"), 1);
    assert!(backup(&f.m, "old").is_none());
    f.m.put_setting("failed-backup-ttl", "0").expect("setting");
    assert_eq!(
        f.m.expire_failed_backups(10_000).expect("expire"),
        0,
        "0 keeps them"
    );
    f.m.put_setting("failed-backup-ttl", "60").expect("setting");
    assert_eq!(f.m.expire_failed_backups(10_000).expect("expire"), 1);
    assert!(backup(&f.m, "young").is_none());
    assert!(backup(&f.m, "damaged").is_some());
    assert!(backup(&f.m, "ok").is_some());
}

#[tokio::test]
async fn a_new_scheme_drops_the_options_that_do_not_apply() {
    let f = fixture().await;
    let opts: BTreeMap<String, String> = [
        ("endpoint", "http://127.0.0.1:1"),
        ("secret-access-key", "s3cr3t"),
        ("region", "eu-1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let t =
        f.m.create_target("t2", "s3://bucket-x/p", Some(60), opts.clone())
            .await
            .expect("create");
    assert_eq!(
        t.spec.options.get("secret-access-key").map(String::as_str),
        Some(HIDDEN)
    );
    let url = format!("file://{}", f.dir.join("t2").display());
    let t =
        f.m.update_target("t2", Some(&url), None, BTreeMap::new(), false)
            .await
            .expect("switch to a directory");
    assert!(t.spec.options.is_empty(), "{:?}", t.spec.options);
    assert!(t.status.available);
    let t =
        f.m.update_target("t2", Some("s3://bucket-x/p"), None, opts, false)
            .await
            .expect("back to S3");
    assert_eq!(t.spec.options.len(), 3);
    let only: BTreeMap<String, String> = [("region".to_string(), "eu-2".to_string())].into();
    let t =
        f.m.update_target("t2", None, None, only, true)
            .await
            .expect("clear");
    assert_eq!(t.spec.options.keys().collect::<Vec<_>>(), vec!["region"]);
    // The same scheme keeps options; a bad one is still refused and changes nothing.
    let bad: BTreeMap<String, String> = [("colour".to_string(), "red".to_string())].into();
    assert!(
        f.m.update_target("t2", None, None, bad, false)
            .await
            .is_err()
    );
    let t = f.m.get_target("t2").expect("t2");
    assert_eq!(t.spec.options.keys().collect::<Vec<_>>(), vec!["region"]);
}

#[test]
fn settings_take_sizes_and_name_what_they_expect() {
    let ok = [
        ("backup-bandwidth-limit", "4MiB", "4194304"),
        ("backup-bandwidth-limit", "0", "0"),
        ("backup-bandwidth-limit", "1048576", "1048576"),
        ("backup-block-size", "2MiB", "2097152"),
        ("backup-block-size", "65536", "65536"),
        ("max-volume-size", "1TiB", "1099511627776"),
        ("failed-backup-ttl", "0", "0"),
        ("backup-concurrency", "16", "16"),
        ("replica-soft-anti-affinity", "false", "false"),
    ];
    for (name, value, stored) in ok {
        assert_eq!(
            check_setting(name, value).as_deref(),
            Ok(stored),
            "{name}={value}"
        );
    }
    let bad = [
        ("backup-bandwidth-limit", "4XB"),
        ("backup-bandwidth-limit", "-1"),
        ("backup-block-size", "3MiB"),
        ("backup-block-size", "32MiB"),
        ("max-volume-size", "1K"),
        ("backup-concurrency", "0"),
        ("node-down-timeout", "0"),
        ("backup-compression", "gzip"),
    ];
    for (name, value) in bad {
        let e = check_setting(name, value).expect_err(value);
        assert!(!e.is_empty());
    }
    assert!(
        check_setting("backup-bandwidth-limit", "x")
            .expect_err("x")
            .contains("MiB")
    );
}
