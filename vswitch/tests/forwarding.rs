//! The switch's forwarding decisions, through its public API: isolation, learning, flooding
//! with split horizon, port security, policing, MTU and the MAC limit.

use std::net::IpAddr;
use std::time::Duration;

use overlay_net::frame::build_udp;
use overlay_net::{Destination, MacAddr, PortId, TenantLimits, Vni};
use vswitch::{
    DropReason, Ingress, PortConfig, PortSecurity, RateLimit, Switch, TenantConfig, Verdict,
};

const SEC: u64 = 1_000_000_000;

fn mac(n: u8) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 0, n])
}

fn frame(src: MacAddr, dst: MacAddr, src_ip: &str, len: usize) -> Vec<u8> {
    let payload = vec![0xab; len.saturating_sub(42)];
    let mut buf = vec![0u8; len.max(42) + 64];
    let n = build_udp(
        &mut buf,
        src,
        dst,
        None,
        format!("{src_ip}:1000").parse().unwrap(),
        "10.0.0.254:2000".parse().unwrap(),
        &payload,
    )
    .unwrap();
    buf.truncate(n);
    buf
}

fn tenant(name: &str, vni: u32) -> TenantConfig {
    TenantConfig {
        name: name.into(),
        vni: Vni::new(vni).unwrap(),
        mtu: 1450,
        limits: TenantLimits::default(),
        learn_vteps: false,
    }
}

/// Two tenants with the same three MACs on ports a1..a3 and b1..b3.
fn two_tenants() -> (Switch, [PortId; 3], [PortId; 3]) {
    let mut sw = Switch::new();
    sw.add_tenant(tenant("a", 100)).unwrap();
    sw.add_tenant(tenant("b", 200)).unwrap();
    let a = [1, 2, 3].map(|i| sw.add_port("a", PortConfig::new(format!("a{i}"))).unwrap());
    let b = [1, 2, 3].map(|i| sw.add_port("b", PortConfig::new(format!("b{i}"))).unwrap());
    (sw, a, b)
}

#[test]
fn learning_then_unicast_within_a_tenant() {
    let (mut sw, a, _) = two_tenants();
    let f = frame(mac(1), mac(2), "10.0.0.1", 64);
    assert_eq!(
        sw.ingress_port(a[0], &f, 0).1,
        Verdict::Flood,
        "unknown destination"
    );
    let back = frame(mac(2), mac(1), "10.0.0.2", 64);
    assert_eq!(
        sw.ingress_port(a[1], &back, 1).1,
        Verdict::Unicast(Destination::Local(a[0]))
    );
    assert_eq!(
        sw.ingress_port(a[0], &f, 2).1,
        Verdict::Unicast(Destination::Local(a[1]))
    );
    let t = sw.tenant("a").unwrap();
    assert_eq!((t.counters().unicast, t.counters().flooded), (2, 1));
    assert_eq!(t.port(a[0]).unwrap().1.rx_packets, 2);
}

#[test]
fn tenants_with_identical_macs_never_mix() {
    let (mut sw, a, b) = two_tenants();
    // Tenant a learns mac(2) on a[1]; tenant b learns the same MAC on b[2].
    sw.ingress_port(a[1], &frame(mac(2), mac(1), "10.0.0.2", 64), 0);
    sw.ingress_port(b[2], &frame(mac(2), mac(1), "10.0.0.2", 64), 0);
    let (vni, v) = sw.ingress_port(b[0], &frame(mac(1), mac(2), "10.0.0.1", 64), 1);
    assert_eq!(vni, Some(Vni::new(200).unwrap()));
    assert_eq!(v, Verdict::Unicast(Destination::Local(b[2])));
    let (_, v) = sw.ingress_port(a[0], &frame(mac(1), mac(2), "10.0.0.1", 64), 1);
    assert_eq!(v, Verdict::Unicast(Destination::Local(a[1])));
    // Floods stay inside the tenant.
    let t = sw.tenant("b").unwrap();
    let targets: Vec<_> = t.flood_targets(Ingress::Port(b[0])).collect();
    assert_eq!(targets.len(), 2);
    assert!(
        targets
            .iter()
            .all(|d| matches!(d, Destination::Local(p) if b.contains(p)))
    );
}

