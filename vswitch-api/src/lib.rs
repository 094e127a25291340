//! Request and response types of vswitchd's control API (HTTP/1.1 + JSON on a unix socket,
//! documented in `docs/api.md`), shared by the server and its clients.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use daemon_kit::default_run_dir;

/// The default API socket of vswitchd: `vswitchd.sock` in [`default_run_dir`].
pub fn default_socket() -> PathBuf {
    default_run_dir().join("vswitchd.sock")
}

/// A tenant to create (`POST /v1/tenants`), and as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantSpec {
    /// Unique name.
    pub name: String,
    /// VXLAN network identifier (0..=16777215), unique.
    pub vni: u32,
    /// Tenant MTU; 0 or absent: the largest the underlays of its VTEPs' families carry
    /// (underlay − 50 for IPv4, − 70 for IPv6), following its VTEPs.
    #[serde(default)]
    pub mtu: u16,
    /// Most MAC addresses the tenant may have learned (default 8192).
    #[serde(default)]
    pub max_macs: Option<usize>,
    /// Accept VXLAN from any underlay host and learn remote MACs behind it (flood-and-learn).
    /// Default false: only the tenant's VTEPs are heard; frames from any other host are
    /// dropped and counted as `unknown_vtep`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub learn_vteps: bool,
    /// The tenant's IP subnet (`"10.0.0.0/24"`), for cluster IPAM: addresses are allocated
    /// from it, unique across hosts; its first host address is kept for the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
}

/// A rate limit; absent fields are unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitSpec {
    /// Bits per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits_per_sec: Option<u64>,
    /// Packets per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets_per_sec: Option<u64>,
}

/// A port to create (`POST /v1/ports`), and as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// Unique name; for TAP ports, the interface name (1-15 characters).
    pub name: String,
    /// The tenant it belongs to.
    pub tenant: String,
    /// Port kind: `"tap"` (a TAP interface, for containers and the host), `"veth"` (a veth
    /// pair: the switch keeps the end named like the port, the other goes into `netns`) or
    /// `"vhost-user-net"` (a VM's virtio-net over `RUN_DIR/vhost/<name>.sock`).
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Port security: the only source MAC allowed (`"02:00:00:00:00:01"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Port security: the source IPs allowed (needs `mac`); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
    /// Ingress policing.
    #[serde(default)]
    pub rate_limit: RateLimitSpec,
    /// The network namespace the interface is moved into (`/run/netns/NAME`,
    /// `/proc/PID/ns/net`); absent: it stays in the switch's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// The interface's name inside `netns` (default: the port name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// Free-form key/value labels kept with the port, for the software that made it (the
    /// CNI plugin records its network, container and interface here).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn default_kind() -> String {
    "tap".into()
}

/// A remote VTEP of a tenant (`POST /v1/tenants/{name}/vteps`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VtepSpec {
    /// The remote VTEP's underlay address.
    pub ip: IpAddr,
    /// The UDP port it listens on, if not this daemon's VXLAN port (`--udp-port`): peers on
    /// 4789 and on 8472 (Linux's old default, flannel's) from one daemon, as the kernel's
    /// `bridge fdb ... port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// A static forwarding entry (`POST /v1/tenants/{name}/fdb`): exactly one of `port`, `vtep`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdbEntrySpec {
    /// The MAC address.
    pub mac: String,
    /// A local port of the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// A remote VTEP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep: Option<IpAddr>,
}

/// Packet, byte and drop counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersInfo {
    /// Frames received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Drops by reason (only reasons with drops).
    pub drops: BTreeMap<String, u64>,
}

/// A tenant as reported (`GET /v1/tenants[/{name}]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantInfo {
    /// Name.
    pub name: String,
    /// VNI.
    pub vni: u32,
    /// Effective MTU.
    pub mtu: u16,
    /// MAC limit.
    pub max_macs: usize,
    /// Names of its ports.
    pub ports: Vec<String>,
    /// Its remote VTEPs.
    pub vteps: Vec<IpAddr>,
    /// Learned MACs.
    pub learned_macs: usize,
    /// Frames flooded.
    pub flooded: u64,
    /// Frames forwarded to a known destination.
    pub unicast: u64,
    /// Whether it hears VXLAN from any underlay host (flood-and-learn) rather than only from
    /// its VTEPs.
    #[serde(default)]
    pub learn_vteps: bool,
    /// Source MACs not learned because the table was full (frames to them flood).
    #[serde(default)]
    pub learn_limit_hits: u64,
    /// Learned MACs that moved to another port or VTEP.
    #[serde(default)]
    pub mac_moves: u64,
    /// Counters (rx: frames that entered the tenant).
    pub counters: CountersInfo,
    /// Its subnet for cluster IPAM, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
}

