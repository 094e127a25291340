//! The plugin's HTTP side: Docker's requests turned into vswitchd ports and pool addresses,
//! the state persisted after every change.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use vswitch_api::PortSpec;

use super::protocol::*;
use super::state::{Endpoint, Network, State, check_id, endpoint_mac, port_names};
use crate::net::AsyncClient;

/// The labels a plugin port carries (`docker.network`, `docker.endpoint`).
pub const LABEL_NETWORK: &str = "docker.network";
/// See [`LABEL_NETWORK`].
pub const LABEL_ENDPOINT: &str = "docker.endpoint";

/// The plugin: vswitchd's client and the persisted state.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<Inner>,
}

struct Inner {
    switch: AsyncClient,
    state: Mutex<State>,
    path: PathBuf,
    /// One change at a time (Docker may call concurrently for different containers).
    changing: tokio::sync::Mutex<()>,
}

/// A failed call: Docker reads `{"Err": "..."}` with a non-200 status, for both drivers.
#[derive(Debug)]
pub struct PluginError(String);

impl IntoResponse for PluginError {
    fn into_response(self) -> Response {
        tracing::warn!(error = %self.0, "docker request failed");
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({ "Err": self.0 })),
        )
            .into_response()
    }
}

impl From<String> for PluginError {
    fn from(s: String) -> Self {
        PluginError(s)
    }
}

type Reply = Result<Response, PluginError>;

fn ok(v: impl Serialize) -> Reply {
    Ok(axum::Json(v).into_response())
}

/// A request body: JSON, or nothing (`{}`); `null` fields are absent ones.
fn body<T: DeserializeOwned + Default>(bytes: &Bytes) -> Result<T, PluginError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| PluginError(format!("bad request: {e}")))
}

