//! Snapshot diff streams: the blocks that differ between two snapshots (or all blocks of
//! one), as a file that moves a volume between pools or hosts incrementally.
//!
//! Format (little-endian): `"VBLKDIFF"`, version u32 (1), flags u32 (bit 0: the stream is a
//! full image, not relative to an older snapshot), volume size u64; then records — kind u8
//! (1 data, 2 zeros), offset u64, length u64, and for data the bytes — and an end record:
//! kind 0 and the crc32 of every byte before it. Readers check the whole stream before
//! anything is applied.

use std::io::{self, Read, Write};

/// Magic of a diff stream.
pub const MAGIC: [u8; 8] = *b"VBLKDIFF";
/// Largest data record.
pub const MAX_RECORD: u64 = 16 << 20;

/// One change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// These bytes at this offset.
    Data(u64, Vec<u8>),
    /// Zeros over this range.
    Zero(u64, u64),
}

/// Writes a stream.
pub struct DiffWriter<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> DiffWriter<W> {
    /// Starts a stream for a volume of `size` bytes; `full`: not relative to an older one.
    pub fn new(mut out: W, size: u64, full: bool) -> io::Result<DiffWriter<W>> {
        let mut head = Vec::with_capacity(24);
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&1u32.to_le_bytes());
        head.extend_from_slice(&(full as u32).to_le_bytes());
        head.extend_from_slice(&size.to_le_bytes());
        out.write_all(&head)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        Ok(DiffWriter { out, crc })
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc.update(bytes);
        self.out.write_all(bytes)
    }

    /// Appends a change.
    pub fn push(&mut self, change: &Change) -> io::Result<()> {
        let (kind, off, len, data) = match change {
            Change::Data(o, d) => (1u8, *o, d.len() as u64, Some(d)),
            Change::Zero(o, l) => (2u8, *o, *l, None),
        };
        self.put(&[kind])?;
        self.put(&off.to_le_bytes())?;
        self.put(&len.to_le_bytes())?;
        if let Some(d) = data {
            self.put(d)?;
        }
        Ok(())
    }

    /// Ends the stream and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.put(&[0])?;
        let crc = self.crc.clone().finalize();
        self.out.write_all(&crc.to_le_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The header of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Volume size in bytes.
    pub size: u64,
    /// A full image (not relative to an older snapshot).
    pub full: bool,
}

fn bad(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// Reads a stream: [`read_header`] then [`next_change`] until `None`.
pub fn read_header(r: &mut impl Read, crc: &mut crc32fast::Hasher) -> io::Result<Header> {
    let mut head = [0u8; 24];
    r.read_exact(&mut head)?;
    crc.update(&head);
    if head[..8] != MAGIC {
        return Err(bad("not a vblock diff stream"));
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if version != 1 {
        return Err(bad(format!(
            "diff stream version {version}: this build reads 1"
        )));
    }
    let flags = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
    let size = u64::from_le_bytes(head[16..24].try_into().unwrap_or_default());
    Ok(Header {
        size,
        full: flags & 1 != 0,
    })
}

/// The next change, or `None` at a valid end (the crc is checked there).
pub fn next_change(
    r: &mut impl Read,
    crc: &mut crc32fast::Hasher,
    size: u64,
) -> io::Result<Option<Change>> {
    let mut kind = [0u8; 1];
    r.read_exact(&mut kind)?;
    crc.update(&kind);
    if kind[0] == 0 {
        let mut c = [0u8; 4];
        r.read_exact(&mut c)?;
        if u32::from_le_bytes(c) != crc.clone().finalize() {
            return Err(bad("diff stream checksum mismatch (damaged or truncated)"));
        }
        return Ok(None);
    }
    let mut fields = [0u8; 16];
    r.read_exact(&mut fields)?;
    crc.update(&fields);
    let off = u64::from_le_bytes(fields[..8].try_into().unwrap_or_default());
    let len = u64::from_le_bytes(fields[8..].try_into().unwrap_or_default());
    if off.checked_add(len).is_none_or(|end| end > size) || off % 512 != 0 || len % 512 != 0 {
        return Err(bad(format!(
            "record {len} bytes at {off}: outside the volume or unaligned"
        )));
    }
    match kind[0] {
        1 => {
            if len > MAX_RECORD {
                return Err(bad(format!("data record of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            r.read_exact(&mut data)?;
            crc.update(&data);
            Ok(Some(Change::Data(off, data)))
        }
        2 => Ok(Some(Change::Zero(off, len))),
        k => Err(bad(format!("record kind {k}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_round_trip_and_damage_is_caught() {
        let mut w = DiffWriter::new(Vec::new(), 1 << 20, false).unwrap();
        w.push(&Change::Data(4096, vec![7; 8192])).unwrap();
        w.push(&Change::Zero(65536, 65536)).unwrap();
        let bytes = w.finish().unwrap();
        let read = |b: &[u8]| -> io::Result<Vec<Change>> {
            let mut r = b;
            let mut crc = crc32fast::Hasher::new();
            let h = read_header(&mut r, &mut crc)?;
            let mut out = Vec::new();
            while let Some(c) = next_change(&mut r, &mut crc, h.size)? {
                out.push(c);
            }
            Ok(out)
        };
        assert_eq!(read(&bytes).unwrap().len(), 2);
        for at in [0, 30, 100, bytes.len() - 2] {
            let mut b = bytes.clone();
            b[at] ^= 1;
            assert!(read(&b).is_err(), "flip at {at}");
        }
        assert!(read(&bytes[..bytes.len() - 3]).is_err(), "truncated");
    }
}
