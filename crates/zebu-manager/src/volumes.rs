//! Volume, snapshot and replica operations the API asks for: create (empty or from a backup),
//! delete, attach, detach, expand (online too), snapshots, replica deletion that keeps the last
//! complete copy, and salvage from a chosen replica.

use std::collections::HashMap;

use crate::ApiError;
use crate::controller::{Manager, conflict, not_found, now};
use crate::model::*;
use crate::planner::good_copy;
use crate::store;

impl Manager {
    pub fn create_volume(&self, name: &str, size: u64, replicas: u32) -> Result<Volume, ApiError> {
        self.create_volume_from(name, Some(size), replicas, None, false)
    }

    /// Creates a volume as the API asks: empty (optionally on a backing image) or restored from
    /// a backup, with the backup target it uses.
    pub fn create_volume_with(&self, req: &crate::api::CreateVolume) -> Result<Volume, ApiError> {
        let (name, size, replicas, standby) =
            (req.name.as_str(), req.size, req.replicas, req.standby);
        let from_backup = req.from_backup.as_deref();
        let backup_target = req.backup_target.as_deref();
        let backing_image = req.backing_image.as_deref();
        if let Some(t) = backup_target {
            zebu_types::validate_name(t)
                .map_err(|e| ApiError::bad("InvalidName", e.to_string()))?;
            if store::get::<BackupTarget>(&*self.store, t)?.is_none() {
                return Err(not_found("backup target", t));
            }
            if let Some(b) = from_backup
                && let Some(bk) = store::get::<Backup>(&*self.store, b)?
                && bk.spec.target != t
            {
                return Err(ApiError::bad(
                    "InvalidTarget",
                    format!("backup {b:?} is on target {:?}, not {t:?}", bk.spec.target),
                ));
            }
        }
        let mut v =
            self.create_volume_inner(name, size, replicas, from_backup, standby, backing_image)?;
        if let Some(t) = backup_target
            && v.spec.backup_target != t
        {
            v = store::modify::<Volume>(&*self.store, name, |v| {
                v.spec.backup_target = t.to_string();
                true
            })?
            .ok_or_else(|| not_found("volume", name))?;
        }
        Ok(v)
    }

    /// Creates an empty volume of `size`, or one restored from `from_backup`.
    pub fn create_volume_from(
        &self,
        name: &str,
        size: Option<u64>,
        replicas: u32,
        from_backup: Option<&str>,
        standby: bool,
    ) -> Result<Volume, ApiError> {
        self.create_volume_inner(name, size, replicas, from_backup, standby, None)
    }

    fn create_volume_inner(
        &self,
        name: &str,
        size: Option<u64>,
        replicas: u32,
        from_backup: Option<&str>,
        standby: bool,
        backing_image: Option<&str>,
    ) -> Result<Volume, ApiError> {
        zebu_types::validate_name(name).map_err(|e| ApiError::bad("InvalidName", e.to_string()))?;
        if backing_image.is_some() && from_backup.is_some() {
            return Err(ApiError::bad(
                "InvalidBackingImage",
                "a volume restored from a backup takes the backup's backing image; --backing-image is for new volumes",
            ));
        }
        if standby && from_backup.is_none() {
            return Err(ApiError::bad(
                "InvalidStandby",
                "a standby volume is created from a backup (--from-backup)",
            ));
        }
        let restored = match from_backup {
            Some(b) => {
                zebu_types::validate_name(b)
                    .map_err(|e| ApiError::bad("InvalidName", e.to_string()))?;
                Some(self.restore_volume(name, b, size, replicas, standby)?)
            }
            None => None,
        };
        let size = match (&restored, size) {
            (Some(v), _) => v.spec.size,
            (None, Some(s)) => s,
            (None, None) => {
                return Err(ApiError::bad(
                    "InvalidSize",
                    "a volume needs a size (or a backup to restore from)",
                ));
            }
        };
        let max = self.setting_u64("max-volume-size");
        if size == 0 {
            return Err(ApiError::bad("InvalidSize", "size must be greater than 0"));
        }
        if !size.is_multiple_of(4096) {
            return Err(ApiError::bad(
                "InvalidSize",
                format!("size {size} is not a multiple of 4096 bytes"),
            ));
        }
        if size > max {
            return Err(ApiError::bad(
                "InvalidSize",
                format!("size {size} exceeds the limit of {max} bytes"),
            ));
        }
        if let Some(bi) = backing_image {
            self.check_volume_image(bi, size)?;
        }
        if replicas == 0 || replicas > 16 {
            return Err(ApiError::bad(
                "InvalidReplicas",
                format!("replica count {replicas} must be between 1 and 16"),
            ));
        }
        if self.setting("replica-soft-anti-affinity") != "true" {
            let n = self
                .up_nodes()?
                .iter()
                .filter(|n| n.spec.allow_scheduling)
                .count();
            if (replicas as usize) > n {
                return Err(ApiError::bad(
                    "InsufficientNodes",
                    format!(
                        "{replicas} replicas need {replicas} nodes under hard anti-affinity; {n} are up"
                    ),
                ));
            }
        }
        let mut v = restored.unwrap_or_else(|| Volume {
            metadata: Meta {
                name: name.to_string(),
                ..Default::default()
            },
            spec: VolumeSpec {
                size,
                replicas,
                backup_target: DEFAULT_TARGET.to_string(),
                backing_image: backing_image.unwrap_or_default().to_string(),
                ..Default::default()
            },
            ..Default::default()
        });
        v.status.state = VolumeState::Creating;
        v.status.robustness = Robustness::Unknown;
        Ok(store::create(&*self.store, &v)?)
    }

