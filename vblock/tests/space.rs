//! A full pool: writes fail at once or wait for space (the pool grown, space freed), the
//! low-water event, and accounting in which the numbers add up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vblock::device::MemDevice;
use vblock::format::CLUSTER_SIZE;
use vblock::{Change, Error, Pool, PoolOptions, WhenFull};

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = CLUSTER_SIZE as u64;

/// Waits (polling, with a generous deadline) until `cond` holds.
fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A pool of `size` bytes with one volume `v` larger than the pool (thin), every cluster
/// of the pool written: returns the pool and its cluster count.
fn full_pool(size: u64) -> (Arc<Pool<MemDevice>>, u64) {
    let pool = Pool::create(MemDevice::new(size), PoolOptions::default()).unwrap();
    let (clusters, _) = pool.space();
    pool.change(Change::Create {
        name: "v",
        size: 4 * clusters * CLUSTER,
    })
    .unwrap();
    for c in 0..clusters {
        pool.write("v", c * CLUSTER, &[c as u8 | 1; 4096]).unwrap();
    }
    assert_eq!(pool.space().1, 0);
    (Arc::new(pool), clusters)
}

#[test]
fn by_default_a_write_into_a_full_pool_fails_at_once() {
    let (pool, clusters) = full_pool(8 * MIB);
    let e = pool.write("v", clusters * CLUSTER, &[7; 4096]).unwrap_err();
    assert!(matches!(e, Error::NoSpace), "{e}");
    let r = pool.space_report();
    assert_eq!((r.refused_writes, r.queued_writes), (1, 0));
    // Overwrites of written data need no space and go on.
    pool.write("v", 0, &[9; 4096]).unwrap();
}

#[test]
fn a_queued_write_fails_at_its_timeout() {
    let (pool, clusters) = full_pool(8 * MIB);
    pool.set_when_full(WhenFull::Queue(Duration::from_millis(100)));
    let e = pool.write("v", clusters * CLUSTER, &[7; 4096]).unwrap_err();
    assert!(matches!(e, Error::NoSpace), "{e}");
    let r = pool.space_report();
    assert_eq!((r.refused_writes, r.queued_writes), (1, 1));
}

#[test]
fn queued_writes_go_on_when_the_pool_grows_online() {
    let (pool, clusters) = full_pool(8 * MIB);
    pool.set_low_water(2 * CLUSTER);
    assert!(pool.space_report().below_low_water);
    pool.set_when_full(WhenFull::Queue(Duration::from_secs(600)));
    let at = clusters * CLUSTER;
    let writer = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            // One plain write and a batch, both into new space.
            let one = pool.write("v", at, &[0xaa; 4096]);
            let batch = pool.write_batch(&[
                vblock::WriteRequest {
                    volume: "v",
                    offset: at + CLUSTER,
                    data: &[0xbb; 8192],
                },
                vblock::WriteRequest {
                    volume: "v",
                    offset: 0,
                    data: &[0xcc; 4096],
                },
            ]);
            (one, batch)
        })
    };
    until("a queued write", || pool.space_report().queued_writes == 1);
    assert!(!writer.is_finished());
    let e = pool.grow(4 * MIB).unwrap_err();
    assert!(e.to_string().contains("only grow"), "{e}");
    pool.grow(16 * MIB).unwrap();
    let (one, batch) = writer.join().unwrap();
    one.unwrap();
    assert!(batch.iter().all(Result::is_ok), "{batch:?}");
    let r = pool.space_report();
    assert!(r.clusters > clusters, "{r:?}");
    assert_eq!(r.refused_writes, 0);
    assert!(!r.below_low_water, "{r:?}");
    assert_eq!(r.low_water_events, 1);
    pool.flush().unwrap();

    // The growth and the writes survive a reopen.
    let pool = Arc::into_inner(pool).unwrap();
    let pool = Pool::open(pool.into_device()).unwrap();
    assert_eq!(pool.space().0, r.clusters);
    let mut buf = [0u8; 8192];
    pool.read("v", at, &mut buf[..4096]).unwrap();
    assert_eq!(buf[..4096], [0xaa; 4096]);
    pool.read("v", at + CLUSTER, &mut buf).unwrap();
    assert_eq!(buf, [0xbb; 8192]);
    pool.read("v", 0, &mut buf[..4096]).unwrap();
    assert_eq!(buf[..4096], [0xcc; 4096]);
    assert!(pool.check(false).unwrap().is_clean());
}

#[test]
fn a_queued_write_goes_on_when_a_discard_frees_space() {
    let (pool, clusters) = full_pool(8 * MIB);
    pool.set_when_full(WhenFull::Queue(Duration::from_secs(600)));
    let at = clusters * CLUSTER;
    let writer = {
        let pool = pool.clone();
        std::thread::spawn(move || pool.write("v", at, &[0xdd; 4096]))
    };
    until("a queued write", || pool.space_report().queued_writes == 1);
    // Freed space is usable once committed: the waiting write commits it and goes on.
    pool.discard("v", 0, CLUSTER).unwrap();
    writer.join().unwrap().unwrap();
    let mut buf = [0u8; 4096];
    pool.read("v", at, &mut buf).unwrap();
    assert_eq!(buf, [0xdd; 4096]);
}

#[test]
fn growth_is_bounded_by_the_metadata_area() {
    let pool = Pool::create(MemDevice::new(8 * MIB), PoolOptions::default()).unwrap();
    let e = pool.grow(1 << 40).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    assert!(e.to_string().contains("at most"), "{e}");
}

#[test]
fn what_volumes_hold_adds_up_to_what_the_pool_uses() {
    let pool = Pool::create(MemDevice::new(32 * MIB), PoolOptions::default()).unwrap();
    pool.change(Change::Create {
        name: "v",
        size: 16 * MIB,
    })
    .unwrap();
    // Scattered 4 KiB writes: each takes a whole cluster.
    for i in 0..20u64 {
        pool.write("v", i * 3 * CLUSTER, &[1; 4096]).unwrap();
    }
    let v = pool.volume("v").unwrap();
    assert_eq!(v.allocated, 20 * 4096);
    assert_eq!(v.held, 20 * CLUSTER);
    assert_eq!(v.exclusive, 20 * CLUSTER);
    pool.change(Change::Snapshot {
        source: "v",
        name: "s",
    })
    .unwrap();
    // After the snapshot all is shared; two overwrites copy two clusters on write.
    pool.write("v", 0, &[2; 4096]).unwrap();
    pool.write("v", 3 * CLUSTER, &[2; 4096]).unwrap();
    let (v, s) = (pool.volume("v").unwrap(), pool.volume("s").unwrap());
    assert_eq!((v.held, s.held), (20 * CLUSTER, 20 * CLUSTER));
    assert_eq!((v.exclusive, s.exclusive), (2 * CLUSTER, 2 * CLUSTER));
    let r = pool.space_report();
    assert_eq!(r.used, 22, "{r:?}");
    assert_eq!(r.used + r.pending_free + r.free, r.clusters, "{r:?}");
    // Discarded space shows as pending until the commit, then as free.
    pool.discard("v", 0, CLUSTER).unwrap();
    let r = pool.space_report();
    assert_eq!((r.used, r.pending_free), (21, 1), "{r:?}");
    assert_eq!(r.used + r.pending_free + r.free, r.clusters, "{r:?}");
    pool.flush().unwrap();
    let r = pool.space_report();
    assert_eq!((r.used, r.pending_free), (21, 0), "{r:?}");
    assert_eq!(r.used + r.free, r.clusters, "{r:?}");
}
