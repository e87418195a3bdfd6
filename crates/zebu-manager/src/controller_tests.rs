//! Unit tests of replica and node policy without processes or files: a manager on the in-memory
//! store, nodes simulated by their heartbeats, and an injected clock.
//!
//! Over 800 lines on purpose: every policy test shares the one simulated cluster (`Sim`).

use super::*;
use crate::planner::settled;
use crate::store::MemStore;

struct Sim {
    m: Arc<Manager>,
    t: u64,
}

impl Sim {
    fn new(nodes: &[&str]) -> Sim {
        let store = Arc::new(MemStore::default());
        let m = Manager::new(store, "t".into(), None).expect("manager");
        let t = now();
        m.set_clock(t);
        let sim = Sim { m, t };
        for n in nodes {
            sim.beat(n, &[]);
        }
        sim
    }

    fn tick(&mut self, secs: u64) {
        self.t += secs;
        self.m.set_clock(self.t);
    }

    /// A heartbeat from `node`: it runs every replica assigned to it, and the engines given
    /// with the modes given.
    fn beat(&self, node: &str, engines: &[(&str, &[(&str, ReplicaMode)])]) -> Assignments {
        self.beat_with(node, engines, &[])
    }

    /// A heartbeat that also reports replicas whose stores cannot be opened.
    fn beat_with(
        &self,
        node: &str,
        engines: &[(&str, &[(&str, ReplicaMode)])],
        broken: &[&str],
    ) -> Assignments {
        let replicas: Vec<ReplicaReport> = store::list::<Replica>(&*self.m.store)
            .expect("list")
            .into_iter()
            .filter(|r| r.spec.node == node && r.metadata.deletion_requested.is_none())
            .filter(|r| !broken.contains(&r.metadata.name.as_str()))
            .map(|r| ReplicaReport {
                address: format!("{node}:{}", r.metadata.name),
                name: r.metadata.name,
                flush_seq: 1,
            })
            .collect();
        let engines = engines
            .iter()
            .map(|(vol, modes)| EngineReport {
                volume: vol.to_string(),
                generation: self.engine(vol).expect("engine").spec.generation,
                nbd_uri: format!("nbd://{node}/{vol}"),
                replicas: modes
                    .iter()
                    .map(|(name, mode)| EngineReplicaReport {
                        name: name.to_string(),
                        mode: *mode,
                        rebuild_copied: 0,
                        rebuild_skipped: 0,
                        rebuild_total: 0,
                    })
                    .collect(),
                ..Default::default()
            })
            .collect();
        self.m
            .heartbeat(
                node,
                Heartbeat {
                    address: node.to_string(),
                    nbd_address: node.to_string(),
                    disks: vec![DiskStatus {
                        path: "/d".into(),
                        capacity: 1 << 40,
                        available: 1 << 40,
                        scheduled: 0,
                    }],
                    replicas,
                    engines,
                    transfer_address: String::new(),
                    backing_images: Vec::new(),
                    backups: Vec::new(),
                    engine_errors: Vec::new(),
                    broken_replicas: broken
                        .iter()
                        .map(|b| BrokenReplica {
                            name: b.to_string(),
                            reason: "data file of layer 1 is missing".into(),
                        })
                        .collect(),
                },
            )
            .expect("heartbeat")
    }

    fn replicas(&self, vol: &str) -> Vec<Replica> {
        let mut r: Vec<Replica> = store::list::<Replica>(&*self.m.store)
            .expect("list")
            .into_iter()
            .filter(|r| r.spec.volume == vol && r.metadata.deletion_requested.is_none())
            .collect();
        r.sort_by(|a, b| a.spec.node.cmp(&b.spec.node));
        r
    }

    fn engine(&self, vol: &str) -> Option<Engine> {
        store::get::<Engine>(&*self.m.store, vol).expect("get")
    }

    fn volume(&self, vol: &str) -> Volume {
        self.m.get_volume(vol).expect("volume")
    }

    fn node_state(&self, n: &str) -> NodeState {
        store::get::<Node>(&*self.m.store, n)
            .expect("get")
            .expect("node")
            .status
            .state
    }

    /// Reconciles until every replica of `vol` is scheduled and reported running.
    fn settle(&self, vol: &str) {
        for _ in 0..8 {
            self.m.reconcile().expect("reconcile");
            self.beat("n1", &[]);
            self.all_beat(&[]);
        }
        let v = self.volume(vol);
        let reps = self.replicas(vol);
        assert_eq!(reps.len() as u32, v.spec.replicas);
        assert!(reps.iter().all(|r| r.status.address.is_some()));
    }

    /// A 3-replica volume attached to n1 with every replica RW in its engine.
    fn attached(&mut self, vol: &str) -> Vec<String> {
        self.m.create_volume(vol, 1 << 30, 3).expect("create");
        self.settle(vol);
        self.m.attach_volume(vol, Some("n1")).expect("attach");
        self.m.reconcile().expect("reconcile");
        let names: Vec<String> = self
            .replicas(vol)
            .into_iter()
            .map(|r| r.metadata.name)
            .collect();
        let modes: Vec<(&str, ReplicaMode)> = names
            .iter()
            .map(|n| (n.as_str(), ReplicaMode::RW))
            .collect();
        self.beat("n1", &[(vol, &modes)]);
        self.all_beat(&[]);
        self.m.reconcile().expect("reconcile");
        assert_eq!(self.volume(vol).status.state, VolumeState::Attached);
        names
    }

