//! The `nbd` suite: fio's `nbd` engine (libnbd) against vblock's NBD export and against
//! `qemu-storage-daemon` exporting a qcow2 (64 KiB clusters) and a raw file over NBD, all on
//! one file system, in rounds that alternate between the sides (medians reported):
//! 4 KiB random writes into thin space (fresh volume / fresh qcow2 each round) and 4 KiB
//! random reads of written data at QD 32, and 1 MiB sequential reads and writes.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use testbeds::scratch::Scratch;
use vblock::device::Preallocation;
use vblock::nbd::{NbdServer, PoolExports};
use vblock::uring::UringDevice;
use vblock::{Pool, PoolOptions};

use crate::Row;
use crate::vhost_blk::{Qsd, qsd_with, raw_image, rounds};

const SIZE: u64 = 1 << 30;

/// Runs fio for `secs` (0: one pass over the size) on `uri` (`rw`, block size `bs`, depth
/// 32); returns IOPS (4 KiB) or MiB/s (1 MiB).
fn fio(uri: &str, rw: &str, bs: &str, secs: f64) -> Result<f64, String> {
    let out = Command::new("fio")
        .args([
            "--name=nbd",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            "--iodepth=32",
            &format!("--size={SIZE}"),
            "--randrepeat=0",
            "--output-format=json",
        ])
        // secs 0: the whole size once (a sweep), else that long.
        .args(if secs > 0.0 {
            vec![
                "--time_based".to_owned(),
                format!("--runtime={}ms", (secs * 1000.0) as u64),
            ]
        } else {
            Vec::new()
        })
        .output()
        .map_err(|e| format!("fio: {e}"))?;
    // The nbd engine prints "fio: connected to NBD server" before the JSON.
    let json = out
        .stdout
        .iter()
        .position(|b| *b == b'{')
        .map_or(&out.stdout[..0], |i| &out.stdout[i..]);
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|_| {
        format!(
            "fio {rw} on {uri}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    let job = &v["jobs"][0];
    let side = if rw.contains("write") {
        "write"
    } else {
        "read"
    };
    if job["error"].as_i64().unwrap_or(0) != 0 {
        return Err(format!("fio {rw} on {uri}: error {}", job["error"]));
    }
    Ok(if bs == "4k" {
        job[side]["iops"].as_f64().unwrap_or(0.0)
    } else {
        job[side]["bw"].as_f64().unwrap_or(0.0) / 1024.0
    })
}

/// qemu-storage-daemon exporting `image` as NBD export `d` on `sock`.
fn qsd_nbd(image: &Path, format: &str, sock: &Path) -> Result<Qsd, String> {
    let extra = vec![
        "--nbd-server".to_owned(),
        format!("addr.type=unix,addr.path={}", sock.display()),
    ];
    qsd_with(
        image,
        format,
        &extra,
        "type=nbd,id=e,node-name=d,writable=on",
        sock,
    )
}

fn qcow2(path: &Path) -> Result<(), String> {
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
        .arg(path)
        .arg(SIZE.to_string())
        .status()
        .map_err(|e| e.to_string())?
        .success();
    ok.then_some(())
        .ok_or_else(|| "qemu-img create failed".to_owned())
}

/// Runs the suite with `secs` per measurement.
pub fn suite(secs: f64) -> Result<Vec<Row>, String> {
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-compare-nbd").map_err(|e| e.to_string())?;
    let e = |e: vblock::Error| e.to_string();
    eprintln!("nbd: setting up vblock and qemu-storage-daemon (raw, qcow2) ...");
    // The pool file fully preallocated (zeros written), as an operator would for a pool
    // that takes first writes into thin volumes (`vctl pool create --preallocation full`).
    let dev = UringDevice::create_preallocated(&dir.join("pool"), 8 * SIZE, Preallocation::Full)
        .map_err(e)?;
    let pool = Arc::new(Pool::create(dev, PoolOptions::default()).map_err(e)?);
    // Commits in the background, as in vblockd.
    pool.start_committer(vblock::DEFAULT_COMMIT_INTERVAL)
        .map_err(|e| e.to_string())?;
    pool.create_volume("v", SIZE).map_err(e)?;
    let ours_sock = dir.join("ours.sock");
    let _server =
        NbdServer::start_unix(&ours_sock, Arc::new(PoolExports(pool.clone()))).map_err(e)?;
    let ours_uri = |vol: &str| format!("nbd+unix:///{vol}?socket={}", ours_sock.display());
    let raw = dir.join("raw.img");
    raw_image(&raw, SIZE)?;
    let raw_sock = dir.join("raw.sock");
    let _raw = qsd_nbd(&raw, "raw", &raw_sock)?;
    let raw_uri = format!("nbd+unix:///d?socket={}", raw_sock.display());
    // Fill both (reads must hit written data).
    eprintln!("nbd: filling ...");
    for uri in [ours_uri("v"), raw_uri.clone()] {
        let ok = Command::new("fio")
            .args([
                "--name=fill",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=write",
                "--bs=1M",
                "--iodepth=8",
                &format!("--size={SIZE}"),
            ])
            .output()
            .map_err(|e| e.to_string())?
            .status
            .success();
        if !ok {
            return Err(format!("fio fill of {uri} failed"));
        }
    }
    let mut rows = Vec::new();
    // Writes into thin space, a fresh volume / qcow2 per round: 4 KiB at random places, and
    // the first-write sweep (4 KiB into each 64 KiB cluster in turn, as `compare vhost-blk`).
    for (name, rw, run_secs) in [
        ("nbd/randwrite_4k_qd32_thin", "randwrite", secs),
        ("nbd/firstwrite_4k_qd32_thin", "write:60k", 0.0),
    ] {
        eprintln!("nbd: {name} ...");
        let (ours, qcow) = rounds(
            |r| {
                let vol = format!("thin{r}");
                if pool.create_volume(&vol, SIZE).is_err() {
                    return 0.0;
                }
                let iops = fio(&ours_uri(&vol), rw, "4k", run_secs).unwrap_or(0.0);
                // Deleted and committed: the next round starts from the same free space.
                let _ = pool.delete(&vol);
                let _ = pool.flush();
                iops
            },
            |r| {
                let img = dir.join(format!("thin{r}.qcow2"));
                let sock = dir.join(format!("thin{r}.sock"));
                let Ok(q) = qcow2(&img).and_then(|_| qsd_nbd(&img, "qcow2", &sock)) else {
                    return 0.0;
                };
                let uri = format!("nbd+unix:///d?socket={}", sock.display());
                let iops = fio(&uri, rw, "4k", run_secs).unwrap_or(0.0);
                drop(q);
                let _ = std::fs::remove_file(&img);
                iops
            },
        );
        if ours == 0.0 || qcow == 0.0 {
            return Err(format!("{name}: a round failed"));
        }
        rows.push(Row {
            name,
            ours: ours / 1000.0,
            peer: qcow / 1000.0,
            peer_name: "qemu-storage-daemon qcow2 64K",
            unit: "kIOPS",
        });
    }
    let raw_name = "qemu-storage-daemon raw";
    for (name, rw, bs, unit) in [
        ("nbd/randread_4k_qd32", "randread", "4k", "kIOPS"),
        (
            "nbd/randwrite_4k_qd32_overwrite",
            "randwrite",
            "4k",
            "kIOPS",
        ),
        ("nbd/seqread_1m_qd32", "read", "1M", "MiB/s"),
        ("nbd/seqwrite_1m_qd32", "write", "1M", "MiB/s"),
    ] {
        eprintln!("nbd: {name} ...");
        let (ours, peer) = rounds(
            |_| fio(&ours_uri("v"), rw, bs, secs).unwrap_or(0.0),
            |_| fio(&raw_uri, rw, bs, secs).unwrap_or(0.0),
        );
        if ours == 0.0 || peer == 0.0 {
            return Err(format!("{name}: a round failed"));
        }
        let scale = if unit == "kIOPS" { 1000.0 } else { 1.0 };
        rows.push(Row {
            name,
            ours: ours / scale,
            peer: peer / scale,
            peer_name: raw_name,
            unit,
        });
    }
    Ok(rows)
}
