//! vblockd's control logic: pools opened on io_uring devices, volume operations made durable
//! before they are acknowledged, the list of pools persisted atomically.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use daemon_kit::ApiError;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::api::{
    CheckInfo, CloneSpec, DataRange, IoInfo, MAX_TRANSFER, PoolInfo, PoolSpec, QosSpec,
    SnapshotSpec, SpaceSpec, Unrestored, VhostInfo, VhostSpec, VolumeInfo, VolumeSpec, WhenFull,
};
use crate::format::CLUSTER_SIZE;
use crate::uring::UringDevice;
use crate::vhost_blk::{Export, ExportConfig};
use crate::{Change, Error, Kind, Pool, PoolOptions, Qos};

type Result<T> = std::result::Result<T, ApiError>;

/// Maps store errors to API errors: what the caller can fix is 4xx, with the system's
/// reason (a missing file, no permission, a file in the way); only our own failures are 500.
pub fn api_error(e: Error) -> ApiError {
    use std::io::ErrorKind;
    let m = e.to_string();
    match e {
        Error::NotFound(_) => ApiError::NotFound(m),
        Error::Exists(_) | Error::ReadOnly(_) | Error::InUse(_) => ApiError::Conflict(m),
        Error::Invalid(_) | Error::OutOfRange(_) | Error::NotAPool(_) => ApiError::Invalid(m),
        Error::NoSpace => ApiError::NoSpace(m),
        Error::Io(_, ref err) => match err.kind() {
            ErrorKind::NotFound => ApiError::NotFound(m),
            ErrorKind::AlreadyExists => ApiError::Conflict(m),
            ErrorKind::PermissionDenied
            | ErrorKind::ReadOnlyFilesystem
            | ErrorKind::IsADirectory
            | ErrorKind::InvalidInput
            | ErrorKind::FileTooLarge => ApiError::Invalid(m),
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => ApiError::NoSpace(m),
            _ => ApiError::Internal(m),
        },
        Error::Corrupt(_) | Error::Commit(_) => ApiError::Internal(m),
    }
}

/// An open pool.
pub struct PoolHandle {
    /// Name and path.
    pub spec: PoolSpec,
    /// The pool (shared with its vhost-user exports).
    pub pool: Arc<Pool<UringDevice>>,
    /// The queue timeout set (kept while the policy is `error`, for the settings shown).
    queue_timeout: Mutex<u64>,
}

impl std::fmt::Debug for PoolHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolHandle")
            .field("spec", &self.spec)
            .finish()
    }
}

fn volume_info(v: crate::VolumeInfo) -> VolumeInfo {
    VolumeInfo {
        name: v.name,
        kind: match v.kind {
            Kind::Volume => "volume".into(),
            Kind::Snapshot => "snapshot".into(),
        },
        parent: v.parent,
        size: v.size,
        allocated: v.allocated,
        held: v.held,
        exclusive: v.exclusive,
        qos: QosSpec {
            iops: v.qos.iops,
            bps: v.qos.bps,
        },
        io: IoInfo {
            reads: v.io.reads,
            read_bytes: v.io.read_bytes,
            writes: v.io.writes,
            written_bytes: v.io.written_bytes,
            releases: v.io.releases,
        },
    }
}

impl PoolHandle {
    fn info(&self) -> PoolInfo {
        let r = self.pool.space_report();
        let bytes = |clusters: u64| clusters * CLUSTER_SIZE as u64;
        PoolInfo {
            name: self.spec.name.clone(),
            path: self.spec.path.clone(),
            capacity: bytes(r.clusters),
            free: bytes(r.free),
            used: bytes(r.used),
            pending_free: bytes(r.pending_free),
            volumes: self.pool.list().len(),
            space: self.space(),
            below_low_water: r.below_low_water,
            low_water_events: r.low_water_events,
            queued_writes: r.queued_writes,
            refused_writes: r.refused_writes,
        }
    }

    /// The pool's space settings as they are.
    fn space(&self) -> SpaceSpec {
        let (when_full, queue_timeout) = match self.pool.when_full() {
            crate::WhenFull::Error => (
                WhenFull::Error,
                *self.queue_timeout.lock().unwrap_or_else(|p| p.into_inner()),
            ),
            crate::WhenFull::Queue(t) => (WhenFull::Queue, t.as_secs()),
        };
        SpaceSpec {
            when_full,
            queue_timeout,
            low_water: self.pool.space_report().low_water * CLUSTER_SIZE as u64,
        }
    }

