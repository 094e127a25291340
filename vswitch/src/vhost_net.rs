//! vhost-user-net ports: a VM's virtio-net device served by the switch over a vhost-user
//! socket (`RUN_DIR/vhost/<port>.sock`; QEMU: `-netdev vhost-user`), with `vhost-device`.
//!
//! Queue 0 receives (switch to guest), queue 1 transmits (guest to switch). The transmit
//! queue's kick is one more descriptor in the epoll set of the port's datapath worker, which
//! takes frames off the ring in bursts like it reads a TAP; frames to the guest are written
//! into its receive buffers (mergeable) by whichever worker forwards them. Frames carry the
//! 12-byte virtio-net header both ways, so checksum and TSO offloads go through the switch
//! untouched; toward a guest that did not accept them, checksums are completed and TCP
//! super-frames cut into segments here.
//!
//! Everything read from the guest goes through `virtio-queue`'s checked readers and
//! writers: a chain outside guest memory, a loop or an oversize frame is dropped and
//! counted, never followed.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use overlay_net::MacAddr;
use overlay_net::gso::{TcpSegmenter, complete_checksum};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_device::{StartedQueue, VhostDevice};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::tap::{VNET_F_NEEDS_CSUM, VNET_GSO_NONE, VNET_HDR_LEN, VnetHeader};

/// Receive queue index.
const RX: usize = 0;
/// Transmit queue index.
const TX: usize = 1;
/// Queue size offered.
const QUEUE_SIZE: u16 = 256;
/// Largest frame a guest may send (a 64 KiB TSO super-frame and its header).
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65536;

/// A started queue as the port keeps it.
struct Queue {
    vring: VringRwLock,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    kick: File,
}

/// A vhost-user-net port: the device the VM sees, and the switch's endpoint.
pub struct VhostNetPort {
    name: String,
    mac: Option<MacAddr>,
    mtu: u16,
    /// The worker serving the port, and the port's token there.
    epoll: Arc<Epoll>,
    token: u64,
    features: AtomicU64,
    rx: Mutex<Option<Queue>>,
    tx: Mutex<Option<Queue>>,
    /// Frames the guest sent that were not forwardable (bad chains, oversize).
    pub tx_malformed: AtomicU64,
    /// Frames for the guest dropped for want of receive buffers.
    pub rx_no_buffers: AtomicU64,
    /// The port was removed: its queues are not taken again (a VM still connected sees a
    /// dead card until it goes away).
    closed: std::sync::atomic::AtomicBool,
}

impl VhostNetPort {
    /// A port named `name` served by the worker whose epoll set is `epoll` (the transmit
    /// kick is added there with `token`); `mac` is offered to the guest if set.
    pub fn new(
        name: &str,
        mac: Option<MacAddr>,
        mtu: u16,
        epoll: Arc<Epoll>,
        token: u64,
    ) -> VhostNetPort {
        VhostNetPort {
            name: name.to_owned(),
            mac,
            mtu,
            epoll,
            token,
            features: AtomicU64::new(0),
            rx: Mutex::new(None),
            tx: Mutex::new(None),
            tx_malformed: AtomicU64::new(0),
            rx_no_buffers: AtomicU64::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The port was removed from the switch: lets go of the queues for good.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.queue_stopped(RX);
        self.queue_stopped(TX);
    }

    /// The port's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn accepted(&self, bit: u32) -> bool {
        self.features.load(Ordering::Relaxed) & (1u64 << bit) != 0
    }

