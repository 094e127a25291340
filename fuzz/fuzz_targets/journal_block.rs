//! Fuzz target: a journal block's records. The input is the payload of a block whose header
//! and checksum are made valid here, so the record decoder itself is what gets exercised (a
//! damaged checksum stops everything before it). No input makes it panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vblock::format::{BLOCK_SIZE, JOURNAL_CRC_AT, JOURNAL_MAGIC, JournalHeader, block_crc};
use vblock::journal::{Segment, decode_block};
use zerocopy::IntoBytes;
use zerocopy::little_endian::{U32, U64};

const SEG: Segment = Segment {
    uuid: [7; 16],
    epoch: 3,
};

fuzz_target!(|data: &[u8]| {
    let header_len = std::mem::size_of::<JournalHeader>();
    let payload = &data[..data.len().min(BLOCK_SIZE - header_len)];
    let mut block = vec![0u8; BLOCK_SIZE];
    let h = JournalHeader {
        magic: JOURNAL_MAGIC,
        seq: U64::new(5),
        len: U32::new(payload.len() as u32),
        flags: U32::new(1),
        uuid: SEG.uuid,
        epoch: U64::new(SEG.epoch),
        crc: U32::new(0),
        reserved: U32::new(0),
        txn_start: U64::new(5),
    };
    block[..header_len].copy_from_slice(h.as_bytes());
    block[header_len..header_len + payload.len()].copy_from_slice(payload);
    let crc = block_crc(&block, JOURNAL_CRC_AT);
    block[JOURNAL_CRC_AT..JOURNAL_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    let _ = decode_block(&block, 5, SEG);
    // The same bytes as a whole block, checksum and all, as read from a hostile disk.
    let mut raw = data.to_vec();
    raw.resize(BLOCK_SIZE, 0);
    let _ = decode_block(&raw, 5, SEG);
});
