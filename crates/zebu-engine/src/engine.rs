//! The engine: serves one volume by replicating every write to all active replicas.
//!
//! Contract (DESIGN.md §4.1): a WRITE is acknowledged when every active replica (RW and WO) applied
//! it; FLUSH when every active replica made earlier writes durable. A replica that errors or times
//! out leaves the active set through [`EngineHook::replica_failed`], which must persist the fact
//! before it returns; no I/O is acknowledged while such a change is being persisted. Reads go to
//! RW replicas. With no RW replica left, I/O fails.
//!
//! Over 800 lines on purpose: I/O ordering, failure recording and rebuild share the submit lock and the membership state; splitting them would expose both.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::OnceCell;
use zebu_replica::{LayerInfo, Run};
use zebu_types::{Generation, LayerId};

use crate::client::{ClientError, ReplicaClient};
use crate::proto::{ErrorCode, Request, Response, encode_request};

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A replica's role in the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// In sync: takes writes and serves reads.
    RW,
    /// Rebuilding: takes writes, serves no reads.
    WO,
    /// Left the active set.
    ERR,
}

impl Mode {
    fn from_u8(v: u8) -> Mode {
        match v {
            0 => Mode::RW,
            1 => Mode::WO,
            _ => Mode::ERR,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Mode::RW => 0,
            Mode::WO => 1,
            Mode::ERR => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::RW => "RW",
            Mode::WO => "WO",
            Mode::ERR => "ERR",
        }
    }
}

/// Where the engine reports membership changes; the control plane persists them.
pub trait EngineHook: Send + Sync + 'static {
    /// A replica left the active set. Must be durable before this returns Ok.
    fn replica_failed<'a>(
        &'a self,
        volume: &'a str,
        replica: &'a str,
        generation: Generation,
        reason: &'a str,
    ) -> BoxFut<'a, Result<(), String>>;
    /// A replica's mode changed (WO when it joins for a rebuild, RW when the rebuild is done).
    fn replica_mode<'a>(
        &'a self,
        volume: &'a str,
        replica: &'a str,
        generation: Generation,
        mode: Mode,
    ) -> BoxFut<'a, Result<(), String>>;
}

/// A hook that keeps events in memory and logs them (standalone use and tests).
#[derive(Default)]
pub struct LogHook {
    pub events: Mutex<Vec<String>>,
}

impl EngineHook for LogHook {
    fn replica_failed<'a>(
        &'a self,
        volume: &'a str,
        replica: &'a str,
        generation: Generation,
        reason: &'a str,
    ) -> BoxFut<'a, Result<(), String>> {
        Box::pin(async move {
            tracing::warn!(volume, replica, %generation, reason, "replica left the active set");
            if let Ok(mut e) = self.events.lock() {
                e.push(format!("failed {replica}: {reason}"));
            }
            Ok(())
        })
    }

    fn replica_mode<'a>(
        &'a self,
        volume: &'a str,
        replica: &'a str,
        generation: Generation,
        mode: Mode,
    ) -> BoxFut<'a, Result<(), String>> {
        Box::pin(async move {
            tracing::info!(volume, replica, %generation, mode = mode.as_str(), "replica mode");
            if let Ok(mut e) = self.events.lock() {
                e.push(format!("mode {replica} {}", mode.as_str()));
            }
            Ok(())
        })
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("no healthy replica is left")]
    NoReplicas,
    #[error("a newer engine session took over this volume")]
    Fenced,
    #[error("could not record a replica failure: {0}")]
    Hook(String),
    #[error("{0}")]
    Invalid(String),
    #[error("replica error: {0}")]
    Replica(#[from] ClientError),
}

/// Progress of a rebuild, in bytes of allocated layer data.
#[derive(Debug, Default)]
pub struct RebuildProgress {
    pub total: AtomicU64,
    pub copied: AtomicU64,
    pub skipped: AtomicU64,
}

/// A snapshot of rebuild progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RebuildStats {
    pub total: u64,
    pub copied: u64,
    pub skipped: u64,
}

