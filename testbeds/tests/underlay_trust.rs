//! The underlay cannot inject into a tenant, over IPv4 and IPv6 underlays: a host on the
//! underlay that is not a VTEP of tenant b, and a VTEP of tenant a only, send VXLAN datagrams
//! with b's VNI — a forged ARP reply (to poison b's endpoint and pull its traffic) and frames
//! with the source MAC of b's other endpoint (to hijack it). Every one is dropped and counted
//! as `unknown_vtep`, b's endpoint keeps the right neighbour and forwarding entries, and its
//! traffic flows. A tenant in "learn VTEPs" mode (flood-and-learn) does hear any host.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use overlay_net::{Destination, MacAddr, TenantLimits};
use testbeds::netns::{Netns, missing_privileges};
use testbeds::probe::ping;
use testbeds::switch_bed::{SwitchHost, Underlay};
use vswitch::{DropReason, TenantConfig};

const B1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xb0, 0x01];
const B2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xb0, 0x02];
const ATTACKER_MAC: [u8; 6] = [0x02, 0xee, 0xee, 0xee, 0xee, 0x01];
const B1_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const B2_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);

fn mac_str(m: [u8; 6]) -> String {
    MacAddr(m).to_string()
}

/// An ARP reply from `sender_mac` saying that `sender_ip` is at `sender_mac`, to b1.
fn arp_reply(sender_mac: [u8; 6], sender_ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&B1_MAC);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&B1_MAC);
    f.extend_from_slice(&B1_IP.octets());
    f.resize(60, 0);
    f
}

/// A VXLAN datagram (RFC 7348) carrying `inner` in `vni`.
fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let v = vni.to_be_bytes();
    let mut d = vec![0x08, 0, 0, 0, v[1], v[2], v[3], 0];
    d.extend_from_slice(inner);
    d
}

/// Sends `datagrams` from `source` (an address of `ns`) to `target`'s VXLAN port.
fn inject(ns: &Netns, source: IpAddr, target: IpAddr, datagrams: Vec<Vec<u8>>) {
    ns.enter(move || {
        let s = UdpSocket::bind(SocketAddr::new(source, 0))
            .map_err(|e| testbeds::Error::Io("bind".into(), e))?;
        for d in &datagrams {
            s.send_to(d, SocketAddr::new(target, overlay_net::VXLAN_PORT))
                .map_err(|e| testbeds::Error::Io("send".into(), e))?;
        }
        Ok(())
    })
    .unwrap();
}

fn drops(h: &SwitchHost, tenant: &'static str, reason: DropReason) -> u64 {
    h.datapath
        .call(move |dp| {
            dp.switch()
                .tenant(tenant)
                .map(|t| t.counters().drops.get(reason))
                .unwrap_or(0)
        })
        .unwrap()
}

/// Where h's tenant `tenant` forwards frames to `mac`.
fn fdb_entry(h: &SwitchHost, tenant: &'static str, mac: [u8; 6]) -> Option<Destination> {
    h.datapath
        .call(move |dp| {
            dp.switch().tenant(tenant).and_then(|t| {
                t.fdb()
                    .entries()
                    .find(|(m, _)| *m == MacAddr(mac))
                    .map(|(_, e)| e.destination)
            })
        })
        .unwrap()
}

/// b1's neighbour entry for b2's address (the MAC it sends b2's traffic to).
fn neighbour(ns: &Netns) -> String {
    ns.ip(&["neigh", "show", &B2_IP.to_string(), "dev", "eth0"])
        .unwrap_or_default()
}

