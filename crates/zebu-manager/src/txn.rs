//! A transaction over a [`Store`]: reads see its own writes, writes are buffered and committed
//! together with one compare-and-swap per object, so a heartbeat or any multi-object change
//! lands whole or not at all (one round trip on any backend).

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::Value;
use tokio::sync::broadcast;

use crate::store::{
    Applied, Event, Field, Obj, Op, Result, Store, StoreError, Usage, be, count_usage, key,
    name_of, rv_of,
};

enum Pending {
    /// `created`: the object did not exist when the transaction began.
    Put {
        obj: Obj,
        created: bool,
    },
    Delete {
        resource_version: u64,
    },
}

/// Buffered writes over `base`. Objects written keep the resourceVersion they were read at
/// until the commit compares it.
pub struct Txn<'a> {
    base: &'a dyn Store,
    writes: Mutex<BTreeMap<String, (String, String, Pending)>>,
}

impl<'a> Txn<'a> {
    pub fn new(base: &'a dyn Store) -> Txn<'a> {
        Txn {
            base,
            writes: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether anything was written.
    pub fn is_empty(&self) -> bool {
        self.writes.lock().map(|w| w.is_empty()).unwrap_or(true)
    }

    /// Writes everything to the base store at once; a conflict on any object fails it all.
    pub fn finish(self) -> Result<Vec<Applied>> {
        let writes = self.writes.into_inner().map_err(be)?;
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let ops = writes
            .into_values()
            .map(|(kind, name, p)| match p {
                Pending::Put { obj, created: true } => Op::Create {
                    kind,
                    obj: Obj::unwrap_or_clone(obj),
                },
                Pending::Put {
                    obj,
                    created: false,
                } => Op::Update {
                    kind,
                    obj: Obj::unwrap_or_clone(obj),
                },
                Pending::Delete { resource_version } => Op::Delete {
                    kind,
                    name,
                    resource_version: Some(resource_version),
                },
            })
            .collect();
        self.base.commit(ops)
    }

    /// The buffered state of an object: `None` when untouched, `Some(None)` when deleted.
    fn pending(&self, kind: &str, name: &str) -> Result<Option<Option<Obj>>> {
        let w = self.writes.lock().map_err(be)?;
        Ok(w.get(&key(kind, name)).map(|(_, _, p)| match p {
            Pending::Put { obj, .. } => Some(obj.clone()),
            Pending::Delete { .. } => None,
        }))
    }

    /// Lays the buffered writes of `kind` over objects read from the base.
    fn overlay(
        &self,
        kind: &str,
        base: Vec<Obj>,
        keep: impl Fn(&Value) -> bool,
    ) -> Result<Vec<Obj>> {
        let w = self.writes.lock().map_err(be)?;
        let prefix = format!("{kind}/");
        let touched = w
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&prefix));
        if !touched {
            return Ok(base);
        }
        let mut out: BTreeMap<String, Obj> = BTreeMap::new();
        for v in base {
            out.insert(name_of(&v)?, v);
        }
        for (k, (_, name, p)) in w.range(prefix.clone()..) {
            if !k.starts_with(&prefix) {
                break;
            }
            match p {
                Pending::Put { obj, .. } if keep(obj) => {
                    out.insert(name.clone(), obj.clone());
                }
                _ => {
                    out.remove(name);
                }
            }
        }
        Ok(out.into_values().collect())
    }

    fn apply(&self, op: Op) -> Result<Obj> {
        let (kind, name) = op.target()?;
        let current = self.get(&kind, &name)?;
        let mut w = self.writes.lock().map_err(be)?;
        let k = key(&kind, &name);
        let created_here = matches!(w.get(&k), Some((_, _, Pending::Put { created: true, .. })));
        let was_deleted = matches!(w.get(&k), Some((_, _, Pending::Delete { .. })));
        match op {
            Op::Create { obj, .. } => {
                if current.is_some() {
                    return Err(StoreError::Exists { kind, name });
                }
                if was_deleted {
                    // Deleted and created again: the commit needs both; keep it simple and refuse.
                    return Err(StoreError::Backend(format!(
                        "{kind} {name:?} deleted and created in one transaction"
                    )));
                }
                let obj = Obj::new(obj);
                w.insert(
                    k,
                    (
                        kind,
                        name,
                        Pending::Put {
                            obj: obj.clone(),
                            created: true,
                        },
                    ),
                );
                Ok(obj)
            }
            Op::Update { obj, .. } => {
                let Some(old) = current else {
                    return Err(StoreError::NotFound { kind, name });
                };
                let (expected, found) = (rv_of(&obj), rv_of(&old));
                if expected != found {
                    return Err(StoreError::Conflict {
                        kind,
                        name,
                        expected,
                        found,
                    });
                }
                let obj = Obj::new(obj);
                w.insert(
                    k,
                    (
                        kind,
                        name,
                        Pending::Put {
                            obj: obj.clone(),
                            created: created_here,
                        },
                    ),
                );
                Ok(obj)
            }
            Op::Delete {
                resource_version, ..
            } => {
                let Some(old) = current else {
                    return Err(StoreError::NotFound { kind, name });
                };
                let found = rv_of(&old);
                if let Some(expected) = resource_version
                    && expected != found
                {
                    return Err(StoreError::Conflict {
                        kind,
                        name,
                        expected,
                        found,
                    });
                }
                if created_here {
                    w.remove(&k);
                } else {
                    w.insert(
                        k,
                        (
                            kind,
                            name,
                            Pending::Delete {
                                resource_version: found,
                            },
                        ),
                    );
                }
                Ok(old)
            }
        }
    }
}

impl Store for Txn<'_> {
    fn get(&self, kind: &str, name: &str) -> Result<Option<Obj>> {
        match self.pending(kind, name)? {
            Some(v) => Ok(v),
            None => self.base.get(kind, name),
        }
    }

