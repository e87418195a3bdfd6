//! The BackupStore conformance suite, run against every backend available here (the file
//! system now; S3 joins when its backend lands).

use std::path::PathBuf;

use zebu_backupstore::s3::{S3Options, S3Store};
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
    // A listing with metadata: sizes, and a tag that changes when an object is rewritten.
    let meta = s.list_meta("volumes").await.expect("list meta");
    assert_eq!(meta.len(), 2);
    assert_eq!(meta[1].size, 1);
    let before = meta[0].tag.clone();
    assert!(!before.is_empty());
    s.put("volumes/v1/backups/b1.manifest", b"m3-longer".to_vec())
        .await
        .expect("put");
    let meta = s.list_meta("volumes").await.expect("list meta");
    assert_eq!(meta[0].size, 9);
    assert_ne!(meta[0].tag, before, "a rewrite changes the tag");
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

/// A moto S3 server on a loopback port, killed on drop.
struct Moto {
    child: std::process::Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto() -> Moto {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let child = std::process::Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("moto_server (the test command installs moto[server] with pip)");
    let m = Moto { child, port };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "moto_server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    m
}

fn create_bucket(port: u16, bucket: &str) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(s, "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "create bucket: {out}");
}

fn s3_options(port: u16, bucket: &str, prefix: &str) -> S3Options {
    S3Options {
        bucket: bucket.into(),
        prefix: prefix.into(),
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: "us-east-1".into(),
        access_key_id: "test".into(),
        secret_access_key: "test".into(),
        path_style: true,
        ca_cert: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_conforms_on_moto() {
    let m = moto();
    create_bucket(m.port, "zebu");
    // An uninitialised bucket is unavailable, not empty.
    match S3Store::open(&s3_options(m.port, "zebu", "t1"), false).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("want Unavailable, got {other:?}"),
    }
    let s = S3Store::open(&s3_options(m.port, "zebu", "t1"), true)
        .await
        .expect("open");
    conformance(&s).await;
    // A second target under another prefix of the same bucket is separate.
    let other = S3Store::open(&s3_options(m.port, "zebu", "t2"), true)
        .await
        .expect("open");
    assert!(other.list("").await.expect("list").is_empty());
    // The server goes away: operations fail, listing included.
    drop(m);
    assert!(
        s.list("volumes").await.is_err(),
        "a listing of an unreachable target must fail"
    );
}
