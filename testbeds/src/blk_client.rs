//! A vhost-user-blk client without a VM: libblkio (the `blkio` crate, driver
//! `virtio-blk-vhost-user`), which negotiates, maps its memory and drives the virtqueues as
//! QEMU does.

use std::mem::MaybeUninit;
use std::path::Path;

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

use crate::Error;

/// A connected client with a 4 MiB buffer shared with the backend.
pub struct BlkClient {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    base: *mut u8,
    len: usize,
}

// SAFETY: `base` points into a memory region owned by `blkio` (moved together with it);
// nothing else aliases it.
unsafe impl Send for BlkClient {}

fn err(e: blkio::Error) -> Error {
    Error::Setup(format!("blkio: {}", e.message()))
}

impl BlkClient {
    /// Connects to `socket` with `queues` queues (`read_only` for a read-only device).
    pub fn connect(socket: &Path, queues: i32, read_only: bool) -> Result<BlkClient, Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(err)?;
        b.set_str("path", &socket.display().to_string())
            .map_err(err)?;
        b.set_bool("read-only", read_only).map_err(err)?;
        b.connect().map_err(err)?;
        b.set_i32("num-queues", queues).map_err(err)?;
        let started = b.start().map_err(err)?;
        let region = b.alloc_mem_region(4 << 20).map_err(err)?;
        b.map_mem_region(&region).map_err(err)?;
        Ok(BlkClient {
            blkio: b,
            queues: started.queues,
            base: region.addr as *mut u8,
            len: region.len,
        })
    }

    /// The device's capacity in bytes.
    pub fn capacity(&self) -> Result<u64, Error> {
        self.blkio.get_u64("capacity").map_err(err)
    }

    /// The shared buffer.
    pub fn mem(&mut self) -> &mut [u8] {
        // SAFETY: the region is `len` bytes, mapped for as long as `blkio` lives (as long as
        // self), and only reachable through this exclusive borrow.
        unsafe { std::slice::from_raw_parts_mut(self.base, self.len) }
    }

    fn wait(&mut self, q: usize) -> i32 {
        let mut c = [MaybeUninit::<Completion>::uninit(); 1];
        match self.queues[q].do_io(&mut c, 1, None, None) {
            // SAFETY: do_io initialised the first `n` completions; n is 1 here.
            Ok(1) => unsafe { c[0].assume_init_read() }.ret,
            _ => -libc::EIO,
        }
    }

    /// Writes `len` bytes of the buffer at `at` to device offset `off` on queue `q`; the
    /// completion's return value (0 or -errno).
    pub fn write(&mut self, q: usize, off: u64, at: usize, len: usize) -> i32 {
        let p = self.mem()[at..at + len].as_ptr();
        self.queues[q].write(off, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    /// Reads `len` bytes at device offset `off` into the buffer at `at`.
    pub fn read(&mut self, q: usize, off: u64, at: usize, len: usize) -> i32 {
        let p = self.mem()[at..at + len].as_mut_ptr();
        self.queues[q].read(off, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    /// Flushes the device's cache.
    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.wait(q)
    }

    /// Discards a range.
    pub fn discard(&mut self, q: usize, off: u64, len: u64) -> i32 {
        self.queues[q].discard(off, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    /// Runs requests back to back at queue depth `qd` on queue `q` for `secs`: reads or writes
    /// of `block` bytes at offsets from `offset(n)` for the n-th request. Returns completed
    /// requests per second (failed ones are not counted).
    pub fn bench(
        &mut self,
        q: usize,
        write: bool,
        qd: usize,
        block: usize,
        secs: f64,
        mut offset: impl FnMut(u64) -> u64,
    ) -> f64 {
        let qd = qd.min(self.len / block).max(1);
        let base = self.base;
        let mut issued = 0u64;
        let submit = |this: &mut BlkClient, slot: usize, n: u64| {
            // SAFETY: slot < qd and qd * block <= len: the pointer stays in the region.
            let p = unsafe { base.add(slot * block) };
            if write {
                this.queues[q].write(offset(n), p, block, slot, ReqFlags::empty());
            } else {
                this.queues[q].read(offset(n), p, block, slot, ReqFlags::empty());
            }
        };
        let mut submit = submit;
        for slot in 0..qd {
            submit(self, slot, issued);
            issued += 1;
        }
        let start = std::time::Instant::now();
        let mut done = 0u64;
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..qd).map(|_| MaybeUninit::uninit()).collect();
        while start.elapsed().as_secs_f64() < secs {
            let n = match self.queues[q].do_io(&mut completions, 1, None, None) {
                Ok(n) => n,
                Err(_) => break,
            };
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { c.assume_init_read() };
                if c.ret == 0 {
                    done += 1;
                }
                submit(self, c.user_data, issued);
                issued += 1;
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        // Drain what is still in flight.
        let mut left = qd;
        while left > 0 {
            match self.queues[q].do_io(&mut completions, 1, None, None) {
                Ok(n) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
        done as f64 / elapsed
    }

    /// Zeroes a range.
    pub fn write_zeroes(&mut self, q: usize, off: u64, len: u64) -> i32 {
        self.queues[q].write_zeroes(off, len, 0, ReqFlags::empty());
        self.wait(q)
    }
}
