//! Header layouts, defined once: one field table per header (as smoltcp's `wire::*::field`),
//! the numbers that identify them, and the accessors every hand-written parser here uses
//! (the fast paths of [`crate::decap`], [`crate::gso`] and [`crate::flow`] read fixed offsets
//! rather than going through `etherparse`). Offsets are from the start of their header.

use std::ops::Range;

/// A header field: its bytes, from the start of the header.
pub type Field = Range<usize>;

/// EtherTypes.
pub mod ethertype {
    /// IPv4.
    pub const IPV4: u16 = 0x0800;
    /// ARP.
    pub const ARP: u16 = 0x0806;
    /// An 802.1Q tag follows (its TPID).
    pub const VLAN: u16 = 0x8100;
    /// IPv6.
    pub const IPV6: u16 = 0x86dd;
}

/// IP protocol numbers (IPv4 protocol, IPv6 next header).
pub mod protocol {
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// The IPv6 fragment extension header.
    pub const IPV6_FRAGMENT: u8 = 44;
}

/// Ethernet II.
pub mod ethernet {
    use super::Field;
    /// Destination MAC address.
    pub const DESTINATION: Field = 0..6;
    /// Source MAC address.
    pub const SOURCE: Field = 6..12;
    /// EtherType (or the 802.1Q TPID of a tagged frame).
    pub const ETHERTYPE: Field = 12..14;
    /// Header length.
    pub const HEADER_LEN: usize = 14;
}

/// An 802.1Q tag, as it sits in a tagged frame (after the MAC addresses).
pub mod vlan {
    use super::Field;
    /// The TPID (0x8100), where an untagged frame has its EtherType.
    pub const TPID: Field = 12..14;
    /// Priority, DEI and VLAN ID.
    pub const TCI: Field = 14..16;
    /// The EtherType of the tagged payload.
    pub const ETHERTYPE: Field = 16..18;
    /// Length of the tag.
    pub const TAG_LEN: usize = 4;
    /// Header length of a tagged frame.
    pub const HEADER_LEN: usize = 18;
}

/// IPv4.
pub mod ipv4 {
    use super::Field;
    /// Version (high nibble) and header length in 32-bit words (low nibble).
    pub const VERSION_IHL: usize = 0;
    /// Total length.
    pub const TOTAL_LEN: Field = 2..4;
    /// Identification.
    pub const IDENT: Field = 4..6;
    /// Flags and fragment offset.
    pub const FLAGS_FRAGMENT: Field = 6..8;
    /// Time to live.
    pub const TTL: usize = 8;
    /// Protocol of the payload.
    pub const PROTOCOL: usize = 9;
    /// Header checksum.
    pub const CHECKSUM: Field = 10..12;
    /// Source address.
    pub const SOURCE: Field = 12..16;
    /// Destination address.
    pub const DESTINATION: Field = 16..20;
    /// Source and destination addresses (the pseudo-header's).
    pub const ADDRESSES: Field = 12..20;
    /// Length of a header without options.
    pub const MIN_HEADER_LEN: usize = 20;
    /// Of [`FLAGS_FRAGMENT`]: More Fragments and the offset (non-zero: a fragment).
    pub const FRAGMENT_MASK: u16 = 0x3fff;
}

/// IPv6.
pub mod ipv6 {
    use super::Field;
    /// Payload length.
    pub const PAYLOAD_LEN: Field = 4..6;
    /// Next header.
    pub const NEXT_HEADER: usize = 6;
    /// Hop limit.
    pub const HOP_LIMIT: usize = 7;
    /// Source address.
    pub const SOURCE: Field = 8..24;
    /// Destination address.
    pub const DESTINATION: Field = 24..40;
    /// Source and destination addresses (the pseudo-header's).
    pub const ADDRESSES: Field = 8..40;
    /// Header length.
    pub const HEADER_LEN: usize = 40;
}

