//! The control API: HTTP/1.1 + JSON on a unix socket (see `docs/api.md`).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use daemon_kit::JsonBody;
use serde::Serialize;

use super::control::{Control, ControlError};
use crate::api::{FdbEntrySpec, PortSpec, TenantSpec, VtepSpec};

/// Shared control plane.
pub type Shared = Arc<Mutex<Control>>;

/// Handlers fail with the shared envelope ([`daemon_kit::ApiError`], an axum response).
type ApiError = ControlError;

type ApiResult<T> = Result<T, ApiError>;

/// Runs a control operation off the async runtime (it waits for the datapath thread).
async fn run<T: Send + 'static>(
    shared: Shared,
    f: impl FnOnce(&mut Control) -> Result<T, ControlError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(move || {
        let mut c = shared.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut c)
    })
    .await
    .map_err(|e| ControlError::Internal(e.to_string()))?
}

fn created<T: Serialize>(v: T) -> Response {
    (StatusCode::CREATED, Json(v)).into_response()
}

fn parse_ip(s: &str) -> ApiResult<IpAddr> {
    s.parse()
        .map_err(|_| ControlError::Invalid(format!("{s:?} is not an IP address")))
}

/// The API's routes.
pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/v1/tenants", get(list_tenants).post(create_tenant))
        .route("/v1/tenants/{name}", get(show_tenant).delete(delete_tenant))
        .route("/v1/tenants/{name}/vteps", get(list_vteps).post(add_vtep))
        .route("/v1/tenants/{name}/vteps/{ip}", delete(remove_vtep))
        .route("/v1/tenants/{name}/fdb", get(list_fdb).post(add_fdb))
        .route("/v1/tenants/{name}/fdb/{mac}", delete(remove_fdb))
        .route("/v1/ports", get(list_ports).post(create_port))
        .route("/v1/ports/{name}", get(show_port).delete(delete_port))
        .route("/v1/unrestored", get(list_unrestored))
        .route("/metrics", get(metrics))
        .fallback(|| async { ControlError::NotFound("no such endpoint; see docs/api.md".into()) })
        .with_state(shared)
}

async fn list_unrestored(State(s): State<Shared>) -> ApiResult<Response> {
    Ok(Json(run(s, |c| Ok(c.unrestored())).await?).into_response())
}

async fn list_tenants(State(s): State<Shared>) -> ApiResult<Response> {
    Ok(Json(run(s, |c| c.tenants()).await?).into_response())
}

async fn create_tenant(
    State(s): State<Shared>,
    body: Result<JsonBody<TenantSpec>, daemon_kit::ApiError>,
) -> ApiResult<Response> {
    let JsonBody(spec) = body?;
    Ok(created(run(s, move |c| c.create_tenant(spec)).await?))
}

async fn show_tenant(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(Json(run(s, move |c| c.tenant(&name)).await?).into_response())
}

async fn delete_tenant(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    run(s, move |c| c.delete_tenant(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_vteps(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(Json(run(s, move |c| c.vteps(&name)).await?).into_response())
}

async fn add_vtep(
    State(s): State<Shared>,
    Path(name): Path<String>,
    body: Result<JsonBody<VtepSpec>, daemon_kit::ApiError>,
) -> ApiResult<Response> {
    let JsonBody(v) = body?;
    run(s, move |c| c.add_vtep(&name, v.ip, v.port)).await?;
    Ok(created(v))
}

async fn remove_vtep(
    State(s): State<Shared>,
    Path((name, ip)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let ip = parse_ip(&ip)?;
    run(s, move |c| c.remove_vtep(&name, ip)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_fdb(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(Json(run(s, move |c| c.fdb(&name)).await?).into_response())
}

async fn add_fdb(
    State(s): State<Shared>,
    Path(name): Path<String>,
    body: Result<JsonBody<FdbEntrySpec>, daemon_kit::ApiError>,
) -> ApiResult<Response> {
    let JsonBody(e) = body?;
    let echo = e.clone();
    run(s, move |c| c.add_fdb(&name, e)).await?;
    Ok(created(echo))
}

async fn remove_fdb(
    State(s): State<Shared>,
    Path((name, mac)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    run(s, move |c| c.remove_fdb(&name, &mac)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_ports(State(s): State<Shared>) -> ApiResult<Response> {
    Ok(Json(run(s, |c| c.ports()).await?).into_response())
}

async fn create_port(
    State(s): State<Shared>,
    body: Result<JsonBody<PortSpec>, daemon_kit::ApiError>,
) -> ApiResult<Response> {
    let JsonBody(spec) = body?;
    Ok(created(run(s, move |c| c.create_port(spec)).await?))
}

async fn show_port(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(Json(run(s, move |c| c.port(&name)).await?).into_response())
}

async fn delete_port(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    run(s, move |c| c.delete_port(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn metrics(State(s): State<Shared>) -> ApiResult<Response> {
    let text = run(s, |c| c.metrics()).await?;
    Ok((
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
