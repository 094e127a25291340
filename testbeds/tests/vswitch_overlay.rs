//! The vswitch datapath between network-namespace hosts over a VXLAN underlay, as root:
//! tenant endpoints on TAP ports reach each other across hosts, reach a Linux-kernel VXLAN
//! host, and tenants with identical addresses stay apart.

use std::net::{IpAddr, Ipv4Addr};

use testbeds::netns::missing_privileges;
use testbeds::probe::{ping, tcp_transfer};
use testbeds::switch_bed::{KernelHost, SwitchHost, Underlay};

fn skip() -> bool {
    if let Some(why) = missing_privileges() {
        eprintln!("SKIPPED vswitch overlay test: {why}");
        return true;
    }
    false
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, 0, last)
}

#[test]
fn one_tenant_on_three_switch_hosts_and_a_kernel_vxlan_host() {
    if skip() {
        return;
    }
    let mut ul = Underlay::new().unwrap();
    let hosts: Vec<SwitchHost> = (1..=3)
        .map(|n| SwitchHost::new(&mut ul, n).unwrap())
        .collect();
    let all: Vec<IpAddr> = vec![
        hosts[0].ip,
        hosts[1].ip,
        hosts[2].ip,
        Ipv4Addr::new(198, 18, 0, 9).into(),
    ];
    let kernel = KernelHost::new(&mut ul, 9, 100, &all[..3], ip(9)).unwrap();
    let mut endpoints = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let peers: Vec<IpAddr> = all.iter().copied().filter(|p| *p != h.ip).collect();
        h.tenant("a", 100, &peers).unwrap();
        let n = i as u8 + 1;
        let ep = h
            .endpoint(
                "a",
                &format!("tapa{n}"),
                ip(n),
                &format!("02:00:00:00:a0:0{n}"),
            )
            .unwrap();
        endpoints.push((ep, ip(n)));
    }
    // Every switch endpoint pings every other endpoint, the kernel one included.
    let targets: Vec<Ipv4Addr> = vec![ip(1), ip(2), ip(3), ip(9)];
    for (ep, own) in &endpoints {
        for t in targets.iter().filter(|t| *t != own) {
            let r = ping(ep, (*t).into(), 2, 56).unwrap();
            assert_eq!(r.received, r.sent, "{own} -> {t}: {r:?}");
        }
    }
    // And the kernel endpoint pings them back, with full-MTU packets (1450 - 28).
    for (_, addr) in &endpoints {
        let r = ping(&kernel.endpoint, (*addr).into(), 2, 1422).unwrap();
        assert_eq!(r.received, r.sent, "kernel -> {addr}: {r:?}");
    }
    // TCP across the overlay, switch to switch and kernel to switch.
    let t = tcp_transfer(
        &endpoints[0].0,
        &endpoints[2].0,
        ip(3).into(),
        5001,
        4 << 20,
    )
    .unwrap();
    assert!(t.intact(), "{t:?}");
    let t = tcp_transfer(
        &kernel.endpoint,
        &endpoints[1].0,
        ip(2).into(),
        5002,
        4 << 20,
    )
    .unwrap();
    assert!(t.intact(), "{t:?}");
    // A frame above the tenant MTU never leaves the endpoint (DF set, MTU 1450 on eth0)...
    let r = ping(&endpoints[0].0, ip(2).into(), 1, 1423).unwrap();
    assert_eq!(r.received, 0);
    // ...and nothing was dropped for the underlay MTU or counted invalid.
    let (counters, drops) = hosts[0]
        .datapath
        .call(|dp| {
            let t = dp.switch().tenant("a").map(|t| *t.counters());
            (dp.counters(), t)
        })
        .unwrap();
    assert_eq!(counters.uplink_invalid, 0, "{counters:?}");
    let drops = drops.unwrap().drops;
    assert_eq!(drops.get(vswitch::DropReason::UnderlayMtu), 0);
}

