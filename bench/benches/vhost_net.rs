//! The per-frame ring cost of a vhost-user-net port, on one core and without a peer: a burst
//! of 32 frames taken off a guest's transmit ring (`recv_burst`: descriptors checked, frames
//! copied into the worker's buffer, used elements written) and put into a guest's receive
//! buffers (`deliver_burst`: mergeable buffers, virtio-net header, used elements, one index
//! update). `cargo bench -p bench --bench vhost_net`.
//!
//! The guest is simulated in the same memory: every avail slot holds its own descriptor
//! (transmit: a readable buffer with a 12-byte header and the frame; receive: a writable
//! 2 KiB buffer), so the guest's only work per burst is moving each avail index on by 32.
//! Everything stays in this core's caches, unlike with a real guest polling from another
//! core (`compare vhost-net` measures that): this is the instruction cost the datapath adds.

use std::hint::black_box;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nix::sys::epoll::{Epoll, EpollCreateFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use vhost_device::{StartedQueue, VhostDevice, Vring};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vswitch::tap::VNET_HDR_LEN;
use vswitch::vhost_net::{KickTarget, VhostNetPort};

const SIZE: u16 = 256;
const BURST: usize = 32;
const FRAME: usize = 64;
const RX_BUF: u32 = 2048;

/// Guest addresses of one queue's rings and buffers.
struct Layout {
    desc: u64,
    avail: u64,
    used: u64,
    buffers: u64,
}

const TX: Layout = Layout {
    desc: 0x10_0000,
    avail: 0x11_0000,
    used: 0x12_0000,
    buffers: 0x20_0000,
};
const RX: Layout = Layout {
    desc: 0x13_0000,
    avail: 0x14_0000,
    used: 0x15_0000,
    buffers: 0x40_0000,
};

/// Writes a ring whose every avail slot `i` offers descriptor `i`: a buffer of `len` bytes,
/// device-writable if `writable`.
fn guest_ring(mem: &GuestMemoryMmap, l: &Layout, len: u32, writable: bool) {
    let flags = if writable {
        VRING_DESC_F_WRITE as u16
    } else {
        0
    };
    for i in 0..u64::from(SIZE) {
        let d = l.desc + 16 * i;
        let buf = l.buffers + u64::from(RX_BUF) * i;
        mem.write_obj(buf.to_le(), GuestAddress(d)).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(d + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(d + 12)).unwrap();
        mem.write_obj((i as u16).to_le(), GuestAddress(l.avail + 4 + 2 * i))
            .unwrap();
        if !writable {
            // Header (plain), then a frame from 02:..:01 to 02:..:02.
            let mut f = vec![0u8; VNET_HDR_LEN + FRAME];
            f[VNET_HDR_LEN..VNET_HDR_LEN + 6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
            f[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
            mem.write_slice(&f, GuestAddress(buf)).unwrap();
        }
    }
}

/// The guest makes `n` more buffers available.
fn offer(mem: &GuestMemoryMmap, l: &Layout, idx: &mut u16, n: u16) {
    *idx = idx.wrapping_add(n);
    mem.write_obj(idx.to_le(), GuestAddress(l.avail + 2))
        .unwrap();
}

/// A started queue on `l`'s rings, as the vhost-user handler hands it to the device.
fn started(mem: &GuestMemoryAtomic<GuestMemoryMmap>, l: &Layout) -> StartedQueue {
    let vring = Vring::ready(mem.clone(), SIZE, l.desc, l.avail, l.used).unwrap();
    let kick = OwnedFd::from(EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap());
    StartedQueue {
        vring,
        kick: kick.into(),
        mem: mem.clone(),
        inflight: None,
    }
}

fn rings(c: &mut Criterion) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    guest_ring(&mem, &TX, (VNET_HDR_LEN + FRAME) as u32, false);
    guest_ring(&mem, &RX, RX_BUF, true);
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let epoll = Arc::new(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap());
    let port = Arc::new(VhostNetPort::new(
        "bench",
        None,
        1500,
        vec![KickTarget { epoll, token: 1 }],
    ));
    port.set_features(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF);
    port.clone()
        .queue_started(0, started(&atomic, &RX))
        .unwrap();
    port.clone()
        .queue_started(1, started(&atomic, &TX))
        .unwrap();

    let mut frames = vec![0u8; BURST * 128];
    let mut spans = [(0usize, 0usize); BURST];
    let (mut tx_idx, mut rx_idx) = (0u16, 0u16);
    let mut g = c.benchmark_group("vhost_net/64B");
    g.throughput(Throughput::Elements(BURST as u64));
    g.bench_function("guest_to_guest_burst_of_32", |b| {
        b.iter(|| {
            offer(&mem, &TX, &mut tx_idx, BURST as u16);
            offer(&mem, &RX, &mut rx_idx, BURST as u16);
            let (taken, _) = port.recv_burst(0, false, true, &mut frames, 128, &mut spans);
            assert_eq!(taken, BURST);
            let hdr = [0u8; VNET_HDR_LEN];
            let items = spans[..taken]
                .iter()
                .map(|&(at, n)| (&hdr, &frames[at + VNET_HDR_LEN..at + n]));
            let mut ok = 0;
            port.deliver_burst(0, items, |r| ok += usize::from(r.is_ok()));
            port.end_rx_burst();
            black_box(ok)
        })
    });
    g.finish();
    // Every frame went through whole: the receive ring's last used element is a full frame.
    let used: u16 = mem.read_obj(GuestAddress(RX.used + 2)).unwrap();
    assert_eq!(used, rx_idx, "every offered receive buffer was used");
    let last = u64::from(used.wrapping_sub(1) % SIZE);
    let len: u32 = mem
        .read_obj(GuestAddress(RX.used + 4 + 8 * last + 4))
        .unwrap();
    assert_eq!(len as usize, VNET_HDR_LEN + FRAME);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3));
    targets = rings
}
criterion_main!(benches);
