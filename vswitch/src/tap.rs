//! Kernel interface ports: Linux TAP interfaces created through `/dev/net/tun` with raw
//! ioctls, and the host ends of veth pairs read and written through an `AF_PACKET` socket.
//!
//! Every frame read or written is preceded by a 12-byte virtio-net header (IFF_VNET_HDR,
//! TUNSETVNETHDRSZ), which carries checksum and segmentation offload metadata. The offloads
//! the kernel may hand us are chosen with TUNSETOFFLOAD; with none, the kernel gives us only
//! complete, MTU-sized frames. The fd stays valid when the interface moves to another network
//! namespace: that is how containers attach.
//!
//! A veth port's packet socket carries the same metadata (PACKET_VNET_HDR: the 10-byte
//! header without `num_buffers`, which reads and writes here pad to and strip from the
//! 12-byte layout), so both kinds look the same to the datapath. The veth's other end is
//! what the container sees: an ordinary veth, as the reference CNI plugins (`bandwidth`)
//! expect.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::Error;

/// Length of the virtio-net header in front of every frame (virtio 1.0 layout, with
/// `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// Header flag: the checksum from `csum_start` + `csum_offset` must still be computed.
pub const VNET_F_NEEDS_CSUM: u8 = 1;
/// Header GSO type: none.
pub const VNET_GSO_NONE: u8 = 0;
/// Header GSO type: TCP over IPv4.
pub const VNET_GSO_TCPV4: u8 = 1;
/// Header GSO type: TCP over IPv6.
pub const VNET_GSO_TCPV6: u8 = 4;
/// Header GSO flag: ECN.
pub const VNET_GSO_ECN: u8 = 0x80;

/// The fields of a virtio-net header the switch acts on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHeader {
    /// `VIRTIO_NET_HDR_F_*` flags.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*` type.
    pub gso_type: u8,
    /// Length of the headers before the payload (GSO).
    pub hdr_len: u16,
    /// Segment size (GSO).
    pub gso_size: u16,
    /// Where checksumming starts (NEEDS_CSUM).
    pub csum_start: u16,
    /// Where the checksum goes, relative to `csum_start` (NEEDS_CSUM).
    pub csum_offset: u16,
}

impl VnetHeader {
    /// Parses the header (little-endian fields, as virtio 1.0 requires).
    pub fn parse(b: &[u8; VNET_HDR_LEN]) -> VnetHeader {
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        }
    }

    /// True for a complete frame: no pending checksum, no segmentation.
    pub fn is_plain(&self) -> bool {
        self.flags & VNET_F_NEEDS_CSUM == 0 && self.gso_type == VNET_GSO_NONE
    }

    /// True if the frame must be cut into TCP segments of `gso_size` payload bytes.
    pub fn is_tcp_gso(&self) -> bool {
        matches!(
            self.gso_type & !VNET_GSO_ECN,
            VNET_GSO_TCPV4 | VNET_GSO_TCPV6
        )
    }
}

/// Offloads the kernel may use for frames it hands to the switch (TUNSETOFFLOAD).
/// [`Offloads::default`] is none; [`Offloads::TCP`] is what vswitchd uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Partial checksums (TUN_F_CSUM).
    pub csum: bool,
    /// TCP segmentation for IPv4 and IPv6 (TUN_F_TSO4 | TUN_F_TSO6; needs `csum`).
    pub tso: bool,
}

impl Offloads {
    /// Partial checksums and TCP segmentation: the endpoint's stack hands over 64 KiB TCP
    /// super-frames; the switch passes them to local ports as they are and segments them
    /// only for the VXLAN uplink.
    pub const TCP: Offloads = Offloads {
        csum: true,
        tso: true,
    };
}

/// The kind of kernel interface behind a [`Tap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Device {
    /// A TAP interface (`/dev/net/tun`).
    Tun,
    /// The host end of a veth pair, through a bound `AF_PACKET` socket.
    Veth,
}

/// Length of the header on a packet socket (`struct virtio_net_hdr`, no `num_buffers`).
const PACKET_VNET_HDR_LEN: usize = 10;

/// A kernel interface owned by the switch: a TAP, or a veth's host end.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    device: Device,
}

impl Tap {
    /// Creates (or attaches to) the TAP interface `name` in the caller's network namespace,
    /// non-blocking, with a virtio-net header and the given offloads. With `multi_queue`,
    /// further queues can be opened with the same call.
    pub fn create(name: &str, offloads: Offloads, multi_queue: bool) -> Result<Tap, Error> {
        Tap::open(name, offloads, multi_queue, false)
    }

