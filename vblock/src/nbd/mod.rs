//! Volumes over NBD (the Network Block Device protocol), for everything that speaks block
//! but is not a VM: `qemu-img`, `qemu-io`, `nbdcopy`, fio's `nbd` engine, backup tools, the
//! kernel's nbd client.
//!
//! * [`proto`]: the wire format (fixed newstyle negotiation, simple and structured replies,
//!   `base:allocation` block status), sans-IO.
//! * [`server`]: the server: a unix socket (and TCP with an allow-list, when configured),
//!   bounded connections with a handshake deadline, pipelined requests executed in batches
//!   on the pool's engine.
//! * [`tls`]: STARTTLS with X.509 certificates (rustls), optionally requiring client
//!   certificates.
//!
//! One export per volume (its name); snapshots are exported read-only.

pub mod proto;
pub mod server;
pub mod tls;

pub use server::{
    AllowedNet, Connections, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_IDLE_AFTER,
    DEFAULT_MAX_CONNECTIONS, Exports, ListenerPolicy, NbdServer, PoolExports, Target, pool_key,
};
