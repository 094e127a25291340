//! VXLAN encapsulation from a per-tunnel header template.
//!
//! The outer Ethernet, IP, UDP and VXLAN headers of one tunnel differ per packet only in the
//! lengths, the checksums, the UDP source port and the VNI. [`Encapsulator::new`] builds the
//! template once with `etherparse`; each packet then copies 50 (IPv4) or 70 (IPv6) bytes and
//! patches those fields. IPv4: DF set, UDP checksum zero (allowed by RFC 7348). IPv6: the UDP
//! checksum is computed (Linux drops zero-checksum IPv6 UDP by default, RFC 8200 §8.1), unless
//! the tunnel is configured for zero checksums (RFC 6935/6936, Linux vxlan's `udp6zerocsumtx`),
//! which saves summing the whole datagram.

use std::net::IpAddr;

use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6Header, UdpHeader};

use crate::checksum::Sum;
use crate::mtu::UnderlayFamily;
use crate::vxlan::{self, VXLAN_PORT, Vni};
use crate::{Error, MacAddr, flow};

/// Largest outer header: Ethernet 14 + IPv6 40 + UDP 8 + VXLAN 8.
pub const MAX_HEADER_LEN: usize = 70;

/// The addresses and parameters of one tunnel (local VTEP to one remote VTEP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelConfig {
    /// MAC of the local underlay interface.
    pub local_mac: MacAddr,
    /// MAC of the underlay next hop towards the remote VTEP.
    pub next_hop_mac: MacAddr,
    /// Local VTEP address.
    pub local_ip: IpAddr,
    /// Remote VTEP address (same family as `local_ip`).
    pub remote_ip: IpAddr,
    /// UDP destination port (default 4789).
    pub udp_port: u16,
    /// IPv4 TTL / IPv6 hop limit of the outer header (default 64).
    pub ttl: u8,
    /// L3 MTU of the underlay (default 1500).
    pub underlay_mtu: u16,
    /// IPv6: send a zero UDP checksum (RFC 6935; the peer must accept it, as Linux does with
    /// `udp6zerocsumrx`). Default off. IPv4 always sends zero (RFC 7348).
    pub udp6_zero_checksum: bool,
}

impl TunnelConfig {
    /// A tunnel with the default port (4789), TTL (64) and underlay MTU (1500).
    pub fn new(
        local_mac: MacAddr,
        next_hop_mac: MacAddr,
        local_ip: IpAddr,
        remote_ip: IpAddr,
    ) -> Self {
        TunnelConfig {
            local_mac,
            next_hop_mac,
            local_ip,
            remote_ip,
            udp_port: VXLAN_PORT,
            ttl: 64,
            underlay_mtu: 1500,
            udp6_zero_checksum: false,
        }
    }
}

/// Encapsulates inner frames for one tunnel. Cheap to clone; holds no buffers.
#[derive(Clone, Debug)]
pub struct Encapsulator {
    template: [u8; MAX_HEADER_LEN],
    family: UnderlayFamily,
    header_len: usize,
    /// IPv4: sum of the template's IP header with zero length and checksum.
    /// IPv6: sum of the UDP pseudo-header's addresses and next header.
    partial_sum: Sum,
    /// IPv4: `partial_sum` folded to 16 bits (native order).
    ipv4_header_sum: u32,
    underlay_mtu: u16,
    udp6_zero_checksum: bool,
}

const ETH_LEN: usize = Ethernet2Header::LEN;

