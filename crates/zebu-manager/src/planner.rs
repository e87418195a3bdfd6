//! Replica policy as pure functions of the objects and the time: which replicas are complete
//! copies, a volume's robustness, where an engine that serves no one runs, and the plan for a
//! volume's replica set (replacement, reuse, eviction). Table-tested in `controller_tests.rs`.

use std::collections::HashMap;

use crate::model::*;

/// Whether a replica holds a complete copy of its volume: RW and not failed, or, while no
/// replica of the volume has ever joined an engine (a new volume), any replica not failed. A
/// replica scheduled as a replacement holds nothing until its rebuild makes it RW.
pub fn good_copy(r: &Replica, volume_replicas: &[Replica]) -> bool {
    if r.status.failed_at.is_some() || r.metadata.deletion_requested.is_some() {
        return false;
    }
    match r.status.mode {
        Some(m) => m == ReplicaMode::RW,
        None => volume_replicas
            .iter()
            .all(|o| o.status.mode.is_none() || o.metadata.deletion_requested.is_some()),
    }
}

/// A volume's robustness: while attached (or standby, with its engine running) from the
/// replica modes the engine reports, at once; otherwise `faulted` when no replica holds a
/// complete copy any more, else `unknown`.
pub fn robustness(v: &Volume, state: VolumeState, engine: bool, live: &[Replica]) -> Robustness {
    let good = live.iter().filter(|r| good_copy(r, live)).count() as u32;
    let followed = state == VolumeState::Attached || (v.spec.standby && engine);
    if followed {
        return match good {
            0 => Robustness::Faulted,
            g if g >= v.spec.replicas => Robustness::Healthy,
            _ => Robustness::Degraded,
        };
    }
    let had_data = live.iter().any(|r| r.status.mode.is_some());
    if good == 0 && had_data {
        Robustness::Faulted
    } else {
        Robustness::Unknown
    }
}

/// The node of a running complete copy on an up node (where an engine that serves no one, for a
/// rebuild or a revert of a detached volume, runs).
pub(crate) fn complete_copy_node(live: &[Replica], up: &dyn Fn(&str) -> bool) -> Option<String> {
    live.iter()
        .filter(|r| r.status.address.is_some() && up(&r.spec.node))
        .filter(|r| good_copy(r, live))
        .map(|r| r.spec.node.clone())
        .min()
}

/// What the manager does with one volume's replicas on one reconcile pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplicaPlan {
    /// Replicas to delete, with the reason.
    pub delete: Vec<(String, &'static str)>,
    /// Schedule one more replica.
    pub schedule: bool,
}

/// Plans a volume's replica set (a pure function of the objects and the time):
/// - a replica that failed longer ago than `wait` ("stale"), or sits on a node being evicted,
///   stops counting toward the volume's replica count, so a replacement is scheduled; it is kept
///   (a returning stale replica is reused by a delta rebuild) until the replicas that count hold
///   enough complete copies, and only then deleted;
/// - a replica whose store cannot be opened is deleted at once when another complete copy
///   exists;
/// - once enough complete copies count, extra replicas still rebuilding are deleted;
/// - nothing is deleted that would leave no complete copy.
pub fn plan_replicas(
    v: &Volume,
    live: &[Replica],
    nodes: &HashMap<String, Node>,
    t: u64,
    wait: u64,
) -> ReplicaPlan {
    let mut plan = ReplicaPlan::default();
    let good = |r: &Replica| good_copy(r, live);
    let any_good = live.iter().any(good);
    let evicting = |r: &Replica| nodes.get(&r.spec.node).is_some_and(|n| n.spec.evict);
    let broken = |r: &Replica| r.status.state == ReplicaState::Broken;
    let stale = |r: &Replica| {
        r.status
            .failed_at
            .is_some_and(|f| t.saturating_sub(f) > wait)
    };
    for r in live.iter().filter(|r| broken(r)) {
        if any_good {
            plan.delete
                .push((r.metadata.name.clone(), "its store cannot be opened"));
        }
    }
    let counted: Vec<&Replica> = live
        .iter()
        .filter(|r| !broken(r) && !stale(r) && !evicting(r))
        .collect();
    let want = v.spec.replicas as usize;
    if counted.len() < want {
        // A new replica needs a complete copy to be rebuilt from (or a volume that never held
        // data).
        plan.schedule = any_good || live.iter().all(|r| r.status.mode.is_none());
        return plan;
    }
    let counted_good = counted.iter().filter(|r| good(r)).count();
    if counted_good < want {
        return plan;
    }
    for r in live.iter().filter(|r| !broken(r)) {
        if evicting(r) {
            plan.delete
                .push((r.metadata.name.clone(), "its node is being evicted"));
        } else if stale(r) {
            plan.delete
                .push((r.metadata.name.clone(), "it did not return in time"));
        }
    }
    // More counted replicas than wanted (a stale one came back while its replacement was
    // rebuilding): the ones still rebuilding go.
    let mut extra = counted.len() - want;
    let mut rebuilding: Vec<&&Replica> = counted.iter().filter(|r| !good(r)).collect();
    rebuilding.sort_by_key(|r| std::cmp::Reverse(r.metadata.created));
    for r in rebuilding {
        if extra == 0 {
            break;
        }
        plan.delete
            .push((r.metadata.name.clone(), "an older copy returned"));
        extra -= 1;
    }
    plan
}

/// Whether a volume needs no look until one of its objects changes: nothing about it waits on
/// time (a failed replica's replenishment wait, a restore, a revert, a standby's next backup, an
/// engine starting or stopping). Node and setting changes make every volume looked at anyway.
pub fn settled(v: &Volume, live: &[Replica], engine: Option<&Engine>) -> bool {
    let replicas_ok = live.len() as u32 == v.spec.replicas
        && live.iter().all(|r| {
            r.status.state == ReplicaState::Running
                && r.status.address.is_some()
                && r.status.failed_at.is_none()
                && r.status.mode != Some(ReplicaMode::ERR)
                && r.spec.size >= v.spec.size
        });
    let quiet = v.metadata.deletion_requested.is_none()
        && !v.spec.standby
        && v.spec.revert.is_none()
        && crate::backups::restore_done(v);
    let engine_ok = match (engine, &v.spec.node) {
        (None, None) => v.status.state == VolumeState::Detached,
        (Some(e), Some(n)) => {
            &e.spec.node == n
                && e.status.state == EngineState::Running
                && e.metadata.deletion_requested.is_none()
                && v.status.state == VolumeState::Attached
                && v.status.robustness == Robustness::Healthy
        }
        _ => false,
    };
    replicas_ok && quiet && engine_ok
}
