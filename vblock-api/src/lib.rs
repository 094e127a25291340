//! Request and response types of vblockd's control API (HTTP/1.1 + JSON on a unix socket,
//! documented in `docs/api.md`), shared by the server and its clients, and the format of
//! snapshot diff streams ([`diffstream`]). Serde only: a client builds this, not the store.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use daemon_kit::default_run_dir;

pub mod diffstream;

/// The default API socket of vblockd: `vblockd.sock` in [`default_run_dir`].
pub fn default_socket() -> PathBuf {
    default_run_dir().join("vblockd.sock")
}

/// A pool to create or open (`POST /v1/pools`), and as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    /// Unique name.
    pub name: String,
    /// The file or block device it lives on.
    pub path: PathBuf,
    /// With a size, a new pool file of that many bytes is created and formatted; without,
    /// an existing pool is opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// How a new pool file's space is reserved: `falloc` (default) or `full` (zeros written).
    #[serde(default, skip_serializing_if = "is_falloc")]
    pub preallocation: Preallocation,
    /// What happens as the pool fills (default: writes into a full pool fail at once, no
    /// low-water mark).
    #[serde(default, skip_serializing_if = "SpaceSpec::is_default")]
    pub space: SpaceSpec,
}

/// What a write that needs new space does when the pool is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenFull {
    /// Fails at once: ENOSPC to NBD clients, an I/O error to a guest (the default).
    #[default]
    Error,
    /// Waits for space — the pool grown (`POST /v1/pools/{pool}/resize`), a volume deleted,
    /// space discarded — for up to `queue_timeout` seconds, then fails.
    Queue,
}

/// A pool's space settings (`PUT /v1/pools/{pool}/space`, or `space` on creation), as
/// dm-thin has them: the out-of-space policy and a low-water mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceSpec {
    /// `error` (default) or `queue`.
    #[serde(default)]
    pub when_full: WhenFull,
    /// Seconds a write waits for space under `queue` before it fails (default 60).
    #[serde(default = "default_queue_timeout")]
    pub queue_timeout: u64,
    /// Free bytes below which the pool raises its low-water event: a log line, a metric,
    /// `below_low_water` in the pool's info (0, the default: none).
    #[serde(default)]
    pub low_water: u64,
}

/// Seconds a queued write waits by default.
pub const DEFAULT_QUEUE_TIMEOUT: u64 = 60;

fn default_queue_timeout() -> u64 {
    DEFAULT_QUEUE_TIMEOUT
}

impl Default for SpaceSpec {
    fn default() -> SpaceSpec {
        SpaceSpec {
            when_full: WhenFull::Error,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            low_water: 0,
        }
    }
}

impl SpaceSpec {
    /// The default settings.
    pub fn is_default(&self) -> bool {
        *self == SpaceSpec::default()
    }
}

/// A pool's new size (`POST /v1/pools/{pool}/resize`): pools grow online.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolResizeSpec {
    /// New size of the pool's file or device in bytes (larger than now).
    pub size: u64,
}

fn is_falloc(p: &Preallocation) -> bool {
    *p == Preallocation::Falloc
}

/// A pool as reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    /// Name.
    pub name: String,
    /// Where it lives.
    pub path: PathBuf,
    /// Bytes of data space.
    pub capacity: u64,
    /// Bytes of data space free.
    pub free: u64,
    /// Bytes of data space holding data of some volume (capacity = used + pending_free +
    /// free).
    #[serde(default)]
    pub used: u64,
    /// Bytes freed by changes not yet committed (discards, overwrites of shared data,
    /// deletes): free after the next commit, within the commit interval.
    #[serde(default)]
    pub pending_free: u64,
    /// Number of volumes, snapshots and clones.
    pub volumes: usize,
    /// Space settings.
    #[serde(default)]
    pub space: SpaceSpec,
    /// Free space is below the low-water mark now.
    #[serde(default)]
    pub below_low_water: bool,
    /// Times free space dropped below the low-water mark since the pool was opened.
    #[serde(default)]
    pub low_water_events: u64,
    /// Writes that found the pool full and waited for space.
    #[serde(default)]
    pub queued_writes: u64,
    /// Writes that failed because the pool was full.
    #[serde(default)]
    pub refused_writes: u64,
}

/// A volume to create (`POST /v1/pools/{pool}/volumes`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// Unique name in the pool.
    pub name: String,
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
}

/// I/O limits; 0 or absent means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosSpec {
    /// Requests per second.
    #[serde(default)]
    pub iops: u64,
    /// Bytes per second.
    #[serde(default)]
    pub bps: u64,
}

