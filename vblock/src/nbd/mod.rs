//! Volumes over NBD (the Network Block Device protocol), for everything that speaks block
//! but is not a VM: `qemu-img`, `qemu-io`, `nbdcopy`, fio's `nbd` engine, backup tools, the
//! kernel's nbd client.
//!
//! * [`proto`]: the wire format (fixed newstyle negotiation, simple and structured replies,
//!   `base:allocation` block status), sans-IO.
//! * [`server`]: the server: a unix socket (and TCP with an allow-list, when configured), a
//!   thread per connection, pipelined requests executed in batches on the pool's engine.
//!
//! One export per volume (its name); snapshots are exported read-only.

pub mod proto;
pub mod server;

pub use server::{AllowedNet, Connections, Exports, NbdServer, PoolExports, Target, pool_key};
