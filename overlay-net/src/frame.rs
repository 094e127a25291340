//! Inner frames: a zero-copy view of the headers the switch acts on, and builders for the
//! frames the overlay itself originates (ARP, UDP), all with `etherparse`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use etherparse::{
    ArpEthIpv4Packet, ArpOperation, EtherType, Ethernet2HeaderSlice, Ipv4HeaderSlice,
    Ipv6HeaderSlice, PacketBuilder, SingleVlanHeaderSlice, VlanId,
    err::packet::BuildSliceWriteError,
};

use crate::{Error, Layer, MacAddr};

/// What an inner frame carries above the link layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// An IPv4 packet.
    Ipv4(IpInfo<Ipv4Addr>),
    /// An IPv6 packet.
    Ipv6(IpInfo<Ipv6Addr>),
    /// An Ethernet/IPv4 ARP packet.
    Arp(ArpInfo),
    /// The EtherType announces IPv4, IPv6 or ARP but the header is malformed.
    Malformed(Layer),
    /// Any other EtherType (not inspected).
    Other,
}

/// The IP header fields the switch acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpInfo<A> {
    /// Source address.
    pub source: A,
    /// Destination address.
    pub destination: A,
    /// Transport protocol (IPv4 protocol or the IPv6 next header).
    pub protocol: u8,
    /// TCP/UDP source and destination ports, when the packet is an unfragmented TCP or UDP
    /// packet whose ports are present.
    pub ports: Option<(u16, u16)>,
}

/// The fields of an Ethernet/IPv4 ARP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpInfo {
    /// 1 = request, 2 = reply.
    pub operation: u16,
    /// Sender hardware address.
    pub sender_mac: MacAddr,
    /// Sender protocol address.
    pub sender_ip: Ipv4Addr,
    /// Target hardware address.
    pub target_mac: MacAddr,
    /// Target protocol address.
    pub target_ip: Ipv4Addr,
}

/// A parsed view of an Ethernet II frame (optionally 802.1Q tagged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameView<'a> {
    /// Destination MAC.
    pub destination: MacAddr,
    /// Source MAC.
    pub source: MacAddr,
    /// VLAN ID of a single 802.1Q tag, if present.
    pub vlan: Option<u16>,
    /// EtherType of the payload (after the tag, if any).
    pub ether_type: u16,
    /// What the payload is.
    pub network: Network,
    /// The payload after the link-layer headers.
    pub payload: &'a [u8],
}

const TCP: u8 = 6;
const UDP: u8 = 17;