    fn all_beat(&self, except: &[&str]) {
        for n in ["n2", "n3", "n4"] {
            if !except.contains(&n)
                && store::get::<Node>(&*self.m.store, n)
                    .expect("get")
                    .is_some()
            {
                self.beat(n, &[]);
            }
        }
    }
}

#[test]
fn the_last_complete_copy_cannot_be_deleted_while_others_rebuild() {
    let mut sim = Sim::new(&["n1", "n2", "n3"]);
    let names = sim.attached("v");
    assert_eq!(sim.volume("v").status.robustness, Robustness::Healthy);
    sim.m
        .delete_replica(&names[0], false)
        .expect("first delete");
    sim.m.reconcile().expect("reconcile");
    // The replacement is scheduled and rebuilds (WO) in the engine.
    let fresh: Vec<Replica> = sim
        .replicas("v")
        .into_iter()
        .filter(|r| !names.contains(&r.metadata.name))
        .collect();
    assert_eq!(fresh.len(), 1, "a replacement is scheduled");
    sim.beat(
        "n1",
        &[(
            "v",
            &[(&names[1], ReplicaMode::RW), (&names[2], ReplicaMode::RW)],
        )],
    );
    sim.m
        .delete_replica(&names[1], false)
        .expect("second delete: one RW copy remains");
    sim.beat(
        "n1",
        &[(
            "v",
            &[
                (&names[2], ReplicaMode::RW),
                (&fresh[0].metadata.name, ReplicaMode::WO),
            ],
        )],
    );
    let err = sim
        .m
        .delete_replica(&names[2], false)
        .expect_err("the last RW copy");
    assert_eq!(err.kind, crate::ErrorKind::Conflict);
    assert!(
        err.message.contains("last complete copy"),
        "{}",
        err.message
    );
    assert!(
        sim.m.delete_replica(&fresh[0].metadata.name, false).is_ok(),
        "a rebuilding copy may go"
    );
    let r = store::get::<Replica>(&*sim.m.store, &names[2])
        .expect("get")
        .expect("r");
    assert!(
        r.metadata.deletion_requested.is_none(),
        "the refusal changed nothing"
    );
    sim.m.delete_replica(&names[2], true).expect("force");
}

#[test]
fn replicas_of_a_new_volume_are_all_complete_copies() {
    let sim = Sim::new(&["n1", "n2", "n3"]);
    sim.m.create_volume("v", 1 << 30, 2).expect("create");
    sim.settle("v");
    let reps = sim.replicas("v");
    assert_eq!(reps.len(), 2);
    assert!(reps.iter().all(|r| good_copy(r, &reps)));
    sim.m
        .delete_replica(&reps[0].metadata.name, false)
        .expect("delete one");
}

#[test]
fn an_event_for_a_deleted_replica_is_acknowledged() {
    let mut sim = Sim::new(&["n1", "n2", "n3"]);
    let names = sim.attached("v");
    let generation = sim.engine("v").expect("engine").spec.generation;
    let ev = ReplicaEvent {
        volume: "v".into(),
        replica: "v-r-gone".into(),
        generation,
        mode: ReplicaMode::ERR,
        reason: "connection closed".into(),
    };
    sim.m.replica_event(&ev).expect("acknowledged");
    let stale = ReplicaEvent {
        generation: generation + 100,
        replica: names[0].clone(),
        ..ev
    };
    assert_eq!(
        sim.m.replica_event(&stale).expect_err("fenced").code,
        "Fenced"
    );
}

#[test]
fn a_manager_restart_judges_no_node_before_a_full_timeout_of_fresh_heartbeats() {
    let mut sim = Sim::new(&["n1", "n2", "n3"]);
    let _ = sim.attached("v");
    // The manager was down for a minute: every node's last heartbeat is old.
    sim.tick(60);
    let store = sim.m.store.clone();
    let m2 = Manager::new(store, "t".into(), None).expect("restart");
    m2.set_clock(sim.t);
    sim.m = m2;
    sim.m.reconcile().expect("reconcile");
    for n in ["n1", "n2", "n3"] {
        assert_eq!(
            sim.node_state(n),
            NodeState::Up,
            "{n} judged before it could report"
        );
    }
    // n1 and n2 report; n3 was killed while the manager was down.
    sim.tick(5);
    let names: Vec<String> = sim
        .replicas("v")
        .into_iter()
        .map(|r| r.metadata.name)
        .collect();
    let on = |n: &str| {
        sim.replicas("v")
            .into_iter()
            .find(|r| r.spec.node == n)
            .expect("replica")
            .metadata
            .name
    };
    let (r1, r2) = (on("n1"), on("n2"));
    sim.beat(
        "n1",
        &[("v", &[(&r1, ReplicaMode::RW), (&r2, ReplicaMode::RW)])],
    );
    sim.beat("n2", &[]);
    sim.m.reconcile().expect("reconcile");
    assert_eq!(
        sim.node_state("n3"),
        NodeState::Up,
        "still within the timeout"
    );
    sim.tick(6);
    sim.beat(
        "n1",
        &[("v", &[(&r1, ReplicaMode::RW), (&r2, ReplicaMode::RW)])],
    );
    sim.beat("n2", &[]);
    sim.m.reconcile().expect("reconcile");
    assert_eq!(sim.node_state("n3"), NodeState::Down);
    let e = sim.engine("v").expect("engine");
    assert!(
        e.metadata.deletion_requested.is_none(),
        "no salvage restart while the engine has RW replicas"
    );
    assert_eq!(sim.volume("v").status.robustness, Robustness::Degraded);
    assert_eq!(names.len(), 3);
    let _ = sim.replicas("v");
}