    /// Like [`Tap::create`], but the interface outlives this process (TUNSETPERSIST): after a
    /// crash or restart, opening the same name attaches to it again, addresses and routes
    /// inside a container intact. [`Tap::destroy`] removes it.
    pub fn create_persistent(name: &str, offloads: Offloads) -> Result<Tap, Error> {
        Tap::open(name, offloads, false, true)
    }

    fn open(
        name: &str,
        offloads: Offloads,
        multi_queue: bool,
        persist: bool,
    ) -> Result<Tap, Error> {
        let io_err = |what: &str, e: io::Error| Error::Io(format!("TAP {name}: {what}"), e);
        let cname = CString::new(name).map_err(|_| Error::invalid("TAP name", "contains NUL"))?;
        if cname.as_bytes().len() >= libc::IFNAMSIZ {
            return Err(Error::invalid(
                "TAP name",
                format!("{name:?} is longer than 15 bytes"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io_err("open /dev/net/tun", e))?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(cname.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is, for the call's duration.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(io_err("TUNSETIFF", io::Error::last_os_error()));
        }
        let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(io_err("TUNSETVNETHDRSZ", io::Error::last_os_error()));
        }
        let mut bits: libc::c_uint = 0;
        if offloads.csum {
            bits |= libc::TUN_F_CSUM;
            if offloads.tso {
                bits |= libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
            }
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, bits as libc::c_ulong) } < 0
        {
            return Err(io_err("TUNSETOFFLOAD", io::Error::last_os_error()));
        }
        if persist {
            // SAFETY: TUNSETPERSIST takes its argument by value.
            if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0
            {
                return Err(io_err("TUNSETPERSIST", io::Error::last_os_error()));
            }
        }
        Ok(Tap {
            file,
            name: name.to_owned(),
            device: Device::Tun,
        })
    }

    /// Opens the host end `name` of a veth pair (in the caller's namespace) as a port: a
    /// non-blocking `AF_PACKET` socket bound to it, with virtio-net headers, not seeing
    /// frames the host itself sends there.
    pub fn open_veth(name: &str) -> Result<Tap, Error> {
        let io_err = |what: &str, e: io::Error| Error::Io(format!("veth {name}: {what}"), e);
        let index = nix::net::if_::if_nametoindex(name)
            .map_err(|e| io_err("no such interface", e.into()))?;
        // Protocol 0: nothing arrives before the socket is bound to the one interface.
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            return Err(io_err("socket(AF_PACKET)", io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let set = |opt: libc::c_int, value: libc::c_int| -> io::Result<()> {
            // SAFETY: the option value is one int, valid for the call's duration.
            let r = unsafe {
                libc::setsockopt(
                    file.as_raw_fd(),
                    libc::SOL_PACKET,
                    opt,
                    (&value as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        set(libc::PACKET_VNET_HDR, 1).map_err(|e| io_err("PACKET_VNET_HDR", e))?;
        // Frames the host's own stack sends on the interface are not the container's (Linux
        // 4.20+; older kernels have no such frames once the host end has no addresses).
        let _ = set(libc::PACKET_IGNORE_OUTGOING, 1);
        crate::uplink::grow_socket_buffers(&file);
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = index as i32;
        // SAFETY: `addr` is a valid sockaddr_ll of the length given.
        if unsafe {
            libc::bind(
                file.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        } < 0
        {
            return Err(io_err("bind", io::Error::last_os_error()));
        }
        Ok(Tap {
            file,
            name: name.to_owned(),
            device: Device::Veth,
        })
    }

    /// Whether the interface still exists. A TAP moved into a container's network namespace
    /// disappears with that namespace (the descriptor then answers `EBADFD`); a veth pair
    /// disappears with its container end.
    pub fn is_present(&self) -> bool {
        match self.device {
            Device::Tun => {
                // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
                let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
                // SAFETY: TUNGETIFF fills the `ifreq` it is given, valid for the call.
                let r = unsafe {
                    libc::ioctl(
                        self.file.as_raw_fd(),
                        libc::TUNGETIFF,
                        &mut req as *mut libc::ifreq,
                    )
                };
                r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EBADFD)
            }
            Device::Veth => nix::net::if_::if_nametoindex(self.name.as_str()).is_ok(),
        }
    }

    /// Whether this is a veth's host end (removing the port deletes the pair).
    pub fn is_veth(&self) -> bool {
        self.device == Device::Veth
    }

    /// Clears the persist flag: the interface disappears when its last descriptor (this
    /// one, once dropped) closes.
    /// A veth's pair is deleted by its owner over netlink; nothing happens here.
    pub fn destroy(&self) -> Result<(), Error> {
        if self.device == Device::Veth {
            return Ok(());
        }
        // SAFETY: TUNSETPERSIST takes its argument by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETPERSIST,
                0 as libc::c_ulong,
            )
        } < 0
        {
            let e = io::Error::last_os_error();
            // EBADFD: the interface is gone already (its network namespace was deleted).
            if e.raw_os_error() == Some(libc::EBADFD) {
                return Ok(());
            }
            return Err(Error::Io(
                format!("TAP {}: TUNSETPERSIST off", self.name),
                e,
            ));
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor, for epoll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Reads one frame with its virtio-net header into `buf`; `Ok(None)` when none is
    /// pending. The frame is `buf[VNET_HDR_LEN..n]`.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if self.device == Device::Veth {
            return self.recv_packet(buf);
        }
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call's duration.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }

    /// Writes one frame; `buf` starts with a virtio-net header (all zero for a complete
    /// frame). A full queue or a link that is down (EIO) is an error the caller counts.
    pub fn send(&self, buf: &[u8]) -> io::Result<()> {
        if self.device == Device::Veth {
            let (header, frame) = buf.split_at_checked(VNET_HDR_LEN).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "shorter than a header")
            })?;
            return self.writev(&header[..PACKET_VNET_HDR_LEN], frame);
        }
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the call's duration.
        let n = unsafe { libc::write(self.file.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Tap {
    /// Writes a complete frame, preceded by an all-zero virtio-net header (no offload), in
    /// one `writev`.
    pub fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        static ZERO_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];
        self.send_with_header(&ZERO_HDR, frame)
    }

    /// Writes a frame with its virtio-net header (checksum or segmentation offload the
    /// kernel then carries out or passes on), in one `writev`.
    pub fn send_with_header(&self, header: &[u8; VNET_HDR_LEN], frame: &[u8]) -> io::Result<()> {
        match self.device {
            Device::Tun => self.writev(header, frame),
            Device::Veth => self.writev(&header[..PACKET_VNET_HDR_LEN], frame),
        }
    }

    /// A veth's read: the 10-byte header to `buf[..10]`, the frame to `buf[12..]`,
    /// `num_buffers` zeroed; the length as if the header had 12 bytes.
    fn recv_packet(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if buf.len() < VNET_HDR_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer too small",
            ));
        }
        let (head, frame) = buf.split_at_mut(VNET_HDR_LEN);
        head[PACKET_VNET_HDR_LEN..].fill(0);
        let iov = [
            libc::iovec {
                iov_base: head.as_mut_ptr().cast(),
                iov_len: PACKET_VNET_HDR_LEN,
            },
            libc::iovec {
                iov_base: frame.as_mut_ptr().cast(),
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs point at disjoint parts of `buf`, valid for writes for the
        // call's duration.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(e),
            };
        }
        let n = n as usize;
        if n < PACKET_VNET_HDR_LEN {
            // Not even a header: report it as such, the datapath counts it malformed.
            return Ok(Some(n));
        }
        Ok(Some(n + VNET_HDR_LEN - PACKET_VNET_HDR_LEN))
    }

    /// Writes `header` and `frame` in one `writev`.
    fn writev(&self, header: &[u8], frame: &[u8]) -> io::Result<()> {
        let iov = [
            libc::iovec {
                iov_base: header.as_ptr() as *mut libc::c_void,
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs point at memory valid for reads for the call's duration; the
        // kernel does not write through them.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vnet_header_fields_are_little_endian() {
        let b = [1, 1, 54, 0, 0xb4, 0x05, 34, 0, 16, 0, 0, 0];
        let h = VnetHeader::parse(&b);
        assert_eq!(
            h,
            VnetHeader {
                flags: VNET_F_NEEDS_CSUM,
                gso_type: 1,
                hdr_len: 54,
                gso_size: 1460,
                csum_start: 34,
                csum_offset: 16
            }
        );
        assert!(!h.is_plain());
        assert!(VnetHeader::parse(&[0; 12]).is_plain());
    }

    #[test]
    fn names_that_do_not_fit_are_refused_before_any_syscall() {
        assert!(Tap::create("a-name-much-too-long", Offloads::default(), false).is_err());
        assert!(Tap::create("nul\0byte", Offloads::default(), false).is_err());
    }
}
