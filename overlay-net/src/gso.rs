//! Software segmentation and checksum completion for frames that arrive with offload
//! metadata (a virtio-net header: partial checksum, TCP segmentation), for egress ports that
//! cannot take them, such as the VXLAN uplink.
//!
//! Sans-IO and allocation-free: a [`TcpSegmenter`] writes one MSS-sized segment at a time into
//! a caller's buffer.

use crate::checksum::Sum;
use crate::wire::{self, be16, be32, ethernet, ethertype, ipv4, ipv6, protocol, tcp, udp};
use crate::{Error, Layer};

/// Completes a partial checksum (virtio `NEEDS_CSUM`): the 16-bit field at
/// `start + offset` holds the pseudo-header sum; the checksum over `frame[start..]` is written
/// there.
pub fn complete_checksum(frame: &mut [u8], start: usize, offset: usize) -> Result<(), Error> {
    let field = start + offset;
    if start > frame.len() || field + 2 > frame.len() {
        return Err(Error::Malformed {
            layer: Layer::Inner,
            what: "checksum start/offset outside the frame",
        });
    }
    let sum = Sum::new().add_bytes(&frame[start..]).checksum();
    frame[field..field + 2].copy_from_slice(&sum.to_ne_bytes());
    Ok(())
}

/// Finishes the TCP or UDP checksum of an Ethernet frame (untagged or with one 802.1Q tag)
/// that a sender left partial: a Linux stack that offloads the checksum (a vxlan device on a
/// link with checksum offload, such as a veth, with its defaults) sends the inner packet with
/// only the pseudo-header sum in the field, for the "hardware" to finish; a kernel receiver
/// keeps the packet marked partial, but a userspace switch gets the bytes as they are and must
/// finish it before handing the frame to anyone who verifies it.
///
/// A field that does not hold the pseudo-header sum is left alone (a finished checksum, right
/// or wrong, is the sender's); one that does is finished unless the packet already verifies
/// (a finished checksum that happens to equal the pseudo-header sum). Returns whether the
/// frame was changed. Fragments, IPv6 extension headers and other protocols are left alone.
pub fn finish_partial_checksum(frame: &mut [u8]) -> bool {
    let Some((ether_type, l3)) = wire::l3_start(frame) else {
        return false;
    };
    // (protocol, L4 start, L4 end, pseudo-header sum without the protocol and length)
    let (proto, l4, end, addrs) = match ether_type {
        ethertype::IPV4 => {
            let Some(ip) = frame.get(l3..l3 + ipv4::MIN_HEADER_LEN) else {
                return false;
            };
            let ihl = usize::from(ip[ipv4::VERSION_IHL] & 0x0f) * 4;
            let total = usize::from(be16(ip, ipv4::TOTAL_LEN));
            let fragment = be16(ip, ipv4::FLAGS_FRAGMENT) & ipv4::FRAGMENT_MASK != 0;
            if ip[ipv4::VERSION_IHL] >> 4 != 4
                || ihl < ipv4::MIN_HEADER_LEN
                || total < ihl
                || fragment
            {
                return false;
            }
            (
                ip[ipv4::PROTOCOL],
                l3 + ihl,
                l3 + total,
                Sum::new().add_bytes(&ip[ipv4::ADDRESSES]),
            )
        }
        ethertype::IPV6 => {
            let Some(ip) = frame.get(l3..l3 + ipv6::HEADER_LEN) else {
                return false;
            };
            let payload = usize::from(be16(ip, ipv6::PAYLOAD_LEN));
            (
                ip[ipv6::NEXT_HEADER],
                l3 + ipv6::HEADER_LEN,
                l3 + ipv6::HEADER_LEN + payload,
                Sum::new().add_bytes(&ip[ipv6::ADDRESSES]),
            )
        }
        _ => return false,
    };
    let field = match proto {
        protocol::TCP => tcp::CHECKSUM.start,
        protocol::UDP => udp::CHECKSUM.start,
        _ => return false,
    };
    let Some(segment) = frame.get_mut(l4..end) else {
        return false;
    };
    if segment.len() < field + 2 {
        return false;
    }
    let current = [segment[field], segment[field + 1]];
    if proto == protocol::UDP && ether_type == ethertype::IPV4 && current == [0, 0] {
        return false; // UDP over IPv4 without a checksum
    }
    let pseudo = addrs
        .add_word([0, proto])
        .add_word((segment.len() as u16).to_be_bytes());
    if current != pseudo.folded().to_ne_bytes() {
        return false;
    }
    if pseudo.add_bytes(segment).folded() == 0xffff {
        return false; // already right
    }
    let mut c = Sum::new().add_bytes(segment).checksum();
    if proto == protocol::UDP && c == 0 {
        c = 0xffff;
    }
    segment[field..field + 2].copy_from_slice(&c.to_ne_bytes());
    true
}

