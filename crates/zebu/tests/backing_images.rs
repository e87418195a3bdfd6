//! Backing images with real processes: a local HTTP server serving a raw ext4 image and the
//! same as qcow2; create from a URL (with and without a checksum, wrong checksum, bad URLs),
//! upload (also interrupted), clone, download; volumes on an image read its bytes through NBD
//! and keep their writes private; a manager with three nodes holds a copy per replica node,
//! follows minCopies, fetches a deleted copy again and keeps copies ready across restarts; node
//! agents SIGKILLed during downloads and node-to-node fetches end with every copy ready.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha512};

const SERVER_PY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/image_server.py"
);

fn sha512(p: &Path) -> String {
    let mut f = std::fs::File::open(p).expect("open");
    let mut h = Sha512::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A directory of files for an ext4 image, and the image (`mkfs.ext4 -d`), `mib` MiB.
fn ext4_image(dir: &Path, mib: u64) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    let mut files = Vec::new();
    for i in 0..6u64 {
        let content = block_data(i, 9, 100_000 + i as usize * 300_001);
        let name = format!("base-{i}.bin");
        std::fs::write(src.join(&name), &content).expect("write");
        files.push((name, content));
    }
    let img = dir.join("base.raw");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(mib << 20))
        .expect("image file");
    must(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            src.to_str().expect("utf8"),
            img.to_str().expect("utf8"),
        ],
    );
    (img, files)
}

/// The image server on `dir` (`rate` bytes per second, 0: unlimited).
fn image_server(dir: &Path, rate: u64) -> Proc {
    let mut cmd = Command::new("python3");
    cmd.arg(SERVER_PY).arg(dir).arg(rate.to_string());
    Proc::start_cmd("image-server", cmd)
}

fn image(api: &str, token: &str, name: &str) -> Value {
    let (ok, out, err) = zebu_cli(api, token, &["backing-image", "get", name, "-o", "json"]);
    assert!(ok, "backing-image get {name}: {err}");
    json_of(&out)
}

fn wait_state(api: &str, token: &str, name: &str, state: &str, secs: u64) -> Value {
    wait_for(&format!("backing image {name} {state}"), secs, || {
        let b = image(api, token, name);
        (b["status"]["state"] == state).then_some(b)
    })
}