impl Encapsulator {
    /// Builds the header template of a tunnel.
    pub fn new(cfg: &TunnelConfig) -> Result<Encapsulator, Error> {
        let family = UnderlayFamily::of(cfg.local_ip);
        if UnderlayFamily::of(cfg.remote_ip) != family {
            return Err(Error::BadTunnel(
                "local and remote VTEP address families differ",
            ));
        }
        if cfg.ttl == 0 {
            return Err(Error::BadTunnel("TTL must not be zero"));
        }
        if mtu_inner(cfg.underlay_mtu, family).is_none() {
            return Err(Error::BadTunnel("underlay MTU too small for VXLAN"));
        }
        let mut template = [0u8; MAX_HEADER_LEN];
        let ip_len = family.ip_header_len();
        let header_len = ETH_LEN + ip_len + UdpHeader::LEN + vxlan::HEADER_LEN;
        let eth = Ethernet2Header {
            source: cfg.local_mac.0,
            destination: cfg.next_hop_mac.0,
            ether_type: match family {
                UnderlayFamily::V4 => EtherType::IPV4,
                UnderlayFamily::V6 => EtherType::IPV6,
            },
        };
        template[..ETH_LEN].copy_from_slice(&eth.to_bytes());
        let partial_sum = match (cfg.local_ip, cfg.remote_ip) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                // Ipv4Header::new sets DF, identification 0, no options.
                let ip = Ipv4Header::new(0, cfg.ttl, IpNumber::UDP, src.octets(), dst.octets())
                    .map_err(|_| Error::BadTunnel("IPv4 header"))?;
                let bytes = ip.to_bytes();
                template[ETH_LEN..ETH_LEN + ip_len].copy_from_slice(&bytes);
                // total_len is 20 in the template: remove it, it is added back per packet.
                template[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&[0, 0]);
                Sum::new().add_bytes(&template[ETH_LEN..ETH_LEN + ip_len])
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let ip = Ipv6Header {
                    traffic_class: 0,
                    flow_label: Default::default(),
                    payload_length: 0,
                    next_header: IpNumber::UDP,
                    hop_limit: cfg.ttl,
                    source: src.octets(),
                    destination: dst.octets(),
                };
                template[ETH_LEN..ETH_LEN + ip_len].copy_from_slice(&ip.to_bytes());
                Sum::new()
                    .add_bytes(&src.octets())
                    .add_bytes(&dst.octets())
                    .add_word([0, IpNumber::UDP.0])
            }
            _ => unreachable!("families checked above"),
        };
        let udp = UdpHeader {
            source_port: 0,
            destination_port: cfg.udp_port,
            length: 0,
            checksum: 0,
        };
        let udp_at = ETH_LEN + ip_len;
        template[udp_at..udp_at + UdpHeader::LEN].copy_from_slice(&udp.to_bytes());
        Ok(Encapsulator {
            template,
            family,
            header_len,
            partial_sum,
            ipv4_header_sum: partial_sum.folded() as u32,
            underlay_mtu: cfg.underlay_mtu,
            udp6_zero_checksum: cfg.udp6_zero_checksum,
        })
    }

    /// Bytes of headroom encapsulation needs in front of the inner frame: 50 (IPv4) or
    /// 70 (IPv6).
    #[inline]
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// Underlay address family of this tunnel.
    #[inline]
    pub fn family(&self) -> UnderlayFamily {
        self.family
    }

    /// Largest inner Ethernet frame (without FCS) this tunnel carries.
    #[inline]
    pub fn max_inner_frame(&self) -> usize {
        self.underlay_mtu as usize + ETH_LEN - self.family.overhead()
    }

    /// Encapsulates in place: the inner frame is at `buf[header_len()..header_len() + inner_len]`
    /// and the outer headers are written in front of it. Returns the outer frame's length.
    ///
    /// Frames that would exceed the underlay MTU are refused ([`Error::ExceedsUnderlayMtu`]).
    #[inline]
    pub fn encap_in_place(
        &self,
        vni: Vni,
        buf: &mut [u8],
        inner_len: usize,
    ) -> Result<usize, Error> {
        let total = self.header_len + inner_len;
        if buf.len() < total {
            return Err(Error::BufferTooSmall {
                need: total,
                have: buf.len(),
            });
        }
        let ip_packet_len = total - ETH_LEN;
        if ip_packet_len > self.underlay_mtu as usize {
            return Err(Error::ExceedsUnderlayMtu {
                size: ip_packet_len,
                mtu: self.underlay_mtu,
            });
        }
        let source_port = flow::source_port_for(&buf[self.header_len..total]);
        match self.family {
            UnderlayFamily::V4 => self.write_v4(vni, buf, ip_packet_len, source_port),
            UnderlayFamily::V6 => self.write_v6(vni, buf, ip_packet_len, source_port, total),
        }
        Ok(total)
    }

    /// Writes the 50 bytes of IPv4 outer headers (fixed size: the copy is a few vector moves).
    #[inline(always)]
    fn write_v4(&self, vni: Vni, buf: &mut [u8], ip_packet_len: usize, source_port: u16) {
        const UDP: usize = ETH_LEN + 20;
        // The caller checked buf.len() >= total > 50: the else branch never runs.
        let Some(h) = buf.first_chunk_mut::<50>() else {
            return;
        };
        h.copy_from_slice(&self.template[..50]);
        let total_len = (ip_packet_len as u16).to_be_bytes();
        h[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&total_len);
        // Sums are in native byte order: the result is written in native order.
        // The template's sum is folded to 16 bits already: one add, one fold.
        let s = self.ipv4_header_sum + u16::from_ne_bytes(total_len) as u32;
        let csum = !(((s & 0xffff) + (s >> 16)) as u16);
        h[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&csum.to_ne_bytes());
        h[UDP..UDP + 2].copy_from_slice(&source_port.to_be_bytes());
        h[UDP + 4..UDP + 6].copy_from_slice(&((ip_packet_len - 20) as u16).to_be_bytes());
        h[UDP + 8..UDP + 16].copy_from_slice(&vxlan::header(vni));
    }

    /// Writes the 70 bytes of IPv6 outer headers and the UDP checksum over the whole datagram
    /// (or, for a zero-checksum tunnel, leaves the template's zero).
    #[inline(always)]
    fn write_v6(
        &self,
        vni: Vni,
        buf: &mut [u8],
        ip_packet_len: usize,
        source_port: u16,
        total: usize,
    ) {
        const UDP: usize = ETH_LEN + 40;
        // The caller checked buf.len() >= total > 70: the else branch never runs.
        let Some(h) = buf.first_chunk_mut::<70>() else {
            return;
        };
        h.copy_from_slice(&self.template[..70]);
        let udp_len = (ip_packet_len - 40) as u16;
        h[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&udp_len.to_be_bytes());
        h[UDP..UDP + 2].copy_from_slice(&source_port.to_be_bytes());
        h[UDP + 4..UDP + 6].copy_from_slice(&udp_len.to_be_bytes());
        h[UDP + 8..UDP + 16].copy_from_slice(&vxlan::header(vni));
        if self.udp6_zero_checksum {
            return;
        }
        // Pseudo-header length + UDP header (checksum field still zero) + payload.
        let csum = self
            .partial_sum
            .add_word(udp_len.to_be_bytes())
            .add_bytes(&buf[UDP..total])
            .udp_checksum();
        buf[UDP + 6..UDP + 8].copy_from_slice(&csum.to_ne_bytes());
    }

    /// Copies `inner` into `out` behind the outer headers and encapsulates it. Returns the
    /// outer frame's length.
    pub fn encap(&self, vni: Vni, inner: &[u8], out: &mut [u8]) -> Result<usize, Error> {
        let total = self.header_len + inner.len();
        let have = out.len();
        out.get_mut(self.header_len..total)
            .ok_or(Error::BufferTooSmall { need: total, have })?
            .copy_from_slice(inner);
        self.encap_in_place(vni, out, inner.len())
    }
}

