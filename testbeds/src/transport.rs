//! How a userspace VTEP reaches the underlay: a plain UDP socket (the kernel builds and checks
//! the outer IP/UDP headers; overlay-net handles the VXLAN header), or a raw `AF_PACKET`
//! socket on the underlay interface (overlay-net builds and validates every outer header,
//! which the kernel peer then has to accept).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use overlay_net::{DecapConfig, Encapsulator, TunnelConfig, Vni, decapsulate, vxlan};

use crate::Error;

/// Which transport a userspace VTEP uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// A UDP socket bound to the VXLAN port.
    Udp,
    /// An `AF_PACKET` socket: full outer-header encapsulation in userspace.
    Raw,
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportKind::Udp => "udp-socket",
            TransportKind::Raw => "af-packet",
        })
    }
}

/// One received datagram or frame.
pub enum Received {
    /// A VXLAN frame: its VNI and where the inner frame lies in the receive buffer.
    Frame(Vni, Range<usize>),
    /// Something that is not valid VXLAN for us, with the reason.
    Rejected(overlay_net::Error),
}

/// A VXLAN underlay transport.
pub enum Transport {
    /// Kernel UDP socket, sending to one remote VTEP.
    Udp {
        /// The bound socket (non-blocking).
        socket: UdpSocket,
        /// Remote VTEP address and port.
        peer: SocketAddr,
    },
    /// `AF_PACKET` socket bound to the underlay interface.
    Raw {
        /// The packet socket (non-blocking).
        fd: OwnedFd,
        /// Outer headers towards the remote VTEP.
        encap: Encapsulator,
        /// What decapsulation accepts.
        decap: DecapConfig,
    },
}

const ETH_P_ALL: u16 = libc::ETH_P_ALL as u16;

