//! The replica wire protocol: length-prefixed binary frames carrying a request or response kind, a
//! request id (replies are matched by id, so many requests can be in flight) and a body.
//! Version 1; format in docs/formats.md, "Replica protocol". Decoding never panics: every malformed
//! frame is a [`ProtoError`].

use bytes::{Buf, BufMut, Bytes, BytesMut};
use zebu_replica::{LayerInfo, LayerMeta, Run, StoreStatus};
use zebu_types::{Generation, LayerId};

pub const MAGIC: u32 = 0x5a45_4255; // "ZEBU"
pub const VERSION: u16 = 1;
/// Bytes before the body: u32 length, u8 kind, u64 id.
pub const HEADER_LEN: usize = 13;
/// Largest body accepted (a 32 MiB write plus its fields, with room to spare).
pub const MAX_BODY: u32 = 48 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("frame truncated")]
    Truncated,
    #[error("frame body of {0} bytes exceeds the limit")]
    TooLarge(u32),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// Requests from an engine to a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Hello {
        magic: u32,
        version: u16,
        generation: Generation,
        volume: String,
    },
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        fua: bool,
        data: Bytes,
    },
    Zero {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Flush,
    Snapshot {
        name: String,
        new_head: LayerId,
        created: u64,
        user_created: bool,
        in_sync: bool,
    },
    DeleteSnapshot {
        name: String,
    },
    Revert {
        name: String,
        new_head: LayerId,
        created: u64,
    },
    Expand {
        size: u64,
    },
    ListLayers,
    Diff {
        from: String,
        to: Option<String>,
    },
    Allocation {
        offset: u64,
        len: u64,
    },
    LayerRuns {
        layer: LayerId,
    },
    ReadLayer {
        layer: LayerId,
        cluster: u64,
        count: u32,
    },
    WriteLayer {
        layer: LayerId,
        cluster: u64,
        data: Bytes,
    },
    ChecksumLayer {
        layer: LayerId,
        cluster: u64,
        count: u32,
    },
    UnsetLayer {
        layer: LayerId,
        cluster: u64,
        count: u32,
    },
    MarkInSync {
        layer: LayerId,
        rev: u64,
    },
    ResetChain {
        layers: Vec<LayerMeta>,
    },
    Status,
    /// Reads the volume as snapshot `name` saw it.
    ReadSnapshot {
        name: String,
        offset: u64,
        len: u32,
    },
}

/// Error classes carried in an error response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Io = 1,
    OutOfRange = 2,
    Invalid = 3,
    NotFound = 4,
    StaleGeneration = 5,
    NoSession = 6,
    Corrupt = 7,
}

impl ErrorCode {
    fn from_u8(v: u8) -> ErrorCode {
        match v {
            2 => ErrorCode::OutOfRange,
            3 => ErrorCode::Invalid,
            4 => ErrorCode::NotFound,
            5 => ErrorCode::StaleGeneration,
            6 => ErrorCode::NoSession,
            7 => ErrorCode::Corrupt,
            _ => ErrorCode::Io,
        }
    }
}

/// Responses from a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Ok,
    Data(Bytes),
    Layers(Vec<LayerInfo>),
    Runs(Vec<Run>),
    Extents(Vec<(u64, bool)>),
    Checksums(Vec<[u8; 16]>),
    Status(StoreStatus),
    Error { code: ErrorCode, message: String },
}

