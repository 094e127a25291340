//! The AF_XDP path of a VXLAN uplink: VXLAN frames move between the switch and the underlay
//! interface through an AF_XDP socket's rings instead of the kernel's UDP stack.
//!
//! - [`program`]: the XDP program that steers only VXLAN for this switch's address and port
//!   to the socket (everything else goes on to the kernel), and its loading and attaching.
//! - [`xsk`]: the socket, its UMEM and its four rings.
//! - [`route`]: the kernel's route and neighbour table, asked for each remote VTEP's next
//!   hop.
//!
//! Received frames are validated whole ([`overlay_net::decap::decapsulate`]: IP header
//! checksum, lengths, no fragments, address, port, UDP checksum); sent frames get their outer
//! headers from a per-tunnel template ([`overlay_net::encap::Encapsulator`]). The UDP socket
//! stays bound beside it: it takes what the program passes to the kernel (fragments, IPv4
//! options) and sends to VTEPs whose next hop the kernel has not resolved yet (which makes it
//! resolve them).

mod program;
mod route;
mod xsk;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use overlay_net::decap::{DecapConfig, Decapsulated, decapsulate};
use overlay_net::encap::{Encapsulator, TunnelConfig};
use overlay_net::{Layer, MacAddr, UnderlayFamily, vxlan};

pub use program::AttachMode;

/// How often a tunnel's next hop is asked of the kernel again (a neighbour's MAC can change).
const RECHECK: Duration = Duration::from_secs(1);
/// How soon again while the kernel has none (it is resolving it: the socket path's first
/// datagram made it ask).
const RECHECK_UNRESOLVED: Duration = Duration::from_millis(20);

/// A remote VTEP's outer headers, while the kernel has a next hop for it.
struct Tunnel {
    encap: Option<Encapsulator>,
    /// When the last answer came.
    checked: Instant,
    /// A question about it is with the lookup thread, asked then.
    pending: bool,
    asked: Instant,
    /// When a datagram last went (or tried to go) to it.
    used: Instant,
    /// The kernel routes it out of another interface.
    elsewhere: bool,
}

/// Tunnels kept before idle ones are forgotten.
const MAX_TUNNELS: usize = 4096;
/// Idle this long, a tunnel is forgotten (once there are more than [`MAX_TUNNELS`]).
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// An answer not back after this long is asked for again.
const ANSWER_DEADLINE: Duration = Duration::from_secs(5);

/// What became of a datagram handed to [`XdpPath::send`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// On the transmit ring.
    Queued,
    /// Dropped (the ring or the frames are full, or it is not VXLAN).
    Dropped,
    /// No next hop on this interface: send it through the socket.
    NoPath,
}

/// The XDP program on the underlay interface, shared by the AF_XDP paths of every worker
/// (one socket per receive queue, all in its map). The program is detached when the last
/// path lets go of it.
pub(crate) struct XdpAttachment {
    // Drop order: the link (detaching the program) first, then the program and the map.
    _link: OwnedFd,
    _program: OwnedFd,
    map: OwnedFd,
    ifindex: u32,
    interface: String,
    mode: AttachMode,
    info: route::LinkInfo,
    local: SocketAddr,
    underlay_mtu: u16,
    udp6_zero_checksum: crate::uplink::Udp6ZeroChecksum,
}

impl std::fmt::Debug for XdpAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "XDP program on {} for {}", self.interface, self.local)
    }
}

impl XdpAttachment {
    /// Receive queues of the interface: how many workers can have an AF_XDP socket.
    pub(crate) fn queues(&self) -> u32 {
        self.info.rx_queues
    }
}

/// The AF_XDP half of an uplink.
pub(crate) struct XdpPath {
    // Drop order: the socket first (the kernel takes it out of the map), then the program if
    // this was the last path holding it.
    xsk: xsk::Xsk,
    attachment: std::sync::Arc<XdpAttachment>,
    ifindex: u32,
    queue: u32,
    local_mac: MacAddr,
    local: IpAddr,
    underlay_mtu: u16,
    udp6_zero_checksum_tx: bool,
    decap: DecapConfig,
    /// The peer across the link is a stack on this host (a veth): partial checksums arrive.
    local_peer: bool,
    lookups: route::Lookups,
    tunnels: HashMap<(IpAddr, u16), Tunnel>,
    /// When idle tunnels were last forgotten.
    swept: Instant,
}

impl std::fmt::Debug for XdpPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The interface that holds `ip` (in the calling thread's namespace), by name.
fn interface_of(ip: IpAddr) -> io::Result<String> {
    let found = nix::ifaddrs::getifaddrs()?.find(|ifa| {
        ifa.address.as_ref().is_some_and(|a| {
            a.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())) == Some(ip)
                || a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())) == Some(ip)
        })
    });
    found
        .map(|ifa| ifa.interface_name)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no interface has {ip}")))
}

