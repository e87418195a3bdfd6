//! Backup blocks: named by the BLAKE3 hash of their plaintext, stored compressed with the codec
//! recorded in a small header, and verified against their name when read. Format: docs/formats.md,
//! "Backup block".

use std::fmt;

pub const MAGIC: &[u8; 4] = b"ZBLK";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 14;
/// Largest block accepted (DESIGN §5: up to 16 MiB).
pub const MAX_BLOCK: usize = 16 << 20;

/// The BLAKE3 hash of a block's plaintext: its name in the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    pub fn of(data: &[u8]) -> BlockHash {
        BlockHash(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<BlockHash> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
        }
        Some(BlockHash(out))
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// How a block's bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None = 0,
    Zstd = 1,
    Lz4 = 2,
}

impl Codec {
    pub fn from_u8(v: u8) -> Option<Codec> {
        match v {
            0 => Some(Codec::None),
            1 => Some(Codec::Zstd),
            2 => Some(Codec::Lz4),
            _ => None,
        }
    }

    pub fn parse(s: &str) -> Option<Codec> {
        match s {
            "none" => Some(Codec::None),
            "zstd" => Some(Codec::Zstd),
            "lz4" => Some(Codec::Lz4),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("block object is malformed: {0}")]
    Malformed(&'static str),
    #[error("block object has format version {0}; this build reads version 1")]
    Version(u8),
    #[error("block {expected} is corrupt: its contents hash to {found}")]
    HashMismatch {
        expected: BlockHash,
        found: BlockHash,
    },
    #[error("compression failed: {0}")]
    Compress(String),
}

/// Whether a block is all zeros (such blocks are never stored).
pub fn is_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(8);
    let words_zero = chunks
        .by_ref()
        .all(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) == 0);
    words_zero && chunks.remainder().iter().all(|b| *b == 0)
}

/// Encodes a block for storage: header (magic, version, codec, plaintext length, stored length)
/// and the (possibly compressed) bytes. Falls back to no compression when it does not help.
pub fn encode(data: &[u8], codec: Codec) -> Result<Vec<u8>, BlockError> {
    if data.len() > MAX_BLOCK {
        return Err(BlockError::Malformed("block larger than 16 MiB"));
    }
    let compressed = match codec {
        Codec::None => None,
        Codec::Zstd => {
            Some(zstd::bulk::compress(data, 1).map_err(|e| BlockError::Compress(e.to_string()))?)
        }
        Codec::Lz4 => Some(lz4_flex::block::compress(data)),
    };
    let (codec, body) = match compressed {
        Some(c) if c.len() < data.len() => (codec, c),
        _ => (Codec::None, data.to_vec()),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(codec as u8);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a stored block and checks it against its name.
pub fn decode(stored: &[u8], expected: &BlockHash) -> Result<Vec<u8>, BlockError> {
    if stored.len() < HEADER_LEN || &stored[..4] != MAGIC {
        return Err(BlockError::Malformed("bad header"));
    }
    if stored[4] != VERSION {
        return Err(BlockError::Version(stored[4]));
    }
    let codec = Codec::from_u8(stored[5]).ok_or(BlockError::Malformed("unknown codec"))?;
    let plain = u32::from_le_bytes([stored[6], stored[7], stored[8], stored[9]]) as usize;
    let body_len = u32::from_le_bytes([stored[10], stored[11], stored[12], stored[13]]) as usize;
    if plain > MAX_BLOCK || stored.len() != HEADER_LEN + body_len {
        return Err(BlockError::Malformed("lengths do not match"));
    }
    let body = &stored[HEADER_LEN..];
    let data = match codec {
        Codec::None => body.to_vec(),
        Codec::Zstd => {
            zstd::bulk::decompress(body, plain).map_err(|_| BlockError::Malformed("zstd data"))?
        }
        Codec::Lz4 => lz4_flex::block::decompress(body, plain)
            .map_err(|_| BlockError::Malformed("lz4 data"))?,
    };
    if data.len() != plain {
        return Err(BlockError::Malformed("decompressed length"));
    }
    let found = BlockHash::of(&data);
    if &found != expected {
        return Err(BlockError::HashMismatch {
            expected: *expected,
            found,
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        assert!(is_zero(&[]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[3] = 7;
        assert!(!is_zero(&v));
    }

    proptest! {
        #[test]
        fn round_trip_every_codec(data in proptest::collection::vec(any::<u8>(), 0..20_000), rep in 0usize..4) {
            let mut data = data;
            if rep > 0 {
                let copy = data.clone();
                for _ in 0..rep { data.extend_from_slice(&copy); }
            }
            let h = BlockHash::of(&data);
            for c in [Codec::None, Codec::Zstd, Codec::Lz4] {
                let enc = encode(&data, c).expect("encode");
                prop_assert_eq!(decode(&enc, &h).expect("decode"), data.clone());
            }
        }

        #[test]
        fn decoding_garbage_never_panics(junk in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&junk, &BlockHash([0; 32]));
        }

        #[test]
        fn damage_never_yields_wrong_data(data in proptest::collection::vec(any::<u8>(), 1..5000), pos in any::<usize>(), bit in 0u8..8, c in 0u8..3) {
            // A damaged object either fails to decode or (when only bits a codec ignores were
            // hit) still yields exactly the original data: never silently different bytes.
            let h = BlockHash::of(&data);
            let codec = Codec::from_u8(c).expect("codec");
            let mut enc = encode(&data, codec).expect("encode");
            let i = pos % enc.len();
            enc[i] ^= 1 << bit;
            if let Ok(d) = decode(&enc, &h) {
                prop_assert_eq!(d, data);
            }
        }
    }

    #[test]
    fn hex_round_trip() {
        let h = BlockHash::of(b"zebu");
        assert_eq!(BlockHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(BlockHash::from_hex("xyz"), None);
    }
}
