//! Volumes through vblockd's API, with the async client: a pool, a golden volume with data, a
//! snapshot of it, a writable clone that shares the snapshot's data until written; then
//! everything is removed. Needs a running vblockd.
//!
//! `cargo run -p libvirtual --example volumes -- [SOCKET] [DIR]` (defaults:
//! `/run/libvirtual/vblockd.sock`, `/var/tmp`; the pool file is made in DIR).

use libvirtual::block::AsyncClient as Client;
use libvirtual::vblock_api::{PoolSpec, VolumeSpec};

const MIB: u64 = 1 << 20;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let socket = args
        .next()
        .unwrap_or_else(|| "/run/libvirtual/vblockd.sock".into());
    let dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| "/var/tmp".into()));
    let vblockd = Client::new(&socket);
    let pool = format!("example{}", std::process::id());
    let path = dir.join(format!("{pool}.pool"));
    vblockd
        .create_pool(&PoolSpec {
            name: pool.clone(),
            path: path.clone(),
            size: Some(256 * MIB),
            preallocation: Default::default(),
            space: Default::default(),
        })
        .await?;
    let result = tour(&vblockd, &pool).await;
    // Clean up whatever happened.
    for name in ["vm1", "golden@1", "golden"] {
        let _ = vblockd.delete_volume(&pool, name).await;
    }
    vblockd.remove_pool(&pool).await?;
    std::fs::remove_file(&path)?;
    result
}

async fn tour(vblockd: &Client, pool: &str) -> Result<(), Box<dyn std::error::Error>> {
    vblockd
        .create_volume(
            pool,
            &VolumeSpec {
                name: "golden".into(),
                size: 64 * MIB,
            },
        )
        .await?;
    let image: Vec<u8> = (0..4 * MIB).map(|i| (i % 251) as u8).collect();
    vblockd.write(pool, "golden", 0, &image).await?;
    vblockd.snapshot(pool, "golden", "golden@1").await?;
    vblockd.clone_snapshot(pool, "golden@1", "vm1").await?;
    // The clone starts as the snapshot; writing it leaves the snapshot alone.
    if vblockd.read(pool, "vm1", 0, 4 * MIB).await? != image {
        return Err("the clone does not read as its snapshot".into());
    }
    vblockd.write(pool, "vm1", 0, &[0xee; 4096]).await?;
    if vblockd.read(pool, "golden@1", 0, 4096).await? != image[..4096] {
        return Err("writing the clone changed the snapshot".into());
    }
    vblockd.flush(pool).await?;
    println!(
        "{:<10} {:<9} {:>8} {:>10}",
        "NAME", "KIND", "SIZE", "ALLOCATED"
    );
    for v in vblockd.volumes(pool).await? {
        println!(
            "{:<10} {:<9} {:>5} MiB {:>6} KiB",
            v.name,
            v.kind,
            v.size / MIB,
            v.allocated / 1024
        );
    }
    let info = vblockd.pool(pool).await?;
    println!(
        "pool {pool}: {} KiB used of {} MiB (the clone shares all but what it rewrote)",
        (info.capacity - info.free) / 1024,
        info.capacity / MIB
    );
    Ok(())
}
