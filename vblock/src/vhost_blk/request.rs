//! virtio-blk requests as the guest writes them (virtio 1.2 §5.2.6): the 16-byte header at
//! the start of a chain and the segments of discard and write-zeroes, decoded from bytes.
//! Pure: the queue and guest memory are `mod.rs`'s.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

/// Logical sector size of the device (SeaBIOS wants 512).
pub const SECTOR: u64 = 512;

/// Length of a request header (`struct virtio_blk_req` up to the data).
pub const HEADER_LEN: usize = 16;

/// Length of a discard or write-zeroes segment.
pub const SEGMENT_LEN: usize = 16;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read into the chain's writable buffers.
    In,
    /// Write the chain's readable data.
    Out,
    /// Make what was written durable.
    Flush,
    /// The device's serial number.
    GetId,
    /// Discard the ranges of the segments that follow.
    Discard,
    /// Zero the ranges of the segments that follow.
    WriteZeroes,
    /// Anything else (answered `VIRTIO_BLK_S_UNSUPP`).
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> RequestType {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// A request header: its type and the first sector it addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// What it asks for.
    pub kind: RequestType,
    /// First sector (of reads and writes).
    pub sector: u64,
}

impl Request {
    /// Decodes a header: `type` (le32), a reserved le32, `sector` (le64).
    pub fn parse(header: &[u8; HEADER_LEN]) -> Request {
        let [t0, t1, t2, t3, _, _, _, _, s @ ..] = *header;
        Request {
            kind: RequestType::from(u32::from_le_bytes([t0, t1, t2, t3])),
            sector: u64::from_le_bytes(s),
        }
    }

    /// The byte offset of the first sector, if it has one.
    pub fn offset(&self) -> Option<u64> {
        self.sector.checked_mul(SECTOR)
    }
}

/// A segment of a discard or write-zeroes request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub sectors: u32,
    /// Flags (bit 0: unmap, for write-zeroes).
    pub flags: u32,
}

impl Segment {
    /// Decodes a segment: `sector` (le64), `num_sectors` (le32), `flags` (le32).
    pub fn parse(bytes: &[u8; SEGMENT_LEN]) -> Segment {
        let [
            s0,
            s1,
            s2,
            s3,
            s4,
            s5,
            s6,
            s7,
            n0,
            n1,
            n2,
            n3,
            f0,
            f1,
            f2,
            f3,
        ] = *bytes;
        Segment {
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            sectors: u32::from_le_bytes([n0, n1, n2, n3]),
            flags: u32::from_le_bytes([f0, f1, f2, f3]),
        }
    }

    /// The byte range `(offset, length)`, if the offset exists.
    pub fn range(&self) -> Option<(u64, u64)> {
        Some((
            self.sector.checked_mul(SECTOR)?,
            self.sectors as u64 * SECTOR,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_and_segments_decode_little_endian() {
        let mut h = [0u8; HEADER_LEN];
        h[0] = 1; // OUT
        h[4] = 0xff; // reserved: ignored
        h[8..16].copy_from_slice(&0x0002_0304_0506_0708u64.to_le_bytes());
        let r = Request::parse(&h);
        assert_eq!(r.kind, RequestType::Out);
        assert_eq!(r.sector, 0x0002_0304_0506_0708);
        assert_eq!(r.offset(), Some(0x0002_0304_0506_0708 * 512));
        h[0..4].copy_from_slice(&99u32.to_le_bytes());
        h[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let r = Request::parse(&h);
        assert_eq!((r.kind, r.offset()), (RequestType::Unsupported(99), None));

        let mut s = [0u8; SEGMENT_LEN];
        s[0] = 8;
        s[8] = 16;
        s[12] = 1;
        let seg = Segment::parse(&s);
        assert_eq!((seg.sector, seg.sectors, seg.flags), (8, 16, 1));
        assert_eq!(seg.range(), Some((4096, 8192)));
    }
}
