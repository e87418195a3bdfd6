//! Test harness: real `zebu` processes on loopback ports, killed on drop; deadlines instead of
//! sleeps; temporary directories removed on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ZEBU: &str = env!("CARGO_BIN_EXE_zebu");

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "zebu-e2e-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).expect("mkdir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process, SIGKILLed and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub addr: String,
    pub name: String,
}

impl Proc {
    /// Starts `zebu ARGS` and waits for its "... listening on ADDR" line.
    pub fn start(name: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new(ZEBU);
        cmd.args(args);
        Proc::start_cmd(name, cmd)
    }

    /// Starts a prepared `zebu` command and waits for its "... listening on ADDR" line.
    pub fn start_cmd(name: &str, cmd: Command) -> Proc {
        Proc::start_logged(name, cmd, None)
    }

    /// Like [`Proc::start_cmd`], with its log (stderr) appended to `log` when given.
    pub fn start_logged(name: &str, mut cmd: Command, log: Option<&Path>) -> Proc {
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let mut child = cmd
            .env(
                "ZEBU_LOG",
                std::env::var("ZEBU_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(match log {
                Some(p) => Stdio::from(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .expect("log file"),
                ),
                None => Stdio::inherit(),
            })
            .spawn()
            .unwrap_or_else(|e| panic!("spawn zebu {args:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && line.contains("listening on ") {
                    let addr = line.rsplit(' ').next().unwrap_or_default().to_string();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("{name} did not start: zebu {args:?}");
            }
        };
        Proc {
            child,
            addr,
            name: name.to_string(),
        }
    }

