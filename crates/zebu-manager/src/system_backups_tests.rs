//! System backup policy without processes: a redb store and a directory target in a temporary
//! directory, objects written straight into the store, an injected clock for deadlines.

use zebu_backupstore::{BackupStore, FsStore};

use super::*;
use crate::test_fixture::Fixture;

async fn fixture() -> Fixture {
    let f = crate::test_fixture::fixture("sysbackup").await;
    f.m.set_clock(1_000);
    f.m.check_target(DEFAULT_TARGET, true).await.expect("check");
    f
}

fn volume(m: &Manager, name: &str, state: VolumeState, detached_at: Option<u64>) {
    let v = Volume {
        metadata: Meta {
            name: name.into(),
            ..Default::default()
        },
        spec: VolumeSpec {
            size: 8 << 20,
            replicas: 1,
            backup_target: DEFAULT_TARGET.into(),
            ..Default::default()
        },
        status: VolumeStatus {
            state,
            detached_at,
            ..Default::default()
        },
    };
    store::create(&*m.store, &v).expect("volume");
}

fn completed(m: &Manager, name: &str, volume: &str, created_ms: u64, completed_at: u64) {
    let b = Backup {
        metadata: Meta {
            name: name.into(),
            ..Default::default()
        },
        spec: BackupSpec {
            volume: volume.into(),
            snapshot: name.into(),
            target: DEFAULT_TARGET.into(),
            full: false,
            offline: false,
        },
        status: BackupStatus {
            state: BackupState::Completed,
            created_ms,
            completed_at: Some(completed_at),
            ..Default::default()
        },
    };
    store::create(&*m.store, &b).expect("backup");
}

fn planned(m: &Manager, name: &str, policy: VolumeBackupPolicy) -> SystemBackup {
    let sb = m.create_system_backup(name, policy, None).expect("create");
    m.plan_system_backup(&sb).expect("plan");
    store::get::<SystemBackup>(&*m.store, name)
        .expect("get")
        .expect("sb")
}

fn entry<'a>(sb: &'a SystemBackup, v: &str) -> &'a SystemVolume {
    sb.status
        .volumes
        .iter()
        .find(|e| e.name == v)
        .unwrap_or_else(|| panic!("{v} not recorded"))
}

#[tokio::test]
async fn policies_choose_or_make_each_volumes_backup_by_name() {
    let f = fixture().await;
    let m = &f.m;
    // current: detached at 100, its newest backup completed at 200 (an older one at 50).
    volume(m, "current", VolumeState::Detached, Some(100));
    completed(m, "old", "current", 1, 50);
    completed(m, "newest", "current", 2, 200);
    // stale: written (detached) after its backup.
    volume(m, "stale", VolumeState::Detached, Some(300));
    completed(m, "before", "stale", 3, 200);
    // attached: may be written to at any time.
    volume(m, "attached", VolumeState::Attached, Some(100));
    completed(m, "att", "attached", 4, 200);
    // never: no backup at all.
    volume(m, "never", VolumeState::Detached, Some(100));

    let sb = planned(m, "off", VolumeBackupPolicy::Disabled);
    assert_eq!(sb.status.state, SystemBackupState::CreatingBackups);
    assert_eq!(entry(&sb, "current").backup, "newest");
    assert_eq!(entry(&sb, "stale").backup, "before");
    assert_eq!(entry(&sb, "attached").backup, "att");
    assert!(entry(&sb, "never").backup.is_empty());
    assert!(entry(&sb, "never").note.contains("not restorable"));
    assert!(sb.status.volumes.iter().all(|e| !e.created && e.done));

    let sb = planned(m, "inp", VolumeBackupPolicy::IfNotPresent);
    assert_eq!(entry(&sb, "current").backup, "newest");
    assert!(!entry(&sb, "current").created);
    for v in ["stale", "attached", "never"] {
        let e = entry(&sb, v);
        assert!(e.created && !e.done, "{v}: {e:?}");
        assert_eq!(e.backup, child_name(&sb, v));
        let b = store::get::<Backup>(&*m.store, &e.backup)
            .expect("get")
            .expect("made");
        assert!(b.spec.offline, "{v}: may run while detached");
        assert_eq!(
            b.metadata.labels.get(SYSTEM_BACKUP_LABEL),
            Some(&"inp".to_string())
        );
    }
    // Planning again (a restarted manager) makes nothing new: the names are the same.
    let before = store::list::<Backup>(&*m.store).expect("list").len();
    m.plan_system_backup(&sb).expect("again");
    assert_eq!(
        store::list::<Backup>(&*m.store).expect("list").len(),
        before
    );

    let sb = planned(m, "all", VolumeBackupPolicy::Always);
    assert!(
        sb.status.volumes.iter().all(|e| e.created),
        "{:?}",
        sb.status.volumes
    );
}

