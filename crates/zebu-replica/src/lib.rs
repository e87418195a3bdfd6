//! Zebu's replica store: the on-disk state of one replica of a volume (no network).
//!
//! See [`store::ReplicaStore`] for the model and docs/formats.md for the files.

pub mod bitmap;
pub mod chain;
pub mod error;
pub mod mapfile;
pub mod store;
pub mod vfs;

pub use bitmap::Run;
pub use chain::{BaseMeta, LayerMeta};
pub use error::{Result, StoreError};
pub use store::{
    CreateOptions, DEFAULT_CLUSTER_SIZE, LayerInfo, ReplicaStore, SnapshotSpec, StoreStatus,
};
pub use vfs::{SimVfs, StdVfs, VFile, Vfs};