    /// Applies space settings (live).
    fn set_space(&self, space: SpaceSpec) {
        *self.queue_timeout.lock().unwrap_or_else(|p| p.into_inner()) = space.queue_timeout;
        self.pool.set_when_full(match space.when_full {
            WhenFull::Error => crate::WhenFull::Error,
            WhenFull::Queue => {
                crate::WhenFull::Queue(std::time::Duration::from_secs(space.queue_timeout))
            }
        });
        self.pool.set_low_water(space.low_water);
    }

    /// Grows the pool online to `size` bytes.
    pub fn grow(&self, size: u64) -> Result<PoolInfo> {
        self.pool.grow(size).map_err(api_error)?;
        Ok(self.info())
    }

    /// Changes the pool's configuration and commits it before answering: if the commit
    /// fails (no space for the journal on the host file system, say), the change is taken
    /// back before the error is answered — neither listed, nor in the way of a retry, nor
    /// there after a restart; a deleted volume is still there, a size or limit unchanged.
    fn durable(&self, what: &str, change: Change<'_>) -> Result<()> {
        match self.pool.change(change) {
            Ok(()) => {
                tracing::info!(pool = %self.spec.name, "{what}");
                Ok(())
            }
            Err(e) => {
                if !matches!(
                    e,
                    Error::NotFound(_) | Error::Exists(_) | Error::Invalid(_) | Error::ReadOnly(_)
                ) {
                    tracing::warn!(pool = %self.spec.name, error = %e, "not done: {what}");
                }
                Err(api_error(e))
            }
        }
    }

    /// All volumes, snapshots and clones.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        self.pool.list().into_iter().map(volume_info).collect()
    }

    /// One of them.
    pub fn volume(&self, name: &str) -> Result<VolumeInfo> {
        self.pool.volume(name).map(volume_info).map_err(api_error)
    }

    /// Creates a thin volume.
    pub fn create_volume(&self, spec: &VolumeSpec) -> Result<VolumeInfo> {
        self.durable(
            &format!("volume {} created", spec.name),
            Change::Create {
                name: &spec.name,
                size: spec.size,
            },
        )?;
        self.volume(&spec.name)
    }

    /// Deletes a volume, snapshot or clone.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        self.durable(&format!("{name} deleted"), Change::Delete { name })
    }

    /// Grows a volume.
    pub fn resize(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        self.durable(
            &format!("{name} resized to {size}"),
            Change::Resize { name, size },
        )?;
        self.volume(name)
    }

    /// Sets I/O limits (live).
    pub fn set_qos(&self, name: &str, q: QosSpec) -> Result<VolumeInfo> {
        let qos = Qos {
            iops: q.iops,
            bps: q.bps,
        };
        self.durable(&format!("{name} limits set"), Change::SetQos { name, qos })?;
        self.volume(name)
    }

    /// Takes a snapshot.
    pub fn snapshot(&self, spec: &SnapshotSpec) -> Result<VolumeInfo> {
        self.durable(
            &format!("snapshot {} of {}", spec.name, spec.source),
            Change::Snapshot {
                source: &spec.source,
                name: &spec.name,
            },
        )?;
        self.volume(&spec.name)
    }

    /// Clones a snapshot.
    pub fn clone_snapshot(&self, spec: &CloneSpec) -> Result<VolumeInfo> {
        self.durable(
            &format!("clone {} of {}", spec.name, spec.snapshot),
            Change::Clone {
                snapshot: &spec.snapshot,
                name: &spec.name,
            },
        )?;
        self.volume(&spec.name)
    }

    /// Where `to` differs from `from` (or from nothing).
    pub fn diff(&self, from: Option<&str>, to: &str) -> Result<Vec<crate::DiffRange>> {
        self.pool.diff(from, to).map_err(api_error)
    }

    /// Commits everything written so far.
    pub fn flush(&self) -> Result<()> {
        self.pool.flush().map_err(api_error)
    }

    /// Verifies the pool (and reclaims leaks with `repair`).
    pub fn check(&self, repair: bool) -> Result<CheckInfo> {
        let r = self.pool.check(repair).map_err(api_error)?;
        Ok(CheckInfo {
            clean: r.is_clean(),
            volumes: r.volumes,
            used_clusters: r.used_clusters,
            total_clusters: r.total_clusters,
            leaked_clusters: r.leaked_clusters,
            problems: r.problems,
        })
    }

    /// Reads `range.length` bytes (default: to the end, at most [`MAX_TRANSFER`]).
    pub fn read(&self, name: &str, range: DataRange) -> Result<Vec<u8>> {
        let size = self.pool.volume(name).map_err(api_error)?.size;
        let len = range
            .length
            .unwrap_or_else(|| size.saturating_sub(range.offset))
            .min(MAX_TRANSFER);
        let mut buf = vec![0u8; len as usize];
        self.pool
            .read(name, range.offset, &mut buf)
            .map_err(api_error)?;
        Ok(buf)
    }

    /// Zeroes `range.length` bytes at `range.offset` (whole 4 KiB blocks are released);
    /// durable after the next flush.
    pub fn write_zeroes(&self, name: &str, range: DataRange) -> Result<()> {
        let len = range
            .length
            .ok_or_else(|| ApiError::Invalid("length is required".into()))?;
        self.pool
            .write_zeroes(name, range.offset, len)
            .map_err(api_error)
    }

    /// Writes `data` at `offset`; durable after the next flush, like a disk.
    pub fn write(&self, name: &str, offset: u64, data: &[u8]) -> Result<()> {
        if data.len() as u64 > MAX_TRANSFER {
            return Err(ApiError::Invalid(format!(
                "{} bytes: at most {MAX_TRANSFER} per request",
                data.len()
            )));
        }
        self.pool.write(name, offset, data).map_err(api_error)
    }
}

