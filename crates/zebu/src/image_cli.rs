//! The `zebu backing-image` commands: create from a URL, an upload (streamed, with progress) or
//! another image; list, get, update, delete; download the raw bytes (checked against the
//! image's SHA-512 on the way).

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::json;
use sha2::{Digest, Sha512};
use zebu_manager::client::ApiClient;
use zebu_manager::model::{BackingImage, BackingImageState, Backup};

use crate::cli::{
    Global, Output, bar, client, mib, print_deleted, print_json, print_one, table, wait_progress,
};

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Create a backing image from exactly one source.
    Create {
        name: String,
        /// Download from this http(s) URL (raw or qcow2).
        #[arg(long, group = "source")]
        url: Option<String>,
        /// Upload this file (raw or qcow2).
        #[arg(long, group = "source")]
        upload: Option<std::path::PathBuf>,
        /// Copy another backing image.
        #[arg(long, group = "source")]
        clone: Option<String>,
        /// Export an attached volume (a snapshot of it is taken, or --snapshot).
        #[arg(long, group = "source")]
        from_volume: Option<String>,
        /// The volume's snapshot to export (with --from-volume).
        #[arg(long, requires = "from_volume")]
        snapshot: Option<String>,
        /// Restore a backup of a backing image (made by `backing-image backup`).
        #[arg(long, group = "source")]
        from_backup: Option<String>,
        /// Expected SHA-512 of the raw bytes (hex); a mismatch fails the image.
        #[arg(long)]
        checksum: Option<String>,
        /// Nodes that keep a copy even when no replica there uses it (default 1).
        #[arg(long)]
        min_copies: Option<u32>,
        /// Wait until the first copy is ready, showing progress.
        #[arg(long)]
        wait: bool,
    },
    List,
    Get {
        name: String,
    },
    /// Upload the bytes of an image created with --upload whose upload failed or never came.
    Upload {
        name: String,
        file: std::path::PathBuf,
    },
    /// Back the image up to a backup target; prints the backup's name (listed by `backup list`
    /// as volume bi.NAME).
    Backup {
        name: String,
        /// The target (default: `default`).
        #[arg(long)]
        target: Option<String>,
        /// Wait until the backup completes, showing its progress.
        #[arg(long)]
        wait: bool,
    },
    /// Change how many nodes keep a copy.
    Update {
        name: String,
        #[arg(long)]
        min_copies: u32,
    },
    /// Delete an image no volume uses (its copies go from every node).
    Delete {
        name: String,
    },
    /// Write the image's raw bytes to a file (or stdout), checked against its SHA-512.
    Download {
        name: String,
        /// The file to write (`--output FILE` works too).
        #[arg(long = "output-file", value_name = "FILE")]
        file: Option<std::path::PathBuf>,
    },
}

fn show(g: &Global, imgs: &[BackingImage]) -> Result<()> {
    if g.output == Output::Json {
        return print_json(&imgs);
    }
    table(
        &[
            "NAME", "STATE", "PROGRESS", "SIZE", "SOURCE", "COPIES", "MESSAGE",
        ],
        imgs.iter()
            .map(|b| {
                let ready = b
                    .status
                    .copies
                    .iter()
                    .filter(|c| c.state == BackingImageState::Ready)
                    .count();
                vec![
                    b.metadata.name.clone(),
                    b.status.state.as_str().to_string(),
                    format!("{}%", b.status.progress),
                    mib(b.status.virtual_size),
                    b.spec.source.kind.as_str().to_string(),
                    format!("{ready}/{}", b.status.copies.len()),
                    b.status.message.clone(),
                ]
            })
            .collect(),
    );
    Ok(())
}

/// Waits until the image is ready (or failed: an error), with a progress bar on stderr.
async fn wait_ready(api: &ApiClient, name: &str) -> Result<BackingImage> {
    let b = wait_progress(
        api,
        &format!("/v1/backing-images/{name}"),
        3600,
        |b: &BackingImage| {
            let st = b.status.state;
            (
                st == BackingImageState::Ready || st == BackingImageState::Failed,
                b.status.progress,
                format!("{name}: {} {}", st.as_str(), b.status.message),
            )
        },
    )
    .await?;
    if b.status.state == BackingImageState::Failed {
        bail!("backing image {name} failed: {}", b.status.message);
    }
    Ok(b)
}

fn http() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("HTTP client")
}

/// Streams `path` to the image's upload route, with a progress bar on stderr.
async fn upload(api: &ApiClient, name: &str, path: &std::path::Path) -> Result<BackingImage> {
    let file = std::fs::File::open(path).with_context(|| format!("--upload {}", path.display()))?;
    let size = file.metadata()?.len();
    let tty = std::io::stderr().is_terminal();
    let label = name.to_string();
    let stream = futures_util::stream::unfold(Some((file, 0u64, 0u32)), move |state| {
        let label = label.clone();
        async move {
            let (mut f, sent, shown) = state?;
            let mut buf = vec![0u8; 1 << 20];
            let read = tokio::task::spawn_blocking(move || f.read(&mut buf).map(|n| (f, buf, n)))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
            match read {
                Ok((_, _, 0)) => None,
                Ok((f, mut buf, n)) => {
                    buf.truncate(n);
                    let sent = sent + n as u64;
                    let pct = (sent * 100).checked_div(size).unwrap_or(100) as u32;
                    if pct != shown {
                        let line = format!("{label}: uploading {}", bar(sent, size));
                        if tty {
                            eprint!("\r{line}\x1b[K");
                        } else if pct.is_multiple_of(10) {
                            eprintln!("{line}");
                        }
                    }
                    Some((Ok::<_, std::io::Error>(buf), Some((f, sent, pct))))
                }
                // The stream ends after the error.
                Err(e) => Some((Err(e), None)),
            }
        }
    });
    // Refused before any byte is sent when it cannot be taken (a server that refuses early
    // closes the connection mid-body, which hides its answer).
    let cur: BackingImage = api.get(&format!("/v1/backing-images/{name}")).await?;
    if cur.status.state == BackingImageState::Ready {
        bail!("backing image {name:?} is already uploaded");
    }
    let sent = http()?
        .put(format!("{}/v1/backing-images/{name}/upload", api.base()))
        .bearer_auth(api.token())
        .header("content-length", size)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            // The connection may have gone after the server took (or refused) the upload.
            let now: BackingImage = api.get(&format!("/v1/backing-images/{name}")).await?;
            if now.status.state == BackingImageState::Ready {
                return Ok(now);
            }
            bail!(
                "uploading to {}: {e}{}",
                api.base(),
                if now.status.message.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", now.status.message)
                }
            );
        }
    };
    if tty {
        eprintln!();
    }
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        let msg = zebu_manager::body_message(&text);
        bail!("{msg}");
    }
    serde_json::from_str(&text).context("the API's answer")
}

