//! Backup manifests: a compact binary map from block index to block hash (absent = all zeros)
//! with a header describing the backup and a BLAKE3 trailer over everything before it. A backup is
//! Completed exactly when its manifest is present and valid. Format: docs/formats.md, "Manifest".

use std::collections::BTreeMap;

use crate::block::BlockHash;

pub const MAGIC: &[u8; 4] = b"ZBMF";
pub const VERSION: u32 = 1;
const MAX_STRING: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub volume: String,
    pub backup: String,
    pub snapshot: String,
    /// The backup this one was taken incrementally from; empty for a full backup.
    pub parent: String,
    /// Unix seconds.
    pub created: u64,
    pub volume_size: u64,
    pub block_size: u32,
    pub labels: BTreeMap<String, String>,
    /// One entry per block of the volume; `None` for an all-zero block.
    pub blocks: Vec<Option<BlockHash>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is malformed: {0}")]
    Malformed(&'static str),
    #[error("manifest has format version {0}; this build reads version 1")]
    Version(u32),
    #[error("manifest checksum mismatch (the object is damaged or truncated)")]
    Checksum,
}

impl Manifest {
    /// Number of blocks a volume of `size` bytes has with `block_size`-byte blocks.
    pub fn block_count(size: u64, block_size: u32) -> u64 {
        size.div_ceil(block_size.max(1) as u64)
    }

    /// Distinct blocks the backup references.
    pub fn referenced(&self) -> std::collections::BTreeSet<BlockHash> {
        self.blocks.iter().flatten().copied().collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut h = Vec::new();
        for s in [&self.volume, &self.backup, &self.snapshot, &self.parent] {
            put_str(&mut h, s);
        }
        h.extend_from_slice(&self.created.to_le_bytes());
        h.extend_from_slice(&self.volume_size.to_le_bytes());
        h.extend_from_slice(&self.block_size.to_le_bytes());
        h.extend_from_slice(&(self.labels.len() as u32).to_le_bytes());
        for (k, v) in &self.labels {
            put_str(&mut h, k);
            put_str(&mut h, v);
        }
        let n = self.blocks.len();
        let mut out = Vec::with_capacity(16 + h.len() + n / 8 + 1 + n * 32 + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(h.len() as u32).to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&(n as u64).to_le_bytes());
        let mut bitmap = vec![0u8; n.div_ceil(8)];
        for (i, b) in self.blocks.iter().enumerate() {
            if b.is_some() {
                bitmap[i / 8] |= 1 << (i % 8);
            }
        }
        out.extend_from_slice(&bitmap);
        for b in self.blocks.iter().flatten() {
            out.extend_from_slice(&b.0);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Manifest, ManifestError> {
        let bad = ManifestError::Malformed;
        if buf.len() < 4 + 4 + 4 + 8 + 32 || &buf[..4] != MAGIC {
            return Err(bad("bad header"));
        }
        let version = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if version != VERSION {
            return Err(ManifestError::Version(version));
        }
        let (body, trailer) = buf.split_at(buf.len() - 32);
        if blake3::hash(body).as_bytes() != trailer {
            return Err(ManifestError::Checksum);
        }
        let mut r = Reader { b: &body[8..] };
        let hlen = r.u32()? as usize;
        let mut hr = Reader { b: r.take(hlen)? };
        let volume = hr.string()?;
        let backup = hr.string()?;
        let snapshot = hr.string()?;
        let parent = hr.string()?;
        let created = hr.u64()?;
        let volume_size = hr.u64()?;
        let block_size = hr.u32()?;
        let nl = hr.u32()? as usize;
        if nl > 1024 {
            return Err(bad("too many labels"));
        }
        let mut labels = BTreeMap::new();
        for _ in 0..nl {
            let k = hr.string()?;
            let v = hr.string()?;
            labels.insert(k, v);
        }
        if !hr.b.is_empty() {
            return Err(bad("header has trailing bytes"));
        }
        if block_size == 0 || !block_size.is_power_of_two() {
            return Err(bad("block size"));
        }
        let n = r.u64()?;
        if n != Manifest::block_count(volume_size, block_size) {
            return Err(bad("block count does not match the volume size"));
        }
        let n = usize::try_from(n).map_err(|_| bad("block count"))?;
        let bitmap = r.take(n.div_ceil(8))?;
        let present = bitmap
            .iter()
            .map(|b| b.count_ones() as usize)
            .sum::<usize>();
        if r.b.len() != present * 32 {
            return Err(bad("hash table length"));
        }
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                let mut h = [0u8; 32];
                h.copy_from_slice(r.take(32)?);
                blocks.push(Some(BlockHash(h)));
            } else {
                blocks.push(None);
            }
        }
        // Bits past the last block must be clear.
        if n % 8 != 0 && bitmap[n / 8] >> (n % 8) != 0 {
            return Err(bad("bitmap padding"));
        }
        Ok(Manifest {
            volume,
            backup,
            snapshot,
            parent,
            created,
            volume_size,
            block_size,
            labels,
            blocks,
        })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(MAX_STRING)];
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s);
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ManifestError> {
        if self.b.len() < n {
            return Err(ManifestError::Malformed("truncated"));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, ManifestError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, ManifestError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String, ManifestError> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(ManifestError::Malformed("string too long"));
        }
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| ManifestError::Malformed("string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn manifest(blocks: Vec<Option<BlockHash>>, block_size: u32) -> Manifest {
        Manifest {
            volume: "v1".into(),
            backup: "backup-1".into(),
            snapshot: "s1".into(),
            parent: String::new(),
            created: 1_795_000_000,
            volume_size: blocks.len() as u64 * block_size as u64,
            block_size,
            labels: [("k".to_string(), "v".to_string())].into(),
            blocks,
        }
    }

    fn blocks() -> impl Strategy<Value = Vec<Option<BlockHash>>> {
        proptest::collection::vec(
            proptest::option::of(any::<[u8; 32]>().prop_map(BlockHash)),
            0..300,
        )
    }

    proptest! {
        #[test]
        fn round_trip(b in blocks()) {
            let m = manifest(b, 2 << 20);
            prop_assert_eq!(Manifest::decode(&m.encode()).expect("decode"), m);
        }

        #[test]
        fn any_damage_is_detected(b in blocks(), pos in any::<usize>(), bit in 0u8..8, cut in any::<bool>()) {
            let m = manifest(b, 2 << 20);
            let mut enc = m.encode();
            if cut {
                enc.truncate(pos % enc.len());
            } else {
                let i = pos % enc.len();
                enc[i] ^= 1 << bit;
            }
            prop_assert!(Manifest::decode(&enc).is_err());
        }

        #[test]
        fn garbage_never_panics(junk in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Manifest::decode(&junk);
        }
    }

    #[test]
    fn unknown_version_is_named() {
        let mut enc = manifest(vec![None], 4096).encode();
        enc[4] = 9;
        assert_eq!(Manifest::decode(&enc), Err(ManifestError::Version(9)));
    }

    #[test]
    fn compact() {
        // 1 GiB in 2 MiB blocks, all distinct: 512 × 32 bytes plus a small header.
        let m = manifest(
            (0..512u32)
                .map(|i| Some(BlockHash::of(&i.to_le_bytes())))
                .collect(),
            2 << 20,
        );
        assert!(m.encode().len() < 512 * 32 + 256, "{}", m.encode().len());
    }
}
