//! System backups and restores. A system backup records every volume (with the exact backup
//! that restores it, chosen or made by the system backup itself, never read back from
//! `lastBackup`), backing image (with its backup), setting and backup target, waits for the
//! backups it made by name with a deadline, then writes one checksummed document to its target.
//! A system restore re-creates what is missing from such a document and waits for the restored
//! volumes, reporting each object's outcome. Both are driven by `run_system_tasks`, step by step
//! from their stored state, so a manager restart resumes them.
//!
//! Document on the target: `system-backups/<name>/system-backup.json`, a header line
//! `ZEBUSYSBACKUP <version> <BLAKE3 of the body, hex> <body length>` and the JSON body
//! ([`Document`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zebu_backupstore::BackupStore;
use zebu_backupstore::backup::manifest_key;
use zebu_backupstore::target::SECRET_OPTIONS;

use crate::ApiError;
use crate::backing_images::{CHECKSUM_LABEL, copy_ref};
use crate::backups::{restore_done, volume_target};
use crate::controller::{Manager, conflict, not_found, now};
use crate::model::*;
use crate::store;

/// The document's format version.
pub const DOCUMENT_VERSION: u32 = 1;
const MAGIC: &str = "ZEBUSYSBACKUP";
/// The label every backup a system backup makes carries (its name).
pub const SYSTEM_BACKUP_LABEL: &str = "system-backup";

/// Where a system backup's document lives on its target.
pub fn document_key(name: &str) -> String {
    format!("system-backups/{name}/system-backup.json")
}

/// A backup target as recorded: secret options are left out (named in `secretOptions`; they
/// must be given again after a restore).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetRecord {
    pub name: String,
    pub url: String,
    pub poll_interval: u64,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    #[serde(default)]
    pub secret_options: Vec<String>,
}

/// What a system backup writes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    pub name: String,
    pub created_at: u64,
    pub version: String,
    pub volume_backup_policy: VolumeBackupPolicy,
    pub settings: BTreeMap<String, String>,
    pub targets: Vec<TargetRecord>,
    pub backing_images: Vec<SystemImage>,
    pub volumes: Vec<SystemVolume>,
}

impl Document {
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let body = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        let mut out = format!(
            "{MAGIC} {DOCUMENT_VERSION} {} {}\n",
            blake3::hash(&body).to_hex(),
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Parses a document, checking its version, length and checksum.
    pub fn decode(raw: &[u8]) -> Result<Document, String> {
        let nl = raw
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("no header line")?;
        let header = std::str::from_utf8(&raw[..nl]).map_err(|_| "header is not text")?;
        let parts: Vec<&str> = header.split(' ').collect();
        let [magic, version, sum, len] = parts[..] else {
            return Err(format!("bad header {header:?}"));
        };
        if magic != MAGIC {
            return Err("not a system-backup document".into());
        }
        if version != DOCUMENT_VERSION.to_string() {
            return Err(format!(
                "format version {version}; this build reads version {DOCUMENT_VERSION}"
            ));
        }
        let body = &raw[nl + 1..];
        if len.parse::<usize>().ok() != Some(body.len()) {
            return Err(format!("body is {} bytes, header says {len}", body.len()));
        }
        if blake3::hash(body).to_hex().as_str() != sum {
            return Err("checksum mismatch".into());
        }
        serde_json::from_slice(body).map_err(|e| format!("damaged body: {e}"))
    }
}

/// A deterministic name for the backup a system backup makes for `what` (a volume, or
/// `image/<name>`): a manager restarted mid-way finds the same one again.
fn child_name(sb: &SystemBackup, what: &str) -> String {
    let h = blake3::hash(format!("{}/{what}", sb.metadata.uid).as_bytes());
    format!("sysbackup-{}", &h.to_hex()[..16])
}

/// The BLAKE3 a manifest ends with, hex.
fn manifest_checksum(raw: &[u8]) -> Option<String> {
    (raw.len() >= 32).then(|| {
        raw[raw.len() - 32..]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    })
}

impl Manager {
    fn timeout_s(&self) -> u64 {
        self.setting_u64("system-backup-timeout").max(1)
    }

