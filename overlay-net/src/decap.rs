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
}

impl Default for DecapConfig {
    fn default() -> Self {
        DecapConfig {
            udp_port: VXLAN_PORT,
            local_ip: None,
            accept_zero_udp6_checksum: false,
            udp_checksum_verified: false,
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

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const PROTO_UDP: u8 = 17;
const IPV6_FRAGMENT: u8 = 44;

#[inline(always)]
fn truncated(layer: Layer, need: usize, have: usize) -> Error {
    Error::Truncated { layer, need, have }
}

#[inline(always)]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
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
    let Some(eth) = frame.first_chunk::<14>() else {
        return Err(truncated(Layer::Ethernet, 14, frame.len()));
    };
    let mut ether_type = be16(eth, 12);
    let mut l3 = 14;
    if ether_type == ETHERTYPE_VLAN {
        let Some(tagged) = frame.first_chunk::<18>() else {
            return Err(truncated(Layer::Vlan, 18, frame.len()));
        };
        ether_type = be16(tagged, 16);
        l3 = 18;
    }
    let packet = &frame[l3..];
    match ether_type {
        ETHERTYPE_IPV4 => outer_ipv4(packet, cfg),
        ETHERTYPE_IPV6 => outer_ipv6(packet, cfg),
        other => Err(Error::NotIp(other)),
    }
}

#[inline(always)]
fn outer_ipv4<'a>(packet: &'a [u8], cfg: &DecapConfig) -> Result<Decapsulated<'a>, Error> {
    let Some(h) = packet.first_chunk::<20>() else {
        return Err(truncated(Layer::Ipv4, 20, packet.len()));
    };
    if h[0] >> 4 != 4 {
        return Err(Error::Malformed {
            layer: Layer::Ipv4,
            what: "version",
        });
    }
    let ihl = (h[0] & 0x0f) as usize * 4;
    let total = be16(h, 2) as usize;
    if ihl < 20 || total < ihl {
        return Err(Error::Malformed {
            layer: Layer::Ipv4,
            what: "header or total length",
        });
    }
    if total > packet.len() {
        return Err(truncated(Layer::Ipv4, total, packet.len()));
    }
    let header_sum = if ihl == 20 {
        Sum::new().add_array(h)
    } else {
        Sum::new().add_bytes(&packet[..ihl])
    };
    if header_sum.checksum() != 0 {
        return Err(Error::Ipv4Checksum);
    }
    if be16(h, 6) & 0x3fff != 0 {
        return Err(Error::Fragmented);
    }
    if h[9] != PROTO_UDP {
        return Err(Error::NotUdp(h[9]));
    }
    let src = [h[12], h[13], h[14], h[15]];
    let dst = [h[16], h[17], h[18], h[19]];
    if let Some(local) = cfg.local_ip
        && local != IpAddr::V4(Ipv4Addr::from(dst))
    {
        return Err(Error::NotForUs(Ipv4Addr::from(dst).into()));
    }
    let addrs: [u8; 8] = [
        src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3],
    ];
    udp_vxlan(
        &packet[ihl..total],
        &addrs,
        false,
        Ipv4Addr::from(src).into(),
        cfg,
    )
}

#[inline(always)]
fn outer_ipv6<'a>(packet: &'a [u8], cfg: &DecapConfig) -> Result<Decapsulated<'a>, Error> {
    let Some(h) = packet.first_chunk::<40>() else {
        return Err(truncated(Layer::Ipv6, 40, packet.len()));
    };
    if h[0] >> 4 != 6 {
        return Err(Error::Malformed {
            layer: Layer::Ipv6,
            what: "version",
        });
    }
    match h[6] {
        PROTO_UDP => {}
        IPV6_FRAGMENT => return Err(Error::Fragmented),
        other => return Err(Error::NotUdp(other)),
    }
    let end = 40 + be16(h, 4) as usize;
    if end > packet.len() {
        return Err(truncated(Layer::Ipv6, end, packet.len()));
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&h[24..40]);
    if let Some(local) = cfg.local_ip
        && local != IpAddr::V6(Ipv6Addr::from(dst))
    {
        return Err(Error::NotForUs(Ipv6Addr::from(dst).into()));
    }
    udp_vxlan(
        &packet[40..end],
        &h[8..40],
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
    let Some(u) = datagram.first_chunk::<8>() else {
        return Err(truncated(Layer::Udp, 8, datagram.len()));
    };
    let udp_len = be16(u, 4) as usize;
    if udp_len < 8 || udp_len > datagram.len() {
        return Err(Error::Malformed {
            layer: Layer::Udp,
            what: "length field disagrees with the IP payload",
        });
    }
    let dport = be16(u, 2);
    if dport != cfg.udp_port {
        return Err(Error::WrongPort {
            got: dport,
            want: cfg.udp_port,
        });
    }
    let datagram = &datagram[..udp_len];
    if cfg.udp_checksum_verified {
        // Vouched for by the receive path.
    } else if be16(u, 6) == 0 {
        if is_v6 && !cfg.accept_zero_udp6_checksum {
            return Err(Error::ZeroUdpChecksumV6);
        }
    } else {
        let sum = Sum::new()
            .add_bytes(addrs)
            .add_word([0, PROTO_UDP])
            .add_word((udp_len as u16).to_be_bytes())
            .add_bytes(datagram);
        if sum.checksum() != 0 {
            return Err(Error::UdpChecksum);
        }
    }
    let (vni, inner) = vxlan::parse(&datagram[8..])?;
    Ok(Decapsulated {
        vni,
        source,
        source_port: be16(u, 0),
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
