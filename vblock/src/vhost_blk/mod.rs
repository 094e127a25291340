//! vhost-user-blk: a volume (or, read-only, a snapshot) served to a VM over a vhost-user
//! socket, with rust-vmm (`vhost`, `vhost-user-backend`'s vrings, `virtio-queue`,
//! `vm-memory`).
//!
//! The protocol side is `vhost-device`'s; here each started virtqueue gets its own worker
//! thread, which does its I/O through its own io_uring ring (the device keeps one ring per
//! thread). Requests complete in the order the guest queued them and are tracked in the
//! frontend's inflight record: a vblockd killed mid-I/O and restarted resumes every queue
//! where it stood, and QEMU (`reconnect=`) carries on without the guest seeing an error. Requests are parsed
//! from descriptor chains with `virtio-queue`'s readers and writers, which check every address
//! against guest memory: a chain that points outside it, loops, or is too short for its request
//! completes with an error status (or, if there is no room even for the status, with length 0);
//! the backend never panics on guest input.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_device::{InflightQueue, StartedQueue, VhostDevice, Vring};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueOwnedT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryLoadGuard,
    GuestMemoryMmap,
};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::device::Device;
use crate::{Error, Kind, Pool};

mod request;

use request::{Request, RequestType, SECTOR, Segment};
/// Most segments of one request.
const SEG_MAX: u32 = 126;
/// Largest request, in sectors, for discard and write-zeroes.
const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Queue size offered.
const QUEUE_SIZE: usize = 256;
/// Largest request served: its data is at most this many bytes (larger ones fail with IOERR;
/// guests send at most a few MiB, `max_sectors_kb`).
const MAX_REQUEST_BYTES: usize = 64 << 20;
/// Most bytes of bounce buffers for one burst: requests beyond it fail with IOERR, so that a
/// guest pointing many descriptors at the same memory cannot make the daemon allocate without
/// bound.
const MAX_BURST_BOUNCE: usize = 512 << 20;
/// Alignment (address and length) of a guest buffer that the pool's `O_DIRECT` I/O can use
/// in place.
const DIRECT_ALIGN: usize = 4096;

type Chain = virtio_queue::DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>;

/// The data buffers of a request as host memory, when every one of them is aligned for direct
/// I/O and the status byte has a descriptor of its own (the layout of QEMU, libblkio and
/// Linux's driver): a read then goes from the pool straight into the guest's buffers, without
/// a bounce buffer and a copy. `None` for any other layout (served through a bounce buffer).
fn direct_segments(chain: &Chain, mem: &GuestMemoryMmap) -> Option<Vec<(*mut u8, usize)>> {
    let writable: Vec<(GuestAddress, u32)> = chain
        .clone()
        .filter(|d| d.is_write_only())
        .map(|d| (d.addr(), d.len()))
        .collect();
    let (status, data) = writable.split_last()?;
    if status.1 != 1 || data.is_empty() {
        return None;
    }
    data.iter()
        .map(|&(addr, len)| {
            let len = len as usize;
            if len == 0 || !len.is_multiple_of(DIRECT_ALIGN) {
                return None;
            }
            let ptr = mem.get_slice(addr, len).ok()?.ptr_guard_mut().as_ptr();
            (ptr as usize)
                .is_multiple_of(DIRECT_ALIGN)
                .then_some((ptr, len))
        })
        .collect()
}

/// Whether any two of the segments overlap (a guest may hand the same memory to two
/// requests; those then go through bounce buffers, never two live references to one byte).
fn overlapping(segments: &mut [(*mut u8, usize)]) -> bool {
    segments.sort_unstable_by_key(|&(p, _)| p as usize);
    segments
        .windows(2)
        .any(|w| (w[0].0 as usize).saturating_add(w[0].1) > w[1].0 as usize)
}

/// Settings of an export.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// Number of virtqueues (each with its own worker).
    pub queues: usize,
}

impl Default for ExportConfig {
    fn default() -> ExportConfig {
        ExportConfig { queues: 1 }
    }
}

/// The vhost-user backend of one volume.
pub struct BlkBackend<D: Device> {
    pool: Arc<Pool<D>>,
    volume: String,
    read_only: bool,
    serial: [u8; 20],
    queues: usize,
    event_idx: AtomicBool,
    /// The worker of each started queue.
    workers: Mutex<Vec<Option<Worker>>>,
}

