//! File-system access for the replica store, behind a trait so crash tests can simulate power loss.
//!
//! [`StdVfs`] is the real thing (pread/pwrite/fdatasync/fallocate). [`SimVfs`] keeps every file in
//! memory and remembers which writes and directory changes were made durable by a sync; it can
//! "crash" at the N-th sync and hand back the image a power loss could leave behind.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// One open file.
#[allow(clippy::len_without_is_empty)]
pub trait VFile: Send + Sync {
    /// Fills `buf` from `off`; bytes past the end of the file read as zeros.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the file's data (and size) durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Deallocates a range; it reads as zeros afterwards.
    fn punch(&self, off: u64, len: u64) -> io::Result<()>;
}

/// A directory tree the store lives in.
pub trait Vfs: Send + Sync {
    /// Opens a file for reading and writing, creating it when `create` is set.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn VFile>>;
    fn exists(&self, path: &Path) -> bool;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creates, renames, removes) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Names of the files in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdVfs;

struct StdFile(File);

impl VFile for StdFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.0.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.0.write_all_at(buf, off)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate on an owned, open descriptor with plain integer arguments.
        let rc = unsafe {
            libc::fallocate(
                self.0.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(err);
        }
        // No hole punching on this file system: write zeros instead (only within the file).
        let end = (off + len).min(self.len()?);
        let zeros = vec![0u8; 1 << 20];
        let mut pos = off;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.0.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
}

impl Vfs for StdVfs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn VFile>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        Ok(Arc::new(StdFile(f)))
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if let Some(n) = e.file_name().to_str() {
                out.push(n.to_string());
            }
        }
        Ok(out)
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }
}

// ---------------------------------------------------------------------------------------------
// Simulated file system for crash tests.

#[derive(Clone)]
enum DataOp {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Punch(u64, u64),
}

fn apply(data: &mut Vec<u8>, op: &DataOp) {
    match op {
        DataOp::Write(off, buf) => {
            let end = *off as usize + buf.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[*off as usize..end].copy_from_slice(buf);
        }
        DataOp::SetLen(l) => data.resize(*l as usize, 0),
        DataOp::Punch(off, len) => {
            let s = (*off as usize).min(data.len());
            let e = ((*off + *len) as usize).min(data.len());
            data[s..e].fill(0);
        }
    }
}

#[derive(Default)]
struct Inode {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<DataOp>,
}

#[derive(Clone)]
enum DirOp {
    Link(PathBuf, usize),
    Unlink(PathBuf),
}

#[derive(Default)]
struct SimState {
    inodes: Vec<Arc<Mutex<Inode>>>,
    names: HashMap<PathBuf, usize>,
    durable_names: HashMap<PathBuf, usize>,
    pending_dir: Vec<DirOp>,
    syncs: u64,
    crash_at: Option<u64>,
    crashed: bool,
}

/// An in-memory file system that models what survives a power loss.
#[derive(Clone, Default)]
pub struct SimVfs {
    state: Arc<Mutex<SimState>>,
}

fn crashed() -> io::Error {
    io::Error::other("simulated crash")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimVfs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Crash when the `n`-th sync (file or directory, counting from 1) is attempted: that sync does
    /// not happen and every later call fails.
    pub fn crash_at_sync(&self, n: u64) {
        lock(&self.state).crash_at = Some(n);
    }

    /// Number of syncs performed so far.
    pub fn syncs(&self) -> u64 {
        lock(&self.state).syncs
    }

    pub fn has_crashed(&self) -> bool {
        lock(&self.state).crashed
    }

    /// The file system a power loss could leave now: everything synced, plus a random subset of the
    /// unsynced data writes (chosen by `seed`) and a random prefix of the unsynced directory changes.
    pub fn crash_image(&self, seed: u64) -> SimVfs {
        let st = lock(&self.state);
        let mut rng = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut names = st.durable_names.clone();
        let keep_dir = if st.pending_dir.is_empty() {
            0
        } else {
            (next() % (st.pending_dir.len() as u64 + 1)) as usize
        };
        for op in &st.pending_dir[..keep_dir] {
            match op {
                DirOp::Link(p, i) => {
                    names.insert(p.clone(), *i);
                }
                DirOp::Unlink(p) => {
                    names.remove(p);
                }
            }
        }
        let mut new = SimState::default();
        let mut map: HashMap<usize, usize> = HashMap::new();
        for (path, ino) in names {
            let idx = *map.entry(ino).or_insert_with(|| {
                let old = lock(&st.inodes[ino]);
                let mut data = old.durable.clone();
                for op in &old.pending {
                    if next() % 2 == 0 {
                        apply(&mut data, op);
                    }
                }
                new.inodes.push(Arc::new(Mutex::new(Inode {
                    current: data.clone(),
                    durable: data,
                    pending: Vec::new(),
                })));
                new.inodes.len() - 1
            });
            new.names.insert(path.clone(), idx);
            new.durable_names.insert(path, idx);
        }
        SimVfs {
            state: Arc::new(Mutex::new(new)),
        }
    }

    fn count_sync(st: &mut SimState) -> io::Result<()> {
        if st.crashed {
            return Err(crashed());
        }
        st.syncs += 1;
        if st.crash_at == Some(st.syncs) {
            st.crashed = true;
            return Err(crashed());
        }
        Ok(())
    }
}