#[test]
fn uplink_frames_learn_remote_macs_and_never_return_to_the_underlay() {
    let (mut sw, a, _) = two_tenants();
    let vtep1: IpAddr = "192.0.2.1".parse().unwrap();
    let vtep2: IpAddr = "192.0.2.2".parse().unwrap();
    let vni = Vni::new(100).unwrap();
    {
        let t = sw.tenant_mut("a").unwrap().fdb_mut();
        t.add_remote_vtep(vtep1);
        t.add_remote_vtep(vtep2);
    }
    // A broadcast from a local port reaches the other local ports and both VTEPs.
    let bcast = frame(mac(1), MacAddr::BROADCAST, "10.0.0.1", 64);
    assert_eq!(sw.ingress_port(a[0], &bcast, 0).1, Verdict::Flood);
    let t = sw.tenant("a").unwrap();
    assert_eq!(t.flood_targets(Ingress::Port(a[0])).count(), 4);
    // A broadcast from the uplink goes to local ports only.
    assert_eq!(t.flood_targets(Ingress::Uplink(vtep1)).count(), 3);
    // mac(9) lives behind vtep1; local traffic to it is unicast to that VTEP.
    let from_remote = frame(mac(9), mac(1), "10.0.0.9", 64);
    assert_eq!(
        sw.ingress_uplink(vni, vtep1, &from_remote, 1),
        Verdict::Unicast(Destination::Local(a[0]))
    );
    let to_remote = frame(mac(1), mac(9), "10.0.0.1", 64);
    assert_eq!(
        sw.ingress_port(a[0], &to_remote, 2).1,
        Verdict::Unicast(Destination::Remote(vtep1))
    );
    // A frame from vtep2 for a MAC behind vtep1 is not sent back to the underlay.
    let relay = frame(mac(8), mac(9), "10.0.0.8", 64);
    assert_eq!(
        sw.ingress_uplink(vni, vtep2, &relay, 3),
        Verdict::Drop(DropReason::Hairpin)
    );
    // Unknown VNIs are dropped and counted.
    assert_eq!(
        sw.ingress_uplink(Vni::new(999).unwrap(), vtep1, &relay, 4),
        Verdict::Drop(DropReason::UnknownVni)
    );
    assert_eq!(sw.unknown_vni_drops(), 1);
}

#[test]
fn port_security_drops_and_counts_spoofing() {
    let mut sw = Switch::new();
    sw.add_tenant(tenant("a", 100)).unwrap();
    let mut cfg = PortConfig::new("secure");
    cfg.security = Some(PortSecurity {
        mac: mac(1),
        ips: vec!["10.0.0.1".parse().unwrap()],
    });
    let p = sw.add_port("a", cfg).unwrap();
    let q = sw.add_port("a", PortConfig::new("open")).unwrap();
    let good = frame(mac(1), mac(2), "10.0.0.1", 64);
    assert_eq!(sw.ingress_port(p, &good, 0).1, Verdict::Flood);
    let bad_mac = frame(mac(3), mac(2), "10.0.0.1", 64);
    assert_eq!(
        sw.ingress_port(p, &bad_mac, 0).1,
        Verdict::Drop(DropReason::SpoofedMac)
    );
    let bad_ip = frame(mac(1), mac(2), "10.0.0.77", 64);
    assert_eq!(
        sw.ingress_port(p, &bad_ip, 0).1,
        Verdict::Drop(DropReason::SpoofedIp)
    );
    // The spoofed MAC was not learned: frames to it still flood.
    let to_spoofed = frame(mac(2), mac(3), "10.0.0.2", 64);
    assert_eq!(sw.ingress_port(q, &to_spoofed, 0).1, Verdict::Flood);
    let c = sw.tenant("a").unwrap().port(p).unwrap().1;
    assert_eq!(c.drops.get(DropReason::SpoofedMac), 1);
    assert_eq!(c.drops.get(DropReason::SpoofedIp), 1);
    assert_eq!(c.rx_packets, 3);
}

#[test]
fn policing_limits_a_port_to_its_rate() {
    let mut sw = Switch::new();
    sw.add_tenant(tenant("a", 100)).unwrap();
    let mut cfg = PortConfig::new("limited");
    cfg.rate_limit = RateLimit {
        bits_per_sec: Some(8_000_000), // 1 MB/s
        burst_bits: Some(80_000),
        ..Default::default()
    };
    let p = sw.add_port("a", cfg).unwrap();
    let f = frame(mac(1), mac(2), "10.0.0.1", 1000);
    // Offer 10 MB/s for 2 s: 10k frames per second.
    let passed = (0..20_000u64)
        .filter(|i| {
            sw.ingress_port(p, &f, i * (SEC / 10_000)).1 != Verdict::Drop(DropReason::RateLimited)
        })
        .count() as u64;
    let expected = (2 * 1_000_000 + 10_000) / f.len() as u64;
    assert!(
        passed.abs_diff(expected) <= 2,
        "{passed} frames passed, expected {expected}"
    );
}

