use std::fmt;
use std::net::IpAddr;

use crate::vxlan::Vni;

/// The protocol layer an [`Error`] refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layer {
    /// Ethernet II header (outer or inner).
    Ethernet,
    /// 802.1Q VLAN tag.
    Vlan,
    /// IPv4 header.
    Ipv4,
    /// IPv6 header.
    Ipv6,
    /// UDP header.
    Udp,
    /// VXLAN header.
    Vxlan,
    /// ARP packet.
    Arp,
    /// The inner (encapsulated) Ethernet frame.
    Inner,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Layer::Ethernet => "Ethernet",
            Layer::Vlan => "802.1Q",
            Layer::Ipv4 => "IPv4",
            Layer::Ipv6 => "IPv6",
            Layer::Udp => "UDP",
            Layer::Vxlan => "VXLAN",
            Layer::Arp => "ARP",
            Layer::Inner => "inner frame",
        };
        f.write_str(name)
    }
}

/// Every error `overlay-net` reports: malformed or unwanted packets, buffers that are too
/// small, and table operations that cannot be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A header or payload is shorter than its layer requires.
    #[error("{layer}: truncated, need {need} bytes, have {have}")]
    Truncated {
        /// Layer whose bytes are missing.
        layer: Layer,
        /// Bytes the layer needs.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// A header field holds a value the layer forbids (bad version, length, flags...).
    #[error("{layer}: malformed header: {what}")]
    Malformed {
        /// Layer of the bad header.
        layer: Layer,
        /// Which field is wrong.
        what: &'static str,
    },
    /// The outer EtherType is neither IPv4 nor IPv6 (after an optional 802.1Q tag).
    #[error("outer EtherType {0:#06x} does not carry VXLAN")]
    NotIp(u16),
    /// The outer IP packet does not carry UDP.
    #[error("outer IP protocol {0} is not UDP")]
    NotUdp(u8),
    /// The outer IP packet is a fragment; VXLAN is never fragmented (RFC 7348 §4.3).
    #[error("outer IP packet is a fragment")]
    Fragmented,
    /// The outer IPv4 header checksum is wrong.
    #[error("outer IPv4 header checksum is wrong")]
    Ipv4Checksum,
    /// The outer UDP checksum is wrong.
    #[error("outer UDP checksum is wrong")]
    UdpChecksum,
    /// An outer IPv6 UDP datagram carries a zero checksum (RFC 8200 forbids it by default).
    #[error("outer IPv6 UDP checksum is zero")]
    ZeroUdpChecksumV6,
    /// The UDP destination port is not the configured VXLAN port.
    #[error("UDP destination port {got} is not the VXLAN port {want}")]
    WrongPort {
        /// Port in the datagram.
        got: u16,
        /// Configured VXLAN port.
        want: u16,
    },
    /// The outer destination address is not this VTEP.
    #[error("outer destination {0} is not this VTEP")]
    NotForUs(IpAddr),
    /// The VXLAN header does not have the I flag set (RFC 7348 §5).
    #[error("VXLAN I flag is not set")]
    VniFlagClear,
    /// A VNI outside the 24-bit range.
    #[error("VNI {0} does not fit in 24 bits")]
    VniOutOfRange(u32),
    /// A caller-provided buffer is too small for the result.
    #[error("buffer too small: need {need} bytes, have {have}")]
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The encapsulated frame would exceed the underlay MTU; VXLAN frames are never
    /// fragmented (RFC 7348 §4.3), so the frame is refused.
    #[error("encapsulated packet of {size} bytes exceeds the underlay MTU {mtu}")]
    ExceedsUnderlayMtu {
        /// Outer IP packet size.
        size: usize,
        /// Underlay MTU.
        mtu: u16,
    },
    /// Tunnel endpoints of different address families (or otherwise unusable).
    #[error("invalid tunnel configuration: {0}")]
    BadTunnel(&'static str),
    /// A MAC address string could not be parsed.
    #[error("invalid MAC address {0:?}")]
    BadMac(String),
    /// No tenant with this VNI exists in the FDB.
    #[error("no tenant with VNI {0}")]
    NoSuchTenant(Vni),
    /// A tenant with this VNI already exists in the FDB.
    #[error("a tenant with VNI {0} already exists")]
    TenantExists(Vni),
    /// The tenant's forwarding table is full.
    #[error("forwarding table of VNI {vni} is full ({limit} entries)")]
    TableFull {
        /// Tenant.
        vni: Vni,
        /// Its capacity.
        limit: usize,
    },
    /// Only unicast MAC addresses can be forwarding-table keys.
    #[error("{0} is not a unicast MAC address")]
    NotUnicast(crate::MacAddr),
}

impl Error {
    /// True when a received packet is simply not VXLAN for this VTEP (another EtherType,
    /// IP protocol, UDP port or destination address), as opposed to corrupt VXLAN. A VTEP
    /// listening on a shared interface sees such traffic all the time and counts it apart.
    pub fn is_other_traffic(&self) -> bool {
        matches!(
            self,
            Error::NotIp(_) | Error::NotUdp(_) | Error::WrongPort { .. } | Error::NotForUs(_)
        )
    }
}
