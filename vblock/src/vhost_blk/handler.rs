//! The vhost-user protocol side of an export: guest memory, virtqueues, features, the
//! inflight record, and one worker thread per started queue.
//!
//! Built on the `vhost` crate's request dispatcher and `vhost-user-backend`'s vrings; this
//! replaces `vhost-user-backend`'s own handler, which cannot track requests in flight
//! (its `GET_INFLIGHT_FD` always fails), so that a restarted vblockd learns from the
//! frontend what its predecessor had taken.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VhostUserError, GpuBackend, Result as VhostUserResult,
    VhostUserBackendReqHandlerMut,
};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::event::EventConsumer;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::inflight::{InflightQueue, InflightRegion};
use super::{BlkBackend, Counters, QUEUE_SIZE};
use crate::device::Device;

/// Memory slots offered with `CONFIGURE_MEM_SLOTS`.
const MAX_MEM_SLOTS: u64 = 509;

/// Where a region of guest memory sits in the frontend's address space.
struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

/// A queue's worker: serves kicks until told to stop.
struct Worker {
    stop: EventFd,
    thread: JoinHandle<()>,
}

/// The state of one vhost-user connection.
pub(super) struct Handler<D: Device> {
    backend: Arc<BlkBackend<D>>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    mappings: Vec<Mapping>,
    vrings: Vec<VringRwLock>,
    enabled: Vec<bool>,
    workers: Vec<Option<Worker>>,
    acked_features: u64,
    inflight: Option<InflightRegion>,
    counters: Arc<Counters>,
}

fn internal(e: impl std::fmt::Display) -> VhostUserError {
    VhostUserError::ReqHandlerError(io::Error::other(e.to_string()))
}

impl<D: Device + 'static> Handler<D> {
    pub(super) fn new(
        backend: Arc<BlkBackend<D>>,
        counters: Arc<Counters>,
    ) -> io::Result<Handler<D>> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let queues = backend.queues;
        let vrings = (0..queues)
            .map(|_| VringRwLock::new(mem.clone(), QUEUE_SIZE as u16).map_err(io::Error::other))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Handler {
            backend,
            mem,
            mappings: Vec::new(),
            vrings,
            enabled: vec![false; queues],
            workers: (0..queues).map(|_| None).collect(),
            acked_features: 0,
            inflight: None,
            counters,
        })
    }

    fn vring(&self, index: u32) -> VhostUserResult<&VringRwLock> {
        self.vrings
            .get(index as usize)
            .ok_or(VhostUserError::InvalidParam)
    }

    fn gpa(&self, vmm_addr: u64) -> VhostUserResult<GuestAddress> {
        self.mappings
            .iter()
            .find(|m| vmm_addr >= m.vmm_addr && vmm_addr - m.vmm_addr < m.size)
            .map(|m| GuestAddress(vmm_addr - m.vmm_addr + m.gpa))
            .ok_or(VhostUserError::InvalidParam)
    }

    /// Starts or stops queue `index`'s worker to match its state: it runs while the queue is
    /// ready (it has a kick) and enabled.
    fn update(&mut self, index: usize) -> VhostUserResult<()> {
        let vring = &self.vrings[index];
        let run = {
            let state = vring.get_ref();
            state.get_queue().ready() && state.get_kick().is_some() && self.enabled[index]
        };
        if run && self.workers[index].is_none() {
            let inflight = self.recover(index)?;
            self.workers[index] = Some(self.spawn(index, inflight)?);
        } else if !run {
            self.stop(index);
        }
        Ok(())
    }

    /// With an inflight record: where the queue stands. Requests the previous backend took
    /// and did not complete are the avail-ring entries from the used index on (requests
    /// complete in order), so the queue resumes from there, whatever the frontend said.
    fn recover(&self, index: usize) -> VhostUserResult<Option<InflightQueue>> {
        let Some(region) = &self.inflight else {
            return Ok(None);
        };
        let vring = &self.vrings[index];
        let size = vring.get_ref().get_queue().size();
        let Some(mut record) = region.queue(index as u16, size) else {
            return Err(VhostUserError::InvalidParam);
        };
        let used = vring.queue_used_idx().map_err(internal)?;
        let in_flight = record.recover(used);
        if in_flight > 0 {
            tracing::info!(
                volume = %self.backend.volume,
                queue = index,
                requests = in_flight,
                "resubmitting the requests a previous backend had in flight"
            );
            self.counters
                .resubmitted
                .fetch_add(in_flight as u64, std::sync::atomic::Ordering::Relaxed);
            vring.set_queue_next_avail(used);
            vring.set_queue_next_used(used);
        }
        Ok(Some(record))
    }

    fn spawn(&self, index: usize, inflight: Option<InflightQueue>) -> VhostUserResult<Worker> {
        let vring = self.vrings[index].clone();
        let kick = vring
            .get_ref()
            .get_kick()
            .as_ref()
            .ok_or(VhostUserError::InvalidParam)?
            .try_clone()
            .map_err(VhostUserError::ReqHandlerError)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(VhostUserError::ReqHandlerError)?;
        let stop_worker = stop.try_clone().map_err(VhostUserError::ReqHandlerError)?;
        let backend = self.backend.clone();
        let mem = self.mem.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vhost-blk-q{index}"))
            .spawn(move || serve_queue(&backend, &mem, &vring, &kick, &stop_worker, inflight))
            .map_err(VhostUserError::ReqHandlerError)?;
        Ok(Worker { stop, thread })
    }

    /// Stops queue `index`'s worker (it finishes the requests it took) and waits for it.
    fn stop(&mut self, index: usize) {
        if let Some(w) = self.workers[index].take() {
            let _ = w.stop.write(1);
            let _ = w.thread.join();
        }
    }

    /// Stops every worker (the connection is gone).
    pub(super) fn stop_all(&mut self) {
        for i in 0..self.workers.len() {
            self.stop(i);
        }
    }

    fn set_memory(&mut self, mem: GuestMemoryMmap, mappings: Vec<Mapping>) {
        // Workers see the new memory at their next burst.
        self.mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(mem);
        self.mappings = mappings;
    }
}

