//! The `Store` trait (get/list/create/update with compare-and-swap on resourceVersion, delete,
//! watch, durable counters) and its embedded implementation on redb. Objects are JSON documents
//! keyed by kind and name; the store owns `metadata.resourceVersion`, `uid` and `created`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::Value;
use tokio::sync::broadcast;

use crate::model::Object;

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const REVISION: &str = "revision";

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {name:?} not found")]
    NotFound { kind: String, name: String },
    #[error("{kind} {name:?} already exists")]
    Exists { kind: String, name: String },
    #[error(
        "{kind} {name:?} was changed concurrently (resourceVersion {expected} is stale, now {found})"
    )]
    Conflict {
        kind: String,
        name: String,
        expected: u64,
        found: u64,
    },
    #[error("store: {0}")]
    Backend(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// An object as stored: JSON, shared (reading one from memory copies no bytes).
pub type Obj = std::sync::Arc<Value>;

/// A change to an object. `volume` and `node` are the object's `spec.volume` and `spec.node`
/// (for a deleted object, its last value's), so a watcher can tell what a change concerns
/// without reading the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: String,
    pub name: String,
    pub resource_version: u64,
    pub deleted: bool,
    pub volume: Option<String>,
    pub node: Option<String>,
}

impl Event {
    pub(crate) fn of(a: &Applied) -> Event {
        let last = a.value.as_ref().or(a.old.as_ref());
        let field = |f: Field| last.and_then(|v| f.of(v)).map(str::to_string);
        Event {
            kind: a.kind.clone(),
            name: a.name.clone(),
            resource_version: a.revision,
            deleted: a.value.is_none(),
            volume: field(Field::Volume),
            node: field(Field::Node),
        }
    }
}

/// One write of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    /// Fails when an object of that kind and name exists.
    Create { kind: String, obj: Value },
    /// Fails unless the stored resourceVersion equals the one in `obj`.
    Update { kind: String, obj: Value },
    /// With a resourceVersion, only at that version.
    Delete {
        kind: String,
        name: String,
        resource_version: Option<u64>,
    },
}

impl Op {
    /// The kind and name of the object the op writes.
    pub fn target(&self) -> Result<(String, String)> {
        match self {
            Op::Create { kind, obj } | Op::Update { kind, obj } => {
                Ok((kind.clone(), name_of(obj)?))
            }
            Op::Delete { kind, name, .. } => Ok((kind.clone(), name.clone())),
        }
    }
}

/// What a committed transaction left of one object: its stored value (`None`: deleted) and its
/// value before.
#[derive(Debug, Clone)]
pub struct Applied {
    pub kind: String,
    pub name: String,
    pub value: Option<Obj>,
    pub old: Option<Obj>,
    /// The transaction's revision: every object it wrote carries it as resourceVersion.
    pub revision: u64,
}

/// A field the stores index objects by: `spec.volume` or `spec.node`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    Volume,
    Node,
}

impl Field {
    pub const ALL: [Field; 2] = [Field::Volume, Field::Node];

    /// The field's name under `spec`.
    pub fn name(self) -> &'static str {
        match self {
            Field::Volume => "volume",
            Field::Node => "node",
        }
    }

    pub fn of(self, v: &Value) -> Option<&str> {
        at(v, "spec", self.name()).and_then(Value::as_str)
    }
}

/// Where control-plane objects live.
pub trait Store: Send + Sync {
    fn get(&self, kind: &str, name: &str) -> Result<Option<Obj>>;
    fn list(&self, kind: &str) -> Result<Vec<Obj>>;
    /// Up to `limit` names of a kind that sort after `after`, in order, and how many objects of
    /// that kind there are.
    fn names_after(&self, kind: &str, after: &str, limit: usize) -> Result<(Vec<String>, usize)> {
        let all = self.list(kind)?;
        let mut names: Vec<String> = all
            .iter()
            .filter_map(|o| at(o, "metadata", "name").and_then(Value::as_str))
            .filter(|n| *n > after)
            .map(str::to_string)
            .collect();
        names.sort();
        names.truncate(limit);
        Ok((names, all.len()))
    }
    /// Bytes placed per (node, disk): the sum of `spec.size` over the objects of a kind that
    /// name a `spec.node` and a `spec.disk` (replicas).
    fn usage(&self, kind: &str) -> Result<Usage> {
        let mut m = Usage::new();
        for o in self.list(kind)? {
            count_usage(&mut m, &o, true);
        }
        Ok(m)
    }
    /// The objects of a kind whose `field` equals `value`.
    fn list_by(&self, kind: &str, field: Field, value: &str) -> Result<Vec<Obj>> {
        let mut all = self.list(kind)?;
        all.retain(|o| field.of(o) == Some(value));
        Ok(all)
    }
    /// Applies every op or none: each op is checked against the objects as the ops before it
    /// left them; any failed check fails the whole transaction and writes nothing. Every object
    /// written gets the same new resourceVersion.
    fn commit(&self, ops: Vec<Op>) -> Result<Vec<Applied>>;
    /// Increments and returns a named durable counter.
    fn next(&self, counter: &str) -> Result<u64>;
    fn watch(&self) -> broadcast::Receiver<Event>;