    pub(crate) fn get_volume(&self, name: &str) -> Result<Volume, ApiError> {
        store::get::<Volume>(&*self.store, name)?.ok_or_else(|| not_found("volume", name))
    }

    pub fn delete_volume(&self, name: &str) -> Result<Volume, ApiError> {
        let v = self.get_volume(name)?;
        if v.spec.node.is_some()
            || matches!(
                v.status.state,
                VolumeState::Attached | VolumeState::Attaching
            )
        {
            return Err(conflict(
                "VolumeAttached",
                format!("volume {name:?} is attached; detach it first"),
            ));
        }
        let out = store::modify::<Volume>(&*self.store, name, |v| {
            if v.metadata.deletion_requested.is_some() {
                return false;
            }
            v.metadata.deletion_requested = Some(now());
            v.status.state = VolumeState::Deleting;
            true
        })?;
        out.ok_or_else(|| not_found("volume", name))
    }

    pub fn attach_volume(&self, name: &str, node: Option<&str>) -> Result<Volume, ApiError> {
        let v = self.get_volume(name)?;
        if v.metadata.deletion_requested.is_some() {
            return Err(conflict(
                "VolumeDeleting",
                format!("volume {name:?} is being deleted"),
            ));
        }
        if v.spec.standby {
            return Err(conflict(
                "VolumeStandby",
                format!(
                    "volume {name:?} is a standby volume; activate it first (zebu volume activate {name})"
                ),
            ));
        }
        if let Some(snap) = &v.spec.revert {
            return Err(conflict(
                "RevertInProgress",
                format!(
                    "volume {name:?} is being reverted to snapshot {snap:?}; attach it when that is done"
                ),
            ));
        }
        if !crate::backups::restore_done(&v) {
            let why = v
                .status
                .restore
                .as_ref()
                .filter(|r| r.state == RestoreState::Error)
                .map(|r| format!("its restore failed: {}", r.error))
                .unwrap_or_else(|| "it is still being restored".into());
            return Err(conflict(
                "RestoreInProgress",
                format!("volume {name:?} cannot be attached: {why}"),
            ));
        }
        let node = match node.map(str::to_string).or_else(|| self.local_node.clone()) {
            Some(n) => n,
            None => self
                .up_nodes()?
                .first()
                .map(|n| n.metadata.name.clone())
                .ok_or_else(|| conflict("NoNodes", "no node is up to attach to"))?,
        };
        zebu_types::validate_name(&node)
            .map_err(|e| ApiError::bad("InvalidName", e.to_string()))?;
        let n = store::get::<Node>(&*self.store, &node)?.ok_or_else(|| not_found("node", &node))?;
        if n.status.state != NodeState::Up {
            return Err(conflict("NodeDown", format!("node {node:?} is down")));
        }
        if let Some(cur) = &v.spec.node
            && cur != &node
        {
            return Err(conflict(
                "AlreadyAttached",
                format!("volume {name:?} is attached to node {cur:?}"),
            ));
        }
        store::modify::<Volume>(&*self.store, name, |v| {
            if v.spec.node.as_deref() == Some(node.as_str()) {
                return false;
            }
            v.spec.node = Some(node.clone());
            true
        })?
        .ok_or_else(|| not_found("volume", name))
    }

