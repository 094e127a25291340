//! The `vhost-blk` suite: one VM-less vhost-user-blk client (libblkio) against vblock's export
//! and against `qemu-storage-daemon` exporting a raw file and a qcow2 (64 KiB clusters), all on
//! the same file system and all running at once. Each figure is measured in rounds that
//! alternate between the two sides (the shared disk of this machine drifts by tens of per
//! cent within a minute); the median of the rounds is reported.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testbeds::blk_client::BlkClient;
use testbeds::scratch::Scratch;
use vblock::uring::UringDevice;
use vblock::vhost_blk::{Export, ExportConfig};
use vblock::{Pool, PoolOptions};

use bench::XorShift;

use crate::Row;

const SIZE: u64 = 1 << 30;

/// A sparse raw image of `size` bytes for qemu-storage-daemon.
pub fn raw_image(path: &Path, size: u64) -> Result<(), String> {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .map_err(|e| format!("{}: {e}", path.display()))
}
/// A qemu-storage-daemon serving `image` (`format` raw or qcow2) on `sock`; killed on drop.
pub(crate) struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qsd(image: &Path, format: &str, sock: &Path) -> Result<Qsd, String> {
    let export = format!(
        "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},writable=on",
        sock.display()
    );
    qsd_with(image, format, &[], &export, sock)
}