/// A port as reported (`GET /v1/ports[/{name}]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortInfo {
    /// Its configuration.
    #[serde(flatten)]
    pub spec: PortSpec,
    /// Why it is not working: it could not be restored at start (its network namespace is
    /// gone, say); it is retried, and this goes away once it is back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its counters.
    pub counters: CountersInfo,
    /// The datapath worker thread that reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<usize>,
    /// The tenant's MTU, the largest IP packet the port carries. A VMM gives it to its
    /// guest (QEMU: `-device virtio-net-pci,host_mtu=MTU`): vhost-user leaves the device's
    /// configuration space to the VMM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// A vhost-user-net port's queue pairs (one per datapath worker, as many as the guest
    /// uses).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queue_pairs: Vec<QueuePairInfo>,
    /// A vhost-user-net port's socket, for the VMM (`RUN_DIR/vhost/<port>.sock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// A TAP or veth port's interface: `present`, or `gone` when it vanished without the
    /// port being deleted (its container's network namespace was removed without a CNI
    /// DEL). A gone port forwards nothing; delete it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<PortLink>,
}

/// Whether a port's kernel interface exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortLink {
    /// The interface exists.
    Present,
    /// The interface vanished (with its network namespace); the port is stale.
    Gone,
}

/// One queue pair of a vhost-user-net port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePairInfo {
    /// The datapath worker that takes the guest's frames off the pair's transmit queue.
    pub worker: usize,
    /// Frames the guest sent on the pair.
    pub from_guest: u64,
    /// Frames put on the pair's receive queue.
    pub to_guest: u64,
}

/// A forwarding entry as reported (`GET /v1/tenants/{name}/fdb`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdbEntryInfo {
    /// MAC address.
    pub mac: String,
    /// Local port, if it lives here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// Remote VTEP, if it lives there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep: Option<IpAddr>,
    /// Configured rather than learned.
    #[serde(rename = "static")]
    pub is_static: bool,
}

/// The body of every error response, and what a daemon could not restore at start
/// (`GET /v1/unrestored`): shared by both daemons and their clients.
pub use daemon_kit::{ErrorBody, ErrorResponse, Unrestored};

/// This vswitchd's place in a cluster (`GET /v1/cluster`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// `"standalone"` (no etcd) or `"cluster"`.
    pub mode: String,
    /// This host's name in the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `"connected"`, or `"degraded"`: etcd does not answer; the datapath forwards with what
    /// it last knew, and changes elsewhere are not seen until etcd is back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The etcd endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// The key prefix in etcd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The lease TTL of this host's records, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ttl_secs: Option<u64>,
    /// The etcd revision this host's view is at.
    #[serde(default)]
    pub revision: i64,
    /// Seconds since the state last changed (connected or degraded).
    #[serde(default)]
    pub state_age_secs: u64,
    /// Why it is degraded (the last error talking to etcd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Times this host (re)synchronised with etcd (connected, published, loaded).
    #[serde(default)]
    pub syncs: u64,
    /// The revision of the view last written to the local cache (`STATE_DIR/
    /// cluster-view.cache`), which a restart forwards with until etcd answers.
    #[serde(default)]
    pub cached_revision: i64,
    /// Records in etcd that were not understood and were skipped.
    #[serde(default)]
    pub invalid_records: u64,
}

/// A host of the cluster (`GET /v1/cluster/members`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Its name.
    pub name: String,
    /// Its underlay addresses.
    pub underlay: Vec<IpAddr>,
    /// Its VXLAN UDP port.
    pub udp_port: u16,
    /// Whether it is this host.
    #[serde(default)]
    pub local: bool,
}

/// A port of some host, as the cluster knows it (`GET /v1/cluster/bindings`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingInfo {
    /// Its tenant.
    pub tenant: String,
    /// The host it is on.
    pub host: String,
    /// Its port name on that host.
    pub port: String,
    /// Its MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Its addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
}

/// An address to take from a tenant's subnet (`POST /v1/tenants/{name}/addresses`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressRequest {
    /// Who holds it: the port that will use it (the same owner asking again gets the same
    /// address).
    pub owner: String,
}

/// An address taken from a tenant's subnet, unique in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressInfo {
    /// The address.
    pub ip: IpAddr,
    /// The subnet's prefix length.
    pub prefix_len: u8,
    /// The subnet's gateway address (its first host address, never allocated).
    pub gateway: IpAddr,
    /// The host that took it.
    pub host: String,
    /// Its holder.
    pub owner: String,
}
