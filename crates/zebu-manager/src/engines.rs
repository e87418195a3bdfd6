//! Engine placement: where a volume's engine runs (attach node, restore node, a complete copy's
//! node for a revert or an offline rebuild, kept where it is while that still holds), which
//! replicas it starts from (salvage when no complete copy is left), and stopping it.

use std::collections::HashMap;

use crate::ApiError;
use crate::controller::{Manager, now};
use crate::model::*;
use crate::planner::{complete_copy_node, good_copy};
use crate::store::{self, Store, StoreError};

impl Manager {
    /// Asks the engine's node to stop it; the object goes when the node confirms, or at once when
    /// the node is down (a newer generation fences it anyway).
    pub(crate) fn stop_engine(
        &self,
        s: &dyn Store,
        e: &Engine,
        nodes: &HashMap<String, Node>,
        why: &str,
    ) -> Result<(), ApiError> {
        let up = nodes
            .get(&e.spec.node)
            .is_some_and(|n| n.status.state == NodeState::Up);
        if !up {
            match store::delete(s, e) {
                Ok(()) | Err(StoreError::NotFound { .. }) | Err(StoreError::Conflict { .. }) => {}
                Err(err) => return Err(err.into()),
            }
            return Ok(());
        }
        if e.metadata.deletion_requested.is_none() {
            tracing::info!(volume = %e.spec.volume, node = %e.spec.node, generation = e.spec.generation, reason = why, "stopping engine");
            store::modify::<Engine>(s, &e.metadata.name, |e| {
                e.metadata.deletion_requested = Some(now());
                true
            })?;
        }
        Ok(())
    }