/// A qemu-storage-daemon with node `d` (`format` over `image`, O_DIRECT, io_uring), the
/// `extra` arguments and the `--export` given, ready once `sock` accepts connections.
pub(crate) fn qsd_with(
    image: &Path,
    format: &str,
    extra: &[String],
    export: &str,
    sock: &Path,
) -> Result<Qsd, String> {
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={},cache.direct=on,aio=io_uring",
            image.display()
        ))
        .arg("--blockdev")
        .arg(format!("driver={format},node-name=d,file=f"))
        .args(extra)
        .arg("--export")
        .arg(export)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("qemu-storage-daemon: {e}"))?;
    let q = Qsd(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if Instant::now() > deadline {
            return Err("qemu-storage-daemon did not come up".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(q)
}

/// Rounds per figure.
const ROUNDS: usize = 3;

/// One data-path figure of a target (`which`: random read QD1, random read QD32, random
/// overwrite QD32 in kIOPS, 1 MiB sequential read QD32 in MiB/s).
fn measure(c: &mut BlkClient, which: usize, secs: f64, rng: &mut XorShift) -> f64 {
    let mut random = |_| rng.next_u64() % (SIZE / 4096) * 4096;
    match which {
        0 => c.bench(0, false, 1, 4096, secs, &mut random) / 1000.0,
        1 => c.bench(0, false, 32, 4096, secs, &mut random) / 1000.0,
        2 => c.bench(0, true, 32, 4096, secs, &mut random) / 1000.0,
        _ => c.bench(0, false, 32, 1 << 20, secs, |n| (n << 20) % SIZE),
    }
}

/// First writes into thin space: 4 KiB into a new 64 KiB cluster per request, QD32, from
/// cluster `*next` on (advanced past the clusters used, so that the next round continues the
/// same sweep into fresh space).
fn first_writes(c: &mut BlkClient, next: &mut u64, secs: f64) -> f64 {
    let base = *next;
    let used = std::cell::Cell::new(0u64);
    let kiops = c.bench(0, true, 32, 4096, secs, |n| {
        used.set(used.get().max(n + 1));
        (base + n) * 65536
    }) / 1000.0;
    *next += used.get();
    kiops
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Alternates `ours` and `peer` for `ROUNDS` rounds (who goes first alternates too) and
/// returns both medians.
pub(crate) fn rounds(
    mut ours: impl FnMut(usize) -> f64,
    mut peer: impl FnMut(usize) -> f64,
) -> (f64, f64) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        if r % 2 == 0 {
            a.push(ours(r));
            b.push(peer(r));
        } else {
            b.push(peer(r));
            a.push(ours(r));
        }
    }
    (median(a), median(b))
}

/// Fills a target with data (1 MiB writes) so that reads hit allocated blocks.
fn fill(sock: &Path) -> Result<(), String> {
    let mut c = BlkClient::connect(sock, 1, false).map_err(|e| e.to_string())?;
    c.mem()[..1 << 20].fill(0x5a);
    for off in (0..SIZE).step_by(1 << 20) {
        if c.write(0, off, 0, 1 << 20) != 0 {
            return Err(format!("fill failed at {off}"));
        }
    }
    c.flush(0);
    Ok(())
}

/// Runs the suite with `secs` per measurement.
pub fn suite(secs: f64) -> Result<Vec<Row>, String> {
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-compare-vhost").map_err(|e| e.to_string())?;
    let e = |e: vblock::Error| e.to_string();

    eprintln!("vhost-blk: setting up vblock and qemu-storage-daemon (raw, qcow2) ...");
    let dev = UringDevice::create(&dir.join("pool"), 12 * SIZE).map_err(e)?;
    let pool = Arc::new(Pool::create(dev, PoolOptions::default()).map_err(e)?);
    // Commits in the background, as in vblockd.
    pool.start_committer(vblock::DEFAULT_COMMIT_INTERVAL)
        .map_err(|e| e.to_string())?;
    pool.create_volume("v", SIZE).map_err(e)?;
    pool.create_volume("thin", 64 << 30).map_err(e)?;
    let ours_sock = dir.join("ours.sock");
    let ours_thin = dir.join("thin.sock");
    let _ours = Export::start(pool.clone(), "v", &ours_sock, ExportConfig::default()).map_err(e)?;
    let _ours_thin =
        Export::start(pool.clone(), "thin", &ours_thin, ExportConfig::default()).map_err(e)?;
    let raw = dir.join("raw.img");
    raw_image(&raw, SIZE)?;
    let raw_sock = dir.join("raw.sock");
    let _raw = qsd(&raw, "raw", &raw_sock)?;
    let qcow = dir.join("thin.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
        .arg(&qcow)
        .arg((64u64 << 30).to_string())
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err("qemu-img create failed".into());
    }
    let qcow_sock = dir.join("qcow.sock");
    let _qcow = qsd(&qcow, "qcow2", &qcow_sock)?;
    fill(&ours_sock)?;
    fill(&raw_sock)?;
    let connect = |sock: &Path| BlkClient::connect(sock, 1, false).map_err(|e| e.to_string());
    let (mut ours_c, mut raw_c) = (connect(&ours_sock)?, connect(&raw_sock)?);
    let mut ours = [0.0; 4];
    let mut peer = [0.0; 4];
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    for which in 0..4 {
        eprintln!("vhost-blk: figure {} of 5 ...", which + 1);
        let mut rng2 = XorShift(rng.next_u64() | 1);
        (ours[which], peer[which]) = rounds(
            |_| measure(&mut ours_c, which, secs, &mut rng),
            |_| measure(&mut raw_c, which, secs, &mut rng2),
        );
    }
    eprintln!("vhost-blk: figure 5 of 5 ...");
    let (mut ours_t, mut qcow_c) = (connect(&ours_thin)?, connect(&qcow_sock)?);
    // Shorter rounds, one sweep into fresh space per side (the pool is 12 GiB).
    let first_secs = secs * 0.3;
    let (mut ours_next, mut qcow_next) = (0, 0);
    let (ours_first, peer_first) = rounds(
        |_| first_writes(&mut ours_t, &mut ours_next, first_secs),
        |_| first_writes(&mut qcow_c, &mut qcow_next, first_secs),
    );

    let raw_name = "qemu-storage-daemon raw";
    Ok(vec![
        Row {
            name: "vhost_blk/randread_4k_qd1",
            ours: ours[0],
            peer: peer[0],
            peer_name: raw_name,
            unit: "kIOPS",
        },
        Row {
            name: "vhost_blk/randread_4k_qd32",
            ours: ours[1],
            peer: peer[1],
            peer_name: raw_name,
            unit: "kIOPS",
        },
        Row {
            name: "vhost_blk/overwrite_4k_qd32",
            ours: ours[2],
            peer: peer[2],
            peer_name: raw_name,
            unit: "kIOPS",
        },
        Row {
            name: "vhost_blk/seq_read_1m_qd32",
            ours: ours[3],
            peer: peer[3],
            peer_name: raw_name,
            unit: "MiB/s",
        },
        Row {
            name: "vhost_blk/first_write_4k_qd32",
            ours: ours_first,
            peer: peer_first,
            peer_name: "qemu-storage-daemon qcow2 64K",
            unit: "kIOPS",
        },
    ])
}
