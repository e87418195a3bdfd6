//! The control plane's object model: Kubernetes-shaped objects (metadata, spec, status) for nodes,
//! volumes, engines, replicas, settings, backup targets, backup volumes and backups. Field names
//! are camelCase on the wire.
//!
//! Over 800 lines on purpose: the whole wire contract (objects and node messages) reads in one file.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Metadata every object carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    pub name: String,
    #[serde(default)]
    pub uid: String,
    /// Changes on every write; updates must name the version they read (compare-and-swap).
    #[serde(default)]
    pub resource_version: u64,
    /// Bumped when the spec changes.
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// Unix seconds when a delete was requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_requested: Option<u64>,
}

/// Whether a node's agent reports in time (empty until its first heartbeat).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    #[default]
    #[serde(rename = "")]
    Unknown,
    Up,
    Down,
}

/// Where a replica's process stands (its mode in the engine is [`ReplicaMode`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Scheduled, not running yet.
    #[default]
    #[serde(alias = "")]
    Pending,
    Running,
    /// Its node is down.
    Stopped,
    /// Its node cannot open its store (`status.message` says why).
    Broken,
    /// Deleted (an answer to an event for a replica already gone).
    Deleted,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineState {
    /// Assigned; its node has not reported it running (yet, or since a restart).
    #[default]
    #[serde(alias = "")]
    Starting,
    Running,
    Failed,
}

/// Where a restore from a backup stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreState {
    #[default]
    #[serde(alias = "")]
    Restoring,
    Completed,
    Error,
}

/// An object stored by kind and name.
pub trait Object: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    const KIND: &'static str;
    fn meta(&self) -> &Meta;
    fn meta_mut(&mut self) -> &mut Meta;
}

