//! Errors of the replica store.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("corrupt metadata in {path}: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("{path} has format version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("no replica at {0}")]
    NotFound(PathBuf),
    /// The backing image's copy the chain names is not on this machine (it may come back).
    #[error("backing image {name:?} is missing at {}", path.display())]
    BaseMissing { name: String, path: PathBuf },
    #[error("a replica already exists at {0}")]
    Exists(PathBuf),
    #[error("range {offset}+{len} is outside the volume of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("no snapshot named {0:?}")]
    NoSnapshot(String),
    #[error("no layer {0}")]
    NoLayer(zebu_types::LayerId),
    #[error("engine generation {offered} is older than generation {current} already accepted")]
    StaleGeneration { offered: u64, current: u64 },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub(crate) trait IoContext<T> {
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}
