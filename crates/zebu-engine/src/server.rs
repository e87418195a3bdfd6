//! The replica server: serves one replica store over the replica protocol. Each connection's task
//! decodes frames and executes them in arrival order (so every replica applies a volume's writes
//! in the same order; syncs run in `block_in_place`), and a writer task sends the replies. A
//! background thread performs snapshot-delete merges in short steps. Services register their
//! listen address so an engine in the same process can call them directly.

use std::path::Path;
use std::sync::mpsc as stdmpsc;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::Instrument;
use zebu_replica::{CreateOptions, ReplicaStore, SnapshotSpec, StdVfs, StoreError};
use zebu_types::{Generation, LayerId};

use crate::proto::*;

/// Clusters merged per step of a background snapshot delete (bounds the I/O stall per step).
const MERGE_STEP: u64 = 16;

/// The head of every new replica: all replicas of a volume start with the same layer ids.
pub const INITIAL_HEAD: LayerId = LayerId(1);

/// Replica services listening in this process, by listen address, so an engine on the same node
/// can call them directly instead of over TCP.
fn local_registry()
-> &'static std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<ReplicaService>>> {
    static R: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<ReplicaService>>>,
    > = std::sync::OnceLock::new();
    R.get_or_init(Default::default)
}

/// One replica, served.
pub struct ReplicaService {
    volume: String,
    store: RwLock<ReplicaStore>,
    merge_wake: std::sync::Mutex<stdmpsc::Sender<()>>,
    stop: tokio::sync::watch::Sender<bool>,
}

fn store_error(e: &StoreError) -> Response {
    let code = match e {
        StoreError::Io { .. } => ErrorCode::Io,
        StoreError::OutOfRange { .. } => ErrorCode::OutOfRange,
        StoreError::Invalid(_) | StoreError::Exists(_) => ErrorCode::Invalid,
        StoreError::NoSnapshot(_) | StoreError::NoLayer(_) | StoreError::NotFound(_) => {
            ErrorCode::NotFound
        }
        StoreError::StaleGeneration { .. } => ErrorCode::StaleGeneration,
        StoreError::Corrupt { .. }
        | StoreError::UnsupportedVersion { .. }
        | StoreError::BaseMissing { .. } => ErrorCode::Corrupt,
    };
    Response::Error {
        code,
        message: e.to_string(),
    }
}

impl ReplicaService {
    /// Opens the replica in `dir`, or creates it with `size` bytes when none exists.
    pub fn open_or_create(
        dir: &Path,
        volume: &str,
        size: u64,
        cluster_size: u32,
        base: Option<zebu_replica::BaseMeta>,
    ) -> Result<Arc<ReplicaService>, StoreError> {
        let vfs = Arc::new(StdVfs);
        let store = match ReplicaStore::open(vfs.clone(), dir) {
            Ok(s) => s,
            Err(StoreError::NotFound(_)) => ReplicaStore::create(
                vfs,
                dir,
                CreateOptions {
                    size,
                    cluster_size,
                    head: INITIAL_HEAD,
                    base,
                },
            )?,
            Err(e) => return Err(e),
        };
        Ok(Self::new(volume, store))
    }

    pub fn new(volume: &str, store: ReplicaStore) -> Arc<ReplicaService> {
        let (tx, rx) = stdmpsc::channel();
        let svc = Arc::new(ReplicaService {
            volume: volume.to_string(),
            store: RwLock::new(store),
            merge_wake: std::sync::Mutex::new(tx),
            stop: tokio::sync::watch::channel(false).0,
        });
        let weak = Arc::downgrade(&svc);
        std::thread::Builder::new()
            .name("zebu-merge".into())
            .spawn(move || merge_loop(weak, rx))
            .ok();
        svc
    }