    pub fn detach_volume(&self, name: &str) -> Result<Volume, ApiError> {
        self.get_volume(name)?;
        store::modify::<Volume>(&*self.store, name, |v| v.spec.node.take().is_some())?
            .ok_or_else(|| not_found("volume", name))
    }

    pub fn expand_volume(&self, name: &str, size: u64) -> Result<Volume, ApiError> {
        let v = self.get_volume(name)?;
        if size <= v.spec.size
            || !size.is_multiple_of(4096)
            || size > self.setting_u64("max-volume-size")
        {
            return Err(ApiError::bad(
                "InvalidSize",
                format!(
                    "new size {size} must be larger than {}, a multiple of 4096 and within the limit",
                    v.spec.size
                ),
            ));
        }
        if v.spec.standby {
            return Err(conflict(
                "VolumeStandby",
                format!("volume {name:?} is a standby volume; it grows with its source's backups"),
            ));
        }
        // Attached volumes grow online: the engine expands every replica in its set; clients
        // see the new size on their next connection.
        let settled = match v.status.state {
            VolumeState::Detached => v.spec.node.is_none(),
            VolumeState::Attached => v.spec.node.is_some(),
            _ => false,
        };
        if !settled || !crate::backups::restore_done(&v) {
            return Err(conflict(
                "VolumeBusy",
                format!(
                    "volume {name:?} is {}; expand it once it is attached or detached",
                    v.status.state.as_str()
                ),
            ));
        }
        store::modify::<Volume>(&*self.store, name, |v| {
            v.spec.size = size;
            true
        })?
        .ok_or_else(|| not_found("volume", name))
    }

    /// The volume, if it is attached and not a standby volume (`what` names the operation).
    pub(crate) fn attached_volume(&self, volume: &str, what: &str) -> Result<Volume, ApiError> {
        let v = self.get_volume(volume)?;
        if v.spec.standby {
            return Err(conflict(
                "VolumeStandby",
                format!("volume {volume:?} is a standby volume; no {what} until it is activated"),
            ));
        }
        if v.status.state != VolumeState::Attached {
            return Err(conflict(
                "VolumeNotAttached",
                format!("volume {volume:?} must be attached for {what}"),
            ));
        }
        Ok(v)
    }

    /// Asks for a snapshot of an attached volume; the engine's node takes it.
    pub fn create_snapshot(&self, volume: &str, name: Option<&str>) -> Result<Snapshot, ApiError> {
        self.attached_volume(volume, "snapshot operations")?;
        let name = name
            .map(str::to_string)
            .unwrap_or_else(|| format!("snap-{:08x}", rand::random::<u32>()));
        zebu_types::validate_name(&name)
            .map_err(|e| ApiError::bad("InvalidName", e.to_string()))?;
        if name.starts_with("rebuild-") || name.starts_with("restore-") {
            return Err(ApiError::bad(
                "InvalidName",
                "snapshot names starting with \"rebuild-\" or \"restore-\" are reserved",
            ));
        }
        let sn = Snapshot {
            metadata: Meta {
                name: format!("{volume}.{name}"),
                ..Default::default()
            },
            spec: SnapshotSpec {
                volume: volume.to_string(),
                name,
            },
            status: SnapshotStatus::default(),
        };
        Ok(store::create(&*self.store, &sn)?)
    }

    pub fn delete_snapshot(&self, volume: &str, name: &str) -> Result<Snapshot, ApiError> {
        self.attached_volume(volume, "snapshot operations")?;
        let key = format!("{volume}.{name}");
        store::modify::<Snapshot>(&*self.store, &key, |x| {
            if x.metadata.deletion_requested.is_some() {
                return false;
            }
            x.metadata.deletion_requested = Some(now());
            true
        })?
        .ok_or_else(|| not_found("snapshot", name))
    }

