//! `vhost-device`: the vhost-user protocol side of libvirtual's devices — guest memory,
//! virtqueues, feature negotiation and the inflight record — for a device that says what it
//! offers and serves the queues it is handed ([`VhostDevice`]).
//!
//! Built on rust-vmm: the `vhost` crate's request dispatcher, `vhost-user-backend`'s vrings,
//! `virtio-queue`, `vm-memory`. It replaces `vhost-user-backend`'s own handler, which cannot
//! track requests in flight (its `GET_INFLIGHT_FD` always fails) and runs its own threads per
//! queue; here the device decides who serves a queue (vblock: a thread per queue with its own
//! io_uring ring; vswitch: its datapath workers).
//!
//! * [`handler`]: one frontend connection's state and messages.
//! * [`inflight`]: the inflight record (`INFLIGHT_SHMFD`), libvhost-user's layout.
//! * [`ring`]: a split virtqueue resolved to host pointers once per burst (the fast path).

pub mod handler;
pub mod inflight;
#[allow(unsafe_code)]
// ring access through host pointers; every unsafe block carries a SAFETY note.
pub mod ring;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{BackendListener, Listener};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use handler::Handler;
pub use inflight::InflightQueue;
mod vring;
pub use vring::{Vring, VringMut, VringRef};

/// Errors of the vhost-user side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be listened on or accepted from.
    #[error("vhost-user socket: {0}")]
    Socket(String),
    /// A system call failed.
    #[error("{0}: {1}")]
    Io(String, #[source] io::Error),
}

/// A device served over vhost-user.
pub trait VhostDevice: Send + Sync + 'static {
    /// Number of virtqueues.
    fn queues(&self) -> usize;
    /// Largest queue size offered.
    fn max_queue_size(&self) -> u16;
    /// The virtio features offered (with `VHOST_USER_F_PROTOCOL_FEATURES`).
    fn features(&self) -> u64;
    /// The vhost-user protocol features offered (`INFLIGHT_SHMFD` only by a device that
    /// completes each queue's requests in the order it takes them).
    fn protocol_features(&self) -> VhostUserProtocolFeatures;
    /// `size` bytes of the configuration space from `offset` (zeros past its end).
    fn config(&self, offset: u32, size: u32) -> Vec<u8>;
    /// The features the frontend accepted (`VIRTIO_RING_F_EVENT_IDX` among them).
    fn set_features(&self, features: u64);
    /// Queue `index` starts: serve it from `queue` (kicks arrive on `queue.kick`) until
    /// [`Self::queue_stopped`].
    fn queue_started(self: Arc<Self>, index: usize, queue: StartedQueue) -> io::Result<()>;
    /// Queue `index` stops: return once nothing touches it any more (every request taken
    /// completed).
    fn queue_stopped(&self, index: usize);
}

/// `size` bytes of a configuration space from `offset`, zeros past its end (what
/// [`VhostDevice::config`] answers).
pub fn config_slice(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let start = (offset as usize).min(space.len());
    let end = start.saturating_add(size as usize).min(space.len());
    let mut out = space[start..end].to_vec();
    out.resize(size as usize, 0);
    out
}

/// A started queue, handed to its device.
pub struct StartedQueue {
    /// The ring (addresses, indexes, notifications).
    pub vring: Vring,
    /// The kick eventfd (non-blocking): readable when the driver kicks; read 8 bytes to
    /// consume, write 8 to wake the server again.
    pub kick: File,
    /// Guest memory (follows the frontend's memory updates).
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// The queue's inflight record, if the frontend keeps one: mark requests taken and
    /// completed in it.
    pub inflight: Option<InflightQueue>,
}

/// Counters of a device's connections.
#[derive(Debug, Default)]
pub struct Stats {
    connections: AtomicU64,
    ended: AtomicU64,
    resubmitted: AtomicU64,
}

impl Stats {
    /// Frontend connections served so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Connections being served now (0 or 1): a connection ends once every queue of it has
    /// stopped.
    pub fn active(&self) -> u64 {
        self.connections()
            .saturating_sub(self.ended.load(Ordering::Acquire))
    }

    /// Requests found in flight when a connection started (taken by a predecessor that was
    /// killed) and run again.
    pub fn resubmitted(&self) -> u64 {
        self.resubmitted.load(Ordering::Relaxed)
    }
}

