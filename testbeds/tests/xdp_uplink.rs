//! The AF_XDP uplink between network-namespace hosts (veths into a bridge, native XDP on
//! each host's `eth0`): tenants reach each other across hosts through it, with switch and
//! Linux-kernel VXLAN peers on IPv4 and IPv6 underlays; the kernel keeps everything else the
//! host receives; garbage on the VXLAN port is counted; the program goes with the datapath.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};

use testbeds::netns::{Netns, missing_privileges};
use testbeds::probe::{ping, tcp_transfer};
use testbeds::switch_bed::{KernelHost, SwitchHost, Underlay};
use testbeds::wait;
use vswitch::datapath::DatapathCounters;
use vswitch::uplink::UplinkIo;

fn skip() -> bool {
    if let Some(why) = missing_privileges() {
        eprintln!("SKIPPED AF_XDP uplink test: {why}");
        return true;
    }
    false
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, 0, last)
}

fn xdp_host(ul: &mut Underlay, n: u8, ipv6: bool) -> SwitchHost {
    let h = SwitchHost::with_uplink(ul, n, ipv6, 1, Default::default(), UplinkIo::Xdp).unwrap();
    let paths = h.datapath.uplink_paths().join("; ");
    assert!(paths.contains("AF_XDP on eth0 queue 0"), "{paths}");
    h
}

fn counters(h: &SwitchHost) -> DatapathCounters {
    h.datapath.call(|dp| dp.counters()).unwrap()
}

/// Tenant `a` (VNI 100) on both hosts, with an endpoint on each: 10.100.0.1 on `h1`,
/// 10.100.0.2 on `h2`.
fn tenant_across(h1: &SwitchHost, h2: &SwitchHost) -> (Netns, Netns) {
    h1.tenant("a", 100, &[h2.ip]).unwrap();
    h2.tenant("a", 100, &[h1.ip]).unwrap();
    let a1 = h1
        .endpoint("a", "tapa1", ip(1), "02:00:00:00:00:01")
        .unwrap();
    let a2 = h2
        .endpoint("a", "tapa2", ip(2), "02:00:00:00:00:02")
        .unwrap();
    (a1, a2)
}

fn attached(ns: &Netns) -> bool {
    ns.ip(&["-d", "link", "show", "eth0"])
        .unwrap()
        .contains("prog/xdp")
}

fn two_switch_hosts(ipv6: bool) {
    let mut ul = Underlay::new().unwrap();
    let h1 = xdp_host(&mut ul, 1, ipv6);
    let h2 = xdp_host(&mut ul, 2, ipv6);
    let (a1, a2) = tenant_across(&h1, &h2);
    // Full-size frames of the tenant MTU cross (1450 over IPv4, 1430 over IPv6).
    let most = if ipv6 { 1430 - 28 } else { 1450 - 28 };
    let r = ping(&a1, ip(2).into(), 3, most).unwrap();
    assert_eq!(r.received, r.sent, "{r:?}");
    let t = tcp_transfer(&a1, &a2, ip(2).into(), 5001, 4 << 20).unwrap();
    assert!(t.intact(), "{t:?}");
    let t = tcp_transfer(&a2, &a1, ip(1).into(), 5002, 4 << 20).unwrap();
    assert!(t.intact(), "{t:?}");
    for h in [&h1, &h2] {
        let c = counters(h);
        // 4 MiB each way is ~2900 full frames: nearly all of them went through AF_XDP (the
        // first ones may go through the socket while the kernel resolves the neighbour).
        assert!(
            c.uplink_xdp_received > 2000 && c.uplink_xdp_sent > 2000,
            "{c:?}"
        );
        assert_eq!(c.uplink_invalid, 0, "{c:?}");
    }

    // The kernel keeps what is not this switch's VXLAN: the hosts ping each other's underlay
    // address, and a UDP datagram to another port of h1 reaches a socket there.
    let (h1_ip, h2_ip) = (h1.ip, h2.ip);
    let pinged = h2
        .ns
        .exec("ping", &["-c", "2", "-W", "5", &h1_ip.to_string()]);
    assert!(pinged.is_ok(), "{pinged:?}");
    let listener = h1
        .ns
        .enter(move || {
            let s = UdpSocket::bind(SocketAddr::new(h1_ip, 4790))
                .map_err(|e| testbeds::Error::Io("bind".into(), e))?;
            s.set_read_timeout(Some(wait::SOON))
                .map_err(|e| testbeds::Error::Io("timeout".into(), e))?;
            Ok(s)
        })
        .unwrap();
    h2.ns
        .enter(move || {
            let bind: SocketAddr = if h2_ip.is_ipv6() {
                "[::]:0".parse().unwrap()
            } else {
                "0.0.0.0:0".parse().unwrap()
            };
            let s = UdpSocket::bind(bind).map_err(|e| testbeds::Error::Io("bind".into(), e))?;
            s.send_to(b"not vxlan", SocketAddr::new(h1_ip, 4790))
                .map_err(|e| testbeds::Error::Io("send".into(), e))?;
            Ok(())
        })
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = listener
        .recv_from(&mut buf)
        .expect("the kernel delivered it");
    assert_eq!(&buf[..n], b"not vxlan");

    // Garbage on the VXLAN port comes through AF_XDP and is counted, not forwarded.
    let invalid_before = counters(&h1).uplink_invalid;
    let target = SocketAddr::new(h1_ip, 4789);
    h2.ns
        .enter(move || {
            let bind: SocketAddr = if target.is_ipv6() {
                "[::]:0".parse().unwrap()
            } else {
                "0.0.0.0:0".parse().unwrap()
            };
            let s = UdpSocket::bind(bind).map_err(|e| testbeds::Error::Io("bind".into(), e))?;
            for junk in [&[][..], &[0xff; 7][..], &[0u8; 64][..]] {
                s.send_to(junk, target)
                    .map_err(|e| testbeds::Error::Io("send".into(), e))?;
            }
            Ok(())
        })
        .unwrap();
    let counted = wait::until("the junk to be counted", wait::SOON, || {
        counters(&h1).uplink_invalid == invalid_before + 3
    });
    assert!(counted.is_ok(), "{:?}", counters(&h1));
    let r = ping(&a1, ip(2).into(), 2, 56).unwrap();
    assert_eq!(r.received, r.sent, "{r:?}");

    // The program is attached while the datapath runs and goes with it.
    assert!(attached(&h1.ns));
    let SwitchHost { datapath, ns, .. } = h1;
    drop(datapath);
    assert!(!attached(&ns), "the XDP program outlived the datapath");
}