/// UDP.
pub mod udp {
    use super::Field;
    /// Source port.
    pub const SOURCE_PORT: Field = 0..2;
    /// Destination port.
    pub const DESTINATION_PORT: Field = 2..4;
    /// Length of header and payload.
    pub const LENGTH: Field = 4..6;
    /// Checksum (0 over IPv4: none).
    pub const CHECKSUM: Field = 6..8;
    /// Header length.
    pub const HEADER_LEN: usize = 8;
}

/// TCP.
pub mod tcp {
    use super::Field;
    /// Source and destination ports.
    pub const PORTS: Field = 0..4;
    /// Sequence number.
    pub const SEQUENCE: Field = 4..8;
    /// Data offset (high nibble, in 32-bit words).
    pub const DATA_OFFSET: usize = 12;
    /// Flags.
    pub const FLAGS: usize = 13;
    /// Checksum.
    pub const CHECKSUM: Field = 16..18;
    /// Length of a header without options.
    pub const MIN_HEADER_LEN: usize = 20;
}

/// Reads a 16-bit big-endian field. The caller has checked that `b` holds it.
#[inline(always)]
pub fn be16(b: &[u8], field: Field) -> u16 {
    u16::from_be_bytes([b[field.start], b[field.start + 1]])
}

/// Reads a 32-bit big-endian field. The caller has checked that `b` holds it.
#[inline(always)]
pub fn be32(b: &[u8], field: Field) -> u32 {
    let at = field.start;
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a big-endian integer of `N` bytes at `at`, if `b` holds it.
#[inline(always)]
fn get<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// The 16-bit big-endian value at `at`, if `b` holds it.
#[inline(always)]
pub fn get_be16(b: &[u8], at: usize) -> Option<u16> {
    get(b, at).map(u16::from_be_bytes)
}

/// The 32-bit big-endian value at `at`, if `b` holds it.
#[inline(always)]
pub fn get_be32(b: &[u8], at: usize) -> Option<u32> {
    get(b, at).map(u32::from_be_bytes)
}

/// The 64-bit big-endian value at `at`, if `b` holds it.
#[inline(always)]
pub fn get_be64(b: &[u8], at: usize) -> Option<u64> {
    get(b, at).map(u64::from_be_bytes)
}

/// Where an Ethernet frame's payload starts, past one optional 802.1Q tag, and its
/// EtherType; `None` if the frame is too short for its headers.
#[inline(always)]
pub fn l3_start(frame: &[u8]) -> Option<(u16, usize)> {
    let ether_type = get_be16(frame, ethernet::ETHERTYPE.start)?;
    if ether_type == ethertype::VLAN {
        Some((get_be16(frame, vlan::ETHERTYPE.start)?, vlan::HEADER_LEN))
    } else {
        Some((ether_type, ethernet::HEADER_LEN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_starts_past_one_tag() {
        let mut f = [0u8; 18];
        f[12..14].copy_from_slice(&ethertype::IPV6.to_be_bytes());
        assert_eq!(l3_start(&f), Some((ethertype::IPV6, 14)));
        f[12..14].copy_from_slice(&ethertype::VLAN.to_be_bytes());
        f[16..18].copy_from_slice(&ethertype::IPV4.to_be_bytes());
        assert_eq!(l3_start(&f), Some((ethertype::IPV4, 18)));
        assert_eq!(l3_start(&f[..17]), None);
        assert_eq!(l3_start(&f[..13]), None);
    }

    #[test]
    fn accessors_never_read_past_the_slice() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(be16(&b, udp::LENGTH), 0x0506);
        assert_eq!(get_be16(&b, 6), Some(0x0708));
        assert_eq!(get_be16(&b, 7), None);
        assert_eq!(get_be32(&b, 4), Some(0x05060708));
        assert_eq!(get_be64(&b, 0), Some(0x0102030405060708));
        assert_eq!(get_be64(&b, 1), None);
        assert_eq!(get_be16(&b, usize::MAX), None);
    }
}
