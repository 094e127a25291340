//! Fuzz target: a split virtqueue as a hostile guest lays it out (the descriptor table, the
//! available ring, indirect tables and buffers, in one guest memory region), walked by the
//! ring view both vhost-user backends use. No input makes it panic or touch memory outside
//! the guest's; every buffer handed on lies inside guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_device::ring::RingView;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 << 10;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

fuzz_target!(|data: &[u8]| {
    let Some((&shape, memory)) = data.split_first() else {
        return;
    };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let _ = mem.write_slice(&memory[..memory.len().min(MEM)], GuestAddress(0));
    let size = 1u16 << (shape % 8); // 1..=128
    let Ok(mut q) = Queue::new(256) else {
        return;
    };
    q.set_size(size);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_event_idx(shape & 0x80 != 0);
    q.set_ready(true);
    let Some(mut view) = RingView::new(&q, &mem) else {
        return;
    };
    let avail = view.avail_idx();
    let mut scratch = [0u8; 512];
    for _ in 0..usize::from(size) * 2 {
        let Some(head) = view.pop(avail) else {
            break;
        };
        let mut total = 0u32;
        let walked = view.walk(head, |b| {
            let n = (b.len as usize).min(scratch.len());
            if b.writable {
                view.write(b.addr, &scratch[..n])?;
            } else {
                view.read(b.addr, &mut scratch[..n])?;
            }
            total = total.saturating_add(b.len);
            Ok(())
        });
        let _ = view.single(head);
        view.push_used(head, if walked.is_ok() { total } else { 0 });
    }
    view.publish();
    let mut last = 0;
    let _ = view.needs_interrupt(&mut last);
});