/// Prepares a TCP "super-frame" that arrived whole from the underlay for delivery with
/// segmentation offload, as the sender's NIC would have cut it.
///
/// A Linux vxlan peer whose underlay link offloads segmentation (a veth, with its defaults)
/// builds tunnel-GSO packets: one VXLAN datagram carrying a TCP segment far larger than the
/// MTU, its checksum partial, for the "hardware" to cut. Received by a UDP socket such a
/// packet is not segmented (the kernel segments only plain UDP GSO packets a socket did not
/// ask for) and no segment size comes with it; the receiver must cut it or pass it on with
/// an offload header. The segment size is what fits `mtu` (the tenant's IP MTU, from which
/// the sender's own MSS derives).
///
/// The IP length must cover the frame exactly (it does in a GSO packet) and an IPv4 packet
/// must not be a fragment. The TCP checksum field is set to the pseudo-header sum, what a
/// receiver of a frame with a pending checksum (virtio `NEEDS_CSUM`) expects, whatever the
/// sender left there. Returns the offload description; a frame that fits the MTU, or is not
/// TCP over IP, is an error and left unchanged.
pub fn prepare_tcp_super_frame(frame: &mut [u8], mtu: usize) -> Result<Coalesced, Error> {
    let bad = |what| Error::Malformed {
        layer: Layer::Inner,
        what,
    };
    let at = layout(frame)?;
    let headers = at.payload - at.l3;
    if mtu <= headers {
        return Err(bad("IP and TCP headers longer than the MTU"));
    }
    let mss = mtu - headers;
    let payload = frame.len() - at.payload;
    if payload <= mss {
        return Err(bad("not larger than the MTU"));
    }
    let ip_len = frame.len() - at.l3;
    if ip_len > usize::from(u16::MAX) {
        return Err(bad("super-frame longer than an IP packet"));
    }
    let ip = &frame[at.l3..at.l4];
    if at.v6 {
        if usize::from(be16(ip, ipv6::PAYLOAD_LEN)) + ipv6::HEADER_LEN != ip_len {
            return Err(bad("IPv6 payload length does not match the frame"));
        }
    } else {
        let fragment = be16(ip, ipv4::FLAGS_FRAGMENT) & ipv4::FRAGMENT_MASK != 0;
        if usize::from(be16(ip, ipv4::TOTAL_LEN)) != ip_len || fragment {
            return Err(bad("IPv4 length does not match the frame, or a fragment"));
        }
    }
    write_checksum_seed(frame, at);
    Ok(Coalesced {
        segments: payload.div_ceil(mss).min(usize::from(u16::MAX)) as u16,
        segment_size: mss as u16,
        header_len: at.payload as u16,
        csum_start: at.l4 as u16,
        csum_offset: tcp::CHECKSUM.start as u16,
        ipv6: at.v6,
    })
}

/// Where the headers of a TCP frame are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    l3: usize,
    l4: usize,
    payload: usize,
    v6: bool,
}

/// The TCP pseudo-header sum of `frame` (addresses, protocol, TCP length to the frame's end).
fn tcp_pseudo_header(frame: &[u8], at: Layout) -> Sum {
    let ip = &frame[at.l3..at.l4];
    let addrs = if at.v6 {
        &ip[ipv6::ADDRESSES]
    } else {
        &ip[ipv4::ADDRESSES]
    };
    Sum::new()
        .add_bytes(addrs)
        .add_word([0, protocol::TCP])
        .add_word(((frame.len() - at.l4) as u16).to_be_bytes())
}

/// Puts the pseudo-header sum into the TCP checksum field: what a receiver of a frame with
/// its checksum pending (virtio `NEEDS_CSUM`) expects there.
fn write_checksum_seed(frame: &mut [u8], at: Layout) {
    let seed = tcp_pseudo_header(frame, at).folded();
    frame[at.l4..][tcp::CHECKSUM].copy_from_slice(&seed.to_ne_bytes());
}

