//! Snapshot revert of a detached volume: the request, where the engine that performs it runs,
//! and what its report changes (replicas left out of the revert stop being complete copies; the
//! snapshots newer than the one reverted to are gone).

use std::collections::BTreeSet;

use crate::ApiError;
use crate::controller::{Manager, conflict, good_copy, not_found};
use crate::model::*;
use crate::store;

impl Manager {
    /// Asks for a detached volume to be reverted to one of its snapshots. Every replica in the
    /// engine's set reverts; one that is down meanwhile is rebuilt afterwards, never used with
    /// the newer data.
    pub fn revert_volume(&self, name: &str, snapshot: &str) -> Result<Volume, ApiError> {
        let v = self.get_volume(name)?;
        zebu_types::validate_name(snapshot)
            .map_err(|e| ApiError::bad("InvalidName", e.to_string()))?;
        if v.spec.standby {
            return Err(conflict(
                "VolumeStandby",
                format!("volume {name:?} is a standby volume; activate it first"),
            ));
        }
        if v.spec.node.is_some() || v.status.state != VolumeState::Detached {
            return Err(conflict(
                "VolumeAttached",
                format!(
                    "volume {name:?} is {}; detach it before reverting (zebu volume detach {name})",
                    v.status.state.as_str()
                ),
            ));
        }
        if !crate::backups::restore_done(&v) {
            return Err(conflict(
                "RestoreInProgress",
                format!("volume {name:?} is still being restored"),
            ));
        }
        if let Some(cur) = &v.spec.revert {
            return Err(conflict(
                "RevertInProgress",
                format!("volume {name:?} is already being reverted to {cur:?}"),
            ));
        }
        let sn = store::get::<Snapshot>(&*self.store, &format!("{name}.{snapshot}"))?;
        if sn.is_none_or(|s| s.metadata.deletion_requested.is_some()) {
            return Err(not_found(
                "snapshot",
                &format!("{snapshot} of volume {name}"),
            ));
        }
        let live: Vec<Replica> = store::list::<Replica>(&*self.store)?
            .into_iter()
            .filter(|r| r.spec.volume == name && r.metadata.deletion_requested.is_none())
            .collect();
        if !live.iter().any(|r| good_copy(r, &live)) {
            return Err(conflict(
                "VolumeFaulted",
                format!("volume {name:?} has no complete copy to revert; salvage it first"),
            ));
        }
        tracing::info!(volume = name, snapshot, "revert requested");
        store::modify::<Volume>(&*self.store, name, |v| {
            v.spec.revert = Some(snapshot.to_string());
            v.status.revert = Some(RevertStatus {
                snapshot: snapshot.to_string(),
                state: RevertState::Pending,
                error: String::new(),
            });
            true
        })?
        .ok_or_else(|| not_found("volume", name))
    }

    /// Records the outcome of an engine's revert: the request ends; on success the replicas that
    /// were not RW in the engine stop counting as complete copies (they are rebuilt), and the
    /// snapshot objects no longer in the chain are removed.
    pub(crate) fn revert_report(
        &self,
        s: &dyn crate::store::Store,
        er: &EngineReport,
        r: &RevertReport,
    ) -> Result<(), ApiError> {
        let ok = r.error.is_empty();
        let asked = store::get::<Volume>(s, &er.volume)?
            .is_some_and(|v| v.spec.revert.as_deref() == Some(r.snapshot.as_str()));
        if !asked {
            return Ok(()); // already recorded, or another request
        }
        if ok {
            // Before the revert shows as done: whoever sees it done sees the rest too.
            for rep in store::list_by::<Replica>(s, store::Field::Volume, &er.volume)? {
                let reverted = er
                    .replicas
                    .iter()
                    .any(|x| x.name == rep.metadata.name && x.mode == ReplicaMode::RW);
                if rep.spec.volume == er.volume
                    && !reverted
                    && rep.metadata.deletion_requested.is_none()
                {
                    tracing::warn!(volume = %er.volume, replica = %rep.metadata.name, "replica missed the revert; it is rebuilt before it is used");
                    self.record_mode(s, &rep.metadata.name, &er.volume, ReplicaMode::ERR, None)?;
                }
            }
            // The reverted-to snapshot is in any real chain; an empty one is a failed read.
            let chain: BTreeSet<&str> = er.snapshots.iter().map(|x| x.name.as_str()).collect();
            for sn in store::list_by::<Snapshot>(s, store::Field::Volume, &er.volume)? {
                if sn.spec.volume == er.volume
                    && chain.contains(r.snapshot.as_str())
                    && !chain.contains(sn.spec.name.as_str())
                {
                    match store::delete(s, &sn) {
                        Ok(())
                        | Err(store::StoreError::NotFound { .. })
                        | Err(store::StoreError::Conflict { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        store::modify::<Volume>(s, &er.volume, |v| {
            if v.spec.revert.as_deref() != Some(r.snapshot.as_str()) {
                return false;
            }
            v.spec.revert = None;
            v.status.revert = Some(RevertStatus {
                snapshot: r.snapshot.clone(),
                state: if ok {
                    RevertState::Done
                } else {
                    RevertState::Error
                },
                error: r.error.clone(),
            });
            true
        })?;
        Ok(())
    }
}
