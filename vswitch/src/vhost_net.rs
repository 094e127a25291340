//! vhost-user-net ports: a VM's virtio-net device served by the switch over a vhost-user
//! socket (`RUN_DIR/vhost/<port>.sock`; QEMU: `-netdev vhost-user`), with `vhost-device`.
//!
//! Queue pair `k` is queues `2k` (receive: switch to guest) and `2k + 1` (transmit: guest
//! to switch); a port offers one pair per datapath worker (MQ). Pair `k`'s transmit kick is
//! one more descriptor in the epoll set of the `k`-th worker from the port's first, which
//! takes frames off the ring in bursts like it reads a TAP, with the guest's kicks turned off
//! while it does (EVENT_IDX or the used ring's NO_NOTIFY flag) and coming back by itself
//! while frames keep arriving. Frames to the guest are written into its receive buffers
//! (mergeable) by whichever worker forwards them, on the receive queue of that worker's
//! lane, and all buffers of one frame are published with one used-index update; the guest
//! is notified once per burst, if it asked to be (EVENT_IDX's used_event, NO_INTERRUPT).
//! Frames carry the 12-byte virtio-net header both ways, so checksum and TSO offloads go
//! through the switch untouched; toward a guest that did not accept them, checksums are
//! completed and TCP super-frames cut into segments here.
//!
//! Everything read from the guest is bounds-checked against its memory map (`vm-memory`):
//! a chain outside guest memory, a loop or an oversize frame is dropped and counted, never
//! followed.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use overlay_net::MacAddr;
use overlay_net::gso::{TcpSegmenter, complete_checksum};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_device::ring::{RingError, RingView};
use vhost_device::{StartedQueue, VhostDevice};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Address, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::tap::{VNET_F_NEEDS_CSUM, VNET_GSO_NONE, VNET_HDR_LEN, VnetHeader};

/// Most queue pairs a port offers.
pub const MAX_PAIRS: usize = 8;
/// Queue size offered.
const QUEUE_SIZE: u16 = 256;
/// Largest frame a guest may send (a 64 KiB TSO super-frame and its header).
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65536;

/// A started queue as the port keeps it.
struct Queue {
    vring: vhost_device::Vring,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    kick: File,
    /// Used-ring entries of one frame (receive) or burst (transmit); kept to avoid
    /// allocating.
    used: Vec<(u16, u32)>,
    /// The used index when the guest's wish for an interrupt was last checked.
    last_check: u16,
}

/// Where a transmit queue's kick goes: the epoll set of the worker serving the queue pair,
/// with the token that names the port and the pair there.
#[derive(Clone, Debug)]
pub struct KickTarget {
    /// The worker's epoll set.
    pub epoll: Arc<Epoll>,
    /// The token epoll reports.
    pub token: u64,
}

/// Counters of one queue pair.
#[derive(Debug, Default)]
pub struct PairCounters {
    /// Frames the guest sent on the pair's transmit queue.
    pub tx_frames: AtomicU64,
    /// Frames put on the pair's receive queue.
    pub rx_frames: AtomicU64,
}

/// A vhost-user-net port: the device the VM sees, and the switch's endpoint. Queue pair `k`
/// is queues `2k` (receive) and `2k + 1` (transmit).
pub struct VhostNetPort {
    name: String,
    mac: Option<MacAddr>,
    mtu: u16,
    /// Per queue pair: where its transmit kick goes.
    kicks: Vec<KickTarget>,
    features: AtomicU64,
    rx: Vec<Mutex<Option<Queue>>>,
    tx: Vec<Mutex<Option<Queue>>>,
    /// Per queue pair.
    pub pairs: Vec<PairCounters>,
    /// Frames the guest sent that were not forwardable (bad chains, oversize).
    pub tx_malformed: AtomicU64,
    /// Frames for the guest dropped for want of receive buffers.
    pub rx_no_buffers: AtomicU64,
    /// Receive queues (bits) given frames since the guest was last notified.
    rx_pending: AtomicU64,
    /// Receive queues (bits) started.
    rx_started: AtomicU64,
    /// The port was removed: its queues are not taken again (a VM still connected sees a
    /// dead card until it goes away).
    closed: AtomicBool,
}

