//! `vswitch-cluster`: many vswitchd hosts, one control plane, kept in etcd.
//!
//! * [`keys`]: the key layout and the records under it (JSON).
//! * [`view`]: what one host knows of the cluster and, from it, what each tenant gets
//!   programmed: flood list and VTEP allow-list, static remote MACs, ARP answers
//!   (sans-IO).
//! * [`ipam`]: address choice in a tenant's subnet (sans-IO).
//! * [`cache`]: the rebuildable local cache of the view (an `rkyv` archive).
//! * [`client`]: the etcd shell: the host's lease, its records, the watch, resync after
//!   etcd comes back, and cluster-wide transactions (tenants, addresses).

pub mod cache;
pub mod client;
pub mod ipam;
pub mod keys;
pub mod view;

pub use client::{Cluster, ClusterConfig, TlsFiles};
pub use ipam::Subnet;
pub use keys::{AddressRecord, BindingRecord, HostRecord, Keys};
pub use view::{Change, ClusterView, TenantProgram, Touched};

/// What a cluster operation fails with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad request or configuration.
    #[error("{0}")]
    Invalid(String),
    /// It conflicts with what the cluster holds.
    #[error("{0}")]
    Conflict(String),
    /// Nothing left to allocate.
    #[error("{0}")]
    Exhausted(String),
    /// etcd does not answer: the host is degraded.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
}
