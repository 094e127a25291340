//! Fuzz target: a pool file as a hostile disk holds it. A real pool (volumes, a snapshot,
//! data, committed transactions still in the journal) is made once; the input overwrites
//! bytes of its metadata area (triples: a 2-byte position, a byte) and, when its first
//! byte is odd, makes the checksum of every superblock, journal and checkpoint block valid
//! again, so that both damage and well-sealed nonsense reach the decoders. The pool is then
//! opened (superblock choice, journal replay, checkpoint load) and, if it opens, read and
//! checked. No input makes it panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vblock::device::MemDevice;
use vblock::format::{
    BLOCK_SIZE, CKPT_CRC_AT, CKPT_MAGIC, JOURNAL_CRC_AT, JOURNAL_MAGIC, SUPER_CRC_AT, block_crc,
};
use vblock::{Pool, PoolOptions};

/// Bytes of the image the input may overwrite: superblocks, journal and checkpoints.
const METADATA: usize = 512 << 10;

fn template() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let opts = PoolOptions {
            journal_blocks: Some(32),
            ckpt_blocks: Some(16),
        };
        let pool = Pool::create(MemDevice::new(8 << 20), opts).unwrap();
        pool.create_volume("v", 4 << 20).unwrap();
        pool.write("v", 0, &[0x5a; 65536]).unwrap();
        pool.flush().unwrap();
        pool.snapshot("v", "v@1").unwrap();
        pool.write("v", 128 << 10, &[0x6b; 8192]).unwrap();
        pool.create_volume("w", 1 << 20).unwrap();
        pool.flush().unwrap();
        // Not closed: the last transactions are in the journal, to be replayed.
        pool.device().snapshot()
    })
}

fn sealed(magic: &[u8; 8], crc_at: usize, block: &mut [u8]) {
    if block.starts_with(magic) {
        let crc = block_crc(block, crc_at);
        block[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, patches)) = data.split_first() else {
        return;
    };
    let mut image = template().to_vec();
    for p in patches.chunks_exact(3) {
        let at = usize::from(u16::from_le_bytes([p[0], p[1]])) * 8 % METADATA;
        image[at] = p[2];
    }
    if mode & 1 == 1 {
        for block in image[..METADATA].chunks_exact_mut(BLOCK_SIZE) {
            sealed(&vblock::format::SUPER_MAGIC, SUPER_CRC_AT, block);
            sealed(&JOURNAL_MAGIC, JOURNAL_CRC_AT, block);
            sealed(&CKPT_MAGIC, CKPT_CRC_AT, block);
        }
    }
    let Ok(pool) = Pool::open(MemDevice::from_bytes(image)) else {
        return;
    };
    let mut buf = vec![0u8; 16384];
    for v in pool.list() {
        let n = (v.size as usize).min(buf.len()) & !511;
        let _ = pool.read(&v.name, 0, &mut buf[..n]);
    }
    let _ = pool.check(false);
});