impl VhostNetPort {
    /// A port named `name` with one queue pair per kick target (at most [`MAX_PAIRS`]):
    /// pair `k`'s transmit kick is added to `kicks[k]`'s epoll set; `mac` is offered to the
    /// guest if set.
    pub fn new(name: &str, mac: Option<MacAddr>, mtu: u16, kicks: Vec<KickTarget>) -> VhostNetPort {
        let mut kicks = kicks;
        kicks.truncate(MAX_PAIRS);
        let n = kicks.len();
        VhostNetPort {
            name: name.to_owned(),
            mac,
            mtu,
            kicks,
            features: AtomicU64::new(0),
            rx: (0..n).map(|_| Mutex::new(None)).collect(),
            tx: (0..n).map(|_| Mutex::new(None)).collect(),
            pairs: (0..n).map(|_| PairCounters::default()).collect(),
            tx_malformed: AtomicU64::new(0),
            rx_no_buffers: AtomicU64::new(0),
            rx_pending: AtomicU64::new(0),
            rx_started: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// The port was removed from the switch: lets go of the queues for good.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for q in 0..2 * self.kicks.len() {
            self.queue_stopped(q);
        }
    }

    /// Queue pairs offered.
    pub fn queue_pairs(&self) -> usize {
        self.kicks.len()
    }

