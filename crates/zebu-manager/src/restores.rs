//! Restores from backups and standby (DR) volumes: the volume a restore creates, the restore
//! order an engine runs (a standby follows the newest backup that exists, in either direction),
//! activation, and what the node reports. The restore state machine (restoring → completed or
//! error; standby → activated) lives here.

use std::collections::BTreeMap;

use crate::ApiError;
use crate::backups::volume_target;
use crate::controller::{Manager, conflict, not_found};
use crate::model::*;
use crate::store;

impl Manager {
    /// Checks a request to restore `backup` into a new volume and returns the volume to create.
    pub(crate) fn restore_volume(
        &self,
        name: &str,
        backup: &str,
        size: Option<u64>,
        replicas: u32,
        standby: bool,
    ) -> Result<Volume, ApiError> {
        let b = self.get_backup(backup)?;
        if b.status.state != BackupState::Completed {
            return Err(conflict(
                "BackupNotCompleted",
                format!(
                    "backup {backup:?} is {:?}; only completed backups can be restored",
                    b.status.state
                ),
            ));
        }
        let t = self.get_target(&b.spec.target)?;
        if !t.status.available {
            return Err(conflict(
                "TargetUnavailable",
                format!(
                    "backup target {:?} is unavailable: {}",
                    b.spec.target, t.status.message
                ),
            ));
        }
        let bsize = b.status.volume_size;
        let size = size.unwrap_or(bsize);
        if size < bsize {
            return Err(ApiError::bad(
                "InvalidSize",
                format!("size {size} is smaller than backup {backup:?} ({bsize} bytes)"),
            ));
        }
        if zebu_types::owner_image(&b.spec.volume).is_some() {
            return Err(ApiError::bad(
                "ImageBackup",
                format!(
                    "backup {backup:?} is of a backing image: restore it with `backing-image create NAME --from-backup {backup}`"
                ),
            ));
        }
        let backing_image = self.image_for_restore(&b)?;
        Ok(Volume {
            metadata: Meta {
                name: name.to_string(),
                ..Default::default()
            },
            spec: VolumeSpec {
                size,
                replicas,
                standby,
                backup_target: b.spec.target.clone(),
                node: None,
                from_backup: backup.to_string(),
                backup_volume: b.spec.volume.clone(),
                activate: false,
                revert: None,
                backing_image,
            },
            status: VolumeStatus {
                restore: Some(RestoreStatus {
                    requested_backup: backup.to_string(),
                    state: RestoreState::Restoring,
                    ..Default::default()
                }),
                ..Default::default()
            },
        })
    }

    /// The restore an engine of `v` must run: the backup it was created from until that is
    /// restored; for a standby volume after that, the newest existing backup of its backup
    /// volume (or the one it holds again, which is a no-op).
    pub(crate) fn restore_order(&self, v: &Volume) -> Option<RestoreOrder> {
        if v.spec.from_backup.is_empty() || (!v.spec.standby && restore_done(v)) {
            return None;
        }
        let st = v.status.restore.clone().unwrap_or_default();
        let target = self.target_ref(volume_target(v)).ok()?;
        let source_volume = if v.spec.backup_volume.is_empty() {
            store::get::<Backup>(&*self.store, &v.spec.from_backup)
                .ok()
                .flatten()?
                .spec
                .volume
        } else {
            v.spec.backup_volume.clone()
        };
        let backup = if !v.spec.standby || st.last_restored_backup.is_empty() {
            v.spec.from_backup.clone()
        } else {
            self.newer_backup(v, &st)
                .unwrap_or_else(|| st.last_restored_backup.clone())
        };
        Some(RestoreOrder {
            backup,
            from: st.last_restored_backup,
            source_volume,
            // Engines are listable objects: the credentials are added to the node's copy of
            // the order in its heartbeat answer, never stored here.
            target: TargetRef {
                options: BTreeMap::new(),
                ..target
            },
            bandwidth: self.setting_u64("backup-bandwidth-limit"),
            backing_image: v.spec.backing_image.clone(),
        })
    }

    /// The backup a standby volume must move to: the newest completed backup of its backup
    /// volume that still exists, when that is not the one it holds. This goes backwards too:
    /// deleting the newest backup (a bad one) makes the standby follow the one before it.
    pub(crate) fn newer_backup(&self, v: &Volume, st: &RestoreStatus) -> Option<String> {
        let newest = store::list::<Backup>(&*self.store)
            .ok()?
            .into_iter()
            .filter(|b| {
                b.spec.target == volume_target(v)
                    && b.spec.volume == v.spec.backup_volume
                    && b.status.state == BackupState::Completed
            })
            .max_by_key(|b| (b.status.created_ms, b.metadata.name.clone()))?;
        (newest.metadata.name != st.last_restored_backup).then_some(newest.metadata.name)
    }