macro_rules! object {
    ($t:ty, $kind:literal) => {
        impl Object for $t {
            const KIND: &'static str = $kind;
            fn meta(&self) -> &Meta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut Meta {
                &mut self.metadata
            }
        }
    };
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    #[default]
    Creating,
    Detached,
    Attaching,
    Attached,
    Detaching,
    Deleting,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Creating => "creating",
            VolumeState::Detached => "detached",
            VolumeState::Attaching => "attaching",
            VolumeState::Attached => "attached",
            VolumeState::Detaching => "detaching",
            VolumeState::Deleting => "deleting",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Robustness {
    Healthy,
    Degraded,
    Faulted,
    #[default]
    Unknown,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSpec {
    /// Bytes.
    pub size: u64,
    pub replicas: u32,
    #[serde(default)]
    pub standby: bool,
    #[serde(default)]
    pub backup_target: String,
    /// The node the volume should be attached to; `None` = detached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The backup this volume is restored from (on its backup target); empty for a new volume.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub from_backup: String,
    /// The volume whose backups it was restored from (a standby volume follows its newest).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backup_volume: String,
    /// A standby volume asked to become a normal one once the newest backup is restored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub activate: bool,
    /// A snapshot a detached volume is asked to revert to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert: Option<String>,
    /// The backing image under every replica (its bytes show until the volume writes its own).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backing_image: String,
}

/// Where a snapshot revert stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RevertState {
    #[default]
    Pending,
    Done,
    Error,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevertStatus {
    pub snapshot: String,
    pub state: RevertState,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// Where a volume's restore stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    #[serde(default)]
    pub requested_backup: String,
    #[serde(default)]
    pub last_restored_backup: String,
    /// 0–100.
    #[serde(default)]
    pub progress: u32,
    #[serde(default)]
    pub state: RestoreState,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// When the last restored backup was taken (Unix ms); a standby volume follows only newer
    /// backups.
    #[serde(default)]
    pub last_restored_ms: u64,
    /// The engine's snapshots, oldest first, as of its last report.
    #[serde(default)]
    pub snapshots: Vec<SnapshotInfo>,
    /// Why the last activation request failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub activation_error: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    pub state: VolumeState,
    pub robustness: Robustness,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_uri: Option<String>,
    /// The node the engine currently runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreStatus>,
    /// The last snapshot revert asked for, and how it went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert: Option<RevertStatus>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Unix seconds when it last became detached (nothing written since, while it stays so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detached_at: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub metadata: Meta,
    pub spec: VolumeSpec,
    #[serde(default)]
    pub status: VolumeStatus,
}
object!(Volume, "volume");

/// A replica's role, as the engine reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaMode {
    RW,
    WO,
    ERR,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSpec {
    pub volume: String,
    pub node: String,
    pub disk: String,
    pub size: u64,
    /// The volume's backing image (the replica's read-only base).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backing_image: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ReplicaMode>,
    #[serde(default)]
    pub state: ReplicaState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Unix seconds when it left the active set; cleared when it is RW again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<u64>,
    /// Flush sequence the replica last reported (freshness for salvage).
    #[serde(default)]
    pub flush_seq: u64,
    /// Bytes copied and skipped by its last rebuild.
    #[serde(default)]
    pub rebuild_copied: u64,
    #[serde(default)]
    pub rebuild_skipped: u64,
    /// Bytes its last (or current) rebuild has to go through.
    #[serde(default)]
    pub rebuild_total: u64,
    /// Why the replica cannot be used (its node cannot open its store), if so.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Replica {
    pub metadata: Meta,
    pub spec: ReplicaSpec,
    #[serde(default)]
    pub status: ReplicaStatus,
}
object!(Replica, "replica");

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineReplica {
    pub name: String,
    pub address: String,
    /// May serve as the source of truth when the engine starts (not recorded as failed).
    #[serde(default)]
    pub candidate: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineSpec {
    pub volume: String,
    pub node: String,
    pub size: u64,
    /// Session generation, unique per engine start.
    pub generation: u64,
    /// Replicas the engine should have in its set (it rebuilds the ones that are not).
    pub replicas: Vec<EngineReplica>,
    /// Serve the volume over NBD (false while it is being restored).
    #[serde(default = "yes")]
    pub frontend: bool,
    /// A backup to restore into the volume before anything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreOrder>,
    /// Seconds a replica may take to answer before it leaves the set (the
    /// `engine-replica-timeout` setting when the engine started); 0: the node's default.
    #[serde(default)]
    pub replica_timeout: u64,
    /// Revert every replica to this snapshot (a detached volume; no frontend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert: Option<String>,
}

/// A resolved backup target: where it is and how to reach it. Its options (with secrets) are
/// filled in only in the answers a node gets to its heartbeat, never in stored objects; its
/// `Debug` shows the option names alone.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    pub name: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
}

impl std::fmt::Debug for TargetRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetRef")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("options", &self.options.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreOrder {
    pub backup: String,
    /// The backup the volume holds now (incremental restore); empty: restore every block.
    #[serde(default)]
    pub from: String,
    /// The volume the backup was taken of (its backup volume on the target).
    pub source_volume: String,
    pub target: TargetRef,
    /// Download limit in bytes per second (the `backup-bandwidth-limit` setting); 0 = none.
    #[serde(default)]
    pub bandwidth: u64,
    /// The backing image under the volume: its bytes show through blocks not written, so zero
    /// blocks are written as zeros even into a new volume.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backing_image: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineStatus {
    #[serde(default)]
    pub state: EngineState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_uri: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// RW replicas in the engine's own latest report to this manager process (none yet after
    /// a manager start); salvage is decided from this, never from missed heartbeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rw_replicas: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Engine {
    pub metadata: Meta,
    pub spec: EngineSpec,
    #[serde(default)]
    pub status: EngineStatus,
}
object!(Engine, "engine");

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskStatus {
    pub path: String,
    pub capacity: u64,
    pub available: u64,
    /// Bytes of volume size scheduled onto this disk.
    #[serde(default)]
    pub scheduled: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    #[serde(default = "yes")]
    pub allow_scheduling: bool,
    /// Move every replica away (one at a time, each new copy complete before the old one goes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub evict: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    #[serde(default)]
    pub state: NodeState,
    /// Host the node's replica and NBD servers listen on.
    pub address: String,
    #[serde(default)]
    pub nbd_address: String,
    /// Where the node serves backing-image copies to peers (`host:port`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub transfer_address: String,
    #[serde(default)]
    pub last_heartbeat: u64,
    #[serde(default)]
    pub disks: Vec<DiskStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub metadata: Meta,
    #[serde(default)]
    pub spec: NodeSpec,
    #[serde(default)]
    pub status: NodeStatus,
}
object!(Node, "node");

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSpec {
    pub volume: String,
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    /// Taken on every replica of the volume.
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub parent: String,
    #[serde(default)]
    pub user_created: bool,
    /// Bytes the snapshot's layer holds.
    #[serde(default)]
    pub size: u64,
}

/// A snapshot the user asked for; its object name is `<volume>.<snapshot>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub metadata: Meta,
    pub spec: SnapshotSpec,
    #[serde(default)]
    pub status: SnapshotStatus,
}
object!(Snapshot, "snapshot");

