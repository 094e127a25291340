//! The inner-flow hash that picks the outer UDP source port.
//!
//! RFC 7348 §5: "It is recommended that the UDP source port number be calculated using a hash
//! of fields from the inner packet", in the dynamic range 49152–65535, so that underlay ECMP
//! spreads tunnels' flows while keeping each flow on one path (no reordering).

use std::net::IpAddr;

use crate::frame::{FrameView, Network};

/// First port of the dynamic/private range (RFC 6335).
pub const SOURCE_PORT_MIN: u16 = 49152;
/// Number of ports in the dynamic range 49152–65535.
const SOURCE_PORT_SPAN: u32 = 65536 - SOURCE_PORT_MIN as u32;

#[inline]
fn mix(h: u64, v: u64) -> u64 {
    let h = (h ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 29)
}

fn mix_ip(h: u64, ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(a) => mix(h, u32::from(a) as u64),
        IpAddr::V6(a) => {
            let v = u128::from(a);
            mix(mix(h, v as u64), (v >> 64) as u64)
        }
    }
}

/// A 32-bit hash of the inner flow: MAC addresses and EtherType, plus for IP the addresses,
/// protocol and TCP/UDP ports. Deterministic, so a flow keeps its port across processes.
pub fn flow_hash(view: &FrameView<'_>) -> u32 {
    let mut h = mix(0x5bd1_e995, view.destination.to_u64());
    h = mix(h, view.source.to_u64() << 16 | view.ether_type as u64);
    let ip = match view.network {
        Network::Ipv4(ip) => Some((
            ip.source.into(),
            ip.destination.into(),
            ip.protocol,
            ip.ports,
        )),
        Network::Ipv6(ip) => Some((
            ip.source.into(),
            ip.destination.into(),
            ip.protocol,
            ip.ports,
        )),
        _ => None,
    };
    if let Some((src, dst, proto, ports)) = ip {
        h = mix_ip(h, src);
        h = mix_ip(h, dst);
        let (sp, dp) = ports.unwrap_or((0, 0));
        h = mix(h, (proto as u64) << 32 | (sp as u64) << 16 | dp as u64);
    }
    (h >> 32) as u32 ^ h as u32
}

/// Maps a flow hash into the source port range 49152–65535.
#[inline]
pub fn source_port(hash: u32) -> u16 {
    SOURCE_PORT_MIN + ((hash as u64 * SOURCE_PORT_SPAN as u64) >> 32) as u16
}

/// The outer UDP source port for an inner frame. Frames too short to parse get the first
/// port of the range.
pub fn source_port_for(inner_frame: &[u8]) -> u16 {
    match FrameView::parse(inner_frame) {
        Ok(view) => source_port(flow_hash(&view)),
        Err(_) => SOURCE_PORT_MIN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MacAddr;
    use crate::frame::build_udp;

    fn udp_frame(sport: u16) -> Vec<u8> {
        let mut buf = vec![0u8; 128];
        let n = build_udp(
            &mut buf,
            MacAddr([2, 0, 0, 0, 0, 1]),
            MacAddr([2, 0, 0, 0, 0, 2]),
            None,
            format!("10.0.0.1:{sport}").parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
            b"payload",
        )
        .unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn ports_stay_in_the_dynamic_range() {
        assert_eq!(source_port(0), 49152);
        assert_eq!(source_port(u32::MAX), 65535);
        assert_eq!(source_port_for(&[1, 2, 3]), 49152);
    }

    #[test]
    fn a_flow_keeps_its_port_and_flows_spread() {
        assert_eq!(
            source_port_for(&udp_frame(1000)),
            source_port_for(&udp_frame(1000))
        );
        let ports: std::collections::HashSet<u16> = (0..4096)
            .map(|p| source_port_for(&udp_frame(10_000 + p)))
            .collect();
        // 4096 flows into 16384 ports: a good hash leaves few collisions (~3600 expected).
        assert!(ports.len() > 3300, "only {} distinct ports", ports.len());
    }
}
