//! Model-based test: random sequences of volume operations against a pool and against a plain
//! in-memory model; every read must match, and the pool must check clean throughout.

use std::collections::BTreeMap;

use proptest::prelude::*;
use vblock::device::{Device, MemDevice};
use vblock::uring::UringDevice;
use vblock::{Error, Kind, Pool, PoolOptions, WriteRequest};

const VOL: u64 = 1 << 20;
const SECTOR: u64 = 512;

#[derive(Clone, Debug)]
enum Op {
    Write {
        vol: usize,
        sector: u64,
        sectors: u64,
        seed: u8,
    },
    Discard {
        vol: usize,
        sector: u64,
        sectors: u64,
    },
    Zero {
        vol: usize,
        sector: u64,
        sectors: u64,
    },
    Snapshot {
        vol: usize,
    },
    Clone {
        vol: usize,
    },
    Delete {
        vol: usize,
    },
    /// Writes in one batch (as a device queue hands them over); overlapping ones are dropped,
    /// since requests of a batch have no order.
    Batch {
        writes: Vec<(usize, u64, u64, u8, bool)>,
    },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..8usize, 0..VOL / SECTOR, 1..300u64);
    prop_oneof![
        6 => (range.clone(), any::<u8>()).prop_map(|((vol, sector, sectors), seed)| Op::Write { vol, sector, sectors, seed }),
        1 => range.clone().prop_map(|(vol, sector, sectors)| Op::Discard { vol, sector, sectors }),
        1 => range.prop_map(|(vol, sector, sectors)| Op::Zero { vol, sector, sectors }),
        1 => (0..8usize).prop_map(|vol| Op::Snapshot { vol }),
        1 => (0..8usize).prop_map(|vol| Op::Clone { vol }),
        1 => (0..8usize).prop_map(|vol| Op::Delete { vol }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        3 => proptest::collection::vec(
            (0..8usize, 0..VOL / SECTOR, 1..40u64, any::<u8>(), any::<bool>()),
            1..10
        )
        .prop_map(|writes| Op::Batch { writes }),
    ]
}

struct Model {
    vols: BTreeMap<String, (Kind, Vec<u8>)>,
    next: usize,
}

impl Model {
    fn pick(&self, i: usize, kind: Option<Kind>) -> Option<String> {
        let names: Vec<_> = self
            .vols
            .iter()
            .filter(|(_, (k, _))| kind.is_none_or(|want| *k == want))
            .map(|(n, _)| n.clone())
            .collect();
        (!names.is_empty()).then(|| names[i % names.len()].clone())
    }
}

fn clamp(sector: u64, sectors: u64) -> (u64, u64) {
    let off = sector * SECTOR;
    let len = (sectors * SECTOR).min(VOL - off);
    (off, len)
}

