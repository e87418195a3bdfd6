//! The manager's view of the store in memory: every object read once from the backend, then
//! kept current by writing through, and indexed by `spec.volume` and `spec.node` so that a
//! heartbeat or a reconcile step reads only the objects it concerns.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::broadcast;

use crate::store::{
    Applied, Event, Field, Obj, Op, Result, Store, Usage, be, count_usage, name_of, rv_of,
};

#[derive(Default)]
struct Kind {
    objects: BTreeMap<String, Obj>,
    /// (field, value) → names.
    index: HashMap<(Field, String), BTreeSet<String>>,
    /// Revisions at which recently deleted objects went, so that a write applied late (writes
    /// reach the cache out of order) cannot bring one back.
    tombstones: HashMap<String, u64>,
    /// (spec.node, spec.disk) → sum of spec.size, over the objects that have all three.
    usage: HashMap<(String, String), u64>,
}

/// Tombstones kept per kind before the oldest are dropped.
const TOMBSTONES: usize = 4096;

impl Kind {
    fn revision(&self, name: &str) -> u64 {
        let live = self.objects.get(name).map(|o| rv_of(o)).unwrap_or(0);
        live.max(self.tombstones.get(name).copied().unwrap_or(0))
    }

    /// Applies what a transaction left of one object, unless the cache holds a newer state.
    fn apply(&mut self, a: &Applied) {
        if a.revision <= self.revision(&a.name) {
            return;
        }
        match &a.value {
            Some(v) => {
                self.tombstones.remove(&a.name);
                self.insert(a.name.clone(), v.clone());
            }
            None => {
                self.remove(&a.name);
                self.tombstones.insert(a.name.clone(), a.revision);
                if self.tombstones.len() > TOMBSTONES {
                    let mut revs: Vec<u64> = self.tombstones.values().copied().collect();
                    revs.sort_unstable();
                    let cut = revs[revs.len() / 2];
                    self.tombstones.retain(|_, r| *r > cut);
                }
            }
        }
    }

    fn insert(&mut self, name: String, v: Obj) {
        self.remove(&name);
        for f in Field::ALL {
            if let Some(x) = f.of(&v) {
                self.index
                    .entry((f, x.to_string()))
                    .or_default()
                    .insert(name.clone());
            }
        }
        count_usage(&mut self.usage, &v, true);
        self.objects.insert(name, v);
    }

    fn remove(&mut self, name: &str) {
        let Some(old) = self.objects.remove(name) else {
            return;
        };
        for f in Field::ALL {
            if let Some(x) = f.of(&old) {
                let k = (f, x.to_string());
                if let Some(set) = self.index.get_mut(&k) {
                    set.remove(name);
                    if set.is_empty() {
                        self.index.remove(&k);
                    }
                }
            }
        }
        count_usage(&mut self.usage, &old, false);
    }
}

/// A [`Store`] that keeps what it has read of another in memory. It must be the only writer of
/// the store behind it (the manager holding the redb file); a backend with other writers (etcd
/// with several managers) needs a watch feeding it.
pub struct Cached {
    inner: Arc<dyn Store>,
    kinds: RwLock<HashMap<String, Kind>>,
    /// Held while a kind is loaded and while a committed transaction is applied (not across
    /// the backend write, so that concurrent transactions reach the backend together).
    write: Mutex<()>,
    events: broadcast::Sender<Event>,
    /// Transactions that changed something, counted since start.
    changes: std::sync::atomic::AtomicU64,
}

impl Cached {
    pub fn new(inner: Arc<dyn Store>) -> Cached {
        Cached {
            inner,
            kinds: RwLock::new(HashMap::new()),
            write: Mutex::new(()),
            events: broadcast::channel(16384).0,
            changes: Default::default(),
        }
    }

    /// Loads a kind from the backend the first time it is read.
    fn ensure(&self, kind: &str) -> Result<()> {
        if self.kinds.read().map_err(be)?.contains_key(kind) {
            return Ok(());
        }
        let _w = self.write.lock().map_err(be)?;
        if self.kinds.read().map_err(be)?.contains_key(kind) {
            return Ok(());
        }
        let mut k = Kind::default();
        for v in self.inner.list(kind)? {
            k.insert(name_of(&v)?, v);
        }
        self.kinds.write().map_err(be)?.insert(kind.to_string(), k);
        Ok(())
    }

