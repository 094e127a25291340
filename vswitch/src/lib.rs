//! `vswitch`: libvirtual's userspace virtual switch.
//!
//! The sans-IO forwarding core, and the I/O around it:
//!
//! * [`datapath`]: the epoll worker threads (one per core by default) that move frames between
//!   [`tap`] ports and the VXLAN [`uplink`], run to completion in bursts.
//! * [`placement`]: moving a port's interface into a container's namespace (rtnetlink).
//! * [`api`]: the control API's request/response types; `daemon` (feature `daemon`, on by
//!   default) is vswitchd's config, control logic, persisted state and HTTP server.
//!
//! The core:
//!
//! * [`Switch`]: the registry of tenants and ports; a frame's tenant is fixed at ingress.
//! * [`TenantSwitch`]: one tenant's L2 domain: ingress checks (port security, rate limit,
//!   MTU), MAC learning, the forwarding decision ([`Verdict`]) and counters. Tenants share
//!   nothing, so a datapath can lock or shard them independently.
//! * [`TokenBucket`]: per-port policing in bits/s and packets/s.
//! * [`PortCounters`] / [`TenantCounters`]: packets, bytes and drops by [`DropReason`].
//!
//! Time is passed in as nanoseconds of a monotonic clock the caller owns ([`Nanos`]).

/// vswitchd's API types (the `vswitch-api` crate).
pub use vswitch_api as api;
mod counters;
#[cfg(feature = "daemon")]
pub mod daemon;
pub mod datapath;
mod error;
pub mod placement;
mod port;
mod ratelimit;
mod switch;
pub mod tap;
mod tenant;
pub mod uplink;
pub mod vhost_net;
mod xdp;

pub use counters::{DropReason, Drops, PortCounters, TenantCounters};
pub use error::Error;
pub use port::{PortConfig, PortSecurity};
pub use ratelimit::{RateLimit, TokenBucket};
pub use switch::Switch;
pub use tenant::{Ingress, TenantConfig, TenantSwitch, Verdict};

/// A point in time: nanoseconds on a monotonic clock chosen by the caller.
pub type Nanos = u64;

/// Re-export of the overlay core the switch is built on.
pub use overlay_net;