#[test]
fn tenants_with_identical_addresses_stay_apart() {
    if skip() {
        return;
    }
    let mut ul = Underlay::new().unwrap();
    let h1 = SwitchHost::new(&mut ul, 1).unwrap();
    let h2 = SwitchHost::new(&mut ul, 2).unwrap();
    for (h, peer) in [(&h1, h2.ip), (&h2, h1.ip)] {
        h.tenant("a", 100, &[peer]).unwrap();
        h.tenant("b", 200, &[peer]).unwrap();
    }
    // Same IPs and same MACs in both tenants.
    let a1 = h1
        .endpoint("a", "tapa1", ip(1), "02:00:00:00:00:01")
        .unwrap();
    let a2 = h2
        .endpoint("a", "tapa2", ip(2), "02:00:00:00:00:02")
        .unwrap();
    let b1 = h1
        .endpoint("b", "tapb1", ip(1), "02:00:00:00:00:01")
        .unwrap();
    let b2 = h2
        .endpoint("b", "tapb2", ip(2), "02:00:00:00:00:02")
        .unwrap();
    let tx_of = |h: &SwitchHost, tenant: &'static str| {
        h.datapath
            .call(move |dp| {
                let t = dp.switch().tenant(tenant).unwrap();
                (
                    t.counters().rx_packets,
                    t.ports()
                        .map(|(id, _)| t.port(id).unwrap().1.tx_packets)
                        .sum::<u64>(),
                )
            })
            .unwrap()
    };
    // What tenant b's interfaces received, as their kernels count it (a capture would see
    // the same frames).
    let seen = |ep: &testbeds::netns::Netns| {
        ep.exec("cat", &["/sys/class/net/eth0/statistics/rx_packets"])
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    // Traffic in tenant a only: tenant b's ports and interfaces receive nothing.
    let b_before = (tx_of(&h1, "b"), tx_of(&h2, "b"));
    let b_seen = (seen(&b1), seen(&b2));
    let r = ping(&a1, ip(2).into(), 5, 56).unwrap();
    assert_eq!(r.received, r.sent);
    let t = tcp_transfer(&a2, &a1, ip(1).into(), 5003, 1 << 20).unwrap();
    assert!(t.intact(), "{t:?}");
    assert_eq!(
        (tx_of(&h1, "b"), tx_of(&h2, "b")),
        b_before,
        "frames of tenant a reached tenant b"
    );
    assert_eq!(
        (seen(&b1), seen(&b2)),
        b_seen,
        "tenant b's interfaces received frames"
    );
    // And the other way round.
    let a_before = (tx_of(&h1, "a"), tx_of(&h2, "a"));
    let r = ping(&b2, ip(1).into(), 5, 56).unwrap();
    assert_eq!(r.received, r.sent);
    assert_eq!(
        (tx_of(&h1, "a"), tx_of(&h2, "a")),
        a_before,
        "frames of tenant b reached tenant a"
    );
}

