//! Deleting backups and collecting their unreferenced blocks without racing concurrent backups.
//!
//! Protocol (all objects in the target; times are Unix milliseconds):
//! - A running backup holds a lease `locks/backups/<volume>.<backup>.json`, written before its
//!   first existence check and refreshed every [`LEASE_REFRESH`]. At its start it records which
//!   GC runs had already finished.
//! - Deleting a backup moves its manifest to `gc/pending/<volume>/<backup>.manifest` (the backup
//!   is gone from listings at once), then runs a GC pass.
//! - A GC pass writes a run record `gc/runs/<start>-<id>.json`, then lists the leases. If any
//!   lease is live it deletes nothing (the pending manifests wait for a later pass). Otherwise it
//!   reads every remaining manifest, deletes the pending blocks none of them references, and
//!   marks its run finished. Cost: the deleted backups' blocks plus one read per manifest, never
//!   a listing of the blocks.
//! - Before writing its manifest a backup looks for GC runs it did not see finished at its start.
//!   If there are any (a GC that started before the lease was visible), it waits for them to
//!   finish and re-checks every block it references, re-uploading what is gone. A GC that starts
//!   later sees the lease and defers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::backup::{BackupError, block_key, manifest_key};
use crate::manifest::Manifest;
use crate::store::{BackupStore, StoreError};
use crate::target::list_backups;

