//! vswitchd's datapath and a Linux vxlan host on one underlay whose links keep the kernel's
//! default offloads (a veth offloads checksums and segmentation): TCP and UDP both ways over
//! IPv4 and IPv6 underlays, the data intact, no checksum errors at either endpoint.
//!
//! With these defaults the kernel peer sends its inner TCP/UDP checksums partial, and bulk
//! TCP as tunnel-GSO super-frames (one VXLAN datagram holding a TCP segment of up to 64 KiB)
//! that reach vswitchd's UDP socket whole; the switch finishes the checksums and hands the
//! super-frames on with segmentation offload.

use std::net::{IpAddr, Ipv4Addr};

use testbeds::netns::missing_privileges;
use testbeds::probe::{checksum_errors, ping, tcp_transfer, udp_datagrams};
use testbeds::switch_bed::{KernelHost, SwitchHost, Underlay};

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, 0, last)
}

/// Neither endpoint counted a TCP or UDP checksum error.
fn no_checksum_errors(
    switch_endpoint: &testbeds::netns::Netns,
    kernel_endpoint: &testbeds::netns::Netns,
) {
    for (who, ns) in [
        ("switch endpoint", switch_endpoint),
        ("kernel endpoint", kernel_endpoint),
    ] {
        assert_eq!(
            checksum_errors(ns).unwrap(),
            (0, 0),
            "{who}: (TCP, UDP) checksum errors"
        );
    }
}

fn both_ways(ipv6: bool) {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    let mut ul = Underlay::new().unwrap();
    let sw = SwitchHost::with_underlays(&mut ul, 1, ipv6).unwrap();
    let kernel = KernelHost::with_family(&mut ul, 9, 100, &[sw.ip], ip(9), ipv6).unwrap();
    sw.tenant("a", 100, &[kernel.ip]).unwrap();
    let ep = sw
        .endpoint("a", "tapa1", ip(1), "02:00:00:00:a0:01")
        .unwrap();
    let r = ping(&ep, ip(9).into(), 2, 56).unwrap();
    assert_eq!(r.received, r.sent, "{r:?}");
    let to_switch: IpAddr = ip(1).into();
    let to_kernel: IpAddr = ip(9).into();
    // TCP both ways (bulk: the kernel side sends super-frames).
    let t = tcp_transfer(&kernel.endpoint, &ep, to_switch, 5001, 8 << 20).unwrap();
    assert!(t.intact(), "kernel -> switch: {t:?}");
    let t = tcp_transfer(&ep, &kernel.endpoint, to_kernel, 5002, 8 << 20).unwrap();
    assert!(t.intact(), "switch -> kernel: {t:?}");
    // UDP both ways: datagrams that fit the MTU, and ones the endpoints fragment.
    for size in [1000, 3000] {
        let n = udp_datagrams(&kernel.endpoint, &ep, to_switch, 6001, 100, size).unwrap();
        assert_eq!(n, 100, "kernel -> switch, {size} bytes: {n} of 100 arrived");
        let n = udp_datagrams(&ep, &kernel.endpoint, to_kernel, 6002, 100, size).unwrap();
        assert_eq!(n, 100, "switch -> kernel, {size} bytes: {n} of 100 arrived");
    }
    no_checksum_errors(&ep, &kernel.endpoint);
    let (counters, tenant) = sw
        .datapath
        .call(|dp| {
            (
                dp.counters(),
                dp.switch().tenant("a").map(|t| *t.counters()),
            )
        })
        .unwrap();
    assert_eq!(counters.uplink_invalid, 0, "{counters:?}");
    // The kernel peer's bulk TCP came as super-frames (what its default offloads do).
    assert!(counters.uplink_super_frames > 0, "{counters:?}");
    eprintln!("{counters:?}");
    let drops = tenant.unwrap().drops;
    assert_eq!(drops.get(vswitch::DropReason::Oversize), 0, "{drops:?}");
}

#[test]
fn a_kernel_peer_with_default_offloads_over_an_ipv4_underlay() {
    both_ways(false);
}

#[test]
fn a_kernel_peer_with_default_offloads_over_an_ipv6_underlay() {
    both_ways(true);
}