/// A queue's worker loop: a burst per kick, until `stop` is signalled.
fn serve_queue<D: Device + 'static>(
    backend: &BlkBackend<D>,
    mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    vring: &VringRwLock,
    kick: &EventConsumer,
    stop: &EventFd,
    mut inflight: Option<InflightQueue>,
) {
    const KICK: u64 = 0;
    const STOP: u64 = 1;
    let Ok(epoll) = Epoll::new() else { return };
    let fds = [(kick.as_raw_fd(), KICK), (stop.as_raw_fd(), STOP)];
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
        if pending && backend.serve(vring, mem, inflight.as_mut()).is_err() {
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
            match ev.data() {
                STOP => return,
                _ => {
                    let _ = kick.consume();
                    pending = true;
                }
            }
        }
    }
}

impl<D: Device + 'static> VhostUserBackendReqHandlerMut for Handler<D> {
    fn set_owner(&mut self) -> VhostUserResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostUserResult<()> {
        self.stop_all();
        Ok(())
    }

    fn reset_device(&mut self) -> VhostUserResult<()> {
        self.stop_all();
        Ok(())
    }

    fn get_features(&mut self) -> VhostUserResult<u64> {
        Ok(self.backend.features())
    }

    fn set_features(&mut self, features: u64) -> VhostUserResult<()> {
        if features & !self.backend.features() != 0 {
            return Err(VhostUserError::InvalidParam);
        }
        self.acked_features = features;
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for vring in &self.vrings {
            vring.set_queue_event_idx(event_idx);
        }
        self.backend.set_event_idx(event_idx);
        // Without protocol features, rings are enabled from the start.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for i in 0..self.vrings.len() {
                self.enabled[i] = true;
                self.update(i)?;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(VhostUserError::InvalidOperation("no postcopy"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            let mapped = GuestRegionMmap::new(
                region.mmap_region(file)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or(VhostUserError::InvalidParam)?;
            regions.push(mapped);
            mappings.push(Mapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa: region.guest_phys_addr,
            });
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(internal)?;
        self.set_memory(mem, mappings);
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostUserResult<()> {
        if num == 0 || num as usize > QUEUE_SIZE {
            return Err(VhostUserError::InvalidParam);
        }
        self.vring(index)?.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostUserResult<()> {
        let (desc, avail, used) = (self.gpa(descriptor)?, self.gpa(available)?, self.gpa(used)?);
        let vring = self.vring(index)?;
        vring
            .set_queue_info(desc.0, avail.0, used.0)
            .map_err(|_| VhostUserError::InvalidParam)?;
        // The used index as the driver sees it (it restarts at 0 after a guest reboot).
        let idx = vring
            .queue_used_idx()
            .map_err(|_| VhostUserError::InvalidParam)?;
        vring.set_queue_next_used(idx);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostUserResult<()> {
        self.vring(index)?.set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostUserResult<VhostUserVringState> {
        self.vring(index)?;
        // Stopping a ring: its worker completes what it took, then the ring is idle.
        self.stop(index as usize);
        let vring = &self.vrings[index as usize];
        vring.set_queue_ready(false);
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        let vring = self.vring(u32::from(index))?.clone();
        let has_kick = fd.is_some();
        // A new kick while running: the worker restarts on it.
        self.stop(usize::from(index));
        vring.set_kick(fd);
        if has_kick {
            vring.set_queue_ready(true);
        }
        self.update(usize::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        self.vring(u32::from(index))?.set_call(fd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        self.vring(u32::from(index))?.set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostUserResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    fn set_protocol_features(&mut self, _features: u64) -> VhostUserResult<()> {
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostUserResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostUserResult<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VhostUserError::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        self.vring(index)?.set_enabled(enable);
        self.enabled[index as usize] = enable;
        self.update(index as usize)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<Vec<u8>> {
        Ok(self.backend.get_config(offset, size))
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<()> {
        // The configuration space is read-only (the cache mode is fixed: write-back).
        Err(VhostUserError::InvalidOperation(
            "read-only configuration space",
        ))
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostUserResult<()> {
        Err(VhostUserError::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostUserResult<File> {
        Err(VhostUserError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        let (region, file, size) = InflightRegion::create(inflight.num_queues, inflight.queue_size)
            .map_err(VhostUserError::ReqHandlerError)?;
        self.inflight = Some(region);
        Ok((
            VhostUserInflight {
                mmap_size: size,
                mmap_offset: 0,
                num_queues: inflight.num_queues,
                queue_size: inflight.queue_size,
            },
            file,
        ))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostUserResult<()> {
        let region = InflightRegion::map(
            file,
            inflight.mmap_offset,
            inflight.mmap_size,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(VhostUserError::ReqHandlerError)?;
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VhostUserResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(VhostUserError::InvalidOperation("no postcopy"));
        }
        let mapped = Arc::new(
            GuestRegionMmap::new(
                region.mmap_region(fd)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or(VhostUserError::InvalidParam)?,
        );
        let mem = self.mem.memory().insert_region(mapped).map_err(internal)?;
        let mut mappings = std::mem::take(&mut self.mappings);
        mappings.push(Mapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa: region.guest_phys_addr,
        });
        self.set_memory(mem, mappings);
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostUserResult<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(internal)?;
        let mut mappings = std::mem::take(&mut self.mappings);
        mappings.retain(|m| m.gpa != region.guest_phys_addr);
        self.set_memory(mem, mappings);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostUserResult<Option<File>> {
        Err(VhostUserError::InvalidOperation("no device state transfer"))
    }

    fn check_device_state(&mut self) -> VhostUserResult<()> {
        Err(VhostUserError::InvalidOperation("no device state transfer"))
    }

    fn get_shmem_config(&mut self) -> VhostUserResult<VhostUserShMemConfig> {
        Err(VhostUserError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostUserResult<()> {
        Err(VhostUserError::InvalidOperation("no dirty logging"))
    }
}

impl<D: Device> Drop for Handler<D> {
    fn drop(&mut self) {
        for w in self.workers.iter_mut().filter_map(Option::take) {
            let _ = w.stop.write(1);
            let _ = w.thread.join();
        }
    }
}
