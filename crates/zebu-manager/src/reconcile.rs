//! The level-triggered reconcile loop, driven by what changed: node liveness, the replica set of
//! every volume (through the planner), scheduling, and each volume's status (engine placement is
//! in `engines.rs`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::ApiError;
use crate::controller::Manager;
use crate::model::*;
use crate::planner::{plan_replicas, robustness, settled};
use crate::store::{self, Event, Field, Store, StoreError};
use crate::txn::Txn;

/// What a reconcile pass reads once and shares between the volumes it looks at.
pub(crate) struct PassView<'a> {
    pub(crate) nodes: &'a HashMap<String, Node>,
    /// Every backup volume on a full pass; read one by one on a pass over a few volumes.
    pub(crate) backup_volumes: Option<HashMap<String, BackupVolume>>,
    /// Bytes promised per (node, disk), read the first time a replica is scheduled.
    scheduled: std::cell::RefCell<Option<HashMap<(String, String), u64>>>,
}

impl PassView<'_> {
    pub(crate) fn backup_volume(&self, s: &dyn Store, name: &str) -> Option<BackupVolume> {
        match &self.backup_volumes {
            Some(all) => all.get(name).cloned(),
            None => store::get::<BackupVolume>(s, name).ok().flatten(),
        }
    }
}

/// How often one pass looks at every volume (besides the rolling slices) even when nothing
/// about them changed: also the only time orphan engines and unfinished backups are looked at
/// without an event.
const FULL_PASS_EVERY: Duration = Duration::from_secs(300);

/// Every volume is looked at in turn within about this many seconds (a slice once a second),
/// besides the changed and the settling ones.
const ROLLING_ROUND_SECS: usize = 60;

/// The smallest slice: small clusters go round faster.
const ROLLING_SLICE_MIN: usize = 64;

/// How often volumes that are still settling are looked at when nothing about them changed.
const UNSETTLED_EVERY: Duration = Duration::from_secs(1);

/// Volumes whose writes go to the store in one transaction.
const VOLUMES_PER_TXN: usize = 64;

/// What changes since the last pass ask the next one to look at.
#[derive(Default)]
struct Dirty {
    full: bool,
    volumes: BTreeSet<String>,
    backups: bool,
}

impl Dirty {
    fn note(&mut self, ev: &Event) {
        match ev.kind.as_str() {
            "volume" => {
                self.volumes.insert(ev.name.clone());
            }
            "engine" => {
                // A backup can no longer finish once its engine stops.
                self.backups = true;
                self.volumes.insert(ev.name.clone());
            }
            "replica" | "snapshot" => {
                self.volumes.extend(ev.volume.clone());
            }
            "backup" => {
                self.backups = true;
                self.volumes.extend(ev.volume.clone());
            }
            // Nodes, settings, targets and backup volumes concern many volumes (a full pass
            // looks at backups too).
            _ => self.full = true,
        }
    }
}

/// How a volume's message starts while its replicas wait for backing-image copies.
const IMAGE_WAIT: &str = "waiting for backing image ";

