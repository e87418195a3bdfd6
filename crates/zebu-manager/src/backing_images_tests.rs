//! Backing-image wiring without processes: a manager on the in-memory store, nodes simulated by
//! heartbeats that report copies; what each node is ordered, when replicas reach their nodes,
//! how reports move the image's state, and what is refused.

use std::sync::Arc;

use super::*;
use crate::store::MemStore;

const SUM: &str = "ab";

fn sum() -> String {
    SUM.repeat(64)
}

struct Sim {
    m: Arc<Manager>,
    /// Replicas the manager sent to their nodes so far.
    sent: std::sync::Mutex<Vec<String>>,
}

fn copy(name: &str, uid: &str, state: BackingImageState, checksum: &str) -> CopyReport {
    CopyReport {
        name: name.into(),
        uid: uid.into(),
        state,
        progress: if state == BackingImageState::Ready {
            100
        } else {
            50
        },
        size: 1 << 20,
        checksum: checksum.into(),
        message: String::new(),
    }
}

impl Sim {
    fn new() -> Sim {
        let m = Manager::new(Arc::new(MemStore::default()), "t".into(), None).expect("manager");
        let sim = Sim {
            m,
            sent: Default::default(),
        };
        for n in ["n1", "n2", "n3"] {
            sim.beat(n, &[]);
        }
        sim
    }

    /// A heartbeat from `node` reporting `copies` and every replica assigned to it running.
    fn beat(&self, node: &str, copies: &[CopyReport]) -> Assignments {
        let replicas = store::list::<Replica>(&*self.m.store)
            .expect("list")
            .into_iter()
            .filter(|r| r.spec.node == node)
            .map(|r| ReplicaReport {
                address: format!("{node}:{}", r.metadata.name),
                name: r.metadata.name,
                flush_seq: 1,
            })
            .collect::<Vec<_>>();
        // Only replicas the node was sent run there.
        let replicas: Vec<ReplicaReport> = replicas
            .into_iter()
            .filter(|r| self.sent.lock().is_ok_and(|s| s.contains(&r.name)))
            .collect();
        self.m
            .heartbeat(
                node,
                Heartbeat {
                    address: node.into(),
                    nbd_address: format!("{node}:10809"),
                    transfer_address: format!("{node}:9501"),
                    disks: vec![DiskStatus {
                        path: "/d".into(),
                        capacity: 1 << 40,
                        available: 1 << 40,
                        scheduled: 0,
                    }],
                    replicas,
                    backing_images: copies.to_vec(),
                    ..Default::default()
                },
            )
            .expect("heartbeat")
            .tap(|a| {
                if let Ok(mut s) = self.sent.lock() {
                    s.extend(a.replicas.iter().map(|r| r.name.clone()));
                }
            })
    }

    fn image(&self, name: &str) -> BackingImage {
        store::get::<BackingImage>(&*self.m.store, name)
            .expect("get")
            .expect("image")
    }

    fn pass(&self) {
        self.m.reconcile_images().expect("images");
        self.m.reconcile().expect("reconcile");
        self.m.reconcile_images().expect("images");
    }
}

trait Tap: Sized {
    fn tap(self, f: impl FnOnce(&Self)) -> Self {
        f(&self);
        self
    }
}

impl Tap for Assignments {}

fn download(url: &str) -> BackingImageSpec {
    BackingImageSpec {
        source: BackingImageSource {
            kind: BackingImageSourceKind::Download,
            url: url.into(),
            ..Default::default()
        },
        checksum: String::new(),
        min_copies: 1,
    }
}