    /// The port's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn accepted(&self, bit: u32) -> bool {
        self.features.load(Ordering::Relaxed) & (1u64 << bit) != 0
    }

    /// Takes up to `spans.len()` frames the guest sent on pair `pair` (`kicked`: the worker
    /// was woken by its kick, which is consumed) (virtio-net header first), packed one after
    /// the other in `frames` (each at a multiple of 64 bytes: small frames of a burst share
    /// lines and pages instead of lying 64 KiB apart, in the same cache sets): frame `i`'s
    /// start and length in `spans[i]` (length 0: a chain that could not be read — outside
    /// guest memory, a loop, larger than `slot` — dropped and counted).
    /// Returns how many were taken and whether more may wait (the caller comes back without
    /// a kick: the guest does not kick while a burst is being taken). With `poll`, an empty
    /// ring leaves kicks off and also answers "more": the caller polls it (until it calls
    /// without `poll`, which asks for kicks again).
    pub fn recv_burst(
        &self,
        pair: usize,
        kicked: bool,
        poll: bool,
        frames: &mut [u8],
        slot: usize,
        spans: &mut [(usize, usize)],
    ) -> (usize, bool) {
        let Some(tx) = self.tx.get(pair) else {
            return (0, false);
        };
        let mut guard = lock(tx);
        let Some(q) = guard.as_mut() else {
            return (0, false);
        };
        // Consumed first when it woke the worker: a kick from here on wakes it again.
        if kicked {
            let _ = (&q.kick).read(&mut [0u8; 8]);
        }
        let mem = q.mem.memory();
        let mut state = q.vring.lock();
        let queue = state.queue();
        let Some(mut ring) = RingView::new(queue, &mem) else {
            // Rings outside guest memory: nothing can be taken.
            return (0, false);
        };
        ring.set_kicks(false);
        let mut avail = ring.avail_idx();
        ring.prefetch(avail, spans.len());
        q.used.clear();
        let mut taken = 0;
        let mut malformed = 0;
        let mut empty = false;
        let mut at = 0;
        while taken < spans.len() {
            let Some(head) = ring.pop(avail) else {
                if poll {
                    // The caller polls for a while: kicks stay off (the guest saves its
                    // eventfd writes, the worker its wake-ups), and it comes back.
                    break;
                }
                // Ask for kicks again, and look once more: a frame may have come in between.
                if ring.set_kicks(true) {
                    avail = ring.avail_idx();
                    continue;
                }
                empty = true;
                break;
            };
            let Some(buf) = frames.get_mut(at..at + slot) else {
                ring.unpop(1);
                break;
            };
            let mut len = 0usize;
            let walked = match ring.single(head) {
                // The common case: the frame in one buffer.
                Some(b) if !b.writable => buf
                    .get_mut(..b.len as usize)
                    .ok_or(RingError::OutsideMemory)
                    .and_then(|dst| ring.read(b.addr, dst))
                    .map(|()| len = b.len as usize),
                _ => ring
                    .walk(head, |b| {
                        if b.writable {
                            return Ok(());
                        }
                        let end = len + b.len as usize;
                        // Larger than a slot: as unusable as a buffer outside memory.
                        let dst = buf.get_mut(len..end).ok_or(RingError::OutsideMemory)?;
                        ring.read(b.addr, dst)?;
                        len = end;
                        Ok(())
                    })
                    .map(|_| ()),
            };
            if walked.is_err() || len == 0 {
                malformed += 1;
                len = 0;
            }
            spans[taken] = (at, len);
            at += len.next_multiple_of(64);
            taken += 1;
            q.used.push((head, 0));
        }
        // The burst's used elements together, after its copies (see `fill`).
        ring.push_used_all(&q.used);
        q.used.clear();
        if malformed > 0 {
            self.tx_malformed.fetch_add(malformed, Ordering::Relaxed);
        }
        self.pairs[pair]
            .tx_frames
            .fetch_add(taken as u64, Ordering::Relaxed);
        if taken > 0 {
            ring.publish();
            if ring.needs_interrupt(&mut q.last_check) {
                let _ = state.signal_used_queue();
            }
        }
        ring.finish(state.queue());
        (taken, !empty)
    }

    /// Puts a frame without offload metadata into the guest's receive buffers, on the
    /// receive queue of pair `lane` (modulo the pairs the guest uses; a worker passes its
    /// own index, so workers fill different queues).
    pub fn send_frame(&self, lane: usize, frame: &[u8]) -> io::Result<()> {
        self.deliver(lane, &[0u8; VNET_HDR_LEN], frame)
    }

    /// Puts a frame with its virtio-net header into the guest's receive buffers; offloads the
    /// guest did not accept are finished here (checksum completed, TCP segmented).
    pub fn send_with_header(
        &self,
        lane: usize,
        header: &[u8; VNET_HDR_LEN],
        frame: &[u8],
    ) -> io::Result<()> {
        if self.takes_as_is(header) {
            return self.deliver(lane, header, frame);
        }
        let vnet = VnetHeader::parse(header);
        if vnet.is_tcp_gso() {
            let mut seg = TcpSegmenter::new(frame, vnet.gso_size as usize)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let mut out = vec![0u8; seg.max_segment_len()];
            while let Some(r) = seg.next_into(&mut out) {
                let n = r.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                self.send_frame(lane, &out[..n])?;
            }
            return Ok(());
        }
        let mut copy = frame.to_vec();
        complete_checksum(
            &mut copy,
            vnet.csum_start as usize,
            vnet.csum_offset as usize,
        )
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        self.send_frame(lane, &copy)
    }

    /// The receive queue for `lane`: among the pairs with a started receive queue, the
    /// `lane`-th (modulo); the first pair if none is started.
    fn rx_queue(&self, lane: usize) -> usize {
        let n = self.rx.len();
        let start = lane % n.max(1);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&k| self.rx_started.load(Ordering::Relaxed) & (1 << k) != 0)
            .unwrap_or(0)
    }

    /// Writes header + frame into as many receive buffers as it takes (one without
    /// MRG_RXBUF). The guest is notified by [`Self::end_rx_burst`].
    fn deliver(&self, lane: usize, header: &[u8; VNET_HDR_LEN], frame: &[u8]) -> io::Result<()> {
        let mut result = Ok(());
        self.deliver_burst(lane, std::iter::once((header, frame)), |r| result = r);
        result
    }

    /// Whether a frame with this header goes to the guest as it is (its offloads are ones
    /// the guest accepted): then it can be part of a [`Self::deliver_burst`].
    pub fn takes_as_is(&self, header: &[u8; VNET_HDR_LEN]) -> bool {
        let vnet = VnetHeader::parse(header);
        if vnet.is_plain() {
            return true;
        }
        let tso_ok = match vnet.gso_type & 0x7f {
            t if t == VNET_GSO_NONE => true,
            1 => self.accepted(VIRTIO_NET_F_GUEST_TSO4),
            4 => self.accepted(VIRTIO_NET_F_GUEST_TSO6),
            _ => false,
        };
        tso_ok && (vnet.flags & VNET_F_NEEDS_CSUM == 0 || self.accepted(VIRTIO_NET_F_GUEST_CSUM))
    }

    /// Puts frames (virtio-net header, frame: offloads the guest accepted, see
    /// [`Self::takes_as_is`]) into the guest's receive buffers, on the receive queue of
    /// `lane`, under one lock; `done` is told each frame's fate, in order. The guest sees
    /// them and is notified at [`Self::end_rx_burst`].
    pub fn deliver_burst<'a>(
        &self,
        lane: usize,
        frames: impl Iterator<Item = (&'a [u8; VNET_HDR_LEN], &'a [u8])>,
        mut done: impl FnMut(io::Result<()>),
    ) {
        let pair = self.rx_queue(lane);
        let mut guard = lock(&self.rx[pair]);
        let Some(q) = guard.as_mut() else {
            for _ in frames {
                done(Err(io::Error::new(io::ErrorKind::NotConnected, "no guest")));
            }
            return;
        };
        let mem = q.mem.memory();
        let mergeable = self.accepted(VIRTIO_NET_F_MRG_RXBUF);
        let mut state = q.vring.lock();
        let queue = state.queue();
        let Some(mut ring) = RingView::new(queue, &mem) else {
            for _ in frames {
                done(Err(io::Error::other("receive ring outside guest memory")));
            }
            return;
        };
        let mut avail = ring.avail_idx();
        let (hint, _) = frames.size_hint();
        ring.prefetch(avail, hint);
        let mut delivered = 0u64;
        q.used.clear();
        for (header, frame) in frames {
            match fill(&mut ring, &mut avail, &mut q.used, mergeable, header, frame) {
                Ok(()) => {
                    delivered += 1;
                    done(Ok(()));
                }
                Err(e) => {
                    self.rx_no_buffers.fetch_add(1, Ordering::Relaxed);
                    done(Err(e));
                }
            }
        }
        // The burst's used elements, in one run, made visible at its end (one index update
        // for all its frames; the guest polls the used index, and every update costs both
        // sides a cache line).
        ring.push_used_all(&q.used);
        ring.finish(state.queue());
        if delivered > 0 {
            let bit = 1 << pair;
            if self.rx_pending.load(Ordering::Acquire) & bit == 0 {
                self.rx_pending.fetch_or(bit, Ordering::AcqRel);
            }
            self.pairs[pair]
                .rx_frames
                .fetch_add(delivered, Ordering::Relaxed);
        }
    }

    /// After a burst of frames to this port: notifies the guest once, if it wants to be.
    pub fn end_rx_burst(&self) {
        let mut pending = self.rx_pending.swap(0, Ordering::AcqRel);
        while pending != 0 {
            let pair = pending.trailing_zeros() as usize;
            pending &= pending - 1;
            let mut guard = lock(&self.rx[pair]);
            if let Some(q) = guard.as_mut() {
                publish_and_notify(q);
            }
        }
    }
}

