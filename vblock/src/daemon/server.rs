//! vblockd's API: HTTP/1.1 + JSON on a unix socket (see `docs/api.md`).

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use daemon_kit::JsonBody;
use daemon_kit::{ApiError, blocking};
use serde::{Deserialize, Serialize};

use super::control::{Control, PoolHandle};
use crate::api::{
    CloneSpec, DataRange, MAX_TRANSFER, PoolResizeSpec, PoolSpec, QosSpec, ResizeSpec,
    SnapshotSpec, SpaceSpec, VhostSpec, VolumeSpec,
};

/// Shared control plane.
pub type Shared = Arc<Mutex<Control>>;

type ApiResult<T> = Result<T, ApiError>;

async fn run<T: Send + 'static>(
    shared: Shared,
    f: impl FnOnce(&mut Control) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    blocking(move || f(&mut shared.lock().unwrap_or_else(|e| e.into_inner()))).await
}

/// Runs `f` on a pool without holding the control lock during its I/O.
async fn on_pool<T: Send + 'static>(
    shared: Shared,
    pool: String,
    f: impl FnOnce(&PoolHandle) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let h = run(shared, move |c| c.pool(&pool)).await?;
    blocking(move || f(&h)).await
}

fn created<T: Serialize>(v: T) -> Response {
    (StatusCode::CREATED, Json(v)).into_response()
}

fn ok<T: Serialize>(v: T) -> Response {
    Json(v).into_response()
}

/// The API's routes.
pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/v1/pools", get(list_pools).post(create_pool))
        .route("/v1/pools/{pool}", get(show_pool).delete(remove_pool))
        .route("/v1/pools/{pool}/check", post(check))
        .route("/v1/pools/{pool}/flush", post(flush))
        .route("/v1/pools/{pool}/resize", post(resize_pool))
        .route("/v1/pools/{pool}/space", put(set_space))
        .route(
            "/v1/pools/{pool}/volumes",
            get(list_volumes).post(create_volume),
        )
        .route(
            "/v1/pools/{pool}/volumes/{name}",
            get(show_volume).delete(delete_volume),
        )
        .route("/v1/pools/{pool}/volumes/{name}/resize", post(resize))
        .route("/v1/pools/{pool}/volumes/{name}/qos", put(set_qos))
        .route(
            "/v1/pools/{pool}/volumes/{name}/data",
            get(read_data)
                .put(write_data)
                .layer(DefaultBodyLimit::max(MAX_TRANSFER as usize)),
        )
        .route("/v1/pools/{pool}/volumes/{name}/zero", post(zero_data))
        .route("/v1/pools/{pool}/volumes/{name}/diff", get(diff))
        .route(
            "/v1/pools/{pool}/volumes/{name}/vhost",
            put(export).delete(unexport),
        )
        .route("/v1/vhost", get(list_exports))
        .route("/v1/pools/{pool}/snapshots", post(snapshot))
        .route("/v1/pools/{pool}/clones", post(clone_snapshot))
        .route("/v1/unrestored", get(list_unrestored))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NotFound("no such endpoint; see docs/api.md".into()) })
        .with_state(shared)
}

async fn list_unrestored(State(s): State<Shared>) -> ApiResult<Response> {
    Ok(ok(run(s, |c| Ok(c.unrestored())).await?))
}

async fn list_pools(State(s): State<Shared>) -> ApiResult<Response> {
    Ok(ok(run(s, |c| Ok(c.pools())).await?))
}

async fn create_pool(
    State(s): State<Shared>,
    body: Result<JsonBody<PoolSpec>, daemon_kit::ApiError>,
) -> ApiResult<Response> {
    let JsonBody(spec) = body?;
    Ok(created(run(s, move |c| c.create_pool(spec)).await?))
}

async fn show_pool(State(s): State<Shared>, Path(pool): Path<String>) -> ApiResult<Response> {
    let info = run(s, move |c| {
        let h = c.pool(&pool)?;
        Ok(c.pools().into_iter().find(|p| p.name == h.spec.name))
    })
    .await?;
    info.map(ok)
        .ok_or_else(|| ApiError::NotFound("pool vanished".into()))
}

async fn resize_pool(
    State(s): State<Shared>,
    Path(pool): Path<String>,
    body: Result<JsonBody<PoolResizeSpec>, daemon_kit::ApiError>,
) -> ApiResult<Response> {
    let JsonBody(r) = body?;
    Ok(ok(on_pool(s, pool, move |h| h.grow(r.size)).await?))
}

async fn set_space(
    State(s): State<Shared>,
    Path(pool): Path<String>,
    body: Result<JsonBody<SpaceSpec>, daemon_kit::ApiError>,
) -> ApiResult<Response> {
    let JsonBody(space) = body?;
    Ok(ok(run(s, move |c| c.set_pool_space(&pool, space)).await?))
}

