//! `vswitch-docker`: a Docker network plugin (libnetwork's remote network driver and remote
//! IPAM driver protocols, JSON over a unix socket in `/run/docker/plugins/`) that backs
//! Docker networks with vswitchd tenants. See `docs/containers.md`.
//!
//! * [`protocol`]: the messages, as Docker 20.10 sends and reads them.
//! * [`state`]: networks, endpoints and address pools (pure; persisted by the plugin).
//! * [`plugin`]: the handlers: an endpoint is a veth port of the tenant pinned to its MAC
//!   and address, its other end left for Docker to move into the container.

pub mod plugin;
pub mod protocol;
pub mod state;

pub use plugin::Plugin;