fn verify<D: Device>(pool: &Pool<D>, model: &Model) {
    let mut buf = vec![0u8; VOL as usize];
    for (name, (_, data)) in &model.vols {
        pool.read(name, 0, &mut buf).unwrap();
        assert!(buf == *data, "{name} differs from the model");
    }
    let listed: Vec<String> = pool.list().into_iter().map(|v| v.name).collect();
    let expected: Vec<String> = model.vols.keys().cloned().collect();
    let mut listed_sorted = listed.clone();
    listed_sorted.sort();
    assert_eq!(listed_sorted, expected);
    let report = pool.check(false).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

fn run(ops: Vec<Op>) {
    run_on(MemDevice::new(24 << 20), ops);
}

fn run_on<D: Device>(dev: D, ops: Vec<Op>) {
    let opts = PoolOptions {
        journal_blocks: Some(8),
        ckpt_blocks: Some(64),
    };
    let mut pool = Some(Pool::create(dev, opts).unwrap());
    let mut model = Model {
        vols: BTreeMap::new(),
        next: 0,
    };
    let p = pool.as_ref().unwrap();
    p.create_volume("base", VOL).unwrap();
    model
        .vols
        .insert("base".into(), (Kind::Volume, vec![0; VOL as usize]));
    for op in ops {
        let p = pool.as_ref().unwrap();
        match op {
            Op::Write {
                vol,
                sector,
                sectors,
                seed,
            } => {
                let Some(name) = model.pick(vol, Some(Kind::Volume)) else {
                    continue;
                };
                let (off, len) = clamp(sector, sectors);
                let data: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                    .collect();
                match p.write(&name, off, &data) {
                    Ok(()) => model.vols.get_mut(&name).unwrap().1
                        [off as usize..(off + len) as usize]
                        .copy_from_slice(&data),
                    Err(Error::NoSpace) => {}
                    Err(e) => panic!("write: {e}"),
                }
            }
            Op::Batch { writes } => {
                let mut reqs: Vec<(String, u64, Vec<u8>)> = Vec::new();
                for (vol, sector, sectors, seed, whole_blocks) in writes {
                    let Some(name) = model.pick(vol, Some(Kind::Volume)) else {
                        continue;
                    };
                    // Whole 4 KiB blocks (the batched path) or any sectors.
                    let (sector, sectors) = if whole_blocks {
                        (sector / 8 * 8, sectors.div_ceil(8) * 8)
                    } else {
                        (sector, sectors)
                    };
                    let (off, len) = clamp(sector, sectors);
                    if len == 0
                        || reqs.iter().any(|(n, o, d)| {
                            *n == name && off < o + d.len() as u64 && *o < off + len
                        })
                    {
                        continue;
                    }
                    let data = (0..len)
                        .map(|i| (i as u8).wrapping_mul(17).wrapping_add(seed))
                        .collect();
                    reqs.push((name, off, data));
                }
                let batch: Vec<WriteRequest<'_>> = reqs
                    .iter()
                    .map(|(n, o, d)| WriteRequest {
                        volume: n,
                        offset: *o,
                        data: d,
                    })
                    .collect();
                for ((name, off, data), r) in reqs.iter().zip(p.write_batch(&batch)) {
                    match r {
                        Ok(()) => model.vols.get_mut(name).unwrap().1
                            [*off as usize..*off as usize + data.len()]
                            .copy_from_slice(data),
                        Err(Error::NoSpace) => {}
                        Err(e) => panic!("batched write: {e}"),
                    }
                }
            }
            Op::Discard {
                vol,
                sector,
                sectors,
            }
            | Op::Zero {
                vol,
                sector,
                sectors,
            } => {
                let Some(name) = model.pick(vol, Some(Kind::Volume)) else {
                    continue;
                };
                let (off, len) = clamp(sector, sectors);
                let zero = matches!(op, Op::Zero { .. });
                let r = if zero {
                    p.write_zeroes(&name, off, len)
                } else {
                    p.discard(&name, off, len)
                };
                match r {
                    Ok(()) => {
                        let d = &mut model.vols.get_mut(&name).unwrap().1;
                        // Discard zeroes whole 4 KiB blocks only; write-zeroes the whole range.
                        let (a, b) = if zero {
                            (off, off + len)
                        } else {
                            (off.div_ceil(4096) * 4096, (off + len) / 4096 * 4096)
                        };
                        if b > a {
                            d[a as usize..b as usize].fill(0);
                        }
                    }
                    Err(Error::NoSpace) => {}
                    Err(e) => panic!("discard/zero: {e}"),
                }
            }
            Op::Snapshot { vol } => {
                let Some(src) = model.pick(vol, None) else {
                    continue;
                };
                let name = format!("s{}", model.next);
                model.next += 1;
                p.snapshot(&src, &name).unwrap();
                let data = model.vols[&src].1.clone();
                model.vols.insert(name, (Kind::Snapshot, data));
            }
            Op::Clone { vol } => {
                let Some(src) = model.pick(vol, Some(Kind::Snapshot)) else {
                    continue;
                };
                let name = format!("c{}", model.next);
                model.next += 1;
                p.clone_snapshot(&src, &name).unwrap();
                let data = model.vols[&src].1.clone();
                model.vols.insert(name, (Kind::Volume, data));
            }
            Op::Delete { vol } => {
                if model.vols.len() < 2 {
                    continue;
                }
                let Some(name) = model.pick(vol, None) else {
                    continue;
                };
                p.delete(&name).unwrap();
                model.vols.remove(&name);
            }
            Op::Flush => p.flush().unwrap(),
            Op::Reopen => {
                p.flush().unwrap();
                let dev = pool.take().unwrap().into_device();
                pool = Some(Pool::open(dev).unwrap());
            }
        }
    }
    let p = pool.take().unwrap();
    verify(&p, &model);
    // Everything survives a clean reopen; deleting everything frees every cluster.
    p.flush().unwrap();
    let p = Pool::open(p.into_device()).unwrap();
    verify(&p, &model);
    for name in model.vols.keys() {
        p.delete(name).unwrap();
    }
    p.flush().unwrap();
    let (total, free) = p.space();
    assert_eq!(total, free, "space leaked after deleting everything");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn pool_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}

/// The same on a real file through the io_uring engine (O_DIRECT).
#[test]
fn pool_on_io_uring_matches_the_model() {
    let path = std::env::temp_dir().join(format!("vblock-model-{}.pool", std::process::id()));
    let dev = UringDevice::create(&path, 24 << 20).unwrap();
    let mut ops = Vec::new();
    for i in 0..120u64 {
        ops.push(match i % 12 {
            0 => Op::Snapshot { vol: i as usize },
            1 => Op::Clone { vol: i as usize },
            2 => Op::Flush,
            3 => Op::Discard {
                vol: 0,
                sector: (i * 97) % 2000,
                sectors: 64,
            },
            4 => Op::Zero {
                vol: 1,
                sector: (i * 31) % 2000,
                sectors: 9,
            },
            5 if i > 60 => Op::Delete { vol: i as usize },
            6 => Op::Reopen,
            _ => Op::Write {
                vol: i as usize,
                sector: (i * 53) % 2000,
                sectors: 1 + i % 200,
                seed: i as u8,
            },
        });
    }
    run_on(dev, ops);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_full_pool_refuses_new_space_and_recovers_after_a_delete() {
    let opts = PoolOptions {
        journal_blocks: Some(8),
        ckpt_blocks: Some(16),
    };
    let pool = Pool::create(MemDevice::new(4 << 20), opts).unwrap();
    let (total, _) = pool.space();
    let size = (total + 8) * 65536;
    pool.create_volume("a", size).unwrap();
    let chunk = vec![0xabu8; 65536];
    let mut written = 0;
    let err = loop {
        match pool.write("a", written * 65536, &chunk) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::NoSpace), "{err}");
    assert_eq!(err.errno(), libc_enospc());
    assert_eq!(written, total);
    // What was written is intact.
    let mut back = vec![0u8; 65536];
    pool.read("a", (written - 1) * 65536, &mut back).unwrap();
    assert_eq!(back, chunk);
    // Freeing space (discard, then commit) lets writes continue.
    pool.discard("a", 0, 4 * 65536).unwrap();
    pool.flush().unwrap();
    pool.write("a", written * 65536, &chunk).unwrap();
    pool.read("a", 0, &mut back).unwrap();
    assert!(back.iter().all(|b| *b == 0));
}

fn libc_enospc() -> i32 {
    28
}

#[test]
fn bad_io_gets_clear_errors_and_the_pool_keeps_working() {
    let pool = Pool::create(MemDevice::new(8 << 20), PoolOptions::default()).unwrap();
    pool.create_volume("v", 1 << 20).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        pool.read("nope", 0, &mut buf),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        pool.read("v", 100, &mut buf),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        pool.read("v", 1 << 20, &mut buf),
        Err(Error::OutOfRange(_))
    ));
    assert!(matches!(
        pool.write("v", u64::MAX - 511, &buf),
        Err(Error::OutOfRange(_))
    ));
    pool.snapshot("v", "s").unwrap();
    assert!(matches!(pool.write("s", 0, &buf), Err(Error::ReadOnly(_))));
    pool.write("v", 0, &[1u8; 4096]).unwrap();
    pool.read("v", 0, &mut buf).unwrap();
    assert_eq!(buf, vec![1u8; 4096]);
}

