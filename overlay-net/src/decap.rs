//! VXLAN decapsulation of a whole received frame, validating every outer layer.
//!
//! This runs for every packet from the underlay, so it reads the outer headers at fixed
//! offsets by hand (every read bounds-checked) instead of building general-purpose header
//! views; the property tests check it against `etherparse`'s parser. For frames that arrive on
//! a UDP socket (the kernel has already checked the outer layers), use [`crate::vxlan::parse`]
//! on the datagram payload instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::checksum::Sum;
use crate::vxlan::{self, VXLAN_PORT, Vni};
use crate::wire::{be16, ethernet, ethertype, ipv4, ipv6, protocol, udp, vlan};
use crate::{Error, Layer};

/// What [`decapsulate`] accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecapConfig {
    /// UDP destination port of VXLAN (default 4789).
    pub udp_port: u16,
    /// If set, only packets addressed to this VTEP address are accepted.
    pub local_ip: Option<IpAddr>,
    /// Accept IPv6 UDP datagrams with a zero checksum (RFC 6935/6936 tunnels). Off by default,
    /// as in Linux (`udp6zerocsumrx`).
    pub accept_zero_udp6_checksum: bool,
    /// The receive path vouches for the UDP checksum (per packet): a NIC verified it, or the
    /// packet came from this host's own stack and its checksum is still to be computed (a
    /// veth with checksum offload; `AF_PACKET` reports both as `TP_STATUS_CSUM_VALID` /
    /// `TP_STATUS_CSUMNOTREADY`). The checksum is then not checked here.
    pub udp_checksum_verified: bool,
    /// Accept a UDP checksum field that holds exactly the pseudo-header sum: a datagram from
    /// a stack on this host whose checksum was left to offload (`CHECKSUM_PARTIAL`) and that
    /// reached a receive path that cannot say so (XDP over a veth has no such flag, unlike
    /// `AF_PACKET`). Such a datagram never crossed a wire. A corrupted datagram from the wire
    /// passes this test as rarely as it passes the real one (one in 65536). Off by default.
    pub accept_partial_udp_checksum: bool,
}

impl Default for DecapConfig {
    fn default() -> Self {
        DecapConfig {
            udp_port: VXLAN_PORT,
            local_ip: None,
            accept_zero_udp6_checksum: false,
            udp_checksum_verified: false,
            accept_partial_udp_checksum: false,
        }
    }
}

/// A successfully decapsulated frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decapsulated<'a> {
    /// The tenant the inner frame belongs to.
    pub vni: Vni,
    /// The sending VTEP (outer source address).
    pub source: IpAddr,
    /// The outer UDP source port (the sender's flow hash).
    pub source_port: u16,
    /// The inner Ethernet frame (without FCS).
    pub inner: &'a [u8],
}

#[inline(always)]
fn truncated(layer: Layer, need: usize, have: usize) -> Error {
    Error::Truncated { layer, need, have }
}

/// Validates the outer Ethernet (optionally 802.1Q-tagged), IPv4 or IPv6, UDP and VXLAN
/// headers of `frame` and returns the inner frame. Never reads past `frame` and never panics.
///
/// Checks: EtherType, IP version and lengths, IPv4 header checksum, no fragments, no IPv6
/// extension headers, protocol UDP, destination address (if configured), UDP length,
/// destination port, UDP checksum (when non-zero for IPv4; always for IPv6 unless
/// configured), the VXLAN I flag, and a complete inner Ethernet header. Ethernet padding
/// after the IP packet is ignored.
#[inline]
pub fn decapsulate<'a>(frame: &'a [u8], cfg: &DecapConfig) -> Result<Decapsulated<'a>, Error> {
    let Some(eth) = frame.first_chunk::<{ ethernet::HEADER_LEN }>() else {
        return Err(truncated(
            Layer::Ethernet,
            ethernet::HEADER_LEN,
            frame.len(),
        ));
    };
    let mut ether_type = be16(eth, ethernet::ETHERTYPE);
    let mut l3 = ethernet::HEADER_LEN;
    if ether_type == ethertype::VLAN {
        let Some(tagged) = frame.first_chunk::<{ vlan::HEADER_LEN }>() else {
            return Err(truncated(Layer::Vlan, vlan::HEADER_LEN, frame.len()));
        };
        ether_type = be16(tagged, vlan::ETHERTYPE);
        l3 = vlan::HEADER_LEN;
    }
    let packet = &frame[l3..];
    match ether_type {
        ethertype::IPV4 => outer_ipv4(packet, cfg),
        ethertype::IPV6 => outer_ipv6(packet, cfg),
        other => Err(Error::NotIp(other)),
    }
}