#[test]
fn salvage_is_decided_from_the_engine_report_alone() {
    let mut sim = Sim::new(&["n1", "n2", "n3"]);
    let names = sim.attached("v");
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    // Every replica's node misses heartbeats, but the engine still reports them RW.
    sim.tick(11);
    sim.beat(
        "n1",
        &[(
            "v",
            &refs
                .iter()
                .map(|n| (*n, ReplicaMode::RW))
                .collect::<Vec<_>>(),
        )],
    );
    sim.m.reconcile().expect("reconcile");
    assert!(
        sim.engine("v")
            .expect("engine")
            .metadata
            .deletion_requested
            .is_none()
    );
    // The engine itself reports no RW replica: a new session salvages.
    sim.beat(
        "n1",
        &[(
            "v",
            &refs
                .iter()
                .map(|n| (*n, ReplicaMode::ERR))
                .collect::<Vec<_>>(),
        )],
    );
    sim.m.reconcile().expect("reconcile");
    assert_eq!(sim.volume("v").status.robustness, Robustness::Faulted);
    assert!(
        sim.engine("v")
            .expect("engine")
            .metadata
            .deletion_requested
            .is_some(),
        "the engine is restarted to salvage"
    );
}

#[test]
fn robustness_follows_engine_modes_while_attached_and_replicas_otherwise() {
    let mut sim = Sim::new(&["n1", "n2", "n3"]);
    let names = sim.attached("v");
    let modes = |m: [ReplicaMode; 3]| -> Vec<(&str, ReplicaMode)> {
        names.iter().map(String::as_str).zip(m).collect()
    };
    use ReplicaMode::{ERR, RW};
    sim.beat("n1", &[("v", &modes([RW, ERR, RW]))]);
    sim.all_beat(&[]);
    sim.m.reconcile().expect("reconcile");
    assert_eq!(sim.volume("v").status.robustness, Robustness::Degraded);
    sim.m.detach_volume("v").expect("detach");
    sim.beat("n1", &[("v", &modes([RW, ERR, RW]))]);
    sim.m.reconcile().expect("reconcile");
    sim.beat("n1", &[]);
    sim.m.reconcile().expect("reconcile");
    let v = sim.volume("v");
    assert_eq!(v.status.state, VolumeState::Detached);
    assert_eq!(v.status.robustness, Robustness::Unknown);
    // Every copy failed while detached: faulted, not unknown.
    for n in &names {
        sim.m
            .record_mode(&*sim.m.store, n, "v", ReplicaMode::ERR, None)
            .expect("record");
    }
    sim.m.reconcile().expect("reconcile");
    assert_eq!(sim.volume("v").status.robustness, Robustness::Faulted);
}

#[test]
fn a_replica_that_cannot_be_opened_is_replaced_without_waiting_but_never_the_last_copy() {
    let mut sim = Sim::new(&["n1", "n2", "n3"]);
    let names = sim.attached("v");
    let on_n3 = sim
        .replicas("v")
        .into_iter()
        .find(|r| r.spec.node == "n3")
        .expect("replica on n3")
        .metadata
        .name;
    sim.tick(1);
    let a = sim.beat_with("n3", &[], &[&on_n3]);
    assert!(a.delete_replicas.is_empty());
    sim.m.reconcile().expect("reconcile");
    let r = store::get::<Replica>(&*sim.m.store, &on_n3)
        .expect("get")
        .expect("r");
    assert_eq!(r.status.state, ReplicaState::Broken);
    assert!(r.status.message.contains("missing"));
    assert!(
        r.metadata.deletion_requested.is_some(),
        "replaced at once, no wait"
    );
    // The node is told to remove its files; the object goes once it no longer reports it.
    let a = sim.beat_with("n3", &[], &[&on_n3]);
    assert_eq!(a.delete_replicas, vec![on_n3.clone()]);
    sim.beat("n3", &[]);
    assert!(
        store::get::<Replica>(&*sim.m.store, &on_n3)
            .expect("get")
            .is_none()
    );
    // A volume whose only complete copy is broken keeps it.
    let mut one = Sim::new(&["n1"]);
    one.m.create_volume("w", 1 << 30, 1).expect("create");
    one.settle("w");
    let r = one.replicas("w").remove(0).metadata.name;
    one.tick(1);
    one.beat_with("n1", &[], &[&r]);
    one.m.reconcile().expect("reconcile");
    let rep = store::get::<Replica>(&*one.m.store, &r)
        .expect("get")
        .expect("r");
    assert!(
        rep.metadata.deletion_requested.is_none(),
        "the only copy is kept"
    );
    assert_eq!(one.volume("w").status.robustness, Robustness::Faulted);
    assert_eq!(names.len(), 3);
}