/// A queue's worker thread: serves kicks until told to stop.
struct Worker {
    stop: EventFd,
    thread: JoinHandle<()>,
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

impl<D: Device + 'static> BlkBackend<D> {
    /// A backend for `volume` of `pool`; snapshots are exported read-only.
    pub fn new(
        pool: Arc<Pool<D>>,
        volume: &str,
        cfg: &ExportConfig,
    ) -> Result<BlkBackend<D>, Error> {
        let v = pool.volume(volume)?;
        if cfg.queues == 0 || cfg.queues > 64 {
            return Err(Error::Invalid(format!("{} queues: 1 to 64", cfg.queues)));
        }
        let mut serial = [0u8; 20];
        let id = format!("vblock-{}", v.id);
        serial[..id.len().min(20)].copy_from_slice(&id.as_bytes()[..id.len().min(20)]);
        Ok(BlkBackend {
            pool,
            // Bound to the volume's identity: after a delete, no later volume of that name.
            volume: format!("#{}", v.id),
            read_only: v.kind == Kind::Snapshot,
            serial,
            queues: cfg.queues,
            event_idx: AtomicBool::new(false),
            workers: Mutex::new((0..cfg.queues).map(|_| None).collect()),
        })
    }

    fn size(&self) -> u64 {
        self.pool.volume(&self.volume).map_or(0, |v| v.size)
    }