struct SimFile {
    vfs: SimVfs,
    inode: Arc<Mutex<Inode>>,
}

impl SimFile {
    fn check(&self) -> io::Result<()> {
        if lock(&self.vfs.state).crashed {
            Err(crashed())
        } else {
            Ok(())
        }
    }

    fn push(&self, op: DataOp) -> io::Result<()> {
        self.check()?;
        let mut ino = lock(&self.inode);
        apply(&mut ino.current, &op);
        ino.pending.push(op);
        Ok(())
    }
}

impl VFile for SimFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.check()?;
        let ino = lock(&self.inode);
        let len = ino.current.len() as u64;
        buf.fill(0);
        if off < len {
            let n = ((len - off) as usize).min(buf.len());
            buf[..n].copy_from_slice(&ino.current[off as usize..off as usize + n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.push(DataOp::Write(off, buf.to_vec()))
    }

    fn len(&self) -> io::Result<u64> {
        self.check()?;
        Ok(lock(&self.inode).current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.push(DataOp::SetLen(len))
    }

    fn sync_data(&self) -> io::Result<()> {
        SimVfs::count_sync(&mut lock(&self.vfs.state))?;
        let mut ino = lock(&self.inode);
        ino.durable = ino.current.clone();
        ino.pending.clear();
        Ok(())
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        self.push(DataOp::Punch(off, len))
    }
}

impl Vfs for SimVfs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn VFile>> {
        let mut st = lock(&self.state);
        if st.crashed {
            return Err(crashed());
        }
        let ino = match st.names.get(path) {
            Some(i) => *i,
            None if create => {
                st.inodes.push(Arc::new(Mutex::new(Inode::default())));
                let i = st.inodes.len() - 1;
                st.names.insert(path.to_path_buf(), i);
                st.pending_dir.push(DirOp::Link(path.to_path_buf(), i));
                i
            }
            None => return Err(io::Error::from(io::ErrorKind::NotFound)),
        };
        Ok(Arc::new(SimFile {
            vfs: self.clone(),
            inode: st.inodes[ino].clone(),
        }))
    }

    fn exists(&self, path: &Path) -> bool {
        lock(&self.state).names.contains_key(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = lock(&self.state);
        if st.crashed {
            return Err(crashed());
        }
        let ino = st
            .names
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        st.names.insert(to.to_path_buf(), ino);
        st.pending_dir.push(DirOp::Link(to.to_path_buf(), ino));
        st.pending_dir.push(DirOp::Unlink(from.to_path_buf()));
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut st = lock(&self.state);
        if st.crashed {
            return Err(crashed());
        }
        if st.names.remove(path).is_some() {
            st.pending_dir.push(DirOp::Unlink(path.to_path_buf()));
        }
        Ok(())
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        let mut st = lock(&self.state);
        SimVfs::count_sync(&mut st)?;
        st.durable_names = st.names.clone();
        st.pending_dir.clear();
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = lock(&self.state);
        if st.crashed {
            return Err(crashed());
        }
        Ok(st
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect())
    }

    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
}