fn layout(frame: &[u8]) -> Result<Layout, Error> {
    let bad = |what| Error::Malformed {
        layer: Layer::Inner,
        what,
    };
    if frame.len() < ethernet::HEADER_LEN {
        return Err(bad("frame shorter than Ethernet"));
    }
    let (et, l3) = wire::l3_start(frame).ok_or(bad("truncated VLAN tag"))?;
    let (l4, v6) = match et {
        ethertype::IPV4 => {
            let ihl = (*frame.get(l3).ok_or(bad("no IPv4 header"))? & 0x0f) as usize * 4;
            if ihl < ipv4::MIN_HEADER_LEN
                || frame.len() < l3 + ihl
                || frame[l3 + ipv4::PROTOCOL] != protocol::TCP
            {
                return Err(bad("not an IPv4 TCP packet"));
            }
            (l3 + ihl, false)
        }
        ethertype::IPV6 => {
            if frame.len() < l3 + ipv6::HEADER_LEN || frame[l3 + ipv6::NEXT_HEADER] != protocol::TCP
            {
                return Err(bad(
                    "not an IPv6 TCP packet (extension headers unsupported)",
                ));
            }
            (l3 + ipv6::HEADER_LEN, true)
        }
        _ => return Err(bad("not IP")),
    };
    let doff = (*frame
        .get(l4 + tcp::DATA_OFFSET)
        .ok_or(bad("no TCP header"))?
        >> 4) as usize
        * 4;
    if doff < tcp::MIN_HEADER_LEN || frame.len() < l4 + doff {
        return Err(bad("bad TCP header length"));
    }
    Ok(Layout {
        l3,
        l4,
        payload: l4 + doff,
        v6,
    })
}

/// Cuts a TCP frame larger than the MTU (a GSO/TSO "super-frame") into segments of at most
/// `mss` payload bytes with correct IP lengths, IPv4 IDs, TCP sequence numbers, flags and
/// checksums, as a NIC's TSO would.
#[derive(Debug)]
pub struct TcpSegmenter<'a> {
    frame: &'a [u8],
    at: Layout,
    mss: usize,
    next: usize,
    index: u16,
}

const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const CWR: u8 = 0x80;

