//! Thin-write throughput and stalls over time (for profiling): `CONNS` threads each write
//! bursts of 32 random 4 KiB blocks (`Pool::write_batch`, as an NBD connection or a
//! vhost-user-blk queue does) into a thin volume (16 GiB) for `SECS` seconds, printing every
//! second's rate and the slowest burst; `fresh` writes each block into a cluster of its own.
//! `cargo run --release -p bench --example first_write -- [SECS] [CONNS] [random|fresh]`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vblock::device::AlignedBuf;
use vblock::uring::UringDevice;
use vblock::{Pool, PoolOptions, WriteRequest};

fn main() {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let conns: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let fresh = args.next().as_deref() == Some("fresh");
    // VOLUME_GIB (default 16) and POOL_FILE (an existing file to format instead of a new
    // 20 GiB one) let the pool file's state be compared (preallocated vs written).
    let volume: u64 = std::env::var("VOLUME_GIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16)
        << 30;
    let path = std::path::PathBuf::from(format!("/var/tmp/lv-first-write-{}", std::process::id()));
    let dev = match std::env::var_os("POOL_FILE") {
        Some(p) => UringDevice::open(std::path::Path::new(&p)).expect("pool file"),
        None => UringDevice::create(&path, 20 << 30).expect("pool file"),
    };
    let pool = Arc::new(Pool::create(dev, PoolOptions::default()).expect("pool"));
    let commit_secs = std::env::var("COMMIT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    pool.start_committer(Duration::from_secs(commit_secs))
        .expect("committer");
    pool.create_volume("thin", volume).expect("volume");
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let slowest_us = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let (pool, next, done, slowest_us) =
                (pool.clone(), next.clone(), done.clone(), slowest_us.clone());
            std::thread::spawn(move || {
                let bufs: Vec<AlignedBuf> = (0..32).map(|_| AlignedBuf::new(4096)).collect();
                while start.elapsed() < Duration::from_secs(secs) {
                    let reqs: Vec<WriteRequest<'_>> = bufs
                        .iter()
                        .map(|b| {
                            let n = next.fetch_add(1, Ordering::Relaxed);
                            let offset = if fresh {
                                n.wrapping_mul(0x9E37_79B1) % (volume / 65536) * 65536
                            } else {
                                n.wrapping_mul(0x9E37_79B1_7F4A_7C15) % (volume / 4096) * 4096
                            };
                            WriteRequest {
                                volume: "thin",
                                offset,
                                data: b,
                            }
                        })
                        .collect();
                    let t = Instant::now();
                    if pool.write_batch(&reqs).iter().any(Result::is_err) {
                        return;
                    }
                    slowest_us.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    done.fetch_add(reqs.len() as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut last = 0;
    for s in 1..=secs {
        std::thread::sleep(Duration::from_secs(1));
        let d = done.load(Ordering::Relaxed);
        let slow = slowest_us.swap(0, Ordering::Relaxed);
        println!(
            "second {s}: {} writes/s, slowest burst {:.1} ms",
            d - last,
            slow as f64 / 1000.0
        );
        last = d;
    }
    for t in threads {
        let _ = t.join();
    }
    let total = done.load(Ordering::Relaxed);
    println!(
        "{total} writes in {:.1} s: {:.0} writes/s",
        start.elapsed().as_secs_f64(),
        total as f64 / start.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_file(&path);
}