#[test]
fn port_security_rate_limit_and_mtu_hold() {
    use std::time::Duration;
    use testbeds::probe::udp_rate;
    use vswitch::{DropReason, PortConfig, PortSecurity, RateLimit};
    if skip() {
        return;
    }
    let mut ul = Underlay::new().unwrap();
    let h1 = SwitchHost::new(&mut ul, 1).unwrap();
    let h2 = SwitchHost::new(&mut ul, 2).unwrap();
    h1.tenant("a", 100, &[h2.ip]).unwrap();
    h2.tenant("a", 100, &[h1.ip]).unwrap();
    let mac1 = "02:00:00:00:00:01";
    let mut secure = PortConfig::new("tapa1");
    secure.security = Some(PortSecurity {
        mac: mac1.parse().unwrap(),
        ips: vec![ip(1).into()],
    });
    let a1 = h1.endpoint_with("a", secure, ip(1), mac1).unwrap();
    const LIMIT: u64 = 20_000_000;
    let mut limited = PortConfig::new("tapa2");
    limited.rate_limit = RateLimit {
        bits_per_sec: Some(LIMIT),
        ..Default::default()
    };
    let a2 = h2
        .endpoint_with("a", limited, ip(2), "02:00:00:00:00:02")
        .unwrap();
    let a3 = h2
        .endpoint("a", "tapa3", ip(3), "02:00:00:00:00:03")
        .unwrap();
    let port_drops = |h: &SwitchHost, port: &'static str, reason: DropReason| {
        h.datapath
            .call(move |dp| {
                let sw = dp.switch();
                let id = sw.port_id(port).unwrap();
                sw.port_tenant(id)
                    .unwrap()
                    .port(id)
                    .unwrap()
                    .1
                    .drops
                    .get(reason)
            })
            .unwrap()
    };

    // The secured endpoint works as itself...
    assert_eq!(ping(&a1, ip(3).into(), 2, 56).unwrap().received, 2);
    // ...reaches no one with another IP...
    a1.ip(&["addr", "flush", "dev", "eth0"]).unwrap();
    a1.ip(&["addr", "add", "10.100.0.50/24", "dev", "eth0"])
        .unwrap();
    assert_eq!(ping(&a1, ip(3).into(), 1, 56).unwrap().received, 0);
    assert!(port_drops(&h1, "tapa1", DropReason::SpoofedIp) > 0);
    // ...or with another MAC.
    a1.ip(&["addr", "flush", "dev", "eth0"]).unwrap();
    a1.ip(&["addr", "add", "10.100.0.1/24", "dev", "eth0"])
        .unwrap();
    a1.ip(&["link", "set", "eth0", "address", "02:00:00:00:00:66"])
        .unwrap();
    assert_eq!(ping(&a1, ip(3).into(), 1, 56).unwrap().received, 0);
    assert!(port_drops(&h1, "tapa1", DropReason::SpoofedMac) > 0);

    // The limited port: offer 3x its limit for 2 s; what arrives stays within 10 % of it.
    let got = udp_rate(
        &a2,
        &a3,
        ip(3).into(),
        6000,
        1000,
        3 * LIMIT,
        Duration::from_secs(2),
    )
    .unwrap();
    let ratio = got / LIMIT as f64;
    eprintln!(
        "rate-limited port: {:.1} Mbit/s arrived for a {} Mbit/s limit ({ratio:.3}x)",
        got / 1e6,
        LIMIT / 1_000_000
    );
    assert!((0.9..=1.1).contains(&ratio), "{ratio}");
    assert!(port_drops(&h2, "tapa2", DropReason::RateLimited) > 0);

    // MTU: a frame above the tenant MTU (1450) is dropped and counted, never fragmented.
    a3.ip(&["link", "set", "eth0", "mtu", "1500"]).unwrap();
    // (to a2, which a3 has resolved: a1 answers nobody since its MAC changed)
    assert_eq!(ping(&a3, ip(2).into(), 1, 1422).unwrap().received, 1);
    let r = ping(&a3, ip(2).into(), 1, 1472).unwrap();
    assert_eq!((r.sent, r.received), (1, 0));
    assert!(port_drops(&h2, "tapa3", DropReason::Oversize) > 0);
}