#[tokio::test]
async fn waits_end_in_error_naming_the_backup_that_failed_or_did_not_finish() {
    let f = fixture().await;
    let m = &f.m;
    volume(m, "a", VolumeState::Detached, None);
    volume(m, "b", VolumeState::Detached, None);
    let sb = planned(m, "sb", VolumeBackupPolicy::Always);
    let (ba, bb) = (
        entry(&sb, "a").backup.clone(),
        entry(&sb, "b").backup.clone(),
    );
    // a completes; b still runs: waiting, progress moves.
    store::modify::<Backup>(&*m.store, &ba, |b| {
        b.status.state = BackupState::Completed;
        true
    })
    .expect("modify");
    m.check_system_backup(&sb).expect("check");
    let sb = store::get::<SystemBackup>(&*m.store, "sb")
        .expect("get")
        .expect("sb");
    assert_eq!(sb.status.state, SystemBackupState::CreatingBackups);
    assert_eq!(sb.status.progress, 50);
    assert!(sb.status.message.contains(&bb), "{}", sb.status.message);
    // Past the deadline: error naming b's backup.
    m.set_clock(1_000 + 3_601);
    m.check_system_backup(&sb).expect("check");
    let sb = store::get::<SystemBackup>(&*m.store, "sb")
        .expect("get")
        .expect("sb");
    assert_eq!(sb.status.state, SystemBackupState::Error);
    assert!(
        sb.status.message.contains("gave up") && sb.status.message.contains(&bb),
        "{}",
        sb.status.message
    );
    // A failed backup fails the system backup at once, with its error.
    m.set_clock(1_000);
    let sb2 = planned(m, "sb2", VolumeBackupPolicy::Always);
    let b2 = entry(&sb2, "a").backup.clone();
    store::modify::<Backup>(&*m.store, &b2, |b| {
        b.status.state = BackupState::Error;
        b.status.error = "target full".into();
        true
    })
    .expect("modify");
    m.check_system_backup(&sb2).expect("check");
    let sb2 = store::get::<SystemBackup>(&*m.store, "sb2")
        .expect("get")
        .expect("sb");
    assert_eq!(sb2.status.state, SystemBackupState::Error);
    assert!(
        sb2.status.message.contains("target full"),
        "{}",
        sb2.status.message
    );
}

#[tokio::test]
async fn sync_lists_documents_leaves_running_ones_and_delete_removes_exactly_one() {
    let f = fixture().await;
    let m = &f.m;
    let fs = FsStore::open(&f.target, false).expect("open");
    for n in ["sb", "sb-1", "sb2"] {
        let d = Document {
            name: n.into(),
            created_at: 5,
            version: "0.1.0".into(),
            ..Default::default()
        };
        fs.put(&document_key(n), d.encode().expect("encode"))
            .await
            .expect("put");
    }
    fs.put(&document_key("bad"), b"garbage".to_vec())
        .await
        .expect("put");
    // A system backup of this cluster still running: no document yet.
    volume(m, "a", VolumeState::Detached, None);
    let running = m
        .create_system_backup("running", VolumeBackupPolicy::Always, None)
        .expect("create");
    m.plan_system_backup(&running).expect("plan");
    m.sync_target(DEFAULT_TARGET).await.expect("sync");
    let get = |n: &str| store::get::<SystemBackup>(&*m.store, n).expect("get");
    for n in ["sb", "sb-1", "sb2"] {
        assert_eq!(get(n).expect(n).status.state, SystemBackupState::Ready);
    }
    let bad = get("bad").expect("bad");
    assert_eq!(bad.status.state, SystemBackupState::Error);
    assert!(
        bad.status.message.contains("damaged"),
        "{}",
        bad.status.message
    );
    assert_eq!(
        get("running").expect("running").status.state,
        SystemBackupState::CreatingBackups
    );
    // A document gone from the target: its ready object goes; the running one stays.
    fs.delete(&document_key("sb-1")).await.expect("delete");
    m.sync_target(DEFAULT_TARGET).await.expect("sync");
    assert!(get("sb-1").is_none());
    assert!(get("running").is_some());
    // Deleting sb removes its document alone.
    m.delete_system_backup("sb").await.expect("delete");
    assert!(fs.get(&document_key("sb")).await.expect("get").is_none());
    assert!(fs.get(&document_key("sb2")).await.expect("get").is_some());
    assert!(get("sb").is_none() && get("sb2").is_some());
}