    /// The virtio-blk configuration space.
    fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        let put32 =
            |c: &mut [u8], at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
        c[0..8].copy_from_slice(&(self.size() / SECTOR).to_le_bytes());
        put32(&mut c, 12, SEG_MAX);
        put32(&mut c, 20, SECTOR as u32); // blk_size: the logical block
        c[24] = 3; // physical_block_exp: 2^3 logical blocks = 4 KiB
        c[25] = 0; // alignment_offset
        c[26..28].copy_from_slice(&8u16.to_le_bytes()); // min_io_size: 8 sectors
        put32(&mut c, 28, 128); // opt_io_size: 64 KiB (a cluster)
        c[32] = 1; // writeback: a volatile cache, FLUSH makes writes durable
        c[34..36].copy_from_slice(&(self.queues as u16).to_le_bytes());
        put32(&mut c, 36, MAX_DISCARD_SECTORS);
        put32(&mut c, 40, 1); // max_discard_seg
        put32(&mut c, 44, 8); // discard_sector_alignment: 4 KiB
        put32(&mut c, 48, MAX_DISCARD_SECTORS);
        put32(&mut c, 52, 1); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// Processes the requests of a burst; returns each one's used length (data + status).
    /// Reads go to the pool as one batch and writes as another (many requests in flight at
    /// once, as the guest queued them; virtio gives requests in flight no order); the other
    /// requests run one by one, in order.
    fn requests(&self, chains: Vec<Chain>, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        struct Parsed<'m> {
            head: u16,
            reader: virtio_queue::Reader<'m, ()>,
            writer: virtio_queue::Writer<'m, ()>,
            status: virtio_queue::Writer<'m, ()>,
            room: usize,
            /// `None`: the chain is too short for a header.
            request: Option<Request>,
            /// The data buffers in host memory, if the pool can read into them directly.
            direct: Option<Vec<(*mut u8, usize)>>,
        }
        // Requests complete in the order the guest queued them, so the used index is always
        // the exact boundary between finished and unfinished requests: after a crash the
        // frontend restarts the queue from it and every unfinished request runs again.
        let mut parsed: Vec<Result<Parsed<'_>, u16>> = Vec::with_capacity(chains.len());
        for chain in chains {
            let head = chain.head_index();
            let direct = direct_segments(&chain, mem);
            let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem))
            else {
                parsed.push(Err(head));
                continue;
            };
            let room = writer.available_bytes();
            // The status is the last writable byte, whatever happens to the data before it.
            let status = match room.checked_sub(1).map(|at| writer.split_at(at)) {
                Some(Ok(w)) => w,
                _ => {
                    parsed.push(Err(head));
                    continue;
                }
            };
            let mut header = [0u8; request::HEADER_LEN];
            let request = reader
                .read_exact(&mut header)
                .is_ok()
                .then(|| Request::parse(&header))
                .filter(|_| room - 1 <= MAX_REQUEST_BYTES)
                .filter(|_| reader.available_bytes() <= MAX_REQUEST_BYTES);
            parsed.push(Ok(Parsed {
                head,
                reader,
                writer,
                status,
                room: room - 1,
                request,
                direct,
            }));
        }
        // Where a request of the batches goes: its byte offset.
        let batched = |p: &Parsed<'_>, kind: RequestType| {
            p.request
                .filter(|r| r.kind == kind && (kind == RequestType::In || !self.read_only))
                .and_then(|r| r.offset())
        };
        // Reads into the guest's own buffers where they allow it (no two overlapping in the
        // burst); the others into bounce buffers, copied out after.
        let mut segments: Vec<(*mut u8, usize)> = parsed
            .iter()
            .flatten()
            .filter(|p| batched(p, RequestType::In).is_some())
            .filter_map(|p| p.direct.as_ref())
            .flatten()
            .copied()
            .collect();
        if overlapping(&mut segments) {
            for p in parsed.iter_mut().flatten() {
                p.direct = None;
            }
        }
        // Bounce buffers within the burst's budget.
        let mut budget = MAX_BURST_BOUNCE;
        for p in parsed.iter_mut().flatten() {
            let need = if batched(p, RequestType::In).is_some() && p.direct.is_none() {
                p.room
            } else if batched(p, RequestType::Out).is_some() {
                p.reader.available_bytes()
            } else {
                0
            };
            match budget.checked_sub(need) {
                Some(left) => budget = left,
                None => p.request = None,
            }
        }
        // The reads, in one batch (a failed batch: each on its own, so only a bad one errs).
        let mut bufs: Vec<Option<crate::device::AlignedBuf>> = parsed
            .iter()
            .flatten()
            .filter(|p| batched(p, RequestType::In).is_some())
            .map(|p| {
                p.direct
                    .is_none()
                    .then(|| crate::device::AlignedBuf::new(p.room))
            })
            .collect();
        let read_results: Vec<bool> = {
            // Per read: its pieces (one per guest buffer, or the bounce buffer).
            let mut reqs: Vec<crate::ReadRequest<'_>> = Vec::new();
            let mut pieces: Vec<usize> = Vec::new();
            for (p, buf) in parsed
                .iter()
                .flatten()
                .filter_map(|p| batched(p, RequestType::In).map(|o| (p, o)))
                .zip(bufs.iter_mut())
            {
                let (p, offset) = p;
                let before = reqs.len();
                match (buf, &p.direct) {
                    (Some(b), _) => reqs.push(crate::ReadRequest {
                        volume: &self.volume,
                        offset,
                        buf: &mut b[..],
                    }),
                    (None, Some(direct)) => {
                        let mut at = offset;
                        for &(ptr, len) in direct {
                            // SAFETY: `ptr..ptr + len` is guest memory, mapped while `mem`
                            // (held by the caller for this whole call) lives, and the guest
                            // gave it to be filled. It is shared with the guest, which may
                            // write it at any time, as any shared mapping may change: the
                            // slice is only written (by the kernel's O_DIRECT reads, and zeros
                            // for holes), never read here, and no two slices of a burst
                            // overlap (checked above). Another queue's thread may fill the
                            // same guest page at the same time only if the guest hands one
                            // buffer to two queues at once; it then gets one of the two
                            // contents, as with any device.
                            #[allow(unsafe_code)]
                            let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
                            reqs.push(crate::ReadRequest {
                                volume: &self.volume,
                                offset: at,
                                buf,
                            });
                            at = at.saturating_add(len as u64);
                        }
                    }
                    (None, None) => {}
                }
                pieces.push(reqs.len() - before);
            }
            // Each guest request is charged to the volume's limits once, however many pieces.
            self.pool
                .read_pieces(&mut reqs, &pieces)
                .iter()
                .zip(&pieces)
                .map(|(r, &n)| n > 0 && r.is_ok())
                .collect()
        };
        // The writes, in one batch (their data copied out of the guest first).
        let mut wdata: Vec<Option<(u64, crate::device::AlignedBuf)>> = Vec::new();
        for p in parsed.iter_mut().flatten() {
            if let Some(offset) = batched(p, RequestType::Out) {
                let mut b = crate::device::AlignedBuf::new(p.reader.available_bytes());
                wdata.push(p.reader.read_exact(&mut b).is_ok().then_some((offset, b)));
            }
        }
        let write_results: Vec<bool> = {
            let reqs: Vec<crate::WriteRequest<'_>> = wdata
                .iter()
                .flatten()
                .map(|(offset, d)| crate::WriteRequest {
                    volume: &self.volume,
                    offset: *offset,
                    data: &d[..],
                })
                .collect();
            let mut outcomes = self.pool.write_batch(&reqs).into_iter();
            wdata
                .iter()
                .map(|d| d.is_some() && outcomes.next().is_some_and(|r| r.is_ok()))
                .collect()
        };
        let (mut reads, mut writes) = (bufs.iter().zip(read_results), write_results.into_iter());
        let mut used = Vec::with_capacity(parsed.len());
        for p in parsed {
            let mut p = match p {
                Ok(p) => p,
                // No room even for a status: completed with length 0.
                Err(head) => {
                    used.push((head, 0));
                    continue;
                }
            };
            let mut direct_len = 0;
            let ok_if = |ok: bool| {
                if ok {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                }
            };
            let status = match p.request {
                None => VIRTIO_BLK_S_IOERR,
                Some(_) if batched(&p, RequestType::In).is_some() => match reads.next() {
                    Some((Some(buf), true)) => ok_if(p.writer.write_all(buf).is_ok()),
                    // Read in place: the data is in the guest's buffers already.
                    Some((None, true)) => {
                        // What was filled: the buffers as read for the I/O (the guest
                        // may have changed its descriptors since).
                        direct_len = p.direct.iter().flatten().map(|&(_, len)| len).sum();
                        VIRTIO_BLK_S_OK
                    }
                    _ => VIRTIO_BLK_S_IOERR,
                },
                Some(_) if batched(&p, RequestType::Out).is_some() => {
                    ok_if(writes.next().unwrap_or(false))
                }
                Some(request) => {
                    match self.execute(request, &mut p.reader, &mut p.writer, p.room) {
                        Ok(()) => VIRTIO_BLK_S_OK,
                        Err(s) => s,
                    }
                }
            };
            let data = p.writer.bytes_written() + direct_len;
            let len = match p.status.write_all(&[status as u8]) {
                Ok(()) => data + 1,
                Err(_) => data,
            };
            used.push((p.head, len as u32));
        }
        used
    }

    /// Carries out a request that is not part of a burst's batches.
    fn execute(
        &self,
        request: Request,
        reader: &mut virtio_queue::Reader<'_, ()>,
        writer: &mut virtio_queue::Writer<'_, ()>,
        data_room: usize,
    ) -> Result<(), u32> {
        let io_err = |_| VIRTIO_BLK_S_IOERR;
        let writable = || {
            if self.read_only {
                Err(VIRTIO_BLK_S_IOERR)
            } else {
                Ok(())
            }
        };
        match request.kind {
            RequestType::In => {
                let offset = request.offset().ok_or(VIRTIO_BLK_S_IOERR)?;
                let mut buf = vec![0u8; data_room];
                self.pool
                    .read(&self.volume, offset, &mut buf)
                    .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                writer.write_all(&buf).map_err(io_err)
            }
            RequestType::Out => {
                writable()?;
                let offset = request.offset().ok_or(VIRTIO_BLK_S_IOERR)?;
                let mut buf = vec![0u8; reader.available_bytes()];
                reader.read_exact(&mut buf).map_err(io_err)?;
                self.pool
                    .write(&self.volume, offset, &buf)
                    .map_err(|_| VIRTIO_BLK_S_IOERR)
            }
            RequestType::Flush => self.pool.flush().map_err(|_| VIRTIO_BLK_S_IOERR),
            RequestType::GetId => {
                let n = data_room.min(VIRTIO_BLK_ID_BYTES as usize);
                writer.write_all(&self.serial[..n]).map_err(io_err)
            }
            kind @ (RequestType::Discard | RequestType::WriteZeroes) => {
                writable()?;
                let mut bytes = [0u8; request::SEGMENT_LEN];
                while reader.available_bytes() >= request::SEGMENT_LEN {
                    reader.read_exact(&mut bytes).map_err(io_err)?;
                    let segment = Segment::parse(&bytes);
                    if segment.sectors > MAX_DISCARD_SECTORS
                        || (kind == RequestType::Discard && segment.flags != 0)
                    {
                        return Err(VIRTIO_BLK_S_UNSUPP);
                    }
                    let (offset, len) = segment.range().ok_or(VIRTIO_BLK_S_IOERR)?;
                    let r = if kind == RequestType::Discard {
                        self.pool.discard(&self.volume, offset, len)
                    } else {
                        // Zeroed blocks are released either way (UNMAP or not): they read as zeros.
                        self.pool.write_zeroes(&self.volume, offset, len)
                    };
                    r.map_err(|_| VIRTIO_BLK_S_IOERR)?;
                }
                Ok(())
            }
            RequestType::Unsupported(_) => Err(VIRTIO_BLK_S_UNSUPP),
        }
    }

    /// A queue's worker loop: a burst per kick, until `stop` is signalled.
    fn serve_queue(&self, mut queue: StartedQueue, stop: &EventFd) {
        const KICK: u64 = 0;
        const STOP: u64 = 1;
        let Ok(epoll) = Epoll::new() else { return };
        let fds = [(queue.kick.as_raw_fd(), KICK), (stop.as_raw_fd(), STOP)];
        for (fd, token) in fds {
            let ev = EpollEvent::new(EventSet::IN, token);
            if epoll.ctl(ControlOperation::Add, fd, ev).is_err() {
                return;
            }
        }
        // Requests queued (or resubmitted) before the worker started are served at once.
        let mut pending = true;
        let mut events = [EpollEvent::default(); 2];
        loop {
            if pending
                && self
                    .serve(&queue.vring, &queue.mem, queue.inflight.as_mut())
                    .is_err()
            {
                // A broken ring (hostile guest): the queue stops, the rest keeps serving.
                return;
            }
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            pending = false;
            for ev in &events[..n] {
                if ev.data() == STOP {
                    return;
                }
                let _ = (&queue.kick).read(&mut [0u8; 8]);
                pending = true;
            }
        }
    }

    /// Serves the requests queue `vring` holds (with EVENT_IDX, until no kick is due).
    fn serve(
        &self,
        vring: &Vring,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
        mut inflight: Option<&mut InflightQueue>,
    ) -> io::Result<()> {
        if self.event_idx.load(Ordering::Relaxed) {
            loop {
                vring.disable_notification()?;
                self.process_queue(vring, mem, inflight.as_deref_mut())?;
                if !vring.enable_notification()? {
                    return Ok(());
                }
            }
        }
        self.process_queue(vring, mem, inflight).map(|_| ())
    }

    /// One burst: every request the queue holds, taken, executed and completed in order.
    fn process_queue(
        &self,
        vring: &Vring,
        atomic: &GuestMemoryAtomic<GuestMemoryMmap>,
        mut inflight: Option<&mut InflightQueue>,
    ) -> io::Result<bool> {
        let mem = atomic.memory();
        let chains: Vec<_> = vring
            .lock()
            .queue()
            .iter(atomic.memory())
            .map_err(invalid)?
            .collect();
        if chains.is_empty() {
            return Ok(false);
        }
        if let Some(record) = inflight.as_deref_mut() {
            for c in &chains {
                record.take(c.head_index());
            }
        }
        for (head, len) in self.requests(chains, &mem) {
            if let Some(record) = inflight.as_deref_mut() {
                record.completing(head);
            }
            vring.add_used(head, len)?;
            if let Some(record) = inflight.as_deref_mut() {
                record.completed(head, vring.next_used());
            }
        }
        if vring.needs_notification()? {
            vring.signal_used_queue()?;
        }
        Ok(true)
    }
}

