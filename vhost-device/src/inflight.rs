//! Inflight I/O tracking (the vhost-user `INFLIGHT_SHMFD` protocol feature), split rings.
//!
//! The backend keeps, in a shared memory file the frontend holds on to, which requests of each
//! queue it has taken and not yet completed. When a killed backend comes back, the frontend
//! hands the same file to the new one, which learns from it where each queue really stands.
//! The layout is libvhost-user's (QEMU's reference backends), so either side may restart:
//!
//! ```text
//! per queue, at queue * ALIGN_UP(16 * queue_size + 2, 64):
//!   u64 features   u16 version (0: fresh)   u16 desc_num   u16 last_batch_head   u16 used_idx
//!   desc_num x { u8 inflight, u8 pad[5], u16 next, u64 counter }
//! ```
//!
//! Requests complete in the order they were taken (a device offering the feature guarantees
//! it), so the requests
//! in flight are always the avail-ring entries from the used index on, and recovery re-reads
//! them there.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory, VolatileSlice};

/// Version of the layout written in a queue's header.
const VERSION: u16 = 1;
/// Alignment of each queue's part.
const ALIGN: u64 = 64;
/// Size of a queue's header.
const HEADER: usize = 16;
/// Size of one descriptor's state.
const DESC: usize = 16;

/// Bytes of one queue's part of the region.
pub(crate) fn queue_region_size(queue_size: u16) -> u64 {
    (DESC as u64 * u64::from(queue_size) + 2).next_multiple_of(ALIGN)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_owned())
}

/// The mapped inflight region of a device.
pub(crate) struct InflightRegion {
    map: Arc<MmapRegion>,
    queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// A new zeroed region for `queues` queues of `queue_size` entries, in a memfd (returned
    /// for the frontend), with the size to tell it.
    pub(crate) fn create(queues: u16, queue_size: u16) -> io::Result<(InflightRegion, File, u64)> {
        if queues == 0 || queue_size == 0 || queue_size > 32768 {
            return Err(invalid("inflight region: bad queue count or size"));
        }
        let size = u64::from(queues) * queue_region_size(queue_size);
        let fd = nix::sys::memfd::memfd_create(
            c"vblock-inflight",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let file = File::from(fd);
        file.set_len(size)?;
        let region = Self::map(file.try_clone()?, 0, size, queues, queue_size)?;
        Ok((region, file, size))
    }

    /// Maps a region the frontend handed back (after a restart of the backend).
    pub(crate) fn map(
        file: File,
        offset: u64,
        size: u64,
        queues: u16,
        queue_size: u16,
    ) -> io::Result<InflightRegion> {
        if queues == 0 || queue_size == 0 || queue_size > 32768 {
            return Err(invalid("inflight region: bad queue count or size"));
        }
        if size < u64::from(queues) * queue_region_size(queue_size) {
            return Err(invalid("inflight region smaller than its queues"));
        }
        let size = usize::try_from(size).map_err(|_| invalid("inflight region size"))?;
        let map = MmapRegion::from_file(FileOffset::new(file, offset), size)
            .map_err(|e| io::Error::other(format!("mapping the inflight region: {e}")))?;
        Ok(InflightRegion {
            map: Arc::new(map),
            queues,
            queue_size,
        })
    }

    /// The part of queue `index`, for a queue of `size` entries (at most the region's).
    pub(crate) fn queue(&self, index: u16, size: u16) -> Option<InflightQueue> {
        if index >= self.queues || size == 0 || size > self.queue_size {
            return None;
        }
        Some(InflightQueue {
            map: self.map.clone(),
            base: usize::from(index) * queue_region_size(self.queue_size) as usize,
            size,
            counter: 0,
        })
    }
}

/// One queue's inflight record, kept by the queue's worker.
pub struct InflightQueue {
    map: Arc<MmapRegion>,
    base: usize,
    size: u16,
    counter: u64,
}

impl InflightQueue {
    /// The queue's part (in bounds by construction: the region's size was checked when it
    /// was mapped, and a queue part holds its header and descriptors).
    fn slice(&self) -> Option<VolatileSlice<'_, ()>> {
        self.map
            .get_slice(self.base, HEADER + DESC * usize::from(self.size))
            .ok()
    }