async fn remove_pool(State(s): State<Shared>, Path(pool): Path<String>) -> ApiResult<StatusCode> {
    run(s, move |c| c.remove_pool(&pool)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST .../check` body.
#[derive(Debug, Default, Deserialize)]
struct CheckRequest {
    #[serde(default)]
    repair: bool,
}

async fn check(
    State(s): State<Shared>,
    Path(pool): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: CheckRequest = if body.is_empty() {
        CheckRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::Invalid(e.to_string()))?
    };
    Ok(ok(on_pool(s, pool, move |h| h.check(req.repair)).await?))
}

async fn flush(State(s): State<Shared>, Path(pool): Path<String>) -> ApiResult<StatusCode> {
    on_pool(s, pool, |h| h.flush()).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_volumes(State(s): State<Shared>, Path(pool): Path<String>) -> ApiResult<Response> {
    Ok(ok(on_pool(s, pool, |h| Ok(h.volumes())).await?))
}

async fn create_volume(
    State(s): State<Shared>,
    Path(pool): Path<String>,
    body: Result<JsonBody<VolumeSpec>, daemon_kit::ApiError>,
) -> ApiResult<Response> {
    let JsonBody(spec) = body?;
    Ok(created(
        on_pool(s, pool, move |h| h.create_volume(&spec)).await?,
    ))
}

async fn show_volume(
    State(s): State<Shared>,
    Path((pool, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    Ok(ok(on_pool(s, pool, move |h| h.volume(&name)).await?))
}

/// `?force=true` on a delete: end the volume's connections and exports first.
#[derive(serde::Deserialize, Default)]
struct Force {
    #[serde(default)]
    force: bool,
}

async fn delete_volume(
    State(s): State<Shared>,
    Path((pool, name)): Path<(String, String)>,
    query: Result<Query<Force>, QueryRejection>,
) -> ApiResult<StatusCode> {
    let force = query.map_err(|e| ApiError::Invalid(e.body_text()))?.0.force;
    run(s, move |c| c.delete_volume(&pool, &name, force)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn resize(
    State(s): State<Shared>,
    Path((pool, name)): Path<(String, String)>,
    body: Result<JsonBody<ResizeSpec>, daemon_kit::ApiError>,
) -> ApiResult<Response> {
    let JsonBody(r) = body?;
    Ok(ok(on_pool(s, pool, move |h| h.resize(&name, r.size)).await?))
}

async fn set_qos(
    State(s): State<Shared>,
    Path((pool, name)): Path<(String, String)>,
    body: Result<JsonBody<QosSpec>, daemon_kit::ApiError>,
) -> ApiResult<Response> {
    let JsonBody(q) = body?;
    Ok(ok(on_pool(s, pool, move |h| h.set_qos(&name, q)).await?))
}

async fn read_data(
    State(s): State<Shared>,
    Path((pool, name)): Path<(String, String)>,
    range: Result<Query<DataRange>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(range) = range?;
    let data = on_pool(s, pool, move |h| h.read(&name, range)).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

async fn write_data(
    State(s): State<Shared>,
    Path((pool, name)): Path<(String, String)>,
    range: Result<Query<DataRange>, QueryRejection>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let Query(range) = range?;
    on_pool(s, pool, move |h| h.write(&name, range.offset, &body)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn zero_data(
    State(s): State<Shared>,
    Path((pool, name)): Path<(String, String)>,
    range: Result<Query<DataRange>, QueryRejection>,
) -> ApiResult<StatusCode> {
    let Query(range) = range?;
    on_pool(s, pool, move |h| h.write_zeroes(&name, range)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `?from=` of the diff endpoint.
#[derive(Debug, Default, Deserialize)]
struct DiffQuery {
    from: Option<String>,
}

async fn diff(
    State(s): State<Shared>,
    Path((pool, name)): Path<(String, String)>,
    q: Result<Query<DiffQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q?;
    Ok(ok(on_pool(s, pool, move |h| {
        h.diff(q.from.as_deref(), &name)
    })
    .await?))
}

async fn export(
    State(s): State<Shared>,
    Path((pool, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let spec: VhostSpec = if body.is_empty() {
        VhostSpec { queues: 1 }
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::Invalid(e.to_string()))?
    };
    Ok(ok(run(s, move |c| c.export(&pool, &name, spec)).await?))
}

async fn unexport(
    State(s): State<Shared>,
    Path((_pool, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    run(s, move |c| c.unexport(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_exports(State(s): State<Shared>) -> ApiResult<Response> {
    Ok(ok(run(s, |c| Ok(c.exports())).await?))
}

async fn snapshot(
    State(s): State<Shared>,
    Path(pool): Path<String>,
    body: Result<JsonBody<SnapshotSpec>, daemon_kit::ApiError>,
) -> ApiResult<Response> {
    let JsonBody(spec) = body?;
    Ok(created(on_pool(s, pool, move |h| h.snapshot(&spec)).await?))
}

async fn clone_snapshot(
    State(s): State<Shared>,
    Path(pool): Path<String>,
    body: Result<JsonBody<CloneSpec>, daemon_kit::ApiError>,
) -> ApiResult<Response> {
    let JsonBody(spec) = body?;
    Ok(created(
        on_pool(s, pool, move |h| h.clone_snapshot(&spec)).await?,
    ))
}

async fn metrics(State(s): State<Shared>) -> ApiResult<Response> {
    let text = run(s, |c| c.metrics()).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
