//! The typed clients of vswitchd's control API (see `docs/api.md`): [`AsyncClient`], and
//! [`Client`], its blocking wrapper.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use vswitch_api::{
    AddressInfo, AddressRequest, BindingInfo, ClusterInfo, FdbEntryInfo, FdbEntrySpec, MemberInfo,
    PortInfo, PortSpec, TenantInfo, TenantSpec, VtepSpec,
};

use crate::Error;
use crate::blocking::{blocking_client, blocking_methods};
use crate::http::seg;

pub use vswitch_api::default_socket;

/// An async client of one vswitchd (any tokio runtime).
#[derive(Clone, Debug)]
pub struct AsyncClient {
    socket: PathBuf,
}

impl AsyncClient {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl AsRef<Path>) -> AsyncClient {
        AsyncClient {
            socket: socket.as_ref().to_owned(),
        }
    }

    /// The daemon's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, Error> {
        crate::http::call(&self.socket, method, path, body).await
    }

    /// All tenants.
    pub async fn tenants(&self) -> Result<Vec<TenantInfo>, Error> {
        self.call("GET", "/v1/tenants", None::<&()>).await
    }

    /// One tenant.
    pub async fn tenant(&self, name: &str) -> Result<TenantInfo, Error> {
        self.call(
            "GET",
            &format!("/v1/tenants/{name}", name = seg(name)),
            None::<&()>,
        )
        .await
    }

    /// Creates a tenant.
    pub async fn create_tenant(&self, spec: &TenantSpec) -> Result<TenantInfo, Error> {
        self.call("POST", "/v1/tenants", Some(spec)).await
    }

    /// Deletes a tenant (it must have no ports).
    pub async fn delete_tenant(&self, name: &str) -> Result<(), Error> {
        self.call(
            "DELETE",
            &format!("/v1/tenants/{name}", name = seg(name)),
            None::<&()>,
        )
        .await
    }

    /// All ports.
    pub async fn ports(&self) -> Result<Vec<PortInfo>, Error> {
        self.call("GET", "/v1/ports", None::<&()>).await
    }

    /// One port.
    pub async fn port(&self, name: &str) -> Result<PortInfo, Error> {
        self.call(
            "GET",
            &format!("/v1/ports/{name}", name = seg(name)),
            None::<&()>,
        )
        .await
    }

    /// Creates a port.
    pub async fn create_port(&self, spec: &PortSpec) -> Result<PortInfo, Error> {
        self.call("POST", "/v1/ports", Some(spec)).await
    }

    /// Deletes a port.
    pub async fn delete_port(&self, name: &str) -> Result<(), Error> {
        self.call(
            "DELETE",
            &format!("/v1/ports/{name}", name = seg(name)),
            None::<&()>,
        )
        .await
    }

    /// A tenant's remote VTEPs.
    pub async fn vteps(&self, tenant: &str) -> Result<Vec<VtepSpec>, Error> {
        self.call(
            "GET",
            &format!("/v1/tenants/{tenant}/vteps", tenant = seg(tenant)),
            None::<&()>,
        )
        .await
    }

    /// Adds a remote VTEP (listening on this daemon's VXLAN port).
    pub async fn add_vtep(&self, tenant: &str, ip: IpAddr) -> Result<(), Error> {
        self.add_vtep_spec(tenant, &VtepSpec { ip, port: None })
            .await
    }

    /// Adds a remote VTEP, with the UDP port it listens on if that is not this daemon's.
    pub async fn add_vtep_spec(&self, tenant: &str, spec: &VtepSpec) -> Result<(), Error> {
        let path = format!("/v1/tenants/{tenant}/vteps", tenant = seg(tenant));
        let _: VtepSpec = self.call("POST", &path, Some(spec)).await?;
        Ok(())
    }

    /// Removes a remote VTEP.
    pub async fn remove_vtep(&self, tenant: &str, ip: IpAddr) -> Result<(), Error> {
        let path = format!(
            "/v1/tenants/{tenant}/vteps/{ip}",
            tenant = seg(tenant),
            ip = seg(ip)
        );
        self.call("DELETE", &path, None::<&()>).await
    }

    /// A tenant's forwarding table.
    pub async fn fdb(&self, tenant: &str) -> Result<Vec<FdbEntryInfo>, Error> {
        self.call(
            "GET",
            &format!("/v1/tenants/{tenant}/fdb", tenant = seg(tenant)),
            None::<&()>,
        )
        .await
    }

    /// Adds a static forwarding entry.
    pub async fn add_fdb(&self, tenant: &str, entry: &FdbEntrySpec) -> Result<(), Error> {
        let path = format!("/v1/tenants/{tenant}/fdb", tenant = seg(tenant));
        let _: FdbEntrySpec = self.call("POST", &path, Some(entry)).await?;
        Ok(())
    }

    /// Removes a forwarding entry.
    pub async fn remove_fdb(&self, tenant: &str, mac: &str) -> Result<(), Error> {
        let path = format!(
            "/v1/tenants/{tenant}/fdb/{mac}",
            tenant = seg(tenant),
            mac = seg(mac)
        );
        self.call("DELETE", &path, None::<&()>).await
    }

    /// This vswitchd's place in a cluster (`standalone`, or its state: `connected` or
    /// `degraded`).
    pub async fn cluster(&self) -> Result<ClusterInfo, Error> {
        self.call("GET", "/v1/cluster", None::<&()>).await
    }

    /// The hosts of the cluster.
    pub async fn cluster_members(&self) -> Result<Vec<MemberInfo>, Error> {
        self.call("GET", "/v1/cluster/members", None::<&()>).await
    }

    /// The bindings of the tenants this host has ports in.
    pub async fn cluster_bindings(&self) -> Result<Vec<BindingInfo>, Error> {
        self.call("GET", "/v1/cluster/bindings", None::<&()>).await
    }

    /// Takes an address from a tenant's subnet for `owner`, unique in the cluster.
    pub async fn allocate_address(&self, tenant: &str, owner: &str) -> Result<AddressInfo, Error> {
        let path = format!("/v1/tenants/{tenant}/addresses", tenant = seg(tenant));
        let req = AddressRequest {
            owner: owner.to_owned(),
        };
        self.call("POST", &path, Some(&req)).await
    }

    /// Gives back the addresses `owner` holds in a tenant.
    pub async fn release_address(&self, tenant: &str, owner: &str) -> Result<(), Error> {
        let path = format!(
            "/v1/tenants/{tenant}/addresses/{owner}",
            tenant = seg(tenant),
            owner = seg(owner)
        );
        self.call("DELETE", &path, None::<&()>).await
    }

    /// The addresses taken in a tenant.
    pub async fn addresses(&self, tenant: &str) -> Result<Vec<AddressInfo>, Error> {
        let path = format!("/v1/tenants/{tenant}/addresses", tenant = seg(tenant));
        self.call("GET", &path, None::<&()>).await
    }

    /// The Prometheus text of every counter.
    pub async fn metrics(&self) -> Result<String, Error> {
        crate::http::text(&self.socket, "/metrics").await
    }
}

