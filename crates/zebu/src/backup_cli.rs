//! The `zebu backup-target` and `zebu backup` commands, and waiting for a restore: progress bars
//! on stderr, the backup name or tables on stdout, `-o json` objects as the API returns them.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Subcommand;
use serde_json::json;
use zebu_manager::backups::VerifyResult;
use zebu_manager::client::ApiClient;
use zebu_manager::model::{Backup, BackupState, BackupTarget, RestoreState, Volume};
use zebu_types::ByteSize;

use crate::cli::{Global, Output, bar, client, enum_str, mib, print_json, table};

#[derive(Subcommand)]
pub enum TargetCmd {
    /// Add a backup target.
    Create {
        name: String,
        /// file:///path or s3://bucket/prefix
        #[arg(long)]
        url: String,
        /// How often to sync its backups (e.g. 300, 30s, 5m, 1h).
        #[arg(long, value_parser = parse_duration)]
        poll_interval: Option<u64>,
        /// A target option as KEY=VALUE (S3: endpoint, region, access-key-id,
        /// secret-access-key, path-style, ca-cert); repeat for each.
        #[arg(long = "option", value_parser = parse_kv)]
        options: Vec<(String, String)>,
    },
    /// Change a target's URL, poll interval or options (KEY= removes an option).
    Update {
        name: String,
        #[arg(long)]
        url: Option<String>,
        #[arg(long, value_parser = parse_duration)]
        poll_interval: Option<u64>,
        #[arg(long = "option", value_parser = parse_kv)]
        options: Vec<(String, String)>,
        /// Remove every option first (the given --option values then apply). Options that do
        /// not apply to a new URL's scheme are removed anyway, and named.
        #[arg(long)]
        clear_options: bool,
    },
    List,
    Get {
        name: String,
    },
    /// Delete a target object; the backups stored in it are left alone.
    Delete {
        name: String,
    },
    /// Sync the target's backups now.
    Sync {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum BackupCmd {
    /// Back up an attached volume; prints the backup's name.
    Create {
        volume: String,
        /// The snapshot to back up (default: one is taken now).
        #[arg(long)]
        snapshot: Option<String>,
        /// The target (default: the volume's).
        #[arg(long)]
        target: Option<String>,
        /// A label as KEY=VALUE, stored with the backup; repeat for each.
        #[arg(long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
        /// Read every block and check each against the target, uploading what is missing
        /// (repairs a target that lost blocks).
        #[arg(long)]
        full: bool,
        /// Wait until the backup completes, showing its progress.
        #[arg(long)]
        wait: bool,
    },
    List {
        #[arg(long)]
        volume: Option<String>,
        #[arg(long)]
        target: Option<String>,
        /// Only backups with this label (KEY=VALUE); repeat to require several.
        #[arg(long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
    },
    Get {
        name: String,
    },
    /// Delete a backup and the blocks no other backup uses.
    Delete {
        name: String,
    },
    /// Check that every block of a backup exists (--deep: and re-hash each one).
    Verify {
        name: String,
        #[arg(long)]
        deep: bool,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Seconds from `300`, `30s`, `5m`, `2h` or `1d`.
fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a duration (e.g. 300, 30s, 5m, 1h)"))
}

fn show_targets(g: &Global, ts: &[BackupTarget]) -> Result<()> {
    if g.output == Output::Json {
        return print_json(&ts);
    }
    table(
        &["NAME", "URL", "POLL", "AVAILABLE", "MESSAGE"],
        ts.iter()
            .map(|t| {
                vec![
                    t.metadata.name.clone(),
                    t.spec.url.clone(),
                    format!("{}s", t.spec.poll_interval),
                    t.status.available.to_string(),
                    t.status.message.clone(),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub async fn target(g: &Global, cmd: TargetCmd) -> Result<()> {
    let api = client(g)?;
    let opts = |o: Vec<(String, String)>| o.into_iter().collect::<BTreeMap<_, _>>();
    let t: BackupTarget = match cmd {
        TargetCmd::Create {
            name,
            url,
            poll_interval,
            options,
        } => {
            let mut body = json!({"name": name, "url": url, "options": opts(options)});
            if let Some(p) = poll_interval {
                body["pollInterval"] = json!(p);
            }
            api.post("/v1/backup-targets", &body).await?
        }
        TargetCmd::Update {
            name,
            url,
            poll_interval,
            options,
            clear_options,
        } => {
            let before: BackupTarget = api.get(&format!("/v1/backup-targets/{name}")).await?;
            let asked = opts(options);
            let mut body = json!({"options": asked, "clearOptions": clear_options});
            if let Some(u) = &url {
                body["url"] = json!(u);
            }
            if let Some(p) = poll_interval {
                body["pollInterval"] = json!(p);
            }
            let t: BackupTarget = api
                .put(&format!("/v1/backup-targets/{name}"), &body)
                .await?;
            let dropped: Vec<&str> = before
                .spec
                .options
                .keys()
                .filter(|k| !t.spec.options.contains_key(*k) && !asked.contains_key(*k))
                .map(String::as_str)
                .collect();
            if !dropped.is_empty() && !clear_options {
                eprintln!(
                    "removed options that do not apply to {}: {}",
                    t.spec.url,
                    dropped.join(", ")
                );
            }
            t
        }
        TargetCmd::List => {
            let ts: Vec<BackupTarget> = api.get("/v1/backup-targets").await?;
            return show_targets(g, &ts);
        }
        TargetCmd::Get { name } => api.get(&format!("/v1/backup-targets/{name}")).await?,
        TargetCmd::Delete { name } => {
            let t: BackupTarget = api.delete(&format!("/v1/backup-targets/{name}")).await?;
            if g.output == Output::Json {
                return print_json(&t);
            }
            println!("backup target {name} deleted (its stored backups are untouched)");
            return Ok(());
        }
        TargetCmd::Sync { name } => {
            let t: BackupTarget = api
                .post(&format!("/v1/backup-targets/{name}/sync"), &json!({}))
                .await?;
            if !t.status.available {
                bail!("backup target {name} is unavailable: {}", t.status.message);
            }
            t
        }
    };
    if g.output == Output::Json {
        return print_json(&t);
    }
    show_targets(g, &[t])
}

fn show_backups(g: &Global, bs: &[Backup]) -> Result<()> {
    if g.output == Output::Json {
        return print_json(&bs);
    }
    table(
        &[
            "NAME", "VOLUME", "SNAPSHOT", "TARGET", "STATE", "PROGRESS", "UPLOADED", "PRESENT",
            "ZERO", "TOTAL", "STORED", "LABELS", "ERROR",
        ],
        bs.iter()
            .map(|b| {
                let st = &b.status;
                vec![
                    b.metadata.name.clone(),
                    b.spec.volume.clone(),
                    b.spec.snapshot.clone(),
                    b.spec.target.clone(),
                    enum_str(&st.state),
                    format!("{}%", st.progress),
                    st.blocks.uploaded.to_string(),
                    st.blocks.present.to_string(),
                    st.blocks.zero.to_string(),
                    st.blocks.total.to_string(),
                    ByteSize(st.bytes.stored).to_string(),
                    b.metadata
                        .labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(","),
                    st.error.clone(),
                ]
            })
            .collect(),
    );
    Ok(())
}

/// Follows a backup until it is Completed (Ok) or Error (a one-line error naming the cause).
pub(crate) async fn wait_backup(g: &Global, api: &ApiClient, name: &str) -> Result<Backup> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    let mut last_print = tokio::time::Instant::now();
    loop {
        let b: Backup = api.get(&format!("/v1/backups/{name}")).await?;
        let st = &b.status;
        let done = st.blocks.uploaded + st.blocks.present + st.blocks.zero;
        if g.output == Output::Table {
            let text = format!(
                "backup {name}: {} {done}/{} blocks, {} uploaded",
                bar(st.progress as u64, 100),
                st.blocks.total,
                mib(st.bytes.uploaded)
            );
            if tty {
                eprint!("\r\x1b[2K{text}");
                let _ = std::io::stderr().flush();
            } else if last_print.elapsed() >= Duration::from_secs(2) || st.state.finished() {
                eprintln!("{text}");
                last_print = tokio::time::Instant::now();
            }
        }
        match st.state {
            BackupState::Completed => {
                if tty && g.output == Output::Table {
                    eprintln!();
                }
                return Ok(b);
            }
            BackupState::Error => {
                if tty && g.output == Output::Table {
                    eprintln!();
                }
                bail!("backup {name} failed: {}", st.error);
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

pub async fn backup(g: &Global, cmd: BackupCmd) -> Result<()> {
    let api = client(g)?;
    match cmd {
        BackupCmd::Create {
            volume,
            snapshot,
            target,
            labels,
            full,
            wait,
        } => {
            let labels: BTreeMap<String, String> = labels.into_iter().collect();
            let mut body = json!({"volume": volume, "labels": labels, "full": full});
            if let Some(s) = snapshot {
                body["snapshot"] = json!(s);
            }
            if let Some(t) = target {
                body["target"] = json!(t);
            }
            let mut b: Backup = api.post("/v1/backups", &body).await?;
            if wait {
                b = wait_backup(g, &api, &b.metadata.name).await?;
            }
            if g.output == Output::Json {
                print_json(&b)
            } else {
                println!("{}", b.metadata.name);
                Ok(())
            }
        }
        BackupCmd::List {
            volume,
            target,
            labels,
        } => {
            let mut q = Vec::new();
            if !labels.is_empty() {
                let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                q.push(format!("label={}", l.join(",")));
            }
            if let Some(v) = volume {
                q.push(format!("volume={v}"));
            }
            if let Some(t) = target {
                q.push(format!("target={t}"));
            }
            let path = if q.is_empty() {
                "/v1/backups".to_string()
            } else {
                format!("/v1/backups?{}", q.join("&"))
            };
            let bs: Vec<Backup> = api.get(&path).await?;
            show_backups(g, &bs)
        }
        BackupCmd::Get { name } => {
            let b: Backup = api.get(&format!("/v1/backups/{name}")).await?;
            if g.output == Output::Json {
                print_json(&b)
            } else {
                show_backups(g, &[b])
            }
        }
        BackupCmd::Delete { name } => {
            let b: Backup = api.delete(&format!("/v1/backups/{name}")).await?;
            if g.output == Output::Json {
                print_json(&b)
            } else {
                println!("backup {name} deleted");
                Ok(())
            }
        }
        BackupCmd::Verify { name, deep } => {
            let r: VerifyResult = api
                .post(
                    &format!("/v1/backups/{name}/verify"),
                    &json!({"deep": deep}),
                )
                .await?;
            if g.output == Output::Json {
                print_json(&r)?;
            } else {
                for p in &r.problems {
                    println!("{}: {}", p.key, p.problem);
                }
            }
            if !r.ok {
                bail!(
                    "backup {name} failed verification: {} problem(s), first: {} {}",
                    r.problems.len(),
                    r.problems.first().map(|p| p.key.as_str()).unwrap_or(""),
                    r.problems.first().map(|p| p.problem.as_str()).unwrap_or("")
                );
            }
            if g.output == Output::Table {
                println!(
                    "backup {name}: ok ({} blocks {})",
                    r.blocks,
                    if deep { "re-hashed" } else { "present" }
                );
            }
            Ok(())
        }
    }
}

/// Waits until a volume created from a backup finished restoring it, with a progress bar.
pub async fn wait_restore(g: &Global, api: &ApiClient, name: &str) -> Result<Volume> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    let mut last_print = tokio::time::Instant::now();
    loop {
        let v: Volume = api.get(&format!("/v1/volumes/{name}")).await?;
        let r = v.status.restore.clone().unwrap_or_default();
        if !v.spec.from_backup.is_empty() && r.last_restored_backup == v.spec.from_backup {
            if tty && g.output == Output::Table {
                eprintln!();
            }
            return Ok(v);
        }
        if r.state == RestoreState::Error {
            bail!("restore of volume {name} failed: {}", r.error);
        }
        if g.output == Output::Table {
            let text = format!(
                "restoring {name} from {}: {}",
                v.spec.from_backup,
                bar(r.progress as u64, 100)
            );
            if tty {
                eprint!("\r\x1b[2K{text}");
                let _ = std::io::stderr().flush();
            } else if last_print.elapsed() >= Duration::from_secs(2) {
                eprintln!("{text}");
                last_print = tokio::time::Instant::now();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a standby volume asked to activate is a normal volume, or its activation failed.
pub async fn wait_activated(g: &Global, api: &ApiClient, name: &str, secs: u64) -> Result<Volume> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let v: Volume = api.get(&format!("/v1/volumes/{name}")).await?;
        let r = v.status.restore.clone().unwrap_or_default();
        if !v.spec.standby {
            if tty && g.output == Output::Table {
                eprintln!();
            }
            return Ok(v);
        }
        if !v.spec.activate {
            bail!("volume {name} was not activated: {}", r.activation_error);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "volume {name} is still not activated after {secs}s (restoring {})",
                r.requested_backup
            );
        }
        if g.output == Output::Table && tty {
            eprint!(
                "\r\x1b[2Kactivating {name}: restoring {} {}",
                r.requested_backup,
                bar(r.progress as u64, 100)
            );
            let _ = std::io::stderr().flush();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300"), Ok(300));
        assert_eq!(parse_duration("30s"), Ok(30));
        assert_eq!(parse_duration("5m"), Ok(300));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5x").is_err());
    }
}
