//! The `block` suite: vblock's engine (a pool file on io_uring with O_DIRECT, driven by one
//! thread per request in flight) against fio on a raw file through io_uring (the bound) and
//! `qemu-img bench` on qcow2 with 64 KiB clusters, all on the same file system. The engine
//! and fio are measured in three rounds alternating between the two (medians), as the disk's
//! speed drifts within a minute.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vblock::device::AlignedBuf;
use vblock::uring::UringDevice;
use vblock::{Error, Pool, PoolOptions};

use bench::XorShift;
use testbeds::scratch::Scratch;

use crate::Row;

const DATA: u64 = 1 << 30;
const THIN: u64 = 64 << 30;

/// What one measurement issues.
#[derive(Clone, Copy)]
enum Pattern {
    RandRead4k,
    RandWrite4k,
    SeqRead1m,
    SeqWrite1m,
    /// 4 KiB writes, each into a cluster never written before.
    FirstWrite4k,
}

impl Pattern {
    fn fio(self) -> (&'static str, &'static str) {
        match self {
            Pattern::RandRead4k => ("randread", "4k"),
            Pattern::RandWrite4k | Pattern::FirstWrite4k => ("randwrite", "4k"),
            Pattern::SeqRead1m => ("read", "1m"),
            Pattern::SeqWrite1m => ("write", "1m"),
        }
    }

    fn bytes(self) -> u64 {
        match self {
            Pattern::SeqRead1m | Pattern::SeqWrite1m => 1 << 20,
            _ => 4096,
        }
    }
}