pub struct ReplicaSlot {
    pub name: String,
    pub addr: String,
    client: Arc<ReplicaClient>,
    mode: AtomicU8,
    failure: OnceCell<Result<(), String>>,
    progress: RebuildProgress,
}

impl ReplicaSlot {
    fn new(name: &str, addr: &str, client: Arc<ReplicaClient>, mode: Mode) -> Arc<ReplicaSlot> {
        Arc::new(ReplicaSlot {
            name: name.to_string(),
            addr: addr.to_string(),
            client,
            mode: AtomicU8::new(mode.as_u8()),
            failure: OnceCell::new(),
            progress: RebuildProgress::default(),
        })
    }

    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::SeqCst))
    }
}

/// What the engine reports about one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaReport {
    pub name: String,
    pub addr: String,
    pub mode: Mode,
    pub rebuild: RebuildStats,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub volume: String,
    pub generation: Generation,
    pub size: u64,
    /// Deadline for one replica I/O before the replica counts as failed.
    pub io_timeout: Duration,
}

pub struct Engine {
    cfg: EngineConfig,
    size: AtomicU64,
    set: RwLock<Arc<Vec<Arc<ReplicaSlot>>>>,
    /// Held while requests are queued to every replica, so all replicas see the same order.
    submit: Mutex<()>,
    /// Broadcasts waiting for `submit`: when some wait, local replicas queue their changes
    /// instead of running them under the lock.
    submit_waiters: std::sync::atomic::AtomicUsize,
    /// I/O holds it shared; snapshots and rebuild joins hold it exclusively (a consistent point).
    gate: tokio::sync::RwLock<()>,
    /// Held exclusively while a membership change is persisted; I/O takes it shared before it
    /// answers, so nothing is acknowledged on a set that is not yet recorded.
    membership: tokio::sync::RwLock<()>,
    /// Serialises control operations (snapshot, delete, revert, rebuild).
    control: tokio::sync::Mutex<()>,
    hook: Arc<dyn EngineHook>,
    rr: AtomicUsize,
    /// Replicas the healer keeps in the set: (name, address).
    desired: Mutex<Vec<(String, String)>>,
    /// Set by [`Engine::stop`]: every later I/O fails.
    stopped: std::sync::atomic::AtomicBool,
    stats: crate::stats::IoStats,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How many clusters a rebuild compares and copies per request.
const REBUILD_BATCH: u64 = 16;

impl Engine {
    /// Starts an engine over replicas that are in sync with each other (a new volume, or the
    /// set the control plane chose). Every replica must answer.
    pub async fn start(
        cfg: EngineConfig,
        replicas: &[(String, String)],
        hook: Arc<dyn EngineHook>,
    ) -> Result<Arc<Engine>, EngineError> {
        let mut slots = Vec::new();
        for (name, addr) in replicas {
            let client =
                ReplicaClient::connect(addr, &cfg.volume, cfg.generation, cfg.io_timeout).await?;
            slots.push(ReplicaSlot::new(name, addr, client, Mode::RW));
        }
        Ok(Self::assemble(cfg, slots, hook))
    }

    fn assemble(
        cfg: EngineConfig,
        slots: Vec<Arc<ReplicaSlot>>,
        hook: Arc<dyn EngineHook>,
    ) -> Arc<Engine> {
        Arc::new(Engine {
            size: AtomicU64::new(cfg.size),
            cfg,
            set: RwLock::new(Arc::new(slots)),
            submit: Mutex::new(()),
            submit_waiters: std::sync::atomic::AtomicUsize::new(0),
            gate: tokio::sync::RwLock::new(()),
            membership: tokio::sync::RwLock::new(()),
            control: tokio::sync::Mutex::new(()),
            hook,
            rr: AtomicUsize::new(0),
            desired: Mutex::new(Vec::new()),
            stopped: std::sync::atomic::AtomicBool::new(false),
            stats: crate::stats::IoStats::default(),
        })
    }