fn unsupported(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, why)
}

/// Decapsulates a frame from the wire or from a stack on this host. A Linux vxlan device that
/// offloads the inner checksum (its default on a veth) computes the outer UDP checksum over
/// the inner packet as it will be once the "hardware" finishes the inner checksum (local
/// checksum offload); over a veth nobody finishes it, and XDP cannot tell (no
/// `CHECKSUM_PARTIAL` flag as `AF_PACKET` has). So when the outer checksum fails, the inner
/// checksum is finished ([`overlay_net::gso::finish_partial_checksum`]: only a field holding
/// exactly the pseudo-header sum is touched) and the outer one checked again: it passes only
/// if it covers the finished packet.
fn decapsulate_finishing<'a>(
    frame: &'a mut [u8],
    cfg: &DecapConfig,
    local_peer: bool,
) -> Result<Decapsulated<'a>, overlay_net::Error> {
    // Where the parts are (offsets, so that the frame can be changed in between).
    let locate = |frame: &[u8], cfg: &DecapConfig| {
        decapsulate(frame, cfg).map(|d| {
            let start = d.inner.as_ptr() as usize - frame.as_ptr() as usize;
            (d.vni, d.source, d.source_port, start..start + d.inner.len())
        })
    };
    let found = match locate(frame, cfg) {
        Err(overlay_net::Error::UdpChecksum) if local_peer => {
            let unchecked = DecapConfig {
                udp_checksum_verified: true,
                ..*cfg
            };
            match locate(frame, &unchecked) {
                Ok((.., inner))
                    if overlay_net::gso::finish_partial_checksum(&mut frame[inner.clone()]) =>
                {
                    locate(frame, cfg)
                }
                _ => Err(overlay_net::Error::UdpChecksum),
            }
        }
        other => other,
    };
    found.map(|(vni, source, source_port, inner)| Decapsulated {
        vni,
        source,
        source_port,
        inner: &frame[inner],
    })
}

/// The outer headers for `vtep`:`port` from `local`; None while the kernel has no next hop
/// for it on this interface (or none is known yet). Asks the lookup thread again when the
/// last answer is old (answers are taken in by [`XdpPath::refresh`]).
fn tunnel<'t>(
    tunnels: &'t mut HashMap<(IpAddr, u16), Tunnel>,
    lookups: &route::Lookups,
    local: IpAddr,
    vtep: IpAddr,
    port: u16,
) -> Option<&'t Encapsulator> {
    let now = Instant::now();
    let t = tunnels.entry((vtep, port)).or_insert(Tunnel {
        encap: None,
        checked: now.checked_sub(RECHECK).unwrap_or(now),
        pending: false,
        asked: now,
        used: now,
        elsewhere: false,
    });
    t.used = now;
    let every = if t.encap.is_some() || t.elsewhere {
        RECHECK
    } else {
        RECHECK_UNRESOLVED
    };
    // An answer overdue (the thread stuck or gone) does not block asking again.
    let waiting = t.pending && now.duration_since(t.asked) < ANSWER_DEADLINE;
    if !waiting && now.duration_since(t.checked) >= every {
        t.pending = lookups.ask(local, vtep, port);
        t.asked = now;
    }
    t.encap.as_ref()
}

/// True for an address a packet from another host may come from (what the kernel's IP layer
/// does not drop as a martian): not unspecified, "this network" (0/8), loopback, multicast,
/// broadcast, or an IPv4-mapped IPv6 address.
fn unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.octets()[0] == 0 || a.is_loopback() || a.is_multicast() || a.is_broadcast())
        }
        IpAddr::V6(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.to_ipv4_mapped().is_some())
        }
    }
}