impl<D: Device + 'static> VhostDevice for BlkBackend<D> {
    fn queues(&self) -> usize {
        self.queues
    }

    fn max_queue_size(&self) -> u16 {
        QUEUE_SIZE as u16
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // Requests complete in queue order: the inflight record is exact.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn config(&self, offset: u32, size: u32) -> Vec<u8> {
        vhost_device::config_slice(&self.config_space(), offset, size)
    }

    fn set_features(&self, features: u64) {
        self.event_idx.store(
            features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            Ordering::Relaxed,
        );
    }

    fn queue_started(self: Arc<Self>, index: usize, queue: StartedQueue) -> io::Result<()> {
        self.queue_stopped(index);
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_worker = stop.try_clone()?;
        let me = self.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vhost-blk-q{index}"))
            .spawn(move || me.serve_queue(queue, &stop_worker))?;
        if let Some(slot) = self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(index)
        {
            *slot = Some(Worker { stop, thread });
        }
        Ok(())
    }

    fn queue_stopped(&self, index: usize) {
        let worker = self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(index)
            .and_then(Option::take);
        if let Some(w) = worker {
            let _ = w.stop.write(1);
            let _ = w.thread.join();
        }
    }
}

/// Counters of an export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Frontend connections served so far.
    pub connections: u64,
    /// Connections being served now (0 or 1).
    pub active: u64,
    /// Requests found in flight when a connection started, run again.
    pub resubmitted: u64,
}

