//! An AF_XDP socket with its own UMEM: the four rings the kernel shares with us (fill,
//! completion, receive, transmit), mapped into this process, and the frames they pass.
//!
//! The UMEM is split in two: the first half receives (its frames go round through the fill
//! and receive rings), the second half transmits (a free list, refilled from the completion
//! ring). Ring indices are free-running `u32`s; the kernel's producer and consumer fields are
//! read with acquire and written with release ordering, as `libxdp`'s `xsk.h` does.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

/// Bytes per UMEM frame: a page. In copy mode the kernel puts a received frame 256 bytes in
/// (`XDP_PACKET_HEADROOM`), so frames of up to 3840 bytes fit.
pub(super) const FRAME_SIZE: usize = 4096;
/// Room for a packet in a frame (what the kernel's headroom leaves).
pub(super) const FRAME_ROOM: usize = FRAME_SIZE - 256;
/// Frames per UMEM (half for receiving, half for sending): 8 MiB.
const FRAMES: u32 = 2048;
/// Entries of every ring (a power of two).
const RING_SIZE: u32 = 1024;

/// A mapped ring: its producer, consumer and flags words and its entries.
struct Ring {
    map: *mut libc::c_void,
    map_len: usize,
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    flags: *const AtomicU32,
    entries: *mut u8,
    /// Our copy of the index we own (producer rings: producer; consumer rings: consumer).
    cached: u32,
}