impl XdpPath {
    /// Opens the AF_XDP path for the uplink bound to `local` on queue `queue` of the
    /// interface that holds its address: the XDP program attached, the socket bound to the
    /// queue and entered in the program's map. Fails (and leaves nothing attached) where the
    /// interface, its driver or the kernel cannot.
    pub(crate) fn open(
        local: SocketAddr,
        underlay_mtu: u16,
        udp6_zero_checksum: crate::uplink::Udp6ZeroChecksum,
        queue: u32,
        zero_copy_only: bool,
    ) -> io::Result<XdpPath> {
        let interface = interface_of(local.ip())?;
        let ifindex = nix::net::if_::if_nametoindex(interface.as_str())?;
        let mut resolver = route::Resolver::new()?;
        let info = resolver.link(ifindex)?;
        if !info.ethernet {
            return Err(unsupported(format!(
                "{interface} is not an Ethernet interface"
            )));
        }
        if info.mtu < u32::from(underlay_mtu) {
            return Err(unsupported(format!(
                "{interface}'s MTU {} is below the underlay MTU {underlay_mtu}",
                info.mtu
            )));
        }
        if usize::from(underlay_mtu) + 14 > xsk::FRAME_ROOM {
            return Err(unsupported(format!(
                "an underlay MTU of {underlay_mtu} does not fit AF_XDP frames of {} bytes",
                xsk::FRAME_ROOM
            )));
        }
        let queues = info.rx_queues;
        if queue >= queues {
            return Err(unsupported(format!(
                "{interface} has {queues} receive queue(s), not a queue {queue}"
            )));
        }
        let map = program::create_xsk_map(queues.max(1))?;
        let prog = program::load(local.ip(), local.port(), &map, xsk::FRAME_ROOM as u16)?;
        let xsk = xsk::Xsk::bind(ifindex, queue)?;
        if zero_copy_only && xsk.copy_mode {
            return Err(unsupported(format!(
                "{interface}'s driver runs AF_XDP in copy mode only"
            )));
        }
        program::set_xsk(&map, queue, xsk.fd())?;
        let (link, mode) = program::attach(&prog, ifindex).map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                io::Error::new(
                    e.kind(),
                    format!("another XDP program is attached to {interface}"),
                )
            } else {
                e
            }
        })?;
        let attachment = std::sync::Arc::new(XdpAttachment {
            _link: link,
            _program: prog,
            map,
            ifindex,
            interface,
            mode,
            info,
            local,
            underlay_mtu,
            udp6_zero_checksum,
        });
        XdpPath::with_socket(attachment, xsk, queue, resolver)
    }

    /// The AF_XDP path of another worker on the interface `attachment` holds: a socket on
    /// queue `queue`, entered in the program's map (from then on that queue's VXLAN comes to
    /// it).
    pub(crate) fn join(
        attachment: std::sync::Arc<XdpAttachment>,
        queue: u32,
        zero_copy_only: bool,
    ) -> io::Result<XdpPath> {
        let a = &attachment;
        if queue >= a.info.rx_queues {
            return Err(unsupported(format!(
                "{} has {} receive queue(s), not a queue {queue}",
                a.interface, a.info.rx_queues
            )));
        }
        let xsk = xsk::Xsk::bind(a.ifindex, queue)?;
        if zero_copy_only && xsk.copy_mode {
            return Err(unsupported(format!(
                "{}'s driver runs AF_XDP in copy mode only on queue {queue}",
                a.interface
            )));
        }
        program::set_xsk(&a.map, queue, xsk.fd())?;
        let resolver = route::Resolver::new()?;
        XdpPath::with_socket(attachment, xsk, queue, resolver)
    }

    fn with_socket(
        attachment: std::sync::Arc<XdpAttachment>,
        xsk: xsk::Xsk,
        queue: u32,
        resolver: route::Resolver,
    ) -> io::Result<XdpPath> {
        let (local, info) = (attachment.local, attachment.info);
        let zero = attachment.udp6_zero_checksum;
        Ok(XdpPath {
            xsk,
            ifindex: attachment.ifindex,
            queue,
            local_mac: MacAddr(info.mac),
            local: local.ip(),
            underlay_mtu: attachment.underlay_mtu,
            udp6_zero_checksum_tx: local.is_ipv6() && zero.tx,
            decap: DecapConfig {
                udp_port: local.port(),
                local_ip: Some(local.ip()),
                accept_zero_udp6_checksum: zero.rx,
                udp_checksum_verified: false,
                // A stack on this host across a veth leaves checksums to an offload that XDP
                // cannot see is pending (a plain UDP socket, as this switch's socket path).
                accept_partial_udp_checksum: info.veth,
            },
            local_peer: info.veth,
            lookups: route::Lookups::start(resolver)?,
            tunnels: HashMap::new(),
            swept: Instant::now(),
            attachment,
        })
    }

    /// The program this path's socket is in the map of, for the other workers to join.
    pub(crate) fn attachment(&self) -> std::sync::Arc<XdpAttachment> {
        self.attachment.clone()
    }

    /// One line for the log: which interface, queue and mode.
    pub(crate) fn describe(&self) -> String {
        format!(
            "AF_XDP on {} queue {} ({} XDP, {})",
            self.attachment.interface,
            self.queue,
            match self.attachment.mode {
                AttachMode::Driver => "native",
                AttachMode::Generic => "generic",
            },
            if self.xsk.copy_mode {
                "copy mode"
            } else {
                "zero-copy"
            }
        )
    }

    /// The socket, readable when frames arrived (for epoll).
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.xsk.fd().as_fd()
    }

    /// Calls `f` with each received frame, decapsulated and validated (up to `most`).
    pub(crate) fn receive(
        &mut self,
        most: usize,
        mut f: impl FnMut(Result<Decapsulated<'_>, overlay_net::Error>),
    ) -> usize {
        let (cfg, mac, local, local_peer) =
            (self.decap, self.local_mac, self.local, self.local_peer);
        self.xsk.receive(most, |frame| {
            if frame.get(..6) != Some(&mac.0[..]) {
                f(Err(overlay_net::Error::Malformed {
                    layer: Layer::Ethernet,
                    what: "destination MAC is not this interface's",
                }));
                return;
            }
            // What the kernel's IP layer would drop as a martian source, it drops too.
            f(
                decapsulate_finishing(frame, &cfg, local_peer).and_then(|d| {
                    if d.source == local || !unicast(d.source) {
                        Err(overlay_net::Error::Malformed {
                            layer: Layer::Ethernet,
                            what: "outer source is not another host's unicast address",
                        })
                    } else {
                        Ok(d)
                    }
                }),
            );
        })
    }

    /// Takes in the lookup thread's answers (without waiting). Called once per batch of
    /// sends, never within one, so that a run of datagrams to one VTEP goes one way whole.
    pub(crate) fn refresh(&mut self) {
        let now = Instant::now();
        while let Some((key, answer)) = self.lookups.answer() {
            let Some(t) = self.tunnels.get_mut(&key) else {
                continue;
            };
            t.pending = false;
            t.checked = now;
            match answer {
                // The kernel did not answer in time (RTNL held): keep what was known.
                Err(_) => {}
                Ok(Some(hop)) if hop.ifindex == self.ifindex => {
                    let mut cfg =
                        TunnelConfig::new(self.local_mac, MacAddr(hop.mac), self.local, key.0);
                    cfg.udp_port = key.1;
                    cfg.underlay_mtu = self.underlay_mtu;
                    cfg.udp6_zero_checksum = self.udp6_zero_checksum_tx;
                    t.encap = Encapsulator::new(&cfg).ok();
                    t.elsewhere = false;
                }
                // Routed out of another interface: the socket's, until the route changes.
                Ok(Some(_)) => {
                    t.encap = None;
                    t.elsewhere = true;
                }
                Ok(None) => {
                    t.encap = None;
                    t.elsewhere = false;
                }
            }
        }
        // Tunnels to VTEPs nobody sends to any more are forgotten (learned VTEPs come and go).
        if self.tunnels.len() > MAX_TUNNELS && now.duration_since(self.swept) >= RECHECK {
            self.swept = now;
            self.tunnels
                .retain(|_, t| now.duration_since(t.used) < FORGET_AFTER);
        }
    }

    /// Queues `datagram` (VXLAN header and inner frame) for `vtep`:`port`; sent by
    /// [`Self::transmit`].
    pub(crate) fn send(&mut self, vtep: IpAddr, port: u16, datagram: &[u8]) -> Sent {
        if UnderlayFamily::of(vtep) != UnderlayFamily::of(self.local) {
            return Sent::NoPath;
        }
        // One lookup per datagram; the socket and the tunnels are borrowed apart.
        let Some(encap) = tunnel(&mut self.tunnels, &self.lookups, self.local, vtep, port) else {
            return Sent::NoPath;
        };
        let Ok((vni, inner)) = vxlan::parse(datagram) else {
            return Sent::Dropped;
        };
        if self.xsk.queue(|buf| encap.encap(vni, inner, buf).ok()) {
            Sent::Queued
        } else {
            Sent::Dropped
        }
    }

    /// True if datagrams for `vtep`:`port` go this way (until the next [`Self::refresh`]).
    pub(crate) fn reaches(&mut self, vtep: IpAddr, port: u16) -> bool {
        UnderlayFamily::of(vtep) == UnderlayFamily::of(self.local)
            && tunnel(&mut self.tunnels, &self.lookups, self.local, vtep, port).is_some()
    }

    /// Sends what was queued.
    pub(crate) fn transmit(&mut self) {
        self.xsk.transmit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn martian_sources_are_not_unicast() {
        for bad in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "ff02::1",
            "::ffff:198.18.0.1",
        ] {
            assert!(!unicast(bad.parse().unwrap()), "{bad}");
        }
        for good in ["198.18.0.1", "10.0.0.1", "fd00:18::1", "2001:db8::1"] {
            assert!(unicast(good.parse().unwrap()), "{good}");
        }
    }
}