/// One snapshot as listed (DESIGN §7: name, created, parent, userCreated, size).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    pub name: String,
    pub created: u64,
    pub parent: String,
    pub user_created: bool,
    pub size: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Setting {
    pub metadata: Meta,
    pub value: String,
}
object!(Setting, "setting");

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupTargetSpec {
    /// `file:///path` or `s3://bucket/prefix`; empty until set (the `default` target).
    #[serde(default)]
    pub url: String,
    /// Seconds between syncs.
    #[serde(default = "default_poll")]
    pub poll_interval: u64,
    /// Scheme options (S3: endpoint, region, access-key-id, secret-access-key, path-style, ca-cert).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

fn default_poll() -> u64 {
    300
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupTargetStatus {
    #[serde(default)]
    pub available: bool,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_synced_at: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupTarget {
    pub metadata: Meta,
    pub spec: BackupTargetSpec,
    #[serde(default)]
    pub status: BackupTargetStatus,
}
object!(BackupTarget, "backuptarget");

/// The name of the target every volume uses unless told otherwise; it always exists.
pub const DEFAULT_TARGET: &str = "default";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupVolumeSpec {
    pub target: String,
    pub volume: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupVolumeStatus {
    /// The newest completed backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup_at: Option<u64>,
    #[serde(default)]
    pub backups: u64,
    /// Volume size of the newest backup.
    #[serde(default)]
    pub size: u64,
}

/// The backups of one volume on one target; its object name is `<target>.<volume>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupVolume {
    pub metadata: Meta,
    pub spec: BackupVolumeSpec,
    #[serde(default)]
    pub status: BackupVolumeStatus,
}
object!(BackupVolume, "backupvolume");

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackupState {
    #[default]
    New,
    InProgress,
    Completed,
    Error,
}

impl BackupState {
    pub fn finished(self) -> bool {
        matches!(self, BackupState::Completed | BackupState::Error)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    pub volume: String,
    /// The snapshot to back up; empty: one is taken (named like the backup).
    #[serde(default)]
    pub snapshot: String,
    pub target: String,
    /// Read every block of the snapshot and check each one against the target, uploading what
    /// is missing, instead of taking unchanged blocks over from the previous backup.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full: bool,
    /// The volume may be detached: the manager runs an engine without a frontend for it (a
    /// system backup's volume backups).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub offline: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockCounts {
    pub total: u64,
    /// Uploaded by this backup, confirmed by the target.
    pub uploaded: u64,
    /// Already in the target (or unchanged since the parent backup).
    pub present: u64,
    pub zero: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ByteCounts {
    /// Plain bytes of the uploaded blocks.
    pub uploaded: u64,
    /// Bytes they take in the target (compressed).
    pub stored: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    pub state: BackupState,
    /// 0–100; 100 only once the manifest is durable.
    #[serde(default)]
    pub progress: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// Where the manifest lives: `<target url>/volumes/<volume>/backups/<name>.manifest`.
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub blocks: BlockCounts,
    #[serde(default)]
    pub bytes: ByteCounts,
    /// The snapshot actually backed up.
    #[serde(default)]
    pub snapshot: String,
    /// The backup it is incremental to (empty: full scan).
    #[serde(default)]
    pub parent: String,
    #[serde(default)]
    pub volume_size: u64,
    #[serde(default)]
    pub block_size: u64,
    /// Unix milliseconds when the backup was created (from its manifest once completed).
    #[serde(default)]
    pub created_ms: u64,
    /// Unix seconds when it completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<u64>,
    /// The node running it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// Unix seconds when it ended in Error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<u64>,
    /// The manifest object's change tag when a target sync last read it (empty: never read).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub manifest_tag: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backup {
    pub metadata: Meta,
    pub spec: BackupSpec,
    #[serde(default)]
    pub status: BackupStatus,
}
object!(Backup, "backup");

/// Where a backing image's bytes come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackingImageSourceKind {
    /// An http(s) URL.
    #[default]
    Download,
    /// Bytes streamed through `PUT /v1/backing-images/{name}/upload`.
    Upload,
    /// Another backing image's bytes.
    Clone,
    /// A snapshot of a volume, read through its engine.
    Export,
    /// A backing-image backup on a backup target.
    Restore,
}

impl BackingImageSourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackingImageSourceKind::Download => "download",
            BackingImageSourceKind::Upload => "upload",
            BackingImageSourceKind::Clone => "clone",
            BackingImageSourceKind::Export => "export",
            BackingImageSourceKind::Restore => "restore",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackingImageSource {
    pub kind: BackingImageSourceKind,
    /// `download`: the URL.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// `clone`: the backing image copied.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    /// `export`: the volume, and its snapshot (one is taken when none is named).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub volume: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub snapshot: String,
    /// `restore`: the backup (of a backing image) restored.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backup: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackingImageSpec {
    pub source: BackingImageSource,
    /// Expected SHA-512 of the raw bytes (lowercase hex); empty: the first copy's is recorded
    /// and every later copy must match it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub checksum: String,
    /// Nodes that keep a ready copy even without a replica using it.
    #[serde(default = "one")]
    pub min_copies: u32,
}

fn one() -> u32 {
    1
}

/// Where a backing image, or one copy of it, stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackingImageState {
    #[default]
    Pending,
    InProgress,
    Ready,
    Failed,
}

impl BackingImageState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackingImageState::Pending => "pending",
            BackingImageState::InProgress => "in-progress",
            BackingImageState::Ready => "ready",
            BackingImageState::Failed => "failed",
        }
    }
}

