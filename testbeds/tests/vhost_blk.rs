//! vhost-user-blk against a real client: libblkio connects to the exported socket the way
//! QEMU does, negotiates, maps its memory and drives the virtqueues. No VM needed.

use std::sync::Arc;

use testbeds::blk_client::BlkClient;
use vblock::device::MemDevice;
use vblock::vhost_blk::{Export, ExportConfig};
use vblock::{Pool, PoolOptions};

#[test]
fn a_libblkio_client_reads_writes_flushes_discards_over_two_queues() {
    let pool = Arc::new(Pool::create(MemDevice::new(128 << 20), PoolOptions::default()).unwrap());
    pool.create_volume("v", 64 << 20).unwrap();
    let dir = std::env::temp_dir().join(format!("vblock-vhost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("v.sock");
    let export = Export::start(pool.clone(), "v", &sock, ExportConfig { queues: 2 }).unwrap();
    let mut c = BlkClient::connect(&sock, 2, false).unwrap();
    assert_eq!(c.capacity().unwrap(), 64 << 20);

    // Write 64 KiB on queue 0, read it back on queue 1, and see it from the host side too.
    for (i, b) in c.mem()[..65536].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    assert_eq!(c.write(0, 1 << 20, 0, 65536), 0);
    assert_eq!(c.read(1, 1 << 20, 65536, 65536), 0);
    let m = c.mem();
    assert!(m[..65536] == m[65536..131072]);
    let mut host = vec![0u8; 65536];
    pool.read("v", 1 << 20, &mut host).unwrap();
    assert!(host[..] == c.mem()[..65536]);

    // Flush, then discard: the space is released and reads as zeros.
    assert_eq!(c.flush(0), 0);
    assert_eq!(pool.volume("v").unwrap().allocated, 65536);
    assert_eq!(c.discard(0, 1 << 20, 65536), 0);
    assert_eq!(pool.volume("v").unwrap().allocated, 0);
    assert_eq!(c.read(0, 1 << 20, 0, 4096), 0);
    assert!(c.mem()[..4096].iter().all(|b| *b == 0));
    // Write-zeroes too.
    c.mem()[..8192].fill(7);
    assert_eq!(c.write(0, 0, 0, 8192), 0);
    assert_eq!(c.write_zeroes(0, 0, 8192), 0);
    assert_eq!(c.read(1, 0, 0, 8192), 0);
    assert!(c.mem()[..8192].iter().all(|b| *b == 0));
    // Beyond the end: an error completion, and the device keeps working.
    assert_ne!(c.read(0, 64 << 20, 0, 4096), 0);
    assert_eq!(c.read(0, 0, 0, 4096), 0);
    drop(c);
    drop(export);

    // A snapshot is exported read-only: reads work, writes fail.
    pool.write("v", 0, &[9u8; 4096]).unwrap();
    pool.snapshot("v", "s").unwrap();
    let sock_s = dir.join("s.sock");
    let export = Export::start(pool.clone(), "s", &sock_s, ExportConfig::default()).unwrap();
    let mut c = BlkClient::connect(&sock_s, 1, true).unwrap();
    assert_eq!(c.read(0, 0, 0, 4096), 0);
    assert!(c.mem()[..4096].iter().all(|b| *b == 9));
    c.mem()[..4096].fill(1);
    assert_ne!(c.write(0, 0, 0, 4096), 0);
    let mut host = vec![0u8; 4096];
    pool.read("s", 0, &mut host).unwrap();
    assert!(host.iter().all(|b| *b == 9), "the snapshot is unchanged");
    drop(c);
    drop(export);
    let _ = std::fs::remove_dir_all(&dir);
}