#[inline(always)]
fn outer_ipv4<'a>(packet: &'a [u8], cfg: &DecapConfig) -> Result<Decapsulated<'a>, Error> {
    let Some(h) = packet.first_chunk::<{ ipv4::MIN_HEADER_LEN }>() else {
        return Err(truncated(Layer::Ipv4, ipv4::MIN_HEADER_LEN, packet.len()));
    };
    if h[ipv4::VERSION_IHL] >> 4 != 4 {
        return Err(Error::Malformed {
            layer: Layer::Ipv4,
            what: "version",
        });
    }
    let ihl = (h[ipv4::VERSION_IHL] & 0x0f) as usize * 4;
    let total = be16(h, ipv4::TOTAL_LEN) as usize;
    if ihl < ipv4::MIN_HEADER_LEN || total < ihl {
        return Err(Error::Malformed {
            layer: Layer::Ipv4,
            what: "header or total length",
        });
    }
    if total > packet.len() {
        return Err(truncated(Layer::Ipv4, total, packet.len()));
    }
    let header_sum = if ihl == ipv4::MIN_HEADER_LEN {
        Sum::new().add_array(h)
    } else {
        Sum::new().add_bytes(&packet[..ihl])
    };
    if header_sum.checksum() != 0 {
        return Err(Error::Ipv4Checksum);
    }
    if be16(h, ipv4::FLAGS_FRAGMENT) & ipv4::FRAGMENT_MASK != 0 {
        return Err(Error::Fragmented);
    }
    if h[ipv4::PROTOCOL] != protocol::UDP {
        return Err(Error::NotUdp(h[ipv4::PROTOCOL]));
    }
    let mut src = [0u8; 4];
    src.copy_from_slice(&h[ipv4::SOURCE]);
    let mut dst = [0u8; 4];
    dst.copy_from_slice(&h[ipv4::DESTINATION]);
    if let Some(local) = cfg.local_ip
        && local != IpAddr::V4(Ipv4Addr::from(dst))
    {
        return Err(Error::NotForUs(Ipv4Addr::from(dst).into()));
    }
    udp_vxlan(
        &packet[ihl..total],
        &h[ipv4::ADDRESSES],
        false,
        Ipv4Addr::from(src).into(),
        cfg,
    )
}

#[inline(always)]
fn outer_ipv6<'a>(packet: &'a [u8], cfg: &DecapConfig) -> Result<Decapsulated<'a>, Error> {
    let Some(h) = packet.first_chunk::<{ ipv6::HEADER_LEN }>() else {
        return Err(truncated(Layer::Ipv6, ipv6::HEADER_LEN, packet.len()));
    };
    if h[0] >> 4 != 6 {
        return Err(Error::Malformed {
            layer: Layer::Ipv6,
            what: "version",
        });
    }
    match h[ipv6::NEXT_HEADER] {
        protocol::UDP => {}
        protocol::IPV6_FRAGMENT => return Err(Error::Fragmented),
        other => return Err(Error::NotUdp(other)),
    }
    let end = ipv6::HEADER_LEN + be16(h, ipv6::PAYLOAD_LEN) as usize;
    if end > packet.len() {
        return Err(truncated(Layer::Ipv6, end, packet.len()));
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&h[ipv6::SOURCE]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&h[ipv6::DESTINATION]);
    if let Some(local) = cfg.local_ip
        && local != IpAddr::V6(Ipv6Addr::from(dst))
    {
        return Err(Error::NotForUs(Ipv6Addr::from(dst).into()));
    }
    udp_vxlan(
        &packet[ipv6::HEADER_LEN..end],
        &h[ipv6::ADDRESSES],
        true,
        Ipv6Addr::from(src).into(),
        cfg,
    )
}

