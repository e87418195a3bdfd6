//! Backup targets: the `default` one, URLs and options (secrets never shown), availability
//! probes, the periodic sync of remote backups into Backup and BackupVolume objects (never
//! deleting remote data; damaged manifests listed as Error), and the removal of failed backups'
//! leases.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use zebu_backupstore::TargetSpec;
use zebu_backupstore::backup::{BackupError, read_manifest};
use zebu_backupstore::gc::{drop_lease, gc_pass};
use zebu_backupstore::target::{SECRET_OPTIONS, Target, list_manifests, options_for};

use crate::backups::{backup_from_manifest, manifest_url, volume_target};
use crate::controller::{Manager, conflict, not_found, now};
use crate::model::*;
use crate::restores::restore_done;
use crate::store::{self, StoreError};
use crate::{ApiError, ErrorKind};

/// How often every target with a URL is probed, and how long a probe may take before the target
/// counts as unavailable.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a target from its URL and options; `Err` is the reason it is unavailable.
pub(crate) async fn open_url(
    url: &str,
    options: &BTreeMap<String, String>,
    init: bool,
) -> Result<Target, String> {
    let spec = TargetSpec::parse(url, options).map_err(|e| e.to_string())?;
    match tokio::time::timeout(PROBE_TIMEOUT, spec.open(init)).await {
        // The reason alone (`StoreError` adds no context); callers name the target.
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    }
}

