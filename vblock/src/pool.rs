//! A pool on a device: volume I/O, flush (commit), open (recovery) and check.
//!
//! Commit protocol, on [`Pool::flush`] (and from the background committer): the running
//! transaction is sealed under the pool's lock, then, without it, (1) the device is flushed,
//! so every data write the new metadata points at is durable; (2) the sealed transaction's
//! records are appended to the journal; (3) the device is flushed again. Reads and writes go
//! on meanwhile. Only then is the space it freed reused. A crash at any point leaves the state of
//! the last commit whose journal blocks all reached the disk; data written since is old or new
//! per block, never another volume's, because new data only ever goes to clusters that the
//! committed state does not reference (or that are exclusively the writer's in both states).
//!
//! When a transaction would fill the journal past half, the whole metadata (as of the seal)
//! is written as a checkpoint to the inactive checkpoint area and the other superblock slot
//! is switched to it. Opening a pool loads the newest valid superblock's checkpoint, replays
//! the journal's complete transactions and folds them into a new checkpoint.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use crate::qos::Limiter;

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, IntoBytes};

// Reads take the lock shared: freed clusters are only reused after a commit, which takes it
// exclusively, so no read can see a cluster change owner under it.

use crate::Error;
use crate::device::{Device, IoOp};
use crate::error::Structure;
use crate::format::{
    BLOCK_SIZE, CLUSTER_SIZE, FANOUT, SUBCLUSTERS, SUPER_CRC_AT, SUPER_MAGIC, Superblock, VERSION,
};
use crate::journal::{Segment, decode_block, encode_txn};
use crate::meta::{Entry, Kind, Meta, Qos, Record, clusters_of};
use crate::plan::{Applied, ReadSource, ReadSpan, WritePiece, WritePlan, runs, vclusters};
use crate::space::{SpaceReport, SpaceWatch, WhenFull};

/// How long, by default, a write no client flushes stays uncommitted at most (about; the
/// kernel keeps dirty page-cache data as long, XFS its log): the pools' background
/// committers run this often when there is something to commit, and at once when a
/// transaction grows large. Clients that flush (guests do, every few seconds) are not
/// affected; a commit flushes the device, which on a virtual disk can stall writes for as
/// long as the host takes to write back what it cached.
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_secs(30);

/// Records in the running transaction at which a write commits, when no background committer
/// runs: the transaction, and the space it pins, stay bounded without flushes from the user.
const COMMIT_RECORDS: usize = 65_536;

/// With a background committer, which commits every interval: records at which writes ask it
/// to commit at once (about 25 MiB of memory), and four times that, at which they commit
/// themselves. A commit flushes the device, which stalls writes on some disks for as long as
/// the host takes to write back what it cached, so the committer does not commit more often
/// than the interval unless the transaction grows this large (dm-thin commits every second;
/// ext4 every 5 s).
const COMMIT_RECORDS_BACKGROUND: usize = 1 << 19;

/// Geometry choices when creating a pool (blocks of 4 KiB; `None`: a default from the size).
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolOptions {
    /// Journal ring size.
    pub journal_blocks: Option<u64>,
    /// Size of each of the two checkpoint areas.
    pub ckpt_blocks: Option<u64>,
}

/// A volume as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Id.
    pub id: u64,
    /// Name.
    pub name: String,
    /// Volume (writable) or snapshot.
    pub kind: Kind,
    /// The volume or snapshot it was made from.
    pub parent: Option<String>,
    /// Virtual size in bytes.
    pub size: u64,
    /// Bytes written: the 4 KiB blocks holding data (shared data counts for every sharer).
    pub allocated: u64,
    /// Bytes of the clusters it maps (space is taken by the 64 KiB cluster, so scattered
    /// 4 KiB writes hold far more than they wrote; shared clusters count for every sharer).
    pub held: u64,
    /// Bytes of the clusters only it references: what deleting it frees.
    pub exclusive: u64,
    /// I/O limits.
    pub qos: Qos,
    /// I/O since the pool was opened.
    pub io: IoCounters,
}

/// One read of a batch ([`Pool::read_batch`]).
#[derive(Debug)]
pub struct ReadRequest<'a> {
    /// Volume or snapshot.
    pub volume: &'a str,
    /// Byte offset (a multiple of 512).
    pub offset: u64,
    /// Where the bytes go (a multiple of 512 long).
    pub buf: &'a mut [u8],
}

/// One write of a batch ([`Pool::write_batch`]).
#[derive(Debug)]
pub struct WriteRequest<'a> {
    /// Volume.
    pub volume: &'a str,
    /// Byte offset (a multiple of 512).
    pub offset: u64,
    /// The bytes (a multiple of 512 long).
    pub data: &'a [u8],
}

pub use vblock_api::DiffRange;

/// What [`Pool::check`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Volumes and snapshots.
    pub volumes: usize,
    /// Data clusters referenced.
    pub used_clusters: u64,
    /// Data clusters in the pool.
    pub total_clusters: u64,
    /// Clusters whose reference count disagreed with the trees (leaks when too high).
    pub leaked_clusters: u64,
    /// Structural problems (a cluster mapped at two virtual addresses, ...).
    pub problems: Vec<String>,
}

impl CheckReport {
    /// True if nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.leaked_clusters == 0 && self.problems.is_empty()
    }
}

struct State {
    meta: Meta,
    sb: Superblock,
    next_seq: u64,
    journal_used: u64,
}

/// I/O counters of one volume: requests and bytes by kind, whoever sent them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCounters {
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

/// What a request does, for [`IoCounters`].
#[derive(Clone, Copy)]
enum IoKind {
    Read,
    Write,
    Release,
}

/// A change of a pool's configuration, made durable by [`Pool::change`].
#[derive(Clone, Copy, Debug)]
pub enum Change<'a> {
    /// A new thin volume of `size` bytes.
    Create {
        /// Its name.
        name: &'a str,
        /// Its size in bytes.
        size: u64,
    },
    /// A read-only snapshot of `source`.
    Snapshot {
        /// The volume or snapshot.
        source: &'a str,
        /// The snapshot's name.
        name: &'a str,
    },
    /// A writable clone of a snapshot.
    Clone {
        /// The snapshot.
        snapshot: &'a str,
        /// The clone's name.
        name: &'a str,
    },
    /// Deletes a volume, snapshot or clone.
    Delete {
        /// Its name.
        name: &'a str,
    },
    /// Grows a volume.
    Resize {
        /// Its name.
        name: &'a str,
        /// The new size in bytes.
        size: u64,
    },
    /// Sets a volume's I/O limits.
    SetQos {
        /// Its name.
        name: &'a str,
        /// The limits.
        qos: Qos,
    },
}

/// A pool of thin volumes on a device.
pub struct Pool<D: Device> {
    dev: D,
    state: RwLock<State>,
    limiters: Mutex<HashMap<u64, Limiter>>,
    /// I/O counters by volume id (every path: API, vhost-user-blk, NBD).
    io: Mutex<HashMap<u64, IoCounters>>,
    /// Set once any volume has had limits (until then no request looks at `limiters`).
    limited: AtomicBool,
    epoch: Instant,
    /// Held by a commit from sealing its transaction until it is durable (commits and
    /// checkpoints run one at a time; changes go on meanwhile). Taken before `state`.
    commit_lock: Mutex<()>,
    /// Wakes the background committer ([`Pool::start_committer`]), if one runs.
    committer: Arc<CommitSignal>,
    /// A background committer runs.
    background: AtomicBool,
    /// What opening the pool replayed.
    recovery: Recovery,
    /// Out-of-space policy, low-water event, their counters.
    space: SpaceWatch,
    /// Rounds of fresh writes doing their I/O without the lock: they hold free clusters no
    /// entry references yet, which a repair's recount must not hand out again. Changed only
    /// under the exclusive lock.
    unlocked_rounds: AtomicUsize,
}

/// What opening a pool found in its journal: complete transactions replayed after the last
/// checkpoint (the work a crash left), and how long reading them took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Transactions replayed.
    pub transactions: u64,
    /// Metadata records in them.
    pub records: u64,
    /// Time spent reading and applying them.
    pub elapsed: Duration,
}

