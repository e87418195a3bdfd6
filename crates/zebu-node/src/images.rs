//! Backing-image copies on this node: one directory per copy under `DATA_DIR/backing-images/`,
//! fetched from a URL or a peer node (resumed where the server allows ranges), received from an
//! upload, converted from qcow2, verified by SHA-512 and then recorded durably, so that a restart
//! finds ready copies ready and resumes what it interrupted.
//!
//! Layout of `<name>-<uid>/`: `image.part` while bytes arrive, `image.raw` once verified, and
//! `copy.json` (written last, atomically) saying it is ready: name, uid, size, checksum and the
//! raw file's mtime and inode, so that a later check re-hashes only a file that changed.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};
use tokio::sync::Notify;
use tokio::time::Instant;
use zebu_api::model::{BackingImageState, CopyOrder, CopyRef, CopyReport, CopySource};

/// The ready record's format version.
const COPY_META_VERSION: u32 = 1;
const META: &str = "copy.json";
const RAW: &str = "image.raw";
const PART: &str = "image.part";
/// Attempts at a URL before the copy fails for good, 1, 2, 4 and 8 s apart (peers are retried
/// without end, at most 30 s apart).
const URL_ATTEMPTS: u32 = 5;
/// How often ready copies are checked on disk (a stat each; a re-hash only for a changed file).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// What makes a copy ready, written once it is verified.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CopyMeta {
    version: u32,
    name: String,
    uid: String,
    size: u64,
    checksum: String,
    mtime_ns: i128,
    inode: u64,
}

/// Where a transfer reads from.
enum From {
    Url(String),
    /// A peer's copy (its URL).
    Peer(String),
    /// A snapshot of a volume, through its engine here.
    Export(Arc<zebu_engine::Engine>, String),
    /// A backing-image backup: (target, owner, backup).
    Restore(zebu_api::model::TargetRef, String, String),
}

/// Why a transfer stopped.
#[derive(Debug)]
enum Failure {
    /// Worth another attempt (connection, 5xx, cut body, local I/O).
    Retry(String),
    /// Will not get better (4xx, checksum mismatch, a source that is not an image).
    Fatal(String),
}

fn retry(e: impl std::fmt::Display) -> Failure {
    Failure::Retry(e.to_string())
}

struct Entry {
    uid: String,
    state: BackingImageState,
    /// Bytes received and expected (0: unknown).
    done: u64,
    total: u64,
    checksum: String,
    message: String,
    task: Option<tokio::task::AbortHandle>,
    attempts: u32,
    /// No new attempt before this.
    retry_at: Option<Instant>,
}

impl Entry {
    fn new(uid: &str) -> Entry {
        Entry {
            uid: uid.to_string(),
            state: BackingImageState::Pending,
            done: 0,
            total: 0,
            checksum: String::new(),
            message: String::new(),
            task: None,
            attempts: 0,
            retry_at: None,
        }
    }

    fn report(&self, name: &str) -> CopyReport {
        let progress = match self.state {
            BackingImageState::Ready => 100,
            _ if self.total > 0 => (self.done.min(self.total) * 99 / self.total) as u32,
            _ => 0,
        };
        CopyReport {
            name: name.to_string(),
            uid: self.uid.clone(),
            state: self.state,
            progress,
            size: self.total,
            checksum: self.checksum.clone(),
            message: self.message.clone(),
        }
    }
}

/// The copies on this node.
pub struct Copies {
    dir: PathBuf,
    http: reqwest::Client,
    /// Bearer token peers require.
    token: String,
    entries: Mutex<HashMap<String, Entry>>,
    /// Wakes the heartbeat loop when a copy changes state.
    wake: Arc<Notify>,
    /// Restores copies from backups.
    transfers: Arc<dyn crate::Transfers>,
}

/// Whether `uid` is an object uid (32 hex digits): nothing else reaches a path.
fn valid_uid(uid: &str) -> bool {
    uid.len() == 32 && uid.bytes().all(|b| b.is_ascii_hexdigit())
}