fn ready_copies(b: &Value) -> Vec<String> {
    let mut v: Vec<String> = b["status"]["copies"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|c| c["state"] == "ready")
                .map(|c| c["node"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The copy directories under a node's data dir (`<name>-<uid>`).
fn copy_dirs(node_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(node_dir.join("backing-images"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn copy_of(node_dir: &Path, name: &str) -> Option<PathBuf> {
    copy_dirs(node_dir).into_iter().find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.rsplit_once('-'))
            .is_some_and(|(n, _)| n == name)
    })
}

/// An upload cut off half-way: a PUT announcing `len` bytes that sends half and closes.
fn interrupted_upload(api: &str, token: &str, name: &str, data: &[u8]) {
    let mut s = std::net::TcpStream::connect(api).expect("connect");
    write!(
        s,
        "PUT /v1/backing-images/{name}/upload HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
        data.len()
    )
    .expect("header");
    s.write_all(&data[..data.len() / 2]).expect("half");
    s.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
}

#[test]
fn sources_checksums_uploads_clones_and_volumes_on_one_server() {
    let tmp = TempDir::new("bi-server");
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let (raw, files) = ext4_image(&www, 48);
    let sum = sha512(&raw);
    must(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().expect("utf8"),
            www.join("base.qcow2").to_str().expect("utf8"),
        ],
    );
    let http = image_server(&www, 0);
    let srv = Server::start(&tmp.path().join("data"));
    let (api, token) = (srv.api().to_string(), srv.token.clone());
    let url = |p: &str| format!("http://{}/{p}", http.addr);

    // From a URL without a checksum: the computed one is recorded.
    srv.cli(&[
        "backing-image",
        "create",
        "plain",
        "--url",
        &url("base.raw"),
        "--wait",
    ]);
    let b = image(&api, &token, "plain");
    assert_eq!(b["status"]["checksum"], sum.as_str());
    assert_eq!(u(&b["status"]["virtualSize"]), 48 << 20);
    assert_eq!(ready_copies(&b), vec!["local"]);
    // With the right checksum (upper case accepted), and from qcow2: the raw bytes' SHA-512.
    srv.cli(&[
        "backing-image",
        "create",
        "summed",
        "--url",
        &url("base.raw"),
        "--checksum",
        &sum.to_uppercase(),
        "--wait",
    ]);
    srv.cli(&[
        "backing-image",
        "create",
        "q",
        "--url",
        &url("base.qcow2"),
        "--wait",
    ]);
    assert_eq!(image(&api, &token, "q")["status"]["checksum"], sum.as_str());
    // Redirects are followed.
    srv.cli(&[
        "backing-image",
        "create",
        "redir",
        "--url",
        &url("redirect/base.raw"),
        "--wait",
    ]);
    assert_eq!(
        image(&api, &token, "redir")["status"]["checksum"],
        sum.as_str()
    );
    assert_eq!(
        u(&image(&api, &token, "q")["status"]["virtualSize"]),
        48 << 20
    );

    // A wrong checksum fails the image and leaves no data behind.
    let wrong = "0".repeat(128);
    let (ok, _, err) = zebu_cli(
        &api,
        &token,
        &[
            "backing-image",
            "create",
            "wrong",
            "--url",
            &url("base.raw"),
            "--checksum",
            &wrong,
            "--wait",
        ],
    );
    assert!(!ok && err.contains("checksum mismatch"), "{err}");
    let node_dir = tmp.path().join("data").join("node");
    wait_for("the wrong image's data removed", 20, || {
        copy_of(&node_dir, "wrong").is_none().then_some(())
    });
    // Bad URLs: 404 fails at once; an unreachable server after its retries; not http at all
    // is refused before anything is stored.
    let (ok, _, err) = zebu_cli(
        &api,
        &token,
        &[
            "backing-image",
            "create",
            "nf",
            "--url",
            &url("missing.raw"),
            "--wait",
        ],
    );
    assert!(!ok && err.contains("404"), "{err}");
    // An unreachable server, one answering 503, and one cutting every transfer short: each
    // retried (1, 2, 4, 8 s apart), then failed with the reason, nothing left behind.
    let closed = format!("http://127.0.0.1:{}/x.raw", free_port());
    let failing = [
        ("unreach", closed, "Connection refused"),
        ("e503", url("fail503/base.raw"), "503"),
        ("cut", url("cut/base.raw"), "transfer cut at byte"),
    ];
    for (name, u, _) in &failing {
        srv.cli(&["backing-image", "create", name, "--url", u]);
    }
    for (name, _, why) in &failing {
        let b = wait_state(&api, &token, name, "failed", 60);
        let msg = b["status"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(why) && msg.contains("after 5 attempts"),
            "{name}: {msg}"
        );
        assert!(
            copy_of(&node_dir, name).is_none(),
            "{name} left data behind"
        );
    }
    for bad in ["ftp://example.com/x.raw", "file:///etc/passwd", "not a url"] {
        let (ok, out, err) = zebu_cli(
            &api,
            &token,
            &["backing-image", "create", "bad", "--url", bad],
        );
        assert!(!ok && out.is_empty(), "{bad}: {out}");
        assert!(
            err.contains("not an http:// or https:// URL"),
            "{bad}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let (ok, _, _) = zebu_cli(&api, &token, &["backing-image", "get", "bad"]);
    assert!(!ok);

    // Upload: the whole file, then with a wrong checksum (nothing kept), then cut off
    // half-way (the image waits for another upload) and uploaded again.
    srv.cli(&[
        "backing-image",
        "create",
        "up",
        "--upload",
        raw.to_str().expect("utf8"),
    ]);
    let up = image(&api, &token, "up");
    assert_eq!(up["status"]["checksum"], sum.as_str());
    assert_eq!(up["status"]["state"], "ready");
    let small = tmp.path().join("small.raw");
    write_file(&small, &[(3, None), (1, Some(0)), (1, None)]);
    let small_sum = sha512(&small);
    let small_s = small.to_str().expect("utf8");
    let (ok, _, err) = zebu_cli(
        &api,
        &token,
        &[
            "backing-image",
            "create",
            "upx",
            "--upload",
            "/nonexistent/file",
        ],
    );
    assert!(!ok && err.contains("/nonexistent/file"), "{err}");
    let (ok, _, _) = zebu_cli(&api, &token, &["backing-image", "get", "upx"]);
    assert!(!ok, "a missing file creates nothing");
    let (ok, _, err) = zebu_cli(
        &api,
        &token,
        &[
            "backing-image",
            "create",
            "up3",
            "--upload",
            small_s,
            "--checksum",
            &"1".repeat(128),
        ],
    );
    assert!(!ok && err.contains("checksum mismatch"), "{err}");
    assert!(
        copy_of(&node_dir, "up3").is_none(),
        "a bad upload leaves nothing"
    );
    let (ok, _, err) = zebu_cli(
        &api,
        &token,
        &[
            "backing-image",
            "create",
            "up6",
            "--upload",
            small_s,
            "--min-copies",
            "0",
        ],
    );
    assert!(!ok && err.contains("minCopies 0"), "{err}");
    let (ok, _, err) = zebu_cli(
        &api,
        &token,
        &[
            "backing-image",
            "create",
            "x",
            "--upload",
            small_s,
            "--clone",
            "up",
        ],
    );
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    let data = std::fs::read(&small).expect("read");
    ApiCall::new(&api, &token).post(
        "/v1/backing-images",
        &serde_json::json!({"name": "up6", "source": {"kind": "upload"}}),
    );
    interrupted_upload(&api, &token, "up6", &data);
    let b = wait_for("the cut upload recorded", 20, || {
        let b = image(&api, &token, "up6");
        (b["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("upload failed")))
        .then_some(b)
    });
    assert_eq!(b["status"]["state"], "pending", "{b}");
    wait_for("a cut upload leaves nothing", 20, || {
        copy_of(&node_dir, "up6").is_none().then_some(())
    });
    srv.cli(&["backing-image", "upload", "up6", small_s]);
    let b = wait_state(&api, &token, "up6", "ready", 30);
    assert_eq!(b["status"]["checksum"], small_sum.as_str());
    let (ok, _, err) = zebu_cli(&api, &token, &["backing-image", "upload", "up6", small_s]);
    assert!(!ok && err.contains("already uploaded"), "{err}");

    // Clone and download: the same bytes.
    srv.cli(&[
        "backing-image",
        "create",
        "cl",
        "--clone",
        "plain",
        "--wait",
    ]);
    assert_eq!(
        image(&api, &token, "cl")["status"]["checksum"],
        sum.as_str()
    );
    srv.cli(&["backing-image", "create", "cl6", "--clone", "up6", "--wait"]);
    for name in ["plain", "q", "up", "cl", "up6", "cl6"] {
        let out = tmp.path().join(format!("{name}.dl"));
        srv.cli(&[
            "backing-image",
            "download",
            name,
            "--output",
            out.to_str().expect("utf8"),
        ]);
        let want = if name.ends_with('6') {
            &small_sum
        } else {
            &sum
        };
        assert_eq!(&sha512(&out), want, "{name}");
    }

    // Volumes on the image: too small refused; two volumes read the image and only their own
    // writes.
    let (ok, _, err) = zebu_cli(
        &api,
        &token,
        &[
            "volume",
            "create",
            "small",
            "--size",
            "32MiB",
            "--backing-image",
            "plain",
            "--replicas",
            "1",
        ],
    );
    assert!(!ok && err.contains("smaller than backing image"), "{err}");
    let (ok, _, err) = zebu_cli(
        &api,
        &token,
        &[
            "volume",
            "create",
            "nf",
            "--size",
            "64MiB",
            "--backing-image",
            "nf",
            "--replicas",
            "1",
        ],
    );
    assert!(!ok && err.contains("not ready"), "{err}");
    for v in ["v1", "v2"] {
        srv.cli(&[
            "volume",
            "create",
            v,
            "--size",
            "64MiB",
            "--backing-image",
            "plain",
            "--replicas",
            "2",
            "--wait",
        ]);
    }
    let u1 = srv.cli(&["volume", "attach", "v1"]).trim().to_string();
    let read = tmp.path().join("v1.img");
    must("nbdcopy", &[&u1, read.to_str().expect("utf8")]);
    let mut head = std::fs::read(&read).expect("read");
    let tail = head.split_off(48 << 20);
    assert_eq!(
        head,
        std::fs::read(&raw).expect("raw"),
        "v1 reads the image"
    );
    assert!(tail.iter().all(|&b| b == 0), "past the image: zeros");
    // Write into v1 over the image's first MiB and past its end.
    let patch = tmp.path().join("patch");
    std::fs::write(&patch, block_data(1, 5, 1 << 20)).expect("patch");
    write_at(&u1, &patch, "0", "1048576");
    write_at(&u1, &patch, "52428800", "1048576");
    // Export: a named snapshot of v1 (later writes not in it), and one taken on the spot.
    srv.cli(&["snapshot", "create", "v1", "--name", "s1"]);
    let at_s1 = tmp.path().join("v1-s1.img");
    must("nbdcopy", &[&u1, at_s1.to_str().expect("utf8")]);
    let patch2 = tmp.path().join("patch2");
    std::fs::write(&patch2, block_data(2, 6, 1 << 20)).expect("patch");
    write_at(&u1, &patch2, "2097152", "1048576");
    srv.cli(&[
        "backing-image",
        "create",
        "ex",
        "--from-volume",
        "v1",
        "--snapshot",
        "s1",
        "--wait",
    ]);
    let ex = image(&api, &token, "ex");
    assert_eq!(
        ex["status"]["checksum"],
        sha512(&at_s1).as_str(),
        "export of s1"
    );
    assert_eq!(u(&ex["status"]["virtualSize"]), 64 << 20);
    let now = tmp.path().join("v1-now.img");
    must("nbdcopy", &[&u1, now.to_str().expect("utf8")]);
    srv.cli(&[
        "backing-image",
        "create",
        "ex2",
        "--from-volume",
        "v1",
        "--wait",
    ]);
    assert_eq!(
        image(&api, &token, "ex2")["status"]["checksum"],
        sha512(&now).as_str()
    );
    assert_ne!(sha512(&now), sha512(&at_s1));
    let (ok, _, err) = zebu_cli(
        &api,
        &token,
        &["backing-image", "create", "ex3", "--from-volume", "v2"],
    );
    assert!(!ok && err.contains("must be attached"), "{err}");
    let (ok, _, err) = zebu_cli(
        &api,
        &token,
        &[
            "backing-image",
            "create",
            "ex3",
            "--from-volume",
            "v1",
            "--snapshot",
            "nope",
        ],
    );
    assert!(!ok && err.contains("v1.nope"), "{err}");
    srv.cli(&["volume", "detach", "v1"]);
    let u2 = srv.cli(&["volume", "attach", "v2"]).trim().to_string();
    let read2 = tmp.path().join("v2.img");
    must("nbdcopy", &[&u2, read2.to_str().expect("utf8")]);
    let mut head2 = std::fs::read(&read2).expect("read");
    head2.truncate(48 << 20);
    assert_eq!(
        head2,
        std::fs::read(&raw).expect("raw"),
        "v2 does not see v1's writes"
    );
    // ext4 on v2 shows the image's files.
    let g = FsGuard::attach(tmp.path(), &u2, 64 << 20);
    g.mount();
    for (name, content) in &files {
        assert_eq!(
            &std::fs::read(g.mnt.join(name)).expect("file"),
            content,
            "{name}"
        );
    }
    g.umount();
    drop(g);
    srv.cli(&["volume", "detach", "v2"]);
    // In use: refused with the volumes named.
    let (ok, _, err) = zebu_cli(&api, &token, &["backing-image", "delete", "plain"]);
    assert!(!ok && err.contains("v1") && err.contains("v2"), "{err}");
    // v1 kept its writes.
    let u1 = srv.cli(&["volume", "attach", "v1"]).trim().to_string();
    let again = tmp.path().join("v1b.img");
    must("nbdcopy", &[&u1, again.to_str().expect("utf8")]);
    let got = std::fs::read(&again).expect("read");
    assert_eq!(&got[..1 << 20], &block_data(1, 5, 1 << 20)[..]);
    assert_eq!(&got[2 << 20..3 << 20], &block_data(2, 6, 1 << 20)[..]);
    let base = std::fs::read(&raw).expect("raw");
    assert_eq!(&got[1 << 20..2 << 20], &base[1 << 20..2 << 20]);
    assert_eq!(&got[3 << 20..48 << 20], &base[3 << 20..]);
    assert_eq!(&got[50 << 20..51 << 20], &block_data(1, 5, 1 << 20)[..]);
    srv.cli(&["volume", "detach", "v1"]);
    for v in ["v1", "v2"] {
        srv.cli(&["volume", "delete", v]);
    }
    srv.cli(&["backing-image", "delete", "plain"]);
    wait_for("the deleted image's copy gone", 20, || {
        copy_of(&node_dir, "plain").is_none().then_some(())
    });
}

/// Raw API calls the CLI does not make (a bare upload).
struct ApiCall {
    base: String,
    token: String,
}

impl ApiCall {
    fn new(api: &str, token: &str) -> ApiCall {
        ApiCall {
            base: format!("http://{api}"),
            token: token.to_string(),
        }
    }

    fn send(&self, method: &str, path: &str, ctype: &str, body: &[u8]) -> (u16, String) {
        let addr = self.base.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.token,
            body.len()
        )
        .expect("header");
        s.write_all(body).expect("body");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("answer");
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, out)
    }

    fn post(&self, path: &str, v: &Value) {
        let (st, out) = self.send("POST", path, "application/json", v.to_string().as_bytes());
        assert!((200..300).contains(&st), "POST {path}: {out}");
    }
}

/// A manager and `n` node agents (n1, n2, …) with their data dirs under `dir`.
struct Cluster {
    mgr: Proc,
    token: String,
    nodes: Vec<Proc>,
    dirs: Vec<PathBuf>,
}

impl Cluster {
    fn start(dir: &Path, n: usize) -> Cluster {
        let (mgr, token) = manager_proc(&dir.join("mgr"), "127.0.0.1:0");
        let dirs: Vec<PathBuf> = (1..=n).map(|i| dir.join(format!("n{i}"))).collect();
        let nodes = dirs
            .iter()
            .enumerate()
            .map(|(i, d)| node_proc(&format!("n{}", i + 1), &mgr.addr, &token, d))
            .collect();
        let c = Cluster {
            mgr,
            token,
            nodes,
            dirs,
        };
        wait_for("every node up", 30, || {
            let ns = json_of(&c.cli(&["node", "list", "-o", "json"]));
            (ns.as_array()?
                .iter()
                .filter(|x| x["status"]["state"] == "up" && x["status"]["transferAddress"] != "")
                .count()
                == n)
                .then_some(())
        });
        c
    }

    fn api(&self) -> &str {
        &self.mgr.addr
    }

    fn cli(&self, args: &[&str]) -> String {
        let (ok, out, err) = zebu_cli(&self.mgr.addr, &self.token, args);
        assert!(ok, "zebu {args:?}: {err}");
        out
    }

    fn image(&self, name: &str) -> Value {
        image(self.api(), &self.token, name)
    }

    /// SIGKILLs node `i` (0-based) and starts it again on the same data dir.
    fn restart(&mut self, i: usize) {
        self.nodes[i].kill();
        self.nodes[i] = node_proc(
            &format!("n{}", i + 1),
            &self.mgr.addr,
            &self.token,
            &self.dirs[i],
        );
    }
}

fn ino(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.ino()).unwrap_or(0)
}

#[test]
fn three_nodes_hold_copies_follow_min_copies_and_keep_them_across_restarts() {
    let tmp = TempDir::new("bi-cluster");
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let (raw, files) = ext4_image(&www, 48);
    let sum = sha512(&raw);
    std::fs::copy(&raw, www.join("extra.raw")).expect("copy");
    let http = image_server(&www, 0);
    let mut c = Cluster::start(tmp.path(), 3);
    let url = |p: &str| format!("http://{}/{p}", http.addr);
    c.cli(&[
        "backing-image",
        "create",
        "base",
        "--url",
        &url("base.raw"),
        "--wait",
    ]);
    assert_eq!(
        ready_copies(&c.image("base")),
        vec!["n1"],
        "the first copy only"
    );

    // A 3-replica volume: a ready copy on each node, fetched from a peer.
    c.cli(&[
        "volume",
        "create",
        "v1",
        "--size",
        "64MiB",
        "--backing-image",
        "base",
        "--replicas",
        "3",
        "--wait",
    ]);
    let b = wait_for("a ready copy on every replica node", 60, || {
        let b = c.image("base");
        (ready_copies(&b) == ["n1", "n2", "n3"]).then_some(b)
    });
    assert_eq!(b["status"]["checksum"], sum.as_str());
    for d in &c.dirs {
        let copy = copy_of(d, "base").expect("copy dir");
        assert_eq!(sha512(&copy.join("image.raw")), sum, "{}", d.display());
    }
    let u1 = c
        .cli(&["volume", "attach", "v1", "--node", "n2"])
        .trim()
        .to_string();
    let read = tmp.path().join("v1.img");
    must("nbdcopy", &[&u1, read.to_str().expect("utf8")]);
    let got = std::fs::read(&read).expect("read");
    assert_eq!(
        &got[..48 << 20],
        &std::fs::read(&raw).expect("raw")[..],
        "v1 reads the image"
    );
    // ext4 on v1: the image's files, and one of its own.
    let g = FsGuard::attach(tmp.path(), &u1, 64 << 20);
    g.mount();
    for (name, content) in &files {
        assert_eq!(
            &std::fs::read(g.mnt.join(name)).expect("file"),
            content,
            "{name}"
        );
    }
    std::fs::write(g.mnt.join("mine.txt"), b"written to v1 only").expect("write");
    g.umount();
    drop(g);
    // A second volume on the image does not see it.
    c.cli(&[
        "volume",
        "create",
        "v2",
        "--size",
        "64MiB",
        "--backing-image",
        "base",
        "--replicas",
        "2",
        "--wait",
    ]);
    let u2 = c
        .cli(&["volume", "attach", "v2", "--node", "n3"])
        .trim()
        .to_string();
    let g = FsGuard::attach(tmp.path(), &u2, 64 << 20);
    g.mount();
    assert!(!g.mnt.join("mine.txt").exists(), "v2 sees v1's write");
    for (name, content) in &files {
        assert_eq!(
            &std::fs::read(g.mnt.join(name)).expect("file"),
            content,
            "{name}"
        );
    }
    g.umount();
    drop(g);
    c.cli(&["volume", "detach", "v2"]);

    // minCopies up and down.
    c.cli(&[
        "backing-image",
        "create",
        "extra",
        "--url",
        &url("extra.raw"),
        "--wait",
    ]);
    assert_eq!(ready_copies(&c.image("extra")).len(), 1);
    c.cli(&["backing-image", "update", "extra", "--min-copies", "3"]);
    wait_for("three copies of extra", 60, || {
        (ready_copies(&c.image("extra")) == ["n1", "n2", "n3"]).then_some(())
    });
    c.cli(&["backing-image", "update", "extra", "--min-copies", "1"]);
    wait_for("extra back to one copy, on disk too", 30, || {
        let kept = ready_copies(&c.image("extra"));
        let on_disk = c
            .dirs
            .iter()
            .filter(|d| copy_of(d, "extra").is_some())
            .count();
        (kept.len() == 1 && on_disk == 1).then_some(())
    });

    // A copy's file deleted on n3 comes back (n3's replica of v1 keeps reading its open file).
    let n3copy = copy_of(&c.dirs[2], "base").expect("n3 copy");
    std::fs::remove_file(n3copy.join("image.raw")).expect("delete the copy's file");
    wait_for("n3's copy fetched again", 60, || {
        let back = n3copy.join("image.raw").exists()
            && ready_copies(&c.image("base")) == ["n1", "n2", "n3"];
        back.then_some(())
    });
    assert_eq!(sha512(&n3copy.join("image.raw")), sum);

    // n2 (running v1's engine) SIGKILLed and restarted: its copy stays ready (the same file,
    // not fetched again) and v1 serves the same bytes again.
    let n2raw = copy_of(&c.dirs[1], "base")
        .expect("n2 copy")
        .join("image.raw");
    let before = ino(&n2raw);
    let want = volume_hash(tmp.path(), &u1);
    c.restart(1);
    // The restarted agent serves on a new port: wait for that one, not the old status.
    let old = u1.clone();
    let u1 = wait_for("v1 attached again on n2", 90, || {
        let v = json_of(&c.cli(&["volume", "get", "v1", "-o", "json"]));
        (v["status"]["state"] == "attached")
            .then(|| v["status"]["nbdUri"].as_str().map(str::to_string))
            .flatten()
            .filter(|u| *u != old)
    });
    assert_eq!(volume_hash(tmp.path(), &u1), want, "v1 after n2's restart");
    assert_eq!(ino(&n2raw), before, "n2's copy was fetched again");
    assert_eq!(ready_copies(&c.image("base")), vec!["n1", "n2", "n3"]);
    // Still refused while in use.
    let (ok, _, err) = zebu_cli(c.api(), &c.token, &["backing-image", "delete", "base"]);
    assert!(!ok && err.contains("v1"), "{err}");
}

#[test]
fn node_agents_killed_during_downloads_and_peer_fetches_end_with_ready_copies() {
    let tmp = TempDir::new("bi-kill");
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let img = www.join("slow.raw");
    write_file(&img, &[(8, None), (4, Some(0)), (8, None)]);
    let sum = sha512(&img);
    let big = www.join("big.raw");
    write_file(&big, &[(96, None)]);
    let big_sum = sha512(&big);
    // 10 MiB/s: a download takes about 2 s.
    let http = image_server(&www, 10 << 20);
    let mut c = Cluster::start(tmp.path(), 2);
    let url = |p: &str| format!("http://{}/{p}", http.addr);
    let mut rng = rand::random::<u64>();
    let mut next = |max: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % max
    };
    // Downloads: n1 (first by name) takes the first copy and is killed at a random point.
    for i in 0..10 {
        let name = format!("dl{i}");
        c.cli(&["backing-image", "create", &name, "--url", &url("slow.raw")]);
        let at = next(2500);
        std::thread::sleep(Duration::from_millis(at));
        c.restart(0);
        let b = wait_state(c.api(), &c.token, &name, "ready", 90);
        assert_eq!(
            b["status"]["checksum"],
            sum.as_str(),
            "{name} (killed after {at} ms)"
        );
        let copies = ready_copies(&b);
        assert_eq!(copies.len(), 1, "{name}: {b}");
        let dir = if copies[0] == "n1" {
            &c.dirs[0]
        } else {
            &c.dirs[1]
        };
        let copy = copy_of(dir, &name).expect("copy");
        assert_eq!(
            sha512(&copy.join("image.raw")),
            sum,
            "{name} (killed after {at} ms)"
        );
        assert!(!copy.join("image.part").exists());
        c.cli(&["backing-image", "delete", &name]);
    }
    // Node-to-node: n2 fetches from n1 and is killed at a random point.
    c.cli(&[
        "backing-image",
        "create",
        "pf",
        "--url",
        &url("big.raw"),
        "--wait",
    ]);
    let first = ready_copies(&c.image("pf"));
    assert_eq!(first.len(), 1);
    let (src, dst) = if first[0] == "n1" { (0, 1) } else { (1, 0) };
    for i in 0..10 {
        c.cli(&["backing-image", "update", "pf", "--min-copies", "2"]);
        let at = next(400);
        std::thread::sleep(Duration::from_millis(at));
        c.restart(dst);
        wait_for(
            &format!("both copies ready (round {i}, killed after {at} ms)"),
            90,
            || (ready_copies(&c.image("pf")).len() == 2).then_some(()),
        );
        let copy = copy_of(&c.dirs[dst], "pf").expect("copy");
        assert_eq!(sha512(&copy.join("image.raw")), big_sum, "round {i}");
        c.cli(&["backing-image", "update", "pf", "--min-copies", "1"]);
        wait_for("back to the one copy", 30, || {
            (copy_of(&c.dirs[dst], "pf").is_none() && ready_copies(&c.image("pf")).len() == 1)
                .then_some(())
        });
        assert!(copy_of(&c.dirs[src], "pf").is_some());
    }
    // A volume on the image on both nodes reads it.
    c.cli(&[
        "volume",
        "create",
        "pv",
        "--size",
        "96MiB",
        "--backing-image",
        "pf",
        "--replicas",
        "2",
        "--wait",
    ]);
    let uri = c
        .cli(&["volume", "attach", "pv", "--node", "n2"])
        .trim()
        .to_string();
    let read = tmp.path().join("pv.img");
    must("nbdcopy", &[&uri, read.to_str().expect("utf8")]);
    assert_eq!(sha512(&read), big_sum);
}

#[test]
fn image_backups_share_blocks_and_restore_images_and_volumes_on_a_new_server() {
    let tmp = TempDir::new("bi-backup");
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let (raw, _) = ext4_image(&www, 48);
    let sum = sha512(&raw);
    std::fs::copy(&raw, www.join("other.raw")).expect("copy");
    let http = image_server(&www, 0);
    let url = |p: &str| format!("http://{}/{p}", http.addr);
    let (t1, t2) = (tmp.path().join("t1"), tmp.path().join("t2"));
    let t1u = format!("file://{}", t1.display());
    let t2u = format!("file://{}", t2.display());
    let a = Server::start(&tmp.path().join("a"));
    a.cli(&["backup-target", "update", "default", "--url", &t1u]);
    a.cli(&["backup-target", "create", "extra", "--url", &t2u]);
    a.cli(&[
        "backing-image",
        "create",
        "base",
        "--url",
        &url("base.raw"),
        "--wait",
    ]);
    // The image to both targets.
    let bb1 = a
        .cli(&["backing-image", "backup", "base", "--wait"])
        .trim()
        .to_string();
    let bb2 = a
        .cli(&[
            "backing-image",
            "backup",
            "base",
            "--target",
            "extra",
            "--wait",
        ])
        .trim()
        .to_string();
    let b = json_of(&a.cli(&["backup", "get", &bb1, "-o", "json"]));
    assert_eq!(b["spec"]["volume"], "bi.base");
    assert_eq!(
        b["metadata"]["labels"]["backing-image-checksum"],
        sum.as_str()
    );
    assert!(
        t1.join("backing-images/base/backups")
            .join(format!("{bb1}.manifest"))
            .exists()
    );
    // A volume on the image, written in its first block only, backed up: the image's blocks
    // are already in the target, so only the changed block is uploaded.
    a.cli(&[
        "volume",
        "create",
        "v1",
        "--size",
        "64MiB",
        "--backing-image",
        "base",
        "--replicas",
        "1",
        "--wait",
    ]);
    let u1 = a.cli(&["volume", "attach", "v1"]).trim().to_string();
    let patch = tmp.path().join("patch");
    std::fs::write(&patch, block_data(3, 3, 1 << 20)).expect("patch");
    write_at(&u1, &patch, "0", "1048576");
    let want = volume_hash(tmp.path(), &u1);
    let vb = a
        .cli(&["backup", "create", "v1", "--wait"])
        .trim()
        .to_string();
    let b = json_of(&a.cli(&["backup", "get", &vb, "-o", "json"]));
    assert_eq!(b["metadata"]["labels"]["backing-image"], "base");
    assert_eq!(u(&b["status"]["blocks"]["uploaded"]), 1, "{b}");
    // A volume on an image that has no backup: its backup cannot be restored without it.
    a.cli(&[
        "backing-image",
        "create",
        "other",
        "--url",
        &url("other.raw"),
        "--wait",
    ]);
    a.cli(&[
        "volume",
        "create",
        "v2",
        "--size",
        "48MiB",
        "--backing-image",
        "other",
        "--replicas",
        "1",
        "--wait",
    ]);
    a.cli(&["volume", "attach", "v2"]);
    let ob = a
        .cli(&["backup", "create", "v2", "--wait"])
        .trim()
        .to_string();
    a.cli(&["volume", "detach", "v2"]);
    a.cli(&["volume", "delete", "v2"]);
    a.cli(&["backing-image", "delete", "other"]);
    let (ok, _, err) = zebu_cli(
        a.api(),
        &a.token,
        &["volume", "create", "r2", "--from-backup", &ob],
    );
    assert!(
        !ok && err.contains("\"other\"") && err.contains("no backup"),
        "{err}"
    );
    // A backing-image backup is not a volume's.
    let (ok, _, err) = zebu_cli(
        a.api(),
        &a.token,
        &["volume", "create", "r3", "--from-backup", &bb1],
    );
    assert!(!ok && err.contains("--from-backup"), "{err}");
    drop(a);

    // A new server on the same targets: the image comes back from either target, and a volume
    // restored from v1's backup restores its image first and reads as v1 did.
    let b = Server::start(&tmp.path().join("b"));
    b.cli(&["backup-target", "update", "default", "--url", &t1u]);
    b.cli(&["backup-target", "create", "extra", "--url", &t2u]);
    for t in ["default", "extra"] {
        b.cli(&["backup-target", "sync", t]);
    }
    let listed = json_of(&b.cli(&["backup", "list", "-o", "json"]));
    for name in [&bb1, &bb2, &vb] {
        assert!(
            listed
                .as_array()
                .is_some_and(|a| a.iter().any(|x| &x["metadata"]["name"] == name)),
            "{name} not listed: {listed}"
        );
    }
    b.cli(&[
        "backing-image",
        "create",
        "copy2",
        "--from-backup",
        &bb2,
        "--wait",
    ]);
    let c2 = json_of(&b.cli(&["backing-image", "get", "copy2", "-o", "json"]));
    assert_eq!(c2["status"]["checksum"], sum.as_str());
    let dl = tmp.path().join("copy2.raw");
    b.cli(&[
        "backing-image",
        "download",
        "copy2",
        "--output",
        dl.to_str().expect("utf8"),
    ]);
    assert_eq!(sha512(&dl), sum);
    b.cli(&[
        "volume",
        "create",
        "r1",
        "--from-backup",
        &vb,
        "--replicas",
        "1",
        "--wait",
    ]);
    let img = json_of(&b.cli(&["backing-image", "get", "base", "-o", "json"]));
    assert_eq!(img["status"]["state"], "ready");
    assert_eq!(img["spec"]["source"]["kind"], "restore");
    assert_eq!(img["spec"]["source"]["backup"], bb1.as_str());
    let v = json_of(&b.cli(&["volume", "get", "r1", "-o", "json"]));
    assert_eq!(v["spec"]["backingImage"], "base");
    let ur = b.cli(&["volume", "attach", "r1"]).trim().to_string();
    assert_eq!(volume_hash(tmp.path(), &ur), want, "r1 reads as v1 did");
    // Deleting the image's backup keeps every block the volume's backup shares with it.
    b.cli(&["backup", "delete", &bb1]);
    assert!(
        !t1.join("backing-images/base/backups")
            .join(format!("{bb1}.manifest"))
            .exists()
    );
    b.cli(&["backup", "verify", &vb, "--deep"]);
}
