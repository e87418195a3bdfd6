//! The REST API under `/v1`: JSON in and out, bearer-token auth on everything but
//! `GET /v1/health`, errors as `{"code","message"}` with 4xx for bad input.
//!
//! Over 800 lines on purpose: the route table and all its handlers stay together, the one source the OpenAPI drift test checks.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::controller::{self, Manager};
use crate::model::*;
use crate::store::{self, StoreError};
use crate::{ApiError, ErrorKind};

/// A domain error on its way out as an HTTP answer: the one place where error kinds become
/// statuses. The body is `{"code","message"}`.
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        HttpError(e.into())
    }
}

/// The HTTP status of an error kind.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Upstream => StatusCode::BAD_GATEWAY,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (
            status_of(self.0.kind),
            Json(json!({"code": self.0.code, "message": self.0.message})),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<Json<T>, HttpError>;

pub(crate) fn authorize(m: &Manager, headers: &HeaderMap) -> Result<(), ApiError> {
    let got = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match got {
        Some(t) if controller::constant_time_eq(t.as_bytes(), m.token.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(
            ErrorKind::Unauthorized,
            "Unauthorized",
            "the bearer token is wrong",
        )),
        None => Err(ApiError::new(
            ErrorKind::Unauthorized,
            "Unauthorized",
            "missing bearer token (Authorization: Bearer <token from DATA_DIR/api-token>)",
        )),
    }
}

/// Parses a JSON body, turning syntax and shape errors into 400s.
pub(crate) fn body<T: serde::de::DeserializeOwned>(raw: &axum::body::Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(raw)
        .map_err(|e| ApiError::bad("InvalidBody", format!("invalid request body: {e}")))
}

/// Every route the API serves, as (method, path); docs/openapi.json must list exactly these (a
/// test checks both directions).
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/health"),
    ("get", "/v1/openapi.json"),
    ("get", "/v1/volumes"),
    ("post", "/v1/volumes"),
    ("get", "/v1/volumes/{name}"),
    ("delete", "/v1/volumes/{name}"),
    ("post", "/v1/volumes/{name}/attach"),
    ("post", "/v1/volumes/{name}/detach"),
    ("post", "/v1/volumes/{name}/expand"),
    ("post", "/v1/volumes/{name}/activate"),
    ("post", "/v1/volumes/{name}/salvage"),
    ("get", "/v1/volumes/{name}/snapshots"),
    ("post", "/v1/volumes/{name}/snapshots"),
    ("delete", "/v1/volumes/{name}/snapshots/{snapshot}"),
    ("post", "/v1/volumes/{name}/snapshots/{snapshot}/revert"),
    ("get", "/v1/replicas"),
    ("get", "/v1/replicas/{name}"),
    ("delete", "/v1/replicas/{name}"),
    ("get", "/v1/engines"),
    ("get", "/v1/nodes"),
    ("get", "/v1/nodes/{name}"),
    ("put", "/v1/nodes/{name}"),
    ("delete", "/v1/nodes/{name}"),
    ("post", "/v1/nodes/{name}/evict"),
    ("post", "/v1/nodes/{name}/heartbeat"),
    ("get", "/v1/nodes/{name}/wait"),
    ("post", "/v1/replica-events"),
    ("get", "/v1/settings"),
    ("put", "/v1/settings/{name}"),
    ("get", "/v1/backup-targets"),
    ("post", "/v1/backup-targets"),
    ("get", "/v1/backup-targets/{name}"),
    ("put", "/v1/backup-targets/{name}"),
    ("delete", "/v1/backup-targets/{name}"),
    ("post", "/v1/backup-targets/{name}/sync"),
    ("get", "/v1/backup-volumes"),
    ("get", "/v1/backups"),
    ("post", "/v1/backups"),
    ("get", "/v1/backups/{name}"),
    ("delete", "/v1/backups/{name}"),
    ("post", "/v1/backups/{name}/verify"),
    ("get", "/v1/backing-images"),
    ("post", "/v1/backing-images"),
    ("get", "/v1/backing-images/{name}"),
    ("put", "/v1/backing-images/{name}"),
    ("delete", "/v1/backing-images/{name}"),
    ("put", "/v1/backing-images/{name}/upload"),
    ("get", "/v1/backing-images/{name}/download"),
    ("post", "/v1/backing-images/{name}/backup"),
    ("get", "/v1/system-backups"),
    ("post", "/v1/system-backups"),
    ("get", "/v1/system-backups/{name}"),
    ("delete", "/v1/system-backups/{name}"),
    ("get", "/v1/system-restores"),
    ("post", "/v1/system-restores"),
    ("get", "/v1/system-restores/{name}"),
    ("delete", "/v1/system-restores/{name}"),
    ("get", "/metrics"),
];