/// One node's copy of a backing image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackingImageCopy {
    pub node: String,
    #[serde(default)]
    pub disk: String,
    pub state: BackingImageState,
    /// 0–100.
    #[serde(default)]
    pub progress: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackingImageStatus {
    #[serde(default)]
    pub state: BackingImageState,
    /// The first copy's progress (0–100) until one is ready.
    #[serde(default)]
    pub progress: u32,
    /// Bytes of the raw image (a qcow2 source's virtual size).
    #[serde(default)]
    pub virtual_size: u64,
    /// SHA-512 of the raw bytes, as the first ready copy computed it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub checksum: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// One per node holding or fetching a copy, by node name.
    #[serde(default)]
    pub copies: Vec<BackingImageCopy>,
}

/// A read-only base image shared by volumes; copies live on nodes (one per node).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackingImage {
    pub metadata: Meta,
    pub spec: BackingImageSpec,
    #[serde(default)]
    pub status: BackingImageStatus,
}
object!(BackingImage, "backingimage");

/// Which volumes a system backup backs up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeBackupPolicy {
    /// Volumes without a completed backup of their current data.
    #[default]
    IfNotPresent,
    Always,
    /// None: each volume's newest completed backup is recorded.
    Disabled,
}

impl VolumeBackupPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeBackupPolicy::IfNotPresent => "if-not-present",
            VolumeBackupPolicy::Always => "always",
            VolumeBackupPolicy::Disabled => "disabled",
        }
    }
}