fn rep(
    name: &str,
    node: &str,
    mode: Option<ReplicaMode>,
    failed_at: Option<u64>,
    created: u64,
) -> Replica {
    Replica {
        metadata: Meta {
            name: name.into(),
            created,
            ..Default::default()
        },
        spec: ReplicaSpec {
            volume: "v".into(),
            node: node.into(),
            disk: "/d".into(),
            size: 1 << 30,
            backing_image: String::new(),
        },
        status: ReplicaStatus {
            mode,
            failed_at,
            state: ReplicaState::Running,
            address: Some(format!("{node}:1")),
            ..Default::default()
        },
    }
}

fn cluster(evicting: &[&str]) -> HashMap<String, Node> {
    ["n1", "n2", "n3", "n4"]
        .iter()
        .map(|n| {
            let mut node = Node::default();
            node.metadata.name = n.to_string();
            node.status.state = NodeState::Up;
            node.spec.allow_scheduling = !evicting.contains(n);
            node.spec.evict = evicting.contains(n);
            (n.to_string(), node)
        })
        .collect()
}

fn vol3() -> Volume {
    let mut v = Volume::default();
    v.metadata.name = "v".into();
    v.spec.replicas = 3;
    v
}

fn deleted(p: &ReplicaPlan) -> Vec<&str> {
    p.delete.iter().map(|(n, _)| n.as_str()).collect()
}

#[test]
fn replica_plans() {
    use ReplicaMode::{ERR, RW, WO};
    let (t, wait) = (1_000, 60);
    let nodes = cluster(&[]);
    let v = vol3();
    let healthy = vec![
        rep("a", "n1", Some(RW), None, 1),
        rep("b", "n2", Some(RW), None, 1),
        rep("c", "n3", Some(RW), None, 1),
    ];
    assert_eq!(
        plan_replicas(&v, &healthy, &nodes, t, wait),
        ReplicaPlan::default()
    );

    // Failed within the wait: nothing yet. Past it: a replacement, the old one kept.
    let mut r = healthy.clone();
    r[2] = rep("c", "n3", Some(ERR), Some(t - 30), 1);
    assert_eq!(
        plan_replicas(&v, &r, &nodes, t, wait),
        ReplicaPlan::default()
    );
    r[2].status.failed_at = Some(t - 61);
    let p = plan_replicas(&v, &r, &nodes, t, wait);
    assert!(p.schedule && p.delete.is_empty(), "{p:?}");
    // The replacement rebuilds: the old one still stays.
    r.push(rep("d", "n4", Some(WO), Some(t - 5), 2));
    assert_eq!(
        plan_replicas(&v, &r, &nodes, t, wait),
        ReplicaPlan::default()
    );
    // The replacement is complete: now the old one goes.
    r[3] = rep("d", "n4", Some(RW), None, 2);
    assert_eq!(deleted(&plan_replicas(&v, &r, &nodes, t, wait)), vec!["c"]);
    // Or the old one came back first (delta rebuild, RW again): the rebuilding new one goes.
    let mut back = r.clone();
    back[2] = rep("c", "n3", Some(RW), None, 1);
    back[3] = rep("d", "n4", Some(WO), Some(t - 5), 2);
    assert_eq!(
        deleted(&plan_replicas(&v, &back, &nodes, t, wait)),
        vec!["d"]
    );

    // Eviction: a new copy first, the evicted one only once the new copy is complete.
    let ev = cluster(&["n3"]);
    let p = plan_replicas(&v, &healthy, &ev, t, wait);
    assert!(p.schedule && p.delete.is_empty(), "{p:?}");
    let mut e = healthy.clone();
    e.push(rep("d", "n4", Some(WO), Some(t), 2));
    assert_eq!(plan_replicas(&v, &e, &ev, t, wait), ReplicaPlan::default());
    e[3] = rep("d", "n4", Some(RW), None, 2);
    assert_eq!(deleted(&plan_replicas(&v, &e, &ev, t, wait)), vec!["c"]);

    // A broken replica goes at once when another complete copy exists; never the last one.
    let mut b = healthy.clone();
    b[2].status.state = ReplicaState::Broken;
    b[2].status.failed_at = Some(t);
    b[2].status.mode = Some(ERR);
    let p = plan_replicas(&v, &b, &nodes, t, wait);
    assert_eq!(deleted(&p), vec!["c"]);
    assert!(p.schedule);
    let mut only = vec![b[2].clone()];
    only[0].metadata.name = "z".into();
    assert!(plan_replicas(&v, &only, &nodes, t, wait).delete.is_empty());

    // Every copy failed long ago: nothing is deleted (salvage needs them).
    let all_stale: Vec<Replica> = ["a", "b", "c"]
        .iter()
        .zip(["n1", "n2", "n3"])
        .map(|(n, node)| rep(n, node, Some(ERR), Some(t - 600), 1))
        .collect();
    let p = plan_replicas(&v, &all_stale, &nodes, t, wait);
    assert_eq!(
        p,
        ReplicaPlan::default(),
        "no deletion, and no empty replacement"
    );
}

