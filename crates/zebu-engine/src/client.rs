//! The engine's side of the replica protocol: one TCP connection per replica, pipelined. Requests
//! are queued in order (the order the replica applies them); replies are matched by id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use zebu_types::Generation;

use crate::proto::*;
use crate::server::{ReplicaService, read_frame};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("connection to replica lost")]
    Closed,
    #[error("replica did not answer within {0:?}")]
    Timeout(Duration),
    #[error("replica refused: {message}")]
    Remote { code: ErrorCode, message: String },
    #[error("unexpected reply from replica")]
    Unexpected,
}

type Waiter = oneshot::Sender<Result<Response, ClientError>>;

/// A request for a local replica's executor thread, with where its answer goes.
type LocalJob = (Request, Waiter);

/// A connected replica: over TCP, or called directly when it runs in this process.
pub struct ReplicaClient {
    addr: String,
    timeout: Duration,
    local: Option<(Arc<ReplicaService>, Generation)>,
    /// A local replica's changes run on a thread of their own, in submission order: the
    /// engine's submit lock is held only to enqueue, and no runtime worker waits on file I/O.
    local_queue: Option<std::sync::mpsc::Sender<LocalJob>>,
    /// Changes queued to the local I/O thread and not yet answered.
    local_inflight: Arc<AtomicU64>,
    tx: mpsc::UnboundedSender<(u8, u64, Bytes)>,
    pending: Arc<Mutex<HashMap<u64, Waiter>>>,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
}

/// A submitted request waiting for its reply.
pub struct Pending {
    rx: Option<oneshot::Receiver<Result<Response, ClientError>>>,
    ready: Option<Response>,
    timeout: Duration,
}

fn remote_result(r: Response) -> Result<Response, ClientError> {
    match r {
        Response::Error { code, message } => Err(ClientError::Remote { code, message }),
        r => Ok(r),
    }
}