    pub fn create_system_backup(
        &self,
        name: &str,
        policy: VolumeBackupPolicy,
        target: Option<&str>,
    ) -> Result<SystemBackup, ApiError> {
        zebu_types::validate_name(name).map_err(|e| ApiError::bad("InvalidName", e.to_string()))?;
        let target = target.unwrap_or(DEFAULT_TARGET).to_string();
        zebu_types::validate_name(&target)
            .map_err(|e| ApiError::bad("InvalidName", e.to_string()))?;
        self.available_target(&target)?;
        let sb = SystemBackup {
            metadata: Meta {
                name: name.to_string(),
                ..Default::default()
            },
            spec: SystemBackupSpec {
                volume_backup_policy: policy,
                target,
            },
            status: SystemBackupStatus {
                started_at: self.now_s(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                ..Default::default()
            },
        };
        let sb = store::create(&*self.store, &sb)?;
        tracing::info!(
            system_backup = name,
            policy = policy.as_str(),
            "system backup requested"
        );
        Ok(sb)
    }

    /// Deletes a system backup: exactly its document on the target (the backups it names stay),
    /// then the object. Refused while the target is unavailable for a written one.
    pub async fn delete_system_backup(&self, name: &str) -> Result<SystemBackup, ApiError> {
        let sb = store::get::<SystemBackup>(&*self.store, name)?
            .ok_or_else(|| not_found("system backup", name))?;
        if sb.status.state == SystemBackupState::Ready
            || sb.status.state == SystemBackupState::Writing
        {
            let t = self.open_target(&sb.spec.target).await?;
            t.delete(&document_key(name)).await.map_err(|e| {
                conflict(
                    "TargetUnavailable",
                    format!("deleting system backup {name:?} from its target: {e}"),
                )
            })?;
        }
        match store::delete(&*self.store, &sb) {
            Ok(()) | Err(store::StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(system_backup = name, "system backup deleted");
        Ok(sb)
    }

    fn set_sb(
        &self,
        name: &str,
        f: impl FnMut(&mut SystemBackup) -> bool,
    ) -> Result<Option<SystemBackup>, ApiError> {
        Ok(store::modify::<SystemBackup>(&*self.store, name, f)?)
    }

    fn fail_sb(&self, name: &str, why: String) -> Result<(), ApiError> {
        tracing::warn!(system_backup = name, reason = %why, "system backup failed");
        self.set_sb(name, |sb| {
            if sb.status.state.finished() {
                return false;
            }
            sb.status.state = SystemBackupState::Error;
            sb.status.message = why.clone();
            true
        })?;
        Ok(())
    }

    /// The newest completed backup of `volume` on `target` (by creation time).
    fn newest_backup(&self, owner: &str, target: &str) -> Result<Option<Backup>, ApiError> {
        let mut bs: Vec<Backup> =
            store::list_by::<Backup>(&*self.store, store::Field::Volume, owner)?
                .into_iter()
                .filter(|b| b.spec.target == target && b.status.state == BackupState::Completed)
                .collect();
        bs.sort_by_key(|b| std::cmp::Reverse(b.status.created_ms));
        Ok(bs.into_iter().next())
    }

    /// Pending → creating-backups: decides, per volume and backing image, which backup will
    /// restore it, making the ones the policy asks for (named from the system backup).
    fn plan_system_backup(&self, sb: &SystemBackup) -> Result<(), ApiError> {
        let s = &*self.store;
        let name = &sb.metadata.name;
        if let Err(e) = self.available_target(&sb.spec.target) {
            return self.fail_sb(name, e.message);
        }
        let policy = sb.spec.volume_backup_policy;
        let labels: BTreeMap<String, String> =
            [(SYSTEM_BACKUP_LABEL.to_string(), name.clone())].into();
        let mut volumes = Vec::new();
        for v in store::list::<Volume>(s)? {
            if v.metadata.deletion_requested.is_some() {
                continue;
            }
            let mut e = SystemVolume {
                name: v.metadata.name.clone(),
                size: v.spec.size,
                replicas: v.spec.replicas,
                backing_image: v.spec.backing_image.clone(),
                backup_target: volume_target(&v).to_string(),
                standby: v.spec.standby,
                backup_volume: v.spec.backup_volume.clone(),
                from_backup: v.spec.from_backup.clone(),
                ..Default::default()
            };
            if v.spec.standby {
                e.done = true;
                e.note = "standby: not backed up; restored to follow its source again".into();
                volumes.push(e);
                continue;
            }
            if !restore_done(&v) {
                e.done = true;
                e.backup = v.spec.from_backup.clone();
                e.note = "still being restored: recorded with the backup it restores".into();
                volumes.push(e);
                continue;
            }
            let newest = self.newest_backup(&v.metadata.name, &e.backup_target)?;
            // Current: detached since before the newest backup completed (nothing written since).
            let current = newest.as_ref().is_some_and(|b| {
                v.status.state == VolumeState::Detached
                    && matches!((v.status.detached_at, b.status.completed_at),
                        (Some(d), Some(c)) if c >= d)
            });
            match (policy, newest) {
                (VolumeBackupPolicy::Disabled, Some(b)) => {
                    e.backup = b.metadata.name;
                    e.done = true;
                }
                (VolumeBackupPolicy::Disabled, None) => {
                    e.done = true;
                    e.note = "no completed backup: not restorable".into();
                }
                (VolumeBackupPolicy::IfNotPresent, Some(b)) if current => {
                    e.backup = b.metadata.name;
                    e.done = true;
                }
                _ => {
                    let child = child_name(sb, &v.metadata.name);
                    if store::get::<Backup>(s, &child)?.is_none()
                        && let Err(err) = self.new_backup(
                            &v,
                            &child,
                            None,
                            &e.backup_target,
                            labels.clone(),
                            false,
                            true,
                        )
                    {
                        return self.fail_sb(
                            name,
                            format!(
                                "cannot back up volume {:?}: {}",
                                v.metadata.name, err.message
                            ),
                        );
                    }
                    e.backup = child;
                    e.created = true;
                }
            }
            volumes.push(e);
        }
        let mut images = Vec::new();
        for img in store::list::<BackingImage>(s)? {
            if img.status.state != BackingImageState::Ready {
                continue;
            }
            let sum = copy_ref(&img).checksum;
            let owner = zebu_types::image_owner(&img.metadata.name);
            let reuse = store::list_by::<Backup>(s, store::Field::Volume, &owner)?
                .into_iter()
                .filter(|b| {
                    b.spec.target == sb.spec.target
                        && b.status.state == BackupState::Completed
                        && b.metadata.labels.get(CHECKSUM_LABEL) == Some(&sum)
                })
                .max_by_key(|b| b.status.created_ms);
            let mut e = SystemImage {
                name: img.metadata.name.clone(),
                checksum: sum,
                min_copies: img.spec.min_copies,
                target: sb.spec.target.clone(),
                ..Default::default()
            };
            match reuse {
                Some(b) => {
                    e.backup = b.metadata.name;
                    e.done = true;
                }
                None => {
                    let child = child_name(sb, &format!("image/{}", img.metadata.name));
                    if store::get::<Backup>(s, &child)?.is_none()
                        && let Err(err) = self.image_backup_named(
                            &img.metadata.name,
                            &sb.spec.target,
                            &child,
                            labels.clone(),
                        )
                    {
                        return self.fail_sb(
                            name,
                            format!(
                                "cannot back up backing image {:?}: {}",
                                img.metadata.name, err.message
                            ),
                        );
                    }
                    e.backup = child;
                    e.created = true;
                }
            }
            images.push(e);
        }
        let settings = store::list::<Setting>(s)?.len() as u32;
        let targets = store::list::<BackupTarget>(s)?.len() as u32;
        self.set_sb(name, |sb| {
            if sb.status.state != SystemBackupState::Pending {
                return false;
            }
            sb.status.volumes = volumes.clone();
            sb.status.backing_images = images.clone();
            sb.status.settings = settings;
            sb.status.targets = targets;
            sb.status.state = SystemBackupState::CreatingBackups;
            sb.status.progress = 10;
            true
        })?;
        Ok(())
    }

    /// Creating-backups: each backup it made, looked up by name, completed → writing; one
    /// failed or gone, or the deadline passed → error naming it.
    fn check_system_backup(&self, sb: &SystemBackup) -> Result<(), ApiError> {
        let s = &*self.store;
        let name = &sb.metadata.name;
        let mut st = sb.status.clone();
        let mut waiting = Vec::new();
        let what = |kind: &str, n: &str, b: &str| format!("{kind} {n:?} (backup {b})");
        let mut check =
            |kind: &str, n: &str, b: &str, done: &mut bool| -> Result<Option<String>, ApiError> {
                if *done {
                    return Ok(None);
                }
                match store::get::<Backup>(s, b)? {
                    None => Ok(Some(format!("the backup of {kind} {n:?} ({b}) is gone"))),
                    Some(x) if x.status.state == BackupState::Completed => {
                        *done = true;
                        Ok(None)
                    }
                    Some(x) if x.status.state == BackupState::Error => Ok(Some(format!(
                        "the backup of {kind} {n:?} ({b}) failed: {}",
                        x.status.error
                    ))),
                    Some(_) => {
                        waiting.push(what(kind, n, b));
                        Ok(None)
                    }
                }
            };
        for v in st.volumes.iter_mut() {
            if let Some(why) = check("volume", &v.name, &v.backup, &mut v.done)? {
                return self.fail_sb(name, why);
            }
        }
        for i in st.backing_images.iter_mut() {
            if let Some(why) = check("backing image", &i.name, &i.backup, &mut i.done)? {
                return self.fail_sb(name, why);
            }
        }
        let total = st.volumes.len() + st.backing_images.len();
        let done = st.volumes.iter().filter(|v| v.done).count()
            + st.backing_images.iter().filter(|i| i.done).count();
        st.progress = 10 + (80 * done).checked_div(total).unwrap_or(80) as u32;
        if waiting.is_empty() {
            st.state = SystemBackupState::Writing;
            st.message.clear();
        } else if self.now_s().saturating_sub(st.started_at) > self.timeout_s() {
            return self.fail_sb(
                name,
                format!(
                    "gave up after {} s (system-backup-timeout) waiting for {}",
                    self.timeout_s(),
                    waiting.join(", ")
                ),
            );
        } else {
            st.message = format!("waiting for {}", waiting.join(", "));
        }
        self.set_sb(name, |x| {
            if x.status.state != SystemBackupState::CreatingBackups || x.status == st {
                return false;
            }
            x.status = st.clone();
            true
        })?;
        Ok(())
    }

    /// Writing: reads every recorded manifest from its target (its checksum goes into the
    /// document; a missing one fails the system backup), then writes the document.
    async fn write_system_backup(&self, sb: &SystemBackup) -> Result<(), ApiError> {
        let name = &sb.metadata.name;
        let mut st = sb.status.clone();
        let mut stores: BTreeMap<String, zebu_backupstore::Target> = BTreeMap::new();
        let mut entries: Vec<(String, String, String, &mut String)> = Vec::new();
        for v in st.volumes.iter_mut() {
            if !v.backup.is_empty() && v.manifest_checksum.is_empty() {
                entries.push((
                    v.backup_target.clone(),
                    v.name.clone(),
                    v.backup.clone(),
                    &mut v.manifest_checksum,
                ));
            }
        }
        for i in st.backing_images.iter_mut() {
            if i.manifest_checksum.is_empty() {
                let owner = zebu_types::image_owner(&i.name);
                entries.push((
                    i.target.clone(),
                    owner,
                    i.backup.clone(),
                    &mut i.manifest_checksum,
                ));
            }
        }
        for (target, owner, backup, out) in entries {
            if !stores.contains_key(&target) {
                match self.open_target(&target).await {
                    Ok(t) => {
                        stores.insert(target.clone(), t);
                    }
                    Err(e) => return self.retry_or_fail(sb, e.message),
                }
            }
            let Some(store) = stores.get(&target) else {
                continue;
            };
            match store.get(&manifest_key(&owner, &backup)).await {
                Ok(Some(raw)) => *out = manifest_checksum(&raw).unwrap_or_default(),
                Ok(None) => {
                    return self.fail_sb(
                        name,
                        format!("backup {backup} of {owner:?} is not on target {target:?}"),
                    );
                }
                Err(e) => return self.retry_or_fail(sb, format!("reading backup {backup}: {e}")),
            }
        }
        let doc = self.document(sb, &st)?;
        let raw = doc
            .encode()
            .map_err(|e| ApiError::new(crate::ErrorKind::Internal, "Internal", e))?;
        let target = match self.open_target(&sb.spec.target).await {
            Ok(t) => t,
            Err(e) => return self.retry_or_fail(sb, e.message),
        };
        if let Err(e) = target.put(&document_key(name), raw).await {
            return self.retry_or_fail(sb, format!("writing the document: {e}"));
        }
        let url = format!(
            "{}/{}",
            self.get_target(&sb.spec.target)?
                .spec
                .url
                .trim_end_matches('/'),
            document_key(name)
        );
        st.state = SystemBackupState::Ready;
        st.progress = 100;
        st.message.clear();
        st.created_at = Some(doc.created_at);
        st.url = url;
        self.set_sb(name, |x| {
            if x.status.state != SystemBackupState::Writing {
                return false;
            }
            x.status = st.clone();
            true
        })?;
        tracing::info!(system_backup = %name, volumes = st.volumes.len(), images = st.backing_images.len(), "system backup ready");
        Ok(())
    }

    /// A transient failure while writing: recorded, retried on the next step until the
    /// deadline, then the system backup fails with it.
    fn retry_or_fail(&self, sb: &SystemBackup, why: String) -> Result<(), ApiError> {
        if self.now_s().saturating_sub(sb.status.started_at) > self.timeout_s() {
            return self.fail_sb(&sb.metadata.name, why);
        }
        self.set_sb(&sb.metadata.name, |x| {
            let c = x.status.message != why;
            x.status.message = why.clone();
            c
        })?;
        Ok(())
    }

    fn document(&self, sb: &SystemBackup, st: &SystemBackupStatus) -> Result<Document, ApiError> {
        let s = &*self.store;
        let settings = store::list::<Setting>(s)?
            .into_iter()
            .map(|x| (x.metadata.name, x.value))
            .collect();
        let targets = store::list::<BackupTarget>(s)?
            .into_iter()
            .map(|t| {
                let (secret, plain): (BTreeMap<_, _>, BTreeMap<_, _>) = t
                    .spec
                    .options
                    .into_iter()
                    .partition(|(k, _)| SECRET_OPTIONS.contains(&k.as_str()));
                TargetRecord {
                    name: t.metadata.name,
                    url: t.spec.url,
                    poll_interval: t.spec.poll_interval,
                    options: plain,
                    secret_options: secret.into_keys().collect(),
                }
            })
            .collect();
        Ok(Document {
            name: sb.metadata.name.clone(),
            created_at: now(),
            version: st.version.clone(),
            volume_backup_policy: sb.spec.volume_backup_policy,
            settings,
            targets,
            backing_images: st.backing_images.clone(),
            volumes: st.volumes.clone(),
        })
    }

    /// Steps every unfinished system backup and restore once.
    pub async fn step_system_tasks(self: &Arc<Self>) {
        let sbs = store::list::<SystemBackup>(&*self.store).unwrap_or_default();
        for sb in sbs.into_iter().filter(|b| !b.status.state.finished()) {
            let res = match sb.status.state {
                SystemBackupState::Pending => {
                    let (m, b) = (self.clone(), sb.clone());
                    tokio::task::spawn_blocking(move || m.plan_system_backup(&b))
                        .await
                        .unwrap_or_else(|e| Err(internal(e)))
                }
                SystemBackupState::CreatingBackups => {
                    let (m, b) = (self.clone(), sb.clone());
                    tokio::task::spawn_blocking(move || m.check_system_backup(&b))
                        .await
                        .unwrap_or_else(|e| Err(internal(e)))
                }
                SystemBackupState::Writing => self.write_system_backup(&sb).await,
                _ => Ok(()),
            };
            if let Err(e) = res {
                tracing::warn!(system_backup = %sb.metadata.name, error = %e.message, "system backup step failed");
            }
        }
        let srs = store::list::<SystemRestore>(&*self.store).unwrap_or_default();
        for sr in srs.into_iter().filter(|r| !r.status.state.finished()) {
            let res = match sr.status.state {
                SystemRestoreState::Pending => self.start_system_restore(&sr).await,
                SystemRestoreState::Restoring => {
                    let (m, r) = (self.clone(), sr.clone());
                    tokio::task::spawn_blocking(move || m.check_system_restore(&r))
                        .await
                        .unwrap_or_else(|e| Err(internal(e)))
                }
                _ => Ok(()),
            };
            if let Err(e) = res {
                tracing::warn!(system_restore = %sr.metadata.name, error = %e.message, "system restore step failed");
            }
        }
    }

    /// Drives system backups and restores: a step every second.
    pub async fn run_system_tasks(self: Arc<Self>) {
        loop {
            self.step_system_tasks().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Lists the system backups on target `name` (after a successful listing): a document
    /// another cluster wrote appears as a ready system backup; a ready one whose document is
    /// gone goes. Unfinished ones are never touched.
    pub(crate) async fn sync_system_backups(
        &self,
        name: &str,
        store: &zebu_backupstore::Target,
    ) -> Result<(), ApiError> {
        let Ok(keys) = store.list("system-backups").await else {
            return Ok(()); // a failed listing is not an empty one
        };
        let remote: Vec<String> = keys
            .iter()
            .filter_map(|k| {
                let n = k
                    .strip_prefix("system-backups/")?
                    .strip_suffix("/system-backup.json")?;
                (zebu_types::validate_name(n).is_ok() && document_key(n) == *k)
                    .then(|| n.to_string())
            })
            .collect();
        for n in &remote {
            if store::get::<SystemBackup>(&*self.store, n)?.is_some() {
                continue;
            }
            let Ok(Some(raw)) = store.get(&document_key(n)).await else {
                continue;
            };
            let (state, message, doc) = match Document::decode(&raw) {
                Ok(d) => (SystemBackupState::Ready, String::new(), d),
                Err(e) => (
                    SystemBackupState::Error,
                    format!("the document on the target is damaged: {e}"),
                    Document::default(),
                ),
            };
            let t = self.get_target(name)?;
            let sb = SystemBackup {
                metadata: Meta {
                    name: n.clone(),
                    ..Default::default()
                },
                spec: SystemBackupSpec {
                    volume_backup_policy: doc.volume_backup_policy,
                    target: name.to_string(),
                },
                status: SystemBackupStatus {
                    state,
                    progress: if state == SystemBackupState::Ready {
                        100
                    } else {
                        0
                    },
                    message,
                    created_at: Some(doc.created_at),
                    version: doc.version.clone(),
                    url: format!("{}/{}", t.spec.url.trim_end_matches('/'), document_key(n)),
                    settings: doc.settings.len() as u32,
                    targets: doc.targets.len() as u32,
                    volumes: doc.volumes,
                    backing_images: doc.backing_images,
                    ..Default::default()
                },
            };
            match store::create(&*self.store, &sb) {
                Ok(_) | Err(store::StoreError::Exists { .. }) => {
                    tracing::info!(target = name, system_backup = %n, "system backup found on the target");
                }
                Err(e) => return Err(e.into()),
            }
        }
        for sb in store::list::<SystemBackup>(&*self.store)? {
            if sb.spec.target == name
                && sb.status.state == SystemBackupState::Ready
                && !remote.contains(&sb.metadata.name)
            {
                match store::delete(&*self.store, &sb) {
                    Ok(()) | Err(store::StoreError::NotFound { .. }) => {}
                    Err(store::StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    pub fn create_system_restore(
        &self,
        name: &str,
        system_backup: &str,
    ) -> Result<SystemRestore, ApiError> {
        zebu_types::validate_name(name).map_err(|e| ApiError::bad("InvalidName", e.to_string()))?;
        let sb = store::get::<SystemBackup>(&*self.store, system_backup)?
            .ok_or_else(|| not_found("system backup", system_backup))?;
        if sb.status.state != SystemBackupState::Ready {
            return Err(conflict(
                "NotReady",
                format!(
                    "system backup {system_backup:?} is {}, not ready",
                    sb.status.state.as_str()
                ),
            ));
        }
        let busy = store::list::<SystemRestore>(&*self.store)?
            .into_iter()
            .find(|r| !r.status.state.finished());
        if let Some(r) = busy {
            return Err(conflict(
                "RestoreInProgress",
                format!("system restore {:?} is still running", r.metadata.name),
            ));
        }
        let sr = SystemRestore {
            metadata: Meta {
                name: name.to_string(),
                ..Default::default()
            },
            spec: SystemRestoreSpec {
                system_backup: system_backup.to_string(),
            },
            status: SystemRestoreStatus {
                started_at: self.now_s(),
                ..Default::default()
            },
        };
        let sr = store::create(&*self.store, &sr)?;
        tracing::info!(
            system_restore = name,
            system_backup,
            "system restore requested"
        );
        Ok(sr)
    }

    fn set_sr(
        &self,
        name: &str,
        f: impl FnMut(&mut SystemRestore) -> bool,
    ) -> Result<Option<SystemRestore>, ApiError> {
        Ok(store::modify::<SystemRestore>(&*self.store, name, f)?)
    }

    fn fail_sr(&self, name: &str, why: String) -> Result<(), ApiError> {
        tracing::warn!(system_restore = name, reason = %why, "system restore failed");
        self.set_sr(name, |r| {
            if r.status.state.finished() {
                return false;
            }
            r.status.state = SystemRestoreState::Error;
            r.status.message = why.clone();
            true
        })?;
        Ok(())
    }

    /// Pending → restoring: reads the document and re-creates what is missing (settings,
    /// targets, backing images, volumes), recording each object's outcome.
    async fn start_system_restore(&self, sr: &SystemRestore) -> Result<(), ApiError> {
        let name = &sr.metadata.name;
        let Some(sb) = store::get::<SystemBackup>(&*self.store, &sr.spec.system_backup)? else {
            return self.fail_sr(
                name,
                format!("system backup {:?} is gone", sr.spec.system_backup),
            );
        };
        let raw = match self.open_target(&sb.spec.target).await {
            Ok(t) => t.get(&document_key(&sb.metadata.name)).await,
            Err(e) => {
                return self.restore_retry_or_fail(sr, e.message);
            }
        };
        let doc = match raw {
            Ok(Some(raw)) => match Document::decode(&raw) {
                Ok(d) => d,
                Err(e) => {
                    return self.fail_sr(
                        name,
                        format!("the system backup's document is damaged: {e}"),
                    );
                }
            },
            Ok(None) => {
                return self.fail_sr(
                    name,
                    format!(
                        "system backup {:?} is not on target {:?}",
                        sb.metadata.name, sb.spec.target
                    ),
                );
            }
            Err(e) => return self.restore_retry_or_fail(sr, format!("reading the document: {e}")),
        };
        let mut results = Vec::new();
        let mut push = |kind: &str, n: &str, r: String| {
            results.push(RestoreResult {
                kind: kind.into(),
                name: n.into(),
                result: r,
            })
        };
        for (k, v) in &doc.settings {
            let cur = self.setting(k);
            if &cur == v {
                push("setting", k, "skipped: exists".into());
                continue;
            }
            match self.put_setting(k, v) {
                Ok(_) => push("setting", k, "restored".into()),
                Err(e) => push("setting", k, format!("failed: {}", e.message)),
            }
        }
        for t in &doc.targets {
            let exists = store::get::<BackupTarget>(&*self.store, &t.name)?;
            match exists {
                Some(cur) if !cur.spec.url.is_empty() || t.url.is_empty() => {
                    push("backup target", &t.name, "skipped: exists".into());
                }
                Some(_) => {
                    // The default target exists always; its URL comes back if unset.
                    match self
                        .update_target(
                            &t.name,
                            Some(&t.url),
                            Some(t.poll_interval),
                            t.options.clone(),
                            false,
                        )
                        .await
                    {
                        Ok(_) => push("backup target", &t.name, secrets_note(t)),
                        Err(e) => push("backup target", &t.name, format!("failed: {}", e.message)),
                    }
                }
                None => match self
                    .create_target(&t.name, &t.url, Some(t.poll_interval), t.options.clone())
                    .await
                {
                    Ok(_) => push("backup target", &t.name, secrets_note(t)),
                    Err(e) => push("backup target", &t.name, format!("failed: {}", e.message)),
                },
            }
        }
        // The Backup objects the restores need come from the targets' listings.
        let mut synced = std::collections::BTreeSet::new();
        for t in doc
            .volumes
            .iter()
            .map(|v| v.backup_target.clone())
            .chain(doc.backing_images.iter().map(|i| i.target.clone()))
            .chain([sb.spec.target.clone()])
        {
            if store::get::<BackupTarget>(&*self.store, &t)?.is_some() && synced.insert(t.clone()) {
                let _ = self.sync_target(&t).await;
            }
        }
        for i in &doc.backing_images {
            if store::get::<BackingImage>(&*self.store, &i.name)?.is_some() {
                push("backing image", &i.name, "skipped: exists".into());
                continue;
            }
            let spec = BackingImageSpec {
                source: BackingImageSource {
                    kind: BackingImageSourceKind::Restore,
                    backup: i.backup.clone(),
                    ..Default::default()
                },
                checksum: i.checksum.clone(),
                min_copies: i.min_copies.max(1),
            };
            match self.create_backing_image(&i.name, spec) {
                Ok(_) => push("backing image", &i.name, "restoring".into()),
                Err(e) => push("backing image", &i.name, format!("failed: {}", e.message)),
            }
        }
        for v in &doc.volumes {
            if store::get::<Volume>(&*self.store, &v.name)?.is_some() {
                push("volume", &v.name, "skipped: exists".into());
                continue;
            }
            let r = self.restore_system_volume(&sb, v);
            push("volume", &v.name, r);
        }
        let failed = results
            .iter()
            .filter(|r| r.result.starts_with("failed"))
            .count();
        self.set_sr(name, |r| {
            if r.status.state != SystemRestoreState::Pending {
                return false;
            }
            r.status.results = results.clone();
            r.status.state = SystemRestoreState::Restoring;
            r.status.progress = 20;
            if failed > 0 {
                r.status.message = format!("{failed} object(s) failed");
            }
            true
        })?;
        Ok(())
    }

    /// Creates one volume of a system backup; returns its result.
    fn restore_system_volume(&self, sb: &SystemBackup, v: &SystemVolume) -> String {
        let s = &*self.store;
        if v.standby {
            // Follows its source again, from the newest backup of it there is.
            let from = self
                .newest_backup(&v.backup_volume, &v.backup_target)
                .ok()
                .flatten()
                .map(|b| b.metadata.name)
                .unwrap_or_else(|| v.from_backup.clone());
            return match self.create_volume_from(
                &v.name,
                Some(v.size),
                v.replicas,
                Some(&from),
                true,
            ) {
                Ok(_) => "restoring".into(),
                Err(e) => format!("failed: {}", e.message),
            };
        }
        if v.backup.is_empty() {
            return format!("failed: no backup was recorded ({})", v.note);
        }
        let found = store::get::<Backup>(s, &v.backup).ok().flatten();
        let usable = found.as_ref().is_some_and(|b| {
            store::get::<BackupTarget>(s, &b.spec.target)
                .ok()
                .flatten()
                .is_some()
        });
        if !usable {
            let why = if store::get::<BackupTarget>(s, &v.backup_target)
                .ok()
                .flatten()
                .is_none()
            {
                format!(
                    "its backup {} was on target {:?}, which no longer exists, and target {:?} of the system backup does not hold it",
                    v.backup, v.backup_target, sb.spec.target
                )
            } else {
                format!(
                    "its backup {} is not on target {:?}",
                    v.backup, v.backup_target
                )
            };
            return format!("failed: {why}");
        }
        let res =
            self.create_volume_from(&v.name, Some(v.size), v.replicas, Some(&v.backup), false);
        match res {
            Ok(_) => "restoring".into(),
            Err(e) => format!("failed: {}", e.message),
        }
    }

    fn restore_retry_or_fail(&self, sr: &SystemRestore, why: String) -> Result<(), ApiError> {
        if self.now_s().saturating_sub(sr.status.started_at) > self.timeout_s() {
            return self.fail_sr(&sr.metadata.name, why);
        }
        self.set_sr(&sr.metadata.name, |x| {
            let c = x.status.message != why;
            x.status.message = why.clone();
            c
        })?;
        Ok(())
    }

    /// Restoring: each volume and image being restored, looked up by name, until all are done
    /// (completed, or error when any object failed) or the deadline passes.
    fn check_system_restore(&self, sr: &SystemRestore) -> Result<(), ApiError> {
        let s = &*self.store;
        let mut st = sr.status.clone();
        for r in st.results.iter_mut().filter(|r| r.result == "restoring") {
            match r.kind.as_str() {
                "volume" => match store::get::<Volume>(s, &r.name)? {
                    None => r.result = "failed: the volume was deleted".into(),
                    Some(v) => {
                        let rs = v.status.restore.clone().unwrap_or_default();
                        let standby_following =
                            v.spec.standby && !rs.last_restored_backup.is_empty();
                        if standby_following || restore_done(&v) {
                            r.result = "restored".into();
                        } else if rs.state == RestoreState::Error {
                            r.result = format!("failed: {}", rs.error);
                        }
                    }
                },
                "backing image" => match store::get::<BackingImage>(s, &r.name)? {
                    None => r.result = "failed: the backing image was deleted".into(),
                    Some(b) if b.status.state == BackingImageState::Ready => {
                        r.result = "restored".into()
                    }
                    Some(b) if b.status.state == BackingImageState::Failed => {
                        r.result = format!("failed: {}", b.status.message)
                    }
                    Some(_) => {}
                },
                _ => {}
            }
        }
        let total = st.results.len().max(1);
        let pending: Vec<String> = st
            .results
            .iter()
            .filter(|r| r.result == "restoring")
            .map(|r| format!("{} {:?}", r.kind, r.name))
            .collect();
        let failed: Vec<String> = st
            .results
            .iter()
            .filter(|r| r.result.starts_with("failed"))
            .map(|r| format!("{} {:?}", r.kind, r.name))
            .collect();
        st.progress = 20 + (80 * (total - pending.len()) / total) as u32;
        if pending.is_empty() {
            if failed.is_empty() {
                st.state = SystemRestoreState::Completed;
                st.progress = 100;
                st.message.clear();
            } else {
                st.state = SystemRestoreState::Error;
                st.message = format!("not restored: {}", failed.join(", "));
            }
        } else if self.now_s().saturating_sub(st.started_at) > self.timeout_s() {
            st.state = SystemRestoreState::Error;
            st.message = format!(
                "gave up after {} s (system-backup-timeout) waiting for {}",
                self.timeout_s(),
                pending.join(", ")
            );
        }
        if st.state.finished() {
            tracing::info!(system_restore = %sr.metadata.name, state = st.state.as_str(), message = %st.message, "system restore finished");
        }
        self.set_sr(&sr.metadata.name, |x| {
            if x.status.state != SystemRestoreState::Restoring || x.status == st {
                return false;
            }
            x.status = st.clone();
            true
        })?;
        Ok(())
    }

    pub fn delete_system_restore(&self, name: &str) -> Result<SystemRestore, ApiError> {
        let sr = store::get::<SystemRestore>(&*self.store, name)?
            .ok_or_else(|| not_found("system restore", name))?;
        store::delete(&*self.store, &sr)?;
        Ok(sr)
    }
}

fn secrets_note(t: &TargetRecord) -> String {
    if t.secret_options.is_empty() {
        "restored".into()
    } else {
        format!("restored (set again: {})", t.secret_options.join(", "))
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(crate::ErrorKind::Internal, "Internal", e.to_string())
}

#[cfg(test)]
#[path = "system_backups_tests.rs"]
mod policy_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_round_trip_and_damage_is_named() {
        let d = Document {
            name: "sb".into(),
            created_at: 7,
            version: "0.1.0".into(),
            settings: [("a".to_string(), "1".to_string())].into(),
            ..Default::default()
        };
        let raw = d.encode().expect("encode");
        assert_eq!(Document::decode(&raw).expect("decode"), d);
        let mut bad = raw.clone();
        let last = bad.len() - 3;
        bad[last] ^= 1;
        assert!(
            Document::decode(&bad)
                .expect_err("damaged")
                .contains("checksum")
        );
        assert!(Document::decode(b"garbage").is_err());
        let v2 = String::from_utf8(raw)
            .expect("utf8")
            .replacen(" 1 ", " 2 ", 1);
        assert!(
            Document::decode(v2.as_bytes())
                .expect_err("v2")
                .contains("version 2")
        );
    }

    #[test]
    fn document_keys_do_not_share_prefixes() {
        assert_eq!(document_key("sb"), "system-backups/sb/system-backup.json");
        assert!(!document_key("sb-1").starts_with(&document_key("sb")));
    }
}
