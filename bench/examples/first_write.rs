//! Thin first-write throughput over time (for profiling): 32 threads write 4 KiB into fresh
//! clusters of a 64 GiB thin volume for 4 s, printing the rate of every second.
//! `cargo run --release -p bench --example first_write`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vblock::device::AlignedBuf;
use vblock::uring::UringDevice;
use vblock::{Pool, PoolOptions};

fn main() {
    let path = std::path::PathBuf::from(format!("/var/tmp/lv-first-write-{}", std::process::id()));
    let dev = UringDevice::create(&path, 12 << 30).expect("pool file");
    let pool = Arc::new(Pool::create(dev, PoolOptions::default()).expect("pool"));
    pool.create_volume("thin", 64 << 30).expect("volume");
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..32)
        .map(|_| {
            let (pool, next, done) = (pool.clone(), next.clone(), done.clone());
            std::thread::spawn(move || {
                let buf = AlignedBuf::new(4096);
                while start.elapsed() < Duration::from_secs(4) {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let cluster = n.wrapping_mul(0x9E37_79B1) % ((64 << 30) / 65536);
                    if pool.write("thin", cluster * 65536, &buf).is_err() {
                        return;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut last = 0;
    for s in 1..=4 {
        std::thread::sleep(Duration::from_secs(1));
        let d = done.load(Ordering::Relaxed);
        println!("second {s}: {} writes/s", d - last);
        last = d;
    }
    for t in threads {
        let _ = t.join();
    }
    let _ = std::fs::remove_file(&path);
}