#[test]
fn garbage_devices_are_not_pools() {
    let dev = MemDevice::from_bytes(vec![0x5a; 4 << 20]);
    assert!(matches!(Pool::open(dev), Err(Error::NotAPool(_))));
}

/// Measures the rate of back-to-back requests after the burst allowance is used up.
fn measured_rate(pool: &Pool<MemDevice>, name: &str, size: usize, n: u32) -> (f64, f64) {
    let mut buf = vec![0u8; size];
    for _ in 0..n / 4 {
        pool.read(name, 0, &mut buf).unwrap();
    }
    let t = std::time::Instant::now();
    for _ in 0..n {
        pool.read(name, 0, &mut buf).unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    (n as f64 / secs, n as f64 * size as f64 / secs)
}

#[test]
fn io_limits_hold_within_ten_percent_and_change_live() {
    let pool = Pool::create(MemDevice::new(8 << 20), PoolOptions::default()).unwrap();
    pool.create_volume("v", 4 << 20).unwrap();
    pool.set_qos("v", vblock::Qos { iops: 500, bps: 0 })
        .unwrap();
    let (iops, _) = measured_rate(&pool, "v", 4096, 250);
    assert!(
        (iops / 500.0 - 1.0).abs() < 0.10,
        "{iops:.0} IOPS for a limit of 500"
    );
    pool.set_qos(
        "v",
        vblock::Qos {
            iops: 0,
            bps: 8 << 20,
        },
    )
    .unwrap();
    let (_, bps) = measured_rate(&pool, "v", 1 << 20, 8);
    assert!(
        (bps / (8 << 20) as f64 - 1.0).abs() < 0.10,
        "{bps:.0} B/s for a limit of 8 MiB/s"
    );
    // Lifted live: no waiting at all.
    pool.set_qos("v", vblock::Qos::default()).unwrap();
    let (iops, _) = measured_rate(&pool, "v", 4096, 2000);
    assert!(iops > 2.0 * 500.0, "{iops:.0} IOPS without a limit");
}

#[test]
fn a_diff_applied_to_the_older_snapshot_gives_the_newer_one() {
    let pool = Pool::create(MemDevice::new(32 << 20), PoolOptions::default()).unwrap();
    pool.create_volume("v", 8 << 20).unwrap();
    pool.write("v", 0, &vec![1u8; 3 << 20]).unwrap();
    pool.snapshot("v", "s1").unwrap();
    pool.write("v", 4096, &[2u8; 8192]).unwrap();
    pool.write("v", 5 << 20, &[3u8; 512]).unwrap();
    pool.discard("v", 1 << 20, 65536).unwrap();
    pool.snapshot("v", "s2").unwrap();
    let d = pool.diff(Some("s1"), "s2").unwrap();
    let changed: u64 = d.iter().map(|r| r.length).sum();
    // A cluster copied on write (the 8 KiB write into shared data) counts whole; fresh
    // writes and released blocks count by the 4 KiB block.
    assert_eq!(changed, 65536 + 4096 + 65536, "{d:?}");
    // Replay the diff onto a clone of s1: it becomes s2 byte for byte.
    pool.clone_snapshot("s1", "replica").unwrap();
    for r in &d {
        if r.zero {
            pool.write_zeroes("replica", r.offset, r.length).unwrap();
        } else {
            let mut buf = vec![0u8; r.length as usize];
            pool.read("s2", r.offset, &mut buf).unwrap();
            pool.write("replica", r.offset, &buf).unwrap();
        }
    }
    let (mut a, mut b) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    pool.read("replica", 0, &mut a).unwrap();
    pool.read("s2", 0, &mut b).unwrap();
    assert!(a == b);
    // From nothing: exactly the allocated data.
    let full: u64 = pool
        .diff(None, "s1")
        .unwrap()
        .iter()
        .map(|r| r.length)
        .sum();
    assert_eq!(full, 3 << 20);
}

/// Threads writing interleaved 4 KiB blocks (so they race for the same fresh clusters), a
/// reader batching reads meanwhile, and a snapshot in the middle: every write lands, nothing
/// leaks, the pool checks clean before and after a reopen.
#[test]
fn concurrent_writers_race_for_fresh_clusters_without_losing_writes() {
    use std::sync::Arc;
    let pool = Arc::new(Pool::create(MemDevice::new(64 << 20), PoolOptions::default()).unwrap());
    pool.create_volume("v", 8 << 20).unwrap();
    let blocks = (8 << 20) / 4096u64;
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writers: Vec<_> = (0..8u64)
        .map(|t| {
            let pool = pool.clone();
            let written = written.clone();
            std::thread::spawn(move || {
                for b in (t..blocks).step_by(8) {
                    pool.write("v", b * 4096, &vec![(b % 251) as u8 + 1; 4096])
                        .unwrap();
                    written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if b == 1000 + t {
                        pool.flush().unwrap();
                    }
                }
            })
        })
        .collect();
    let reader = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 4096]);
            for i in 0..200u64 {
                let mut reqs = [
                    vblock::ReadRequest {
                        volume: "v",
                        offset: (i * 65536) % (8 << 20),
                        buf: &mut a,
                    },
                    vblock::ReadRequest {
                        volume: "v",
                        offset: (i * 4096) % (8 << 20),
                        buf: &mut b,
                    },
                ];
                pool.read_batch(&mut reqs).unwrap();
                // A block reads as its data or, not yet written, zeros: never anything else.
                let blk = ((i * 4096) % (8 << 20)) / 4096;
                assert!(b.iter().all(|x| *x == 0) || b.iter().all(|x| *x == (blk % 251) as u8 + 1));
            }
        })
    };
    // The snapshot in the middle: once some writes are in, while the rest go on.
    while written.load(std::sync::atomic::Ordering::Relaxed) < 200
        && !writers.iter().all(|w| w.is_finished())
    {
        std::thread::yield_now();
    }
    pool.snapshot("v", "mid").unwrap();
    for w in writers {
        w.join().unwrap();
    }
    reader.join().unwrap();
    let verify = |pool: &Pool<MemDevice>| {
        let mut all = vec![0u8; 8 << 20];
        pool.read("v", 0, &mut all).unwrap();
        for b in 0..blocks as usize {
            let want = (b % 251) as u8 + 1;
            assert!(
                all[b * 4096..(b + 1) * 4096].iter().all(|x| *x == want),
                "block {b}"
            );
        }
        assert!(pool.check(false).unwrap().is_clean());
    };
    verify(&pool);
    pool.flush().unwrap();
    // Every cluster is either referenced or free: no allocation was lost in a race.
    let used = pool.check(false).unwrap().used_clusters;
    let (total, free) = pool.space();
    assert_eq!(used + free, total);
    let pool = Arc::try_unwrap(pool).unwrap();
    let pool = Pool::open(pool.into_device()).unwrap();
    verify(&pool);
    // Only the two volumes' clusters are used: nothing leaked in the races.
    pool.delete("mid").unwrap();
    pool.delete("v").unwrap();
    pool.flush().unwrap();
    let (total, free) = pool.space();
    assert_eq!(total, free);
}

