//! The `zebu system-backup` and `zebu system-restore` commands: create (with `--wait` and a
//! progress bar on stderr), list, get, delete; `-o json` prints objects as the API returns them.

use anyhow::{Result, bail};
use clap::{Subcommand, ValueEnum};
use serde_json::json;
use zebu_manager::model::{SystemBackup, SystemBackupState, SystemRestore, SystemRestoreState};

use crate::cli::{
    Global, Output, client, print_deleted, print_json, print_one, table, wait_progress,
};

#[derive(Clone, Copy, ValueEnum)]
pub enum Policy {
    IfNotPresent,
    Always,
    Disabled,
}

#[derive(Subcommand)]
pub enum SystemBackupCmd {
    /// Back up the system: settings, targets, backing images, and every volume with the backup
    /// that restores it.
    Create {
        name: String,
        /// Which volumes get a new backup (default: those without one of their current data).
        #[arg(long, value_enum)]
        volume_backup_policy: Option<Policy>,
        /// Where the system backup's document goes (default: `default`).
        #[arg(long)]
        target: Option<String>,
        /// Wait until it is ready, showing progress.
        #[arg(long)]
        wait: bool,
    },
    List,
    Get {
        name: String,
    },
    /// Delete a system backup (its document on the target; the volume backups stay).
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum SystemRestoreCmd {
    /// Restore a system backup: re-create what is missing.
    Create {
        name: String,
        #[arg(long)]
        system_backup: String,
        /// Wait until it completes, showing progress.
        #[arg(long)]
        wait: bool,
    },
    List,
    Get {
        name: String,
    },
    Delete {
        name: String,
    },
}

fn show_backups(g: &Global, v: &[SystemBackup]) -> Result<()> {
    if g.output == Output::Json {
        return print_json(&v);
    }
    table(
        &[
            "NAME", "STATE", "PROGRESS", "TARGET", "POLICY", "VOLUMES", "IMAGES", "MESSAGE",
        ],
        v.iter()
            .map(|b| {
                vec![
                    b.metadata.name.clone(),
                    b.status.state.as_str().into(),
                    format!("{}%", b.status.progress),
                    b.spec.target.clone(),
                    b.spec.volume_backup_policy.as_str().into(),
                    b.status.volumes.len().to_string(),
                    b.status.backing_images.len().to_string(),
                    b.status.message.clone(),
                ]
            })
            .collect(),
    );
    Ok(())
}

fn show_restores(g: &Global, v: &[SystemRestore]) -> Result<()> {
    if g.output == Output::Json {
        return print_json(&v);
    }
    table(
        &["NAME", "SYSTEM BACKUP", "STATE", "PROGRESS", "MESSAGE"],
        v.iter()
            .map(|r| {
                vec![
                    r.metadata.name.clone(),
                    r.spec.system_backup.clone(),
                    r.status.state.as_str().into(),
                    format!("{}%", r.status.progress),
                    r.status.message.clone(),
                ]
            })
            .collect(),
    );
    if v.len() == 1 {
        println!();
        table(
            &["KIND", "NAME", "RESULT"],
            v[0].status
                .results
                .iter()
                .map(|x| vec![x.kind.clone(), x.name.clone(), x.result.clone()])
                .collect(),
        );
    }
    Ok(())
}

pub async fn system_backup(g: &Global, cmd: SystemBackupCmd) -> Result<()> {
    let api = client(g)?;
    match cmd {
        SystemBackupCmd::Create {
            name,
            volume_backup_policy,
            target,
            wait: w,
        } => {
            let mut body = json!({"name": name});
            if let Some(p) = volume_backup_policy {
                body["volumeBackupPolicy"] = json!(match p {
                    Policy::IfNotPresent => "if-not-present",
                    Policy::Always => "always",
                    Policy::Disabled => "disabled",
                });
            }
            if let Some(t) = target {
                body["target"] = json!(t);
            }
            let mut sb: SystemBackup = api.post("/v1/system-backups", &body).await?;
            if w {
                sb = wait_progress(
                    &api,
                    &format!("/v1/system-backups/{name}"),
                    86400,
                    |b: &SystemBackup| {
                        (
                            b.status.state.finished(),
                            b.status.progress,
                            format!("{name}: {}", b.status.state.as_str()),
                        )
                    },
                )
                .await?;
                if sb.status.state == SystemBackupState::Error {
                    bail!("system backup {name} failed: {}", sb.status.message);
                }
            }
            show_backups(g, &[sb])
        }
        SystemBackupCmd::List => {
            let v: Vec<SystemBackup> = api.get("/v1/system-backups").await?;
            show_backups(g, &v)
        }
        SystemBackupCmd::Get { name } => {
            let b: SystemBackup = api.get(&format!("/v1/system-backups/{name}")).await?;
            print_one(g, b, show_backups)
        }
        SystemBackupCmd::Delete { name } => {
            let b: SystemBackup = api.delete(&format!("/v1/system-backups/{name}")).await?;
            print_deleted(g, &b, &format!("system backup {name}"))
        }
    }
}

pub async fn system_restore(g: &Global, cmd: SystemRestoreCmd) -> Result<()> {
    let api = client(g)?;
    match cmd {
        SystemRestoreCmd::Create {
            name,
            system_backup,
            wait: w,
        } => {
            let body = json!({"name": name, "systemBackup": system_backup});
            let mut sr: SystemRestore = api.post("/v1/system-restores", &body).await?;
            if w {
                sr = wait_progress(
                    &api,
                    &format!("/v1/system-restores/{name}"),
                    86400,
                    |r: &SystemRestore| {
                        (
                            r.status.state.finished(),
                            r.status.progress,
                            format!("{name}: {}", r.status.state.as_str()),
                        )
                    },
                )
                .await?;
                if sr.status.state == SystemRestoreState::Error {
                    if g.output == Output::Json {
                        print_json(&sr)?;
                    }
                    bail!("system restore {name} failed: {}", sr.status.message);
                }
            }
            show_restores(g, &[sr])
        }
        SystemRestoreCmd::List => {
            let v: Vec<SystemRestore> = api.get("/v1/system-restores").await?;
            show_restores(g, &v)
        }
        SystemRestoreCmd::Get { name } => {
            let r: SystemRestore = api.get(&format!("/v1/system-restores/{name}")).await?;
            print_one(g, r, show_restores)
        }
        SystemRestoreCmd::Delete { name } => {
            let r: SystemRestore = api.delete(&format!("/v1/system-restores/{name}")).await?;
            print_deleted(g, &r, &format!("system restore {name}"))
        }
    }
}
