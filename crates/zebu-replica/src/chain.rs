//! The chain file (`chain`): which layers make up the replica, in order, with the volume size and
//! the highest engine generation accepted. Replaced atomically on every change. Format:
//! docs/formats.md, "Chain file".

use std::path::Path;

use serde::{Deserialize, Serialize};
use zebu_types::LayerId;

use crate::error::{IoContext, Result, StoreError};
use crate::vfs::Vfs;

pub const CHAIN_FILE: &str = "chain";
pub const CHAIN_TMP: &str = "chain.tmp";
pub const VERSION: u32 = 1;
const PREFIX: &str = "ZEBUCHAIN";

/// One layer as recorded in the chain file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerMeta {
    pub id: LayerId,
    /// Snapshot name; `None` for the head.
    pub name: Option<String>,
    /// Seconds since the Unix epoch when the layer was sealed (snapshots) or created (head).
    pub created: u64,
    pub user_created: bool,
    /// Bumped whenever a merge or a rebuild changes this layer's contents.
    pub rev: u64,
    /// The layer's contents are known equal to the other in-sync replicas' copy of it.
    pub in_sync: bool,
    /// A delete was requested: the layer is being merged into the one above it.
    pub deleting: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainMeta {
    pub size: u64,
    pub cluster_size: u32,
    pub generation: u64,
    /// Highest flush sequence number reached before the current head was created.
    pub flush_seq: u64,
    /// Bottom (oldest) first; the last one is the writable head.
    pub layers: Vec<LayerMeta>,
    /// The read-only base under every layer (a backing image), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseMeta>,
}

/// A backing image's copy on this node, read where no layer holds a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BaseMeta {
    /// The backing image's name.
    pub name: String,
    /// SHA-512 of its bytes, lowercase hex.
    pub checksum: String,
    /// Its length in bytes; the volume reads zeros past it.
    pub size: u64,
    /// The copy's raw file on this node.
    pub path: std::path::PathBuf,
}

impl ChainMeta {
    pub fn load(vfs: &dyn Vfs, dir: &Path) -> Result<ChainMeta> {
        let path = dir.join(CHAIN_FILE);
        if !vfs.exists(&path) {
            return Err(StoreError::NotFound(dir.to_path_buf()));
        }
        let f = vfs.open(&path, false).at(&path)?;
        let len = f.len().at(&path)?;
        if len > 64 << 20 {
            return Err(StoreError::Corrupt {
                path,
                why: format!("{len} bytes is too large"),
            });
        }
        let mut buf = vec![0u8; len as usize];
        f.read_at(&mut buf, 0).at(&path)?;
        Self::decode(&buf).map_err(|e| match e {
            DecodeError::Version(found) => StoreError::UnsupportedVersion {
                path,
                found,
                supported: VERSION,
            },
            DecodeError::Corrupt(why) => StoreError::Corrupt { path, why },
        })
    }

    /// Writes the chain atomically: temp file, sync, rename, sync directory.
    pub fn store(&self, vfs: &dyn Vfs, dir: &Path) -> Result<()> {
        let tmp = dir.join(CHAIN_TMP);
        let path = dir.join(CHAIN_FILE);
        let bytes = self.encode();
        let f = vfs.open(&tmp, true).at(&tmp)?;
        f.set_len(0).at(&tmp)?;
        f.write_at(&bytes, 0).at(&tmp)?;
        f.sync_data().at(&tmp)?;
        vfs.rename(&tmp, &path).at(&path)?;
        vfs.sync_dir(dir).at(dir)?;
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain structs of strings and integers cannot fail.
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut out = format!(
            "{PREFIX} {VERSION} {:08x} {}\n",
            crc32c::crc32c(&body),
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }

    pub fn decode(buf: &[u8]) -> std::result::Result<ChainMeta, DecodeError> {
        let nl = buf
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| DecodeError::Corrupt("no header line".into()))?;
        let head = std::str::from_utf8(&buf[..nl])
            .map_err(|_| DecodeError::Corrupt("header is not text".into()))?;
        let parts: Vec<&str> = head.split(' ').collect();
        if parts.len() != 4 || parts[0] != PREFIX {
            return Err(DecodeError::Corrupt(format!("bad header {head:?}")));
        }
        let version: u32 = parts[1]
            .parse()
            .map_err(|_| DecodeError::Corrupt("bad version".into()))?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let crc = u32::from_str_radix(parts[2], 16)
            .map_err(|_| DecodeError::Corrupt("bad checksum field".into()))?;
        let len: usize = parts[3]
            .parse()
            .map_err(|_| DecodeError::Corrupt("bad length".into()))?;
        let body = &buf[nl + 1..];
        if body.len() != len {
            return Err(DecodeError::Corrupt(format!(
                "body is {} bytes, header says {len}",
                body.len()
            )));
        }
        if crc32c::crc32c(body) != crc {
            return Err(DecodeError::Corrupt("checksum mismatch".into()));
        }
        let meta: ChainMeta = serde_json::from_slice(body)
            .map_err(|e| DecodeError::Corrupt(format!("bad body: {e}")))?;
        meta.validate().map_err(DecodeError::Corrupt)?;
        Ok(meta)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if !self.cluster_size.is_power_of_two() || self.cluster_size < 4096 {
            return Err(format!(
                "cluster size {} is not a power of two ≥ 4096",
                self.cluster_size
            ));
        }
        if !self.size.is_multiple_of(4096) {
            return Err(format!("size {} is not a multiple of 4096", self.size));
        }
        let Some(head) = self.layers.last() else {
            return Err("no layers".into());
        };
        if head.name.is_some() || head.deleting {
            return Err("the head layer is named or being deleted".into());
        }
        let mut ids = std::collections::HashSet::new();
        for l in &self.layers {
            if !ids.insert(l.id) {
                return Err(format!("layer {} appears twice", l.id));
            }
        }
        for l in &self.layers[..self.layers.len() - 1] {
            if l.name.is_none() {
                return Err(format!("snapshot layer {} has no name", l.id));
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
pub enum DecodeError {
    Version(u32),
    Corrupt(String),
}
