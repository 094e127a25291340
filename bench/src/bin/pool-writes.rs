//! The cost of vblock's write path alone, without a peer: N threads write 4 KiB blocks into
//! never-written clusters of a thin volume (each write takes a fresh cluster), then overwrite
//! the same blocks in place; each phase prints the mean time per write. On a pool file with
//! `O_DIRECT` through io_uring (`--dir`, default /var/tmp), or with `--memory` on an
//! in-memory device, where only the CPU path (planning, locks, metadata) is measured.
//!
//! `cargo run --release -p bench --bin pool-writes -- [--threads 32] [--clusters 24000]
//! [--repeat 3] [--memory] [--dir /var/tmp]`. Meant to be run alternately with another
//! build's binary: the figures of one machine move between runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::Parser;
use vblock::device::{AlignedBuf, Device, MemDevice};
use vblock::uring::UringDevice;
use vblock::{DEFAULT_COMMIT_INTERVAL, Pool, PoolOptions};

/// Write-path timing of a vblock pool.
#[derive(Debug, Parser)]
#[command(name = "pool-writes")]
struct Args {
    /// Writers (the queue depth).
    #[arg(long, default_value_t = 32)]
    threads: usize,
    /// Writes per phase (each into its own cluster).
    #[arg(long, default_value_t = 24_000)]
    clusters: u64,
    /// Repetitions (a new volume each; the last one's space freed after).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// An in-memory device instead of a pool file.
    #[arg(long)]
    memory: bool,
    /// Where the pool file goes (removed at once; its space when the program ends).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
}

/// Writes one 4 KiB block into each of `clusters` clusters of `volume` from `threads`
/// threads; returns nanoseconds per write.
fn phase<D: Device + 'static>(
    pool: &Arc<Pool<D>>,
    volume: &str,
    args: &Args,
) -> Result<f64, String> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..args.threads)
        .map(|_| {
            let (pool, next, volume, clusters) =
                (pool.clone(), next.clone(), volume.to_owned(), args.clusters);
            std::thread::spawn(move || -> Result<(), String> {
                let buf = AlignedBuf::new(4096);
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= clusters {
                        return Ok(());
                    }
                    // Scattered over the volume, each cluster once.
                    let cluster = n.wrapping_mul(0x9E37_79B1) % (1 << 24);
                    pool.write(&volume, cluster * 65536, &buf)
                        .map_err(|e| e.to_string())?;
                }
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "a writer panicked".to_owned())??;
    }
    Ok(start.elapsed().as_secs_f64() * 1e9 / args.clusters as f64)
}

fn run<D: Device + 'static>(pool: Pool<D>, args: &Args) -> Result<(), String> {
    let pool = Arc::new(pool);
    pool.start_committer(DEFAULT_COMMIT_INTERVAL)
        .map_err(|e| e.to_string())?;
    for rep in 0..args.repeat {
        let volume = format!("v{rep}");
        pool.create_volume(&volume, 1 << 40)
            .map_err(|e| e.to_string())?;
        let fresh = phase(&pool, &volume, args)?;
        let overwrite = phase(&pool, &volume, args)?;
        println!(
            "{} threads: fresh {fresh:.0} ns/write, overwrite {overwrite:.0} ns/write",
            args.threads
        );
        pool.delete(&volume).map_err(|e| e.to_string())?;
        pool.flush().map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    // Room for the clusters of one repetition, and its metadata.
    let size = (args.clusters + 1024) * 65536 + (256 << 20);
    if args.memory {
        let pool = Pool::create(MemDevice::new(size), PoolOptions::default())
            .map_err(|e| e.to_string())?;
        return run(pool, &args);
    }
    let path = args.dir.join(format!("pool-writes-{}", std::process::id()));
    let dev = UringDevice::create(&path, size).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&path);
    let pool = Pool::create(dev, PoolOptions::default()).map_err(|e| e.to_string())?;
    run(pool, &args)
}
