//! Configuration changes are all-or-nothing: a change whose commit fails (the device refuses
//! writes, as a full host file system does under a sparse pool file) is taken back before the
//! error is returned — in memory and on disk — while the data written around it stays.

use std::sync::atomic::{AtomicBool, Ordering};

use vblock::device::{Device, MemDevice};
use vblock::{Change, Error, Pool, PoolOptions, Qos};

/// A device whose writes fail while `full` is set (reads always work).
struct Flaky {
    dev: MemDevice,
    full: AtomicBool,
}

impl Flaky {
    fn new(size: u64) -> Flaky {
        Flaky {
            dev: MemDevice::new(size),
            full: AtomicBool::new(false),
        }
    }

    fn refuse(&self, full: bool) {
        self.full.store(full, Ordering::SeqCst);
    }

    fn no_space() -> std::io::Error {
        std::io::Error::from_raw_os_error(28) // ENOSPC
    }
}

impl Device for Flaky {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.dev.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(Self::no_space());
        }
        self.dev.write_at(offset, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(Self::no_space());
        }
        self.dev.flush()
    }
    fn size(&self) -> u64 {
        self.dev.size()
    }
}

const MIB: u64 = 1 << 20;

fn block(stamp: u8) -> Vec<u8> {
    vec![stamp; 4096]
}

fn read(pool: &Pool<Flaky>, name: &str, offset: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    pool.read(name, offset, &mut buf).unwrap();
    buf
}

/// Opens the pool again from what its device holds durably (as after a crash).
fn reopen(pool: Pool<Flaky>) -> Pool<Flaky> {
    let dev = pool.into_device();
    dev.refuse(false);
    Pool::open(dev).unwrap()
}

#[test]
fn a_change_whose_commit_fails_leaves_no_trace() {
    let pool = Pool::create(Flaky::new(16 * MIB), PoolOptions::default()).unwrap();
    pool.change(Change::Create {
        name: "v",
        size: 4 * MIB,
    })
    .unwrap();
    pool.write("v", 0, &block(1)).unwrap();
    pool.change(Change::Snapshot {
        source: "v",
        name: "s",
    })
    .unwrap();
    pool.write("v", 0, &block(2)).unwrap();
    pool.write("v", MIB, &block(3)).unwrap();
    pool.flush().unwrap();
    let (_, free_before) = pool.space();
    let volumes_before = pool.list();

    pool.device().refuse(true);
    let attempts = [
        Change::Create {
            name: "new",
            size: MIB,
        },
        Change::Snapshot {
            source: "v",
            name: "s2",
        },
        Change::Clone {
            snapshot: "s",
            name: "c",
        },
        Change::Delete { name: "v" },
        Change::Delete { name: "s" },
        Change::Resize {
            name: "v",
            size: 8 * MIB,
        },
        Change::SetQos {
            name: "v",
            qos: Qos { iops: 100, bps: 0 },
        },
    ];
    for change in attempts {
        let e = pool.change(change).unwrap_err();
        assert!(matches!(e, Error::Io(..)), "{change:?}: {e}");
        assert_eq!(pool.list(), volumes_before, "after {change:?}");
        assert_eq!(pool.space().1, free_before, "after {change:?}");
    }
    // Everything still reads as it did, and a retry goes through once there is space.
    assert_eq!(read(&pool, "v", 0), block(2));
    assert_eq!(read(&pool, "s", 0), block(1));
    pool.device().refuse(false);
    pool.change(Change::Create {
        name: "new",
        size: MIB,
    })
    .unwrap();
    pool.write("new", 0, &block(4)).unwrap();
    pool.flush().unwrap();

    // After a crash: what failed is not there, what was done is, and the pool checks clean.
    let pool = reopen(pool);
    let mut names: Vec<String> = pool.list().into_iter().map(|v| v.name).collect();
    names.sort();
    assert_eq!(names, ["new", "s", "v"]);
    let v = pool.volume("v").unwrap();
    assert_eq!(v.size, 4 * MIB);
    assert_eq!(v.qos, Qos::default());
    assert_eq!(read(&pool, "v", 0), block(2));
    assert_eq!(read(&pool, "v", MIB), block(3));
    assert_eq!(read(&pool, "s", 0), block(1));
    assert_eq!(read(&pool, "new", 0), block(4));
    let report = pool.check(false).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn writes_waiting_around_a_failed_change_are_kept() {
    let pool = Pool::create(Flaky::new(16 * MIB), PoolOptions::default()).unwrap();
    pool.change(Change::Create {
        name: "v",
        size: 4 * MIB,
    })
    .unwrap();
    pool.change(Change::Create {
        name: "w",
        size: 4 * MIB,
    })
    .unwrap();
    // Written, not yet committed: the failed change's commit carried them and failed too;
    // they stay in the running transaction and a later flush makes them durable.
    pool.write("v", 0, &block(7)).unwrap();
    pool.device().refuse(true);
    assert!(pool.change(Change::Delete { name: "w" }).is_err());
    pool.device().refuse(false);
    pool.flush().unwrap();
    let pool = reopen(pool);
    assert_eq!(read(&pool, "v", 0), block(7));
    assert!(pool.volume("w").is_ok());
    assert!(pool.check(false).unwrap().is_clean());
}

#[test]
fn a_committed_delete_frees_its_space_at_once() {
    let pool = Pool::create(Flaky::new(16 * MIB), PoolOptions::default()).unwrap();
    let (_, free_empty) = pool.space();
    pool.change(Change::Create {
        name: "v",
        size: 4 * MIB,
    })
    .unwrap();
    for i in 0..8u64 {
        pool.write("v", i * MIB / 2, &block(i as u8)).unwrap();
    }
    pool.change(Change::Snapshot {
        source: "v",
        name: "s",
    })
    .unwrap();
    pool.write("v", 0, &block(9)).unwrap(); // copy on write: one cluster only v holds
    pool.flush().unwrap();
    let (_, free_full) = pool.space();
    assert_eq!(free_empty - free_full, 9);
    // The snapshot's own cluster is free as soon as its delete is committed.
    pool.change(Change::Delete { name: "s" }).unwrap();
    assert_eq!(pool.space().1, free_full + 1);
    pool.change(Change::Delete { name: "v" }).unwrap();
    assert_eq!(pool.space().1, free_empty);
    let pool = reopen(pool);
    assert_eq!(pool.space().1, free_empty);
    assert!(pool.check(false).unwrap().is_clean());
}
