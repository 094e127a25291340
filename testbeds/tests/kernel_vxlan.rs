//! overlay-net against the Linux kernel's VXLAN, as root: a kernel tenant pings and sends TCP
//! to a smoltcp host that lives in VNI 42 behind a userspace VTEP, over IPv4 and IPv6
//! underlays, through a UDP socket and through a raw packet socket; VNI 43 stays isolated.

use overlay_net::UnderlayFamily;
use testbeds::kernel_peer::{ScenarioReport, run_scenario};
use testbeds::netns::missing_privileges;
use testbeds::transport::TransportKind;

/// 4 MiB each way: thousands of full-size frames in both directions.
const TCP_BYTES: usize = 4 << 20;

fn scenario(family: UnderlayFamily, kind: TransportKind) -> Option<ScenarioReport> {
    if let Some(why) = missing_privileges() {
        eprintln!("SKIPPED kernel interop ({family:?}, {kind}): {why}");
        return None;
    }
    let r =
        run_scenario(family, kind, TCP_BYTES).unwrap_or_else(|e| panic!("interop bed failed: {e}"));
    eprintln!("{r:#?}");
    Some(r)
}

fn check(r: &ScenarioReport) {
    assert_eq!(
        r.inner_mtu, r.kernel_vxlan_mtu,
        "overlay-net's MTU disagrees with the kernel's"
    );
    assert_eq!(r.ping.received, r.ping.sent, "pings lost");
    assert!(r.ping.sent > 0);
    assert_eq!(
        r.ping_full_mtu.received, r.ping_full_mtu.sent,
        "full-MTU pings lost"
    );
    assert!(r.tcp.echo_matches, "TCP echo differs from what was sent");
    assert_eq!(
        r.tcp.host_crc32,
        Some(r.tcp.client_crc32),
        "smoltcp host saw other bytes"
    );
    assert_eq!(
        r.other_tenant_ping.received, 0,
        "VNI 43 reached the VNI 42 host"
    );
    assert!(r.other_tenant_ping.sent > 0);
    assert!(
        r.foreign_vni_dropped > 0,
        "VNI 43 frames never reached the userspace VTEP"
    );
    assert!(
        !r.foreign_vni_probe_answered,
        "the kernel delivered VNI 43 to the VNI 42 tenant"
    );
    assert!(
        r.own_vni_probe_answered,
        "the VNI 42 control probe was not answered"
    );
    assert_eq!(
        r.invalid, 0,
        "the userspace VTEP rejected kernel frames as invalid"
    );
    assert!(r.passed());
}

#[test]
fn ipv4_underlay_udp_socket() {
    if let Some(r) = scenario(UnderlayFamily::V4, TransportKind::Udp) {
        check(&r);
    }
}

#[test]
fn ipv6_underlay_udp_socket() {
    if let Some(r) = scenario(UnderlayFamily::V6, TransportKind::Udp) {
        check(&r);
    }
}

#[test]
fn ipv4_underlay_raw_frames() {
    if let Some(r) = scenario(UnderlayFamily::V4, TransportKind::Raw) {
        check(&r);
    }
}

#[test]
fn ipv6_underlay_raw_frames() {
    if let Some(r) = scenario(UnderlayFamily::V6, TransportKind::Raw) {
        check(&r);
    }
}
