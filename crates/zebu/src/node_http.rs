//! A node's HTTP server: `/metrics`, and its backing-image copies for peers and the manager
//! (`GET /v1/copies/{name}-{uid}` with single open ranges, `PUT` of an upload). Every route
//! takes the API's bearer token.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use anyhow::Result;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use zebu_manager::model::CopyRef;
use zebu_node::NodeAgent;

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"code": code, "message": message}).to_string();
    (status, [("content-type", "application/json")], body).into_response()
}

fn authorized(h: &HeaderMap, token: &str) -> bool {
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| zebu_manager::controller::constant_time_eq(t.as_bytes(), token.as_bytes()))
}

fn unauthorized() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "missing or wrong bearer token",
    )
}

/// `bytes=N-` → N; anything else is not served as a range.
fn range_start(h: &HeaderMap) -> Option<u64> {
    let v = h.get("range")?.to_str().ok()?.strip_prefix("bytes=")?;
    let (from, to) = v.split_once('-')?;
    if !to.is_empty() {
        return None;
    }
    from.parse().ok()
}

fn split_id(id: &str) -> Option<(String, String)> {
    let (n, u) = id.rsplit_once('-')?;
    Some((n.to_string(), u.to_string()))
}

/// A ready copy's bytes from `start`, read in 1 MiB pieces off the async workers.
fn file_stream(
    path: std::path::PathBuf,
    start: u64,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    futures_util::stream::unfold(Some((path, start)), |st| async move {
        let (path, off) = st?;
        let p = path.clone();
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut f = std::fs::File::open(&p)?;
            f.seek(SeekFrom::Start(off))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0;
            while n < buf.len() {
                let k = f.read(&mut buf[n..])?;
                if k == 0 {
                    break;
                }
                n += k;
            }
            buf.truncate(n);
            Ok(buf)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match read {
            Ok(b) if b.is_empty() => None,
            Ok(b) => {
                let next = off + b.len() as u64;
                Some((Ok(Bytes::from(b)), Some((path, next))))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

async fn get_copy(agent: Arc<NodeAgent>, id: String, h: HeaderMap) -> Response {
    let Some((name, uid)) = split_id(&id) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidName",
            "copy id is NAME-UID",
        );
    };
    let Some((path, size, checksum)) = agent.copies().ready_path(&name, &uid) else {
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no ready copy of backing image {name:?} on this node"),
        );
    };
    let start = range_start(&h).unwrap_or(0);
    if start > size {
        return (
            StatusCode::RANGE_NOT_SATISFIABLE,
            [("content-range", format!("bytes */{size}"))],
        )
            .into_response();
    }
    let body = Body::from_stream(file_stream(path, start));
    let mut resp = Response::new(body);
    let hs = resp.headers_mut();
    let put = |hs: &mut HeaderMap, k: &'static str, v: String| {
        if let Ok(v) = v.parse() {
            hs.insert(k, v);
        }
    };
    put(hs, "content-length", (size - start).to_string());
    put(hs, "accept-ranges", "bytes".into());
    put(hs, "x-zebu-checksum", checksum);
    put(hs, "content-type", "application/octet-stream".into());
    if range_start(&h).is_some() {
        put(
            hs,
            "content-range",
            format!("bytes {start}-{}/{size}", size.saturating_sub(1)),
        );
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    resp
}

#[derive(serde::Deserialize)]
struct UploadQuery {
    #[serde(default)]
    checksum: String,
    #[serde(default)]
    size: u64,
}

async fn put_copy(agent: Arc<NodeAgent>, id: String, q: UploadQuery, body: Body) -> Response {
    let Some((name, uid)) = split_id(&id) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidName",
            "copy id is NAME-UID",
        );
    };
    let copy = CopyRef {
        name,
        uid,
        checksum: q.checksum,
        size: q.size,
    };
    let mut up = match agent.copies().begin_upload(copy) {
        Ok(u) => u,
        Err(e) => return error(StatusCode::CONFLICT, "Conflict", &e),
    };
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    loop {
        let next = stream.next().await;
        let end = next.is_none();
        match next {
            Some(Ok(b)) => buf.extend_from_slice(&b),
            Some(Err(e)) => {
                // Dropping the upload removes what arrived.
                return error(
                    StatusCode::BAD_REQUEST,
                    "UploadInterrupted",
                    &format!("the upload was cut: {e}"),
                );
            }
            None => {}
        }
        if buf.len() >= 1 << 20 || (end && !buf.is_empty()) {
            let data = std::mem::take(&mut buf);
            let res =
                tokio::task::spawn_blocking(move || up.write(&data).map(|()| (up, data))).await;
            match res {
                Ok(Ok((u, data))) => {
                    up = u;
                    buf = data;
                    buf.clear();
                }
                Ok(Err(e)) => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "Io",
                        &format!("writing the copy: {e}"),
                    );
                }
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "Io", &e.to_string()),
            }
        }
        if end {
            break;
        }
    }
    match up.finish().await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, "CopyFailed", &e),
    }
}

/// Serves the node's routes on `l`; returns the address it listens on.
pub async fn serve(
    agent: Arc<NodeAgent>,
    token: String,
    l: tokio::net::TcpListener,
) -> Result<String> {
    let addr = l.local_addr()?.to_string();
    let (a1, t1) = (agent.clone(), token.clone());
    let (a2, t2) = (agent.clone(), token.clone());
    let (a3, t3) = (agent, token);
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move |h: HeaderMap| {
                let (agent, token) = (a1.clone(), t1.clone());
                async move {
                    if !authorized(&h, &token) {
                        return unauthorized();
                    }
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        agent.metrics_text(),
                    )
                        .into_response()
                }
            }),
        )
        .route(
            "/v1/copies/{id}",
            axum::routing::get(move |Path(id): Path<String>, h: HeaderMap| {
                let (agent, token) = (a2.clone(), t2.clone());
                async move {
                    if !authorized(&h, &token) {
                        return unauthorized();
                    }
                    get_copy(agent, id, h).await
                }
            })
            .put(
                move |Path(id): Path<String>,
                      Query(q): Query<UploadQuery>,
                      h: HeaderMap,
                      body: Body| {
                    let (agent, token) = (a3.clone(), t3.clone());
                    async move {
                        if !authorized(&h, &token) {
                            return unauthorized();
                        }
                        put_copy(agent, id, q, body).await
                    }
                },
            ),
        )
        // Uploads are streamed: no body limit.
        .layer(axum::extract::DefaultBodyLimit::disable());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(l, app).await {
            tracing::error!(error = %e, "node HTTP server failed");
        }
    });
    Ok(addr)
}

/// The address peers reach `bound` at: an unspecified bind address is replaced by `host`.
pub fn reachable(bound: std::net::SocketAddr, host: &str) -> String {
    if bound.ip().is_unspecified() {
        format!("{host}:{}", bound.port())
    } else {
        bound.to_string()
    }
}
