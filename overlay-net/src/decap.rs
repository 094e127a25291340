//! VXLAN decapsulation of a whole received frame, validating every outer layer.
//!
//! For frames that arrive on a UDP socket (the kernel has already checked the outer layers),
//! use [`crate::vxlan::parse`] on the datagram payload instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::checksum::Sum16BitWords;
use etherparse::{
    EtherType, Ethernet2HeaderSlice, IpNumber, Ipv4HeaderSlice, Ipv6HeaderSlice,
    SingleVlanHeaderSlice, UdpHeaderSlice,
};

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
}

impl Default for DecapConfig {
    fn default() -> Self {
        DecapConfig {
            udp_port: VXLAN_PORT,
            local_ip: None,
            accept_zero_udp6_checksum: false,
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
    /// The outer destination address.
    pub destination: IpAddr,
    /// The outer UDP source port (the sender's flow hash).
    pub source_port: u16,
    /// The inner Ethernet frame (without FCS).
    pub inner: &'a [u8],
}

fn truncated(layer: Layer, need: usize, have: usize) -> Error {
    Error::Truncated { layer, need, have }
}

/// Validates the outer Ethernet (optionally 802.1Q-tagged), IPv4 or IPv6, UDP and VXLAN
/// headers of `frame` and returns the inner frame. Never reads past `frame` and never panics.
///
/// Checks: EtherType, IP version and lengths, IPv4 header checksum, no fragments, no IPv6
/// extension headers, protocol UDP, UDP length, destination port, UDP checksum (when non-zero
/// for IPv4, always for IPv6 unless configured), the VXLAN I flag, and a complete inner
/// Ethernet header. Ethernet padding after the IP packet is ignored.
pub fn decapsulate<'a>(frame: &'a [u8], cfg: &DecapConfig) -> Result<Decapsulated<'a>, Error> {
    let eth = Ethernet2HeaderSlice::from_slice(frame)
        .map_err(|_| truncated(Layer::Ethernet, 14, frame.len()))?;
    let mut ether_type = eth.ether_type();
    let mut rest = &frame[etherparse::Ethernet2Header::LEN..];
    if ether_type == EtherType::VLAN_TAGGED_FRAME {
        let tag = SingleVlanHeaderSlice::from_slice(rest)
            .map_err(|_| truncated(Layer::Vlan, 4, rest.len()))?;
        ether_type = tag.ether_type();
        rest = &rest[4..];
    }
    let (source, destination, udp_datagram, pseudo_sum) = match ether_type {
        EtherType::IPV4 => outer_ipv4(rest)?,
        EtherType::IPV6 => outer_ipv6(rest)?,
        other => return Err(Error::NotIp(other.0)),
    };
    if let Some(local) = cfg.local_ip
        && local != destination
    {
        return Err(Error::NotForUs(destination));
    }
    let udp = UdpHeaderSlice::from_slice(udp_datagram)
        .map_err(|_| truncated(Layer::Udp, 8, udp_datagram.len()))?;
    let udp_len = udp.length() as usize;
    if udp_len < etherparse::UdpHeader::LEN || udp_len > udp_datagram.len() {
        return Err(Error::Malformed {
            layer: Layer::Udp,
            what: "length field disagrees with the IP payload",
        });
    }
    let udp_datagram = &udp_datagram[..udp_len];
    if udp.destination_port() != cfg.udp_port {
        return Err(Error::WrongPort {
            got: udp.destination_port(),
            want: cfg.udp_port,
        });
    }
    let checksum = udp.checksum();
    let is_v6 = source.is_ipv6();
    if checksum == 0 {
        if is_v6 && !cfg.accept_zero_udp6_checksum {
            return Err(Error::ZeroUdpChecksumV6);
        }
    } else {
        let sum = pseudo_sum
            .add_2bytes([0, IpNumber::UDP.0])
            .add_2bytes((udp_len as u16).to_be_bytes())
            .add_slice(udp_datagram);
        if sum.ones_complement() != 0 {
            return Err(Error::UdpChecksum);
        }
    }
    let (vni, inner) = vxlan::parse(&udp_datagram[etherparse::UdpHeader::LEN..])?;
    Ok(Decapsulated {
        vni,
        source,
        destination,
        source_port: udp.source_port(),
        inner,
    })
}

type OuterIp<'a> = (IpAddr, IpAddr, &'a [u8], Sum16BitWords);

fn outer_ipv4(packet: &[u8]) -> Result<OuterIp<'_>, Error> {
    let ip = Ipv4HeaderSlice::from_slice(packet).map_err(|e| {
        use etherparse::err::ipv4::HeaderSliceError as E;
        match e {
            E::Len(l) => truncated(Layer::Ipv4, l.required_len, l.len),
            E::Content(_) => Error::Malformed {
                layer: Layer::Ipv4,
                what: "version or header length",
            },
        }
    })?;
    let header = ip.slice();
    if Sum16BitWords::new().add_slice(header).ones_complement() != 0 {
        return Err(Error::Ipv4Checksum);
    }
    if ip.is_fragmenting_payload() {
        return Err(Error::Fragmented);
    }
    if ip.protocol() != IpNumber::UDP {
        return Err(Error::NotUdp(ip.protocol().0));
    }
    let total = ip.total_len() as usize;
    if total > packet.len() {
        return Err(truncated(Layer::Ipv4, total, packet.len()));
    }
    let src = ip.source();
    let dst = ip.destination();
    let pseudo = Sum16BitWords::new().add_slice(&src).add_slice(&dst);
    Ok((
        Ipv4Addr::from(src).into(),
        Ipv4Addr::from(dst).into(),
        &packet[header.len()..total],
        pseudo,
    ))
}

fn outer_ipv6(packet: &[u8]) -> Result<OuterIp<'_>, Error> {
    let ip = Ipv6HeaderSlice::from_slice(packet).map_err(|e| {
        use etherparse::err::ipv6::HeaderSliceError as E;
        match e {
            E::Len(l) => truncated(Layer::Ipv6, l.required_len, l.len),
            E::Content(_) => Error::Malformed {
                layer: Layer::Ipv6,
                what: "version",
            },
        }
    })?;
    let next = ip.next_header();
    if next == IpNumber::IPV6_FRAGMENTATION_HEADER {
        return Err(Error::Fragmented);
    }
    if next != IpNumber::UDP {
        return Err(Error::NotUdp(next.0));
    }
    let end = etherparse::Ipv6Header::LEN + ip.payload_length() as usize;
    if end > packet.len() {
        return Err(truncated(Layer::Ipv6, end, packet.len()));
    }
    let src = ip.source();
    let dst = ip.destination();
    let pseudo = Sum16BitWords::new().add_slice(&src).add_slice(&dst);
    Ok((
        Ipv6Addr::from(src).into(),
        Ipv6Addr::from(dst).into(),
        &packet[etherparse::Ipv6Header::LEN..end],
        pseudo,
    ))
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
            assert_eq!(d.destination, r.parse::<IpAddr>().unwrap());
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
        let csum = Sum16BitWords::new().add_slice(&{
            let mut h = frag[14..34].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        });
        frag[24..26].copy_from_slice(&csum.ones_complement().to_ne_bytes());
        assert_eq!(decapsulate(&frag, &cfg), Err(Error::Fragmented));
    }
}