/// A lease not refreshed for this long belongs to a backup that died.
pub const LEASE_TTL: Duration = Duration::from_secs(120);
pub const LEASE_REFRESH: Duration = Duration::from_secs(20);
/// An unfinished GC run older than this crashed.
pub const GC_STALE: Duration = Duration::from_secs(600);
/// Finished GC run records are kept this long (longer than any backup is expected to run).
pub const RUN_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeaseRecord {
    volume: String,
    backup: String,
    refreshed_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RunRecord {
    started_ms: u64,
    /// 0 while running.
    finished_ms: u64,
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn lease_key(volume: &str, backup: &str) -> String {
    format!("locks/backups/{volume}.{backup}.json")
}

pub fn pending_key(volume: &str, backup: &str) -> String {
    format!("gc/pending/{volume}/{backup}.manifest")
}

/// The GC run records: key → record (unreadable records count as running).
async fn runs<S: BackupStore>(
    store: &S,
) -> Result<BTreeMap<String, Option<RunRecord>>, StoreError> {
    let mut out = BTreeMap::new();
    for k in store.list("gc/runs").await? {
        let rec = store
            .get(&k)
            .await?
            .and_then(|b| serde_json::from_slice::<RunRecord>(&b).ok());
        out.insert(k, rec);
    }
    Ok(out)
}

/// A running backup's claim on the blocks it relies on.
pub struct Lease<S: BackupStore> {
    store: Arc<S>,
    key: String,
    finished_at_start: BTreeSet<String>,
    refresher: tokio::task::JoinHandle<()>,
}

impl<S: BackupStore> Lease<S> {
    pub async fn acquire(
        store: Arc<S>,
        volume: &str,
        backup: &str,
    ) -> Result<Lease<S>, StoreError> {
        let key = lease_key(volume, backup);
        let rec = |t| LeaseRecord {
            volume: volume.to_string(),
            backup: backup.to_string(),
            refreshed_ms: t,
        };
        store.put(&key, json(&rec(now_ms()))).await?;
        let finished_at_start = runs(&*store)
            .await?
            .into_iter()
            .filter(|(_, r)| r.as_ref().is_some_and(|r| r.finished_ms > 0))
            .map(|(k, _)| k)
            .collect();
        let (s, k, r) = (store.clone(), key.clone(), rec(0));
        let refresher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_REFRESH).await;
                let rec = LeaseRecord {
                    refreshed_ms: now_ms(),
                    ..r.clone()
                };
                if let Err(e) = s.put(&k, json(&rec)).await {
                    tracing::warn!(lease = %k, error = %e, "cannot refresh backup lease");
                }
            }
        });
        Ok(Lease {
            store,
            key,
            finished_at_start,
            refresher,
        })
    }

    /// Whether a GC ran (or runs) that this backup did not see finished at its start; waits for
    /// such runs to finish first, so the caller's re-check cannot race them.
    pub async fn gc_overlapped(&self) -> Result<bool, StoreError> {
        loop {
            let mut any = false;
            let mut running = false;
            let now = now_ms();
            for (k, r) in runs(&*self.store).await? {
                if self.finished_at_start.contains(&k) {
                    continue;
                }
                any = true;
                let live = match r {
                    Some(r) => {
                        r.finished_ms == 0
                            && now.saturating_sub(r.started_ms) < GC_STALE.as_millis() as u64
                    }
                    None => false,
                };
                running |= live;
            }
            if !running {
                return Ok(any);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Drops the lease once the manifest is durable.
    pub async fn release(self) {
        self.refresher.abort();
        if let Err(e) = self.store.delete(&self.key).await {
            tracing::warn!(lease = %self.key, error = %e, "cannot remove backup lease; it expires");
        }
    }
}

impl<S: BackupStore> Drop for Lease<S> {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// Removes the lease of a backup that ended without its manifest, so collection need not wait
/// for the lease to expire. Removing a missing lease is not an error.
pub async fn drop_lease<S: BackupStore>(
    store: &S,
    volume: &str,
    backup: &str,
) -> Result<(), StoreError> {
    store.delete(&lease_key(volume, backup)).await
}

/// What a GC pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub deleted_blocks: u64,
    /// A live backup lease made the pass delete nothing; pending manifests wait.
    pub deferred: bool,
    /// Deleted backups whose blocks still wait for collection.
    pub pending: u64,
}

/// Deletes a backup: its manifest moves to the pending area at once, then a GC pass runs.
/// Deleting a backup that is already pending only runs the pass.
pub async fn delete_backup<S: BackupStore>(
    store: &S,
    volume: &str,
    backup: &str,
) -> Result<GcReport, BackupError> {
    let key = manifest_key(volume, backup);
    let pkey = pending_key(volume, backup);
    match store.get(&key).await? {
        Some(b) => {
            store.put(&pkey, b).await?;
            store.delete(&key).await?;
        }
        None => {
            if !store.exists(&pkey).await? {
                return Err(BackupError::NotFound(format!(
                    "backup {backup} of volume {volume}"
                )));
            }
        }
    }
    gc_pass(store).await
}

/// Collects the blocks of deleted backups that no remaining backup references.
pub async fn gc_pass<S: BackupStore>(store: &S) -> Result<GcReport, BackupError> {
    let pending: Vec<String> = store
        .list("gc/pending")
        .await?
        .into_iter()
        .filter(|k| k.ends_with(".manifest"))
        .collect();
    if pending.is_empty() {
        return Ok(GcReport::default());
    }
    let started = now_ms();
    let run_key = format!("gc/runs/{started:016}-{:08x}.json", rand::random::<u32>());
    store
        .put(
            &run_key,
            json(&RunRecord {
                started_ms: started,
                finished_ms: 0,
            }),
        )
        .await?;
    let res = collect(store, &pending).await;
    let fin = json(&RunRecord {
        started_ms: started,
        finished_ms: now_ms().max(1),
    });
    // The run must be marked finished even after an error (or backups wait for it to go stale).
    let marked = store.put(&run_key, fin).await;
    let res = res?;
    marked?;
    prune_runs(store).await?;
    Ok(res)
}

async fn collect<S: BackupStore>(store: &S, pending: &[String]) -> Result<GcReport, BackupError> {
    let now = now_ms();
    for k in store.list("locks/backups").await? {
        let live = match store.get(&k).await? {
            Some(b) => serde_json::from_slice::<LeaseRecord>(&b)
                .map(|l| now.saturating_sub(l.refreshed_ms) < LEASE_TTL.as_millis() as u64)
                .unwrap_or(true),
            None => false,
        };
        if live {
            return Ok(GcReport {
                deferred: true,
                pending: pending.len() as u64,
                ..Default::default()
            });
        }
    }
    let mut referenced = BTreeSet::new();
    for (vol, b) in list_backups(store).await? {
        let Some(bytes) = store.get(&manifest_key(&vol, &b)).await? else {
            continue; // deleted meanwhile
        };
        // An unreadable manifest stops collection: its blocks are unknown.
        let m = Manifest::decode(&bytes)?;
        referenced.extend(m.referenced());
    }
    let mut report = GcReport::default();
    let mut gone = BTreeSet::new();
    for p in pending {
        if let Some(bytes) = store.get(p).await? {
            match Manifest::decode(&bytes) {
                Ok(m) => {
                    for h in m.referenced() {
                        if !referenced.contains(&h) && gone.insert(h) {
                            store.delete(&block_key(&h)).await?;
                            report.deleted_blocks += 1;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(manifest = %p, error = %e, "deleted backup's manifest is unreadable; its blocks stay");
                }
            }
        }
        store.delete(p).await?;
    }
    Ok(report)
}

async fn prune_runs<S: BackupStore>(store: &S) -> Result<(), StoreError> {
    let now = now_ms();
    for (k, r) in runs(store).await? {
        if let Some(r) = r
            && r.finished_ms > 0
            && now.saturating_sub(r.finished_ms) > RUN_KEEP.as_millis() as u64
        {
            store.delete(&k).await?;
        }
    }
    Ok(())
}