impl<'a> FrameView<'a> {
    /// Parses a frame. Fails only if the Ethernet header (or its 802.1Q tag) is truncated;
    /// malformed L3 headers are reported as [`Network::Malformed`] so that a switch can still
    /// forward or drop the frame by its own policy.
    pub fn parse(frame: &'a [u8]) -> Result<FrameView<'a>, Error> {
        let eth = Ethernet2HeaderSlice::from_slice(frame).map_err(|_| Error::Truncated {
            layer: Layer::Ethernet,
            need: 14,
            have: frame.len(),
        })?;
        let mut ether_type = eth.ether_type();
        let mut payload = &frame[14..];
        let mut vlan = None;
        if ether_type == EtherType::VLAN_TAGGED_FRAME {
            let tag = SingleVlanHeaderSlice::from_slice(payload).map_err(|_| Error::Truncated {
                layer: Layer::Vlan,
                need: 4,
                have: payload.len(),
            })?;
            vlan = Some(tag.vlan_identifier().value());
            ether_type = tag.ether_type();
            payload = &payload[4..];
        }
        let network = match ether_type {
            EtherType::IPV4 => parse_ipv4(payload),
            EtherType::IPV6 => parse_ipv6(payload),
            EtherType::ARP => parse_arp(payload),
            _ => Network::Other,
        };
        Ok(FrameView {
            destination: MacAddr(eth.destination()),
            source: MacAddr(eth.source()),
            vlan,
            ether_type: ether_type.0,
            network,
            payload,
        })
    }

    /// Source and destination IP addresses, for IPv4 and IPv6 packets.
    pub fn ip_addresses(&self) -> Option<(IpAddr, IpAddr)> {
        match self.network {
            Network::Ipv4(ip) => Some((ip.source.into(), ip.destination.into())),
            Network::Ipv6(ip) => Some((ip.source.into(), ip.destination.into())),
            _ => None,
        }
    }
}

fn ports_of(protocol: u8, transport: &[u8]) -> Option<(u16, u16)> {
    if protocol != TCP && protocol != UDP {
        return None;
    }
    let p = transport.get(..4)?;
    Some((
        u16::from_be_bytes([p[0], p[1]]),
        u16::from_be_bytes([p[2], p[3]]),
    ))
}

fn parse_ipv4(payload: &[u8]) -> Network {
    let Ok(ip) = Ipv4HeaderSlice::from_slice(payload) else {
        return Network::Malformed(Layer::Ipv4);
    };
    let header_len = ip.slice().len();
    let end = (ip.total_len() as usize).min(payload.len());
    let protocol = ip.protocol().0;
    let ports = if ip.is_fragmenting_payload() && ip.fragments_offset().value() != 0 {
        None
    } else {
        ports_of(protocol, payload.get(header_len..end).unwrap_or(&[]))
    };
    Network::Ipv4(IpInfo {
        source: ip.source_addr(),
        destination: ip.destination_addr(),
        protocol,
        ports,
    })
}

fn parse_ipv6(payload: &[u8]) -> Network {
    let Ok(ip) = Ipv6HeaderSlice::from_slice(payload) else {
        return Network::Malformed(Layer::Ipv6);
    };
    let protocol = ip.next_header().0;
    Network::Ipv6(IpInfo {
        source: ip.source_addr(),
        destination: ip.destination_addr(),
        protocol,
        ports: ports_of(protocol, &payload[etherparse::Ipv6Header::LEN..]),
    })
}

fn parse_arp(payload: &[u8]) -> Network {
    let Ok(arp) = etherparse::ArpPacketSlice::from_slice(payload) else {
        return Network::Malformed(Layer::Arp);
    };
    if arp.hw_addr_type() != etherparse::ArpHardwareId::ETHERNET
        || arp.proto_addr_type() != EtherType::IPV4
        || arp.hw_addr_size() != 6
        || arp.proto_addr_size() != 4
    {
        return Network::Malformed(Layer::Arp);
    }
    let ip = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    Network::Arp(ArpInfo {
        operation: arp.operation().0,
        sender_mac: MacAddr::from_slice(arp.sender_hw_addr()).unwrap_or_default(),
        sender_ip: ip(arp.sender_protocol_addr()),
        target_mac: MacAddr::from_slice(arp.target_hw_addr()).unwrap_or_default(),
        target_ip: ip(arp.target_protocol_addr()),
    })
}

fn build_error(e: BuildSliceWriteError, have: usize) -> Error {
    match e {
        BuildSliceWriteError::Space(need) => Error::BufferTooSmall { need, have },
        _ => Error::Malformed {
            layer: Layer::Inner,
            what: "payload too large for its length fields",
        },
    }
}

/// Builds an Ethernet/IPv4 ARP frame into `out`; returns its length (42 bytes).
///
/// A request is usually sent to [`MacAddr::BROADCAST`] with a zero target MAC; a reply goes
/// to the requester.
pub fn build_arp(out: &mut [u8], destination: MacAddr, arp: &ArpInfo) -> Result<usize, Error> {
    let packet = ArpEthIpv4Packet {
        operation: ArpOperation(arp.operation),
        sender_mac: arp.sender_mac.0,
        sender_ipv4: arp.sender_ip.octets(),
        target_mac: arp.target_mac.0,
        target_ipv4: arp.target_ip.octets(),
    };
    let have = out.len();
    PacketBuilder::ethernet2(arp.sender_mac.0, destination.0)
        .arp(packet.to_arp_packet())
        .write_to_slice(out)
        .map_err(|e| build_error(e, have))
}

/// Builds the reply to the ARP request `request` (an untagged Ethernet/IPv4 ARP request
/// frame) saying its target address is at `mac`, into `out`; returns its length. Fails on a
/// frame that is not such a request.
pub fn build_arp_reply(out: &mut [u8], request: &[u8], mac: MacAddr) -> Result<usize, Error> {
    let not_a_request = Error::Malformed {
        layer: Layer::Arp,
        what: "not an ARP request",
    };
    let view = FrameView::parse(request)?;
    let Network::Arp(arp) = view.network else {
        return Err(not_a_request);
    };
    if arp.operation != 1 || view.vlan.is_some() {
        return Err(not_a_request);
    }
    build_arp(
        out,
        arp.sender_mac,
        &ArpInfo {
            operation: 2,
            sender_mac: mac,
            sender_ip: arp.target_ip,
            target_mac: arp.sender_mac,
            target_ip: arp.sender_ip,
        },
    )
}

/// A neighbor solicitation (RFC 4861) in an untagged frame: who asks (its address and MAC)
/// and for which target address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Solicitation {
    /// The asker's address (never unspecified: duplicate address detection is not one).
    pub source: Ipv6Addr,
    /// The asker's MAC (the frame's source).
    pub source_mac: MacAddr,
    /// The address asked for.
    pub target: Ipv6Addr,
}

