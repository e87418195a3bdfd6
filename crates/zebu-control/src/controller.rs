//! The manager: API operations on desired state, the node heartbeat exchange, the engine's
//! replica events, and the level-triggered reconcile loop (node liveness, replica scheduling and
//! replacement, engine placement, volume state and robustness).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ApiError;
use crate::model::*;
use crate::store::{self, Store, StoreError};

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Compares secrets without an early exit.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads the API token from `DATA_DIR/api-token`, creating it (mode 0600) on first start.
pub fn load_or_create_token(data_dir: &Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = data_dir.join("api-token");
    match std::fs::read_to_string(&p) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    let tmp = data_dir.join("api-token.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &p)?;
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok(token)
}

pub struct Manager {
    pub store: Arc<dyn Store>,
    pub token: String,
    /// The node of an all-in-one server: where `attach` goes when no node is named.
    pub local_node: Option<String>,
    reconciles: AtomicU64,
    reconcile_errors: AtomicU64,
    /// More metrics to append to `/metrics` (the built-in node of `zebu server`).
    extra_metrics: std::sync::OnceLock<Box<dyn Fn() -> String + Send + Sync>>,
    /// Backup targets asked to sync now.
    pub(crate) sync_requests: std::sync::Mutex<std::collections::BTreeSet<String>>,
    pub(crate) sync_notify: tokio::sync::Notify,
    /// Leases of failed backups to remove from their targets: (target, volume, backup).
    pub(crate) lease_cleanups:
        std::sync::Mutex<std::collections::BTreeSet<(String, String, String)>>,
    /// Unix seconds when this manager process started: no node is judged down before it has
    /// had a full node-down timeout to send fresh heartbeats.
    started: AtomicU64,
    /// A fixed clock for tests (0: the real one).
    clock: AtomicU64,
    /// Targets whose availability probe is running.
    pub(crate) probing: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    /// Per node: set when something the node must act on changed (its long-poll returns).
    wakes: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
}

/// Whether a replica holds a complete copy of its volume: RW and not failed, or, while no
/// replica of the volume has ever joined an engine (a new volume), any replica not failed. A
/// replica scheduled as a replacement holds nothing until its rebuild makes it RW.
pub fn good_copy(r: &Replica, volume_replicas: &[Replica]) -> bool {
    if r.status.failed_at.is_some() || r.metadata.deletion_requested.is_some() {
        return false;
    }
    match r.status.mode {
        Some(m) => m == ReplicaMode::RW,
        None => volume_replicas
            .iter()
            .all(|o| o.status.mode.is_none() || o.metadata.deletion_requested.is_some()),
    }
}

/// A volume's robustness: while attached (or standby, with its engine running) from the
/// replica modes the engine reports, at once; otherwise `faulted` when no replica holds a
/// complete copy any more, else `unknown`.
pub fn robustness(v: &Volume, state: VolumeState, engine: bool, live: &[Replica]) -> Robustness {
    let good = live.iter().filter(|r| good_copy(r, live)).count() as u32;
    let followed = state == VolumeState::Attached || (v.spec.standby && engine);
    if followed {
        return match good {
            0 => Robustness::Faulted,
            g if g >= v.spec.replicas => Robustness::Healthy,
            _ => Robustness::Degraded,
        };
    }
    let had_data = live.iter().any(|r| r.status.mode.is_some());
    if good == 0 && had_data {
        Robustness::Faulted
    } else {
        Robustness::Unknown
    }
}

/// The node of a running complete copy on an up node (where an engine that serves no one, for a
/// rebuild or a revert of a detached volume, runs).
fn complete_copy_node(live: &[Replica], up: &dyn Fn(&str) -> bool) -> Option<String> {
    live.iter()
        .filter(|r| r.status.address.is_some() && up(&r.spec.node))
        .filter(|r| good_copy(r, live))
        .map(|r| r.spec.node.clone())
        .min()
}

/// What the manager does with one volume's replicas on one reconcile pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplicaPlan {
    /// Replicas to delete, with the reason.
    pub delete: Vec<(String, &'static str)>,
    /// Schedule one more replica.
    pub schedule: bool,
}

/// Plans a volume's replica set (a pure function of the objects and the time):
/// - a replica that failed longer ago than `wait` ("stale"), or sits on a node being evicted,
///   stops counting toward the volume's replica count, so a replacement is scheduled; it is kept
///   (a returning stale replica is reused by a delta rebuild) until the replicas that count hold
///   enough complete copies, and only then deleted;
/// - a replica whose store cannot be opened is deleted at once when another complete copy
///   exists;
/// - once enough complete copies count, extra replicas still rebuilding are deleted;
/// - nothing is deleted that would leave no complete copy.
pub fn plan_replicas(
    v: &Volume,
    live: &[Replica],
    nodes: &HashMap<String, Node>,
    t: u64,
    wait: u64,
) -> ReplicaPlan {
    let mut plan = ReplicaPlan::default();
    let good = |r: &Replica| good_copy(r, live);
    let any_good = live.iter().any(good);
    let evicting = |r: &Replica| nodes.get(&r.spec.node).is_some_and(|n| n.spec.evict);
    let broken = |r: &Replica| r.status.state == ReplicaState::Broken;
    let stale = |r: &Replica| {
        r.status
            .failed_at
            .is_some_and(|f| t.saturating_sub(f) > wait)
    };
    for r in live.iter().filter(|r| broken(r)) {
        if any_good {
            plan.delete
                .push((r.metadata.name.clone(), "its store cannot be opened"));
        }
    }
    let counted: Vec<&Replica> = live
        .iter()
        .filter(|r| !broken(r) && !stale(r) && !evicting(r))
        .collect();
    let want = v.spec.replicas as usize;
    if counted.len() < want {
        // A new replica needs a complete copy to be rebuilt from (or a volume that never held
        // data).
        plan.schedule = any_good || live.iter().all(|r| r.status.mode.is_none());
        return plan;
    }
    let counted_good = counted.iter().filter(|r| good(r)).count();
    if counted_good < want {
        return plan;
    }
    for r in live.iter().filter(|r| !broken(r)) {
        if evicting(r) {
            plan.delete
                .push((r.metadata.name.clone(), "its node is being evicted"));
        } else if stale(r) {
            plan.delete
                .push((r.metadata.name.clone(), "it did not return in time"));
        }
    }
    // More counted replicas than wanted (a stale one came back while its replacement was
    // rebuilding): the ones still rebuilding go.
    let mut extra = counted.len() - want;
    let mut rebuilding: Vec<&&Replica> = counted.iter().filter(|r| !good(r)).collect();
    rebuilding.sort_by_key(|r| std::cmp::Reverse(r.metadata.created));
    for r in rebuilding {
        if extra == 0 {
            break;
        }
        plan.delete
            .push((r.metadata.name.clone(), "an older copy returned"));
        extra -= 1;
    }
    plan
}

/// Checks a setting's value and returns it as stored (sizes in plain bytes); the error says
/// what the setting expects.
pub fn check_setting(name: &str, value: &str) -> Result<String, &'static str> {
    let size = || {
        value
            .parse::<zebu_types::ByteSize>()
            .map(|b| b.bytes())
            .ok()
    };
    let n = value.parse::<u64>().ok();
    let (ok, expected) = match name {
        "replica-soft-anti-affinity" => (value == "true" || value == "false", "true or false"),
        "backup-compression" => (
            zebu_backupstore::Codec::parse(value).is_some(),
            "zstd, lz4 or none",
        ),
        "backup-block-size" => {
            let v = size();
            return match v {
                Some(v) if v.is_power_of_two() && (65536..=16 << 20).contains(&v) => {
                    Ok(v.to_string())
                }
                _ => Err("a power of two from 64KiB to 16MiB, e.g. 2MiB"),
            };
        }
        "backup-bandwidth-limit" => {
            return size().map(|v| v.to_string()).ok_or(
                "bytes per second as a size such as 4MiB, 500KiB or 1048576 (0: unlimited)",
            );
        }
        "max-volume-size" => {
            return size()
                .filter(|v| *v >= 4096)
                .map(|v| v.to_string())
                .ok_or("a size of at least 4KiB, such as 16TiB or 1099511627776");
        }
        "backup-concurrency" => (
            n.is_some_and(|v| (1..=256).contains(&v)),
            "a whole number from 1 to 256",
        ),
        "failed-backup-ttl" => (n.is_some(), "a whole number of seconds (0: kept for ever)"),
        "engine-replica-timeout" => (
            n.is_some_and(|v| (1..=300).contains(&v)),
            "a whole number of seconds from 1 to 300",
        ),
        _ => (
            n.is_some_and(|v| v > 0),
            "a whole number of seconds greater than 0",
        ),
    };
    if ok {
        Ok(value.to_string())
    } else {
        Err(expected)
    }
}

