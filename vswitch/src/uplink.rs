//! The VXLAN uplink: a UDP socket on an underlay address, with batched receive (`recvmmsg`)
//! and send (`sendmmsg`) of up to [`BATCH`] datagrams per system call. The kernel builds and
//! checks the outer IP and UDP headers; the switch adds and strips the VXLAN header.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use overlay_net::gso::Coalesced;
use overlay_net::{UnderlayFamily, Vni, mtu, vxlan};

use crate::Error;

/// `UDP_SEGMENT` (linux/udp.h): the segment size of a UDP GSO send.
const UDP_SEGMENT: libc::c_int = 103;

/// Most datagrams in one UDP GSO send (the kernel's UDP_MAX_SEGMENTS is 64 or more).
const MAX_GSO_SEGMENTS: usize = 64;
/// Most bytes in one UDP GSO send (one IP packet before it is cut).
const MAX_GSO_BYTES: usize = 65000;

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Room for one datagram: VXLAN header + the largest inner frame of a 9000-byte underlay.
const SLOT: usize = 9216;

/// Fixed buffers for a batch: nothing is allocated per datagram.
struct Slots {
    data: Box<[u8]>,
    lens: [usize; BATCH],
    addrs: [libc::sockaddr_storage; BATCH],
    /// The sending socket of each datagram (by its inner flow).
    senders: [u8; BATCH],
}

impl Slots {
    fn new() -> Slots {
        Slots {
            data: vec![0u8; SLOT * BATCH].into_boxed_slice(),
            lens: [0; BATCH],
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            addrs: unsafe { std::mem::zeroed() },
            senders: [0; BATCH],
        }
    }

    fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.data[i * SLOT..(i + 1) * SLOT]
    }
}

/// `UDP_NO_CHECK6_TX` (linux/udp.h): send IPv6 UDP with a zero checksum (RFC 6935).
const UDP_NO_CHECK6_TX: libc::c_int = 101;
/// `UDP_NO_CHECK6_RX` (linux/udp.h): accept IPv6 UDP with a zero checksum (RFC 6936).
const UDP_NO_CHECK6_RX: libc::c_int = 102;

/// Zero UDP checksums on an IPv6 underlay (RFC 6935/6936), as Linux vxlan's
/// `udp6zerocsumtx` / `udp6zerocsumrx`. Both off by default: IPv6 UDP carries a checksum
/// (RFC 8200 §8.1) and Linux drops zero-checksum datagrams unless told otherwise. Ignored on
/// IPv4, where VXLAN's zero checksum is always accepted (RFC 7348).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Udp6ZeroChecksum {
    /// Send with a zero outer UDP checksum. The kernel then takes no UDP GSO sends (it
    /// refuses segmentation without a checksum): datagrams go one by one.
    pub tx: bool,
    /// Accept datagrams with a zero outer UDP checksum (peers with `udp6zerocsumtx`).
    pub rx: bool,
}

/// `UDP_GRO` (linux/udp.h): receive coalesced datagrams, with their segment size in a cmsg.
const UDP_GRO: libc::c_int = 104;
/// Room for one received message: with UDP GRO the kernel hands over up to 64 KiB of
/// same-sized datagrams from one sender at once.
const RX_SLOT: usize = 65536;
/// Control-message room per received message (one `UDP_GRO` int).
const RX_CONTROL: usize = 8;

/// Fixed buffers for a received batch, and where each datagram in it lies.
struct RxBatch {
    data: Box<[u8]>,
    addrs: [libc::sockaddr_storage; BATCH],
    control: [[u64; RX_CONTROL]; BATCH],
    /// Datagrams: start, length, index of the message (and sender) they came in.
    datagrams: Vec<(usize, usize, usize)>,
}

impl RxBatch {
    fn new() -> RxBatch {
        RxBatch {
            data: vec![0u8; RX_SLOT * BATCH].into_boxed_slice(),
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            addrs: unsafe { std::mem::zeroed() },
            control: [[0; RX_CONTROL]; BATCH],
            datagrams: Vec::with_capacity(BATCH * 8),
        }
    }
}

/// The segment size of a coalesced message (its `UDP_GRO` control message), if any.
fn gro_segment_size(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: `h` is a header the kernel filled in; CMSG_FIRSTHDR/NXTHDR stay within
    // msg_control..msg_controllen, and every cmsg they return is readable.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(size).ok().filter(|s| *s > 0);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// A received datagram as VXLAN: the VNI and inner frame, or why it is not valid VXLAN.
pub type Parsed<'a> = Result<(Vni, &'a [u8]), overlay_net::Error>;