#[test]
fn two_switch_hosts_over_af_xdp_on_ipv4() {
    if skip() {
        return;
    }
    two_switch_hosts(false);
}

#[test]
fn two_switch_hosts_over_af_xdp_on_ipv6() {
    if skip() {
        return;
    }
    two_switch_hosts(true);
}

/// A Linux vxlan peer with its default offloads: over IPv6 its datagrams reach the veth with
/// their UDP checksum left to offload, which XDP cannot see and the switch accepts as such.
fn kernel_peer(ipv6: bool) {
    let mut ul = Underlay::new().unwrap();
    let sw = xdp_host(&mut ul, 1, ipv6);
    let k_ip: IpAddr = if ipv6 {
        "fd00:18::9".parse().unwrap()
    } else {
        Ipv4Addr::new(198, 18, 0, 9).into()
    };
    let k = KernelHost::with_family(&mut ul, 9, 100, &[sw.ip], ip(9), ipv6).unwrap();
    assert_eq!(k.ip, k_ip);
    sw.tenant("a", 100, &[k.ip]).unwrap();
    let ep = sw
        .endpoint("a", "tapa1", ip(1), "02:00:00:00:a0:01")
        .unwrap();
    let r = ping(&ep, ip(9).into(), 3, 56).unwrap();
    assert_eq!(r.received, r.sent, "{r:?}");
    let t = tcp_transfer(&ep, &k.endpoint, ip(9).into(), 5003, 4 << 20).unwrap();
    assert!(t.intact(), "switch -> kernel: {t:?}");
    let t = tcp_transfer(&k.endpoint, &ep, ip(1).into(), 5004, 4 << 20).unwrap();
    assert!(t.intact(), "kernel -> switch: {t:?}");
    let c = counters(&sw);
    assert!(
        c.uplink_xdp_received > 2000 && c.uplink_xdp_sent > 2000,
        "{c:?}"
    );
    assert_eq!(c.uplink_invalid, 0, "{c:?}");
}

#[test]
fn a_kernel_peer_over_af_xdp_on_ipv4() {
    if skip() {
        return;
    }
    kernel_peer(false);
}

#[test]
fn a_kernel_peer_over_af_xdp_on_ipv6() {
    if skip() {
        return;
    }
    kernel_peer(true);
}

