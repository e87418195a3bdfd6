//! The `BackupStore` trait — the only way backup code touches a target — and its file-system
//! backend (a local directory or an NFS/CIFS mount). Keys are `/`-separated relative paths.
//!
//! Safety rules every backend keeps: a failed or suspicious listing is an error, never an empty
//! result (the target's marker object must be readable first, so an unmounted NFS directory is
//! "unavailable", not "no backups"); `put_if_absent` never overwrites; writes are atomic.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The object that marks a directory as an initialised backup target, with the layout version.
pub const MARKER: &str = "zebu-backupstore.json";
pub const LAYOUT_VERSION: u32 = 1;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The target cannot be used at all (unreachable, not mounted, no marker); the text is the
    /// reason alone, callers name the target.
    #[error("{0}")]
    Unavailable(String),
    #[error("invalid object key {0:?}")]
    BadKey(String),
    #[error("I/O on {key}: {message}")]
    Io { key: String, message: String },
}

pub trait BackupStore: Send + Sync + 'static {
    /// Writes `data` under `key` unless an object is there already; returns whether it wrote.
    fn put_if_absent(
        &self,
        key: &str,
        data: Vec<u8>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Writes `data` under `key`, replacing any object, atomically.
    fn put(&self, key: &str, data: Vec<u8>) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;
    fn exists(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Every object under `prefix` (recursively), sorted by key, with its size and a tag that
    /// changes whenever the object is rewritten (an ETag, or a modification time, inode and
    /// size); empty where a backend cannot tell, which callers treat as "changed".
    fn list_meta(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<ObjectInfo>, StoreError>> + Send;
    /// Every key under `prefix` (recursively), sorted.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send {
        let listing = self.list_meta(prefix);
        async move { Ok(listing.await?.into_iter().map(|o| o.key).collect()) }
    }
    /// Deletes an object; deleting a missing one is not an error.
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// Changes whenever the object is rewritten; empty when the backend cannot tell.
    pub tag: String,
}

pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && key.len() <= 1024
        && !key.starts_with('/')
        && key
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadKey(key.to_string()))
    }
}

/// A backup target in a directory.
#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
}

fn io(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        key: key.to_string(),
        message: e.to_string(),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl FsStore {
    /// Opens a target directory. `init` creates the marker when missing (when a target is
    /// created); otherwise a missing marker makes the target unavailable.
    pub fn open(root: &Path, init: bool) -> Result<FsStore, StoreError> {
        let s = FsStore {
            root: root.to_path_buf(),
        };
        let marker = root.join(MARKER);
        if !marker.exists() {
            if !init {
                return Err(StoreError::Unavailable(format!(
                    "{} has no {MARKER} (not mounted, or never initialised)",
                    root.display()
                )));
            }
            std::fs::create_dir_all(root).map_err(|e| io(MARKER, e))?;
            let body = format!("{{\"layoutVersion\":{LAYOUT_VERSION}}}\n");
            s.write_atomic(MARKER, body.as_bytes(), true)
                .map_err(|e| io(MARKER, e))?;
        }
        s.check_marker()?;
        Ok(s)
    }

    fn check_marker(&self) -> Result<(), StoreError> {
        let b = std::fs::read(self.root.join(MARKER))
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", self.root.display())))?;
        let text = String::from_utf8_lossy(&b);
        if !text.contains(&format!("\"layoutVersion\":{LAYOUT_VERSION}")) {
            return Err(StoreError::Unavailable(format!(
                "{} has an unsupported layout: {}",
                self.root.display(),
                text.trim()
            )));
        }
        Ok(())
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// Temp file, fsync, then rename (or link when it must not replace), fsync the directory.
    fn write_atomic(&self, key: &str, data: &[u8], replace: bool) -> std::io::Result<bool> {
        let path = self.root.join(key);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".tmp-{:016x}", rand::random::<u64>()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        let wrote = if replace {
            std::fs::rename(&tmp, &path)?;
            true
        } else {
            let r = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match r {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(e),
            }
        };
        sync_dir(&dir)?;
        Ok(wrote)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        key: &str,
        f: impl FnOnce(FsStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(me))
            .await
            .map_err(|e| io(key, e))?
    }
}

impl BackupStore for FsStore {
    async fn put_if_absent(&self, key: &str, data: Vec<u8>) -> Result<bool, StoreError> {
        self.path(key)?;
        let k = key.to_string();
        self.blocking(key, move |s| {
            s.write_atomic(&k, &data, false).map_err(|e| io(&k, e))
        })
        .await
    }

    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        self.path(key)?;
        let k = key.to_string();
        self.blocking(key, move |s| {
            s.write_atomic(&k, &data, true)
                .map(|_| ())
                .map_err(|e| io(&k, e))
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let p = self.path(key)?;
        let k = key.to_string();
        self.blocking(key, move |s| {
            s.check_marker()?;
            match std::fs::read(&p) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io(&k, e)),
            }
        })
        .await
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let p = self.path(key)?;
        self.blocking(key, move |s| {
            s.check_marker()?;
            Ok(p.exists())
        })
        .await
    }

    async fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let prefix = prefix.trim_end_matches('/').to_string();
        if !prefix.is_empty() {
            check_key(&prefix)?;
        }
        self.blocking(&prefix.clone(), move |s| {
            s.check_marker()?;
            let base = if prefix.is_empty() {
                s.root.clone()
            } else {
                s.root.join(&prefix)
            };
            let mut out = Vec::new();
            let mut stack = vec![base];
            while let Some(dir) = stack.pop() {
                let rd = match std::fs::read_dir(&dir) {
                    Ok(rd) => rd,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io(&prefix, e)),
                };
                for ent in rd {
                    let ent = ent.map_err(|e| io(&prefix, e))?;
                    let p = ent.path();
                    let name = ent.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with(".tmp-") {
                        continue;
                    }
                    if ent.file_type().map_err(|e| io(&prefix, e))?.is_dir() {
                        stack.push(p);
                    } else if let Ok(rel) = p.strip_prefix(&s.root) {
                        let key = rel.to_string_lossy().into_owned();
                        if key == MARKER {
                            continue;
                        }
                        // Gone between the listing and the stat: not part of the listing.
                        let Ok(md) = ent.metadata() else { continue };
                        use std::os::unix::fs::MetadataExt;
                        out.push(ObjectInfo {
                            key,
                            size: md.len(),
                            tag: format!(
                                "{}.{}-{}-{}",
                                md.mtime(),
                                md.mtime_nsec(),
                                md.ino(),
                                md.len()
                            ),
                        });
                    }
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let p = self.path(key)?;
        let k = key.to_string();
        self.blocking(key, move |s| {
            s.check_marker()?;
            match std::fs::remove_file(&p) {
                Ok(()) => {
                    if let Some(d) = p.parent() {
                        sync_dir(d).map_err(|e| io(&k, e))?;
                    }
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io(&k, e)),
            }
        })
        .await
    }
}