/// Writes one frame after its header into as many receive buffers of `ring` as it takes
/// (one without MRG_RXBUF) and appends them to `used`, the burst's used elements (written to
/// the used ring together at the end of the burst, as DPDK's shadow used ring does: the
/// guest polls that ring, and every line written there is taken from its core). Without
/// enough buffers, nothing is taken.
fn fill(
    ring: &mut RingView<'_>,
    avail: &mut u16,
    used: &mut Vec<(u16, u32)>,
    mergeable: bool,
    header: &[u8; VNET_HDR_LEN],
    frame: &[u8],
) -> io::Result<()> {
    let mut hdr = *header;
    // num_buffers: 1 unless the frame spans several buffers (patched below).
    hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
    let total = VNET_HDR_LEN + frame.len();
    // The common case: the next buffer is one descriptor that holds the whole frame.
    if let Some(head) = ring.pop(*avail) {
        if let Some(b) = ring.single(head)
            && b.writable
            && b.len as usize >= total
            && ring.write_all(b.addr, &[&hdr, frame]).is_ok()
        {
            used.push((head, total as u32));
            return Ok(());
        }
        // Anything else the general way, from the same buffer.
        ring.unpop(1);
    }
    let start = used.len();
    // Where num_buffers (header bytes 10 and 11) landed in guest memory.
    let mut num_buffers_at = [None; 2];
    let mut done = 0;
    let mut looked_again = false;
    while done < total {
        if !mergeable && used[start..].iter().any(|(_, len)| *len > 0) {
            break;
        }
        let Some(head) = ring.pop(*avail) else {
            // The guest may have added buffers since the burst started: look once more.
            if looked_again {
                break;
            }
            looked_again = true;
            *avail = ring.avail_idx();
            continue;
        };
        let from = done;
        let walked = ring.walk(head, |b| {
            if done == total || !b.writable {
                return Ok(());
            }
            let n = (b.len as usize).min(total - done);
            for (slot, at) in num_buffers_at.iter_mut().zip(10..12) {
                if (done..done + n).contains(&at) {
                    *slot = b.addr.checked_add((at - done) as u64);
                }
            }
            // The header, then the frame.
            let mut addr = b.addr;
            let end = done + n;
            if done < VNET_HDR_LEN {
                let part = &hdr[done..end.min(VNET_HDR_LEN)];
                ring.write(addr, part)?;
                addr = addr.unchecked_add(part.len() as u64);
            }
            let (f, e) = (done.max(VNET_HDR_LEN) - VNET_HDR_LEN, end - VNET_HDR_LEN);
            if e > f {
                ring.write(addr, &frame[f..e])?;
            }
            done = end;
            Ok(())
        });
        if walked.is_ok() && done > from {
            used.push((head, (done - from) as u32));
        } else {
            // Outside guest memory, or no room at all: given back empty.
            done = from;
            used.push((head, 0));
        }
    }
    if done < total {
        // Not enough buffers: they stay for the next frame.
        ring.unpop((used.len() - start) as u16);
        used.truncate(start);
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "no receive buffers",
        ));
    }
    let buffers = used[start..].iter().filter(|(_, len)| *len > 0).count() as u16;
    if buffers > 1 {
        for (addr, byte) in num_buffers_at.iter().zip(buffers.to_le_bytes()) {
            if let Some(addr) = addr {
                let _ = ring.write(*addr, &[byte]);
            }
        }
    }
    // Buffers given back empty first, then the frame's: the guest reads num_buffers entries
    // in a row.
    used[start..].sort_by_key(|(_, len)| *len > 0);
    Ok(())
}