    /// Creates an object; fails when one of that kind and name exists.
    fn create(&self, kind: &str, obj: Value) -> Result<Value> {
        let name = name_of(&obj)?;
        one(
            self.commit(vec![Op::Create {
                kind: kind.into(),
                obj,
            }])?,
            kind,
            name,
        )
    }
    /// Replaces an object if its stored resourceVersion equals the one in `obj`.
    fn update(&self, kind: &str, obj: Value) -> Result<Value> {
        let name = name_of(&obj)?;
        one(
            self.commit(vec![Op::Update {
                kind: kind.into(),
                obj,
            }])?,
            kind,
            name,
        )
    }
    /// Deletes an object (if `resource_version` is given, only at that version).
    fn delete(&self, kind: &str, name: &str, resource_version: Option<u64>) -> Result<()> {
        self.commit(vec![Op::Delete {
            kind: kind.into(),
            name: name.into(),
            resource_version,
        }])?;
        Ok(())
    }
}

fn one(applied: Vec<Applied>, kind: &str, name: String) -> Result<Value> {
    applied
        .into_iter()
        .find_map(|a| a.value)
        .map(std::sync::Arc::unwrap_or_clone)
        .ok_or_else(|| StoreError::NotFound {
            kind: kind.into(),
            name,
        })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn be<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

pub(crate) fn key(kind: &str, name: &str) -> String {
    format!("{kind}/{name}")
}

/// Bytes per (node, disk).
pub type Usage = std::collections::HashMap<(String, String), u64>;

/// An object's `spec.node`, `spec.disk` and `spec.size`, when it has all three.
fn placed(obj: &Value) -> Option<(&str, &str, u64)> {
    let spec = obj.get("spec")?;
    Some((
        spec.get("node")?.as_str()?,
        spec.get("disk")?.as_str()?,
        spec.get("size")?.as_u64()?,
    ))
}

/// Adds an object's placed bytes to `m` (`add`), or takes them away; a (node, disk) left with
/// nothing has no entry.
pub(crate) fn count_usage(m: &mut Usage, obj: &Value, add: bool) {
    let Some((node, disk, size)) = placed(obj) else {
        return;
    };
    if size == 0 {
        return;
    }
    let k = (node.to_string(), disk.to_string());
    if add {
        *m.entry(k).or_default() += size;
    } else if let Some(u) = m.get_mut(&k) {
        *u = u.saturating_sub(size);
        if *u == 0 {
            m.remove(&k);
        }
    }
}

/// `obj[a][b]`, without the allocations of a JSON pointer.
pub(crate) fn at<'a>(obj: &'a Value, a: &str, b: &str) -> Option<&'a Value> {
    obj.get(a).and_then(|o| o.get(b))
}

