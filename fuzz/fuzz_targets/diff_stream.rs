//! Fuzz target: a snapshot diff stream (what `vctl snapshot diff-import` reads from a file)
//! through the stream reader. No input makes it panic; every change it accepts lies inside
//! the volume the header declares, aligned.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vblock::diffstream::{Change, next_change, read_header};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let mut crc = crc32fast::Hasher::new();
    let Ok(h) = read_header(&mut r, &mut crc) else {
        return;
    };
    while let Ok(Some(c)) = next_change(&mut r, &mut crc, h.size) {
        let (off, len) = match &c {
            Change::Data(off, d) => (*off, d.len() as u64),
            Change::Zero(off, len) => (*off, *len),
        };
        assert!(off + len <= h.size && off % 512 == 0 && len % 512 == 0);
    }
});