impl Ring {
    /// Maps ring `offsets` of socket `fd` at page offset `pgoff`, entries of `entry` bytes.
    fn map(
        fd: RawFd,
        pgoff: libc::off_t,
        offsets: &libc::xdp_ring_offset,
        entry: usize,
    ) -> io::Result<Ring> {
        let map_len = offsets.desc as usize + RING_SIZE as usize * entry;
        // SAFETY: a shared mapping of the socket's ring at the offset the kernel defines for
        // it; the result is checked.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                pgoff,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let at = |off: u64| {
            // SAFETY: the kernel's offsets lie inside the mapping it sized.
            unsafe { map.cast::<u8>().add(off as usize) }
        };
        let mut ring = Ring {
            map,
            map_len,
            producer: at(offsets.producer).cast(),
            consumer: at(offsets.consumer).cast(),
            flags: at(offsets.flags).cast(),
            entries: at(offsets.desc),
            cached: 0,
        };
        ring.cached =
            if pgoff == libc::XDP_PGOFF_TX_RING || pgoff as u64 == libc::XDP_UMEM_PGOFF_FILL_RING {
                ring.producer().load(Ordering::Relaxed)
            } else {
                ring.consumer().load(Ordering::Relaxed)
            };
        Ok(ring)
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into the live mapping, at a u32 the kernel aligned.
        unsafe { &*self.producer }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { &*self.consumer }
    }

    fn needs_wakeup(&self) -> bool {
        // SAFETY: as for `producer`.
        unsafe { &*self.flags }.load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }

    /// Entries we may produce now.
    fn free(&self) -> u32 {
        RING_SIZE
            - self
                .cached
                .wrapping_sub(self.consumer().load(Ordering::Acquire))
    }

    /// Entries we may consume now.
    fn ready(&self) -> u32 {
        self.producer()
            .load(Ordering::Acquire)
            .wrapping_sub(self.cached)
    }

    /// Entry `index` (free-running), as `T`.
    fn entry<T>(&self, index: u32) -> *mut T {
        let slot = (index & (RING_SIZE - 1)) as usize;
        // SAFETY: slot < RING_SIZE: inside the entries the mapping holds.
        unsafe { self.entries.add(slot * std::mem::size_of::<T>()).cast() }
    }

    /// Publishes what we produced up to `cached`.
    fn submit(&self) {
        self.producer().store(self.cached, Ordering::Release);
    }

    /// Releases what we consumed up to `cached`.
    fn release(&self) {
        self.consumer().store(self.cached, Ordering::Release);
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; nothing refers to it afterwards.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

/// The frames' memory, unmapped last (after the socket that pins it is closed).
struct Umem {
    base: *mut u8,
    len: usize,
}

impl Drop for Umem {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `Xsk::bind`; no slice of it outlives the `Xsk`.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// One AF_XDP socket bound to a queue of an interface, with its UMEM and rings.
pub(super) struct Xsk {
    // Field order is drop order: the rings and the socket go before the UMEM.
    fill: Ring,
    completion: Ring,
    rx: Ring,
    tx: Ring,
    fd: OwnedFd,
    umem: Umem,
    /// Transmit frames not in the kernel's hands.
    free_tx: Vec<u64>,
    /// Whether the kernel copies frames (no zero-copy driver).
    pub(super) copy_mode: bool,
}

// SAFETY: the mappings belong to this value alone and are used only through `&mut self`
// (or `&self` for reads of frames the kernel handed over); moving it to another thread moves
// that ownership.
unsafe impl Send for Xsk {}

fn sockopt<T>(fd: RawFd, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: the option value is a `T` read through a pointer valid for the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_XDP,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Xsk {
    /// A socket on queue `queue` of interface `ifindex` (zero-copy where the driver can,
    /// copy mode otherwise), its receive frames all given to the kernel.
    pub(super) fn bind(ifindex: u32, queue: u32) -> io::Result<Xsk> {
        // SAFETY: socket() takes plain integers; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let umem_len = FRAMES as usize * FRAME_SIZE;
        // SAFETY: an anonymous private mapping; the result is checked.
        let umem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                umem_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if umem == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let umem = Umem {
            base: umem.cast::<u8>(),
            len: umem_len,
        };
        let reg = libc::xdp_umem_reg {
            addr: umem.base as u64,
            len: umem_len as u64,
            chunk_size: FRAME_SIZE as u32,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        let raw = fd.as_raw_fd();
        sockopt(raw, libc::XDP_UMEM_REG, &reg)?;
        for ring in [
            libc::XDP_UMEM_FILL_RING,
            libc::XDP_UMEM_COMPLETION_RING,
            libc::XDP_RX_RING,
            libc::XDP_TX_RING,
        ] {
            sockopt(raw, ring, &(RING_SIZE as libc::c_int))?;
        }
        // SAFETY: xdp_mmap_offsets is plain old data; all-zero is a valid value.
        let mut off: libc::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `off`.
        if unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_XDP,
                libc::XDP_MMAP_OFFSETS,
                (&raw mut off).cast(),
                &mut len,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        let desc = std::mem::size_of::<libc::xdp_desc>();
        let fill = Ring::map(
            raw,
            libc::XDP_UMEM_PGOFF_FILL_RING as libc::off_t,
            &off.fr,
            8,
        )?;
        let completion = Ring::map(
            raw,
            libc::XDP_UMEM_PGOFF_COMPLETION_RING as libc::off_t,
            &off.cr,
            8,
        )?;
        let rx = Ring::map(raw, libc::XDP_PGOFF_RX_RING, &off.rx, desc)?;
        let tx = Ring::map(raw, libc::XDP_PGOFF_TX_RING, &off.tx, desc)?;
        let half = FRAMES / 2;
        let mut xsk = Xsk {
            fill,
            completion,
            rx,
            tx,
            fd,
            umem,
            free_tx: (half..FRAMES)
                .map(|f| u64::from(f) * FRAME_SIZE as u64)
                .collect(),
            copy_mode: false,
        };
        // Every receive frame to the kernel (the fill ring holds RING_SIZE of the half).
        for f in 0..half.min(RING_SIZE) {
            xsk.give_rx_frame(u64::from(f) * FRAME_SIZE as u64);
        }
        xsk.fill.submit();
        let mut addr = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: libc::XDP_USE_NEED_WAKEUP,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: 0,
        };
        let bind = |a: &libc::sockaddr_xdp| {
            // SAFETY: `a` is a sockaddr_xdp of the size passed, valid for the call.
            unsafe {
                libc::bind(
                    raw,
                    (a as *const libc::sockaddr_xdp).cast(),
                    std::mem::size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
                )
            }
        };
        // No mode flag: the kernel takes zero-copy where the driver offers it. Ask for copy
        // mode explicitly when that fails, to know which one runs.
        addr.sxdp_flags |= libc::XDP_ZEROCOPY;
        if bind(&addr) < 0 {
            addr.sxdp_flags = libc::XDP_USE_NEED_WAKEUP | libc::XDP_COPY;
            if bind(&addr) < 0 {
                return Err(io::Error::last_os_error());
            }
            xsk.copy_mode = true;
        }
        Ok(xsk)
    }

    /// The socket's descriptor (readable when frames arrived; for the `XSKMAP` and epoll).
    pub(super) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    fn give_rx_frame(&mut self, addr: u64) {
        let e = self.fill.entry::<u64>(self.fill.cached);
        // SAFETY: a fill ring entry we own (the caller checked there is room).
        unsafe { e.write(addr) };
        self.fill.cached = self.fill.cached.wrapping_add(1);
    }

    /// Calls `f` with each received frame (up to `most`), then gives the frames back to the
    /// kernel. Returns how many there were.
    pub(super) fn receive(&mut self, most: usize, mut f: impl FnMut(&mut [u8])) -> usize {
        let n = (self.rx.ready() as usize).min(most);
        for k in 0..n as u32 {
            let d = self
                .rx
                .entry::<libc::xdp_desc>(self.rx.cached.wrapping_add(k));
            // SAFETY: a receive descriptor the kernel published (k < ready).
            let d = unsafe { d.read() };
            if let Some(frame) = self.frame_mut(d.addr, d.len as usize) {
                f(frame);
            }
            // Same frame back to the fill ring: it has room, as many entries left it as
            // arrived here (both rings hold RING_SIZE and the receive half has no more).
            let base = d.addr - d.addr % FRAME_SIZE as u64;
            debug_assert!(
                self.fill.free() > 0,
                "the fill ring holds every receive frame"
            );
            if self.fill.free() > 0 {
                self.give_rx_frame(base);
            }
        }
        if n > 0 {
            self.rx.cached = self.rx.cached.wrapping_add(n as u32);
            self.rx.release();
            self.fill.submit();
            if self.fill.needs_wakeup() {
                let _ = self.wake(false);
            }
        }
        n
    }

    /// Bytes `addr..addr + len` of the UMEM, if inside it.
    fn frame_mut(&mut self, addr: u64, len: usize) -> Option<&mut [u8]> {
        let start = usize::try_from(addr).ok()?;
        let end = start.checked_add(len)?;
        if end > self.umem.len {
            return None;
        }
        // SAFETY: start..end lies inside the UMEM mapping, which lives as long as self; the
        // kernel handed this frame over and does not touch it until it is given back, and
        // `&mut self` makes this the only slice of it.
        Some(unsafe { std::slice::from_raw_parts_mut(self.umem.base.add(start), len) })
    }

    /// Takes back the transmit frames the kernel is done with.
    fn reclaim(&mut self) {
        let n = self.completion.ready();
        for k in 0..n {
            let e = self
                .completion
                .entry::<u64>(self.completion.cached.wrapping_add(k));
            // SAFETY: a completion entry the kernel published.
            let addr = unsafe { e.read() };
            self.free_tx.push(addr - addr % FRAME_SIZE as u64);
        }
        if n > 0 {
            self.completion.cached = self.completion.cached.wrapping_add(n);
            self.completion.release();
        }
    }

    /// Queues one frame, written by `write` into a transmit frame of [`FRAME_ROOM`] bytes
    /// (it returns the length, or None to send nothing). False if nothing was queued: no
    /// frame or ring entry free, or `write` gave up (the caller counts a drop).
    pub(super) fn queue(&mut self, write: impl FnOnce(&mut [u8]) -> Option<usize>) -> bool {
        if self.free_tx.is_empty() || self.tx.free() == 0 {
            self.reclaim();
            if self.free_tx.is_empty() || self.tx.free() == 0 {
                return false;
            }
        }
        let Some(addr) = self.free_tx.pop() else {
            return false;
        };
        // SAFETY: a transmit frame of FRAME_SIZE bytes inside the UMEM that the kernel does
        // not hold (it is on our free list); FRAME_ROOM < FRAME_SIZE.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(self.umem.base.add(addr as usize), FRAME_ROOM)
        };
        let Some(len) = write(buf).filter(|l| *l <= FRAME_ROOM) else {
            self.free_tx.push(addr);
            return false;
        };
        let d = self.tx.entry::<libc::xdp_desc>(self.tx.cached);
        // SAFETY: a transmit ring entry we own (free() > 0).
        unsafe {
            d.write(libc::xdp_desc {
                addr,
                len: len as u32,
                options: 0,
            })
        };
        self.tx.cached = self.tx.cached.wrapping_add(1);
        true
    }

    /// Hands the queued frames to the kernel and, where it needs it (copy mode), makes it
    /// send them now. The kernel sends a limited batch per call and says "again" (EAGAIN)
    /// while some are left: called until the ring drains, within a bound.
    pub(super) fn transmit(&mut self) {
        self.tx.submit();
        for _ in 0..64 {
            if self.tx.consumer().load(Ordering::Acquire) == self.tx.cached
                || !self.tx.needs_wakeup()
            {
                break;
            }
            if let Err(e) = self.wake(true)
                && !matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS)
                )
            {
                break;
            }
        }
        self.reclaim();
    }

    /// Kicks the kernel (send side: `sendto`; receive side: `recvfrom`).
    fn wake(&self, send: bool) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: zero-length calls with no buffer and no address.
        let r = unsafe {
            if send {
                libc::sendto(
                    fd,
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null(),
                    0,
                )
            } else {
                libc::recvfrom(
                    fd,
                    std::ptr::null_mut(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            }
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