#[test]
fn the_background_committer_makes_writes_nobody_flushed_durable() {
    use std::sync::Arc;
    use std::time::Duration;
    let pool = Arc::new(Pool::create(MemDevice::new(64 << 20), PoolOptions::default()).unwrap());
    pool.start_committer(Duration::from_millis(20)).unwrap();
    pool.create_volume("v", 8 << 20).unwrap();
    // Writers and the committer run together; nobody flushes.
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                for b in (t..2048).step_by(4) {
                    let data = vec![(b % 251) as u8 + 1; 4096];
                    pool.write("v", b * 4096, &data).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    // Within a few intervals everything is committed: a crash now (the device as it is,
    // without a close) loses nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let dev = loop {
        std::thread::sleep(Duration::from_millis(100));
        let crashed = MemDevice::from_bytes(pool.device().snapshot());
        let reopened = Pool::open(crashed).unwrap();
        let mut all = vec![0u8; 8 << 20];
        if reopened.read("v", 0, &mut all).is_ok()
            && (0..2048usize).all(|b| all[b * 4096] == (b % 251) as u8 + 1)
        {
            break reopened.into_device();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not committed in 10 s"
        );
    };
    let pool = Pool::open(dev).unwrap();
    assert!(pool.check(false).unwrap().is_clean());
}

