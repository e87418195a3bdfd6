//! API tests in-process: the OpenAPI document matches the routes served (both ways), auth on every
//! route but health, errors are JSON with a code, and the store's compare-and-swap.

use std::sync::Arc;

use serde_json::{Value, json};
use zebu_manager::api::{ROUTES, router};
use zebu_manager::controller::Manager;
use zebu_manager::model::{Meta, Setting};
use zebu_manager::store::{self, RedbStore, Store, StoreError};

fn tempdir() -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!(
        "zebu-manager-test-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&p).expect("mkdir");
    p
}

async fn serve() -> (String, std::path::PathBuf) {
    let dir = tempdir();
    let store = Arc::new(RedbStore::open(&dir.join("store.redb")).expect("store"));
    let m = Manager::new(store, "secret".into(), None).expect("manager");
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    tokio::spawn(async move { axum::serve(l, router(m)).await });
    (format!("http://{addr}"), dir)
}

#[tokio::test]
async fn openapi_document_matches_the_routes() {
    let (base, dir) = serve().await;
    let http = reqwest::Client::new();
    let doc: Value = http
        .get(format!("{base}/v1/openapi.json"))
        .bearer_auth("secret")
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    let committed: Value = serde_json::from_str(include_str!("../../../docs/openapi.json"))
        .expect("committed document");
    assert_eq!(
        doc, committed,
        "served document differs from docs/openapi.json"
    );
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for method in ops.as_object().expect("ops").keys() {
            documented.push((method.clone(), path.clone()));
        }
    }
    documented.sort();
    let mut routes: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    routes.sort();
    assert_eq!(
        documented, routes,
        "docs/openapi.json and api::ROUTES drifted apart (run scripts/gen-openapi.py)"
    );
    // Every route is served (not the fallback), and all but health need the token.
    for (method, path) in ROUTES {
        let url = format!("{base}{}", path.replace("{name}", "x"));
        let req = |auth: bool| {
            let r = match *method {
                "get" => http.get(&url),
                "post" => http.post(&url).json(&json!({})),
                "put" => http.put(&url).json(&json!({})),
                _ => http.delete(&url),
            };
            if auth { r.bearer_auth("secret") } else { r }
        };
        let resp = req(true).send().await.expect("send");
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        assert!(
            status != 405 && !body.contains("no such endpoint"),
            "{method} {path} is not served: {status} {body}"
        );
        assert!(status < 500, "{method} {path}: {status} {body}");
        let resp = req(false).send().await.expect("send");
        if *path == "/v1/health" {
            assert_eq!(resp.status().as_u16(), 200);
        } else {
            assert_eq!(
                resp.status().as_u16(),
                401,
                "{method} {path} without a token"
            );
            let e: Value = resp.json().await.expect("json error");
            assert_eq!(e["code"], "Unauthorized");
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The contract every `Store` keeps: identity, compare-and-swap, watch, counters, deletes.
fn store_contract(s: &dyn Store) {
    let mut w = s.watch();
    let a = Setting {
        metadata: Meta {
            name: "a".into(),
            ..Default::default()
        },
        value: "1".into(),
    };
    let created = store::create(s, &a).expect("create");
    assert!(created.metadata.resource_version > 0);
    assert!(!created.metadata.uid.is_empty());
    assert!(matches!(
        store::create(s, &a),
        Err(StoreError::Exists { .. })
    ));
    let mut b = created.clone();
    b.value = "2".into();
    let updated = store::update(s, &b).expect("update");
    assert!(updated.metadata.resource_version > created.metadata.resource_version);
    // A writer holding the old version loses.
    let mut stale = created.clone();
    stale.value = "3".into();
    assert!(matches!(
        store::update(s, &stale),
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(
        store::get::<Setting>(s, "a")
            .expect("get")
            .expect("some")
            .value,
        "2"
    );
    // Watch saw both writes.
    assert_eq!(w.try_recv().expect("event").name, "a");
    assert_eq!(
        w.try_recv().expect("event").resource_version,
        updated.metadata.resource_version
    );
    assert!(matches!(
        s.delete("setting", "a", Some(created.metadata.resource_version)),
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(store::list::<Setting>(s).expect("list").len(), 1);
    transactions(s);
}

/// A transaction lands whole or not at all, with one revision, and the index follows it.
fn transactions(s: &dyn Store) {
    use zebu_manager::model::{Replica, ReplicaSpec};
    use zebu_manager::store::{Field, Op};
    let rep = |name: &str, node: &str| {
        serde_json::to_value(Replica {
            metadata: Meta {
                name: name.into(),
                ..Default::default()
            },
            spec: ReplicaSpec {
                volume: "v".into(),
                node: node.into(),
                disk: "d".into(),
                size: if name == "r1" { 1 << 20 } else { 2 << 20 },
                backing_image: String::new(),
            },
            ..Default::default()
        })
        .expect("json")
    };
    let applied = s
        .commit(vec![
            Op::Create {
                kind: "replica".into(),
                obj: rep("r1", "n1"),
            },
            Op::Create {
                kind: "replica".into(),
                obj: rep("r2", "n2"),
            },
        ])
        .expect("commit");
    assert_eq!(applied.len(), 2);
    assert_eq!(applied[0].revision, applied[1].revision);
    let r1 = store::get::<Replica>(s, "r1").expect("get").expect("r1");
    // One op fails (r2 is stale): neither write lands.
    let mut moved = serde_json::to_value(&r1).expect("json");
    moved["spec"]["node"] = "n3".into();
    let mut stale = rep("r2", "n3");
    stale["metadata"]["resourceVersion"] = 1.into();
    assert!(matches!(
        s.commit(vec![
            Op::Update {
                kind: "replica".into(),
                obj: moved.clone(),
            },
            Op::Update {
                kind: "replica".into(),
                obj: stale,
            },
        ]),
        Err(StoreError::Conflict { .. })
    ));
    let on = |node: &str| -> Vec<String> {
        store::list_by::<Replica>(s, Field::Node, node)
            .expect("list_by")
            .into_iter()
            .map(|r| r.metadata.name)
            .collect()
    };
    assert_eq!(on("n1"), vec!["r1"]);
    assert!(on("n3").is_empty());
    // Names in order after a cursor, with the count of all.
    let names = |after: &str, limit: usize| s.names_after("replica", after, limit).expect("names");
    assert_eq!(names("", 10), (vec!["r1".to_string(), "r2".to_string()], 2));
    assert_eq!(names("", 1), (vec!["r1".to_string()], 2));
    assert_eq!(names("r1", 10), (vec!["r2".to_string()], 2));
    assert_eq!(names("r2", 10), (vec![], 2));
    // Bytes placed per (node, disk), also as a transaction sees them before it commits.
    let usage = |s: &dyn Store| {
        let mut u: Vec<_> = s.usage("replica").expect("usage").into_iter().collect();
        u.sort();
        u
    };
    let d = |n: &str, b: u64| ((n.to_string(), "d".to_string()), b);
    assert_eq!(usage(s), vec![d("n1", 1 << 20), d("n2", 2 << 20)]);
    {
        let t = zebu_manager::txn::Txn::new(s);
        t.update("replica", moved.clone()).expect("buffered");
        t.create("replica", rep("r3", "n2")).expect("buffered");
        assert_eq!(usage(&t), vec![d("n2", 4 << 20), d("n3", 1 << 20)]);
        assert_eq!(usage(s), vec![d("n1", 1 << 20), d("n2", 2 << 20)]);
    }
    s.commit(vec![
        Op::Update {
            kind: "replica".into(),
            obj: moved,
        },
        Op::Delete {
            kind: "replica".into(),
            name: "r2".into(),
            resource_version: None,
        },
    ])
    .expect("commit");
    assert!(on("n1").is_empty());
    assert!(on("n2").is_empty());
    assert_eq!(on("n3"), vec!["r1"]);
    assert_eq!(usage(s), vec![d("n3", 1 << 20)]);
    assert_eq!(
        store::list_by::<Replica>(s, Field::Volume, "v")
            .expect("by volume")
            .len(),
        1
    );
    s.delete("replica", "r1", None).expect("delete");
}

#[test]
fn the_in_memory_store_keeps_the_same_contract() {
    let s = zebu_manager::store::MemStore::default();
    store_contract(&s);
    assert_eq!(s.next("g").expect("next"), 1);
    assert_eq!(s.next("g").expect("next"), 2);
    s.delete("setting", "a", None).expect("delete");
    assert!(matches!(
        s.delete("setting", "a", None),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn store_compare_and_swap_and_watch() {
    let dir = tempdir();
    let s = RedbStore::open(&dir.join("s.redb")).expect("store");
    store_contract(&s);
    // Counters are durable across reopen.
    assert_eq!(s.next("g").expect("next"), 1);
    assert_eq!(s.next("g").expect("next"), 2);
    drop(s);
    let s = RedbStore::open(&dir.join("s.redb")).expect("reopen");
    assert_eq!(s.next("g").expect("next"), 3);
    assert_eq!(store::list::<Setting>(&s).expect("list").len(), 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_cached_store_keeps_the_same_contract_and_follows_writes() {
    let dir = tempdir();
    let backend: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.join("c.redb")).expect("store"));
    let c = zebu_manager::cache::Cached::new(backend.clone());
    store_contract(&c);
    // What the cache shows is what the backend holds.
    assert_eq!(
        store::list::<Setting>(&c).expect("cached"),
        store::list::<Setting>(&*backend).expect("backend")
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn concurrent_transactions_are_written_together_and_each_is_checked_alone() {
    let dir = tempdir();
    let s = Arc::new(RedbStore::open(&dir.join("g.redb")).expect("store"));
    let base = store::create(
        &*s,
        &Setting {
            metadata: Meta {
                name: "shared".into(),
                ..Default::default()
            },
            value: "0".into(),
        },
    )
    .expect("create");
    // 16 writers: each creates its own object and tries to update "shared" from the same
    // version; exactly one update wins, every create lands.
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let (s, base) = (s.clone(), base.clone());
            std::thread::spawn(move || {
                let own = Setting {
                    metadata: Meta {
                        name: format!("own-{i}"),
                        ..Default::default()
                    },
                    value: i.to_string(),
                };
                store::create(&*s, &own).expect("own object");
                let mut b = base.clone();
                b.value = i.to_string();
                store::update(&*s, &b).is_ok()
            })
        })
        .collect();
    let wins = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .filter(|w| *w)
        .count();
    assert_eq!(wins, 1, "one compare-and-swap on the same version wins");
    let all = store::list::<Setting>(&*s).expect("list");
    assert_eq!(all.len(), 17);
    let mut revs: Vec<u64> = all.iter().map(|x| x.metadata.resource_version).collect();
    revs.sort_unstable();
    revs.dedup();
    assert_eq!(revs.len(), 17, "every transaction has its own revision");
    let _ = std::fs::remove_dir_all(dir);
}
