//! One supervisor task per volume on this node: the heartbeat hands it the volume's latest
//! orders and it applies them in order (replicas, engine, snapshots, backups, deletions), so
//! that a slow engine start, replica connect or backup holds up that volume alone.

use std::sync::Arc;
use std::time::Duration;

use zebu_api::model::*;
use zebu_engine::{Engine, EngineConfig};
use zebu_types::Generation;

use crate::{
    ApiHook, NodeAgent, NodeError, RevertTask, RunningEngine, VolumeOrders, snapshot_infos,
};

impl NodeAgent {
    /// Hands a volume's orders to its supervisor, starting one if it has none.
    pub(crate) fn dispatch(self: &Arc<Self>, volume: String, orders: VolumeOrders) {
        let Ok(mut sups) = self.supervisors.lock() else {
            return;
        };
        let orders = match sups.get(&volume) {
            Some(tx) => match tx.send(orders) {
                Ok(()) => return,
                Err(tokio::sync::watch::error::SendError(o)) => o,
            },
            None => orders,
        };
        let (tx, rx) = tokio::sync::watch::channel(orders);
        sups.insert(volume.clone(), tx);
        let agent = self.clone();
        tokio::spawn(async move { agent.supervise(volume, rx).await });
    }

    /// A volume's supervisor: applies its latest orders one after the other (replicas, engine,
    /// snapshots, backups, replica deletions), so that a slow engine start or replica connect
    /// holds up this volume alone. Ends once the volume has nothing here.
    async fn supervise(
        self: Arc<Self>,
        volume: String,
        mut rx: tokio::sync::watch::Receiver<VolumeOrders>,
    ) {
        loop {
            let orders = rx.borrow_and_update().clone();
            self.apply(&volume, &orders).await;
            if orders.is_empty() && !self.holds(&volume).await {
                // Newer orders sent meanwhile find the channel closed and start a new supervisor.
                if let Ok(mut sups) = self.supervisors.lock()
                    && sups
                        .get(&volume)
                        .is_some_and(|tx| tx.subscribe().same_channel(&rx))
                    && !rx.has_changed().unwrap_or(false)
                {
                    sups.remove(&volume);
                    return;
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Whether anything of the volume still runs here.
    async fn holds(&self, volume: &str) -> bool {
        self.engines.lock().await.contains_key(volume)
            || self.backups.lock().await.values().any(|(v, _)| v == volume)
    }

    async fn apply(&self, volume: &str, o: &VolumeOrders) {
        for ra in &o.replicas {
            if self.broken.lock().await.contains_key(&ra.name) {
                continue;
            }
            match self
                .start_replica(&ra.name, &ra.volume, ra.size, ra.backing_image.as_ref())
                .await
            {
                Ok(()) => {}
                Err(NodeError::BaseMissing(why)) => {
                    tracing::info!(replica = %ra.name, %why, "replica waits for its backing image");
                    continue;
                }
                Err(NodeError::BrokenStore(why)) => {
                    self.mark_broken(&ra.name, &why).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(volume, replica = %ra.name, error = %e, "cannot start replica");
                    continue;
                }
            }
            let svc = self
                .replicas
                .lock()
                .await
                .get(&ra.name)
                .map(|r| r.svc.clone());
            if let Some(svc) = svc {
                let cur = svc.read_store().size();
                if ra.size > cur
                    && let Err(e) = svc.write_store().expand(ra.size)
                {
                    tracing::error!(volume, replica = %ra.name, error = %e, "cannot expand replica");
                }
            }
        }
        // The engine first: one that stops flushes to its replicas before any of them goes.
        self.reconcile_engine(volume, o.engine.as_ref()).await;
        self.reconcile_snapshots(volume, &o.snapshots).await;
        self.reconcile_backups(volume, &o.backups).await;
        for name in &o.delete_replicas {
            self.delete_replica(name).await;
        }
    }

    /// Takes the volume's snapshots that should exist and deletes the ones that should not.
    async fn reconcile_snapshots(&self, volume: &str, ops: &[SnapshotOp]) {
        if ops.is_empty() {
            return;
        }
        let Some(engine) = self.engine(volume).await else {
            return;
        };
        let have = snapshot_infos(&engine).await;
        for op in ops {
            let exists = have.iter().any(|s| s.name == op.name);
            let res = match (op.delete, exists) {
                (false, false) => engine
                    .snapshot(Some(op.name.clone()), true)
                    .await
                    .map(|_| ()),
                (true, true) => engine.delete_snapshot(&op.name).await,
                _ => Ok(()),
            };
            if let Err(err) = res {
                tracing::warn!(volume, snapshot = %op.name, error = %err, "snapshot operation failed");
            }
        }
    }

    async fn engine(&self, volume: &str) -> Option<Arc<Engine>> {
        self.engines
            .lock()
            .await
            .get(volume)
            .map(|e| e.engine.clone())
    }

    /// Starts the volume's assigned backups, settles ones a restart interrupted, and forgets
    /// finished ones the manager has recorded.
    async fn reconcile_backups(&self, volume: &str, orders: &[BackupOrder]) {
        if let Some(image) = zebu_types::owner_image(volume) {
            return self.reconcile_image_backups(volume, image, orders).await;
        }
        let engine = self.engine(volume).await;
        self.drop_unordered_backups(volume, orders).await;
        self.waiting
            .lock()
            .await
            .retain(|name, v| v.1 != volume || orders.iter().any(|o| &o.name == name));
        for o in orders {
            if self.backups.lock().await.contains_key(&o.name) {
                continue;
            }
            let Some(engine) = &engine else {
                continue;
            };
            let task = if o.state == BackupState::InProgress {
                self.transfers.settle_interrupted(
                    o.clone(),
                    self.cfg.name.clone(),
                    self.wake.clone(),
                )
            } else {
                // A snapshot taken for the backup may arrive with the next assignments.
                let have = snapshot_infos(engine)
                    .await
                    .iter()
                    .any(|s| s.name == o.snapshot);
                let since = self
                    .waiting
                    .lock()
                    .await
                    .entry(o.name.clone())
                    .or_insert_with(|| (tokio::time::Instant::now(), volume.to_string()))
                    .0;
                if !have && since.elapsed() < Duration::from_secs(30) {
                    continue;
                }
                self.waiting.lock().await.remove(&o.name);
                self.transfers
                    .start_backup(engine.clone(), o.clone(), self.wake.clone())
            };
            self.backups
                .lock()
                .await
                .insert(o.name.clone(), (volume.to_string(), task));
        }
    }

    /// Forgets the backups of `volume` the manager no longer orders, stopping running ones.
    async fn drop_unordered_backups(&self, volume: &str, orders: &[BackupOrder]) {
        self.backups.lock().await.retain(|name, (v, t)| {
            let keep = v != volume || orders.iter().any(|o| &o.name == name);
            if !keep && !t.finished() {
                t.abort();
            }
            keep
        });
    }

    /// Backups of a backing image's copy here (owner `bi.<image>`): started from the ready
    /// copy's file, settled from the target after a restart.
    async fn reconcile_image_backups(&self, owner: &str, image: &str, orders: &[BackupOrder]) {
        self.drop_unordered_backups(owner, orders).await;
        for o in orders {
            if self.backups.lock().await.contains_key(&o.name) {
                continue;
            }
            let task = if o.state == BackupState::InProgress {
                self.transfers.settle_interrupted(
                    o.clone(),
                    self.cfg.name.clone(),
                    self.wake.clone(),
                )
            } else {
                let Some(path) = self.copies.ready_file(image) else {
                    continue;
                };
                self.transfers
                    .start_image_backup(path, o.clone(), self.wake.clone())
            };
            self.backups
                .lock()
                .await
                .insert(o.name.clone(), (owner.to_string(), task));
        }
    }

    /// Brings the volume's engine here to `want`: stops one that is not wanted (or has another
    /// generation), updates a running one, or opens it. The engine map is locked only briefly:
    /// opening, expanding and stopping run without it.
    async fn reconcile_engine(&self, volume: &str, want: Option<&EngineSpec>) {
        let stale = {
            let mut engines = self.engines.lock().await;
            match engines.get(volume) {
                Some(e) if want.is_none_or(|w| w.generation != e.generation) => {
                    engines.remove(volume)
                }
                _ => None,
            }
        };
        if let Some(e) = stale {
            self.exports.remove(volume);
            if let Err(err) = e.engine.flush().await {
                tracing::warn!(volume, error = %err, "flush while stopping the engine failed");
            }
            e.engine.stop().await;
            e.healer.abort();
            tracing::info!(volume, "engine stopped");
        }
        let Some(w) = want else {
            return;
        };
        let desired: Vec<(String, String)> = w
            .replicas
            .iter()
            .map(|r| (r.name.clone(), r.address.clone()))
            .collect();
        if let Some(engine) = self.engine(volume).await {
            engine.set_desired(desired);
            {
                let mut engines = self.engines.lock().await;
                if let Some(e) = engines.get_mut(volume) {
                    if let Some(snap) = &w.revert
                        && e.revert.as_ref().is_none_or(|t| &t.snapshot != snap)
                    {
                        e.revert = Some(RevertTask::start(engine.clone(), snap, self.wake.clone()));
                    }
                    if let Some(r) = &w.restore {
                        // A new order replaces a finished task; a running one completes first.
                        // A restore that completed is not run again for the same backup (the
                        // order's `from` moving to it is no reason); a failed one is, once
                        // `from` moves.
                        let start = match &e.restore {
                            None => true,
                            Some(t) => {
                                t.finished()
                                    && (t.backup() != r.backup
                                        || (t.from() != r.from && !t.succeeded()))
                            }
                        };
                        if start {
                            e.restore = Some(self.transfers.start_restore(
                                engine.clone(),
                                r.clone(),
                                8,
                                self.wake.clone(),
                            ));
                        }
                    }
                }
            }
            // Online expansion: the engine grows every replica in its set.
            if w.size > engine.size() {
                match engine.expand(w.size).await {
                    Ok(()) => tracing::info!(volume, size = w.size, "volume expanded"),
                    Err(err) => {
                        tracing::warn!(volume, size = w.size, error = %err, "cannot expand the volume yet")
                    }
                }
            }
            // An engine that rebuilt a detached volume is exported once it is attached here.
            let exported = self.exports.get(volume).is_some();
            if w.frontend && !exported {
                self.exports.insert(volume, engine.clone());
                tracing::info!(volume, "volume exported");
            } else if !w.frontend && exported {
                self.exports.remove(volume);
            }
            return;
        }
        let candidates: Vec<(String, String)> = w
            .replicas
            .iter()
            .filter(|r| r.candidate)
            .map(|r| (r.name.clone(), r.address.clone()))
            .collect();
        let cfg = EngineConfig {
            volume: w.volume.clone(),
            generation: Generation(w.generation),
            size: w.size,
            io_timeout: if w.replica_timeout > 0 {
                Duration::from_secs(w.replica_timeout)
            } else {
                self.cfg.io_timeout
            },
        };
        let hook = Arc::new(ApiHook {
            api: self.api.clone(),
        });
        match Engine::open(cfg, &candidates, hook).await {
            Ok(engine) => {
                let healer = engine.spawn_healer(desired, Duration::from_millis(500));
                if w.frontend {
                    self.exports.insert(volume, engine.clone());
                }
                let restore = w.restore.as_ref().map(|r| {
                    self.transfers
                        .start_restore(engine.clone(), r.clone(), 8, self.wake.clone())
                });
                let revert = w
                    .revert
                    .as_ref()
                    .map(|snap| RevertTask::start(engine.clone(), snap, self.wake.clone()));
                self.engine_errors.lock().await.remove(volume);
                tracing::info!(volume, generation = w.generation, "engine started");
                self.engines.lock().await.insert(
                    volume.to_string(),
                    RunningEngine {
                        engine,
                        generation: w.generation,
                        healer,
                        restore,
                        revert,
                    },
                );
                self.wake.notify_one();
            }
            Err(e) => {
                let msg = e.to_string();
                let fresh = self
                    .engine_errors
                    .lock()
                    .await
                    .insert(volume.to_string(), (w.generation, msg.clone()))
                    .is_none_or(|(_, m)| m != msg);
                if fresh {
                    tracing::warn!(volume, error = %msg, "engine cannot start yet");
                }
            }
        }
    }
}
