//! A started queue's ring as devices see it: the virtio-queue [`Queue`] behind its lock and
//! the call eventfd, without the vhost-user-backend types that implement them (a device
//! crate depends on `virtio-queue` for descriptor chains, not on the backend framework).

use std::io;
use std::sync::{RwLockReadGuard, RwLockWriteGuard};

use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

type State = VringState<GuestMemoryAtomic<GuestMemoryMmap>>;

fn queue_error(e: virtio_queue::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// A started queue's ring (shared with the vhost-user handler, which sets it up).
#[derive(Clone)]
pub struct Vring(VringRwLock);

/// The ring locked for taking descriptors and adding used elements.
pub struct VringMut<'a>(RwLockWriteGuard<'a, State>);

/// The ring locked for reading (its indexes) and notifying.
pub struct VringRef<'a>(RwLockReadGuard<'a, State>);

impl Vring {
    pub(crate) fn new(vring: VringRwLock) -> Vring {
        Vring(vring)
    }

    /// A ring of `size` entries at the given guest addresses, ready and enabled, as a
    /// frontend would leave it: for tests and benchmarks that drive a device without one.
    pub fn ready(
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> io::Result<Vring> {
        let vring = VringRwLock::new(mem, size).map_err(queue_error)?;
        vring.set_queue_size(size);
        vring
            .set_queue_info(desc, avail, used)
            .map_err(queue_error)?;
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Ok(Vring(vring))
    }

    /// Locks the ring for taking descriptors and adding used elements.
    pub fn lock(&self) -> VringMut<'_> {
        VringMut(self.0.get_mut())
    }

    /// Locks the ring shared, to read it or notify the driver.
    pub fn read(&self) -> VringRef<'_> {
        VringRef(self.0.get_ref())
    }

    /// Puts a used element (the chain at `head`, `len` bytes written) on the used ring.
    pub fn add_used(&self, head: u16, len: u32) -> io::Result<()> {
        self.0.add_used(head, len).map_err(queue_error)
    }

    /// The used index the device will write next.
    pub fn next_used(&self) -> u16 {
        self.read().queue().next_used()
    }

    /// Asks the driver for no kicks (EVENT_IDX: until [`Self::enable_notification`]).
    pub fn disable_notification(&self) -> io::Result<()> {
        self.0.disable_notification().map_err(queue_error)
    }

    /// Asks the driver for kicks again; true if it queued more meanwhile (serve again).
    pub fn enable_notification(&self) -> io::Result<bool> {
        self.0.enable_notification().map_err(queue_error)
    }

    /// True if the driver wants an interrupt for what was used since the last one.
    pub fn needs_notification(&self) -> io::Result<bool> {
        self.0.needs_notification().map_err(queue_error)
    }

    /// Interrupts the driver (the call eventfd).
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.0.signal_used_queue()
    }
}

impl VringMut<'_> {
    /// The queue.
    pub fn queue(&mut self) -> &mut Queue {
        self.0.get_queue_mut()
    }

    /// Interrupts the driver (the call eventfd).
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.0.signal_used_queue()
    }
}

impl VringRef<'_> {
    /// The queue.
    pub fn queue(&self) -> &Queue {
        self.0.get_queue()
    }

    /// Interrupts the driver (the call eventfd).
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.0.signal_used_queue()
    }
}