// Kinds. Requests are 1..=63, responses 64..
const K_HELLO: u8 = 1;
const K_READ: u8 = 2;
const K_WRITE: u8 = 3;
const K_ZERO: u8 = 4;
const K_FLUSH: u8 = 5;
const K_SNAPSHOT: u8 = 6;
const K_DELETE: u8 = 7;
const K_REVERT: u8 = 8;
const K_EXPAND: u8 = 9;
const K_LIST: u8 = 10;
const K_DIFF: u8 = 11;
const K_ALLOC: u8 = 12;
const K_LRUNS: u8 = 13;
const K_LREAD: u8 = 14;
const K_LWRITE: u8 = 15;
const K_LSUM: u8 = 16;
const K_LUNSET: u8 = 17;
const K_INSYNC: u8 = 18;
const K_RESET: u8 = 19;
const K_STATUS: u8 = 20;
const K_READSNAP: u8 = 21;
const R_OK: u8 = 64;
const R_DATA: u8 = 65;
const R_LAYERS: u8 = 66;
const R_RUNS: u8 = 67;
const R_EXTENTS: u8 = 68;
const R_SUMS: u8 = 69;
const R_STATUS: u8 = 70;
const R_ERROR: u8 = 71;

struct W(BytesMut);

impl W {
    fn str(&mut self, s: &str) {
        self.0.put_u32(s.len() as u32);
        self.0.put_slice(s.as_bytes());
    }
    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.0.put_u8(1);
                self.str(s)
            }
            None => self.0.put_u8(0),
        }
    }
    fn meta(&mut self, m: &LayerMeta) {
        self.0.put_u64(m.id.0);
        self.opt_str(m.name.as_deref());
        self.0.put_u64(m.created);
        self.0.put_u8(u8::from(m.user_created));
        self.0.put_u64(m.rev);
        self.0.put_u8(u8::from(m.in_sync));
        self.0.put_u8(u8::from(m.deleting));
    }
}

struct R<'a>(&'a [u8]);

impl R<'_> {
    fn need(&self, n: usize) -> Result<(), ProtoError> {
        if self.0.len() < n {
            Err(ProtoError::Truncated)
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn bool(&mut self) -> Result<bool, ProtoError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtoError::Malformed("boolean")),
        }
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }
    fn bytes(&mut self, n: usize) -> Result<&[u8], ProtoError> {
        self.need(n)?;
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn str(&mut self) -> Result<String, ProtoError> {
        let n = self.u32()? as usize;
        if n > 4096 {
            return Err(ProtoError::Malformed("string too long"));
        }
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| ProtoError::Malformed("string is not UTF-8"))
    }
    fn opt_str(&mut self) -> Result<Option<String>, ProtoError> {
        if self.bool()? {
            Ok(Some(self.str()?))
        } else {
            Ok(None)
        }
    }
    fn count(&mut self, each: usize) -> Result<usize, ProtoError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(each) > self.0.len() {
            return Err(ProtoError::Truncated);
        }
        Ok(n)
    }
    fn meta(&mut self) -> Result<LayerMeta, ProtoError> {
        Ok(LayerMeta {
            id: LayerId(self.u64()?),
            name: self.opt_str()?,
            created: self.u64()?,
            user_created: self.bool()?,
            rev: self.u64()?,
            in_sync: self.bool()?,
            deleting: self.bool()?,
        })
    }
    fn rest(&mut self) -> Bytes {
        let b = Bytes::copy_from_slice(self.0);
        self.0 = &[];
        b
    }
    fn end(&self) -> Result<(), ProtoError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Malformed("trailing bytes"))
        }
    }
}