#[test]
fn a_faulted_volume_is_salvaged_from_the_replica_chosen() {
    let mut sim = Sim::new(&["n1", "n2", "n3"]);
    let names = sim.attached("v");
    let err = sim
        .m
        .salvage_volume("v", &names[1])
        .expect_err("healthy volume");
    assert_eq!(err.code, "NotFaulted");
    let refs: Vec<(&str, ReplicaMode)> = names
        .iter()
        .map(|n| (n.as_str(), ReplicaMode::ERR))
        .collect();
    sim.beat("n1", &[("v", &refs)]);
    sim.all_beat(&[]);
    sim.m.reconcile().expect("reconcile");
    assert_eq!(sim.volume("v").status.robustness, Robustness::Faulted);
    let gen0 = sim.engine("v").expect("engine").spec.generation;
    assert_eq!(
        sim.m
            .salvage_volume("v", "v-r-nope")
            .expect_err("unknown")
            .code,
        "NotFound"
    );
    sim.m.salvage_volume("v", &names[1]).expect("salvage");
    let r = store::get::<Replica>(&*sim.m.store, &names[1])
        .expect("get")
        .expect("r");
    assert!(r.status.failed_at.is_none() && r.status.mode == Some(ReplicaMode::RW));
    assert!(
        sim.engine("v")
            .expect("engine")
            .metadata
            .deletion_requested
            .is_some()
    );
    // The node stops the old engine; the new one starts from the chosen replica alone.
    sim.beat("n1", &[]);
    sim.all_beat(&[]);
    sim.m.reconcile().expect("reconcile");
    let e = sim.engine("v").expect("new engine");
    assert_ne!(e.spec.generation, gen0);
    let candidates: Vec<&str> = e
        .spec
        .replicas
        .iter()
        .filter(|r| r.candidate)
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(candidates, vec![names[1].as_str()]);
    sim.tick(1);
}

#[test]
fn a_revert_runs_on_a_detached_volume_and_replicas_that_missed_it_are_not_complete_copies() {
    let mut sim = Sim::new(&["n1", "n2", "n3"]);
    let names = sim.attached("v");
    let s1 = sim.m.create_snapshot("v", Some("s1")).expect("snapshot");
    assert_eq!(s1.spec.name, "s1");
    sim.m.create_snapshot("v", Some("s2")).expect("snapshot");
    let err = sim.m.revert_volume("v", "s1").expect_err("attached");
    assert_eq!(err.code, "VolumeAttached");
    sim.m.detach_volume("v").expect("detach");
    sim.m.reconcile().expect("reconcile");
    sim.beat("n1", &[]);
    sim.all_beat(&[]);
    sim.m.reconcile().expect("reconcile");
    assert_eq!(sim.volume("v").status.state, VolumeState::Detached);
    assert_eq!(
        sim.m.revert_volume("v", "nope").expect_err("unknown").code,
        "NotFound"
    );
    sim.m.revert_volume("v", "s1").expect("revert");
    assert_eq!(
        sim.m
            .attach_volume("v", Some("n1"))
            .expect_err("reverting")
            .code,
        "RevertInProgress"
    );
    sim.m.reconcile().expect("reconcile");
    let e = sim.engine("v").expect("an engine for the revert");
    assert_eq!(e.spec.revert.as_deref(), Some("s1"));
    assert!(!e.spec.frontend);
    assert_eq!(sim.volume("v").status.state, VolumeState::Detached);
    // The engine reverted with two replicas; the third was not in its set.
    let node = e.spec.node.clone();
    let report = EngineReport {
        volume: "v".into(),
        generation: e.spec.generation,
        nbd_uri: String::new(),
        replicas: names[..2]
            .iter()
            .map(|n| EngineReplicaReport {
                name: n.clone(),
                mode: ReplicaMode::RW,
                rebuild_copied: 0,
                rebuild_skipped: 0,
                rebuild_total: 0,
            })
            .collect(),
        snapshots: vec![SnapshotInfo {
            name: "s1".into(),
            ..Default::default()
        }],
        restore: None,
        revert: Some(RevertReport {
            snapshot: "s1".into(),
            error: String::new(),
        }),
    };
    sim.m
        .heartbeat(
            &node,
            Heartbeat {
                address: node.clone(),
                nbd_address: node.clone(),
                engines: vec![report],
                ..Default::default()
            },
        )
        .expect("heartbeat");
    let v = sim.volume("v");
    assert!(v.spec.revert.is_none());
    assert_eq!(
        v.status.revert.as_ref().map(|r| r.state),
        Some(RevertState::Done)
    );
    let third = store::get::<Replica>(&*sim.m.store, &names[2])
        .expect("get")
        .expect("r");
    assert!(
        third.status.failed_at.is_some(),
        "missed the revert: not a complete copy"
    );
    // The snapshot objects not in the reported chain are gone; s1 stays.
    let get = |n: &str| store::get::<Snapshot>(&*sim.m.store, n).expect("get");
    assert!(get("v.s1").is_some());
    assert!(get("v.s2").is_none());
    sim.tick(1);
}

