//! Nodes and their heartbeats: a node's report applied to the store and answered with its
//! assignments, engine replica events recorded before the I/O answers, node maintenance
//! (scheduling, eviction, deletion), and the long-poll that wakes a node with work.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::controller::LastBeat;
use crate::controller::{Manager, conflict, not_found, now};
use crate::model::*;
use crate::store::{self, Field, Store, StoreError};
use crate::txn::Txn;
use crate::{ApiError, ErrorKind};

impl Manager {
    /// Changes whether new replicas may go to a node, and whether it is being evicted (evicting
    /// also stops scheduling there).
    pub fn update_node(
        &self,
        name: &str,
        allow_scheduling: Option<bool>,
        evict: Option<bool>,
    ) -> Result<Node, ApiError> {
        store::get::<Node>(&*self.store, name)?.ok_or_else(|| not_found("node", name))?;
        let n = store::modify::<Node>(&*self.store, name, |n| {
            let before = n.spec.clone();
            if let Some(e) = evict {
                n.spec.evict = e;
                if e {
                    n.spec.allow_scheduling = false;
                }
            }
            if let Some(a) = allow_scheduling {
                n.spec.allow_scheduling = a;
            }
            n.spec != before
        })?
        .ok_or_else(|| not_found("node", name))?;
        tracing::info!(
            node = name,
            scheduling = n.spec.allow_scheduling,
            evict = n.spec.evict,
            "node updated"
        );
        Ok(n)
    }

