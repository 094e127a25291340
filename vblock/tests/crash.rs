//! Crash replay in the spirit of dm-log-writes: every write and flush reaching the pool's
//! device is recorded; a crash is simulated by rebuilding the device from a prefix of the
//! record — writes before the last completed flush all there, writes after it each kept, lost
//! or torn, in any order — and the pool must open, check clean, keep everything acknowledged
//! by that flush, and show every block as its old or a newer content, never anything else.
//! Half the flushes are held at one of their device flushes while more changes are made, as
//! when writes go on during a commit.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;

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
    gate: Mutex<Option<Gate>>,
}

/// Holds a device flush until told to go on: `skip` flushes pass first.
struct Gate {
    skip: usize,
    held: Sender<()>,
    go: Receiver<()>,
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
        let gate = {
            let mut gate = self.gate.lock().unwrap();
            match gate.as_mut() {
                Some(g) if g.skip > 0 => {
                    g.skip -= 1;
                    None
                }
                _ => gate.take(),
            }
        };
        if let Some(g) = gate {
            g.held.send(()).unwrap();
            g.go.recv().unwrap();
        }
        Ok(())
    }
    fn size(&self) -> u64 {
        self.dev.size()
    }
}

const DEV: u64 = 4 << 20;
const VOL: u64 = 512 << 10;
const BLOCKS: usize = (VOL / 4096) as usize;
const CLUSTER_BLOCKS: usize = 16;

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

/// The workload's knowledge: the volume's blocks (stamps), snapshots, every stamp each block
/// ever had, deleted snapshots.
struct Workload {
    vol: Vec<u32>,
    snapshots: BTreeMap<String, Vec<u32>>,
    written: Vec<HashSet<u32>>,
    deleted: HashSet<String>,
    stamp: u32,
}

impl Workload {
    /// One change (no flush): a write, a discard, a snapshot or a snapshot's deletion.
    fn change(&mut self, pool: &Pool<Recorder>, rng: &mut Rng, step: usize) {
        match rng.below(17) {
            0..=12 => {
                let b = rng.below(BLOCKS as u64 - 4) as usize;
                self.write(pool, b, 1 + rng.below(4) as usize);
            }
            13 => self.discard(pool, rng.below(BLOCKS as u64 - 8) as usize, 8),
            14 if self.snapshots.len() < 3 => {
                let name = format!("s{step}");
                pool.snapshot("v", &name).unwrap();
                self.snapshots.insert(name, self.vol.clone());
            }
            15 | 16 => self.delete_oldest_snapshot(pool),
            _ => {}
        }
    }

    fn write(&mut self, pool: &Pool<Recorder>, b: usize, n: usize) {
        self.stamp += 1;
        let mut data = Vec::new();
        for i in b..b + n {
            data.extend(pattern(self.stamp, i));
            self.vol[i] = self.stamp;
            self.written[i].insert(self.stamp);
        }
        pool.write("v", b as u64 * 4096, &data).unwrap();
    }

    fn discard(&mut self, pool: &Pool<Recorder>, b: usize, n: usize) {
        pool.discard("v", b as u64 * 4096, n as u64 * 4096).unwrap();
        for i in b..b + n {
            self.vol[i] = 0;
            self.written[i].insert(0);
        }
    }

    fn delete_oldest_snapshot(&mut self, pool: &Pool<Recorder>) {
        if let Some(victim) = self.snapshots.keys().next().cloned() {
            self.delete_snapshot(pool, &victim);
        }
    }

    /// Returns the deleted snapshot's blocks.
    fn delete_snapshot(&mut self, pool: &Pool<Recorder>, name: &str) -> Vec<u32> {
        pool.delete(name).unwrap();
        self.deleted.insert(name.to_string());
        self.snapshots.remove(name).unwrap()
    }

    /// First blocks of the 64 KiB clusters of the volume that hold data, and that do not.
    fn clusters(&self) -> (Vec<usize>, Vec<usize>) {
        (0..BLOCKS)
            .step_by(CLUSTER_BLOCKS)
            .partition(|&b| self.vol[b..b + CLUSTER_BLOCKS].iter().any(|s| *s != 0))
    }

    fn durable(&self, pool: &Pool<Recorder>) -> Durable {
        Durable {
            log_len: pool.device().log.lock().unwrap().len(),
            vol: self.vol.clone(),
            snapshots: self.snapshots.clone(),
        }
    }
}

