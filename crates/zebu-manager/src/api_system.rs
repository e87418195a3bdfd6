//! The system backup and restore routes: create, list, get, delete of each.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::api::{HttpError, authorize, blocking, body, check_name, get_named};
use crate::controller::Manager;
use crate::model::*;
use crate::store;

type ApiResult<T> = Result<Json<T>, HttpError>;

/// The routes, added to the API's router.
pub fn routes(r: Router<Arc<Manager>>) -> Router<Arc<Manager>> {
    r.route("/v1/system-backups", get(list_backups).post(create_backup))
        .route(
            "/v1/system-backups/{name}",
            get(get_backup).delete(delete_backup),
        )
        .route(
            "/v1/system-restores",
            get(list_restores).post(create_restore),
        )
        .route(
            "/v1/system-restores/{name}",
            get(get_restore).delete(delete_restore),
        )
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSystemBackup {
    pub name: String,
    #[serde(default)]
    pub volume_backup_policy: VolumeBackupPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSystemRestore {
    pub name: String,
    pub system_backup: String,
}

async fn list_backups(State(m): State<Arc<Manager>>, h: HeaderMap) -> ApiResult<Vec<SystemBackup>> {
    authorize(&m, &h)?;
    Ok(Json(store::list::<SystemBackup>(&*m.store)?))
}

async fn create_backup(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    raw: axum::body::Bytes,
) -> Result<(StatusCode, Json<SystemBackup>), HttpError> {
    authorize(&m, &h)?;
    let req: CreateSystemBackup = body(&raw)?;
    let sb = blocking(&m, move |m| {
        m.create_system_backup(&req.name, req.volume_backup_policy, req.target.as_deref())
    })
    .await?;
    Ok((StatusCode::CREATED, Json(sb)))
}

async fn get_backup(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<SystemBackup> {
    get_named::<SystemBackup>(&m, &h, &name)
}

async fn delete_backup(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<SystemBackup> {
    authorize(&m, &h)?;
    check_name(&name)?;
    Ok(Json(m.delete_system_backup(&name).await?))
}

async fn list_restores(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
) -> ApiResult<Vec<SystemRestore>> {
    authorize(&m, &h)?;
    Ok(Json(store::list::<SystemRestore>(&*m.store)?))
}

async fn create_restore(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    raw: axum::body::Bytes,
) -> Result<(StatusCode, Json<SystemRestore>), HttpError> {
    authorize(&m, &h)?;
    let req: CreateSystemRestore = body(&raw)?;
    let sr = blocking(&m, move |m| {
        m.create_system_restore(&req.name, &req.system_backup)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(sr)))
}

async fn get_restore(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<SystemRestore> {
    get_named::<SystemRestore>(&m, &h, &name)
}

async fn delete_restore(
    State(m): State<Arc<Manager>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<SystemRestore> {
    authorize(&m, &h)?;
    check_name(&name)?;
    Ok(Json(
        blocking(&m, move |m| m.delete_system_restore(&name)).await?,
    ))
}