/// `auto` takes AF_XDP only where the driver runs it zero-copy: on a veth (copy mode) the
/// socket path stays, and the reason is given; `xdp` where AF_XDP cannot run at all (an
/// underlay address on the loopback, not Ethernet) refuses to start and says why.
#[test]
fn auto_keeps_the_socket_where_af_xdp_would_be_slower_and_xdp_says_why_it_cannot_run() {
    if skip() {
        return;
    }
    let mut ul = Underlay::new().unwrap();
    let h1 =
        SwitchHost::with_uplink(&mut ul, 1, false, 1, Default::default(), UplinkIo::Auto).unwrap();
    let h2 = xdp_host(&mut ul, 2, false);
    let paths = h1.datapath.uplink_paths().join("; ");
    assert!(
        paths.contains("UDP socket (AF_XDP does not run: ")
            && paths.contains("eth0's driver runs AF_XDP in copy mode only"),
        "{paths}"
    );
    assert!(!attached(&h1.ns), "auto left a program attached");
    let (a1, a2) = tenant_across(&h1, &h2);
    // A socket host and an AF_XDP host talk.
    let t = tcp_transfer(&a1, &a2, ip(2).into(), 5005, 2 << 20).unwrap();
    assert!(t.intact(), "{t:?}");
    let t = tcp_transfer(&a2, &a1, ip(1).into(), 5006, 2 << 20).unwrap();
    assert!(t.intact(), "{t:?}");
    assert_eq!(counters(&h1).uplink_xdp_sent, 0);
    assert!(counters(&h2).uplink_xdp_received > 1000);

    let lo = Netns::create("xdp-lo").unwrap();
    lo.ip(&["link", "set", "lo", "up"]).unwrap();
    let spawn = |io: UplinkIo| {
        let name = lo.name().to_owned();
        vswitch::datapath::DatapathWorkers::spawn(
            vswitch::datapath::DatapathConfig {
                underlay: vec![Ipv4Addr::LOCALHOST.into()],
                underlay_mtu: 1500,
                udp_port: overlay_net::VXLAN_PORT,
                workers: 1,
                udp6_zero_checksum: Default::default(),
                uplink_io: io,
            },
            move || {
                testbeds::netns::enter_current_thread(&name).map_err(|e| {
                    vswitch::Error::Io("enter".into(), std::io::Error::other(e.to_string()))
                })
            },
        )
    };
    let refused = spawn(UplinkIo::Xdp).err().map(|e| e.to_string());
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("lo is not an Ethernet interface")),
        "{refused:?}"
    );
    let dp = spawn(UplinkIo::Auto).unwrap();
    let paths = dp.uplink_paths().join("; ");
    assert!(
        paths.contains("UDP socket (AF_XDP does not run: ") && paths.contains("not an Ethernet"),
        "{paths}"
    );
}

/// One AF_XDP socket per datapath worker, each on its own receive queue of a two-queue link,
/// all in the one program worker 0 attached: flows spread over the queues reach both.
#[test]
fn each_worker_has_a_socket_on_its_own_queue() {
    if skip() {
        return;
    }
    let mut ul = Underlay::with_queues(2).unwrap();
    let hosts: Vec<SwitchHost> = (1..=2)
        .map(|n| {
            SwitchHost::with_uplink(&mut ul, n, false, 2, Default::default(), UplinkIo::Xdp)
                .unwrap()
        })
        .collect();
    for h in &hosts {
        let paths = h.datapath.uplink_paths().join("; ");
        assert!(
            paths.contains("worker 0: 198.18.0.") && paths.contains("AF_XDP on eth0 queue 0"),
            "{paths}"
        );
        assert!(paths.contains("AF_XDP on eth0 queue 1"), "{paths}");
    }
    let (h1, h2) = (&hosts[0], &hosts[1]);
    let (a1, a2) = tenant_across(h1, h2);
    // Sixteen flows: the bridge spreads them over h2's two queues by their hash (all on one
    // queue: one time in 32768).
    for port in 5010..5026 {
        let t = tcp_transfer(&a1, &a2, ip(2).into(), port, 384 << 10).unwrap();
        assert!(t.intact(), "{t:?}");
    }
    // 6 MiB from h1 to h2: ~4300 full frames, nearly all through AF_XDP at both ends...
    let (c1, c2) = (counters(h1), counters(h2));
    assert!(c1.uplink_xdp_sent > 3000, "{c1:?}");
    assert!(c2.uplink_xdp_received > 3000, "{c2:?}");
    assert_eq!(c1.uplink_invalid + c2.uplink_invalid, 0, "{c1:?} {c2:?}");
    // ...and both of h2's queues handed frames to their workers' sockets (veth counts the
    // program's redirects per queue).
    let stats = h2.ns.exec("ethtool", &["-S", "eth0"]).unwrap();
    for q in 0..2 {
        let redirected: u64 = stats
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(&format!("rx_queue_{q}_xdp_redirect: "))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0);
        assert!(redirected > 100, "queue {q}: {stats}");
    }
}