pub fn router(m: Arc<Manager>) -> Router {
    crate::api_system::routes(crate::api_images::routes(Router::new()))
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(get_volume).delete(delete_volume))
        .route("/v1/volumes/{name}/attach", post(attach_volume))
        .route("/v1/volumes/{name}/detach", post(detach_volume))
        .route("/v1/volumes/{name}/expand", post(expand_volume))
        .route("/v1/volumes/{name}/activate", post(activate_volume))
        .route("/v1/volumes/{name}/salvage", post(salvage_volume))
        .route(
            "/v1/volumes/{name}/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snapshot}",
            axum::routing::delete(delete_snapshot),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snapshot}/revert",
            post(revert_snapshot),
        )
        .route("/v1/replicas", get(list_replicas))
        .route(
            "/v1/replicas/{name}",
            get(get_replica).delete(delete_replica),
        )
        .route("/v1/engines", get(list_engines))
        .route("/v1/nodes", get(list_nodes))
        .route(
            "/v1/nodes/{name}",
            get(get_node).put(update_node).delete(delete_node),
        )
        .route("/v1/nodes/{name}/evict", post(evict_node))
        .route("/v1/nodes/{name}/heartbeat", post(heartbeat))
        .route("/v1/nodes/{name}/wait", get(node_wait))
        .route("/v1/replica-events", post(replica_event))
        .route("/v1/settings", get(list_settings))
        .route("/v1/settings/{name}", put(put_setting))
        .route("/v1/backup-targets", get(list_targets).post(create_target))
        .route(
            "/v1/backup-targets/{name}",
            get(get_target).put(update_target).delete(delete_target),
        )
        .route("/v1/backup-targets/{name}/sync", post(sync_target))
        .route("/v1/backup-volumes", get(list_backup_volumes))
        .route("/v1/backups", get(list_backups).post(create_backup))
        .route("/v1/backups/{name}", get(get_backup).delete(delete_backup))
        .route("/v1/backups/{name}/verify", post(verify_backup))
        .route("/metrics", get(metrics))
        // Uploads of backing images stream through; other bodies are small JSON.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .fallback(not_found)
        .with_state(m)
}

/// Runs a store-writing operation on the blocking pool: a write waits for the disk (fsync),
/// which must not hold up the async workers serving other requests.
pub(crate) async fn blocking<T: Send + 'static>(
    m: &Arc<Manager>,
    f: impl FnOnce(&Manager) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, HttpError> {
    let m = m.clone();
    match tokio::task::spawn_blocking(move || f(&m)).await {
        Ok(r) => r.map_err(HttpError),
        Err(e) => Err(HttpError(ApiError::new(
            ErrorKind::Internal,
            "Internal",
            format!("operation did not finish: {e}"),
        ))),
    }
}