#[test]
fn io_counters_count_every_path_per_volume() {
    let pool = Pool::create(MemDevice::new(64 << 20), PoolOptions::default()).unwrap();
    pool.create_volume("v", 8 << 20).unwrap();
    pool.create_volume("w", 8 << 20).unwrap();
    assert_eq!(pool.volume("v").unwrap().io, vblock::IoCounters::default());
    pool.write("v", 0, &[1u8; 8192]).unwrap();
    let writes = [
        WriteRequest {
            volume: "v",
            offset: 65536,
            data: &[2u8; 4096],
        },
        WriteRequest {
            volume: "w",
            offset: 0,
            data: &[3u8; 512],
        },
    ];
    assert!(pool.write_batch(&writes).iter().all(Result::is_ok));
    let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 1024]);
    pool.read_batch(&mut [
        vblock::ReadRequest {
            volume: "v",
            offset: 0,
            buf: &mut a,
        },
        vblock::ReadRequest {
            volume: "v",
            offset: 4096,
            buf: &mut b,
        },
    ])
    .unwrap();
    pool.discard("v", 0, 4096).unwrap();
    pool.write_zeroes("w", 0, 512).unwrap();
    let v = pool.volume("v").unwrap().io;
    assert_eq!(
        v,
        vblock::IoCounters {
            reads: 2,
            read_bytes: 5120,
            writes: 2,
            written_bytes: 12288,
            releases: 1,
        }
    );
    let w = pool.list().into_iter().find(|v| v.name == "w").unwrap().io;
    assert_eq!(
        (w.writes, w.written_bytes, w.releases, w.reads),
        (1, 512, 1, 0)
    );
}
