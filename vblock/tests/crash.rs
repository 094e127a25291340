//! Crash replay in the spirit of dm-log-writes: every write and flush reaching the pool's
//! device is recorded; a crash is simulated by rebuilding the device from a prefix of the
//! record — writes before the last completed flush all there, writes after it each kept, lost
//! or torn, in any order — and the pool must open, check clean, keep everything acknowledged
//! by that flush, and show every block as its old or a newer content, never anything else.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use vblock::device::{Device, MemDevice};
use vblock::{Pool, PoolOptions};

enum Event {
    Write(u64, Vec<u8>),
    Flush,
}

/// A device that records what reaches it.
struct Recorder {
    dev: MemDevice,
    log: Mutex<Vec<Event>>,
}

impl Device for Recorder {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.dev.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.log
            .lock()
            .unwrap()
            .push(Event::Write(offset, buf.to_vec()));
        self.dev.write_at(offset, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.log.lock().unwrap().push(Event::Flush);
        Ok(())
    }
    fn size(&self) -> u64 {
        self.dev.size()
    }
}

const DEV: u64 = 4 << 20;
const VOL: u64 = 512 << 10;
const BLOCKS: usize = (VOL / 4096) as usize;

/// A small deterministic generator (no dependency on the test order).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Block `b` of a write stamped `stamp`: the stamp and block number fill the block.
fn pattern(stamp: u32, b: usize) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    for (i, c) in v.chunks_mut(8).enumerate() {
        c[..4].copy_from_slice(&stamp.to_le_bytes());
        c[4..].copy_from_slice(&((b * 512 + i) as u32).to_le_bytes());
    }
    v
}

/// What the workload knew at each completed flush: the log length then, the volume's
/// blocks (stamps, 0 = zeros), and the snapshots with their blocks.
struct Durable {
    log_len: usize,
    vol: Vec<u32>,
    snapshots: BTreeMap<String, Vec<u32>>,
}

#[test]
fn every_crash_point_opens_consistent_with_acknowledged_data_intact() {
    let opts = PoolOptions {
        journal_blocks: Some(12),
        ckpt_blocks: Some(24),
    };
    let rec = Recorder {
        dev: MemDevice::new(DEV),
        log: Mutex::new(Vec::new()),
    };
    let pool = Pool::create(rec, opts).unwrap();
    pool.create_volume("v", VOL).unwrap();
    pool.flush().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut vol = vec![0u32; BLOCKS];
    let mut snapshots: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    // Every stamp ever written to each block (the "new" contents a crash may show).
    let mut written: Vec<HashSet<u32>> = vec![HashSet::new(); BLOCKS];
    let mut durable = vec![Durable {
        log_len: pool.device().log.lock().unwrap().len(),
        vol: vol.clone(),
        snapshots: snapshots.clone(),
    }];
    let mut stamp = 0u32;
    let mut deleted: HashSet<String> = HashSet::new();
    for step in 0..150 {
        match rng.below(20) {
            0..=12 => {
                let b = rng.below(BLOCKS as u64 - 4) as usize;
                let n = 1 + rng.below(4) as usize;
                stamp += 1;
                let mut data = Vec::new();
                for i in b..b + n {
                    data.extend(pattern(stamp, i));
                    vol[i] = stamp;
                    written[i].insert(stamp);
                }
                pool.write("v", b as u64 * 4096, &data).unwrap();
            }
            13 => {
                let b = rng.below(BLOCKS as u64 - 8) as usize;
                pool.discard("v", b as u64 * 4096, 8 * 4096).unwrap();
                for i in b..b + 8 {
                    vol[i] = 0;
                    written[i].insert(0);
                }
            }
            14 if snapshots.len() < 3 => {
                let name = format!("s{step}");
                pool.snapshot("v", &name).unwrap();
                snapshots.insert(name, vol.clone());
            }
            15 | 16 if !snapshots.is_empty() => {
                let victim = snapshots.keys().next().cloned().unwrap();
                pool.delete(&victim).unwrap();
                snapshots.remove(&victim);
                deleted.insert(victim);
            }
            _ => {
                pool.flush().unwrap();
                durable.push(Durable {
                    log_len: pool.device().log.lock().unwrap().len(),
                    vol: vol.clone(),
                    snapshots: snapshots.clone(),
                });
            }
        }
    }
    let rec = pool.into_device();
    let log = rec.log.into_inner().unwrap();
    // Crash at every point of the log. Writes before the last device flush preceding the
    // crash point are on the disk; writes after it may each be there, be lost or be torn at a
    // sector boundary, in any order.
    let mut crash_points = 0;
    let mut base = vec![0u8; DEV as usize];
    let mut last_flush = 0usize; // log index after the last flush applied to `base`
    let mut rng = Rng(42);
    for k in 0..=log.len() {
        if k > 0 && matches!(log[k - 1], Event::Flush) {
            for e in &log[last_flush..k] {
                if let Event::Write(off, data) = e {
                    base[*off as usize..*off as usize + data.len()].copy_from_slice(data);
                }
            }
            last_flush = k;
        }
        // The newest workload flush that had returned by this point.
        let Some(d) = durable.iter().rev().find(|d| d.log_len <= k) else {
            continue;
        };
        let tail: Vec<(u64, &Vec<u8>)> = log[last_flush..k]
            .iter()
            .filter_map(|e| match e {
                Event::Write(o, data) => Some((*o, data)),
                Event::Flush => None,
            })
            .collect();
        for variant in 0..3 {
            let mut img = base.clone();
            let mut order: Vec<usize> = (0..tail.len()).collect();
            if variant > 0 {
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.below(i as u64 + 1) as usize);
                }
            }
            for &w in &order {
                let (o, data) = tail[w];
                match (variant, rng.below(4)) {
                    (0, _) => {}
                    (_, 0) => continue, // lost
                    (_, 1) => {
                        // torn: only a prefix of sectors made it
                        let keep = 512 * (1 + rng.below((data.len() / 512) as u64)) as usize;
                        img[o as usize..o as usize + keep].copy_from_slice(&data[..keep]);
                        continue;
                    }
                    _ => {}
                }
                img[o as usize..o as usize + data.len()].copy_from_slice(data);
            }
            check_crash(img, d, &written, &deleted, k, variant);
            crash_points += 1;
        }
    }
    eprintln!(
        "{crash_points} crash points over {} workload flushes",
        durable.len()
    );
    assert!(crash_points >= 1000, "only {crash_points} crash points");
}

