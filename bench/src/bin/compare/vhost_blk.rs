//! The `vhost-blk` suite: one VM-less vhost-user-blk client (libblkio) against vblock's export
//! and against `qemu-storage-daemon` exporting a raw file and a qcow2 (64 KiB clusters), all on
//! the same file system, one after the other in one run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testbeds::blk_client::BlkClient;
use vblock::uring::UringDevice;
use vblock::vhost_blk::{Export, ExportConfig};
use vblock::{Pool, PoolOptions};

use bench::XorShift;

use crate::Row;

const SIZE: u64 = 1 << 30;

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A qemu-storage-daemon serving `image` (`format` raw or qcow2) on `sock`; killed on drop.
struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qsd(image: &Path, format: &str, sock: &Path) -> Result<Qsd, String> {
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={},cache.direct=on,aio=io_uring",
            image.display()
        ))
        .arg("--blockdev")
        .arg(format!("driver={format},node-name=d,file=f"))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
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

/// The measurements of one target: random 4 KiB read QD1/QD32, overwrite QD32, 1 MiB
/// sequential read QD32 (filled data), in kIOPS / MiB/s.
fn measure(sock: &Path, secs: f64) -> Result<[f64; 4], String> {
    let e = |e: testbeds::Error| e.to_string();
    let mut c = BlkClient::connect(sock, 1, false).map_err(e)?;
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    let mut random = move |_| rng.next_u64() % (SIZE / 4096) * 4096;
    let rr1 = c.bench(0, false, 1, 4096, secs, &mut random) / 1000.0;
    let rr32 = c.bench(0, false, 32, 4096, secs, &mut random) / 1000.0;
    let rw32 = c.bench(0, true, 32, 4096, secs, &mut random) / 1000.0;
    let seq = c.bench(0, false, 32, 1 << 20, secs, |n| (n << 20) % SIZE);
    Ok([rr1, rr32, rw32, seq])
}

/// First writes into thin space: 4 KiB into a new 64 KiB cluster per request, QD32.
fn first_writes(sock: &Path, secs: f64) -> Result<f64, String> {
    let mut c = BlkClient::connect(sock, 1, false).map_err(|e| e.to_string())?;
    Ok(c.bench(0, true, 32, 4096, secs, |n| (n * 65536) % (64u64 << 30)) / 1000.0)
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
    let dir = Scratch(PathBuf::from(format!(
        "/var/tmp/lv-compare-vhost-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dir.0).map_err(|e| e.to_string())?;
    let e = |e: vblock::Error| e.to_string();

    eprintln!("vhost-blk: vblock ...");
    let dev = UringDevice::create(&dir.0.join("pool"), 16 * SIZE).map_err(e)?;
    let pool = Arc::new(Pool::create(dev, PoolOptions::default()).map_err(e)?);
    pool.create_volume("v", SIZE).map_err(e)?;
    pool.create_volume("thin", 64 << 30).map_err(e)?;
    let ours_sock = dir.0.join("ours.sock");
    let ours_thin = dir.0.join("thin.sock");
    let ours = {
        let _x =
            Export::start(pool.clone(), "v", &ours_sock, ExportConfig::default()).map_err(e)?;
        fill(&ours_sock)?;
        measure(&ours_sock, secs)?
    };
    let ours_first = {
        let _x =
            Export::start(pool.clone(), "thin", &ours_thin, ExportConfig::default()).map_err(e)?;
        first_writes(&ours_thin, secs)?
    };

    eprintln!("vhost-blk: qemu-storage-daemon raw ...");
    let raw = dir.0.join("raw.img");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(SIZE))
        .map_err(|e| e.to_string())?;
    let raw_sock = dir.0.join("raw.sock");
    let peer = {
        let _q = qsd(&raw, "raw", &raw_sock)?;
        fill(&raw_sock)?;
        measure(&raw_sock, secs)?
    };

    eprintln!("vhost-blk: qemu-storage-daemon qcow2 ...");
    let qcow = dir.0.join("thin.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
        .arg(&qcow)
        .arg((64u64 << 30).to_string())
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err("qemu-img create failed".into());
    }
    let qcow_sock = dir.0.join("qcow.sock");
    let peer_first = {
        let _q = qsd(&qcow, "qcow2", &qcow_sock)?;
        first_writes(&qcow_sock, secs)?
    };

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
