//! Backing images: create (download, upload, clone), delete (refused while volumes use it),
//! where copies should be (`plan_copies`, pure), what a node's heartbeat reports and is ordered
//! (first copy from the source, later ones from a peer with a ready copy), the image's state
//! rolled up from its copies, and the replica gate (a replica is sent to its node only once the
//! node's copy is ready).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::ApiError;
use crate::controller::{Manager, conflict, not_found};
use crate::model::*;
use crate::store::{self, Store};

/// The label naming the backing image a backup holds (or, on a volume backup, the image the
/// volume is on).
pub const IMAGE_LABEL: &str = "backing-image";
/// The label with that image's SHA-512.
pub const CHECKSUM_LABEL: &str = "backing-image-checksum";

/// A node as copy placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyNode {
    pub name: String,
    pub up: bool,
    pub schedulable: bool,
    pub disk: String,
}

/// Whether a checksum is SHA-512 in hex.
fn valid_checksum(c: &str) -> bool {
    c.len() == 128 && c.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The copies an image should have: one on every node in `needed` (replicas of its volumes
/// run there) and, to reach `minCopies`, on nodes that already hold one (ready first), then on
/// up, schedulable nodes by name. A copy no longer wanted is dropped, unless it is the last
/// ready one. A failed image gets no new copies.
pub fn plan_copies(
    img: &BackingImage,
    nodes: &[CopyNode],
    needed: &BTreeSet<String>,
) -> Vec<BackingImageCopy> {
    let copies = &img.status.copies;
    if img.status.state == BackingImageState::Failed {
        return copies.clone();
    }
    let known = |n: &str| nodes.iter().find(|x| x.name == n);
    let mut wanted: Vec<String> = needed
        .iter()
        .filter(|n| known(n).is_some())
        .cloned()
        .collect();
    let min = img.spec.min_copies.max(1) as usize;
    let rank = |c: &BackingImageCopy| match c.state {
        BackingImageState::Ready => 0,
        BackingImageState::InProgress => 1,
        BackingImageState::Pending => 2,
        BackingImageState::Failed => 3,
    };
    let mut held: Vec<&BackingImageCopy> = copies
        .iter()
        .filter(|c| c.state != BackingImageState::Failed && known(&c.node).is_some())
        .collect();
    held.sort_by(|a, b| (rank(a), &a.node).cmp(&(rank(b), &b.node)));
    for c in held {
        if wanted.len() >= min {
            break;
        }
        if !wanted.contains(&c.node) {
            wanted.push(c.node.clone());
        }
    }
    let mut spare: Vec<&CopyNode> = nodes.iter().filter(|n| n.up && n.schedulable).collect();
    spare.sort_by(|a, b| a.name.cmp(&b.name));
    for n in spare {
        if wanted.len() >= min {
            break;
        }
        if !wanted.contains(&n.name) {
            wanted.push(n.name.clone());
        }
    }
    let mut out: Vec<BackingImageCopy> = Vec::new();
    for w in &wanted {
        match copies.iter().find(|c| &c.node == w) {
            Some(c) => out.push(c.clone()),
            None => out.push(BackingImageCopy {
                node: w.clone(),
                disk: known(w).map(|n| n.disk.clone()).unwrap_or_default(),
                state: BackingImageState::Pending,
                ..Default::default()
            }),
        }
    }
    // Never drop the last ready copy.
    if !out.iter().any(|c| c.state == BackingImageState::Ready)
        && let Some(last) = copies.iter().find(|c| c.state == BackingImageState::Ready)
    {
        out.push(last.clone());
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out
}

/// The image's state from its copies: ready once one copy is; failed when the first copy
/// failed (and stays so); else in progress or pending.
pub fn roll_up(img: &mut BackingImage) {
    let st = &mut img.status;
    if let Some(r) = st
        .copies
        .iter()
        .find(|c| c.state == BackingImageState::Ready)
    {
        st.state = BackingImageState::Ready;
        st.progress = 100;
        st.message.clear();
        if st.checksum.is_empty() {
            // Filled from the ready copy's report.
            let _ = &r.node;
        }
        return;
    }
    if st.state == BackingImageState::Failed {
        return;
    }
    if let Some(f) = st
        .copies
        .iter()
        .find(|c| c.state == BackingImageState::Failed)
    {
        st.state = BackingImageState::Failed;
        st.message = format!("the first copy failed on node {}: {}", f.node, f.message);
        return;
    }
    let busy = st
        .copies
        .iter()
        .filter(|c| c.state == BackingImageState::InProgress)
        .map(|c| c.progress)
        .max();
    match busy {
        Some(p) => {
            st.state = BackingImageState::InProgress;
            st.progress = p;
        }
        None => {
            st.state = BackingImageState::Pending;
            st.progress = 0;
            if img.spec.source.kind == BackingImageSourceKind::Upload && st.message.is_empty() {
                st.message = "waiting for an upload".into();
            }
        }
    }
}

/// The checksum every copy must have: the one asked for, else the first ready copy's.
fn expected(img: &BackingImage) -> String {
    if img.spec.checksum.is_empty() {
        img.status.checksum.clone()
    } else {
        img.spec.checksum.clone()
    }
}

pub(crate) fn copy_ref(img: &BackingImage) -> CopyRef {
    CopyRef {
        name: img.metadata.name.clone(),
        uid: img.metadata.uid.clone(),
        checksum: expected(img),
        size: img.status.virtual_size,
    }
}

/// A ready copy of `img` on an up node other than `not`, with its transfer address.
fn ready_peer(
    img: &BackingImage,
    nodes: &HashMap<String, Node>,
    not: &str,
) -> Option<(String, String)> {
    img.status
        .copies
        .iter()
        .filter(|c| c.state == BackingImageState::Ready && c.node != not)
        .filter_map(|c| {
            let n = nodes.get(&c.node)?;
            (n.status.state == NodeState::Up && !n.status.transfer_address.is_empty())
                .then(|| (c.node.clone(), n.status.transfer_address.clone()))
        })
        .next()
}

impl Manager {
    pub fn create_backing_image(
        &self,
        name: &str,
        mut spec: BackingImageSpec,
    ) -> Result<BackingImage, ApiError> {
        zebu_types::validate_name(name).map_err(|e| ApiError::bad("InvalidName", e.to_string()))?;
        spec.checksum = spec.checksum.trim().to_ascii_lowercase();
        if !spec.checksum.is_empty() && !valid_checksum(&spec.checksum) {
            return Err(ApiError::bad(
                "InvalidChecksum",
                "checksum must be a SHA-512 in hex (128 digits)",
            ));
        }
        if spec.min_copies == 0 || spec.min_copies > 64 {
            return Err(ApiError::bad(
                "InvalidMinCopies",
                format!("minCopies {} must be between 1 and 64", spec.min_copies),
            ));
        }
        let src = &mut spec.source;
        if src.kind != BackingImageSourceKind::Restore {
            src.backup.clear();
        }
        match src.kind {
            BackingImageSourceKind::Restore => {
                src.url.clear();
                src.image.clear();
                src.volume.clear();
                src.snapshot.clear();
                zebu_types::validate_name(&src.backup)
                    .map_err(|e| ApiError::bad("InvalidName", e.to_string()))?;
                let b = store::get::<Backup>(&*self.store, &src.backup)?
                    .ok_or_else(|| not_found("backup", &src.backup))?;
                if zebu_types::owner_image(&b.spec.volume).is_none() {
                    return Err(ApiError::bad(
                        "NotImageBackup",
                        format!(
                            "backup {:?} is of volume {:?}, not of a backing image",
                            src.backup, b.spec.volume
                        ),
                    ));
                }
                if b.status.state != BackupState::Completed {
                    return Err(conflict(
                        "BackupNotCompleted",
                        format!("backup {:?} is not completed", src.backup),
                    ));
                }
                let sum = b
                    .metadata
                    .labels
                    .get(CHECKSUM_LABEL)
                    .cloned()
                    .unwrap_or_default();
                if !spec.checksum.is_empty() && !sum.is_empty() && spec.checksum != sum {
                    return Err(ApiError::bad(
                        "ChecksumMismatch",
                        format!("backup {:?} holds an image with checksum {sum}", src.backup),
                    ));
                }
                if spec.checksum.is_empty() {
                    spec.checksum = sum;
                }
            }
            BackingImageSourceKind::Download => {
                src.volume.clear();
                src.snapshot.clear();
                let ok = reqwest::Url::parse(&src.url).is_ok_and(|u| {
                    matches!(u.scheme(), "http" | "https") && u.host_str().is_some()
                });
                if !ok {
                    return Err(ApiError::bad(
                        "InvalidUrl",
                        format!("{:?} is not an http:// or https:// URL", src.url),
                    ));
                }
                src.image.clear();
            }
            BackingImageSourceKind::Upload => {
                src.url.clear();
                src.image.clear();
                src.volume.clear();
                src.snapshot.clear();
            }
            BackingImageSourceKind::Export => {
                src.url.clear();
                src.image.clear();
                zebu_types::validate_name(&src.volume)
                    .map_err(|e| ApiError::bad("InvalidName", e.to_string()))?;
                self.attached_volume(&src.volume, "exporting it as a backing image")?;
                if src.snapshot.is_empty() {
                    let snap = format!("export-{:08x}", rand::random::<u32>());
                    self.create_snapshot(&src.volume, Some(&snap))?;
                    src.snapshot = snap;
                } else {
                    let key = format!("{}.{}", src.volume, src.snapshot);
                    let ok = store::get::<Snapshot>(&*self.store, &key)?
                        .is_some_and(|sn| sn.metadata.deletion_requested.is_none());
                    if !ok {
                        return Err(not_found("snapshot", &key));
                    }
                }
            }
            BackingImageSourceKind::Clone => {
                src.url.clear();
                src.volume.clear();
                src.snapshot.clear();
                let from = store::get::<BackingImage>(&*self.store, &src.image)?
                    .ok_or_else(|| not_found("backing image", &src.image))?;
                if from.status.state != BackingImageState::Ready {
                    return Err(conflict(
                        "NotReady",
                        format!(
                            "backing image {:?} is {}, not ready: it cannot be cloned yet",
                            src.image,
                            from.status.state.as_str()
                        ),
                    ));
                }
                let sum = expected(&from);
                if !spec.checksum.is_empty() && spec.checksum != sum {
                    return Err(ApiError::bad(
                        "ChecksumMismatch",
                        format!(
                            "backing image {:?} has checksum {sum}, not the one given",
                            src.image
                        ),
                    ));
                }
                spec.checksum = sum;
            }
        }
        let mut img = BackingImage {
            metadata: Meta {
                name: name.to_string(),
                ..Default::default()
            },
            spec,
            status: BackingImageStatus::default(),
        };
        roll_up(&mut img);
        let img = store::create(&*self.store, &img)?;
        tracing::info!(
            image = name,
            source = img.spec.source.kind.as_str(),
            "backing image created"
        );
        Ok(img)
    }

    /// Deletes an image no volume uses and no clone in progress reads; nodes delete their
    /// copies when they next report them.
    pub fn delete_backing_image(&self, name: &str) -> Result<BackingImage, ApiError> {
        let img = store::get::<BackingImage>(&*self.store, name)?
            .ok_or_else(|| not_found("backing image", name))?;
        let users: Vec<String> = store::list::<Volume>(&*self.store)?
            .into_iter()
            .filter(|v| v.spec.backing_image == name)
            .map(|v| v.metadata.name)
            .collect();
        if !users.is_empty() {
            return Err(conflict(
                "InUse",
                format!(
                    "backing image {name:?} is used by volume(s) {}",
                    users.join(", ")
                ),
            ));
        }
        let clones: Vec<String> = store::list::<BackingImage>(&*self.store)?
            .into_iter()
            .filter(|b| {
                b.spec.source.kind == BackingImageSourceKind::Clone
                    && b.spec.source.image == name
                    && b.status.state != BackingImageState::Ready
                    && b.status.state != BackingImageState::Failed
            })
            .map(|b| b.metadata.name)
            .collect();
        if !clones.is_empty() {
            return Err(conflict(
                "InUse",
                format!(
                    "backing image {name:?} is being cloned into {}",
                    clones.join(", ")
                ),
            ));
        }
        store::delete(&*self.store, &img)?;
        for c in &img.status.copies {
            self.wake_node(&c.node);
        }
        tracing::info!(image = name, "backing image deleted");
        Ok(img)
    }

    /// What a volume on `name` of `size` bytes needs: the image ready, and no larger.
    pub(crate) fn check_volume_image(&self, name: &str, size: u64) -> Result<(), ApiError> {
        let img = store::get::<BackingImage>(&*self.store, name)?
            .ok_or_else(|| not_found("backing image", name))?;
        if img.status.state != BackingImageState::Ready {
            return Err(conflict(
                "NotReady",
                format!(
                    "backing image {name:?} is {}, not ready{}",
                    img.status.state.as_str(),
                    if img.status.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", img.status.message)
                    }
                ),
            ));
        }
        if size < img.status.virtual_size {
            return Err(ApiError::bad(
                "InvalidSize",
                format!(
                    "size {size} is smaller than backing image {name:?} ({} bytes)",
                    img.status.virtual_size
                ),
            ));
        }
        Ok(())
    }

    /// Places copies where they are needed (a pass of the image controller): every image's
    /// copies re-planned from the nodes and the replicas of its volumes.
    pub fn reconcile_images(&self) -> Result<(), ApiError> {
        let s = &*self.store;
        let images = store::list::<BackingImage>(s)?;
        if images.is_empty() {
            return Ok(());
        }
        let nodes: Vec<CopyNode> = store::list::<Node>(s)?
            .into_iter()
            .map(|n| {
                let n = self.node_view(n);
                CopyNode {
                    up: n.status.state == NodeState::Up,
                    schedulable: n.spec.allow_scheduling && !n.spec.evict,
                    disk: n
                        .status
                        .disks
                        .first()
                        .map(|d| d.path.clone())
                        .unwrap_or_default(),
                    name: n.metadata.name,
                }
            })
            .collect();
        let mut needed: HashMap<String, BTreeSet<String>> = HashMap::new();
        for r in store::list::<Replica>(s)? {
            if !r.spec.backing_image.is_empty() && r.metadata.deletion_requested.is_none() {
                needed
                    .entry(r.spec.backing_image.clone())
                    .or_default()
                    .insert(r.spec.node.clone());
            }
        }
        let none = BTreeSet::new();
        for img in images {
            let name = img.metadata.name.clone();
            // A clone whose source went away before its first copy cannot finish.
            let lost_source = img.spec.source.kind == BackingImageSourceKind::Clone
                && img.status.state != BackingImageState::Ready
                && img.status.state != BackingImageState::Failed
                && !store::get::<BackingImage>(s, &img.spec.source.image)?
                    .is_some_and(|b| b.status.state == BackingImageState::Ready);
            let mut want = needed.get(&name).unwrap_or(&none).clone();
            if img.spec.source.kind == BackingImageSourceKind::Export
                && img.status.state != BackingImageState::Ready
                && let Some(n) =
                    store::get::<Volume>(s, &img.spec.source.volume)?.and_then(|v| v.status.node)
            {
                // The first copy is read where the volume's engine runs.
                want.insert(n);
            }
            let want = &want;
            let mut woken: BTreeSet<String> = BTreeSet::new();
            store::modify::<BackingImage>(s, &name, |b| {
                let before = b.status.clone();
                if lost_source {
                    b.status.state = BackingImageState::Failed;
                    b.status.message = format!(
                        "source backing image {:?} is gone or not ready",
                        b.spec.source.image
                    );
                }
                b.status.copies = plan_copies(b, &nodes, want);
                roll_up(b);
                for c in &b.status.copies {
                    if !before.copies.iter().any(|x| x.node == c.node) {
                        woken.insert(c.node.clone());
                    }
                }
                for c in &before.copies {
                    if !b.status.copies.iter().any(|x| x.node == c.node) {
                        woken.insert(c.node.clone());
                    }
                }
                b.status != before
            })?;
            for n in woken {
                self.wake_node(&n);
            }
        }
        Ok(())
    }

    /// Applies a node's copy reports to the images and fills in its copy orders and deletions.
    pub(crate) fn image_heartbeat(
        &self,
        s: &dyn Store,
        node: &str,
        reports: &[CopyReport],
        a: &mut Assignments,
    ) -> Result<(), ApiError> {
        let images = store::list::<BackingImage>(s)?;
        if images.is_empty() && reports.is_empty() {
            return Ok(());
        }
        let by_name: HashMap<&str, &BackingImage> = images
            .iter()
            .map(|b| (b.metadata.name.as_str(), b))
            .collect();
        for r in reports {
            let keep = by_name.get(r.name.as_str()).is_some_and(|b| {
                b.metadata.uid == r.uid
                    && (b.status.copies.iter().any(|c| c.node == node)
                        || (r.state == BackingImageState::Ready
                            && b.status.state != BackingImageState::Ready))
            });
            if !keep {
                a.delete_backing_images.push(CopyRef {
                    name: r.name.clone(),
                    uid: r.uid.clone(),
                    ..Default::default()
                });
            }
        }
        let nodes: HashMap<String, Node> = store::list::<Node>(s)?
            .into_iter()
            .map(|n| {
                let n = self.node_view(n);
                (n.metadata.name.clone(), n)
            })
            .collect();
        for img in &images {
            let name = &img.metadata.name;
            let mine = reports
                .iter()
                .find(|r| &r.name == name && r.uid == img.metadata.uid);
            let updated = store::modify::<BackingImage>(s, name, |b| {
                let before = b.status.clone();
                let want = expected(b);
                let idx = match b.status.copies.iter().position(|c| c.node == node) {
                    Some(i) => i,
                    None => match mine {
                        // A ready copy of an image that has none: adopted.
                        Some(r)
                            if r.state == BackingImageState::Ready
                                && b.status.state != BackingImageState::Ready =>
                        {
                            b.status.copies.push(BackingImageCopy {
                                node: node.to_string(),
                                ..Default::default()
                            });
                            b.status.copies.len() - 1
                        }
                        _ => return false,
                    },
                };
                let c = &mut b.status.copies[idx];
                match mine {
                    Some(r) => {
                        let differs = r.state == BackingImageState::Ready
                            && !want.is_empty()
                            && r.checksum != want;
                        if differs {
                            c.state = BackingImageState::Pending;
                            c.message = format!(
                                "copy's checksum {} differs from the image's; fetching it again",
                                &r.checksum
                            );
                        } else {
                            c.state = r.state;
                            c.progress = r.progress;
                            c.message = r.message.clone();
                        }
                        if r.state == BackingImageState::Ready && !differs {
                            if b.status.checksum.is_empty() {
                                b.status.checksum = r.checksum.clone();
                            }
                            if b.status.virtual_size == 0 {
                                b.status.virtual_size = r.size;
                            }
                        }
                    }
                    // An upload reaches its node after the copy is placed.
                    None if c.state == BackingImageState::InProgress
                        && b.spec.source.kind == BackingImageSourceKind::Upload => {}
                    None => {
                        if c.state == BackingImageState::Ready {
                            c.message = "the copy is gone from its node; fetching it again".into();
                        }
                        if c.state != BackingImageState::Failed {
                            c.state = BackingImageState::Pending;
                            c.progress = 0;
                        }
                    }
                }
                roll_up(b);
                b.status != before
            })?;
            let Some(b) = updated else { continue };
            if b.status.state == BackingImageState::Failed {
                continue;
            }
            if let Some(r) = mine
                && r.state == BackingImageState::Ready
                && !expected(&b).is_empty()
                && r.checksum != expected(&b)
            {
                a.delete_backing_images.push(CopyRef {
                    name: name.clone(),
                    uid: b.metadata.uid.clone(),
                    ..Default::default()
                });
                continue;
            }
            let Some(c) = b.status.copies.iter().find(|c| c.node == node) else {
                continue;
            };
            if c.state == BackingImageState::Ready || c.state == BackingImageState::Failed {
                continue;
            }
            if let Some(o) = self.copy_order(s, &b, node, &nodes)? {
                a.backing_images.push(o);
            }
        }
        Ok(())
    }

    /// Where `node` fetches its copy of `b` from: a peer with a ready copy, else (for the
    /// first copy, on the first node in line) the source.
    fn copy_order(
        &self,
        s: &dyn Store,
        b: &BackingImage,
        node: &str,
        nodes: &HashMap<String, Node>,
    ) -> Result<Option<CopyOrder>, ApiError> {
        let copy = copy_ref(b);
        if let Some((peer_node, peer)) = ready_peer(b, nodes, node) {
            return Ok(Some(CopyOrder {
                source: CopySource::Peer {
                    node: peer_node,
                    peer,
                    copy: copy.clone(),
                },
                copy,
            }));
        }
        if b.status.state == BackingImageState::Ready {
            // Ready copies exist but none is reachable now.
            return Ok(None);
        }
        // The first copy: one node at a time, the one already at it or the first up one.
        let up = |n: &str| {
            nodes
                .get(n)
                .is_some_and(|x| x.status.state == NodeState::Up)
        };
        let first = if b.spec.source.kind == BackingImageSourceKind::Export {
            store::get::<Volume>(s, &b.spec.source.volume)?.and_then(|v| v.status.node)
        } else {
            b.status
                .copies
                .iter()
                .filter(|c| up(&c.node) && c.state != BackingImageState::Failed)
                .min_by_key(|c| (c.state != BackingImageState::InProgress, c.node.clone()))
                .map(|c| c.node.clone())
        };
        if first.as_deref() != Some(node) {
            return Ok(None);
        }
        let source = match b.spec.source.kind {
            BackingImageSourceKind::Download => CopySource::Url {
                url: b.spec.source.url.clone(),
            },
            BackingImageSourceKind::Upload => return Ok(None),
            BackingImageSourceKind::Restore => {
                let Some(bk) = store::get::<Backup>(s, &b.spec.source.backup)? else {
                    return Ok(None);
                };
                let Ok(target) = self.target_ref(&bk.spec.target) else {
                    return Ok(None);
                };
                CopySource::Restore {
                    target,
                    owner: bk.spec.volume.clone(),
                    backup: bk.metadata.name.clone(),
                }
            }
            BackingImageSourceKind::Export => {
                let (volume, snapshot) = (&b.spec.source.volume, &b.spec.source.snapshot);
                let ready = store::get::<Snapshot>(s, &format!("{volume}.{snapshot}"))?
                    .is_some_and(|sn| sn.status.ready);
                if !ready {
                    return Ok(None);
                }
                CopySource::Export {
                    volume: volume.clone(),
                    snapshot: snapshot.clone(),
                }
            }
            BackingImageSourceKind::Clone => {
                let Some(from) = store::get::<BackingImage>(s, &b.spec.source.image)? else {
                    return Ok(None);
                };
                let Some((peer_node, peer)) = ready_peer(&from, nodes, "") else {
                    return Ok(None);
                };
                CopySource::Peer {
                    node: peer_node,
                    peer,
                    copy: copy_ref(&from),
                }
            }
        };
        Ok(Some(CopyOrder { copy, source }))
    }

    /// The copy a replica on `node` reads through, once that node's copy is ready.
    pub(crate) fn replica_base(
        &self,
        s: &dyn Store,
        image: &str,
        reports: &[CopyReport],
    ) -> Result<Option<CopyRef>, ApiError> {
        let Some(b) = store::get::<BackingImage>(s, image)? else {
            return Ok(None);
        };
        let want = expected(&b);
        let ready = reports.iter().any(|r| {
            r.name == image
                && r.uid == b.metadata.uid
                && r.state == BackingImageState::Ready
                && (want.is_empty() || r.checksum == want)
        });
        Ok(ready.then(|| copy_ref(&b)))
    }

    /// Backs up the image to `target` (default: `default`): a Backup of owner `bi.<name>`,
    /// run by a node holding a ready copy; its labels record the image and its checksum.
    pub fn create_image_backup(
        &self,
        name: &str,
        target: Option<&str>,
    ) -> Result<Backup, ApiError> {
        let target = target.unwrap_or(DEFAULT_TARGET).to_string();
        zebu_types::validate_name(&target)
            .map_err(|e| ApiError::bad("InvalidName", e.to_string()))?;
        let bname = format!("backup-{:016x}", rand::random::<u64>());
        self.image_backup_named(name, &target, &bname, BTreeMap::new())
    }

    /// Records backup `bname` of image `name` to `target` with `labels` (plus the image's).
    pub(crate) fn image_backup_named(
        &self,
        name: &str,
        target: &str,
        bname: &str,
        mut labels: BTreeMap<String, String>,
    ) -> Result<Backup, ApiError> {
        let s = &*self.store;
        let img =
            store::get::<BackingImage>(s, name)?.ok_or_else(|| not_found("backing image", name))?;
        if img.status.state != BackingImageState::Ready {
            return Err(conflict(
                "NotReady",
                format!(
                    "backing image {name:?} is {}, not ready: nothing to back up yet",
                    img.status.state.as_str()
                ),
            ));
        }
        let tr = self.available_target(target)?;
        let owner = zebu_types::image_owner(name);
        labels.insert(IMAGE_LABEL.to_string(), name.to_string());
        labels.insert(CHECKSUM_LABEL.to_string(), expected(&img));
        let b = Backup {
            metadata: Meta {
                name: bname.to_string(),
                labels,
                ..Default::default()
            },
            spec: BackupSpec {
                volume: owner.clone(),
                snapshot: String::new(),
                target: target.to_string(),
                full: false,
                offline: false,
            },
            status: BackupStatus {
                url: crate::backups::manifest_url(&tr.url, &owner, bname),
                ..Default::default()
            },
        };
        tracing::info!(image = name, backup = %bname, target = %b.spec.target, "backing-image backup requested");
        Ok(store::create(s, &b)?)
    }

    /// The node that runs a backup of `image`: the one it started on, else the first up node
    /// (by name) holding a ready copy.
    fn image_backup_node(
        &self,
        s: &dyn Store,
        b: &Backup,
        image: &str,
    ) -> Result<Option<String>, ApiError> {
        if !b.status.node.is_empty() {
            return Ok(Some(b.status.node.clone()));
        }
        let Some(img) = store::get::<BackingImage>(s, image)? else {
            return Ok(None);
        };
        let mut ready: Vec<&BackingImageCopy> = img
            .status
            .copies
            .iter()
            .filter(|c| c.state == BackingImageState::Ready)
            .collect();
        ready.sort_by(|a, b| a.node.cmp(&b.node));
        for c in ready {
            let up = store::get::<Node>(s, &c.node)?
                .map(|n| self.node_view(n))
                .is_some_and(|n| n.status.state == NodeState::Up);
            if up {
                return Ok(Some(c.node.clone()));
            }
        }
        Ok(None)
    }

    /// The unfinished backups of backing images that `node` runs.
    pub(crate) fn image_backup_orders(
        &self,
        s: &dyn Store,
        node: &str,
    ) -> Result<Vec<BackupOrder>, ApiError> {
        let mut out = Vec::new();
        for b in store::list::<Backup>(s)? {
            let Some(image) = zebu_types::owner_image(&b.spec.volume) else {
                continue;
            };
            if b.status.state.finished()
                || self.image_backup_node(s, &b, image)?.as_deref() != Some(node)
            {
                continue;
            }
            let Ok(target) = self.target_ref(&b.spec.target) else {
                continue;
            };
            out.push(BackupOrder {
                name: b.metadata.name.clone(),
                volume: b.spec.volume.clone(),
                snapshot: String::new(),
                state: b.status.state,
                target,
                parents: Vec::new(),
                block_size: self.setting_u64("backup-block-size") as u32,
                codec: self.setting("backup-compression"),
                concurrency: self.setting_u64("backup-concurrency") as u32,
                bandwidth: self.setting_u64("backup-bandwidth-limit"),
                full: false,
                labels: b.metadata.labels.clone(),
            });
        }
        Ok(out)
    }

    /// Why a backing-image backup cannot go on, if so: its target or image is gone, no up node
    /// holds a ready copy, or the node running it went down.
    pub(crate) fn image_backup_blocked(
        &self,
        s: &dyn Store,
        b: &Backup,
        image: &str,
    ) -> Result<Option<(String, bool)>, ApiError> {
        if store::get::<BackupTarget>(s, &b.spec.target)?.is_none() {
            return Ok(Some((
                format!("backup target {:?} was deleted", b.spec.target),
                false,
            )));
        }
        if store::get::<BackingImage>(s, image)?.is_none() {
            return Ok(Some((
                format!("backing image {image:?} was deleted"),
                false,
            )));
        }
        match self.image_backup_node(s, b, image)? {
            None => Ok(Some((
                format!("no up node holds a ready copy of backing image {image:?}"),
                false,
            ))),
            Some(n) => {
                let up = store::get::<Node>(s, &n)?
                    .map(|x| self.node_view(x))
                    .is_some_and(|x| x.status.state == NodeState::Up);
                // A node that only lost touch may still run it: its lease expires by itself.
                Ok((!up).then(|| (format!("node {n:?} went down during the backup"), true)))
            }
        }
    }

    /// The backing image a volume restored from `b` goes on: none for a volume that had none;
    /// the image of the backup's label when it is here with the same checksum; else that image
    /// restored from its newest backup on the same target (created now, the volume waits for
    /// it). Refused when neither is possible.
    pub(crate) fn image_for_restore(&self, b: &Backup) -> Result<String, ApiError> {
        let Some(image) = b.metadata.labels.get(IMAGE_LABEL) else {
            return Ok(String::new());
        };
        let sum = b
            .metadata
            .labels
            .get(CHECKSUM_LABEL)
            .cloned()
            .unwrap_or_default();
        let s = &*self.store;
        if let Some(img) = store::get::<BackingImage>(s, image)? {
            let have = expected(&img);
            if !sum.is_empty() && !have.is_empty() && have != sum {
                return Err(conflict(
                    "ImageMismatch",
                    format!(
                        "backup {:?} is of a volume on backing image {image:?} with checksum {}…, but the image here has {}…",
                        b.metadata.name,
                        &sum[..sum.len().min(16)],
                        &have[..have.len().min(16)]
                    ),
                ));
            }
            return Ok(image.clone());
        }
        let owner = zebu_types::image_owner(image);
        let mut found: Vec<Backup> = store::list_by::<Backup>(s, store::Field::Volume, &owner)?
            .into_iter()
            .filter(|x| {
                x.spec.target == b.spec.target
                    && x.status.state == BackupState::Completed
                    && (sum.is_empty() || x.metadata.labels.get(CHECKSUM_LABEL) == Some(&sum))
            })
            .collect();
        found.sort_by_key(|x| std::cmp::Reverse(x.status.created_ms));
        let Some(from) = found.first() else {
            return Err(conflict(
                "ImageMissing",
                format!(
                    "backup {:?} is of a volume on backing image {image:?}, which is not here and has no backup on target {:?}: create or restore the image first",
                    b.metadata.name, b.spec.target
                ),
            ));
        };
        let spec = BackingImageSpec {
            source: BackingImageSource {
                kind: BackingImageSourceKind::Restore,
                backup: from.metadata.name.clone(),
                ..Default::default()
            },
            checksum: sum,
            min_copies: 1,
        };
        tracing::info!(image = %image, backup = %from.metadata.name, "restoring the backing image a restored volume needs");
        self.create_backing_image(image, spec)?;
        Ok(image.clone())
    }

    /// Changes how many nodes keep a copy without a replica using it.
    pub fn update_backing_image(
        &self,
        name: &str,
        min_copies: u32,
    ) -> Result<BackingImage, ApiError> {
        if min_copies == 0 || min_copies > 64 {
            return Err(ApiError::bad(
                "InvalidMinCopies",
                format!("minCopies {min_copies} must be between 1 and 64"),
            ));
        }
        let b = store::modify::<BackingImage>(&*self.store, name, |b| {
            let c = b.spec.min_copies != min_copies;
            b.spec.min_copies = min_copies;
            c
        })?
        .ok_or_else(|| not_found("backing image", name))?;
        Ok(b)
    }

    /// Picks the node an upload goes to and records its copy as in progress: the node's
    /// transfer address and the copy.
    pub fn begin_image_upload(
        &self,
        name: &str,
        size: u64,
    ) -> Result<(String, String, CopyRef), ApiError> {
        let s = &*self.store;
        let img =
            store::get::<BackingImage>(s, name)?.ok_or_else(|| not_found("backing image", name))?;
        if img.spec.source.kind != BackingImageSourceKind::Upload {
            return Err(ApiError::bad(
                "NotUpload",
                format!(
                    "backing image {name:?} comes from a {}, not an upload",
                    img.spec.source.kind.as_str()
                ),
            ));
        }
        if img.status.state == BackingImageState::Ready {
            return Err(conflict(
                "AlreadyUploaded",
                format!("backing image {name:?} is already uploaded"),
            ));
        }
        let busy = self
            .uploads
            .lock()
            .map(|mut u| !u.insert(name.to_string()))
            .unwrap_or(true);
        if busy {
            return Err(conflict(
                "UploadInProgress",
                format!("backing image {name:?} is being uploaded already"),
            ));
        }
        let res = self.place_upload(name, size);
        if res.is_err()
            && let Ok(mut u) = self.uploads.lock()
        {
            u.remove(name);
        }
        res
    }

    fn place_upload(&self, name: &str, size: u64) -> Result<(String, String, CopyRef), ApiError> {
        let s = &*self.store;
        let mut nodes: Vec<Node> = self
            .up_nodes()?
            .into_iter()
            .filter(|n| n.spec.allow_scheduling && !n.status.transfer_address.is_empty())
            .collect();
        nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        let Some(n) = nodes.into_iter().next() else {
            return Err(conflict(
                "NoNode",
                "no up node with scheduling allowed can take the upload",
            ));
        };
        let node = n.metadata.name.clone();
        let img = store::modify::<BackingImage>(s, name, |b| {
            b.status.copies.retain(|c| c.node != node);
            b.status.copies.push(BackingImageCopy {
                node: node.clone(),
                disk: n
                    .status
                    .disks
                    .first()
                    .map(|d| d.path.clone())
                    .unwrap_or_default(),
                state: BackingImageState::InProgress,
                progress: 0,
                message: String::new(),
            });
            b.status.copies.sort_by(|a, b| a.node.cmp(&b.node));
            b.status.state = BackingImageState::InProgress;
            b.status.message.clear();
            true
        })?
        .ok_or_else(|| not_found("backing image", name))?;
        let mut copy = copy_ref(&img);
        copy.size = size;
        Ok((node, n.status.transfer_address, copy))
    }

    /// Records how an upload ended: the node's report, or why it failed (the image waits for
    /// another upload).
    pub fn end_image_upload(
        &self,
        name: &str,
        node: &str,
        outcome: Result<CopyReport, String>,
    ) -> Result<BackingImage, ApiError> {
        if let Ok(mut u) = self.uploads.lock() {
            u.remove(name);
        }
        let img = store::modify::<BackingImage>(&*self.store, name, |b| {
            match &outcome {
                Ok(r) => {
                    if let Some(c) = b.status.copies.iter_mut().find(|c| c.node == node) {
                        c.state = r.state;
                        c.progress = r.progress;
                        c.message.clear();
                    }
                    if r.state == BackingImageState::Ready {
                        b.status.checksum = r.checksum.clone();
                        b.status.virtual_size = r.size;
                    }
                }
                Err(why) => {
                    b.status.copies.retain(|c| c.node != node);
                    b.status.state = BackingImageState::Pending;
                    b.status.message = format!("the last upload failed: {why}; upload again");
                    b.status.progress = 0;
                    return true;
                }
            }
            roll_up(b);
            true
        })?
        .ok_or_else(|| not_found("backing image", name))?;
        Ok(img)
    }

    /// Where the image's bytes can be read: a node with a ready copy (its transfer address).
    pub fn image_source(&self, name: &str) -> Result<(String, CopyRef), ApiError> {
        let s = &*self.store;
        let img =
            store::get::<BackingImage>(s, name)?.ok_or_else(|| not_found("backing image", name))?;
        let nodes: HashMap<String, Node> = store::list::<Node>(s)?
            .into_iter()
            .map(|n| {
                let n = self.node_view(n);
                (n.metadata.name.clone(), n)
            })
            .collect();
        let Some((_, addr)) = ready_peer(&img, &nodes, "") else {
            return Err(conflict(
                "NotReady",
                format!(
                    "backing image {name:?} has no ready copy on an up node ({})",
                    img.status.state.as_str()
                ),
            ));
        };
        Ok((addr, copy_ref(&img)))
    }
}

#[cfg(test)]
#[path = "backing_images_tests.rs"]
mod wiring_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, up: bool) -> CopyNode {
        CopyNode {
            name: name.into(),
            up,
            schedulable: true,
            disk: "/d".into(),
        }
    }

    fn copy(node: &str, state: BackingImageState) -> BackingImageCopy {
        BackingImageCopy {
            node: node.into(),
            disk: "/d".into(),
            state,
            ..Default::default()
        }
    }

    fn image(min: u32, copies: Vec<BackingImageCopy>) -> BackingImage {
        let mut b = BackingImage {
            spec: BackingImageSpec {
                min_copies: min,
                ..Default::default()
            },
            ..Default::default()
        };
        b.status.copies = copies;
        roll_up(&mut b);
        b
    }

    fn nodes_of(c: &[BackingImageCopy]) -> Vec<(&str, BackingImageState)> {
        c.iter().map(|c| (c.node.as_str(), c.state)).collect()
    }

    use BackingImageState::*;

    #[test]
    fn a_new_image_gets_min_copies_on_up_schedulable_nodes_by_name() {
        let nodes = [
            node("c", true),
            node("a", false),
            node("b", true),
            node("d", true),
        ];
        let out = plan_copies(&image(2, vec![]), &nodes, &BTreeSet::new());
        assert_eq!(nodes_of(&out), vec![("b", Pending), ("c", Pending)]);
    }

    #[test]
    fn every_replica_node_gets_a_copy_beyond_min_copies() {
        let nodes = [node("a", true), node("b", true), node("c", true)];
        let img = image(1, vec![copy("a", Ready)]);
        let need: BTreeSet<String> = ["b".into(), "c".into()].into();
        let out = plan_copies(&img, &nodes, &need);
        // b and c meet min 1, but a holds the only ready copy: it stays until another is ready.
        assert_eq!(
            nodes_of(&out),
            vec![("a", Ready), ("b", Pending), ("c", Pending)]
        );
        // Once b is ready, a is no longer the last ready copy and goes.
        let img = image(
            1,
            vec![copy("a", Ready), copy("b", Ready), copy("c", Pending)],
        );
        let out = plan_copies(&img, &nodes, &need);
        assert_eq!(nodes_of(&out), vec![("b", Ready), ("c", Pending)]);
    }

    #[test]
    fn lowering_min_copies_keeps_ready_copies_first_and_used_ones() {
        let nodes = [node("a", true), node("b", true), node("c", true)];
        let img = image(
            1,
            vec![copy("a", Pending), copy("b", Ready), copy("c", Ready)],
        );
        let out = plan_copies(&img, &nodes, &BTreeSet::new());
        assert_eq!(nodes_of(&out), vec![("b", Ready)]);
        let need: BTreeSet<String> = ["c".into()].into();
        let out = plan_copies(&img, &nodes, &need);
        assert_eq!(nodes_of(&out), vec![("c", Ready)]);
    }

    #[test]
    fn raising_min_copies_adds_nodes_and_a_failed_image_gets_none() {
        let nodes = [node("a", true), node("b", true), node("c", true)];
        let img = image(3, vec![copy("b", Ready)]);
        let out = plan_copies(&img, &nodes, &BTreeSet::new());
        assert_eq!(
            nodes_of(&out),
            vec![("a", Pending), ("b", Ready), ("c", Pending)]
        );
        let failed = image(3, vec![copy("a", Failed)]);
        assert_eq!(failed.status.state, Failed);
        let out = plan_copies(&failed, &nodes, &BTreeSet::new());
        assert_eq!(nodes_of(&out), vec![("a", Failed)]);
    }

    #[test]
    fn a_down_node_holding_the_only_ready_copy_keeps_it() {
        let nodes = [node("a", false), node("b", true)];
        let img = image(1, vec![copy("a", Ready)]);
        let need: BTreeSet<String> = ["b".into()].into();
        let out = plan_copies(&img, &nodes, &need);
        assert_eq!(nodes_of(&out), vec![("a", Ready), ("b", Pending)]);
    }

    #[test]
    fn roll_up_follows_the_copies() {
        let b = image(1, vec![copy("a", Pending)]);
        assert_eq!(b.status.state, Pending);
        let mut c = copy("a", InProgress);
        c.progress = 40;
        let b = image(1, vec![c, copy("b", Pending)]);
        assert_eq!((b.status.state, b.status.progress), (InProgress, 40));
        let b = image(1, vec![copy("a", Ready), copy("b", Failed)]);
        assert_eq!((b.status.state, b.status.progress), (Ready, 100));
        let mut f = copy("a", Failed);
        f.message = "http://x/y: the server answered 404 Not Found".into();
        let mut b = image(1, vec![f]);
        assert_eq!(b.status.state, Failed);
        assert!(b.status.message.contains("404"), "{}", b.status.message);
        // Failed stays failed while no copy is ready.
        b.status.copies.clear();
        roll_up(&mut b);
        assert_eq!(b.status.state, Failed);
    }
}
