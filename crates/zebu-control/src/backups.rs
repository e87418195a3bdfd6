//! The manager's backup side: backup targets (the `default` one, availability, periodic sync of
//! remote backups into BackupVolume/Backup objects), backup requests and the reports of the nodes
//! running them, deleting and verifying backups, restores into new volumes, and each volume's
//! last backup derived from its backup volume.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use zebu_backupstore::backup::{BackupError, Problem, read_manifest, verify};
use zebu_backupstore::gc::{delete_backup as remote_delete, gc_pass};
use zebu_backupstore::target::{SECRET_OPTIONS, Target, list_backups};
use zebu_backupstore::{Manifest, TargetSpec};

use crate::api::ApiError;
use crate::controller::{Manager, conflict, not_found, now};
use crate::model::*;
use crate::store::{self, StoreError};

fn target_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "TargetError", e.to_string())
}

/// Shown in place of a secret option's value.
pub const HIDDEN: &str = "(hidden)";

/// A target as the API shows it: secret option values replaced.
pub fn redact(mut t: BackupTarget) -> BackupTarget {
    for (k, v) in t.spec.options.iter_mut() {
        if SECRET_OPTIONS.contains(&k.as_str()) {
            *v = HIDDEN.to_string();
        }
    }
    t
}

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

fn manifest_url(url: &str, volume: &str, backup: &str) -> String {
    format!(
        "{}/{}",
        url.trim_end_matches('/'),
        zebu_backupstore::backup::manifest_key(volume, backup)
    )
}

