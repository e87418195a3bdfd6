//! Records replica membership changes durably in a JSON file: the control plane's role for an
//! engine run by hand (`zebu engine --state-file`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use zebu_engine::engine::BoxFut;
use zebu_engine::{EngineHook, Mode};
use zebu_types::Generation;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Members {
    format: u32,
    /// Replicas that left the active set and have not been rebuilt since.
    failed: BTreeSet<String>,
}

/// Writes a file atomically: temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().context("path has no directory")?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Records replica membership changes in a JSON file, durably, before they take effect.
pub struct FileHook {
    path: PathBuf,
    state: Mutex<Members>,
}

impl FileHook {
    pub fn open(path: PathBuf) -> Result<FileHook> {
        let state = match std::fs::read(&path) {
            Ok(b) => {
                serde_json::from_slice(&b).with_context(|| format!("corrupt {}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Members {
                format: 1,
                ..Default::default()
            },
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        Ok(FileHook {
            path,
            state: Mutex::new(state),
        })
    }

    #[allow(dead_code)]
    fn failed(&self) -> BTreeSet<String> {
        self.state
            .lock()
            .map(|s| s.failed.clone())
            .unwrap_or_default()
    }

    async fn update(&self, f: impl FnOnce(&mut Members)) -> Result<(), String> {
        let bytes = {
            let mut st = self
                .state
                .lock()
                .map_err(|_| "state lock poisoned".to_string())?;
            f(&mut st);
            serde_json::to_vec_pretty(&*st).map_err(|e| e.to_string())?
        };
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{e:#}"))
    }
}

impl EngineHook for FileHook {
    fn replica_failed<'a>(
        &'a self,
        volume: &'a str,
        replica: &'a str,
        generation: Generation,
        reason: &'a str,
    ) -> BoxFut<'a, Result<(), String>> {
        Box::pin(async move {
            tracing::warn!(volume, replica, %generation, reason, "replica left the active set");
            self.update(|m| {
                m.failed.insert(replica.to_string());
            })
            .await
        })
    }

    fn replica_mode<'a>(
        &'a self,
        volume: &'a str,
        replica: &'a str,
        generation: Generation,
        mode: Mode,
    ) -> BoxFut<'a, Result<(), String>> {
        Box::pin(async move {
            tracing::info!(volume, replica, %generation, mode = mode.as_str(), "replica mode");
            match mode {
                // A rebuilding replica is not a valid source until it is RW again.
                Mode::WO | Mode::ERR => {
                    self.update(|m| {
                        m.failed.insert(replica.to_string());
                    })
                    .await
                }
                Mode::RW => {
                    self.update(|m| {
                        m.failed.remove(replica);
                    })
                    .await
                }
            }
        })
    }
}