#[test]
fn ipv6_underlay_and_garbage_on_the_vxlan_port() {
    use std::net::{SocketAddr, UdpSocket};
    if skip() {
        return;
    }
    let mut ul = Underlay::new().unwrap();
    let h1 = SwitchHost::with_underlays(&mut ul, 1, true).unwrap();
    let h2 = SwitchHost::with_underlays(&mut ul, 2, true).unwrap();
    assert!(h1.ip.is_ipv6());
    h1.tenant("a", 100, &[h2.ip]).unwrap();
    h2.tenant("a", 100, &[h1.ip]).unwrap();
    let a1 = h1
        .endpoint("a", "tapa1", ip(1), "02:00:00:00:00:01")
        .unwrap();
    let a2 = h2
        .endpoint("a", "tapa2", ip(2), "02:00:00:00:00:02")
        .unwrap();
    // The tenant MTU over IPv6 is 1500 - 70; a packet that fills it crosses.
    let link = a1.ip(&["-o", "link", "show", "eth0"]).unwrap();
    assert!(link.contains("mtu 1430"), "{link}");
    let r = ping(&a1, ip(2).into(), 3, 1430 - 28).unwrap();
    assert_eq!(r.received, r.sent, "{r:?}");
    let t = tcp_transfer(&a2, &a1, ip(1).into(), 5004, 2 << 20).unwrap();
    assert!(t.intact(), "{t:?}");

    // Garbage, truncated and unknown-VNI datagrams on the VXLAN port are counted and dropped;
    // the datapath keeps forwarding.
    let target = SocketAddr::new(h1.ip, 4789);
    let junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 7],
        vec![0x00; 64],                                          // I flag clear
        [&[0x08, 0, 0, 0, 0, 0, 1][..], &[0u8; 3][..]].concat(), // truncated inner frame
        [&[0x08, 0, 0, 0, 0x0f, 0x42, 0x40, 0][..], &[0x02; 60][..]].concat(), // VNI 1000000
    ];
    h2.ns
        .enter(move || {
            let s = UdpSocket::bind("[::]:0").map_err(|e| testbeds::Error::Io("bind".into(), e))?;
            for j in &junk {
                s.send_to(j, target)
                    .map_err(|e| testbeds::Error::Io("send".into(), e))?;
            }
            Ok(())
        })
        .unwrap();
    // Wait until the datapath has counted them (then check nothing else was counted).
    let counts = || {
        h1.datapath
            .call(|dp| {
                (
                    dp.counters().uplink_invalid,
                    dp.switch().unknown_vni_drops(),
                )
            })
            .unwrap()
    };
    let _ = testbeds::wait::until("the junk to be counted", testbeds::wait::SOON, || {
        counts() == (4, 1)
    });
    let (invalid, unknown) = counts();
    assert_eq!((invalid, unknown), (4, 1));
    let r = ping(&a1, ip(2).into(), 2, 56).unwrap();
    assert_eq!(r.received, r.sent);
}