/// Waits for one frontend on `listener` and serves it until it goes away (or breaks the
/// protocol); every queue is stopped on return.
pub fn serve_connection<D: VhostDevice>(
    listener: &mut Listener,
    device: Arc<D>,
    stats: &Arc<Stats>,
    name: &str,
) -> Result<(), Error> {
    let handler = Arc::new(std::sync::Mutex::new(Handler::new(device, stats.clone())));
    let mut accepting = BackendListener::new(listener, handler.clone())
        .map_err(|e| Error::Socket(e.to_string()))?;
    let mut conn = loop {
        match accepting.accept() {
            Ok(Some(conn)) => break conn,
            Ok(None) => continue,
            Err(e) => return Err(Error::Socket(e.to_string())),
        }
    };
    let n = stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
    tracing::info!(device = %name, connection = n, "vhost-user frontend connected");
    // A frontend starts its handshake at once (SET_OWNER first): one that stays silent holds
    // the socket (served one connection at a time) and is dropped after a while, so that the
    // next one is served. After the handshake a frontend may be idle as long as it likes.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&conn);
    let started = std::time::Instant::now();
    let mut handshake = true;
    // One message after another until the frontend goes away or breaks the protocol.
    loop {
        use vhost::vhost_user::Error as E;
        if handshake {
            let left = HANDSHAKE_TIMEOUT.saturating_sub(started.elapsed());
            if !readable_within(fd, left) {
                tracing::warn!(
                    device = %name,
                    connection = n,
                    timeout_secs = HANDSHAKE_TIMEOUT.as_secs(),
                    "vhost-user frontend did not take ownership in time: dropped"
                );
                break;
            }
        }
        match conn.handle_request() {
            Ok(()) => {
                if handshake
                    && handler
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .owner_set()
                {
                    handshake = false;
                }
            }
            Err(E::Disconnected | E::PartialMessage) => {
                tracing::info!(device = %name, connection = n, "vhost-user frontend disconnected");
                break;
            }
            Err(e) => {
                tracing::warn!(device = %name, connection = n, error = %e, "vhost-user connection ends: the frontend broke the protocol");
                break;
            }
        }
    }
    handler.lock().unwrap_or_else(|p| p.into_inner()).stop_all();
    stats.ended.fetch_add(1, Ordering::Release);
    Ok(())
}

/// How long a new frontend has to take ownership (SET_OWNER) before it is dropped.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Whether socket `fd` has something to read (or is closed) within `timeout`.
#[allow(unsafe_code)] // borrowing the connection's descriptor; the SAFETY note is below.
fn readable_within(fd: std::os::fd::RawFd, timeout: std::time::Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    // SAFETY: `fd` is the connection's socket, open for as long as the caller holds the
    // connection, which outlives this call.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(borrowed, PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) => return n > 0,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return true, // let the read report it
        }
    }
}

/// A vhost-user socket served by a thread, one frontend connection after another (QEMU with
/// `reconnect=` comes back after a restart of either side), until dropped.
pub struct Server {
    socket: PathBuf,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on `socket` (replaced if it exists); each connection is served with the device
    /// `device()` makes (None ends the server), and `disconnected()` runs after each.
    pub fn start<D: VhostDevice>(
        socket: &Path,
        name: &str,
        mut device: impl FnMut() -> Option<Arc<D>> + Send + 'static,
        mut disconnected: impl FnMut() + Send + 'static,
    ) -> Result<Server, Error> {
        let _ = std::fs::remove_file(socket);
        let mut listener = Listener::new(socket, true)
            .map_err(|e| Error::Socket(format!("listen on {}: {e}", socket.display())))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Stats::default());
        let (stop_t, stats_t, name_t) = (stop.clone(), stats.clone(), name.to_owned());
        let thread = std::thread::Builder::new()
            .name(format!("vhost-{name}"))
            .spawn(move || {
                while !stop_t.load(Ordering::Acquire) {
                    let Some(dev) = device() else { return };
                    let served = serve_connection(&mut listener, dev, &stats_t, &name_t);
                    if stop_t.load(Ordering::Acquire) {
                        return;
                    }
                    match served {
                        Ok(()) => disconnected(),
                        Err(e) => {
                            tracing::warn!(device = %name_t, error = %e, "vhost-user socket");
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                    }
                }
            })
            .map_err(|e| Error::Io("spawn vhost-user thread".into(), e))?;
        Ok(Server {
            socket: socket.to_owned(),
            stats,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The server's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept (or the served connection) by connecting and closing.
        let _ = std::os::unix::net::UnixStream::connect(&self.socket);
        let _ = std::fs::remove_file(&self.socket);
        // The thread ends once its frontend disconnects; do not wait for a VM that stays.
        if let Some(t) = self.thread.take()
            && t.is_finished()
        {
            let _ = t.join();
        }
    }
}