/// A volume, snapshot or clone as reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Name.
    pub name: String,
    /// `volume` or `snapshot`.
    pub kind: String,
    /// What it was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Virtual size in bytes.
    pub size: u64,
    /// Bytes written: the 4 KiB blocks holding data (shared data counts for each sharer).
    pub allocated: u64,
    /// Bytes of pool space it holds: the 64 KiB clusters it maps (scattered 4 KiB writes
    /// hold up to 16 times what they wrote; shared clusters count for each sharer).
    #[serde(default)]
    pub held: u64,
    /// Bytes of pool space only it holds: what deleting it frees.
    #[serde(default)]
    pub exclusive: u64,
    /// I/O limits.
    pub qos: QosSpec,
    /// I/O since its pool was opened, from every client (API, vhost-user-blk, NBD).
    #[serde(default)]
    pub io: IoInfo,
}

/// A volume's I/O counters ([`VolumeInfo::io`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoInfo {
    /// Read requests.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Write requests.
    pub writes: u64,
    /// Bytes written.
    pub written_bytes: u64,
    /// Discard and write-zeroes requests.
    pub releases: u64,
}

/// A snapshot to take (`POST /v1/pools/{pool}/snapshots`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSpec {
    /// The volume (or snapshot) to snapshot.
    pub source: String,
    /// The snapshot's name.
    pub name: String,
}

/// A clone to make (`POST /v1/pools/{pool}/clones`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneSpec {
    /// The snapshot to clone.
    pub snapshot: String,
    /// The clone's name.
    pub name: String,
}

/// A new size (`POST /v1/pools/{pool}/volumes/{name}/resize`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeSpec {
    /// New size in bytes (not smaller than the current one).
    pub size: u64,
}

/// What `POST /v1/pools/{pool}/check` found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckInfo {
    /// Volumes checked.
    pub volumes: usize,
    /// Data clusters referenced.
    pub used_clusters: u64,
    /// Data clusters in the pool.
    pub total_clusters: u64,
    /// Leaked clusters found (reclaimed with `repair`).
    pub leaked_clusters: u64,
    /// Problems found.
    pub problems: Vec<String>,
    /// True if nothing is wrong.
    pub clean: bool,
}

/// Where data goes or comes from (`?offset=&length=` of the data endpoints).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRange {
    /// Byte offset (a multiple of 512).
    #[serde(default)]
    pub offset: u64,
    /// Bytes to read (reads only; at most 16 MiB).
    #[serde(default)]
    pub length: Option<u64>,
}

/// A volume exported to VMs as vhost-user-blk (`PUT .../volumes/{name}/vhost`), and as
/// persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostSpec {
    /// Virtqueues (each served by its own worker); default 1.
    #[serde(default = "one")]
    pub queues: usize,
}

fn one() -> usize {
    1
}

/// An export as reported (`GET /v1/vhost`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostInfo {
    /// Pool.
    pub pool: String,
    /// Volume or snapshot (read-only).
    pub volume: String,
    /// The vhost-user socket QEMU connects to (`RUN_DIR/vhost/<volume>.sock`).
    pub socket: PathBuf,
    /// Virtqueues.
    pub queues: usize,
    /// Frontend connections served so far (QEMU reconnects after a restart of either side).
    #[serde(default)]
    pub connections: u64,
    /// Requests found in flight when a connection started (taken by a killed predecessor,
    /// per the frontend's inflight record) and run again.
    #[serde(default)]
    pub resubmitted: u64,
}

/// Largest data transfer of one request.
pub const MAX_TRANSFER: u64 = 16 << 20;

/// The body of every error response, and what a daemon could not restore at start
/// (`GET /v1/unrestored`): shared by both daemons and their clients.
pub use daemon_kit::{ErrorBody, ErrorResponse, Unrestored};

/// How a new pool file's space is reserved on the host file system (volumes inside are thin
/// either way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preallocation {
    /// `fallocate`: instant; the file system marks the space allocated but unwritten, and
    /// converts (splits) its extents as data first lands there, which costs on random first
    /// writes (ext4: 1.4–3x fewer thin first writes per second than `full`, measured).
    #[default]
    Falloc,
    /// `fallocate`, then zeros written over the whole file (as `qemu-img create -o
    /// preallocation=full`): creation takes as long as writing the size; first writes into
    /// thin space then cost what overwrites cost.
    Full,
}

impl std::str::FromStr for Preallocation {
    type Err = String;

    fn from_str(s: &str) -> Result<Preallocation, String> {
        match s {
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            other => Err(format!("preallocation {other:?}: falloc or full")),
        }
    }
}

/// A range in which two volumes differ (what the volume diff request answers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffRange {
    /// Byte offset.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
    /// The newer volume reads zeros here.
    pub zero: bool,
}