/// One underlay socket.
pub struct Uplink {
    /// Bound to the VXLAN port: receives (peers send to that port).
    socket: UdpSocket,
    /// Send, each from its own ephemeral port: a datagram leaves from the one its inner flow
    /// hashes to, so that a tenant's flows spread over the underlay's paths and a receiver's
    /// queues (RFC 7348 §5) while each flow keeps one port (no reordering). They receive
    /// nothing (a filter drops whatever is sent to them).
    senders: Vec<UdpSocket>,
    port: u16,
    family: UnderlayFamily,
    underlay_mtu: u16,
    rx: RxBatch,
    tx: Slots,
    tx_count: usize,
    tx_dropped: u64,
    /// Runs of queued datagrams go out as one UDP GSO send (until the kernel refuses one).
    gso: bool,
    /// The AF_XDP path, when attached ([`Self::attach_xdp`]).
    xdp: Option<crate::xdp::XdpPath>,
    /// Datagrams received through the AF_XDP path so far.
    xdp_received: u64,
    /// Datagrams sent through the AF_XDP path so far.
    xdp_sent: u64,
    udp6_zero_checksum: Udp6ZeroChecksum,
}

/// How an uplink meets the underlay (`socket`, `xdp` or `auto` in configuration files).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UplinkIo {
    /// The kernel's UDP stack (`recvmmsg`/`sendmmsg` with GRO/GSO): works everywhere.
    #[default]
    Socket,
    /// AF_XDP on the underlay interface (an XDP program steers this switch's VXLAN to the
    /// switch, the rest goes to the kernel); starting fails where it cannot run.
    Xdp,
    /// AF_XDP where the driver runs it zero-copy, the socket elsewhere (the log says which
    /// one runs and why). In copy mode (veth, drivers without AF_XDP support) every frame
    /// becomes an skb on its way anyway, one by one, while the socket path moves up to 64
    /// datagrams per skb with UDP GSO/GRO: `compare vhost-net` measures the socket path
    /// several times faster over veths.
    Auto,
}

impl std::str::FromStr for UplinkIo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "socket" => Ok(UplinkIo::Socket),
            "xdp" => Ok(UplinkIo::Xdp),
            "auto" => Ok(UplinkIo::Auto),
            other => Err(format!("{other:?} is not one of socket, xdp, auto")),
        }
    }
}

impl std::fmt::Debug for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uplink")
            .field("local", &self.socket.local_addr().ok())
            .field("underlay_mtu", &self.underlay_mtu)
            .finish()
    }
}

/// Why a frame could not be queued for the underlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// The encapsulated packet would exceed the underlay MTU (never fragmented).
    TooBig,
    /// The remote VTEP's address family differs from this socket's.
    WrongFamily,
}