/// The neighbor solicitation `frame` carries, if it is one (untagged Ethernet, IPv6 with hop
/// limit 255 and ICMPv6 right after the header, type 135 code 0, from a specified address to
/// the target's solicited-node multicast group).
pub fn parse_solicitation(frame: &[u8]) -> Option<Solicitation> {
    const ICMPV6: u8 = 58;
    const NEIGHBOR_SOLICITATION: u8 = 135;
    let eth = Ethernet2HeaderSlice::from_slice(frame).ok()?;
    if eth.ether_type() != EtherType::IPV6 {
        return None;
    }
    let ip6 = frame.get(etherparse::Ethernet2Header::LEN..)?;
    let ip = Ipv6HeaderSlice::from_slice(ip6).ok()?;
    if ip.next_header().0 != ICMPV6 || ip.hop_limit() != 255 || ip.source_addr().is_unspecified() {
        return None;
    }
    let icmp = ip6.get(etherparse::Ipv6Header::LEN..)?;
    if icmp.len() < 24 || icmp[0] != NEIGHBOR_SOLICITATION || icmp[1] != 0 {
        return None;
    }
    let target: [u8; 16] = icmp[8..24].try_into().ok()?;
    // Sent to the target's solicited-node group (ff02::1:ffXX:XXXX), as address resolution
    // does; anything else is not answered for.
    let mut group = [0u8; 16];
    group[..2].copy_from_slice(&[0xff, 0x02]);
    group[11..13].copy_from_slice(&[0x01, 0xff]);
    group[13..].copy_from_slice(&target[13..]);
    if ip.destination() != group {
        return None;
    }
    Some(Solicitation {
        source: ip.source_addr(),
        source_mac: MacAddr(eth.source()),
        target: Ipv6Addr::from(target),
    })
}

/// Builds the answer to a neighbor request `request` (an ARP request, or an IPv6 neighbor
/// solicitation) saying its target address is at `mac`, into `out`: an ARP reply, or a
/// solicited neighbor advertisement with the target link-layer address option. Returns its
/// length; fails on a frame that is neither.
pub fn build_neighbor_reply(out: &mut [u8], request: &[u8], mac: MacAddr) -> Result<usize, Error> {
    let Some(ns) = parse_solicitation(request) else {
        return build_arp_reply(out, request, mac);
    };
    let mut payload = [0u8; 24];
    payload[..16].copy_from_slice(&ns.target.octets());
    // Option 2 (target link-layer address), length 1 (8 bytes).
    payload[16] = 2;
    payload[17] = 1;
    payload[18..].copy_from_slice(&mac.0);
    let have = out.len();
    PacketBuilder::ethernet2(mac.0, ns.source_mac.0)
        .ipv6(ns.target.octets(), ns.source.octets(), 255)
        .icmpv6(etherparse::Icmpv6Type::NeighborAdvertisement(
            etherparse::icmpv6::NeighborAdvertisementHeader {
                router: false,
                solicited: true,
                r#override: true,
            },
        ))
        .write_to_slice(out, &payload)
        .map_err(|e| build_error(e, have))
}