    fn list(&self, kind: &str) -> Result<Vec<Obj>> {
        self.overlay(kind, self.base.list(kind)?, |_| true)
    }

    fn usage(&self, kind: &str) -> Result<Usage> {
        let mut m = self.base.usage(kind)?;
        let w = self.writes.lock().map_err(be)?;
        let prefix = format!("{kind}/");
        for (k, (_, name, p)) in w.range(prefix.clone()..) {
            if !k.starts_with(&prefix) {
                break;
            }
            // This transaction's state of the object replaces the base's.
            if let Some(old) = self.base.get(kind, name)? {
                count_usage(&mut m, &old, false);
            }
            if let Pending::Put { obj, .. } = p {
                count_usage(&mut m, obj, true);
            }
        }
        Ok(m)
    }

    fn list_by(&self, kind: &str, field: Field, value: &str) -> Result<Vec<Obj>> {
        self.overlay(kind, self.base.list_by(kind, field, value)?, |o| {
            field.of(o) == Some(value)
        })
    }

    /// Buffers the ops (checked one by one against this transaction's view); nothing reaches
    /// the base store before [`Txn::finish`].
    /// What it returns is the transaction's own view: nothing is written yet, so there is no
    /// revision and no previous value.
    fn commit(&self, ops: Vec<Op>) -> Result<Vec<Applied>> {
        let mut out = Vec::new();
        for op in ops {
            let (kind, name) = op.target()?;
            let deleting = matches!(op, Op::Delete { .. });
            let v = self.apply(op)?;
            out.push(Applied {
                kind,
                name,
                value: (!deleting).then_some(v),
                old: None,
                revision: 0,
            });
        }
        Ok(out)
    }

    fn next(&self, counter: &str) -> Result<u64> {
        self.base.next(counter)
    }

    fn watch(&self) -> broadcast::Receiver<Event> {
        self.base.watch()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Meta, Replica, ReplicaSpec};
    use crate::store::{self, MemStore};

    fn replica(name: &str, node: &str) -> Replica {
        Replica {
            metadata: Meta {
                name: name.into(),
                ..Default::default()
            },
            spec: ReplicaSpec {
                volume: "v".into(),
                node: node.into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn writes_are_seen_inside_and_land_together() {
        let base = MemStore::default();
        store::create(&base, &replica("a", "n1")).expect("create");
        let mut w = base.watch();
        let t = Txn::new(&base);
        store::create(&t, &replica("b", "n1")).expect("buffered create");
        store::modify::<Replica>(&t, "a", |r| {
            r.spec.node = "n2".into();
            true
        })
        .expect("buffered update");
        // Read-your-writes, through the index too; nothing reached the base yet.
        let on_n1: Vec<String> = store::list_by::<Replica>(&t, Field::Node, "n1")
            .expect("list")
            .into_iter()
            .map(|r| r.metadata.name)
            .collect();
        assert_eq!(on_n1, vec!["b".to_string()]);
        assert_eq!(store::list::<Replica>(&base).expect("list").len(), 1);
        assert!(w.try_recv().is_err());
        let applied = t.finish().expect("commit");
        assert_eq!(applied.len(), 2);
        // One revision for the whole transaction.
        assert_eq!(applied[0].revision, applied[1].revision);
        let a = store::get::<Replica>(&base, "a").expect("get").expect("a");
        assert_eq!(a.spec.node, "n2");
        assert_eq!(a.metadata.resource_version, applied[0].revision);
        assert!(store::get::<Replica>(&base, "b").expect("get").is_some());
    }

    #[test]
    fn a_conflict_on_one_object_writes_nothing() {
        let base = MemStore::default();
        store::create(&base, &replica("a", "n1")).expect("create");
        store::create(&base, &replica("b", "n1")).expect("create");
        let t = Txn::new(&base);
        store::modify::<Replica>(&t, "a", |r| {
            r.spec.node = "n2".into();
            true
        })
        .expect("buffered");
        store::modify::<Replica>(&t, "b", |r| {
            r.spec.node = "n3".into();
            true
        })
        .expect("buffered");
        // Someone else changes b meanwhile.
        store::modify::<Replica>(&base, "b", |r| {
            r.spec.disk = "d".into();
            true
        })
        .expect("concurrent");
        assert!(matches!(t.finish(), Err(StoreError::Conflict { .. })));
        let a = store::get::<Replica>(&base, "a").expect("get").expect("a");
        assert_eq!(a.spec.node, "n1", "the other object's write must not land");
    }

    #[test]
    fn created_then_deleted_leaves_nothing() {
        let base = MemStore::default();
        let t = Txn::new(&base);
        let r = store::create(&t, &replica("x", "n1")).expect("create");
        store::delete(&t, &r).expect("delete");
        assert!(t.is_empty());
        assert!(t.finish().expect("commit").is_empty());
        assert!(store::list::<Replica>(&base).expect("list").is_empty());
    }
}