fn mtu_inner(underlay_mtu: u16, family: UnderlayFamily) -> Option<u16> {
    crate::mtu::inner_mtu(underlay_mtu, family)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const LOCAL_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x01]);
    const PEER_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x02]);

    fn inner() -> [u8; 60] {
        let mut f = [0u8; 60];
        f[..6].copy_from_slice(&[0x02, 0xaa, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[0x02, 0xaa, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental EtherType
        f
    }

    #[test]
    fn ipv4_outer_headers_are_byte_exact() {
        let cfg = TunnelConfig::new(
            LOCAL_MAC,
            PEER_MAC,
            Ipv4Addr::new(192, 0, 2, 1).into(),
            Ipv4Addr::new(192, 0, 2, 2).into(),
        );
        let enc = Encapsulator::new(&cfg).unwrap();
        assert_eq!(enc.header_len(), 50);
        let mut out = [0u8; 200];
        let n = enc
            .encap(Vni::new(42).unwrap(), &inner(), &mut out)
            .unwrap();
        assert_eq!(n, 110);
        let sport = flow::source_port_for(&inner()).to_be_bytes();
        #[rustfmt::skip]
        let expected: [u8; 50] = [
            0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00,   // Ethernet
            0x45, 0x00, 0x00, 96, 0x00, 0x00, 0x40, 0x00, 64, 17,          // IPv4: len 96, DF
            0xb6, 0x89,                                                    // header checksum
            192, 0, 2, 1, 192, 0, 2, 2,
            sport[0], sport[1], 0x12, 0xb5, 0x00, 76, 0x00, 0x00,          // UDP: ->4789, len 76
            0x08, 0, 0, 0, 0, 0, 42, 0,                                    // VXLAN
        ];
        assert_eq!(&out[..50], &expected);
        assert_eq!(&out[50..n], &inner());
    }

    #[test]
    fn ipv6_outer_udp_checksum_verifies() {
        let cfg = TunnelConfig::new(
            LOCAL_MAC,
            PEER_MAC,
            "fd00::1".parse::<Ipv6Addr>().unwrap().into(),
            "fd00::2".parse::<Ipv6Addr>().unwrap().into(),
        );
        let enc = Encapsulator::new(&cfg).unwrap();
        let mut out = [0u8; 200];
        let n = enc
            .encap(Vni::new(0xabcdef).unwrap(), &inner(), &mut out)
            .unwrap();
        assert_eq!(n, 130);
        let ip = etherparse::Ipv6HeaderSlice::from_slice(&out[14..])
            .unwrap()
            .to_header();
        let udp = etherparse::UdpHeaderSlice::from_slice(&out[54..])
            .unwrap()
            .to_header();
        assert_eq!(ip.payload_length, 76);
        assert_ne!(udp.checksum, 0);
        assert_eq!(
            udp.calc_checksum_ipv6(&ip, &out[62..n]).unwrap(),
            udp.checksum
        );
    }

    #[test]
    fn ipv6_zero_checksum_tunnels_differ_only_in_the_checksum() {
        let mut cfg = TunnelConfig::new(
            LOCAL_MAC,
            PEER_MAC,
            "fd00::1".parse::<Ipv6Addr>().unwrap().into(),
            "fd00::2".parse::<Ipv6Addr>().unwrap().into(),
        );
        let vni = Vni::new(7).unwrap();
        let mut summed = [0u8; 200];
        let n = Encapsulator::new(&cfg)
            .unwrap()
            .encap(vni, &inner(), &mut summed)
            .unwrap();
        cfg.udp6_zero_checksum = true;
        let mut zero = [0u8; 200];
        assert_eq!(
            Encapsulator::new(&cfg)
                .unwrap()
                .encap(vni, &inner(), &mut zero)
                .unwrap(),
            n
        );
        assert_eq!(&zero[60..62], &[0, 0]);
        assert_ne!(&summed[60..62], &[0, 0]);
        assert_eq!(&zero[..60], &summed[..60]);
        assert_eq!(&zero[62..n], &summed[62..n]);
        // A receiver takes it only when told to (RFC 6936).
        let strict = crate::DecapConfig::default();
        assert_eq!(
            crate::decapsulate(&zero[..n], &strict).map(|d| d.vni),
            Err(Error::ZeroUdpChecksumV6)
        );
        let lenient = crate::DecapConfig {
            accept_zero_udp6_checksum: true,
            ..strict
        };
        let d = crate::decapsulate(&zero[..n], &lenient).unwrap();
        assert_eq!((d.vni, d.inner), (vni, &inner()[..]));
    }

    #[test]
    fn refuses_frames_above_the_underlay_mtu() {
        let mut cfg = TunnelConfig::new(
            LOCAL_MAC,
            PEER_MAC,
            Ipv4Addr::new(192, 0, 2, 1).into(),
            Ipv4Addr::new(192, 0, 2, 2).into(),
        );
        cfg.underlay_mtu = 1500;
        let enc = Encapsulator::new(&cfg).unwrap();
        assert_eq!(enc.max_inner_frame(), 1464);
        let mut buf = vec![0u8; 2000];
        buf[50..64].copy_from_slice(&inner()[..14]);
        assert_eq!(
            enc.encap_in_place(Vni::new(1).unwrap(), &mut buf, 1464),
            Ok(1514)
        );
        assert_eq!(
            enc.encap_in_place(Vni::new(1).unwrap(), &mut buf, 1465),
            Err(Error::ExceedsUnderlayMtu {
                size: 1501,
                mtu: 1500
            })
        );
        assert!(matches!(
            enc.encap(Vni::new(1).unwrap(), &inner(), &mut [0u8; 100]),
            Err(Error::BufferTooSmall {
                need: 110,
                have: 100
            })
        ));
    }

    #[test]
    fn rejects_bad_tunnels() {
        let mixed = TunnelConfig::new(
            LOCAL_MAC,
            PEER_MAC,
            Ipv4Addr::LOCALHOST.into(),
            Ipv6Addr::LOCALHOST.into(),
        );
        assert!(Encapsulator::new(&mixed).is_err());
        let mut tiny = TunnelConfig::new(
            LOCAL_MAC,
            PEER_MAC,
            Ipv4Addr::LOCALHOST.into(),
            Ipv4Addr::LOCALHOST.into(),
        );
        tiny.underlay_mtu = 100;
        assert!(Encapsulator::new(&tiny).is_err());
    }
}
