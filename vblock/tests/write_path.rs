//! The write path under a failing device: a batch whose one request cannot be carried out
//! (a bad block under the cluster it must copy) fails that request alone; the others are
//! written and mapped, and no cluster is leaked or handed out twice.

use std::ops::Range;
use std::sync::Mutex;

use vblock::device::{Device, MemDevice};
use vblock::{Error, Pool, PoolOptions, WriteRequest};

/// A device with one unreadable range (a bad block), as a failing disk has.
struct BadBlock {
    dev: MemDevice,
    bad: Mutex<Option<Range<u64>>>,
}

impl Device for BadBlock {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let bad = self.bad.lock().unwrap().clone();
        if bad.is_some_and(|b| offset < b.end && b.start < offset + buf.len() as u64) {
            return Err(std::io::Error::from_raw_os_error(5)); // EIO
        }
        self.dev.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.dev.write_at(offset, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.dev.flush()
    }
    fn size(&self) -> u64 {
        self.dev.size()
    }
}

const CLUSTER: u64 = 64 << 10;

fn read(pool: &Pool<BadBlock>, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    pool.read("v", offset, &mut buf).unwrap();
    buf
}

#[test]
fn one_bad_request_of_a_batch_fails_alone_and_leaks_nothing() {
    let dev = BadBlock {
        dev: MemDevice::new(64 << 20),
        bad: Mutex::new(None),
    };
    let pool = Pool::create(dev, PoolOptions::default()).unwrap();
    pool.create_volume("v", 16 << 20).unwrap();
    // Cluster 0 written whole with a pattern no other block has, then shared by a snapshot.
    let pattern: Vec<u8> = (0..CLUSTER).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    pool.write("v", 0, &pattern).unwrap();
    pool.snapshot("v", "s").unwrap();
    pool.flush().unwrap();
    // Its first block on the device goes bad.
    let image = pool.device().dev.snapshot();
    let at = image
        .windows(4096)
        .step_by(4096)
        .position(|w| w == &pattern[..4096])
        .expect("the cluster's first block on the device") as u64
        * 4096;
    *pool.device().bad.lock().unwrap() = Some(at..at + 4096);

    // A batch: two fresh writes, and a partial write into the shared cluster, which must
    // read its old first block to copy it.
    let (a, b, partial) = (vec![0xa1u8; 4096], vec![0xb2u8; 4096], vec![0xc3u8; 512]);
    let results = pool.write_batch(&[
        WriteRequest {
            volume: "v",
            offset: 5 * CLUSTER,
            data: &a,
        },
        WriteRequest {
            volume: "v",
            offset: 512,
            data: &partial,
        },
        WriteRequest {
            volume: "v",
            offset: 7 * CLUSTER + 8192,
            data: &b,
        },
    ]);
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(matches!(results[1], Err(Error::Io(..))), "{:?}", results[1]);
    assert!(results[2].is_ok(), "{:?}", results[2]);
    assert_eq!(read(&pool, 5 * CLUSTER, 4096), a);
    assert_eq!(read(&pool, 7 * CLUSTER + 8192, 4096), b);
    // The failed write changed nothing: the rest of cluster 0 is as it was.
    assert_eq!(read(&pool, 4096, 4096), pattern[4096..8192]);

    // The block heals: the write goes through, and nothing was leaked or shared by mistake.
    *pool.device().bad.lock().unwrap() = None;
    pool.write("v", 512, &partial).unwrap();
    let mut expect = pattern[..4096].to_vec();
    expect[512..1024].copy_from_slice(&partial);
    assert_eq!(read(&pool, 0, 4096), expect);
    let mut snap = vec![0u8; 4096];
    pool.read("s", 0, &mut snap).unwrap();
    assert_eq!(snap, pattern[..4096], "the snapshot keeps its data");
    pool.flush().unwrap();
    let report = pool.check(false).unwrap();
    assert!(report.is_clean(), "{report:?}");
    // Clusters in use: the shared one, its copy, and the two fresh ones.
    assert_eq!(report.used_clusters, 4, "{report:?}");
}