pub(crate) fn conflict(code: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::conflict(code, msg)
}

pub(crate) fn not_found(kind: &str, name: &str) -> ApiError {
    ApiError::not_found(kind, name)
}

impl Manager {
    pub fn new(
        store: Arc<dyn Store>,
        token: String,
        local_node: Option<String>,
    ) -> Result<Arc<Manager>, StoreError> {
        let m = Arc::new(Manager {
            store,
            token,
            local_node,
            reconciles: AtomicU64::new(0),
            reconcile_errors: AtomicU64::new(0),
            extra_metrics: std::sync::OnceLock::new(),
            sync_requests: std::sync::Mutex::new(Default::default()),
            sync_notify: tokio::sync::Notify::new(),
            lease_cleanups: std::sync::Mutex::new(Default::default()),
            started: AtomicU64::new(now()),
            clock: AtomicU64::new(0),
            probing: Arc::new(std::sync::Mutex::new(Default::default())),
            wakes: std::sync::Mutex::new(HashMap::new()),
        });
        m.ensure_default_target()?;
        // What engines report is only known again after their nodes' next heartbeats.
        for e in store::list::<Engine>(&*m.store)? {
            store::modify::<Engine>(&*m.store, &e.metadata.name, |e| {
                let changed = e.status.state != EngineState::Starting
                    || e.status.nbd_uri.is_some()
                    || e.status.rw_replicas.is_some();
                e.status.state = EngineState::Starting;
                e.status.nbd_uri = None;
                e.status.rw_replicas = None;
                changed
            })?;
        }
        // Whether a volume is served is only known again once its engine reports: until then
        // it shows attaching, without an NBD URI from an earlier process.
        for v in store::list::<Volume>(&*m.store)? {
            if v.status.state == VolumeState::Attached || v.status.nbd_uri.is_some() {
                store::modify::<Volume>(&*m.store, &v.metadata.name, |v| {
                    let changed =
                        v.status.state == VolumeState::Attached || v.status.nbd_uri.is_some();
                    if v.status.state == VolumeState::Attached {
                        v.status.state = VolumeState::Attaching;
                        v.status.robustness = Robustness::Unknown;
                    }
                    v.status.nbd_uri = None;
                    changed
                })?;
            }
        }
        // Volumes made before the target was recorded at creation show the one they use.
        for v in store::list::<Volume>(&*m.store)? {
            if v.spec.backup_target.is_empty() {
                store::modify::<Volume>(&*m.store, &v.metadata.name, |v| {
                    let empty = v.spec.backup_target.is_empty();
                    if empty {
                        v.spec.backup_target = DEFAULT_TARGET.to_string();
                    }
                    empty
                })?;
            }
        }
        for (name, value, _) in SETTINGS {
            if store::get::<Setting>(&*m.store, name)?.is_none() {
                let s = Setting {
                    metadata: Meta {
                        name: name.to_string(),
                        ..Default::default()
                    },
                    value: value.to_string(),
                };
                match store::create(&*m.store, &s) {
                    Ok(_) | Err(StoreError::Exists { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(m)
    }

    /// Unix seconds, from the test clock when one is set.
    pub(crate) fn now_s(&self) -> u64 {
        match self.clock.load(Ordering::Relaxed) {
            0 => now(),
            t => t,
        }
    }

    /// Fixes the clock at `t` Unix seconds (tests; 0 goes back to the real clock). The first
    /// call also counts as the process start, for the node-down grace after a restart.
    pub fn set_clock(&self, t: u64) {
        if self.clock.swap(t, Ordering::Relaxed) == 0 {
            self.started.store(t, Ordering::Relaxed);
        }
    }

    pub(crate) fn setting(&self, name: &str) -> String {
        if let Ok(Some(s)) = store::get::<Setting>(&*self.store, name) {
            return s.value;
        }
        SETTINGS
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, v, _)| v.to_string())
            .unwrap_or_default()
    }

    pub(crate) fn setting_u64(&self, name: &str) -> u64 {
        self.setting(name).parse().unwrap_or(0)
    }

    pub fn settings(&self) -> Result<Vec<Setting>, ApiError> {
        Ok(store::list::<Setting>(&*self.store)?)
    }

    pub fn put_setting(&self, name: &str, value: &str) -> Result<Setting, ApiError> {
        let Some((_, _, _)) = SETTINGS.iter().find(|(n, _, _)| *n == name) else {
            return Err(not_found("setting", name));
        };
        let value = check_setting(name, value.trim()).map_err(|expected| {
            ApiError::bad(
                "InvalidSetting",
                format!("{value:?} is not a valid value for {name}: expected {expected}"),
            )
        })?;
        store::modify::<Setting>(&*self.store, name, |s| {
            let changed = s.value != value;
            s.value = value.clone();
            changed
        })?
        .ok_or_else(|| not_found("setting", name))
    }

    fn up_nodes(&self) -> Result<Vec<Node>, ApiError> {
        Ok(store::list::<Node>(&*self.store)?
            .into_iter()
            .filter(|n| n.status.state == NodeState::Up)
            .collect())
    }

    pub fn create_volume(&self, name: &str, size: u64, replicas: u32) -> Result<Volume, ApiError> {
        self.create_volume_from(name, Some(size), replicas, None, false)
    }

    /// Like [`Manager::create_volume_from`], with the backup target the volume uses.
    pub fn create_volume_with(
        &self,
        name: &str,
        size: Option<u64>,
        replicas: u32,
        from_backup: Option<&str>,
        backup_target: Option<&str>,
        standby: bool,
    ) -> Result<Volume, ApiError> {
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
        let mut v = self.create_volume_from(name, size, replicas, from_backup, standby)?;
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
        zebu_types::validate_name(name).map_err(|e| ApiError::bad("InvalidName", e.to_string()))?;
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
            self.stop_engine(&e, &nodes)?;
        }
        Ok(v)
    }

    /// Changes whether new replicas may go to a node, and whether it is being evicted (evicting
    /// also stops scheduling there).
    pub fn update_node(
        &self,
        name: &str,
        allow_scheduling: Option<bool>,
        evict: Option<bool>,
    ) -> Result<Node, ApiError> {
        store::get::<Node>(&*self.store, name)?.ok_or_else(|| not_found("node", name))?;
        let n = store::modify::<Node>(&*self.store, name, |n| {
            let before = n.spec.clone();
            if let Some(e) = evict {
                n.spec.evict = e;
                if e {
                    n.spec.allow_scheduling = false;
                }
            }
            if let Some(a) = allow_scheduling {
                n.spec.allow_scheduling = a;
            }
            n.spec != before
        })?
        .ok_or_else(|| not_found("node", name))?;
        tracing::info!(
            node = name,
            scheduling = n.spec.allow_scheduling,
            evict = n.spec.evict,
            "node updated"
        );
        Ok(n)
    }

    /// Deletes a node object. Refused while it holds replicas or runs engines; replicas on it
    /// that are already being deleted go with it (their files are on a machine that is gone).
    pub fn delete_node(&self, name: &str) -> Result<Node, ApiError> {
        let s = &*self.store;
        let n = store::get::<Node>(s, name)?.ok_or_else(|| not_found("node", name))?;
        let reps: Vec<Replica> = store::list::<Replica>(s)?
            .into_iter()
            .filter(|r| r.spec.node == name)
            .collect();
        let held: Vec<&str> = reps
            .iter()
            .filter(|r| r.metadata.deletion_requested.is_none())
            .map(|r| r.metadata.name.as_str())
            .collect();
        if !held.is_empty() {
            return Err(conflict(
                "NodeInUse",
                format!(
                    "node {name:?} holds replicas {}; evict it first (zebu node evict {name})",
                    held.join(", ")
                ),
            ));
        }
        let engines: Vec<String> = store::list::<Engine>(s)?
            .into_iter()
            .filter(|e| e.spec.node == name)
            .map(|e| e.spec.volume)
            .collect();
        if !engines.is_empty() {
            return Err(conflict(
                "NodeInUse",
                format!(
                    "node {name:?} runs the engines of volumes {}; detach them first",
                    engines.join(", ")
                ),
            ));
        }
        if n.status.state == NodeState::Up && !reps.is_empty() {
            return Err(conflict(
                "NodeInUse",
                format!("node {name:?} is still deleting replicas; try again when it is done"),
            ));
        }
        for r in &reps {
            match store::delete(s, r) {
                Ok(()) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        store::delete(s, &n)?;
        tracing::info!(node = name, "node deleted");
        Ok(n)
    }

    /// Records a node's report and answers with what it should run.
    pub fn heartbeat(&self, node: &str, hb: Heartbeat) -> Result<Assignments, ApiError> {
        let t = self.now_s();
        let status = |s: &mut NodeStatus| {
            let changed = s.state != NodeState::Up
                || s.address != hb.address
                || s.nbd_address != hb.nbd_address
                || s.disks != hb.disks;
            s.state = NodeState::Up;
            s.address = hb.address.clone();
            s.nbd_address = hb.nbd_address.clone();
            s.disks = hb.disks.clone();
            // Liveness is recorded at most once a second per node.
            let stale = t > s.last_heartbeat;
            s.last_heartbeat = t;
            changed || stale
        };
        match store::modify::<Node>(&*self.store, node, |n| status(&mut n.status))? {
            Some(_) => {}
            None => {
                let mut n = Node {
                    metadata: Meta {
                        name: node.to_string(),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                n.spec.allow_scheduling = true;
                status(&mut n.status);
                match store::create(&*self.store, &n) {
                    Ok(_) | Err(StoreError::Exists { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let reported: HashMap<&str, &ReplicaReport> =
            hb.replicas.iter().map(|r| (r.name.as_str(), r)).collect();
        for rr in &hb.replicas {
            store::modify::<Replica>(&*self.store, &rr.name, |r| {
                if r.spec.node != node {
                    return false;
                }
                let addr = Some(rr.address.clone());
                let changed = r.status.address != addr
                    || r.status.state != ReplicaState::Running
                    || r.status.flush_seq != rr.flush_seq;
                r.status.address = addr;
                r.status.state = ReplicaState::Running;
                r.status.flush_seq = rr.flush_seq;
                let changed = changed || !r.status.message.is_empty();
                r.status.message.clear();
                changed
            })?;
        }
        for ee in &hb.engine_errors {
            store::modify::<Engine>(&*self.store, &ee.volume, |e| {
                if e.spec.generation != ee.generation || e.spec.node != node {
                    return false;
                }
                let c = e.status.message != ee.message;
                e.status.message = ee.message.clone();
                c
            })?;
        }
        for b in &hb.broken_replicas {
            store::modify::<Replica>(&*self.store, &b.name, |r| {
                if r.spec.node != node {
                    return false;
                }
                let before = r.status.clone();
                if r.status.state != ReplicaState::Broken {
                    tracing::warn!(volume = %r.spec.volume, replica = %b.name, node, reason = %b.reason, "replica cannot be opened; replacing it");
                }
                r.status.state = ReplicaState::Broken;
                r.status.message = b.reason.clone();
                r.status.address = None;
                r.status.mode = Some(ReplicaMode::ERR);
                r.status.failed_at.get_or_insert(t);
                r.status != before
            })?;
        }
        for er in &hb.engines {
            let Some(e) = store::get::<Engine>(&*self.store, &er.volume)? else {
                continue;
            };
            if e.spec.generation != er.generation || e.spec.node != node {
                continue;
            }
            let rw = er
                .replicas
                .iter()
                .filter(|r| r.mode == ReplicaMode::RW)
                .count() as u32;
            store::modify::<Engine>(&*self.store, &er.volume, |e| {
                let uri = Some(er.nbd_uri.clone());
                let changed = e.status.state != EngineState::Running
                    || e.status.nbd_uri != uri
                    || e.status.rw_replicas != Some(rw)
                    || !e.status.message.is_empty();
                e.status.state = EngineState::Running;
                e.status.nbd_uri = uri;
                e.status.rw_replicas = Some(rw);
                e.status.message.clear();
                changed
            })?;
            for rm in &er.replicas {
                self.record_mode(
                    &rm.name,
                    &er.volume,
                    rm.mode,
                    Some((rm.rebuild_copied, rm.rebuild_skipped, rm.rebuild_total)),
                )?;
            }
            // A replica the engine should have but does not (after a restart it took another
            // one as the source and has not rebuilt this one yet) is not a healthy copy.
            for want in &e.spec.replicas {
                if er.replicas.iter().any(|r| r.name == want.name) {
                    continue;
                }
                let rw = store::get::<Replica>(&*self.store, &want.name)?
                    .is_some_and(|r| r.status.mode == Some(ReplicaMode::RW));
                if rw {
                    self.record_mode(&want.name, &er.volume, ReplicaMode::ERR, None)?;
                }
            }
        }
        for er in &hb.engines {
            if let Some(r) = &er.restore {
                self.restore_report(&er.volume, r, &er.snapshots)?;
            }
            let current = store::get::<Engine>(&*self.store, &er.volume)?
                .is_some_and(|e| e.spec.generation == er.generation && e.spec.node == node);
            if let Some(r) = &er.revert
                && current
            {
                self.revert_report(er, r)?;
            }
        }
        self.backup_reports(node, &hb.backups)?;
        // Snapshots as the engines report them.
        let snaps = store::list::<Snapshot>(&*self.store)?;
        for er in &hb.engines {
            for sn in snaps.iter().filter(|x| x.spec.volume == er.volume) {
                let found = er.snapshots.iter().find(|i| i.name == sn.spec.name);
                match (found, sn.metadata.deletion_requested) {
                    (None, Some(_)) => match store::delete(&*self.store, sn) {
                        Ok(())
                        | Err(StoreError::NotFound { .. })
                        | Err(StoreError::Conflict { .. }) => {}
                        Err(e) => return Err(e.into()),
                    },
                    (Some(i), _) => {
                        store::modify::<Snapshot>(&*self.store, &sn.metadata.name, |x| {
                            let st = SnapshotStatus {
                                ready: true,
                                created: i.created,
                                parent: i.parent.clone(),
                                user_created: i.user_created,
                                size: i.size,
                            };
                            let changed = x.status != st;
                            x.status = st;
                            changed
                        })?;
                    }
                    (None, None) => {}
                }
            }
        }
        let mut a = Assignments {
            backups: self.backup_orders(node)?,
            ..Default::default()
        };
        for sn in &snaps {
            let here = store::get::<Engine>(&*self.store, &sn.spec.volume)?
                .is_some_and(|e| e.spec.node == node && e.metadata.deletion_requested.is_none());
            if here {
                a.snapshots.push(SnapshotOp {
                    volume: sn.spec.volume.clone(),
                    name: sn.spec.name.clone(),
                    delete: sn.metadata.deletion_requested.is_some(),
                });
            }
        }
        for r in store::list::<Replica>(&*self.store)? {
            if r.spec.node != node {
                continue;
            }
            if r.metadata.deletion_requested.is_some() {
                let on_disk = reported.contains_key(r.metadata.name.as_str())
                    || hb.broken_replicas.iter().any(|b| b.name == r.metadata.name);
                if on_disk {
                    a.delete_replicas.push(r.metadata.name.clone());
                } else {
                    // The node no longer has it: the deletion is complete.
                    match store::delete(&*self.store, &r) {
                        Ok(())
                        | Err(StoreError::NotFound { .. })
                        | Err(StoreError::Conflict { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                continue;
            }
            a.replicas.push(ReplicaAssignment {
                name: r.metadata.name.clone(),
                volume: r.spec.volume.clone(),
                disk: r.spec.disk.clone(),
                size: r.spec.size,
            });
        }
        for e in store::list::<Engine>(&*self.store)? {
            if e.spec.node != node {
                continue;
            }
            if e.metadata.deletion_requested.is_some() {
                // Stopped once the node no longer reports it.
                if !hb
                    .engines
                    .iter()
                    .any(|r| r.volume == e.spec.volume && r.generation == e.spec.generation)
                {
                    match store::delete(&*self.store, &e) {
                        Ok(())
                        | Err(StoreError::NotFound { .. })
                        | Err(StoreError::Conflict { .. }) => {}
                        Err(err) => return Err(err.into()),
                    }
                }
                continue;
            }
            if !hb
                .engines
                .iter()
                .any(|r| r.volume == e.spec.volume && r.generation == e.spec.generation)
            {
                // Assigned but not (or no longer) running there, e.g. after the node restarted.
                store::modify::<Engine>(&*self.store, &e.metadata.name, |e| {
                    let changed =
                        e.status.state != EngineState::Starting || e.status.nbd_uri.is_some();
                    e.status.state = EngineState::Starting;
                    e.status.nbd_uri = None;
                    changed
                })?;
            }
            let mut spec = e.spec;
            if let Some(r) = spec.restore.as_mut() {
                // Stored orders carry no credentials; the node gets them here only.
                if let Ok(t) = self.target_ref(&r.target.name) {
                    r.target.options = t.options;
                }
            }
            a.engines.push(spec);
        }
        Ok(a)
    }

    pub(crate) fn record_mode(
        &self,
        replica: &str,
        volume: &str,
        mode: ReplicaMode,
        rebuild: Option<(u64, u64, u64)>,
    ) -> Result<Option<Replica>, ApiError> {
        Ok(store::modify::<Replica>(&*self.store, replica, |r| {
            if r.spec.volume != volume {
                return false;
            }
            let before = r.status.clone();
            r.status.mode = Some(mode);
            match mode {
                ReplicaMode::RW => r.status.failed_at = None,
                ReplicaMode::ERR | ReplicaMode::WO => {
                    if r.status.failed_at.is_none() {
                        r.status.failed_at = Some(now());
                    }
                }
            }
            if let Some((c, s, t)) = rebuild {
                r.status.rebuild_copied = c;
                r.status.rebuild_skipped = s;
                r.status.rebuild_total = t;
            }
            r.status != before
        })?)
    }

    /// An engine reports a membership change; it is durable when this returns.
    pub fn replica_event(&self, ev: &ReplicaEvent) -> Result<Replica, ApiError> {
        let e = store::get::<Engine>(&*self.store, &ev.volume)?;
        if e.as_ref()
            .is_none_or(|e| e.spec.generation != ev.generation)
        {
            return Err(conflict(
                "Fenced",
                format!(
                    "engine generation {} of volume {:?} is not current",
                    ev.generation, ev.volume
                ),
            ));
        }
        if ev.mode == ReplicaMode::ERR {
            tracing::warn!(volume = %ev.volume, replica = %ev.replica, reason = %ev.reason, "replica failed");
        }
        // A replica already deleted has left the volume for good: nothing to record, and the
        // engine must not wait for it.
        Ok(self
            .record_mode(&ev.replica, &ev.volume, ev.mode, None)?
            .unwrap_or_else(|| Replica {
                metadata: Meta {
                    name: ev.replica.clone(),
                    deletion_requested: Some(self.now_s()),
                    ..Default::default()
                },
                spec: ReplicaSpec {
                    volume: ev.volume.clone(),
                    ..Default::default()
                },
                status: ReplicaStatus {
                    mode: Some(ev.mode),
                    state: ReplicaState::Deleted,
                    ..Default::default()
                },
            }))
    }

    fn wake_handle(&self, node: &str) -> Option<Arc<tokio::sync::Notify>> {
        let mut w = self.wakes.lock().ok()?;
        Some(w.entry(node.to_string()).or_default().clone())
    }

    /// Tells a node's long-poll that it has work (a permit is kept if it is not waiting).
    pub fn wake_node(&self, node: &str) {
        if let Some(n) = self.wake_handle(node) {
            n.notify_one();
        }
    }

    /// Waits until the node has work or `timeout` passes; returns whether it was woken.
    pub async fn wait_for_work(&self, node: &str, timeout: Duration) -> bool {
        let Some(n) = self.wake_handle(node) else {
            return false;
        };
        tokio::time::timeout(timeout, n.notified()).await.is_ok()
    }

    /// Wakes the node an object change concerns: the node of an engine or replica, or of the
    /// engine of a snapshot's or new backup's volume.
    pub async fn run_wakeups(self: Arc<Self>) {
        let mut events = self.store.watch();
        loop {
            let ev = match events.recv().await {
                Ok(ev) => ev,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            };
            if ev.deleted {
                continue;
            }
            let s = &*self.store;
            let engine_node = |vol: &str| {
                store::get::<Engine>(s, vol)
                    .ok()
                    .flatten()
                    .map(|e| e.spec.node)
            };
            let node = match ev.kind.as_str() {
                "engine" => engine_node(&ev.name),
                "replica" => store::get::<Replica>(s, &ev.name)
                    .ok()
                    .flatten()
                    .map(|r| r.spec.node),
                "snapshot" => store::get::<Snapshot>(s, &ev.name)
                    .ok()
                    .flatten()
                    .and_then(|x| engine_node(&x.spec.volume)),
                "backup" => store::get::<Backup>(s, &ev.name)
                    .ok()
                    .flatten()
                    .filter(|b| b.status.state == BackupState::New)
                    .and_then(|b| engine_node(&b.spec.volume)),
                _ => None,
            };
            if let Some(n) = node {
                self.wake_node(&n);
            }
        }
    }

    /// Runs the reconcile loop until the process ends: on every store change and every 500 ms.
    pub async fn run(self: Arc<Self>) {
        let mut events = self.store.watch();
        loop {
            self.reconciles.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.reconcile() {
                self.reconcile_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e.message, "reconcile failed");
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), events.recv()).await;
            // Coalesce bursts.
            while events.try_recv().is_ok() {}
        }
    }

    /// One pass over every object.
    pub fn reconcile(&self) -> Result<(), ApiError> {
        let t = self.now_s();
        let s = &*self.store;
        let down_after = self.setting_u64("node-down-timeout");
        for n in store::list::<Node>(s)? {
            // Heartbeats missed while this manager was not running do not count against a node.
            let heard = n
                .status
                .last_heartbeat
                .max(self.started.load(Ordering::Relaxed));
            if n.status.state == NodeState::Up && t.saturating_sub(heard) > down_after {
                tracing::warn!(node = %n.metadata.name, "node missed its heartbeats; marking it down");
                store::modify::<Node>(s, &n.metadata.name, |n| {
                    let c = n.status.state != NodeState::Down;
                    n.status.state = NodeState::Down;
                    c
                })?;
            }
        }
        let nodes: HashMap<String, Node> = store::list::<Node>(s)?
            .into_iter()
            .map(|n| (n.metadata.name.clone(), n))
            .collect();
        let replicas = store::list::<Replica>(s)?;
        let engines: HashMap<String, Engine> = store::list::<Engine>(s)?
            .into_iter()
            .map(|e| (e.spec.volume.clone(), e))
            .collect();
        let volumes = store::list::<Volume>(s)?;
        let wait = self.setting_u64("replica-replenishment-wait-interval");
        let soft = self.setting("replica-soft-anti-affinity") == "true";
        for v in &volumes {
            let name = v.metadata.name.clone();
            let vreps: Vec<&Replica> = replicas.iter().filter(|r| r.spec.volume == name).collect();
            // Replicas on nodes that are down count as failed.
            for r in &vreps {
                let up = nodes
                    .get(&r.spec.node)
                    .is_some_and(|n| n.status.state == NodeState::Up);
                if !up && r.metadata.deletion_requested.is_none() {
                    store::modify::<Replica>(s, &r.metadata.name, |r| {
                        let before = r.status.clone();
                        r.status.state = ReplicaState::Stopped;
                        if r.status.failed_at.is_none() {
                            r.status.failed_at = Some(t);
                        }
                        if r.status.mode == Some(ReplicaMode::RW) {
                            r.status.mode = Some(ReplicaMode::ERR);
                        }
                        r.status != before
                    })?;
                }
            }
            let vreps: Vec<Replica> = store::list::<Replica>(s)?
                .into_iter()
                .filter(|r| r.spec.volume == name)
                .collect();
            if v.metadata.deletion_requested.is_some() {
                if let Some(e) = engines.get(&name) {
                    self.stop_engine(e, &nodes)?;
                    continue;
                }
                for r in &vreps {
                    if r.metadata.deletion_requested.is_none() {
                        store::modify::<Replica>(s, &r.metadata.name, |r| {
                            r.metadata.deletion_requested = Some(t);
                            true
                        })?;
                    }
                }
                if vreps.is_empty() {
                    for sn in store::list::<Snapshot>(s)?
                        .iter()
                        .filter(|x| x.spec.volume == name)
                    {
                        let _ = store::delete(s, sn);
                    }
                    tracing::info!(volume = %name, "volume deleted");
                    match store::delete(s, v) {
                        Ok(())
                        | Err(StoreError::NotFound { .. })
                        | Err(StoreError::Conflict { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                continue;
            }
            let live: Vec<Replica> = vreps
                .iter()
                .filter(|r| r.metadata.deletion_requested.is_none())
                .cloned()
                .collect();
            let plan = plan_replicas(v, &live, &nodes, t, wait);
            for (r, why) in &plan.delete {
                tracing::warn!(volume = %name, replica = %r, reason = why, "deleting replica");
                store::modify::<Replica>(s, r, |r| {
                    let fresh = r.metadata.deletion_requested.is_none();
                    r.metadata.deletion_requested.get_or_insert(t);
                    fresh
                })?;
            }
            let live: Vec<Replica> = live
                .into_iter()
                .filter(|r| !plan.delete.iter().any(|(d, _)| d == &r.metadata.name))
                .collect();
            if plan.schedule {
                self.schedule_replica(v, &live, &nodes, soft)?;
            }
            // Expansion of a detached volume reaches its replicas.
            for r in &live {
                if r.spec.size < v.spec.size {
                    store::modify::<Replica>(s, &r.metadata.name, |r| {
                        r.spec.size = v.spec.size;
                        true
                    })?;
                }
            }
            self.reconcile_engine(v, &live, engines.get(&name), &nodes)?;
            self.update_volume_status(v, &live)?;
            self.reconcile_activation(v)?;
        }
        for e in engines.values() {
            if !volumes.iter().any(|v| v.metadata.name == e.spec.volume) {
                self.stop_engine(e, &nodes)?;
            }
        }
        self.reconcile_backups()?;
        Ok(())
    }

    /// Asks the engine's node to stop it; the object goes when the node confirms, or at once when
    /// the node is down (a newer generation fences it anyway).
    fn stop_engine(&self, e: &Engine, nodes: &HashMap<String, Node>) -> Result<(), ApiError> {
        let s = &*self.store;
        let up = nodes
            .get(&e.spec.node)
            .is_some_and(|n| n.status.state == NodeState::Up);
        if !up {
            match store::delete(s, e) {
                Ok(()) | Err(StoreError::NotFound { .. }) | Err(StoreError::Conflict { .. }) => {}
                Err(err) => return Err(err.into()),
            }
            return Ok(());
        }
        if e.metadata.deletion_requested.is_none() {
            tracing::info!(volume = %e.spec.volume, node = %e.spec.node, "stopping engine");
            store::modify::<Engine>(s, &e.metadata.name, |e| {
                e.metadata.deletion_requested = Some(now());
                true
            })?;
        }
        Ok(())
    }

    fn schedule_replica(
        &self,
        v: &Volume,
        live: &[Replica],
        nodes: &HashMap<String, Node>,
        soft: bool,
    ) -> Result<(), ApiError> {
        let s = &*self.store;
        let all = store::list::<Replica>(s)?;
        // Bytes already promised per disk.
        let mut scheduled: HashMap<(String, String), u64> = HashMap::new();
        for r in &all {
            *scheduled
                .entry((r.spec.node.clone(), r.spec.disk.clone()))
                .or_default() += r.spec.size;
        }
        let mut best: Option<(bool, u64, String, String)> = None;
        for n in nodes.values() {
            if n.status.state != NodeState::Up || !n.spec.allow_scheduling {
                continue;
            }
            let has = live.iter().any(|r| r.spec.node == n.metadata.name);
            if has && !soft {
                continue;
            }
            for d in &n.status.disks {
                let used = scheduled
                    .get(&(n.metadata.name.clone(), d.path.clone()))
                    .copied()
                    .unwrap_or(0);
                // Thin provisioning: allow scheduling up to twice the disk's capacity.
                if used + v.spec.size > d.capacity.saturating_mul(2) {
                    continue;
                }
                let free = d.capacity.saturating_mul(2) - used - v.spec.size;
                let cand = (!has, free, n.metadata.name.clone(), d.path.clone());
                if best.as_ref().is_none_or(|b| (cand.0, cand.1) > (b.0, b.1)) {
                    best = Some(cand);
                }
            }
        }
        let Some((_, _, node, disk)) = best else {
            store::modify::<Volume>(s, &v.metadata.name, |v| {
                let msg = "no node with room for another replica".to_string();
                let c = v.status.message != msg;
                v.status.message = msg;
                c
            })?;
            return Ok(());
        };
        let r = Replica {
            metadata: Meta {
                name: format!("{}-r-{:08x}", v.metadata.name, rand::random::<u32>()),
                ..Default::default()
            },
            spec: ReplicaSpec {
                volume: v.metadata.name.clone(),
                node: node.clone(),
                disk,
                size: v.spec.size,
            },
            status: ReplicaStatus {
                state: ReplicaState::Pending,
                ..Default::default()
            },
        };
        tracing::info!(volume = %v.metadata.name, replica = %r.metadata.name, %node, "scheduled replica");
        store::create(s, &r)?;
        Ok(())
    }

    fn engine_replicas(
        &self,
        live: &[Replica],
        nodes: &HashMap<String, Node>,
    ) -> Vec<EngineReplica> {
        let mut out: Vec<EngineReplica> = live
            .iter()
            .filter_map(|r| {
                r.status.address.as_ref().map(|a| EngineReplica {
                    name: r.metadata.name.clone(),
                    address: a.clone(),
                    candidate: good_copy(r, live),
                })
            })
            .collect();
        if !out.is_empty() && !out.iter().any(|e| e.candidate) {
            // Salvage: every replica failed. Start from the freshest one whose node is up.
            let fresh = live
                .iter()
                .filter(|r| r.status.address.is_some())
                // A replica that never joined an engine holds nothing to salvage.
                .filter(|r| r.status.mode.is_some() && r.status.state != ReplicaState::Broken)
                .filter(|r| {
                    nodes
                        .get(&r.spec.node)
                        .is_some_and(|n| n.status.state == NodeState::Up)
                })
                .max_by_key(|r| r.status.flush_seq);
            if let Some(f) = fresh {
                tracing::warn!(volume = %f.spec.volume, replica = %f.metadata.name, "salvaging from the freshest replica");
                for e in out.iter_mut() {
                    e.candidate = e.name == f.metadata.name;
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Where the volume's engine should run: the node it is attached to, or while it is being
    /// restored, the all-in-one node or a node holding one of its replicas.
    fn engine_node(
        &self,
        v: &Volume,
        restore: Option<&RestoreOrder>,
        live: &[Replica],
        nodes: &HashMap<String, Node>,
    ) -> Option<String> {
        if v.spec.node.is_some() {
            return v.spec.node.clone();
        }
        let up = |n: &str| {
            nodes
                .get(n)
                .is_some_and(|n| n.status.state == NodeState::Up)
        };
        let Some(order) = restore else {
            if v.spec.revert.is_some() {
                return complete_copy_node(live, &up);
            }
            return self.offline_rebuild_node(v, live, &up);
        };
        // A restore that failed is not retried until there is another backup to restore.
        let failed =
            v.status.restore.as_ref().is_some_and(|r| {
                r.state == RestoreState::Error && r.requested_backup == order.backup
            });
        if failed {
            return None;
        }
        if let Some(l) = &self.local_node
            && up(l)
        {
            return Some(l.clone());
        }
        live.iter()
            .filter(|r| r.status.address.is_some() && up(&r.spec.node))
            .map(|r| r.spec.node.clone())
            .min()
    }

    /// Where a detached volume's replicas are rebuilt without an attach (the
    /// `offline-replica-rebuilding` setting): the node of a complete copy, while a replica that
    /// is not one runs on an up node.
    fn offline_rebuild_node(
        &self,
        v: &Volume,
        live: &[Replica],
        up: &dyn Fn(&str) -> bool,
    ) -> Option<String> {
        if v.spec.standby
            || v.metadata.deletion_requested.is_some()
            || !crate::backups::restore_done(v)
            || self.setting("offline-replica-rebuilding") != "true"
        {
            return None;
        }
        let running = |r: &&Replica| r.status.address.is_some() && up(&r.spec.node);
        let needs = live
            .iter()
            .filter(running)
            .any(|r| !good_copy(r, live) && r.status.state != ReplicaState::Broken);
        if !needs {
            return None;
        }
        complete_copy_node(live, up)
    }

    fn reconcile_engine(
        &self,
        v: &Volume,
        live: &[Replica],
        engine: Option<&Engine>,
        nodes: &HashMap<String, Node>,
    ) -> Result<(), ApiError> {
        let s = &*self.store;
        let restore = self.restore_order(v);
        let want = self.engine_node(v, restore.as_ref(), live, nodes);
        // Served over NBD only when attached (not while restoring or rebuilding offline).
        let frontend = restore.is_none() && v.spec.node.is_some();
        match (&want, engine) {
            (Some(node), None) => {
                let reps = self.engine_replicas(live, nodes);
                if !reps.iter().any(|r| r.candidate) {
                    return Ok(()); // no replica running yet
                }
                let generation = s.next("engine-generation")?;
                let e = Engine {
                    metadata: Meta {
                        name: v.metadata.name.clone(),
                        ..Default::default()
                    },
                    spec: EngineSpec {
                        volume: v.metadata.name.clone(),
                        node: node.clone(),
                        size: v.spec.size,
                        generation,
                        replicas: reps,
                        frontend,
                        restore,
                        replica_timeout: self.setting_u64("engine-replica-timeout"),
                        revert: v.spec.revert.clone(),
                    },
                    status: EngineStatus {
                        state: EngineState::Starting,
                        ..Default::default()
                    },
                };
                tracing::info!(volume = %v.metadata.name, %node, generation, "starting engine");
                match store::create(s, &e) {
                    Ok(_) | Err(StoreError::Exists { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            (_, Some(e)) if e.metadata.deletion_requested.is_some() => {
                self.stop_engine(e, nodes)?;
            }
            (Some(node), Some(e)) if &e.spec.node != node => {
                self.stop_engine(e, nodes)?;
            }
            (Some(_), Some(e))
                if e.status.state == EngineState::Running
                    && e.status.rw_replicas == Some(0)
                    && !live.is_empty()
                    && !live.iter().any(|r| good_copy(r, live))
                    && self
                        .engine_replicas(live, nodes)
                        .iter()
                        .any(|r| r.candidate) =>
            {
                // Every replica left the running engine's set; it cannot rebuild one from
                // nothing. A new session starts from the freshest reachable replica (salvage).
                tracing::warn!(volume = %v.metadata.name, "engine has no healthy replica; restarting it to salvage");
                self.stop_engine(e, nodes)?;
            }
            (Some(_), Some(e)) => {
                let grown = e.spec.size < v.spec.size;
                if e.spec.restore != restore
                    || e.spec.frontend != frontend
                    || grown
                    || e.spec.revert != v.spec.revert
                {
                    store::modify::<Engine>(s, &e.metadata.name, |e| {
                        e.spec.frontend = frontend;
                        e.spec.restore = restore.clone();
                        e.spec.size = e.spec.size.max(v.spec.size);
                        e.spec.revert = v.spec.revert.clone();
                        true
                    })?;
                }
                let reps = self.engine_replicas(live, nodes);
                // The set only grows by rebuilds the engine runs itself; names leaving the spec
                // are removed from the engine.
                if reps.iter().map(|r| (&r.name, &r.address)).ne(e
                    .spec
                    .replicas
                    .iter()
                    .map(|r| (&r.name, &r.address)))
                {
                    store::modify::<Engine>(s, &e.metadata.name, |e| {
                        // Keep the candidate flags the engine started with; they matter only at start.
                        let old: HashMap<String, bool> = e
                            .spec
                            .replicas
                            .iter()
                            .map(|r| (r.name.clone(), r.candidate))
                            .collect();
                        e.spec.replicas = reps
                            .iter()
                            .map(|r| EngineReplica {
                                candidate: old.get(&r.name).copied().unwrap_or(false),
                                ..r.clone()
                            })
                            .collect();
                        true
                    })?;
                }
            }
            (None, Some(e)) => {
                self.stop_engine(e, nodes)?;
            }
            (None, None) => {}
        }
        Ok(())
    }

    fn update_volume_status(&self, v: &Volume, live: &[Replica]) -> Result<(), ApiError> {
        let s = &*self.store;
        let engine = store::get::<Engine>(s, &v.metadata.name)?;
        let node_up = |n: &str| {
            store::get::<Node>(s, n)
                .ok()
                .flatten()
                .is_some_and(|n| n.status.state == NodeState::Up)
        };
        let running = engine.as_ref().is_some_and(|e| {
            e.status.state == EngineState::Running
                && e.metadata.deletion_requested.is_none()
                && node_up(&e.spec.node)
        });
        let restoring = !crate::backups::restore_done(v);
        let state = match (&v.spec.node, &engine) {
            _ if restoring => VolumeState::Creating,
            (None, Some(_)) if v.spec.standby => VolumeState::Detached,
            // An engine rebuilding a detached volume's replicas serves no one.
            (None, Some(e)) if !e.spec.frontend => VolumeState::Detached,
            (Some(_), Some(_)) if running => VolumeState::Attached,
            (Some(_), _) => VolumeState::Attaching,
            (None, Some(_)) => VolumeState::Detaching,
            (None, None) => {
                let all_running = live.len() as u32 >= v.spec.replicas
                    && live.iter().all(|r| r.status.address.is_some());
                if all_running || v.status.state != VolumeState::Creating {
                    VolumeState::Detached
                } else {
                    VolumeState::Creating
                }
            }
        };
        let robustness = robustness(v, state, engine.is_some(), live);
        let nbd_uri = if state == VolumeState::Attached {
            engine.as_ref().and_then(|e| e.status.nbd_uri.clone())
        } else {
            None
        };
        let node = if state == VolumeState::Attached {
            v.spec.node.clone()
        } else {
            None
        };
        // A standby volume's last backup is its source's newest.
        let followed = if v.spec.standby {
            &v.spec.backup_volume
        } else {
            &v.metadata.name
        };
        let bv = store::get::<BackupVolume>(
            s,
            &format!("{}.{followed}", crate::backups::volume_target(v)),
        )?;
        let (last_backup, last_backup_at) = bv
            .map(|b| (b.status.last_backup, b.status.last_backup_at))
            .unwrap_or_default();
        // Why a volume waits: its engine cannot start on its node.
        let waiting_for = engine
            .as_ref()
            .filter(|e| e.status.state != EngineState::Running && !e.status.message.is_empty())
            .map(|e| {
                format!(
                    "engine on node {:?} cannot start: {}",
                    e.spec.node, e.status.message
                )
            });
        store::modify::<Volume>(s, &v.metadata.name, |v| {
            let before = v.status.clone();
            v.status.state = state;
            v.status.last_backup = last_backup.clone();
            v.status.last_backup_at = last_backup_at;
            v.status.robustness = robustness;
            v.status.nbd_uri = nbd_uri.clone();
            v.status.node = node.clone();
            if live.len() as u32 >= v.spec.replicas {
                v.status.message.clear();
            }
            if let Some(m) = &waiting_for {
                v.status.message = m.clone();
            } else if v.status.message.starts_with("engine on node ") {
                v.status.message.clear();
            }
            v.status != before
        })?;
        Ok(())
    }

    /// Adds a source of metrics served with the manager's own.
    pub fn add_metrics(&self, f: Box<dyn Fn() -> String + Send + Sync>) {
        let _ = self.extra_metrics.set(f);
    }

    /// Prometheus text for the manager (and the built-in node, if any).
    pub fn metrics_text(&self) -> String {
        let mut o = self.own_metrics();
        if let Some(f) = self.extra_metrics.get() {
            o.push_str(&f());
        }
        o
    }

    fn own_metrics(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP zebu_reconcile_total Reconcile passes run by the manager."
        );
        let _ = writeln!(o, "# TYPE zebu_reconcile_total counter");
        let _ = writeln!(
            o,
            "zebu_reconcile_total {}",
            self.reconciles.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP zebu_reconcile_errors_total Reconcile passes that failed."
        );
        let _ = writeln!(o, "# TYPE zebu_reconcile_errors_total counter");
        let _ = writeln!(
            o,
            "zebu_reconcile_errors_total {}",
            self.reconcile_errors.load(Ordering::Relaxed)
        );
        let s = &*self.store;
        if let Ok(vols) = store::list::<Volume>(s) {
            let _ = writeln!(
                o,
                "# HELP zebu_volume_robustness Volume robustness (1 for the current value)."
            );
            let _ = writeln!(o, "# TYPE zebu_volume_robustness gauge");
            for v in &vols {
                for (r, label) in [
                    (Robustness::Healthy, "healthy"),
                    (Robustness::Degraded, "degraded"),
                    (Robustness::Faulted, "faulted"),
                    (Robustness::Unknown, "unknown"),
                ] {
                    let _ = writeln!(
                        o,
                        "zebu_volume_robustness{{volume=\"{}\",robustness=\"{label}\"}} {}",
                        v.metadata.name,
                        u8::from(v.status.robustness == r)
                    );
                }
            }
        }
        if let Ok(reps) = store::list::<Replica>(s) {
            let _ = writeln!(
                o,
                "# HELP zebu_replica_mode Replica mode as the engine reports it (1 for the current value)."
            );
            let _ = writeln!(o, "# TYPE zebu_replica_mode gauge");
            let _ = writeln!(
                o,
                "# HELP zebu_replica_rebuild_copied_bytes Bytes copied by the replica's last rebuild."
            );
            let _ = writeln!(o, "# TYPE zebu_replica_rebuild_copied_bytes gauge");
            for r in &reps {
                for (m, label) in [
                    (ReplicaMode::RW, "RW"),
                    (ReplicaMode::WO, "WO"),
                    (ReplicaMode::ERR, "ERR"),
                ] {
                    let _ = writeln!(
                        o,
                        "zebu_replica_mode{{volume=\"{}\",replica=\"{}\",mode=\"{label}\"}} {}",
                        r.spec.volume,
                        r.metadata.name,
                        u8::from(r.status.mode == Some(m))
                    );
                }
                let _ = writeln!(
                    o,
                    "zebu_replica_rebuild_copied_bytes{{volume=\"{}\",replica=\"{}\"}} {}",
                    r.spec.volume, r.metadata.name, r.status.rebuild_copied
                );
            }
        }
        o
    }
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