pub(crate) fn name_of(obj: &Value) -> Result<String> {
    at(obj, "metadata", "name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| StoreError::Backend("object has no metadata.name".into()))
}

pub(crate) fn rv_of(obj: &Value) -> u64 {
    at(obj, "metadata", "resourceVersion")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn set_meta(obj: &mut Value, field: &str, v: Value) {
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert(field.to_string(), v);
    }
}

/// The metadata the store owns on a new object.
fn stamp_new(obj: &mut Value, rv: u64) {
    set_meta(obj, "resourceVersion", rv.into());
    set_meta(
        obj,
        "uid",
        format!("{:032x}", rand::random::<u128>()).into(),
    );
    set_meta(obj, "created", now().into());
    set_meta(obj, "generation", 1.into());
}

/// The metadata the store owns on an update: identity kept, generation bumped on a spec change.
fn stamp_update(old: &Value, obj: &mut Value, rv: u64) {
    for f in ["uid", "created"] {
        if let Some(v) = at(old, "metadata", f) {
            set_meta(obj, f, v.clone());
        }
    }
    let gen_old = at(old, "metadata", "generation")
        .and_then(Value::as_u64)
        .unwrap_or(1);
    let spec_changed = old.get("spec") != obj.get("spec");
    set_meta(
        obj,
        "generation",
        (gen_old + u64::from(spec_changed)).into(),
    );
    set_meta(obj, "resourceVersion", rv.into());
}

/// Checks a transaction's ops against the stored objects (`current` reads one by key; each op
/// sees what the ops before it wrote) and stamps what they write with revision `rv`. Returns the
/// final value of every object touched, in key order; nothing is written here.
pub(crate) fn plan_commit(
    ops: Vec<Op>,
    rv: u64,
    mut current: impl FnMut(&str) -> Result<Option<Obj>>,
) -> Result<Vec<(String, Applied)>> {
    let mut touched: BTreeMap<String, Applied> = BTreeMap::new();
    for op in ops {
        let (kind, name) = op.target()?;
        let k = key(&kind, &name);
        let now = match touched.get(&k) {
            Some(a) => a.value.clone(),
            None => current(&k)?,
        };
        let new = match op {
            Op::Create { mut obj, .. } => {
                if now.is_some() {
                    return Err(StoreError::Exists { kind, name });
                }
                stamp_new(&mut obj, rv);
                Some(Obj::new(obj))
            }
            Op::Update { mut obj, .. } => {
                let Some(old) = &now else {
                    return Err(StoreError::NotFound { kind, name });
                };
                let (expected, found) = (rv_of(&obj), rv_of(old));
                if expected != found {
                    return Err(StoreError::Conflict {
                        kind,
                        name,
                        expected,
                        found,
                    });
                }
                stamp_update(old, &mut obj, rv);
                Some(Obj::new(obj))
            }
            Op::Delete {
                resource_version, ..
            } => {
                let Some(old) = &now else {
                    return Err(StoreError::NotFound { kind, name });
                };
                if let Some(expected) = resource_version
                    && expected != rv_of(old)
                {
                    return Err(StoreError::Conflict {
                        kind,
                        name,
                        expected,
                        found: rv_of(old),
                    });
                }
                None
            }
        };
        match touched.get_mut(&k) {
            Some(a) => a.value = new,
            None => {
                touched.insert(
                    k,
                    Applied {
                        kind,
                        name,
                        value: new,
                        old: now,
                        revision: rv,
                    },
                );
            }
        }
    }
    // Created and deleted in the same transaction: nothing happened.
    Ok(touched
        .into_iter()
        .filter(|(_, a)| a.value.is_some() || a.old.is_some())
        .collect())
}

/// The store in memory, for tests of policy without files: the same contract as [`RedbStore`].
pub struct MemStore {
    objects: std::sync::Mutex<BTreeMap<String, Obj>>,
    counters: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    events: broadcast::Sender<Event>,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore {
            objects: Default::default(),
            counters: Default::default(),
            events: broadcast::channel(4096).0,
        }
    }
}

impl MemStore {
    fn bump(&self, counter: &str) -> Result<u64> {
        let mut c = self.counters.lock().map_err(be)?;
        let v = c.entry(counter.to_string()).or_insert(0);
        *v += 1;
        Ok(*v)
    }
}

impl Store for MemStore {
    fn get(&self, kind: &str, name: &str) -> Result<Option<Obj>> {
        Ok(self
            .objects
            .lock()
            .map_err(be)?
            .get(&key(kind, name))
            .cloned())
    }

    fn list(&self, kind: &str) -> Result<Vec<Obj>> {
        let lo = format!("{kind}/");
        let hi = format!("{kind}0");
        Ok(self
            .objects
            .lock()
            .map_err(be)?
            .range(lo..hi)
            .map(|(_, v)| v.clone())
            .collect())
    }

    fn commit(&self, ops: Vec<Op>) -> Result<Vec<Applied>> {
        let mut objects = self.objects.lock().map_err(be)?;
        let rv = self
            .counters
            .lock()
            .map_err(be)?
            .get(REVISION)
            .copied()
            .unwrap_or(0)
            + 1;
        let planned = plan_commit(ops, rv, |k| Ok(objects.get(k).cloned()))?;
        if planned.is_empty() {
            return Ok(Vec::new());
        }
        self.bump(REVISION)?;
        let mut out = Vec::with_capacity(planned.len());
        for (k, a) in planned {
            match &a.value {
                Some(v) => objects.insert(k, v.clone()),
                None => objects.remove(&k),
            };
            out.push(a);
        }
        drop(objects);
        for a in &out {
            let _ = self.events.send(Event::of(a));
        }
        Ok(out)
    }

