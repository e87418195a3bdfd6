//! Backups: requests for backups of attached volumes, the orders nodes run and their reports,
//! deleting and verifying backups, failed backups' retention, and labels. Targets and their
//! sync are in `targets`, restores and standby volumes in `restores`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use zebu_backupstore::Manifest;
use zebu_backupstore::backup::{BackupError, Problem, read_manifest, verify};
use zebu_backupstore::gc::delete_backup as remote_delete;

use crate::ApiError;
use crate::controller::{Manager, conflict, not_found, now};
use crate::model::*;
pub use crate::restores::restore_done;
use crate::store::{self, StoreError};
use crate::targets::target_error;
pub use crate::targets::{HIDDEN, redact};

/// The result of `verify`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyResult {
    pub backup: String,
    pub deep: bool,
    /// Distinct blocks the backup references.
    pub blocks: u64,
    pub ok: bool,
    pub problems: Vec<VerifyProblem>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyProblem {
    /// The block's key in the target (`blocks/<hh>/<hash>.blk`), or the manifest's.
    pub key: String,
    pub problem: String,
}

/// The target a volume backs up to.
pub fn volume_target(v: &Volume) -> &str {
    if v.spec.backup_target.is_empty() {
        DEFAULT_TARGET
    } else {
        &v.spec.backup_target
    }
}

pub(crate) fn manifest_url(url: &str, volume: &str, backup: &str) -> String {
    format!(
        "{}/{}",
        url.trim_end_matches('/'),
        zebu_backupstore::backup::manifest_key(volume, backup)
    )
}

impl Manager {
    /// Whether the volume has an unfinished backup that may run while it is detached.
    pub(crate) fn offline_backup_pending(&self, volume: &str) -> bool {
        store::list_by::<Backup>(&*self.store, store::Field::Volume, volume)
            .map(|bs| {
                bs.iter()
                    .any(|b| b.spec.offline && !b.status.state.finished())
            })
            .unwrap_or(false)
    }

    /// A target a new backup may go to: it exists and is available.
    pub(crate) fn available_target(&self, target: &str) -> Result<TargetRef, ApiError> {
        let tr = self.target_ref(target)?;
        let t = self.get_target(target)?;
        if !t.status.available {
            return Err(conflict(
                "TargetUnavailable",
                format!(
                    "backup target {target:?} is unavailable: {}",
                    t.status.message
                ),
            ));
        }
        Ok(tr)
    }

