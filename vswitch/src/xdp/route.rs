//! Where a datagram for a remote VTEP goes on the wire, asked of the kernel: its route
//! (`RTM_GETROUTE`: output interface and gateway) and the link-layer address of the next hop
//! in its neighbour table (`RTM_GETNEIGH`). The kernel stays the authority for both; frames
//! for a VTEP whose next hop it has not resolved go through the UDP socket, which makes the
//! kernel resolve it.

use std::io;
use std::net::IpAddr;

use rtnetlink::packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// A netlink socket for route and neighbour queries, in the namespace it was opened in.
pub(super) struct Resolver {
    socket: Socket,
    sequence: u32,
    buf: Vec<u8>,
}

/// What the XDP path needs to know of the underlay interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LinkInfo {
    /// Ethernet (the only link type the path speaks).
    pub ethernet: bool,
    pub mac: [u8; 6],
    pub rx_queues: u32,
}

/// The next hop toward a VTEP: the interface and the neighbour's MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct NextHop {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

impl Resolver {
    /// Opens the socket (in the calling thread's namespace).
    pub(super) fn new() -> io::Result<Resolver> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // A reply that never comes must not stall the datapath.
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: SO_RCVTIMEO reads a timeval through a pointer valid for the call.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(Resolver {
            socket,
            sequence: 0,
            buf: vec![0; 16384],
        })
    }

    /// One request and its one answer (or the kernel's error).
    fn ask(&mut self, request: RouteNetlinkMessage) -> io::Result<RouteNetlinkMessage> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = self.sequence;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(request));
        msg.finalize();
        let mut out = vec![0; msg.buffer_len()];
        msg.serialize(&mut out);
        self.socket.send(&out, 0)?;
        loop {
            let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            if reply.header.sequence_number != self.sequence {
                continue; // a late answer to an earlier, timed-out question
            }
            return match reply.payload {
                NetlinkPayload::InnerMessage(m) => Ok(m),
                NetlinkPayload::Error(e) => Err(e
                    .code
                    .map(|c| io::Error::from_raw_os_error(-c.get()))
                    .unwrap_or_else(|| io::Error::other("empty netlink answer"))),
                _ => Err(io::Error::other("unexpected netlink answer")),
            };
        }
    }

    /// The interface `ifindex` as the kernel describes it (asked over netlink, which answers
    /// for the calling thread's namespace, unlike `/sys`, which shows the mounter's).
    pub(super) fn link(&mut self, ifindex: u32) -> io::Result<LinkInfo> {
        let mut link = LinkMessage::default();
        link.header.index = ifindex;
        let RouteNetlinkMessage::NewLink(answer) = self.ask(RouteNetlinkMessage::GetLink(link))?
        else {
            return Err(io::Error::other("unexpected netlink answer"));
        };
        let mut info = LinkInfo {
            ethernet: answer.header.link_layer_type == LinkLayerType::Ether,
            mac: [0; 6],
            rx_queues: 1,
        };
        for a in &answer.attributes {
            match a {
                LinkAttribute::Address(m) if m.len() == 6 => info.mac.copy_from_slice(m),
                LinkAttribute::NumRxQueues(n) => info.rx_queues = *n,
                _ => {}
            }
        }
        Ok(info)
    }

    /// The next hop the kernel would use for `to` (from `from`), if it has resolved it.
    pub(super) fn next_hop(&mut self, from: IpAddr, to: IpAddr) -> io::Result<Option<NextHop>> {
        let mut route = RouteMessage::default();
        route.header.address_family = family(to);
        route.header.destination_prefix_length = if to.is_ipv4() { 32 } else { 128 };
        route
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::from(to)));
        route
            .attributes
            .push(RouteAttribute::Source(RouteAddress::from(from)));
        route.header.source_prefix_length = if from.is_ipv4() { 32 } else { 128 };
        let RouteNetlinkMessage::NewRoute(answer) =
            self.ask(RouteNetlinkMessage::GetRoute(route))?
        else {
            return Ok(None);
        };
        let mut ifindex = None;
        let mut gateway = None;
        for a in &answer.attributes {
            match a {
                RouteAttribute::Oif(i) => ifindex = Some(*i),
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(IpAddr::V4(*g)),
                RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gateway = Some(IpAddr::V6(*g)),
                _ => {}
            }
        }
        let Some(ifindex) = ifindex else {
            return Ok(None);
        };
        let hop = gateway.unwrap_or(to);
        let mut neigh = NeighbourMessage::default();
        neigh.header.family = family(hop);
        neigh.header.ifindex = ifindex;
        neigh
            .attributes
            .push(NeighbourAttribute::Destination(match hop {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        let answer = match self.ask(RouteNetlinkMessage::GetNeighbour(neigh)) {
            Ok(RouteNetlinkMessage::NewNeighbour(n)) => n,
            Ok(_) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        let usable = matches!(
            answer.header.state,
            NeighbourState::Reachable
                | NeighbourState::Stale
                | NeighbourState::Delay
                | NeighbourState::Probe
                | NeighbourState::Permanent
        );
        if !usable {
            return Ok(None);
        }
        Ok(answer.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(mac) if mac.len() == 6 => Some(NextHop {
                ifindex,
                mac: [mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]],
            }),
            _ => None,
        }))
    }
}