    fn next(&self, counter: &str) -> Result<u64> {
        self.bump(counter)
    }

    fn watch(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

/// The embedded store: one redb file. Transactions that arrive while another is being written
/// are written together in the next redb transaction (group commit: one fsync for all of them);
/// each is still checked on its own and fails or lands whole.
pub struct RedbStore {
    db: Database,
    events: broadcast::Sender<Event>,
    /// Transactions waiting to be written, each with where its outcome goes.
    queue: std::sync::Mutex<Vec<Queued>>,
    /// Held by the caller writing a group.
    leader: std::sync::Mutex<()>,
}

type Outcome = Result<Vec<Applied>>;

struct Queued {
    ops: Vec<Op>,
    reply: std::sync::mpsc::Sender<Outcome>,
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<RedbStore> {
        let db = Database::create(path).map_err(be)?;
        let tx = db.begin_write().map_err(be)?;
        {
            tx.open_table(OBJECTS).map_err(be)?;
            tx.open_table(COUNTERS).map_err(be)?;
        }
        tx.commit().map_err(be)?;
        Ok(RedbStore {
            db,
            events: broadcast::channel(4096).0,
            queue: Default::default(),
            leader: Default::default(),
        })
    }

    fn bump(t: &mut redb::Table<&str, u64>, counter: &str) -> Result<u64> {
        let cur = t.get(counter).map_err(be)?.map(|v| v.value()).unwrap_or(0);
        t.insert(counter, cur + 1).map_err(be)?;
        Ok(cur + 1)
    }

    /// Writes a group of transactions in one redb transaction. Each is planned against what the
    /// ones before it in the group left (a failed one writes nothing) and gets its own revision.
    /// Returns each one's outcome, or the error that failed the whole write.
    fn write_group(&self, group: &mut [Queued]) -> Result<Vec<Outcome>> {
        let tx = self.db.begin_write().map_err(be)?;
        let mut outcomes = Vec::with_capacity(group.len());
        {
            let mut t = tx.open_table(OBJECTS).map_err(be)?;
            let mut c = tx.open_table(COUNTERS).map_err(be)?;
            for q in group.iter_mut() {
                let next = c.get(REVISION).map_err(be)?.map(|v| v.value()).unwrap_or(0) + 1;
                let ops = std::mem::take(&mut q.ops);
                let planned = plan_commit(ops, next, |k| match t.get(k).map_err(be)? {
                    Some(v) => Ok(Some(Obj::new(
                        serde_json::from_slice(v.value()).map_err(be)?,
                    ))),
                    None => Ok(None),
                });
                let planned = match planned {
                    Ok(p) => p,
                    Err(e) => {
                        outcomes.push(Err(e));
                        continue;
                    }
                };
                if planned.is_empty() {
                    outcomes.push(Ok(Vec::new()));
                    continue;
                }
                Self::bump(&mut c, REVISION)?;
                let mut applied = Vec::with_capacity(planned.len());
                for (k, a) in planned {
                    match &a.value {
                        Some(v) => {
                            let bytes = serde_json::to_vec(&**v).map_err(be)?;
                            t.insert(k.as_str(), bytes.as_slice()).map_err(be)?;
                        }
                        None => {
                            t.remove(k.as_str()).map_err(be)?;
                        }
                    }
                    applied.push(a);
                }
                outcomes.push(Ok(applied));
            }
        }
        tx.commit().map_err(be)?;
        Ok(outcomes)
    }
}

impl Store for RedbStore {
    fn get(&self, kind: &str, name: &str) -> Result<Option<Obj>> {
        let tx = self.db.begin_read().map_err(be)?;
        let t = tx.open_table(OBJECTS).map_err(be)?;
        match t.get(key(kind, name).as_str()).map_err(be)? {
            Some(v) => Ok(Some(Obj::new(
                serde_json::from_slice(v.value()).map_err(be)?,
            ))),
            None => Ok(None),
        }
    }

    fn list(&self, kind: &str) -> Result<Vec<Obj>> {
        let tx = self.db.begin_read().map_err(be)?;
        let t = tx.open_table(OBJECTS).map_err(be)?;
        let lo = format!("{kind}/");
        let hi = format!("{kind}0"); // '0' follows '/'
        let mut out = Vec::new();
        for item in t.range(lo.as_str()..hi.as_str()).map_err(be)? {
            let (_, v) = item.map_err(be)?;
            out.push(Obj::new(serde_json::from_slice(v.value()).map_err(be)?));
        }
        Ok(out)
    }

    fn commit(&self, ops: Vec<Op>) -> Result<Vec<Applied>> {
        let (reply, outcome) = std::sync::mpsc::channel();
        self.queue.lock().map_err(be)?.push(Queued { ops, reply });
        // Whoever holds the leader lock writes everything queued; a caller whose transaction a
        // leader before it wrote finds its outcome waiting.
        let _leader = self.leader.lock().map_err(be)?;
        if let Ok(done) = outcome.try_recv() {
            return done;
        }
        let mut group = std::mem::take(&mut *self.queue.lock().map_err(be)?);
        match self.write_group(&mut group) {
            Ok(outcomes) => {
                for (q, o) in group.iter().zip(outcomes) {
                    if let Ok(applied) = &o {
                        for a in applied {
                            let _ = self.events.send(Event::of(a));
                        }
                    }
                    let _ = q.reply.send(o);
                }
            }
            Err(e) => {
                for q in &group {
                    let _ = q.reply.send(Err(e.clone()));
                }
            }
        }
        outcome
            .try_recv()
            .map_err(|_| StoreError::Backend("transaction outcome lost".into()))?
    }

    fn next(&self, counter: &str) -> Result<u64> {
        let tx = self.db.begin_write().map_err(be)?;
        let v;
        {
            let mut c = tx.open_table(COUNTERS).map_err(be)?;
            v = Self::bump(&mut c, counter)?;
        }
        tx.commit().map_err(be)?;
        Ok(v)
    }

    fn watch(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

// ---------------------------------------------------------------------------------------------
// Typed helpers.

fn decode<T: Object>(v: Obj) -> Result<T> {
    T::deserialize(&*v).map_err(|e| StoreError::Backend(format!("corrupt {}: {e}", T::KIND)))
}

fn decode_owned<T: Object>(v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| StoreError::Backend(format!("corrupt {}: {e}", T::KIND)))
}

fn encode<T: Object>(o: &T) -> Result<Value> {
    serde_json::to_value(o).map_err(be)
}

pub fn get<T: Object>(s: &dyn Store, name: &str) -> Result<Option<T>> {
    s.get(T::KIND, name)?.map(decode).transpose()
}

pub fn list<T: Object>(s: &dyn Store) -> Result<Vec<T>> {
    s.list(T::KIND)?.into_iter().map(decode).collect()
}

/// The objects of a kind whose `spec.volume` (or `spec.node`) is `value`.
pub fn list_by<T: Object>(s: &dyn Store, field: Field, value: &str) -> Result<Vec<T>> {
    s.list_by(T::KIND, field, value)?
        .into_iter()
        .map(decode)
        .collect()
}

pub fn create<T: Object>(s: &dyn Store, o: &T) -> Result<T> {
    decode_owned(s.create(T::KIND, encode(o)?)?)
}

pub fn update<T: Object>(s: &dyn Store, o: &T) -> Result<T> {
    decode_owned(s.update(T::KIND, encode(o)?)?)
}

pub fn delete<T: Object>(s: &dyn Store, o: &T) -> Result<()> {
    s.delete(T::KIND, &o.meta().name, Some(o.meta().resource_version))
}

/// Reads, changes and writes an object, retrying on conflicts. `f` returns whether it changed
/// anything; nothing is written otherwise. Returns the object as stored, or `None` if absent.
pub fn modify<T: Object>(
    s: &dyn Store,
    name: &str,
    mut f: impl FnMut(&mut T) -> bool,
) -> Result<Option<T>> {
    for _ in 0..64 {
        let Some(mut o) = get::<T>(s, name)? else {
            return Ok(None);
        };
        if !f(&mut o) {
            return Ok(Some(o));
        }
        match update(s, &o) {
            Ok(o) => return Ok(Some(o)),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Backend(format!(
        "{} {name:?}: too many concurrent changes",
        T::KIND
    )))
}

impl From<StoreError> for crate::ApiError {
    fn from(e: StoreError) -> Self {
        use crate::ErrorKind;
        let (kind, code) = match &e {
            StoreError::NotFound { .. } => (ErrorKind::NotFound, "NotFound"),
            StoreError::Exists { .. } => (ErrorKind::Conflict, "AlreadyExists"),
            StoreError::Conflict { .. } => (ErrorKind::Conflict, "Conflict"),
            StoreError::Backend(_) => (ErrorKind::Internal, "StoreError"),
        };
        crate::ApiError::new(kind, code, e.to_string())
    }
}