/// A system backup's phases, in order, ending in `ready` or `error`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SystemBackupState {
    #[default]
    Pending,
    /// Volume and backing-image backups it made are running.
    CreatingBackups,
    /// The document is being written to the target.
    Writing,
    Ready,
    Error,
}

impl SystemBackupState {
    pub fn as_str(self) -> &'static str {
        match self {
            SystemBackupState::Pending => "pending",
            SystemBackupState::CreatingBackups => "creating-backups",
            SystemBackupState::Writing => "writing",
            SystemBackupState::Ready => "ready",
            SystemBackupState::Error => "error",
        }
    }

    pub fn finished(self) -> bool {
        matches!(self, SystemBackupState::Ready | SystemBackupState::Error)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemBackupSpec {
    #[serde(default)]
    pub volume_backup_policy: VolumeBackupPolicy,
    /// Where the document is written (volume backups go to each volume's own target).
    #[serde(default)]
    pub target: String,
}

/// A volume as a system backup captures it, with the backup that restores it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemVolume {
    pub name: String,
    pub size: u64,
    pub replicas: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backing_image: String,
    pub backup_target: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub standby: bool,
    /// A standby volume: the volume whose backups it follows, and the backup it came from.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backup_volume: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub from_backup: String,
    /// The backup that restores it (empty: none; see `note`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backup: String,
    /// Made by this system backup (waited for), rather than an existing one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub created: bool,
    /// Its backup completed (or an existing one was chosen).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub done: bool,
    /// BLAKE3 of the backup's manifest, read from the target before the document is written.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub manifest_checksum: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// A backing image as a system backup captures it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemImage {
    pub name: String,
    pub checksum: String,
    pub min_copies: u32,
    pub backup: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub created: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub done: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub manifest_checksum: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemBackupStatus {
    #[serde(default)]
    pub state: SystemBackupState,
    /// 0–100; 100 only once the document is on the target.
    #[serde(default)]
    pub progress: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Unix seconds when it was written (ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<u64>,
    /// Unix seconds when it started (its deadline counts from here).
    #[serde(default)]
    pub started_at: u64,
    /// The Zebu version that wrote it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// Where the document is (`<target url>/system-backups/<name>/system-backup.json`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    #[serde(default)]
    pub volumes: Vec<SystemVolume>,
    #[serde(default)]
    pub backing_images: Vec<SystemImage>,
    #[serde(default)]
    pub settings: u32,
    #[serde(default)]
    pub targets: u32,
}

/// The cluster's definition and a backup of every volume's data, on a backup target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemBackup {
    pub metadata: Meta,
    pub spec: SystemBackupSpec,
    #[serde(default)]
    pub status: SystemBackupStatus,
}
object!(SystemBackup, "systembackup");

/// Where a system restore stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SystemRestoreState {
    #[default]
    Pending,
    /// Objects created; restored volumes are receiving their data.
    Restoring,
    Completed,
    Error,
}

