//! Property tests: encapsulation round trips, agreement with headers built by `etherparse`,
//! and "no input makes a parser panic or read out of bounds".

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6Header, UdpHeader};
use overlay_net::{
    DecapConfig, Encapsulator, FrameView, MacAddr, TunnelConfig, Vni, decapsulate, flow, mtu, vxlan,
};
use proptest::prelude::*;

fn any_mac() -> impl Strategy<Value = MacAddr> {
    any::<[u8; 6]>().prop_map(|mut b| {
        b[0] &= 0xfe; // unicast
        MacAddr(b)
    })
}

fn any_vtep_pair() -> impl Strategy<Value = (IpAddr, IpAddr)> {
    prop_oneof![
        (any::<u32>(), any::<u32>())
            .prop_map(|(a, b)| (Ipv4Addr::from(a).into(), Ipv4Addr::from(b).into())),
        (any::<u128>(), any::<u128>())
            .prop_map(|(a, b)| (Ipv6Addr::from(a).into(), Ipv6Addr::from(b).into())),
    ]
}

fn any_tunnel() -> impl Strategy<Value = TunnelConfig> {
    (
        any_mac(),
        any_mac(),
        any_vtep_pair(),
        any::<u16>(),
        1u8..=255,
        1280u16..=9000,
    )
        .prop_map(|(l, r, (a, b), port, ttl, mtu)| TunnelConfig {
            local_mac: l,
            next_hop_mac: r,
            local_ip: a,
            remote_ip: b,
            udp_port: port,
            ttl,
            underlay_mtu: mtu,
            udp6_zero_checksum: false,
        })
}

fn any_inner_frame() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 14..=1600)
}