    /// Stops the engine: in-flight I/O finishes, later I/O fails as fenced.
    pub async fn stop(&self) {
        let _g = self.gate.write().await;
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// I/O counters and latency histograms.
    pub fn stats(&self) -> &crate::stats::IoStats {
        &self.stats
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Sets the replicas the healer keeps in the set; replicas not named leave it.
    pub fn set_desired(&self, desired: Vec<(String, String)>) {
        let names: std::collections::HashSet<&String> = desired.iter().map(|(n, _)| n).collect();
        {
            let mut set = self.set.write().unwrap_or_else(|p| p.into_inner());
            let keep: Vec<Arc<ReplicaSlot>> = set
                .iter()
                .filter(|s| names.contains(&s.name) || s.mode() == Mode::RW && names.is_empty())
                .cloned()
                .collect();
            // Never drop the last RW replica this way.
            if keep.iter().any(|s| s.mode() == Mode::RW) {
                *set = Arc::new(keep);
            }
        }
        *lock(&self.desired) = desired;
    }

    /// Starts an engine after a restart: connects to every candidate replica that answers, takes
    /// the freshest one (highest flush sequence) as the source of truth and leaves the others to
    /// be rebuilt from it (see [`Self::spawn_healer`]).
    pub async fn open(
        cfg: EngineConfig,
        candidates: &[(String, String)],
        hook: Arc<dyn EngineHook>,
    ) -> Result<Arc<Engine>, EngineError> {
        let mut best: Option<(u64, String, Arc<ReplicaClient>)> = None;
        let mut last_err = EngineError::NoReplicas;
        for (name, addr) in candidates {
            match ReplicaClient::connect(addr, &cfg.volume, cfg.generation, cfg.io_timeout).await {
                Ok(client) => match client
                    .call(&Request::Status)
                    .await
                    .and_then(Response::into_status)
                {
                    Ok(st) => {
                        if best.as_ref().is_none_or(|(seq, _, _)| st.flush_seq > *seq) {
                            best = Some((st.flush_seq, name.clone(), client));
                        }
                    }
                    Err(e) => last_err = e.into(),
                },
                Err(e) => last_err = e.into(),
            }
        }
        let Some((_, name, client)) = best else {
            return Err(last_err);
        };
        let addr = client.addr().to_string();
        let slot = ReplicaSlot::new(&name, &addr, client, Mode::RW);
        Ok(Self::assemble(cfg, vec![slot], hook))
    }

    pub fn volume(&self) -> &str {
        &self.cfg.volume
    }

    pub fn generation(&self) -> Generation {
        self.cfg.generation
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    pub fn io_timeout(&self) -> Duration {
        self.cfg.io_timeout
    }

    fn slots(&self) -> Arc<Vec<Arc<ReplicaSlot>>> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The replicas and their modes.
    pub fn replicas(&self) -> Vec<ReplicaReport> {
        self.slots()
            .iter()
            .map(|s| ReplicaReport {
                name: s.name.clone(),
                addr: s.addr.clone(),
                mode: s.mode(),
                rebuild: RebuildStats {
                    total: s.progress.total.load(Ordering::Relaxed),
                    copied: s.progress.copied.load(Ordering::Relaxed),
                    skipped: s.progress.skipped.load(Ordering::Relaxed),
                },
            })
            .collect()
    }

    /// Takes a replica out of the active set and waits until the hook has recorded it.
    async fn fail_replica(&self, slot: &ReplicaSlot, reason: &str) -> Result<(), EngineError> {
        let res = slot
            .failure
            .get_or_init(|| async {
                let _m = self.membership.write().await;
                slot.mode.store(Mode::ERR.as_u8(), Ordering::SeqCst);
                self.hook
                    .replica_failed(&self.cfg.volume, &slot.name, self.cfg.generation, reason)
                    .await
            })
            .await;
        res.clone().map_err(EngineError::Hook)
    }

    /// Waits for any membership change in progress to be recorded before an answer goes out.
    async fn settle(&self) {
        drop(self.membership.read().await);
    }

    fn check(e: &ClientError) -> Option<EngineError> {
        match e {
            ClientError::Remote {
                code: ErrorCode::StaleGeneration,
                ..
            } => Some(EngineError::Fenced),
            _ => None,
        }
    }

    /// Sends `make(slot)` to every active replica in one order and waits for all. Failed replicas
    /// leave the set. Succeeds when at least one RW replica applied it.
    async fn broadcast<F>(&self, make: F) -> Result<Vec<(Arc<ReplicaSlot>, Response)>, EngineError>
    where
        F: Fn(&ReplicaSlot) -> Request,
    {
        let slots = self.slots();
        let mut waits = Vec::with_capacity(slots.len());
        {
            self.submit_waiters.fetch_add(1, Ordering::Relaxed);
            let _s = lock(&self.submit);
            self.submit_waiters.fetch_sub(1, Ordering::Relaxed);
            // Alone: a local replica may run the request in place (no hand-off to its thread).
            let alone = self.submit_waiters.load(Ordering::Relaxed) == 0;
            let mut shared: Option<(u8, Bytes)> = None;
            for slot in slots.iter().filter(|s| s.mode() != Mode::ERR) {
                let req = make(slot);
                if slot.client.is_local() {
                    waits.push((slot.clone(), slot.client.submit_local(&req, alone)));
                    continue;
                }
                // Identical requests are encoded once.
                let (kind, body) = match &shared {
                    Some((k, b))
                        if matches!(
                            req,
                            Request::Write { .. } | Request::Zero { .. } | Request::Flush
                        ) =>
                    {
                        (*k, b.clone())
                    }
                    _ => {
                        let e = encode_request(&req);
                        shared = Some(e.clone());
                        e
                    }
                };
                waits.push((slot.clone(), slot.client.submit(kind, body)));
            }
        }
        let mut ok = Vec::with_capacity(waits.len());
        let mut rw_ok = 0;
        for (slot, p) in waits {
            let r = match p {
                Ok(p) => p.wait().await,
                Err(e) => Err(e),
            };
            match r {
                Ok(resp) => {
                    if slot.mode() == Mode::RW {
                        rw_ok += 1;
                    }
                    ok.push((slot, resp));
                }
                Err(e) => {
                    if let Some(fatal) = Self::check(&e) {
                        return Err(fatal);
                    }
                    self.fail_replica(&slot, &e.to_string()).await?;
                }
            }
        }
        self.settle().await;
        if rw_ok == 0 {
            return Err(EngineError::NoReplicas);
        }
        Ok(ok)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        match offset.checked_add(len) {
            Some(e) if e <= self.size() => Ok(()),
            _ => Err(EngineError::Invalid(format!(
                "range {offset}+{len} is outside the volume"
            ))),
        }
    }

    fn check_running(&self) -> Result<(), EngineError> {
        if self.is_stopped() {
            Err(EngineError::Fenced)
        } else {
            Ok(())
        }
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        let t = std::time::Instant::now();
        let len = data.len() as u64;
        let r = self.write_inner(offset, data, fua).await;
        self.stats.write.record(len, t.elapsed(), r.is_ok());
        r
    }

    async fn write_inner(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        self.check_range(offset, data.len() as u64)?;
        self.check_running()?;
        let _g = self.gate.read().await;
        self.broadcast(|_| Request::Write {
            offset,
            fua,
            data: data.clone(),
        })
        .await
        .map(|_| ())
    }

    pub async fn zero(&self, offset: u64, len: u64, fua: bool) -> Result<(), EngineError> {
        let t = std::time::Instant::now();
        let r = self.zero_inner(offset, len, fua).await;
        self.stats.zero.record(len, t.elapsed(), r.is_ok());
        r
    }

    async fn zero_inner(&self, offset: u64, len: u64, fua: bool) -> Result<(), EngineError> {
        self.check_range(offset, len)?;
        self.check_running()?;
        let _g = self.gate.read().await;
        self.broadcast(|_| Request::Zero { offset, len, fua })
            .await
            .map(|_| ())
    }

    pub async fn flush(&self) -> Result<(), EngineError> {
        let t = std::time::Instant::now();
        let r = self.flush_inner().await;
        self.stats.flush.record(0, t.elapsed(), r.is_ok());
        r
    }

    async fn flush_inner(&self) -> Result<(), EngineError> {
        self.check_running()?;
        let _g = self.gate.read().await;
        self.broadcast(|_| Request::Flush).await.map(|_| ())
    }

    /// Sends a request to one RW replica, moving to the next when one fails.
    async fn read_one(&self, req: &Request) -> Result<Response, EngineError> {
        loop {
            let slots = self.slots();
            let rws: Vec<&Arc<ReplicaSlot>> =
                slots.iter().filter(|s| s.mode() == Mode::RW).collect();
            if rws.is_empty() {
                return Err(EngineError::NoReplicas);
            }
            let slot = rws[self.rr.fetch_add(1, Ordering::Relaxed) % rws.len()];
            match slot.client.call(req).await {
                Ok(r) => {
                    self.settle().await;
                    return Ok(r);
                }
                // A request the replica finds invalid (unknown snapshot, out of range) is the
                // caller's error, not the replica's.
                Err(ClientError::Remote {
                    code: ErrorCode::Invalid | ErrorCode::NotFound | ErrorCode::OutOfRange,
                    message,
                }) => return Err(EngineError::Invalid(message)),
                Err(e) => {
                    if let Some(fatal) = Self::check(&e) {
                        return Err(fatal);
                    }
                    self.fail_replica(slot, &e.to_string()).await?;
                }
            }
        }
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, EngineError> {
        let t = std::time::Instant::now();
        let r = self.read_inner(offset, len).await;
        self.stats.read.record(len as u64, t.elapsed(), r.is_ok());
        r
    }

    async fn read_inner(&self, offset: u64, len: u32) -> Result<Bytes, EngineError> {
        self.check_range(offset, len as u64)?;
        self.check_running()?;
        let _g = self.gate.read().await;
        Ok(self
            .read_one(&Request::Read { offset, len })
            .await?
            .into_data_of(len)?)
    }

    /// Reads the volume as snapshot `name` saw it (from one healthy replica).
    pub async fn read_snapshot(
        &self,
        name: &str,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, EngineError> {
        self.check_range(offset, len as u64)?;
        let req = Request::ReadSnapshot {
            name: name.to_string(),
            offset,
            len,
        };
        Ok(self.read_one(&req).await?.into_data_of(len)?)
    }

    /// Allocation extents `(length, allocated)` of a range.
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, EngineError> {
        self.check_range(offset, len)?;
        Ok(self
            .read_one(&Request::Allocation { offset, len })
            .await?
            .into_extents()?)
    }

    /// The snapshot chain as a healthy replica has it (bottom first, head last).
    pub async fn layers(&self) -> Result<Vec<LayerInfo>, EngineError> {
        Ok(self.read_one(&Request::ListLayers).await?.into_layers()?)
    }

    /// Takes a snapshot at one consistent point on every active replica. Returns its name.
    pub async fn snapshot(
        &self,
        name: Option<String>,
        user_created: bool,
    ) -> Result<String, EngineError> {
        let _c = self.control.lock().await;
        let _g = self.gate.write().await;
        self.snapshot_locked(name, user_created).await
    }

    async fn snapshot_locked(
        &self,
        name: Option<String>,
        user_created: bool,
    ) -> Result<String, EngineError> {
        let name = name.unwrap_or_else(|| format!("snap-{:016x}", rand::random::<u64>()));
        if name.is_empty() || name.len() > 255 || name.contains('/') {
            return Err(EngineError::Invalid(format!(
                "invalid snapshot name {name:?}"
            )));
        }
        let new_head = LayerId(rand::random());
        let created = now();
        self.broadcast(|slot| Request::Snapshot {
            name: name.clone(),
            new_head,
            created,
            user_created,
            in_sync: slot.mode() == Mode::RW,
        })
        .await?;
        Ok(name)
    }

    pub async fn delete_snapshot(&self, name: &str) -> Result<(), EngineError> {
        let _c = self.control.lock().await;
        self.broadcast(|_| Request::DeleteSnapshot {
            name: name.to_string(),
        })
        .await
        .map(|_| ())
    }

    pub async fn revert(&self, name: &str) -> Result<(), EngineError> {
        let _c = self.control.lock().await;
        let _g = self.gate.write().await;
        let new_head = LayerId(rand::random());
        let created = now();
        self.broadcast(|_| Request::Revert {
            name: name.to_string(),
            new_head,
            created,
        })
        .await
        .map(|_| ())
    }

    pub async fn expand(&self, size: u64) -> Result<(), EngineError> {
        let _c = self.control.lock().await;
        let _g = self.gate.write().await;
        if size < self.size() {
            return Err(EngineError::Invalid("volumes only grow".into()));
        }
        self.broadcast(|_| Request::Expand { size }).await?;
        self.size.store(size, Ordering::SeqCst);
        Ok(())
    }

    /// Clusters changed between snapshot `from` and `to` (or the head).
    pub async fn diff(&self, from: &str, to: Option<&str>) -> Result<Vec<Run>, EngineError> {
        let req = Request::Diff {
            from: from.to_string(),
            to: to.map(str::to_string),
        };
        Ok(self.read_one(&req).await?.into_runs()?)
    }

    /// Adds a replica and rebuilds it while I/O continues: it joins the write set at once (WO),
    /// the sealed layers are copied from a healthy replica (skipping clusters whose checksums
    /// already match), and it becomes RW. A replica with the same name that had failed is
    /// replaced.
    pub async fn add_replica(&self, name: &str, addr: &str) -> Result<RebuildStats, EngineError> {
        let client = ReplicaClient::connect(
            addr,
            &self.cfg.volume,
            self.cfg.generation,
            self.cfg.io_timeout,
        )
        .await?;
        let _c = self.control.lock().await;
        let slot = ReplicaSlot::new(name, addr, client, Mode::WO);
        let slow = self.cfg.io_timeout * 4;
        let snap = format!("rebuild-{:016x}", rand::random::<u64>());
        let source;
        {
            // A consistent point: no I/O in flight while the chains are aligned and sealed.
            let _g = self.gate.write().await;
            if self
                .slots()
                .iter()
                .any(|s| s.name == name && s.mode() != Mode::ERR)
            {
                return Err(EngineError::Invalid(format!(
                    "replica {name} is already active"
                )));
            }
            self.broadcast(|_| Request::Flush).await?;
            source = self
                .slots()
                .iter()
                .find(|s| s.mode() == Mode::RW)
                .cloned()
                .ok_or(EngineError::NoReplicas)?;
            let layers = source
                .client
                .call(&Request::ListLayers)
                .await?
                .into_layers()?;
            let metas = layers.into_iter().map(|l| l.meta).collect();
            slot.client
                .call_slow(&Request::ResetChain { layers: metas }, slow)
                .await?;
            {
                let _m = self.membership.write().await;
                self.hook
                    .replica_mode(&self.cfg.volume, name, self.cfg.generation, Mode::WO)
                    .await
                    .map_err(EngineError::Hook)?;
                let mut set = self.set.write().unwrap_or_else(|p| p.into_inner());
                let mut v: Vec<Arc<ReplicaSlot>> =
                    set.iter().filter(|s| s.name != name).cloned().collect();
                v.push(slot.clone());
                *set = Arc::new(v);
            }
            if let Err(e) = self.snapshot_locked(Some(snap.clone()), false).await {
                self.remove_slot(&slot);
                return Err(e);
            }
            if slot.mode() == Mode::ERR {
                self.remove_slot(&slot);
                return Err(EngineError::Invalid(format!(
                    "replica {name} failed while joining"
                )));
            }
        }
        match self.copy_layers(&source, &slot).await {
            Ok(()) => {}
            Err(e) => {
                self.fail_replica(&slot, &format!("rebuild failed: {e}"))
                    .await?;
                return Err(e);
            }
        }
        {
            let _m = self.membership.write().await;
            self.hook
                .replica_mode(&self.cfg.volume, name, self.cfg.generation, Mode::RW)
                .await
                .map_err(EngineError::Hook)?;
            slot.mode.store(Mode::RW.as_u8(), Ordering::SeqCst);
        }
        // The rebuild's snapshot served its purpose; folding the (small) head down into it keeps
        // rebuilds from piling up system snapshots.
        if let Err(e) = self
            .broadcast(|_| Request::DeleteSnapshot { name: snap.clone() })
            .await
        {
            tracing::warn!(volume = %self.cfg.volume, snapshot = %snap, error = %e, "could not drop the rebuild snapshot");
        }
        let stats = RebuildStats {
            total: slot.progress.total.load(Ordering::Relaxed),
            copied: slot.progress.copied.load(Ordering::Relaxed),
            skipped: slot.progress.skipped.load(Ordering::Relaxed),
        };
        tracing::info!(volume = %self.cfg.volume, replica = name, ?stats, "rebuild done");
        Ok(stats)
    }

    fn remove_slot(&self, slot: &Arc<ReplicaSlot>) {
        let mut set = self.set.write().unwrap_or_else(|p| p.into_inner());
        let v: Vec<Arc<ReplicaSlot>> = set
            .iter()
            .filter(|s| !Arc::ptr_eq(s, slot))
            .cloned()
            .collect();
        *set = Arc::new(v);
    }

    async fn copy_layers(&self, src: &ReplicaSlot, dst: &ReplicaSlot) -> Result<(), EngineError> {
        let src_layers = src.client.call(&Request::ListLayers).await?.into_layers()?;
        let dst_layers = dst.client.call(&Request::ListLayers).await?.into_layers()?;
        let cs = src
            .client
            .call(&Request::Status)
            .await?
            .into_status()?
            .cluster_size as u64;
        let sealed = &src_layers[..src_layers.len().saturating_sub(1)];
        let total: u64 = sealed.iter().map(|l| l.allocated).sum();
        dst.progress.total.store(total, Ordering::Relaxed);
        for layer in sealed {
            let id = layer.meta.id;
            let theirs = dst_layers.iter().find(|l| l.meta.id == id);
            if theirs.is_some_and(|t| t.meta.in_sync && t.meta.rev == layer.meta.rev) {
                dst.progress
                    .skipped
                    .fetch_add(layer.allocated, Ordering::Relaxed);
                continue;
            }
            // Every cluster either side holds.
            let mut union = zebu_replica::bitmap::ClusterMap::new();
            for side in [src, dst] {
                for r in side
                    .client
                    .call(&Request::LayerRuns { layer: id })
                    .await?
                    .into_runs()?
                {
                    union.apply(r, true);
                }
            }
            for run in union.runs() {
                let mut c = run.start;
                while c < run.end() {
                    let n = (run.end() - c).min(REBUILD_BATCH);
                    let req = Request::ChecksumLayer {
                        layer: id,
                        cluster: c,
                        count: n as u32,
                    };
                    let a = src.client.call(&req).await?.into_checksums()?;
                    let b = dst.client.call(&req).await?.into_checksums()?;
                    if a.len() != n as usize || b.len() != n as usize {
                        return Err(EngineError::Replica(ClientError::Unexpected));
                    }
                    let mut i = 0usize;
                    while i < n as usize {
                        if a[i] == b[i] {
                            if a[i] != [0; 16] {
                                dst.progress.skipped.fetch_add(cs, Ordering::Relaxed);
                            }
                            i += 1;
                            continue;
                        }
                        // A run of differing clusters of one kind (data or hole).
                        let hole = a[i] == [0; 16];
                        let mut j = i + 1;
                        while j < n as usize && a[j] != b[j] && (a[j] == [0; 16]) == hole {
                            j += 1;
                        }
                        let start = c + i as u64;
                        let count = (j - i) as u32;
                        if hole {
                            dst.client
                                .call(&Request::UnsetLayer {
                                    layer: id,
                                    cluster: start,
                                    count,
                                })
                                .await?;
                        } else {
                            let req = Request::ReadLayer {
                                layer: id,
                                cluster: start,
                                count,
                            };
                            let data = src.client.call(&req).await?.into_data()?;
                            dst.client
                                .call(&Request::WriteLayer {
                                    layer: id,
                                    cluster: start,
                                    data,
                                })
                                .await?;
                            dst.progress
                                .copied
                                .fetch_add(count as u64 * cs, Ordering::Relaxed);
                        }
                        i = j;
                    }
                    c += n;
                }
            }
            dst.client
                .call_slow(
                    &Request::MarkInSync {
                        layer: id,
                        rev: layer.meta.rev,
                    },
                    self.cfg.io_timeout * 4,
                )
                .await?;
        }
        Ok(())
    }

    /// Self-healing: every `every`, each replica of `desired` that is not active is
    /// (re)connected and rebuilt. [`Self::set_desired`] changes the list later.
    pub fn spawn_healer(
        self: &Arc<Self>,
        desired: Vec<(String, String)>,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        *lock(&self.desired) = desired;
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(engine) = weak.upgrade() else { return };
                if engine.is_stopped() {
                    return;
                }
                let slots = engine.slots();
                let desired = lock(&engine.desired).clone();
                for (name, addr) in &desired {
                    let active = slots
                        .iter()
                        .any(|s| &s.name == name && s.mode() != Mode::ERR && &s.addr == addr);
                    if active {
                        continue;
                    }
                    match engine.add_replica(name, addr).await {
                        Ok(stats) => tracing::info!(replica = %name, ?stats, "replica rebuilt"),
                        Err(e) => {
                            tracing::debug!(replica = %name, error = %e, "replica not back yet")
                        }
                    }
                }
                drop(engine);
                tokio::time::sleep(every).await;
            }
        })
    }
}

fn errno(e: &EngineError) -> u32 {
    match e {
        EngineError::Invalid(_) => zebu_nbd::proto::EINVAL,
        EngineError::Fenced => zebu_nbd::proto::ESHUTDOWN,
        _ => zebu_nbd::proto::EIO,
    }
}

fn dev_err(e: EngineError) -> zebu_nbd::DeviceError {
    zebu_nbd::DeviceError {
        errno: errno(&e),
        message: e.to_string(),
    }
}

impl zebu_nbd::BlockDevice for Engine {
    fn size(&self) -> u64 {
        Engine::size(self)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, zebu_nbd::DeviceError> {
        Engine::read(self, offset, len).await.map_err(dev_err)
    }

    async fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), zebu_nbd::DeviceError> {
        Engine::write(self, offset, data, fua)
            .await
            .map_err(dev_err)
    }

    async fn zero(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        _trim: bool,
    ) -> Result<(), zebu_nbd::DeviceError> {
        Engine::zero(self, offset, len as u64, fua)
            .await
            .map_err(dev_err)
    }

    async fn flush(&self) -> Result<(), zebu_nbd::DeviceError> {
        Engine::flush(self).await.map_err(dev_err)
    }

    async fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<zebu_nbd::Extent>, zebu_nbd::DeviceError> {
        let ext = self.allocation(offset, len as u64).await.map_err(dev_err)?;
        Ok(ext
            .into_iter()
            .map(|(len, allocated)| zebu_nbd::Extent {
                len,
                flags: if allocated {
                    0
                } else {
                    zebu_nbd::proto::STATE_HOLE | zebu_nbd::proto::STATE_ZERO
                },
            })
            .collect())
    }
}