    pub fn list_snapshots(&self, volume: &str) -> Result<Vec<Snapshot>, ApiError> {
        self.get_volume(volume)?;
        let mut v: Vec<Snapshot> = store::list::<Snapshot>(&*self.store)?
            .into_iter()
            .filter(|x| x.spec.volume == volume)
            .collect();
        v.sort_by_key(|x| (x.status.created, x.metadata.created));
        Ok(v)
    }

    /// Deletes a replica. Refused (unless `force`) when no other complete copy of the volume
    /// would remain while this one holds data: rebuilding copies do not count until they are RW.
    pub fn delete_replica(&self, name: &str, force: bool) -> Result<Replica, ApiError> {
        let r =
            store::get::<Replica>(&*self.store, name)?.ok_or_else(|| not_found("replica", name))?;
        let all: Vec<Replica> = store::list::<Replica>(&*self.store)?
            .into_iter()
            .filter(|o| o.spec.volume == r.spec.volume)
            .collect();
        let others = all
            .iter()
            .filter(|o| o.metadata.name != r.metadata.name && good_copy(o, &all))
            .count();
        let holds_data = good_copy(&r, &all) || r.status.mode == Some(ReplicaMode::ERR);
        if others == 0 && holds_data && r.metadata.deletion_requested.is_none() {
            if !force {
                return Err(conflict(
                    "LastGoodReplica",
                    format!(
                        "replica {name:?} is the last complete copy of volume {:?} (other replicas are missing, failed or still rebuilding); deleting it loses the volume's data (--force to delete anyway)",
                        r.spec.volume
                    ),
                ));
            }
            tracing::warn!(volume = %r.spec.volume, replica = name, "the last complete copy of the volume is deleted on request (force); its data is lost");
        }
        store::modify::<Replica>(&*self.store, name, |r| {
            if r.metadata.deletion_requested.is_some() {
                return false;
            }
            r.metadata.deletion_requested = Some(self.now_s());
            true
        })?
        .ok_or_else(|| not_found("replica", name))
    }

    /// Salvages a faulted volume from the replica an operator chose (after comparing the flush
    /// sequences `replica list` shows): that replica becomes the volume's only complete copy, the
    /// engine restarts from it and rebuilds the others. Refused while any complete copy exists.
    pub fn salvage_volume(&self, name: &str, replica: &str) -> Result<Volume, ApiError> {
        let s = &*self.store;
        let v = self.get_volume(name)?;
        let live: Vec<Replica> = store::list::<Replica>(s)?
            .into_iter()
            .filter(|r| r.spec.volume == name && r.metadata.deletion_requested.is_none())
            .collect();
        if let Some(g) = live.iter().find(|r| good_copy(r, &live)) {
            return Err(conflict(
                "NotFaulted",
                format!(
                    "volume {name:?} is not faulted: replica {:?} is a complete copy",
                    g.metadata.name
                ),
            ));
        }
        let Some(r) = live.iter().find(|r| r.metadata.name == replica) else {
            return Err(not_found("replica", &format!("{replica} of volume {name}")));
        };
        let up =
            store::get::<Node>(s, &r.spec.node)?.is_some_and(|n| n.status.state == NodeState::Up);
        if r.status.state == ReplicaState::Broken || r.status.address.is_none() || !up {
            return Err(conflict(
                "ReplicaUnavailable",
                format!(
                    "replica {replica:?} cannot serve: {}",
                    if r.status.state == ReplicaState::Broken {
                        r.status.message.clone()
                    } else {
                        format!("its node {:?} is not up or it is not running", r.spec.node)
                    }
                ),
            ));
        }
        tracing::warn!(
            volume = name,
            replica,
            flush_seq = r.status.flush_seq,
            "salvaging the volume from the chosen replica"
        );
        store::modify::<Replica>(s, replica, |r| {
            r.status.failed_at = None;
            r.status.mode = Some(ReplicaMode::RW);
            true
        })?;
        if let Some(e) = store::get::<Engine>(s, name)? {
            let nodes: HashMap<String, Node> = store::list::<Node>(s)?
                .into_iter()
                .map(|n| (n.metadata.name.clone(), n))
                .collect();
            self.stop_engine(&*self.store, &e, &nodes, "salvage from the chosen replica")?;
        }
        Ok(v)
    }
}