    fn desc(&self, head: u16) -> Option<usize> {
        (head < self.size).then(|| HEADER + DESC * usize::from(head))
    }

    /// Brings the record up to date with the ring, whose used index is `used_idx`, and
    /// returns how many requests were in flight when the previous backend stopped (0 for a
    /// fresh record, which is initialised).
    pub(crate) fn recover(&mut self, used_idx: u16) -> usize {
        let Some(s) = self.slice() else { return 0 };
        let version: u16 = s.load(8, Ordering::Acquire).unwrap_or(0);
        if version == 0 {
            let _ = s.store(self.size, 10, Ordering::Relaxed);
            let _ = s.store(used_idx, 14, Ordering::Relaxed);
            let _ = s.store(VERSION, 8, Ordering::Release);
            return 0;
        }
        // Killed between publishing a completion and clearing its mark: it is done.
        let recorded: u16 = s.load(14, Ordering::Acquire).unwrap_or(used_idx);
        if recorded != used_idx {
            let last: u16 = s.load(12, Ordering::Acquire).unwrap_or(u16::MAX);
            if let Some(at) = self.desc(last) {
                let _ = s.store(0u8, at, Ordering::Release);
            }
            let _ = s.store(used_idx, 14, Ordering::Release);
        }
        let mut in_flight = 0;
        let mut newest = 0u64;
        for head in 0..self.size {
            let Some(at) = self.desc(head) else { break };
            if s.load::<u8>(at, Ordering::Acquire).unwrap_or(0) == 1 {
                in_flight += 1;
                newest = newest.max(s.load::<u64>(at + 8, Ordering::Acquire).unwrap_or(0));
            }
        }
        self.counter = newest + 1;
        in_flight
    }

    /// Marks request `head` taken (before any of its I/O starts).
    pub fn take(&mut self, head: u16) {
        if let (Some(at), Some(s)) = (self.desc(head), self.slice()) {
            let _ = s.store(self.counter, at + 8, Ordering::Relaxed);
            let _ = s.store(1u8, at, Ordering::Release);
            self.counter += 1;
        }
    }

    /// Before request `head`'s completion is published on the used ring.
    pub fn completing(&mut self, head: u16) {
        if let Some(s) = self.slice() {
            let _ = s.store(head, 12, Ordering::Release);
        }
    }

    /// After request `head`'s completion was published and the used index is `used_idx`.
    pub fn completed(&mut self, head: u16, used_idx: u16) {
        if let (Some(at), Some(s)) = (self.desc(head), self.slice()) {
            let _ = s.store(0u8, at, Ordering::Release);
            let _ = s.store(used_idx, 14, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_backend_finds_what_was_in_flight() {
        let (region, file, size) = InflightRegion::create(2, 8).unwrap();
        let mut q = region.queue(1, 8).unwrap();
        assert_eq!(q.recover(0), 0);
        for head in [3, 5, 6] {
            q.take(head);
        }
        q.completing(3);
        q.completed(3, 1);
        // Killed after publishing 5's completion (used index 2), before clearing its mark.
        q.completing(5);
        let again = InflightRegion::map(file, 0, size, 2, 8).unwrap();
        let mut q2 = again.queue(1, 8).unwrap();
        assert_eq!(q2.recover(2), 1, "only 6 is still in flight");
        // Queue 0 was never used: fresh.
        assert_eq!(again.queue(0, 8).unwrap().recover(0), 0);
        assert!(again.queue(2, 8).is_none());
        assert!(again.queue(0, 9).is_none());
    }

    #[test]
    fn hostile_sizes_are_refused() {
        let (_, file, size) = InflightRegion::create(1, 8).unwrap();
        assert!(InflightRegion::map(file, 0, size, 4, 8).is_err());
        assert!(InflightRegion::create(0, 8).is_err());
    }
}