impl Manager {
    /// Creates the `default` target when it is missing.
    pub(crate) fn ensure_default_target(&self) -> Result<(), StoreError> {
        if store::get::<BackupTarget>(&*self.store, DEFAULT_TARGET)?.is_some() {
            return Ok(());
        }
        let t = BackupTarget {
            metadata: Meta {
                name: DEFAULT_TARGET.into(),
                ..Default::default()
            },
            spec: BackupTargetSpec {
                url: String::new(),
                poll_interval: 300,
                options: BTreeMap::new(),
            },
            status: BackupTargetStatus {
                available: false,
                message: "no URL set".into(),
                last_synced_at: None,
            },
        };
        match store::create(&*self.store, &t) {
            Ok(_) | Err(StoreError::Exists { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn get_target(&self, name: &str) -> Result<BackupTarget, ApiError> {
        store::get::<BackupTarget>(&*self.store, name)?
            .ok_or_else(|| not_found("backup target", name))
    }

    /// A target's location with its secrets, for the node that runs a backup or restore.
    pub(crate) fn target_ref(&self, name: &str) -> Result<TargetRef, ApiError> {
        let t = self.get_target(name)?;
        if t.spec.url.is_empty() {
            return Err(conflict(
                "TargetNotSet",
                format!(
                    "backup target {name:?} has no URL; set one with `zebu backup-target update {name} --url URL`"
                ),
            ));
        }
        Ok(TargetRef {
            name: name.to_string(),
            url: t.spec.url,
            options: t.spec.options,
        })
    }

    async fn open_target(&self, name: &str) -> Result<Target, ApiError> {
        let r = self.target_ref(name)?;
        let spec = TargetSpec::parse(&r.url, &r.options)
            .map_err(|e| ApiError::bad("InvalidTarget", e.to_string()))?;
        spec.open(false).await.map_err(|e| {
            conflict(
                "TargetUnavailable",
                format!("backup target {name:?} is unavailable: {e}"),
            )
        })
    }

    /// Checks a target (creating its marker on first use) and records the outcome.
    async fn check_target(&self, name: &str, init: bool) -> Result<BackupTarget, ApiError> {
        let t = self.get_target(name)?;
        let (available, message) = if t.spec.url.is_empty() {
            (false, "no URL set".to_string())
        } else {
            match TargetSpec::parse(&t.spec.url, &t.spec.options) {
                Err(e) => (false, e.to_string()),
                Ok(spec) => match spec.open(init).await {
                    Ok(_) => (true, String::new()),
                    Err(e) => (false, e.to_string()),
                },
            }
        };
        store::modify::<BackupTarget>(&*self.store, name, |t| {
            let c = t.status.available != available || t.status.message != message;
            t.status.available = available;
            t.status.message = message.clone();
            c
        })?
        .ok_or_else(|| not_found("backup target", name))
    }

    fn validate_target(
        url: &str,
        poll: u64,
        options: &BTreeMap<String, String>,
    ) -> Result<(), ApiError> {
        if poll == 0 || poll > 7 * 24 * 3600 {
            return Err(ApiError::bad(
                "InvalidPollInterval",
                format!("poll interval {poll} s must be between 1 s and 7 days"),
            ));
        }
        if !url.is_empty() {
            TargetSpec::parse(url, options)
                .map_err(|e| ApiError::bad("InvalidTarget", e.to_string()))?;
        }
        Ok(())
    }

    pub async fn create_target(
        &self,
        name: &str,
        url: &str,
        poll: Option<u64>,
        options: BTreeMap<String, String>,
    ) -> Result<BackupTarget, ApiError> {
        zebu_types::validate_name(name).map_err(|e| ApiError::bad("InvalidName", e.to_string()))?;
        if url.is_empty() {
            return Err(ApiError::bad(
                "InvalidTarget",
                "a backup target needs a URL",
            ));
        }
        let poll = poll.unwrap_or(300);
        Self::validate_target(url, poll, &options)?;
        let t = BackupTarget {
            metadata: Meta {
                name: name.to_string(),
                ..Default::default()
            },
            spec: BackupTargetSpec {
                url: url.to_string(),
                poll_interval: poll,
                options,
            },
            status: BackupTargetStatus::default(),
        };
        store::create(&*self.store, &t)?;
        let t = self.check_target(name, true).await?;
        self.request_sync(name);
        Ok(redact(t))
    }

    /// Changes a target's URL, poll interval or options (an empty option value removes it).
    pub async fn update_target(
        &self,
        name: &str,
        url: Option<&str>,
        poll: Option<u64>,
        options: BTreeMap<String, String>,
    ) -> Result<BackupTarget, ApiError> {
        let cur = self.get_target(name)?;
        let mut spec = cur.spec.clone();
        if let Some(u) = url {
            spec.url = u.to_string();
        }
        if let Some(p) = poll {
            spec.poll_interval = p;
        }
        for (k, v) in options {
            if v.is_empty() {
                spec.options.remove(&k);
            } else {
                spec.options.insert(k, v);
            }
        }
        if spec.url.is_empty() && !spec.options.is_empty() {
            return Err(ApiError::bad(
                "InvalidTarget",
                "options need a URL to apply to",
            ));
        }
        Self::validate_target(&spec.url, spec.poll_interval, &spec.options)?;
        let followers: Vec<String> = store::list::<Volume>(&*self.store)?
            .into_iter()
            .filter(|v| v.spec.standby && volume_target(v) == name)
            .map(|v| v.metadata.name)
            .collect();
        if !followers.is_empty() && (spec.url != cur.spec.url || spec.options != cur.spec.options) {
            return Err(conflict(
                "TargetFollowed",
                format!(
                    "standby volumes {} follow backup target {name:?}; activate or delete them first",
                    followers.join(", ")
                ),
            ));
        }
        if spec.url != cur.spec.url && self.backups_running_on(name)? {
            return Err(conflict(
                "BackupInProgress",
                format!("backups to target {name:?} are running; change its URL when they finish"),
            ));
        }
        store::modify::<BackupTarget>(&*self.store, name, |t| {
            let c = t.spec != spec;
            t.spec = spec.clone();
            c
        })?;
        let t = self.check_target(name, true).await?;
        self.request_sync(name);
        Ok(redact(t))
    }

    fn backups_running_on(&self, target: &str) -> Result<bool, ApiError> {
        Ok(store::list::<Backup>(&*self.store)?
            .iter()
            .any(|b| b.spec.target == target && !b.status.state.finished()))
    }

    /// Deletes a target object and the objects synced from it; its remote data stays.
    pub fn delete_target(&self, name: &str) -> Result<BackupTarget, ApiError> {
        let t = self.get_target(name)?;
        if name == DEFAULT_TARGET {
            return Err(conflict(
                "DefaultTarget",
                "the default backup target always exists; clear or change its URL instead",
            ));
        }
        if self.backups_running_on(name)? {
            return Err(conflict(
                "BackupInProgress",
                format!("backups to target {name:?} are running"),
            ));
        }
        let users: Vec<String> = store::list::<Volume>(&*self.store)?
            .into_iter()
            .filter(|v| v.spec.backup_target == name)
            .map(|v| v.metadata.name)
            .collect();
        if !users.is_empty() {
            return Err(conflict(
                "TargetInUse",
                format!("volumes {} use backup target {name:?}", users.join(", ")),
            ));
        }
        for b in store::list::<Backup>(&*self.store)? {
            if b.spec.target == name {
                match store::delete(&*self.store, &b) {
                    Ok(()) | Err(StoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        for bv in store::list::<BackupVolume>(&*self.store)? {
            if bv.spec.target == name {
                match store::delete(&*self.store, &bv) {
                    Ok(()) | Err(StoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        store::delete(&*self.store, &t)?;
        tracing::info!(
            target = name,
            "backup target object deleted; its remote data stays"
        );
        Ok(redact(t))
    }

    pub fn request_sync(&self, name: &str) {
        if let Ok(mut s) = self.sync_requests.lock() {
            s.insert(name.to_string());
        }
        self.sync_notify.notify_one();
    }

    /// Syncs every target whose poll interval passed or that was asked to, until the process
    /// ends.
    pub async fn run_backup_sync(self: Arc<Self>) {
        let mut last: HashMap<String, tokio::time::Instant> = HashMap::new();
        loop {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.sync_notify.notified()).await;
            let asked: BTreeSet<String> = self
                .sync_requests
                .lock()
                .map(|mut s| std::mem::take(&mut *s))
                .unwrap_or_default();
            let Ok(targets) = store::list::<BackupTarget>(&*self.store) else {
                continue;
            };
            for t in targets {
                let name = t.metadata.name.clone();
                let due = last.get(&name).is_none_or(|at| {
                    at.elapsed() >= Duration::from_secs(t.spec.poll_interval.max(1))
                });
                if !due && !asked.contains(&name) {
                    continue;
                }
                last.insert(name.clone(), tokio::time::Instant::now());
                if let Err(e) = self.sync_target(&name).await {
                    tracing::warn!(target = %name, error = %e.message, "backup target sync failed");
                }
            }
        }
    }

    /// Brings the target's backups into the store. Never deletes remote data; removes only
    /// completed backup objects whose manifests a successful listing no longer shows.
    pub async fn sync_target(&self, name: &str) -> Result<(), ApiError> {
        let t = self.get_target(name)?;
        if t.spec.url.is_empty() {
            self.check_target(name, false).await?;
            return Ok(());
        }
        let store = match self.open_target(name).await {
            Ok(s) => s,
            Err(e) => {
                self.mark_unavailable(name, &e.message)?;
                return Ok(());
            }
        };
        let t0 = now();
        let remote = match list_backups(&store).await {
            Ok(r) => r,
            Err(e) => {
                // A failed listing is never "no backups".
                self.mark_unavailable(name, &e.to_string())?;
                return Ok(());
            }
        };
        let remote_names: BTreeSet<&str> = remote.iter().map(|(_, b)| b.as_str()).collect();
        let mut touched: BTreeSet<String> = BTreeSet::new();
        for (vol, b) in &remote {
            if store::get::<Backup>(&*self.store, b)?.is_some() {
                continue;
            }
            if zebu_types::validate_name(b).is_err() || zebu_types::validate_name(vol).is_err() {
                continue;
            }
            match read_manifest(&store, vol, b).await {
                Ok(Some(m)) => {
                    let obj = backup_from_manifest(name, &t.spec.url, &m);
                    match store::create(&*self.store, &obj) {
                        Ok(_) | Err(StoreError::Exists { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                    touched.insert(vol.clone());
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(target = name, backup = %b, error = %e, "cannot read a backup's manifest; skipping it this sync");
                }
            }
        }
        for b in store::list::<Backup>(&*self.store)? {
            let vanished = b.spec.target == name
                && b.status.state == BackupState::Completed
                && !remote_names.contains(b.metadata.name.as_str())
                && b.status.completed_at.unwrap_or(0) + 2 < t0;
            if vanished {
                tracing::info!(target = name, backup = %b.metadata.name, "backup no longer in the target; removing its object");
                match store::delete(&*self.store, &b) {
                    Ok(())
                    | Err(StoreError::NotFound { .. })
                    | Err(StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                touched.insert(b.spec.volume.clone());
            }
        }
        // Finish collections a running backup deferred.
        if let Err(e) = gc_pass(&store).await {
            tracing::warn!(target = name, error = %e, "block collection failed; it is retried on the next sync");
        }
        for bv in store::list::<BackupVolume>(&*self.store)? {
            if bv.spec.target == name {
                touched.insert(bv.spec.volume.clone());
            }
        }
        for b in store::list::<Backup>(&*self.store)? {
            if b.spec.target == name {
                touched.insert(b.spec.volume.clone());
            }
        }
        for vol in touched {
            self.refresh_backup_volume(name, &vol)?;
        }
        store::modify::<BackupTarget>(&*self.store, name, |t| {
            t.status.available = true;
            t.status.message.clear();
            t.status.last_synced_at = Some(now());
            true
        })?;
        Ok(())
    }

    fn mark_unavailable(&self, name: &str, msg: &str) -> Result<(), ApiError> {
        store::modify::<BackupTarget>(&*self.store, name, |t| {
            let c = t.status.available || t.status.message != msg;
            t.status.available = false;
            t.status.message = msg.to_string();
            c
        })?;
        Ok(())
    }

    /// Re-derives a backup volume from the completed backups of `volume` on `target`.
    pub(crate) fn refresh_backup_volume(&self, target: &str, volume: &str) -> Result<(), ApiError> {
        let s = &*self.store;
        let done: Vec<Backup> = store::list::<Backup>(s)?
            .into_iter()
            .filter(|b| {
                b.spec.target == target
                    && b.spec.volume == volume
                    && b.status.state == BackupState::Completed
            })
            .collect();
        let name = format!("{target}.{volume}");
        let newest = done
            .iter()
            .max_by_key(|b| (b.status.created_ms, b.metadata.name.clone()));
        let Some(newest) = newest else {
            if let Some(bv) = store::get::<BackupVolume>(s, &name)? {
                match store::delete(s, &bv) {
                    Ok(())
                    | Err(StoreError::NotFound { .. })
                    | Err(StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(());
        };
        let status = BackupVolumeStatus {
            last_backup: Some(newest.metadata.name.clone()),
            last_backup_at: newest.status.completed_at,
            backups: done.len() as u64,
            size: newest.status.volume_size,
        };
        let found = store::modify::<BackupVolume>(s, &name, |bv| {
            let c = bv.status != status;
            bv.status = status.clone();
            c
        })?;
        if found.is_none() {
            let bv = BackupVolume {
                metadata: Meta {
                    name,
                    ..Default::default()
                },
                spec: BackupVolumeSpec {
                    target: target.to_string(),
                    volume: volume.to_string(),
                },
                status,
            };
            match store::create(s, &bv) {
                Ok(_) | Err(StoreError::Exists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Asks for a backup of an attached volume; the node running its engine performs it.
    pub fn create_backup(
        &self,
        volume: &str,
        snapshot: Option<&str>,
        target: Option<&str>,
    ) -> Result<Backup, ApiError> {
        let s = &*self.store;
        let v = self.attached_volume(volume, "backups")?;
        let target = target.unwrap_or(volume_target(&v)).to_string();
        let tr = self.target_ref(&target)?;
        let t = self.get_target(&target)?;
        if !t.status.available {
            return Err(conflict(
                "TargetUnavailable",
                format!(
                    "backup target {target:?} is unavailable: {}",
                    t.status.message
                ),
            ));
        }
        let name = format!("backup-{:016x}", rand::random::<u64>());
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
                        name: name.clone(),
                    },
                    status: SnapshotStatus::default(),
                };
                store::create(s, &sn)?;
                name.clone()
            }
        };
        let b = Backup {
            metadata: Meta {
                name: name.clone(),
                ..Default::default()
            },
            spec: BackupSpec {
                volume: volume.to_string(),
                snapshot: snap,
                target,
            },
            status: BackupStatus {
                url: manifest_url(&tr.url, volume, &name),
                ..Default::default()
            },
        };
        tracing::info!(volume, backup = %name, target = %b.spec.target, "backup requested");
        Ok(store::create(s, &b)?)
    }

    pub fn list_backups(
        &self,
        volume: Option<&str>,
        target: Option<&str>,
    ) -> Result<Vec<Backup>, ApiError> {
        let mut v: Vec<Backup> = store::list::<Backup>(&*self.store)?
            .into_iter()
            .filter(|b| volume.is_none_or(|x| b.spec.volume == x))
            .filter(|b| target.is_none_or(|x| b.spec.target == x))
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

    fn get_backup(&self, name: &str) -> Result<Backup, ApiError> {
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
        if let Some(v) = store::list::<Volume>(&*self.store)?.into_iter().find(|v| {
            !v.spec.standby
                && v.spec.from_backup == name
                && v.status
                    .restore
                    .as_ref()
                    .is_none_or(|r| r.last_restored_backup != name)
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
                .is_some_and(|r| r.requested_backup == name && r.state == "restoring")
        }) {
            return Err(conflict(
                "BackupInUse",
                format!(
                    "standby volume {:?} is restoring backup {name:?} now",
                    v.metadata.name
                ),
            ));
        }
        if b.status.state == BackupState::Completed {
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
        self.refresh_backup_volume(&b.spec.target, &b.spec.volume)?;
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
        node: &str,
        reports: &[BackupReport],
    ) -> Result<(), ApiError> {
        for r in reports {
            let mut completed = None;
            store::modify::<Backup>(&*self.store, &r.name, |b| {
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
                b.status != before
            })?;
            if let Some((t, v)) = completed {
                tracing::info!(backup = %r.name, volume = %v, target = %t, "backup completed");
                self.refresh_backup_volume(&t, &v)?;
            }
        }
        Ok(())
    }

    /// The unfinished backups of volumes whose engine runs on `node`.
    pub(crate) fn backup_orders(&self, node: &str) -> Result<Vec<BackupOrder>, ApiError> {
        let s = &*self.store;
        let all = store::list::<Backup>(s)?;
        let mut out = Vec::new();
        let block_size = self.setting_u64("backup-block-size") as u32;
        let codec = self.setting("backup-compression");
        let concurrency = self.setting_u64("backup-concurrency") as u32;
        let bandwidth = self.setting_u64("backup-bandwidth-limit");
        for b in all.iter().filter(|b| !b.status.state.finished()) {
            let here = store::get::<Engine>(s, &b.spec.volume)?
                .is_some_and(|e| e.spec.node == node && e.metadata.deletion_requested.is_none());
            if !here {
                continue;
            }
            let Ok(target) = self.target_ref(&b.spec.target) else {
                continue;
            };
            let mut parents: Vec<&Backup> = all
                .iter()
                .filter(|p| {
                    p.spec.volume == b.spec.volume
                        && p.spec.target == b.spec.target
                        && p.status.state == BackupState::Completed
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
                block_size,
                codec: codec.clone(),
                concurrency,
                bandwidth,
            });
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
            let engine = store::get::<Engine>(s, &b.spec.volume)?;
            let why = if store::get::<BackupTarget>(s, &b.spec.target)?.is_none() {
                Some(format!("backup target {:?} was deleted", b.spec.target))
            } else {
                match engine {
                    None => Some(format!(
                        "volume {:?} was detached before the backup finished",
                        b.spec.volume
                    )),
                    Some(e) => {
                        let up = store::get::<Node>(s, &e.spec.node)?
                            .is_some_and(|n| n.status.state == "up");
                        (!up).then(|| format!("node {:?} went down during the backup", e.spec.node))
                    }
                }
            };
            if let Some(why) = why {
                tracing::warn!(backup = %b.metadata.name, reason = %why, "backup failed");
                store::modify::<Backup>(s, &b.metadata.name, |b| {
                    if b.status.state.finished() {
                        return false;
                    }
                    b.status.state = BackupState::Error;
                    b.status.error = why.clone();
                    true
                })?;
            }
        }
        Ok(())
    }

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
            },
            status: VolumeStatus {
                restore: Some(RestoreStatus {
                    requested_backup: backup.to_string(),
                    state: "restoring".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        })
    }

    /// The restore an engine of `v` must run: the backup it was created from until that is
    /// restored; for a standby volume after that, the newest backup of its backup volume taken
    /// after the one it holds (or that one again, which is a no-op).
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
            target,
            bandwidth: self.setting_u64("backup-bandwidth-limit"),
        })
    }

    /// The newest completed backup of a standby volume's backup volume taken after the one it
    /// holds.
    fn newer_backup(&self, v: &Volume, st: &RestoreStatus) -> Option<String> {
        store::list::<Backup>(&*self.store)
            .ok()?
            .into_iter()
            .filter(|b| {
                b.spec.target == volume_target(v)
                    && b.spec.volume == v.spec.backup_volume
                    && b.status.state == BackupState::Completed
                    && b.status.created_ms > st.last_restored_ms
            })
            .max_by_key(|b| b.status.created_ms)
            .map(|b| b.metadata.name)
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
    pub(crate) fn reconcile_activation(&self, v: &Volume) -> Result<(), ApiError> {
        if !(v.spec.standby && v.spec.activate) {
            return Ok(());
        }
        let st = v.status.restore.clone().unwrap_or_default();
        match self.newer_backup(v, &st) {
            Some(newer) if st.state == "error" && st.requested_backup == newer => {
                let msg = format!("restoring backup {newer:?} failed: {}", st.error);
                tracing::warn!(volume = %v.metadata.name, reason = %msg, "activation failed");
                store::modify::<Volume>(&*self.store, &v.metadata.name, |v| {
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
                store::modify::<Volume>(&*self.store, &v.metadata.name, |v| {
                    v.spec.standby = false;
                    v.spec.activate = false;
                    v.spec.from_backup = st.last_restored_backup.clone();
                    if let Some(r) = v.status.restore.as_mut() {
                        r.activation_error.clear();
                        if r.state == "error" {
                            // The failure was about a backup that is gone.
                            r.state = "completed".into();
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
        volume: &str,
        r: &RestoreReport,
        snapshots: &[SnapshotInfo],
    ) -> Result<(), ApiError> {
        let created_ms = store::get::<Backup>(&*self.store, &r.backup)?
            .map(|b| b.status.created_ms)
            .unwrap_or(0);
        store::modify::<Volume>(&*self.store, volume, |v| {
            if v.spec.from_backup.is_empty() || (!v.spec.standby && v.spec.from_backup != r.backup)
            {
                return false;
            }
            let before = (v.spec.size, v.status.restore.clone());
            let mut st = v.status.restore.clone().unwrap_or_default();
            st.snapshots = snapshots.to_vec();
            st.requested_backup = r.backup.clone();
            st.progress = r.progress;
            st.state = r.state.clone();
            st.error = r.error.clone();
            if r.state == "completed" && st.last_restored_backup != r.backup {
                st.last_restored_backup = r.backup.clone();
                if created_ms > 0 {
                    st.last_restored_ms = created_ms;
                }
                tracing::info!(volume = %v.metadata.name, backup = %r.backup, "restore completed");
            }
            if r.state == "completed" && r.volume_size > v.spec.size {
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

fn backup_from_manifest(target: &str, url: &str, m: &Manifest) -> Backup {
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
        },
    }
}