/// A running export: a thread that serves the socket, one VMM connection after another
/// (QEMU with `reconnect=` comes back after a restart), until dropped.
pub struct Export {
    server: vhost_device::Server,
}

impl Export {
    /// Serves `volume` of `pool` on the unix socket `socket` (replaced if it exists).
    pub fn start<D: Device + 'static>(
        pool: Arc<Pool<D>>,
        volume: &str,
        socket: &Path,
        cfg: ExportConfig,
    ) -> Result<Export, Error> {
        // Validate now, so that errors reach the caller; every connection is served by the
        // volume this is, by identity (`#ID`), never by a later volume of the same name.
        let identity = format!("#{}", pool.volume(volume)?.id);
        BlkBackend::new(pool.clone(), &identity, &cfg)?;
        let (pool_c, volume_c) = (pool.clone(), identity);
        let device = move || {
            BlkBackend::new(pool_c.clone(), &volume_c, &cfg)
                .ok()
                .map(Arc::new)
        };
        // Whatever the guest wrote is made durable when it goes away.
        let disconnected = move || {
            let _ = pool.flush();
        };
        let server =
            vhost_device::Server::start(socket, &format!("blk-{volume}"), device, disconnected)
                .map_err(|e| {
                    Error::Io(
                        format!("vhost-user export of {volume}"),
                        io::Error::other(e.to_string()),
                    )
                })?;
        // Who may connect: the daemon's socket owner, group and mode (QEMU may run as an
        // unprivileged user of group kvm).
        daemon_kit::SocketAccess::current()
            .apply(socket)
            .map_err(|e| Error::Io(format!("access of {}", socket.display()), e))?;
        Ok(Export { server })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        self.server.socket()
    }

    /// The export's counters.
    pub fn stats(&self) -> ExportStats {
        ExportStats {
            connections: self.server.stats().connections(),
            active: self.server.stats().active(),
            resubmitted: self.server.stats().resubmitted(),
        }
    }
}