#[test]
fn a_volume_whose_engine_cannot_start_says_why() {
    let sim = Sim::new(&["n1", "n2", "n3"]);
    sim.m.create_volume("v", 1 << 30, 3).expect("create");
    sim.settle("v");
    sim.m.attach_volume("v", Some("n1")).expect("attach");
    sim.m.reconcile().expect("reconcile");
    let e = sim.engine("v").expect("engine");
    let why = "connecting to replica v-r-1 at n2:1: failed to lookup address information";
    sim.m
        .heartbeat(
            "n1",
            Heartbeat {
                address: "n1".into(),
                nbd_address: "n1".into(),
                engine_errors: vec![EngineStartError {
                    volume: "v".into(),
                    generation: e.spec.generation,
                    message: why.into(),
                }],
                ..Default::default()
            },
        )
        .expect("heartbeat");
    sim.m.reconcile().expect("reconcile");
    let v = sim.volume("v");
    assert_eq!(v.status.state, VolumeState::Attaching);
    assert!(v.status.message.contains(why), "{}", v.status.message);
    assert!(v.status.message.contains("n1"), "{}", v.status.message);
    // Once the engine runs, the reason goes.
    let names: Vec<String> = sim
        .replicas("v")
        .into_iter()
        .map(|r| r.metadata.name)
        .collect();
    let modes: Vec<(&str, ReplicaMode)> = names
        .iter()
        .map(|n| (n.as_str(), ReplicaMode::RW))
        .collect();
    sim.beat("n1", &[("v", &modes)]);
    sim.m.reconcile().expect("reconcile");
    let v = sim.volume("v");
    assert_eq!(v.status.state, VolumeState::Attached);
    assert!(v.status.message.is_empty(), "{}", v.status.message);
}

#[test]
fn one_pass_places_every_replica_of_a_new_volume_on_distinct_nodes() {
    let sim = Sim::new(&["n1", "n2", "n3"]);
    sim.m.create_volume("v", 1 << 30, 3).expect("create");
    let only: std::collections::BTreeSet<String> = ["v".to_string()].into();
    let unsettled = sim.m.reconcile_pass(Some(&only), false).expect("pass");
    let reps = sim.replicas("v");
    assert_eq!(reps.len(), 3, "all three placed in one pass");
    let nodes: std::collections::BTreeSet<&str> =
        reps.iter().map(|r| r.spec.node.as_str()).collect();
    assert_eq!(nodes.len(), 3, "anti-affinity: one per node");
    assert!(unsettled.contains("v"), "not running yet: looked at again");
}

#[test]
fn a_settled_volume_leaves_the_pass_until_something_about_it_changes() {
    let mut sim = Sim::new(&["n1", "n2", "n3", "n4"]);
    sim.m.create_volume("d", 1 << 30, 3).expect("create");
    sim.settle("d");
    let only: std::collections::BTreeSet<String> = ["d".to_string()].into();
    let unsettled = sim.m.reconcile_pass(Some(&only), false).expect("pass");
    assert!(unsettled.is_empty(), "detached with 3 running replicas");
    let names = sim.attached("v");
    let only: std::collections::BTreeSet<String> = ["v".to_string()].into();
    let unsettled = sim.m.reconcile_pass(Some(&only), false).expect("pass");
    assert!(unsettled.is_empty(), "attached and healthy");
    // A failed replica waits for the replenishment interval: the volume is watched again.
    let rw: Vec<(&str, ReplicaMode)> = names[1..]
        .iter()
        .map(|n| (n.as_str(), ReplicaMode::RW))
        .collect();
    sim.beat("n1", &[("v", &rw)]);
    let unsettled = sim.m.reconcile_pass(Some(&only), false).expect("pass");
    assert!(unsettled.contains("v"));
    // Past the wait a replacement is placed by a pass over the unsettled volume alone.
    sim.tick(sim.m.setting_u64("replica-replenishment-wait-interval") + 1);
    sim.beat("n1", &[("v", &rw)]);
    sim.all_beat(&[]);
    sim.m.reconcile_pass(Some(&unsettled), false).expect("pass");
    let fresh = sim
        .replicas("v")
        .into_iter()
        .filter(|x| !names.contains(&x.metadata.name))
        .count();
    assert_eq!(fresh, 1, "a replacement for the failed replica");
}

#[test]
fn settled_needs_every_replica_running_and_the_engine_where_the_volume_is_attached() {
    let mut v = vol3();
    v.status.state = VolumeState::Detached;
    let running = |name: &str, node: &str| rep(name, node, None, None, 1);
    let reps = vec![running("a", "n1"), running("b", "n2"), running("c", "n3")];
    assert!(settled(&v, &reps, None));
    assert!(!settled(&v, &reps[..2], None), "one replica short");
    let mut failed = reps.clone();
    failed[0].status.failed_at = Some(1);
    assert!(
        !settled(&v, &failed, None),
        "a failed replica waits on time"
    );
    let mut standby = v.clone();
    standby.spec.standby = true;
    assert!(!settled(&standby, &reps, None), "a standby follows backups");
    let mut attaching = v.clone();
    attaching.spec.node = Some("n1".into());
    attaching.status.state = VolumeState::Attaching;
    assert!(!settled(&attaching, &reps, None), "no engine yet");
    let mut e = Engine::default();
    e.spec.node = "n1".into();
    e.status.state = EngineState::Running;
    attaching.status.state = VolumeState::Attached;
    attaching.status.robustness = Robustness::Healthy;
    assert!(settled(&attaching, &reps, Some(&e)));
    e.spec.node = "n2".into();
    assert!(
        !settled(&attaching, &reps, Some(&e)),
        "engine on another node"
    );
}

