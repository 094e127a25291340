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
#[path = "common/raw_frontend.rs"]
mod raw;

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

/// Reads land in the guest's buffers whatever their layout: straight from the pool into
/// aligned buffers (one or several), through a bounce buffer into unaligned ones, into a chain
/// whose status byte shares the last buffer, or a mix.
#[test]
fn reads_land_in_the_guests_buffers_whatever_their_layout() {
    use raw::{DATA, Ring};
    use vm_memory::{Bytes, GuestAddress};
    let pool = Arc::new(Pool::create(MemDevice::new(64 << 20), PoolOptions::default()).unwrap());
    pool.create_volume("v", 16 << 20).unwrap();
    let pattern: Vec<u8> = (0..32768u32).map(|i| (i % 251) as u8).collect();
    pool.write("v", 0, &pattern).unwrap();
    let dir = Scratch::new(&std::env::temp_dir(), "vblock-layouts").unwrap();
    let sock = dir.join("v.sock");
    let _export = Export::start(pool.clone(), "v", &sock, ExportConfig::default()).unwrap();
    let mut r = Ring::connect(&sock);
    // (name, first sector, data buffers (guest address, length), status address or None: the
    // status is the last byte of the last buffer)
    type Case<'a> = (&'a str, u64, &'a [(u64, u32)], Option<u64>);
    let cases: [Case<'_>; 5] = [
        (
            "one aligned buffer",
            0,
            &[(DATA + 0x1000, 8192)],
            Some(DATA + 0x9000),
        ),
        (
            "two aligned buffers, apart",
            2,
            &[(DATA + 0x1000, 4096), (DATA + 0x4000, 8192)],
            Some(DATA + 0x9000),
        ),
        (
            "an unaligned buffer",
            8,
            &[(DATA + 0x1200, 8192)],
            Some(DATA + 0x9000),
        ),
        (
            "status in the last buffer",
            0,
            &[(DATA + 0x1000, 4097)],
            None,
        ),
        (
            "aligned and unaligned",
            1,
            &[(DATA + 0x1000, 4096), (DATA + 0x3100, 4096)],
            Some(DATA + 0x9000),
        ),
    ];
    for (name, sector, buffers, status_at) in cases {
        r.mem.write_obj(0u32, GuestAddress(DATA)).unwrap();
        r.mem.write_obj(0u32, GuestAddress(DATA + 4)).unwrap();
        r.mem.write_obj(sector, GuestAddress(DATA + 8)).unwrap();
        r.mem
            .write_slice(&[0xee; 0xa000], GuestAddress(DATA + 0x1000))
            .unwrap();
        let mut descs = vec![(DATA, 16, false)];
        descs.extend(buffers.iter().map(|&(a, l)| (a, l, true)));
        let status = match status_at {
            Some(at) => {
                descs.push((at, 1, true));
                at
            }
            None => {
                let &(a, l) = buffers.last().unwrap();
                a + u64::from(l) - 1
            }
        };
        let data_len: u32 =
            buffers.iter().map(|b| b.1).sum::<u32>() - u32::from(status_at.is_none());
        assert_eq!(r.submit(&descs, false), Some(data_len + 1), "{name}");
        assert_eq!(
            r.mem.read_obj::<u8>(GuestAddress(status)).unwrap(),
            0,
            "{name}: status"
        );
        let mut at = sector as usize * 512;
        let mut left = data_len as usize;
        for &(addr, len) in buffers {
            let n = (len as usize).min(left);
            let mut got = vec![0u8; n];
            r.mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
            assert!(got == pattern[at..at + n], "{name}: buffer at {addr:#x}");
            at += n;
            left -= n;
        }
    }
    // Each guest request counts (and is charged to the volume's limits) once, however many
    // buffers it was read into.
    let io = pool.volume("v").unwrap().io;
    assert_eq!(io.reads, cases.len() as u64, "{io:?}");
    assert_eq!(io.read_bytes, 8192 + 12288 + 8192 + 4096 + 8192, "{io:?}");
}

#[test]
fn a_restarted_backend_resubmits_what_its_predecessor_took_from_the_inflight_record() {
    use raw::{DATA, Ring};
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
    // The connection goes first, so that no backend can take the request for real.
    r.disconnect();
    testbeds::wait::until("the backend to let go", testbeds::wait::SOON, || {
        export.stats().active == 0
    })
    .unwrap();
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

#[test]
fn an_export_is_bound_to_its_volume_not_to_its_name() {
    let pool = Arc::new(Pool::create(MemDevice::new(128 << 20), PoolOptions::default()).unwrap());
    pool.create_volume("v", 16 << 20).unwrap();
    let dir = Scratch::new(&std::env::temp_dir(), "vblock-vhost-identity").unwrap();
    let sock = dir.join("v.sock");
    let _export = Export::start(pool.clone(), "v", &sock, ExportConfig { queues: 1 }).unwrap();
    let mut c = BlkClient::connect(&sock, 1, false).unwrap();
    c.mem()[..4096].fill(0x11);
    assert_eq!(c.write(0, 0, 0, 4096), 0);
    // The volume goes (past the daemon's checks, as a race would) and a new one takes its
    // name: the guest's next write must not land in it.
    pool.delete("v").unwrap();
    pool.create_volume("v", 16 << 20).unwrap();
    c.mem()[..4096].fill(0x77);
    assert_ne!(
        c.write(0, 0, 0, 4096),
        0,
        "a write into a deleted volume succeeded"
    );
    assert_ne!(
        c.read(0, 0, 0, 4096),
        0,
        "a read of a deleted volume succeeded"
    );
    let mut host = vec![0xffu8; 4096];
    pool.read("v", 0, &mut host).unwrap();
    assert!(
        host.iter().all(|b| *b == 0),
        "the new volume got the old client's data"
    );
}

#[test]
fn a_silent_frontend_is_dropped_and_the_next_one_is_served() {
    use raw::{DATA, Ring};
    use std::io::Read;
    use vm_memory::{Bytes, GuestAddress};
    let pool = Arc::new(Pool::create(MemDevice::new(64 << 20), PoolOptions::default()).unwrap());
    pool.create_volume("v", 16 << 20).unwrap();
    pool.write("v", 0, &[0x42u8; 4096]).unwrap();
    let dir = Scratch::new(&std::env::temp_dir(), "vblock-silent").unwrap();
    let sock = dir.join("v.sock");
    let export = Export::start(pool.clone(), "v", &sock, ExportConfig::default()).unwrap();
    // A connection that says nothing holds the socket (one frontend at a time)...
    let mut silent = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    testbeds::wait::until("the silent connection", testbeds::wait::SOON, || {
        export.stats().connections == 1
    })
    .unwrap();
    // ...until it is dropped for not starting its handshake; then a real frontend is served.
    let mut r = Ring::connect(&sock);
    let mut rest = [0u8; 1];
    assert_eq!(
        silent.read(&mut rest).unwrap(),
        0,
        "the silent connection was closed"
    );
    r.mem.write_obj(0u32, GuestAddress(DATA)).unwrap();
    r.mem.write_obj(0u32, GuestAddress(DATA + 4)).unwrap();
    r.mem.write_obj(0u64, GuestAddress(DATA + 8)).unwrap();
    let len = r.submit(
        &[
            (DATA, 16, false),
            (DATA + 0x1000, 4096, true),
            (DATA + 0x2000, 1, true),
        ],
        false,
    );
    assert_eq!(len, Some(4097));
    let got: u8 = r.mem.read_obj(GuestAddress(DATA + 0x1000)).unwrap();
    assert_eq!(got, 0x42);
    assert_eq!(export.stats().connections, 2);
}