#[test]
fn the_first_copy_comes_from_the_url_on_one_node_and_later_ones_from_a_peer() {
    let sim = Sim::new();
    let img = sim
        .m
        .create_backing_image("img", download("http://h/img.raw"))
        .expect("create");
    let uid = img.metadata.uid.clone();
    sim.pass();
    assert_eq!(
        sim.image("img")
            .status
            .copies
            .iter()
            .map(|c| c.node.as_str())
            .collect::<Vec<_>>(),
        vec!["n1"]
    );
    // Only n1 is told to download.
    assert!(sim.beat("n2", &[]).backing_images.is_empty());
    let a = sim.beat("n1", &[]);
    assert_eq!(a.backing_images.len(), 1);
    assert_eq!(
        a.backing_images[0].source,
        CopySource::Url {
            url: "http://h/img.raw".into()
        }
    );
    sim.beat(
        "n1",
        &[copy("img", &uid, BackingImageState::InProgress, "")],
    );
    let b = sim.image("img");
    assert_eq!(
        (b.status.state, b.status.progress),
        (BackingImageState::InProgress, 50)
    );
    sim.beat("n1", &[copy("img", &uid, BackingImageState::Ready, &sum())]);
    let b = sim.image("img");
    assert_eq!(b.status.state, BackingImageState::Ready);
    assert_eq!(b.status.checksum, sum());
    assert_eq!(b.status.virtual_size, 1 << 20);

    // A 3-replica volume on it: n2 and n3 need copies, fetched from n1; their replicas wait.
    let (ok_small, _) = (sim.m.check_volume_image("img", 1 << 19), ());
    assert_eq!(ok_small.expect_err("too small").code, "InvalidSize");
    let req = crate::api::CreateVolume {
        name: "v".into(),
        size: Some(2 << 20),
        replicas: 3,
        backing_image: Some("img".into()),
        from_backup: None,
        backup_target: None,
        standby: false,
    };
    sim.m.create_volume_with(&req).expect("volume");
    sim.pass();
    let nodes: Vec<String> = sim
        .image("img")
        .status
        .copies
        .iter()
        .map(|c| c.node.clone())
        .collect();
    assert_eq!(nodes, ["n1", "n2", "n3"]);
    let a = sim.beat("n2", &[]);
    assert!(
        a.replicas.is_empty(),
        "a replica before its node's copy: {a:?}"
    );
    match &a.backing_images[..] {
        [o] => assert_eq!(
            o.source,
            CopySource::Peer {
                node: "n1".into(),
                peer: "n1:9501".into(),
                copy: CopyRef {
                    name: "img".into(),
                    uid: uid.clone(),
                    checksum: sum(),
                    size: 1 << 20,
                },
            }
        ),
        other => panic!("orders {other:?}"),
    }
    // n1's replica goes out with the copy it reads through.
    let a = sim.beat("n1", &[copy("img", &uid, BackingImageState::Ready, &sum())]);
    assert_eq!(a.replicas.len(), 1);
    assert_eq!(
        a.replicas[0]
            .backing_image
            .as_ref()
            .map(|c| c.checksum.clone()),
        Some(sum())
    );
    sim.pass();
    let msg = sim.m.get_volume("v").expect("v").status.message;
    assert!(
        msg.contains(r#"waiting for backing image "img" on node(s) n2, n3"#),
        "{msg}"
    );
    // A copy with another checksum is deleted and fetched again.
    let bad = "cd".repeat(64);
    let a = sim.beat("n2", &[copy("img", &uid, BackingImageState::Ready, &bad)]);
    assert!(a.replicas.is_empty());
    assert_eq!(a.delete_backing_images.len(), 1, "{a:?}");
    let c2 = sim.image("img").status.copies[1].clone();
    assert_eq!(c2.state, BackingImageState::Pending);
    assert!(c2.message.contains("differs"), "{}", c2.message);
    let a = sim.beat("n2", &[copy("img", &uid, BackingImageState::Ready, &sum())]);
    assert_eq!(a.replicas.len(), 1);
    // In use: refused with the volume named.
    let e = sim.m.delete_backing_image("img").expect_err("in use");
    assert_eq!(e.code, "InUse");
    assert!(e.message.contains("v"));
    // A copy of an image this manager does not know, or of an older uid, goes.
    let a = sim.beat(
        "n3",
        &[
            copy("ghost", &"0".repeat(32), BackingImageState::Ready, &sum()),
            copy("img", &"1".repeat(32), BackingImageState::Ready, &sum()),
        ],
    );
    let mut gone: Vec<String> = a
        .delete_backing_images
        .iter()
        .map(|c| c.name.clone())
        .collect();
    gone.sort();
    assert_eq!(gone, ["ghost", "img"]);
}

#[test]
fn a_failed_first_copy_fails_the_image_for_good_and_bad_requests_change_nothing() {
    let sim = Sim::new();
    let img = sim
        .m
        .create_backing_image("bad", download("http://h/missing.raw"))
        .expect("create");
    sim.pass();
    let mut f = copy("bad", &img.metadata.uid, BackingImageState::Failed, "");
    f.message = "http://h/missing.raw: the server answered 404 Not Found".into();
    sim.beat("n1", &[f]);
    let b = sim.image("bad");
    assert_eq!(b.status.state, BackingImageState::Failed);
    assert!(b.status.message.contains("404"), "{}", b.status.message);
    // The node forgets it (a restart): still failed, and nobody is told to try again.
    sim.beat("n1", &[]);
    sim.pass();
    assert_eq!(sim.image("bad").status.state, BackingImageState::Failed);
    for n in ["n1", "n2", "n3"] {
        assert!(sim.beat(n, &[]).backing_images.is_empty());
    }
    let e = sim
        .m
        .check_volume_image("bad", 1 << 30)
        .expect_err("not ready");
    assert_eq!(e.code, "NotReady");
    // Bad requests.
    let before = store::list::<BackingImage>(&*sim.m.store)
        .expect("list")
        .len();
    for (name, spec, code) in [
        ("x", download("ftp://h/x"), "InvalidUrl"),
        ("x", download("not a url"), "InvalidUrl"),
        ("X", download("http://h/x"), "InvalidName"),
        (
            "x",
            BackingImageSpec {
                checksum: "12".into(),
                ..download("http://h/x")
            },
            "InvalidChecksum",
        ),
        (
            "x",
            BackingImageSpec {
                min_copies: 0,
                ..download("http://h/x")
            },
            "InvalidMinCopies",
        ),
        (
            "x",
            BackingImageSpec {
                source: BackingImageSource {
                    kind: BackingImageSourceKind::Clone,
                    image: "bad".into(),
                    ..Default::default()
                },
                checksum: String::new(),
                min_copies: 1,
            },
            "NotReady",
        ),
        ("bad", download("http://h/x"), "AlreadyExists"),
    ] {
        let e = sim.m.create_backing_image(name, spec).expect_err(name);
        assert_eq!(e.code, code, "{}", e.message);
    }
    assert_eq!(
        store::list::<BackingImage>(&*sim.m.store)
            .expect("list")
            .len(),
        before
    );
}