fn check_crash(
    img: Vec<u8>,
    d: &Durable,
    written: &[HashSet<u32>],
    deleted: &HashSet<String>,
    k: usize,
    variant: usize,
) {
    let at = format!(
        "crash at log {k} (acknowledged at {}, variant {variant})",
        d.log_len
    );
    let pool = Pool::open(MemDevice::from_bytes(img)).unwrap_or_else(|e| panic!("{at}: open: {e}"));
    let report = pool.check(false).unwrap();
    assert!(report.is_clean(), "{at}: {report:?}");
    let mut buf = vec![0u8; VOL as usize];
    // Snapshots acknowledged by the flush are exactly as they were (or deleted later on).
    for (name, blocks) in &d.snapshots {
        if let Err(e) = pool.read(name, 0, &mut buf) {
            assert!(deleted.contains(name), "{at}: snapshot {name}: {e}");
            continue;
        }
        for (b, s) in blocks.iter().enumerate() {
            let want = if *s == 0 {
                vec![0u8; 4096]
            } else {
                pattern(*s, b)
            };
            assert!(
                buf[b * 4096..(b + 1) * 4096] == want[..],
                "{at}: snapshot {name} block {b}"
            );
        }
    }
    // The volume: every sector (the unit a disk writes atomically) is its acknowledged
    // content or a later one, nothing else.
    pool.read("v", 0, &mut buf).unwrap();
    for b in 0..BLOCKS {
        let old = if d.vol[b] == 0 {
            vec![0u8; 4096]
        } else {
            pattern(d.vol[b], b)
        };
        let newer: Vec<Vec<u8>> = written[b]
            .iter()
            .map(|s| {
                if *s == 0 {
                    vec![0u8; 4096]
                } else {
                    pattern(*s, b)
                }
            })
            .collect();
        for sec in 0..8 {
            let r = sec * 512..(sec + 1) * 512;
            let got = &buf[b * 4096 + r.start..b * 4096 + r.end];
            assert!(
                got == &old[r.clone()] || newer.iter().any(|n| got == &n[r.clone()]),
                "{at}: block {b} sector {sec} is neither old nor new"
            );
        }
    }
}