impl<'a> TcpSegmenter<'a> {
    /// Prepares segmentation of `frame` with segment payloads of `mss` bytes.
    pub fn new(frame: &'a [u8], mss: usize) -> Result<TcpSegmenter<'a>, Error> {
        if mss == 0 {
            return Err(Error::Malformed {
                layer: Layer::Inner,
                what: "zero segment size",
            });
        }
        let at = layout(frame)?;
        Ok(TcpSegmenter {
            frame,
            at,
            mss,
            next: at.payload,
            index: 0,
        })
    }

    /// Length of the largest segment this produces.
    pub fn max_segment_len(&self) -> usize {
        self.at.payload + self.mss
    }

    /// Writes the next segment into `out`; returns its length, or `None` when done.
    pub fn next_into(&mut self, out: &mut [u8]) -> Option<Result<usize, Error>> {
        let f = self.frame;
        let at = self.at;
        let total_payload = f.len() - at.payload;
        if self.next >= f.len() && !(total_payload == 0 && self.index == 0) {
            return None;
        }
        let chunk = (f.len() - self.next).min(self.mss);
        let len = at.payload + chunk;
        if out.len() < len {
            return Some(Err(Error::BufferTooSmall {
                need: len,
                have: out.len(),
            }));
        }
        let first = self.index == 0;
        let last = self.next + chunk >= f.len();
        out[..at.payload].copy_from_slice(&f[..at.payload]);
        out[at.payload..len].copy_from_slice(&f[self.next..self.next + chunk]);
        let seq_advance = (self.next - at.payload) as u32;
        // IP header: lengths, and for IPv4 the ID and header checksum.
        let ip = &mut out[at.l3..at.l4];
        if at.v6 {
            let plen = (len - at.l3 - ipv6::HEADER_LEN) as u16;
            ip[ipv6::PAYLOAD_LEN].copy_from_slice(&plen.to_be_bytes());
        } else {
            let tot = (len - at.l3) as u16;
            ip[ipv4::TOTAL_LEN].copy_from_slice(&tot.to_be_bytes());
            let id = be16(&f[at.l3..], ipv4::IDENT).wrapping_add(self.index);
            ip[ipv4::IDENT].copy_from_slice(&id.to_be_bytes());
            ip[ipv4::CHECKSUM].copy_from_slice(&[0, 0]);
            let c = Sum::new().add_bytes(ip).checksum();
            ip[ipv4::CHECKSUM].copy_from_slice(&c.to_ne_bytes());
        }
        // TCP: sequence number, flags, checksum.
        let seq = be32(&f[at.l4..], tcp::SEQUENCE).wrapping_add(seq_advance);
        out[at.l4..][tcp::SEQUENCE].copy_from_slice(&seq.to_be_bytes());
        let mut flags = f[at.l4 + tcp::FLAGS];
        if !last {
            flags &= !(FIN | PSH);
        }
        if !first {
            flags &= !CWR;
        }
        out[at.l4 + tcp::FLAGS] = flags;
        out[at.l4..][tcp::CHECKSUM].copy_from_slice(&[0, 0]);
        let c = tcp_pseudo_header(&out[..len], at)
            .add_bytes(&out[at.l4..len])
            .checksum();
        out[at.l4..][tcp::CHECKSUM].copy_from_slice(&c.to_ne_bytes());
        self.next += chunk.max(1);
        self.index = self.index.wrapping_add(1);
        Some(Ok(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    fn tcp_frame(v6: bool, payload: &[u8], flags_fin_psh: bool) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let mut out = Vec::new();
        let b = if v6 {
            eth.ipv6([0xfd; 16], [0xfe; 16], 64)
                .tcp(40000, 80, 1_000_000, 65535)
        } else {
            eth.ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .tcp(40000, 80, 1_000_000, 65535)
        };
        let b = if flags_fin_psh { b.psh().fin() } else { b };
        b.write(&mut out, payload).unwrap();
        out
    }

    fn segments(frame: &[u8], mss: usize) -> Vec<Vec<u8>> {
        let mut s = TcpSegmenter::new(frame, mss).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 9000];
        while let Some(r) = s.next_into(&mut buf) {
            let n = r.unwrap();
            out.push(buf[..n].to_vec());
        }
        out
    }

    #[test]
    fn segments_are_valid_tcp_with_right_sequence_numbers_and_flags() {
        for v6 in [false, true] {
            let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
            let frame = tcp_frame(v6, &payload, true);
            let segs = segments(&frame, 1448);
            assert_eq!(segs.len(), 7);
            let mut joined = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                let p = SlicedPacket::from_ethernet(s).unwrap();
                let Some(TransportSlice::Tcp(tcp)) = p.transport else {
                    panic!()
                };
                assert_eq!(tcp.sequence_number(), 1_000_000 + (i * 1448) as u32);
                let last = i == segs.len() - 1;
                assert_eq!(tcp.fin(), last);
                assert_eq!(tcp.psh(), last);
                // The checksums verify (etherparse computes them from scratch).
                let expected = match &p.net {
                    Some(etherparse::NetSlice::Ipv4(ip)) => {
                        let h = ip.header();
                        assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());
                        tcp.to_header()
                            .calc_checksum_ipv4(&h.to_header(), tcp.payload())
                            .unwrap()
                    }
                    Some(etherparse::NetSlice::Ipv6(ip)) => tcp
                        .to_header()
                        .calc_checksum_ipv6(&ip.header().to_header(), tcp.payload())
                        .unwrap(),
                    _ => panic!(),
                };
                assert_eq!(tcp.checksum(), expected);
                joined.extend_from_slice(tcp.payload());
            }
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn partial_checksums_complete_like_a_nic() {
        let mut frame = tcp_frame(false, b"hello world", false);
        let good = frame.clone();
        // Put the pseudo-header sum in the field, as a stack offloading the checksum does.
        let l4 = 34;
        let tcp_len = (frame.len() - l4) as u16;
        let pseudo = Sum::new()
            .add_bytes(&frame[26..34])
            .add_word([0, 6])
            .add_word(tcp_len.to_be_bytes());
        frame[l4 + 16..l4 + 18].copy_from_slice(&pseudo.folded().to_ne_bytes());
        complete_checksum(&mut frame, l4, 16).unwrap();
        assert_eq!(frame, good);
        assert!(complete_checksum(&mut frame, 70, 16).is_err());
    }

    /// A frame whose L4 checksum field is replaced by the pseudo-header sum, as a stack that
    /// offloads the checksum sends it.
    fn partial(good: &[u8], l3: usize, l4: usize, field: usize, v6: bool, proto: u8) -> Vec<u8> {
        let mut f = good.to_vec();
        let len = if v6 {
            usize::from(be16(&f[l3..], ipv6::PAYLOAD_LEN))
        } else {
            usize::from(be16(&f[l3..], ipv4::TOTAL_LEN)) - (l4 - l3)
        };
        let addrs = if v6 {
            &f[l3..][ipv6::ADDRESSES]
        } else {
            &f[l3..][ipv4::ADDRESSES]
        };
        let pseudo = Sum::new()
            .add_bytes(addrs)
            .add_word([0, proto])
            .add_word((len as u16).to_be_bytes());
        f[l4 + field..l4 + field + 2].copy_from_slice(&pseudo.folded().to_ne_bytes());
        f
    }

    #[test]
    fn partial_checksums_left_by_an_offloading_sender_are_finished() {
        let payload = vec![0x5au8; 333];
        let tcp4 = {
            let mut out = Vec::new();
            PacketBuilder::ethernet2([2; 6], [4; 6])
                .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .tcp(40000, 80, 7, 1000)
                .write(&mut out, &payload)
                .unwrap();
            out
        };
        let udp6 = {
            let mut out = Vec::new();
            PacketBuilder::ethernet2([2; 6], [4; 6])
                .ipv6([0xfd; 16], [0xfe; 16], 64)
                .udp(5000, 6000)
                .write(&mut out, &payload)
                .unwrap();
            out
        };
        let tagged_udp4 = {
            let mut out = Vec::new();
            PacketBuilder::ethernet2([2; 6], [4; 6])
                .single_vlan(etherparse::VlanId::try_new(7).unwrap())
                .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .udp(5000, 6000)
                .write(&mut out, b"tagged")
                .unwrap();
            out
        };
        for (good, l3, l4, field, v6, proto) in [
            (&tcp4, 14, 34, 16, false, 6),
            (&udp6, 14, 54, 6, true, 17),
            (&tagged_udp4, 18, 38, 6, false, 17),
        ] {
            let mut f = partial(good, l3, l4, field, v6, proto);
            assert_ne!(&f, good);
            assert!(finish_partial_checksum(&mut f));
            assert_eq!(&f, good);
            // A finished checksum is left alone, and so is a frame finished twice.
            let mut again = good.clone();
            assert!(!finish_partial_checksum(&mut again));
            assert_eq!(&again, good);
        }
        // Ethernet padding after the IP packet is not summed.
        let mut padded = partial(&tcp4, 14, 34, 16, false, 6);
        padded.extend_from_slice(&[0xee; 6]);
        assert!(finish_partial_checksum(&mut padded));
        assert_eq!(&padded[..tcp4.len()], &tcp4[..]);
        // A wrong checksum that is not the partial one is the sender's: untouched.
        let mut wrong = tcp4.clone();
        wrong[34 + 16] ^= 0x55;
        let before = wrong.clone();
        assert!(!finish_partial_checksum(&mut wrong));
        assert_eq!(wrong, before);
        // Anything short or odd: no change, no panic.
        for n in 0..tcp4.len() {
            let mut cut = partial(&tcp4, 14, 34, 16, false, 6)[..n].to_vec();
            let _ = finish_partial_checksum(&mut cut);
        }
        assert!(!finish_partial_checksum(&mut [0u8; 0]));
    }

    #[test]
    fn hostile_inputs_are_errors() {
        assert!(TcpSegmenter::new(&[0u8; 10], 1448).is_err());
        let udp_like = {
            let mut out = Vec::new();
            PacketBuilder::ethernet2([2; 6], [2; 6])
                .ipv4([1; 4], [2; 4], 64)
                .udp(1, 2)
                .write(&mut out, b"x")
                .unwrap();
            out
        };
        assert!(TcpSegmenter::new(&udp_like, 1448).is_err());
        let frame = tcp_frame(false, &[1; 100], false);
        assert!(TcpSegmenter::new(&frame, 0).is_err());
        let mut s = TcpSegmenter::new(&frame, 1448).unwrap();
        assert!(matches!(
            s.next_into(&mut [0u8; 10]),
            Some(Err(Error::BufferTooSmall { .. }))
        ));
    }
}

/// What a receiver must be told about a coalesced frame (the fields of a virtio-net header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coalesced {
    /// Segments merged.
    pub segments: u16,
    /// Payload bytes per segment (the last may be shorter).
    pub segment_size: u16,
    /// Length of the Ethernet + IP + TCP headers.
    pub header_len: u16,
    /// Offset of the TCP header (checksumming starts there).
    pub csum_start: u16,
    /// Offset of the checksum field within the TCP header (16).
    pub csum_offset: u16,
    /// IPv6 rather than IPv4.
    pub ipv6: bool,
}

/// Largest coalesced frame (the IP length field's limit, minus headroom).
const MAX_COALESCED: usize = 65_000;

/// Merges consecutive in-order TCP segments of one flow into one large frame with a partial
/// checksum, as Linux GRO does, so that the receiving stack handles one frame instead of
/// dozens. Segments merge when they continue the sequence, carry the same headers except
/// lengths, IDs, checksums, sequence numbers and PSH, have the first segment's payload size
/// (a shorter one ends the run), and carry no SYN, FIN, RST or URG.
#[derive(Debug)]
pub struct TcpCoalescer {
    buf: Vec<u8>,
    at: Option<Layout>,
    segments: u16,
    segment_size: usize,
    next_seq: u32,
    closed: bool,
}

impl Default for TcpCoalescer {
    fn default() -> Self {
        TcpCoalescer::new()
    }
}

const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const URG: u8 = 0x20;

impl TcpCoalescer {
    /// An empty coalescer (its buffer is allocated once, here).
    pub fn new() -> TcpCoalescer {
        TcpCoalescer {
            buf: Vec::with_capacity(MAX_COALESCED + 128),
            at: None,
            segments: 0,
            segment_size: 0,
            next_seq: 0,
            closed: false,
        }
    }