/// Encodes a request body; returns its kind and bytes.
pub fn encode_request(req: &Request) -> (u8, Bytes) {
    let mut w = W(BytesMut::with_capacity(64));
    let kind = match req {
        Request::Hello {
            magic,
            version,
            generation,
            volume,
        } => {
            w.0.put_u32(*magic);
            w.0.put_u16(*version);
            w.0.put_u64(generation.0);
            w.str(volume);
            K_HELLO
        }
        Request::Read { offset, len } => {
            w.0.put_u64(*offset);
            w.0.put_u32(*len);
            K_READ
        }
        Request::Write { offset, fua, data } => {
            w.0.reserve(data.len() + 9);
            w.0.put_u64(*offset);
            w.0.put_u8(u8::from(*fua));
            w.0.put_slice(data);
            K_WRITE
        }
        Request::Zero { offset, len, fua } => {
            w.0.put_u64(*offset);
            w.0.put_u64(*len);
            w.0.put_u8(u8::from(*fua));
            K_ZERO
        }
        Request::Flush => K_FLUSH,
        Request::Snapshot {
            name,
            new_head,
            created,
            user_created,
            in_sync,
        } => {
            w.str(name);
            w.0.put_u64(new_head.0);
            w.0.put_u64(*created);
            w.0.put_u8(u8::from(*user_created));
            w.0.put_u8(u8::from(*in_sync));
            K_SNAPSHOT
        }
        Request::DeleteSnapshot { name } => {
            w.str(name);
            K_DELETE
        }
        Request::Revert {
            name,
            new_head,
            created,
        } => {
            w.str(name);
            w.0.put_u64(new_head.0);
            w.0.put_u64(*created);
            K_REVERT
        }
        Request::Expand { size } => {
            w.0.put_u64(*size);
            K_EXPAND
        }
        Request::ListLayers => K_LIST,
        Request::Diff { from, to } => {
            w.str(from);
            w.opt_str(to.as_deref());
            K_DIFF
        }
        Request::Allocation { offset, len } => {
            w.0.put_u64(*offset);
            w.0.put_u64(*len);
            K_ALLOC
        }
        Request::LayerRuns { layer } => {
            w.0.put_u64(layer.0);
            K_LRUNS
        }
        Request::ReadLayer {
            layer,
            cluster,
            count,
        } => {
            w.0.put_u64(layer.0);
            w.0.put_u64(*cluster);
            w.0.put_u32(*count);
            K_LREAD
        }
        Request::WriteLayer {
            layer,
            cluster,
            data,
        } => {
            w.0.reserve(data.len() + 16);
            w.0.put_u64(layer.0);
            w.0.put_u64(*cluster);
            w.0.put_slice(data);
            K_LWRITE
        }
        Request::ChecksumLayer {
            layer,
            cluster,
            count,
        } => {
            w.0.put_u64(layer.0);
            w.0.put_u64(*cluster);
            w.0.put_u32(*count);
            K_LSUM
        }
        Request::UnsetLayer {
            layer,
            cluster,
            count,
        } => {
            w.0.put_u64(layer.0);
            w.0.put_u64(*cluster);
            w.0.put_u32(*count);
            K_LUNSET
        }
        Request::MarkInSync { layer, rev } => {
            w.0.put_u64(layer.0);
            w.0.put_u64(*rev);
            K_INSYNC
        }
        Request::ResetChain { layers } => {
            w.0.put_u32(layers.len() as u32);
            for m in layers {
                w.meta(m);
            }
            K_RESET
        }
        Request::Status => K_STATUS,
        Request::ReadSnapshot { name, offset, len } => {
            w.str(name);
            w.0.put_u64(*offset);
            w.0.put_u32(*len);
            K_READSNAP
        }
    };
    (kind, w.0.freeze())
}