/// Everything vblockd persists: the pools it serves.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// Format version.
    pub version: u32,
    /// Pools, by creation order.
    pub pools: Vec<PoolSpec>,
    /// vhost-user-blk exports: (pool, volume, settings).
    #[serde(default)]
    pub vhost: Vec<(String, String, VhostSpec)>,
}

/// The daemon's control plane.
pub struct Control {
    pools: BTreeMap<String, Arc<PoolHandle>>,
    /// Running exports by volume name (the socket's name).
    exports: BTreeMap<String, (VhostInfo, Export)>,
    state: State,
    path: PathBuf,
    run_dir: PathBuf,
    commit_interval: std::time::Duration,
    /// The NBD server's connections (set once it runs).
    nbd: Option<Arc<dyn crate::nbd::Connections>>,
    /// Saved pools and exports that could not be restored: kept in the state, reported
    /// (`GET /v1/unrestored`), retried.
    unrestored: Vec<(Kept, String)>,
    /// Restoring: nothing is saved until everything was tried (a crash then loses nothing).
    restoring: bool,
}

/// A saved object kept while it cannot be restored.
#[derive(Clone, Debug)]
enum Kept {
    Pool(PoolSpec),
    Vhost(String, String, VhostSpec),
}

impl Kept {
    fn kind(&self) -> &'static str {
        match self {
            Kept::Pool(_) => "pool",
            Kept::Vhost(..) => "vhost",
        }
    }

    fn name(&self) -> String {
        match self {
            Kept::Pool(p) => p.name.clone(),
            Kept::Vhost(pool, volume, _) => format!("{pool}/{volume}"),
        }
    }
}

/// Version of vblockd's state file.
const STATE_VERSION: u32 = 1;

/// Space settings within bounds: a queue timeout of 1 s to 1 day.
/// Whether a space policy is one vblockd takes (timeouts and low-water mark in range).
pub fn check_space(space: &SpaceSpec) -> Result<()> {
    if !(1..=86_400).contains(&space.queue_timeout) {
        return Err(ApiError::Invalid(format!(
            "queue_timeout {}: between 1 and 86400 seconds",
            space.queue_timeout
        )));
    }
    Ok(())
}

fn check_pool_name(name: &str) -> Result<()> {
    daemon_kit::names::check_name("pool", name).map_err(ApiError::Invalid)
}