impl Plugin {
    /// A plugin over the vswitchd at `switch`, its state in `path` (loaded if it exists).
    pub fn new(switch: AsyncClient, path: PathBuf) -> std::io::Result<Plugin> {
        let state: State = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e),
        };
        Ok(Plugin {
            inner: Arc::new(Inner {
                switch,
                state: Mutex::new(state),
                path,
                changing: tokio::sync::Mutex::new(()),
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes a change of the state: on a copy, saved (atomically), and only then the state.
    /// A change that fails, or whose save fails, leaves no trace. Callers hold `changing`.
    fn change<R>(&self, f: impl FnOnce(&mut State) -> Result<R, String>) -> Result<R, PluginError> {
        let mut next = self.state().clone();
        let r = f(&mut next)?;
        let bytes = serde_json::to_vec_pretty(&next).map_err(|e| PluginError(e.to_string()))?;
        daemon_kit::save_atomic(&self.inner.path, &bytes)
            .map_err(|e| PluginError(format!("saving {}: {e}", self.inner.path.display())))?;
        *self.state() = next;
        Ok(r)
    }

    /// Deletes the ports of Docker endpoints this plugin does not know (made by a request
    /// whose answer was lost, or left while vswitchd was away): run at start.
    pub async fn reconcile(&self) -> Result<usize, crate::Error> {
        let known: std::collections::BTreeSet<String> = self
            .state()
            .endpoints
            .values()
            .map(|e| e.port.clone())
            .collect();
        let mut removed = 0;
        for port in self.inner.switch.ports().await? {
            if port.spec.labels.contains_key(LABEL_ENDPOINT) && !known.contains(&port.spec.name) {
                self.inner.switch.delete_port(&port.spec.name).await?;
                tracing::info!(port = %port.spec.name, "port of an unknown docker endpoint deleted");
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The routes Docker calls.
    pub fn router(self) -> Router {
        Router::new()
            .route("/Plugin.Activate", post(activate))
            .route("/NetworkDriver.GetCapabilities", post(capabilities))
            .route("/NetworkDriver.CreateNetwork", post(create_network))
            .route("/NetworkDriver.DeleteNetwork", post(delete_network))
            .route("/NetworkDriver.CreateEndpoint", post(create_endpoint))
            .route("/NetworkDriver.DeleteEndpoint", post(delete_endpoint))
            .route("/NetworkDriver.EndpointOperInfo", post(endpoint_info))
            .route("/NetworkDriver.Join", post(join))
            .route("/NetworkDriver.Leave", post(empty))
            .route("/NetworkDriver.ProgramExternalConnectivity", post(empty))
            .route("/NetworkDriver.RevokeExternalConnectivity", post(empty))
            .route("/NetworkDriver.DiscoverNew", post(empty))
            .route("/NetworkDriver.DiscoverDelete", post(empty))
            .route("/IpamDriver.GetCapabilities", post(ipam_capabilities))
            .route("/IpamDriver.GetDefaultAddressSpaces", post(address_spaces))
            .route("/IpamDriver.RequestPool", post(request_pool))
            .route("/IpamDriver.ReleasePool", post(release_pool))
            .route("/IpamDriver.RequestAddress", post(request_address))
            .route("/IpamDriver.ReleaseAddress", post(release_address))
            .fallback(|| async {
                (
                    StatusCode::NOT_FOUND,
                    axum::Json(json!({"Err": "not implemented"})),
                )
            })
            .with_state(self)
    }
}

async fn activate() -> Reply {
    ok(Activation {
        implements: vec!["NetworkDriver", "IpamDriver"],
    })
}

async fn capabilities() -> Reply {
    ok(Capabilities {
        scope: "local",
        connectivity_scope: "local",
    })
}

async fn empty() -> Reply {
    ok(json!({}))
}

async fn create_network(Extract(p): Extract<Plugin>, bytes: Bytes) -> Reply {
    let req: CreateNetwork = body(&bytes)?;
    check_id("network", &req.network_id)?;
    let opts = req.generic();
    let tenant = opts.get("tenant").cloned().ok_or_else(|| {
        PluginError("give the tenant: docker network create --opt tenant=NAME ...".into())
    })?;
    // The tenant must exist on this host's vswitchd (a cluster creates it everywhere).
    p.inner
        .switch
        .tenant(&tenant)
        .await
        .map_err(|e| PluginError(format!("tenant {tenant}: {e}")))?;
    let _one = p.inner.changing.lock().await;
    p.change(|st| {
        st.networks.insert(
            req.network_id.clone(),
            Network {
                tenant: tenant.clone(),
            },
        );
        Ok(())
    })?;
    tracing::info!(network = %req.network_id, tenant, "docker network created");
    ok(json!({}))
}

async fn delete_network(Extract(p): Extract<Plugin>, bytes: Bytes) -> Reply {
    let req: NetworkRef = body(&bytes)?;
    let _one = p.inner.changing.lock().await;
    if p.change(|st| Ok(st.networks.remove(&req.network_id).is_some()))? {
        tracing::info!(network = %req.network_id, "docker network deleted");
    }
    ok(json!({}))
}

async fn create_endpoint(Extract(p): Extract<Plugin>, bytes: Bytes) -> Reply {
    let req: CreateEndpoint = body(&bytes)?;
    check_id("endpoint", &req.endpoint_id)?;
    let tenant = p
        .state()
        .networks
        .get(&req.network_id)
        .map(|n| n.tenant.clone())
        .ok_or_else(|| PluginError(format!("no network {}", req.network_id)))?;
    let iface = req.interface.clone().unwrap_or_default();
    let given_mac = iface.mac_address.clone().filter(|m| !m.is_empty());
    let ips: Vec<std::net::IpAddr> = [iface.address.as_deref(), iface.address_ipv6.as_deref()]
        .into_iter()
        .flatten()
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.split('/')
                .next()
                .unwrap_or(a)
                .parse()
                .map_err(|_| PluginError(format!("address {a:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ipv4 = ips.iter().find_map(|ip| match ip {
        std::net::IpAddr::V4(v4) => Some(*v4),
        std::net::IpAddr::V6(_) => None,
    });
    let mac = given_mac
        .clone()
        .unwrap_or_else(|| endpoint_mac(&req.endpoint_id, ipv4));
    let (mut port, ifname) = port_names(&req.endpoint_id);
    // An address of the cluster's IPAM names its port (vswitchd keeps addresses whose port
    // exists).
    if let Some(owner) = ipv4.and_then(|ip| {
        p.state()
            .cluster_owner(&tenant, std::net::IpAddr::V4(ip))
            .map(str::to_owned)
    }) {
        port = owner;
    }
    let mut labels = BTreeMap::new();
    labels.insert(LABEL_NETWORK.to_owned(), req.network_id.clone());
    labels.insert(LABEL_ENDPOINT.to_owned(), req.endpoint_id.clone());
    let spec = PortSpec {
        name: port.clone(),
        tenant,
        kind: "veth".into(),
        mac: Some(mac.clone()),
        ips,
        rate_limit: Default::default(),
        netns: None,
        ifname: Some(ifname.clone()),
        labels,
    };
    let _one = p.inner.changing.lock().await;
    let reply = |mac: String| {
        // Only what Docker did not decide: the MAC, when it had none.
        ok(CreatedEndpoint {
            interface: given_mac.is_none().then(|| EndpointInterface {
                mac_address: Some(mac),
                ..EndpointInterface::default()
            }),
        })
    };
    // Asked again (Docker retries a call whose answer it did not get): the same answer.
    if let Some(ep) = p.state().endpoints.get(&req.endpoint_id).cloned() {
        return reply(ep.mac);
    }
    match p.inner.switch.create_port(&spec).await {
        Ok(_) => {}
        Err(crate::Error::Api { code, .. }) if code == "conflict" => {
            // Made by a call whose answer was lost: this endpoint's port is taken over;
            // anyone else's is not.
            let ours =
                p.inner.switch.port(&port).await.is_ok_and(|info| {
                    info.spec.labels.get(LABEL_ENDPOINT) == Some(&req.endpoint_id)
                });
            if !ours {
                return Err(PluginError(format!(
                    "port {port} exists and is not this endpoint's"
                )));
            }
        }
        Err(e) => {
            // It may exist all the same (an answer lost to a timeout): never leave it.
            let _ = p.inner.switch.delete_port(&port).await;
            return Err(PluginError(format!("port {port}: {e}")));
        }
    }
    let saved = p.change(|st| {
        st.endpoints.insert(
            req.endpoint_id.clone(),
            Endpoint {
                network: req.network_id.clone(),
                port: port.clone(),
                ifname,
                mac: mac.clone(),
            },
        );
        Ok(())
    });
    if let Err(e) = saved {
        let _ = p.inner.switch.delete_port(&port).await;
        return Err(e);
    }
    tracing::info!(endpoint = %req.endpoint_id, port, "docker endpoint created");
    reply(mac)
}

async fn delete_endpoint(Extract(p): Extract<Plugin>, bytes: Bytes) -> Reply {
    let req: EndpointRef = body(&bytes)?;
    let _one = p.inner.changing.lock().await;
    let Some(ep) = p.state().endpoints.get(&req.endpoint_id).cloned() else {
        return ok(json!({}));
    };
    match p.inner.switch.delete_port(&ep.port).await {
        Ok(()) => {}
        Err(crate::Error::Api { code, .. }) if code == "not_found" => {}
        Err(e) => return Err(PluginError(format!("port {}: {e}", ep.port))),
    }
    p.change(|st| Ok(st.endpoints.remove(&req.endpoint_id)))?;
    tracing::info!(endpoint = %req.endpoint_id, port = %ep.port, "docker endpoint deleted");
    ok(json!({}))
}

async fn endpoint_info(Extract(p): Extract<Plugin>, bytes: Bytes) -> Reply {
    let req: EndpointRef = body(&bytes)?;
    let value = p
        .state()
        .endpoints
        .get(&req.endpoint_id)
        .map(|e| json!({"port": e.port, "mac": e.mac}))
        .unwrap_or_else(|| json!({}));
    ok(json!({ "Value": value }))
}

async fn join(Extract(p): Extract<Plugin>, bytes: Bytes) -> Reply {
    let req: EndpointRef = body(&bytes)?;
    let ifname = p
        .state()
        .endpoints
        .get(&req.endpoint_id)
        .map(|e| e.ifname.clone())
        .ok_or_else(|| PluginError(format!("no endpoint {}", req.endpoint_id)))?;
    ok(Joined {
        interface_name: InterfaceName {
            src_name: ifname,
            dst_prefix: "eth",
        },
        disable_gateway_service: true,
    })
}

async fn ipam_capabilities() -> Reply {
    ok(json!({"RequiresMACAddress": false, "RequiresRequestReplay": false}))
}

async fn address_spaces() -> Reply {
    ok(AddressSpaces {
        local_default_address_space: "libvirtual-local",
        global_default_address_space: "libvirtual-global",
    })
}

/// A random port name for a cluster address's owner (`dk` + 12 hex digits, as endpoint
/// ports are named).
fn owner_token() -> String {
    use std::hash::BuildHasher;
    let n = std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now());
    format!("dk{:012x}", n & 0xffff_ffff_ffff)
}

async fn request_pool(Extract(p): Extract<Plugin>, bytes: Bytes) -> Reply {
    let req: RequestPool = body(&bytes)?;
    // `--ipam-opt tenant=NAME` with vswitchd in a cluster: the tenant's cluster IPAM, unique
    // across hosts, from the tenant's subnet.
    if let Some(tenant) = req
        .options
        .as_ref()
        .and_then(|o| o.get("tenant"))
        .and_then(Value::as_str)
    {
        let info = p
            .inner
            .switch
            .cluster()
            .await
            .map_err(|e| PluginError(format!("vswitchd: {e}")))?;
        if info.mode == "cluster" {
            let t = p
                .inner
                .switch
                .tenant(tenant)
                .await
                .map_err(|e| PluginError(format!("tenant {tenant}: {e}")))?;
            let subnet = t.subnet.ok_or_else(|| {
                PluginError(format!("tenant {tenant} has no subnet for cluster IPAM"))
            })?;
            if let Some(asked) = req.pool.as_deref().filter(|s| !s.is_empty())
                && asked != subnet
            {
                return Err(PluginError(format!(
                    "--subnet {asked}: tenant {tenant}'s subnet is {subnet}"
                )));
            }
            let _one = p.inner.changing.lock().await;
            let id = p.change(|st| {
                let id = st.add_pool(&subnet, None)?;
                if let Some(pool) = st.pools.get_mut(&id) {
                    pool.cluster_tenant = Some(tenant.to_owned());
                }
                Ok(id)
            })?;
            return ok(PoolGranted {
                pool_id: id,
                pool: subnet,
                data: BTreeMap::new(),
            });
        }
    }
    let pool = req.pool.clone().filter(|s| !s.is_empty()).ok_or_else(|| {
        PluginError(
            "libvirtual's IPAM hands out addresses of the subnet given: docker network create \
             --subnet CIDR [--ip-range CIDR] ..."
                .into(),
        )
    })?;
    let _one = p.inner.changing.lock().await;
    let id = p.change(|st| st.add_pool(&pool, req.sub_pool.as_deref()))?;
    ok(PoolGranted {
        pool_id: id,
        pool,
        data: BTreeMap::new(),
    })
}

async fn release_pool(Extract(p): Extract<Plugin>, bytes: Bytes) -> Reply {
    let req: ReleasePool = body(&bytes)?;
    let _one = p.inner.changing.lock().await;
    p.change(|st| Ok(st.pools.remove(&req.pool_id)))?;
    ok(json!({}))
}

async fn request_address(Extract(p): Extract<Plugin>, bytes: Bytes) -> Reply {
    let req: AddressRequest = body(&bytes)?;
    let _one = p.inner.changing.lock().await;
    let cluster = p
        .state()
        .pools
        .get(&req.pool_id)
        .and_then(|pool| Some((pool.cluster_tenant.clone()?, pool.pool)));
    if let Some((tenant, net)) = cluster {
        if req.is_gateway() {
            // The subnet's first host address: kept free by cluster IPAM for the gateway.
            let gw = net
                .hosts()
                .next()
                .ok_or_else(|| PluginError(format!("{net} has no host")))?;
            return ok(AddressGranted {
                address: format!("{gw}/{}", net.prefix_len()),
                data: BTreeMap::new(),
            });
        }
        if req.address.as_deref().is_some_and(|a| !a.is_empty()) {
            return Err(PluginError(
                "cluster IPAM chooses the address (no --ip on a cluster network)".into(),
            ));
        }
        let owner = owner_token();
        let a = p
            .inner
            .switch
            .allocate_address(&tenant, &owner)
            .await
            .map_err(|e| PluginError(format!("cluster IPAM of tenant {tenant}: {e}")))?;
        let saved = p.change(|st| {
            if let Some(pool) = st.pools.get_mut(&req.pool_id) {
                pool.owners.insert(a.ip, owner.clone());
            }
            Ok(())
        });
        if let Err(e) = saved {
            let _ = p.inner.switch.release_address(&tenant, &owner).await;
            return Err(e);
        }
        return ok(AddressGranted {
            address: format!("{}/{}", a.ip, a.prefix_len),
            data: BTreeMap::new(),
        });
    }
    let address =
        p.change(|st| st.take_address(&req.pool_id, req.address.as_deref(), req.is_gateway()))?;
    ok(AddressGranted {
        address,
        data: BTreeMap::new(),
    })
}

async fn release_address(Extract(p): Extract<Plugin>, bytes: Bytes) -> Reply {
    let req: AddressRequest = body(&bytes)?;
    let _one = p.inner.changing.lock().await;
    let ip: Option<std::net::IpAddr> = req
        .address
        .as_deref()
        .and_then(|a| a.split('/').next()?.parse().ok());
    let cluster = p
        .state()
        .pools
        .get(&req.pool_id)
        .and_then(|pool| Some((pool.cluster_tenant.clone()?, pool.owners.get(&ip?)?.clone())));
    if let (Some((tenant, owner)), Some(ip)) = (cluster, ip) {
        match p.inner.switch.release_address(&tenant, &owner).await {
            Ok(()) => {}
            Err(crate::Error::Api { code, .. }) if code == "not_found" => {}
            Err(e) => return Err(PluginError(format!("releasing {ip}: {e}"))),
        }
        p.change(|st| {
            if let Some(pool) = st.pools.get_mut(&req.pool_id) {
                pool.owners.remove(&ip);
            }
            Ok(())
        })?;
        return ok(json!({}));
    }
    if let Some(a) = req.address.as_deref() {
        p.change(|st| {
            st.release_address(&req.pool_id, a);
            Ok(())
        })?;
    }
    ok(json!({}))
}