    /// Segments held.
    pub fn len(&self) -> u16 {
        self.segments
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.segments == 0
    }

    fn mergeable(frame: &[u8]) -> Option<Layout> {
        let at = layout(frame).ok()?;
        let flags = frame[at.l4 + tcp::FLAGS];
        if flags & (SYN | FIN | RST | URG) != 0 || frame.len() == at.payload {
            return None;
        }
        if !at.v6 {
            let h = &frame[at.l3..at.l4];
            // No options, not a fragment, and the IP length must cover exactly the frame.
            if at.l4 - at.l3 != ipv4::MIN_HEADER_LEN
                || be16(h, ipv4::FLAGS_FRAGMENT) & ipv4::FRAGMENT_MASK != 0
                || be16(h, ipv4::TOTAL_LEN) as usize != frame.len() - at.l3
            {
                return None;
            }
        } else if be16(&frame[at.l3..], ipv6::PAYLOAD_LEN) as usize
            != frame.len() - at.l3 - ipv6::HEADER_LEN
        {
            return None;
        }
        Some(at)
    }

    /// Offers a frame: `true` if it was taken (merged, or the start of a new run when empty);
    /// `false` if it does not continue the run held (flush with [`Self::finish`] first) or
    /// cannot be merged at all (send it as it is).
    pub fn push(&mut self, frame: &[u8]) -> bool {
        let Some(at) = Self::mergeable(frame) else {
            return false;
        };
        let seq = be32(&frame[at.l4..], tcp::SEQUENCE);
        let payload = frame.len() - at.payload;
        let Some(held) = self.at else {
            self.buf.clear();
            self.buf.extend_from_slice(frame);
            self.at = Some(at);
            self.segments = 1;
            self.segment_size = payload;
            self.next_seq = seq.wrapping_add(payload as u32);
            self.closed = false;
            return true;
        };
        let same_headers = held == at
            && frame[..at.l3] == self.buf[..at.l3]
            && if at.v6 {
                // Version/class/flow label and addresses, next header and hop limit.
                frame[at.l3..at.l3 + 4] == self.buf[at.l3..at.l3 + 4] && frame[at.l3 + 6..at.l4] == self.buf[at.l3 + 6..at.l4]
            } else {
                // TOS, flags, TTL, protocol, addresses (not length, ID, checksum).
                frame[at.l3 + 1] == self.buf[at.l3 + 1]
                    && frame[at.l3 + 6..at.l3 + 10] == self.buf[at.l3 + 6..at.l3 + 10]
                    && frame[at.l3 + 12..at.l4] == self.buf[at.l3 + 12..at.l4]
            }
            // Ports, ack, data offset, flags but PSH, window, options (not seq, checksum).
            && frame[at.l4..at.l4 + 4] == self.buf[at.l4..at.l4 + 4]
            && frame[at.l4 + 8..at.l4 + 13] == self.buf[at.l4 + 8..at.l4 + 13]
            && (frame[at.l4 + tcp::FLAGS] | PSH) == (self.buf[at.l4 + tcp::FLAGS] | PSH)
            && frame[at.l4 + 14..at.l4 + 16] == self.buf[at.l4 + 14..at.l4 + 16]
            && frame[at.l4 + 18..at.payload] == self.buf[at.l4 + 18..at.payload];
        if self.closed
            || !same_headers
            || seq != self.next_seq
            || payload > self.segment_size
            || self.buf.len() + payload > MAX_COALESCED
        {
            return false;
        }
        self.buf.extend_from_slice(&frame[at.payload..]);
        self.buf[at.l4 + tcp::FLAGS] |= frame[at.l4 + tcp::FLAGS] & PSH;
        self.segments += 1;
        self.next_seq = seq.wrapping_add(payload as u32);
        // A short segment ends the run (only the last may be shorter).
        self.closed = payload < self.segment_size;
        true
    }

