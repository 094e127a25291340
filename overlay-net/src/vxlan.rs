//! The VXLAN header (RFC 7348 §5) and the VXLAN Network Identifier.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |R|R|R|R|I|R|R|R|            Reserved                           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//! The I flag must be set; reserved bits are sent as zero and ignored on receipt.

use std::fmt;

use crate::{Error, Layer};

/// IANA-assigned UDP destination port of VXLAN.
pub const VXLAN_PORT: u16 = 4789;

/// Length of the VXLAN header in bytes.
pub const HEADER_LEN: usize = 8;

/// The "I" flag: the VNI field is valid.
const FLAG_I: u8 = 0x08;

/// A 24-bit VXLAN Network Identifier: one tenant's L2 domain.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Vni(u32);

impl Vni {
    /// Largest valid VNI (2^24 - 1).
    pub const MAX: u32 = 0x00ff_ffff;

    /// A VNI from a number, if it fits in 24 bits.
    pub const fn new(value: u32) -> Result<Vni, Error> {
        if value > Self::MAX {
            Err(Error::VniOutOfRange(value))
        } else {
            Ok(Vni(value))
        }
    }

    /// The VNI as a number.
    #[inline]
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl TryFrom<u32> for Vni {
    type Error = Error;
    fn try_from(value: u32) -> Result<Self, Error> {
        Vni::new(value)
    }
}

/// The VXLAN header bytes for `vni`: I flag set, all reserved bits zero.
#[inline]
pub const fn header(vni: Vni) -> [u8; HEADER_LEN] {
    let v = vni.0.to_be_bytes();
    [FLAG_I, 0, 0, 0, v[1], v[2], v[3], 0]
}

/// Writes the VXLAN header for `vni` into the first 8 bytes of `out`.
pub fn write_header(vni: Vni, out: &mut [u8]) -> Result<(), Error> {
    let have = out.len();
    let dst = out.get_mut(..HEADER_LEN).ok_or(Error::BufferTooSmall {
        need: HEADER_LEN,
        have,
    })?;
    dst.copy_from_slice(&header(vni));
    Ok(())
}

/// Parses a UDP payload as VXLAN: returns the VNI and the inner Ethernet frame.
///
/// Only the I flag is checked; reserved bits are ignored as RFC 7348 requires. The inner
/// frame must hold at least an Ethernet header.
#[inline]
pub fn parse(udp_payload: &[u8]) -> Result<(Vni, &[u8]), Error> {
    let (hdr, inner) = udp_payload
        .split_first_chunk::<HEADER_LEN>()
        .ok_or(Error::Truncated {
            layer: Layer::Vxlan,
            need: HEADER_LEN,
            have: udp_payload.len(),
        })?;
    if hdr[0] & FLAG_I == 0 {
        return Err(Error::VniFlagClear);
    }
    if inner.len() < etherparse::Ethernet2Header::LEN {
        return Err(Error::Truncated {
            layer: Layer::Inner,
            need: etherparse::Ethernet2Header::LEN,
            have: inner.len(),
        });
    }
    let vni = Vni(u32::from_be_bytes([0, hdr[4], hdr[5], hdr[6]]));
    Ok((vni, inner))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_byte_exact() {
        // RFC 7348 §5: flags 0x08, 24 reserved bits, VNI, 8 reserved bits.
        let vni = Vni::new(0x12_3456).unwrap();
        assert_eq!(header(vni), [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        assert_eq!(header(Vni::new(42).unwrap()), [0x08, 0, 0, 0, 0, 0, 42, 0]);
        let mut buf = [0xaa; 9];
        write_header(vni, &mut buf).unwrap();
        assert_eq!(buf, [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0, 0xaa]);
        assert!(write_header(vni, &mut [0; 7]).is_err());
    }

    #[test]
    fn vni_range() {
        assert_eq!(Vni::new(Vni::MAX).unwrap().get(), 0xff_ffff);
        assert_eq!(Vni::new(1 << 24), Err(Error::VniOutOfRange(1 << 24)));
    }

    #[test]
    fn parse_ignores_reserved_bits_and_requires_i_flag() {
        let mut pkt = [0u8; 8 + 14];
        pkt[..8].copy_from_slice(&[0xff, 0xff, 0xff, 0xff, 0, 0, 7, 0xff]);
        let (vni, inner) = parse(&pkt).unwrap();
        assert_eq!(vni.get(), 7);
        assert_eq!(inner.len(), 14);
        pkt[0] = 0xf7; // everything but I
        assert_eq!(parse(&pkt), Err(Error::VniFlagClear));
    }

    #[test]
    fn parse_rejects_short_input() {
        assert!(matches!(
            parse(&[0x08, 0, 0]),
            Err(Error::Truncated {
                layer: Layer::Vxlan,
                ..
            })
        ));
        let short = [0x08, 0, 0, 0, 0, 0, 1, 0, 1, 2, 3];
        assert!(matches!(
            parse(&short),
            Err(Error::Truncated {
                layer: Layer::Inner,
                ..
            })
        ));
    }
}
