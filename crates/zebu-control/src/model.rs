//! The control plane's object model: Kubernetes-shaped objects (metadata, spec, status) for nodes,
//! volumes, engines, replicas and settings. Field names are camelCase on the wire.

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
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
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
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ReplicaMode>,
    /// `pending` (not running yet), `running`, `stopped` (its node is down), `deleted`.
    #[serde(default)]
    pub state: String,
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
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineStatus {
    /// `starting`, `running`, `failed`.
    #[serde(default)]
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_uri: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
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
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// `up` or `down`.
    pub state: String,
    /// Host the node's replica and NBD servers listen on.
    pub address: String,
    #[serde(default)]
    pub nbd_address: String,
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
    pub nbd_uri: String,
    pub replicas: Vec<EngineReplicaReport>,
    /// The volume's snapshots, oldest first.
    #[serde(default)]
    pub snapshots: Vec<SnapshotInfo>,
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