    /// Deletes the objects of failed backups older than the `failed-backup-ttl` setting (a
    /// backup listed as Error for a damaged manifest stays while the manifest does).
    pub(crate) fn expire_failed_backups(&self, now_s: u64) -> Result<u64, ApiError> {
        let ttl = self.setting_u64("failed-backup-ttl");
        if ttl == 0 {
            return Ok(0);
        }
        let mut n = 0;
        for b in store::list::<Backup>(&*self.store)? {
            let expired = b.status.state == BackupState::Error
                && b.status.manifest_tag.is_empty()
                && b.status.failed_at.is_some_and(|t| t + ttl <= now_s);
            if !expired {
                continue;
            }
            match store::delete(&*self.store, &b) {
                Ok(()) => {
                    n += 1;
                    tracing::info!(backup = %b.metadata.name, volume = %b.spec.volume, "failed backup deleted after its retention");
                }
                Err(StoreError::NotFound { .. }) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(n)
    }

    /// Asks for a backup of an attached volume; the node running its engine performs it.
    /// `full` reads and checks every block instead of trusting the previous backup's.
    pub fn create_backup(
        &self,
        volume: &str,
        snapshot: Option<&str>,
        target: Option<&str>,
        labels: BTreeMap<String, String>,
        full: bool,
    ) -> Result<Backup, ApiError> {
        check_labels(&labels)?;
        let v = self.attached_volume(volume, "backups")?;
        let target = target.unwrap_or(volume_target(&v)).to_string();
        let name = format!("backup-{:016x}", rand::random::<u64>());
        self.new_backup(&v, &name, snapshot, &target, labels, full, false)
    }

    /// Records backup `name` of `v` to `target` (of `snapshot`, else of one taken now, named
    /// like the backup); `offline`: the volume may be detached (an engine without a frontend is
    /// run for it).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new_backup(
        &self,
        v: &Volume,
        name: &str,
        snapshot: Option<&str>,
        target: &str,
        mut labels: BTreeMap<String, String>,
        full: bool,
        offline: bool,
    ) -> Result<Backup, ApiError> {
        let s = &*self.store;
        let volume = v.metadata.name.as_str();
        if !v.spec.backing_image.is_empty() {
            // A restore of it needs the same image under it.
            let img = store::get::<BackingImage>(s, &v.spec.backing_image)?;
            labels.insert(
                crate::backing_images::IMAGE_LABEL.to_string(),
                v.spec.backing_image.clone(),
            );
            if let Some(img) = img {
                labels.insert(
                    crate::backing_images::CHECKSUM_LABEL.to_string(),
                    crate::backing_images::copy_ref(&img).checksum,
                );
            }
        }
        let tr = self.available_target(target)?;
        let snap = match snapshot {
            Some(sn) => {
                zebu_types::validate_name(sn)
                    .map_err(|e| ApiError::bad("InvalidName", e.to_string()))?;
                let obj = store::get::<Snapshot>(s, &format!("{volume}.{sn}"))?;
                if obj.is_none_or(|o| o.metadata.deletion_requested.is_some()) {
                    return Err(not_found("snapshot", sn));
                }
                sn.to_string()
            }
            None => {
                // Taken now, named like the backup.
                let sn = Snapshot {
                    metadata: Meta {
                        name: format!("{volume}.{name}"),
                        ..Default::default()
                    },
                    spec: SnapshotSpec {
                        volume: volume.to_string(),
                        name: name.to_string(),
                    },
                    status: SnapshotStatus::default(),
                };
                match store::create(s, &sn) {
                    Ok(_) | Err(store::StoreError::Exists { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                name.to_string()
            }
        };
        let b = Backup {
            metadata: Meta {
                name: name.to_string(),
                labels,
                ..Default::default()
            },
            spec: BackupSpec {
                volume: volume.to_string(),
                snapshot: snap,
                target: target.to_string(),
                full,
                offline,
            },
            status: BackupStatus {
                url: manifest_url(&tr.url, volume, name),
                ..Default::default()
            },
        };
        tracing::info!(volume, backup = %name, target = %b.spec.target, "backup requested");
        Ok(store::create(s, &b)?)
    }

    /// Backups, optionally of one volume, on one target, or carrying every one of `labels`.
    pub fn list_backups(
        &self,
        volume: Option<&str>,
        target: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<Backup>, ApiError> {
        let mut v: Vec<Backup> = store::list::<Backup>(&*self.store)?
            .into_iter()
            .filter(|b| volume.is_none_or(|x| b.spec.volume == x))
            .filter(|b| target.is_none_or(|x| b.spec.target == x))
            .filter(|b| {
                labels
                    .iter()
                    .all(|(k, val)| b.metadata.labels.get(k) == Some(val))
            })
            .collect();
        v.sort_by_key(|b| {
            (
                b.status.created_ms,
                b.metadata.created,
                b.metadata.name.clone(),
            )
        });
        Ok(v)
    }

    pub(crate) fn get_backup(&self, name: &str) -> Result<Backup, ApiError> {
        store::get::<Backup>(&*self.store, name)?.ok_or_else(|| not_found("backup", name))
    }

    /// Deletes a backup: its remote data (blocks no other backup references) and its object.
    pub async fn delete_backup(&self, name: &str) -> Result<Backup, ApiError> {
        let b = self.get_backup(name)?;
        if !b.status.state.finished() {
            return Err(conflict(
                "BackupInProgress",
                format!("backup {name:?} is still running"),
            ));
        }
        // Only a restore that still runs holds the backup; a failed one does not.
        if let Some(v) = store::list::<Volume>(&*self.store)?.into_iter().find(|v| {
            !v.spec.standby
                && v.spec.from_backup == name
                && v.status.restore.as_ref().is_none_or(|r| {
                    r.last_restored_backup != name && r.state != RestoreState::Error
                })
        }) {
            return Err(conflict(
                "BackupInUse",
                format!(
                    "volume {:?} is being restored from backup {name:?}",
                    v.metadata.name
                ),
            ));
        }
        if let Some(v) = store::list::<Volume>(&*self.store)?.into_iter().find(|v| {
            v.status
                .restore
                .as_ref()
                .is_some_and(|r| r.requested_backup == name && r.state == RestoreState::Restoring)
        }) {
            return Err(conflict(
                "BackupInUse",
                format!(
                    "standby volume {:?} is restoring backup {name:?} now",
                    v.metadata.name
                ),
            ));
        }
        // A damaged manifest listed as Error is removed from the target too (or the next sync
        // lists it again).
        let remote = b.status.state == BackupState::Completed || !b.status.manifest_tag.is_empty();
        if remote {
            let store = self.open_target(&b.spec.target).await?;
            match remote_delete(&store, &b.spec.volume, name).await {
                Ok(r) => tracing::info!(
                    backup = name,
                    deleted_blocks = r.deleted_blocks,
                    deferred = r.deferred,
                    "backup deleted"
                ),
                Err(BackupError::NotFound(_)) => {}
                Err(e) => return Err(target_error(e)),
            }
        }
        match store::delete(&*self.store, &b) {
            Ok(()) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.refresh_backup_volume(&*self.store, &b.spec.target, &b.spec.volume)?;
        Ok(b)
    }

    pub async fn verify_backup(&self, name: &str, deep: bool) -> Result<VerifyResult, ApiError> {
        let b = self.get_backup(name)?;
        if b.status.state != BackupState::Completed {
            return Err(conflict(
                "BackupNotCompleted",
                format!(
                    "backup {name:?} is {:?}; only completed backups can be verified",
                    b.status.state
                ),
            ));
        }
        let store = self.open_target(&b.spec.target).await?;
        let mut out = VerifyResult {
            backup: name.to_string(),
            deep,
            ..Default::default()
        };
        let m = match read_manifest(&store, &b.spec.volume, name).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                out.problems.push(VerifyProblem {
                    key: zebu_backupstore::backup::manifest_key(&b.spec.volume, name),
                    problem: "manifest missing".into(),
                });
                return Ok(out);
            }
            Err(BackupError::Manifest(e)) => {
                out.problems.push(VerifyProblem {
                    key: zebu_backupstore::backup::manifest_key(&b.spec.volume, name),
                    problem: e.to_string(),
                });
                return Ok(out);
            }
            Err(e) => return Err(target_error(e)),
        };
        out.blocks = m.referenced().len() as u64;
        for p in verify(&store, &m, deep).await.map_err(target_error)? {
            let (h, problem) = match p {
                Problem::Missing(h) => (h, "missing".to_string()),
                Problem::Corrupt(h, why) => (h, format!("corrupt: {why}")),
            };
            out.problems.push(VerifyProblem {
                key: zebu_backupstore::backup::block_key(&h),
                problem,
            });
        }
        out.ok = out.problems.is_empty();
        Ok(out)
    }

    /// Records what a node reports about the backups it runs.
    pub(crate) fn backup_reports(
        &self,
        s: &dyn crate::store::Store,
        node: &str,
        reports: &[BackupReport],
    ) -> Result<(), ApiError> {
        for r in reports {
            let mut completed = None;
            let mut failed = None;
            store::modify::<Backup>(s, &r.name, |b| {
                if b.status.state.finished() {
                    return false;
                }
                let before = b.status.clone();
                let st = &mut b.status;
                st.state = r.state;
                st.error = r.error.clone();
                st.blocks = r.blocks;
                st.bytes = r.bytes;
                st.snapshot = r.snapshot.clone();
                st.parent = r.parent.clone();
                st.volume_size = r.volume_size;
                st.block_size = r.block_size;
                st.created_ms = r.created_ms;
                st.node = node.to_string();
                let done = r.blocks.uploaded + r.blocks.present + r.blocks.zero;
                st.progress = match r.state {
                    BackupState::Completed => 100,
                    _ if r.blocks.total > 0 => ((done * 100 / r.blocks.total) as u32).min(99),
                    _ => 0,
                };
                if r.state == BackupState::Completed {
                    st.completed_at = Some(now());
                    completed = Some((b.spec.target.clone(), b.spec.volume.clone()));
                }
                if r.state == BackupState::Error {
                    st.failed_at = Some(now());
                    failed = Some(b.clone());
                }
                b.status != before
            })?;
            if let Some(b) = failed {
                tracing::warn!(backup = %r.name, volume = %b.spec.volume, error = %r.error, "backup failed");
                self.queue_lease_cleanup(&b);
            }
            if let Some((t, v)) = completed {
                tracing::info!(backup = %r.name, volume = %v, target = %t, "backup completed");
                self.refresh_backup_volume(s, &t, &v)?;
            }
        }
        Ok(())
    }

    /// The unfinished backups of volumes whose engine runs on `node`.
    pub(crate) fn backup_orders(
        &self,
        s: &dyn crate::store::Store,
        node: &str,
    ) -> Result<Vec<BackupOrder>, ApiError> {
        let mut out = self.image_backup_orders(s, node)?;
        let engines = store::list_by::<Engine>(s, store::Field::Node, node)?;
        for e in engines
            .iter()
            .filter(|e| e.metadata.deletion_requested.is_none())
        {
            let all = store::list_by::<Backup>(s, store::Field::Volume, &e.spec.volume)?;
            for b in all.iter().filter(|b| !b.status.state.finished()) {
                let Ok(target) = self.target_ref(&b.spec.target) else {
                    continue;
                };
                let mut parents: Vec<&Backup> = all
                    .iter()
                    .filter(|p| {
                        p.spec.target == b.spec.target && p.status.state == BackupState::Completed
                    })
                    .collect();
                parents.sort_by_key(|p| std::cmp::Reverse(p.status.created_ms));
                out.push(BackupOrder {
                    name: b.metadata.name.clone(),
                    volume: b.spec.volume.clone(),
                    snapshot: b.spec.snapshot.clone(),
                    state: b.status.state,
                    target,
                    parents: parents
                        .iter()
                        .map(|p| (p.metadata.name.clone(), p.status.snapshot.clone()))
                        .collect(),
                    block_size: self.setting_u64("backup-block-size") as u32,
                    codec: self.setting("backup-compression"),
                    concurrency: self.setting_u64("backup-concurrency") as u32,
                    bandwidth: self.setting_u64("backup-bandwidth-limit"),
                    full: b.spec.full,
                    labels: b.metadata.labels.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Ends backups that can no longer finish: their target or volume is gone, or the engine
    /// they ran on stopped or lost its node.
    pub(crate) fn reconcile_backups(&self) -> Result<(), ApiError> {
        let s = &*self.store;
        for b in store::list::<Backup>(s)? {
            if b.status.state.finished() {
                continue;
            }
            if let Some(image) = zebu_types::owner_image(&b.spec.volume) {
                if let Some((why, node_down)) = self.image_backup_blocked(s, &b, image)? {
                    self.end_backup(s, &b, why, node_down)?;
                }
                continue;
            }
            let engine = store::get::<Engine>(s, &b.spec.volume)?;
            let why = if store::get::<BackupTarget>(s, &b.spec.target)?.is_none() {
                Some((
                    format!("backup target {:?} was deleted", b.spec.target),
                    false,
                ))
            } else {
                match engine {
                    // An engine without a frontend is started for it.
                    None if b.spec.offline => None,
                    None => Some((
                        format!(
                            "volume {:?} was detached before the backup finished",
                            b.spec.volume
                        ),
                        false,
                    )),
                    Some(e) => {
                        let up = store::get::<Node>(s, &e.spec.node)?
                            .is_some_and(|n| n.status.state == NodeState::Up);
                        (!up).then(|| {
                            (
                                format!("node {:?} went down during the backup", e.spec.node),
                                true,
                            )
                        })
                    }
                }
            };
            if let Some((why, node_down)) = why {
                self.end_backup(s, &b, why, node_down)?;
            }
        }
        Ok(())
    }

    /// Ends a backup that can no longer finish in Error, with the reason.
    pub(crate) fn end_backup(
        &self,
        s: &dyn crate::store::Store,
        b: &Backup,
        why: String,
        node_down: bool,
    ) -> Result<(), ApiError> {
        tracing::warn!(backup = %b.metadata.name, reason = %why, "backup failed");
        let ended = store::modify::<Backup>(s, &b.metadata.name, |b| {
            if b.status.state.finished() {
                return false;
            }
            b.status.state = BackupState::Error;
            b.status.error = why.clone();
            b.status.failed_at = Some(now());
            true
        })?;
        // A node that only lost touch with the manager may still run the backup: its lease
        // stays until it expires. Otherwise the backup is over for sure.
        if let Some(b) = ended
            && !node_down
        {
            self.queue_lease_cleanup(&b);
        }
        Ok(())
    }
}

/// Checks backup labels: keys of letters, digits, `.`, `_`, `-` and `/` (up to 253
/// characters), values of letters, digits, `.`, `_` and `-` (up to 63; may be empty).
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > 64 {
        return Err(ApiError::bad(
            "InvalidLabel",
            format!("{} labels; at most 64 are allowed", labels.len()),
        ));
    }
    let chars = |s: &str, extra: &[u8]| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b) || extra.contains(&b))
    };
    for (k, v) in labels {
        if k.is_empty() || k.len() > 253 || !chars(k, b"/") {
            return Err(ApiError::bad(
                "InvalidLabel",
                format!("label key {k:?} must be 1-253 letters, digits, '.', '_', '-' or '/'"),
            ));
        }
        if v.len() > 63 || !chars(v, b"") {
            return Err(ApiError::bad(
                "InvalidLabel",
                format!(
                    "label value {v:?} of {k:?} must be up to 63 letters, digits, '.', '_' or '-'"
                ),
            ));
        }
    }
    Ok(())
}

pub(crate) fn backup_from_manifest(target: &str, url: &str, m: &Manifest) -> Backup {
    let total = m.blocks.len() as u64;
    let zero = m.blocks.iter().filter(|b| b.is_none()).count() as u64;
    Backup {
        metadata: Meta {
            name: m.backup.clone(),
            labels: m.labels.clone(),
            ..Default::default()
        },
        spec: BackupSpec {
            volume: m.volume.clone(),
            snapshot: m.snapshot.clone(),
            target: target.to_string(),
            full: false,
            offline: false,
        },
        status: BackupStatus {
            state: BackupState::Completed,
            progress: 100,
            error: String::new(),
            url: manifest_url(url, &m.volume, &m.backup),
            blocks: BlockCounts {
                total,
                uploaded: 0,
                present: total - zero,
                zero,
            },
            bytes: ByteCounts::default(),
            snapshot: m.snapshot.clone(),
            parent: m.parent.clone(),
            volume_size: m.volume_size,
            block_size: m.block_size as u64,
            created_ms: m.created,
            completed_at: Some(m.created / 1000),
            node: String::new(),
            failed_at: None,
            manifest_tag: String::new(),
        },
    }
}

#[cfg(test)]
#[path = "backups_tests.rs"]
mod tests;