    pub fn read_store(&self) -> RwLockReadGuard<'_, ReplicaStore> {
        self.store.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn write_store(&self) -> RwLockWriteGuard<'_, ReplicaStore> {
        self.store.write().unwrap_or_else(|p| p.into_inner())
    }

    fn wake_merge(&self) {
        let _ = self.merge_wake.lock().map(|tx| tx.send(()));
    }

    /// Stops serving: the listener and every connection close (as if the process died, minus
    /// the loss of unflushed data).
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// The service listening on `addr` in this process, if any and still serving.
    pub fn lookup_local(addr: &str) -> Option<Arc<ReplicaService>> {
        let reg = local_registry().lock().unwrap_or_else(|p| p.into_inner());
        reg.get(addr)
            .and_then(std::sync::Weak::upgrade)
            .filter(|s| !s.is_stopped())
    }

    pub fn is_stopped(&self) -> bool {
        *self.stop.borrow()
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// Serves connections until the listener fails or [`Self::shutdown`].
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        if let Ok(a) = listener.local_addr() {
            let mut reg = local_registry().lock().unwrap_or_else(|p| p.into_inner());
            reg.retain(|_, w| w.strong_count() > 0);
            reg.insert(a.to_string(), Arc::downgrade(&self));
        }
        let mut stop = self.stop.subscribe();
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let (sock, peer) = tokio::select! {
                r = listener.accept() => r?,
                _ = stop.changed() => return Ok(()),
            };
            let _ = sock.set_nodelay(true);
            let svc = self.clone();
            let span = tracing::info_span!("replica_conn", volume = %self.volume, %peer);
            tokio::spawn(
                async move {
                    if let Err(e) = svc.handle_conn(sock).await {
                        tracing::info!(error = %e, "replica connection closed");
                    }
                }
                .instrument(span),
            );
        }
    }

    /// Serves one connection: a Hello first, then requests.
    pub async fn handle_conn<S>(self: Arc<Self>, stream: S) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let mut r = tokio::io::BufReader::with_capacity(256 * 1024, r);
        let mut w = BufWriter::with_capacity(256 * 1024, w);
        // Hello.
        let (kind, id, body) = read_frame(&mut r).await.map_err(|e| e.to_string())?;
        let req = decode_request(kind, &body).map_err(|e| e.to_string())?;
        let Request::Hello {
            magic,
            version,
            generation,
            volume,
        } = req
        else {
            return Err("first message was not Hello".into());
        };
        let refuse = if magic != MAGIC {
            Some((ErrorCode::Invalid, "bad magic".to_string()))
        } else if version != VERSION {
            Some((
                ErrorCode::Invalid,
                format!("protocol version {version} unsupported; this replica speaks {VERSION}"),
            ))
        } else if volume != self.volume {
            Some((
                ErrorCode::Invalid,
                format!(
                    "this replica belongs to volume {:?}, not {volume:?}",
                    self.volume
                ),
            ))
        } else {
            let svc = self.clone();
            let res = tokio::task::spawn_blocking(move || {
                svc.write_store().accept_generation(generation)
            })
            .await
            .map_err(|e| e.to_string())?;
            res.err()
                .map(|e| (ErrorCode::StaleGeneration, e.to_string()))
        };
        let resp = match &refuse {
            Some((code, message)) => Response::Error {
                code: *code,
                message: message.clone(),
            },
            None => Response::Ok,
        };
        write_frame(&mut w, id, &resp)
            .await
            .map_err(|e| e.to_string())?;
        w.flush().await.map_err(|e| e.to_string())?;
        if let Some((_, m)) = refuse {
            return Err(format!("refused session: {m}"));
        }
        // Requests.
        let (wtx, mut wrx) = mpsc::unbounded_channel::<(u64, Response)>();
        let writer = tokio::spawn(async move {
            while let Some((id, resp)) = wrx.recv().await {
                write_frame(&mut w, id, &resp).await?;
                if wrx.is_empty() {
                    w.flush().await?;
                }
            }
            Ok::<(), std::io::Error>(())
        });
        // Requests run in arrival order on this task: page-cache reads and writes inline, anything
        // that syncs or reshapes the chain off the async workers (block_in_place).
        let multi = tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread;
        let mut stop = self.stop.subscribe();
        let result = loop {
            if *stop.borrow() {
                break Err("replica shut down".into());
            }
            let frame = tokio::select! {
                f = read_frame(&mut r) => f,
                _ = stop.changed() => continue,
            };
            let (kind, id, body) = match frame {
                Ok(f) => f,
                Err(FrameError::Eof) => break Ok(()),
                Err(e) => break Err(e.to_string()),
            };
            match decode_request(kind, &body) {
                Ok(req) => {
                    let quick = matches!(
                        req,
                        Request::Read { .. }
                            | Request::ReadSnapshot { .. }
                            | Request::Write { fua: false, .. }
                            | Request::Zero { fua: false, .. }
                            | Request::Status
                            | Request::ListLayers
                            | Request::Allocation { .. }
                    );
                    let resp = if quick || !multi {
                        self.execute(generation, req)
                    } else {
                        tokio::task::block_in_place(|| self.execute(generation, req))
                    };
                    if wtx.send((id, resp)).is_err() {
                        break Ok(());
                    }
                }
                Err(e) => break Err(format!("malformed frame: {e}")),
            }
        };
        drop(wtx);
        let _ = writer.await;
        result
    }

    /// The store for reading, if session `generation` is still current; the check and the
    /// read that follows happen under one lock acquisition.
    fn read_fenced(
        &self,
        generation: Generation,
    ) -> Result<RwLockReadGuard<'_, ReplicaStore>, Response> {
        let s = self.read_store();
        fence(s.generation(), generation)?;
        Ok(s)
    }

    /// The store for writing, if session `generation` is still current: a newer session is
    /// accepted under the same write lock, so a stale session's change can never land after it.
    fn write_fenced(
        &self,
        generation: Generation,
    ) -> Result<RwLockWriteGuard<'_, ReplicaStore>, Response> {
        let s = self.write_store();
        fence(s.generation(), generation)?;
        Ok(s)
    }

    /// Executes one request of a session of `generation`.
    pub fn execute(&self, generation: Generation, req: Request) -> Response {
        self.execute_fenced(generation, req)
            .unwrap_or_else(|refused| refused)
    }

    fn execute_fenced(&self, generation: Generation, req: Request) -> Result<Response, Response> {
        let g = generation;
        let too_large = || Response::Error {
            code: ErrorCode::Invalid,
            message: "read too large".into(),
        };
        let res: Result<Response, StoreError> = match req {
            Request::Hello { .. } => Ok(Response::Error {
                code: ErrorCode::Invalid,
                message: "session already established".into(),
            }),
            Request::Read { offset, len } => {
                if len > MAX_BODY {
                    return Err(too_large());
                }
                let mut buf = vec![0u8; len as usize];
                self.read_fenced(g)?
                    .read(offset, &mut buf)
                    .map(|_| Response::Data(Bytes::from(buf)))
            }
            Request::Write { offset, fua, data } => {
                let mut s = self.write_fenced(g)?;
                s.write(offset, &data)
                    .and_then(|_| if fua { s.flush() } else { Ok(()) })
                    .map(|_| Response::Ok)
            }
            Request::Zero { offset, len, fua } => {
                let mut s = self.write_fenced(g)?;
                s.zero(offset, len)
                    .and_then(|_| if fua { s.flush() } else { Ok(()) })
                    .map(|_| Response::Ok)
            }
            Request::Flush => self.write_fenced(g)?.flush().map(|_| Response::Ok),
            Request::Snapshot {
                name,
                new_head,
                created,
                user_created,
                in_sync,
            } => self
                .write_fenced(g)?
                .snapshot(&SnapshotSpec {
                    name,
                    new_head,
                    created,
                    user_created,
                    in_sync,
                })
                .map(|_| Response::Ok),
            Request::DeleteSnapshot { name } => {
                let r = self
                    .write_fenced(g)?
                    .delete_snapshot(&name)
                    .map(|_| Response::Ok);
                self.wake_merge();
                r
            }
            Request::Revert {
                name,
                new_head,
                created,
            } => self
                .write_fenced(g)?
                .revert(&name, new_head, created)
                .map(|_| Response::Ok),
            Request::Expand { size } => self.write_fenced(g)?.expand(size).map(|_| Response::Ok),
            Request::ListLayers => Ok(Response::Layers(self.read_fenced(g)?.layers())),
            Request::Diff { from, to } => self
                .read_fenced(g)?
                .diff(&from, to.as_deref())
                .map(Response::Runs),
            Request::Allocation { offset, len } => self
                .read_fenced(g)?
                .allocation(offset, len)
                .map(Response::Extents),
            Request::LayerRuns { layer } => {
                self.read_fenced(g)?.layer_runs(layer).map(Response::Runs)
            }
            Request::ReadLayer {
                layer,
                cluster,
                count,
            } => {
                let s = self.read_fenced(g)?;
                if count as u64 * s.cluster_size() > MAX_BODY as u64 {
                    return Err(too_large());
                }
                s.read_layer(layer, cluster, count as u64)
                    .map(|b| Response::Data(Bytes::from(b)))
            }
            Request::WriteLayer {
                layer,
                cluster,
                data,
            } => self
                .write_fenced(g)?
                .write_layer(layer, cluster, &data)
                .map(|_| Response::Ok),
            Request::ChecksumLayer {
                layer,
                cluster,
                count,
            } => self
                .read_fenced(g)?
                .checksum_layer(layer, cluster, count as u64)
                .map(Response::Checksums),
            Request::UnsetLayer {
                layer,
                cluster,
                count,
            } => self
                .write_fenced(g)?
                .unset_layer(layer, cluster, count as u64)
                .map(|_| Response::Ok),
            Request::MarkInSync { layer, rev } => self
                .write_fenced(g)?
                .mark_in_sync(layer, rev)
                .map(|_| Response::Ok),
            Request::ResetChain { layers } => {
                let r = self
                    .write_fenced(g)?
                    .reset_chain(&layers)
                    .map(|_| Response::Ok);
                self.wake_merge();
                r
            }
            Request::Status => Ok(Response::Status(self.read_fenced(g)?.status())),
            Request::ReadSnapshot { name, offset, len } => {
                if len > MAX_BODY {
                    return Err(too_large());
                }
                let mut buf = vec![0u8; len as usize];
                self.read_fenced(g)?
                    .read_snapshot(&name, offset, &mut buf)
                    .map(|_| Response::Data(Bytes::from(buf)))
            }
        };
        Ok(res.unwrap_or_else(|e| store_error(&e)))
    }
}