async fn not_found() -> HttpError {
    HttpError(ApiError::new(
        ErrorKind::NotFound,
        "NotFound",
        "no such endpoint",
    ))
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn openapi(State(m): State<Arc<Manager>>, h: HeaderMap) -> Result<Response, HttpError> {
    authorize(&m, &h)?;
    Ok((
        [("content-type", "application/json")],
        crate::openapi::DOCUMENT,
    )
        .into_response())
}

async fn metrics(State(m): State<Arc<Manager>>, h: HeaderMap) -> Result<Response, HttpError> {
    authorize(&m, &h)?;
    Ok((
        [("content-type", "text/plain; version=0.0.4")],
        m.metrics_text(),
    )
        .into_response())
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default = "three")]
    pub replicas: u32,
    /// Restore this backup into the new volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_backup: Option<String>,
    /// The backup target the volume backs up to (default: `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_target: Option<String>,
    /// Keep following the newest backup of the same volume (needs `fromBackup`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub standby: bool,
    /// A backing image under the new volume (its size at least the image's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_image: Option<String>,
}

fn three() -> u32 {
    3
}

async fn list_volumes(State(m): State<Arc<Manager>>, h: HeaderMap) -> ApiResult<Vec<Volume>> {
    authorize(&m, &h)?;
    Ok(Json(store::list::<Volume>(&*m.store)?))
}

async fn create_volume(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    raw: axum::body::Bytes,
) -> Result<(StatusCode, Json<Volume>), HttpError> {
    authorize(&m, &h)?;
    let req: CreateVolume = body(&raw)?;
    let v = blocking(&m, move |m| m.create_volume_with(&req)).await?;
    Ok((StatusCode::CREATED, Json(v)))
}

pub(crate) fn check_name(name: &str) -> Result<(), ApiError> {
    zebu_types::validate_name(name).map_err(|e| ApiError::bad("InvalidName", e.to_string()))
}

fn found<T>(o: Option<T>, kind: &str, name: &str) -> Result<T, ApiError> {
    o.ok_or_else(|| ApiError::not_found(kind, name))
}

/// Authorizes, validates the name and reads one object of kind `T`.
pub(crate) fn get_named<T: Object>(m: &Manager, h: &HeaderMap, name: &str) -> ApiResult<T> {
    authorize(m, h)?;
    check_name(name)?;
    Ok(Json(found(
        store::get::<T>(&*m.store, name)?,
        T::KIND,
        name,
    )?))
}