    /// Ends the run: returns the frame to send and, if more than one segment was merged,
    /// its offload description (IP lengths fixed, the TCP checksum field holding the
    /// pseudo-header sum). A single segment is returned untouched. Empty: `None`.
    pub fn finish(&mut self) -> Option<(&[u8], Option<Coalesced>)> {
        let at = self.at.take()?;
        let segments = std::mem::take(&mut self.segments);
        if segments <= 1 {
            return Some((&self.buf, None));
        }
        let len = self.buf.len();
        let b = &mut self.buf;
        let ip = &mut b[at.l3..at.l4];
        if at.v6 {
            let plen = (len - at.l3 - ipv6::HEADER_LEN) as u16;
            ip[ipv6::PAYLOAD_LEN].copy_from_slice(&plen.to_be_bytes());
        } else {
            ip[ipv4::TOTAL_LEN].copy_from_slice(&((len - at.l3) as u16).to_be_bytes());
            ip[ipv4::CHECKSUM].copy_from_slice(&[0, 0]);
            let c = Sum::new().add_bytes(ip).checksum();
            ip[ipv4::CHECKSUM].copy_from_slice(&c.to_ne_bytes());
        }
        write_checksum_seed(b, at);
        Some((
            &self.buf,
            Some(Coalesced {
                segments,
                segment_size: self.segment_size as u16,
                header_len: at.payload as u16,
                csum_start: at.l4 as u16,
                csum_offset: tcp::CHECKSUM.start as u16,
                ipv6: at.v6,
            }),
        ))
    }
}

#[cfg(test)]
mod coalesce_tests {
    use super::*;

