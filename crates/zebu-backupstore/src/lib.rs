//! Zebu's backup format and store: content-addressed compressed blocks ([`block`]), checksummed
//! manifests ([`manifest`]) and the [`store::BackupStore`] trait with its file-system backend.

pub mod backup;
pub mod block;
pub mod gc;
pub mod manifest;
pub mod s3;
pub mod store;
pub mod target;

pub use block::{BlockHash, Codec};
pub use manifest::Manifest;
pub use store::{BackupStore, FsStore, StoreError};
pub use target::{Target, TargetSpec};
