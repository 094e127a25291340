//! The typed client of vswitchd's control API (see `docs/api.md`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use vswitch::api::{
    FdbEntryInfo, FdbEntrySpec, PortInfo, PortSpec, TenantInfo, TenantSpec, VtepSpec,
};

use crate::Error;

pub use vswitch::api::default_socket;

/// A blocking client of one vswitchd.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl AsRef<Path>) -> Client {
        Client {
            socket: socket.as_ref().to_owned(),
        }
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, Error> {
        crate::http::call(&self.socket, method, path, body)
    }

    /// All tenants.
    pub fn tenants(&self) -> Result<Vec<TenantInfo>, Error> {
        self.call("GET", "/v1/tenants", None::<&()>)
    }

    /// One tenant.
    pub fn tenant(&self, name: &str) -> Result<TenantInfo, Error> {
        self.call("GET", &format!("/v1/tenants/{name}"), None::<&()>)
    }

    /// Creates a tenant.
    pub fn create_tenant(&self, spec: &TenantSpec) -> Result<TenantInfo, Error> {
        self.call("POST", "/v1/tenants", Some(spec))
    }

    /// Deletes a tenant (it must have no ports).
    pub fn delete_tenant(&self, name: &str) -> Result<(), Error> {
        self.call("DELETE", &format!("/v1/tenants/{name}"), None::<&()>)
    }

    /// All ports.
    pub fn ports(&self) -> Result<Vec<PortInfo>, Error> {
        self.call("GET", "/v1/ports", None::<&()>)
    }

    /// One port.
    pub fn port(&self, name: &str) -> Result<PortInfo, Error> {
        self.call("GET", &format!("/v1/ports/{name}"), None::<&()>)
    }

    /// Creates a port.
    pub fn create_port(&self, spec: &PortSpec) -> Result<PortInfo, Error> {
        self.call("POST", "/v1/ports", Some(spec))
    }

    /// Deletes a port.
    pub fn delete_port(&self, name: &str) -> Result<(), Error> {
        self.call("DELETE", &format!("/v1/ports/{name}"), None::<&()>)
    }

    /// A tenant's remote VTEPs.
    pub fn vteps(&self, tenant: &str) -> Result<Vec<VtepSpec>, Error> {
        self.call("GET", &format!("/v1/tenants/{tenant}/vteps"), None::<&()>)
    }

    /// Adds a remote VTEP.
    pub fn add_vtep(&self, tenant: &str, ip: IpAddr) -> Result<(), Error> {
        let _: VtepSpec = self.call(
            "POST",
            &format!("/v1/tenants/{tenant}/vteps"),
            Some(&VtepSpec { ip }),
        )?;
        Ok(())
    }

    /// Removes a remote VTEP.
    pub fn remove_vtep(&self, tenant: &str, ip: IpAddr) -> Result<(), Error> {
        self.call(
            "DELETE",
            &format!("/v1/tenants/{tenant}/vteps/{ip}"),
            None::<&()>,
        )
    }

    /// A tenant's forwarding table.
    pub fn fdb(&self, tenant: &str) -> Result<Vec<FdbEntryInfo>, Error> {
        self.call("GET", &format!("/v1/tenants/{tenant}/fdb"), None::<&()>)
    }

    /// Adds a static forwarding entry.
    pub fn add_fdb(&self, tenant: &str, entry: &FdbEntrySpec) -> Result<(), Error> {
        let _: FdbEntrySpec =
            self.call("POST", &format!("/v1/tenants/{tenant}/fdb"), Some(entry))?;
        Ok(())
    }

    /// Removes a forwarding entry.
    pub fn remove_fdb(&self, tenant: &str, mac: &str) -> Result<(), Error> {
        self.call(
            "DELETE",
            &format!("/v1/tenants/{tenant}/fdb/{mac}"),
            None::<&()>,
        )
    }

    /// The Prometheus text of every counter.
    pub fn metrics(&self) -> Result<String, Error> {
        crate::http::text(&self.socket, "/metrics")
    }
}