#[test]
fn oversize_malformed_and_group_sources_are_dropped() {
    let (mut sw, a, _) = two_tenants();
    let max = frame(mac(1), mac(2), "10.0.0.1", 1450 + 14);
    assert_eq!(sw.ingress_port(a[0], &max, 0).1, Verdict::Flood);
    let too_big = frame(mac(1), mac(2), "10.0.0.1", 1450 + 15);
    assert_eq!(
        sw.ingress_port(a[0], &too_big, 0).1,
        Verdict::Drop(DropReason::Oversize)
    );
    assert_eq!(
        sw.ingress_port(a[0], &[0u8; 13], 0).1,
        Verdict::Drop(DropReason::Malformed)
    );
    let group_src = frame(MacAddr([0x01, 0, 0x5e, 0, 0, 1]), mac(2), "10.0.0.1", 64);
    assert_eq!(
        sw.ingress_port(a[0], &group_src, 0).1,
        Verdict::Drop(DropReason::InvalidSource)
    );
    let hairpin = frame(mac(1), mac(1), "10.0.0.1", 64);
    assert_eq!(
        sw.ingress_port(a[0], &hairpin, 0).1,
        Verdict::Drop(DropReason::Hairpin)
    );
    let drops = sw.tenant("a").unwrap().counters().drops;
    assert_eq!(drops.total(), 4);
}

#[test]
fn the_mac_limit_stops_learning_but_known_macs_keep_working() {
    let mut sw = Switch::new();
    let mut cfg = tenant("a", 100);
    cfg.limits = TenantLimits {
        max_learned: 4,
        aging: Duration::from_secs(300),
    };
    sw.add_tenant(cfg).unwrap();
    let p = sw.add_port("a", PortConfig::new("p")).unwrap();
    let q = sw.add_port("a", PortConfig::new("q")).unwrap();
    for n in 1..=6 {
        sw.ingress_port(p, &frame(mac(n), MacAddr::BROADCAST, "10.0.0.1", 64), 0);
    }
    let t = sw.tenant("a").unwrap();
    assert_eq!(t.fdb().learned_len(), 4);
    assert_eq!(t.counters().learn_limit_hits, 2);
    assert_eq!(
        sw.ingress_port(q, &frame(mac(9), mac(2), "10.0.0.9", 64), 1)
            .1,
        Verdict::Unicast(Destination::Local(p))
    );
    assert_eq!(
        sw.ingress_port(q, &frame(mac(9), mac(6), "10.0.0.9", 64), 1)
            .1,
        Verdict::Flood
    );
}

#[test]
fn configuration_errors_are_clear() {
    let mut sw = Switch::new();
    sw.add_tenant(tenant("a", 100)).unwrap();
    assert!(sw.add_tenant(tenant("a", 101)).is_err(), "duplicate name");
    assert!(sw.add_tenant(tenant("b", 100)).is_err(), "duplicate VNI");
    let mut tiny = tenant("c", 102);
    tiny.mtu = 60;
    assert!(sw.add_tenant(tiny).is_err(), "MTU below 68");
    assert!(sw.add_port("nope", PortConfig::new("p")).is_err());
    sw.add_port("a", PortConfig::new("p")).unwrap();
    assert!(
        sw.add_port("a", PortConfig::new("p")).is_err(),
        "duplicate port"
    );
    assert!(sw.remove_tenant("a").is_err(), "tenant with ports");
    sw.remove_port("p").unwrap();
    assert!(sw.remove_port("p").is_err());
    sw.remove_tenant("a").unwrap();
    assert!(sw.tenant("a").is_none());
    let mut bad_rate = PortConfig::new("r");
    bad_rate.rate_limit.packets_per_sec = Some(0);
    sw.add_tenant(tenant("d", 103)).unwrap();
    assert!(sw.add_port("d", bad_rate).is_err());
}