/// Decodes a request body of the given kind.
pub fn decode_request(kind: u8, body: &[u8]) -> Result<Request, ProtoError> {
    let mut r = R(body);
    let req = match kind {
        K_HELLO => Request::Hello {
            magic: r.u32()?,
            version: r.u16()?,
            generation: Generation(r.u64()?),
            volume: r.str()?,
        },
        K_READ => Request::Read {
            offset: r.u64()?,
            len: r.u32()?,
        },
        K_WRITE => Request::Write {
            offset: r.u64()?,
            fua: r.bool()?,
            data: r.rest(),
        },
        K_ZERO => Request::Zero {
            offset: r.u64()?,
            len: r.u64()?,
            fua: r.bool()?,
        },
        K_FLUSH => Request::Flush,
        K_SNAPSHOT => Request::Snapshot {
            name: r.str()?,
            new_head: LayerId(r.u64()?),
            created: r.u64()?,
            user_created: r.bool()?,
            in_sync: r.bool()?,
        },
        K_DELETE => Request::DeleteSnapshot { name: r.str()? },
        K_REVERT => Request::Revert {
            name: r.str()?,
            new_head: LayerId(r.u64()?),
            created: r.u64()?,
        },
        K_EXPAND => Request::Expand { size: r.u64()? },
        K_LIST => Request::ListLayers,
        K_DIFF => Request::Diff {
            from: r.str()?,
            to: r.opt_str()?,
        },
        K_ALLOC => Request::Allocation {
            offset: r.u64()?,
            len: r.u64()?,
        },
        K_LRUNS => Request::LayerRuns {
            layer: LayerId(r.u64()?),
        },
        K_LREAD => Request::ReadLayer {
            layer: LayerId(r.u64()?),
            cluster: r.u64()?,
            count: r.u32()?,
        },
        K_LWRITE => Request::WriteLayer {
            layer: LayerId(r.u64()?),
            cluster: r.u64()?,
            data: r.rest(),
        },
        K_LSUM => Request::ChecksumLayer {
            layer: LayerId(r.u64()?),
            cluster: r.u64()?,
            count: r.u32()?,
        },
        K_LUNSET => Request::UnsetLayer {
            layer: LayerId(r.u64()?),
            cluster: r.u64()?,
            count: r.u32()?,
        },
        K_INSYNC => Request::MarkInSync {
            layer: LayerId(r.u64()?),
            rev: r.u64()?,
        },
        K_RESET => {
            let n = r.count(28)?;
            let mut layers = Vec::with_capacity(n);
            for _ in 0..n {
                layers.push(r.meta()?);
            }
            Request::ResetChain { layers }
        }
        K_STATUS => Request::Status,
        K_READSNAP => Request::ReadSnapshot {
            name: r.str()?,
            offset: r.u64()?,
            len: r.u32()?,
        },
        k => return Err(ProtoError::UnknownKind(k)),
    };
    r.end()?;
    Ok(req)
}

/// Encodes a response body; returns its kind and bytes.
pub fn encode_response(resp: &Response) -> (u8, Bytes) {
    let mut w = W(BytesMut::with_capacity(32));
    let kind = match resp {
        Response::Ok => R_OK,
        Response::Data(d) => return (R_DATA, d.clone()),
        Response::Layers(ls) => {
            w.0.put_u32(ls.len() as u32);
            for l in ls {
                w.meta(&l.meta);
                w.0.put_u64(l.allocated);
            }
            R_LAYERS
        }
        Response::Runs(rs) => {
            w.0.put_u32(rs.len() as u32);
            for r in rs {
                w.0.put_u64(r.start);
                w.0.put_u64(r.len);
            }
            R_RUNS
        }
        Response::Extents(es) => {
            w.0.put_u32(es.len() as u32);
            for (len, a) in es {
                w.0.put_u64(*len);
                w.0.put_u8(u8::from(*a));
            }
            R_EXTENTS
        }
        Response::Checksums(cs) => {
            w.0.put_u32(cs.len() as u32);
            for c in cs {
                w.0.put_slice(c);
            }
            R_SUMS
        }
        Response::Status(s) => {
            w.0.put_u64(s.size);
            w.0.put_u32(s.cluster_size);
            w.0.put_u64(s.generation.0);
            w.0.put_u64(s.flush_seq);
            w.0.put_u64(s.head.0);
            w.0.put_u32(s.layers);
            w.0.put_u64(s.index_memory);
            R_STATUS
        }
        Response::Error { code, message } => {
            w.0.put_u8(*code as u8);
            w.str(&message[..message.len().min(4096)]);
            R_ERROR
        }
    };
    (kind, w.0.freeze())
}