/// A pool path must be absolute (a relative one would depend on the daemon's working
/// directory) and its directory must exist.
fn check_pool_path(path: &Path) -> Result<()> {
    if !path.is_absolute() {
        return Err(ApiError::Invalid(format!(
            "pool path {}: give an absolute path (the daemon does not share your working \
             directory)",
            path.display()
        )));
    }
    match path.parent() {
        Some(dir) if !dir.is_dir() => Err(ApiError::Invalid(format!(
            "pool path {}: the directory {} does not exist; create it first",
            path.display(),
            dir.display()
        ))),
        _ => Ok(()),
    }
}

impl Control {
    /// Opens the pools saved in `state_dir` and those of the config; returns the control plane
    /// and the problems of pools that could not be opened (they are kept in the state).
    pub fn restore(
        state_dir: &Path,
        run_dir: &Path,
        configured: &[PoolSpec],
        commit_interval: std::time::Duration,
    ) -> std::io::Result<(Control, Vec<String>)> {
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join("vblockd.json");
        let saved: State = daemon_kit::load_state(&path)?;
        if saved.version > STATE_VERSION {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{}: state version {} is newer than this vblockd understands ({STATE_VERSION}); \
                     refusing to start rather than drop what it holds (run the newer vblockd, \
                     or move the file away)",
                    path.display(),
                    saved.version
                ),
            ));
        }
        let mut control = Control {
            pools: BTreeMap::new(),
            exports: BTreeMap::new(),
            nbd: None,
            unrestored: Vec::new(),
            restoring: true,
            state: State {
                version: STATE_VERSION,
                pools: saved.pools.clone(),
                vhost: Vec::new(),
            },
            path,
            run_dir: run_dir.to_owned(),
            commit_interval,
        };
        let mut problems = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for spec in saved.pools.iter().chain(configured) {
            if !seen.insert(spec.name.clone()) {
                continue;
            }
            let open = PoolSpec {
                size: None,
                ..spec.clone()
            };
            match control.open(open) {
                Ok(h) => {
                    control.pools.insert(spec.name.clone(), h);
                }
                Err(e) => {
                    problems.push(format!("pool {}: {}", spec.name, e.message()));
                    // A saved pool stays in the state (a configured one is in the config).
                    if saved.pools.iter().any(|p| p.name == spec.name) {
                        control
                            .unrestored
                            .push((Kept::Pool(spec.clone()), e.message().to_owned()));
                    }
                }
            }
        }
        // Exports come back at the same socket paths: QEMU (`reconnect=`) re-attaches.
        for (pool, volume, spec) in saved.vhost {
            if let Err(e) = control.export(&pool, &volume, spec.clone()) {
                problems.push(format!("vhost export of {pool}/{volume}: {}", e.message()));
                control
                    .state
                    .vhost
                    .push((pool.clone(), volume.clone(), spec.clone()));
                control
                    .unrestored
                    .push((Kept::Vhost(pool, volume, spec), e.message().to_owned()));
            }
        }
        control.restoring = false;
        control
            .save()
            .map_err(|e| std::io::Error::other(e.message().to_owned()))?;
        Ok((control, problems))
    }

    /// Saved pools and exports that could not be restored, with why.
    pub fn unrestored(&self) -> Vec<Unrestored> {
        self.unrestored
            .iter()
            .map(|(item, error)| Unrestored {
                kind: item.kind().into(),
                name: item.name(),
                error: error.clone(),
            })
            .collect()
    }

    /// Tries the saved pools and exports that could not be restored again (a file system
    /// mounted late, say); returns how many are still not restored.
    pub fn retry_unrestored(&mut self) -> usize {
        let pending = std::mem::take(&mut self.unrestored);
        for (item, _) in pending {
            let what = format!("{} {}", item.kind(), item.name());
            let retried = match &item {
                Kept::Pool(spec) => self
                    .open(PoolSpec {
                        size: None,
                        ..spec.clone()
                    })
                    .map(|h| {
                        self.pools.insert(spec.name.clone(), h);
                    }),
                Kept::Vhost(pool, volume, spec) => {
                    let kept = self.state.vhost.clone();
                    self.state.vhost.retain(|(_, v, _)| v != volume);
                    let done = self.export(pool, volume, spec.clone()).map(|_| ());
                    if done.is_err() {
                        self.state.vhost = kept;
                    }
                    done
                }
            };
            match retried {
                Ok(()) => tracing::info!(object = %what, "restored on retry"),
                Err(e) => self.unrestored.push((item, e.message().to_owned())),
            }
        }
        self.unrestored.len()
    }

    /// Exports a volume (a snapshot read-only) as vhost-user-blk on
    /// `RUN_DIR/vhost/<volume>.sock`.
    pub fn export(&mut self, pool: &str, volume: &str, spec: VhostSpec) -> Result<VhostInfo> {
        let h = self.pool(pool)?;
        h.pool.volume(volume).map_err(api_error)?;
        if let Some((info, _)) = self.exports.get(volume) {
            return Err(ApiError::Conflict(format!(
                "{volume} is exported already (from pool {})",
                info.pool
            )));
        }
        let dir = self.run_dir.join("vhost");
        daemon_kit::SocketAccess::create_dir(&dir)
            .map_err(|e| ApiError::Internal(format!("{}: {e}", dir.display())))?;
        let socket = dir.join(format!("{volume}.sock"));
        let cfg = ExportConfig {
            queues: spec.queues,
        };
        let export = Export::start(h.pool.clone(), volume, &socket, cfg).map_err(api_error)?;
        let info = VhostInfo {
            pool: pool.into(),
            volume: volume.into(),
            socket,
            queues: spec.queues,
            connections: 0,
            resubmitted: 0,
        };
        self.exports.insert(volume.into(), (info.clone(), export));
        self.state.vhost.retain(|(_, v, _)| v != volume);
        self.state.vhost.push((pool.into(), volume.into(), spec));
        self.save()?;
        tracing::info!(pool, volume, socket = %info.socket.display(), "vhost-user-blk export");
        Ok(info)
    }

    /// Stops exporting a volume.
    pub fn unexport(&mut self, volume: &str) -> Result<()> {
        self.exports
            .remove(volume)
            .ok_or_else(|| ApiError::NotFound(format!("{volume} is not exported")))?;
        self.state.vhost.retain(|(_, v, _)| v != volume);
        self.save()?;
        tracing::info!(volume, "vhost-user-blk export stopped");
        Ok(())
    }

    /// Running exports.
    pub fn exports(&self) -> Vec<VhostInfo> {
        self.exports
            .values()
            .map(|(i, export)| {
                let stats = export.stats();
                VhostInfo {
                    connections: stats.connections,
                    resubmitted: stats.resubmitted,
                    ..i.clone()
                }
            })
            .collect()
    }

    /// Tells the control plane about the NBD server's connections (deletes look at them).
    pub fn set_nbd(&mut self, connections: Arc<dyn crate::nbd::Connections>) {
        self.nbd = Some(connections);
    }

    /// Deletes a volume, snapshot or clone of `pool`. One with clients — a vhost-user-blk
    /// export or NBD connections — is refused (409, naming them) unless `force`, which first
    /// stops the export and ends the connections. Connections are bound to the volume's
    /// identity, so none of them can reach a later volume of the same name either way.
    pub fn delete_volume(&mut self, pool: &str, volume: &str, force: bool) -> Result<()> {
        let h = self.pool(pool)?;
        let id = h.pool.volume(volume).map_err(api_error)?.id;
        let exported = matches!(self.exports.get(volume), Some((info, _)) if info.pool == pool);
        let clients = self
            .nbd
            .as_ref()
            .map(|n| n.clients_of(crate::nbd::pool_key(&h.pool), id))
            .unwrap_or_default();
        if !force && (exported || !clients.is_empty()) {
            let mut users = Vec::new();
            if exported {
                users.push("a vhost-user-blk export (VMs)".to_owned());
            }
            if !clients.is_empty() {
                users.push(format!("NBD clients ({})", clients.join("; ")));
            }
            return Err(ApiError::Conflict(format!(
                "{volume} is in use by {}: stop them, or delete with force (which ends them)",
                users.join(" and ")
            )));
        }
        if exported {
            self.unexport(volume)?;
        }
        if let Some(n) = &self.nbd {
            let ended = n.disconnect(crate::nbd::pool_key(&h.pool), id);
            if ended > 0 {
                tracing::warn!(
                    pool,
                    volume,
                    connections = ended,
                    "NBD clients disconnected by a forced delete"
                );
            }
        }
        h.delete_volume(volume)
    }

    fn open(&self, spec: PoolSpec) -> Result<Arc<PoolHandle>> {
        check_pool_path(&spec.path)?;
        let pool = match spec.size {
            Some(size) => {
                if spec.path.exists() {
                    return Err(ApiError::Conflict(format!(
                        "{} exists: open it without a size, or remove it",
                        spec.path.display()
                    )));
                }
                Pool::<UringDevice>::check_size(size, &PoolOptions::default())
                    .map_err(api_error)?;
                // A create that fails leaves nothing behind (a retry must not find a file).
                let made = UringDevice::create_preallocated(&spec.path, size, spec.preallocation)
                    .and_then(|dev| Pool::create(dev, PoolOptions::default()));
                match made {
                    Ok(pool) => pool,
                    Err(e) => {
                        let _ = std::fs::remove_file(&spec.path);
                        return Err(api_error(e));
                    }
                }
            }
            None => {
                let dev = UringDevice::open(&spec.path).map_err(api_error)?;
                Pool::open(dev).map_err(|e| match e {
                    Error::NotAPool(m) => ApiError::Invalid(format!(
                        "{}: not a vblock pool ({m}); to make a new pool there give a size \
                         (and a path where no file is)",
                        spec.path.display()
                    )),
                    e => api_error(e),
                })?
            }
        };
        let r = pool.recovery();
        if r.transactions > 0 {
            tracing::info!(
                pool = %spec.name,
                transactions = r.transactions,
                records = r.records,
                ms = r.elapsed.as_millis() as u64,
                "journal replayed: the pool was not closed cleanly"
            );
        }
        let pool = Arc::new(pool);
        pool.start_committer(self.commit_interval)
            .map_err(|e| ApiError::Internal(format!("starting the committer: {e}")))?;
        let h = PoolHandle {
            spec: PoolSpec {
                size: None,
                preallocation: Default::default(),
                ..spec
            },
            pool,
            queue_timeout: Mutex::new(spec.space.queue_timeout),
        };
        h.set_space(spec.space);
        Ok(Arc::new(h))
    }

    fn save(&self) -> Result<()> {
        if self.restoring {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(&self.state)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        daemon_kit::save_atomic(&self.path, &bytes)
            .map_err(|e| ApiError::Internal(format!("saving state: {e}")))
    }

    /// All open pools.
    pub fn pools(&self) -> Vec<PoolInfo> {
        self.pools.values().map(|h| h.info()).collect()
    }

    /// An open pool.
    pub fn pool(&self, name: &str) -> Result<Arc<PoolHandle>> {
        self.pools
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("no pool {name}")))
    }

    /// Changes a pool's space settings (live, and kept).
    pub fn set_pool_space(&mut self, name: &str, space: SpaceSpec) -> Result<PoolInfo> {
        check_space(&space)?;
        let h = self.pool(name)?;
        let before = h.space();
        h.set_space(space);
        if let Some(p) = self.state.pools.iter_mut().find(|p| p.name == name) {
            p.space = space;
        }
        if let Err(e) = self.save() {
            h.set_space(before);
            if let Some(p) = self.state.pools.iter_mut().find(|p| p.name == name) {
                p.space = before;
            }
            return Err(e);
        }
        tracing::info!(pool = %name, when_full = ?space.when_full, queue_timeout = space.queue_timeout, low_water = space.low_water, "space settings");
        Ok(h.info())
    }

    /// Creates (with a size) or opens a pool and serves it from now on.
    pub fn create_pool(&mut self, spec: PoolSpec) -> Result<PoolInfo> {
        check_pool_name(&spec.name)?;
        check_space(&spec.space)?;
        if self.pools.contains_key(&spec.name) {
            return Err(ApiError::Conflict(format!("pool {} exists", spec.name)));
        }
        // The same file under any spelling of its path (a symlink, `..`): by identity.
        let identity = std::fs::metadata(&spec.path).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        });
        if let Some(h) = self.pools.values().find(|h| {
            h.spec.path == spec.path
                || (identity.is_some() && h.pool.device().identity().ok() == identity)
        }) {
            return Err(ApiError::Conflict(format!(
                "{} is served already: it is pool {} (as {})",
                spec.path.display(),
                h.spec.name,
                h.spec.path.display()
            )));
        }
        let h = self.open(spec.clone())?;
        let info = h.info();
        self.pools.insert(spec.name.clone(), h);
        self.state.pools.retain(|p| p.name != spec.name);
        self.state.pools.push(PoolSpec {
            size: None,
            preallocation: Default::default(),
            ..spec.clone()
        });
        self.save()?;
        tracing::info!(pool = %spec.name, path = %spec.path.display(), "pool served");
        Ok(info)
    }

    /// Stops serving a pool (closing it cleanly); its file stays.
    pub fn remove_pool(&mut self, name: &str) -> Result<()> {
        let before = self.unrestored.len();
        self.unrestored.retain(|(item, _)| match item {
            Kept::Pool(p) => p.name != name,
            Kept::Vhost(pool, ..) => pool != name,
        });
        if self.unrestored.len() != before && !self.pools.contains_key(name) {
            // Never restored: it goes with what was kept of it.
            self.state.pools.retain(|p| p.name != name);
            self.state.vhost.retain(|(p, _, _)| p != name);
            self.save()?;
            tracing::info!(pool = name, "unrestored pool no longer served");
            return Ok(());
        }
        let h = self
            .pools
            .remove(name)
            .ok_or_else(|| ApiError::NotFound(format!("no pool {name}")))?;
        self.state.pools.retain(|p| p.name != name);
        self.exports.retain(|_, (info, _)| info.pool != name);
        self.state.vhost.retain(|(p, _, _)| p != name);
        self.save()?;
        close(h);
        tracing::info!(pool = name, "pool no longer served");
        Ok(())
    }

    /// Closes every pool cleanly (journal folded into a checkpoint).
    pub fn close_all(&mut self) {
        self.exports.clear();
        for (_, h) in std::mem::take(&mut self.pools) {
            close(h);
        }
    }

    /// Prometheus text exposition.
    pub fn metrics(&self) -> Result<String> {
        type Labels = Vec<(String, String)>;
        let mut reg = Registry::with_prefix("vblock");
        let capacity = Family::<Labels, Gauge>::default();
        let free = Family::<Labels, Gauge>::default();
        let no_space = Family::<Labels, Counter>::default();
        let used = Family::<Labels, Gauge>::default();
        let pending_free = Family::<Labels, Gauge>::default();
        let below_low_water = Family::<Labels, Gauge>::default();
        let low_water_events = Family::<Labels, Counter>::default();
        let queued = Family::<Labels, Counter>::default();
        let held = Family::<Labels, Gauge>::default();
        let exclusive = Family::<Labels, Gauge>::default();
        let size = Family::<Labels, Gauge>::default();
        let allocated = Family::<Labels, Gauge>::default();
        let reads = Family::<Labels, Counter>::default();
        let read_bytes = Family::<Labels, Counter>::default();
        let writes = Family::<Labels, Counter>::default();
        let write_bytes = Family::<Labels, Counter>::default();
        let releases = Family::<Labels, Counter>::default();
        for h in self.pools.values() {
            let info = h.info();
            let pl = vec![("pool".to_owned(), info.name.clone())];
            capacity.get_or_create(&pl).set(info.capacity as i64);
            free.get_or_create(&pl).set(info.free as i64);
            no_space.get_or_create(&pl).inc_by(info.refused_writes);
            used.get_or_create(&pl).set(info.used as i64);
            pending_free
                .get_or_create(&pl)
                .set(info.pending_free as i64);
            below_low_water
                .get_or_create(&pl)
                .set(i64::from(info.below_low_water));
            low_water_events
                .get_or_create(&pl)
                .inc_by(info.low_water_events);
            queued.get_or_create(&pl).inc_by(info.queued_writes);
            for v in h.volumes() {
                let vl = vec![
                    ("pool".to_owned(), info.name.clone()),
                    ("volume".to_owned(), v.name.clone()),
                ];
                size.get_or_create(&vl).set(v.size as i64);
                allocated.get_or_create(&vl).set(v.allocated as i64);
                held.get_or_create(&vl).set(v.held as i64);
                exclusive.get_or_create(&vl).set(v.exclusive as i64);
                let s = v.io;
                reads.get_or_create(&vl).inc_by(s.reads);
                read_bytes.get_or_create(&vl).inc_by(s.read_bytes);
                writes.get_or_create(&vl).inc_by(s.writes);
                write_bytes.get_or_create(&vl).inc_by(s.written_bytes);
                releases.get_or_create(&vl).inc_by(s.releases);
            }
        }
        reg.register("pool_capacity_bytes", "Data space of a pool", capacity);
        reg.register("pool_free_bytes", "Free data space of a pool", free);
        reg.register(
            "pool_no_space_writes",
            "Writes refused because the pool was full (ENOSPC)",
            no_space,
        );
        reg.register(
            "pool_used_bytes",
            "Data space holding data of some volume",
            used,
        );
        reg.register(
            "pool_pending_free_bytes",
            "Data space freed by changes not yet committed",
            pending_free,
        );
        reg.register(
            "pool_below_low_water",
            "1 while free space is below the pool's low-water mark",
            below_low_water,
        );
        reg.register(
            "pool_low_water_events",
            "Times free space dropped below the low-water mark",
            low_water_events,
        );
        reg.register(
            "pool_queued_writes",
            "Writes that found the pool full and waited for space",
            queued,
        );
        if let Some(nbd) = &self.nbd {
            let connections = Family::<Labels, Counter>::default();
            for (result, n) in nbd.counters() {
                connections
                    .get_or_create(&vec![("result".to_owned(), result.to_owned())])
                    .inc_by(n);
            }
            reg.register(
                "nbd_connections",
                "NBD connections by outcome: accepted, refused (allow-list), timed_out (no \
                 export chosen in time), shed (closed at once: out of file descriptors)",
                connections,
            );
        }
        reg.register("volume_size_bytes", "Virtual size of a volume", size);
        reg.register(
            "volume_allocated_bytes",
            "Bytes written: 4 KiB blocks holding data",
            allocated,
        );
        reg.register(
            "volume_held_bytes",
            "Pool space a volume holds: the clusters it maps",
            held,
        );
        reg.register(
            "volume_exclusive_bytes",
            "Pool space only this volume holds (freed by deleting it)",
            exclusive,
        );
        reg.register("volume_reads", "Read requests", reads);
        reg.register("volume_read_bytes", "Bytes read", read_bytes);
        reg.register("volume_writes", "Write requests", writes);
        reg.register("volume_written_bytes", "Bytes written", write_bytes);
        reg.register(
            "volume_releases",
            "Discard and write-zeroes requests",
            releases,
        );
        let mut out = String::new();
        encode(&mut out, &reg).map_err(|e| ApiError::Internal(e.to_string()))?;
        let _ = writeln!(out);
        Ok(out)
    }
}