fn valid_ref(name: &str, uid: &str) -> bool {
    zebu_types::validate_name(name).is_ok() && valid_uid(uid)
}

fn stat_id(path: &Path) -> std::io::Result<(u64, i128, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    let mtime = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
    Ok((m.len(), mtime, m.ino()))
}

/// SHA-512 of a file, lowercase hex.
pub fn sha512_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha512::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `bytes` at `off`, leaving all-zero 64 KiB runs as holes (the file's length is set at
/// the end).
fn write_sparse(f: &mut std::fs::File, off: u64, bytes: &[u8]) -> std::io::Result<()> {
    const RUN: usize = 64 << 10;
    let mut pos = 0;
    while pos < bytes.len() {
        let end = (pos + RUN).min(bytes.len());
        let chunk = &bytes[pos..end];
        if chunk.iter().any(|&b| b != 0) {
            f.seek(SeekFrom::Start(off + pos as u64))?;
            f.write_all(chunk)?;
        }
        pos = end;
    }
    Ok(())
}

/// Converts a qcow2 file to raw in place (through `qemu-img`); a raw file is left alone.
fn to_raw(part: &Path) -> Result<(), Failure> {
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(part)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(retry)?;
    if n < 4 || magic != *b"QFI\xfb" {
        return Ok(());
    }
    let out = part.with_extension("conv");
    let res = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(part)
        .arg(&out)
        .output()
        .map_err(|e| Failure::Fatal(format!("qcow2 source: cannot run qemu-img: {e}")))?;
    if !res.status.success() {
        let _ = std::fs::remove_file(&out);
        return Err(Failure::Fatal(format!(
            "qcow2 source: qemu-img convert failed: {}",
            String::from_utf8_lossy(&res.stderr).trim()
        )));
    }
    std::fs::rename(&out, part).map_err(retry)?;
    Ok(())
}

/// An upload being received; dropped unfinished, its bytes are removed.
pub struct Upload {
    copies: Arc<Copies>,
    copy: CopyRef,
    file: Option<std::fs::File>,
    off: u64,
    finished: bool,
}

impl Upload {
    /// Appends the next bytes.
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("upload already finished"))?;
        write_sparse(f, self.off, bytes)?;
        self.off += bytes.len() as u64;
        self.copies.progress(&self.copy, self.off, self.copy.size);
        Ok(())
    }

    /// Ends the upload: the copy is converted, verified and made ready (its report), or fails.
    pub async fn finish(mut self) -> Result<CopyReport, String> {
        let Some(f) = self.file.take() else {
            return Err("upload already finished".into());
        };
        self.finished = true;
        let (copies, copy, len) = (self.copies.clone(), self.copy.clone(), self.off);
        let res = tokio::task::spawn_blocking(move || {
            f.set_len(len).map_err(retry)?;
            f.sync_all().map_err(retry)?;
            copies.seal(&copy)
        })
        .await
        .unwrap_or_else(|e| Err(Failure::Retry(e.to_string())));
        match res {
            Ok(()) => Ok(self.copies.report(&self.copy.name).unwrap_or_default()),
            Err(Failure::Retry(m) | Failure::Fatal(m)) => {
                self.copies.give_up(&self.copy, &m);
                Err(m)
            }
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.finished {
            self.copies
                .give_up(&self.copy, "the upload was interrupted before its end");
        }
    }
}