    #[test]
    fn a_tunnel_gso_super_frame_becomes_an_offloaded_frame_whose_segments_verify() {
        for v6 in [false, true] {
            // What a kernel vxlan peer hands over: one 20000-byte TCP segment, its checksum
            // field holding anything (here: a checksum over the whole super-frame).
            let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 31 % 253) as u8).collect();
            let eth = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
            let mut big = Vec::new();
            let b = if v6 {
                eth.ipv6([0xfd; 16], [0xfe; 16], 64).tcp(40000, 80, 7, 512)
            } else {
                eth.ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                    .tcp(40000, 80, 7, 512)
            };
            b.ack(99).write(&mut big, &payload).unwrap();
            let mut frame = big.clone();
            let c = prepare_tcp_super_frame(&mut frame, 1450).unwrap();
            let ip_tcp = if v6 { 60 } else { 40 };
            assert_eq!(usize::from(c.segment_size), 1450 - ip_tcp);
            assert_eq!(usize::from(c.header_len), 14 + ip_tcp);
            assert_eq!(
                (c.csum_start, c.csum_offset, c.ipv6),
                (14 + ip_tcp as u16 - 20, 16, v6)
            );
            // A receiver completes the checksum from the seed: it verifies.
            let mut whole = frame.clone();
            complete_checksum(&mut whole, usize::from(c.csum_start), 16).unwrap();
            assert_eq!(whole, big);
            // Cut at the segment size: every segment fits the MTU and verifies.
            let mut seg = TcpSegmenter::new(&frame, usize::from(c.segment_size)).unwrap();
            let mut buf = vec![0u8; 9000];
            let mut joined = Vec::new();
            let mut n = 0;
            while let Some(r) = seg.next_into(&mut buf) {
                let len = r.unwrap();
                assert!(len <= 14 + 1450);
                let p = etherparse::SlicedPacket::from_ethernet(&buf[..len]).unwrap();
                let Some(etherparse::TransportSlice::Tcp(tcp)) = p.transport else {
                    panic!("not TCP")
                };
                joined.extend_from_slice(tcp.payload());
                n += 1;
            }
            assert_eq!(n, usize::from(c.segments));
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn frames_that_are_not_super_frames_are_refused_unchanged() {
        let eth = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let mut small = Vec::new();
        eth.ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(1, 2, 3, 4)
            .write(&mut small, &[0u8; 1000])
            .unwrap();
        let before = small.clone();
        assert!(prepare_tcp_super_frame(&mut small, 1450).is_err());
        assert_eq!(small, before);
        // An IPv4 length that does not cover the frame.
        let mut big = Vec::new();
        let eth = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        eth.ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(1, 2, 3, 4)
            .write(&mut big, &[0u8; 5000])
            .unwrap();
        big[16..18].copy_from_slice(&1000u16.to_be_bytes());
        let before = big.clone();
        assert!(prepare_tcp_super_frame(&mut big, 1450).is_err());
        assert_eq!(big, before);
        // UDP is not cut here.
        let mut udp = Vec::new();
        let eth = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        eth.ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 2)
            .write(&mut udp, &[0u8; 5000])
            .unwrap();
        assert!(prepare_tcp_super_frame(&mut udp, 1450).is_err());
    }