async fn download(api: &ApiClient, name: &str, out: Option<&std::path::Path>) -> Result<()> {
    let mut resp = http()?
        .get(format!("{}/v1/backing-images/{name}/download", api.base()))
        .bearer_auth(api.token())
        .send()
        .await
        .with_context(|| format!("reading from {}", api.base()))?;
    if !resp.status().is_success() {
        let text = resp.text().await.unwrap_or_default();
        let msg = zebu_manager::body_message(&text);
        bail!("{msg}");
    }
    let want = resp
        .headers()
        .get("x-zebu-checksum")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut sink: Box<dyn Write> = match out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("--output {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut h = Sha512::new();
    while let Some(chunk) = resp.chunk().await.context("reading the image")? {
        h.update(&chunk);
        sink.write_all(&chunk).context("writing the image")?;
    }
    sink.flush().context("writing the image")?;
    let got: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if let Some(w) = want
        && w != got
    {
        bail!("downloaded bytes have SHA-512 {got}, not the image's {w}");
    }
    Ok(())
}

pub async fn image(g: &Global, cmd: ImageCmd) -> Result<()> {
    let api = client(g)?;
    match cmd {
        ImageCmd::Create {
            name,
            url,
            upload: file,
            clone,
            from_volume,
            snapshot,
            from_backup,
            checksum,
            min_copies,
            wait,
        } => {
            if let Some(p) = &file {
                std::fs::File::open(p).with_context(|| format!("--upload {}", p.display()))?;
            }
            let source = match (&url, &file, &clone, &from_volume, &from_backup) {
                (Some(u), None, None, None, None) => json!({"kind": "download", "url": u}),
                (None, Some(_), None, None, None) => json!({"kind": "upload"}),
                (None, None, Some(c), None, None) => json!({"kind": "clone", "image": c}),
                (None, None, None, Some(v), None) => {
                    json!({"kind": "export", "volume": v, "snapshot": snapshot.unwrap_or_default()})
                }
                (None, None, None, None, Some(b)) => json!({"kind": "restore", "backup": b}),
                _ => bail!(
                    "backing-image create needs one source: --url, --upload, --clone, --from-volume or --from-backup"
                ),
            };
            let mut body = json!({"name": name, "source": source});
            if let Some(c) = checksum {
                body["checksum"] = json!(c);
            }
            if let Some(n) = min_copies {
                body["minCopies"] = json!(n);
            }
            let mut b: BackingImage = api.post("/v1/backing-images", &body).await?;
            if let Some(p) = &file {
                b = upload(&api, &name, p).await?;
                if b.status.state != BackingImageState::Ready && !wait {
                    // The copy is verified; its state lands with the node's next report.
                    b = wait_ready(&api, &name).await?;
                }
            }
            if wait {
                b = wait_ready(&api, &name).await?;
            }
            print_one(g, b, show)
        }
        ImageCmd::Upload { name, file } => {
            let b = upload(&api, &name, &file).await?;
            let b = if b.status.state == BackingImageState::Ready {
                b
            } else {
                wait_ready(&api, &name).await?
            };
            print_one(g, b, show)
        }
        ImageCmd::Backup { name, target, wait } => {
            let mut body = json!({});
            if let Some(t) = target {
                body["target"] = json!(t);
            }
            let mut b: Backup = api
                .post(&format!("/v1/backing-images/{name}/backup"), &body)
                .await?;
            if wait {
                b = crate::backup_cli::wait_backup(g, &api, &b.metadata.name).await?;
            }
            if g.output == Output::Json {
                print_json(&b)
            } else {
                println!("{}", b.metadata.name);
                Ok(())
            }
        }
        ImageCmd::List => {
            let bs: Vec<BackingImage> = api.get("/v1/backing-images").await?;
            show(g, &bs)
        }
        ImageCmd::Get { name } => {
            let b: BackingImage = api.get(&format!("/v1/backing-images/{name}")).await?;
            print_one(g, b, show)
        }
        ImageCmd::Update { name, min_copies } => {
            let b: BackingImage = api
                .put(
                    &format!("/v1/backing-images/{name}"),
                    &json!({"minCopies": min_copies}),
                )
                .await?;
            print_one(g, b, show)
        }
        ImageCmd::Delete { name } => {
            let b: BackingImage = api.delete(&format!("/v1/backing-images/{name}")).await?;
            print_deleted(g, &b, &format!("backing image {name}"))
        }
        ImageCmd::Download { name, file } => download(&api, &name, file.as_deref()).await,
    }
}
