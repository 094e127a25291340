//! The inner-flow hash that picks the outer UDP source port.
//!
//! RFC 7348 §5: "It is recommended that the UDP source port number be calculated using a hash
//! of fields from the inner packet", in the dynamic range 49152–65535, so that underlay ECMP
//! spreads tunnels' flows while keeping each flow on one path (no reordering).

use crate::wire::{
    self, be16, be32, ethernet, ethertype, get_be16, get_be32, get_be64, ipv4, ipv6, protocol, tcp,
};

/// First port of the dynamic/private range (RFC 6335).
pub const SOURCE_PORT_MIN: u16 = 49152;
/// Number of ports in the dynamic range 49152–65535.
const SOURCE_PORT_SPAN: u32 = 65536 - SOURCE_PORT_MIN as u32;

/// Multiplies as 128 bits and folds the halves: one multiply mixes 64 bits of input.
#[inline(always)]
fn fold_mul(a: u64, b: u64) -> u64 {
    let p = (a as u128).wrapping_mul(b as u128);
    (p as u64) ^ ((p >> 64) as u64)
}

const K0: u64 = 0x243f_6a88_85a3_08d3;
const K1: u64 = 0x1319_8a2e_0370_7344;
const K2: u64 = 0xa409_3822_299f_31d0;
const K3: u64 = 0x082e_fa98_ec4e_6c89;

/// A 32-bit hash of an inner frame's flow, read straight from fixed header offsets (this is
/// on every encapsulation, so it parses nothing it does not hash):
/// IPv4/IPv6 (after an optional 802.1Q tag): addresses, protocol and, for unfragmented
/// TCP/UDP, the ports; anything else: the MAC addresses and EtherType. Deterministic, so a
/// flow keeps its port across processes. Frames too short for their headers hash by what is
/// there.
#[inline]
pub fn flow_hash(frame: &[u8]) -> u32 {
    let h = flow_hash64(frame).unwrap_or_else(|| {
        // Truncated headers: hash the MACs if present, else nothing.
        fold_mul(
            get_be64(frame, 0).unwrap_or(0) ^ K0,
            get_be32(frame, 8).unwrap_or(0) as u64 ^ K1,
        )
    });
    (h >> 32) as u32 ^ h as u32
}

#[inline(always)]
fn flow_hash64(frame: &[u8]) -> Option<u64> {
    // Fast path, the common case: untagged IPv4 without options, ports present.
    const IP: usize = ethernet::HEADER_LEN;
    const L4: usize = IP + ipv4::MIN_HEADER_LEN;
    if let Some(h) = frame.first_chunk::<{ L4 + 4 }>()
        && be16(h, ethernet::ETHERTYPE) == ethertype::IPV4
        && h[IP + ipv4::VERSION_IHL] == 0x45
    {
        let ip = &h[IP..L4];
        let proto = ip[ipv4::PROTOCOL];
        let unfragmented = be16(ip, ipv4::FLAGS_FRAGMENT) & ipv4::FRAGMENT_MASK == 0;
        let ports = if unfragmented && (proto == protocol::TCP || proto == protocol::UDP) {
            be32(&h[L4..], tcp::PORTS)
        } else {
            0
        };
        let addrs = u64::from_be_bytes(ip[ipv4::ADDRESSES].try_into().unwrap_or_default());
        return Some(fold_mul(
            addrs ^ K0,
            ((proto as u64) << 32 | ports as u64) ^ K1,
        ));
    }
    let (ether_type, l3) = wire::l3_start(frame)?;
    match ether_type {
        ethertype::IPV4 => {
            let ihl = (*frame.get(l3 + ipv4::VERSION_IHL)? & 0x0f) as usize * 4;
            let proto = *frame.get(l3 + ipv4::PROTOCOL)?;
            let frag = get_be16(frame, l3 + ipv4::FLAGS_FRAGMENT.start)? & ipv4::FRAGMENT_MASK;
            let addrs = get_be64(frame, l3 + ipv4::ADDRESSES.start)?;
            let ports = if frag == 0 && (proto == protocol::TCP || proto == protocol::UDP) {
                get_be32(frame, l3 + ihl).unwrap_or(0)
            } else {
                0
            };
            Some(fold_mul(
                addrs ^ K0,
                ((proto as u64) << 32 | ports as u64) ^ K1,
            ))
        }
        ethertype::IPV6 => {
            let proto = *frame.get(l3 + ipv6::NEXT_HEADER)?;
            let ports = if proto == protocol::TCP || proto == protocol::UDP {
                get_be32(frame, l3 + ipv6::HEADER_LEN).unwrap_or(0)
            } else {
                0
            };
            let (src, dst) = (l3 + ipv6::SOURCE.start, l3 + ipv6::DESTINATION.start);
            let src = fold_mul(get_be64(frame, src)? ^ K0, get_be64(frame, src + 8)? ^ K1);
            let dst = fold_mul(get_be64(frame, dst)? ^ K2, get_be64(frame, dst + 8)? ^ K3);
            Some(fold_mul(
                src ^ dst.rotate_left(29),
                ((proto as u64) << 32 | ports as u64) ^ K2,
            ))
        }
        _ => {
            let macs = fold_mul(get_be64(frame, 0)? ^ K0, get_be32(frame, 8)? as u64 ^ K1);
            Some(fold_mul(macs ^ K3, ether_type as u64 ^ K2))
        }
    }
}

/// Maps a flow hash into the source port range 49152–65535.
#[inline]
pub fn source_port(hash: u32) -> u16 {
    SOURCE_PORT_MIN + ((hash as u64 * SOURCE_PORT_SPAN as u64) >> 32) as u16
}

/// The outer UDP source port for an inner frame.
#[inline]
pub fn source_port_for(inner_frame: &[u8]) -> u16 {
    source_port(flow_hash(inner_frame))
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
        let _ = source_port_for(&[1, 2, 3]); // too short: still a port, no panic
        assert!(source_port_for(&[]) >= SOURCE_PORT_MIN);
    }

    #[test]
    fn only_flow_fields_matter() {
        let a = udp_frame(1000);
        let mut b = a.clone();
        b[22] = 1; // TTL
        b[24] ^= 0xff; // IP checksum
        *b.last_mut().unwrap() ^= 0xff; // payload
        assert_eq!(flow_hash(&a), flow_hash(&b));
        let mut c = a.clone();
        c[29] ^= 1; // source address
        assert_ne!(flow_hash(&a), flow_hash(&c));
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