blocking_client!("vswitchd");

impl Client {
    blocking_methods! {
        /// All tenants.
        fn tenants(&self) -> Vec<TenantInfo>;
        /// One tenant.
        fn tenant(&self, name: &str) -> TenantInfo;
        /// Creates a tenant.
        fn create_tenant(&self, spec: &TenantSpec) -> TenantInfo;
        /// Deletes a tenant (it must have no ports).
        fn delete_tenant(&self, name: &str) -> ();
        /// All ports.
        fn ports(&self) -> Vec<PortInfo>;
        /// One port.
        fn port(&self, name: &str) -> PortInfo;
        /// Creates a port.
        fn create_port(&self, spec: &PortSpec) -> PortInfo;
        /// Deletes a port.
        fn delete_port(&self, name: &str) -> ();
        /// A tenant's remote VTEPs.
        fn vteps(&self, tenant: &str) -> Vec<VtepSpec>;
        /// Adds a remote VTEP.
        fn add_vtep(&self, tenant: &str, ip: IpAddr) -> ();
        /// Adds a remote VTEP, with the UDP port it listens on if not this daemon's.
        fn add_vtep_spec(&self, tenant: &str, spec: &VtepSpec) -> ();
        /// Removes a remote VTEP.
        fn remove_vtep(&self, tenant: &str, ip: IpAddr) -> ();
        /// A tenant's forwarding table.
        fn fdb(&self, tenant: &str) -> Vec<FdbEntryInfo>;
        /// Adds a static forwarding entry.
        fn add_fdb(&self, tenant: &str, entry: &FdbEntrySpec) -> ();
        /// Removes a forwarding entry.
        fn remove_fdb(&self, tenant: &str, mac: &str) -> ();
        /// This vswitchd's place in a cluster.
        fn cluster(&self) -> ClusterInfo;
        /// The hosts of the cluster.
        fn cluster_members(&self) -> Vec<MemberInfo>;
        /// The bindings of the tenants this host has ports in.
        fn cluster_bindings(&self) -> Vec<BindingInfo>;
        /// Takes an address from a tenant's subnet, unique in the cluster.
        fn allocate_address(&self, tenant: &str, owner: &str) -> AddressInfo;
        /// Gives back the addresses `owner` holds in a tenant.
        fn release_address(&self, tenant: &str, owner: &str) -> ();
        /// The addresses taken in a tenant.
        fn addresses(&self, tenant: &str) -> Vec<AddressInfo>;
        /// The Prometheus text of every counter.
        fn metrics(&self) -> String;
    }
}