#[test]
fn several_workers_share_one_switch() {
    if skip() {
        return;
    }
    let mut ul = Underlay::new().unwrap();
    let h1 = SwitchHost::with_options(&mut ul, 1, false, 3).unwrap();
    let h2 = SwitchHost::with_options(&mut ul, 2, false, 2).unwrap();
    h1.tenant("a", 100, &[h2.ip]).unwrap();
    h2.tenant("a", 100, &[h1.ip]).unwrap();
    let local: Vec<_> = (1..=3)
        .map(|n| {
            let ep = h1
                .endpoint(
                    "a",
                    &format!("tapw{n}"),
                    ip(n),
                    &format!("02:00:00:00:b0:0{n}"),
                )
                .unwrap();
            (ep, ip(n))
        })
        .collect();
    let remote = h2
        .endpoint("a", "tapw9", ip(9), "02:00:00:00:b0:09")
        .unwrap();
    // The three ports of host 1 are read by three different workers.
    let mut workers = h1
        .datapath
        .call(|dp| {
            let w: Vec<_> = (1..=3)
                .map(|n| dp.port_worker(&format!("tapw{n}")))
                .collect();
            (dp.workers(), w)
        })
        .unwrap();
    assert_eq!(workers.0, 3);
    workers.1.sort();
    assert_eq!(workers.1, vec![Some(0), Some(1), Some(2)]);
    // Every pair reaches each other: frames cross workers inside host 1 and over VXLAN.
    let mut all: Vec<(&testbeds::netns::Netns, Ipv4Addr)> =
        local.iter().map(|(e, a)| (e, *a)).collect();
    all.push((&remote, ip(9)));
    for (ep, own) in &all {
        for (_, t) in all.iter().filter(|(_, t)| t != own) {
            let r = ping(ep, (*t).into(), 2, 56).unwrap();
            assert_eq!(r.received, r.sent, "{own} -> {t}: {r:?}");
        }
    }
    // TCP with offloads between workers of one host (super-frames pass as they are) and
    // across hosts (segmented on the way out, coalesced on the way in).
    let t = tcp_transfer(&local[0].0, &local[1].0, ip(2).into(), 5101, 8 << 20).unwrap();
    assert!(t.intact(), "{t:?}");
    let t = tcp_transfer(&local[2].0, &remote, ip(9).into(), 5102, 8 << 20).unwrap();
    assert!(t.intact(), "{t:?}");
    let t = tcp_transfer(&remote, &local[0].0, ip(1).into(), 5103, 8 << 20).unwrap();
    assert!(t.intact(), "{t:?}");
    // Both workers counted into the one switch: port 1 received frames, port 2 was sent some.
    let (tx, rx) = h1
        .datapath
        .call(|dp| {
            let sw = dp.switch();
            let t = sw.tenant("a").unwrap();
            let p = |n: &str| *t.port(sw.port_id(n).unwrap()).unwrap().1;
            (p("tapw1"), p("tapw2"))
        })
        .unwrap();
    assert!(tx.rx_packets > 0 && rx.tx_packets > 0, "{tx:?} {rx:?}");

    // A second datapath on host 1's address is refused instead of sharing its traffic.
    let name = h1.ns.name().to_owned();
    let second = vswitch::datapath::DatapathWorkers::spawn(
        vswitch::datapath::DatapathConfig {
            underlay: vec![h1.ip],
            underlay_mtu: 1500,
            udp_port: overlay_net::VXLAN_PORT,
            workers: 2,
            udp6_zero_checksum: Default::default(),
            uplink_io: Default::default(),
        },
        move || {
            testbeds::netns::enter_current_thread(&name).map_err(|e| {
                vswitch::Error::Io("enter".into(), std::io::Error::other(e.to_string()))
            })
        },
    );
    let err = second.expect_err("a second switch bound the same VXLAN port");
    assert!(err.to_string().contains("bind"), "{err}");
    let r = ping(&local[0].0, ip(9).into(), 1, 56).unwrap();
    assert_eq!(
        r.received, 1,
        "host 1 still forwards after the refused start"
    );
}

#[test]
fn a_tenants_flows_leave_from_many_source_ports() {
    if skip() {
        return;
    }
    let mut ul = Underlay::new().unwrap();
    let h1 = SwitchHost::new(&mut ul, 1).unwrap();
    let h2 = SwitchHost::new(&mut ul, 2).unwrap();
    h1.tenant("a", 100, &[h2.ip]).unwrap();
    h2.tenant("a", 100, &[h1.ip]).unwrap();
    let e1 = h1
        .endpoint("a", "tapa1", ip(1), "02:00:00:00:a0:01")
        .unwrap();
    let e2 = h2
        .endpoint("a", "tapa2", ip(2), "02:00:00:00:a0:02")
        .unwrap();
    let r = ping(&e1, ip(2).into(), 1, 56).unwrap();
    assert_eq!(r.received, r.sent, "{r:?}");
    // Eight TCP flows (each its own client port): RFC 7348 §5 wants the outer source port
    // from a hash of the inner flow, so that ECMP and RSS spread them.
    let watch = testbeds::switch_bed::SourcePortWatch::start(&ul).unwrap();
    for k in 0..8 {
        let t = tcp_transfer(&e1, &e2, ip(2).into(), 5100 + k, 256 << 10).unwrap();
        assert!(t.intact(), "{t:?}");
    }
    let ports = watch.finish().unwrap();
    assert!(
        !ports.contains(&overlay_net::VXLAN_PORT),
        "datagrams left from the VXLAN port itself: {ports:?}"
    );
    assert!(
        ports.len() >= 3,
        "eight flows (both ways) used {} source ports: {ports:?}",
        ports.len()
    );
}