/// A request for the background committer.
#[derive(Default)]
struct CommitSignal {
    wanted: Mutex<bool>,
    cv: Condvar,
}

impl CommitSignal {
    fn want(&self) {
        let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        if !*wanted {
            *wanted = true;
            self.cv.notify_one();
        }
    }

    /// Waits up to `timeout` for a request; true if one came.
    fn wait(&self, timeout: Duration) -> bool {
        let wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        let (mut wanted, _) = self
            .cv
            .wait_timeout_while(wanted, timeout, |w| !*w)
            .unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *wanted)
    }
}

impl<D: Device> std::fmt::Debug for Pool<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::Io(what, e)
}

fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut u))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        u = (t ^ (std::process::id() as u128) << 64).to_le_bytes();
    }
    u
}

fn parse_super(block: &[u8]) -> Option<Superblock> {
    let (sb, _) = Superblock::read_from_prefix(block).ok()?;
    let len = std::mem::size_of::<Superblock>();
    let ok = sb.magic == SUPER_MAGIC
        && sb.crc.get() == crate::format::block_crc(&block[..len], SUPER_CRC_AT);
    ok.then_some(sb)
}

/// Where a pool's areas lie on a device (blocks) and how many data clusters it has.
struct Layout {
    journal_start: u64,
    journal_blocks: u64,
    ckpt0: u64,
    ckpt1: u64,
    ckpt_blocks: u64,
    data_start: u64,
    clusters: u64,
}

/// Plans the areas of a pool on a device of `size` bytes.
fn layout(size: u64, opts: &PoolOptions) -> Result<Layout, Error> {
    let blocks = size / BLOCK_SIZE as u64;
    let journal_blocks = opts
        .journal_blocks
        .unwrap_or((blocks / 256).clamp(256, 65536));
    let ckpt_blocks = opts
        .ckpt_blocks
        .unwrap_or((blocks / 64).clamp(256, 1 << 20));
    if journal_blocks < 4 || ckpt_blocks < 4 {
        return Err(Error::Invalid(
            "journal and checkpoint areas: at least 4 blocks".into(),
        ));
    }
    let per_cluster = (CLUSTER_SIZE / BLOCK_SIZE) as u64;
    let journal_start = 2;
    let ckpt0 = journal_start + journal_blocks;
    let ckpt1 = ckpt0 + ckpt_blocks;
    let data_start = (ckpt1 + ckpt_blocks).div_ceil(per_cluster) * per_cluster;
    let clusters = blocks.saturating_sub(data_start) / per_cluster;
    let min = (data_start + per_cluster) * BLOCK_SIZE as u64;
    if clusters == 0 {
        return Err(Error::Invalid(format!(
            "pool size {size} bytes: too small; a pool needs at least {min} bytes ({} MiB) for \
             its metadata and one data cluster",
            min.div_ceil(1 << 20)
        )));
    }
    if clusters > u32::MAX as u64 - 1 {
        return Err(Error::Invalid(format!(
            "pool size {size} bytes: too large; at most {} data clusters of {CLUSTER_SIZE} bytes",
            u32::MAX - 1
        )));
    }
    Ok(Layout {
        journal_start,
        journal_blocks,
        ckpt0,
        ckpt1,
        ckpt_blocks,
        data_start,
        clusters,
    })
}

impl<D: Device> Pool<D> {
    /// Checks that a device of `size` bytes can hold a pool with `opts` (before a pool file
    /// is made for it): the error says why not.
    pub fn check_size(size: u64, opts: &PoolOptions) -> Result<(), Error> {
        layout(size, opts).map(|_| ())
    }

    /// Formats `dev` as an empty pool.
    pub fn create(dev: D, opts: PoolOptions) -> Result<Pool<D>, Error> {
        let Layout {
            journal_start,
            journal_blocks,
            ckpt0,
            ckpt1,
            ckpt_blocks,
            data_start,
            clusters,
        } = layout(dev.size(), &opts)?;
        let sb = Superblock {
            magic: SUPER_MAGIC,
            version: U32::new(VERSION),
            block_size: U32::new(BLOCK_SIZE as u32),
            cluster_size: U32::new(CLUSTER_SIZE as u32),
            reserved0: U32::new(0),
            generation: U64::new(0),
            uuid: random_uuid(),
            journal_start: U64::new(journal_start),
            journal_blocks: U64::new(journal_blocks),
            ckpt_start: [U64::new(ckpt0), U64::new(ckpt1)],
            ckpt_blocks: U64::new(ckpt_blocks),
            data_start: U64::new(data_start),
            data_clusters: U64::new(clusters),
            active_ckpt: U32::new(1),
            reserved1: U32::new(0),
            ckpt_generation: U64::new(0),
            ckpt_used: U64::new(0),
            journal_seq: U64::new(0),
            crc: U32::new(0),
        };
        // No valid superblock until the first checkpoint is complete.
        dev.write_at(0, &vec![0u8; 2 * BLOCK_SIZE])
            .map_err(io("clearing the superblocks"))?;
        Self::with_state(dev, Meta::new(clusters as u32), sb, 0)
    }

    /// A pool on `dev` with metadata `meta` (written as a fresh checkpoint first).
    fn with_state(dev: D, meta: Meta, sb: Superblock, next_seq: u64) -> Result<Pool<D>, Error> {
        let mut state = State {
            meta,
            sb,
            next_seq,
            journal_used: 0,
        };
        checkpoint(&dev, &mut state)?;
        Ok(Self::assemble(dev, state, Recovery::default()))
    }

    /// The pool object around recovered state (nothing written).
    fn assemble(dev: D, state: State, recovery: Recovery) -> Pool<D> {
        Pool {
            dev,
            state: RwLock::new(state),
            limiters: Mutex::new(HashMap::new()),
            io: Mutex::new(HashMap::new()),
            limited: AtomicBool::new(false),
            epoch: Instant::now(),
            commit_lock: Mutex::new(()),
            committer: Arc::new(CommitSignal::default()),
            background: AtomicBool::new(false),
            recovery,
            space: SpaceWatch::default(),
            unlocked_rounds: AtomicUsize::new(0),
        }
    }

    /// What opening the pool replayed from its journal.
    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    /// Writes refused so far because the pool was full (ENOSPC to the client).
    pub fn no_space_events(&self) -> u64 {
        self.space_report().refused_writes
    }

    /// The pool's space (used, pending free, free) and its events.
    pub fn space_report(&self) -> SpaceReport {
        let s = self.read_lock();
        self.space.report(
            s.meta.clusters() as u64,
            s.meta.used_clusters() as u64,
            s.meta.pending_free_clusters() as u64,
            s.meta.free_clusters() as u64,
        )
    }

    /// What a write that needs new space does when there is none (default: fail at once).
    pub fn set_when_full(&self, policy: WhenFull) {
        self.space.set_when_full(policy);
    }

    /// The policy for writes into a full pool.
    pub fn when_full(&self) -> WhenFull {
        self.space.when_full()
    }

    /// Sets the low-water mark: free space below `bytes` raises an event (0: none).
    pub fn set_low_water(&self, bytes: u64) {
        self.space
            .set_low_water(bytes.div_ceil(CLUSTER_SIZE as u64));
        self.observe_space();
    }

    /// Checks free space against the low-water mark (when there is one).
    fn observe_space(&self) {
        if self.space.low_water() == 0 {
            return;
        }
        let (clusters, free) = self.space();
        self.space.observe_free(free, clusters);
    }