/// Makes the used elements put on a receive queue visible to the guest and notifies it if
/// it asked to be.
fn publish_and_notify(q: &mut Queue) {
    let mem = q.mem.memory();
    let state = q.vring.read();
    if let Some(ring) = RingView::new(state.queue(), &mem) {
        ring.publish();
        if ring.needs_interrupt(&mut q.last_check) {
            let _ = state.signal_used_queue();
        }
    }
}

fn lock(m: &Mutex<Option<Queue>>) -> std::sync::MutexGuard<'_, Option<Queue>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VhostDevice for VhostNetPort {
    fn queues(&self) -> usize {
        2 * self.kicks.len()
    }

    fn max_queue_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MTU
            | 1 << VIRTIO_NET_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.mac.is_some() {
            f |= 1 << VIRTIO_NET_F_MAC;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // No CONFIG: QEMU's net frontend keeps the configuration space itself (the MAC of
        // `-device virtio-net-pci,mac=`).
        // MQ: the frontend asks how many queues there are (GET_QUEUE_NUM) and enables the
        // pairs the guest uses (SET_VRING_ENABLE).
        VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::MQ
    }

    fn config(&self, offset: u32, size: u32) -> Vec<u8> {
        // mac[6], status u16, max_virtqueue_pairs u16, mtu u16.
        let mut c = [0u8; 12];
        if let Some(mac) = self.mac {
            c[0..6].copy_from_slice(&mac.0);
        }
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&(self.kicks.len() as u16).to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        vhost_device::config_slice(&c, offset, size)
    }

    fn set_features(&self, features: u64) {
        self.features.store(features, Ordering::Relaxed);
    }

    fn queue_started(self: Arc<Self>, index: usize, queue: StartedQueue) -> io::Result<()> {
        let last_check = queue.vring.next_used();
        let q = Queue {
            vring: queue.vring,
            mem: queue.mem,
            kick: queue.kick,
            used: Vec::new(),
            last_check,
        };
        let (pair, transmit) = (index / 2, index % 2 == 1);
        let slot = match (transmit, pair < self.kicks.len()) {
            (_, false) => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "no such queue"));
            }
            (false, true) => &self.rx[pair],
            (true, true) => &self.tx[pair],
        };
        // Checked under the queue's lock, which `close` takes after setting the flag.
        let mut guard = lock(slot);
        if self.closed.load(Ordering::Acquire) {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "port removed"));
        }
        if transmit {
            let k = &self.kicks[pair];
            k.epoll
                .add(
                    q.kick.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, k.token),
                )
                .map_err(io::Error::from)?;
        } else {
            self.rx_started.fetch_or(1 << pair, Ordering::AcqRel);
        }
        *guard = Some(q);
        Ok(())
    }

    fn queue_stopped(&self, index: usize) {
        let pair = index / 2;
        if pair >= self.kicks.len() {
            return;
        }
        if index.is_multiple_of(2) {
            let mut rx = lock(&self.rx[pair]);
            self.rx_started.fetch_and(!(1 << pair), Ordering::AcqRel);
            // What a burst in progress put on the ring is the guest's: published.
            if let Some(q) = rx.as_mut() {
                publish_and_notify(q);
            }
            *rx = None;
        } else {
            let mut tx = lock(&self.tx[pair]);
            if let Some(q) = tx.as_ref() {
                let _ = self.kicks[pair].epoll.delete(q.kick.as_fd());
            }
            *tx = None;
        }
    }
}