    /// How many transactions changed something so far: equal values mean no object changed in
    /// between.
    pub fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Acquire)
    }

    /// `f` over a kind's objects (loaded first if need be); `None` when the kind has none yet.
    fn read_kind<T>(&self, kind: &str, f: impl FnOnce(&Kind) -> T) -> Result<Option<T>> {
        self.ensure(kind)?;
        Ok(self.kinds.read().map_err(be)?.get(kind).map(f))
    }
}

impl Store for Cached {
    fn get(&self, kind: &str, name: &str) -> Result<Option<Obj>> {
        self.read_kind(kind, |k| k.objects.get(name).cloned())
            .map(Option::flatten)
    }

    fn list(&self, kind: &str) -> Result<Vec<Obj>> {
        self.read_kind(kind, |k| k.objects.values().cloned().collect())
            .map(Option::unwrap_or_default)
    }

    fn names_after(&self, kind: &str, after: &str, limit: usize) -> Result<(Vec<String>, usize)> {
        use std::ops::Bound;
        self.read_kind(kind, |k| {
            let names = k
                .objects
                .range::<str, _>((Bound::Excluded(after), Bound::Unbounded))
                .take(limit)
                .map(|(n, _)| n.clone())
                .collect();
            (names, k.objects.len())
        })
        .map(Option::unwrap_or_default)
    }

    fn usage(&self, kind: &str) -> Result<Usage> {
        self.read_kind(kind, |k| k.usage.clone())
            .map(Option::unwrap_or_default)
    }

    fn list_by(&self, kind: &str, field: Field, value: &str) -> Result<Vec<Obj>> {
        self.read_kind(kind, |k| {
            k.index
                .get(&(field, value.to_string()))
                .map(|names| {
                    names
                        .iter()
                        .filter_map(|n| k.objects.get(n).cloned())
                        .collect()
                })
                .unwrap_or_default()
        })
        .map(Option::unwrap_or_default)
    }

    fn commit(&self, ops: Vec<Op>) -> Result<Vec<Applied>> {
        let applied = self.inner.commit(ops)?;
        if applied.is_empty() {
            return Ok(applied);
        }
        {
            let _w = self.write.lock().map_err(be)?;
            let mut kinds = self.kinds.write().map_err(be)?;
            for a in &applied {
                // A kind not loaded yet is read from the backend, writes included, when first
                // used.
                if let Some(k) = kinds.get_mut(&a.kind) {
                    k.apply(a);
                }
            }
        }
        // Counted after the cache shows the change: equal counts mean nothing changed between.
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        for a in &applied {
            let _ = self.events.send(Event::of(a));
        }
        Ok(applied)
    }

    fn next(&self, counter: &str) -> Result<u64> {
        self.inner.next(counter)
    }

    fn watch(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn put(name: &str, rev: u64, node: &str) -> Applied {
        Applied {
            kind: "replica".into(),
            name: name.into(),
            value: Some(Obj::new(json!({
                "metadata": {"name": name, "resourceVersion": rev},
                "spec": {"node": node}
            }))),
            old: None,
            revision: rev,
        }
    }

    fn del(name: &str, rev: u64) -> Applied {
        Applied {
            kind: "replica".into(),
            name: name.into(),
            value: None,
            old: None,
            revision: rev,
        }
    }

    #[test]
    fn writes_applied_out_of_order_leave_the_newest_state() {
        let mut k = Kind::default();
        k.apply(&put("a", 5, "n2"));
        k.apply(&put("a", 4, "n1"));
        assert_eq!(k.objects["a"]["spec"]["node"], "n2");
        assert!(!k.index.contains_key(&(Field::Node, "n1".into())));
        // Deleted at 6; the write at 5 arriving late does not bring it back.
        k.apply(&del("a", 6));
        k.apply(&put("a", 5, "n3"));
        assert!(k.objects.is_empty());
        assert!(k.index.is_empty());
        // Created again later: it is back.
        k.apply(&put("a", 7, "n1"));
        assert_eq!(k.objects["a"]["spec"]["node"], "n1");
    }
}