#[test]
fn uplink_frames_are_heard_only_from_the_tenants_vteps_unless_it_learns_vteps() {
    let (mut sw, a, _) = two_tenants();
    let vtep: IpAddr = "192.0.2.1".parse().unwrap();
    let stranger: IpAddr = "192.0.2.66".parse().unwrap();
    sw.tenant_mut("a").unwrap().fdb_mut().add_remote_vtep(vtep);
    let vni = Vni::new(100).unwrap();
    let forged = frame(mac(9), mac(1), "10.0.0.9", 64);
    // From a host that is not one of a's VTEPs: dropped, counted, nothing learned.
    assert_eq!(
        sw.ingress_uplink(vni, stranger, &forged, 1),
        Verdict::Drop(DropReason::UnknownVtep)
    );
    // A VTEP of tenant b only is a stranger to tenant a too.
    sw.tenant_mut("b")
        .unwrap()
        .fdb_mut()
        .add_remote_vtep("192.0.2.2".parse().unwrap());
    assert_eq!(
        sw.ingress_uplink(vni, "192.0.2.2".parse().unwrap(), &forged, 2),
        Verdict::Drop(DropReason::UnknownVtep)
    );
    let t = sw.tenant("a").unwrap();
    assert_eq!(t.counters().drops.get(DropReason::UnknownVtep), 2);
    assert!(t.fdb().entries().all(|(m, _)| m != mac(9)));
    // Learning the frames' MAC would have moved traffic to the stranger: it stays local.
    let to_nine = frame(mac(1), mac(9), "10.0.0.1", 64);
    assert_eq!(sw.ingress_port(a[0], &to_nine, 3).1, Verdict::Flood);
    // From the tenant's VTEP (also seen as an IPv4-mapped IPv6 address): heard.
    let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
    assert_eq!(
        sw.ingress_uplink(vni, mapped, &forged, 4),
        Verdict::Unicast(Destination::Local(a[0]))
    );
    // A tenant that learns VTEPs hears anyone (flood-and-learn).
    let mut learning = tenant("c", 300);
    learning.learn_vteps = true;
    sw.add_tenant(learning).unwrap();
    let c = sw.add_port("c", PortConfig::new("c1")).unwrap();
    let to_c = frame(mac(9), mac(1), "10.0.0.9", 64);
    assert_eq!(
        sw.ingress_uplink(Vni::new(300).unwrap(), stranger, &to_c, 5),
        Verdict::Flood
    );
    let back = frame(mac(1), mac(9), "10.0.0.1", 64);
    assert_eq!(
        sw.ingress_port(c, &back, 6).1,
        Verdict::Unicast(Destination::Remote(stranger))
    );
}

fn arp(operation: u16, sender: MacAddr, sender_ip: &str, target_ip: &str) -> Vec<u8> {
    let mut buf = vec![0u8; 64];
    let n = overlay_net::frame::build_arp(
        &mut buf,
        MacAddr::BROADCAST,
        &overlay_net::frame::ArpInfo {
            operation,
            sender_mac: sender,
            sender_ip: sender_ip.parse().unwrap(),
            target_mac: MacAddr::default(),
            target_ip: target_ip.parse().unwrap(),
        },
    )
    .unwrap();
    buf.truncate(n);
    buf
}

#[test]
fn arp_requests_for_known_addresses_are_answered_not_flooded() {
    let (mut sw, a, b) = two_tenants();
    let known = std::collections::HashMap::from([("10.0.0.9".parse().unwrap(), mac(9))]);
    sw.tenant_mut("a").unwrap().set_neighbors(known);
    let ask = arp(1, mac(1), "10.0.0.1", "10.0.0.9");
    assert_eq!(
        sw.ingress_port(a[0], &ask, 0).1,
        Verdict::Answer(mac(9)),
        "a known binding is answered"
    );
    let mut reply = [0u8; 64];
    let n = overlay_net::frame::build_arp_reply(&mut reply, &ask, mac(9)).unwrap();
    let view = overlay_net::FrameView::parse(&reply[..n]).unwrap();
    assert_eq!(view.destination, mac(1));
    let overlay_net::frame::Network::Arp(r) = view.network else {
        panic!("not ARP")
    };
    assert_eq!(
        (r.operation, r.sender_mac, r.sender_ip, r.target_ip),
        (
            2,
            mac(9),
            "10.0.0.9".parse().unwrap(),
            "10.0.0.1".parse().unwrap()
        )
    );
    // Unknown targets, gratuitous ARP, replies and the other tenant still flood.
    for (port, frame) in [
        (a[0], arp(1, mac(1), "10.0.0.1", "10.0.0.8")),
        (a[0], arp(1, mac(1), "10.0.0.9", "10.0.0.9")),
        (a[0], arp(2, mac(1), "10.0.0.1", "10.0.0.9")),
        (b[0], arp(1, mac(1), "10.0.0.1", "10.0.0.9")),
    ] {
        assert_eq!(sw.ingress_port(port, &frame, 0).1, Verdict::Flood);
    }
    // The owner asking about its own address (a duplicate-address probe) is not answered
    // with its own MAC.
    assert_eq!(
        sw.ingress_port(a[1], &arp(1, mac(9), "0.0.0.0", "10.0.0.9"), 0)
            .1,
        Verdict::Flood
    );
    // From the underlay: never answered here (the sender's host answers its own ports).
    let t = sw.tenant_mut("a").unwrap();
    t.fdb_mut().add_remote_vtep("192.0.2.2".parse().unwrap());
    assert_eq!(
        t.ingress(Ingress::Uplink("192.0.2.2".parse().unwrap()), &ask, 0),
        Verdict::Flood
    );
    assert_eq!(sw.tenant("a").unwrap().counters().arp_answered, 1);
}