/// Builds an Ethernet (optionally 802.1Q-tagged) + IPv4/IPv6 + UDP frame into `out`, with
/// correct IP and UDP checksums; returns its length.
pub fn build_udp(
    out: &mut [u8],
    source_mac: MacAddr,
    destination_mac: MacAddr,
    vlan: Option<u16>,
    source: SocketAddr,
    destination: SocketAddr,
    payload: &[u8],
) -> Result<usize, Error> {
    const TTL: u8 = 64;
    let have = out.len();
    // The link step has a different type with and without a tag; the rest is the same.
    macro_rules! finish {
        ($link:expr) => {
            match (source.ip(), destination.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => $link
                    .ipv4(s.octets(), d.octets(), TTL)
                    .udp(source.port(), destination.port())
                    .write_to_slice(out, payload),
                (IpAddr::V6(s), IpAddr::V6(d)) => $link
                    .ipv6(s.octets(), d.octets(), TTL)
                    .udp(source.port(), destination.port())
                    .write_to_slice(out, payload),
                _ => {
                    return Err(Error::Malformed {
                        layer: Layer::Inner,
                        what: "source and destination address families differ",
                    });
                }
            }
        };
    }
    let eth = PacketBuilder::ethernet2(source_mac.0, destination_mac.0);
    let written = match vlan {
        Some(id) => {
            let id = VlanId::try_new(id).map_err(|_| Error::Malformed {
                layer: Layer::Vlan,
                what: "VLAN ID above 4095",
            })?;
            finish!(eth.single_vlan(id))
        }
        None => finish!(eth),
    };
    written.map_err(|e| build_error(e, have))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x0a]);
    const B: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x0b]);

    #[test]
    fn arp_request_is_byte_exact_and_parses_back() {
        let arp = ArpInfo {
            operation: 1,
            sender_mac: A,
            sender_ip: Ipv4Addr::new(10, 0, 0, 1),
            target_mac: MacAddr::ZERO,
            target_ip: Ipv4Addr::new(10, 0, 0, 2),
        };
        let mut buf = [0u8; 64];
        let n = build_arp(&mut buf, MacAddr::BROADCAST, &arp).unwrap();
        #[rustfmt::skip]
        let expected: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 0x0a, 0x08, 0x06, // Ethernet
            0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01,                                 // htype ptype hlen plen op
            0x02, 0, 0, 0, 0, 0x0a, 10, 0, 0, 1,                                     // sender
            0, 0, 0, 0, 0, 0, 10, 0, 0, 2,                                           // target
        ];
        assert_eq!(&buf[..n], &expected);
        let view = FrameView::parse(&buf[..n]).unwrap();
        assert_eq!(view.destination, MacAddr::BROADCAST);
        assert_eq!(view.source, A);
        assert_eq!(view.network, Network::Arp(arp));
    }

    #[test]
    fn tagged_udp_v4_is_byte_exact() {
        let mut buf = [0u8; 128];
        let n = build_udp(
            &mut buf,
            A,
            B,
            Some(100),
            "10.0.0.1:1234".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
            b"hi",
        )
        .unwrap();
        #[rustfmt::skip]
        let expected: [u8; 14 + 4 + 20 + 8 + 2] = [
            0x02, 0, 0, 0, 0, 0x0b, 0x02, 0, 0, 0, 0, 0x0a, 0x81, 0x00, // Ethernet, TPID
            0x00, 100, 0x08, 0x00,                                         // TCI (VID 100), type
            0x45, 0, 0, 30, 0, 0, 0x40, 0, 64, 17, 0x26, 0xcd,            // IPv4 (DF, TTL 64)
            10, 0, 0, 1, 10, 0, 0, 2,
            0x04, 0xd2, 0, 80, 0, 10, 0x7e, 0x4c,                          // UDP
            b'h', b'i',
        ];
        assert_eq!(&buf[..n], &expected);
        let view = FrameView::parse(&buf[..n]).unwrap();
        assert_eq!(view.vlan, Some(100));
        assert_eq!(view.ether_type, 0x0800);
        let Network::Ipv4(ip) = view.network else {
            panic!("{:?}", view.network)
        };
        assert_eq!(ip.ports, Some((1234, 80)));
        assert_eq!(ip.protocol, 17);
        // The IPv4 header checksum verifies.
        let sum = etherparse::checksum::Sum16BitWords::new().add_slice(&buf[18..38]);
        assert_eq!(sum.ones_complement(), 0);
    }

    #[test]
    fn udp_v6_parses_back() {
        let mut buf = [0u8; 128];
        let src: SocketAddr = "[fd00::1]:5000".parse().unwrap();
        let dst: SocketAddr = "[fd00::2]:53".parse().unwrap();
        let n = build_udp(&mut buf, A, B, None, src, dst, b"xyz").unwrap();
        assert_eq!(n, 14 + 40 + 8 + 3);
        let view = FrameView::parse(&buf[..n]).unwrap();
        assert_eq!(view.vlan, None);
        assert_eq!(view.ip_addresses(), Some((src.ip(), dst.ip())));
        let Network::Ipv6(ip) = view.network else {
            panic!()
        };
        assert_eq!(ip.ports, Some((5000, 53)));
    }

    #[test]
    fn small_buffers_and_mixed_families_are_errors() {
        let arp = ArpInfo {
            operation: 2,
            sender_mac: A,
            sender_ip: Ipv4Addr::LOCALHOST,
            target_mac: B,
            target_ip: Ipv4Addr::LOCALHOST,
        };
        assert_eq!(
            build_arp(&mut [0; 41], B, &arp),
            Err(Error::BufferTooSmall { need: 42, have: 41 })
        );
        let r = build_udp(
            &mut [0; 128],
            A,
            B,
            None,
            "10.0.0.1:1".parse().unwrap(),
            "[::1]:1".parse().unwrap(),
            b"",
        );
        assert!(r.is_err());
    }

    #[test]
    fn malformed_l3_is_reported_not_fatal() {
        let mut frame = [0u8; 20];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14] = 0x45; // IPv4, but truncated
        let view = FrameView::parse(&frame).unwrap();
        assert_eq!(view.network, Network::Malformed(Layer::Ipv4));
        assert!(FrameView::parse(&frame[..13]).is_err());
        frame[12..14].copy_from_slice(&[0x81, 0x00]);
        assert!(FrameView::parse(&frame[..16]).is_err());
    }
}
