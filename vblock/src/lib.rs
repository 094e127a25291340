//! `vblock`: a thin-provisioned copy-on-write block store.
//!
//! * [`format`](mod@format): the on-disk format (documented in `docs/format.md`).
//! * [`meta`]: the sans-IO metadata core: volumes, snapshots and clones as shared radix trees,
//!   lazy reference counts, free space, journal records.
//! * [`journal`]: encoding and replay of journal blocks; [`checkpoint`]: full metadata images.
//! * [`device`]: what a pool lives on (a file or block device with O_DIRECT, or memory);
//!   [`uring`]: the io_uring engine (O_DIRECT, batched submission, a ring per thread).
//! * [`qos`]: per-volume IOPS and bandwidth limits (token buckets that delay requests).
//! * [`api`]: vblockd's API types; `daemon` (feature `daemon`, on by default): vblockd's
//!   config, control logic and HTTP server.
//! * `vhost_blk` (feature `vhost`): volumes served to VMs as vhost-user-blk devices.
//! * [`nbd`]: volumes exported over NBD (unix socket, optionally TCP).
//! * [`diffstream`]: snapshot diff streams (incremental export/import between pools).
//! * [`pool`]: a pool on a device: volume I/O, flush = commit, open = recovery, check.

/// vblockd's API types (the `vblock-api` crate).
pub use vblock_api as api;
pub mod checkpoint;
#[cfg(feature = "daemon")]
pub mod daemon;
pub mod device;
/// Snapshot diff streams (in `vblock-api`).
pub use vblock_api::diffstream;
mod error;
pub mod format;
pub mod journal;
pub mod meta;
pub mod nbd;
pub mod plan;
pub mod pool;
pub mod qos;
pub mod space;
#[allow(unsafe_code)] // io_uring submissions; every unsafe block carries a SAFETY note.
pub mod uring;
#[cfg(feature = "vhost")]
pub mod vhost_blk;

pub use error::{Corruption, Error, Structure};
pub use meta::{Kind, Qos};
pub use pool::{
    Change, CheckReport, DEFAULT_COMMIT_INTERVAL, DiffRange, IoCounters, Pool, PoolOptions,
    ReadRequest, Recovery, VolumeInfo, WriteRequest,
};
pub use space::{SpaceReport, WhenFull};
