//! Fuzz target: a guest's virtio-blk requests (header, data and status buffers in any
//! shape: too short, read-only where writable is needed, sectors past the end, unknown
//! types, discard and write-zeroes segments), queued on a split virtqueue in guest memory
//! and run by vblockd's request path against a real volume and a snapshot. No input makes
//! it panic, and the request path answers every chain it took.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vblock::device::MemDevice;
use vblock::vhost_blk::fuzzing::process;
use vblock::{Pool, PoolOptions};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 256 << 10;

fn pool() -> Arc<Pool<MemDevice>> {
    static POOL: OnceLock<Arc<Pool<MemDevice>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let pool = Pool::create(MemDevice::new(32 << 20), PoolOptions::default()).unwrap();
        pool.create_volume("v", 1 << 20).unwrap();
        pool.write("v", 0, &[0x5a; 8192]).unwrap();
        pool.snapshot("v", "v@1").unwrap();
        Arc::new(pool)
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let Some((&shape, memory)) = data.split_first() else {
        return;
    };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let _ = mem.write_slice(&memory[..memory.len().min(MEM)], GuestAddress(0));
    let Ok(mut q) = Queue::new(256) else {
        return;
    };
    q.set_size(1u16 << (shape % 8));
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x1000), Some(0));
    q.set_used_ring_address(Some(0x2000), Some(0));
    q.set_ready(true);
    let volume = if shape & 0x80 != 0 { "v@1" } else { "v" };
    let avail = u16::from_le_bytes([
        memory.get(0x1002).copied().unwrap_or(0),
        memory.get(0x1003).copied().unwrap_or(0),
    ]);
    let answered = process(pool(), volume, &mem, &mut q);
    // Never more answers than the guest made available, whatever the ring says.
    assert!(answered.len() <= usize::from(avail));
});
