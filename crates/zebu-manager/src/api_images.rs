//! The backing-image routes: create, list, get, update (`minCopies`), delete, and the two that
//! stream bytes: an upload goes through to the node chosen to hold the first copy, a download
//! comes from a node with a ready copy. The manager keeps no image bytes of its own.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, put};
use axum::{Json, Router};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::api::{HttpError, authorize, blocking, body, check_name, get_named};
use crate::controller::Manager;
use crate::model::*;
use crate::store;
use crate::{ApiError, ErrorKind};

type ApiResult<T> = Result<Json<T>, HttpError>;

/// The routes, added to the API's router.
pub fn routes(r: Router<Arc<Manager>>) -> Router<Arc<Manager>> {
    r.route("/v1/backing-images", get(list).post(create))
        .route(
            "/v1/backing-images/{name}",
            get(get_one).put(update).delete(delete),
        )
        .route("/v1/backing-images/{name}/upload", put(upload))
        .route("/v1/backing-images/{name}/download", get(download))
        .route(
            "/v1/backing-images/{name}/backup",
            axum::routing::post(backup),
        )
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateBackingImage {
    pub name: String,
    pub source: BackingImageSource,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub checksum: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_copies: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackupBackingImage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateBackingImage {
    pub min_copies: u32,
}

async fn list(State(m): State<Arc<Manager>>, h: HeaderMap) -> ApiResult<Vec<BackingImage>> {
    authorize(&m, &h)?;
    Ok(Json(store::list::<BackingImage>(&*m.store)?))
}

async fn create(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    raw: axum::body::Bytes,
) -> Result<(StatusCode, Json<BackingImage>), HttpError> {
    authorize(&m, &h)?;
    let req: CreateBackingImage = body(&raw)?;
    let spec = BackingImageSpec {
        source: req.source,
        checksum: req.checksum,
        min_copies: req.min_copies.unwrap_or(1),
    };
    let b = blocking(&m, move |m| m.create_backing_image(&req.name, spec)).await?;
    Ok((StatusCode::CREATED, Json(b)))
}

async fn get_one(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<BackingImage> {
    get_named::<BackingImage>(&m, &h, &name)
}

async fn update(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
    raw: axum::body::Bytes,
) -> ApiResult<BackingImage> {
    authorize(&m, &h)?;
    check_name(&name)?;
    let req: UpdateBackingImage = body(&raw)?;
    Ok(Json(
        blocking(&m, move |m| m.update_backing_image(&name, req.min_copies)).await?,
    ))
}

async fn delete(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<BackingImage> {
    authorize(&m, &h)?;
    check_name(&name)?;
    Ok(Json(
        blocking(&m, move |m| m.delete_backing_image(&name)).await?,
    ))
}

async fn backup(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
    raw: axum::body::Bytes,
) -> Result<(StatusCode, Json<Backup>), HttpError> {
    authorize(&m, &h)?;
    check_name(&name)?;
    let req: BackupBackingImage = if raw.is_empty() {
        BackupBackingImage::default()
    } else {
        body(&raw)?
    };
    let b = blocking(&m, move |m| {
        m.create_image_backup(&name, req.target.as_deref())
    })
    .await?;
    Ok((StatusCode::CREATED, Json(b)))
}

fn upstream(msg: String) -> HttpError {
    HttpError(ApiError::new(ErrorKind::Upstream, "NodeUnavailable", msg))
}

/// Ends an upload whose handler was dropped (its client went away) as failed.
struct UploadGuard {
    m: Arc<Manager>,
    name: String,
    node: String,
    armed: bool,
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (m, name, node) = (self.m.clone(), self.name.clone(), self.node.clone());
        tokio::task::spawn_blocking(move || {
            let _ = m.end_image_upload(&name, &node, Err("the client went away".into()));
        });
    }
}

/// Streams the request body to the node chosen for the first copy; answers once the copy is
/// verified (or says why it failed: the image then waits for another upload).
async fn upload(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<BackingImage> {
    authorize(&m, &h)?;
    check_name(&name)?;
    let size = h
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let n = name.clone();
    let (node, addr, copy) = blocking(&m, move |m| m.begin_image_upload(&n, size)).await?;
    let mut guard = UploadGuard {
        m: m.clone(),
        name: name.clone(),
        node: node.clone(),
        armed: true,
    };
    let url = format!(
        "http://{addr}/v1/copies/{}-{}?checksum={}&size={}",
        copy.name, copy.uid, copy.checksum, size
    );
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let client = reqwest::Client::new();
    let sent = client
        .put(&url)
        .bearer_auth(&m.token)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    let outcome: Result<CopyReport, String> = match sent {
        Ok(r) if r.status().is_success() => r
            .json::<CopyReport>()
            .await
            .map_err(|e| format!("the node's answer: {e}")),
        Ok(r) => {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            let msg = crate::body_message(&text);
            Err(format!("node answered {status}: {msg}"))
        }
        Err(e) => Err(format!("sending to the node at {addr}: {e}")),
    };
    guard.armed = false;
    let failed = outcome.as_ref().err().cloned();
    let n = name.clone();
    let img = blocking(&m, move |m| m.end_image_upload(&n, &node, outcome)).await?;
    if let Some(why) = failed {
        tracing::warn!(image = %name, %why, "backing-image upload failed");
        return Err(HttpError(ApiError::bad(
            "UploadFailed",
            format!("upload of backing image {name:?} failed: {why}"),
        )));
    }
    Ok(Json(img))
}

/// The raw bytes, from a node with a ready copy.
async fn download(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, HttpError> {
    authorize(&m, &h)?;
    check_name(&name)?;
    let n = name.clone();
    let (addr, copy) = blocking(&m, move |m| m.image_source(&n)).await?;
    let url = format!("http://{addr}/v1/copies/{}-{}", copy.name, copy.uid);
    let r = reqwest::Client::new()
        .get(&url)
        .bearer_auth(&m.token)
        .send()
        .await
        .map_err(|e| upstream(format!("reading backing image {name:?} from {addr}: {e}")))?;
    if !r.status().is_success() {
        return Err(upstream(format!(
            "reading backing image {name:?} from {addr}: the node answered {}",
            r.status()
        )));
    }
    let len = r.content_length();
    let mut resp = Response::new(Body::from_stream(r.bytes_stream()));
    let hs = resp.headers_mut();
    hs.insert(
        "content-type",
        axum::http::HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(l) = len
        && let Ok(v) = l.to_string().parse()
    {
        hs.insert("content-length", v);
    }
    if let Ok(v) = copy.checksum.parse() {
        hs.insert("x-zebu-checksum", v);
    }
    Ok(resp)
}
