//! The control API: HTTP/1.1 + JSON on a unix socket (see `docs/api.md`).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::extract::{FromRef, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use daemon_kit::JsonBody;
use serde::Serialize;

use super::control::{Control, ControlError};
use crate::api::{AddressRequest, ClusterInfo, FdbEntrySpec, PortSpec, TenantSpec, VtepSpec};
use vswitch_cluster::{Cluster, Subnet};

/// Shared control plane.
pub type Shared = Arc<Mutex<Control>>;

/// What the handlers share: the control plane and, in a cluster, the membership (whose
/// operations are async and never wait for the control plane's lock).
#[derive(Clone)]
pub struct AppState {
    control: Shared,
    cluster: Option<Cluster>,
}

impl FromRef<AppState> for Shared {
    fn from_ref(app: &AppState) -> Shared {
        app.control.clone()
    }
}

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

/// The API's routes; `cluster`: the membership, when vswitchd runs in a cluster.
pub fn router(shared: Shared, cluster: Option<Cluster>) -> Router {
    Router::new()
        .route("/v1/tenants", get(list_tenants).post(create_tenant))
        .route("/v1/tenants/{name}", get(show_tenant).delete(delete_tenant))
        .route(
            "/v1/tenants/{name}/addresses",
            get(list_addresses).post(allocate_address),
        )
        .route(
            "/v1/tenants/{name}/addresses/{owner}",
            delete(release_address),
        )
        .route("/v1/cluster", get(cluster_info))
        .route("/v1/cluster/members", get(cluster_members))
        .route("/v1/cluster/bindings", get(cluster_bindings))
        .route("/v1/tenants/{name}/vteps", get(list_vteps).post(add_vtep))
        .route("/v1/tenants/{name}/vteps/{ip}", delete(remove_vtep))
        .route("/v1/tenants/{name}/fdb", get(list_fdb).post(add_fdb))
        .route("/v1/tenants/{name}/fdb/{mac}", delete(remove_fdb))
        .route("/v1/ports", get(list_ports).post(create_port))
        .route("/v1/ports/{name}", get(show_port).delete(delete_port))
        .route("/v1/unrestored", get(list_unrestored))
        .route("/metrics", get(metrics))
        .fallback(|| async { ControlError::NotFound("no such endpoint; see docs/api.md".into()) })
        .with_state(AppState {
            control: shared,
            cluster,
        })
}

fn cluster_error(e: vswitch_cluster::Error) -> ApiError {
    use vswitch_cluster::Error as E;
    let m = e.to_string();
    match e {
        E::Invalid(_) => ControlError::Invalid(m),
        E::Conflict(_) | E::Exhausted(_) => ControlError::Conflict(m),
        E::Unavailable(_) => ControlError::Unavailable(m),
    }
}

fn member(app: &AppState) -> ApiResult<&Cluster> {
    app.cluster.as_ref().ok_or_else(|| {
        ControlError::Invalid(
            "vswitchd runs standalone: cluster operations need --cluster (use host-local IPAM \
             for addresses on one host)"
                .into(),
        )
    })
}

async fn cluster_info(State(app): State<AppState>) -> ApiResult<Response> {
    let info = match &app.cluster {
        Some(c) => c.info(),
        None => ClusterInfo {
            mode: "standalone".into(),
            ..ClusterInfo::default()
        },
    };
    Ok(Json(info).into_response())
}

async fn cluster_members(State(app): State<AppState>) -> ApiResult<Response> {
    Ok(Json(member(&app)?.members()).into_response())
}

async fn cluster_bindings(State(app): State<AppState>) -> ApiResult<Response> {
    Ok(Json(member(&app)?.bindings()).into_response())
}

/// The subnet of a tenant (for cluster IPAM).
async fn subnet_of(app: &AppState, tenant: &str) -> ApiResult<Subnet> {
    let t = tenant.to_owned();
    let spec = run(app.control.clone(), move |c| c.tenant_spec(&t)).await?;
    let subnet = spec.subnet.ok_or_else(|| {
        ControlError::Invalid(format!(
            "tenant {tenant} has no subnet to allocate addresses from"
        ))
    })?;
    Subnet::parse(&subnet).map_err(cluster_error)
}

async fn list_addresses(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let cluster = member(&app)?.clone();
    let subnet = subnet_of(&app, &name).await?;
    Ok(Json(
        cluster
            .addresses(&name, &subnet)
            .await
            .map_err(cluster_error)?,
    )
    .into_response())
}

async fn allocate_address(
    State(app): State<AppState>,
    Path(name): Path<String>,
    body: Result<JsonBody<AddressRequest>, daemon_kit::ApiError>,
) -> ApiResult<Response> {
    let JsonBody(req) = body?;
    daemon_kit::names::check_port_name(&req.owner).map_err(ControlError::Invalid)?;
    let cluster = member(&app)?.clone();
    let subnet = subnet_of(&app, &name).await?;
    let info = cluster
        .allocate(&name, &subnet, &req.owner)
        .await
        .map_err(cluster_error)?;
    Ok(created(info))
}

async fn release_address(
    State(app): State<AppState>,
    Path((name, owner)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let cluster = member(&app)?.clone();
    cluster
        .release(&name, &owner)
        .await
        .map_err(cluster_error)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_unrestored(State(s): State<Shared>) -> ApiResult<Response> {
    Ok(Json(run(s, |c| Ok(c.unrestored())).await?).into_response())
}

async fn list_tenants(State(s): State<Shared>) -> ApiResult<Response> {
    Ok(Json(run(s, |c| c.tenants()).await?).into_response())
}

async fn create_tenant(
    State(app): State<AppState>,
    body: Result<JsonBody<TenantSpec>, daemon_kit::ApiError>,
) -> ApiResult<Response> {
    let JsonBody(spec) = body?;
    let Some(cluster) = app.cluster.clone() else {
        return Ok(created(
            run(app.control, move |c| c.create_tenant(spec)).await?,
        ));
    };
    // Checked here first, so that what the cluster takes is valid on every host.
    super::control::check_tenant_spec(&spec)?;
    cluster.create_tenant(&spec).await.map_err(cluster_error)?;
    let made = run(app.control, move |c| c.create_cluster_tenant(spec)).await;
    Ok(created(made?))
}

async fn show_tenant(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(Json(run(s, move |c| c.tenant(&name)).await?).into_response())
}

async fn delete_tenant(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let Some(cluster) = app.cluster.clone() else {
        run(app.control, move |c| c.delete_tenant(&name)).await?;
        return Ok(StatusCode::NO_CONTENT);
    };
    let n = name.clone();
    let (is_cluster_tenant, has_ports) =
        run(app.control.clone(), move |c| Ok(c.tenant_place(&n))).await?;
    if has_ports {
        // Refused here first: the cluster would refuse it anyway.
        run(app.control, move |c| c.delete_tenant(&name)).await?;
        return Ok(StatusCode::NO_CONTENT);
    }
    let in_cluster = cluster.delete_tenant(&name).await.map_err(cluster_error)?;
    if !in_cluster && !is_cluster_tenant {
        run(app.control, move |c| c.delete_tenant(&name)).await?;
    } else {
        // Gone from the cluster: here now (the other hosts follow their watch).
        let _ = run(app.control, move |c| c.delete_tenant(&name)).await;
    }
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