    /// Asks a standby volume to become a normal one: syncs its target now, and the reconcile
    /// loop switches it once the newest backup is restored (or gives up on a restore error).
    pub async fn activate_volume(&self, name: &str) -> Result<Volume, ApiError> {
        let v =
            store::get::<Volume>(&*self.store, name)?.ok_or_else(|| not_found("volume", name))?;
        if !v.spec.standby {
            return Err(conflict(
                "NotStandby",
                format!("volume {name:?} is not a standby volume"),
            ));
        }
        let target = volume_target(&v).to_string();
        self.sync_target(&target).await?;
        let t = self.get_target(&target)?;
        if !t.status.available {
            return Err(conflict(
                "TargetUnavailable",
                format!(
                    "cannot activate {name:?}: backup target {target:?} is unavailable: {}",
                    t.status.message
                ),
            ));
        }
        store::modify::<Volume>(&*self.store, name, |v| {
            v.spec.activate = true;
            if let Some(r) = v.status.restore.as_mut() {
                r.activation_error.clear();
            }
            true
        })?
        .ok_or_else(|| not_found("volume", name))
    }

    /// Finishes or abandons a requested activation: it completes once no backup newer than the
    /// restored one exists, and fails when restoring the newer one failed.
    pub(crate) fn reconcile_activation(
        &self,
        s: &dyn crate::store::Store,
        v: &Volume,
    ) -> Result<(), ApiError> {
        if !(v.spec.standby && v.spec.activate) {
            return Ok(());
        }
        let st = v.status.restore.clone().unwrap_or_default();
        match self.newer_backup(v, &st) {
            Some(newer) if st.state == RestoreState::Error && st.requested_backup == newer => {
                let msg = format!("restoring backup {newer:?} failed: {}", st.error);
                tracing::warn!(volume = %v.metadata.name, reason = %msg, "activation failed");
                store::modify::<Volume>(s, &v.metadata.name, |v| {
                    v.spec.activate = false;
                    if let Some(r) = v.status.restore.as_mut() {
                        r.activation_error = msg.clone();
                    }
                    true
                })?;
            }
            Some(_) => {}
            None if st.last_restored_backup.is_empty() => {}
            None => {
                tracing::info!(volume = %v.metadata.name, backup = %st.last_restored_backup, "standby volume activated");
                store::modify::<Volume>(s, &v.metadata.name, |v| {
                    v.spec.standby = false;
                    v.spec.activate = false;
                    v.spec.from_backup = st.last_restored_backup.clone();
                    if let Some(r) = v.status.restore.as_mut() {
                        r.activation_error.clear();
                        if r.state == RestoreState::Error {
                            // The failure was about a backup that is gone.
                            r.state = RestoreState::Completed;
                            r.error.clear();
                            r.requested_backup = r.last_restored_backup.clone();
                            r.progress = 100;
                        }
                    }
                    true
                })?;
            }
        }
        Ok(())
    }

    /// Records an engine's restore progress and its snapshot list.
    pub(crate) fn restore_report(
        &self,
        s: &dyn crate::store::Store,
        volume: &str,
        r: &RestoreReport,
        snapshots: &[SnapshotInfo],
    ) -> Result<(), ApiError> {
        let created_ms = store::get::<Backup>(s, &r.backup)?
            .map(|b| b.status.created_ms)
            .unwrap_or(0);
        store::modify::<Volume>(s, volume, |v| {
            if v.spec.from_backup.is_empty() || (!v.spec.standby && v.spec.from_backup != r.backup)
            {
                return false;
            }
            let before = (v.spec.size, v.status.restore.clone());
            let mut st = v.status.restore.clone().unwrap_or_default();
            st.snapshots = snapshots.to_vec();
            st.requested_backup = r.backup.clone();
            st.progress = r.progress;
            st.state = r.state;
            st.error = r.error.clone();
            if r.state == RestoreState::Completed && st.last_restored_backup != r.backup {
                st.last_restored_backup = r.backup.clone();
                if created_ms > 0 {
                    st.last_restored_ms = created_ms;
                }
                tracing::info!(volume = %v.metadata.name, backup = %r.backup, "restore completed");
            }
            if r.state == RestoreState::Completed && r.volume_size > v.spec.size {
                v.spec.size = r.volume_size;
            }
            v.status.restore = Some(st);
            (v.spec.size, v.status.restore.clone()) != before
        })?;
        Ok(())
    }
}

/// Whether a volume created from a backup finished restoring it (a standby volume: its first
/// restore).
pub fn restore_done(v: &Volume) -> bool {
    v.spec.from_backup.is_empty()
        || v.status.restore.as_ref().is_some_and(|r| {
            r.last_restored_backup == v.spec.from_backup
                || (v.spec.standby && !r.last_restored_backup.is_empty())
        })
}
