//! The BackupStore conformance suite, run against every backend available here (the file
//! system now; S3 joins when its backend lands).

use std::path::PathBuf;

use zebu_backupstore::store::{BackupStore, FsStore, MARKER, StoreError};

fn tempdir() -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "zebu-bs-test-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&p).expect("mkdir");
    p
}

async fn conformance<S: BackupStore>(s: &S) {
    // put_if_absent writes once and never overwrites.
    assert!(
        s.put_if_absent("blocks/ab/abcd.blk", b"one".to_vec())
            .await
            .expect("put")
    );
    assert!(
        !s.put_if_absent("blocks/ab/abcd.blk", b"two".to_vec())
            .await
            .expect("put again")
    );
    assert_eq!(
        s.get("blocks/ab/abcd.blk").await.expect("get"),
        Some(b"one".to_vec())
    );
    // put replaces.
    s.put("volumes/v1/backups/b1.manifest", b"m1".to_vec())
        .await
        .expect("put");
    s.put("volumes/v1/backups/b1.manifest", b"m2".to_vec())
        .await
        .expect("put");
    assert_eq!(
        s.get("volumes/v1/backups/b1.manifest").await.expect("get"),
        Some(b"m2".to_vec())
    );
    assert_eq!(s.get("volumes/v1/backups/none").await.expect("get"), None);
    assert!(s.exists("blocks/ab/abcd.blk").await.expect("exists"));
    assert!(!s.exists("blocks/ab/ffff.blk").await.expect("exists"));
    // Listing is recursive, sorted, and leaves out the marker.
    s.put("volumes/v2/backups/b9.manifest", b"x".to_vec())
        .await
        .expect("put");
    assert_eq!(
        s.list("volumes").await.expect("list"),
        vec![
            "volumes/v1/backups/b1.manifest".to_string(),
            "volumes/v2/backups/b9.manifest".to_string()
        ]
    );
    assert_eq!(
        s.list("nothing-here").await.expect("list"),
        Vec::<String>::new()
    );
    let all = s.list("").await.expect("list all");
    assert_eq!(all.len(), 3, "{all:?}");
    // Delete, twice.
    s.delete("volumes/v2/backups/b9.manifest")
        .await
        .expect("delete");
    s.delete("volumes/v2/backups/b9.manifest")
        .await
        .expect("delete missing");
    assert!(
        !s.exists("volumes/v2/backups/b9.manifest")
            .await
            .expect("exists")
    );
    // Bad keys are refused and change nothing.
    for k in [
        "",
        "/abs",
        "a/../b",
        "a//b",
        "a/./b",
        "sp ace",
        "semi;colon",
    ] {
        assert!(
            matches!(s.put(k, vec![1]).await, Err(StoreError::BadKey(_))),
            "{k:?}"
        );
    }
}

#[tokio::test]
async fn fs_store_conforms() {
    let dir = tempdir();
    let s = FsStore::open(&dir, true).expect("open");
    conformance(&s).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn an_unmounted_target_is_unavailable_not_empty() {
    let dir = tempdir();
    let s = FsStore::open(&dir, true).expect("open");
    s.put("volumes/v1/backups/b1.manifest", b"m".to_vec())
        .await
        .expect("put");
    // The mount goes away: the directory is there but empty (longhorn#9530).
    std::fs::remove_dir_all(&dir).expect("rm");
    std::fs::create_dir_all(&dir).expect("mkdir");
    match s.list("volumes").await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("a listing of an unavailable target must fail, got {other:?}"),
    }
    assert!(matches!(
        FsStore::open(&dir, false),
        Err(StoreError::Unavailable(_))
    ));
    assert!(
        !dir.join(MARKER).exists(),
        "opening without init must not create the marker"
    );
    let _ = std::fs::remove_dir_all(dir);
}
