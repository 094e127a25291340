//! Fuzz target: a pool checkpoint (the metadata tree and the volume table, as a hostile disk
//! could hold them). A real checkpoint is written, then the input overwrites bytes of it
//! (pairs of a 2-byte position and a byte) and every block's checksum is made valid again,
//! so the decoder behind the checksums is what gets exercised. No input makes it panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vblock::checkpoint::{load, write};
use vblock::format::{BLOCK_SIZE, CKPT_CRC_AT, block_crc};
use vblock::meta::{Entry, Meta};

const CLUSTERS: u32 = 4096;

fn template() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let mut meta = Meta::new(CLUSTERS);
        let v = meta.create_volume("v", 64 << 20).unwrap();
        for i in 0..40u64 {
            meta.set_entry(
                v,
                i * 3,
                Entry {
                    cluster: i as u32 + 1,
                    bitmap: 0xffff,
                },
            )
            .unwrap();
        }
        meta.snapshot("v", "v@1").unwrap();
        meta.create_volume("w", 1 << 30).unwrap();
        write(&meta, 2)
    })
}

fuzz_target!(|data: &[u8]| {
    let mut ckpt = template().to_vec();
    let span = ckpt.len();
    for p in data.chunks_exact(3) {
        let at = usize::from(u16::from_le_bytes([p[0], p[1]])) * 7 % span;
        // Header fields other than the checksum stay fuzzable too.
        ckpt[at] = p[2];
    }
    for block in ckpt.chunks_exact_mut(BLOCK_SIZE) {
        let crc = block_crc(block, CKPT_CRC_AT);
        block[CKPT_CRC_AT..CKPT_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }
    if let Ok(meta) = load(&ckpt, 2, CLUSTERS) {
        let _ = meta.volumes().count();
    }
});