fn attacks_fail(ipv6: bool) {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    let mut ul = Underlay::new().unwrap();
    let h1 = SwitchHost::with_underlays(&mut ul, 1, ipv6).unwrap();
    let h2 = SwitchHost::with_underlays(&mut ul, 2, ipv6).unwrap();
    let h3 = SwitchHost::with_underlays(&mut ul, 3, ipv6).unwrap();
    let attacker = ul.host("atk", Ipv4Addr::new(198, 18, 0, 66)).unwrap();
    let attacker_ip: IpAddr = if ipv6 {
        // (the underlay bed writes the last octet as it is: fd00:18::66)
        "fd00:18::66".parse::<Ipv6Addr>().unwrap().into()
    } else {
        Ipv4Addr::new(198, 18, 0, 66).into()
    };
    // Tenant a spans h1, h2 and h3; tenant b only h1 and h2.
    h1.tenant("a", 100, &[h2.ip, h3.ip]).unwrap();
    h1.tenant("b", 200, &[h2.ip]).unwrap();
    h2.tenant("a", 100, &[h1.ip]).unwrap();
    h2.tenant("b", 200, &[h1.ip]).unwrap();
    h3.tenant("a", 100, &[h1.ip]).unwrap();
    let b1 = h1.endpoint("b", "tapb1", B1_IP, &mac_str(B1_MAC)).unwrap();
    let _b2 = h2.endpoint("b", "tapb2", B2_IP, &mac_str(B2_MAC)).unwrap();
    let r = ping(&b1, B2_IP.into(), 2, 56).unwrap();
    assert_eq!(r.received, r.sent, "b1 -> b2 before: {r:?}");
    assert!(
        neighbour(&b1).contains(&mac_str(B2_MAC)),
        "{}",
        neighbour(&b1)
    );
    assert_eq!(
        fdb_entry(&h1, "b", B2_MAC),
        Some(Destination::Remote(h2.ip))
    );

    // 1. A host that is no VTEP: a forged ARP reply (b2's address at the attacker's MAC)
    //    and frames with b2's source MAC (to move b2's entry to the attacker).
    let poison = vxlan(200, &arp_reply(ATTACKER_MAC, B2_IP));
    let hijack = vxlan(200, &arp_reply(B2_MAC, Ipv4Addr::new(10, 100, 0, 99)));
    inject(
        &attacker,
        attacker_ip,
        h1.ip,
        vec![poison.clone(), poison.clone(), hijack.clone()],
    );
    // 2. A VTEP of tenant a only, injecting into b.
    let h3_ip = h3.ip;
    inject(&h3.ns, h3_ip, h1.ip, vec![poison, hijack]);
    // Each of the five is dropped and counted (and nothing else is).
    testbeds::wait::until("five unknown_vtep drops", testbeds::wait::SOON, || {
        drops(&h1, "b", DropReason::UnknownVtep) >= 5
    })
    .unwrap();
    assert_eq!(drops(&h1, "b", DropReason::UnknownVtep), 5);
    // b1 still resolves b2 to b2, b2's entry still points at h2, and traffic flows.
    let r = ping(&b1, B2_IP.into(), 5, 56).unwrap();
    assert_eq!(r.received, r.sent, "b1 -> b2 after: {r:?}");
    let neigh = neighbour(&b1);
    assert!(
        neigh.contains(&mac_str(B2_MAC)) && !neigh.contains(&mac_str(ATTACKER_MAC)),
        "{neigh}"
    );
    assert_eq!(
        fdb_entry(&h1, "b", B2_MAC),
        Some(Destination::Remote(h2.ip))
    );
    assert_eq!(fdb_entry(&h1, "b", ATTACKER_MAC), None);
    // Tenant a heard none of it either (other VNI).
    assert_eq!(drops(&h1, "a", DropReason::UnknownVtep), 0);

    // A tenant in flood-and-learn mode hears any host, as configured.
    h1.datapath
        .call(|dp| {
            dp.add_tenant(TenantConfig {
                name: "c".into(),
                vni: overlay_net::Vni::new(300).unwrap(),
                mtu: 0,
                limits: TenantLimits::default(),
                learn_vteps: true,
            })
        })
        .unwrap()
        .unwrap();
    inject(
        &attacker,
        attacker_ip,
        h1.ip,
        vec![vxlan(300, &arp_reply(ATTACKER_MAC, B2_IP))],
    );
    testbeds::wait::until(
        "the learn-mode tenant to learn",
        testbeds::wait::SOON,
        || fdb_entry(&h1, "c", ATTACKER_MAC).is_some(),
    )
    .unwrap();
    assert_eq!(
        fdb_entry(&h1, "c", ATTACKER_MAC),
        Some(Destination::Remote(attacker_ip))
    );
    assert_eq!(drops(&h1, "c", DropReason::UnknownVtep), 0);
}