impl Pending {
    pub async fn wait(self) -> Result<Response, ClientError> {
        if let Some(r) = self.ready {
            return remote_result(r);
        }
        let Some(rx) = self.rx else {
            return Err(ClientError::Closed);
        };
        match tokio::time::timeout(self.timeout, rx).await {
            Err(_) => Err(ClientError::Timeout(self.timeout)),
            Ok(Err(_)) => Err(ClientError::Closed),
            Ok(Ok(Ok(Response::Error { code, message }))) => {
                Err(ClientError::Remote { code, message })
            }
            Ok(Ok(r)) => r,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ReplicaClient {
    /// Connects and opens a session of `generation` for `volume`.
    pub async fn connect(
        addr: &str,
        volume: &str,
        generation: Generation,
        timeout: Duration,
    ) -> Result<Arc<ReplicaClient>, ClientError> {
        // A replica served by this process is called directly, with the same checks as over TCP.
        if let Some(svc) = ReplicaService::lookup_local(addr) {
            if svc.volume() != volume {
                return Err(ClientError::Remote {
                    code: ErrorCode::Invalid,
                    message: format!(
                        "this replica belongs to volume {:?}, not {volume:?}",
                        svc.volume()
                    ),
                });
            }
            let s2 = svc.clone();
            tokio::task::spawn_blocking(move || s2.write_store().accept_generation(generation))
                .await
                .map_err(|_| ClientError::Closed)?
                .map_err(|e| ClientError::Remote {
                    code: ErrorCode::StaleGeneration,
                    message: e.to_string(),
                })?;
            let (tx, _) = mpsc::unbounded_channel();
            let (qtx, qrx) = std::sync::mpsc::channel::<LocalJob>();
            let inflight = Arc::new(AtomicU64::new(0));
            let (s3, g3, f3) = (svc.clone(), generation, inflight.clone());
            std::thread::Builder::new()
                .name("zebu-local-io".into())
                .spawn(move || {
                    // Ends when the client (the sender) goes.
                    while let Ok((req, reply)) = qrx.recv() {
                        let resp = if s3.is_stopped() {
                            Err(ClientError::Closed)
                        } else {
                            Ok(s3.execute(g3, req))
                        };
                        let _ = reply.send(resp);
                        f3.fetch_sub(1, Ordering::SeqCst);
                    }
                })
                .map_err(|e| ClientError::Connect {
                    addr: addr.to_string(),
                    message: format!("cannot start the local replica's I/O thread: {e}"),
                })?;
            return Ok(Arc::new(ReplicaClient {
                addr: addr.to_string(),
                timeout,
                local: Some((svc, generation)),
                local_queue: Some(qtx),
                local_inflight: inflight,
                tx,
                pending: Arc::new(Mutex::new(HashMap::new())),
                next_id: AtomicU64::new(1),
                closed: Arc::new(AtomicBool::new(false)),
            }));
        }
        let cerr = |m: String| ClientError::Connect {
            addr: addr.to_string(),
            message: m,
        };
        let sock = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| cerr("timed out".into()))?
            .map_err(|e| cerr(e.to_string()))?;
        let _ = sock.set_nodelay(true);
        let (r, w) = sock.into_split();
        let mut r = tokio::io::BufReader::with_capacity(256 * 1024, r);
        let mut w = BufWriter::with_capacity(256 * 1024, w);
        let (tx, mut rx) = mpsc::unbounded_channel::<(u8, u64, Bytes)>();
        let pending: Arc<Mutex<HashMap<u64, Waiter>>> = Arc::new(Mutex::new(HashMap::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let c2 = closed.clone();
        tokio::spawn(async move {
            while let Some((kind, id, body)) = rx.recv().await {
                let ok = w
                    .write_all(&frame_header(kind, id, body.len()))
                    .await
                    .is_ok()
                    && w.write_all(&body).await.is_ok()
                    && (!rx.is_empty() || w.flush().await.is_ok());
                if !ok {
                    break;
                }
            }
            c2.store(true, Ordering::SeqCst);
        });
        let p2 = pending.clone();
        let c3 = closed.clone();
        tokio::spawn(async move {
            while let Ok((kind, id, body)) = read_frame(&mut r).await {
                let resp = decode_response(kind, body).map_err(|_| ClientError::Unexpected);
                let bad = resp.is_err();
                if let Some(w) = lock(&p2).remove(&id) {
                    let _ = w.send(resp);
                }
                if bad {
                    break;
                }
            }
            c3.store(true, Ordering::SeqCst);
            // Fail everything still waiting.
            lock(&p2).clear();
        });
        let client = Arc::new(ReplicaClient {
            addr: addr.to_string(),
            timeout,
            local: None,
            local_queue: None,
            local_inflight: Arc::new(AtomicU64::new(0)),
            tx,
            pending,
            next_id: AtomicU64::new(1),
            closed,
        });
        let hello = Request::Hello {
            magic: MAGIC,
            version: VERSION,
            generation,
            volume: volume.to_string(),
        };
        match client.call(&hello).await {
            Ok(Response::Ok) => Ok(client),
            Ok(_) => Err(ClientError::Unexpected),
            Err(e) => Err(e),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn is_closed(&self) -> bool {
        match &self.local {
            Some((svc, _)) => svc.is_stopped(),
            None => self.closed.load(Ordering::SeqCst),
        }
    }

    /// Whether the replica runs in this process (requests execute in place).
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// Runs a request on a local replica in order with every other submit: reads at once (a
    /// read in flight with a write may see either, as over the wire), everything that changes
    /// the replica on its I/O thread, in submission order.
    fn execute_local(
        &self,
        svc: &ReplicaService,
        generation: Generation,
        req: Request,
    ) -> Result<Pending, ClientError> {
        self.execute_local_as(svc, generation, req, false)
    }

    /// Like [`ReplicaClient::submit_request`] for a local replica: with `alone` (no other
    /// submitter waiting) and nothing queued, a write runs in place, saving the hand-off to
    /// the I/O thread; otherwise it is queued (order kept either way: nothing is queued ahead).
    pub fn submit_local(&self, req: &Request, alone: bool) -> Result<Pending, ClientError> {
        match &self.local {
            Some((svc, generation)) => self.execute_local_as(svc, *generation, req.clone(), alone),
            None => self.submit_request(req),
        }
    }

    fn execute_local_as(
        &self,
        svc: &ReplicaService,
        generation: Generation,
        req: Request,
        alone: bool,
    ) -> Result<Pending, ClientError> {
        if svc.is_stopped() {
            return Err(ClientError::Closed);
        }
        let read_only = matches!(
            req,
            Request::Read { .. }
                | Request::ReadSnapshot { .. }
                | Request::Status
                | Request::ListLayers
                | Request::Diff { .. }
                | Request::Allocation { .. }
                | Request::LayerRuns { .. }
                | Request::ReadLayer { .. }
                | Request::ChecksumLayer { .. }
        );
        let in_place = alone
            && self.local_inflight.load(Ordering::SeqCst) == 0
            && matches!(
                req,
                Request::Write { fua: false, .. } | Request::Zero { fua: false, .. }
            );
        if !read_only
            && !in_place
            && let Some(q) = &self.local_queue
        {
            let (wtx, rx) = oneshot::channel();
            self.local_inflight.fetch_add(1, Ordering::SeqCst);
            if q.send((req, wtx)).is_err() {
                self.local_inflight.fetch_sub(1, Ordering::SeqCst);
                return Err(ClientError::Closed);
            }
            return Ok(Pending {
                rx: Some(rx),
                ready: None,
                timeout: self.timeout,
            });
        }
        let quick = matches!(
            req,
            Request::Read { .. }
                | Request::ReadSnapshot { .. }
                | Request::Status
                | Request::ListLayers
        );
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let resp = if quick || !multi {
            svc.execute(generation, req)
        } else {
            tokio::task::block_in_place(|| svc.execute(generation, req))
        };
        Ok(Pending {
            rx: None,
            ready: Some(resp),
            timeout: self.timeout,
        })
    }

    /// Submits a request; a local replica executes it at once.
    pub fn submit_request(&self, req: &Request) -> Result<Pending, ClientError> {
        if let Some((svc, generation)) = &self.local {
            return self.execute_local(svc, *generation, req.clone());
        }
        let (kind, body) = encode_request(req);
        self.submit(kind, body)
    }

    /// Queues an already-encoded request; the reply arrives through the returned [`Pending`].
    pub fn submit(&self, kind: u8, body: Bytes) -> Result<Pending, ClientError> {
        if let Some((svc, generation)) = &self.local {
            let req = decode_request(kind, &body).map_err(|_| ClientError::Unexpected)?;
            return self.execute_local(svc, *generation, req);
        }
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (wtx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, wtx);
        if self.tx.send((kind, id, body)).is_err() {
            lock(&self.pending).remove(&id);
            return Err(ClientError::Closed);
        }
        Ok(Pending {
            rx: Some(rx),
            ready: None,
            timeout: self.timeout,
        })
    }

    /// Sends a request and waits for its reply.
    pub async fn call(&self, req: &Request) -> Result<Response, ClientError> {
        self.submit_request(req)?.wait().await
    }

    /// Like [`Self::call`] with a longer deadline, for operations such as snapshot or flush of a
    /// large head.
    pub async fn call_slow(
        &self,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let mut p = self.submit_request(req)?;
        p.timeout = timeout;
        p.wait().await
    }
}

/// Typed views of a reply; any other kind of reply is [`ClientError::Unexpected`].
impl Response {
    pub fn into_data(self) -> Result<Bytes, ClientError> {
        match self {
            Response::Data(d) => Ok(d),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Data of exactly `len` bytes.
    pub fn into_data_of(self, len: u32) -> Result<Bytes, ClientError> {
        self.into_data().and_then(|d| {
            if d.len() == len as usize {
                Ok(d)
            } else {
                Err(ClientError::Unexpected)
            }
        })
    }

    pub fn into_layers(self) -> Result<Vec<zebu_replica::LayerInfo>, ClientError> {
        match self {
            Response::Layers(l) => Ok(l),
            _ => Err(ClientError::Unexpected),
        }
    }

    pub fn into_runs(self) -> Result<Vec<zebu_replica::Run>, ClientError> {
        match self {
            Response::Runs(r) => Ok(r),
            _ => Err(ClientError::Unexpected),
        }
    }

    pub fn into_extents(self) -> Result<Vec<(u64, bool)>, ClientError> {
        match self {
            Response::Extents(e) => Ok(e),
            _ => Err(ClientError::Unexpected),
        }
    }

    pub fn into_checksums(self) -> Result<Vec<[u8; 16]>, ClientError> {
        match self {
            Response::Checksums(c) => Ok(c),
            _ => Err(ClientError::Unexpected),
        }
    }

    pub fn into_status(self) -> Result<zebu_replica::StoreStatus, ClientError> {
        match self {
            Response::Status(s) => Ok(s),
            _ => Err(ClientError::Unexpected),
        }
    }
}
