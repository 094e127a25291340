//! vhost-user-blk against a real client: libblkio connects to the exported socket the way
//! QEMU does, negotiates, maps its memory and drives the virtqueues. No VM needed.

use std::sync::Arc;

use testbeds::blk_client::BlkClient;
use testbeds::scratch::Scratch;
use vblock::device::MemDevice;
use vblock::vhost_blk::{Export, ExportConfig};
use vblock::{Pool, PoolOptions};

#[test]
fn a_libblkio_client_reads_writes_flushes_discards_over_two_queues() {
    let pool = Arc::new(Pool::create(MemDevice::new(128 << 20), PoolOptions::default()).unwrap());
    pool.create_volume("v", 64 << 20).unwrap();
    let dir = Scratch::new(&std::env::temp_dir(), "vblock-vhost").unwrap();
    let sock = dir.join("v.sock");
    let export = Export::start(pool.clone(), "v", &sock, ExportConfig { queues: 2 }).unwrap();
    let mut c = BlkClient::connect(&sock, 2, false).unwrap();
    assert_eq!(c.capacity().unwrap(), 64 << 20);

    // Write 64 KiB on queue 0, read it back on queue 1, and see it from the host side too.
    for (i, b) in c.mem()[..65536].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    assert_eq!(c.write(0, 1 << 20, 0, 65536), 0);
    assert_eq!(c.read(1, 1 << 20, 65536, 65536), 0);
    let m = c.mem();
    assert!(m[..65536] == m[65536..131072]);
    let mut host = vec![0u8; 65536];
    pool.read("v", 1 << 20, &mut host).unwrap();
    assert!(host[..] == c.mem()[..65536]);

    // Flush, then discard: the space is released and reads as zeros.
    assert_eq!(c.flush(0), 0);
    assert_eq!(pool.volume("v").unwrap().allocated, 65536);
    assert_eq!(c.discard(0, 1 << 20, 65536), 0);
    assert_eq!(pool.volume("v").unwrap().allocated, 0);
    assert_eq!(c.read(0, 1 << 20, 0, 4096), 0);
    assert!(c.mem()[..4096].iter().all(|b| *b == 0));
    // Write-zeroes too.
    c.mem()[..8192].fill(7);
    assert_eq!(c.write(0, 0, 0, 8192), 0);
    assert_eq!(c.write_zeroes(0, 0, 8192), 0);
    assert_eq!(c.read(1, 0, 0, 8192), 0);
    assert!(c.mem()[..8192].iter().all(|b| *b == 0));
    // Beyond the end: an error completion, and the device keeps working.
    assert_ne!(c.read(0, 64 << 20, 0, 4096), 0);
    assert_eq!(c.read(0, 0, 0, 4096), 0);
    drop(c);
    drop(export);

    // A snapshot is exported read-only: reads work, writes fail.
    pool.write("v", 0, &[9u8; 4096]).unwrap();
    pool.snapshot("v", "s").unwrap();
    let sock_s = dir.join("s.sock");
    let export = Export::start(pool.clone(), "s", &sock_s, ExportConfig::default()).unwrap();
    let mut c = BlkClient::connect(&sock_s, 1, true).unwrap();
    assert_eq!(c.read(0, 0, 0, 4096), 0);
    assert!(c.mem()[..4096].iter().all(|b| *b == 9));
    c.mem()[..4096].fill(1);
    assert_ne!(c.write(0, 0, 0, 4096), 0);
    let mut host = vec![0u8; 4096];
    pool.read("s", 0, &mut host).unwrap();
    assert!(host.iter().all(|b| *b == 9), "the snapshot is unchanged");
    drop(c);
    drop(export);
}