    pub fn kill(&mut self) {
        // SIGKILL, like a crash.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` until it returns Some, or panics after `secs` seconds naming `what`.
pub fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command, returning (success, stdout+stderr).
pub fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (the test command installs it): {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn must(cmd: &str, args: &[&str]) -> String {
    let (ok, out) = run(cmd, args);
    assert!(ok, "{cmd} {args:?} failed:\n{out}");
    out
}

/// BLAKE3 of a file.
pub fn file_hash(p: &Path) -> String {
    let data = std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    blake3::hash(&data).to_hex().to_string()
}

/// Content for block `blk` written as version `tag`: distinct for every (block, tag).
pub fn block_data(blk: u64, tag: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, chunk) in v.chunks_mut(16).enumerate() {
        let mut w = [0u8; 16];
        w[..8].copy_from_slice(&blk.to_le_bytes());
        w[8..].copy_from_slice(&(tag ^ (i as u64) << 40).to_le_bytes());
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
    v
}

/// Whole-volume BLAKE3 of one replica, read directly over the replica protocol.
pub async fn replica_hash(addr: &str, volume: &str, generation: u64, size: u64) -> String {
    use zebu_engine::proto::{Request, Response};
    let c = zebu_engine::ReplicaClient::connect(
        addr,
        volume,
        zebu_types::Generation(generation),
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|e| panic!("connect replica {addr}: {e}"));
    let mut h = blake3::Hasher::new();
    let mut off = 0;
    while off < size {
        let len = (size - off).min(8 << 20) as u32;
        match c
            .call(&Request::Read { offset: off, len })
            .await
            .expect("replica read")
        {
            Response::Data(d) => {
                h.update(&d);
            }
            other => panic!("unexpected {other:?}"),
        }
        off += len as u64;
    }
    h.finalize().to_hex().to_string()
}

/// Runs the `zebu` CLI against an API; returns (success, stdout, stderr).
pub fn zebu_cli(api: &str, token: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(ZEBU)
        .args(args)
        .env("ZEBU_API", format!("http://{api}"))
        .env("ZEBU_TOKEN", token)
        .env("ZEBU_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run zebu");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An all-in-one `zebu server` on ephemeral ports.
pub struct Server {
    pub proc: Proc,
    pub data: PathBuf,
    pub token: String,
}

impl Server {
    pub fn start(data: &Path) -> Server {
        Server::start_logged(data, None)
    }

    /// A server whose log goes to `log` (appended) instead of the test's stderr.
    pub fn start_logged(data: &Path, log: Option<&Path>) -> Server {
        let mut cmd = Command::new(ZEBU);
        cmd.args([
            "server",
            "--data-dir",
            data.to_str().expect("utf8"),
            "--api-listen",
            "127.0.0.1:0",
            "--nbd-listen",
            "127.0.0.1:0",
        ]);
        let proc = Proc::start_logged("server", cmd, log);
        let token = std::fs::read_to_string(data.join("api-token"))
            .expect("api-token")
            .trim()
            .to_string();
        Server {
            proc,
            data: data.to_path_buf(),
            token,
        }
    }

    pub fn api(&self) -> &str {
        &self.proc.addr
    }

    /// Runs the CLI; panics with its stderr if it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let (ok, out, err) = zebu_cli(self.api(), &self.token, args);
        assert!(ok, "zebu {args:?} failed: {err}");
        out
    }

    /// Creates a volume, attaches it and returns its NBD URI.
    pub fn volume(&self, name: &str, size: &str, replicas: u32) -> String {
        self.cli(&[
            "volume",
            "create",
            name,
            "--size",
            size,
            "--replicas",
            &replicas.to_string(),
            "--wait",
        ]);
        self.cli(&["volume", "attach", name]).trim().to_string()
    }
}

/// A moto S3 server on a loopback port, killed on drop.
pub struct Moto {
    pub child: Child,
    pub port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Starts moto_server and creates `bucket` in it.
pub fn moto(bucket: &str) -> Moto {
    use std::io::{Read, Write};
    let port = free_port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server (the test command installs moto[server] with pip)");
    let m = Moto { child, port };
    wait_for("moto_server to listen", 60, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(s, "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "create bucket: {out}");
    m
}

/// A TCP proxy on loopback that can cut every connection (and refuse new ones) until healed.
pub struct Proxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = l.local_addr().expect("addr").port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, cs) = (cut.clone(), conns.clone());
        std::thread::spawn(move || {
            for inc in l.incoming() {
                let Ok(down) = inc else { continue };
                if c.load(Ordering::SeqCst) {
                    let _ = down.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(up) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                if let Ok(mut g) = cs.lock() {
                    for s in [&down, &up] {
                        if let Ok(s) = s.try_clone() {
                            g.push(s);
                        }
                    }
                }
                for (mut a, mut b) in [
                    (down.try_clone(), up.try_clone()),
                    (up.try_clone(), down.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Proxy { port, cut, conns }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut g) = self.conns.lock() {
            for s in g.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A `zebu node` agent process with ephemeral ports.
pub fn node_proc(name: &str, manager: &str, token: &str, dir: &std::path::Path) -> Proc {
    node_logged(name, manager, token, dir, None)
}

/// Like [`node_proc`], with the node's log appended to `log` when given.
pub fn node_logged(
    name: &str,
    manager: &str,
    token: &str,
    dir: &std::path::Path,
    log: Option<&Path>,
) -> Proc {
    let mut child = std::process::Command::new(ZEBU);
    child
        .args([
            "node",
            "--manager",
            &format!("http://{manager}"),
            "--data-dir",
            dir.to_str().expect("utf8"),
            "--nbd-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--name",
            name,
        ])
        .env("ZEBU_TOKEN", token);
    Proc::start_logged(name, child, log)
}

/// A `zebu manager` on `listen` with its data in `dir`; returns it and its API token.
pub fn manager_proc(dir: &Path, listen: &str) -> (Proc, String) {
    manager_logged(dir, listen, None)
}

/// Like [`manager_proc`], with the manager's log appended to `log` when given.
pub fn manager_logged(dir: &Path, listen: &str, log: Option<&Path>) -> (Proc, String) {
    let mut cmd = Command::new(ZEBU);
    cmd.args([
        "manager",
        "--data-dir",
        dir.to_str().expect("utf8"),
        "--api-listen",
        listen,
    ]);
    let mgr = Proc::start_logged("manager", cmd, log);
    let token = std::fs::read_to_string(dir.join("api-token"))
        .expect("token")
        .trim()
        .to_string();
    (mgr, token)
}

pub fn json_of(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

pub fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// BLAKE3 of a whole volume, read through NBD with nbdcopy.
pub fn volume_hash(tmp: &Path, uri: &str) -> String {
    let out = tmp.join(format!("read-{}.img", rand::random::<u32>()));
    must("nbdcopy", &[uri, out.to_str().expect("utf8")]);
    let h = file_hash(&out);
    let _ = std::fs::remove_file(&out);
    h
}

pub fn write_file(p: &Path, chunks: &[(usize, Option<u8>)]) {
    use std::io::Write;
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

pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
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
pub fn restore_hash(srv: &Server, tmp: &Path, name: &str, backup: &str) -> String {
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

pub fn write_at(uri: &str, file: &Path, offset: &str, len: &str) {
    let out = must(
        "qemu-io",
        &[
            "-f",
            "raw",
            uri,
            "-c",
            &format!("write -s {} {offset} {len}", file.display()),
            "-c",
            "flush",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
}

/// Unmounts, detaches and stops what the ext4 test set up, also when it fails.
pub struct FsGuard {
    pub mnt: PathBuf,
    pub fuse: PathBuf,
    pub loopdev: Option<String>,
    pub nbdfuse: Option<std::process::Child>,
}

impl Drop for FsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).output();
        if let Some(l) = &self.loopdev {
            let _ = std::process::Command::new("losetup")
                .args(["-d", l])
                .output();
        }
        let _ = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg(&self.fuse)
            .output();
        if let Some(mut c) = self.nbdfuse.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl FsGuard {
    /// Exposes the NBD export `uri` (of `size` bytes) as a file through nbdfuse and as a loop
    /// device over it, under `dir`; `mnt` is ready for `mount`.
    pub fn attach(dir: &Path, uri: &str, size: u64) -> FsGuard {
        let tag = rand::random::<u32>();
        let fuse = dir.join(format!("fuse-{tag}"));
        let mnt = dir.join(format!("mnt-{tag}"));
        std::fs::create_dir_all(&fuse).expect("mkdir");
        std::fs::create_dir_all(&mnt).expect("mkdir");
        let mut g = FsGuard {
            mnt,
            fuse: fuse.clone(),
            loopdev: None,
            nbdfuse: None,
        };
        g.nbdfuse = Some(
            std::process::Command::new("nbdfuse")
                .arg(&fuse)
                .arg(uri)
                .spawn()
                .expect("nbdfuse (the test command installs libnbd-bin)"),
        );
        let dev = fuse.join("nbd");
        wait_for("nbdfuse to expose the volume", 30, || {
            std::fs::metadata(&dev)
                .ok()
                .filter(|m| m.len() == size)
                .map(|_| ())
        });
        let loopdev = must("losetup", &["-f", "--show", dev.to_str().expect("utf8")])
            .trim()
            .to_string();
        g.loopdev = Some(loopdev);
        g
    }

    pub fn loop_dev(&self) -> &str {
        self.loopdev.as_deref().unwrap_or_default()
    }

    pub fn mount(&self) {
        must(
            "mount",
            &[self.loop_dev(), self.mnt.to_str().expect("utf8")],
        );
    }

    pub fn umount(&self) {
        must("umount", &[self.mnt.to_str().expect("utf8")]);
    }
}