/// A flush held at its `at`-th device flush (0: the data flush before the metadata) while
/// more changes are made. Its transaction first releases space — a snapshot deleted, or a
/// whole cluster of the volume discarded — and the changes begin with writes that must land
/// neither in that cluster (freed space is not reused before the commit is durable) nor over
/// what the snapshot shared (no in-place write into what the committed state still shares).
/// Returns the state that flush made durable.
fn flush_during_changes(
    pool: &Pool<Recorder>,
    durable: &mut Vec<Durable>,
    w: &mut Workload,
    rng: &mut Rng,
    step: usize,
    at: usize,
) -> Durable {
    let release_snapshot = rng.below(2) == 0;
    if release_snapshot && durable.last().unwrap().snapshots.is_empty() {
        // Commit a snapshot first.
        let name = format!("c{step}");
        pool.snapshot("v", &name).unwrap();
        w.snapshots.insert(name, w.vol.clone());
        pool.flush().unwrap();
        durable.push(w.durable(pool));
    }
    let committed = durable.last().unwrap();
    let (held_tx, held) = channel();
    let (go, go_rx) = channel();
    *pool.device().gate.lock().unwrap() = Some(Gate {
        skip: at,
        held: held_tx,
        go: go_rx,
    });
    let (with_data, _) = w.clusters();
    let mut discarded = None;
    let mut deleted = None;
    // A snapshot of the committed state.
    if let Some(name) = committed
        .snapshots
        .keys()
        .find(|n| release_snapshot && w.snapshots.contains_key(*n))
    {
        deleted = Some(w.delete_snapshot(pool, &name.clone()));
    } else if let Some(&k) = with_data.get(rng.below(with_data.len().max(1) as u64) as usize) {
        w.discard(pool, k, CLUSTER_BLOCKS);
        discarded = Some(k);
    }
    let mut sealed = w.durable(pool);
    std::thread::scope(|scope| {
        let commit = scope.spawn(|| pool.flush());
        loop {
            if held.recv_timeout(Duration::from_millis(1)).is_ok() {
                // The commit is under way without the pool's lock: changes go on. Fresh
                // space first (a cluster of its own), then over data.
                let (with_data, without) = w.clusters();
                let elsewhere = |j: &&usize| Some(**j) != discarded;
                let fresh = match without.iter().find(elsewhere) {
                    Some(&j) => Some(j),
                    None => with_data.iter().find(elsewhere).map(|&j| {
                        w.discard(pool, j, CLUSTER_BLOCKS);
                        j
                    }),
                };
                if let Some(j) = fresh {
                    w.write(pool, j, CLUSTER_BLOCKS);
                }
                // Over data the committed state shares with the deleted snapshot only (no
                // snapshot left has that content there).
                let (with_data, _) = w.clusters();
                let shared = with_data.iter().find(|&&j| {
                    deleted
                        .as_ref()
                        .is_some_and(|d| d[j] != 0 && d[j..j + 4] == w.vol[j..j + 4])
                        && w.snapshots.values().all(|s| s[j..j + 4] != w.vol[j..j + 4])
                });
                let random = with_data.get(rng.below(with_data.len() as u64) as usize);
                eprintln!(
                    "held at {at}: deleted {} shared {shared:?} log {}",
                    deleted.is_some(),
                    pool.device().log.lock().unwrap().len()
                );
                if let Some(&j) = shared.or(random) {
                    w.write(pool, j, 4);
                }
                for _ in 0..rng.below(3) {
                    w.change(pool, rng, step);
                }
                go.send(()).unwrap();
                break;
            }
            if commit.is_finished() {
                break; // it had fewer device flushes
            }
        }
        commit.join().unwrap().unwrap();
    });
    pool.device().gate.lock().unwrap().take();
    sealed.log_len = pool.device().log.lock().unwrap().len();
    sealed
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
        gate: Mutex::new(None),
    };
    let pool = Pool::create(rec, opts).unwrap();
    pool.create_volume("v", VOL).unwrap();
    pool.flush().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut w = Workload {
        vol: vec![0u32; BLOCKS],
        snapshots: BTreeMap::new(),
        written: vec![HashSet::new(); BLOCKS],
        deleted: HashSet::new(),
        stamp: 0,
    };
    let mut durable = vec![w.durable(&pool)];
    let mut held_flushes = 0;
    for step in 0..200 {
        if rng.below(20) < 17 {
            w.change(&pool, &mut rng, step);
            continue;
        }
        if rng.below(3) == 0 {
            pool.flush().unwrap();
            durable.push(w.durable(&pool));
        } else {
            let at = rng.below(4) as usize;
            let d = flush_during_changes(&pool, &mut durable, &mut w, &mut rng, step, at);
            durable.push(d);
            held_flushes += 1;
        }
    }
    let Workload {
        written, deleted, ..
    } = w;
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
        "{crash_points} crash points over {} workload flushes ({held_flushes} held)",
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
