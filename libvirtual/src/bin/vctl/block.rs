//! `vctl pool|volume|snapshot|clone`: vblockd's pools, volumes, snapshots and clones.

use std::fs::File;
use std::path::PathBuf;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use libvirtual::Error;
use libvirtual::block::Client;
use libvirtual::image;
use vblock_api::diffstream::{Change, DiffWriter, next_change, read_header};
use vblock_api::{PoolInfo, PoolSpec, QosSpec, SpaceSpec, VolumeInfo, VolumeSpec, WhenFull};

use crate::{Output, done, emit};

/// Transfer unit of import and export.
const CHUNK: u64 = libvirtual::block::TRANSFER_CHUNK;

/// Parses a size: bytes, or with a K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 4096, 512M, 10G)"))
}

#[derive(Subcommand)]
pub enum PoolCmd {
    /// List pools.
    List,
    /// Show one pool.
    Show {
        /// The pool's name (see NAMES in `vctl --help`).
        name: String,
    },
    /// Serve a pool: with --size, create and format a new pool file at PATH; without, open the
    /// existing pool there.
    Create {
        /// The pool's name (see NAMES in `vctl --help`).
        name: String,
        /// The pool file (or block device); a relative path is taken from the current directory.
        path: PathBuf,
        /// Size of a new pool file (suffixes K M G T: 20G); without it the pool at PATH is opened.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// With --size: how the file's space is reserved, `falloc` (instant) or `full` (zeros
        /// written: slower to create, faster first writes into thin volumes).
        #[arg(long, default_value = "falloc", requires = "size")]
        preallocation: vblock_api::Preallocation,
        #[command(flatten)]
        space: SpaceArgs,
    },
    /// Grow a pool online (pools only grow): its file is extended and the new space is free at
    /// once; writes waiting for space (--when-full queue) go on.
    Resize {
        /// The pool's name (see NAMES in `vctl --help`).
        name: String,
        /// The pool's new size (suffixes K M G T: 40G), larger than now.
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Change what happens as a pool fills: the out-of-space policy and the low-water mark
    /// (live, and kept across restarts); options not given stay as they are.
    Space {
        /// The pool's name (see NAMES in `vctl --help`).
        name: String,
        #[command(flatten)]
        space: SpaceArgs,
    },
    /// Stop serving a pool (its file stays).
    Remove {
        /// The pool's name (see NAMES in `vctl --help`).
        name: String,
    },
    /// Verify a pool's metadata (and reclaim leaked space with --repair).
    Check {
        /// The pool's name (see NAMES in `vctl --help`).
        name: String,
        /// Reclaim leaked space (otherwise the check only reads).
        #[arg(long)]
        repair: bool,
    },
    /// Commit a pool now: everything written so far becomes durable.
    Flush {
        /// The pool's name (see NAMES in `vctl --help`).
        name: String,
    },
    /// vblockd's metrics (Prometheus text format).
    Metrics,
}

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// List volumes, snapshots and clones.
    List,
    /// Show one.
    Show {
        /// The volume, snapshot or clone.
        name: String,
    },
    /// Create a thin volume.
    Create {
        /// The volume's name.
        name: String,
        /// Virtual size (suffixes K M G T: 10G; a multiple of 512); thin: it may exceed the pool.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Delete a volume, snapshot or clone.
    Delete {
        /// The volume, snapshot or clone.
        name: String,
        /// Also when it has clients (a vhost-user-blk export, NBD connections): they are
        /// ended first.
        #[arg(long)]
        force: bool,
    },
    /// Grow a volume.
    Resize {
        /// The volume's name.
        name: String,
        /// The new, larger size (suffixes K M G T).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Set I/O limits (0: unlimited); they apply at once.
    Limit {
        /// The volume's name.
        name: String,
        /// Requests per second.
        #[arg(long, default_value_t = 0)]
        iops: u64,
        /// Bytes per second (suffixes allowed).
        #[arg(long, value_parser = parse_size, default_value = "0")]
        bps: u64,
    },
    /// Zero a range (whole 4 KiB blocks are released and read as zeros; the volume gets
    /// thinner), e.g. to wipe a volume: `--offset 0 --length SIZE`.
    Zero {
        /// The volume's name.
        name: String,
        /// Byte offset (suffixes allowed; a multiple of 512).
        #[arg(long, value_parser = parse_size, default_value = "0")]
        offset: u64,
        /// Bytes (suffixes allowed; a multiple of 512).
        #[arg(long, value_parser = parse_size)]
        length: u64,
    },
    /// Copy a disk image (raw or qcow2, found by its magic) into a volume, created with the
    /// image's virtual size if it does not exist. Thin: all-zero 4 KiB blocks and qcow2's
    /// unallocated clusters are not stored. Other formats (vmdk, vhdx, ...) are refused with
    /// the `qemu-img convert` command that makes them importable.
    Import {
        /// The volume to fill (created if it does not exist).
        name: String,
        /// The image file.
        file: PathBuf,
        /// Take the file as this format instead of finding it by its magic.
        #[arg(long, value_parser = ["raw", "qcow2"])]
        format: Option<String>,
    },
    /// Copy a volume or snapshot into a new image file, thin: a raw file is sparse where the
    /// volume reads zeros, a qcow2 image allocates only the clusters the volume holds data in.
    Export {
        /// The volume or snapshot to copy.
        name: String,
        /// The image file to write (replaced if it exists).
        file: PathBuf,
        /// Image format [default: qcow2 if FILE ends in .qcow2, else raw].
        #[arg(long, value_parser = ["raw", "qcow2"])]
        format: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// List snapshots.
    List,
    /// Show one snapshot.
    Show {
        /// The snapshot.
        name: String,
    },
    /// Take a snapshot of a volume.
    Create {
        /// The volume (or snapshot) to take it of.
        volume: String,
        /// The snapshot's name (e.g. golden@v1).
        name: String,
    },
    /// Delete a snapshot.
    Delete {
        /// The snapshot.
        name: String,
    },
    /// Write the blocks in which SNAPSHOT differs from --from (or all its data) to FILE: a diff
    /// stream that `diff-import` applies on another pool.
    DiffExport {
        /// The snapshot whose blocks are sent.
        snapshot: String,
        /// The stream file to write.
        file: PathBuf,
        /// The older snapshot the receiver already has.
        #[arg(long)]
        from: Option<String>,
    },
    /// Apply a diff stream to VOLUME (created from a full stream if it does not exist); the
    /// whole stream is checked before anything is written.
    DiffImport {
        /// The volume to apply it to.
        volume: String,
        /// The stream file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum VhostCmd {
    /// List vhost-user-blk exports.
    List,
    /// Export a volume (a snapshot read-only) on RUN_DIR/vhost/VOLUME.sock for QEMU's
    /// `-device vhost-user-blk-pci`.
    Create {
        /// The volume or snapshot.
        volume: String,
        /// Virtqueues (a worker thread and an io_uring ring each).
        #[arg(long, default_value_t = 1)]
        queues: usize,
    },
    /// Stop an export.
    Delete {
        /// The exported volume.
        volume: String,
    },
}

/// Runs a vhost command.
pub fn vhost(c: &Client, pool: &str, cmd: VhostCmd, out: Output) -> Result<(), Error> {
    let rows = |v: &Vec<vblock_api::VhostInfo>| {
        let mut rows = vec![
            ["POOL", "VOLUME", "QUEUES", "SOCKET"]
                .map(String::from)
                .to_vec(),
        ];
        rows.extend(v.iter().map(|e| {
            vec![
                e.pool.clone(),
                e.volume.clone(),
                e.queues.to_string(),
                e.socket.display().to_string(),
            ]
        }));
        rows
    };
    match cmd {
        VhostCmd::List => emit(out, &c.vhost_exports()?, rows),
        VhostCmd::Create { volume, queues } => {
            emit(out, &vec![c.export_vhost(pool, &volume, queues)?], rows)
        }
        VhostCmd::Delete { volume } => {
            c.unexport_vhost(pool, &volume)?;
            done(out, format!("stopped the vhost-user export of {volume}"));
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum CloneCmd {
    /// List clones (volumes made from a snapshot).
    List,
    /// Show one clone.
    Show {
        /// The clone.
        name: String,
    },
    /// Make a writable clone of a snapshot.
    Create {
        /// The snapshot to clone.
        snapshot: String,
        /// The new volume's name.
        name: String,
    },
    /// Delete a clone (the snapshot it came from stays).
    Delete {
        /// The clone.
        name: String,
    },
}

/// The clones among a pool's volumes: writable volumes whose parent is a snapshot.
fn clones(all: &[VolumeInfo]) -> Vec<VolumeInfo> {
    let is_snapshot = |name: &str| all.iter().any(|v| v.name == name && v.kind == "snapshot");
    all.iter()
        .filter(|v| v.kind == "volume" && v.parent.as_deref().is_some_and(is_snapshot))
        .cloned()
        .collect()
}

/// The clone `name`, or an error saying what it is instead.
fn one_clone(c: &Client, pool: &str, name: &str) -> Result<VolumeInfo, Error> {
    clones(&c.volumes(pool)?)
        .into_iter()
        .find(|v| v.name == name)
        .ok_or_else(|| match c.volume(pool, name) {
            Ok(_) => Error::Refused(format!("{name} is not a clone of a snapshot")),
            Err(e) => e,
        })
}

/// A pool's space settings on the command line.
#[derive(clap::Args, Debug, Default)]
pub struct SpaceArgs {
    /// What a write that needs new space does when the pool is full: `error` fails it at
    /// once (ENOSPC; a guest sees an I/O error), `queue` makes it wait for space (grow the
    /// pool with `vctl pool resize`) for up to --queue-timeout [default: error].
    #[arg(long, value_enum)]
    when_full: Option<WhenFullArg>,
    /// Seconds a write waits for space under `--when-full queue` before it fails
    /// [default: 60].
    #[arg(long, value_name = "SECS")]
    queue_timeout: Option<u64>,
    /// Free space below which the pool raises its low-water event (a log line, a metric,
    /// LOW in `vctl pool list`); suffixes K M G T; 0 for none [default: none].
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    low_water: Option<u64>,
}

/// `--when-full`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum WhenFullArg {
    /// Fail at once.
    Error,
    /// Wait for space, up to --queue-timeout.
    Queue,
}

impl SpaceArgs {
    /// `base` with the options given applied.
    fn apply(&self, base: SpaceSpec) -> SpaceSpec {
        SpaceSpec {
            when_full: match self.when_full {
                Some(WhenFullArg::Error) => WhenFull::Error,
                Some(WhenFullArg::Queue) => WhenFull::Queue,
                None => base.when_full,
            },
            queue_timeout: self.queue_timeout.unwrap_or(base.queue_timeout),
            low_water: self.low_water.unwrap_or(base.low_water),
        }
    }
}

pub(crate) fn human(bytes: u64) -> String {
    indicatif::BinaryBytes(bytes).to_string()
}

fn pool_rows(ps: &[PoolInfo]) -> Vec<Vec<String>> {
    let mut rows = vec![
        [
            "NAME",
            "PATH",
            "CAPACITY",
            "USED",
            "PENDING",
            "FREE",
            "VOLUMES",
            "WHEN-FULL",
            "LOW-WATER",
        ]
        .map(String::from)
        .to_vec(),
    ];
    rows.extend(ps.iter().map(|p| {
        vec![
            p.name.clone(),
            p.path.display().to_string(),
            human(p.capacity),
            human(p.used),
            human(p.pending_free),
            human(p.free),
            p.volumes.to_string(),
            match p.space.when_full {
                WhenFull::Error => "error".to_owned(),
                WhenFull::Queue => format!("queue {}s", p.space.queue_timeout),
            },
            match (p.space.low_water, p.below_low_water) {
                (0, _) => "-".to_owned(),
                (mark, false) => human(mark),
                (mark, true) => format!("{} LOW", human(mark)),
            },
        ]
    }));
    rows
}

fn volume_rows(vs: &[VolumeInfo]) -> Vec<Vec<String>> {
    let mut rows = vec![
        [
            "NAME",
            "KIND",
            "PARENT",
            "SIZE",
            "ALLOCATED",
            "HELD",
            "IOPS",
            "BPS",
            "READ",
            "WRITTEN",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let limit = |n: u64| {
        if n == 0 {
            "-".to_owned()
        } else {
            n.to_string()
        }
    };
    rows.extend(vs.iter().map(|v| {
        vec![
            v.name.clone(),
            v.kind.clone(),
            v.parent.clone().unwrap_or_else(|| "-".into()),
            human(v.size),
            human(v.allocated),
            human(v.held),
            limit(v.qos.iops),
            limit(v.qos.bps),
            human(v.io.read_bytes),
            human(v.io.written_bytes),
        ]
    }));
    rows
}

/// Runs a pool command.
pub fn pool(c: &Client, cmd: PoolCmd, out: Output) -> Result<(), Error> {
    match cmd {
        PoolCmd::List => emit(out, &c.pools()?, |v| pool_rows(v)),
        PoolCmd::Show { name } => emit(out, &vec![c.pool(&name)?], |v| pool_rows(v)),
        PoolCmd::Create {
            name,
            path,
            size,
            preallocation,
            space,
        } => {
            let path = std::path::absolute(&path).unwrap_or(path);
            let p = c.create_pool(&PoolSpec {
                name,
                path,
                size,
                preallocation,
                space: space.apply(SpaceSpec::default()),
            })?;
            emit(out, &vec![p], |v| pool_rows(v));
        }
        PoolCmd::Resize { name, size } => {
            emit(out, &vec![c.resize_pool(&name, size)?], |v| pool_rows(v))
        }
        PoolCmd::Space { name, space } => {
            let now = c.pool(&name)?.space;
            let p = c.set_pool_space(&name, &space.apply(now))?;
            emit(out, &vec![p], |v| pool_rows(v));
        }
        PoolCmd::Remove { name } => {
            c.remove_pool(&name)?;
            done(out, format!("pool {name} no longer served"));
        }
        PoolCmd::Flush { name } => {
            c.flush(&name)?;
            done(out, format!("pool {name} committed"));
        }
        PoolCmd::Metrics => print!("{}", c.metrics()?),
        PoolCmd::Check { name, repair } => {
            let r = c.check(&name, repair)?;
            emit(out, &r, |r| {
                let mut rows = vec![vec![
                    format!(
                        "pool {name}: {}",
                        if r.clean { "clean" } else { "PROBLEMS" }
                    ),
                    format!("{} volumes", r.volumes),
                    format!("{}/{} clusters used", r.used_clusters, r.total_clusters),
                    format!("{} leaked", r.leaked_clusters),
                ]];
                rows.extend(r.problems.iter().map(|p| vec![p.clone()]));
                rows
            });
            if !r.clean && !repair {
                return Err(Error::Api {
                    status: 200,
                    code: "check_failed".into(),
                    message: format!("pool {name} has problems"),
                });
            }
        }
    }
    Ok(())
}

fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// Names the file in a local error of an import or export.
fn in_file(e: Error, file: &std::path::Path) -> Error {
    match e {
        Error::File { what, source } => Error::File {
            what: format!("{}: {what}", file.display()),
            source,
        },
        e => e,
    }
}

fn local(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::File { what, source }
}

/// Runs a volume command.
pub fn volume(c: &Client, pool: &str, cmd: VolumeCmd, out: Output) -> Result<(), Error> {
    match cmd {
        VolumeCmd::List => emit(out, &c.volumes(pool)?, |v| volume_rows(v)),
        VolumeCmd::Show { name } => emit(out, &vec![c.volume(pool, &name)?], |v| volume_rows(v)),
        VolumeCmd::Create { name, size } => {
            let v = c.create_volume(pool, &VolumeSpec { name, size })?;
            emit(out, &vec![v], |v| volume_rows(v));
        }
        VolumeCmd::Delete { name, force } => {
            if force {
                c.delete_volume_force(pool, &name)?;
            } else {
                c.delete_volume(pool, &name)?;
            }
            done(out, format!("deleted {name}"));
        }
        VolumeCmd::Resize { name, size } => {
            emit(out, &vec![c.resize(pool, &name, size)?], |v| volume_rows(v))
        }
        VolumeCmd::Limit { name, iops, bps } => emit(
            out,
            &vec![c.set_qos(pool, &name, QosSpec { iops, bps })?],
            |v| volume_rows(v),
        ),
        VolumeCmd::Zero {
            name,
            offset,
            length,
        } => {
            c.write_zeroes(pool, &name, offset, length)?;
            emit(out, &vec![c.volume(pool, &name)?], |v| volume_rows(v));
        }
        VolumeCmd::Import { name, file, format } => {
            let format = format
                .map(|f| f.parse())
                .transpose()
                .map_err(Error::Refused)?;
            let format = match format {
                Some(f) => f,
                None => image::detect(&file)?,
            };
            let size = image::virtual_size(&file, format)?;
            let bar = progress(size, &format!("import {name}"));
            let v = image::import(c, pool, &name, &file, Some(format), &mut |n| {
                bar.set_position(n)
            })
            .map_err(|e| in_file(e, &file))?;
            bar.finish_and_clear();
            done(
                out,
                format!(
                    "imported {} ({}) into {name}: {} virtual, {} allocated",
                    file.display(),
                    match format {
                        image::Format::Raw => "raw",
                        image::Format::Qcow2 => "qcow2",
                    },
                    human(v.size),
                    human(v.allocated)
                ),
            );
        }
        VolumeCmd::Export { name, file, format } => {
            let format = match format {
                Some(f) => f.parse().map_err(Error::Refused)?,
                None if file.extension().is_some_and(|e| e == "qcow2") => image::Format::Qcow2,
                None => image::Format::Raw,
            };
            let size = c.volume(pool, &name)?.size;
            let bar = progress(size, &format!("export {name}"));
            image::export(c, pool, &name, &file, format, &mut |n| bar.set_position(n))
                .map_err(|e| in_file(e, &file))?;
            bar.finish_and_clear();
            done(
                out,
                format!(
                    "exported {name} ({size} bytes) to {} ({})",
                    file.display(),
                    match format {
                        image::Format::Raw => "raw",
                        image::Format::Qcow2 => "qcow2",
                    }
                ),
            );
        }
    }
    Ok(())
}

/// Runs a snapshot command.
pub fn snapshot(c: &Client, pool: &str, cmd: SnapshotCmd, out: Output) -> Result<(), Error> {
    match cmd {
        SnapshotCmd::List => {
            let snaps: Vec<VolumeInfo> = c
                .volumes(pool)?
                .into_iter()
                .filter(|v| v.kind == "snapshot")
                .collect();
            emit(out, &snaps, |v| volume_rows(v));
        }
        SnapshotCmd::Show { name } => {
            let v = c.volume(pool, &name)?;
            if v.kind != "snapshot" {
                return Err(Error::Refused(format!("{name} is not a snapshot")));
            }
            emit(out, &vec![v], |v| volume_rows(v));
        }
        SnapshotCmd::Create { volume, name } => {
            emit(out, &vec![c.snapshot(pool, &volume, &name)?], |v| {
                volume_rows(v)
            })
        }
        SnapshotCmd::DiffExport {
            snapshot,
            file,
            from,
        } => {
            let v = c.volume(pool, &snapshot)?;
            if v.kind != "snapshot" {
                return Err(Error::Refused(format!("{snapshot} is not a snapshot")));
            }
            let ranges = c.diff(pool, &snapshot, from.as_deref())?;
            let total: u64 = ranges.iter().filter(|r| !r.zero).map(|r| r.length).sum();
            let f = File::create(&file).map_err(local(format!("creating {}", file.display())))?;
            let werr = || local(format!("writing {}", file.display()));
            let mut w = DiffWriter::new(std::io::BufWriter::new(f), v.size, from.is_none())
                .map_err(werr())?;
            let bar = progress(total, &format!("diff {snapshot}"));
            let mut sent = 0;
            for r in &ranges {
                if r.zero {
                    w.push(&Change::Zero(r.offset, r.length)).map_err(werr())?;
                    continue;
                }
                let mut off = r.offset;
                while off < r.offset + r.length {
                    let n = (r.offset + r.length - off).min(CHUNK);
                    let data = c.read(pool, &snapshot, off, n)?;
                    w.push(&Change::Data(off, data)).map_err(werr())?;
                    off += n;
                    sent += n;
                    bar.set_position(sent);
                }
            }
            let f = w.finish().map_err(werr())?;
            f.into_inner()
                .map_err(|e| Error::File {
                    what: format!("writing {}", file.display()),
                    source: e.into_error(),
                })?
                .sync_all()
                .map_err(werr())?;
            bar.finish_and_clear();
            done(
                out,
                format!(
                    "{} ranges, {} of data from {snapshot}{} to {}",
                    ranges.len(),
                    human(total),
                    from.map(|f| format!(" (since {f})")).unwrap_or_default(),
                    file.display()
                ),
            );
        }
        SnapshotCmd::DiffImport { volume, file } => {
            let rerr = || local(format!("reading {}", file.display()));
            let open = || -> Result<_, Error> {
                let f = File::open(&file).map_err(rerr())?;
                Ok(std::io::BufReader::new(f))
            };
            // Pass 1: the whole stream is intact.
            let mut r = open()?;
            let mut crc = crc32fast::Hasher::new();
            let head = read_header(&mut r, &mut crc).map_err(rerr())?;
            let mut bytes = 0u64;
            while let Some(ch) = next_change(&mut r, &mut crc, head.size).map_err(rerr())? {
                if let Change::Data(_, d) = ch {
                    bytes += d.len() as u64;
                }
            }
            match c.volume(pool, &volume) {
                Ok(v) if v.size != head.size => {
                    return Err(Error::Refused(format!(
                        "{}: a diff of a {} byte volume, {volume} has {}",
                        file.display(),
                        head.size,
                        v.size
                    )));
                }
                Ok(_) => {}
                Err(Error::Api { code, .. }) if code == "not_found" && head.full => {
                    c.create_volume(
                        pool,
                        &VolumeSpec {
                            name: volume.clone(),
                            size: head.size,
                        },
                    )?;
                }
                Err(e) => return Err(e),
            }
            // Pass 2: apply.
            let bar = progress(bytes, &format!("apply to {volume}"));
            let mut r = open()?;
            let mut crc = crc32fast::Hasher::new();
            read_header(&mut r, &mut crc).map_err(rerr())?;
            let mut applied = 0;
            while let Some(ch) = next_change(&mut r, &mut crc, head.size).map_err(rerr())? {
                match ch {
                    Change::Data(off, d) => {
                        c.write(pool, &volume, off, &d)?;
                        applied += d.len() as u64;
                        bar.set_position(applied);
                    }
                    Change::Zero(off, len) => c.write_zeroes(pool, &volume, off, len)?,
                }
            }
            c.flush(pool)?;
            bar.finish_and_clear();
            done(
                out,
                format!("applied {} of data to {volume}", human(applied)),
            );
        }
        SnapshotCmd::Delete { name } => {
            let v = c.volume(pool, &name)?;
            if v.kind != "snapshot" {
                return Err(Error::Refused(format!("{name} is not a snapshot")));
            }
            c.delete_volume(pool, &name)?;
            done(out, format!("deleted snapshot {name}"));
        }
    }
    Ok(())
}

/// Runs a clone command.
pub fn clone(c: &Client, pool: &str, cmd: CloneCmd, out: Output) -> Result<(), Error> {
    match cmd {
        CloneCmd::List => emit(out, &clones(&c.volumes(pool)?), |v| volume_rows(v)),
        CloneCmd::Show { name } => emit(out, &vec![one_clone(c, pool, &name)?], |v| volume_rows(v)),
        CloneCmd::Create { snapshot, name } => {
            emit(out, &vec![c.clone_snapshot(pool, &snapshot, &name)?], |v| {
                volume_rows(v)
            })
        }
        CloneCmd::Delete { name } => {
            one_clone(c, pool, &name)?;
            c.delete_volume(pool, &name)?;
            done(out, format!("clone {name} deleted"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
