//! The replica store: a chain of layers (immutable snapshots under one writable head), each a sparse
//! data file addressed by volume offset plus an allocation journal, tied together by the chain file.
//!
//! Reads resolve each cluster to the topmost layer that has it allocated. Writes go to the head;
//! a partial write to a cluster the head does not hold copies the cluster up first. FLUSH syncs the
//! data files, then appends the allocation changes to the journals. Snapshot create seals the head
//! and starts a new one (O(1)); snapshot delete merges the layer into the one above it in small
//! steps ([`ReplicaStore::merge_step`]).
//!
//! Over 800 lines on purpose: views, writes and metadata changes share the chain and its crash-safe ordering.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use zebu_types::{Generation, LayerId};

use crate::bitmap::{ClusterMap, Run};
use crate::chain::{BaseMeta, CHAIN_FILE, CHAIN_TMP, ChainMeta, LayerMeta};
use crate::error::{IoContext, Result, StoreError};
use crate::mapfile::{Change, MapFile};
use crate::vfs::{VFile, Vfs};

/// Default allocation granularity.
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 * 1024;
/// Journal size past which it is rewritten compactly at the next flush.
const COMPACT_AT: u64 = 4 << 20;

struct Layer {
    meta: LayerMeta,
    data: Arc<dyn VFile>,
    data_path: PathBuf,
    map: ClusterMap,
    journal: MapFile,
    /// Allocation changes not yet in the journal.
    pending: Vec<Change>,
    /// Data written since the last sync of the data file.
    dirty: bool,
}

fn push_change(pending: &mut Vec<Change>, c: u64, set: bool) {
    if let Some(last) = pending.last_mut()
        && last.set == set
        && last.run.end() == c
    {
        last.run.len += 1;
        return;
    }
    pending.push(Change {
        run: Run { start: c, len: 1 },
        set,
    });
}

/// Options for a new replica.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_size: u32,
    pub head: LayerId,
    /// A read-only base under every layer (a backing image's copy on this node).
    pub base: Option<BaseMeta>,
}

/// The open base file.
struct Base {
    meta: BaseMeta,
    data: Arc<dyn VFile>,
}

/// What a snapshot request carries. Every replica of a volume gets the same values.
#[derive(Debug, Clone)]
pub struct SnapshotSpec {
    pub name: String,
    pub new_head: LayerId,
    pub created: u64,
    pub user_created: bool,
    /// Whether this replica holds all of the sealed layer's data (false while it is rebuilding).
    pub in_sync: bool,
}

/// A layer as reported to the engine and the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    pub meta: LayerMeta,
    /// Allocated bytes in this layer.
    pub allocated: u64,
}

/// Counters and facts about the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStatus {
    pub size: u64,
    pub cluster_size: u32,
    pub generation: Generation,
    /// Monotonic count of flushes made durable; with the generation it identifies the freshest
    /// replica after a crash.
    pub flush_seq: u64,
    pub head: LayerId,
    pub layers: u32,
    pub index_memory: u64,
}

/// One replica's on-disk state, opened.
pub struct ReplicaStore {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    size: u64,
    cs: u64,
    generation: u64,
    flush_seq: u64,
    layers: Vec<Layer>,
    /// A delete of the snapshot right below the head, done by folding the (smaller) head down into
    /// it: the snapshot's id, the head clusters already copied (and not rewritten since), and
    /// the cluster the scan goes on from (a rewrite below it moves it back).
    merge_down: Option<(LayerId, ClusterMap, u64)>,
    /// A merge of a deleted snapshot into the layer above: the snapshot's id and the cluster its
    /// scan goes on from (every cluster of it below is in the layer above), so that each step
    /// costs its own clusters, not a rescan from the start.
    merge_cursor: Option<(LayerId, u64)>,
    base: Option<Base>,
}

fn data_name(id: LayerId) -> String {
    format!("layer-{id}.data")
}

fn map_name(id: LayerId) -> String {
    format!("layer-{id}.map")
}

impl ReplicaStore {
    /// Creates a new, empty replica in `dir`.
    pub fn create(vfs: Arc<dyn Vfs>, dir: &Path, opts: CreateOptions) -> Result<ReplicaStore> {
        if !opts.cluster_size.is_power_of_two() || opts.cluster_size < 4096 {
            return Err(StoreError::Invalid(format!(
                "cluster size {} must be a power of two of at least 4096",
                opts.cluster_size
            )));
        }
        if opts.size == 0 || !opts.size.is_multiple_of(4096) {
            return Err(StoreError::Invalid(format!(
                "size {} must be a positive multiple of 4096",
                opts.size
            )));
        }
        vfs.create_dir_all(dir).at(dir)?;
        if vfs.exists(&dir.join(CHAIN_FILE)) {
            return Err(StoreError::Exists(dir.to_path_buf()));
        }
        if let Some(b) = &opts.base
            && b.size > opts.size
        {
            return Err(StoreError::Invalid(format!(
                "size {} is smaller than backing image {:?} ({} bytes)",
                opts.size, b.name, b.size
            )));
        }
        let cs = opts.cluster_size;
        let head = Self::new_layer_files(&*vfs, dir, cs, opts.head)?;
        let meta = ChainMeta {
            size: opts.size,
            cluster_size: cs,
            generation: 0,
            flush_seq: 0,
            layers: vec![head_meta(opts.head, 0)],
            base: opts.base,
        };
        meta.store(&*vfs, dir)?;
        drop(head);
        Self::open(vfs, dir)
    }