    /// After writes: counts those the full pool refused, and looks at the low-water mark.
    fn after_writes<'a>(&self, outcomes: impl IntoIterator<Item = &'a Result<(), Error>>) {
        let full = outcomes
            .into_iter()
            .filter(|r| matches!(r, Err(Error::NoSpace)))
            .count() as u64;
        if full > 0 {
            let (clusters, free) = self.space();
            self.space.refused(full, free, clusters);
        }
        self.observe_space();
    }

    /// A write found no space: under [`WhenFull::Queue`] it waits (from `since`, the first
    /// time it found none) until space may have appeared after `seen`, and is tried again
    /// (true); at the timeout, or under [`WhenFull::Error`], it fails (false). Space that
    /// uncommitted changes freed is committed first, which makes it free.
    fn wait_for_space(&self, seen: u64, since: &mut Option<Instant>) -> bool {
        let WhenFull::Queue(timeout) = self.space.when_full() else {
            return false;
        };
        let started = *since.get_or_insert_with(|| {
            self.space.queued(timeout);
            Instant::now()
        });
        if self.read_lock().meta.pending_free_clusters() > 0
            && let Err(e) = self.flush()
        {
            tracing::warn!(error = %e, "commit for a write waiting for space failed");
        }
        self.space.wait(seen, started + timeout)
    }

    /// Grows the pool to `size` bytes (its device is extended first), online: the new space
    /// is free at once and writes waiting for space go on. Pools only grow; how far is bounded
    /// by the metadata area sized at creation (about 16 times the initial size).
    pub fn grow(&self, size: u64) -> Result<(), Error> {
        let _commit = self.commit_guard();
        let mut s = self.lock();
        let per_cluster = CLUSTER_SIZE as u64;
        let data_start = s.sb.data_start.get() * BLOCK_SIZE as u64;
        let old = s.sb.data_clusters.get();
        let current = data_start + old * per_cluster;
        let clusters = size.saturating_sub(data_start) / per_cluster;
        if clusters <= old {
            return Err(Error::Invalid(format!(
                "pool size {size} bytes: pools only grow, and this one has {current} bytes \
                 (grow by at least one cluster of {per_cluster} bytes)"
            )));
        }
        let most = max_clusters(s.sb.ckpt_blocks.get()).min(u32::MAX as u64 - 1);
        if clusters > most {
            return Err(Error::Invalid(format!(
                "pool size {size} bytes: this pool can grow to at most {} bytes (its \
                 metadata area was sized when it was created); make a larger pool and move \
                 volumes into it",
                data_start + most * per_cluster
            )));
        }
        let new_size = data_start + clusters * per_cluster;
        self.dev
            .grow(new_size)
            .map_err(io(format!("growing the pool's device to {new_size} bytes")))?;
        s.meta.grow(clusters as u32);
        s.sb.data_clusters = U64::new(clusters);
        if let Err(e) = checkpoint(&self.dev, &mut s) {
            s.sb.data_clusters = U64::new(old);
            s.meta.shrink_back(old as u32);
            return Err(e);
        }
        drop(s);
        tracing::info!(from = current, to = new_size, "pool grown");
        self.space.space_changed();
        self.observe_space();
        Ok(())
    }

    /// Opens a pool: the newest valid superblock, its checkpoint, the journal's complete
    /// transactions; the result is folded into a new checkpoint.
    pub fn open(dev: D) -> Result<Pool<D>, Error> {
        let (meta, sb, seq, recovery) = Self::recover(&dev)?;
        let mut pool = Self::with_state(dev, meta, sb, seq)?;
        pool.recovery = recovery;
        Ok(pool)
    }

    /// Opens a pool for inspection without writing anything: the state recovered as
    /// [`Pool::open`] recovers it, in memory only (the journal is not folded). For a check
    /// that must not change what it checks; do not write through it (a device opened
    /// read-only refuses).
    pub fn open_read_only(dev: D) -> Result<Pool<D>, Error> {
        let (meta, sb, next_seq, recovery) = Self::recover(&dev)?;
        Ok(Self::assemble(
            dev,
            State {
                meta,
                sb,
                next_seq,
                journal_used: 0,
            },
            recovery,
        ))
    }

    /// Reads a pool's state: the newest valid superblock, its checkpoint and the journal's
    /// complete transactions. Returns the metadata, the superblock, the next journal
    /// sequence number and what was replayed.
    fn recover(dev: &D) -> Result<(Meta, Superblock, u64, Recovery), Error> {
        let started = Instant::now();
        if dev.size() < 2 * BLOCK_SIZE as u64 {
            return Err(Error::NotAPool(format!(
                "{} bytes: too small to hold a pool's superblocks",
                dev.size()
            )));
        }
        let mut two = vec![0u8; 2 * BLOCK_SIZE];
        dev.read_at(0, &mut two)
            .map_err(io("reading the superblocks"))?;
        let sb = [
            parse_super(&two[..BLOCK_SIZE]),
            parse_super(&two[BLOCK_SIZE..]),
        ]
        .into_iter()
        .flatten()
        .max_by_key(|s| s.generation.get())
        .ok_or_else(|| Error::NotAPool("no valid superblock".into()))?;
        if sb.version.get() != VERSION
            || sb.block_size.get() as usize != BLOCK_SIZE
            || sb.cluster_size.get() as usize != CLUSTER_SIZE
        {
            return Err(Error::NotAPool(format!(
                "format version {} (block {}, cluster {}): this build reads version {VERSION}",
                sb.version.get(),
                sb.block_size.get(),
                sb.cluster_size.get()
            )));
        }
        let blocks = dev.size() / BLOCK_SIZE as u64;
        let data_end =
            sb.data_start.get() + sb.data_clusters.get() * (CLUSTER_SIZE / BLOCK_SIZE) as u64;
        let active = sb.active_ckpt.get() as usize;
        if active > 1
            || data_end > blocks
            || sb.ckpt_used.get() > sb.ckpt_blocks.get()
            || sb.journal_blocks.get() == 0
        {
            return Err(Error::corrupt_at(
                Structure::Superblock,
                0,
                "geometry beyond the device",
            ));
        }
        let mut ckpt = vec![0u8; sb.ckpt_used.get() as usize * BLOCK_SIZE];
        let ckpt_at = sb.ckpt_start[active].get() * BLOCK_SIZE as u64;
        dev.read_at(ckpt_at, &mut ckpt)
            .map_err(io("reading the checkpoint"))?;
        let mut meta = crate::checkpoint::load(
            &ckpt,
            sb.ckpt_generation.get(),
            sb.data_clusters.get() as u32,
        )
        .map_err(|e| e.at(ckpt_at))?;
        // Replay complete transactions of this journal segment.
        let seg = Segment {
            uuid: sb.uuid,
            epoch: sb.generation.get(),
        };
        let jb = sb.journal_blocks.get();
        let mut seq = sb.journal_seq.get();
        let mut txn: Vec<Record> = Vec::new();
        let mut recovery = Recovery::default();
        let mut block = vec![0u8; BLOCK_SIZE];
        for _ in 0..jb {
            let at = (sb.journal_start.get() + seq % jb) * BLOCK_SIZE as u64;
            dev.read_at(at, &mut block)
                .map_err(io("reading the journal"))?;
            let Some((records, commit)) = decode_block(&block, seq, seg).map_err(|e| e.at(at))?
            else {
                break;
            };
            txn.extend(records);
            seq += 1;
            if commit {
                recovery.transactions += 1;
                recovery.records += txn.len() as u64;
                for r in txn.drain(..) {
                    // A record naming what does not exist: placed at its commit block.
                    meta.apply(&r).map_err(|e| e.at(at))?;
                }
            }
        }
        check_journal_end(dev, &sb, seq)?;
        meta.committed();
        meta.rebuild_free();
        recovery.elapsed = started.elapsed();
        Ok((meta, sb, seq, recovery))
    }

    /// The state for changes (writes, configuration, commits).
    fn lock(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The state for reads: any number of readers at once.
    fn read_lock(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// Closes the pool cleanly: commits and folds the journal into a checkpoint (the journal
    /// is then empty), and returns the device.
    pub fn close(self) -> Result<D, Error> {
        {
            let commit = self.commit_guard();
            self.commit_locked(&commit)?;
            checkpoint(&self.dev, &mut self.lock())?;
        }
        Ok(self.dev)
    }

    /// Closes the pool without a commit (what was not flushed is as after a crash) and
    /// returns the device.
    pub fn into_device(self) -> D {
        self.dev
    }

    /// Data clusters in all, and free.
    pub fn space(&self) -> (u64, u64) {
        let s = self.read_lock();
        (s.meta.clusters() as u64, s.meta.free_clusters() as u64)
    }

    /// Creates a thin volume of `size` bytes.
    pub fn create_volume(&self, name: &str, size: u64) -> Result<(), Error> {
        self.lock().meta.create_volume(name, size).map(|_| ())
    }

    /// Takes a read-only snapshot of a volume (O(1)).
    pub fn snapshot(&self, volume: &str, name: &str) -> Result<(), Error> {
        self.lock().meta.snapshot(volume, name).map(|_| ())
    }

    /// Makes a writable clone of a snapshot (O(1)).
    pub fn clone_snapshot(&self, snapshot: &str, name: &str) -> Result<(), Error> {
        self.lock().meta.clone_snapshot(snapshot, name).map(|_| ())
    }

    /// Deletes a volume, snapshot or clone; space nothing else references is freed.
    pub fn delete(&self, name: &str) -> Result<(), Error> {
        self.lock().meta.delete(name)
    }

    /// Grows a volume.
    pub fn resize(&self, name: &str, size: u64) -> Result<(), Error> {
        self.lock().meta.resize(name, size)
    }

    /// Sets a volume's I/O limits.
    pub fn set_qos(&self, name: &str, qos: Qos) -> Result<(), Error> {
        self.lock().meta.set_qos(name, qos)
    }

    /// Makes a change of the pool's configuration and commits it before returning: it either
    /// happened and is durable, or it failed and left no trace (not in memory, not in the
    /// journal) — on a full host file system under a sparse pool file, say. Data writes wait
    /// meanwhile (the change's commit also makes them durable).
    pub fn change(&self, change: Change<'_>) -> Result<(), Error> {
        let _commit = self.commit_guard();
        let mut s = self.lock();
        let id = match change {
            Change::Create { .. } | Change::Snapshot { .. } | Change::Clone { .. } => {
                s.meta.next_id()
            }
            Change::Delete { name } | Change::Resize { name, .. } | Change::SetQos { name, .. } => {
                s.meta.id_of(name)?
            }
        };
        let mark = s.meta.mark(id);
        let applied = match change {
            Change::Create { name, size } => s.meta.create_volume(name, size).map(|_| ()),
            Change::Snapshot { source, name } => s.meta.snapshot(source, name).map(|_| ()),
            Change::Clone { snapshot, name } => s.meta.clone_snapshot(snapshot, name).map(|_| ()),
            Change::Delete { name } => s.meta.delete(name),
            Change::Resize { name, size } => s.meta.resize(name, size),
            Change::SetQos { name, qos } => s.meta.set_qos(name, qos),
        };
        if let Err(e) = applied {
            s.meta.take_back(mark);
            return Err(e);
        }
        let (records, mut commit) = match seal(&mut s) {
            Ok(sealed) => sealed,
            Err(e) => {
                s.meta.take_back(mark);
                return Err(e);
            }
        };
        match write_sealed(&self.dev, &mut commit) {
            Ok(()) => {
                sealed_done(&mut s, commit);
                s.meta.finish(mark);
                drop(s);
                self.space.space_changed();
                self.observe_space();
                Ok(())
            }
            Err(e) => {
                s.meta.unseal(records);
                s.meta.take_back(mark);
                Err(e)
            }
        }
    }

    /// All volumes, snapshots and clones.
    pub fn list(&self) -> Vec<VolumeInfo> {
        let s = self.read_lock();
        let io = self.io.lock().unwrap_or_else(|p| p.into_inner());
        s.meta
            .volumes()
            .filter_map(|v| info(&s.meta, v.id, &io))
            .collect()
    }

    /// One volume.
    pub fn volume(&self, name: &str) -> Result<VolumeInfo, Error> {
        let s = self.read_lock();
        let io = self.io.lock().unwrap_or_else(|p| p.into_inner());
        s.meta
            .volume(name)
            .and_then(|v| info(&s.meta, v.id, &io))
            .ok_or_else(|| Error::NotFound(name.into()))
    }

    /// Counts a request of `bytes` and waits as long as the volume's I/O limits require
    /// before it (without holding any lock of the pool).
    fn throttle(&self, name: &str, kind: IoKind, bytes: u64) {
        let Some((id, qos)) = self.read_lock().meta.volume(name).map(|v| (v.id, v.qos)) else {
            return;
        };
        {
            let mut io = self.io.lock().unwrap_or_else(|p| p.into_inner());
            let c = io.entry(id).or_default();
            match kind {
                IoKind::Read => {
                    c.reads += 1;
                    c.read_bytes += bytes;
                }
                IoKind::Write => {
                    c.writes += 1;
                    c.written_bytes += bytes;
                }
                IoKind::Release => c.releases += 1,
            }
        }
        if qos == Qos::default() && !self.limited.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let wait = {
            let mut limiters = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
            if qos == Qos::default() {
                limiters.remove(&id);
                return;
            }
            self.limited
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let l = limiters.entry(id).or_insert_with(|| Limiter::new(qos));
            if l.qos() != qos {
                // Limits changed live: start over with the new ones.
                *l = Limiter::new(qos);
            }
            l.admit(self.epoch.elapsed(), bytes)
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// Reads `buf.len()` bytes at `offset` (both multiples of 512). Never-written ranges read
    /// as zeros.
    pub fn read(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.throttle(name, IoKind::Read, buf.len() as u64);
        let s = self.read_lock();
        let len = buf.len();
        let id = check_io(&s.meta, name, offset, len, false)?;
        let mut ops = Vec::new();
        read_ops(&s.sb, &s.meta.plan_read(id, offset, len), buf, &mut ops);
        self.dev
            .submit(&mut ops)
            .map_err(io(format!("reading {len} bytes at {offset}")))
    }

    /// Writes several ranges in one batch (see [`Self::execute`] for how). Returns each
    /// request's outcome, in order. Requests of a batch are independent: like a device
    /// queue's, they may complete in any order. Writes that find the pool full wait for
    /// space or fail with [`Error::NoSpace`], as [`Self::set_when_full`] says.
    pub fn write_batch(&self, reqs: &[WriteRequest<'_>]) -> Vec<Result<(), Error>> {
        for r in reqs {
            self.throttle(r.volume, IoKind::Write, r.data.len() as u64);
        }
        let mut queued_since = None;
        let mut seen = self.space.generation();
        let mut results = self.execute(reqs);
        loop {
            let full: Vec<usize> = (0..results.len())
                .filter(|i| matches!(results[*i], Err(Error::NoSpace)))
                .collect();
            if full.is_empty() || !self.wait_for_space(seen, &mut queued_since) {
                break;
            }
            // The writes that found no space, again (requests of a batch are independent).
            let again: Vec<WriteRequest<'_>> = full
                .iter()
                .map(|i| WriteRequest {
                    volume: reqs[*i].volume,
                    offset: reqs[*i].offset,
                    data: reqs[*i].data,
                })
                .collect();
            seen = self.space.generation();
            for (i, r) in full.into_iter().zip(self.execute(&again)) {
                results[i] = r;
            }
        }
        self.after_writes(&results);
        results
    }

    /// The write path, for one request or a batch (throttled already). Each request is
    /// planned by [`Meta::plan_write`] and carried out in rounds, each of at most two
    /// submissions (the old content that partial blocks and copies need, then every write):
    /// 1. requests that only overwrite valid whole blocks in place ([`WritePlan::is_overwrite`])
    ///    go out together under the shared lock, beside reads and other such writes;
    /// 2. the others are planned under the exclusive lock, which takes their free clusters,
    ///    and carried out under it too, unless every plan of the round only writes clusters it
    ///    took ([`WritePlan::is_fresh_only`]): then the lock is let go during the I/O, and a
    ///    plan another writer overtook meanwhile ([`Applied::Stale`]) gives its clusters back
    ///    and is carried out again. Their mapping is recorded after the I/O; on failure the
    ///    clusters go back. A request touching a virtual cluster planned earlier in the same
    ///    round waits for the next round, which plans it over the first one's result.
    fn execute(&self, reqs: &[WriteRequest<'_>]) -> Vec<Result<(), Error>> {
        let mut results: Vec<Option<Result<(), Error>>> = (0..reqs.len()).map(|_| None).collect();
        {
            let s = self.read_lock();
            let mut round = Vec::new();
            for (i, r) in reqs.iter().enumerate() {
                match check_io(&s.meta, r.volume, r.offset, r.data.len(), true) {
                    Err(e) => results[i] = Some(Err(e)),
                    Ok(id) => {
                        if let Some(plan) = s.meta.plan_overwrite(id, r.offset, r.data.len()) {
                            round.push((i, plan));
                        }
                    }
                }
            }
            let written = submit_each(&self.dev, &s.sb, reqs, &round);
            for ((i, _), written) in round.iter().zip(written) {
                results[*i] = Some(written.map_err(|e| write_error(&reqs[*i], e)));
            }
        }
        let mut todo: Vec<usize> = (0..reqs.len()).filter(|i| results[*i].is_none()).collect();
        let mut pending = 0;
        while !todo.is_empty() {
            // Allocated before the lock: writers wait for it.
            let mut round: Vec<(usize, WritePlan)> = Vec::with_capacity(todo.len());
            // The volume and virtual clusters of each plan of the round.
            let mut planned: Vec<(u64, RangeInclusive<u64>)> = Vec::with_capacity(todo.len());
            let mut next = Vec::new();
            let mut s = self.lock();
            for i in todo {
                let r = &reqs[i];
                let id = match check_io(&s.meta, r.volume, r.offset, r.data.len(), true) {
                    Ok(id) => id,
                    Err(e) => {
                        results[i] = Some(Err(e));
                        continue;
                    }
                };
                let vcs = vclusters(r.offset, r.data.len());
                let overlaps = |(v, p): &(u64, RangeInclusive<u64>)| {
                    *v == id && p.start() <= vcs.end() && vcs.start() <= p.end()
                };
                if planned.iter().any(overlaps) {
                    next.push(i);
                    continue;
                }
                match s.meta.plan_write(id, r.offset, r.data.len()) {
                    Ok(plan) => {
                        planned.push((id, vcs));
                        round.push((i, plan));
                    }
                    Err(e) => results[i] = Some(Err(e)),
                }
            }
            let unlocked = round.iter().all(|(_, plan)| plan.is_fresh_only());
            let written = if unlocked {
                let sb = s.sb;
                self.unlocked_rounds.fetch_add(1, Ordering::Relaxed);
                drop(s);
                let written = submit_each(&self.dev, &sb, reqs, &round);
                s = self.lock();
                written
            } else {
                submit_each(&self.dev, &s.sb, reqs, &round)
            };
            for ((i, plan), written) in round.iter().zip(written) {
                let applied = match written {
                    Ok(()) => s.meta.apply_write(plan),
                    Err(e) => Err(write_error(&reqs[*i], e)),
                };
                match applied {
                    Ok(Applied::Done) => results[*i] = Some(Ok(())),
                    Ok(Applied::Stale) => {
                        s.meta.give_back(plan);
                        next.push(*i);
                    }
                    Err(e) => {
                        s.meta.give_back(plan);
                        results[*i] = Some(Err(e));
                    }
                }
            }
            if unlocked {
                self.unlocked_rounds.fetch_sub(1, Ordering::Relaxed);
            }
            pending = s.meta.pending().len();
            todo = next;
        }
        if let Err(e) = self.commit_if_large(pending) {
            let e = Arc::new(e);
            for r in results.iter_mut().filter(|r| matches!(r, Some(Ok(())))) {
                *r = Some(Err(Error::Commit(e.clone())));
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Invalid("a write left undone".into()))))
            .collect()
    }

    /// Reads several ranges (of one or more volumes) in one batch: one lock, one submission,
    /// as a device queue hands over a batch of requests. Fails as a whole on the first bad
    /// request.
    pub fn read_batch(&self, reqs: &mut [ReadRequest<'_>]) -> Result<(), Error> {
        for r in reqs.iter() {
            self.throttle(r.volume, IoKind::Read, r.buf.len() as u64);
        }
        self.submit_reads(reqs)
    }

    /// Reads requests made of pieces (`pieces[i]` consecutive entries of `reqs` make request
    /// `i`: a guest's request with one piece per buffer of its own), each charged to its
    /// volume's limits and counted once, in one batch; if the batch fails, each request again
    /// on its own. Returns each request's outcome, in order; entries beyond the pieces are
    /// not read.
    pub fn read_pieces(
        &self,
        reqs: &mut [ReadRequest<'_>],
        pieces: &[usize],
    ) -> Vec<Result<(), Error>> {
        let total: usize = pieces.iter().sum();
        if total > reqs.len() {
            let e = || Err(Error::Invalid("more pieces than reads".into()));
            return pieces.iter().map(|_| e()).collect();
        }
        let reqs = &mut reqs[..total];
        let mut at = 0;
        for &n in pieces {
            let group = &reqs[at..at + n];
            if let Some(first) = group.first() {
                let bytes = group.iter().map(|r| r.buf.len() as u64).sum();
                self.throttle(first.volume, IoKind::Read, bytes);
            }
            at += n;
        }
        if reqs.is_empty() || self.submit_reads(reqs).is_ok() {
            return pieces.iter().map(|_| Ok(())).collect();
        }
        let mut at = 0;
        pieces
            .iter()
            .map(|&n| {
                let r = self.submit_reads(&mut reqs[at..at + n]);
                at += n;
                r
            })
            .collect()
    }

    /// The I/O of a batch of reads (already charged to their limits): one lock, one
    /// submission; fails as a whole on the first bad request.
    fn submit_reads(&self, reqs: &mut [ReadRequest<'_>]) -> Result<(), Error> {
        let s = self.read_lock();
        let mut ops = Vec::with_capacity(reqs.len());
        for r in reqs.iter_mut() {
            let id = check_io(&s.meta, r.volume, r.offset, r.buf.len(), false)?;
            let plan = s.meta.plan_read(id, r.offset, r.buf.len());
            read_ops(&s.sb, &plan, r.buf, &mut ops);
        }
        self.dev
            .submit(&mut ops)
            .map_err(io(format!("reading a batch of {}", reqs.len())))
    }

    /// Reads a batch as [`Self::read_batch`] does, and if the batch fails, each request
    /// again on its own, so that only a bad one fails (what a device queue answers per
    /// request). Returns each request's outcome, in order.
    pub fn read_each(&self, reqs: &mut [ReadRequest<'_>]) -> Vec<Result<(), Error>> {
        if reqs.is_empty() || self.read_batch(reqs).is_ok() {
            return reqs.iter().map(|_| Ok(())).collect();
        }
        reqs.iter_mut()
            .map(|r| self.read(r.volume, r.offset, r.buf))
            .collect()
    }

    /// Writes `data` at `offset` (both multiples of 512). Durable after the next
    /// [`Self::flush`].
    pub fn write(&self, name: &str, offset: u64, data: &[u8]) -> Result<(), Error> {
        let request = WriteRequest {
            volume: name,
            offset,
            data,
        };
        self.write_batch(std::slice::from_ref(&request))
            .pop()
            .unwrap_or_else(|| Err(Error::Invalid("a write left undone".into())))
    }

    /// Zeroes a range: whole 4 KiB blocks are released (they read as zeros), partial ones are
    /// written with zeros.
    pub fn write_zeroes(&self, name: &str, offset: u64, len: u64) -> Result<(), Error> {
        self.release(name, offset, len, true)
    }

    /// Discards a range: whole 4 KiB blocks are released and read as zeros afterwards;
    /// partial blocks are left as they are.
    pub fn discard(&self, name: &str, offset: u64, len: u64) -> Result<(), Error> {
        self.release(name, offset, len, false)
    }

    fn release(&self, name: &str, offset: u64, len: u64, zero_partial: bool) -> Result<(), Error> {
        self.throttle(name, IoKind::Release, 0);
        let bs = BLOCK_SIZE;
        let mut s = self.lock();
        let len = usize::try_from(len).map_err(|_| Error::Invalid("length".into()))?;
        let id = check_io(&s.meta, name, offset, len, true)?;
        let freed_before = s.meta.pending_free_clusters();
        for (vc, start, _, plen) in crate::plan::pieces(offset, len) {
            let e = s.meta.lookup(id, vc);
            let first_full = start.div_ceil(bs);
            let end_full = (start + plen) / bs;
            let clear = (first_full..end_full).fold(0u16, |m, k| m | (1 << k));
            if e.is_mapped() && e.bitmap & clear != 0 {
                let bitmap = e.bitmap & !clear;
                s.meta.set_entry(id, vc, Entry { bitmap, ..e })?;
            }
            if !zero_partial {
                continue;
            }
            // The partial head and tail: zeros written there, only where data is.
            let head_end = (first_full * bs).min(start + plen);
            let tail_start = (end_full * bs).max(head_end);
            for (a, b) in [(start, head_end), (tail_start, start + plen)] {
                if b > a && e.bitmap & crate::meta::subcluster_mask(a, b - a) != 0 {
                    let at = vc * CLUSTER_SIZE as u64 + a as u64;
                    self.zero_locked(&mut s, name, id, at, b - a)?;
                }
            }
        }
        let pending = s.meta.pending().len();
        let freed = s.meta.pending_free_clusters() > freed_before;
        drop(s);
        if freed {
            // Writes waiting for space commit it and go on.
            self.space.space_changed();
        }
        self.commit_if_large(pending)
    }

    /// Writes zeros over part of one block, under the exclusive lock the caller holds (so
    /// that a zeroing does not interleave with other writes): planned, carried out and
    /// recorded as [`Self::execute`] does.
    fn zero_locked(
        &self,
        s: &mut State,
        name: &str,
        id: u64,
        offset: u64,
        len: usize,
    ) -> Result<(), Error> {
        let req = WriteRequest {
            volume: name,
            offset,
            data: &ZERO_BLOCK.0[..len],
        };
        loop {
            let round = [(0, s.meta.plan_write(id, offset, len)?)];
            let plan = &round[0].1;
            let written = submit_writes(&self.dev, &s.sb, std::slice::from_ref(&req), &round);
            let applied = match written {
                Ok(()) => s.meta.apply_write(plan),
                Err(e) => Err(write_error(&req, e)),
            };
            if !matches!(applied, Ok(Applied::Done)) {
                s.meta.give_back(plan);
            }
            match applied {
                Ok(Applied::Done) => return Ok(()),
                // Nothing changes under the exclusive lock; were it otherwise, plan again.
                Ok(Applied::Stale) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The ranges in which `to` differs from `from` (or from an empty volume): where `to` has
    /// other data, and where it reads zeros but `from` did not. Blocks written into fresh
    /// space or released count by 4 KiB; a cluster copied on write counts whole (64 KiB).
    /// The cost follows the changes: subtrees the two share are not visited.
    pub fn diff(&self, from: Option<&str>, to: &str) -> Result<Vec<DiffRange>, Error> {
        let s = self.read_lock();
        let to_v = s
            .meta
            .volume(to)
            .ok_or_else(|| Error::NotFound(to.into()))?;
        let (to_id, size) = (to_v.id, to_v.size);
        let from_id = match from {
            Some(f) => Some(
                s.meta
                    .volume(f)
                    .ok_or_else(|| Error::NotFound(f.into()))?
                    .id,
            ),
            None => None,
        };
        let mut out: Vec<DiffRange> = Vec::new();
        for (vc, a, b) in s.meta.diff(from_id, to_id) {
            for k in 0..SUBCLUSTERS {
                let (in_a, in_b) = (a.bitmap & (1 << k) != 0, b.bitmap & (1 << k) != 0);
                if in_a == in_b && (!in_b || a.cluster == b.cluster) {
                    continue;
                }
                let offset = vc * CLUSTER_SIZE as u64 + (k * BLOCK_SIZE) as u64;
                if offset >= size {
                    break;
                }
                let length = (BLOCK_SIZE as u64).min(size - offset);
                let zero = !in_b;
                match out.last_mut() {
                    Some(r) if r.zero == zero && r.offset + r.length == offset => {
                        r.length += length
                    }
                    _ => out.push(DiffRange {
                        offset,
                        length,
                        zero,
                    }),
                }
            }
        }
        Ok(out)
    }

    /// Which parts of `len` bytes at `offset` of a volume or snapshot hold data: runs of
    /// (length, allocated), at 4 KiB granularity, clipped to the range. Unallocated parts
    /// read as zeros. One lookup per 64 KiB cluster.
    pub fn allocation(&self, name: &str, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, Error> {
        let s = self.read_lock();
        let v = s
            .meta
            .volume(name)
            .ok_or_else(|| Error::NotFound(name.into()))?;
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= v.size)
            .ok_or_else(|| {
                Error::OutOfRange(format!(
                    "{len} bytes at {offset} of {name} ({} bytes)",
                    v.size
                ))
            })?;
        let (cluster, block) = (CLUSTER_SIZE as u64, BLOCK_SIZE as u64);
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let vc = pos / cluster;
            let bitmap = s.meta.lookup(v.id, vc).bitmap;
            let cluster_end = ((vc + 1) * cluster).min(end);
            while pos < cluster_end {
                let k = (pos % cluster) / block;
                let piece_end = ((pos / block + 1) * block).min(cluster_end);
                let allocated = bitmap & (1 << k) != 0;
                match runs.last_mut() {
                    Some((l, a)) if *a == allocated => *l += piece_end - pos,
                    _ => runs.push((piece_end - pos, allocated)),
                }
                pos = piece_end;
            }
        }
        Ok(runs)
    }

    /// Makes everything written so far durable (a commit).
    pub fn flush(&self) -> Result<(), Error> {
        let commit = self.commit_guard();
        self.commit_locked(&commit)
    }

    fn commit_guard(&self) -> MutexGuard<'_, ()> {
        self.commit_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits the running transaction: sealed under the pool's lock, written and flushed
    /// without it (reads and writes go on), made the committed state under it again. On a
    /// failure the transaction goes back to the running one, for the next commit.
    fn commit_locked(&self, _commit: &MutexGuard<'_, ()>) -> Result<(), Error> {
        let sealed = {
            let mut s = self.lock();
            if s.meta.pending().is_empty() {
                None
            } else {
                Some(seal(&mut s)?)
            }
        };
        let Some((records, mut commit)) = sealed else {
            return self.dev.flush().map_err(io("flushing data"));
        };
        let written = write_sealed(&self.dev, &mut commit);
        let mut s = self.lock();
        match written {
            Ok(()) => {
                sealed_done(&mut s, commit);
                drop(s);
                self.space.space_changed();
                Ok(())
            }
            Err(e) => {
                s.meta.unseal(records);
                Err(e)
            }
        }
    }

    /// After a change that left `pending` records in the running transaction: commits when
    /// that is large — through the background committer if one runs (the writer goes on),
    /// here otherwise, or when the committer falls far behind.
    fn commit_if_large(&self, pending: usize) -> Result<(), Error> {
        let background = self.background.load(Ordering::Relaxed);
        let threshold = if background {
            COMMIT_RECORDS_BACKGROUND
        } else {
            COMMIT_RECORDS
        };
        if pending < threshold {
            return Ok(());
        }
        if background && pending < 4 * threshold {
            self.committer.want();
            return Ok(());
        }
        let commit = self.commit_guard();
        if self.read_lock().meta.pending().len() < threshold {
            return Ok(()); // another writer committed meanwhile
        }
        self.commit_locked(&commit)
    }

    /// Starts a thread that commits in the background every `interval` (when there is
    /// something to commit), so that what no client flushes is durable within about that
    /// time, and at once when the running transaction grows very large; writes go on
    /// meanwhile. It ends within `interval` of the pool being dropped.
    pub fn start_committer(self: &Arc<Self>, interval: Duration) -> std::io::Result<()>
    where
        D: Send + Sync + 'static,
    {
        let pool = Arc::downgrade(self);
        let signal = self.committer.clone();
        self.background.store(true, Ordering::Relaxed);
        std::thread::Builder::new()
            .name("vblock-commit".into())
            .spawn(move || {
                loop {
                    let wanted = signal.wait(interval);
                    let Some(pool) = pool.upgrade() else {
                        return;
                    };
                    if !wanted && pool.read_lock().meta.pending().is_empty() {
                        continue;
                    }
                    if let Err(e) = pool.flush() {
                        tracing::warn!(error = %e, "background commit failed (retried)");
                    }
                }
            })
            .map(|_| ())
    }

    /// Verifies the metadata: every reference inside the pool, every count matching the
    /// trees, no cluster owned at two virtual addresses. With `repair`, recounts and reclaims
    /// leaked clusters (and commits).
    pub fn check(&self, repair: bool) -> Result<CheckReport, Error> {
        let _commit = self.commit_guard();
        let mut s = self.lock();
        // Clusters taken by writes in flight without the lock are referenced by nothing yet:
        // a repair's recount would hand them out again. Let those writes finish first.
        while repair && self.unlocked_rounds.load(Ordering::Relaxed) > 0 {
            drop(s);
            std::thread::sleep(Duration::from_millis(1));
            s = self.lock();
        }
        let meta = &s.meta;
        let total = meta.clusters();
        let mut report = CheckReport {
            volumes: meta.volumes().count(),
            total_clusters: total as u64,
            ..CheckReport::default()
        };
        let mut owner: HashMap<u32, u64> = HashMap::new();
        for v in meta.volumes() {
            meta.for_each_entry(v.id, |vc, e| {
                if e.cluster >= total {
                    report
                        .problems
                        .push(format!("{}: cluster {} beyond the pool", v.name, e.cluster));
                    return;
                }
                match owner.insert(e.cluster, vc) {
                    Some(prev) if prev != vc => report.problems.push(format!(
                        "cluster {} mapped at virtual clusters {prev} and {vc}",
                        e.cluster
                    )),
                    _ => {}
                }
            });
        }
        let volumes: Vec<_> = meta.volumes().cloned().collect();
        let recount = Meta::from_volumes(total, volumes, meta.next_id())?;
        for c in 0..total {
            if recount.refs(c) < meta.refs(c) {
                report.leaked_clusters += 1;
            } else if recount.refs(c) > meta.refs(c) {
                report.problems.push(format!(
                    "cluster {c}: counted {} < {} references",
                    meta.refs(c),
                    recount.refs(c)
                ));
            }
        }
        report.used_clusters = recount.used_clusters() as u64;
        if repair && report.leaked_clusters > 0 && meta.pending().is_empty() {
            s.meta = recount;
            checkpoint(&self.dev, &mut s)?;
        }
        Ok(report)
    }
}

fn info(meta: &Meta, id: u64, io: &HashMap<u64, IoCounters>) -> Option<VolumeInfo> {
    let v = meta.volume_by_id(id)?;
    let h = meta.holdings(id);
    Some(VolumeInfo {
        id: v.id,
        name: v.name.clone(),
        kind: v.kind,
        parent: meta.volume_by_id(v.parent).map(|p| p.name.clone()),
        size: v.size,
        allocated: h.written_blocks * BLOCK_SIZE as u64,
        held: h.clusters * CLUSTER_SIZE as u64,
        exclusive: h.exclusive_clusters * CLUSTER_SIZE as u64,
        qos: v.qos,
        io: io.get(&v.id).copied().unwrap_or_default(),
    })
}

fn check_io(meta: &Meta, name: &str, offset: u64, len: usize, write: bool) -> Result<u64, Error> {
    let v = meta
        .volume(name)
        .ok_or_else(|| Error::NotFound(name.into()))?;
    if write && v.kind == Kind::Snapshot {
        return Err(Error::ReadOnly(name.into()));
    }
    if !offset.is_multiple_of(512) || !len.is_multiple_of(512) {
        return Err(Error::Invalid(format!(
            "{len} bytes at {offset}: offset and length must be multiples of 512"
        )));
    }
    if offset
        .checked_add(len as u64)
        .is_none_or(|end| end > v.size)
    {
        return Err(Error::OutOfRange(format!(
            "{len} bytes at {offset} of {name} ({} bytes)",
            v.size
        )));
    }
    Ok(v.id)
}

/// Where a cluster's byte lies on the device.
fn data_offset(sb: &Superblock, cluster: u32, in_cluster: usize) -> u64 {
    sb.data_start.get() * BLOCK_SIZE as u64
        + cluster as u64 * CLUSTER_SIZE as u64
        + in_cluster as u64
}

/// The error of a write request whose I/O failed.
fn write_error(req: &WriteRequest<'_>, e: std::io::Error) -> Error {
    Error::Io(
        format!(
            "writing {} bytes at {} of {}",
            req.data.len(),
            req.offset,
            req.volume
        ),
        e,
    )
}

/// Carries out planned writes in one go ([`submit_writes`]); if that fails, each plan again
/// on its own, so that only a bad one fails (its own error). Returns each plan's outcome.
fn submit_each<D: Device>(
    dev: &D,
    sb: &Superblock,
    reqs: &[WriteRequest<'_>],
    plans: &[(usize, WritePlan)],
) -> Vec<std::io::Result<()>> {
    match submit_writes(dev, sb, reqs, plans) {
        Ok(()) => plans.iter().map(|_| Ok(())).collect(),
        Err(e) if plans.len() == 1 => vec![Err(e)],
        Err(_) => plans
            .iter()
            .map(|one| submit_writes(dev, sb, reqs, std::slice::from_ref(one)))
            .collect(),
    }
}

/// Turns a read plan into requests on `buf` (zero spans are filled right away).
fn read_ops<'a>(sb: &Superblock, plan: &[ReadSpan], buf: &'a mut [u8], ops: &mut Vec<IoOp<'a>>) {
    let data_start = sb.data_start.get() * BLOCK_SIZE as u64;
    let mut rest: &mut [u8] = buf;
    let mut consumed = 0;
    for span in plan {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(span.at - consumed);
        let (head, tail) = tail.split_at_mut(span.len);
        rest = tail;
        consumed = span.at + span.len;
        match span.source {
            ReadSource::Data(at) => ops.push(IoOp::Read(data_start + at, head)),
            ReadSource::Zeros => head.fill(0),
        }
    }
}

/// Carries out the I/O of planned writes (`(request, plan)`) in at most two submissions: the
/// old content that partial blocks and copies on write need, into a cluster-sized buffer per
/// piece that needs one; then every write, whole blocks straight from the request's data,
/// the others from the buffer (partial blocks completed with old content or zeros).
fn submit_writes<D: Device>(
    dev: &D,
    sb: &Superblock,
    reqs: &[WriteRequest<'_>],
    plans: &[(usize, WritePlan)],
) -> std::io::Result<()> {
    let bs = BLOCK_SIZE;
    let pieces: Vec<(&[u8], &WritePiece)> = plans
        .iter()
        .flat_map(|(i, plan)| {
            plan.pieces
                .iter()
                .map(move |p| (&reqs[*i].data[p.at..p.at + p.len], p))
        })
        .collect();
    let mut buffers: Vec<Option<Vec<crate::device::Page>>> = pieces
        .iter()
        .map(|(_, p)| (p.buffered() != 0).then(|| crate::device::aligned_pages(CLUSTER_SIZE)))
        .collect();
    let mut reads = Vec::new();
    for ((_, p), buffer) in pieces.iter().zip(&mut buffers) {
        let Some(buffer) = buffer else { continue };
        let mut rest: &mut [u8] = buffer.as_mut_bytes();
        let mut consumed = 0;
        for (a, b) in runs(p.reads()) {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(a * bs - consumed);
            let (run, tail) = tail.split_at_mut((b - a) * bs);
            rest = tail;
            consumed = b * bs;
            reads.push(IoOp::Read(data_offset(sb, p.read_from(), a * bs), run));
        }
    }
    if !reads.is_empty() {
        dev.submit(&mut reads)?;
    }
    drop(reads);
    for ((data, p), buffer) in pieces.iter().zip(&mut buffers) {
        let Some(buffer) = buffer else { continue };
        let bytes = buffer.as_mut_bytes();
        for (a, b) in runs(p.partial()) {
            let (lo, hi) = ((a * bs).max(p.start), (b * bs).min(p.start + p.len));
            bytes[lo..hi].copy_from_slice(&data[lo - p.start..hi - p.start]);
        }
    }
    let mut writes = Vec::new();
    for ((data, p), buffer) in pieces.iter().zip(&buffers) {
        let cluster = p.cluster();
        for (a, b) in runs(p.covered()) {
            let run = &data[a * bs - p.start..b * bs - p.start];
            writes.push(IoOp::Write(data_offset(sb, cluster, a * bs), run));
        }
        if let Some(buffer) = buffer {
            let bytes = buffer.as_bytes();
            for (a, b) in runs(p.buffered()) {
                let run = &bytes[a * bs..b * bs];
                writes.push(IoOp::Write(data_offset(sb, cluster, a * bs), run));
            }
        }
    }
    if writes.is_empty() {
        return Ok(());
    }
    dev.submit(&mut writes)
}

/// A block of zeros, aligned for direct I/O.
static ZERO_BLOCK: crate::device::Page = crate::device::Page([0; BLOCK_SIZE]);

/// Tells the end of the journal from damage: replay stopped at `stop`. A crash can only leave
/// the last transaction incomplete (the next one starts after its flush), so a valid block of
/// a transaction that started after `stop`, or any block of a newer segment (written only
/// after a newer superblock was durable), means metadata was damaged, not cut short.
fn check_journal_end<D: Device>(dev: &D, sb: &Superblock, stop: u64) -> Result<(), Error> {
    let jb = sb.journal_blocks.get();
    let mut block = vec![0u8; BLOCK_SIZE];
    for i in 0..jb {
        let seq = stop + i;
        let at = (sb.journal_start.get() + seq % jb) * BLOCK_SIZE as u64;
        dev.read_at(at, &mut block)
            .map_err(io("reading the journal"))?;
        let Ok((h, _)) = crate::format::JournalHeader::read_from_prefix(&block[..]) else {
            continue;
        };
        let valid = h.magic == crate::format::JOURNAL_MAGIC
            && h.uuid == sb.uuid
            && h.crc.get() == crate::format::block_crc(&block, crate::format::JOURNAL_CRC_AT);
        if !valid {
            continue;
        }
        if h.epoch.get() > sb.generation.get() {
            return Err(Error::corrupt(
                Structure::Superblock,
                format!(
                    "generation {} is damaged (the journal has blocks of generation {})",
                    sb.generation.get() + 1,
                    h.epoch.get()
                ),
            ));
        }
        if i == 0 || h.epoch.get() != sb.generation.get() || h.seq.get() != seq {
            continue;
        }
        if h.txn_start.get() > stop {
            let jb = sb.journal_blocks.get();
            let damaged = (sb.journal_start.get() + stop % jb) * BLOCK_SIZE as u64;
            return Err(Error::corrupt_at(
                Structure::Journal,
                damaged,
                format!("block {stop} is damaged: later transactions follow it"),
            ));
        }
    }
    Ok(())
}

fn write_super<D: Device>(dev: &D, sb: &mut Superblock) -> Result<(), Error> {
    sb.crc = U32::new(0);
    let len = std::mem::size_of::<Superblock>();
    let mut block = vec![0u8; BLOCK_SIZE];
    block[..len].copy_from_slice(sb.as_bytes());
    let crc = crate::format::block_crc(&block[..len], SUPER_CRC_AT);
    sb.crc = U32::new(crc);
    block[..len].copy_from_slice(sb.as_bytes());
    let slot = sb.generation.get() % 2;
    dev.write_at(slot * BLOCK_SIZE as u64, &block)
        .map_err(io("writing the superblock"))
}

/// How a sealed transaction reaches the disk.
enum CommitIo {
    /// Its records as journal blocks (`image`), block i written at byte offset `at[i]`.
    Journal { image: Vec<u8>, at: Vec<u64> },
    /// A checkpoint of the metadata with it applied, then the superblock `sb` pointing there.
    Checkpoint {
        image: Vec<u8>,
        at: u64,
        sb: Superblock,
    },
}

/// Seals the running transaction (under the pool's lock) and prepares its I/O: its journal
/// blocks, or — when they would fill the journal past half — a checkpoint of the metadata as
/// of now. Returns the sealed records with it.
fn seal(s: &mut State) -> Result<(Vec<Record>, CommitIo), Error> {
    let seg = Segment {
        uuid: s.sb.uuid,
        epoch: s.sb.generation.get(),
    };
    let image = encode_txn(s.meta.pending(), s.next_seq, seg);
    let n = (image.len() / BLOCK_SIZE) as u64;
    let jb = s.sb.journal_blocks.get();
    let io = if s.journal_used + n > jb / 2 {
        let (image, sb) = checkpoint_image(s)?;
        let at = s.sb.ckpt_start[sb.active_ckpt.get() as usize].get() * BLOCK_SIZE as u64;
        CommitIo::Checkpoint { image, at, sb }
    } else {
        let at = (s.next_seq..s.next_seq + n)
            .map(|seq| (s.sb.journal_start.get() + seq % jb) * BLOCK_SIZE as u64)
            .collect();
        CommitIo::Journal { image, at }
    };
    Ok((s.meta.seal(), io))
}

/// The checkpoint of the metadata as it is now, and the superblock that switches to it.
fn checkpoint_image(s: &State) -> Result<(Vec<u8>, Superblock), Error> {
    let generation = s.sb.generation.get() + 1;
    let image = crate::checkpoint::write(&s.meta, generation);
    let used = (image.len() / BLOCK_SIZE) as u64;
    if used > s.sb.ckpt_blocks.get() {
        return Err(Error::NoSpace);
    }
    let mut sb = s.sb;
    sb.generation = U64::new(generation);
    sb.active_ckpt = U32::new(1 - s.sb.active_ckpt.get());
    sb.ckpt_generation = U64::new(generation);
    sb.ckpt_used = U64::new(used);
    sb.journal_seq = U64::new(s.next_seq);
    Ok((image, sb))
}

/// Writes a sealed transaction (no lock of the pool held): a flush for the data its records
/// point at, then its journal blocks or checkpoint and superblock, each followed by a flush.
fn write_sealed<D: Device>(dev: &D, commit: &mut CommitIo) -> Result<(), Error> {
    dev.flush().map_err(io("flushing data"))?;
    match commit {
        CommitIo::Journal { image, at } => {
            // The transaction's blocks in one submission (unordered until the flush).
            let mut ops: Vec<IoOp<'_>> = image
                .chunks(BLOCK_SIZE)
                .zip(at.iter())
                .map(|(b, at)| IoOp::Write(*at, b))
                .collect();
            dev.submit(&mut ops).map_err(io("writing the journal"))?;
            drop(ops);
            dev.flush().map_err(io("flushing the journal"))
        }
        CommitIo::Checkpoint { image, at, sb } => {
            dev.write_at(*at, image)
                .map_err(io("writing a checkpoint"))?;
            dev.flush().map_err(io("flushing a checkpoint"))?;
            write_super(dev, sb)?;
            dev.flush().map_err(io("flushing the superblock"))
        }
    }
}

/// Makes a written transaction the committed state (under the pool's lock).
fn sealed_done(s: &mut State, commit: CommitIo) {
    match commit {
        CommitIo::Journal { at, .. } => {
            s.next_seq += at.len() as u64;
            s.journal_used += at.len() as u64;
        }
        CommitIo::Checkpoint { sb, .. } => {
            s.sb = sb;
            s.journal_used = 0;
        }
    }
    s.meta.sealed_durable();
}

/// Writes the whole metadata to the inactive checkpoint area and switches to it (with the
/// pool's lock held throughout: creation, close, repair).
fn checkpoint<D: Device>(dev: &D, s: &mut State) -> Result<(), Error> {
    let (image, mut sb) = checkpoint_image(s)?;
    let at = s.sb.ckpt_start[sb.active_ckpt.get() as usize].get() * BLOCK_SIZE as u64;
    dev.write_at(at, &image)
        .map_err(io("writing a checkpoint"))?;
    dev.flush().map_err(io("flushing a checkpoint"))?;
    write_super(dev, &mut sb)?;
    dev.flush().map_err(io("flushing the superblock"))?;
    s.sb = sb;
    s.journal_used = 0;
    s.meta.committed();
    Ok(())
}

/// The most data clusters a pool whose checkpoint areas have `ckpt_blocks` blocks each may
/// grow to: its metadata must fit a checkpoint with room to spare — each mapping leaf (a block)
/// maps 512 clusters; an eighth of that density leaves room for leaves that snapshots and
/// clones unshare, and 64 blocks for the rest.
fn max_clusters(ckpt_blocks: u64) -> u64 {
    ckpt_blocks.saturating_sub(64) * FANOUT as u64 / 8
}

/// Number of clusters a volume of `size` bytes spans.
pub fn volume_clusters(size: u64) -> u64 {
    clusters_of(size)
}