/// A raw vhost-user frontend (the `vhost` crate's) with rings in shared memory that this test
/// writes by hand, as a hostile or buggy guest would.
mod raw {
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
        _fe: Frontend,
        pub mem: GuestMemoryMmap,
        kick: EventFd,
        avail_idx: u16,
        used_seen: u16,
        /// Where the next chain's descriptors go in the table.
        pub next_desc: u16,
    }

    impl Ring {
        pub fn connect(path: &Path) -> Ring {
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
            Ring::attach(path, mem, None, 0)
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
            let mut fe = Frontend::connect(path, 1).unwrap();
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
            fe.set_vring_num(0, 256).unwrap();
            fe.set_vring_addr(
                0,
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
            fe.set_vring_base(0, base).unwrap();
            let kick = EventFd::new(0).unwrap();
            let call = EventFd::new(0).unwrap();
            fe.set_vring_kick(0, &kick).unwrap();
            fe.set_vring_call(0, &call).unwrap();
            fe.set_vring_enable(0, true).unwrap();
            let used_seen: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
            let avail_idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
            Ring {
                _fe: fe,
                mem,
                kick,
                avail_idx,
                used_seen,
                next_desc: 0,
            }
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

        /// Waits (at most 5 s) for the backend's next completion; returns its length.
        pub fn wait_used(&mut self) -> Option<u32> {
            let deadline = Instant::now() + Duration::from_secs(5);
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
}

#[test]
fn hostile_rings_get_errors_and_the_device_keeps_serving() {
    use raw::{DATA, Ring};
    use vm_memory::{Bytes, GuestAddress};
    let pool = Arc::new(Pool::create(MemDevice::new(64 << 20), PoolOptions::default()).unwrap());
    pool.create_volume("v", 16 << 20).unwrap();
    pool.write("v", 0, &[0x42u8; 4096]).unwrap();
    let dir = Scratch::new(&std::env::temp_dir(), "vblock-hostile").unwrap();
    let sock = dir.join("v.sock");
    let _export = Export::start(pool.clone(), "v", &sock, ExportConfig::default()).unwrap();
    let mut r = Ring::connect(&sock);
    let header = |r: &mut Ring, kind: u32, sector: u64| {
        r.mem.write_obj(kind, GuestAddress(DATA)).unwrap();
        r.mem.write_obj(0u32, GuestAddress(DATA + 4)).unwrap();
        r.mem.write_obj(sector, GuestAddress(DATA + 8)).unwrap();
    };
    let status = |r: &Ring| r.mem.read_obj::<u8>(GuestAddress(DATA + 0x2000)).unwrap();
    let valid_read = |r: &mut Ring| {
        header(r, 0, 0);
        r.mem
            .write_obj(0xffu8, GuestAddress(DATA + 0x2000))
            .unwrap();
        let len = r.submit(
            &[
                (DATA, 16, false),
                (DATA + 0x1000, 4096, true),
                (DATA + 0x2000, 1, true),
            ],
            false,
        );
        assert_eq!(len, Some(4097));
        assert_eq!(status(r), 0);
        let got: u8 = r.mem.read_obj(GuestAddress(DATA + 0x1000)).unwrap();
        assert_eq!(got, 0x42);
    };
    valid_read(&mut r);
    // A header outside guest memory: no status can be trusted; completed with length 0.
    assert_eq!(
        r.submit(
            &[(0xdead_0000_0000, 16, false), (DATA + 0x2000, 1, true)],
            false
        ),
        Some(0)
    );
    // A data buffer outside guest memory.
    header(&mut r, 0, 0);
    assert_eq!(
        r.submit(
            &[
                (DATA, 16, false),
                (0x7fff_0000_0000, 4096, true),
                (DATA + 0x2000, 1, true)
            ],
            false
        ),
        Some(0)
    );
    // A chain that loops back on itself: cut at the queue size, it completes with an error
    // (never a hang).
    header(&mut r, 0, 0);
    r.mem.write_obj(0u8, GuestAddress(DATA + 0x2000)).unwrap();
    let len = r.submit(&[(DATA, 16, false), (DATA + 0x1000, 4096, true)], true);
    assert!(matches!(len, Some(0) | Some(1)), "{len:?}");
    // An unknown request type: UNSUPP.
    header(&mut r, 99, 0);
    assert_eq!(
        r.submit(&[(DATA, 16, false), (DATA + 0x2000, 1, true)], false),
        Some(1)
    );
    assert_eq!(status(&r), 2);
    // A header too short: IOERR.
    assert_eq!(
        r.submit(&[(DATA, 8, false), (DATA + 0x2000, 1, true)], false),
        Some(1)
    );
    assert_eq!(status(&r), 1);
    // A read beyond the end of the volume: IOERR, nothing read.
    header(&mut r, 0, (16 << 20) / 512);
    assert_eq!(
        r.submit(
            &[
                (DATA, 16, false),
                (DATA + 0x1000, 4096, true),
                (DATA + 0x2000, 1, true)
            ],
            false
        ),
        Some(1)
    );
    assert_eq!(status(&r), 1);
    // A write with an odd length: IOERR, and the volume is untouched.
    header(&mut r, 1, 0);
    assert_eq!(
        r.submit(
            &[
                (DATA, 16, false),
                (DATA + 0x1000, 100, false),
                (DATA + 0x2000, 1, true)
            ],
            false
        ),
        Some(1)
    );
    assert_eq!(status(&r), 1);
    // After all that, the device still serves.
    valid_read(&mut r);
    let mut host = vec![0u8; 4096];
    pool.read("v", 0, &mut host).unwrap();
    assert!(host.iter().all(|b| *b == 0x42));
}

#[test]
fn a_restarted_backend_resubmits_what_its_predecessor_took_from_the_inflight_record() {
    use raw::{DATA, Ring};
    use std::time::Duration;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
    let pool = Arc::new(Pool::create(MemDevice::new(64 << 20), PoolOptions::default()).unwrap());
    pool.create_volume("v", 16 << 20).unwrap();
    let dir = Scratch::new(&std::env::temp_dir(), "vblock-inflight").unwrap();
    let sock = dir.join("v.sock");
    let export = Export::start(pool.clone(), "v", &sock, ExportConfig::default()).unwrap();
    let mut record = None;
    let mut r = Ring::connect(&sock);
    let mem = r.mem.clone();
    drop(r);
    // A frontend that asks for an inflight record; one write goes through normally.
    r = Ring::attach(&sock, mem.clone(), Some(&mut record), 0);
    let write = |r: &mut Ring, sector: u64, byte: u8| {
        r.mem.write_obj(1u32, GuestAddress(DATA)).unwrap();
        r.mem.write_obj(0u32, GuestAddress(DATA + 4)).unwrap();
        r.mem.write_obj(sector, GuestAddress(DATA + 8)).unwrap();
        r.mem
            .write_slice(&[byte; 4096], GuestAddress(DATA + 0x1000))
            .unwrap();
        r.mem
            .write_obj(0xffu8, GuestAddress(DATA + 0x2000))
            .unwrap();
        [
            (DATA, 16, false),
            (DATA + 0x1000, 4096, false),
            (DATA + 0x2000, 1, true),
        ]
    };
    let chain = write(&mut r, 8, 0x11);
    assert_eq!(r.submit(&chain, false), Some(1));
    // The state a backend killed mid-request leaves: a request taken (marked in the record)
    // and never completed; the frontend, unable to ask the dead backend, believes the ring
    // is past it.
    let chain = write(&mut r, 16, 0x77);
    let head = r.post(&chain, false);
    let (info, file) = record.as_ref().unwrap();
    let shared = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        info.mmap_size as usize,
        Some(vm_memory::FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    let desc = GuestAddress(16 + 16 * u64::from(head));
    shared.write_obj(5u64, desc.unchecked_add(8)).unwrap();
    shared.write_obj(1u8, desc).unwrap();
    drop(r);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        pool.read("v", 16 * 512, &mut [0u8; 4096]).is_ok(),
        "the device is still there"
    );
    let mut r = Ring::attach(&sock, mem, Some(&mut record), 2);
    // The new backend resumes from the record: the request runs, its completion arrives.
    assert_eq!(
        r.wait_used(),
        Some(1),
        "the request in flight was resubmitted"
    );
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(DATA + 0x2000)).unwrap(),
        0
    );
    let mut back = vec![0u8; 4096];
    pool.read("v", 16 * 512, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x77));
    // And the queue carries on.
    r.next_desc = 100;
    let chain = write(&mut r, 24, 0x33);
    assert_eq!(r.submit(&chain, false), Some(1));
    pool.read("v", 24 * 512, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x33));
    drop(r);
    drop(export);
}