impl SystemRestoreState {
    pub fn as_str(self) -> &'static str {
        match self {
            SystemRestoreState::Pending => "pending",
            SystemRestoreState::Restoring => "restoring",
            SystemRestoreState::Completed => "completed",
            SystemRestoreState::Error => "error",
        }
    }

    pub fn finished(self) -> bool {
        matches!(
            self,
            SystemRestoreState::Completed | SystemRestoreState::Error
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemRestoreSpec {
    pub system_backup: String,
}

/// What a system restore did with one object: `restored`, `restoring`, `skipped: exists`, or
/// `failed: <reason>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreResult {
    pub kind: String,
    pub name: String,
    pub result: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemRestoreStatus {
    #[serde(default)]
    pub state: SystemRestoreState,
    #[serde(default)]
    pub progress: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default)]
    pub started_at: u64,
    #[serde(default)]
    pub results: Vec<RestoreResult>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemRestore {
    pub metadata: Meta,
    pub spec: SystemRestoreSpec,
    #[serde(default)]
    pub status: SystemRestoreStatus,
}
object!(SystemRestore, "systemrestore");

/// Settings and their defaults.
pub const SETTINGS: &[(&str, &str, &str)] = &[
    (
        "replica-soft-anti-affinity",
        "true",
        "allow two replicas of a volume on one node when no other node fits",
    ),
    (
        "replica-replenishment-wait-interval",
        "600",
        "seconds to wait for a failed replica to return before building a new one",
    ),
    (
        "node-down-timeout",
        "10",
        "seconds without a heartbeat before a node counts as down",
    ),
    (
        "max-volume-size",
        "17592186044416",
        "largest volume in bytes (16 TiB)",
    ),
    (
        "backup-block-size",
        "2097152",
        "bytes per backup block (a power of two from 64 KiB to 16 MiB); applies to new backup volumes",
    ),
    (
        "backup-compression",
        "zstd",
        "codec for backup blocks: zstd, lz4 or none",
    ),
    (
        "backup-concurrency",
        "8",
        "blocks a backup or restore transfers in parallel",
    ),
    (
        "backup-bandwidth-limit",
        "0",
        "transfer limit per backup or restore in bytes per second (0: unlimited)",
    ),
    (
        "engine-replica-timeout",
        "10",
        "seconds a replica may take to answer an I/O before the engine drops it from the volume (applies to engines started after a change)",
    ),
    (
        "offline-replica-rebuilding",
        "true",
        "rebuild the replicas of a detached volume without waiting for it to be attached",
    ),
    (
        "system-backup-timeout",
        "3600",
        "seconds a system backup or restore may wait for the backups it made or the volumes it restores before it ends in error",
    ),
    (
        "failed-backup-ttl",
        "86400",
        "seconds a failed backup stays listed before its object is deleted (0: kept)",
    ),
];

/// Settings whose values are sizes in bytes: they accept the units `--size` does.
pub const SIZE_SETTINGS: &[&str] = &[
    "max-volume-size",
    "backup-block-size",
    "backup-bandwidth-limit",
];

// ---------------------------------------------------------------------------------------------
// Node agent <-> manager messages.

/// What a node reports on every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    pub address: String,
    pub nbd_address: String,
    pub disks: Vec<DiskStatus>,
    pub replicas: Vec<ReplicaReport>,
    pub engines: Vec<EngineReport>,
    /// Backups this node runs or finished since the manager last assigned them.
    #[serde(default)]
    pub backups: Vec<BackupReport>,
    /// Replicas whose stores this node cannot open (damaged or missing files), with the reason.
    #[serde(default)]
    pub broken_replicas: Vec<BrokenReplica>,
    /// Engines assigned here that cannot start, with the reason.
    #[serde(default)]
    pub engine_errors: Vec<EngineStartError>,
    /// Where peers and the manager fetch and upload backing-image copies (`host:port`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub transfer_address: String,
    /// Every backing-image copy on this node, ready or on its way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backing_images: Vec<CopyReport>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineStartError {
    pub volume: String,
    pub generation: u64,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BrokenReplica {
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupReport {
    pub name: String,
    pub state: BackupState,
    #[serde(default)]
    pub error: String,
    pub blocks: BlockCounts,
    pub bytes: ByteCounts,
    #[serde(default)]
    pub snapshot: String,
    #[serde(default)]
    pub parent: String,
    #[serde(default)]
    pub volume_size: u64,
    #[serde(default)]
    pub block_size: u64,
    #[serde(default)]
    pub created_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreReport {
    pub backup: String,
    /// Size of the restored backup (a standby volume grows to it).
    #[serde(default)]
    pub volume_size: u64,
    pub state: RestoreState,
    pub progress: u32,
    #[serde(default)]
    pub error: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaReport {
    pub name: String,
    pub address: String,
    pub flush_seq: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineReport {
    pub volume: String,
    pub generation: u64,
    /// Where the volume is served, empty while the engine is not exported over NBD.
    pub nbd_uri: String,
    pub replicas: Vec<EngineReplicaReport>,
    /// The volume's snapshots, oldest first.
    #[serde(default)]
    pub snapshots: Vec<SnapshotInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreReport>,
    /// The outcome of the revert the engine was asked for, once it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert: Option<RevertReport>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevertReport {
    pub snapshot: String,
    /// Empty when every replica in the set reverted.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineReplicaReport {
    pub name: String,
    pub mode: ReplicaMode,
    pub rebuild_copied: u64,
    pub rebuild_skipped: u64,
    #[serde(default)]
    pub rebuild_total: u64,
}

/// What the manager wants a node to run, sent back on every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignments {
    pub replicas: Vec<ReplicaAssignment>,
    pub engines: Vec<EngineSpec>,
    /// Replicas whose files the node must delete (their objects are being deleted).
    pub delete_replicas: Vec<String>,
    /// Snapshots that must exist (or, with `delete`, must not) on volumes whose engine runs here.
    #[serde(default)]
    pub snapshots: Vec<SnapshotOp>,
    /// Backups of volumes whose engine runs here that are not finished.
    #[serde(default)]
    pub backups: Vec<BackupOrder>,
    /// Backing-image copies this node should hold and does not have ready yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backing_images: Vec<CopyOrder>,
    /// Backing-image copies this node must delete (their image is gone or has enough copies
    /// elsewhere and no replica here uses it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delete_backing_images: Vec<CopyRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupOrder {
    pub name: String,
    pub volume: String,
    pub snapshot: String,
    pub state: BackupState,
    pub target: TargetRef,
    /// Completed backups of the volume on that target, newest first: (backup, snapshot).
    pub parents: Vec<(String, String)>,
    pub block_size: u32,
    pub codec: String,
    pub concurrency: u32,
    /// Bytes per second; 0 = unlimited.
    pub bandwidth: u64,
    /// Check every block instead of trusting the parent (see [`BackupSpec::full`]).
    #[serde(default)]
    pub full: bool,
    /// Labels recorded in the manifest.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A backing-image copy by identity: the image's name and `uid` (a re-created image of the same
/// name never reuses an old copy).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CopyRef {
    pub name: String,
    pub uid: String,
    /// Expected SHA-512 (empty: not known yet, the copy's own is recorded).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub checksum: String,
    /// Raw size in bytes (0: not known yet).
    #[serde(default)]
    pub size: u64,
}

/// Where a node fetches a copy from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum CopySource {
    /// The image's http(s) URL (the first copy of a `download` image).
    Url { url: String },
    /// A ready copy on another node (`peer`: its transfer address), possibly of another image
    /// (a clone's first copy).
    Peer {
        node: String,
        peer: String,
        copy: CopyRef,
    },
    /// Bytes arrive from the manager (an upload); nothing to fetch.
    Upload,
    /// A snapshot of a volume whose engine runs on this node.
    Export { volume: String, snapshot: String },
    /// A backing-image backup on a backup target (its options filled in for the node only).
    Restore {
        target: TargetRef,
        owner: String,
        backup: String,
    },
}

/// A copy a node should make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CopyOrder {
    pub copy: CopyRef,
    pub source: CopySource,
}

/// A copy as its node sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CopyReport {
    pub name: String,
    pub uid: String,
    pub state: BackingImageState,
    #[serde(default)]
    pub progress: u32,
    /// Raw size (known once the transfer has begun).
    #[serde(default)]
    pub size: u64,
    /// Computed SHA-512 (ready copies).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub checksum: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotOp {
    pub volume: String,
    pub name: String,
    pub delete: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaAssignment {
    pub name: String,
    pub volume: String,
    pub disk: String,
    pub size: u64,
    /// The backing image under the replica; sent once this node's copy is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_image: Option<CopyRef>,
}

/// An engine's report that a replica left its set or changed mode; the manager records it
/// durably before answering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaEvent {
    pub volume: String,
    pub replica: String,
    pub generation: u64,
    pub mode: ReplicaMode,
    #[serde(default)]
    pub reason: String,
}