#[test]
fn a_heartbeat_is_one_store_transaction() {
    let sim = Sim::new(&["n1", "n2", "n3"]);
    sim.m.create_volume("v", 1 << 30, 3).expect("create");
    sim.m.reconcile().expect("reconcile");
    let mut w = sim.m.store.watch();
    // n1 reports its replica running: node status and replica status change together.
    sim.beat("n1", &[]);
    let mut revisions = std::collections::BTreeSet::new();
    while let Ok(ev) = w.try_recv() {
        revisions.insert(ev.resource_version);
    }
    assert_eq!(
        revisions.len(),
        1,
        "every write of the heartbeat in one commit"
    );
    // A heartbeat that changes nothing writes nothing.
    let a = sim.beat("n1", &[]);
    assert!(w.try_recv().is_err());
    // Over HTTP, the same report bytes with nothing changed get the same answer without being
    // applied; any store change is seen at once.
    let report = serde_json::to_vec(&Heartbeat {
        address: "n1".into(),
        nbd_address: "n1".into(),
        disks: vec![DiskStatus {
            path: "/d".into(),
            capacity: 1 << 40,
            available: 1 << 40,
            scheduled: 0,
        }],
        replicas: a
            .replicas
            .iter()
            .map(|r| ReplicaReport {
                address: format!("n1:{}", r.name),
                name: r.name.clone(),
                flush_seq: 1,
            })
            .collect(),
        ..Default::default()
    })
    .expect("json");
    let first = sim.m.heartbeat_raw("n1", &report).expect("beat");
    let again = sim.m.heartbeat_raw("n1", &report).expect("beat");
    assert_eq!(first, again);
    assert_eq!(
        sim.m.heartbeat_unchanged("n1", &report),
        Some(again.clone()),
        "answered without the store"
    );
    assert_eq!(
        sim.m.heartbeat_unchanged("n1", b"{}"),
        None,
        "another report"
    );
    assert_eq!(
        sim.m.heartbeat_unchanged("n2", &report),
        None,
        "another node"
    );
    let parsed: Assignments = serde_json::from_slice(&again).expect("answer");
    assert_eq!(parsed, a);
    sim.m.create_volume("w", 1 << 30, 3).expect("create");
    sim.m.reconcile().expect("reconcile");
    assert_eq!(
        sim.m.heartbeat_unchanged("n1", &report),
        None,
        "the store changed"
    );
    let b: Assignments =
        serde_json::from_slice(&sim.m.heartbeat_raw("n1", &report).expect("beat")).expect("json");
    assert_eq!(
        b.replicas.len(),
        a.replicas.len() + 1,
        "the new volume's replica"
    );
    let err = sim
        .m
        .heartbeat_raw("n1", b"{not json")
        .expect_err("bad body");
    assert_eq!(err.kind, crate::ErrorKind::BadRequest);
}

#[test]
fn an_engine_rebuilding_a_detached_volume_stays_on_its_node_while_it_holds_a_complete_copy() {
    let sim = Sim::new(&["n1", "n2", "n3"]);
    // A switch: true or false, nothing else.
    sim.m
        .put_setting("offline-replica-rebuilding", "false")
        .expect("false");
    assert!(
        sim.m
            .put_setting("offline-replica-rebuilding", "1")
            .is_err()
    );
    sim.m
        .put_setting("offline-replica-rebuilding", "true")
        .expect("true");
    let v = vol3();
    let live = vec![
        rep("a", "n1", Some(ReplicaMode::RW), None, 1),
        rep("b", "n2", Some(ReplicaMode::RW), None, 1),
        rep("c", "n3", Some(ReplicaMode::ERR), Some(1), 1),
    ];
    let nodes = cluster(&[]);
    // No engine yet: the first complete copy's node.
    assert_eq!(
        sim.m.engine_node(&v, None, &live, &nodes, None).as_deref(),
        Some("n1")
    );
    // Running on n2, which holds a complete copy: it stays there.
    let mut e = Engine::default();
    e.spec.node = "n2".into();
    assert_eq!(
        sim.m
            .engine_node(&v, None, &live, &nodes, Some(&e))
            .as_deref(),
        Some("n2")
    );
    // Its copy there failed meanwhile: it moves to one that is complete.
    let mut failed = live.clone();
    failed[1].status.mode = Some(ReplicaMode::ERR);
    failed[1].status.failed_at = Some(2);
    assert_eq!(
        sim.m
            .engine_node(&v, None, &failed, &nodes, Some(&e))
            .as_deref(),
        Some("n1")
    );
    // Nothing left to rebuild: no engine, wherever it ran.
    let mut done = live.clone();
    done[2].status.mode = Some(ReplicaMode::RW);
    done[2].status.failed_at = None;
    assert_eq!(sim.m.engine_node(&v, None, &done, &nodes, Some(&e)), None);
}

#[test]
fn rolling_slices_cover_every_volume_in_turn_and_wrap_around() {
    let sim = Sim::new(&["n1"]);
    for i in 0..5 {
        sim.m
            .create_volume(&format!("v{i}"), 1 << 20, 1)
            .expect("create");
    }
    let mut cursor = String::new();
    let a = sim.m.volume_slice(&mut cursor, Some(2));
    let b = sim.m.volume_slice(&mut cursor, Some(2));
    let c = sim.m.volume_slice(&mut cursor, Some(2));
    assert_eq!(a, vec!["v0", "v1"]);
    assert_eq!(b, vec!["v2", "v3"]);
    assert_eq!(c, vec!["v4"], "the last slice is short");
    assert_eq!(
        sim.m.volume_slice(&mut cursor, Some(2)),
        vec!["v0", "v1"],
        "then it starts over"
    );
    // Unsized, a slice takes at least 64: all five here.
    let mut cursor = String::new();
    assert_eq!(sim.m.volume_slice(&mut cursor, None).len(), 5);
    assert_eq!(cursor, "", "and wraps round");
}

