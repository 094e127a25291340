//! `vswitch-cni`: the CNI plugin (spec 1.1.0) that attaches containers to vswitchd tenants.
//!
//! ADD asks vswitchd for a TAP port on the configured tenant, moved into the container's
//! namespace as `CNI_IFNAME`; the plugin then gives the interface its MAC, the MTU (by
//! default the tenant's: the underlay's minus the VXLAN overhead), the addresses and routes
//! of the IPAM plugin it delegates to, and brings it up. The port is pinned to that MAC and
//! those addresses (port security) unless `"portSecurity": false`. Every port carries the
//! labels `cni.network`, `cni.container` and `cni.ifname`, which DEL, CHECK and GC go by.
//! See `docs/cni.md`.

pub mod ipam;
pub mod plugin;
pub mod sandbox;
pub mod spec;

pub use plugin::run;
pub use spec::{CniError, CniResult, Command, Env, NetConf, SUPPORTED_VERSIONS};