impl Manager {
    /// Runs the reconcile loop until the process ends. A pass looks at the volumes that changed
    /// since the last one, and once a second those still settling and the next slice of volumes
    /// in name order (all of them every [`ROLLING_ROUND_SECS`]); every volume is looked at in
    /// one pass at start, after a node, setting or target change, and every
    /// [`FULL_PASS_EVERY`]. Passes run on the blocking pool, at once after a change and at least
    /// every 500 ms.
    pub async fn run(self: Arc<Self>) {
        let mut events = self.store.watch();
        let mut dirty = Dirty {
            full: true,
            ..Default::default()
        };
        let mut unsettled: BTreeSet<String> = BTreeSet::new();
        let mut last_full = tokio::time::Instant::now();
        let mut last_sweep = tokio::time::Instant::now();
        let mut cursor = String::new();
        loop {
            self.reconciles.fetch_add(1, Ordering::Relaxed);
            let full = dirty.full || last_full.elapsed() >= FULL_PASS_EVERY;
            let work = std::mem::take(&mut dirty);
            // Volumes still settling wait on time, not on changes: looked at once a second, or
            // less often when there are thousands (every node down), one per 0.5 ms of the
            // interval, so that a sweep never takes most of it.
            let every = UNSETTLED_EVERY.max(Duration::from_micros(unsettled.len() as u64 * 500));
            let sweep = last_sweep.elapsed() >= every;
            let only = (!full).then(|| {
                let mut v = work.volumes;
                if sweep {
                    v.extend(unsettled.iter().cloned());
                }
                v
            });
            if full || sweep {
                last_sweep = tokio::time::Instant::now();
            }
            let swept = full || sweep;
            if full {
                last_full = tokio::time::Instant::now();
            }
            let m = self.clone();
            let backups = full || work.backups;
            let mut cur = std::mem::take(&mut cursor);
            let r = tokio::task::spawn_blocking(move || {
                let mut only = only;
                // A slice of every volume in turn, once a second: all are looked at within a
                // few dozen seconds without one long pass over all of them holding up the
                // changed ones.
                if let Some(o) = only.as_mut()
                    && sweep
                {
                    o.extend(m.volume_slice(&mut cur, None));
                }
                if let Err(e) = m.reconcile_images() {
                    tracing::warn!(error = %e.message, "backing-image pass failed");
                }
                (m.reconcile_pass(only.as_ref(), backups), cur)
            })
            .await
            .map(|(r, cur)| {
                cursor = cur;
                r
            });
            match r {
                Ok(Ok(u)) => {
                    // A pass over changed volumes only adds to what still settles.
                    if swept {
                        unsettled = u;
                    } else {
                        unsettled.extend(u);
                    }
                }
                Ok(Err(e)) => {
                    self.reconcile_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e.message, "reconcile failed");
                    dirty.full = true;
                }
                Err(e) => {
                    self.reconcile_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "reconcile pass did not finish");
                    dirty.full = true;
                }
            }
            let mut take = |r: Result<Event, tokio::sync::broadcast::error::RecvError>| match r {
                Ok(ev) => dirty.note(&ev),
                // Missed changes: look at everything.
                Err(_) => dirty.full = true,
            };
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), events.recv()).await {
                take(r);
            }
            // Coalesce bursts.
            loop {
                match events.try_recv() {
                    Ok(ev) => take(Ok(ev)),
                    Err(tokio::sync::broadcast::error::TryRecvError::Empty) => break,
                    Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {
                        take(Err(tokio::sync::broadcast::error::RecvError::Closed))
                    }
                    Err(tokio::sync::broadcast::error::TryRecvError::Closed) => return,
                }
            }
        }
    }

    /// The next volumes after `cursor` in name order: `n` of them, or (when `None`) enough
    /// that every volume comes round within [`ROLLING_ROUND_SECS`] slices. Moves the cursor,
    /// back to the start after the last volume.
    pub(crate) fn volume_slice(&self, cursor: &mut String, n: Option<usize>) -> Vec<String> {
        let n = match n {
            Some(n) => n,
            None => match self.store.names_after(Volume::KIND, "", 0) {
                Ok((_, total)) => total.div_ceil(ROLLING_ROUND_SECS).max(ROLLING_SLICE_MIN),
                Err(_) => return Vec::new(),
            },
        };
        let Ok((out, _)) = self.store.names_after(Volume::KIND, cursor, n) else {
            return Vec::new();
        };
        *cursor = match out.last() {
            Some(last) if out.len() == n => last.clone(),
            // Reached the end: start over next time.
            _ => String::new(),
        };
        out
    }

    /// One pass over every object.
    pub fn reconcile(&self) -> Result<(), ApiError> {
        self.reconcile_pass(None, true).map(|_| ())
    }

    /// One pass over the volumes in `only` (all when `None`), and over unfinished backups when
    /// `backups`. Returns the volumes that are not settled (they are looked at again next pass).
    pub(crate) fn reconcile_pass(
        &self,
        only: Option<&BTreeSet<String>>,
        backups: bool,
    ) -> Result<BTreeSet<String>, ApiError> {
        let t = self.now_s();
        let s = &*self.store;
        let down_after = self.setting_u64("node-down-timeout");
        let mut nodes: HashMap<String, Node> = HashMap::new();
        for mut n in store::list::<Node>(s)? {
            // Heartbeats missed while this manager was not running do not count against a node.
            let heard = self
                .seen(&n.metadata.name)
                .unwrap_or(n.status.last_heartbeat)
                .max(self.started.load(Ordering::Relaxed));
            if n.status.state == NodeState::Up && t.saturating_sub(heard) > down_after {
                tracing::warn!(node = %n.metadata.name, "node missed its heartbeats; marking it down");
                if let Some(now_n) = store::modify::<Node>(s, &n.metadata.name, |n| {
                    let c = n.status.state != NodeState::Down;
                    n.status.state = NodeState::Down;
                    c
                })? {
                    n = now_n;
                }
            }
            nodes.insert(n.metadata.name.clone(), n);
        }
        let mut pass = PassView {
            nodes: &nodes,
            backup_volumes: None,
            scheduled: Default::default(),
        };
        let names: Vec<String> = match only {
            Some(names) => names.iter().cloned().collect(),
            None => {
                let volumes = store::list::<Volume>(s)?;
                let known: std::collections::HashSet<&str> =
                    volumes.iter().map(|v| v.metadata.name.as_str()).collect();
                // Engines whose volume is gone.
                for e in store::list::<Engine>(s)? {
                    if !known.contains(e.spec.volume.as_str()) {
                        self.stop_engine(s, &e, &nodes, "its volume is gone")?;
                    }
                }
                pass.backup_volumes = Some(
                    store::list::<BackupVolume>(s)?
                        .into_iter()
                        .map(|b| (b.metadata.name.clone(), b))
                        .collect(),
                );
                volumes.into_iter().map(|v| v.metadata.name).collect()
            }
        };
        let mut unsettled = BTreeSet::new();
        // Volumes are stepped in transactions of a few dozen: one commit for their writes. A
        // chunk that lost a race with another writer is stepped again from fresh reads, then
        // left to the next pass.
        for chunk in names.chunks(VOLUMES_PER_TXN) {
            let mut attempt = 0;
            loop {
                let txn = Txn::new(s);
                let mut chunk_unsettled = Vec::new();
                let scheduled_before = pass.scheduled.borrow().clone();
                for name in chunk {
                    if !self.step_volume(&txn, name, &pass, t)? {
                        chunk_unsettled.push(name.clone());
                    }
                }
                match txn.finish() {
                    Ok(_) => {
                        unsettled.extend(chunk_unsettled);
                        break;
                    }
                    Err(
                        StoreError::Conflict { .. }
                        | StoreError::Exists { .. }
                        | StoreError::NotFound { .. },
                    ) => {
                        // Space promised by placements that did not land is free again.
                        *pass.scheduled.borrow_mut() = scheduled_before;
                        attempt += 1;
                        std::thread::yield_now();
                        if attempt >= 2 {
                            unsettled.extend(chunk.iter().cloned());
                            break;
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if backups {
            self.reconcile_backups()?;
        }
        Ok(unsettled)
    }

    /// Reads one volume, its engine and its replicas through `s` and steps it. Returns whether
    /// it is settled.
    fn step_volume(
        &self,
        s: &dyn Store,
        name: &str,
        pass: &PassView<'_>,
        t: u64,
    ) -> Result<bool, ApiError> {
        let engine = store::get::<Engine>(s, name)?;
        let Some(v) = store::get::<Volume>(s, name)? else {
            // An engine whose volume is gone.
            if let Some(e) = engine {
                self.stop_engine(s, &e, pass.nodes, "its volume is gone")?;
            }
            return Ok(true);
        };
        let vreps = store::list_by::<Replica>(s, Field::Volume, name)?;
        self.reconcile_volume(s, &v, vreps, engine.as_ref(), pass, t)
    }

    /// One volume's step: replicas on down nodes, deletion, the replica plan and scheduling,
    /// expansion, the engine and the status. Returns whether the volume is settled.
    fn reconcile_volume(
        &self,
        s: &dyn Store,
        v: &Volume,
        mut vreps: Vec<Replica>,
        engine: Option<&Engine>,
        pass: &PassView<'_>,
        t: u64,
    ) -> Result<bool, ApiError> {
        let nodes = pass.nodes;
        let name = v.metadata.name.clone();
        // Replicas on nodes that are down count as failed.
        for r in vreps.iter_mut() {
            let up = nodes
                .get(&r.spec.node)
                .is_some_and(|n| n.status.state == NodeState::Up);
            if !up && r.metadata.deletion_requested.is_none() {
                let changed = store::modify::<Replica>(s, &r.metadata.name, |r| {
                    let before = r.status.clone();
                    r.status.state = ReplicaState::Stopped;
                    if r.status.failed_at.is_none() {
                        r.status.failed_at = Some(t);
                    }
                    if r.status.mode == Some(ReplicaMode::RW) {
                        r.status.mode = Some(ReplicaMode::ERR);
                    }
                    r.status != before
                })?;
                if let Some(now_r) = changed {
                    *r = now_r;
                }
            }
        }
        if v.metadata.deletion_requested.is_some() {
            if let Some(e) = engine {
                self.stop_engine(s, e, nodes, "the volume is being deleted")?;
                return Ok(false);
            }
            for r in &vreps {
                if r.metadata.deletion_requested.is_none() {
                    store::modify::<Replica>(s, &r.metadata.name, |r| {
                        r.metadata.deletion_requested = Some(t);
                        true
                    })?;
                }
            }
            if vreps.is_empty() {
                for sn in store::list_by::<Snapshot>(s, Field::Volume, &name)? {
                    let _ = store::delete(s, &sn);
                }
                tracing::info!(volume = %name, "volume deleted");
                match store::delete(s, v) {
                    Ok(())
                    | Err(StoreError::NotFound { .. })
                    | Err(StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(false);
        }
        let mut live: Vec<Replica> = vreps
            .into_iter()
            .filter(|r| r.metadata.deletion_requested.is_none())
            .collect();
        let wait = self.setting_u64("replica-replenishment-wait-interval");
        let mut scheduled = 0;
        loop {
            let plan = plan_replicas(v, &live, nodes, t, wait);
            for (r, why) in &plan.delete {
                tracing::warn!(volume = %name, replica = %r, reason = why, "deleting replica");
                store::modify::<Replica>(s, r, |r| {
                    let fresh = r.metadata.deletion_requested.is_none();
                    r.metadata.deletion_requested.get_or_insert(t);
                    fresh
                })?;
            }
            live.retain(|r| !plan.delete.iter().any(|(d, _)| d == &r.metadata.name));
            // Every missing replica is placed in this pass (each placement sees the others).
            if !plan.schedule || scheduled >= v.spec.replicas {
                break;
            }
            let soft = self.setting("replica-soft-anti-affinity") == "true";
            match self.schedule_replica(s, v, &live, pass, soft)? {
                Some(r) => live.push(r),
                None => break,
            }
            scheduled += 1;
        }
        // Expansion of a detached volume reaches its replicas.
        for r in &live {
            if r.spec.size < v.spec.size {
                store::modify::<Replica>(s, &r.metadata.name, |r| {
                    r.spec.size = v.spec.size;
                    true
                })?;
            }
        }
        self.reconcile_engine(s, v, &live, engine, nodes)?;
        self.update_volume_status(s, v, &live, pass)?;
        self.reconcile_activation(s, v)?;
        let engine = store::get::<Engine>(s, &name)?;
        let v = store::get::<Volume>(s, &name)?;
        Ok(v.is_some_and(|v| settled(&v, &live, engine.as_ref())))
    }

    /// Places one more replica of `v` on the up, schedulable node (and disk) with the most room
    /// that holds none of its replicas yet (any node when `soft`). Returns it, or `None` (and a
    /// message on the volume) when no node has room.
    pub(crate) fn schedule_replica(
        &self,
        s: &dyn Store,
        v: &Volume,
        live: &[Replica],
        pass: &PassView<'_>,
        soft: bool,
    ) -> Result<Option<Replica>, ApiError> {
        let nodes = pass.nodes;
        let mut cell = pass.scheduled.borrow_mut();
        if cell.is_none() {
            // Bytes already promised per disk, read once per pass (what this pass places is
            // added below as it is placed).
            let m = s.usage(Replica::KIND)?;
            *cell = Some(m);
        }
        let scheduled = cell.get_or_insert_with(HashMap::new);
        let mut best: Option<(bool, u64, String, String)> = None;
        for n in nodes.values() {
            if n.status.state != NodeState::Up || !n.spec.allow_scheduling {
                continue;
            }
            let has = live.iter().any(|r| r.spec.node == n.metadata.name);
            if has && !soft {
                continue;
            }
            for d in &n.status.disks {
                let used = scheduled
                    .get(&(n.metadata.name.clone(), d.path.clone()))
                    .copied()
                    .unwrap_or(0);
                // Thin provisioning: allow scheduling up to twice the disk's capacity.
                if used + v.spec.size > d.capacity.saturating_mul(2) {
                    continue;
                }
                let free = d.capacity.saturating_mul(2) - used - v.spec.size;
                let cand = (!has, free, n.metadata.name.clone(), d.path.clone());
                if best
                    .as_ref()
                    .is_none_or(|b| (cand.0, cand.1, &b.2) > (b.0, b.1, &cand.2))
                {
                    best = Some(cand);
                }
            }
        }
        let Some((_, _, node, disk)) = best else {
            store::modify::<Volume>(s, &v.metadata.name, |v| {
                let msg = "no node with room for another replica".to_string();
                let c = v.status.message != msg;
                v.status.message = msg;
                c
            })?;
            return Ok(None);
        };
        let r = Replica {
            metadata: Meta {
                name: format!("{}-r-{:08x}", v.metadata.name, rand::random::<u32>()),
                ..Default::default()
            },
            spec: ReplicaSpec {
                volume: v.metadata.name.clone(),
                node: node.clone(),
                disk: disk.clone(),
                size: v.spec.size,
                backing_image: v.spec.backing_image.clone(),
            },
            status: ReplicaStatus {
                state: ReplicaState::Pending,
                ..Default::default()
            },
        };
        tracing::info!(volume = %v.metadata.name, replica = %r.metadata.name, %node, "scheduled replica");
        let r = store::create(s, &r)?;
        *scheduled.entry((node, disk)).or_default() += v.spec.size;
        Ok(Some(r))
    }

    /// Derives a volume's status; writes it only when it changed. `pass` holds what the
    /// reconcile pass read once for every volume.
    pub(crate) fn update_volume_status(
        &self,
        s: &dyn Store,
        v: &Volume,
        live: &[Replica],
        pass: &PassView<'_>,
    ) -> Result<(), ApiError> {
        // Re-read: the engine may have been created or stopped earlier in this pass.
        let engine = store::get::<Engine>(s, &v.metadata.name)?;
        let node_up = |n: &str| {
            pass.nodes
                .get(n)
                .is_some_and(|n| n.status.state == NodeState::Up)
        };
        let running = engine.as_ref().is_some_and(|e| {
            e.status.state == EngineState::Running
                && e.metadata.deletion_requested.is_none()
                && node_up(&e.spec.node)
        });
        let restoring = !crate::backups::restore_done(v);
        let state = match (&v.spec.node, &engine) {
            _ if restoring => VolumeState::Creating,
            (None, Some(_)) if v.spec.standby => VolumeState::Detached,
            // An engine rebuilding a detached volume's replicas serves no one.
            (None, Some(e)) if !e.spec.frontend => VolumeState::Detached,
            // Attached once the engine's node serves it (not merely runs the engine, which it
            // may still do for a restore or a rebuild without a frontend).
            (Some(_), Some(e)) if running && e.status.nbd_uri.is_some() => VolumeState::Attached,
            (Some(_), _) => VolumeState::Attaching,
            (None, Some(_)) => VolumeState::Detaching,
            (None, None) => {
                let all_running = live.len() as u32 >= v.spec.replicas
                    && live.iter().all(|r| r.status.address.is_some());
                if all_running || v.status.state != VolumeState::Creating {
                    VolumeState::Detached
                } else {
                    VolumeState::Creating
                }
            }
        };
        let robustness = robustness(v, state, engine.is_some(), live);
        let nbd_uri = if state == VolumeState::Attached {
            engine.as_ref().and_then(|e| e.status.nbd_uri.clone())
        } else {
            None
        };
        let node = if state == VolumeState::Attached {
            v.spec.node.clone()
        } else {
            None
        };
        // A standby volume's last backup is its source's newest.
        let followed = if v.spec.standby {
            &v.spec.backup_volume
        } else {
            &v.metadata.name
        };
        let (last_backup, last_backup_at) = pass
            .backup_volume(
                s,
                &format!("{}.{followed}", crate::backups::volume_target(v)),
            )
            .map(|b| (b.status.last_backup.clone(), b.status.last_backup_at))
            .unwrap_or_default();
        // Why a volume waits: its engine cannot start on its node.
        let waiting_for = engine
            .as_ref()
            .filter(|e| e.status.state != EngineState::Running && !e.status.message.is_empty())
            .map(|e| {
                format!(
                    "engine on node {:?} cannot start: {}",
                    e.spec.node, e.status.message
                )
            });
        // Or its replicas wait for the nodes' copies of its backing image.
        let image_wait = if v.spec.backing_image.is_empty() {
            None
        } else {
            let img = store::get::<BackingImage>(s, &v.spec.backing_image)?;
            let ready = |n: &str| {
                img.as_ref().is_some_and(|b| {
                    b.status
                        .copies
                        .iter()
                        .any(|c| c.node == n && c.state == BackingImageState::Ready)
                })
            };
            let mut nodes: Vec<&str> = live
                .iter()
                .filter(|r| r.status.address.is_none() && !ready(&r.spec.node))
                .map(|r| r.spec.node.as_str())
                .collect();
            nodes.sort();
            nodes.dedup();
            (!nodes.is_empty()).then(|| {
                format!(
                    "{IMAGE_WAIT}{:?} on node(s) {}",
                    v.spec.backing_image,
                    nodes.join(", ")
                )
            })
        };
        let waiting_for = waiting_for.or(image_wait);
        let t = self.now_s();
        let derive = |st: &mut VolumeStatus, replicas: u32| {
            if state == VolumeState::Detached && st.state != VolumeState::Detached {
                st.detached_at = Some(t);
            }
            st.state = state;
            st.last_backup = last_backup.clone();
            st.last_backup_at = last_backup_at;
            st.robustness = robustness;
            st.nbd_uri = nbd_uri.clone();
            st.node = node.clone();
            if live.len() as u32 >= replicas {
                st.message.clear();
            }
            if let Some(m) = &waiting_for {
                st.message = m.clone();
            } else if st.message.starts_with("engine on node ")
                || st.message.starts_with(IMAGE_WAIT)
            {
                st.message.clear();
            }
        };
        // Nothing to write when the status read at the start of the pass is already current.
        let mut wanted = v.status.clone();
        derive(&mut wanted, v.spec.replicas);
        if wanted != v.status {
            store::modify::<Volume>(s, &v.metadata.name, |v| {
                let before = v.status.clone();
                derive(&mut v.status, v.spec.replicas);
                v.status != before
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str, name: &str, volume: Option<&str>) -> Event {
        Event {
            kind: kind.into(),
            name: name.into(),
            resource_version: 1,
            deleted: false,
            volume: volume.map(str::to_string),
            node: None,
        }
    }

    #[test]
    fn a_change_marks_the_volumes_it_concerns() {
        let mut d = Dirty::default();
        d.note(&ev("volume", "v1", None));
        d.note(&ev("replica", "v2-r-1", Some("v2")));
        d.note(&ev("snapshot", "v3.s", Some("v3")));
        assert!(!d.full && !d.backups);
        d.note(&ev("engine", "v4", Some("v4")));
        assert!(d.backups, "a stopped engine can end a backup");
        d.note(&ev("backup", "b", Some("v5")));
        let got: Vec<&str> = d.volumes.iter().map(String::as_str).collect();
        assert_eq!(got, vec!["v1", "v2", "v3", "v4", "v5"]);
        assert!(!d.full);
        for kind in ["node", "setting", "backuptarget", "backupvolume"] {
            let mut d = Dirty::default();
            d.note(&ev(kind, "x", None));
            assert!(d.full, "{kind} concerns every volume");
        }
    }
}
