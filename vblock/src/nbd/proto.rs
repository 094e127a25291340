//! The NBD protocol's wire format (fixed newstyle negotiation, simple and structured
//! replies), as constants and pure encoders/decoders over byte slices. No I/O.

/// `NBDMAGIC`, the server's first 8 bytes.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the magic in front of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flag: fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no zeroes.
pub const CLIENT_NO_ZEROES: u32 = 2;

/// Options.
pub mod opt {
    /// Old-style export selection (no reply; straight to transmission).
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// TLS (refused: not offered).
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe and select an export.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    /// Done.
    pub const ACK: u32 = 1;
    /// One export of a LIST.
    pub const SERVER: u32 = 2;
    /// One piece of information (INFO/GO).
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// Refused by policy.
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// Malformed option or one not allowed now.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// TLS must be started first.
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// Option data too long.
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// Information types (INFO/GO).
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// The export's name.
    pub const NAME: u16 = 1;
    /// A description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    /// Flags are meaningful.
    pub const HAS_FLAGS: u16 = 1;
    /// Writes are refused.
    pub const READ_ONLY: u16 = 2;
    /// FLUSH is supported.
    pub const SEND_FLUSH: u16 = 4;
    /// FUA is supported.
    pub const SEND_FUA: u16 = 8;
    /// TRIM is supported.
    pub const SEND_TRIM: u16 = 32;
    /// WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 64;
    /// The DF flag is supported.
    pub const SEND_DF: u16 = 128;
    /// Several connections see one consistent export (a FLUSH on one covers all).
    pub const CAN_MULTI_CONN: u16 = 256;
    /// FAST_ZERO is supported.
    pub const SEND_FAST_ZERO: u16 = 2048;
}

/// Commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (data follows the request).
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// Force unit access.
    pub const FUA: u16 = 1;
    /// WRITE_ZEROES: allocate, no hole.
    pub const NO_HOLE: u16 = 2;
    /// READ: do not fragment the reply.
    pub const DF: u16 = 4;
    /// BLOCK_STATUS: one extent is enough.
    pub const REQ_ONE: u16 = 8;
    /// WRITE_ZEROES: fail fast unless zeroing is fast.
    pub const FAST_ZERO: u16 = 16;
}

/// Structured reply chunk types.
pub mod chunk {
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// Flag: the last chunk of the reply.
    pub const FLAG_DONE: u16 = 1;
}

/// Error values of replies (errno numbers as the protocol fixes them).
pub mod errno {
    /// Not permitted (a write to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Invalid request.
    pub const EINVAL: u32 = 22;
    /// No space (also a write past the end).
    pub const ENOSPC: u32 = 28;
    /// Too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported (FAST_ZERO).
    pub const ENOTSUP: u32 = 95;
}

/// Base allocation state: a hole (reads as zeros, no storage).
pub const STATE_HOLE: u32 = 1;
/// Base allocation state: reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// The one metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its context id.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Length of a request header.
pub const REQUEST_LEN: usize = 28;

/// A transmission request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub kind: u16,
    /// The client's cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length (payload length for WRITE).
    pub length: u32,
}

impl Request {
    /// Decodes a request header; None if the magic is wrong (the stream is lost).
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(x)
        };
        (u32_at(0) == REQUEST_MAGIC).then(|| Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64_at(8),
            offset: u64_at(16),
            length: u32_at(24),
        })
    }

    /// Encodes the header (for clients and tests).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Appends an option reply.
pub fn option_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends a simple reply header (READ data, if any, follows).
pub fn simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured reply chunk header for a payload of `len` bytes.
pub fn chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends a final error chunk (structured replies).
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    chunk_header(
        out,
        chunk::FLAG_DONE,
        chunk::ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// A cursor over option data that fails (None) instead of reading past its end.
pub struct Cursor<'a>(pub &'a [u8]);

impl<'a> Cursor<'a> {
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    /// A big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A string of `n` bytes (UTF-8).
    pub fn str(&mut self, n: usize) -> Option<&'a str> {
        self.take(n).and_then(|b| std::str::from_utf8(b).ok())
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// INFO/GO data: the export name and the information types asked for.
pub fn parse_info_request(data: &[u8]) -> Option<(&str, Vec<u16>)> {
    let mut c = Cursor(data);
    let n = c.u32()? as usize;
    let name = c.str(n)?;
    let count = c.u16()? as usize;
    let mut asked = Vec::with_capacity(count.min(16));
    for _ in 0..count {
        asked.push(c.u16()?);
    }
    c.is_empty().then_some((name, asked))
}

/// LIST/SET_META_CONTEXT data: the export name and the queries.
pub fn parse_meta_request(data: &[u8]) -> Option<(&str, Vec<&str>)> {
    let mut c = Cursor(data);
    let n = c.u32()? as usize;
    let name = c.str(n)?;
    let count = c.u32()? as usize;
    let mut queries = Vec::with_capacity(count.min(16));
    for _ in 0..count {
        let len = c.u32()? as usize;
        queries.push(c.str(len)?);
    }
    c.is_empty().then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_magic_is_refused() {
        let r = Request {
            flags: cflag::FUA,
            kind: cmd::WRITE,
            cookie: 0x1122_3344_5566_7788,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(Request::parse(&r.encode()), Some(r));
        let mut bad = r.encode();
        bad[0] ^= 1;
        assert_eq!(Request::parse(&bad), None);
    }

    #[test]
    fn option_data_is_parsed_strictly() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Some(("vol", vec![info::BLOCK_SIZE]))
        );
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None, "truncated");
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse_info_request(&long), None, "trailing bytes");
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_info_request(&huge), None, "name longer than the data");
        let mut m = Vec::new();
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(b"v");
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(parse_meta_request(&m), Some(("v", vec![BASE_ALLOCATION])));
    }

    #[test]
    fn replies_have_the_documented_layout() {
        let mut out = Vec::new();
        simple_reply(&mut out, errno::EIO, 7);
        assert_eq!(out.len(), 16);
        assert_eq!(&out[0..4], &[0x67, 0x44, 0x66, 0x98]);
        out.clear();
        error_chunk(&mut out, 9, errno::EINVAL, "bad");
        assert_eq!(out.len(), 20 + 6 + 3);
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), chunk::ERROR);
        out.clear();
        option_reply(&mut out, opt::GO, rep::ACK, &[]);
        assert_eq!(out.len(), 20);
    }
}
