//! The messages of Docker's plugin protocol for remote network and IPAM drivers
//! (libnetwork's `drivers/remote/api` and `ipams/remote/api`, as Docker 20.10 speaks them):
//! `POST /<Interface>.<Method>` with a JSON body (possibly empty, any field possibly
//! `null`), a JSON answer. Field names are Go's (PascalCase).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /Plugin.Activate`'s answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Activation {
    /// The interfaces the plugin implements.
    pub implements: Vec<&'static str>,
}

/// `NetworkDriver.GetCapabilities`' answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Capabilities {
    /// `local`: networks belong to one host (no swarm).
    pub scope: &'static str,
    /// `local` too.
    pub connectivity_scope: &'static str,
}

/// One address pool of a network (`IPv4Data` / `IPv6Data`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct IpamData {
    /// The IPAM driver's address space.
    pub address_space: Option<String>,
    /// The pool (CIDR).
    pub pool: Option<String>,
    /// The gateway (CIDR).
    pub gateway: Option<String>,
}

/// `NetworkDriver.CreateNetwork`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CreateNetwork {
    /// Docker's network ID.
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    /// Options; `--opt k=v` arrive under `com.docker.network.generic`.
    pub options: Option<BTreeMap<String, Value>>,
    /// IPv4 pools.
    #[serde(rename = "IPv4Data")]
    pub ipv4_data: Option<Vec<IpamData>>,
    /// IPv6 pools.
    #[serde(rename = "IPv6Data")]
    pub ipv6_data: Option<Vec<IpamData>>,
}

impl CreateNetwork {
    /// The `--opt` options of `docker network create`.
    pub fn generic(&self) -> BTreeMap<String, String> {
        self.options
            .as_ref()
            .and_then(|o| o.get("com.docker.network.generic"))
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A request naming a network (`DeleteNetwork`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct NetworkRef {
    /// Docker's network ID.
    #[serde(rename = "NetworkID")]
    pub network_id: String,
}

/// An endpoint's interface as Docker describes it.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct EndpointInterface {
    /// IPv4 address (CIDR), from IPAM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// IPv6 address (CIDR).
    #[serde(rename = "AddressIPv6", skip_serializing_if = "Option::is_none")]
    pub address_ipv6: Option<String>,
    /// MAC address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
}

/// `NetworkDriver.CreateEndpoint`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CreateEndpoint {
    /// Docker's network ID.
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    /// Docker's endpoint ID.
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    /// The interface Docker has decided so far.
    pub interface: Option<EndpointInterface>,
}

/// `NetworkDriver.CreateEndpoint`'s answer: only what the driver decides (never a field the
/// request had).
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreatedEndpoint {
    /// The interface's MAC, when Docker had none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<EndpointInterface>,
}

/// A request naming an endpoint (`DeleteEndpoint`, `Leave`, `EndpointOperInfo`...).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct EndpointRef {
    /// Docker's network ID.
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    /// Docker's endpoint ID.
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
}

/// The interface Docker moves into the container at `Join`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct InterfaceName {
    /// The name of the interface in the host's namespace.
    pub src_name: String,
    /// The prefix of its name in the container (`eth` → `eth0`, `eth1`, ...).
    pub dst_prefix: &'static str,
}

/// `NetworkDriver.Join`'s answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Joined {
    /// The interface to move into the container.
    pub interface_name: InterfaceName,
    /// No `docker_gwbridge`: a tenant network reaches only its tenant.
    pub disable_gateway_service: bool,
}

/// `IpamDriver.GetDefaultAddressSpaces`' answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddressSpaces {
    /// For local networks.
    pub local_default_address_space: &'static str,
    /// For global networks.
    pub global_default_address_space: &'static str,
}

/// `IpamDriver.RequestPool`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RequestPool {
    /// The address space.
    pub address_space: Option<String>,
    /// The pool (`--subnet`), CIDR.
    pub pool: Option<String>,
    /// The part addresses come from (`--ip-range`), CIDR.
    pub sub_pool: Option<String>,
    /// IPv6.
    #[serde(rename = "V6")]
    pub v6: bool,
    /// `--ipam-opt k=v`.
    pub options: Option<BTreeMap<String, Value>>,
}

/// `IpamDriver.RequestPool`'s answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct PoolGranted {
    /// The pool's ID.
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    /// The pool, CIDR.
    pub pool: String,
    /// Nothing more.
    pub data: BTreeMap<String, String>,
}

/// `IpamDriver.ReleasePool`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ReleasePool {
    /// The pool's ID.
    #[serde(rename = "PoolID")]
    pub pool_id: String,
}

/// `IpamDriver.RequestAddress` and `ReleaseAddress`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AddressRequest {
    /// The pool's ID.
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    /// A specific address (`--ip`, `--gateway`), or empty.
    pub address: Option<String>,
    /// `RequestAddressType: com.docker.network.gateway` for the gateway.
    pub options: Option<BTreeMap<String, Value>>,
}

impl AddressRequest {
    /// Whether Docker asks for the network's gateway address.
    pub fn is_gateway(&self) -> bool {
        self.options
            .as_ref()
            .and_then(|o| o.get("RequestAddressType"))
            .and_then(Value::as_str)
            == Some("com.docker.network.gateway")
    }
}

/// `IpamDriver.RequestAddress`' answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddressGranted {
    /// The address with the pool's prefix length.
    pub address: String,
    /// Nothing more.
    pub data: BTreeMap<String, String>,
}
