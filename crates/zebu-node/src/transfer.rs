//! What the node agent asks of whoever moves data between its engines and backup targets: start
//! a backup or a restore, settle a backup a restart interrupted, and report on each. The agent
//! knows nothing of backup formats or object stores; the binary plugs in the implementation
//! (`zebu-transfer`).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::Notify;
use zebu_api::model::{BackupOrder, BackupReport, RestoreOrder, RestoreReport, TargetRef};
use zebu_engine::Engine;

/// A backup running (or settled) on this node.
pub trait BackupHandle: Send + Sync {
    /// Its state and counts as the manager records them.
    fn report(&self, name: &str) -> BackupReport;
    /// Whether it ended (completed or failed).
    fn finished(&self) -> bool;
    /// Stops it (the manager no longer wants it).
    fn abort(&self);
}

/// A restore running into an engine.
pub trait RestoreHandle: Send + Sync {
    fn report(&self) -> RestoreReport;
    /// The backup it restores.
    fn backup(&self) -> &str;
    /// The backup it started from (an incremental restore of a standby volume).
    fn from(&self) -> &str;
    fn finished(&self) -> bool;
    fn succeeded(&self) -> bool;
}

/// A transfer running on its own.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Starts backups and restores; each notifies `done` when it ends.
pub trait Transfers: Send + Sync {
    fn start_backup(
        &self,
        engine: Arc<Engine>,
        order: BackupOrder,
        done: Arc<Notify>,
    ) -> Box<dyn BackupHandle>;
    /// A backup that was in progress when this node restarted: settled from the target.
    fn settle_interrupted(
        &self,
        order: BackupOrder,
        node: String,
        done: Arc<Notify>,
    ) -> Box<dyn BackupHandle>;
    fn start_restore(
        &self,
        engine: Arc<Engine>,
        order: RestoreOrder,
        concurrency: usize,
        done: Arc<Notify>,
    ) -> Box<dyn RestoreHandle>;
    /// A backup of a backing-image copy's raw file (`order.volume` is the image's owner name,
    /// `bi.<image>`).
    fn start_image_backup(
        &self,
        path: PathBuf,
        order: BackupOrder,
        done: Arc<Notify>,
    ) -> Box<dyn BackupHandle>;
    /// Restores backup `backup` of `owner` into a new file at `path`; resolves to its size.
    fn restore_image(
        &self,
        target: TargetRef,
        owner: String,
        backup: String,
        path: PathBuf,
        progress: Arc<dyn Fn(u64, u64) + Send + Sync>,
    ) -> BoxFuture<Result<u64, String>>;
}