/// Checks the UDP header of `datagram` (the IP payload) and parses the VXLAN header.
/// `addrs` are the source and destination addresses, for the pseudo-header checksum.
#[inline(always)]
fn udp_vxlan<'a>(
    datagram: &'a [u8],
    addrs: &[u8],
    is_v6: bool,
    source: IpAddr,
    cfg: &DecapConfig,
) -> Result<Decapsulated<'a>, Error> {
    let Some(u) = datagram.first_chunk::<{ udp::HEADER_LEN }>() else {
        return Err(truncated(Layer::Udp, udp::HEADER_LEN, datagram.len()));
    };
    let udp_len = be16(u, udp::LENGTH) as usize;
    if udp_len < udp::HEADER_LEN || udp_len > datagram.len() {
        return Err(Error::Malformed {
            layer: Layer::Udp,
            what: "length field disagrees with the IP payload",
        });
    }
    let dport = be16(u, udp::DESTINATION_PORT);
    if dport != cfg.udp_port {
        return Err(Error::WrongPort {
            got: dport,
            want: cfg.udp_port,
        });
    }
    let datagram = &datagram[..udp_len];
    if cfg.udp_checksum_verified {
        // Vouched for by the receive path.
    } else if be16(u, udp::CHECKSUM) == 0 {
        if is_v6 && !cfg.accept_zero_udp6_checksum {
            return Err(Error::ZeroUdpChecksumV6);
        }
    } else {
        let pseudo = Sum::new()
            .add_bytes(addrs)
            .add_word([0, protocol::UDP])
            .add_word((udp_len as u16).to_be_bytes());
        if pseudo.add_bytes(datagram).checksum() != 0
            && !(cfg.accept_partial_udp_checksum
                && u[udp::CHECKSUM] == pseudo.folded().to_ne_bytes())
        {
            return Err(Error::UdpChecksum);
        }
    }
    let (vni, inner) = vxlan::parse(&datagram[udp::HEADER_LEN..])?;
    Ok(Decapsulated {
        vni,
        source,
        source_port: be16(u, udp::SOURCE_PORT),
        inner,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MacAddr;
    use crate::encap::{Encapsulator, TunnelConfig};

    const M1: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 1]);
    const M2: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 2]);

    fn inner() -> Vec<u8> {
        let mut f = vec![0u8; 64];
        f[..12].copy_from_slice(&[2, 0xaa, 0, 0, 0, 2, 2, 0xaa, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x88, 0xb5]);
        f
    }

    fn encapped(local: &str, remote: &str) -> Vec<u8> {
        let cfg = TunnelConfig::new(M1, M2, local.parse().unwrap(), remote.parse().unwrap());
        let enc = Encapsulator::new(&cfg).unwrap();
        let mut out = vec![0u8; 256];
        let n = enc
            .encap(Vni::new(42).unwrap(), &inner(), &mut out)
            .unwrap();
        out.truncate(n);
        out
    }

    /// A datagram as a local stack leaves it for checksum offload: the pseudo-header sum in
    /// the checksum field, the rest to be added by hardware that never comes.
    #[test]
    fn partial_udp_checksums_pass_only_when_accepted() {
        for (l, r, udp_at) in [("192.0.2.1", "192.0.2.2", 34), ("fd00::1", "fd00::2", 54)] {
            let mut frame = encapped(l, r);
            let (src, dst): (IpAddr, IpAddr) = (l.parse().unwrap(), r.parse().unwrap());
            let addrs: Vec<u8> = match (src, dst) {
                (IpAddr::V4(a), IpAddr::V4(b)) => [a.octets(), b.octets()].concat(),
                (IpAddr::V6(a), IpAddr::V6(b)) => [a.octets(), b.octets()].concat(),
                _ => unreachable!(),
            };
            let len = (frame.len() - udp_at) as u16;
            let partial = Sum::new()
                .add_bytes(&addrs)
                .add_word([0, protocol::UDP])
                .add_word(len.to_be_bytes())
                .folded();
            frame[udp_at + 6..udp_at + 8].copy_from_slice(&partial.to_ne_bytes());
            let strict = DecapConfig::default();
            assert_eq!(decapsulate(&frame, &strict), Err(Error::UdpChecksum));
            let lenient = DecapConfig {
                accept_partial_udp_checksum: true,
                ..strict
            };
            assert_eq!(decapsulate(&frame, &lenient).unwrap().inner, &inner()[..]);
            // Anything else in the field is still wrong.
            frame[udp_at + 6] ^= 0x40;
            assert_eq!(decapsulate(&frame, &lenient), Err(Error::UdpChecksum));
        }
    }

    #[test]
    fn decapsulates_v4_and_v6() {
        for (l, r) in [("192.0.2.1", "192.0.2.2"), ("fd00::1", "fd00::2")] {
            let frame = encapped(l, r);
            let d = decapsulate(&frame, &DecapConfig::default()).unwrap();
            assert_eq!(d.vni.get(), 42);
            assert_eq!(d.source, l.parse::<IpAddr>().unwrap());
            assert_eq!(d.inner, &inner()[..]);
            assert!(d.source_port >= 49152);
        }
    }

    #[test]
    fn ignores_ethernet_padding_and_accepts_a_vlan_tag() {
        let mut frame = encapped("192.0.2.1", "192.0.2.2");
        frame.extend_from_slice(&[0xee; 10]); // padding beyond the IP total length
        let d = decapsulate(&frame, &DecapConfig::default()).unwrap();
        assert_eq!(d.inner, &inner()[..]);
        let mut tagged = frame[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
        tagged.extend_from_slice(&frame[12..]);
        assert_eq!(
            decapsulate(&tagged, &DecapConfig::default()).unwrap().inner,
            &inner()[..]
        );
    }

    #[test]
    fn every_corruption_is_a_typed_error() {
        let cfg = DecapConfig::default();
        let v4 = encapped("192.0.2.1", "192.0.2.2");
        let v6 = encapped("fd00::1", "fd00::2");
        let with = |base: &[u8], at: usize, val: u8| {
            let mut f = base.to_vec();
            f[at] = val;
            f
        };
        assert_eq!(
            decapsulate(&with(&v4, 12, 0x86), &cfg),
            Err(Error::NotIp(0x8600))
        );
        assert_eq!(
            decapsulate(&with(&v4, 24, 0), &cfg),
            Err(Error::Ipv4Checksum)
        );
        assert!(matches!(
            decapsulate(&with(&v4, 14, 0x65), &cfg),
            Err(Error::Malformed { .. })
        ));
        assert_eq!(
            decapsulate(&with(&v4, 37, 0), &cfg),
            Err(Error::WrongPort {
                got: 0x1200,
                want: 4789
            })
        );
        assert_eq!(
            decapsulate(&with(&v4, 42, 0), &cfg),
            Err(Error::VniFlagClear)
        );
        assert_eq!(decapsulate(&with(&v6, 20, 6), &cfg), Err(Error::NotUdp(6)));
        assert_eq!(
            decapsulate(&with(&v6, 20, 44), &cfg),
            Err(Error::Fragmented)
        );
        assert_eq!(
            decapsulate(&with(&v6, 100, 0x55), &cfg),
            Err(Error::UdpChecksum)
        );
        let mut zero = v6.clone();
        zero[60..62].copy_from_slice(&[0, 0]);
        assert_eq!(decapsulate(&zero, &cfg), Err(Error::ZeroUdpChecksumV6));
        let lenient = DecapConfig {
            accept_zero_udp6_checksum: true,
            ..cfg
        };
        assert!(decapsulate(&zero, &lenient).is_ok());
        let strict = DecapConfig {
            local_ip: Some("192.0.2.9".parse().unwrap()),
            ..cfg
        };
        assert!(matches!(decapsulate(&v4, &strict), Err(Error::NotForUs(_))));
        for n in 0..v4.len() {
            assert!(
                decapsulate(&v4[..n], &cfg).is_err(),
                "prefix of {n} bytes accepted"
            );
        }
        // An IPv4 fragment: set MF.
        let mut frag = with(&v4, 20, 0x60);
        let csum = Sum::new().add_bytes(&{
            let mut h = frag[14..34].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        });
        frag[24..26].copy_from_slice(&csum.checksum().to_ne_bytes());
        assert_eq!(decapsulate(&frag, &cfg), Err(Error::Fragmented));
    }
}
