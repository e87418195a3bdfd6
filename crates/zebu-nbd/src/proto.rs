//! NBD wire constants and pure parsers for the handshake options and request headers, kept free
//! of I/O so they can be fuzzed. Spec: NetworkBlockDevice/nbd doc/proto.md.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_NO_ZEROES: u32 = 2;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunk types.
pub const CHUNK_FLAG_DONE: u16 = 1;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = (1 << 15) + 1;

// Errors.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// base:allocation flags.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Longest string (export name, query) accepted, per the spec's 4096-byte limit.
pub const MAX_STRING: usize = 4096;
/// Largest option payload read during the handshake.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed option data: {0}")]
pub struct Malformed(pub &'static str);

/// A byte cursor that fails instead of panicking.
pub struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(Malformed("truncated"));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    pub fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, Malformed> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A u32-length-prefixed UTF-8 string of at most [`MAX_STRING`] bytes.
    pub fn string(&mut self) -> Result<String, Malformed> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(Malformed("string too long"));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| Malformed("string is not UTF-8"))
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Payload of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, Malformed> {
    let mut c = Cursor::new(data);
    let name = c.string()?;
    let n = c.u16()? as usize;
    let mut infos = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        infos.push(c.u16()?);
    }
    if !c.is_empty() {
        return Err(Malformed("trailing bytes"));
    }
    Ok(InfoRequest { name, infos })
}

/// Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, Malformed> {
    let mut c = Cursor::new(data);
    let export = c.string()?;
    let n = c.u32()? as usize;
    if n > 1024 {
        return Err(Malformed("too many queries"));
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(c.string()?);
    }
    if !c.is_empty() {
        return Err(Malformed("trailing bytes"));
    }
    Ok(MetaRequest { export, queries })
}

/// A transmission-phase request header (28 bytes, compact form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub const REQUEST_LEN: usize = 28;

pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<RequestHeader, Malformed> {
    let mut c = Cursor::new(b);
    if c.u32()? != REQUEST_MAGIC {
        return Err(Malformed("bad request magic"));
    }
    Ok(RequestHeader {
        flags: c.u16()?,
        kind: c.u16()?,
        cookie: c.u64()?,
        offset: c.u64()?,
        length: c.u32()?,
    })
}

/// Metadata context ids the server hands out for the queries given; only `base:allocation`
/// matches (a LIST query of `base:` lists it too).
pub fn match_contexts(queries: &[String], listing: bool) -> Vec<(u32, &'static str)> {
    if queries.is_empty() {
        return if listing {
            vec![(1, BASE_ALLOCATION)]
        } else {
            Vec::new()
        };
    }
    let hit = queries
        .iter()
        .any(|q| q == BASE_ALLOCATION || (listing && (q == "base:" || q == "base")));
    if hit {
        vec![(1, BASE_ALLOCATION)]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_info_request(&data);
            let _ = parse_meta_request(&data);
            if data.len() >= REQUEST_LEN {
                let mut h = [0u8; REQUEST_LEN];
                h.copy_from_slice(&data[..REQUEST_LEN]);
                let _ = parse_request(&h);
            }
        }
    }

    #[test]
    fn info_request_roundtrip() {
        let mut d = Vec::new();
        d.extend_from_slice(&2u32.to_be_bytes());
        d.extend_from_slice(b"v1");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Ok(InfoRequest {
                name: "v1".into(),
                infos: vec![INFO_BLOCK_SIZE]
            })
        );
        d.push(0);
        assert!(parse_info_request(&d).is_err());
    }
}
