//! A raw vhost-user frontend over crafted rings in shared memory (the `vhost` crate's
//! frontend side): what a hostile or buggy VM can put on a ring, without a VM. Shared by the
//! vhost-user-blk and vhost-user-net tests.
#![allow(dead_code)]

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const BASE: u64 = 0x100000;
const SIZE: usize = 0x100000;
const DESC: u64 = BASE;
const USED: u64 = BASE + 0x10000;
const AVAIL: u64 = BASE + 0x20000;
/// Where request headers and data go.
pub const DATA: u64 = BASE + 0x40000;

pub struct Ring {
    fe: Option<Frontend>,
    pub mem: GuestMemoryMmap,
    kick: EventFd,
    avail_idx: u16,
    used_seen: u16,
    /// Where the next chain's descriptors go in the table.
    pub next_desc: u16,
}

impl Ring {
    pub fn connect(path: &Path) -> Ring {
        Ring::connect_queue(path, 0)
    }

    /// Connects to queue `queue` of the device at `path` (only that queue is set up).
    pub fn connect_queue(path: &Path, queue: usize) -> Ring {
        let memfd =
            nix::sys::memfd::memfd_create("ring", nix::sys::memfd::MFdFlags::empty()).unwrap();
        let file = File::from(memfd);
        file.set_len(SIZE as u64).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(BASE),
            SIZE,
            Some(vm_memory::FileOffset::new(file, 0)),
        )])
        .unwrap();
        Ring::attach_queue(path, mem, None, 0, queue)
    }

    /// Connects a frontend to the backend at `path` over guest memory `mem` (as QEMU does
    /// again after a backend restart): with `inflight`, the record handed over (or a new
    /// one asked for); `base` is the ring position the frontend believes in.
    pub fn attach(
        path: &Path,
        mem: GuestMemoryMmap,
        inflight: Option<&mut Option<(VhostUserInflight, File)>>,
        base: u16,
    ) -> Ring {
        Ring::attach_queue(path, mem, inflight, base, 0)
    }

    /// [`Ring::attach`] for queue `queue`.
    pub fn attach_queue(
        path: &Path,
        mem: GuestMemoryMmap,
        inflight: Option<&mut Option<(VhostUserInflight, File)>>,
        base: u16,
        queue: usize,
    ) -> Ring {
        let mut fe = Frontend::connect(path, queue as u64 + 1).unwrap();
        fe.set_owner().unwrap();
        // No EVENT_IDX: notifications on every request keep this test simple.
        let features = fe.get_features().unwrap() & !(1u64 << 29);
        let proto = fe.get_protocol_features().unwrap();
        fe.set_features(features).unwrap();
        fe.set_protocol_features(proto).unwrap();
        if let Some(record) = inflight {
            if record.is_none() {
                let ask = VhostUserInflight {
                    num_queues: 1,
                    queue_size: 256,
                    ..Default::default()
                };
                *record = Some(fe.get_inflight_fd(&ask).unwrap());
            }
            let (info, file) = record.as_ref().unwrap();
            fe.set_inflight_fd(info, file.as_raw_fd()).unwrap();
        }
        let host = mem.get_host_address(GuestAddress(BASE)).unwrap() as u64;
        let region = mem.find_region(GuestAddress(BASE)).unwrap();
        fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()])
            .unwrap();
        fe.set_vring_num(queue, 256).unwrap();
        fe.set_vring_addr(
            queue,
            &VringConfigData {
                queue_max_size: 256,
                queue_size: 256,
                flags: 0,
                desc_table_addr: host + (DESC - BASE),
                used_ring_addr: host + (USED - BASE),
                avail_ring_addr: host + (AVAIL - BASE),
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(queue, base).unwrap();
        // What the driver has consumed, read before the queue starts: a backend that
        // resubmits requests from an inflight record may complete them at once.
        let used_seen: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(0).unwrap();
        fe.set_vring_kick(queue, &kick).unwrap();
        fe.set_vring_call(queue, &call).unwrap();
        fe.set_vring_enable(queue, true).unwrap();
        let avail_idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        Ring {
            fe: Some(fe),
            mem,
            kick,
            avail_idx,
            used_seen,
            next_desc: 0,
        }
    }

    /// Closes the vhost-user connection (as a frontend whose backend died); the rings stay
    /// writable here. The caller waits for the backend to let go (its connection counters).
    pub fn disconnect(&mut self) {
        self.fe = None;
    }

    /// Puts a chain of (address, length, device-writable) descriptors on the ring; with
    /// `loop_back`, the last one points back at the first. Returns the used length, or
    /// None if the backend never completed it.
    pub fn submit(&mut self, descs: &[(u64, u32, bool)], loop_back: bool) -> Option<u32> {
        self.post(descs, loop_back);
        self.kick.write(1).unwrap();
        self.wait_used()
    }

    /// Makes a chain available without notifying the backend; returns its head.
    pub fn post(&mut self, descs: &[(u64, u32, bool)], loop_back: bool) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let idx = head + i as u16;
            let last = i + 1 == descs.len();
            let mut flags = if write { 2u16 } else { 0 };
            let next = if last && loop_back { head } else { idx + 1 };
            if !last || loop_back {
                flags |= 1;
            }
            let at = GuestAddress(DESC + 16 * idx as u64);
            self.mem.write_obj(addr, at).unwrap();
            self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
        }
        self.next_desc += descs.len() as u16;
        let slot = GuestAddress(AVAIL + 4 + 2 * (self.avail_idx % 256) as u64);
        self.mem.write_obj(head, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        head
    }

    /// Waits for the backend's next completion (at most 30 s: generous for one that is
    /// expected; a test that expects none waits that long); returns its length.
    pub fn wait_used(&mut self) -> Option<u32> {
        self.wait_used_within(Duration::from_secs(30))
    }

    /// Puts a chain on the ring, notifies the backend and expects no completion: true if
    /// none came within `quiet`.
    pub fn submit_unanswered(&mut self, descs: &[(u64, u32, bool)], quiet: Duration) -> bool {
        self.post(descs, false);
        let _ = self.kick.write(1);
        self.wait_used_within(quiet).is_none()
    }

    /// Waits up to `timeout` for the backend's next completion; returns its length.
    pub fn wait_used_within(&mut self, timeout: Duration) -> Option<u32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            if used != self.used_seen {
                let elem = GuestAddress(USED + 4 + 8 * (self.used_seen % 256) as u64);
                let len: u32 = self.mem.read_obj(elem.unchecked_add(4)).unwrap();
                self.used_seen = self.used_seen.wrapping_add(1);
                return Some(len);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }
}