/// A neighbor solicitation from `sender` (`sender_ip`) for `target`, to its solicited-node
/// multicast group.
fn solicitation(sender: MacAddr, sender_ip: &str, target: &str) -> Vec<u8> {
    use overlay_net::etherparse::{Icmpv6Type, PacketBuilder};
    let target: std::net::Ipv6Addr = target.parse().unwrap();
    let t = target.octets();
    let group = MacAddr([0x33, 0x33, 0xff, t[13], t[14], t[15]]);
    let ip_group = [
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    ];
    let dst = std::net::Ipv6Addr::new(
        ip_group[0],
        ip_group[1],
        ip_group[2],
        ip_group[3],
        ip_group[4],
        ip_group[5],
        ip_group[6],
        ip_group[7],
    );
    let mut payload = t.to_vec();
    payload.extend_from_slice(&[1, 1]);
    payload.extend_from_slice(&sender.0);
    let src: std::net::Ipv6Addr = sender_ip.parse().unwrap();
    let mut out = Vec::new();
    PacketBuilder::ethernet2(sender.0, group.0)
        .ipv6(src.octets(), dst.octets(), 255)
        .icmpv6(Icmpv6Type::NeighborSolicitation)
        .write(&mut out, &payload)
        .unwrap();
    out
}

#[test]
fn neighbor_solicitations_for_known_addresses_are_answered_with_a_valid_advertisement() {
    use overlay_net::etherparse::{Icmpv6Type, NetSlice, SlicedPacket, TransportSlice};
    let (mut sw, a, _) = two_tenants();
    let known = std::collections::HashMap::from([("fd00::9".parse().unwrap(), mac(9))]);
    sw.tenant_mut("a").unwrap().set_neighbors(known);
    let ask = solicitation(mac(1), "fd00::1", "fd00::9");
    assert_eq!(sw.ingress_port(a[0], &ask, 0).1, Verdict::Answer(mac(9)));
    let mut reply = [0u8; 128];
    let n = overlay_net::frame::build_neighbor_reply(&mut reply, &ask, mac(9)).unwrap();
    let p = SlicedPacket::from_ethernet(&reply[..n]).unwrap();
    let Some(NetSlice::Ipv6(ip)) = &p.net else {
        panic!("not IPv6")
    };
    assert_eq!(
        ip.header().source_addr(),
        "fd00::9".parse::<std::net::Ipv6Addr>().unwrap()
    );
    assert_eq!(
        ip.header().destination_addr(),
        "fd00::1".parse::<std::net::Ipv6Addr>().unwrap()
    );
    assert_eq!(ip.header().hop_limit(), 255);
    let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
        panic!("not ICMPv6")
    };
    let Icmpv6Type::NeighborAdvertisement(flags) = icmp.icmp_type() else {
        panic!("not an advertisement: {:?}", icmp.icmp_type())
    };
    assert!(flags.solicited && flags.r#override && !flags.router);
    let body = icmp.payload();
    assert_eq!(
        &body[..16],
        &"fd00::9".parse::<std::net::Ipv6Addr>().unwrap().octets()
    );
    assert_eq!(&body[16..18], &[2, 1], "target link-layer address option");
    assert_eq!(&body[18..24], &mac(9).0);
    let sum = icmp
        .icmp_type()
        .calc_checksum(ip.header().source(), ip.header().destination(), body)
        .unwrap();
    assert_eq!(icmp.checksum(), sum, "ICMPv6 checksum");
    // Unknown targets and duplicate address detection (from ::) still flood.
    for f in [
        solicitation(mac(1), "fd00::1", "fd00::8"),
        solicitation(mac(1), "::", "fd00::9"),
    ] {
        assert_eq!(sw.ingress_port(a[0], &f, 0).1, Verdict::Flood);
    }
}