/// Refuses a session older than the one the replica accepted last.
fn fence(current: Generation, mine: Generation) -> Result<(), Response> {
    if current > mine {
        return Err(Response::Error {
            code: ErrorCode::StaleGeneration,
            message: format!("session generation {mine} was superseded by {current}"),
        });
    }
    Ok(())
}

fn merge_loop(svc: std::sync::Weak<ReplicaService>, wake: stdmpsc::Receiver<()>) {
    loop {
        let Some(s) = svc.upgrade() else { return };
        let more = {
            let mut st = s.write_store();
            if st.merge_pending() {
                match st.merge_step(MERGE_STEP) {
                    Ok(more) => more,
                    Err(e) => {
                        tracing::error!(error = %e, "snapshot merge step failed; will retry");
                        false
                    }
                }
            } else {
                false
            }
        };
        drop(s);
        if !more {
            match wake.recv_timeout(Duration::from_secs(1)) {
                Err(stdmpsc::RecvTimeoutError::Disconnected) => return,
                _ => continue,
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Eof,
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Proto(#[from] ProtoError),
}

/// Reads one frame: kind, id and body.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u8, u64, Bytes), FrameError> {
    let mut h = [0u8; HEADER_LEN];
    match r.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Eof),
        Err(e) => return Err(e.into()),
    }
    let (kind, id, len) = parse_header(&h)?;
    let mut body = bytes::BytesMut::zeroed(len as usize);
    r.read_exact(&mut body).await?;
    Ok((kind, id, body.freeze()))
}

async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    id: u64,
    resp: &Response,
) -> std::io::Result<()> {
    let (kind, body) = encode_response(resp);
    w.write_all(&frame_header(kind, id, body.len())).await?;
    w.write_all(&body).await
}
