//! One frontend connection: guest memory, virtqueues, features and the inflight record; a
//! queue is handed to its device when it is ready (it has a kick) and enabled, and taken back
//! when the frontend stops it.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

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

use crate::inflight::{InflightQueue, InflightRegion};
use crate::{StartedQueue, Stats, VhostDevice};

/// Memory slots offered with `CONFIGURE_MEM_SLOTS`.
const MAX_MEM_SLOTS: u64 = 509;

/// Where a region of guest memory sits in the frontend's address space.
struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

/// The state of one vhost-user connection to device `D`.
pub struct Handler<D: VhostDevice> {
    device: Arc<D>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    mappings: Vec<Mapping>,
    vrings: Vec<VringRwLock>,
    enabled: Vec<bool>,
    /// Queues handed to the device.
    started: Vec<bool>,
    /// Each queue's kick eventfd, as the frontend sent it.
    kicks: Vec<Option<File>>,
    acked_features: u64,
    inflight: Option<InflightRegion>,
    stats: Arc<Stats>,
    /// The frontend sent SET_OWNER: the handshake is done (it may be idle from now on).
    owner_set: bool,
}

fn internal(e: impl std::fmt::Display) -> VhostUserError {
    VhostUserError::ReqHandlerError(io::Error::other(e.to_string()))
}

impl<D: VhostDevice> Handler<D> {
    /// Whether the frontend has taken ownership (SET_OWNER, the first step of every
    /// frontend's handshake).
    pub fn owner_set(&self) -> bool {
        self.owner_set
    }

    /// A connection's state for `device`, counting into `stats`.
    pub fn new(device: Arc<D>, stats: Arc<Stats>) -> Handler<D> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let queues = device.queues();
        let size = device.max_queue_size();
        // A queue of a size the device offers can always be made.
        let vrings = (0..queues)
            .filter_map(|_| VringRwLock::new(mem.clone(), size).ok())
            .collect::<Vec<_>>();
        Handler {
            device,
            mem,
            mappings: Vec::new(),
            enabled: vec![false; vrings.len()],
            started: vec![false; vrings.len()],
            kicks: (0..vrings.len()).map(|_| None).collect(),
            vrings,
            acked_features: 0,
            inflight: None,
            stats,
            owner_set: false,
        }
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

    /// Hands queue `index` to the device or takes it back to match its state: the device
    /// serves it while it is ready (it has a kick) and enabled.
    fn update(&mut self, index: usize) -> VhostUserResult<()> {
        let vring = &self.vrings[index];
        let kick = self.kicks[index].as_ref().map(File::try_clone);
        let run = vring.get_ref().get_queue().ready() && kick.is_some() && self.enabled[index];
        if run && !self.started[index] {
            let inflight = self.recover(index)?;
            let kick = kick
                .ok_or(VhostUserError::InvalidParam)?
                .map_err(VhostUserError::ReqHandlerError)?;
            let flags =
                nix::fcntl::fcntl(&kick, nix::fcntl::FcntlArg::F_GETFL).map_err(internal)?;
            let flags =
                nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(&kick, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(internal)?;
            self.device
                .clone()
                .queue_started(
                    index,
                    StartedQueue {
                        vring: crate::Vring::new(vring.clone()),
                        kick,
                        mem: self.mem.clone(),
                        inflight,
                    },
                )
                .map_err(VhostUserError::ReqHandlerError)?;
            self.started[index] = true;
        } else if !run {
            self.stop(index);
        }
        Ok(())
    }

    /// With an inflight record: where the queue stands. Requests the previous backend took
    /// and did not complete are the avail-ring entries from the used index on (the device
    /// completes in order), so the queue resumes from there, whatever the frontend said.
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
                queue = index,
                requests = in_flight,
                "resubmitting the requests a previous backend had in flight"
            );
            self.stats
                .resubmitted
                .fetch_add(in_flight as u64, Ordering::Relaxed);
            vring.set_queue_next_avail(used);
            vring.set_queue_next_used(used);
        }
        Ok(Some(record))
    }

    /// Takes queue `index` back from the device (it completes the requests it took).
    fn stop(&mut self, index: usize) {
        if std::mem::take(&mut self.started[index]) {
            self.device.queue_stopped(index);
        }
    }

    /// Takes every queue back (the connection is gone).
    pub fn stop_all(&mut self) {
        for i in 0..self.started.len() {
            self.stop(i);
        }
    }

    fn set_memory(&mut self, mem: GuestMemoryMmap, mappings: Vec<Mapping>) {
        // Queues see the new memory at their next burst.
        self.mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(mem);
        self.mappings = mappings;
    }
}

impl<D: VhostDevice> VhostUserBackendReqHandlerMut for Handler<D> {
    fn set_owner(&mut self) -> VhostUserResult<()> {
        self.owner_set = true;
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
        Ok(self.device.features())
    }

    fn set_features(&mut self, features: u64) -> VhostUserResult<()> {
        if features & !self.device.features() != 0 {
            return Err(VhostUserError::InvalidParam);
        }
        self.acked_features = features;
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for vring in &self.vrings {
            vring.set_queue_event_idx(event_idx);
        }
        self.device.set_features(features);
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
        if num == 0 || num > u32::from(self.device.max_queue_size()) {
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
        self.kicks[index as usize] = None;
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        let vring = self.vring(u32::from(index))?.clone();
        let has_kick = fd.is_some();
        // A new kick while running: the worker restarts on it.
        self.stop(usize::from(index));
        self.kicks[usize::from(index)] = match &fd {
            Some(f) => Some(f.try_clone().map_err(VhostUserError::ReqHandlerError)?),
            None => None,
        };
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
        Ok(self.device.protocol_features())
    }

    fn set_protocol_features(&mut self, _features: u64) -> VhostUserResult<()> {
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostUserResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostUserResult<()> {
        // QEMU's net frontend enables and disables rings before it sets features: offering
        // VHOST_USER_F_PROTOCOL_FEATURES is what counts here.
        if self.device.features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
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
        Ok(self.device.config(offset, size))
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

impl<D: VhostDevice> Drop for Handler<D> {
    fn drop(&mut self) {
        self.stop_all();
    }
}
