//! The NBD server: fixed-newstyle handshake, then a pipelined transmission phase that runs each
//! request as its own task and writes replies (simple or structured) as they complete.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::sync::{Arc, RwLock};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};

use crate::proto::*;

/// Largest READ or WRITE payload accepted (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Requests in flight per connection before the reader waits.
const MAX_IN_FLIGHT: usize = 128;

/// One extent of block status: a length and `base:allocation` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub flags: u32,
}

/// An error a device returns for one request, with the NBD errno to send.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct DeviceError {
    pub errno: u32,
    pub message: String,
}

impl DeviceError {
    pub fn io(message: impl Into<String>) -> Self {
        Self {
            errno: EIO,
            message: message.into(),
        }
    }
}

/// What an export serves. Offsets and lengths arrive already checked against `size()`.
pub trait BlockDevice: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, DeviceError>> + Send;
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// WRITE_ZEROES (`trim` false) and TRIM (`trim` true); both leave zeros behind in Zebu.
    fn zero(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        trim: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;
    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send;
    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<Extent>, DeviceError>> + Send;
}

/// The named exports a server offers; changeable while it runs.
pub struct Exports<D> {
    inner: RwLock<BTreeMap<String, Arc<D>>>,
}

impl<D> Default for Exports<D> {
    fn default() -> Self {
        Self {
            inner: RwLock::new(BTreeMap::new()),
        }
    }
}

impl<D> Exports<D> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, name: &str, dev: Arc<D>) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), dev);
    }

    pub fn remove(&self, name: &str) -> Option<Arc<D>> {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
    }

    pub fn get(&self, name: &str) -> Option<Arc<D>> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl From<Malformed> for ConnError {
    fn from(m: Malformed) -> Self {
        ConnError::Protocol(m.0.to_string())
    }
}

/// Accepts connections forever, serving each on its own task.
pub async fn serve<D: BlockDevice>(
    listener: TcpListener,
    exports: Arc<Exports<D>>,
) -> io::Result<()> {
    loop {
        let (sock, peer) = listener.accept().await?;
        let _ = sock.set_nodelay(true);
        let exports = exports.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_client(sock, exports).await {
                tracing::debug!(%peer, error = %e, "nbd connection ended");
            }
        });
    }
}

struct Negotiated<D> {
    dev: Arc<D>,
    structured: bool,
    base_allocation: bool,
}

async fn opt_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut b = BytesMut::with_capacity(20 + data.len());
    b.put_u64(OPT_REPLY_MAGIC);
    b.put_u32(opt);
    b.put_u32(kind);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    w.write_all(&b).await?;
    w.flush().await
}

async fn opt_error<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    msg: &str,
) -> io::Result<()> {
    opt_reply(w, opt, kind, msg.as_bytes()).await
}

fn transmission_flags() -> u16 {
    TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_CAN_MULTI_CONN
}

