//! The per-layer allocation journal (`layer-<id>.map`): a header followed by checksummed records,
//! each the allocation changes made durable by one flush. Format: docs/formats.md, "Layer map".

use std::path::{Path, PathBuf};
use std::sync::Arc;

use zebu_types::LayerId;

use crate::bitmap::{ClusterMap, Run};
use crate::error::{IoContext, Result, StoreError};
use crate::vfs::{VFile, Vfs};

pub const MAGIC: &[u8; 8] = b"ZEBUMAP\0";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 24;
const RUN_LEN: usize = 13;
/// Upper bound on one record body, to reject garbage lengths before allocating.
const MAX_BODY: u32 = 256 << 20;

/// One allocation change: a run of clusters set (allocated) or cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub run: Run,
    pub set: bool,
}

/// The open journal of one layer.
pub struct MapFile {
    path: PathBuf,
    file: Arc<dyn VFile>,
    end: u64,
}

/// What replaying a journal produced.
pub struct Replayed {
    pub map: ClusterMap,
    pub last_generation: u64,
    pub last_seq: u64,
}

fn header(cluster_size: u32, id: LayerId) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN as usize);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&cluster_size.to_le_bytes());
    h.extend_from_slice(&id.0.to_le_bytes());
    h
}

fn encode_record(generation: u64, seq: u64, changes: &[Change]) -> Vec<u8> {
    let mut body = Vec::with_capacity(20 + changes.len() * RUN_LEN);
    body.extend_from_slice(&generation.to_le_bytes());
    body.extend_from_slice(&seq.to_le_bytes());
    body.extend_from_slice(&(changes.len() as u32).to_le_bytes());
    for c in changes {
        body.extend_from_slice(&c.run.start.to_le_bytes());
        body.extend_from_slice(&(c.run.len as u32).to_le_bytes());
        body.push(u8::from(c.set));
    }
    let mut rec = Vec::with_capacity(8 + body.len());
    rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    rec.extend_from_slice(&body);
    rec
}

/// Splits runs longer than a record field allows.
fn split(changes: &[Change]) -> Vec<Change> {
    let mut out = Vec::with_capacity(changes.len());
    for c in changes {
        let mut start = c.run.start;
        let mut left = c.run.len;
        while left > 0 {
            let n = left.min(u32::MAX as u64);
            out.push(Change {
                run: Run { start, len: n },
                set: c.set,
            });
            start += n;
            left -= n;
        }
    }
    out
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl MapFile {
    /// Creates a new, empty, durable journal (the caller syncs the directory).
    pub fn create(
        vfs: &dyn Vfs,
        path: &Path,
        cluster_size: u32,
        id: LayerId,
        initial: &ClusterMap,
    ) -> Result<MapFile> {
        let file = vfs.open(path, true).at(path)?;
        file.set_len(0).at(path)?;
        let mut buf = header(cluster_size, id);
        let runs: Vec<Change> = initial
            .runs()
            .into_iter()
            .map(|run| Change { run, set: true })
            .collect();
        if !runs.is_empty() {
            buf.extend_from_slice(&encode_record(0, 0, &split(&runs)));
        }
        file.write_at(&buf, 0).at(path)?;
        file.sync_data().at(path)?;
        Ok(MapFile {
            path: path.to_path_buf(),
            file,
            end: buf.len() as u64,
        })
    }

    /// Opens and replays a journal. A torn or corrupt tail (the last, unacknowledged flush) is cut
    /// off; a bad header is an error.
    pub fn open(
        vfs: &dyn Vfs,
        path: &Path,
        cluster_size: u32,
        id: LayerId,
        clusters: u64,
    ) -> Result<(MapFile, Replayed)> {
        let file = vfs.open(path, false).at(path)?;
        let len = file.len().at(path)?;
        let corrupt = |why: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            why,
        };
        if len < HEADER_LEN {
            return Err(corrupt(format!(
                "file is {len} bytes, shorter than its header"
            )));
        }
        let mut buf = vec![0u8; len as usize];
        file.read_at(&mut buf, 0).at(path)?;
        if &buf[..8] != MAGIC {
            return Err(corrupt("bad magic".into()));
        }
        let version = u32_at(&buf, 8);
        if version != VERSION {
            return Err(StoreError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                supported: VERSION,
            });
        }
        if u32_at(&buf, 12) != cluster_size {
            return Err(corrupt(format!(
                "cluster size {} does not match the chain's {cluster_size}",
                u32_at(&buf, 12)
            )));
        }
        if u64_at(&buf, 16) != id.0 {
            return Err(corrupt(format!(
                "belongs to layer {:016x}, not {id}",
                u64_at(&buf, 16)
            )));
        }
        let mut map = ClusterMap::new();
        let mut pos = HEADER_LEN as usize;
        let mut last_generation = 0;
        let mut last_seq = 0;
        loop {
            if pos + 8 > buf.len() {
                break;
            }
            let blen = u32_at(&buf, pos);
            let crc = u32_at(&buf, pos + 4);
            if blen > MAX_BODY || pos + 8 + blen as usize > buf.len() {
                break;
            }
            let body = &buf[pos + 8..pos + 8 + blen as usize];
            if crc32c::crc32c(body) != crc || body.len() < 20 {
                break;
            }
            let n = u32_at(body, 16) as usize;
            if body.len() != 20 + n * RUN_LEN {
                break;
            }
            // The record is whole: apply it.
            last_generation = u64_at(body, 0);
            last_seq = u64_at(body, 8);
            for i in 0..n {
                let at = 20 + i * RUN_LEN;
                let start = u64_at(body, at);
                let rlen = u32_at(body, at + 8) as u64;
                let set = body[at + 12] != 0;
                if start.checked_add(rlen).is_none_or(|e| e > clusters) {
                    return Err(corrupt(format!(
                        "run {start}+{rlen} lies beyond the volume's {clusters} clusters"
                    )));
                }
                map.apply(Run { start, len: rlen }, set);
            }
            pos += 8 + blen as usize;
        }
        let end = pos as u64;
        if end < len {
            tracing::warn!(path = %path.display(), cut = len - end, "cutting torn tail of layer map");
            file.set_len(end).at(path)?;
            file.sync_data().at(path)?;
        }
        Ok((
            MapFile {
                path: path.to_path_buf(),
                file,
                end,
            },
            Replayed {
                map,
                last_generation,
                last_seq,
            },
        ))
    }

    /// Appends one record and makes it durable.
    pub fn append(&mut self, generation: u64, seq: u64, changes: &[Change]) -> Result<()> {
        let rec = encode_record(generation, seq, &split(changes));
        self.file.write_at(&rec, self.end).at(&self.path)?;
        self.file.sync_data().at(&self.path)?;
        self.end += rec.len() as u64;
        Ok(())
    }

    /// Bytes in the journal.
    pub fn len(&self) -> u64 {
        self.end
    }

    pub fn is_empty(&self) -> bool {
        self.end <= HEADER_LEN
    }

    /// Rewrites the journal as one record holding `map`, atomically (temp + sync + rename + sync
    /// dir).
    pub fn compact(
        &mut self,
        vfs: &dyn Vfs,
        dir: &Path,
        cluster_size: u32,
        id: LayerId,
        map: &ClusterMap,
    ) -> Result<()> {
        let tmp = self.path.with_extension("map.tmp");
        let fresh = MapFile::create(vfs, &tmp, cluster_size, id, map)?;
        vfs.rename(&tmp, &self.path).at(&self.path)?;
        vfs.sync_dir(dir).at(dir)?;
        self.file = fresh.file;
        self.end = fresh.end;
        Ok(())
    }
}