    /// Deletes a node object. Refused while it holds replicas or runs engines; replicas on it
    /// that are already being deleted go with it (their files are on a machine that is gone).
    pub fn delete_node(&self, name: &str) -> Result<Node, ApiError> {
        let s = &*self.store;
        let n = store::get::<Node>(s, name)?.ok_or_else(|| not_found("node", name))?;
        let reps: Vec<Replica> = store::list::<Replica>(s)?
            .into_iter()
            .filter(|r| r.spec.node == name)
            .collect();
        let held: Vec<&str> = reps
            .iter()
            .filter(|r| r.metadata.deletion_requested.is_none())
            .map(|r| r.metadata.name.as_str())
            .collect();
        if !held.is_empty() {
            return Err(conflict(
                "NodeInUse",
                format!(
                    "node {name:?} holds replicas {}; evict it first (zebu node evict {name})",
                    held.join(", ")
                ),
            ));
        }
        let engines: Vec<String> = store::list::<Engine>(s)?
            .into_iter()
            .filter(|e| e.spec.node == name)
            .map(|e| e.spec.volume)
            .collect();
        if !engines.is_empty() {
            return Err(conflict(
                "NodeInUse",
                format!(
                    "node {name:?} runs the engines of volumes {}; detach them first",
                    engines.join(", ")
                ),
            ));
        }
        if n.status.state == NodeState::Up && !reps.is_empty() {
            return Err(conflict(
                "NodeInUse",
                format!("node {name:?} is still deleting replicas; try again when it is done"),
            ));
        }
        for r in &reps {
            match store::delete(s, r) {
                Ok(()) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        store::delete(s, &n)?;
        tracing::info!(node = name, "node deleted");
        Ok(n)
    }

    /// A heartbeat as it arrives over HTTP: the report's bytes in, the answer's JSON out. A
    /// report byte for byte equal to the node's last one, with no store change since that one
    /// was applied, gets the same answer without being parsed or applied again.
    pub fn heartbeat_raw(&self, node: &str, raw: &[u8]) -> Result<Bytes, ApiError> {
        let before = self.cache.changes();
        if let Some(answer) = self.heartbeat_unchanged(node, raw) {
            return Ok(answer);
        }
        let hb: Heartbeat = serde_json::from_slice(raw).map_err(|e| {
            ApiError::bad("InvalidBody", format!("heartbeat of node {node:?}: {e}"))
        })?;
        let (a, wrote) = self.apply_heartbeat_txn(node, &hb)?;
        let answer = Bytes::from(
            serde_json::to_vec(&a)
                .map_err(|e| ApiError::new(ErrorKind::Internal, "Internal", e.to_string()))?,
        );
        if let Ok(mut beats) = self.beats.lock() {
            if wrote {
                beats.remove(node);
            } else {
                beats.insert(
                    node.to_string(),
                    LastBeat {
                        report: Bytes::copy_from_slice(raw),
                        changes: before,
                        answer: answer.clone(),
                    },
                );
            }
        }
        Ok(answer)
    }

    /// The answer to a report byte-identical to the node's last one when nothing in the store
    /// changed since: the last answer, at the cost of a comparison (no store access, so it may
    /// run on an async worker).
    pub fn heartbeat_unchanged(&self, node: &str, raw: &[u8]) -> Option<Bytes> {
        let before = self.cache.changes();
        let beats = self.beats.lock().ok()?;
        let b = beats.get(node)?;
        if b.changes != before || b.report != raw {
            return None;
        }
        let answer = b.answer.clone();
        drop(beats);
        self.saw(node);
        Some(answer)
    }

    /// Records a node's report and answers with what it should run. The report is applied in
    /// one store transaction (retried whole when another writer got in between); liveness stays
    /// in memory.
    pub fn heartbeat(&self, node: &str, hb: Heartbeat) -> Result<Assignments, ApiError> {
        Ok(self.apply_heartbeat_txn(node, &hb)?.0)
    }

    fn saw(&self, node: &str) {
        let t = self.now_s();
        if let Ok(mut seen) = self.last_seen.lock() {
            seen.insert(node.to_string(), t);
        }
    }

    /// Applies a report in one transaction; returns the answer and whether anything was written.
    fn apply_heartbeat_txn(
        &self,
        node: &str,
        hb: &Heartbeat,
    ) -> Result<(Assignments, bool), ApiError> {
        self.saw(node);
        let t = self.now_s();
        let mut attempt = 0;
        loop {
            let txn = Txn::new(&*self.store);
            let a = self.apply_heartbeat(&txn, node, hb, t)?;
            match txn.finish() {
                Ok(applied) => return Ok((a, !applied.is_empty())),
                Err(
                    StoreError::Conflict { .. }
                    | StoreError::Exists { .. }
                    | StoreError::NotFound { .. },
                ) if attempt < 32 => {
                    // The winner's write may still be on its way into the cache.
                    attempt += 1;
                    std::thread::yield_now();
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A heartbeat's reads and writes, all through `s` (a transaction).
    fn apply_heartbeat(
        &self,
        s: &dyn Store,
        node: &str,
        hb: &Heartbeat,
        t: u64,
    ) -> Result<Assignments, ApiError> {
        // Only a change is written.
        let status = |st: &mut NodeStatus| {
            let changed = st.state != NodeState::Up
                || st.address != hb.address
                || st.nbd_address != hb.nbd_address
                || st.transfer_address != hb.transfer_address
                || st.disks != hb.disks;
            if changed {
                st.state = NodeState::Up;
                st.address = hb.address.clone();
                st.nbd_address = hb.nbd_address.clone();
                st.transfer_address = hb.transfer_address.clone();
                st.disks = hb.disks.clone();
                st.last_heartbeat = t;
            }
            changed
        };
        if store::modify::<Node>(s, node, |n| status(&mut n.status))?.is_none() {
            let mut n = Node {
                metadata: Meta {
                    name: node.to_string(),
                    ..Default::default()
                },
                ..Default::default()
            };
            n.spec.allow_scheduling = true;
            status(&mut n.status);
            store::create(s, &n)?;
        }
        let reported: HashMap<&str, &ReplicaReport> =
            hb.replicas.iter().map(|r| (r.name.as_str(), r)).collect();
        // This node's replicas, read once: the report is compared in memory and only changes
        // written.
        let mine = store::list_by::<Replica>(s, Field::Node, node)?;
        let stored: HashMap<&str, &Replica> =
            mine.iter().map(|r| (r.metadata.name.as_str(), r)).collect();
        // What a running replica's report changes in its status (nothing: no write).
        let differs = |r: &Replica, rr: &ReplicaReport| {
            r.spec.node == node
                && (r.status.address.as_deref() != Some(rr.address.as_str())
                    || r.status.state != ReplicaState::Running
                    || r.status.flush_seq != rr.flush_seq
                    || !r.status.message.is_empty())
        };
        for rr in &hb.replicas {
            if stored.get(rr.name.as_str()).is_none_or(|r| !differs(r, rr)) {
                continue;
            }
            store::modify::<Replica>(s, &rr.name, |r| {
                if !differs(r, rr) {
                    return false;
                }
                r.status.address = Some(rr.address.clone());
                r.status.state = ReplicaState::Running;
                r.status.flush_seq = rr.flush_seq;
                r.status.message.clear();
                true
            })?;
        }
        for ee in &hb.engine_errors {
            store::modify::<Engine>(s, &ee.volume, |e| {
                if e.spec.generation != ee.generation || e.spec.node != node {
                    return false;
                }
                let c = e.status.message != ee.message;
                e.status.message = ee.message.clone();
                c
            })?;
        }
        for b in &hb.broken_replicas {
            store::modify::<Replica>(s, &b.name, |r| {
                if r.spec.node != node {
                    return false;
                }
                let before = r.status.clone();
                if r.status.state != ReplicaState::Broken {
                    tracing::warn!(volume = %r.spec.volume, replica = %b.name, node, reason = %b.reason, "replica cannot be opened; replacing it");
                }
                r.status.state = ReplicaState::Broken;
                r.status.message = b.reason.clone();
                r.status.address = None;
                r.status.mode = Some(ReplicaMode::ERR);
                r.status.failed_at.get_or_insert(t);
                r.status != before
            })?;
        }
        for er in &hb.engines {
            let Some(e) = store::get::<Engine>(s, &er.volume)? else {
                continue;
            };
            if e.spec.generation != er.generation || e.spec.node != node {
                continue;
            }
            let rw = er
                .replicas
                .iter()
                .filter(|r| r.mode == ReplicaMode::RW)
                .count() as u32;
            store::modify::<Engine>(s, &er.volume, |e| {
                let uri = (!er.nbd_uri.is_empty()).then(|| er.nbd_uri.clone());
                let changed = e.status.state != EngineState::Running
                    || e.status.nbd_uri != uri
                    || e.status.rw_replicas != Some(rw)
                    || !e.status.message.is_empty();
                e.status.state = EngineState::Running;
                e.status.nbd_uri = uri;
                e.status.rw_replicas = Some(rw);
                e.status.message.clear();
                changed
            })?;
            for rm in &er.replicas {
                self.record_mode(
                    s,
                    &rm.name,
                    &er.volume,
                    rm.mode,
                    Some((rm.rebuild_copied, rm.rebuild_skipped, rm.rebuild_total)),
                )?;
            }
            // A replica the engine should have but does not (after a restart it took another
            // one as the source and has not rebuilt this one yet) is not a healthy copy.
            for want in &e.spec.replicas {
                if er.replicas.iter().any(|r| r.name == want.name) {
                    continue;
                }
                let rw = store::get::<Replica>(s, &want.name)?
                    .is_some_and(|r| r.status.mode == Some(ReplicaMode::RW));
                if rw {
                    self.record_mode(s, &want.name, &er.volume, ReplicaMode::ERR, None)?;
                }
            }
        }
        for er in &hb.engines {
            if let Some(r) = &er.restore {
                self.restore_report(s, &er.volume, r, &er.snapshots)?;
            }
            let current = store::get::<Engine>(s, &er.volume)?
                .is_some_and(|e| e.spec.generation == er.generation && e.spec.node == node);
            if let Some(r) = &er.revert
                && current
            {
                self.revert_report(s, er, r)?;
            }
        }
        self.backup_reports(s, node, &hb.backups)?;
        // Snapshots as the engines report them.
        for er in &hb.engines {
            for sn in store::list_by::<Snapshot>(s, Field::Volume, &er.volume)? {
                let found = er.snapshots.iter().find(|i| i.name == sn.spec.name);
                match (found, sn.metadata.deletion_requested) {
                    (None, Some(_)) => match store::delete(s, &sn) {
                        Ok(())
                        | Err(StoreError::NotFound { .. })
                        | Err(StoreError::Conflict { .. }) => {}
                        Err(e) => return Err(e.into()),
                    },
                    (Some(i), _) => {
                        store::modify::<Snapshot>(s, &sn.metadata.name, |x| {
                            let st = SnapshotStatus {
                                ready: true,
                                created: i.created,
                                parent: i.parent.clone(),
                                user_created: i.user_created,
                                size: i.size,
                            };
                            let changed = x.status != st;
                            x.status = st;
                            changed
                        })?;
                    }
                    (None, None) => {}
                }
            }
        }
        let mut a = Assignments {
            backups: self.backup_orders(s, node)?,
            ..Default::default()
        };
        self.image_heartbeat(s, node, &hb.backing_images, &mut a)?;
        for r in &mine {
            if r.metadata.deletion_requested.is_some() {
                let on_disk = reported.contains_key(r.metadata.name.as_str())
                    || hb.broken_replicas.iter().any(|b| b.name == r.metadata.name);
                if on_disk {
                    a.delete_replicas.push(r.metadata.name.clone());
                } else {
                    // The node no longer has it: the deletion is complete.
                    match store::delete(s, r) {
                        Ok(())
                        | Err(StoreError::NotFound { .. })
                        | Err(StoreError::Conflict { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                continue;
            }
            let backing_image = if r.spec.backing_image.is_empty() {
                None
            } else {
                match self.replica_base(s, &r.spec.backing_image, &hb.backing_images)? {
                    Some(c) => Some(c),
                    // Sent once this node's copy is ready.
                    None => continue,
                }
            };
            a.replicas.push(ReplicaAssignment {
                name: r.metadata.name.clone(),
                volume: r.spec.volume.clone(),
                disk: r.spec.disk.clone(),
                size: r.spec.size,
                backing_image,
            });
        }
        let running = |e: &Engine| {
            hb.engines
                .iter()
                .any(|r| r.volume == e.spec.volume && r.generation == e.spec.generation)
        };
        for e in store::list_by::<Engine>(s, Field::Node, node)? {
            if e.metadata.deletion_requested.is_some() {
                // Stopped once the node no longer reports it.
                if !running(&e) {
                    match store::delete(s, &e) {
                        Ok(())
                        | Err(StoreError::NotFound { .. })
                        | Err(StoreError::Conflict { .. }) => {}
                        Err(err) => return Err(err.into()),
                    }
                }
                continue;
            }
            // Only engines serving an attached volume take or delete user snapshots: an engine
            // that reverts or rebuilds a detached volume must not re-create what a revert
            // discarded.
            // (or an engine started to back up a detached volume).
            if (e.spec.frontend || self.offline_backup_pending(&e.spec.volume))
                && e.spec.revert.is_none()
            {
                for sn in store::list_by::<Snapshot>(s, Field::Volume, &e.spec.volume)? {
                    a.snapshots.push(SnapshotOp {
                        volume: sn.spec.volume.clone(),
                        name: sn.spec.name.clone(),
                        delete: sn.metadata.deletion_requested.is_some(),
                    });
                }
            }
            if !running(&e) {
                // Assigned but not (or no longer) running there, e.g. after the node restarted.
                store::modify::<Engine>(s, &e.metadata.name, |e| {
                    let changed =
                        e.status.state != EngineState::Starting || e.status.nbd_uri.is_some();
                    e.status.state = EngineState::Starting;
                    e.status.nbd_uri = None;
                    changed
                })?;
            }
            let mut spec = e.spec;
            if let Some(r) = spec.restore.as_mut() {
                // Stored orders carry no credentials; the node gets them here only.
                if let Ok(t) = self.target_ref(&r.target.name) {
                    r.target.options = t.options;
                }
            }
            a.engines.push(spec);
        }
        Ok(a)
    }

    pub(crate) fn record_mode(
        &self,
        s: &dyn crate::store::Store,
        replica: &str,
        volume: &str,
        mode: ReplicaMode,
        rebuild: Option<(u64, u64, u64)>,
    ) -> Result<Option<Replica>, ApiError> {
        Ok(store::modify::<Replica>(s, replica, |r| {
            if r.spec.volume != volume {
                return false;
            }
            let before = r.status.clone();
            r.status.mode = Some(mode);
            match mode {
                ReplicaMode::RW => r.status.failed_at = None,
                ReplicaMode::ERR | ReplicaMode::WO => {
                    if r.status.failed_at.is_none() {
                        r.status.failed_at = Some(now());
                    }
                }
            }
            if let Some((c, s, t)) = rebuild {
                r.status.rebuild_copied = c;
                r.status.rebuild_skipped = s;
                r.status.rebuild_total = t;
            }
            r.status != before
        })?)
    }

    /// An engine reports a membership change; it is durable when this returns.
    pub fn replica_event(&self, ev: &ReplicaEvent) -> Result<Replica, ApiError> {
        let e = store::get::<Engine>(&*self.store, &ev.volume)?;
        if e.as_ref()
            .is_none_or(|e| e.spec.generation != ev.generation)
        {
            return Err(conflict(
                "Fenced",
                format!(
                    "engine generation {} of volume {:?} is not current",
                    ev.generation, ev.volume
                ),
            ));
        }
        if ev.mode == ReplicaMode::ERR {
            tracing::warn!(volume = %ev.volume, replica = %ev.replica, reason = %ev.reason, "replica failed");
        }
        // A replica already deleted has left the volume for good: nothing to record, and the
        // engine must not wait for it.
        Ok(self
            .record_mode(&*self.store, &ev.replica, &ev.volume, ev.mode, None)?
            .unwrap_or_else(|| Replica {
                metadata: Meta {
                    name: ev.replica.clone(),
                    deletion_requested: Some(self.now_s()),
                    ..Default::default()
                },
                spec: ReplicaSpec {
                    volume: ev.volume.clone(),
                    ..Default::default()
                },
                status: ReplicaStatus {
                    mode: Some(ev.mode),
                    state: ReplicaState::Deleted,
                    ..Default::default()
                },
            }))
    }

    pub(crate) fn wake_handle(&self, node: &str) -> Option<Arc<tokio::sync::Notify>> {
        let mut w = self.wakes.lock().ok()?;
        Some(w.entry(node.to_string()).or_default().clone())
    }

    /// Tells a node's long-poll that it has work (a permit is kept if it is not waiting).
    pub fn wake_node(&self, node: &str) {
        if let Some(n) = self.wake_handle(node) {
            n.notify_one();
        }
    }

    /// Waits until the node has work or `timeout` passes; returns whether it was woken.
    pub async fn wait_for_work(&self, node: &str, timeout: Duration) -> bool {
        let Some(n) = self.wake_handle(node) else {
            return false;
        };
        tokio::time::timeout(timeout, n.notified()).await.is_ok()
    }

    /// Wakes the node an object change concerns: the node of an engine or replica, or of the
    /// engine of a snapshot's or new backup's volume.
    pub async fn run_wakeups(self: Arc<Self>) {
        let mut events = self.store.watch();
        loop {
            let ev = match events.recv().await {
                Ok(ev) => ev,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            };
            if ev.deleted {
                continue;
            }
            let s = &*self.store;
            let engine_node = |vol: &str| {
                store::get::<Engine>(s, vol)
                    .ok()
                    .flatten()
                    .map(|e| e.spec.node)
            };
            let node = match ev.kind.as_str() {
                "engine" => engine_node(&ev.name),
                "replica" => store::get::<Replica>(s, &ev.name)
                    .ok()
                    .flatten()
                    .map(|r| r.spec.node),
                "snapshot" => store::get::<Snapshot>(s, &ev.name)
                    .ok()
                    .flatten()
                    .and_then(|x| engine_node(&x.spec.volume)),
                "backup" => store::get::<Backup>(s, &ev.name)
                    .ok()
                    .flatten()
                    .filter(|b| b.status.state == BackupState::New)
                    .and_then(|b| engine_node(&b.spec.volume)),
                _ => None,
            };
            if let Some(n) = node {
                self.wake_node(&n);
            }
        }
    }
}