/// Runs the handshake; returns the export to serve, or `None` when the client ended it.
async fn handshake<D, R, W>(
    r: &mut R,
    w: &mut W,
    exports: &Exports<D>,
) -> Result<Option<Negotiated<D>>, ConnError>
where
    D: BlockDevice,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(NBDMAGIC);
    hello.put_u64(IHAVEOPT);
    hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    w.write_all(&hello).await?;
    w.flush().await?;
    let cflags = r.read_u32().await?;
    if cflags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(ConnError::Protocol(format!(
            "unknown client flags {cflags:#x}"
        )));
    }
    let no_zeroes = cflags & CLIENT_NO_ZEROES != 0;
    let mut structured = false;
    // Contexts chosen by SET_META_CONTEXT, with the export they were chosen for.
    let mut meta: Option<String> = None;
    loop {
        let magic = r.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(ConnError::Protocol(format!("bad option magic {magic:#x}")));
        }
        let opt = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_OPTION_LEN {
            // Too large to read into memory: refuse politely, then skip it.
            let mut left = len as u64;
            let mut sink = vec![0u8; 64 * 1024];
            while left > 0 {
                let n = left.min(sink.len() as u64) as usize;
                r.read_exact(&mut sink[..n]).await?;
                left -= n as u64;
            }
            opt_error(w, opt, REP_ERR_TOO_BIG, "option data too large").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8(data)
                    .map_err(|_| ConnError::Protocol("export name is not UTF-8".into()))?;
                let Some(dev) = exports.get(&name) else {
                    // The protocol has no error reply here: close.
                    return Err(ConnError::Protocol(format!("unknown export {name:?}")));
                };
                let mut b = BytesMut::with_capacity(134);
                b.put_u64(dev.size());
                b.put_u16(transmission_flags());
                if !no_zeroes {
                    b.put_bytes(0, 124);
                }
                w.write_all(&b).await?;
                w.flush().await?;
                return Ok(Some(Negotiated {
                    dev,
                    structured,
                    base_allocation: false,
                }));
            }
            OPT_ABORT => {
                let _ = opt_reply(w, opt, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    opt_error(w, opt, REP_ERR_INVALID, "LIST takes no data").await?;
                    continue;
                }
                for name in exports.names() {
                    let mut b = BytesMut::new();
                    b.put_u32(name.len() as u32);
                    b.put_slice(name.as_bytes());
                    opt_reply(w, opt, REP_SERVER, &b).await?;
                }
                opt_reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    opt_error(w, opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data").await?;
                } else {
                    structured = true;
                    opt_reply(w, opt, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let listing = opt == OPT_LIST_META_CONTEXT;
                if !structured {
                    opt_error(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        "negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                let req = match parse_meta_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        opt_error(w, opt, REP_ERR_INVALID, &e.to_string()).await?;
                        continue;
                    }
                };
                if exports.get(&req.export).is_none() {
                    opt_error(w, opt, REP_ERR_UNKNOWN, "no such export").await?;
                    continue;
                }
                let hits = match_contexts(&req.queries, listing);
                if !listing {
                    meta = (!hits.is_empty()).then(|| req.export.clone());
                }
                for (id, name) in hits {
                    let mut b = BytesMut::new();
                    b.put_u32(if listing { 0 } else { id });
                    b.put_slice(name.as_bytes());
                    opt_reply(w, opt, REP_META_CONTEXT, &b).await?;
                }
                opt_reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let req = match parse_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        opt_error(w, opt, REP_ERR_INVALID, &e.to_string()).await?;
                        continue;
                    }
                };
                let Some(dev) = exports.get(&req.name) else {
                    opt_error(w, opt, REP_ERR_UNKNOWN, "no such export").await?;
                    continue;
                };
                let mut b = BytesMut::new();
                b.put_u16(INFO_EXPORT);
                b.put_u64(dev.size());
                b.put_u16(transmission_flags());
                opt_reply(w, opt, REP_INFO, &b).await?;
                if req.infos.contains(&INFO_BLOCK_SIZE) {
                    let mut b = BytesMut::new();
                    b.put_u16(INFO_BLOCK_SIZE);
                    b.put_u32(1);
                    b.put_u32(4096);
                    b.put_u32(MAX_PAYLOAD);
                    opt_reply(w, opt, REP_INFO, &b).await?;
                }
                if req.infos.contains(&INFO_NAME) {
                    let mut b = BytesMut::new();
                    b.put_u16(INFO_NAME);
                    b.put_slice(req.name.as_bytes());
                    opt_reply(w, opt, REP_INFO, &b).await?;
                }
                opt_reply(w, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    let base_allocation = meta.as_deref() == Some(req.name.as_str());
                    return Ok(Some(Negotiated {
                        dev,
                        structured,
                        base_allocation,
                    }));
                }
            }
            OPT_STARTTLS => {
                opt_error(w, opt, REP_ERR_POLICY, "TLS is not offered").await?;
            }
            _ => {
                opt_error(w, opt, REP_ERR_UNSUP, "option not supported").await?;
            }
        }
    }
}