#[test]
fn a_volume_is_attached_only_once_its_node_serves_it() {
    let sim = Sim::new(&["n1", "n2", "n3"]);
    sim.m.create_volume("v", 1 << 30, 3).expect("create");
    sim.settle("v");
    sim.m.attach_volume("v", Some("n1")).expect("attach");
    sim.m.reconcile().expect("reconcile");
    let e = sim.engine("v").expect("engine");
    let names: Vec<String> = sim
        .replicas("v")
        .into_iter()
        .map(|r| r.metadata.name)
        .collect();
    let report = |uri: &str| EngineReport {
        volume: "v".into(),
        generation: e.spec.generation,
        nbd_uri: uri.into(),
        replicas: names
            .iter()
            .map(|n| EngineReplicaReport {
                name: n.clone(),
                mode: ReplicaMode::RW,
                rebuild_copied: 0,
                rebuild_skipped: 0,
                rebuild_total: 0,
            })
            .collect(),
        ..Default::default()
    };
    let beat = |uri: &str| {
        let mut hb = Heartbeat {
            address: "n1".into(),
            nbd_address: "n1".into(),
            engines: vec![report(uri)],
            ..Default::default()
        };
        hb.replicas = store::list_by::<Replica>(&*sim.m.store, crate::store::Field::Node, "n1")
            .expect("list")
            .into_iter()
            .map(|r| ReplicaReport {
                address: format!("n1:{}", r.metadata.name),
                name: r.metadata.name,
                flush_seq: 1,
            })
            .collect();
        sim.m.heartbeat("n1", hb).expect("heartbeat");
        sim.m.reconcile().expect("reconcile");
        sim.volume("v")
    };
    // The engine runs but is not exported yet (the node has not applied the attach).
    let v = beat("");
    assert_eq!(v.status.state, VolumeState::Attaching);
    assert!(v.status.nbd_uri.is_none());
    let v = beat("nbd://n1/v");
    assert_eq!(v.status.state, VolumeState::Attached);
    assert_eq!(v.status.nbd_uri.as_deref(), Some("nbd://n1/v"));
}

/// Scheduling decisions, one case per row: nodes with their disk capacity and whether they take
/// new replicas, a volume's size and replica count, and where its replicas go.
#[test]
fn scheduling_table() {
    struct Case {
        what: &'static str,
        nodes: &'static [(&'static str, u64, bool)],
        size: u64,
        replicas: u32,
        soft: bool,
        want: &'static [&'static str],
        no_room: bool,
    }
    const G: u64 = 1 << 30;
    let cases = [
        Case {
            what: "one replica per node, most room first",
            nodes: &[
                ("n1", 10 * G, true),
                ("n2", 40 * G, true),
                ("n3", 20 * G, true),
            ],
            size: G,
            replicas: 2,
            soft: false,
            want: &["n2", "n3"],
            no_room: false,
        },
        Case {
            what: "an unschedulable node gets none, even with the most room",
            nodes: &[
                ("n1", 10 * G, true),
                ("n2", 40 * G, false),
                ("n3", 20 * G, true),
            ],
            size: G,
            replicas: 2,
            soft: false,
            want: &["n1", "n3"],
            no_room: false,
        },
        Case {
            what: "a disk is filled to twice its capacity at most (thin provisioning)",
            nodes: &[("n1", 2 * G, true), ("n2", G, true), ("n3", 8 * G, true)],
            size: 3 * G,
            replicas: 3,
            soft: false,
            want: &["n1", "n3"],
            no_room: true,
        },
        Case {
            what: "soft anti-affinity doubles up when nodes run out",
            nodes: &[("n1", 40 * G, true), ("n2", 10 * G, true)],
            size: G,
            replicas: 3,
            soft: true,
            want: &["n1", "n1", "n2"],
            no_room: false,
        },
    ];
    for c in cases {
        let store = Arc::new(MemStore::default());
        let m = Manager::new(store, "t".into(), None).expect("manager");
        m.put_setting(
            "replica-soft-anti-affinity",
            if c.soft { "true" } else { "false" },
        )
        .expect("setting");
        for (n, cap, sched) in c.nodes {
            m.heartbeat(
                n,
                Heartbeat {
                    address: n.to_string(),
                    nbd_address: n.to_string(),
                    disks: vec![DiskStatus {
                        path: "/d".into(),
                        capacity: *cap,
                        available: *cap,
                        scheduled: 0,
                    }],
                    ..Default::default()
                },
            )
            .expect("beat");
            if !sched {
                m.update_node(n, Some(false), None).expect("unschedulable");
            }
        }
        m.create_volume("v", c.size, c.replicas).expect("create");
        m.reconcile().expect("reconcile");
        let mut got: Vec<String> = store::list::<Replica>(&*m.store)
            .expect("list")
            .into_iter()
            .map(|r| r.spec.node)
            .collect();
        got.sort();
        assert_eq!(got, c.want, "{}", c.what);
        let msg = m.get_volume("v").expect("volume").status.message;
        assert_eq!(
            msg.contains("no node with room"),
            c.no_room,
            "{}: message {msg:?}",
            c.what
        );
    }
}
