//! The all-in-one `zebu server` for one machine: keeps volumes under the data directory, runs
//! their replicas in-process on loopback ports, an engine per volume, and one NBD server exporting
//! them by name. Replica failures are recorded durably in each volume's `members.json`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use zebu_engine::engine::BoxFut;
use zebu_engine::{Engine, EngineConfig, EngineHook, Mode, ReplicaService};
use zebu_replica::DEFAULT_CLUSTER_SIZE;
use zebu_types::{ByteSize, Generation};

#[derive(clap::Args)]
pub struct ServerArgs {
    /// Where volumes and their replicas live.
    #[arg(long, default_value = "./zebu-data")]
    data_dir: PathBuf,
    /// NBD listen address; each volume is exported under its name.
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd_listen: String,
    /// Create a volume when it does not exist yet: NAME:SIZE[:REPLICAS] (e.g. v1:1GiB:3).
    #[arg(long = "volume")]
    volumes: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VolumeFile {
    format: u32,
    name: String,
    size: u64,
    replicas: u32,
}

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

fn parse_volume(spec: &str) -> Result<(String, u64, u32)> {
    let parts: Vec<&str> = spec.split(':').collect();
    if parts.len() < 2 || parts.len() > 3 {
        bail!("volume {spec:?} must be NAME:SIZE[:REPLICAS]");
    }
    zebu_types::validate_name(parts[0])?;
    let size: ByteSize = parts[1].parse()?;
    if size.0 == 0 || !size.0.is_multiple_of(4096) {
        bail!(
            "volume size {} must be a positive multiple of 4096 bytes",
            parts[1]
        );
    }
    let replicas: u32 = match parts.get(2) {
        Some(r) => r
            .parse()
            .with_context(|| format!("bad replica count {r:?}"))?,
        None => 1,
    };
    if !(1..=16).contains(&replicas) {
        bail!("replica count must be between 1 and 16");
    }
    Ok((parts[0].to_string(), size.0, replicas))
}

fn next_generation(data_dir: &Path) -> Result<u64> {
    let p = data_dir.join("generation");
    let cur = match std::fs::read_to_string(&p) {
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .with_context(|| format!("corrupt {}", p.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e.into()),
    };
    let next = cur + 1;
    write_atomic(&p, next.to_string().as_bytes())?;
    Ok(next)
}

pub async fn run(args: ServerArgs) -> Result<()> {
    let vdir = args.data_dir.join("volumes");
    std::fs::create_dir_all(&vdir).with_context(|| format!("create {}", vdir.display()))?;
    let generation = next_generation(&args.data_dir)?;
    for spec in &args.volumes {
        let (name, size, replicas) = parse_volume(spec)?;
        let dir = vdir.join(&name);
        let vf = dir.join("volume.json");
        if vf.exists() {
            continue;
        }
        std::fs::create_dir_all(&dir)?;
        let v = VolumeFile {
            format: 1,
            name,
            size,
            replicas,
        };
        write_atomic(&vf, &serde_json::to_vec_pretty(&v)?)?;
    }
    let exports = Arc::new(zebu_nbd::Exports::new());
    let mut engines = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(&vdir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("volume.json").exists())
        .collect();
    names.sort();
    for dir in names {
        let v: VolumeFile = serde_json::from_slice(&std::fs::read(dir.join("volume.json"))?)
            .with_context(|| format!("corrupt {}", dir.join("volume.json").display()))?;
        let mut reps = Vec::new();
        for i in 0..v.replicas {
            let rdir = dir.join(format!("replica-{i}"));
            let (name, size) = (v.name.clone(), v.size);
            let svc = tokio::task::spawn_blocking(move || {
                ReplicaService::open_or_create(&rdir, &name, size, DEFAULT_CLUSTER_SIZE)
            })
            .await??;
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?.to_string();
            tokio::spawn(svc.serve(l));
            reps.push((format!("{}-r{i}", v.name), addr));
        }
        let hook = Arc::new(FileHook::open(dir.join("members.json"))?);
        let failed = hook.failed();
        let mut candidates: Vec<(String, String)> = reps
            .iter()
            .filter(|(n, _)| !failed.contains(n))
            .cloned()
            .collect();
        if candidates.is_empty() {
            tracing::warn!(volume = %v.name, "every replica was marked failed; salvaging from the freshest");
            candidates = reps.clone();
        }
        let cfg = EngineConfig {
            volume: v.name.clone(),
            generation: Generation(generation),
            size: v.size,
            io_timeout: Duration::from_secs(10),
        };
        let engine = Engine::open(cfg, &candidates, hook)
            .await
            .with_context(|| format!("volume {}: no replica could be opened", v.name))?;
        engine.spawn_healer(reps, Duration::from_secs(1));
        exports.insert(&v.name, engine.clone());
        engines.push(engine);
    }
    let l = crate::bind_listener(&args.nbd_listen).await?;
    let addr = l.local_addr()?;
    println!("nbd listening on {addr}");
    for e in &engines {
        println!("volume {} at nbd://{addr}/{}", e.volume(), e.volume());
    }
    tokio::select! {
        r = zebu_nbd::serve(l, exports) => r.context("NBD server failed"),
        _ = tokio::signal::ctrl_c() => {
            for e in &engines {
                if let Err(err) = e.flush().await {
                    tracing::warn!(volume = %e.volume(), error = %err, "flush at shutdown failed");
                }
            }
            Ok(())
        }
    }
}