/// A reply, already encoded as one or more buffers.
type Reply = Vec<Bytes>;

fn simple_reply(cookie: u64, error: u32, data: Option<Bytes>) -> Reply {
    let mut h = BytesMut::with_capacity(16);
    h.put_u32(SIMPLE_REPLY_MAGIC);
    h.put_u32(error);
    h.put_u64(cookie);
    let mut v = vec![h.freeze()];
    if let Some(d) = data {
        v.push(d);
    }
    v
}

fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> BytesMut {
    let mut h = BytesMut::with_capacity(20);
    h.put_u32(STRUCTURED_REPLY_MAGIC);
    h.put_u16(flags);
    h.put_u16(kind);
    h.put_u64(cookie);
    h.put_u32(len);
    h
}

fn error_reply(structured: bool, cookie: u64, errno: u32, msg: &str) -> Reply {
    if !structured {
        return simple_reply(cookie, errno, None);
    }
    let msg = &msg.as_bytes()[..msg.len().min(1024)];
    let mut h = chunk_header(CHUNK_FLAG_DONE, CHUNK_ERROR, cookie, 6 + msg.len() as u32);
    h.put_u32(errno);
    h.put_u16(msg.len() as u16);
    h.put_slice(msg);
    vec![h.freeze()]
}

fn ok_reply(structured: bool, cookie: u64) -> Reply {
    if structured {
        vec![chunk_header(CHUNK_FLAG_DONE, CHUNK_NONE, cookie, 0).freeze()]
    } else {
        simple_reply(cookie, 0, None)
    }
}

fn read_reply(structured: bool, cookie: u64, offset: u64, data: Bytes) -> Reply {
    if structured {
        let mut h = chunk_header(
            CHUNK_FLAG_DONE,
            CHUNK_OFFSET_DATA,
            cookie,
            8 + data.len() as u32,
        );
        h.put_u64(offset);
        vec![h.freeze(), data]
    } else {
        simple_reply(cookie, 0, Some(data))
    }
}

fn status_reply(cookie: u64, extents: &[Extent], limit: u64, one: bool) -> Reply {
    let mut body = BytesMut::new();
    body.put_u32(1);
    let mut total = 0u64;
    for e in extents {
        if total >= limit || e.len == 0 {
            break;
        }
        let len = e.len.min(limit - total).min(u32::MAX as u64 & !4095);
        body.put_u32(len as u32);
        body.put_u32(e.flags);
        total += len;
        if one {
            break;
        }
    }
    let mut h = chunk_header(
        CHUNK_FLAG_DONE,
        CHUNK_BLOCK_STATUS,
        cookie,
        body.len() as u32,
    );
    h.put_slice(&body);
    vec![h.freeze()]
}

/// Serves one client connection through handshake and transmission.
pub async fn handle_client<D, S>(stream: S, exports: Arc<Exports<D>>) -> Result<(), ConnError>
where
    D: BlockDevice,
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    let mut r = tokio::io::BufReader::with_capacity(256 * 1024, r);
    let mut w = BufWriter::with_capacity(256 * 1024, w);
    let Some(neg) = handshake(&mut r, &mut w, &exports).await? else {
        return Ok(());
    };
    let (tx, mut rx) = mpsc::channel::<Reply>(MAX_IN_FLIGHT * 2);
    let writer = tokio::spawn(async move {
        while let Some(reply) = rx.recv().await {
            for b in reply {
                w.write_all(&b).await?;
            }
            if rx.is_empty() {
                w.flush().await?;
            }
        }
        w.flush().await?;
        Ok::<(), io::Error>(())
    });
    let result = transmission(&mut r, &neg, &tx).await;
    drop(tx);
    // Wait until every in-flight request has answered.
    let wres = writer.await;
    result?;
    match wres {
        Ok(r) => r.map_err(ConnError::from),
        Err(e) => Err(ConnError::Io(io::Error::other(e))),
    }
}