async fn get_volume(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Volume> {
    get_named(&m, &h, &name)
}

async fn delete_volume(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Volume>), HttpError> {
    authorize(&m, &h)?;
    check_name(&name)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(blocking(&m, move |m| m.delete_volume(&name)).await?),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AttachReq {
    #[serde(default)]
    node: Option<String>,
}

async fn attach_volume(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
    raw: axum::body::Bytes,
) -> ApiResult<Volume> {
    authorize(&m, &h)?;
    check_name(&name)?;
    let req: AttachReq = if raw.is_empty() {
        AttachReq::default()
    } else {
        body(&raw)?
    };
    Ok(Json(
        blocking(&m, move |m| m.attach_volume(&name, req.node.as_deref())).await?,
    ))
}

async fn detach_volume(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Volume> {
    authorize(&m, &h)?;
    check_name(&name)?;
    Ok(Json(blocking(&m, move |m| m.detach_volume(&name)).await?))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ExpandReq {
    size: u64,
}

async fn expand_volume(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
    raw: axum::body::Bytes,
) -> ApiResult<Volume> {
    authorize(&m, &h)?;
    check_name(&name)?;
    let req: ExpandReq = body(&raw)?;
    Ok(Json(
        blocking(&m, move |m| m.expand_volume(&name, req.size)).await?,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SnapshotReq {
    #[serde(default)]
    name: Option<String>,
}

async fn list_snapshots(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Vec<SnapshotInfo>> {
    authorize(&m, &h)?;
    check_name(&name)?;
    let v = found(store::get::<Volume>(&*m.store, &name)?, "volume", &name)?;
    if v.spec.standby {
        // The engine's chain as last reported, then the head.
        let mut list = v.status.restore.map(|r| r.snapshots).unwrap_or_default();
        let parent = list.last().map(|x| x.name.clone()).unwrap_or_default();
        list.push(SnapshotInfo {
            name: "volume-head".into(),
            parent,
            ..Default::default()
        });
        return Ok(Json(list));
    }
    Ok(Json(
        m.list_snapshots(&name)?
            .into_iter()
            .filter(|x| x.metadata.deletion_requested.is_none())
            .map(|x| SnapshotInfo {
                name: x.spec.name,
                created: x.status.created,
                parent: x.status.parent,
                user_created: x.status.user_created,
                size: x.status.size,
            })
            .collect(),
    ))
}

async fn create_snapshot(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
    raw: axum::body::Bytes,
) -> Result<(StatusCode, Json<Snapshot>), HttpError> {
    authorize(&m, &h)?;
    check_name(&name)?;
    let req: SnapshotReq = if raw.is_empty() {
        SnapshotReq::default()
    } else {
        body(&raw)?
    };
    Ok((
        StatusCode::CREATED,
        Json(blocking(&m, move |m| m.create_snapshot(&name, req.name.as_deref())).await?),
    ))
}

async fn revert_snapshot(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<(StatusCode, Json<Volume>), HttpError> {
    authorize(&m, &h)?;
    check_name(&name)?;
    check_name(&snapshot)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(blocking(&m, move |m| m.revert_volume(&name, &snapshot)).await?),
    ))
}

async fn delete_snapshot(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<(StatusCode, Json<Snapshot>), HttpError> {
    authorize(&m, &h)?;
    check_name(&name)?;
    check_name(&snapshot)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(blocking(&m, move |m| m.delete_snapshot(&name, &snapshot)).await?),
    ))
}

#[derive(Debug, Deserialize)]
struct ReplicaQuery {
    volume: Option<String>,
}

async fn list_replicas(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Query(q): Query<ReplicaQuery>,
) -> ApiResult<Vec<Replica>> {
    authorize(&m, &h)?;
    let all = store::list::<Replica>(&*m.store)?;
    Ok(Json(
        all.into_iter()
            .filter(|r| q.volume.as_ref().is_none_or(|v| &r.spec.volume == v))
            .collect(),
    ))
}

async fn get_replica(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Replica> {
    get_named(&m, &h, &name)
}

#[derive(Debug, Deserialize)]
struct ForceQuery {
    force: Option<bool>,
}

async fn delete_replica(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<ForceQuery>,
) -> Result<(StatusCode, Json<Replica>), HttpError> {
    authorize(&m, &h)?;
    check_name(&name)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(
            blocking(&m, move |m| {
                m.delete_replica(&name, q.force.unwrap_or(false))
            })
            .await?,
        ),
    ))
}

async fn list_engines(State(m): State<Arc<Manager>>, h: HeaderMap) -> ApiResult<Vec<Engine>> {
    authorize(&m, &h)?;
    Ok(Json(store::list::<Engine>(&*m.store)?))
}

async fn list_nodes(State(m): State<Arc<Manager>>, h: HeaderMap) -> ApiResult<Vec<Node>> {
    authorize(&m, &h)?;
    Ok(Json(
        store::list::<Node>(&*m.store)?
            .into_iter()
            .map(|n| m.node_view(n))
            .collect(),
    ))
}

async fn get_node(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Node> {
    let Json(n) = get_named::<Node>(&m, &h, &name)?;
    Ok(Json(m.node_view(n)))
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_scheduling: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evict: Option<bool>,
}

async fn update_node(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
    raw: axum::body::Bytes,
) -> ApiResult<Node> {
    authorize(&m, &h)?;
    check_name(&name)?;
    let req: NodeUpdate = body(&raw)?;
    Ok(Json(
        blocking(&m, move |m| {
            m.update_node(&name, req.allow_scheduling, req.evict)
        })
        .await?,
    ))
}

async fn evict_node(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Node> {
    authorize(&m, &h)?;
    check_name(&name)?;
    Ok(Json(
        blocking(&m, move |m| m.update_node(&name, None, Some(true))).await?,
    ))
}

async fn delete_node(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Node> {
    authorize(&m, &h)?;
    check_name(&name)?;
    Ok(Json(blocking(&m, move |m| m.delete_node(&name)).await?))
}

async fn heartbeat(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
    raw: axum::body::Bytes,
) -> Result<Response, HttpError> {
    authorize(&m, &h)?;
    check_name(&name)?;
    // An unchanged report is answered here; only one that must be applied goes to the
    // blocking pool.
    let answer = match m.heartbeat_unchanged(&name, &raw) {
        Some(a) => a,
        None => blocking(&m, move |m| m.heartbeat_raw(&name, &raw)).await?,
    };
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        answer,
    )
        .into_response())
}

async fn replica_event(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    raw: axum::body::Bytes,
) -> ApiResult<Replica> {
    authorize(&m, &h)?;
    let ev: ReplicaEvent = body(&raw)?;
    Ok(Json(blocking(&m, move |m| m.replica_event(&ev)).await?))
}

async fn list_settings(State(m): State<Arc<Manager>>, h: HeaderMap) -> ApiResult<Vec<Setting>> {
    authorize(&m, &h)?;
    Ok(Json(m.settings()?))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SettingReq {
    value: String,
}

async fn put_setting(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
    raw: axum::body::Bytes,
) -> ApiResult<Setting> {
    authorize(&m, &h)?;
    let req: SettingReq = body(&raw)?;
    Ok(Json(
        blocking(&m, move |m| m.put_setting(&name, &req.value)).await?,
    ))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetReq {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<u64>,
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
    /// Remove every option before `options` apply (update only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clear_options: bool,
}

async fn list_targets(State(m): State<Arc<Manager>>, h: HeaderMap) -> ApiResult<Vec<BackupTarget>> {
    authorize(&m, &h)?;
    Ok(Json(
        store::list::<BackupTarget>(&*m.store)?
            .into_iter()
            .map(crate::backups::redact)
            .collect(),
    ))
}

async fn create_target(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    raw: axum::body::Bytes,
) -> Result<(StatusCode, Json<BackupTarget>), HttpError> {
    authorize(&m, &h)?;
    let req: TargetReq = body(&raw)?;
    let t = m
        .create_target(
            &req.name,
            req.url.as_deref().unwrap_or(""),
            req.poll_interval,
            req.options,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(t)))
}

async fn get_target(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<BackupTarget> {
    let Json(t) = get_named::<BackupTarget>(&m, &h, &name)?;
    Ok(Json(crate::backups::redact(t)))
}

async fn update_target(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
    raw: axum::body::Bytes,
) -> ApiResult<BackupTarget> {
    authorize(&m, &h)?;
    check_name(&name)?;
    let req: TargetReq = body(&raw)?;
    if !req.name.is_empty() && req.name != name {
        return Err(ApiError::bad("InvalidName", "a backup target cannot be renamed").into());
    }
    Ok(Json(
        m.update_target(
            &name,
            req.url.as_deref(),
            req.poll_interval,
            req.options,
            req.clear_options,
        )
        .await?,
    ))
}

async fn delete_target(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<BackupTarget> {
    authorize(&m, &h)?;
    check_name(&name)?;
    Ok(Json(m.delete_target(&name)?))
}

async fn sync_target(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<BackupTarget> {
    authorize(&m, &h)?;
    check_name(&name)?;
    m.sync_target(&name).await?;
    let t = found(
        store::get::<BackupTarget>(&*m.store, &name)?,
        "backup target",
        &name,
    )?;
    Ok(Json(crate::backups::redact(t)))
}

async fn list_backup_volumes(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
) -> ApiResult<Vec<BackupVolume>> {
    authorize(&m, &h)?;
    Ok(Json(store::list::<BackupVolume>(&*m.store)?))
}

#[derive(Debug, Deserialize)]
struct BackupQuery {
    volume: Option<String>,
    target: Option<String>,
    /// `KEY=VALUE[,KEY=VALUE...]`: backups carrying every one of these labels.
    label: Option<String>,
}

async fn list_backups(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Query(q): Query<BackupQuery>,
) -> ApiResult<Vec<Backup>> {
    authorize(&m, &h)?;
    Ok(Json(m.list_backups(
        q.volume.as_deref(),
        q.target.as_deref(),
        &parse_label_query(q.label.as_deref())?,
    )?))
}

/// Parses `KEY=VALUE[,KEY=VALUE...]`.
fn parse_label_query(
    q: Option<&str>,
) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
    let mut out = std::collections::BTreeMap::new();
    for kv in q.unwrap_or("").split(',').filter(|s| !s.is_empty()) {
        let Some((k, v)) = kv.split_once('=') else {
            return Err(ApiError::bad(
                "InvalidLabel",
                format!("label filter {kv:?} is not KEY=VALUE"),
            ));
        };
        out.insert(k.to_string(), v.to_string());
    }
    crate::backups::check_labels(&out)?;
    Ok(out)
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackupReq {
    pub volume: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Labels stored with the backup (in its manifest too).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Read and check every block instead of trusting the previous backup's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full: bool,
}

async fn create_backup(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    raw: axum::body::Bytes,
) -> Result<(StatusCode, Json<Backup>), HttpError> {
    authorize(&m, &h)?;
    let req: BackupReq = body(&raw)?;
    check_name(&req.volume)?;
    if let Some(t) = &req.target {
        check_name(t)?;
    }
    let b = m.create_backup(
        &req.volume,
        req.snapshot.as_deref(),
        req.target.as_deref(),
        req.labels,
        req.full,
    )?;
    Ok((StatusCode::CREATED, Json(b)))
}

async fn get_backup(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Backup> {
    get_named(&m, &h, &name)
}

async fn delete_backup(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Backup> {
    authorize(&m, &h)?;
    check_name(&name)?;
    Ok(Json(m.delete_backup(&name).await?))
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerifyReq {
    #[serde(default)]
    pub deep: bool,
}

async fn verify_backup(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
    raw: axum::body::Bytes,
) -> ApiResult<crate::backups::VerifyResult> {
    authorize(&m, &h)?;
    check_name(&name)?;
    let req: VerifyReq = if raw.is_empty() {
        VerifyReq::default()
    } else {
        body(&raw)?
    };
    Ok(Json(m.verify_backup(&name, req.deep).await?))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WaitQuery {
    /// Milliseconds, at most 2,000.
    timeout_ms: Option<u64>,
}

/// A node's long-poll: answers when the manager has work for it, or at the timeout.
async fn node_wait(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<serde_json::Value> {
    authorize(&m, &h)?;
    check_name(&name)?;
    let t = std::time::Duration::from_millis(q.timeout_ms.unwrap_or(1000).min(2_000));
    let woken = m.wait_for_work(&name, t).await;
    Ok(Json(json!({ "woken": woken })))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SalvageReq {
    pub replica: String,
}

async fn salvage_volume(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
    raw: axum::body::Bytes,
) -> ApiResult<Volume> {
    authorize(&m, &h)?;
    check_name(&name)?;
    let req: SalvageReq = body(&raw)?;
    check_name(&req.replica)?;
    Ok(Json(
        blocking(&m, move |m| m.salvage_volume(&name, &req.replica)).await?,
    ))
}

async fn activate_volume(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Volume> {
    authorize(&m, &h)?;
    check_name(&name)?;
    Ok(Json(m.activate_volume(&name).await?))
}