pub(crate) fn target_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorKind::Upstream, "TargetError", e.to_string())
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

    pub(crate) fn get_target(&self, name: &str) -> Result<BackupTarget, ApiError> {
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

    pub(crate) async fn open_target(&self, name: &str) -> Result<Target, ApiError> {
        let r = self.target_ref(name)?;
        open_url(&r.url, &r.options, false).await.map_err(|why| {
            conflict(
                "TargetUnavailable",
                format!("backup target {name:?} is unavailable: {why}"),
            )
        })
    }

    /// Checks a target (creating its marker on first use) and records the outcome.
    pub(crate) async fn check_target(
        &self,
        name: &str,
        init: bool,
    ) -> Result<BackupTarget, ApiError> {
        let t = self.get_target(name)?;
        let (available, message) = if t.spec.url.is_empty() {
            (false, "no URL set".to_string())
        } else {
            match open_url(&t.spec.url, &t.spec.options, init).await {
                Ok(_) => (true, String::new()),
                Err(why) => (false, why),
            }
        };
        self.set_availability(name, available, &message)?
            .ok_or_else(|| not_found("backup target", name))
    }

    /// Records whether a target can be used (with the reason when not); logs changes.
    pub(crate) fn set_availability(
        &self,
        name: &str,
        available: bool,
        message: &str,
    ) -> Result<Option<BackupTarget>, StoreError> {
        let mut flipped = false;
        let t = store::modify::<BackupTarget>(&*self.store, name, |t| {
            let c = t.status.available != available || t.status.message != message;
            flipped = t.status.available != available;
            t.status.available = available;
            t.status.message = message.to_string();
            c
        })?;
        if flipped && available {
            tracing::info!(target = name, "backup target is available again");
        } else if flipped {
            tracing::warn!(
                target = name,
                reason = message,
                "backup target is unavailable"
            );
        }
        Ok(t)
    }

    /// Probes every target with a URL that is not being probed already, each in its own task,
    /// so a stalled target holds up nothing else.
    pub(crate) fn probe_targets(self: &Arc<Self>) {
        let Ok(targets) = store::list::<BackupTarget>(&*self.store) else {
            return;
        };
        for t in targets.into_iter().filter(|t| !t.spec.url.is_empty()) {
            let name = t.metadata.name.clone();
            let fresh = self
                .probing
                .lock()
                .map(|mut p| p.insert(name.clone()))
                .unwrap_or(false);
            if !fresh {
                continue;
            }
            let me = self.clone();
            tokio::spawn(async move {
                let r = open_url(&t.spec.url, &t.spec.options, false).await;
                // Only if the target was not changed meanwhile.
                let same = store::get::<BackupTarget>(&*me.store, &name)
                    .ok()
                    .flatten()
                    .is_some_and(|now| now.spec == t.spec);
                if same {
                    let res = match r {
                        Ok(_) => me.set_availability(&name, true, ""),
                        Err(why) => me.set_availability(&name, false, &why),
                    };
                    if let Err(e) = res {
                        tracing::warn!(target = %name, error = %e, "cannot record backup target availability");
                    }
                }
                if let Ok(mut p) = me.probing.lock() {
                    p.remove(&name);
                }
            });
        }
    }

    pub(crate) fn validate_target(
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

    /// Changes a target's URL, poll interval or options (an empty option value removes it;
    /// `clear_options` removes all before the given ones apply). A URL with another scheme
    /// drops the options that do not apply to it. A new URL replaces the target's listing with
    /// the new store's before this returns.
    pub async fn update_target(
        &self,
        name: &str,
        url: Option<&str>,
        poll: Option<u64>,
        options: BTreeMap<String, String>,
        clear_options: bool,
    ) -> Result<BackupTarget, ApiError> {
        let cur = self.get_target(name)?;
        let mut spec = cur.spec.clone();
        if let Some(u) = url {
            spec.url = u.to_string();
        }
        if let Some(p) = poll {
            spec.poll_interval = p;
        }
        if clear_options {
            spec.options.clear();
        }
        if let Some(known) = options_for(&spec.url)
            && options_for(&cur.spec.url) != Some(known)
        {
            let dropped: Vec<String> = spec
                .options
                .keys()
                .filter(|k| !known.contains(&k.as_str()) && !options.contains_key(*k))
                .cloned()
                .collect();
            if !dropped.is_empty() {
                tracing::info!(target = name, options = %dropped.join(", "), "options that do not apply to the new URL were removed");
            }
            spec.options.retain(|k, _| !dropped.contains(k));
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
        let moved = spec.url != cur.spec.url;
        if moved && self.backups_running_on(name)? {
            return Err(conflict(
                "BackupInProgress",
                format!("backups to target {name:?} are running; change its URL when they finish"),
            ));
        }
        if moved && let Some(v) = self.restoring_from(name)? {
            return Err(conflict(
                "RestoreInProgress",
                format!(
                    "volume {v:?} is being restored from target {name:?}; change its URL when it finishes"
                ),
            ));
        }
        store::modify::<BackupTarget>(&*self.store, name, |t| {
            let c = t.spec != spec;
            t.spec = spec.clone();
            c
        })?;
        if moved {
            // The old store's backups are not in the new one.
            self.forget_backups_of(name)?;
        }
        let t = self.check_target(name, true).await?;
        if moved && t.status.available {
            self.sync_target(name).await?;
            return Ok(redact(self.get_target(name)?));
        }
        self.request_sync(name);
        Ok(redact(t))
    }

    /// A volume whose restore from `target` runs now, if any.
    pub(crate) fn restoring_from(&self, target: &str) -> Result<Option<String>, ApiError> {
        Ok(store::list::<Volume>(&*self.store)?
            .into_iter()
            .find(|v| {
                volume_target(v) == target
                    && !v.spec.from_backup.is_empty()
                    && !restore_done(v)
                    && v.status
                        .restore
                        .as_ref()
                        .is_none_or(|r| r.state != RestoreState::Error)
            })
            .map(|v| v.metadata.name))
    }

    /// Removes the objects of every finished backup of a target and its backup volumes (the
    /// remote data is not touched).
    pub(crate) fn forget_backups_of(&self, target: &str) -> Result<(), ApiError> {
        let mut volumes = BTreeSet::new();
        for b in store::list::<Backup>(&*self.store)? {
            if b.spec.target == target && b.status.state.finished() {
                match store::delete(&*self.store, &b) {
                    Ok(()) | Err(StoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                volumes.insert(b.spec.volume);
            }
        }
        for bv in store::list::<BackupVolume>(&*self.store)? {
            if bv.spec.target == target {
                volumes.insert(bv.spec.volume);
            }
        }
        for v in volumes {
            self.refresh_backup_volume(&*self.store, target, &v)?;
        }
        Ok(())
    }

    pub(crate) fn backups_running_on(&self, target: &str) -> Result<bool, ApiError> {
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

    /// Syncs every target whose poll interval passed or that was asked to, probes every
    /// target's availability, removes the leases of failed backups and deletes failed backups
    /// past their retention, until the process ends.
    pub async fn run_backup_sync(self: Arc<Self>) {
        let mut last: HashMap<String, tokio::time::Instant> = HashMap::new();
        let mut last_probe: Option<tokio::time::Instant> = None;
        loop {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.sync_notify.notified()).await;
            if last_probe.is_none_or(|at| at.elapsed() >= PROBE_INTERVAL) {
                last_probe = Some(tokio::time::Instant::now());
                self.probe_targets();
                if let Err(e) = self.expire_failed_backups(now()) {
                    tracing::warn!(error = %e.message, "cannot delete expired failed backups");
                }
            }
            self.clean_leases().await;
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

    /// Asks for a failed backup's lease to be removed from its target (and the block
    /// collection it held up to run).
    pub(crate) fn queue_lease_cleanup(&self, b: &Backup) {
        if let Ok(mut q) = self.lease_cleanups.lock() {
            q.insert((
                b.spec.target.clone(),
                b.spec.volume.clone(),
                b.metadata.name.clone(),
            ));
        }
        self.sync_notify.notify_one();
    }

    /// Removes the queued leases; what cannot be done now (target down) stays queued.
    pub(crate) async fn clean_leases(&self) {
        let queued: Vec<(String, String, String)> = self
            .lease_cleanups
            .lock()
            .map(|mut q| std::mem::take(&mut *q).into_iter().collect())
            .unwrap_or_default();
        let mut by_target: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for (t, v, b) in queued {
            by_target.entry(t).or_default().push((v, b));
        }
        for (t, items) in by_target {
            let keep = |items: &[(String, String)]| {
                if let Ok(mut q) = self.lease_cleanups.lock() {
                    q.extend(items.iter().map(|(v, b)| (t.clone(), v.clone(), b.clone())));
                }
            };
            let store = match self.target_ref(&t) {
                Ok(r) => match open_url(&r.url, &r.options, false).await {
                    Ok(s) => s,
                    Err(_) => {
                        keep(&items);
                        continue;
                    }
                },
                Err(_) => continue, // target gone: nothing to clean there
            };
            let mut failed = Vec::new();
            for (v, b) in items {
                match drop_lease(&store, &v, &b).await {
                    Ok(()) => {
                        tracing::info!(target = %t, backup = %b, "lease of the failed backup removed")
                    }
                    Err(e) => {
                        tracing::warn!(target = %t, backup = %b, error = %e, "cannot remove a failed backup's lease yet");
                        failed.push((v, b));
                    }
                }
            }
            keep(&failed);
            match gc_pass(&store).await {
                Ok(r) if r.deleted_blocks > 0 => {
                    tracing::info!(target = %t, deleted_blocks = r.deleted_blocks, "deferred block collection finished")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(target = %t, error = %e, "block collection failed; it is retried on the next sync")
                }
            }
        }
    }

    /// Brings the target's backups into the store. Never deletes remote data; removes only the
    /// objects of backups whose manifests a successful listing no longer shows. Each manifest
    /// that is new or rewritten since the last sync (by the listing's change tag) is read and
    /// checked: a damaged one, or one under another backup's path, is listed as Error with the
    /// reason instead of Completed.
    pub async fn sync_target(&self, name: &str) -> Result<(), ApiError> {
        let t = self.get_target(name)?;
        if t.spec.url.is_empty() {
            self.check_target(name, false).await?;
            return Ok(());
        }
        let store = match open_url(&t.spec.url, &t.spec.options, false).await {
            Ok(s) => s,
            Err(why) => {
                self.set_availability(name, false, &why)?;
                return Ok(());
            }
        };
        let t0 = now();
        let remote = match list_manifests(&store).await {
            Ok(r) => r,
            Err(e) => {
                // A failed listing is never "no backups".
                self.set_availability(name, false, &format!("listing backups: {e}"))?;
                return Ok(());
            }
        };
        let remote_keys: BTreeSet<(&str, &str)> = remote
            .iter()
            .map(|e| (e.volume.as_str(), e.backup.as_str()))
            .collect();
        let mut touched: BTreeSet<String> = BTreeSet::new();
        for e in &remote {
            if zebu_types::validate_name(&e.backup).is_err()
                || zebu_types::validate_name(
                    zebu_types::owner_image(&e.volume).unwrap_or(&e.volume),
                )
                .is_err()
            {
                continue;
            }
            let existing = store::get::<Backup>(&*self.store, &e.backup)?;
            if let Some(b) = &existing {
                let skip = b.spec.target != name
                    || b.spec.volume != e.volume
                    || !b.status.state.finished()
                    || (b.status.state == BackupState::Error && b.status.manifest_tag.is_empty())
                    || (!e.tag.is_empty() && b.status.manifest_tag == e.tag);
                if skip {
                    continue;
                }
            }
            let damage = match read_manifest(&store, &e.volume, &e.backup).await {
                Ok(Some(m)) if m.volume == e.volume && m.backup == e.backup => {
                    let mut obj = backup_from_manifest(name, &t.spec.url, &m);
                    obj.status.manifest_tag = e.tag.clone();
                    match &existing {
                        None => match store::create(&*self.store, &obj) {
                            Ok(_) | Err(StoreError::Exists { .. }) => {}
                            Err(e) => return Err(e.into()),
                        },
                        Some(_) => {
                            store::modify::<Backup>(&*self.store, &e.backup, |b| {
                                if b.status.state == BackupState::Error {
                                    tracing::info!(target = name, backup = %e.backup, "backup manifest is readable again");
                                    b.status = obj.status.clone();
                                    b.metadata.labels = obj.metadata.labels.clone();
                                    return true;
                                }
                                let c = b.status.manifest_tag != e.tag;
                                b.status.manifest_tag = e.tag.clone();
                                c
                            })?;
                        }
                    }
                    touched.insert(e.volume.clone());
                    continue;
                }
                Ok(Some(m)) => {
                    // Not this path's backup (a renamed or copied volume folder): not listed.
                    tracing::warn!(target = name, path = %zebu_backupstore::backup::manifest_key(&e.volume, &e.backup),
                        volume = %m.volume, backup = %m.backup,
                        "a manifest is stored under another backup's path; it is not listed");
                    continue;
                }
                Ok(None) => continue, // deleted meanwhile
                Err(BackupError::Manifest(err)) => format!("manifest is damaged: {err}"),
                Err(err) => {
                    tracing::warn!(target = name, backup = %e.backup, error = %err, "cannot read a backup's manifest; skipping it this sync");
                    continue;
                }
            };
            tracing::warn!(target = name, backup = %e.backup, volume = %e.volume, reason = %damage, "backup listed as Error");
            match &existing {
                None => {
                    let obj = Backup {
                        metadata: Meta {
                            name: e.backup.clone(),
                            ..Default::default()
                        },
                        spec: BackupSpec {
                            volume: e.volume.clone(),
                            snapshot: String::new(),
                            target: name.to_string(),
                            full: false,
                            offline: false,
                        },
                        status: BackupStatus {
                            state: BackupState::Error,
                            error: damage.clone(),
                            url: manifest_url(&t.spec.url, &e.volume, &e.backup),
                            failed_at: Some(now()),
                            manifest_tag: e.tag.clone(),
                            ..Default::default()
                        },
                    };
                    match store::create(&*self.store, &obj) {
                        Ok(_) | Err(StoreError::Exists { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Some(_) => {
                    store::modify::<Backup>(&*self.store, &e.backup, |b| {
                        b.status.state = BackupState::Error;
                        b.status.progress = 0;
                        b.status.error = damage.clone();
                        b.status.failed_at = Some(now());
                        b.status.manifest_tag = e.tag.clone();
                        true
                    })?;
                }
            }
            touched.insert(e.volume.clone());
        }
        for b in store::list::<Backup>(&*self.store)? {
            let from_target = b.status.state == BackupState::Completed
                || (b.status.state == BackupState::Error && !b.status.manifest_tag.is_empty());
            let settled = b.status.completed_at.or(b.status.failed_at).unwrap_or(0) + 2 < t0;
            let vanished = b.spec.target == name
                && from_target
                && settled
                && !remote_keys.contains(&(b.spec.volume.as_str(), b.metadata.name.as_str()));
            if vanished {
                tracing::info!(target = name, backup = %b.metadata.name, volume = %b.spec.volume, "backup no longer in the target; removing its object");
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
        for vol in touched {
            self.refresh_backup_volume(&*self.store, name, &vol)?;
        }
        self.sync_system_backups(name, &store).await?;
        store::modify::<BackupTarget>(&*self.store, name, |t| {
            t.status.available = true;
            t.status.message.clear();
            t.status.last_synced_at = Some(now());
            true
        })?;
        Ok(())
    }

    /// Re-derives a backup volume from the completed backups of `volume` on `target`.
    pub(crate) fn refresh_backup_volume(
        &self,
        s: &dyn crate::store::Store,
        target: &str,
        volume: &str,
    ) -> Result<(), ApiError> {
        let done: Vec<Backup> = store::list_by::<Backup>(s, store::Field::Volume, volume)?
            .into_iter()
            .filter(|b| b.spec.target == target && b.status.state == BackupState::Completed)
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
}