async fn transmission<D, R>(
    r: &mut R,
    neg: &Negotiated<D>,
    tx: &mpsc::Sender<Reply>,
) -> Result<(), ConnError>
where
    D: BlockDevice,
    R: AsyncRead + Unpin,
{
    let sem = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let st = neg.structured;
    loop {
        let mut hb = [0u8; REQUEST_LEN];
        match r.read_exact(&mut hb).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let h = parse_request(&hb)?;
        let size = neg.dev.size();
        let in_range = h
            .offset
            .checked_add(h.length as u64)
            .is_some_and(|e| e <= size);
        let fua = h.flags & CMD_FLAG_FUA != 0;
        let cookie = h.cookie;
        // Payload of a WRITE is read before anything else, to keep the stream in step.
        let payload = if h.kind == CMD_WRITE {
            if h.length > MAX_PAYLOAD {
                return Err(ConnError::Protocol(format!(
                    "write of {} bytes exceeds the maximum",
                    h.length
                )));
            }
            let mut buf = BytesMut::zeroed(h.length as usize);
            r.read_exact(&mut buf).await?;
            Some(buf.freeze())
        } else {
            None
        };
        let immediate = |errno: u32, msg: &str| error_reply(st, cookie, errno, msg);
        let early: Option<Reply> = match h.kind {
            CMD_DISC => return Ok(()),
            CMD_READ if h.length > MAX_PAYLOAD => Some(immediate(EINVAL, "read too large")),
            CMD_READ | CMD_TRIM | CMD_BLOCK_STATUS if !in_range => {
                Some(immediate(EINVAL, "request beyond the end of the export"))
            }
            CMD_WRITE | CMD_WRITE_ZEROES if !in_range => {
                Some(immediate(ENOSPC, "request beyond the end of the export"))
            }
            CMD_BLOCK_STATUS if !neg.base_allocation => {
                Some(immediate(EINVAL, "no metadata context was negotiated"))
            }
            CMD_WRITE_ZEROES if h.flags & CMD_FLAG_FAST_ZERO != 0 => {
                // Zeroing is always fast here, but the flag was not advertised.
                Some(immediate(EINVAL, "FAST_ZERO was not negotiated"))
            }
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS => {
                None
            }
            CMD_CACHE => Some(immediate(EINVAL, "CACHE is not supported")),
            _ => Some(immediate(EINVAL, "unknown command")),
        };
        if let Some(reply) = early {
            if tx.send(reply).await.is_err() {
                return Ok(());
            }
            continue;
        }
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ConnError::Protocol("closed".into()))?;
        let dev = neg.dev.clone();
        let tx = tx.clone();
        let one = h.flags & CMD_FLAG_REQ_ONE != 0;
        tokio::spawn(async move {
            let reply = match h.kind {
                CMD_READ => match dev.read(h.offset, h.length).await {
                    Ok(data) => read_reply(st, cookie, h.offset, data),
                    Err(e) => error_reply(st, cookie, e.errno, &e.message),
                },
                CMD_WRITE => {
                    let data = payload.unwrap_or_default();
                    match dev.write(h.offset, data, fua).await {
                        Ok(()) => ok_reply(st, cookie),
                        Err(e) => error_reply(st, cookie, e.errno, &e.message),
                    }
                }
                CMD_FLUSH => match dev.flush().await {
                    Ok(()) => ok_reply(st, cookie),
                    Err(e) => error_reply(st, cookie, e.errno, &e.message),
                },
                CMD_TRIM | CMD_WRITE_ZEROES => {
                    match dev.zero(h.offset, h.length, fua, h.kind == CMD_TRIM).await {
                        Ok(()) => ok_reply(st, cookie),
                        Err(e) => error_reply(st, cookie, e.errno, &e.message),
                    }
                }
                _ => match dev.block_status(h.offset, h.length).await {
                    Ok(ext) => status_reply(cookie, &ext, h.length as u64, one),
                    Err(e) => error_reply(st, cookie, e.errno, &e.message),
                },
            };
            let _ = tx.send(reply).await;
            drop(permit);
        });
    }
}
