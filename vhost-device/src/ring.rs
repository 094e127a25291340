//! A split virtqueue seen through host pointers: the fast path of a device that moves many
//! small buffers (vswitch's vhost-user-net ports).
//!
//! `virtio-queue` resolves every guest address it touches (ring indices, ring entries,
//! descriptors) through the memory map, one lookup per access. A [`RingView`] resolves the
//! three rings once, when a burst starts, checks that each lies whole inside one memory region
//! and is aligned as the spec requires, and then reads and writes them directly; buffer
//! addresses go through a one-entry region cache. Every index and every descriptor read from
//! the guest is still checked: ring entries against the queue size, descriptor chains
//! against loops (at most `size` descriptors, indirect tables at most their length), buffers
//! against the memory map.
//!
//! The view borrows the guest memory it was made from, so the mappings it points into outlive
//! it; [`RingView::finish`] hands the positions back to the `virtio-queue` `Queue` that the
//! vhost-user handler keeps (for `GET_VRING_BASE` and the inflight record).

use std::cell::Cell;
use std::sync::atomic::{AtomicU16, Ordering, fence};

use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

/// Why a guest buffer could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// A ring, table or buffer lies (partly) outside guest memory, or is misaligned.
    #[error("address outside guest memory")]
    OutsideMemory,
    /// A head index or `next` field beyond the queue size or table.
    #[error("descriptor index out of range")]
    BadIndex,
    /// A chain longer than the queue (a loop).
    #[error("descriptor chain loops")]
    Loop,
    /// An indirect table that is empty, not a multiple of 16 bytes, or nested.
    #[error("bad indirect descriptor table")]
    BadIndirect,
}

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (a receive buffer) rather than device-readable.
    pub writable: bool,
}

/// A split virtqueue resolved to host pointers for one burst.
pub struct RingView<'m> {
    mem: &'m GuestMemoryMmap,
    desc: *const u8,
    avail: *const u8,
    used: *mut u8,
    size: u16,
    event_idx: bool,
    next_avail: u16,
    next_used: u16,
    /// The last region a buffer was found in: guest start, length, host start.
    cache: Cell<(u64, u64, usize)>,
}

/// A cache hint for the line at `p`.
#[inline]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Host address of `len` bytes at `addr` if they lie whole inside one region and `addr` is a
/// multiple of `align`.
fn host_range(mem: &GuestMemoryMmap, addr: u64, len: usize, align: u64) -> Option<*mut u8> {
    if !addr.is_multiple_of(align) {
        return None;
    }
    let slice = mem.get_slice(GuestAddress(addr), len).ok()?;
    Some(slice.ptr_guard_mut().as_ptr())
}

