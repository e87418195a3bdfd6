//! The manager itself: its state (store, token, clock, wake-ups), its start (status that only
//! live processes can confirm is reset), settings and their checks, and the error helpers the
//! services share. The services are `impl Manager` blocks in their own modules: `volumes`,
//! `nodes`, `reconcile`, `backups`, `revert`, `metrics`; pure policy is in `planner`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

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

/// A node's last heartbeat that changed nothing: an identical one with no store change since
/// gets the same answer without work.
pub(crate) struct LastBeat {
    /// The report's bytes.
    pub(crate) report: bytes::Bytes,
    /// The store's change count before it was applied.
    pub(crate) changes: u64,
    /// The answer's JSON.
    pub(crate) answer: bytes::Bytes,
}

pub struct Manager {
    pub store: Arc<dyn Store>,
    /// The same store, for what only the in-memory view knows (its change count).
    pub(crate) cache: Arc<crate::cache::Cached>,
    /// Per node: its last heartbeat and the answer, when applying it wrote nothing.
    pub(crate) beats: std::sync::Mutex<HashMap<String, LastBeat>>,
    pub token: String,
    /// The node of an all-in-one server: where `attach` goes when no node is named.
    pub local_node: Option<String>,
    pub(crate) reconciles: AtomicU64,
    pub(crate) reconcile_errors: AtomicU64,
    /// More metrics to append to `/metrics` (the built-in node of `zebu server`).
    pub(crate) extra_metrics: std::sync::OnceLock<Box<dyn Fn() -> String + Send + Sync>>,
    /// Backup targets asked to sync now.
    pub(crate) sync_requests: std::sync::Mutex<std::collections::BTreeSet<String>>,
    pub(crate) sync_notify: tokio::sync::Notify,
    /// Leases of failed backups to remove from their targets: (target, volume, backup).
    pub(crate) lease_cleanups:
        std::sync::Mutex<std::collections::BTreeSet<(String, String, String)>>,
    /// Unix seconds when this manager process started: no node is judged down before it has
    /// had a full node-down timeout to send fresh heartbeats.
    pub(crate) started: AtomicU64,
    /// A fixed clock for tests (0: the real one).
    pub(crate) clock: AtomicU64,
    /// Targets whose availability probe is running.
    pub(crate) probing: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    /// When each node last reported (Unix seconds), kept in memory: liveness is not written to
    /// the store on every heartbeat; only changes of state, address or disks are.
    pub(crate) last_seen: std::sync::Mutex<HashMap<String, u64>>,
    /// Per node: set when something the node must act on changed (its long-poll returns).
    pub(crate) wakes: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
    /// Backing images whose upload this process is streaming to a node.
    pub(crate) uploads: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// Checks a setting's value and returns it as stored (sizes in plain bytes); the error says
/// what the setting expects.
pub use crate::planner::{ReplicaPlan, good_copy, plan_replicas, robustness};

pub fn check_setting(name: &str, value: &str) -> Result<String, &'static str> {
    let size = || {
        value
            .parse::<zebu_types::ByteSize>()
            .map(|b| b.bytes())
            .ok()
    };
    let n = value.parse::<u64>().ok();
    let (ok, expected) = match name {
        "replica-soft-anti-affinity" | "offline-replica-rebuilding" => {
            (value == "true" || value == "false", "true or false")
        }
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
        // Every read is served from memory after the first; writes go through to the backend.
        let cache = Arc::new(crate::cache::Cached::new(store));
        let store: Arc<dyn Store> = cache.clone();
        let m = Arc::new(Manager {
            store,
            cache,
            beats: Default::default(),
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
            uploads: Default::default(),
            last_seen: std::sync::Mutex::new(HashMap::new()),
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

    /// When a node last reported to this process, if it has.
    pub(crate) fn seen(&self, node: &str) -> Option<u64> {
        self.last_seen.lock().ok()?.get(node).copied()
    }

    /// A node as the API shows it: `lastHeartbeat` from memory when this process heard it.
    pub fn node_view(&self, mut n: Node) -> Node {
        if let Some(t) = self.seen(&n.metadata.name) {
            n.status.last_heartbeat = n.status.last_heartbeat.max(t);
        }
        n
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

    pub(crate) fn up_nodes(&self) -> Result<Vec<Node>, ApiError> {
        Ok(store::list::<Node>(&*self.store)?
            .into_iter()
            .filter(|n| n.status.state == NodeState::Up)
            .collect())
    }
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