    fn stream(v6: bool, total: usize, mss: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
        let payload: Vec<u8> = (0..total).map(|i| (i * 13 % 251) as u8).collect();
        let eth = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let mut big = Vec::new();
        let b = if v6 {
            eth.ipv6([0xfd; 16], [0xfe; 16], 64).tcp(40000, 80, 7, 512)
        } else {
            eth.ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .tcp(40000, 80, 7, 512)
        };
        b.ack(99).write(&mut big, &payload).unwrap();
        let mut seg = TcpSegmenter::new(&big, mss).unwrap();
        let mut segs = Vec::new();
        let mut buf = vec![0u8; 9000];
        while let Some(r) = seg.next_into(&mut buf) {
            segs.push(buf[..r.unwrap()].to_vec());
        }
        (payload, segs)
    }

    #[test]
    fn segments_merge_back_into_a_valid_super_frame() {
        for v6 in [false, true] {
            let (payload, segs) = stream(v6, 20_000, 1400);
            let mut c = TcpCoalescer::new();
            for s in &segs {
                assert!(c.push(s));
            }
            let (frame, info) = c.finish().unwrap();
            let info = info.unwrap();
            assert_eq!(
                (info.segments as usize, info.segment_size),
                (segs.len(), 1400)
            );
            // Completing the partial checksum gives a valid TCP packet holding all the data.
            let mut f = frame.to_vec();
            complete_checksum(&mut f, info.csum_start as usize, 16).unwrap();
            let p = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
            let Some(etherparse::TransportSlice::Tcp(tcp)) = p.transport else {
                panic!()
            };
            assert_eq!(tcp.payload(), &payload[..]);
            assert_eq!(tcp.sequence_number(), 7);
            let expected = match &p.net {
                Some(etherparse::NetSlice::Ipv4(ip)) => {
                    let h = ip.header().to_header();
                    assert_eq!(h.calc_header_checksum(), h.header_checksum);
                    tcp.to_header()
                        .calc_checksum_ipv4(&h, tcp.payload())
                        .unwrap()
                }
                Some(etherparse::NetSlice::Ipv6(ip)) => tcp
                    .to_header()
                    .calc_checksum_ipv6(&ip.header().to_header(), tcp.payload())
                    .unwrap(),
                _ => panic!(),
            };
            assert_eq!(tcp.checksum(), expected);
        }
    }

    #[test]
    fn gaps_other_flows_and_control_segments_end_a_run() {
        let (_, segs) = stream(false, 10_000, 1000);
        let mut c = TcpCoalescer::new();
        assert!(c.push(&segs[0]));
        assert!(!c.push(&segs[2]), "a gap in the sequence");
        assert!(c.push(&segs[1]));
        let mut other = segs[2].clone();
        other[34] ^= 1; // another source port
        assert!(!c.push(&other));
        assert_eq!(c.finish().unwrap().1.unwrap().segments, 2);
        // A single segment comes back untouched.
        assert!(c.push(&segs[5]));
        assert_eq!(c.finish().unwrap(), (&segs[5][..], None));
        assert!(c.finish().is_none());
        // Control segments never merge.
        let mut fin = segs[0].clone();
        fin[34 + 13] |= FIN;
        assert!(!TcpCoalescer::new().push(&fin));
        // A short segment is taken as the last one of a run.
        let (_, short) = stream(false, 2500, 1000);
        let mut c = TcpCoalescer::new();
        assert!(short.iter().all(|s| c.push(s)), "full, full, short");
        assert_eq!(c.finish().unwrap().1.unwrap().segments, 3);
    }
}