/// Decodes a response body of the given kind.
pub fn decode_response(kind: u8, body: Bytes) -> Result<Response, ProtoError> {
    if kind == R_DATA {
        return Ok(Response::Data(body));
    }
    let mut r = R(&body);
    let resp = match kind {
        R_OK => Response::Ok,
        R_LAYERS => {
            let n = r.count(36)?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(LayerInfo {
                    meta: r.meta()?,
                    allocated: r.u64()?,
                });
            }
            Response::Layers(v)
        }
        R_RUNS => {
            let n = r.count(16)?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(Run {
                    start: r.u64()?,
                    len: r.u64()?,
                });
            }
            Response::Runs(v)
        }
        R_EXTENTS => {
            let n = r.count(9)?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push((r.u64()?, r.bool()?));
            }
            Response::Extents(v)
        }
        R_SUMS => {
            let n = r.count(16)?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let mut s = [0u8; 16];
                s.copy_from_slice(r.bytes(16)?);
                v.push(s);
            }
            Response::Checksums(v)
        }
        R_STATUS => Response::Status(StoreStatus {
            size: r.u64()?,
            cluster_size: r.u32()?,
            generation: Generation(r.u64()?),
            flush_seq: r.u64()?,
            head: LayerId(r.u64()?),
            layers: r.u32()?,
            index_memory: r.u64()?,
        }),
        R_ERROR => Response::Error {
            code: ErrorCode::from_u8(r.u8()?),
            message: r.str()?,
        },
        k => return Err(ProtoError::UnknownKind(k)),
    };
    r.end()?;
    Ok(resp)
}

/// Builds a frame header for a body.
pub fn frame_header(kind: u8, id: u64, body_len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&((body_len + 9) as u32).to_be_bytes());
    h[4] = kind;
    h[5..13].copy_from_slice(&id.to_be_bytes());
    h
}

/// Parses a frame header: returns kind, id and body length.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(u8, u64, u32), ProtoError> {
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    if len < 9 {
        return Err(ProtoError::Malformed("frame length"));
    }
    let body = len - 9;
    if body > MAX_BODY {
        return Err(ProtoError::TooLarge(body));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&h[5..13]);
    Ok((h[4], u64::from_be_bytes(id), body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta() -> LayerMeta {
        LayerMeta {
            id: LayerId(7),
            name: Some("s".into()),
            created: 1,
            user_created: true,
            rev: 2,
            in_sync: true,
            deleting: false,
        }
    }

    #[test]
    fn requests_round_trip() {
        let reqs = vec![
            Request::Hello {
                magic: MAGIC,
                version: VERSION,
                generation: Generation(3),
                volume: "v".into(),
            },
            Request::Write {
                offset: 5,
                fua: true,
                data: Bytes::from_static(b"abc"),
            },
            Request::Diff {
                from: "a".into(),
                to: None,
            },
            Request::ResetChain {
                layers: vec![meta(), meta()],
            },
            Request::ResetChain {
                layers: vec![LayerMeta {
                    name: None,
                    ..meta()
                }],
            },
            Request::ChecksumLayer {
                layer: LayerId(1),
                cluster: 2,
                count: 3,
            },
        ];
        for r in reqs {
            let (k, b) = encode_request(&r);
            assert_eq!(decode_request(k, &b), Ok(r));
        }
        let resps = vec![
            Response::Layers(vec![LayerInfo {
                meta: meta(),
                allocated: 9,
            }]),
            Response::Layers(vec![LayerInfo {
                meta: LayerMeta {
                    name: None,
                    ..meta()
                },
                allocated: 0,
            }]),
            Response::Runs(vec![Run { start: 1, len: 2 }]),
            Response::Checksums(vec![[3; 16]]),
            Response::Error {
                code: ErrorCode::StaleGeneration,
                message: "x".into(),
            },
        ];
        for r in resps {
            let (k, b) = encode_response(&r);
            assert_eq!(decode_response(k, b), Ok(r));
        }
    }

    proptest! {
        #[test]
        fn decoding_never_panics(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_request(kind, &body);
            let _ = decode_response(kind, Bytes::from(body.clone()));
            if body.len() >= HEADER_LEN {
                let mut h = [0u8; HEADER_LEN];
                h.copy_from_slice(&body[..HEADER_LEN]);
                let _ = parse_header(&h);
            }
        }
    }
}