/// The request path of a queue, for the fuzz targets (feature `fuzzing`).
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use super::*;

    /// Takes every request the guest queued on `queue` (its rings in `mem`) and runs them
    /// against `volume` of `pool` as a queue's worker does; returns each request's head and
    /// used length (an empty list if the queue holds nothing usable).
    pub fn process<D: Device + 'static>(
        pool: Arc<Pool<D>>,
        volume: &str,
        mem: &GuestMemoryMmap,
        queue: &mut virtio_queue::Queue,
    ) -> Vec<(u16, u32)> {
        let Ok(backend) = BlkBackend::new(pool, volume, &ExportConfig::default()) else {
            return Vec::new();
        };
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let chains: Vec<_> = match queue.iter(atomic.memory()) {
            Ok(it) => it.collect(),
            Err(_) => return Vec::new(),
        };
        backend.requests(chains, &atomic.memory())
    }
}

#[cfg(test)]
mod tests {
    use super::overlapping;

    #[test]
    fn overlapping_segments_are_found_in_any_order() {
        let at = |a: usize| a as *mut u8;
        assert!(!overlapping(&mut []));
        assert!(!overlapping(&mut [
            (at(0x3000), 0x1000),
            (at(0x1000), 0x2000)
        ]));
        assert!(overlapping(&mut [
            (at(0x3000), 0x1000),
            (at(0x1000), 0x2001)
        ]));
        assert!(overlapping(&mut [
            (at(0x1000), 0x1000),
            (at(0x1000), 0x1000)
        ]));
        assert!(overlapping(&mut [
            (at(0x9000), 0x1000),
            (at(0x1000), 0x1000),
            (at(0x8000), 0x1001)
        ]));
    }
}
