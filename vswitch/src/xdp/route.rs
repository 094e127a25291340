//! Where a datagram for a remote VTEP goes on the wire, asked of the kernel: its route
//! (`RTM_GETROUTE`: output interface and gateway) and the link-layer address of the next hop
//! in its neighbour table (`RTM_GETNEIGH`). The kernel stays the authority for both; frames
//! for a VTEP whose next hop it has not resolved go through the UDP socket, which makes the
//! kernel resolve it.

use std::io;
use std::net::IpAddr;

use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::link::{
    InfoKind, LinkAttribute, LinkInfo as Info, LinkLayerType, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
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
    pub mtu: u32,
    /// A veth: its peer is a stack on this host (partial checksums arrive).
    pub veth: bool,
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
        // A reply that never comes must not hang the asker.
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO reads a timeval through a pointer valid for the call.
        let r = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Resolver {
            socket,
            sequence: 0,
            buf: vec![0; 16384],
        })
    }

    /// One request and its one answer (or the kernel's error).
    fn ask(&mut self, request: RouteNetlinkMessage) -> io::Result<RouteNetlinkMessage> {
        self.request(request, false)?
            .ok_or_else(|| io::Error::other("empty netlink answer"))
    }

    /// One request and its answer; with `ack`, a success is an error message without a code
    /// (`Ok(None)`).
    fn request(
        &mut self,
        request: RouteNetlinkMessage,
        ack: bool,
    ) -> io::Result<Option<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | if ack { NLM_F_ACK } else { 0 };
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
                NetlinkPayload::InnerMessage(m) => Ok(Some(m)),
                NetlinkPayload::Error(e) => match e.code {
                    Some(c) => Err(io::Error::from_raw_os_error(-c.get())),
                    None => Ok(None),
                },
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
            mtu: 0,
            veth: false,
        };
        for a in &answer.attributes {
            match a {
                LinkAttribute::Address(m) if m.len() == 6 => info.mac.copy_from_slice(m),
                LinkAttribute::NumRxQueues(n) => info.rx_queues = *n,
                LinkAttribute::Mtu(m) => info.mtu = *m,
                LinkAttribute::LinkInfo(infos) => {
                    info.veth |= infos
                        .iter()
                        .any(|i| matches!(i, Info::Kind(InfoKind::Veth)));
                }
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
        // Entries another agent owns (an EVPN daemon's, kernel-managed ones) are left alone:
        // a "use" request would clear their flags.
        let owned_elsewhere = answer.header.flags.contains(NeighbourFlags::ExtLearned)
            || answer
                .attributes
                .iter()
                .any(|a| matches!(a, NeighbourAttribute::ExtFlags(f) if !f.is_empty()));
        if answer.header.state == NeighbourState::Stale && !owned_elsewhere {
            // Our frames bypass the kernel, so nothing of its own would make it confirm a
            // stale entry (and notice a changed MAC): "use" it, as a send would, which starts
            // the kernel's probing (a delay, then unicast probes).
            let mut used = NeighbourMessage::default();
            used.header.family = family(hop);
            used.header.ifindex = ifindex;
            used.header.flags = NeighbourFlags::Use;
            used.attributes
                .push(NeighbourAttribute::Destination(match hop {
                    IpAddr::V4(a) => NeighbourAddress::Inet(a),
                    IpAddr::V6(a) => NeighbourAddress::Inet6(a),
                }));
            let _ = self.request(RouteNetlinkMessage::NewNeighbour(used), true);
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

/// Asks the kernel for next hops on a thread of its own (created in the caller's network
/// namespace, which it inherits), so that no netlink round trip (which may wait for the
/// kernel's RTNL lock) ever stalls a datapath worker: the worker sends questions and picks up
/// answers without blocking.
pub(super) struct Lookups {
    questions: std::sync::mpsc::SyncSender<(IpAddr, IpAddr, u16)>,
    answers: std::sync::mpsc::Receiver<Answer>,
}

/// The answer about a VTEP (address, port): its next hop, none, or why the kernel could not
/// be asked.
pub(super) type Answer = ((IpAddr, u16), io::Result<Option<NextHop>>);

impl Lookups {
    /// Starts the thread with `resolver`.
    pub(super) fn start(mut resolver: Resolver) -> io::Result<Lookups> {
        let (questions, asked) = std::sync::mpsc::sync_channel::<(IpAddr, IpAddr, u16)>(256);
        let (tell, answers) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("vswitch-xdp-nh".into())
            .spawn(move || {
                // Ends when the datapath side drops its sender.
                while let Ok((from, to, port)) = asked.recv() {
                    let hop = resolver.next_hop(from, to);
                    if tell.send(((to, port), hop)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Lookups { questions, answers })
    }

    /// Asks for the next hop toward `to` (from `from`) for VTEP port `port`; false if the
    /// question queue is full (to be asked again later).
    pub(super) fn ask(&self, from: IpAddr, to: IpAddr, port: u16) -> bool {
        self.questions.try_send((from, to, port)).is_ok()
    }

    /// An answer, if one came (an error: the kernel could not be asked, or did not answer).
    pub(super) fn answer(&self) -> Option<Answer> {
        self.answers.try_recv().ok()
    }
}