    /// Takes the next frame the guest sent (virtio-net header first) into `buf`; `Ok(None)`
    /// when there is none. A chain that cannot be read (outside guest memory, a loop, larger
    /// than `buf`) is completed and reported as length 0.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let guard = lock(&self.tx);
        let Some(q) = guard.as_ref() else {
            return Ok(None);
        };
        let mem = q.mem.memory();
        let Some(chain) = q
            .vring
            .get_mut()
            .get_queue_mut()
            .pop_descriptor_chain(mem.clone())
        else {
            return Ok(None);
        };
        let head = chain.head_index();
        // A chain as long as the queue went round in a loop (the walk stops there).
        let size = q.vring.get_ref().get_queue().size();
        let looped = chain.clone().count() >= usize::from(size);
        let n = match chain.reader(&mem) {
            _ if looped => 0,
            Ok(mut r) if r.available_bytes() <= buf.len() => {
                let n = r.available_bytes();
                r.read_exact(&mut buf[..n]).map(|()| n).unwrap_or(0)
            }
            _ => 0,
        };
        if n == 0 {
            self.tx_malformed.fetch_add(1, Ordering::Relaxed);
        }
        q.vring.add_used(head, 0).map_err(io::Error::other)?;
        Ok(Some(n))
    }

    /// After a burst of [`Self::recv`]: tells the guest its frames are sent, and, if the
    /// burst stopped short of an empty ring, makes the worker come back.
    pub fn end_tx_burst(&self, full: bool) {
        let guard = lock(&self.tx);
        if let Some(q) = guard.as_ref() {
            if q.vring.needs_notification().unwrap_or(true) {
                let _ = q.vring.signal_used_queue();
            }
            if full {
                let _ = (&q.kick).write(&1u64.to_ne_bytes());
            }
        }
    }

    /// Consumes the transmit kick (the worker was woken by it).
    pub fn consume_kick(&self) {
        if let Some(q) = lock(&self.tx).as_ref() {
            let _ = (&q.kick).read(&mut [0u8; 8]);
        }
    }

    /// Puts a frame without offload metadata into the guest's receive buffers.
    pub fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        self.deliver(&[0u8; VNET_HDR_LEN], frame)
    }

    /// Puts a frame with its virtio-net header into the guest's receive buffers; offloads the
    /// guest did not accept are finished here (checksum completed, TCP segmented).
    pub fn send_with_header(&self, header: &[u8; VNET_HDR_LEN], frame: &[u8]) -> io::Result<()> {
        let vnet = VnetHeader::parse(header);
        if vnet.is_plain() {
            return self.deliver(header, frame);
        }
        let tso_ok = match vnet.gso_type & 0x7f {
            t if t == VNET_GSO_NONE => true,
            1 => self.accepted(VIRTIO_NET_F_GUEST_TSO4),
            4 => self.accepted(VIRTIO_NET_F_GUEST_TSO6),
            _ => false,
        };
        let csum_ok = vnet.flags & VNET_F_NEEDS_CSUM == 0 || self.accepted(VIRTIO_NET_F_GUEST_CSUM);
        if tso_ok && csum_ok {
            return self.deliver(header, frame);
        }
        if vnet.is_tcp_gso() {
            let mut seg = TcpSegmenter::new(frame, vnet.gso_size as usize)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let mut out = vec![0u8; seg.max_segment_len()];
            while let Some(r) = seg.next_into(&mut out) {
                let n = r.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                self.send_frame(&out[..n])?;
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
        self.send_frame(&copy)
    }

    /// Writes header + frame into as many receive buffers as it takes (one without
    /// MRG_RXBUF), then notifies the guest.
    fn deliver(&self, header: &[u8; VNET_HDR_LEN], frame: &[u8]) -> io::Result<()> {
        let guard = lock(&self.rx);
        let Some(q) = guard.as_ref() else {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "no guest"));
        };
        let mem = q.mem.memory();
        let total = VNET_HDR_LEN + frame.len();
        let mergeable = self.accepted(VIRTIO_NET_F_MRG_RXBUF);
        let mut writers = Vec::new();
        // Buffers that cannot be written (outside guest memory): given back empty.
        let mut broken = Vec::new();
        let mut room = 0;
        {
            let mut state = q.vring.get_mut();
            let queue = state.get_queue_mut();
            let start = queue.next_avail();
            while room < total {
                let Some(chain) = queue.pop_descriptor_chain(mem.clone()) else {
                    break;
                };
                let head = chain.head_index();
                match chain.writer(&mem) {
                    Ok(w) if w.available_bytes() > 0 => {
                        room += w.available_bytes();
                        writers.push((head, w));
                        if !mergeable {
                            break;
                        }
                    }
                    _ => broken.push(head),
                }
            }
            if room < total {
                // Not enough buffers: leave them for the next frame.
                queue.set_next_avail(start);
                drop(state);
                self.rx_no_buffers.fetch_add(1, Ordering::Relaxed);
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "no receive buffers",
                ));
            }
        }
        for head in broken {
            q.vring.add_used(head, 0).map_err(io::Error::other)?;
        }
        let mut hdr = *header;
        hdr[10..12].copy_from_slice(&(writers.len() as u16).to_le_bytes());
        // The header, then the frame, across the buffers in order.
        let mut parts: [&[u8]; 2] = [&hdr, frame];
        for (head, w) in writers.iter_mut() {
            let mut written = 0usize;
            for part in parts.iter_mut() {
                let n = part.len().min(w.available_bytes());
                if n == 0 {
                    continue;
                }
                if w.write_all(&part[..n]).is_err() {
                    break;
                }
                *part = &part[n..];
                written += n;
            }
            q.vring
                .add_used(*head, written as u32)
                .map_err(io::Error::other)?;
        }
        if q.vring.needs_notification().unwrap_or(true) {
            let _ = q.vring.signal_used_queue();
        }
        Ok(())
    }
}

fn lock(m: &Mutex<Option<Queue>>) -> std::sync::MutexGuard<'_, Option<Queue>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VhostDevice for VhostNetPort {
    fn queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MTU
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.mac.is_some() {
            f |= 1 << VIRTIO_NET_F_MAC;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // No CONFIG: QEMU's net frontend keeps the configuration space itself (the MAC of
        // `-device virtio-net-pci,mac=`).
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn config(&self, offset: u32, size: u32) -> Vec<u8> {
        // mac[6], status u16, max_virtqueue_pairs u16, mtu u16.
        let mut c = [0u8; 12];
        if let Some(mac) = self.mac {
            c[0..6].copy_from_slice(&mac.0);
        }
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        vhost_device::config_slice(&c, offset, size)
    }

    fn set_features(&self, features: u64) {
        self.features.store(features, Ordering::Relaxed);
    }

    fn queue_started(self: Arc<Self>, index: usize, queue: StartedQueue) -> io::Result<()> {
        let q = Queue {
            vring: queue.vring,
            mem: queue.mem,
            kick: queue.kick,
        };
        let slot = match index {
            RX => &self.rx,
            TX => &self.tx,
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "no such queue")),
        };
        // Checked under the queue's lock, which `close` takes after setting the flag.
        let mut guard = lock(slot);
        if self.closed.load(Ordering::Acquire) {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "port removed"));
        }
        if index == TX {
            self.epoll
                .add(
                    q.kick.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, self.token),
                )
                .map_err(io::Error::from)?;
        }
        *guard = Some(q);
        Ok(())
    }

    fn queue_stopped(&self, index: usize) {
        match index {
            RX => *lock(&self.rx) = None,
            TX => {
                let mut tx = lock(&self.tx);
                if let Some(q) = tx.as_ref() {
                    let _ = self.epoll.delete(q.kick.as_fd());
                }
                *tx = None;
            }
            _ => {}
        }
    }
}