    pub(crate) fn engine_replicas(
        &self,
        live: &[Replica],
        nodes: &HashMap<String, Node>,
    ) -> Vec<EngineReplica> {
        let mut out: Vec<EngineReplica> = live
            .iter()
            .filter_map(|r| {
                r.status.address.as_ref().map(|a| EngineReplica {
                    name: r.metadata.name.clone(),
                    address: a.clone(),
                    candidate: good_copy(r, live),
                })
            })
            .collect();
        if !out.is_empty() && !out.iter().any(|e| e.candidate) {
            // Salvage: every replica failed. Start from the freshest one whose node is up.
            let fresh = live
                .iter()
                .filter(|r| r.status.address.is_some())
                // A replica that never joined an engine holds nothing to salvage.
                .filter(|r| r.status.mode.is_some() && r.status.state != ReplicaState::Broken)
                .filter(|r| {
                    nodes
                        .get(&r.spec.node)
                        .is_some_and(|n| n.status.state == NodeState::Up)
                })
                .max_by_key(|r| r.status.flush_seq);
            if let Some(f) = fresh {
                tracing::warn!(volume = %f.spec.volume, replica = %f.metadata.name, "salvaging from the freshest replica");
                for e in out.iter_mut() {
                    e.candidate = e.name == f.metadata.name;
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Where the volume's engine should run: the node it is attached to, or while it is being
    /// restored, the all-in-one node or a node holding one of its replicas.
    /// An engine that serves no one (a revert or an offline rebuild) stays where it runs while
    /// that node still holds a running complete copy: placement only moves it when it must, so
    /// that a rebuild finishing elsewhere does not start it over on another node.
    pub(crate) fn engine_node(
        &self,
        v: &Volume,
        restore: Option<&RestoreOrder>,
        live: &[Replica],
        nodes: &HashMap<String, Node>,
        current: Option<&Engine>,
    ) -> Option<String> {
        if v.spec.node.is_some() {
            return v.spec.node.clone();
        }
        let up = |n: &str| {
            nodes
                .get(n)
                .is_some_and(|n| n.status.state == NodeState::Up)
        };
        let Some(order) = restore else {
            let wanted = if v.spec.revert.is_some() {
                complete_copy_node(live, &up)
            } else {
                self.offline_rebuild_node(v, live, &up)
                    .or_else(|| self.offline_backup_node(v, live, &up))
            };
            let keep = current
                .filter(|e| e.metadata.deletion_requested.is_none() && up(&e.spec.node))
                .map(|e| e.spec.node.clone())
                .filter(|n| {
                    live.iter().any(|r| {
                        &r.spec.node == n && r.status.address.is_some() && good_copy(r, live)
                    })
                });
            return match (wanted, keep) {
                (Some(_), Some(here)) => Some(here),
                (w, _) => w,
            };
        };
        // A restore that failed is not retried until there is another backup to restore.
        let failed =
            v.status.restore.as_ref().is_some_and(|r| {
                r.state == RestoreState::Error && r.requested_backup == order.backup
            });
        if failed {
            return None;
        }
        if let Some(l) = &self.local_node
            && up(l)
        {
            return Some(l.clone());
        }
        live.iter()
            .filter(|r| r.status.address.is_some() && up(&r.spec.node))
            .map(|r| r.spec.node.clone())
            .min()
    }

    /// Where a detached volume's replicas are rebuilt without an attach (the
    /// `offline-replica-rebuilding` setting): the node of a complete copy, while a replica that
    /// is not one runs on an up node.
    pub(crate) fn offline_rebuild_node(
        &self,
        v: &Volume,
        live: &[Replica],
        up: &dyn Fn(&str) -> bool,
    ) -> Option<String> {
        if !detached_work(v) {
            return None;
        }
        let running = |r: &&Replica| r.status.address.is_some() && up(&r.spec.node);
        let needs = live
            .iter()
            .filter(running)
            .any(|r| !good_copy(r, live) && r.status.state != ReplicaState::Broken);
        // The setting is read only for volumes that need a rebuild (a store read per volume
        // per pass otherwise).
        if !needs || self.setting("offline-replica-rebuilding") != "true" {
            return None;
        }
        complete_copy_node(live, up)
    }

    /// Where a detached volume is backed up (a system backup's backup of it): the node of a
    /// complete copy, while such a backup is unfinished.
    pub(crate) fn offline_backup_node(
        &self,
        v: &Volume,
        live: &[Replica],
        up: &dyn Fn(&str) -> bool,
    ) -> Option<String> {
        if !detached_work(v) || !self.offline_backup_pending(&v.metadata.name) {
            return None;
        }
        complete_copy_node(live, up)
    }

    pub(crate) fn reconcile_engine(
        &self,
        s: &dyn Store,
        v: &Volume,
        live: &[Replica],
        engine: Option<&Engine>,
        nodes: &HashMap<String, Node>,
    ) -> Result<(), ApiError> {
        let restore = self.restore_order(v);
        let want = self.engine_node(v, restore.as_ref(), live, nodes, engine);
        // Served over NBD only when attached (not while restoring or rebuilding offline).
        let frontend = restore.is_none() && v.spec.node.is_some();
        match (&want, engine) {
            (Some(node), None) => {
                let reps = self.engine_replicas(live, nodes);
                if !reps.iter().any(|r| r.candidate) {
                    return Ok(()); // no replica running yet
                }
                let generation = s.next("engine-generation")?;
                let e = Engine {
                    metadata: Meta {
                        name: v.metadata.name.clone(),
                        ..Default::default()
                    },
                    spec: EngineSpec {
                        volume: v.metadata.name.clone(),
                        node: node.clone(),
                        size: v.spec.size,
                        generation,
                        replicas: reps,
                        frontend,
                        restore,
                        replica_timeout: self.setting_u64("engine-replica-timeout"),
                        revert: v.spec.revert.clone(),
                    },
                    status: EngineStatus {
                        state: EngineState::Starting,
                        ..Default::default()
                    },
                };
                tracing::info!(volume = %v.metadata.name, %node, generation, "starting engine");
                match store::create(s, &e) {
                    Ok(_) | Err(StoreError::Exists { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            (_, Some(e)) if e.metadata.deletion_requested.is_some() => {
                self.stop_engine(s, e, nodes, "stopping")?;
            }
            (Some(node), Some(e)) if &e.spec.node != node => {
                let why = format!("the engine belongs on node {node}");
                self.stop_engine(s, e, nodes, &why)?;
            }
            (Some(_), Some(e))
                if e.status.state == EngineState::Running
                    && e.status.rw_replicas == Some(0)
                    && !live.is_empty()
                    && !live.iter().any(|r| good_copy(r, live))
                    && self
                        .engine_replicas(live, nodes)
                        .iter()
                        .any(|r| r.candidate) =>
            {
                // Every replica left the running engine's set; it cannot rebuild one from
                // nothing. A new session starts from the freshest reachable replica (salvage).
                tracing::warn!(volume = %v.metadata.name, "engine has no healthy replica; restarting it to salvage");
                self.stop_engine(s, e, nodes, "salvage")?;
            }
            (Some(_), Some(e)) => {
                let grown = e.spec.size < v.spec.size;
                if e.spec.restore != restore
                    || e.spec.frontend != frontend
                    || grown
                    || e.spec.revert != v.spec.revert
                {
                    store::modify::<Engine>(s, &e.metadata.name, |e| {
                        e.spec.frontend = frontend;
                        e.spec.restore = restore.clone();
                        e.spec.size = e.spec.size.max(v.spec.size);
                        e.spec.revert = v.spec.revert.clone();
                        true
                    })?;
                }
                let reps = self.engine_replicas(live, nodes);
                // The set only grows by rebuilds the engine runs itself; names leaving the spec
                // are removed from the engine.
                if reps.iter().map(|r| (&r.name, &r.address)).ne(e
                    .spec
                    .replicas
                    .iter()
                    .map(|r| (&r.name, &r.address)))
                {
                    store::modify::<Engine>(s, &e.metadata.name, |e| {
                        // Keep the candidate flags the engine started with; they matter only at start.
                        let old: HashMap<String, bool> = e
                            .spec
                            .replicas
                            .iter()
                            .map(|r| (r.name.clone(), r.candidate))
                            .collect();
                        e.spec.replicas = reps
                            .iter()
                            .map(|r| EngineReplica {
                                candidate: old.get(&r.name).copied().unwrap_or(false),
                                ..r.clone()
                            })
                            .collect();
                        true
                    })?;
                }
            }
            (None, Some(e)) => {
                self.stop_engine(s, e, nodes, "no engine is wanted")?;
            }
            (None, None) => {}
        }
        Ok(())
    }
}

/// Whether a detached volume may get an engine without a frontend for work of its own (an
/// offline rebuild or backup): not a standby volume, not being deleted, restored.
fn detached_work(v: &Volume) -> bool {
    !v.spec.standby && v.metadata.deletion_requested.is_none() && crate::backups::restore_done(v)
}