impl Copies {
    /// Opens the copies under `dir`: ready ones whose file is unchanged are ready at once,
    /// changed ones are re-verified, partial ones wait for their order to resume.
    pub fn open(
        dir: PathBuf,
        token: String,
        wake: Arc<Notify>,
        transfers: Arc<dyn crate::Transfers>,
    ) -> std::io::Result<Arc<Copies>> {
        std::fs::create_dir_all(&dir)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(30))
            .build()
            .map_err(std::io::Error::other)?;
        let copies = Arc::new(Copies {
            dir,
            http,
            token,
            entries: Mutex::new(HashMap::new()),
            wake,
            transfers,
        });
        copies.scan();
        Ok(copies)
    }

    fn copy_dir(&self, name: &str, uid: &str) -> PathBuf {
        self.dir.join(format!("{name}-{uid}"))
    }

    /// The raw file of the ready copy of image `name`, whatever its uid (a backup's source).
    pub fn ready_file(&self, name: &str) -> Option<PathBuf> {
        let entries = self.entries.lock().ok()?;
        let e = entries.get(name)?;
        (e.state == BackingImageState::Ready).then(|| self.copy_dir(name, &e.uid).join(RAW))
    }

    /// The raw file of a ready copy, for a replica's base or a peer's fetch.
    pub fn ready_path(&self, name: &str, uid: &str) -> Option<(PathBuf, u64, String)> {
        let entries = self.entries.lock().ok()?;
        let e = entries.get(name)?;
        (e.uid == uid && e.state == BackingImageState::Ready).then(|| {
            (
                self.copy_dir(name, uid).join(RAW),
                e.total,
                e.checksum.clone(),
            )
        })
    }

    fn scan(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for d in rd.flatten() {
            let Some(dn) = d.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let Some((name, uid)) = dn.rsplit_once('-').filter(|(n, u)| valid_ref(n, u)) else {
                continue;
            };
            let mut e = Entry::new(uid);
            match self.check_ready(name, uid) {
                Ok(Some(m)) => {
                    e.state = BackingImageState::Ready;
                    e.total = m.size;
                    e.done = m.size;
                    e.checksum = m.checksum;
                }
                Ok(None) => {
                    // A transfer this process did not finish: resumed when ordered again.
                    let part = d.path().join(PART);
                    e.done = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
                    e.message = "interrupted; resumes when ordered again".into();
                }
                Err(why) => {
                    tracing::warn!(image = name, %why, "backing-image copy is damaged; removing it");
                    let _ = std::fs::remove_dir_all(d.path());
                    continue;
                }
            }
            if let Ok(mut entries) = self.entries.lock() {
                entries.insert(name.to_string(), e);
            }
        }
    }

    /// A copy's ready record if it has one and its file matches it (re-hashed only when the file
    /// changed since); `Err` when it has a record and the file is missing or damaged.
    fn check_ready(&self, name: &str, uid: &str) -> Result<Option<CopyMeta>, String> {
        let dir = self.copy_dir(name, uid);
        let raw = match std::fs::read(dir.join(META)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read its record: {e}")),
        };
        let m: CopyMeta =
            serde_json::from_slice(&raw).map_err(|e| format!("damaged record: {e}"))?;
        if m.version != COPY_META_VERSION || m.name != name || m.uid != uid {
            return Err(format!(
                "record of version {} for {}-{}",
                m.version, m.name, m.uid
            ));
        }
        let data = dir.join(RAW);
        let (len, mtime, ino) = stat_id(&data).map_err(|e| format!("image file: {e}"))?;
        // The logical length, as at creation (a sparse file's allocation is not its size).
        if len != m.size {
            return Err(format!("image file has {len} bytes, not {}", m.size));
        }
        if mtime != m.mtime_ns || ino != m.inode {
            let sum = sha512_file(&data).map_err(|e| format!("image file: {e}"))?;
            if sum != m.checksum {
                return Err("image file changed: its checksum no longer matches".into());
            }
            tracing::info!(
                image = name,
                "backing-image copy changed on disk but verifies"
            );
            self.write_meta(name, uid, m.size, &m.checksum)
                .map_err(|e| format!("record: {e}"))?;
        }
        Ok(Some(m))
    }

    fn write_meta(&self, name: &str, uid: &str, size: u64, checksum: &str) -> std::io::Result<()> {
        let dir = self.copy_dir(name, uid);
        let (_, mtime_ns, inode) = stat_id(&dir.join(RAW))?;
        let m = CopyMeta {
            version: COPY_META_VERSION,
            name: name.into(),
            uid: uid.into(),
            size,
            checksum: checksum.into(),
            mtime_ns,
            inode,
        };
        let tmp = dir.join("copy.json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(&m).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(META))?;
        fsync_dir(&dir)
    }

    /// Checks every ready copy on disk (missing, resized or changed and no longer matching):
    /// a bad one is removed and reported gone, so the manager orders it again.
    pub fn check_all(&self) {
        let ready: Vec<(String, String)> = match self.entries.lock() {
            Ok(entries) => entries
                .iter()
                .filter(|(_, e)| e.state == BackingImageState::Ready)
                .map(|(n, e)| (n.clone(), e.uid.clone()))
                .collect(),
            Err(_) => return,
        };
        for (name, uid) in ready {
            let why = match self.check_ready(&name, &uid) {
                Ok(Some(_)) => continue,
                Ok(None) => "its ready record is gone".to_string(),
                Err(why) => why,
            };
            tracing::warn!(image = %name, %why, "backing-image copy is damaged or gone; fetching it again");
            if let Ok(mut entries) = self.entries.lock()
                && entries.get(&name).is_some_and(|e| e.uid == uid)
                && let Some(e) = entries.remove(&name)
            {
                self.remove_files(&name, &e);
            }
            self.wake.notify_one();
        }
    }

    /// Every copy as reported to the manager.
    pub fn reports(&self) -> Vec<CopyReport> {
        let Ok(entries) = self.entries.lock() else {
            return Vec::new();
        };
        let mut out: Vec<CopyReport> = entries.iter().map(|(n, e)| e.report(n)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn report(&self, name: &str) -> Option<CopyReport> {
        self.entries.lock().ok()?.get(name).map(|e| e.report(name))
    }

    fn progress(&self, copy: &CopyRef, done: u64, total: u64) {
        if let Ok(mut entries) = self.entries.lock()
            && let Some(e) = entries.get_mut(&copy.name)
            && e.uid == copy.uid
        {
            e.done = done;
            e.total = total.max(e.total);
            e.state = BackingImageState::InProgress;
        }
    }

    /// Makes a received `image.part` ready: qcow2 converted, checksum verified, record written.
    fn seal(&self, copy: &CopyRef) -> Result<(), Failure> {
        let dir = self.copy_dir(&copy.name, &copy.uid);
        let part = dir.join(PART);
        to_raw(&part)?;
        let size = std::fs::metadata(&part).map_err(retry)?.len();
        if size == 0 {
            return Err(Failure::Fatal("the source is empty".into()));
        }
        let sum = sha512_file(&part).map_err(retry)?;
        if !copy.checksum.is_empty() && sum != copy.checksum {
            let _ = std::fs::remove_file(&part);
            return Err(Failure::Fatal(format!(
                "checksum mismatch: expected {}, got {sum}",
                copy.checksum
            )));
        }
        if copy.size != 0 && size != copy.size {
            let _ = std::fs::remove_file(&part);
            return Err(Failure::Fatal(format!(
                "size mismatch: expected {} bytes, got {size}",
                copy.size
            )));
        }
        std::fs::rename(&part, dir.join(RAW)).map_err(retry)?;
        fsync_dir(&dir).map_err(retry)?;
        self.write_meta(&copy.name, &copy.uid, size, &sum)
            .map_err(retry)?;
        if let Ok(mut entries) = self.entries.lock()
            && let Some(e) = entries.get_mut(&copy.name)
            && e.uid == copy.uid
        {
            e.state = BackingImageState::Ready;
            e.total = size;
            e.done = size;
            e.checksum = sum;
            e.message.clear();
            e.task = None;
            e.attempts = 0;
            e.retry_at = None;
        }
        tracing::info!(image = %copy.name, size, "backing-image copy ready");
        self.wake.notify_one();
        Ok(())
    }

    /// Removes an upload's partial bytes; the copy goes (a new upload starts afresh).
    fn give_up(&self, copy: &CopyRef, why: &str) {
        tracing::warn!(image = %copy.name, why, "backing-image upload failed");
        if let Ok(mut entries) = self.entries.lock()
            && entries
                .get(&copy.name)
                .is_some_and(|e| e.uid == copy.uid && e.state != BackingImageState::Ready)
        {
            entries.remove(&copy.name);
            let _ = std::fs::remove_dir_all(self.copy_dir(&copy.name, &copy.uid));
        }
        self.wake.notify_one();
    }

    /// Starts receiving an upload of `copy` (its expected checksum and size, when known).
    pub fn begin_upload(self: &Arc<Self>, copy: CopyRef) -> Result<Upload, String> {
        if !valid_ref(&copy.name, &copy.uid) {
            return Err(format!("invalid copy {}-{}", copy.name, copy.uid));
        }
        {
            let mut entries = self.entries.lock().map_err(|e| e.to_string())?;
            if let Some(e) = entries.get(&copy.name)
                && e.uid == copy.uid
                && (e.state == BackingImageState::Ready || e.task.is_some())
            {
                return Err(format!(
                    "backing image {:?} already has a copy here ({})",
                    copy.name,
                    e.state.as_str()
                ));
            }
            if let Some(old) = entries.remove(&copy.name) {
                self.remove_files(&copy.name, &old);
            }
            let mut e = Entry::new(&copy.uid);
            e.state = BackingImageState::InProgress;
            e.total = copy.size;
            entries.insert(copy.name.clone(), e);
        }
        let dir = self.copy_dir(&copy.name, &copy.uid);
        let open = || -> std::io::Result<std::fs::File> {
            std::fs::create_dir_all(&dir)?;
            std::fs::File::create(dir.join(PART))
        };
        let file = open().map_err(|e| e.to_string())?;
        Ok(Upload {
            copies: self.clone(),
            copy,
            file: Some(file),
            off: 0,
            finished: false,
        })
    }

    fn remove_files(&self, name: &str, e: &Entry) {
        if let Some(t) = &e.task {
            t.abort();
        }
        let dir = self.copy_dir(name, &e.uid);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!(image = name, "backing-image copy deleted"),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::error!(image = name, error = %err, "cannot delete backing-image copy")
            }
        }
    }

    /// Deletes copies the manager no longer wants here (never one in `in_use`).
    pub fn delete(&self, refs: &[CopyRef], in_use: &[String]) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        for r in refs {
            if in_use.contains(&r.name) {
                tracing::warn!(image = %r.name, "not deleting a backing-image copy a replica here uses");
                continue;
            }
            if entries.get(&r.name).is_some_and(|e| e.uid == r.uid)
                && let Some(e) = entries.remove(&r.name)
            {
                self.remove_files(&r.name, &e);
            }
        }
    }

    /// Starts the transfers the manager ordered that are not running, ready or waiting out a
    /// backoff.
    /// `engines`: the engines of the volumes exports read from.
    pub fn apply(
        self: &Arc<Self>,
        orders: &[CopyOrder],
        engines: &HashMap<String, Arc<zebu_engine::Engine>>,
    ) {
        let now = Instant::now();
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        for o in orders {
            let c = &o.copy;
            if !valid_ref(&c.name, &c.uid) {
                continue;
            }
            if entries.get(&c.name).is_some_and(|e| e.uid != c.uid)
                && let Some(old) = entries.remove(&c.name)
            {
                // A copy of an earlier image of the same name.
                self.remove_files(&c.name, &old);
            }
            let e = entries
                .entry(c.name.clone())
                .or_insert_with(|| Entry::new(&c.uid));
            let busy = e.task.is_some()
                || e.state == BackingImageState::Ready
                || e.state == BackingImageState::Failed
                || e.retry_at.is_some_and(|t| t > now);
            if busy {
                continue;
            }
            let from = match &o.source {
                CopySource::Upload => continue,
                CopySource::Url { url } => From::Url(url.clone()),
                CopySource::Peer { peer, copy, .. } => From::Peer(format!(
                    "http://{peer}/v1/copies/{}-{}",
                    copy.name, copy.uid
                )),
                CopySource::Export { volume, snapshot } => match engines.get(volume) {
                    Some(en) => From::Export(en.clone(), snapshot.clone()),
                    None => continue,
                },
                CopySource::Restore {
                    target,
                    owner,
                    backup,
                } => From::Restore(target.clone(), owner.clone(), backup.clone()),
            };
            e.state = BackingImageState::InProgress;
            e.attempts += 1;
            let (me, copy) = (self.clone(), c.clone());
            let h = tokio::spawn(async move { me.run_fetch(copy, from).await });
            e.task = Some(h.abort_handle());
        }
    }

    /// Restores a backing-image backup into `image.part`.
    async fn restore(
        self: &Arc<Self>,
        copy: &CopyRef,
        target: zebu_api::model::TargetRef,
        owner: String,
        backup: String,
    ) -> Result<(), Failure> {
        let dir = self.copy_dir(&copy.name, &copy.uid);
        std::fs::create_dir_all(&dir).map_err(retry)?;
        let (me, c) = (self.clone(), copy.clone());
        // Progress in blocks, shown as bytes of the same proportion.
        let progress: Arc<dyn Fn(u64, u64) + Send + Sync> = Arc::new(move |done, total| {
            me.progress(&c, done, total);
        });
        self.transfers
            .restore_image(target, owner, backup, dir.join(PART), progress)
            .await
            .map(|_| ())
            .map_err(Failure::Retry)
    }

    /// Reads a snapshot of a volume through its engine into `image.part`.
    async fn export(
        &self,
        copy: &CopyRef,
        engine: &zebu_engine::Engine,
        snapshot: &str,
    ) -> Result<(), Failure> {
        const STEP: u64 = 4 << 20;
        let size = engine.size();
        let part = self.copy_dir(&copy.name, &copy.uid).join(PART);
        let p = part.clone();
        let mut file = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
            std::fs::create_dir_all(p.parent().unwrap_or(Path::new(".")))?;
            std::fs::File::create(&p)
        })
        .await
        .map_err(retry)?
        .map_err(retry)?;
        let mut off = 0;
        self.progress(copy, 0, size);
        while off < size {
            let len = (size - off).min(STEP) as u32;
            let data = engine
                .read_snapshot(snapshot, off, len)
                .await
                .map_err(|e| retry(format!("reading snapshot {snapshot:?} at {off}: {e}")))?;
            let at = off;
            file = tokio::task::spawn_blocking(move || {
                write_sparse(&mut file, at, &data).map(|()| file)
            })
            .await
            .map_err(retry)?
            .map_err(retry)?;
            off += u64::from(len);
            self.progress(copy, off, size);
        }
        tokio::task::spawn_blocking(move || {
            file.set_len(size)?;
            file.sync_all()
        })
        .await
        .map_err(retry)?
        .map_err(retry)
    }

    async fn run_fetch(self: Arc<Self>, copy: CopyRef, from: From) {
        let peer = matches!(from, From::Peer(_));
        let got = match &from {
            From::Url(url) | From::Peer(url) => self.fetch(&copy, url, peer).await,
            From::Export(engine, snapshot) => self.export(&copy, engine, snapshot).await,
            From::Restore(target, owner, backup) => {
                self.restore(&copy, target.clone(), owner.clone(), backup.clone())
                    .await
            }
        };
        let res = match got {
            Ok(()) => {
                let (me, c) = (self.clone(), copy.clone());
                tokio::task::spawn_blocking(move || me.seal(&c))
                    .await
                    .unwrap_or_else(|e| Err(Failure::Retry(e.to_string())))
            }
            Err(f) => Err(f),
        };
        let Err(f) = res else {
            return;
        };
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        let Some(e) = entries.get_mut(&copy.name).filter(|e| e.uid == copy.uid) else {
            return;
        };
        e.task = None;
        let again = peer || (matches!(f, Failure::Retry(_)) && e.attempts < URL_ATTEMPTS);
        match f {
            Failure::Retry(m) | Failure::Fatal(m) if again => {
                let wait = Duration::from_secs(1 << (e.attempts.saturating_sub(1)).min(5))
                    .min(Duration::from_secs(30));
                tracing::warn!(image = %copy.name, attempt = e.attempts, error = %m, ?wait, "backing-image transfer failed; retrying");
                e.state = BackingImageState::Pending;
                e.message = format!("attempt {} failed: {m}; retrying", e.attempts);
                e.retry_at = Some(Instant::now() + wait);
            }
            Failure::Retry(m) | Failure::Fatal(m) => {
                tracing::error!(image = %copy.name, error = %m, "backing-image transfer failed");
                e.state = BackingImageState::Failed;
                e.message = if e.attempts > 1 {
                    format!("{m} (after {} attempts)", e.attempts)
                } else {
                    m
                };
                let _ = std::fs::remove_dir_all(self.copy_dir(&copy.name, &copy.uid));
            }
        }
        drop(entries);
        self.wake.notify_one();
    }

    /// Transfers the source into `image.part`, resuming from its length where the server
    /// answers ranges.
    async fn fetch(&self, copy: &CopyRef, url: &str, peer: bool) -> Result<(), Failure> {
        let dir = self.copy_dir(&copy.name, &copy.uid);
        let part = dir.join(PART);
        let from = {
            let p = part.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
                std::fs::create_dir_all(p.parent().unwrap_or(Path::new(".")))?;
                match std::fs::metadata(&p) {
                    Ok(m) => Ok(m.len()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
                    Err(e) => Err(e),
                }
            })
            .await
            .map_err(retry)?
            .map_err(retry)?
        };
        if from > 0 {
            tracing::info!(image = %copy.name, from, "resuming a backing-image transfer");
        }
        let mut req = self.http.get(url);
        if peer {
            req = req.bearer_auth(&self.token);
        }
        if from > 0 {
            req = req.header("range", format!("bytes={from}-"));
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| retry(format!("{url}: {}", error_chain(&e))))?;
        let status = resp.status();
        let (start, total) = if status.as_u16() == 206 {
            let total = resp
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit_once('/'))
                .and_then(|(_, t)| t.parse::<u64>().ok())
                .unwrap_or(0);
            (from, total)
        } else if status.is_success() {
            (0, resp.content_length().unwrap_or(0))
        } else if status.as_u16() == 416 {
            // The part holds more than the source: start again.
            let _ = std::fs::remove_file(&part);
            return Err(retry(format!(
                "{url}: range not satisfiable; starting again"
            )));
        } else if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
            return Err(retry(format!("{url}: the server answered {status}")));
        } else {
            return Err(Failure::Fatal(format!(
                "{url}: the server answered {status}"
            )));
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(start == 0)
            .open(&part)
            .map_err(retry)?;
        let mut file = Some(file);
        // Bytes are written in runs of about 1 MiB, off the async workers.
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        let mut off = start;
        self.progress(copy, off, total);
        loop {
            let chunk = match resp.chunk().await {
                Ok(c) => c,
                Err(e) => {
                    return Err(retry(format!(
                        "{url}: transfer cut at byte {}: {}",
                        off + buf.len() as u64,
                        error_chain(&e)
                    )));
                }
            };
            let end = chunk.is_none();
            if let Some(c) = &chunk {
                buf.extend_from_slice(c);
            }
            if buf.len() >= 1 << 20 || (end && !buf.is_empty()) {
                let mut f = file.take().ok_or_else(|| retry("file lost"))?;
                let (at, data) = (off, std::mem::take(&mut buf));
                let n = data.len() as u64;
                let (f, data) = tokio::task::spawn_blocking(move || {
                    write_sparse(&mut f, at, &data).map(|()| (f, data))
                })
                .await
                .map_err(retry)?
                .map_err(retry)?;
                file = Some(f);
                buf = data;
                buf.clear();
                off = at + n;
                self.progress(copy, off, total);
            }
            if end {
                break;
            }
        }
        if total != 0 && off != total {
            return Err(retry(format!(
                "{url}: the transfer ended at byte {off} of {total}"
            )));
        }
        let f = file.take().ok_or_else(|| retry("file lost"))?;
        tokio::task::spawn_blocking(move || {
            f.set_len(off)?;
            f.sync_all()
        })
        .await
        .map_err(retry)?
        .map_err(retry)?;
        Ok(())
    }
}

/// An error with its causes, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