/// Random 4 KiB reads at queue depth `qd`: two threads (one per core), each submitting
/// batches of `qd / 2` requests, as a device queue's worker hands them over.
fn ours_batched_reads(pool: &Arc<Pool<UringDevice>>, volume: &str, qd: usize, secs: f64) -> f64 {
    let ops = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let per = (qd / 2).max(1);
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let (pool, ops, stop) = (pool.clone(), ops.clone(), stop.clone());
            let volume = volume.to_owned();
            std::thread::spawn(move || {
                let mut rng = XorShift(0x2545_f491_4f6c_dd1d ^ (t + 1));
                let mut bufs: Vec<AlignedBuf> = (0..per).map(|_| AlignedBuf::new(4096)).collect();
                while !stop.load(Ordering::Relaxed) {
                    let mut reqs: Vec<vblock::ReadRequest<'_>> = bufs
                        .iter_mut()
                        .map(|b| vblock::ReadRequest {
                            volume: &volume,
                            offset: rng.next_u64() % (DATA / 4096) * 4096,
                            buf: &mut b[..],
                        })
                        .collect();
                    pool.read_batch(&mut reqs).expect("batched read");
                    ops.fetch_add(per as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    ops.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Runs `pattern` on `volume` with `qd` threads for `secs`; returns operations per second.
/// Random reads deeper than 1 go through [`ours_batched_reads`].
fn ours(
    pool: &Arc<Pool<UringDevice>>,
    volume: &str,
    pattern: Pattern,
    qd: usize,
    secs: f64,
) -> f64 {
    if matches!(pattern, Pattern::RandRead4k) && qd > 1 {
        return ours_batched_reads(pool, volume, qd, secs);
    }
    let ops = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let next_cluster = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..qd)
        .map(|t| {
            let (pool, ops, stop, next_cluster) = (
                pool.clone(),
                ops.clone(),
                stop.clone(),
                next_cluster.clone(),
            );
            let volume = volume.to_owned();
            std::thread::spawn(move || {
                let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ ((t as u64 + 1) * 0x1234_5678));
                let size = pattern.bytes() as usize;
                let mut buf = AlignedBuf::new(size);
                buf.fill((t as u8) | 1);
                let mut seq = (t as u64 * (DATA / qd as u64)) / (1 << 20) * (1 << 20);
                while !stop.load(Ordering::Relaxed) {
                    let r = match pattern {
                        Pattern::RandRead4k => {
                            pool.read(&volume, rng.next_u64() % (DATA / 4096) * 4096, &mut buf)
                        }
                        Pattern::RandWrite4k => {
                            pool.write(&volume, rng.next_u64() % (DATA / 4096) * 4096, &buf)
                        }
                        Pattern::SeqRead1m | Pattern::SeqWrite1m => {
                            seq = (seq + (1 << 20)) % DATA;
                            if matches!(pattern, Pattern::SeqRead1m) {
                                pool.read(&volume, seq, &mut buf)
                            } else {
                                pool.write(&volume, seq, &buf)
                            }
                        }
                        Pattern::FirstWrite4k => {
                            // Clusters in a scattered order, each written once.
                            let n = next_cluster.fetch_add(1, Ordering::Relaxed);
                            let cluster = n.wrapping_mul(0x9E37_79B1) % (THIN / 65536);
                            pool.write(&volume, cluster * 65536, &buf)
                        }
                    };
                    match r {
                        Ok(()) => {
                            ops.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(Error::NoSpace) => return,
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    ops.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// fio on a raw file with io_uring and O_DIRECT; operations per second.
fn fio(file: &Path, pattern: Pattern, qd: usize, secs: f64) -> Result<f64, String> {
    let (rw, bs) = pattern.fio();
    let out = Command::new("fio")
        .args([
            "--name=bound",
            &format!("--filename={}", file.display()),
            &format!("--size={DATA}"),
            "--ioengine=io_uring",
            "--direct=1",
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={qd}"),
            "--time_based",
            &format!("--runtime={}", secs.ceil() as u64),
            "--output-format=json",
        ])
        .output()
        .map_err(|e| format!("fio: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("fio output: {e}"))?;
    let job = &v["jobs"][0];
    let dir = if rw.contains("read") { "read" } else { "write" };
    job[dir]["iops"]
        .as_f64()
        .ok_or_else(|| format!("fio: no {dir} IOPS"))
}

/// `qemu-img bench` writing 4 KiB into a new cluster per request of a fresh qcow2 (64 KiB
/// clusters); operations per second.
fn qemu_first_write(dir: &Path, qd: usize, count: u64) -> Result<f64, String> {
    let img = dir.join(format!("first-{qd}.qcow2"));
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
        .arg(&img)
        .arg(THIN.to_string())
        .status()
        .map_err(|e| format!("qemu-img: {e}"))?;
    if !status.success() {
        return Err("qemu-img create failed".into());
    }
    let out = Command::new("qemu-img")
        .args([
            "bench", "-f", "qcow2", "-t", "none", "-i", "io_uring", "-w", "-s", "4096", "-S",
            "65536",
        ])
        .args(["-d", &qd.to_string(), "-c", &count.to_string()])
        .arg(&img)
        .output()
        .map_err(|e| format!("qemu-img bench: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "Run completed in 1.234 seconds."
    let secs: f64 = text
        .split("Run completed in ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            format!(
                "qemu-img bench: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let _ = std::fs::remove_file(&img);
    Ok(count as f64 / secs)
}

/// Runs the suite with `secs` per measurement.
pub fn suite(secs: f64) -> Result<Vec<Row>, String> {
    // /tmp may be a tmpfs elsewhere; O_DIRECT needs a real file system: prefer /var/tmp.
    let base = if Path::new("/var/tmp").is_dir() {
        PathBuf::from("/var/tmp")
    } else {
        std::env::temp_dir()
    };
    let dir = Scratch::new(&base, "lv-compare-block").map_err(|e| e.to_string())?;
    let e = |e: Error| e.to_string();
    eprintln!("block: preparing a pool with a 1 GiB volume ...");
    // Sparse: only written blocks take disk space. First writes take a 64 KiB cluster each.
    let dev = UringDevice::create(&dir.join("pool"), DATA * 16).map_err(e)?;
    let pool = Arc::new(Pool::create(dev, PoolOptions::default()).map_err(e)?);
    // Commits in the background, as in vblockd.
    pool.start_committer(vblock::DEFAULT_COMMIT_INTERVAL)
        .map_err(|e| e.to_string())?;
    pool.create_volume("data", DATA).map_err(e)?;
    let chunk = vec![0x5au8; 1 << 20];
    for off in (0..DATA).step_by(1 << 20) {
        pool.write("data", off, &chunk).map_err(e)?;
    }
    pool.flush().map_err(e)?;
    let raw = dir.join("raw.img");
    // fio lays out the raw file itself (written once, so reads hit allocated blocks).
    fio(&raw, Pattern::SeqWrite1m, 32, 1.0)?;

    let mut rows = Vec::new();
    let measure =
        |name: &'static str, p: Pattern, qd: usize, unit: &'static str| -> Result<Row, String> {
            eprintln!("block: {name} ...");
            let scale = if unit == "MiB/s" {
                p.bytes() as f64 / (1 << 20) as f64
            } else {
                1.0 / 1000.0
            };
            // Rounds alternating between the two sides (the disk drifts by tens of per cent
            // within a minute); medians.
            let mut failed = None;
            let (o, b) = crate::vhost_blk::rounds(
                |_| ours(&pool, "data", p, qd, secs) * scale,
                |_| match fio(&raw, p, qd, secs) {
                    Ok(v) => v * scale,
                    Err(e) => {
                        failed.get_or_insert(e);
                        0.0
                    }
                },
            );
            if let Some(e) = failed {
                return Err(e);
            }
            Ok(Row {
                name,
                ours: o,
                peer: b,
                peer_name: "fio raw file (io_uring)",
                unit,
            })
        };
    rows.push(measure(
        "block/randread_4k_qd1",
        Pattern::RandRead4k,
        1,
        "kIOPS",
    )?);
    rows.push(measure(
        "block/randread_4k_qd32",
        Pattern::RandRead4k,
        32,
        "kIOPS",
    )?);
    rows.push(measure(
        "block/overwrite_4k_qd1",
        Pattern::RandWrite4k,
        1,
        "kIOPS",
    )?);
    rows.push(measure(
        "block/overwrite_4k_qd32",
        Pattern::RandWrite4k,
        32,
        "kIOPS",
    )?);
    rows.push(measure(
        "block/seq_read_1m_qd1",
        Pattern::SeqRead1m,
        1,
        "MiB/s",
    )?);
    rows.push(measure(
        "block/seq_read_1m_qd32",
        Pattern::SeqRead1m,
        32,
        "MiB/s",
    )?);
    rows.push(measure(
        "block/seq_write_1m_qd1",
        Pattern::SeqWrite1m,
        1,
        "MiB/s",
    )?);
    rows.push(measure(
        "block/seq_write_1m_qd32",
        Pattern::SeqWrite1m,
        32,
        "MiB/s",
    )?);
    let overwrite_qd32 = rows[3].ours;

    // First writes into thin space, against qcow2 allocating clusters.
    for (name, qd) in [
        ("block/first_write_4k_qd1", 1),
        ("block/first_write_4k_qd32", 32),
    ] {
        eprintln!("block: {name} ...");
        pool.create_volume("thin", THIN).map_err(e)?;
        let o = ours(&pool, "thin", Pattern::FirstWrite4k, qd, secs) / 1000.0;
        pool.delete("thin").map_err(e)?;
        pool.flush().map_err(e)?;
        let count = ((o * 1000.0 * secs) as u64).clamp(2000, 200_000);
        let q = qemu_first_write(dir.path(), qd, count)? / 1000.0;
        rows.push(Row {
            name,
            ours: o,
            peer: q,
            peer_name: "qemu-img bench qcow2 64K",
            unit: "kIOPS",
        });
    }
    let first_qd32 = rows.last().map_or(0.0, |r| r.ours);
    rows.push(Row {
        name: "block/first_write_vs_overwrite_qd32",
        ours: first_qd32,
        peer: overwrite_qd32,
        peer_name: "ours, overwrite",
        unit: "kIOPS",
    });

    // Read cost at snapshot depth 100 (each snapshot followed by a write, so the trees differ).
    eprintln!("block: snapshot depth 0 vs 100 ...");
    let depth0 = ours(&pool, "data", Pattern::RandRead4k, 32, secs) / 1000.0;
    for i in 0..100u64 {
        pool.snapshot("data", &format!("s{i}")).map_err(e)?;
        pool.write("data", (i * 7919 % (DATA / 65536)) * 65536, &chunk[..4096])
            .map_err(e)?;
    }
    pool.flush().map_err(e)?;
    let depth100 = ours(&pool, "data", Pattern::RandRead4k, 32, secs) / 1000.0;
    rows.push(Row {
        name: "block/randread_4k_qd32_depth100",
        ours: depth100,
        peer: depth0,
        peer_name: "ours, depth 0",
        unit: "kIOPS",
    });
    Ok(rows)
}