#[test]
fn the_underlay_cannot_inject_into_a_tenant_over_ipv4() {
    attacks_fail(false);
}

#[test]
fn the_underlay_cannot_inject_into_a_tenant_over_ipv6() {
    attacks_fail(true);
}

#[test]
fn vteps_are_hosts_and_the_daemon_reports_refusals() {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    let dir =
        testbeds::scratch::Scratch::new(std::path::Path::new("/var/tmp"), "lv-vteps").unwrap();
    let mut ul = Underlay::new().unwrap();
    let host = ul.host("h1", Ipv4Addr::new(198, 18, 0, 1)).unwrap();
    let attacker = ul.host("atk", Ipv4Addr::new(198, 18, 0, 66)).unwrap();
    let d = testbeds::daemon::start_vswitchd(&host, "198.18.0.1".parse().unwrap(), dir.path(), &[])
        .unwrap();
    d.create("/v1/tenants", r#"{"name":"b","vni":200}"#)
        .unwrap();
    for bad in [
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.1",
        "198.18.0.1",
        "::",
        "ff02::1",
    ] {
        let (status, body) = d
            .request(
                "POST",
                "/v1/tenants/b/vteps",
                Some(&format!(r#"{{"ip":"{bad}"}}"#)),
            )
            .unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
    }
    d.create("/v1/tenants/b/vteps", r#"{"ip":"198.18.0.2"}"#)
        .unwrap();
    inject(
        &attacker,
        "198.18.0.66".parse().unwrap(),
        "198.18.0.1".parse().unwrap(),
        vec![vxlan(200, &arp_reply(ATTACKER_MAC, B2_IP))],
    );
    let tenant = || -> serde_json::Value {
        let (_, body) = d.request("GET", "/v1/tenants/b", None).unwrap();
        serde_json::from_str(&body).unwrap()
    };
    testbeds::wait::until("the refusal to be counted", testbeds::wait::SOON, || {
        tenant()["counters"]["drops"]["unknown_vtep"] == 1
    })
    .unwrap_or_else(|e| panic!("{e}: {}", tenant()));
    assert_eq!(tenant()["learn_vteps"], false);
    let (_, metrics) = d.request("GET", "/metrics", None).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("tenant_drops") && l.contains("unknown_vtep") && l.ends_with(" 1")),
        "{metrics}"
    );
}

#[test]
fn the_underlay_mtu_is_read_from_the_interface_that_carries_it() {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    let dir =
        testbeds::scratch::Scratch::new(std::path::Path::new("/var/tmp"), "lv-jumbo").unwrap();
    let mut ul = Underlay::with_mtu(9000);
    let ul = ul.as_mut().unwrap();
    let host = ul.host("h1", Ipv4Addr::new(198, 18, 0, 1)).unwrap();
    let tenant_mtu = |extra: &[&str], dir: &std::path::Path| {
        let d = testbeds::daemon::start_vswitchd(&host, "198.18.0.1".parse().unwrap(), dir, extra)
            .unwrap();
        let (_, body) = d
            .request("POST", "/v1/tenants", Some(r#"{"name":"j","vni":9}"#))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["mtu"].as_u64().unwrap()
    };
    // Jumbo frames on the underlay: tenants get 9000 - 50 without being told.
    assert_eq!(tenant_mtu(&[], &dir.join("detected")), 8950);
    // A configured MTU wins.
    assert_eq!(
        tenant_mtu(&["--underlay-mtu", "1500"], &dir.join("configured")),
        1450
    );
}

#[test]
fn port_interfaces_take_the_tenant_mtu_after_a_restart_with_another_underlay_mtu() {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    let dir =
        testbeds::scratch::Scratch::new(std::path::Path::new("/var/tmp"), "lv-remtu").unwrap();
    let mut ul = Underlay::with_mtu(9000).unwrap();
    let host = ul.host("h1", Ipv4Addr::new(198, 18, 0, 1)).unwrap();
    let container = Netns::create("ct").unwrap();
    let underlay: IpAddr = "198.18.0.1".parse().unwrap();
    let mtu_in_container = |ifname: &str| -> u64 {
        container
            .exec("cat", &[&format!("/sys/class/net/{ifname}/mtu")])
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    // First with a configured 1500-byte underlay: the tenant and its ports get 1450.
    let mut d =
        testbeds::daemon::start_vswitchd(&host, underlay, dir.path(), &["--underlay-mtu", "1500"])
            .unwrap();
    d.create("/v1/tenants", r#"{"name":"j","vni":9}"#).unwrap();
    let ns = format!("/run/netns/{}", container.name());
    d.create(
        "/v1/ports",
        &format!(r#"{{"name":"pt","tenant":"j","netns":"{ns}","ifname":"eth0"}}"#),
    )
    .unwrap();
    d.create(
        "/v1/ports",
        &format!(r#"{{"name":"pv","tenant":"j","kind":"veth","netns":"{ns}","ifname":"eth1"}}"#),
    )
    .unwrap();
    assert_eq!(
        (mtu_in_container("eth0"), mtu_in_container("eth1")),
        (1450, 1450)
    );
    assert!(d.terminate());
    // Restarted without it: the underlay's 9000 is read, and the interfaces follow.
    let d = testbeds::daemon::start_vswitchd(&host, underlay, dir.path(), &[]).unwrap();
    let (_, body) = d.request("GET", "/v1/tenants/j", None).unwrap();
    let tenant: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(tenant["mtu"], 8950, "{tenant}");
    testbeds::wait::until("the ports to be resized", testbeds::wait::SOON, || {
        mtu_in_container("eth0") == 8950 && mtu_in_container("eth1") == 8950
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: eth0 {}, eth1 {}",
            mtu_in_container("eth0"),
            mtu_in_container("eth1")
        )
    });
}

#[test]
fn a_vteps_udp_port_is_set_listed_and_kept() {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    let dir =
        testbeds::scratch::Scratch::new(std::path::Path::new("/var/tmp"), "lv-vtepport").unwrap();
    let mut ul = Underlay::new().unwrap();
    let host = ul.host("h1", Ipv4Addr::new(198, 18, 0, 1)).unwrap();
    let underlay: IpAddr = "198.18.0.1".parse().unwrap();
    let mut d = testbeds::daemon::start_vswitchd(&host, underlay, dir.path(), &[]).unwrap();
    d.create("/v1/tenants", r#"{"name":"a","vni":5}"#).unwrap();
    let (status, body) = d
        .request(
            "POST",
            "/v1/tenants/a/vteps",
            Some(r#"{"ip":"198.18.0.2","port":0}"#),
        )
        .unwrap();
    assert_eq!(status, 400, "{body}");
    d.create("/v1/tenants/a/vteps", r#"{"ip":"198.18.0.2","port":8472}"#)
        .unwrap();
    d.create("/v1/tenants/a/vteps", r#"{"ip":"198.18.0.3"}"#)
        .unwrap();
    let listed = |d: &testbeds::daemon::Daemon| -> serde_json::Value {
        let (_, body) = d.request("GET", "/v1/tenants/a/vteps", None).unwrap();
        serde_json::from_str(&body).unwrap()
    };
    let expected = serde_json::json!([{"ip":"198.18.0.2","port":8472},{"ip":"198.18.0.3"}]);
    assert_eq!(listed(&d), expected);
    assert!(d.terminate());
    let d = testbeds::daemon::start_vswitchd(&host, underlay, dir.path(), &[]).unwrap();
    assert_eq!(listed(&d), expected);
}

#[test]
fn a_tenants_mtu_follows_the_families_of_its_vteps() {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    let dir =
        testbeds::scratch::Scratch::new(std::path::Path::new("/var/tmp"), "lv-fammtu").unwrap();
    let mut ul = Underlay::new().unwrap();
    let host = ul.host("h1", Ipv4Addr::new(198, 18, 0, 1)).unwrap();
    // A kernel IPv4 peer at the IPv4 tenant MTU (1450).
    let kernel = testbeds::switch_bed::KernelHost::new(
        &mut ul,
        9,
        7,
        &["198.18.0.1".parse().unwrap()],
        Ipv4Addr::new(10, 7, 0, 9),
    )
    .unwrap();
    let container = Netns::create("cm").unwrap();
    let underlay: IpAddr = "198.18.0.1".parse().unwrap();
    // IPv4 and IPv6 underlays: 1450 and 1430.
    let d = testbeds::daemon::start_vswitchd(
        &host,
        underlay,
        dir.path(),
        &["--underlay", "fd00:18::1"],
    )
    .unwrap();
    let tenant_mtu = || -> u64 {
        let (_, body) = d.request("GET", "/v1/tenants/t", None).unwrap();
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["mtu"]
            .as_u64()
            .unwrap()
    };
    let port_mtu = || -> u64 {
        container
            .exec("cat", &["/sys/class/net/eth0/mtu"])
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    d.create("/v1/tenants", r#"{"name":"t","vni":7}"#).unwrap();
    assert_eq!(
        tenant_mtu(),
        1430,
        "no VTEPs yet: what every underlay carries"
    );
    let ns = format!("/run/netns/{}", container.name());
    d.create(
        "/v1/ports",
        &format!(r#"{{"name":"pm","tenant":"t","kind":"veth","netns":"{ns}","ifname":"eth0"}}"#),
    )
    .unwrap();
    assert_eq!(port_mtu(), 1430);
    // IPv4 VTEPs only: the IPv4 overhead, and the port follows.
    d.create("/v1/tenants/t/vteps", r#"{"ip":"198.18.0.9"}"#)
        .unwrap();
    assert_eq!((tenant_mtu(), port_mtu()), (1450, 1450));
    container
        .ip(&["addr", "add", "10.7.0.1/24", "dev", "eth0"])
        .unwrap();
    container.ip(&["link", "set", "eth0", "up"]).unwrap();
    // The kernel peer's full-size frames (1450) arrive, none dropped as oversize.
    let r = ping(&kernel.endpoint, "10.7.0.1".parse().unwrap(), 2, 1422).unwrap();
    assert_eq!(r.received, r.sent, "{r:?}");
    let r = ping(&container, "10.7.0.9".parse().unwrap(), 2, 1422).unwrap();
    assert_eq!(r.received, r.sent, "{r:?}");
    let (_, body) = d.request("GET", "/v1/tenants/t", None).unwrap();
    let t: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        t["counters"]["drops"]["oversize"].as_u64().unwrap_or(0),
        0,
        "{t}"
    );
    // An IPv6 VTEP joins: the IPv6 overhead for everyone; it leaves: back to 1450.
    d.create("/v1/tenants/t/vteps", r#"{"ip":"fd00:18::5"}"#)
        .unwrap();
    assert_eq!((tenant_mtu(), port_mtu()), (1430, 1430));
    let (status, _) = d
        .request("DELETE", "/v1/tenants/t/vteps/fd00:18::5", None)
        .unwrap();
    assert_eq!(status, 204);
    assert_eq!((tenant_mtu(), port_mtu()), (1450, 1450));
}