impl<'m> RingView<'m> {
    /// The rings of `queue` (ready: its addresses and size set) in `mem`; `None` if a ring
    /// is not whole inside one memory region or misaligned.
    pub fn new(queue: &Queue, mem: &'m GuestMemoryMmap) -> Option<RingView<'m>> {
        let size = queue.size();
        if size == 0 || !size.is_power_of_two() {
            return None;
        }
        let n = usize::from(size);
        let event = 2; // used_event / avail_event
        let desc = host_range(mem, queue.desc_table(), 16 * n, 16)?;
        let avail = host_range(mem, queue.avail_ring(), 4 + 2 * n + event, 2)?;
        let used = host_range(mem, queue.used_ring(), 4 + 8 * n + event, 4)?;
        Some(RingView {
            mem,
            desc,
            avail,
            used,
            size,
            event_idx: queue.event_idx_enabled(),
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
            cache: Cell::new((0, 0, 0)),
        })
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The ring slot of free-running index `index` (the size is a power of two: no division).
    #[inline]
    fn slot(&self, index: u16) -> usize {
        usize::from(index & (self.size - 1))
    }

    #[inline]
    fn avail_u16(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: `avail` points at the whole avail ring (4 + 2 * size + 2 bytes, checked in
        // `new`), 2-aligned; callers pass offsets inside it; the mapping lives while `mem` is
        // borrowed. The guest writes these words concurrently, hence atomics.
        unsafe { &*(self.avail.add(offset) as *const AtomicU16) }
    }

    #[inline]
    fn used_u16(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: as `avail_u16`, for the used ring (4 + 8 * size + 2 bytes, 4-aligned).
        unsafe { &*(self.used.add(offset) as *const AtomicU16) }
    }

    /// The guest's avail index (acquire: the entries before it are visible after).
    #[inline]
    pub fn avail_idx(&self) -> u16 {
        u16::from_le(self.avail_u16(2).load(Ordering::Acquire))
    }

    /// The next available head, if the guest made one available (`avail_idx` read before).
    #[inline]
    pub fn pop(&mut self, avail_idx: u16) -> Option<u16> {
        if self.next_avail == avail_idx {
            return None;
        }
        let slot = self.slot(self.next_avail);
        let head = u16::from_le(self.avail_u16(4 + 2 * slot).load(Ordering::Relaxed));
        self.next_avail = self.next_avail.wrapping_add(1);
        Some(head)
    }

    /// Starts loading into the cache the first buffers of the next `n` chains the guest made
    /// available (up to `avail_idx`), so that the copies that follow overlap their misses
    /// instead of waiting for each in turn. Only hints: nothing is checked or taken.
    pub fn prefetch(&self, avail_idx: u16, n: usize) {
        let ready = usize::from(avail_idx.wrapping_sub(self.next_avail));
        for k in 0..n.min(ready).min(usize::from(self.size)) {
            let slot = self.slot(self.next_avail.wrapping_add(k as u16));
            let head = u16::from_le(self.avail_u16(4 + 2 * slot).load(Ordering::Relaxed));
            if head >= self.size {
                continue;
            }
            let (addr, len, flags, _) = self.descriptor(self.desc, head);
            if flags & VRING_DESC_F_INDIRECT as u16 != 0 {
                continue;
            }
            let len = (len as usize).min(128);
            if let Ok(p) = self.host(GuestAddress(addr), len) {
                for line in (0..len).step_by(64) {
                    prefetch(p.wrapping_add(line));
                }
            }
        }
    }

    /// Puts back the last `n` heads taken (not enough buffers for a frame).
    #[inline]
    pub fn unpop(&mut self, n: u16) {
        self.next_avail = self.next_avail.wrapping_sub(n);
    }

    /// Walks the chain starting at `head`, calling `f` with each buffer; stops at the first
    /// error. Returns the number of buffers.
    pub fn walk(
        &self,
        head: u16,
        mut f: impl FnMut(Buffer) -> Result<(), RingError>,
    ) -> Result<usize, RingError> {
        let mut index = head;
        let mut count = 0usize;
        if index >= self.size {
            return Err(RingError::BadIndex);
        }
        loop {
            let (addr, len, flags, next) = self.descriptor(self.desc, index);
            count += 1;
            if count > usize::from(self.size) {
                return Err(RingError::Loop);
            }
            if flags & VRING_DESC_F_INDIRECT as u16 != 0 {
                // An indirect table: the whole chain, in guest memory.
                if len == 0 || !len.is_multiple_of(16) {
                    return Err(RingError::BadIndirect);
                }
                let entries = len / 16;
                let table =
                    host_range(self.mem, addr, len as usize, 16).ok_or(RingError::OutsideMemory)?;
                let mut i = 0u32;
                let mut walked = 0u32;
                loop {
                    let (a, l, fl, nx) = self.descriptor(table, i as u16);
                    walked += 1;
                    if walked > entries {
                        return Err(RingError::Loop);
                    }
                    if fl & VRING_DESC_F_INDIRECT as u16 != 0 {
                        return Err(RingError::BadIndirect);
                    }
                    f(Buffer {
                        addr: GuestAddress(a),
                        len: l,
                        writable: fl & VRING_DESC_F_WRITE as u16 != 0,
                    })?;
                    if fl & VRING_DESC_F_NEXT as u16 == 0 {
                        return Ok(walked as usize);
                    }
                    if u32::from(nx) >= entries {
                        return Err(RingError::BadIndex);
                    }
                    i = u32::from(nx);
                }
            }
            f(Buffer {
                addr: GuestAddress(addr),
                len,
                writable: flags & VRING_DESC_F_WRITE as u16 != 0,
            })?;
            if flags & VRING_DESC_F_NEXT as u16 == 0 {
                return Ok(count);
            }
            if next >= self.size {
                return Err(RingError::BadIndex);
            }
            index = next;
        }
    }

    /// The buffer of the chain at `head` if the chain is that one direct descriptor (the
    /// common case of small frames); `None` for longer or indirect chains and bad heads,
    /// which [`Self::walk`] handles (and refuses).
    #[inline]
    pub fn single(&self, head: u16) -> Option<Buffer> {
        if head >= self.size {
            return None;
        }
        let (addr, len, flags, _) = self.descriptor(self.desc, head);
        if flags & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT) as u16 != 0 {
            return None;
        }
        Some(Buffer {
            addr: GuestAddress(addr),
            len,
            writable: flags & VRING_DESC_F_WRITE as u16 != 0,
        })
    }

    /// Descriptor `index` of the table at `table` (in bounds: checked by the caller).
    #[inline]
    fn descriptor(&self, table: *const u8, index: u16) -> (u64, u32, u16, u16) {
        let mut raw = [0u8; 16];
        // SAFETY: `table` is a descriptor table whole inside a mapped region (the ring's,
        // checked in `new`, or an indirect table checked by `walk`) and `index` is below its
        // length; the guest may write it concurrently, which can only make the values wrong
        // (they are checked), and a byte copy has no alignment needs.
        unsafe {
            std::ptr::copy_nonoverlapping(table.add(16 * usize::from(index)), raw.as_mut_ptr(), 16)
        };
        let u64_at = |o: usize| u64::from_le_bytes(raw[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(raw[o..o + 4].try_into().unwrap_or_default());
        let u16_at = |o: usize| u16::from_le_bytes(raw[o..o + 2].try_into().unwrap_or_default());
        (u64_at(0), u32_at(8), u16_at(12), u16_at(14))
    }

    /// Host address of a buffer of `len` bytes at `addr`, if it lies inside one region.
    #[inline]
    fn host(&self, addr: GuestAddress, len: usize) -> Result<*mut u8, RingError> {
        let (start, size, host) = self.cache.get();
        let a = addr.0;
        if a >= start
            && a.checked_add(len as u64)
                .is_some_and(|end| end <= start + size)
        {
            return Ok((host + (a - start) as usize) as *mut u8);
        }
        let region = self.mem.find_region(addr).ok_or(RingError::OutsideMemory)?;
        let base = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| RingError::OutsideMemory)?;
        let start = region.start_addr().0;
        let size = region.len();
        if a.checked_add(len as u64)
            .is_none_or(|end| end > start + size)
        {
            return Err(RingError::OutsideMemory);
        }
        self.cache.set((start, size, base as usize));
        Ok((base as usize + (a - start) as usize) as *mut u8)
    }

    /// Copies guest memory at `addr` into `buf` (a range across regions goes through
    /// `vm-memory`).
    #[inline]
    pub fn read(&self, addr: GuestAddress, buf: &mut [u8]) -> Result<(), RingError> {
        match self.host(addr, buf.len()) {
            // SAFETY: `host` checked that the range lies inside a mapped region, which lives
            // while `mem` is borrowed; `buf` is ours, so the two do not overlap.
            Ok(p) => unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) },
            Err(_) => {
                vm_memory::Bytes::read_slice(self.mem, buf, addr)
                    .map_err(|_| RingError::OutsideMemory)?;
            }
        }
        Ok(())
    }

    /// Copies `data` into guest memory at `addr`.
    #[inline]
    pub fn write(&self, addr: GuestAddress, data: &[u8]) -> Result<(), RingError> {
        match self.host(addr, data.len()) {
            // SAFETY: as in `read`, the other way round.
            Ok(p) => unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) },
            Err(_) => {
                vm_memory::Bytes::write_slice(self.mem, data, addr)
                    .map_err(|_| RingError::OutsideMemory)?;
            }
        }
        Ok(())
    }

    /// Copies `parts` one after the other into guest memory at `addr` (one lookup of the
    /// address for all of them when they land in one region).
    #[inline]
    pub fn write_all(&self, addr: GuestAddress, parts: &[&[u8]]) -> Result<(), RingError> {
        let total = parts.iter().map(|p| p.len()).sum();
        match self.host(addr, total) {
            Ok(mut p) => {
                for part in parts {
                    // SAFETY: as in `write`: the whole range (`total` bytes) lies inside a
                    // mapped region; each part is copied to the next bytes of it.
                    unsafe {
                        std::ptr::copy_nonoverlapping(part.as_ptr(), p, part.len());
                        p = p.add(part.len());
                    }
                }
            }
            Err(_) => {
                let mut at = addr;
                for part in parts {
                    self.write(at, part)?;
                    at = at
                        .checked_add(part.len() as u64)
                        .ok_or(RingError::OutsideMemory)?;
                }
            }
        }
        Ok(())
    }

    /// Puts a used element (not yet visible to the guest: see [`Self::publish`]).
    #[inline]
    pub fn push_used(&mut self, head: u16, len: u32) {
        self.push_used_all(&[(head, len)]);
    }

    /// Puts used elements (head, length) in a row, as a burst's: the position is kept in a
    /// register for the run, written back once.
    #[inline]
    pub fn push_used_all(&mut self, elements: &[(u16, u32)]) {
        let mut next = self.next_used;
        for &(head, len) in elements {
            let slot = self.slot(next);
            let elem = (u64::from(head) | u64::from(len) << 32).to_le_bytes();
            // SAFETY: the element lies inside the used ring (slot < size, checked in `new`).
            unsafe { std::ptr::copy_nonoverlapping(elem.as_ptr(), self.used.add(4 + 8 * slot), 8) };
            next = next.wrapping_add(1);
        }
        self.next_used = next;
    }

    /// Makes the used elements pushed so far visible to the guest (one index update).
    #[inline]
    pub fn publish(&self) {
        self.used_u16(2)
            .store(self.next_used.to_le(), Ordering::Release);
    }

    /// Turns the guest's kicks off (while a burst is taken) or on; when turning them on,
    /// returns whether more buffers came in meanwhile (then serve them: no kick will come).
    pub fn set_kicks(&self, on: bool) -> bool {
        if self.event_idx {
            if on {
                // avail_event: kick when the avail index passes what we have taken.
                let at = 4 + 8 * usize::from(self.size);
                self.used_u16(at)
                    .store(self.next_avail.to_le(), Ordering::Relaxed);
            }
        } else {
            let flags = if on { 0 } else { VRING_USED_F_NO_NOTIFY as u16 };
            self.used_u16(0).store(flags.to_le(), Ordering::Relaxed);
        }
        if !on {
            return false;
        }
        fence(Ordering::SeqCst);
        self.avail_idx() != self.next_avail
    }

    /// Whether the guest wants an interrupt for the used elements published since the used
    /// index was `last_check` (then updated): EVENT_IDX's used_event, or the avail ring's
    /// NO_INTERRUPT flag.
    pub fn needs_interrupt(&self, last_check: &mut u16) -> bool {
        let new = self.next_used;
        let old = std::mem::replace(last_check, new);
        if old == new {
            return false;
        }
        fence(Ordering::SeqCst);
        if self.event_idx {
            let at = 4 + 2 * usize::from(self.size);
            let used_event = u16::from_le(self.avail_u16(at).load(Ordering::Relaxed));
            return new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old);
        }
        let flags = u16::from_le(self.avail_u16(0).load(Ordering::Relaxed));
        flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0
    }

    /// Hands the positions back to `queue` (the handler's record of the ring).
    pub fn finish(self, queue: &mut Queue) {
        queue.set_next_avail(self.next_avail);
        queue.set_next_used(self.next_used);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const SIZE: u16 = 8;

    fn setup() -> (GuestMemoryMmap, Queue) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        (mem, q)
    }

    fn put_desc(
        mem: &GuestMemoryMmap,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(table + 16 * u64::from(i));
        mem.write_obj(addr.to_le(), at).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(at.0 + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(at.0 + 12))
            .unwrap();
        mem.write_obj(next.to_le(), GuestAddress(at.0 + 14))
            .unwrap();
    }

    fn make_available(mem: &GuestMemoryMmap, heads: &[u16]) {
        for (i, h) in heads.iter().enumerate() {
            mem.write_obj(h.to_le(), GuestAddress(AVAIL + 4 + 2 * i as u64))
                .unwrap();
        }
        mem.write_obj((heads.len() as u16).to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn chain(r: &RingView<'_>, head: u16) -> Result<Vec<Buffer>, RingError> {
        let mut v = Vec::new();
        r.walk(head, |b| {
            v.push(b);
            Ok(())
        })?;
        Ok(v)
    }

    #[test]
    fn chains_direct_and_indirect_and_used_elements() {
        let (mem, mut q) = setup();
        let next = VRING_DESC_F_NEXT as u16;
        put_desc(&mem, DESC, 0, 0x5000, 12, next, 1);
        put_desc(&mem, DESC, 1, 0x5100, 60, 0, 0);
        put_desc(&mem, DESC, 2, 0x6000, 32, VRING_DESC_F_INDIRECT as u16, 0);
        put_desc(
            &mem,
            0x6000,
            0,
            0x7000,
            100,
            next | VRING_DESC_F_WRITE as u16,
            1,
        );
        put_desc(&mem, 0x6000, 1, 0x7100, 200, VRING_DESC_F_WRITE as u16, 0);
        make_available(&mem, &[0, 2]);
        let mut r = RingView::new(&q, &mem).unwrap();
        let idx = r.avail_idx();
        assert_eq!(idx, 2);
        assert_eq!(r.pop(idx), Some(0));
        let c = chain(&r, 0).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!((c[1].addr.0, c[1].len, c[1].writable), (0x5100, 60, false));
        assert_eq!(r.pop(idx), Some(2));
        let c = chain(&r, 2).unwrap();
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|b| b.writable));
        assert_eq!(r.pop(idx), None);
        assert_eq!(r.single(0), None, "a chain of two");
        assert_eq!(r.single(2), None, "indirect");
        assert_eq!(r.single(SIZE), None, "out of range");
        assert_eq!(
            r.single(1),
            Some(Buffer {
                addr: GuestAddress(0x5100),
                len: 60,
                writable: false
            })
        );
        r.push_used(0, 0);
        r.push_used_all(&[(2, 300)]);
        // Nothing visible before publish.
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 0);
        r.publish();
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 2);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(USED + 4 + 8)).unwrap(), 2);
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(USED + 4 + 12)).unwrap(),
            300
        );
        r.finish(&mut q);
        assert_eq!((q.next_avail(), q.next_used()), (2, 2));
    }

    #[test]
    fn hostile_chains_are_refused() {
        let (mem, q) = setup();
        let next = VRING_DESC_F_NEXT as u16;
        // A loop: 0 -> 1 -> 0.
        put_desc(&mem, DESC, 0, 0x5000, 10, next, 1);
        put_desc(&mem, DESC, 1, 0x5000, 10, next, 0);
        // next beyond the queue.
        put_desc(&mem, DESC, 2, 0x5000, 10, next, 200);
        // Indirect table of a bad length, nested indirect, indirect table outside memory.
        put_desc(&mem, DESC, 3, 0x6000, 20, VRING_DESC_F_INDIRECT as u16, 0);
        put_desc(&mem, DESC, 4, 0x6000, 16, VRING_DESC_F_INDIRECT as u16, 0);
        put_desc(&mem, 0x6000, 0, 0x6000, 16, VRING_DESC_F_INDIRECT as u16, 0);
        put_desc(
            &mem,
            DESC,
            5,
            0xffff_0000,
            16,
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        // An indirect loop.
        put_desc(&mem, DESC, 6, 0x6100, 32, VRING_DESC_F_INDIRECT as u16, 0);
        put_desc(&mem, 0x6100, 0, 0x5000, 10, next, 1);
        put_desc(&mem, 0x6100, 1, 0x5000, 10, next, 0);
        let r = RingView::new(&q, &mem).unwrap();
        assert_eq!(chain(&r, 0), Err(RingError::Loop));
        assert_eq!(chain(&r, 2), Err(RingError::BadIndex));
        assert_eq!(chain(&r, 3), Err(RingError::BadIndirect));
        assert_eq!(chain(&r, 4), Err(RingError::BadIndirect));
        assert_eq!(chain(&r, 5), Err(RingError::OutsideMemory));
        assert_eq!(chain(&r, 6), Err(RingError::Loop));
        assert_eq!(chain(&r, SIZE), Err(RingError::BadIndex));
        // Buffers outside memory, or straddling its end.
        let mut b = [0u8; 16];
        assert_eq!(
            r.read(GuestAddress(0xffff_0000), &mut b),
            Err(RingError::OutsideMemory)
        );
        assert_eq!(
            r.read(GuestAddress(0x10000 - 8), &mut b),
            Err(RingError::OutsideMemory)
        );
        assert!(r.write(GuestAddress(0x10000 - 16), &b).is_ok());
        assert_eq!(
            r.write_all(GuestAddress(0x10000 - 16), &[&b, &b]),
            Err(RingError::OutsideMemory)
        );
        r.write_all(GuestAddress(0x8000), &[b"head", b"er"])
            .unwrap();
        let mut out = [0u8; 6];
        r.read(GuestAddress(0x8000), &mut out).unwrap();
        assert_eq!(&out, b"header");
    }

    #[test]
    fn rings_outside_memory_or_misaligned_give_no_view() {
        let (mem, mut q) = setup();
        q.set_used_ring_address(Some(0xfff0), Some(0));
        assert!(RingView::new(&q, &mem).is_none());
    }

    #[test]
    fn kicks_and_interrupts_follow_the_flags() {
        let (mem, q) = setup();
        make_available(&mem, &[]);
        let mut r = RingView::new(&q, &mem).unwrap();
        r.set_kicks(false);
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(USED)).unwrap(),
            VRING_USED_F_NO_NOTIFY as u16
        );
        assert!(!r.set_kicks(true));
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED)).unwrap(), 0);
        let mut last = 0;
        assert!(!r.needs_interrupt(&mut last), "nothing new");
        r.push_used(0, 0);
        r.publish();
        assert!(r.needs_interrupt(&mut last));
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, GuestAddress(AVAIL))
            .unwrap();
        r.push_used(1, 0);
        assert!(!r.needs_interrupt(&mut last));
    }
}