/// The outer headers as `etherparse` builds them from the same parameters.
fn reference_headers(cfg: &TunnelConfig, vni: Vni, sport: u16, inner: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut payload = vxlan::header(vni).to_vec();
    payload.extend_from_slice(inner);
    let (ether_type, ip_bytes, udp) = match (cfg.local_ip, cfg.remote_ip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = Ipv4Header::new(
                (8 + payload.len()) as u16,
                cfg.ttl,
                IpNumber::UDP,
                s.octets(),
                d.octets(),
            )
            .unwrap();
            ip.header_checksum = ip.calc_header_checksum();
            let udp = UdpHeader {
                source_port: sport,
                destination_port: cfg.udp_port,
                length: (8 + payload.len()) as u16,
                checksum: 0,
            };
            (EtherType::IPV4, ip.to_bytes().to_vec(), udp)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ip = Ipv6Header {
                traffic_class: 0,
                flow_label: Default::default(),
                payload_length: (8 + payload.len()) as u16,
                next_header: IpNumber::UDP,
                hop_limit: cfg.ttl,
                source: s.octets(),
                destination: d.octets(),
            };
            let udp = UdpHeader::with_ipv6_checksum(sport, cfg.udp_port, &ip, &payload).unwrap();
            (EtherType::IPV6, ip.to_bytes().to_vec(), udp)
        }
        _ => unreachable!(),
    };
    let eth = Ethernet2Header {
        source: cfg.local_mac.0,
        destination: cfg.next_hop_mac.0,
        ether_type,
    };
    out.extend_from_slice(&eth.to_bytes());
    out.extend_from_slice(&ip_bytes);
    out.extend_from_slice(&udp.to_bytes());
    out.extend_from_slice(&payload);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn encap_matches_etherparse_and_round_trips(
        cfg in any_tunnel(),
        vni in 0u32..=Vni::MAX,
        inner in any_inner_frame(),
    ) {
        let vni = Vni::new(vni).unwrap();
        let enc = Encapsulator::new(&cfg).unwrap();
        let mut buf = vec![0u8; 2000];
        let fam = mtu::UnderlayFamily::of(cfg.local_ip);
        match enc.encap(vni, &inner, &mut buf) {
            Ok(n) => {
                prop_assert!(mtu::fits_underlay(inner.len(), cfg.underlay_mtu, fam));
                let sport = flow::source_port_for(&inner);
                prop_assert!(sport >= 49152);
                prop_assert_eq!(&buf[..n], &reference_headers(&cfg, vni, sport, &inner)[..]);
                let dcfg = DecapConfig {
                    udp_port: cfg.udp_port,
                    local_ip: Some(cfg.remote_ip),
                    accept_zero_udp6_checksum: false,
                    udp_checksum_verified: false,
                    accept_partial_udp_checksum: false,
                };
                let d = decapsulate(&buf[..n], &dcfg).unwrap();
                prop_assert_eq!(d.vni, vni);
                prop_assert_eq!(d.source, cfg.local_ip);
                prop_assert_eq!(d.source_port, sport);
                prop_assert_eq!(d.inner, &inner[..]);
            }
            Err(overlay_net::Error::ExceedsUnderlayMtu { .. }) => {
                prop_assert!(!mtu::fits_underlay(inner.len(), cfg.underlay_mtu, fam));
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let cfg = DecapConfig::default();
        if let Ok(d) = decapsulate(&bytes, &cfg) {
            prop_assert!(d.inner.len() >= 14 && d.inner.len() <= bytes.len());
        }
        let _ = vxlan::parse(&bytes);
        let _ = FrameView::parse(&bytes);
        let _ = flow::source_port_for(&bytes);
        // Offload fix-ups on hostile frames: errors or bounded output, never a panic.
        let mss = 1 + bytes.first().copied().unwrap_or(0) as usize;
        if let Ok(mut seg) = overlay_net::gso::TcpSegmenter::new(&bytes, mss) {
            let mut out = vec![0u8; 512];
            let mut produced = 0;
            while let Some(r) = seg.next_into(&mut out) {
                prop_assert!(r.is_err() || r.as_ref().is_ok_and(|n| *n <= out.len()));
                produced += 1;
                prop_assert!(produced <= bytes.len() + 1);
                if r.is_err() {
                    break;
                }
            }
        }
        let mut copy = bytes.clone();
        let start = bytes.get(1).copied().unwrap_or(0) as usize;
        let _ = overlay_net::gso::complete_checksum(&mut copy, start, 16);
    }

    #[test]
    fn corrupted_encapsulations_never_panic(
        cfg in any_tunnel(),
        inner in proptest::collection::vec(any::<u8>(), 14..300),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        cut in any::<usize>(),
    ) {
        let enc = Encapsulator::new(&cfg).unwrap();
        let mut buf = vec![0u8; 512];
        let n = enc.encap(Vni::new(7).unwrap(), &inner, &mut buf).unwrap();
        buf.truncate(n);
        for (at, val) in flips {
            let i = at % n;
            buf[i] ^= val;
        }
        let cut = cut % (n + 1);
        let dcfg = DecapConfig { udp_port: cfg.udp_port, ..DecapConfig::default() };
        if let Ok(d) = decapsulate(&buf[..cut], &dcfg) {
            prop_assert!(d.inner.len() <= cut);
            agrees_with_etherparse(&buf[..cut], &d, cfg.udp_port)?;
        }
    }

    #[test]
    fn accepted_random_frames_agree_with_etherparse(
        cfg in any_tunnel(),
        inner in proptest::collection::vec(any::<u8>(), 14..300),
        at in 0usize..70,
        val in any::<u8>(),
    ) {
        // A single changed header byte: most are rejected, the accepted ones must make sense.
        let enc = Encapsulator::new(&cfg).unwrap();
        let mut buf = vec![0u8; 512];
        let n = enc.encap(Vni::new(7).unwrap(), &inner, &mut buf).unwrap();
        buf.truncate(n);
        buf[at % enc.header_len()] = val;
        let dcfg = DecapConfig { udp_port: cfg.udp_port, ..DecapConfig::default() };
        if let Ok(d) = decapsulate(&buf, &dcfg) {
            agrees_with_etherparse(&buf, &d, cfg.udp_port)?;
        }
    }
}

/// Whatever `decapsulate` accepts, etherparse parses the same way: same source address, a UDP
/// datagram to the VXLAN port whose payload is the VXLAN header and the inner frame.
fn agrees_with_etherparse(
    frame: &[u8],
    d: &overlay_net::Decapsulated<'_>,
    port: u16,
) -> Result<(), TestCaseError> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let p = SlicedPacket::from_ethernet(frame)
        .map_err(|e| TestCaseError::fail(format!("etherparse rejects an accepted frame: {e}")))?;
    let source: IpAddr = match &p.net {
        Some(NetSlice::Ipv4(ip)) => ip.header().source_addr().into(),
        Some(NetSlice::Ipv6(ip)) => ip.header().source_addr().into(),
        other => {
            return Err(TestCaseError::fail(format!(
                "not IP for etherparse: {other:?}"
            )));
        }
    };
    prop_assert_eq!(source, d.source);
    let Some(TransportSlice::Udp(udp)) = &p.transport else {
        return Err(TestCaseError::fail("not UDP for etherparse"));
    };
    prop_assert_eq!(udp.destination_port(), port);
    prop_assert_eq!(udp.source_port(), d.source_port);
    prop_assert_eq!(&udp.payload()[8..], d.inner);
    Ok(())
}
