//! vhost-user-blk against a real client: libblkio (the `blkio` crate, driver
//! `virtio-blk-vhost-user`) connects to the exported socket the way QEMU does, negotiates,
//! maps its memory and drives the virtqueues. No VM needed.
#![allow(unsafe_code)]

use std::mem::MaybeUninit;
use std::sync::Arc;

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use vblock::device::MemDevice;
use vblock::vhost_blk::{Export, ExportConfig};
use vblock::{Pool, PoolOptions};

struct Client {
    _b: Blkio,
    queues: Vec<Blkioq>,
    mem: &'static mut [u8],
}

fn connect(socket: &std::path::Path, queues: i32, read_only: bool) -> Client {
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", &socket.display().to_string()).unwrap();
    // libblkio refuses to start a read-only device unless asked for one.
    b.set_bool("read-only", read_only).unwrap();
    b.connect().unwrap();
    b.set_i32("num-queues", queues).unwrap();
    let started = b.start().unwrap();
    let region = b.alloc_mem_region(4 << 20).unwrap();
    b.map_mem_region(&region).unwrap();
    // SAFETY: the region was allocated by blkio for this client, is `len` bytes long, stays
    // mapped until `b` is dropped (it lives in the same Client), and nothing else uses it.
    let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
    Client {
        _b: b,
        queues: started.queues,
        mem,
    }
}

impl Client {
    fn wait(&mut self, q: usize) -> i32 {
        let mut c = [MaybeUninit::<Completion>::uninit(); 1];
        let n = self.queues[q].do_io(&mut c, 1, None, None).unwrap();
        assert_eq!(n, 1);
        // SAFETY: do_io initialised the first `n` completions.
        unsafe { c[0].assume_init_read() }.ret
    }

    fn write(&mut self, q: usize, off: u64, at: usize, len: usize) -> i32 {
        let p = self.mem[at..].as_ptr();
        self.queues[q].write(off, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    fn read(&mut self, q: usize, off: u64, at: usize, len: usize) -> i32 {
        let p = self.mem[at..].as_mut_ptr();
        self.queues[q].read(off, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }
}

#[test]
fn a_libblkio_client_reads_writes_flushes_discards_over_two_queues() {
    let pool = Arc::new(Pool::create(MemDevice::new(128 << 20), PoolOptions::default()).unwrap());
    pool.create_volume("v", 64 << 20).unwrap();
    let dir = std::env::temp_dir().join(format!("vblock-vhost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("v.sock");
    let export = Export::start(pool.clone(), "v", &sock, ExportConfig { queues: 2 }).unwrap();
    let mut c = connect(&sock, 2, false);
    assert_eq!(c._b.get_u64("capacity").unwrap(), 64 << 20);

    // Write 64 KiB on queue 0, read it back on queue 1, and see it from the host side too.
    for (i, b) in c.mem[..65536].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    assert_eq!(c.write(0, 1 << 20, 0, 65536), 0);
    assert_eq!(c.read(1, 1 << 20, 65536, 65536), 0);
    assert!(c.mem[..65536] == c.mem[65536..131072]);
    let mut host = vec![0u8; 65536];
    pool.read("v", 1 << 20, &mut host).unwrap();
    assert!(host[..] == c.mem[..65536]);

    // Flush, then discard: the space is released and reads as zeros.
    c.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(c.wait(0), 0);
    assert_eq!(pool.volume("v").unwrap().allocated, 65536);
    c.queues[0].discard(1 << 20, 65536, 0, ReqFlags::empty());
    assert_eq!(c.wait(0), 0);
    assert_eq!(pool.volume("v").unwrap().allocated, 0);
    assert_eq!(c.read(0, 1 << 20, 0, 4096), 0);
    assert!(c.mem[..4096].iter().all(|b| *b == 0));
    // Write-zeroes too.
    c.mem[..8192].fill(7);
    assert_eq!(c.write(0, 0, 0, 8192), 0);
    c.queues[0].write_zeroes(0, 8192, 0, ReqFlags::empty());
    assert_eq!(c.wait(0), 0);
    assert_eq!(c.read(1, 0, 0, 8192), 0);
    assert!(c.mem[..8192].iter().all(|b| *b == 0));
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
    let mut c = connect(&sock_s, 1, true);
    assert_eq!(c.read(0, 0, 0, 4096), 0);
    assert!(c.mem[..4096].iter().all(|b| *b == 9));
    c.mem[..4096].fill(1);
    assert_ne!(c.write(0, 0, 0, 4096), 0);
    let mut host = vec![0u8; 4096];
    pool.read("s", 0, &mut host).unwrap();
    assert!(host.iter().all(|b| *b == 9), "the snapshot is unchanged");
    drop(c);
    drop(export);
    let _ = std::fs::remove_dir_all(&dir);
}