fn to_sockaddr(addr: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

fn from_sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (ss_family says so); storage is aligned.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 (ss_family says so); storage is aligned.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Receive and send buffer size of an uplink socket.
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// Sets an integer socket option.
/// Gives a socket 4 MiB send and receive buffers (as much as `net.core.[rw]mem_max`
/// allows without CAP_NET_ADMIN): room for bursts of 64 KiB super-frames while a worker
/// shares its core.
pub(crate) fn grow_socket_buffers(socket: &impl AsRawFd) {
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if set_int_option(socket, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
            let _ = set_int_option(socket, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
        }
    }
}

pub(crate) fn set_int_option(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is one int read through a pointer valid for the call.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A UDP socket bound to `local` with `SO_REUSEPORT` set before the bind.
fn bind_reuse_port(local: SocketAddr) -> io::Result<UdpSocket> {
    let domain = match local {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: socket() takes plain integers; the result is checked below.
    let fd = unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: SO_REUSEPORT reads one int through the pointer, which is valid for the call.
    let rc = unsafe {
        libc::setsockopt(
            owned.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = to_sockaddr(local, &mut addr);
    // SAFETY: `addr` holds a sockaddr of `len` bytes for the call's duration.
    if unsafe { libc::bind(owned.as_raw_fd(), (&raw const addr).cast(), len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UdpSocket::from(owned))
}

impl Uplink {
    /// Binds the VXLAN port on `local` (call in the underlay's network namespace). With
    /// `shared`, the socket joins a `SO_REUSEPORT` group: several uplinks (one per datapath
    /// worker) then share the address and the kernel spreads received datagrams over them by
    /// their address/port 4-tuple, which keeps each flow on one socket, in order.
    ///
    /// `zero_checksum` applies to an IPv6 `local` only (see [`Udp6ZeroChecksum`]).
    pub fn bind(
        local: SocketAddr,
        underlay_mtu: u16,
        shared: bool,
        zero_checksum: Udp6ZeroChecksum,
    ) -> Result<Uplink, Error> {
        let family = UnderlayFamily::of(local.ip());
        if mtu::inner_mtu(underlay_mtu, family).is_none() {
            return Err(Error::invalid(
                "underlay MTU",
                format!("{underlay_mtu} is too small"),
            ));
        }
        let socket = if shared {
            bind_reuse_port(local)
                .map_err(|e| Error::Io(format!("bind {local} (SO_REUSEPORT)"), e))?
        } else {
            UdpSocket::bind(local).map_err(|e| Error::Io(format!("bind {local}"), e))?
        };
        socket
            .set_nonblocking(true)
            .map_err(|e| Error::Io("set_nonblocking".into(), e))?;
        // Where the kernel can (UDP GRO on the underlay device), take runs of datagrams in
        // one piece: fewer, larger receives. Without it datagrams come one by one.
        let _ = set_int_option(&socket, libc::SOL_UDP, UDP_GRO, 1);
        // Room for bursts: a few GRO'd 64 KiB datagrams fill the default 208 KiB, and a
        // worker that falls behind for a moment (sharing a core) would drop what comes next.
        grow_socket_buffers(&socket);
        let senders = (0..SENDERS)
            .map(|_| sender_socket(local.ip()))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| Error::Io(format!("bind a sending socket on {}", local.ip()), e))?;
        let v6 = family == UnderlayFamily::V6;
        if v6 && zero_checksum.rx {
            set_int_option(&socket, libc::SOL_UDP, UDP_NO_CHECK6_RX, 1)
                .map_err(|e| Error::Io("UDP_NO_CHECK6_RX".into(), e))?;
        }
        if v6 && zero_checksum.tx {
            for s in &senders {
                set_int_option(s, libc::SOL_UDP, UDP_NO_CHECK6_TX, 1)
                    .map_err(|e| Error::Io("UDP_NO_CHECK6_TX".into(), e))?;
            }
        }
        Ok(Uplink {
            socket,
            senders,
            port: local.port(),
            family,
            underlay_mtu,
            rx: RxBatch::new(),
            tx: Slots::new(),
            tx_count: 0,
            tx_dropped: 0,
            // The kernel refuses UDP GSO without a checksum (EINVAL).
            gso: !(v6 && zero_checksum.tx),
            xdp: None,
            xdp_received: 0,
            xdp_sent: 0,
            udp6_zero_checksum: zero_checksum,
        })
    }

    /// Adds the AF_XDP path on receive queue `queue` of the interface holding this uplink's
    /// address; returns what runs, for the log. On an error nothing is attached and the
    /// socket path goes on alone.
    ///
    /// With `zero_copy_only`, fails where the driver would run AF_XDP in copy mode (before
    /// anything is attached).
    pub fn attach_xdp(&mut self, queue: u32, zero_copy_only: bool) -> Result<String, Error> {
        let local = self
            .local_addr()
            .ok_or_else(|| Error::invalid("uplink", "socket has no address"))?;
        let path = crate::xdp::XdpPath::open(
            local,
            self.underlay_mtu,
            self.udp6_zero_checksum,
            queue,
            zero_copy_only,
        )
        .map_err(|e| Error::Io(format!("AF_XDP uplink on {}", local.ip()), e))?;
        // What the program passes on to the socket comes one by one (fragments, IPv4
        // options): no UDP GRO, which would also merge datagrams before a generic-mode program
        // sees them.
        let _ = set_int_option(&self.socket, libc::SOL_UDP, UDP_GRO, 0);
        let what = format!("{local}: {}", path.describe());
        self.xdp = Some(path);
        Ok(what)
    }

    /// Adds the AF_XDP path of another worker: a socket on queue `queue` in the program
    /// worker 0 attached ([`Self::xdp_attachment`] of its uplink).
    pub(crate) fn join_xdp(
        &mut self,
        attachment: std::sync::Arc<crate::xdp::XdpAttachment>,
        queue: u32,
        zero_copy_only: bool,
    ) -> Result<String, Error> {
        let local = self
            .local_addr()
            .ok_or_else(|| Error::invalid("uplink", "socket has no address"))?;
        let path = crate::xdp::XdpPath::join(attachment, queue, zero_copy_only)
            .map_err(|e| Error::Io(format!("AF_XDP uplink on {}", local.ip()), e))?;
        let _ = set_int_option(&self.socket, libc::SOL_UDP, UDP_GRO, 0);
        let what = format!("{local}: {}", path.describe());
        self.xdp = Some(path);
        Ok(what)
    }

    /// The XDP program of this uplink's AF_XDP path, for other workers to join.
    pub(crate) fn xdp_attachment(&self) -> Option<std::sync::Arc<crate::xdp::XdpAttachment>> {
        self.xdp.as_ref().map(|x| x.attachment())
    }

    /// The AF_XDP socket's descriptor, for epoll, when the AF_XDP path is attached.
    pub fn xdp_fd(&self) -> Option<BorrowedFd<'_>> {
        self.xdp.as_ref().map(|x| x.fd())
    }

    /// Datagrams received and sent through the AF_XDP path so far.
    pub fn xdp_counts(&self) -> (u64, u64) {
        (self.xdp_received, self.xdp_sent)
    }

    /// Receives up to [`BATCH`] frames from the AF_XDP socket, decapsulated; returns how
    /// many ([`Self::datagram`] reads them; frames that are not valid VXLAN for this switch
    /// read as errors).
    pub fn recv_xdp_batch(&mut self) -> usize {
        let Some(x) = self.xdp.as_mut() else {
            return 0;
        };
        let rx = &mut self.rx;
        rx.datagrams.clear();
        let unspecified = SocketAddr::new(
            match self.family {
                UnderlayFamily::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                UnderlayFamily::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            },
            0,
        );
        let mut msg = 0;
        let n = x.receive(BATCH, |r| {
            let start = msg * RX_SLOT;
            match r {
                Ok(d) if vxlan::HEADER_LEN + d.inner.len() <= RX_SLOT => {
                    let len = vxlan::HEADER_LEN + d.inner.len();
                    rx.data[start..start + vxlan::HEADER_LEN]
                        .copy_from_slice(&vxlan::header(d.vni));
                    rx.data[start + vxlan::HEADER_LEN..start + len].copy_from_slice(d.inner);
                    to_sockaddr(SocketAddr::new(d.source, d.source_port), &mut rx.addrs[msg]);
                    rx.datagrams.push((start, len, msg));
                }
                _ => {
                    // Kept as one empty datagram, rejected as malformed (and counted).
                    to_sockaddr(unspecified, &mut rx.addrs[msg]);
                    rx.datagrams.push((start, 0, msg));
                }
            }
            msg += 1;
        });
        self.xdp_received += n as u64;
        n
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.socket.local_addr().ok()
    }

    /// The underlay family.
    pub fn family(&self) -> UnderlayFamily {
        self.family
    }

    /// The tenant MTU this underlay carries.
    pub fn inner_mtu(&self) -> u16 {
        mtu::inner_mtu(self.underlay_mtu, self.family).unwrap_or(0)
    }

    /// The descriptor, for epoll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// True if an inner frame of `len` bytes fits the underlay once encapsulated.
    pub fn fits(&self, len: usize) -> bool {
        mtu::fits_underlay(len, self.underlay_mtu, self.family)
    }

    /// Receives up to [`BATCH`] messages (with UDP GRO each may hold many datagrams);
    /// returns how many datagrams arrived ([`Self::datagram`] reads them).
    pub fn recv_batch(&mut self) -> io::Result<usize> {
        let mut iov: [MaybeUninit<libc::iovec>; BATCH] = [MaybeUninit::uninit(); BATCH];
        // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let base = self.rx.data.as_mut_ptr();
        self.rx.datagrams.clear();
        for i in 0..BATCH {
            iov[i].write(libc::iovec {
                // SAFETY: slot i lies inside `data` (BATCH slots of RX_SLOT bytes).
                iov_base: unsafe { base.add(i * RX_SLOT) }.cast(),
                iov_len: RX_SLOT,
            });
            let h = &mut msgs[i].msg_hdr;
            h.msg_name = (&raw mut self.rx.addrs[i]).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = iov[i].as_mut_ptr();
            h.msg_iovlen = 1;
            h.msg_control = self.rx.control[i].as_mut_ptr().cast();
            h.msg_controllen = RX_CONTROL * 8;
        }
        // SAFETY: every header points at a live iovec, buffer, address and control slot owned
        // by self (or this frame) for the duration of the call.
        let n = unsafe {
            libc::recvmmsg(
                self.socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(0),
                _ => Err(e),
            };
        }
        for (i, m) in msgs.iter().enumerate().take(n as usize) {
            let start = i * RX_SLOT;
            let len = m.msg_len as usize;
            // Truncated messages (larger than a slot) are reported with MSG_TRUNC; keep them
            // as one empty datagram, so that they are rejected as malformed.
            if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.rx.datagrams.push((start, 0, i));
                continue;
            }
            match gro_segment_size(&m.msg_hdr) {
                Some(seg) if seg < len => {
                    let mut off = 0;
                    while off < len {
                        let l = seg.min(len - off);
                        self.rx.datagrams.push((start + off, l, i));
                        off += l;
                    }
                }
                _ => self.rx.datagrams.push((start, len, i)),
            }
        }
        Ok(self.rx.datagrams.len())
    }

    /// Finishes the inner TCP/UDP checksums that senders left partial in the last batch
    /// ([`overlay_net::gso::finish_partial_checksum`]): a Linux vxlan peer with its default
    /// offloads on a link that offloads checksums sends them so, and local receivers verify.
    ///
    /// Frames larger than the underlay carries are left alone: they are TCP super-frames
    /// ([`Self::prepare_super_frame`]) or dropped as oversize.
    pub fn finish_partial_checksums(&mut self) {
        // The largest inner frame (with an 802.1Q tag) one datagram of the underlay carries.
        let most = usize::from(self.inner_mtu()) + 18;
        for &(start, len, _) in &self.rx.datagrams {
            let Some(d) = self.rx.data.get_mut(start..start + len) else {
                continue;
            };
            if d.len() > vxlan::HEADER_LEN
                && d.len() - vxlan::HEADER_LEN <= most
                && vxlan::parse(d).is_ok()
            {
                overlay_net::gso::finish_partial_checksum(&mut d[vxlan::HEADER_LEN..]);
            }
        }
    }

    /// Datagram `i` of the last batch holds a TCP super-frame (a Linux vxlan peer's
    /// tunnel-GSO packet, larger than any datagram of the underlay): prepares it for delivery
    /// with segmentation offload at a segment size that fits `mtu`, the tenant's MTU
    /// ([`overlay_net::gso::prepare_tcp_super_frame`]). `None` if it is not one.
    pub fn prepare_super_frame(&mut self, i: usize, mtu: u16) -> Option<Coalesced> {
        let &(start, len, _) = self.rx.datagrams.get(i)?;
        let d = self.rx.data.get_mut(start..start + len)?;
        vxlan::parse(d).ok()?;
        overlay_net::gso::prepare_tcp_super_frame(&mut d[vxlan::HEADER_LEN..], usize::from(mtu))
            .ok()
    }

    /// Datagram `i` of the last batch: its VNI and inner frame, or why it is not VXLAN, and
    /// the sender.
    pub fn datagram(&self, i: usize) -> Option<(Parsed<'_>, SocketAddr)> {
        let &(start, len, msg) = self.rx.datagrams.get(i)?;
        let from = from_sockaddr(&self.rx.addrs[msg])?;
        Some((vxlan::parse(&self.rx.data[start..start + len]), from))
    }

    /// Queues `inner` for `vtep` (listening on UDP port `port`; 0: this uplink's own VXLAN
    /// port) in `vni`; sent by [`Self::flush`] (or at once when the batch is full).
    pub fn queue(
        &mut self,
        vtep: IpAddr,
        port: u16,
        vni: Vni,
        inner: &[u8],
    ) -> Result<(), QueueError> {
        if UnderlayFamily::of(vtep) != self.family {
            return Err(QueueError::WrongFamily);
        }
        if !mtu::fits_underlay(inner.len(), self.underlay_mtu, self.family)
            || inner.len() + vxlan::HEADER_LEN > SLOT
        {
            return Err(QueueError::TooBig);
        }
        if self.tx_count == BATCH {
            self.flush();
        }
        let i = self.tx_count;
        let len = vxlan::HEADER_LEN + inner.len();
        let slot = self.tx.slot_mut(i);
        slot[..vxlan::HEADER_LEN].copy_from_slice(&vxlan::header(vni));
        slot[vxlan::HEADER_LEN..len].copy_from_slice(inner);
        self.tx.lens[i] = len;
        self.tx.senders[i] = self.sender_of(inner);
        // Peers listen on the same VXLAN port as this VTEP, unless configured otherwise.
        let dest = SocketAddr::new(vtep, self.dest_port(port));
        to_sockaddr(dest, &mut self.tx.addrs[i]);
        self.tx_count += 1;
        Ok(())
    }

    /// A peer's VXLAN port: `port`, or this uplink's own for 0.
    fn dest_port(&self, port: u16) -> u16 {
        if port == 0 { self.port } else { port }
    }

    /// The sending socket of an inner frame's flow.
    fn sender_of(&self, inner: &[u8]) -> u8 {
        (overlay_net::flow::flow_hash(inner) % self.senders.len() as u32) as u8
    }

    /// The UDP source ports datagrams leave from (one per sending socket).
    pub fn source_ports(&self) -> Vec<u16> {
        self.senders
            .iter()
            .filter_map(|s| s.local_addr().ok().map(|a| a.port()))
            .collect()
    }

    /// Sends `data`, a run of VXLAN datagrams of `segment` bytes each (the last may be
    /// shorter), to `vtep` in one system call with UDP segmentation offload (UDP_SEGMENT):
    /// the kernel cuts it into datagrams. Queued datagrams are sent first, to keep order.
    /// Returns how many datagrams were dropped (queued ones the kernel did not take); an error
    /// means the kernel refused the offload and nothing of `data` was sent.
    pub fn send_segmented(
        &mut self,
        vtep: IpAddr,
        port: u16,
        data: &[u8],
        segment: u16,
    ) -> io::Result<usize> {
        let dest_port = self.dest_port(port);
        if self.xdp.is_none() && !self.gso {
            // Zero-checksum IPv6 sending: the kernel refuses UDP GSO (EINVAL), so do not make
            // it copy 64 KiB to find that out each time.
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        // What was queued goes first; new next-hop answers are taken in before the run, none
        // while it goes out.
        let dropped = self.flush();
        if let Some(x) = self.xdp.as_mut()
            && {
                x.refresh();
                x.reaches(vtep, dest_port)
            }
        {
            // AF_XDP: the run is cut here, datagram by datagram, onto the transmit ring.
            let mut lost = 0;
            let segment = usize::from(segment.max(1));
            for chunk in data.chunks(segment) {
                match x.send(vtep, dest_port, chunk) {
                    crate::xdp::Sent::Queued => self.xdp_sent += 1,
                    _ => lost += 1,
                }
            }
            x.transmit();
            self.tx_dropped += lost as u64;
            return Ok(dropped + lost);
        }
        if !self.gso {
            // As above; the caller queues the datagrams one by one.
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        // SAFETY: sockaddr_storage and msghdr are plain old data; all-zero is valid.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let alen = to_sockaddr(SocketAddr::new(vtep, self.dest_port(port)), &mut addr);
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut control = [0u64; 4];
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&raw mut addr).cast();
        msg.msg_namelen = alen;
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen =
            unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
        // SAFETY: the control buffer (32 bytes, 8-aligned) holds one cmsghdr with a u16 of
        // data, which is what msg_controllen says; CMSG_FIRSTHDR points into it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment);
        }
        let sender = &self.senders
            [usize::from(self.sender_of(data.get(vxlan::HEADER_LEN..).unwrap_or_default()))];
        // SAFETY: every pointer in `msg` refers to a local or `data`, alive for the call.
        let rc = unsafe { libc::sendmsg(sender.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(dropped)
    }

    /// Datagrams the kernel did not take so far (socket buffer full, or an error).
    pub fn tx_dropped(&self) -> u64 {
        self.tx_dropped
    }

    /// Sends everything queued; returns how many datagrams the kernel did not take (socket
    /// buffer full or an error); they are also counted in [`Self::tx_dropped`].
    pub fn flush(&mut self) -> usize {
        let dropped = self.flush_queue();
        self.tx_dropped += dropped as u64;
        dropped
    }

    fn flush_queue(&mut self) -> usize {
        let count = self.tx_count;
        self.tx_count = 0;
        if count == 0 {
            return 0;
        }
        // Through AF_XDP what can go that way; the rest (VTEPs without a resolved next hop on
        // the interface) through the sockets.
        let mut kept = [0usize; BATCH];
        let mut nkept = 0;
        let mut xdp_dropped = 0;
        if let Some(x) = self.xdp.as_mut() {
            x.refresh();
            for i in 0..count {
                let to = from_sockaddr(&self.tx.addrs[i]);
                let datagram = &self.tx.data[i * SLOT..i * SLOT + self.tx.lens[i]];
                match to.map(|to| x.send(to.ip(), to.port(), datagram)) {
                    Some(crate::xdp::Sent::Queued) => self.xdp_sent += 1,
                    Some(crate::xdp::Sent::Dropped) => xdp_dropped += 1,
                    _ => {
                        kept[nkept] = i;
                        nkept += 1;
                    }
                }
            }
            x.transmit();
        } else {
            for (i, k) in kept.iter_mut().enumerate().take(count) {
                *k = i;
            }
            nkept = count;
        }
        if nkept == 0 {
            return xdp_dropped;
        }
        let count = nkept;
        // The slots by sending socket (stable: each flow's datagrams keep their order).
        let mut order = [0usize; BATCH];
        let mut starts = [0usize; SENDERS + 1];
        for &i in &kept[..count] {
            starts[usize::from(self.tx.senders[i]) + 1] += 1;
        }
        for s in 0..SENDERS {
            starts[s + 1] += starts[s];
        }
        let mut next = starts;
        for &i in &kept[..count] {
            let s = usize::from(self.tx.senders[i]);
            order[next[s]] = i;
            next[s] += 1;
        }
        let mut iov: [MaybeUninit<libc::iovec>; BATCH] = [MaybeUninit::uninit(); BATCH];
        // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        // One UDP_SEGMENT control message per message that carries a run.
        let mut control = [[0u64; 4]; BATCH];
        // Datagrams per message, and its sending socket.
        let mut datagrams = [0usize; BATCH];
        let mut msg_sender = [0usize; BATCH];
        let base = self.tx.data.as_mut_ptr();
        for (k, v) in iov.iter_mut().enumerate().take(count) {
            let i = order[k];
            v.write(libc::iovec {
                // SAFETY: slot i lies inside `data`.
                iov_base: unsafe { base.add(i * SLOT) }.cast(),
                iov_len: self.tx.lens[i],
            });
        }
        let namelen = match self.family {
            UnderlayFamily::V4 => std::mem::size_of::<libc::sockaddr_in>(),
            UnderlayFamily::V6 => std::mem::size_of::<libc::sockaddr_in6>(),
        } as libc::socklen_t;
        // Messages: runs of datagrams of one size to one VTEP from one socket are one GSO
        // message (the kernel builds and routes them as one packet and cuts it late, or hands
        // it whole to a receiver that takes UDP GRO); other datagrams one message each.
        let same_dest = |a: &libc::sockaddr_storage, b: &libc::sockaddr_storage| {
            // SAFETY: both are initialised sockaddr_storage values; comparing `namelen`
            // bytes of them stays inside.
            unsafe {
                libc::memcmp(
                    (a as *const libc::sockaddr_storage).cast(),
                    (b as *const libc::sockaddr_storage).cast(),
                    namelen as usize,
                ) == 0
            }
        };
        let mut nmsgs = 0;
        let mut k = 0;
        while k < count {
            let i = order[k];
            let len = self.tx.lens[i];
            let mut l = k + 1;
            if self.gso {
                while l < count
                    && l - k < MAX_GSO_SEGMENTS
                    && self.tx.lens[order[l]] == len
                    && (l - k + 1) * len <= MAX_GSO_BYTES
                    && self.tx.senders[order[l]] == self.tx.senders[i]
                    && same_dest(&self.tx.addrs[i], &self.tx.addrs[order[l]])
                {
                    l += 1;
                }
            }
            let h = &mut msgs[nmsgs].msg_hdr;
            h.msg_name = (&raw mut self.tx.addrs[i]).cast();
            h.msg_namelen = namelen;
            h.msg_iov = iov[k].as_mut_ptr();
            h.msg_iovlen = l - k;
            if l - k > 1 {
                let c = &mut control[nmsgs];
                h.msg_control = c.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE only computes a size.
                h.msg_controllen =
                    unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
                // SAFETY: the control buffer (32 bytes, 8-aligned) holds one cmsghdr with a
                // u16 of data, which is what msg_controllen says; CMSG_FIRSTHDR points into it.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), len as u16);
                }
            }
            datagrams[nmsgs] = l - k;
            msg_sender[nmsgs] = usize::from(self.tx.senders[i]);
            nmsgs += 1;
            k = l;
        }
        // Each socket's messages (contiguous) in as few system calls as it takes.
        let mut failed = 0;
        let mut m = 0;
        while m < nmsgs {
            let s = msg_sender[m];
            let mut end = m;
            while end < nmsgs && msg_sender[end] == s {
                end += 1;
            }
            failed += self.send_messages(s, &mut msgs[m..end], &datagrams[m..end]);
            m = end;
        }
        failed + xdp_dropped
    }

    /// Sends prepared messages from sending socket `s`; returns the datagrams not sent.
    fn send_messages(
        &mut self,
        s: usize,
        msgs: &mut [libc::mmsghdr],
        datagrams: &[usize],
    ) -> usize {
        let fd = self.senders[s].as_raw_fd();
        let mut sent = 0;
        let mut failed = 0;
        while sent < msgs.len() {
            // SAFETY: headers sent.. point at live iovecs, buffers, addresses and control
            // messages.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    msgs[sent..].as_mut_ptr(),
                    (msgs.len() - sent) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                let err = io::Error::last_os_error();
                if n < 0 && err.kind() == io::ErrorKind::WouldBlock {
                    // Buffer full: what is left is dropped, never blocked on.
                    return failed + datagrams[sent..].iter().sum::<usize>();
                }
                if n < 0 && datagrams[sent] > 1 && self.gso {
                    // The kernel refused the offload (no checksum offload on the route's
                    // device, an old kernel): from now on one datagram per message; this
                    // run and the rest go out so now.
                    self.gso = false;
                    return failed + send_one_by_one(fd, &msgs[sent..]);
                }
                // An unreachable peer (ICMP error) fails one message: skip it and go on.
                failed += datagrams[sent];
                sent += 1;
                continue;
            }
            sent += n as usize;
        }
        failed
    }
}

/// Sends the datagrams of `msgs` one per system call, without offload; returns how many
/// were not sent.
fn send_one_by_one(fd: libc::c_int, msgs: &[libc::mmsghdr]) -> usize {
    let mut failed = 0;
    for m in msgs {
        for d in 0..m.msg_hdr.msg_iovlen {
            // SAFETY: a message's iovecs are msg_iovlen consecutive live entries.
            let iov = unsafe { m.msg_hdr.msg_iov.add(d) };
            // SAFETY: msghdr is plain old data; all-zero is a valid value.
            let mut one: libc::msghdr = unsafe { std::mem::zeroed() };
            one.msg_name = m.msg_hdr.msg_name;
            one.msg_namelen = m.msg_hdr.msg_namelen;
            one.msg_iov = iov;
            one.msg_iovlen = 1;
            // SAFETY: the name and iovec point at live queue storage for the call.
            if unsafe { libc::sendmsg(fd, &one, libc::MSG_DONTWAIT) } < 0 {
                failed += 1;
            }
        }
    }
    failed
}

/// Sending sockets per uplink: the UDP source ports a tenant's flows spread over.
const SENDERS: usize = 16;

/// A socket that sends from an ephemeral port of `ip` and receives nothing: a socket filter
/// drops every datagram sent to it, so that nothing piles up in a queue no one reads.
fn sender_socket(ip: IpAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0))?;
    socket.set_nonblocking(true)?;
    let mut drop_all = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let prog = libc::sock_fprog {
        len: 1,
        filter: drop_all.as_mut_ptr(),
    };
    // SAFETY: SO_ATTACH_FILTER reads a sock_fprog (and its one instruction, copied by the
    // kernel) through pointers valid for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const prog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    grow_socket_buffers(&socket);
    Ok(socket)
}

/// The MTU of the interfaces that carry `addrs` (the smallest, if several): what the underlay
/// takes without fragmenting, read from the interface that holds each address. None if an
/// address is on no interface here.
pub fn detect_underlay_mtu(addrs: &[IpAddr]) -> Option<u16> {
    let ifaces = nix::ifaddrs::getifaddrs().ok()?;
    let mut names = Vec::new();
    for ifa in ifaces {
        let Some(addr) = ifa.address else { continue };
        let ip: Option<IpAddr> = if let Some(v4) = addr.as_sockaddr_in() {
            Some(IpAddr::V4(v4.ip()))
        } else {
            addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        };
        if ip.is_some_and(|ip| addrs.contains(&ip)) {
            names.push(ifa.interface_name);
        }
    }
    if names.is_empty() {
        return None;
    }
    names
        .iter()
        .map(|n| {
            std::fs::read_to_string(format!("/sys/class/net/{n}/mtu"))
                .ok()
                .and_then(|m| m.trim().parse::<u16>().ok())
        })
        .collect::<Option<Vec<u16>>>()?
        .into_iter()
        .min()
}