impl Transport {
    /// A UDP transport bound to `local` (call inside the VTEP's namespace).
    pub fn udp(local: SocketAddr, peer: SocketAddr) -> Result<Transport, Error> {
        let socket = UdpSocket::bind(local).map_err(|e| Error::Io(format!("bind {local}"), e))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| Error::Io("set_nonblocking".into(), e))?;
        Ok(Transport::Udp { socket, peer })
    }

    /// A raw transport on interface `ifname` (call inside the VTEP's namespace).
    pub fn raw(ifname: &str, tunnel: &TunnelConfig) -> Result<Transport, Error> {
        let encap = Encapsulator::new(tunnel)?;
        let ifindex = nix::net::if_::if_nametoindex(ifname)
            .map_err(|e| Error::Io(format!("if_nametoindex {ifname}"), e.into()))?;
        let fd = packet_socket(ifindex, true)
            .map_err(|e| Error::Io(format!("AF_PACKET socket on {ifname}"), e))?;
        // Each packet's checksum status (a veth with checksum offload hands over packets of
        // the local stack with their checksums still to be computed).
        let on: libc::c_int = 1;
        // SAFETY: a valid descriptor and an int option of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_AUXDATA,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(Error::Io(
                "PACKET_AUXDATA".into(),
                io::Error::last_os_error(),
            ));
        }
        Ok(Transport::Raw {
            fd,
            encap,
            decap: DecapConfig {
                local_ip: Some(tunnel.local_ip),
                udp_port: tunnel.udp_port,
                ..DecapConfig::default()
            },
        })
    }

    /// Bytes the caller must leave free in front of an inner frame passed to [`Self::send`].
    pub fn headroom(&self) -> usize {
        match self {
            Transport::Udp { .. } => vxlan::HEADER_LEN,
            Transport::Raw { encap, .. } => encap.header_len(),
        }
    }

    /// The descriptor to wait on for incoming frames.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Transport::Udp { socket, .. } => socket.as_fd(),
            Transport::Raw { fd, .. } => fd.as_fd(),
        }
    }

    /// Sends the inner frame at `buf[headroom()..headroom() + inner_len]` in `vni`.
    pub fn send(&self, vni: Vni, buf: &mut [u8], inner_len: usize) -> Result<(), Error> {
        match self {
            Transport::Udp { socket, peer } => {
                let start = self.headroom() - vxlan::HEADER_LEN;
                vxlan::write_header(vni, &mut buf[start..])?;
                let datagram = &buf[start..self.headroom() + inner_len];
                socket
                    .send_to(datagram, peer)
                    .map_err(|e| Error::Io(format!("send to {peer}"), e))?;
            }
            Transport::Raw { fd, encap, .. } => {
                let n = encap.encap_in_place(vni, buf, inner_len)?;
                // SAFETY: `buf[..n]` is initialised memory that outlives the call.
                let rc = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), n, 0) };
                if rc < 0 {
                    return Err(Error::Io(
                        "send AF_PACKET".into(),
                        io::Error::last_os_error(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Receives one datagram or frame into `buf`; `Ok(None)` when nothing is pending.
    /// Frames this host sent itself (seen by packet sockets) are skipped.
    pub fn recv(&self, buf: &mut [u8]) -> Result<Option<Received>, Error> {
        match self {
            Transport::Udp { socket, .. } => {
                let n = match socket.recv_from(buf) {
                    Ok((n, _)) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                    Err(e) => return Err(Error::Io("recv".into(), e)),
                };
                Ok(Some(match vxlan::parse(&buf[..n]) {
                    Ok((vni, inner)) => Frame(vni, n - inner.len()..n),
                    Err(e) => Received::Rejected(e),
                }))
            }
            Transport::Raw { fd, decap, .. } => loop {
                // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut control = [0u64; 8];
                let mut iov = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                };
                // SAFETY: msghdr is plain old data; all-zero is a valid value.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_name = (&raw mut from).cast();
                msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                msg.msg_iov = &raw mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = std::mem::size_of_val(&control);
                // SAFETY: the header points at the buffer, address and control room above,
                // all valid for the lengths given during the call.
                let rc = unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut msg, libc::MSG_TRUNC) };
                if rc < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::WouldBlock {
                        return Ok(None);
                    }
                    return Err(Error::Io("recvfrom AF_PACKET".into(), e));
                }
                if from.sll_pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                let n = rc as usize;
                if n > buf.len() {
                    return Ok(Some(Received::Rejected(
                        overlay_net::Error::BufferTooSmall {
                            need: n,
                            have: buf.len(),
                        },
                    )));
                }
                let cfg = DecapConfig {
                    udp_checksum_verified: checksum_vouched(&msg),
                    ..*decap
                };
                let base = buf.as_ptr() as usize;
                return Ok(Some(match decapsulate(&buf[..n], &cfg) {
                    Ok(d) => {
                        let start = d.inner.as_ptr() as usize - base;
                        Frame(d.vni, start..start + d.inner.len())
                    }
                    Err(e) => Received::Rejected(e),
                }));
            },
        }
    }
}

use Received::Frame;

/// A raw `AF_PACKET` socket for every protocol, bound to interface `ifindex` (0: every
/// interface of the namespace), non-blocking if asked.
pub fn packet_socket(ifindex: u32, nonblocking: bool) -> io::Result<OwnedFd> {
    let flags =
        libc::SOCK_RAW | libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain socket(2) call with constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_PACKET, flags, i32::from(ETH_P_ALL.to_be())) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ALL.to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is a valid sockaddr_ll and the length passed is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// `PACKET_AUXDATA` (linux/if_packet.h): a `tpacket_auxdata` with every received packet.
const PACKET_AUXDATA: libc::c_int = 8;
/// The packet's checksum is still to be computed (it comes from this host's stack).
const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;
/// The device verified the packet's checksum.
const TP_STATUS_CSUM_VALID: u32 = 1 << 7;

/// True if the packet's `tpacket_auxdata` says its checksum is valid or not yet computed.
fn checksum_vouched(msg: &libc::msghdr) -> bool {
    // SAFETY: `msg` was filled by recvmsg; the CMSG macros walk its control buffer within
    // `msg_controllen`, and the data read is the kernel's tpacket_auxdata (status first).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == PACKET_AUXDATA {
                let status = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u32>());
                return status & (TP_STATUS_CSUMNOTREADY | TP_STATUS_CSUM_VALID) != 0;
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    false
}