fn close(h: Arc<PoolHandle>) {
    match Arc::try_unwrap(h).map(|h| (Arc::try_unwrap(h.pool), h.spec.name)) {
        Ok((Ok(pool), name)) => {
            if let Err(e) = pool.close() {
                tracing::error!(pool = %name, error = %e, "closing the pool");
            }
        }
        Ok((Err(pool), _)) => {
            let _ = pool.flush();
        }
        // Still in use by a request: it is flushed; the journal is folded at the next open.
        Err(h) => {
            let _ = h.pool.flush();
        }
    }
}

/// vblockd's NBD exports: every volume and snapshot of every open pool, as `VOLUME` (when
/// only one pool has that name) or `POOL/VOLUME`.
pub struct NbdCatalog(pub Arc<Mutex<Control>>);

impl crate::nbd::Exports for NbdCatalog {
    type Dev = crate::uring::UringDevice;

    fn find(&self, name: &str) -> Option<crate::nbd::Target<Self::Dev>> {
        let c = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let target = |h: &Arc<PoolHandle>, volume: &str| {
            h.pool.volume(volume).ok().map(|v| crate::nbd::Target {
                pool: h.pool.clone(),
                // Bound to the volume's identity, not its name.
                volume: format!("#{}", v.id),
                name: format!("{}/{volume}", h.spec.name),
            })
        };
        if let Some((pool, volume)) = name.split_once('/')
            && let Some(h) = c.pools.get(pool)
        {
            return target(h, volume);
        }
        let mut found = c.pools.values().filter_map(|h| target(h, name));
        let first = found.next()?;
        // A name in two pools is ambiguous: only POOL/VOLUME selects it.
        found.next().is_none().then_some(first)
    }

    fn names(&self) -> Vec<String> {
        let c = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut names = Vec::new();
        for (pool, h) in &c.pools {
            for v in h.pool.list() {
                names.push(format!("{pool}/{}", v.name));
            }
        }
        names
    }
}