    fn new_layer_files(
        vfs: &dyn Vfs,
        dir: &Path,
        cs: u32,
        id: LayerId,
    ) -> Result<(Arc<dyn VFile>, MapFile)> {
        let dp = dir.join(data_name(id));
        let data = vfs.open(&dp, true).at(&dp)?;
        data.set_len(0).at(&dp)?;
        data.sync_data().at(&dp)?;
        let journal = MapFile::create(vfs, &dir.join(map_name(id)), cs, id, &ClusterMap::new())?;
        Ok((data, journal))
    }

    /// Opens an existing replica, replaying its journals and cleaning up after an interrupted
    /// operation.
    pub fn open(vfs: Arc<dyn Vfs>, dir: &Path) -> Result<ReplicaStore> {
        let meta = ChainMeta::load(&*vfs, dir)?;
        let cs = meta.cluster_size as u64;
        let clusters = meta.size.div_ceil(cs);
        // Leftovers of interrupted operations: temp files and layers no longer in the chain.
        let keep: std::collections::HashSet<String> = meta
            .layers
            .iter()
            .flat_map(|l| [data_name(l.id), map_name(l.id)])
            .collect();
        for name in vfs.list(dir).at(dir)? {
            let stray = name == CHAIN_TMP
                || name.ends_with(".map.tmp")
                || (name.starts_with("layer-") && !keep.contains(&name));
            if stray {
                vfs.remove(&dir.join(&name)).at(&dir.join(&name))?;
            }
        }
        let mut layers = Vec::with_capacity(meta.layers.len());
        let mut head_seq = 0;
        for lm in &meta.layers {
            let dp = dir.join(data_name(lm.id));
            if !vfs.exists(&dp) {
                return Err(StoreError::Corrupt {
                    path: dir.join(CHAIN_FILE),
                    why: format!("data file of layer {} is missing", lm.id),
                });
            }
            let data = vfs.open(&dp, false).at(&dp)?;
            let (journal, rep) = MapFile::open(
                &*vfs,
                &dir.join(map_name(lm.id)),
                meta.cluster_size,
                lm.id,
                clusters,
            )?;
            head_seq = rep.last_seq;
            layers.push(Layer {
                meta: lm.clone(),
                data,
                data_path: dp,
                map: rep.map,
                journal,
                pending: Vec::new(),
                dirty: false,
            });
        }
        let base = match &meta.base {
            None => None,
            Some(b) => {
                let data = vfs.open(&b.path, false).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        StoreError::BaseMissing {
                            name: b.name.clone(),
                            path: b.path.clone(),
                        }
                    } else {
                        StoreError::Corrupt {
                            path: dir.join(CHAIN_FILE),
                            why: format!("backing image {:?} at {}: {e}", b.name, b.path.display()),
                        }
                    }
                })?;
                let len = data.len().at(&b.path)?;
                if len != b.size {
                    return Err(StoreError::Corrupt {
                        path: dir.join(CHAIN_FILE),
                        why: format!(
                            "backing image {:?} at {} has {len} bytes, not {}",
                            b.name,
                            b.path.display(),
                            b.size
                        ),
                    });
                }
                Some(Base {
                    meta: b.clone(),
                    data,
                })
            }
        };
        let mut store = ReplicaStore {
            vfs,
            dir: dir.to_path_buf(),
            size: meta.size,
            cs,
            generation: meta.generation,
            flush_seq: meta.flush_seq.max(head_seq),
            layers,
            merge_down: None,
            merge_cursor: None,
            base,
        };
        store.scrub_head()?;
        Ok(store)
    }

    /// Makes every cluster the head does not hold read as zeros in its data file, so that a later
    /// partial write to such a cluster leaves zeros around it (an unflushed write before a crash
    /// may have left bytes there without their allocation record).
    fn scrub_head(&mut self) -> Result<()> {
        let cs = self.cs;
        let head = self.head_mut();
        let file_len = head.data.len().at(&head.data_path)?;
        let file_clusters = file_len.div_ceil(cs);
        let mut gaps = Vec::new();
        let mut pos = 0;
        for r in head.map.runs_in(0, file_clusters) {
            if r.start > pos {
                gaps.push(Run {
                    start: pos,
                    len: r.start - pos,
                });
            }
            pos = r.end();
        }
        if pos < file_clusters {
            gaps.push(Run {
                start: pos,
                len: file_clusters - pos,
            });
        }
        if gaps.is_empty() {
            return Ok(());
        }
        for g in gaps {
            head.data
                .punch(g.start * cs, g.len * cs)
                .at(&head.data_path)?;
        }
        head.data.sync_data().at(&head.data_path)
    }

    fn head(&self) -> &Layer {
        &self.layers[self.layers.len() - 1]
    }

    fn head_mut(&mut self) -> &mut Layer {
        let n = self.layers.len() - 1;
        &mut self.layers[n]
    }

    fn chain_meta(&self) -> ChainMeta {
        ChainMeta {
            size: self.size,
            cluster_size: self.cs as u32,
            generation: self.generation,
            flush_seq: self.flush_seq,
            layers: self.layers.iter().map(|l| l.meta.clone()).collect(),
            base: self.base.as_ref().map(|b| b.meta.clone()),
        }
    }

    /// The backing image under the layers, if any.
    pub fn base(&self) -> Option<&BaseMeta> {
        self.base.as_ref().map(|b| &b.meta)
    }

    /// Whether the base holds bytes of cluster `c`.
    fn base_covers(&self, c: u64) -> bool {
        self.base
            .as_ref()
            .is_some_and(|b| c * self.cs < b.meta.size)
    }

    /// Fills `buf` with the base's bytes at `pos` (zeros past its end or without a base).
    fn read_base(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let Some(b) = &self.base else {
            buf.fill(0);
            return Ok(());
        };
        let have = b.meta.size.saturating_sub(pos).min(buf.len() as u64) as usize;
        if have > 0 {
            b.data.read_at(&mut buf[..have], pos).at(&b.meta.path)?;
        }
        buf[have..].fill(0);
        Ok(())
    }

    fn store_chain(&self) -> Result<()> {
        self.chain_meta().store(&*self.vfs, &self.dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn cluster_size(&self) -> u64 {
        self.cs
    }

    pub fn generation(&self) -> Generation {
        Generation(self.generation)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(StoreError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Topmost layer at or below `top` holding cluster `c`.
    fn owner_from(&self, c: u64, top: usize) -> Option<usize> {
        (0..=top).rev().find(|&i| self.layers[i].map.get(c))
    }

    fn owner(&self, c: u64) -> Option<usize> {
        self.owner_from(c, self.layers.len() - 1)
    }

    /// Reads `buf.len()` bytes at `offset` of the volume as the head sees it.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_view(self.layers.len() - 1, offset, buf)
    }

    /// Reads as the layer at index `top` sees the volume (itself and everything below it).
    fn read_view(&self, top: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let cs = self.cs;
        let mut pos = offset;
        while pos < end {
            let c = pos / cs;
            let src = self.owner_from(c, top);
            let mut stop = (c + 1) * cs;
            while stop < end && self.owner_from(stop / cs, top) == src {
                stop += cs;
            }
            let stop = stop.min(end);
            let slice = &mut buf[(pos - offset) as usize..(stop - offset) as usize];
            match src {
                Some(i) => {
                    let l = &self.layers[i];
                    l.data.read_at(slice, pos).at(&l.data_path)?
                }
                None => self.read_base(pos, slice)?,
            }
            pos = stop;
        }
        Ok(())
    }

    /// Reads the volume as snapshot `name` saw it.
    pub fn read_snapshot(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let i = self.snapshot_index(name)?;
        self.read_view(i, offset, buf)
    }

    /// Copies cluster `c` into the head from the layer below that holds it, if any.
    fn copy_up(&mut self, c: u64) -> Result<()> {
        let top = self.layers.len() - 1;
        if self.layers[top].map.get(c) {
            return Ok(());
        }
        let src = if top == 0 {
            None
        } else {
            self.owner_from(c, top - 1)
        };
        let mut buf = vec![0u8; self.cs as usize];
        match src {
            Some(src) => {
                let l = &self.layers[src];
                l.data.read_at(&mut buf, c * self.cs).at(&l.data_path)?;
            }
            None if self.base_covers(c) => self.read_base(c * self.cs, &mut buf)?,
            None => return Ok(()),
        }
        let head = self.head_mut();
        head.data
            .write_at(&buf, c * buf.len() as u64)
            .at(&head.data_path)?;
        Ok(())
    }

    fn allocate_head(&mut self, first: u64, last: u64) {
        let head = self.head_mut();
        for c in first..=last {
            if !head.map.get(c) {
                head.map.set(c);
                push_change(&mut head.pending, c, true);
            }
        }
        head.dirty = true;
    }

    /// Writes `data` at `offset` into the head.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let cs = self.cs;
        let end = offset + data.len() as u64;
        let first = offset / cs;
        let last = (end - 1) / cs;
        if !offset.is_multiple_of(cs) {
            self.copy_up(first)?;
        }
        if !end.is_multiple_of(cs)
            && end < self.size
            && (last != first || offset.is_multiple_of(cs))
        {
            self.copy_up(last)?;
        }
        let head = self.head();
        head.data.write_at(data, offset).at(&head.data_path)?;
        self.allocate_head(first, last);
        self.touch_merge_down(first, last + 1);
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros (WRITE_ZEROES and TRIM). Whole clusters are
    /// deallocated (or, when a lower layer holds them, kept allocated as holes).
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let cs = self.cs;
        let end = offset + len;
        // Whole clusters (the volume's last cluster may be short).
        let full_first = offset.div_ceil(cs);
        let full_end = if end == self.size {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        if full_first >= full_end {
            let zeros = vec![0u8; len as usize];
            return self.write(offset, &zeros);
        }
        let head_start = full_first * cs;
        if offset < head_start {
            let zeros = vec![0u8; (head_start - offset) as usize];
            self.write(offset, &zeros)?;
        }
        let tail_start = full_end * cs;
        if tail_start < end {
            let zeros = vec![0u8; (end - tail_start) as usize];
            self.write(tail_start, &zeros)?;
        }
        let top = self.layers.len() - 1;
        {
            let head = self.head();
            head.data
                .punch(head_start, (full_end - full_first) * cs)
                .at(&head.data_path)?;
        }
        for c in full_first..full_end {
            let below = (top > 0 && self.owner_from(c, top - 1).is_some()) || self.base_covers(c);
            let head = self.head_mut();
            let has = head.map.get(c);
            if below && !has {
                head.map.set(c);
                push_change(&mut head.pending, c, true);
            } else if !below && has {
                head.map.clear(c);
                push_change(&mut head.pending, c, false);
            }
        }
        self.head_mut().dirty = true;
        self.touch_merge_down(full_first, full_end);
        Ok(())
    }

    /// Head clusters rewritten during a fold-down must be copied again.
    fn touch_merge_down(&mut self, first: u64, end: u64) {
        if let Some((_, copied, cursor)) = self.merge_down.as_mut() {
            for c in first..end {
                copied.clear(c);
            }
            *cursor = (*cursor).min(first);
        }
    }

    fn flush_layer(&mut self, i: usize) -> Result<bool> {
        let generation = self.generation;
        let l = &mut self.layers[i];
        if !l.dirty && l.pending.is_empty() {
            return Ok(false);
        }
        if l.dirty {
            l.data.sync_data().at(&l.data_path)?;
            l.dirty = false;
        }
        let seq = self.flush_seq + 1;
        let l = &mut self.layers[i];
        l.journal.append(generation, seq, &l.pending)?;
        l.pending.clear();
        if l.journal.len() > COMPACT_AT.max(l.map.count() * 16) {
            let id = l.meta.id;
            l.journal
                .compact(&*self.vfs, &self.dir, self.cs as u32, id, &l.map)?;
        }
        self.flush_seq = seq;
        Ok(true)
    }

    /// Makes every earlier write durable, with the allocation records that make it reachable.
    pub fn flush(&mut self) -> Result<()> {
        for i in 0..self.layers.len() {
            self.flush_layer(i)?;
        }
        Ok(())
    }

    fn snapshot_index(&self, name: &str) -> Result<usize> {
        self.layers[..self.layers.len() - 1]
            .iter()
            .position(|l| l.meta.name.as_deref() == Some(name))
            .ok_or_else(|| StoreError::NoSnapshot(name.to_string()))
    }

    fn layer_index(&self, id: LayerId) -> Result<usize> {
        self.layers
            .iter()
            .position(|l| l.meta.id == id)
            .ok_or(StoreError::NoLayer(id))
    }

    /// Seals the head as snapshot `spec.name` and starts an empty head. O(1): no data is copied.
    pub fn snapshot(&mut self, spec: &SnapshotSpec) -> Result<()> {
        self.merge_down = None;
        self.merge_cursor = None;
        if spec.name.is_empty() || spec.name.len() > 255 {
            return Err(StoreError::Invalid(
                "snapshot name must be 1–255 bytes".into(),
            ));
        }
        if self
            .layers
            .iter()
            .any(|l| l.meta.name.as_deref() == Some(spec.name.as_str()))
        {
            return Err(StoreError::Invalid(format!(
                "snapshot {:?} already exists",
                spec.name
            )));
        }
        if self.layers.iter().any(|l| l.meta.id == spec.new_head) {
            return Err(StoreError::Invalid(format!(
                "layer {} already exists",
                spec.new_head
            )));
        }
        self.flush()?;
        let (data, journal) =
            Self::new_layer_files(&*self.vfs, &self.dir, self.cs as u32, spec.new_head)?;
        let old = self.head().meta.clone();
        {
            let h = self.head_mut();
            h.meta.name = Some(spec.name.clone());
            h.meta.created = spec.created;
            h.meta.user_created = spec.user_created;
            h.meta.in_sync = spec.in_sync;
        }
        self.layers.push(Layer {
            meta: head_meta(spec.new_head, spec.created),
            data,
            data_path: self.dir.join(data_name(spec.new_head)),
            map: ClusterMap::new(),
            journal,
            pending: Vec::new(),
            dirty: false,
        });
        if let Err(e) = self.store_chain() {
            self.layers.pop();
            self.head_mut().meta = old;
            return Err(e);
        }
        Ok(())
    }

    /// Marks snapshot `name` for deletion; [`Self::merge_step`] then folds it into the layer above.
    pub fn delete_snapshot(&mut self, name: &str) -> Result<()> {
        let i = self.snapshot_index(name)?;
        if self.layers[i].meta.deleting {
            return Ok(());
        }
        self.layers[i].meta.deleting = true;
        if let Err(e) = self.store_chain() {
            self.layers[i].meta.deleting = false;
            return Err(e);
        }
        Ok(())
    }

    /// Whether a snapshot delete is waiting to be merged.
    pub fn merge_pending(&self) -> bool {
        self.layers.iter().any(|l| l.meta.deleting)
    }

    /// Moves up to `budget` clusters of the lowest layer being deleted into the layer above it.
    /// When that layer is empty of unmerged clusters, it leaves the chain. Returns whether more
    /// merge work remains. Each step is short, so I/O interleaves between steps.
    pub fn merge_step(&mut self, budget: u64) -> Result<bool> {
        let Some(s) = self.layers.iter().position(|l| l.meta.deleting) else {
            return Ok(false);
        };
        let c_idx = s + 1;
        let head = self.layers.len() - 1;
        let folding = self
            .merge_down
            .as_ref()
            .is_some_and(|(id, _, _)| *id == self.layers[s].meta.id);
        if c_idx == head && (folding || self.layers[head].map.count() <= self.layers[s].map.count())
        {
            return self.fold_down_step(s, budget);
        }
        self.merge_down = None;
        let cs = self.cs;
        let sid = self.layers[s].meta.id;
        let from = match self.merge_cursor {
            Some((id, c)) if id == sid => c,
            _ => 0,
        };
        let mut todo = Vec::new();
        for r in self.layers[s].map.runs_in(from, u64::MAX) {
            for c in r.start.max(from)..r.end() {
                if !self.layers[c_idx].map.get(c) {
                    todo.push(c);
                    if todo.len() as u64 >= budget.max(1) {
                        break;
                    }
                }
            }
            if todo.len() as u64 >= budget.max(1) {
                break;
            }
        }
        self.merge_cursor = todo.last().map(|c| (sid, c + 1));
        if !todo.is_empty() {
            let mut buf = vec![0u8; cs as usize];
            for c in todo {
                let src = &self.layers[s];
                src.data.read_at(&mut buf, c * cs).at(&src.data_path)?;
                let dst = &mut self.layers[c_idx];
                dst.data.write_at(&buf, c * cs).at(&dst.data_path)?;
                dst.map.set(c);
                push_change(&mut dst.pending, c, true);
                dst.dirty = true;
            }
            return Ok(true);
        }
        // Everything of `s` is now in the layer above: make that durable, then drop `s`.
        self.flush_layer(c_idx)?;
        self.layers[c_idx].meta.rev += 1;
        let removed = self.layers.remove(s);
        if let Err(e) = self.store_chain() {
            self.layers.insert(s, removed);
            self.layers[c_idx].meta.rev -= 1;
            return Err(e);
        }
        self.remove_layer_files(removed.meta.id);
        Ok(self.merge_pending())
    }

    /// One step of deleting the snapshot `s` right below the head by copying the head's clusters
    /// down into it; when all are copied, `s` becomes the head and the old head goes. Costs the
    /// head's data, not the snapshot's. Writes during the fold are copied again.
    fn fold_down_step(&mut self, s: usize, budget: u64) -> Result<bool> {
        let h = s + 1;
        let sid = self.layers[s].meta.id;
        if self.merge_down.as_ref().is_none_or(|(id, _, _)| *id != sid) {
            self.merge_down = Some((sid, ClusterMap::new(), 0));
        }
        let cs = self.cs;
        let todo: Vec<u64> = {
            let (copied, from) = match self.merge_down.as_ref() {
                Some((_, c, f)) => (Some(c), *f),
                None => (None, 0),
            };
            self.layers[h]
                .map
                .runs_in(from, u64::MAX)
                .flat_map(|r| r.start.max(from)..r.end())
                .filter(|c| !copied.is_some_and(|m| m.get(*c)))
                .take(budget.max(1) as usize)
                .collect()
        };
        if let (Some(last), Some((_, _, cursor))) = (todo.last(), self.merge_down.as_mut()) {
            *cursor = last + 1;
        }
        if !todo.is_empty() {
            let mut buf = vec![0u8; cs as usize];
            for c in todo {
                let src = &self.layers[h];
                src.data.read_at(&mut buf, c * cs).at(&src.data_path)?;
                let dst = &mut self.layers[s];
                dst.data.write_at(&buf, c * cs).at(&dst.data_path)?;
                if !dst.map.get(c) {
                    dst.map.set(c);
                    push_change(&mut dst.pending, c, true);
                }
                dst.dirty = true;
                if let Some((_, copied, _)) = self.merge_down.as_mut() {
                    copied.set(c);
                }
            }
            return Ok(true);
        }
        // Every head cluster is in `s`: make it durable, then make `s` the head.
        self.flush_layer(s)?;
        let mut meta = self.chain_meta();
        let old_head = meta.layers.remove(h);
        let sm = &mut meta.layers[s];
        sm.name = None;
        sm.deleting = false;
        sm.in_sync = false;
        sm.user_created = false;
        sm.created = old_head.created;
        sm.rev += 1;
        meta.store(&*self.vfs, &self.dir)?;
        let removed = self.layers.remove(h);
        self.layers[s].meta = meta.layers[s].clone();
        // The old head's pending allocation changes are moot: its clusters now live in `s`.
        self.merge_down = None;
        self.remove_layer_files(removed.meta.id);
        self.scrub_head()?;
        Ok(self.merge_pending())
    }

    fn remove_layer_files(&self, id: LayerId) {
        for n in [data_name(id), map_name(id)] {
            let p = self.dir.join(n);
            if let Err(e) = self.vfs.remove(&p) {
                // The next open removes it as a stray.
                tracing::warn!(path = %p.display(), error = %e, "could not remove layer file");
            }
        }
    }

    /// Reverts the volume to snapshot `name`: the head and every snapshot newer than `name` are
    /// discarded and an empty head on top of `name` takes their place.
    pub fn revert(&mut self, name: &str, new_head: LayerId, created: u64) -> Result<()> {
        self.merge_down = None;
        self.merge_cursor = None;
        let i = self.snapshot_index(name)?;
        if self.layers[i].meta.deleting {
            return Err(StoreError::Invalid(format!(
                "snapshot {name:?} is being deleted"
            )));
        }
        if self.layers.iter().any(|l| l.meta.id == new_head) {
            return Err(StoreError::Invalid(format!(
                "layer {new_head} already exists"
            )));
        }
        let (data, journal) =
            Self::new_layer_files(&*self.vfs, &self.dir, self.cs as u32, new_head)?;
        let mut meta = self.chain_meta();
        meta.layers.truncate(i + 1);
        meta.layers.push(head_meta(new_head, created));
        meta.store(&*self.vfs, &self.dir)?;
        let dropped: Vec<Layer> = self.layers.drain(i + 1..).collect();
        self.layers.push(Layer {
            meta: head_meta(new_head, created),
            data,
            data_path: self.dir.join(data_name(new_head)),
            map: ClusterMap::new(),
            journal,
            pending: Vec::new(),
            dirty: false,
        });
        for l in dropped {
            self.remove_layer_files(l.meta.id);
        }
        Ok(())
    }

    /// Grows the volume to `size` bytes.
    pub fn expand(&mut self, size: u64) -> Result<()> {
        if size < self.size || !size.is_multiple_of(4096) {
            return Err(StoreError::Invalid(format!(
                "new size {size} must be a multiple of 4096 and at least the current {}",
                self.size
            )));
        }
        let old = self.size;
        self.size = size;
        if let Err(e) = self.store_chain() {
            self.size = old;
            return Err(e);
        }
        Ok(())
    }

    /// The chain, bottom first (the last entry is the head).
    pub fn layers(&self) -> Vec<LayerInfo> {
        self.layers
            .iter()
            .map(|l| LayerInfo {
                meta: l.meta.clone(),
                allocated: l.map.count() * self.cs,
            })
            .collect()
    }

    /// Clusters that differ between snapshot `from` and snapshot `to` (or the head when `None`):
    /// those allocated in any layer above `from` up to `to`. Cost follows the changed clusters.
    pub fn diff(&self, from: &str, to: Option<&str>) -> Result<Vec<Run>> {
        let f = self.snapshot_index(from)?;
        let t = match to {
            Some(n) => self.snapshot_index(n)?,
            None => self.layers.len() - 1,
        };
        if t <= f {
            return Err(StoreError::Invalid(format!(
                "{to:?} is not newer than {from:?}"
            )));
        }
        let mut union = ClusterMap::new();
        for l in &self.layers[f + 1..=t] {
            for r in l.map.runs() {
                union.apply(r, true);
            }
        }
        Ok(union.runs())
    }

    /// Allocation of `[offset, offset+len)` as extents `(length, allocated)`, at cluster
    /// granularity (for NBD block status).
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        self.check_range(offset, len)?;
        let cs = self.cs;
        let end = offset + len;
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let c = pos / cs;
            let stop = ((c + 1) * cs).min(end);
            let a = self.owner(c).is_some() || self.base_covers(c);
            match out.last_mut() {
                Some((l, was)) if *was == a => *l += stop - pos,
                _ => out.push((stop - pos, a)),
            }
            pos = stop;
        }
        Ok(out)
    }

    /// Allocated cluster runs of one layer.
    pub fn layer_runs(&self, id: LayerId) -> Result<Vec<Run>> {
        Ok(self.layers[self.layer_index(id)?].map.runs())
    }

    fn check_clusters(&self, cluster: u64, count: u64) -> Result<()> {
        let clusters = self.size.div_ceil(self.cs);
        match cluster.checked_add(count) {
            Some(e) if e <= clusters => Ok(()),
            _ => Err(StoreError::OutOfRange {
                offset: cluster.saturating_mul(self.cs),
                len: count.saturating_mul(self.cs),
                size: self.size,
            }),
        }
    }

    /// Raw contents of `count` clusters of one layer (unallocated clusters read as zeros).
    pub fn read_layer(&self, id: LayerId, cluster: u64, count: u64) -> Result<Vec<u8>> {
        self.check_clusters(cluster, count)?;
        let l = &self.layers[self.layer_index(id)?];
        let mut buf = vec![0u8; (count * self.cs) as usize];
        l.data
            .read_at(&mut buf, cluster * self.cs)
            .at(&l.data_path)?;
        Ok(buf)
    }

    /// Per-cluster checksums of one layer: BLAKE3 of the contents, truncated to 16 bytes; all
    /// zeros for an unallocated cluster.
    pub fn checksum_layer(&self, id: LayerId, cluster: u64, count: u64) -> Result<Vec<[u8; 16]>> {
        self.check_clusters(cluster, count)?;
        let l = &self.layers[self.layer_index(id)?];
        let mut buf = vec![0u8; self.cs as usize];
        let mut out = Vec::with_capacity(count as usize);
        for c in cluster..cluster + count {
            if l.map.get(c) {
                l.data.read_at(&mut buf, c * self.cs).at(&l.data_path)?;
                let h = blake3::hash(&buf);
                let mut s = [0u8; 16];
                s.copy_from_slice(&h.as_bytes()[..16]);
                if s == [0; 16] {
                    s[0] = 1;
                }
                out.push(s);
            } else {
                out.push([0; 16]);
            }
        }
        Ok(out)
    }

    /// Writes whole clusters into a sealed layer (rebuild). Durable after [`Self::sync_layer`].
    pub fn write_layer(&mut self, id: LayerId, cluster: u64, data: &[u8]) -> Result<()> {
        // A rebuild changes sealed layers: merges scan again from the start.
        self.merge_cursor = None;
        if let Some((_, _, c)) = self.merge_down.as_mut() {
            *c = 0;
        }
        if !(data.len() as u64).is_multiple_of(self.cs) {
            return Err(StoreError::Invalid(
                "layer writes are whole clusters".into(),
            ));
        }
        let count = data.len() as u64 / self.cs;
        self.check_clusters(cluster, count)?;
        let i = self.layer_index(id)?;
        if i == self.layers.len() - 1 {
            return Err(StoreError::Invalid(
                "layer writes go to sealed layers only".into(),
            ));
        }
        let l = &mut self.layers[i];
        l.data.write_at(data, cluster * self.cs).at(&l.data_path)?;
        for c in cluster..cluster + count {
            if !l.map.get(c) {
                l.map.set(c);
                push_change(&mut l.pending, c, true);
            }
        }
        l.dirty = true;
        l.meta.in_sync = false;
        Ok(())
    }

    /// Deallocates clusters of a sealed layer (rebuild).
    pub fn unset_layer(&mut self, id: LayerId, cluster: u64, count: u64) -> Result<()> {
        self.merge_cursor = None;
        if let Some((_, _, c)) = self.merge_down.as_mut() {
            *c = 0;
        }
        self.check_clusters(cluster, count)?;
        let i = self.layer_index(id)?;
        if i == self.layers.len() - 1 {
            return Err(StoreError::Invalid(
                "layer writes go to sealed layers only".into(),
            ));
        }
        let cs = self.cs;
        let l = &mut self.layers[i];
        l.data.punch(cluster * cs, count * cs).at(&l.data_path)?;
        for c in cluster..cluster + count {
            if l.map.get(c) {
                l.map.clear(c);
                push_change(&mut l.pending, c, false);
            }
        }
        l.dirty = true;
        l.meta.in_sync = false;
        Ok(())
    }

    /// Makes a layer's rebuilt contents durable.
    pub fn sync_layer(&mut self, id: LayerId) -> Result<()> {
        let i = self.layer_index(id)?;
        self.flush_layer(i).map(|_| ())
    }

    /// Records that a layer now equals the in-sync copies at revision `rev`.
    pub fn mark_in_sync(&mut self, id: LayerId, rev: u64) -> Result<()> {
        let i = self.layer_index(id)?;
        if i == self.layers.len() - 1 {
            return Err(StoreError::Invalid(
                "the head cannot be marked in sync".into(),
            ));
        }
        self.flush_layer(i)?;
        let old = self.layers[i].meta.clone();
        self.layers[i].meta.in_sync = true;
        self.layers[i].meta.rev = rev;
        if let Err(e) = self.store_chain() {
            self.layers[i].meta = old;
            return Err(e);
        }
        Ok(())
    }

    /// Reshapes the chain to `specs` (a healthy replica's chain, bottom first) before a rebuild:
    /// layers with a known id are kept with their data, new ones start empty and out of sync,
    /// the rest are dropped.
    pub fn reset_chain(&mut self, specs: &[LayerMeta]) -> Result<()> {
        self.merge_down = None;
        self.merge_cursor = None;
        if specs.is_empty() {
            return Err(StoreError::Invalid(
                "a chain needs at least one layer".into(),
            ));
        }
        self.flush()?;
        let mut old: Vec<Option<Layer>> = self.layers.drain(..).map(Some).collect();
        let mut new = Vec::with_capacity(specs.len());
        let n = specs.len();
        for (k, spec) in specs.iter().enumerate() {
            let is_head = k == n - 1;
            let found = old
                .iter_mut()
                .find(|o| o.as_ref().is_some_and(|l| l.meta.id == spec.id));
            let mut meta = LayerMeta {
                id: spec.id,
                name: if is_head { None } else { spec.name.clone() },
                created: spec.created,
                user_created: spec.user_created,
                rev: 0,
                in_sync: false,
                deleting: !is_head && spec.deleting,
            };
            let layer = match found.and_then(Option::take) {
                Some(mut l) => {
                    meta.rev = l.meta.rev;
                    meta.in_sync = !is_head && l.meta.in_sync;
                    l.meta = meta;
                    l
                }
                None => {
                    let (data, journal) =
                        Self::new_layer_files(&*self.vfs, &self.dir, self.cs as u32, spec.id)?;
                    Layer {
                        meta,
                        data,
                        data_path: self.dir.join(data_name(spec.id)),
                        map: ClusterMap::new(),
                        journal,
                        pending: Vec::new(),
                        dirty: false,
                    }
                }
            };
            new.push(layer);
        }
        self.layers = new;
        let dropped: Vec<LayerId> = old.into_iter().flatten().map(|l| l.meta.id).collect();
        self.store_chain()?;
        for id in dropped {
            self.remove_layer_files(id);
        }
        self.scrub_head()
    }

    /// Accepts an engine session of `generation`, refusing one older than any accepted before.
    pub fn accept_generation(&mut self, generation: Generation) -> Result<()> {
        if generation.0 < self.generation {
            return Err(StoreError::StaleGeneration {
                offered: generation.0,
                current: self.generation,
            });
        }
        if generation.0 > self.generation {
            let old = self.generation;
            self.generation = generation.0;
            if let Err(e) = self.store_chain() {
                self.generation = old;
                return Err(e);
            }
        }
        Ok(())
    }

    pub fn status(&self) -> StoreStatus {
        StoreStatus {
            size: self.size,
            cluster_size: self.cs as u32,
            generation: Generation(self.generation),
            flush_seq: self.flush_seq,
            head: self.head().meta.id,
            layers: self.layers.len() as u32,
            index_memory: self.index_memory() as u64,
        }
    }

    /// Approximate heap bytes of the in-memory index (allocation maps and layer records).
    pub fn index_memory(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.map.memory_bytes() + std::mem::size_of::<Layer>() + 64)
            .sum()
    }

    /// Removes the replica's files.
    pub fn destroy(self) -> Result<()> {
        let dir = self.dir.clone();
        for l in &self.layers {
            self.remove_layer_files(l.meta.id);
        }
        let p = dir.join(CHAIN_FILE);
        self.vfs.remove(&p).at(&p)?;
        self.vfs.sync_dir(&dir).at(&dir)
    }
}

fn head_meta(id: LayerId, created: u64) -> LayerMeta {
    LayerMeta {
        id,
        name: None,
        created,
        user_created: false,
        rev: 0,
        in_sync: false,
        deleting: false,
    }
}
