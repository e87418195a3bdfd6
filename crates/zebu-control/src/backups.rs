//! The manager's backup side: backup targets (the `default` one, availability, periodic sync of
//! remote backups into BackupVolume/Backup objects), backup requests and the reports of the nodes
//! running them, deleting and verifying backups, restores into new volumes, and each volume's
//! last backup derived from its backup volume.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zebu_backupstore::backup::{BackupError, Problem, read_manifest, verify};
use zebu_backupstore::gc::{delete_backup as remote_delete, drop_lease, gc_pass};
use zebu_backupstore::target::{SECRET_OPTIONS, Target, list_manifests, options_for};
use zebu_backupstore::{Manifest, StoreError as TargetError, TargetSpec};

use crate::controller::{Manager, conflict, not_found, now};
use crate::model::*;
use crate::store::{self, StoreError};
use crate::{ApiError, ErrorKind};

/// How often every target with a URL is probed, and how long a probe may take before the target
/// counts as unavailable.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The reason a target cannot be used, without the context callers add.
fn reason(e: &TargetError) -> String {
    e.to_string()
}

/// Opens a target from its URL and options; `Err` is the reason it is unavailable.
async fn open_url(
    url: &str,
    options: &BTreeMap<String, String>,
    init: bool,
) -> Result<Target, String> {
    let spec = TargetSpec::parse(url, options).map_err(|e| e.to_string())?;
    match tokio::time::timeout(PROBE_TIMEOUT, spec.open(init)).await {
        Ok(r) => r.map_err(|e| reason(&e)),
        Err(_) => Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    }
}

fn target_error(e: impl std::fmt::Display) -> ApiError {
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
        open_url(&r.url, &r.options, false).await.map_err(|why| {
            conflict(
                "TargetUnavailable",
                format!("backup target {name:?} is unavailable: {why}"),
            )
        })
    }

    /// Checks a target (creating its marker on first use) and records the outcome.
    async fn check_target(&self, name: &str, init: bool) -> Result<BackupTarget, ApiError> {
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
    fn set_availability(
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
    fn restoring_from(&self, target: &str) -> Result<Option<String>, ApiError> {
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
    fn forget_backups_of(&self, target: &str) -> Result<(), ApiError> {
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
            self.refresh_backup_volume(target, &v)?;
        }
        Ok(())
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
    async fn clean_leases(&self) {
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
                self.set_availability(name, false, &format!("listing backups: {}", reason(&e)))?;
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
                || zebu_types::validate_name(&e.volume).is_err()
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
    /// `full` reads and checks every block instead of trusting the previous backup's.
    pub fn create_backup(
        &self,
        volume: &str,
        snapshot: Option<&str>,
        target: Option<&str>,
        labels: BTreeMap<String, String>,
        full: bool,
    ) -> Result<Backup, ApiError> {
        let s = &*self.store;
        check_labels(&labels)?;
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
                labels,
                ..Default::default()
            },
            spec: BackupSpec {
                volume: volume.to_string(),
                snapshot: snap,
                target,
                full,
            },
            status: BackupStatus {
                url: manifest_url(&tr.url, volume, &name),
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
            let mut failed = None;
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
                full: b.spec.full,
                labels: b.metadata.labels.clone(),
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
                Some((
                    format!("backup target {:?} was deleted", b.spec.target),
                    false,
                ))
            } else {
                match engine {
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
                // A node that only lost touch with the manager may still run the backup: its
                // lease stays until it expires. Otherwise the backup is over for sure.
                if let Some(b) = ended
                    && !node_down
                {
                    self.queue_lease_cleanup(&b);
                }
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
                revert: None,
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
        })
    }

    /// The backup a standby volume must move to: the newest completed backup of its backup
    /// volume that still exists, when that is not the one it holds. This goes backwards too:
    /// deleting the newest backup (a bad one) makes the standby follow the one before it.
    fn newer_backup(&self, v: &Volume, st: &RestoreStatus) -> Option<String> {
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
    pub(crate) fn reconcile_activation(&self, v: &Volume) -> Result<(), ApiError> {
        if !(v.spec.standby && v.spec.activate) {
            return Ok(());
        }
        let st = v.status.restore.clone().unwrap_or_default();
        match self.newer_backup(v, &st) {
            Some(newer) if st.state == RestoreState::Error && st.requested_backup == newer => {
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
            full: false,
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
