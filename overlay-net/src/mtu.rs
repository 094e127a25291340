//! Overlay MTU arithmetic.
//!
//! A VXLAN packet adds an outer IP header, a UDP header, the VXLAN header and carries the whole
//! inner Ethernet header. RFC 7348 §4.3 forbids fragmenting VXLAN packets, so the inner MTU
//! must be small enough that every encapsulated frame fits the underlay MTU.

use std::net::IpAddr;

/// Address family of the underlay (the outer IP header).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum UnderlayFamily {
    /// Outer IPv4 (20-byte header).
    V4,
    /// Outer IPv6 (40-byte header).
    V6,
}

impl UnderlayFamily {
    /// The family of an address.
    pub fn of(addr: IpAddr) -> UnderlayFamily {
        match addr {
            IpAddr::V4(_) => UnderlayFamily::V4,
            IpAddr::V6(_) => UnderlayFamily::V6,
        }
    }

    /// Length of the outer IP header.
    pub const fn ip_header_len(self) -> usize {
        match self {
            UnderlayFamily::V4 => 20,
            UnderlayFamily::V6 => 40,
        }
    }

    /// Bytes that VXLAN adds on top of the inner L3 packet, counted against the underlay's
    /// L3 MTU: outer IP + UDP (8) + VXLAN (8) + inner Ethernet header (14).
    /// 50 for IPv4, 70 for IPv6.
    pub const fn overhead(self) -> usize {
        self.ip_header_len() + 8 + crate::vxlan::HEADER_LEN + INNER_ETHERNET_LEN
    }
}

/// Length of the inner Ethernet header without a VLAN tag.
pub const INNER_ETHERNET_LEN: usize = 14;

/// Inner (tenant) MTU for an underlay MTU: `underlay − 50` for IPv4, `underlay − 70` for IPv6.
/// `None` if the underlay is too small to carry even the minimal IPv4 packet (68 bytes).
pub fn inner_mtu(underlay_mtu: u16, family: UnderlayFamily) -> Option<u16> {
    let inner = (underlay_mtu as usize).checked_sub(family.overhead())?;
    (inner >= 68).then_some(inner as u16)
}

/// Size of the outer IP packet that carries an inner Ethernet frame of `inner_frame_len` bytes.
pub const fn outer_ip_len(inner_frame_len: usize, family: UnderlayFamily) -> usize {
    family.ip_header_len() + 8 + crate::vxlan::HEADER_LEN + inner_frame_len
}

/// True if an inner Ethernet frame of this length fits the underlay MTU once encapsulated.
pub const fn fits_underlay(
    inner_frame_len: usize,
    underlay_mtu: u16,
    family: UnderlayFamily,
) -> bool {
    outer_ip_len(inner_frame_len, family) <= underlay_mtu as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overheads_match_rfc_7348() {
        assert_eq!(UnderlayFamily::V4.overhead(), 50);
        assert_eq!(UnderlayFamily::V6.overhead(), 70);
        assert_eq!(inner_mtu(1500, UnderlayFamily::V4), Some(1450));
        assert_eq!(inner_mtu(1500, UnderlayFamily::V6), Some(1430));
        assert_eq!(inner_mtu(9000, UnderlayFamily::V4), Some(8950));
        assert_eq!(inner_mtu(100, UnderlayFamily::V6), None);
        assert_eq!(inner_mtu(20, UnderlayFamily::V4), None);
    }

    #[test]
    fn a_full_inner_mtu_frame_fits_and_one_more_byte_does_not() {
        for fam in [UnderlayFamily::V4, UnderlayFamily::V6] {
            let inner = inner_mtu(1500, fam).unwrap() as usize + INNER_ETHERNET_LEN;
            assert!(fits_underlay(inner, 1500, fam));
            assert!(!fits_underlay(inner + 1, 1500, fam));
            assert_eq!(outer_ip_len(inner, fam), 1500);
        }
    }
}
