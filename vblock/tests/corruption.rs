//! Corruption: one bit flipped in each kind of metadata block (superblock, checkpoint head,
//! tree nodes, volume table, journal). Opening either names the damaged structure or gives
//! back exactly the data that was there; it never panics and never returns wrong data.

use std::collections::BTreeMap;

use vblock::device::MemDevice;
use vblock::format::{
    BLOCK_SIZE, CKPT_KIND_HEAD, CKPT_KIND_NODE, CKPT_KIND_VOLUMES, CkptHeader, JournalHeader,
    Superblock,
};
use vblock::{Error, Pool, PoolOptions};
use zerocopy::FromBytes;

const VOL: u64 = 1 << 20;

/// Every volume's bytes, by name.
type Contents = BTreeMap<String, Vec<u8>>;

fn contents(pool: &Pool<MemDevice>) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for v in pool.list() {
        let mut buf = vec![0u8; v.size as usize];
        pool.read(&v.name, 0, &mut buf).unwrap();
        out.insert(v.name, buf);
    }
    out
}

/// A pool whose metadata has every kind of block: a checkpoint with nodes shared between a
/// volume, a snapshot and a clone, and journal transactions after it.
/// Also returns the contents before the last transaction: a damaged block of the journal's
/// last transaction is indistinguishable from a crash before its flush returned (as in every
/// journaling store), so losing that one transaction is the one allowed outcome there.
fn pristine() -> (Vec<u8>, Contents, Contents) {
    let opts = PoolOptions {
        journal_blocks: Some(32),
        ckpt_blocks: Some(64),
    };
    let pool = Pool::create(MemDevice::new(16 << 20), opts).unwrap();
    pool.create_volume("a", VOL).unwrap();
    for i in 0..16u64 {
        pool.write("a", i * 65536 + 4096, &vec![i as u8 + 1; 8192])
            .unwrap();
    }
    pool.snapshot("a", "snap").unwrap();
    pool.clone_snapshot("snap", "clone").unwrap();
    pool.write("clone", 0, &[0xcc; 4096]).unwrap();
    pool.flush().unwrap();
    // Reopen: the journal is folded into a checkpoint; then journal some more transactions.
    let pool = Pool::open(pool.into_device()).unwrap();
    let mut before_last = BTreeMap::new();
    for i in 0..3u64 {
        if i == 2 {
            before_last = contents(&pool);
        }
        pool.write("a", i * 65536, &[0xa0 + i as u8; 4096]).unwrap();
        pool.create_volume(&format!("extra{i}"), VOL).unwrap();
        pool.flush().unwrap();
    }
    let expected = contents(&pool);
    (pool.into_device().snapshot(), expected, before_last)
}

/// Blocks of each kind: (what, block index).
fn metadata_blocks(img: &[u8]) -> Vec<(String, u64)> {
    let (sb0, _) = Superblock::read_from_prefix(img).unwrap();
    let (sb1, _) = Superblock::read_from_prefix(&img[BLOCK_SIZE..]).unwrap();
    let (newest, older) = if sb0.generation.get() > sb1.generation.get() {
        (0, 1)
    } else {
        (1, 0)
    };
    let sb = if newest == 0 { sb0 } else { sb1 };
    let mut out = vec![
        ("newest superblock".to_owned(), newest),
        ("older superblock".to_owned(), older),
    ];
    let area = sb.ckpt_start[sb.active_ckpt.get() as usize].get();
    for i in 0..sb.ckpt_used.get() {
        let b = area + i;
        let (h, _) = CkptHeader::read_from_prefix(&img[b as usize * BLOCK_SIZE..]).unwrap();
        let what = match h.kind.get() {
            CKPT_KIND_HEAD => "checkpoint head".to_owned(),
            CKPT_KIND_NODE => format!("checkpoint node (level {})", h.level_or_count.get()),
            CKPT_KIND_VOLUMES => "checkpoint volume table".to_owned(),
            k => panic!("kind {k}"),
        };
        out.push((what, b));
    }
    let jb = sb.journal_blocks.get();
    for i in 0..jb {
        let seq = sb.journal_seq.get() + i;
        let b = sb.journal_start.get() + seq % jb;
        let (h, _) = JournalHeader::read_from_prefix(&img[b as usize * BLOCK_SIZE..]).unwrap();
        if h.seq.get() != seq || h.epoch.get() != sb.generation.get() {
            break;
        }
        let what = if h.flags.get() & 1 != 0 {
            "journal commit block"
        } else {
            "journal block"
        };
        out.push((what.to_owned(), b));
    }
    // Mark the blocks of the last transaction.
    let commits: Vec<usize> = (0..out.len())
        .filter(|i| out[*i].0 == "journal commit block")
        .collect();
    if let [.., prev, _last] = commits[..] {
        for entry in out.iter_mut().skip(prev + 1) {
            entry.0 = format!("{} (last transaction)", entry.0);
        }
    }
    out
}

#[test]
fn a_flipped_bit_in_any_metadata_block_is_reported_or_harmless() {
    let (img, expected, before_last) = pristine();
    flip_everywhere(&img, &expected, &before_last, true);
    // A cleanly closed pool: everything is in the checkpoint, nothing may be lost.
    let pool = Pool::open(MemDevice::from_bytes(img)).unwrap();
    let closed = pool.close().unwrap().snapshot();
    flip_everywhere(&closed, &expected, &expected, false);
}

fn flip_everywhere(
    img: &[u8],
    expected: &BTreeMap<String, Vec<u8>>,
    before_last: &BTreeMap<String, Vec<u8>>,
    with_journal: bool,
) {
    let blocks = metadata_blocks(img);
    let kinds: std::collections::BTreeSet<&str> = blocks
        .iter()
        .map(|(w, _)| w.split(' ').next().unwrap_or(""))
        .collect();
    assert!(kinds.contains("checkpoint"), "{blocks:?}");
    assert_eq!(kinds.contains("journal"), with_journal, "{blocks:?}");
    let mut reported = 0;
    for (what, b) in &blocks {
        for byte in [0usize, 9, 40, 100, 700, 2000, 4095] {
            let mut bad = img.to_vec();
            bad[*b as usize * BLOCK_SIZE + byte] ^= 0x04;
            match Pool::open(MemDevice::from_bytes(bad)) {
                Ok(pool) => {
                    let got = contents(&pool);
                    let ok = got == *expected
                        || (what.ends_with("(last transaction)") && got == *before_last);
                    assert!(
                        ok,
                        "{what} (block {b}, byte {byte}): opened with other data"
                    );
                    assert!(pool.check(false).unwrap().is_clean());
                }
                Err(e @ (Error::Corrupt(_) | Error::NotAPool(_))) => {
                    // Damage the pool can place is reported at the damaged block.
                    if let Error::Corrupt(c) = &e
                        && (what.starts_with("checkpoint") || what.starts_with("journal"))
                    {
                        assert_eq!(
                            c.offset,
                            Some(*b * BLOCK_SIZE as u64),
                            "{what} (block {b}, byte {byte}): {e}"
                        );
                    }
                    let msg = e.to_string();
                    assert!(
                        msg.contains("superblock")
                            || msg.contains("checkpoint")
                            || msg.contains("journal"),
                        "{what}: {msg}"
                    );
                    reported += 1;
                }
                Err(e) => panic!("{what} (block {b}, byte {byte}): unexpected error {e}"),
            }
        }
    }
    assert!(reported > 0);
}