#[test]
fn one_switch_talks_to_kernel_peers_on_4789_and_on_8472() {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    let mut ul = Underlay::new().unwrap();
    let sw = SwitchHost::new(&mut ul, 1).unwrap();
    // Two kernel VTEPs of one tenant: one on the IANA port, one on Linux's old default.
    let k8 = KernelHost::new(&mut ul, 8, 100, &[sw.ip], ip(8)).unwrap();
    let k9 = KernelHost::with_ports(
        &mut ul,
        9,
        100,
        &[(sw.ip, overlay_net::VXLAN_PORT)],
        ip(9),
        false,
        8472,
    )
    .unwrap();
    sw.tenant("a", 100, &[k8.ip, k9.ip]).unwrap();
    let (tenant, k9_ip) = ("a".to_owned(), k9.ip);
    sw.datapath
        .call(move |dp| dp.set_vtep_port(&tenant, k9_ip, Some(8472)))
        .unwrap()
        .unwrap();
    let ep = sw
        .endpoint("a", "tapa1", ip(1), "02:00:00:00:a0:01")
        .unwrap();
    for (who, peer) in [("4789", ip(8)), ("8472", ip(9))] {
        let r = ping(&ep, peer.into(), 2, 56).unwrap();
        assert_eq!(r.received, r.sent, "peer on {who}: {r:?}");
    }
    let t = tcp_transfer(&ep, &k9.endpoint, ip(9).into(), 5003, 2 << 20).unwrap();
    assert!(t.intact(), "switch -> kernel on 8472: {t:?}");
    let t = tcp_transfer(&k9.endpoint, &ep, ip(1).into(), 5004, 2 << 20).unwrap();
    assert!(t.intact(), "kernel on 8472 -> switch: {t:?}");
}

/// RFC 6935/6936: a switch and a Linux vxlan peer that both send zero outer UDP checksums over
/// IPv6 (`udp6zerocsumtx`) and accept them (`udp6zerocsumrx`) carry pings and bulk TCP both
/// ways, and every datagram either sends has a zero checksum on the wire; a switch that does
/// not accept zero checksums (the default, as in Linux) hears nothing from that peer.
#[test]
fn zero_udp6_checksums_with_a_kernel_peer() {
    use testbeds::switch_bed::ChecksumWatch;
    use vswitch::uplink::Udp6ZeroChecksum;
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    let mut ul = Underlay::new().unwrap();
    let zero = Udp6ZeroChecksum { tx: true, rx: true };
    let sw = SwitchHost::with_checksums(&mut ul, 1, true, 0, zero).unwrap();
    let strict = SwitchHost::with_underlays(&mut ul, 2, true).unwrap();
    let port = overlay_net::VXLAN_PORT;
    let kernel = KernelHost::with_vxlan_options(
        &mut ul,
        9,
        100,
        &[(sw.ip, port), (strict.ip, port)],
        ip(9),
        true,
        port,
        &["udp6zerocsumtx", "udp6zerocsumrx"],
    )
    .unwrap();
    sw.tenant("a", 100, &[kernel.ip]).unwrap();
    strict.tenant("a", 100, &[kernel.ip]).unwrap();
    let ep = sw
        .endpoint("a", "tapa1", ip(1), "02:00:00:00:a0:01")
        .unwrap();
    let strict_ep = strict
        .endpoint("a", "tapa2", ip(2), "02:00:00:00:a0:02")
        .unwrap();
    let watch = ChecksumWatch::start(&ul).unwrap();

    let r = ping(&ep, ip(9).into(), 3, 56).unwrap();
    assert_eq!(r.received, r.sent, "{r:?}");
    let r = ping(&kernel.endpoint, ip(1).into(), 3, 1000).unwrap();
    assert_eq!(r.received, r.sent, "{r:?}");
    let t = tcp_transfer(&kernel.endpoint, &ep, ip(1).into(), 5011, 4 << 20).unwrap();
    assert!(t.intact(), "kernel -> switch: {t:?}");
    let t = tcp_transfer(&ep, &kernel.endpoint, ip(9).into(), 5012, 4 << 20).unwrap();
    assert!(t.intact(), "switch -> kernel: {t:?}");
    // The strict switch's datagrams reach the peer (they carry checksums), the peer's answers
    // do not reach it.
    let r = ping(&strict_ep, ip(9).into(), 2, 56).unwrap();
    assert_eq!(
        r.received, 0,
        "zero-checksum datagrams were accepted: {r:?}"
    );

    let counts = watch.finish().unwrap();
    eprintln!("(zero, non-zero) checksums per sender: {counts:?}");
    let of = |ip: IpAddr| counts.get(&ip).copied().unwrap_or_default();
    let (zero_sw, other_sw) = of(sw.ip);
    assert!(zero_sw > 0 && other_sw == 0, "switch: {:?}", of(sw.ip));
    let (zero_k, other_k) = of(kernel.ip);
    assert!(zero_k > 0 && other_k == 0, "kernel: {:?}", of(kernel.ip));
    let (zero_s, other_s) = of(strict.ip);
    assert!(
        zero_s == 0 && other_s > 0,
        "strict switch: {:?}",
        of(strict.ip)
    );
    no_checksum_errors(&ep, &kernel.endpoint);
    let counters = sw.datapath.call(|dp| dp.counters()).unwrap();
    assert_eq!(counters.uplink_invalid, 0, "{counters:?}");
}
