//! The NBD server: a listener thread per socket (a unix socket, and TCP only when
//! configured, then restricted to an allow-list of client networks, optionally to some
//! exports, and to clients that start TLS). A listener holds at most
//! [`ListenerPolicy::max_connections`]; a new connection waits in the listener's thread, with
//! no thread of its own, until the client says something, and must choose an export within
//! [`ListenerPolicy::handshake_timeout`] (TLS handshake included) or is closed. Out of file
//! descriptors, the listener closes the connection it cannot take (through a descriptor kept
//! in reserve) and backs off instead of spinning.
//!
//! A connection negotiates (fixed newstyle), then takes requests in bursts:
//! every request already waiting is read before any is executed, runs of reads and of
//! writes go to the pool as one batch each (the same io_uring engine vhost-user-blk uses),
//! and the replies of a burst leave in one write. Per-volume I/O limits apply as everywhere.
//! A connection silent between requests for [`ListenerPolicy::idle_after`] gives its
//! threads back and waits in its listener's thread, like a new one, until its client speaks.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::proto::{self, Request, cflag, chunk, cmd, errno, info, opt, rep, tflag};
use crate::device::{AlignedBuf, Device};
use crate::{Error, Kind, Pool, ReadRequest, WriteRequest};

/// Smallest request granularity (the pool's sector).
pub const MIN_BLOCK: u32 = 512;
/// Preferred request granularity (the pool's block).
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest READ or WRITE payload.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Requests read before a burst is executed.
const BURST: usize = 32;
/// Longest option data accepted.
const MAX_OPTION: u32 = 64 << 10;
/// Default bound on a listener's open connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 128;
/// Default time a client has, from its connection, to choose an export.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default silence after which a connection waits without threads.
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(30);
/// How long a listener out of file descriptors waits before it accepts again.
const DESCRIPTOR_BACKOFF: Duration = Duration::from_millis(100);

/// Who a listener serves and how many.
#[derive(Clone)]
pub struct ListenerPolicy {
    /// Open connections at most (negotiating or transmitting); more wait in the kernel's
    /// queue until one ends.
    pub max_connections: usize,
    /// Time from connecting to choosing an export (TLS handshake included).
    pub handshake_timeout: Duration,
    /// A connection silent this long between requests gives its threads back and waits in
    /// the listener's thread until its client speaks again (it stays open).
    pub idle_after: Duration,
    /// Client networks allowed (TCP only; an empty list refuses every TCP client).
    pub allow: Vec<AllowedNet>,
    /// Exports offered (`POOL/VOLUME`, or `POOL/*` for every volume of a pool; the plain
    /// volume name for a one-pool server); empty: every export.
    pub exports: Vec<String>,
    /// When set, clients must start TLS (NBD_OPT_STARTTLS) before anything else.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ListenerPolicy {
    fn default() -> Self {
        ListenerPolicy {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_after: DEFAULT_IDLE_AFTER,
            allow: Vec::new(),
            exports: Vec::new(),
            tls: None,
        }
    }
}

impl std::fmt::Debug for ListenerPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerPolicy")
            .field("max_connections", &self.max_connections)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("idle_after", &self.idle_after)
            .field("allow", &self.allow)
            .field("exports", &self.exports)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl ListenerPolicy {
    /// Whether the export named `name` (as [`Target::name`] gives it) is offered here.
    pub fn offers(&self, name: &str) -> bool {
        self.exports.is_empty()
            || self.exports.iter().any(|p| {
                p == name
                    || p.strip_suffix("/*").is_some_and(|pool| {
                        name.split_once('/')
                            .is_some_and(|(in_pool, _)| in_pool == pool)
                    })
            })
    }
}

/// A volume an export name resolves to.
pub struct Target<D: Device> {
    /// Its pool.
    pub pool: Arc<Pool<D>>,
    /// The volume or snapshot in that pool, by identity (`#ID`: a later volume that takes
    /// the name is not this one).
    pub volume: String,
    /// Its canonical name (`POOL/VOLUME` for a many-pool server): what
    /// [`ListenerPolicy::exports`] is matched against, and what the logs say.
    pub name: String,
}

/// What a server exports: names to volumes.
pub trait Exports: Send + Sync + 'static {
    /// The pools' device type.
    type Dev: Device + 'static;
    /// The volume an export name means, if any.
    fn find(&self, name: &str) -> Option<Target<Self::Dev>>;
    /// Every export name (NBD_OPT_LIST).
    fn names(&self) -> Vec<String>;
}

/// Every volume and snapshot of one pool, by name.
pub struct PoolExports<D: Device>(pub Arc<Pool<D>>);

impl<D: Device + 'static> Exports for PoolExports<D> {
    type Dev = D;
    fn find(&self, name: &str) -> Option<Target<D>> {
        // Bound to the volume's identity, not its name.
        self.0.volume(name).ok().map(|v| Target {
            pool: self.0.clone(),
            volume: format!("#{}", v.id),
            name: name.to_owned(),
        })
    }
    fn names(&self) -> Vec<String> {
        self.0.list().into_iter().map(|v| v.name).collect()
    }
}

/// A client network allowed on a TCP listener (`10.0.0.0/8`, `::1/128`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowedNet {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl std::str::FromStr for AllowedNet {
    type Err = String;
    fn from_str(s: &str) -> Result<AllowedNet, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?}: not an address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse().map_err(|_| format!("{s:?}: bad prefix"))?
        };
        if prefix > max {
            return Err(format!("{s:?}: prefix longer than {max}"));
        }
        Ok(AllowedNet { addr, prefix })
    }
}

impl AllowedNet {
    /// Whether `ip` is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let bits = |a: IpAddr| -> u128 {
            match a {
                IpAddr::V4(v) => u128::from(u32::from(v)) << 96,
                IpAddr::V6(v) => u128::from(v),
            }
        };
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        // IPv4 addresses sit in the top 32 of the 128 bits: the same top-bits mask serves.
        let prefix = u32::from(self.prefix);
        let mask = if prefix == 0 {
            0
        } else {
            u128::MAX << (128 - prefix)
        };
        bits(ip) & mask == bits(self.addr) & mask
    }
}

/// Counters of a server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections refused (allow-list).
    pub refused: AtomicU64,
    /// Connections closed because no export was chosen in time.
    pub timed_out: AtomicU64,
    /// Connections closed at once because the process was out of file descriptors.
    pub shed: AtomicU64,
    /// Requests served.
    pub requests: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
}

/// A stream a connection runs on.
pub(super) trait Conn: Read + Write + AsFd + Send + Sized + 'static {
    fn duplicate(&self) -> io::Result<Self>;
    fn close(&self);
    /// Who is on the other end, for the logs.
    fn peer(&self) -> String;
    /// Read and write timeouts (None: block).
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()>;
    /// A read timeout only (writes block).
    fn set_idle(&self, t: Option<Duration>) -> io::Result<()>;
    fn set_nonblocking(&self, on: bool) -> io::Result<()>;
}

impl Conn for UnixStream {
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        UnixStream::set_nonblocking(self, on)
    }
    fn set_idle(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(None)
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
    fn peer(&self) -> String {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        match getsockopt(self, PeerCredentials) {
            Ok(c) => format!("unix pid {} uid {}", c.pid(), c.uid()),
            Err(_) => "unix".into(),
        }
    }
}

impl Conn for TcpStream {
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        TcpStream::set_nonblocking(self, on)
    }
    fn set_idle(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(None)
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
    fn peer(&self) -> String {
        self.peer_addr()
            .map(|a| format!("tcp {a}"))
            .unwrap_or_else(|_| "tcp".into())
    }
}

type Closer = Box<dyn Fn() + Send>;

/// An open connection: how to end it, and once it chose an export, what it is bound to.
struct Open {
    id: u64,
    close: Closer,
    /// The pool (by address: the same `Arc`), the volume's identity, and the client.
    bound: Option<(usize, u64, String)>,
}

struct Shared<E: Exports> {
    exports: Arc<E>,
    stop: AtomicBool,
    stats: ServerStats,
    /// Open connections, so that stopping the server, or deleting a volume by force, ends
    /// them.
    open: Mutex<Vec<Open>>,
    next_id: AtomicU64,
}

impl<E: Exports> Shared<E> {
    fn open(&self) -> std::sync::MutexGuard<'_, Vec<Open>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running NBD server; stops (closing every connection) when dropped.
pub struct NbdServer<E: Exports> {
    shared: Arc<Shared<E>>,
    listeners: Vec<JoinHandle<()>>,
    socket: Option<PathBuf>,
    tcp: Option<SocketAddr>,
}

impl<E: Exports> NbdServer<E> {
    /// Serves `exports` on the unix socket `path` (replaced if it exists), with the
    /// default policy.
    pub fn start_unix(path: &Path, exports: Arc<E>) -> Result<NbdServer<E>, Error> {
        let mut s = NbdServer::new(exports);
        s.listen_unix(path, ListenerPolicy::default())?;
        Ok(s)
    }

    /// A server with no listener yet.
    pub fn new(exports: Arc<E>) -> NbdServer<E> {
        NbdServer {
            shared: Arc::new(Shared {
                exports,
                stop: AtomicBool::new(false),
                stats: ServerStats::default(),
                open: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(0),
            }),
            listeners: Vec::new(),
            socket: None,
            tcp: None,
        }
    }

    /// Adds the unix socket `path` (its owner, group and mode: the process's
    /// [`daemon_kit::SocketAccess`]; the allow-list does not apply).
    pub fn listen_unix(&mut self, path: &Path, policy: ListenerPolicy) -> Result<(), Error> {
        let io_err = |e| Error::Io(format!("NBD socket {}", path.display()), e);
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(io_err)?;
        daemon_kit::SocketAccess::current()
            .apply(path)
            .map_err(io_err)?;
        listener.set_nonblocking(true).map_err(io_err)?;
        let shared = self.shared.clone();
        self.listeners
            .push(spawn_acceptor(listener, shared, policy, |l, _| {
                l.accept().map(|(s, _)| (s, None))
            })?);
        self.socket = Some(path.to_owned());
        Ok(())
    }

    /// Adds a TCP listener on `addr`, for clients in `policy.allow` only (an empty list
    /// refuses everyone).
    pub fn listen_tcp(&mut self, addr: SocketAddr, policy: ListenerPolicy) -> Result<(), Error> {
        let io_err = |e| Error::Io(format!("NBD on {addr}"), e);
        let listener = TcpListener::bind(addr).map_err(io_err)?;
        listener.set_nonblocking(true).map_err(io_err)?;
        self.tcp = listener.local_addr().ok();
        let shared = self.shared.clone();
        self.listeners
            .push(spawn_acceptor(listener, shared, policy, |l, policy| {
                l.accept().map(|(s, peer)| {
                    let ok = policy.allow.iter().any(|n| n.contains(peer.ip()));
                    let _ = s.set_nodelay(true);
                    (s, (!ok).then_some(peer))
                })
            })?);
        Ok(())
    }

    /// The unix socket, if any.
    pub fn socket(&self) -> Option<&Path> {
        self.socket.as_deref()
    }

    /// The TCP address bound, if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// The server's counters.
    pub fn stats(&self) -> &ServerStats {
        &self.shared.stats
    }

    /// The server's connections, for a control plane that must not delete a volume under
    /// its clients.
    pub fn connections(&self) -> Arc<dyn Connections> {
        self.shared.clone()
    }
}

/// The identity of a pool object (the same `Arc`), as [`Connections`] take it.
pub fn pool_key<D: Device>(pool: &Arc<Pool<D>>) -> usize {
    Arc::as_ptr(pool) as usize
}

/// The open connections of an NBD server, by the volume identity they are bound to.
pub trait Connections: Send + Sync {
    /// The clients connected to volume `id` of the pool [`pool_key`] names (their peers:
    /// `unix pid P uid U` or `tcp ADDR`).
    fn clients_of(&self, pool: usize, id: u64) -> Vec<String>;
    /// Ends every connection to that volume; returns how many there were.
    fn disconnect(&self, pool: usize, id: u64) -> usize;
    /// The server's connection counters: (name, value) pairs, `accepted`, `refused`
    /// (allow-list), `timed_out` (no export chosen in time), `shed` (out of descriptors).
    fn counters(&self) -> [(&'static str, u64); 4];
}

impl<E: Exports> Connections for Shared<E> {
    fn clients_of(&self, pool: usize, id: u64) -> Vec<String> {
        self.open()
            .iter()
            .filter_map(|o| match &o.bound {
                Some((p, v, peer)) if *p == pool && *v == id => Some(peer.clone()),
                _ => None,
            })
            .collect()
    }

    fn counters(&self) -> [(&'static str, u64); 4] {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("accepted", get(&s.connections)),
            ("refused", get(&s.refused)),
            ("timed_out", get(&s.timed_out)),
            ("shed", get(&s.shed)),
        ]
    }

    fn disconnect(&self, pool: usize, id: u64) -> usize {
        let open = self.open();
        let mut n = 0;
        for o in open.iter() {
            if matches!(&o.bound, Some((p, v, _)) if *p == pool && *v == id) {
                (o.close)();
                n += 1;
            }
        }
        n
    }
}

impl<E: Exports> Drop for NbdServer<E> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for o in self.shared.open().iter() {
            (o.close)();
        }
        for l in self.listeners.drain(..) {
            let _ = l.join();
        }
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The server's greeting (fixed newstyle, no zeroes).
fn hello() -> [u8; 18] {
    let mut h = [0u8; 18];
    h[..8].copy_from_slice(&proto::NBDMAGIC.to_be_bytes());
    h[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    h[16..].copy_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    h
}

/// A connection waiting in the listener's thread for its client to speak: greeted and
/// yet to choose an export (until its deadline), or idle in the middle of its session.
struct Waiting<S, D: Device> {
    stream: Stream<S>,
    state: WaitState<D>,
}

enum WaitState<D: Device> {
    /// New: choose an export by the deadline.
    Fresh(Instant),
    /// Idle: connection id, client and session, resumed when the client speaks.
    Idle(u64, String, Session<D>),
}

impl<S, D: Device> Waiting<S, D> {
    fn deadline(&self) -> Option<Instant> {
        match self.state {
            WaitState::Fresh(d) => Some(d),
            WaitState::Idle(..) => None,
        }
    }
}

/// Where an idle connection goes back to its listener's thread (and the eventfd that wakes it).
struct ParkingLot<S, D: Device> {
    to_listener: Mutex<std::sync::mpsc::Sender<Waiting<S, D>>>,
    wake: nix::sys::eventfd::EventFd,
    /// Sent and not yet taken: still counted against the listener's bound.
    in_transit: AtomicUsize,
}

/// Counts a listener's connection until it ends.
struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn is_descriptor_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accepts connections until the server stops (`accept` gives a stream, and the peer if it
/// is to be refused). A connection is greeted at once and waits here, without a thread,
/// until the client speaks; then a thread of its own negotiates and serves it.
fn spawn_acceptor<L, S, E>(
    listener: L,
    shared: Arc<Shared<E>>,
    policy: ListenerPolicy,
    accept: impl Fn(&L, &ListenerPolicy) -> io::Result<(S, Option<SocketAddr>)> + Send + 'static,
) -> Result<JoinHandle<()>, Error>
where
    L: AsFd + Send + 'static,
    S: Conn,
    E: Exports,
{
    let policy = Arc::new(policy);
    let (to_listener, parked) = std::sync::mpsc::channel::<Waiting<S, E::Dev>>();
    let wake = nix::sys::eventfd::EventFd::from_flags(
        nix::sys::eventfd::EfdFlags::EFD_NONBLOCK | nix::sys::eventfd::EfdFlags::EFD_CLOEXEC,
    )
    .map_err(|e| Error::Io("NBD listener eventfd".into(), e.into()))?;
    let lot = Arc::new(ParkingLot {
        to_listener: Mutex::new(to_listener),
        wake,
        in_transit: AtomicUsize::new(0),
    });
    std::thread::Builder::new()
        .name("nbd-accept".into())
        .spawn(move || {
            let active = Arc::new(AtomicUsize::new(0));
            let mut waiting: Vec<Waiting<S, E::Dev>> = Vec::new();
            // Closed to make room when the process is out of descriptors, so the connection
            // that cannot be served is taken off the queue and closed, not left to spin on.
            let mut reserve = std::fs::File::open("/dev/null").ok();
            let mut paused_until: Option<Instant> = None;
            while !shared.stop.load(Ordering::Acquire) {
                // Idle connections handed back.
                let _ = lot.wake.read();
                for w in parked.try_iter() {
                    lot.in_transit.fetch_sub(1, Ordering::AcqRel);
                    waiting.push(w);
                }
                let now = Instant::now();
                waiting.retain(|w| {
                    let on_time = w.deadline().is_none_or(|d| d > now);
                    if !on_time {
                        shared.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("NBD client silent: closed");
                    }
                    on_time
                });
                if paused_until.is_some_and(|t| t <= now) {
                    paused_until = None;
                }
                let open = active.load(Ordering::Acquire)
                    + waiting.len()
                    + lot.in_transit.load(Ordering::Acquire);
                let listening = open < policy.max_connections && paused_until.is_none();
                let mut wait = Duration::from_millis(200);
                for t in waiting
                    .iter()
                    .filter_map(|w| w.deadline())
                    .chain(paused_until)
                {
                    wait = wait.min(t.saturating_duration_since(now));
                }
                let (listener_ready, ready) = {
                    let mut fds = Vec::with_capacity(2 + waiting.len());
                    let interest = if listening {
                        PollFlags::POLLIN
                    } else {
                        PollFlags::empty()
                    };
                    fds.push(PollFd::new(listener.as_fd(), interest));
                    fds.push(PollFd::new(lot.wake.as_fd(), PollFlags::POLLIN));
                    for w in &waiting {
                        fds.push(PollFd::new(w.stream.as_fd(), PollFlags::POLLIN));
                    }
                    let ms = u16::try_from(wait.as_millis().max(1)).unwrap_or(u16::MAX);
                    if poll(&mut fds, PollTimeout::from(ms)).unwrap_or(0) <= 0 {
                        continue;
                    }
                    let spoke = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                    let ready: Vec<usize> = (2..fds.len()).filter(|&i| spoke(&fds[i])).collect();
                    (listening && spoke(&fds[0]), ready)
                };
                for i in ready.into_iter().rev() {
                    let w = waiting.swap_remove(i - 2);
                    start_connection(w, &shared, &policy, &active, &lot);
                }
                if !listener_ready {
                    continue;
                }
                match accept(&listener, &policy) {
                    Ok((_, Some(peer))) => {
                        shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%peer, "NBD client not in the allow-list");
                    }
                    Ok((mut stream, None)) => {
                        shared.stats.connections.fetch_add(1, Ordering::Relaxed);
                        // A fresh socket's buffer takes the greeting whole.
                        let _ = stream.set_timeouts(Some(Duration::from_secs(1)));
                        if stream.write_all(&hello()).is_ok() {
                            waiting.push(Waiting {
                                stream: Stream::Net(stream),
                                state: WaitState::Fresh(now + policy.handshake_timeout),
                            });
                        }
                    }
                    Err(e) if is_descriptor_shortage(&e) => {
                        shared.stats.shed.fetch_add(1, Ordering::Relaxed);
                        drop(reserve.take());
                        if let Ok((stream, _)) = accept(&listener, &policy) {
                            drop(stream);
                        }
                        reserve = std::fs::File::open("/dev/null").ok();
                        paused_until = Some(now + DESCRIPTOR_BACKOFF);
                        tracing::warn!(
                            error = %e,
                            open = active.load(Ordering::Relaxed),
                            "NBD: out of file descriptors, closing new connections"
                        );
                    }
                    Err(_) => {} // taken by another thread, or aborted by the client
                }
            }
        })
        .map_err(|e| Error::Io("NBD listener thread".into(), e))
}

/// Gives a connection whose client spoke a thread of its own: a new one negotiates, an
/// idle one goes on with its session. A connection idle again goes back to the listener.
fn start_connection<S: Conn, E: Exports>(
    w: Waiting<S, E::Dev>,
    shared: &Arc<Shared<E>>,
    policy: &Arc<ListenerPolicy>,
    active: &Arc<AtomicUsize>,
    lot: &Arc<ParkingLot<S, E::Dev>>,
) {
    let id = match &w.state {
        WaitState::Idle(id, ..) => *id,
        WaitState::Fresh(_) => {
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            let closer = match &w.stream {
                Stream::Net(s) => s.duplicate().map(|c| Box::new(move || c.close()) as Closer),
                Stream::Tls(_) => return, // a fresh connection has no TLS yet
            };
            let Ok(close) = closer else {
                return;
            };
            shared.open().push(Open {
                id,
                close,
                bound: None,
            });
            id
        }
    };
    active.fetch_add(1, Ordering::AcqRel);
    let held = Held(active.clone());
    let (sh, policy, lot) = (shared.clone(), policy.clone(), lot.clone());
    let spawned = std::thread::Builder::new()
        .name("nbd-conn".into())
        .spawn(move || {
            let _held = held;
            let served = match (w.stream, w.state) {
                (Stream::Net(s), WaitState::Fresh(deadline)) => {
                    let client = s.peer();
                    serve(s, client.clone(), &sh, id, &policy, deadline, None)
                        .map(|p| p.map(|(s, session)| (s, session, client)))
                }
                (Stream::Net(s), WaitState::Idle(_, client, session)) => {
                    let reader = BufReader::with_capacity(256 << 10, s);
                    run_session(reader, &client, &sh, &policy, session)
                        .map(|p| p.map(|(s, session)| (s, session, client)))
                }
                (Stream::Tls(u), WaitState::Idle(_, client, session)) => {
                    let reader = BufReader::with_capacity(256 << 10, u);
                    run_session(reader, &client, &sh, &policy, session)
                        .map(|p| p.map(|(s, session)| (Stream::tls_side(s), session, client)))
                }
                (Stream::Tls(_), WaitState::Fresh(_)) => Ok(None),
            };
            match served {
                Ok(Some((stream, session, client))) => {
                    // Idle: back to the listener's thread, still open and registered.
                    lot.in_transit.fetch_add(1, Ordering::AcqRel);
                    let back = Waiting {
                        stream,
                        state: WaitState::Idle(id, client, session),
                    };
                    let sent = lot
                        .to_listener
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .send(back)
                        .is_ok();
                    if sent {
                        let _ = lot.wake.write(1);
                        return;
                    }
                    lot.in_transit.fetch_sub(1, Ordering::AcqRel);
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "NBD connection ended"),
            }
            sh.open().retain(|o| o.id != id);
        });
    if spawned.is_err() {
        tracing::warn!("cannot start an NBD connection thread");
        shared.open().retain(|o| o.id != id);
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// The export selected by negotiation.
struct Selected<D: Device> {
    target: Target<D>,
    read_only: bool,
    size: u64,
}

/// What negotiation settled.
struct Session<D: Device> {
    export: Selected<D>,
    structured: bool,
    allocation: bool,
}

fn select<E: Exports>(
    exports: &E,
    policy: &ListenerPolicy,
    name: &str,
) -> Option<Selected<E::Dev>> {
    let target = exports.find(name)?;
    if !policy.offers(&target.name) {
        return None;
    }
    let v = target.pool.volume(&target.volume).ok()?;
    Some(Selected {
        read_only: v.kind == Kind::Snapshot,
        size: v.size,
        target,
    })
}

fn transmission_flags(read_only: bool) -> u16 {
    let mut f = tflag::HAS_FLAGS
        | tflag::SEND_FLUSH
        | tflag::SEND_FUA
        | tflag::SEND_DF
        | tflag::CAN_MULTI_CONN;
    if read_only {
        f |= tflag::READ_ONLY;
    } else {
        f |= tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
    }
    f
}

/// The server's parsers on bytes, for the fuzz targets (feature `fuzzing`).
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use super::*;

    /// Runs the negotiation on `input` (what a client sends after the greeting) against
    /// `exports` under `policy`; when it chooses an export, reads the requests that follow
    /// (parsed and checked, not executed). Returns what the server answered in the
    /// negotiation and how many requests were read.
    pub fn session<E: Exports>(
        exports: &E,
        policy: &ListenerPolicy,
        input: &[u8],
    ) -> (Vec<u8>, usize) {
        let mut r = input;
        let mut answer = Vec::new();
        let rules = Rules {
            exports,
            policy,
            tls: None,
        };
        let mut requests = 0;
        if let Ok(Negotiated::Export(s)) = negotiate(&mut r, &mut answer, &rules, &mut |_| {}) {
            let (read_only, size) = (s.export.read_only, s.export.size);
            read_requests(BufReader::new(r), read_only, size, &mut |item| {
                if let Incoming::Work(w) = item {
                    requests += 1;
                    // What the executor would be handed: in range, sized as declared.
                    match w {
                        Work::Read(req, buf) | Work::Write(req, buf) => {
                            assert_eq!(buf.len(), req.length as usize);
                            assert!(req.offset + u64::from(req.length) <= size);
                        }
                        Work::Refused(..) | Work::Other(_) => {}
                    }
                }
                true
            });
        }
        (answer, requests)
    }
}

/// Reads that fail once the negotiation's deadline has passed.
struct Until<'a, S: Conn> {
    reader: &'a mut BufReader<S>,
    deadline: Instant,
}

impl<S: Conn> Read for Until<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.reader.buffer().is_empty() {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no export chosen in time",
                ));
            }
            self.reader.get_ref().set_timeouts(Some(left))?;
        }
        self.reader.read(buf)
    }
}

/// What the negotiation ended with.
enum Negotiated<D: Device> {
    Export(Session<D>),
    /// The client asked for TLS and was told yes: the handshake comes next.
    StartTls {
        no_zeroes: bool,
    },
    /// The client left without an export.
    Ended,
}

/// A connection's stream while it waits without a thread: the socket, or the plaintext side
/// of its TLS session.
enum Stream<S> {
    Net(S),
    Tls(UnixStream),
}

impl<S: AsFd> Stream<S> {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Stream::Net(s) => s.as_fd(),
            Stream::Tls(s) => s.as_fd(),
        }
    }

    /// A plaintext side (itself a `Stream<UnixStream>`) as the stream of its connection.
    fn tls_side(s: Stream<UnixStream>) -> Stream<S> {
        match s {
            Stream::Net(u) | Stream::Tls(u) => Stream::Tls(u),
        }
    }
}

/// An idle connection put aside: its stream and its session.
type Parked<S, D> = (Stream<S>, Session<D>);

/// Serves one connection: negotiation (TLS first where the listener requires it), then
/// transmission. `tls`: the stream is the plaintext side of a TLS session (and the
/// client's NO_ZEROES flag, given before it). Returns the connection when its client went
/// idle, to wait without a thread.
fn serve<S: Conn, E: Exports>(
    stream: S,
    client: String,
    shared: &Shared<E>,
    conn: u64,
    policy: &ListenerPolicy,
    deadline: Instant,
    tls: Option<bool>,
) -> io::Result<Option<Parked<S, E::Dev>>> {
    let mut writer = stream.duplicate()?;
    let mut reader = BufReader::with_capacity(256 << 10, stream);
    // Registered with its identity before the client hears that it got the export: a volume
    // with connections is not deleted under them.
    let mut bind = |target: &Target<E::Dev>| {
        if let Some(id) = target.volume.strip_prefix('#').and_then(|i| i.parse().ok())
            && let Some(o) = shared.open().iter_mut().find(|o| o.id == conn)
        {
            o.bound = Some((pool_key(&target.pool), id, client.clone()));
        }
    };
    let mut until = Until {
        reader: &mut reader,
        deadline,
    };
    let rules = Rules {
        exports: &*shared.exports,
        policy,
        tls,
    };
    let session = match negotiate(&mut until, &mut writer, &rules, &mut bind)? {
        Negotiated::Export(session) => session,
        Negotiated::Ended => {
            tracing::debug!(%client, "NBD client ended the negotiation without an export");
            return Ok(None);
        }
        Negotiated::StartTls { no_zeroes } => {
            let Some(config) = policy.tls.clone() else {
                return Err(protocol_error("TLS without a configuration"));
            };
            if !reader.buffer().is_empty() {
                return Err(protocol_error(
                    "data between STARTTLS and the TLS handshake",
                ));
            }
            drop(writer);
            let plain = super::tls::terminate(reader.into_inner(), config, deadline)?;
            let client = format!("{client} tls");
            let parked = serve(
                plain,
                client,
                shared,
                conn,
                policy,
                deadline,
                Some(no_zeroes),
            )?;
            return Ok(parked.map(|(s, session)| (Stream::tls_side(s), session)));
        }
    };
    drop(writer);
    let target = &session.export.target;
    let read_only = session.export.read_only;
    tracing::info!(%client, volume = %target.name, read_only, "NBD client connected");
    // The reader goes on: requests the client sent right behind its GO are in its buffer.
    run_session(reader, &client, shared, policy, session)
}

/// The transmission phase of a connection with its export chosen (again, after an idle
/// time): until the client goes away, or goes idle (then the connection comes back).
fn run_session<S: Conn, E: Exports>(
    reader: BufReader<S>,
    client: &str,
    shared: &Shared<E>,
    policy: &ListenerPolicy,
    session: Session<E::Dev>,
) -> io::Result<Option<Parked<S, E::Dev>>> {
    // Silent this long between requests, the connection gives its threads back.
    reader.get_ref().set_idle(Some(policy.idle_after))?;
    let writer = reader.get_ref().duplicate()?;
    let poller = reader.get_ref().duplicate()?;
    let volume = session.export.target.name.clone();
    match transmit(reader, writer, &poller, session, shared) {
        Transmitted::Idle(stream, session) => {
            tracing::debug!(%client, %volume, "NBD client idle: waiting without a thread");
            Ok(Some((Stream::Net(stream), session)))
        }
        Transmitted::Ended(Ok(())) => {
            tracing::info!(%client, %volume, "NBD client disconnected");
            Ok(None)
        }
        Transmitted::Ended(Err(e)) => {
            tracing::info!(%client, %volume, error = %e, "NBD connection broken");
            Err(e)
        }
    }
}

/// What a negotiation may offer.
struct Rules<'a, E: Exports> {
    exports: &'a E,
    policy: &'a ListenerPolicy,
    /// TLS is running already (with the client's NO_ZEROES flag, given before it).
    tls: Option<bool>,
}

impl<E: Exports> Rules<'_, E> {
    /// TLS is required and not running yet: nothing but STARTTLS and ABORT.
    fn tls_missing(&self) -> bool {
        self.policy.tls.is_some() && self.tls.is_none()
    }
}

/// Fixed newstyle negotiation, after the greeting ([`hello`]). After STARTTLS it goes on
/// over TLS with the client's flags already known (`rules.tls`).
fn negotiate<E: Exports>(
    r: &mut impl Read,
    w: &mut impl Write,
    rules: &Rules<'_, E>,
    bind: &mut dyn FnMut(&Target<E::Dev>),
) -> io::Result<Negotiated<E::Dev>> {
    let exports = rules.exports;
    let policy = rules.policy;
    // The client's flags come once, before any option (and so before STARTTLS).
    let no_zeroes = if let Some(no_zeroes) = rules.tls {
        no_zeroes
    } else {
        let client = read_u32(r)?;
        if client & !(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES) != 0 {
            return Err(protocol_error("unknown client flags"));
        }
        client & proto::CLIENT_NO_ZEROES != 0
    };
    let mut structured = false;
    let mut allocation = false;
    loop {
        if read_u64(r)? != proto::IHAVEOPT {
            return Err(protocol_error("option without IHAVEOPT"));
        }
        let option = read_u32(r)?;
        let len = read_u32(r)?;
        let mut out = Vec::new();
        if len > MAX_OPTION {
            // Skip the data, then refuse; a client that keeps going is served.
            io::copy(&mut r.take(u64::from(len)), &mut io::sink())?;
            proto::option_reply(&mut out, option, rep::ERR_TOO_BIG, b"option data too long");
            w.write_all(&out)?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        let reply =
            |out: &mut Vec<u8>, kind: u32, d: &[u8]| proto::option_reply(out, option, kind, d);
        if rules.tls_missing() && !matches!(option, opt::STARTTLS | opt::ABORT) {
            if option == opt::EXPORT_NAME {
                return Ok(Negotiated::Ended); // no way to refuse but hanging up
            }
            reply(&mut out, rep::ERR_TLS_REQD, b"start TLS first");
            w.write_all(&out)?;
            continue;
        }
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(sel) = select(exports, policy, &name) else {
                    // No way to refuse but hanging up.
                    return Ok(Negotiated::Ended);
                };
                out.extend_from_slice(&sel.size.to_be_bytes());
                out.extend_from_slice(&transmission_flags(sel.read_only).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                bind(&sel.target);
                w.write_all(&out)?;
                return Ok(Negotiated::Export(Session {
                    export: sel,
                    structured,
                    allocation,
                }));
            }
            opt::ABORT => {
                reply(&mut out, rep::ACK, &[]);
                let _ = w.write_all(&out);
                return Ok(Negotiated::Ended);
            }
            opt::LIST if len != 0 => reply(&mut out, rep::ERR_INVALID, b"LIST takes no data"),
            opt::LIST => {
                for name in exports.names().into_iter().filter(|n| policy.offers(n)) {
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    reply(&mut out, rep::SERVER, &d);
                }
                reply(&mut out, rep::ACK, &[]);
            }
            opt::STARTTLS if len != 0 => {
                reply(&mut out, rep::ERR_INVALID, b"STARTTLS takes no data")
            }
            opt::STARTTLS if rules.tls.is_some() => {
                reply(&mut out, rep::ERR_INVALID, b"TLS is running already")
            }
            opt::STARTTLS if policy.tls.is_none() => {
                reply(&mut out, rep::ERR_POLICY, b"TLS is not offered")
            }
            opt::STARTTLS => {
                reply(&mut out, rep::ACK, &[]);
                w.write_all(&out)?;
                return Ok(Negotiated::StartTls { no_zeroes });
            }
            opt::STRUCTURED_REPLY if len != 0 => reply(
                &mut out,
                rep::ERR_INVALID,
                b"STRUCTURED_REPLY takes no data",
            ),
            opt::STRUCTURED_REPLY => {
                structured = true;
                reply(&mut out, rep::ACK, &[]);
            }
            opt::INFO | opt::GO => match proto::parse_info_request(&data) {
                None => reply(&mut out, rep::ERR_INVALID, b"malformed INFO/GO"),
                Some((name, asked)) => match select(exports, policy, name) {
                    None => reply(&mut out, rep::ERR_UNKNOWN, b"no such export"),
                    Some(sel) => {
                        info_replies(&mut out, option, &sel, name, &asked);
                        if option == opt::GO {
                            bind(&sel.target);
                            w.write_all(&out)?;
                            return Ok(Negotiated::Export(Session {
                                export: sel,
                                structured,
                                allocation,
                            }));
                        }
                    }
                },
            },
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let known = |name: &str| select(exports, policy, name).is_some();
                let wanted = meta_context_replies(&mut out, option, &data, structured, known);
                if option == opt::SET_META_CONTEXT
                    && let Some(wanted) = wanted
                {
                    allocation = wanted;
                }
            }
            _ => reply(&mut out, rep::ERR_UNSUP, b"unknown option"),
        }
        w.write_all(&out)?;
    }
}

/// The replies to INFO or GO for an export: its size and transmission flags, its block
/// sizes, its name if the client asked, and the final ACK.
fn info_replies<D: Device>(
    out: &mut Vec<u8>,
    option: u32,
    sel: &Selected<D>,
    name: &str,
    asked: &[u16],
) {
    let mut reply = |kind: u32, d: &[u8]| proto::option_reply(out, option, kind, d);
    let mut d = info::EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&sel.size.to_be_bytes());
    d.extend_from_slice(&transmission_flags(sel.read_only).to_be_bytes());
    reply(rep::INFO, &d);
    let mut b = info::BLOCK_SIZE.to_be_bytes().to_vec();
    for x in [MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD] {
        b.extend_from_slice(&x.to_be_bytes());
    }
    reply(rep::INFO, &b);
    if asked.contains(&info::NAME) {
        let mut n = info::NAME.to_be_bytes().to_vec();
        n.extend_from_slice(name.as_bytes());
        reply(rep::INFO, &n);
    }
    reply(rep::ACK, &[]);
}

/// The replies to LIST_META_CONTEXT or SET_META_CONTEXT (`data`: the request): the one
/// context we have, `base:allocation`, when asked for. Returns whether it was asked for, or
/// `None` if the request was refused.
fn meta_context_replies(
    out: &mut Vec<u8>,
    option: u32,
    data: &[u8],
    structured: bool,
    known_export: impl Fn(&str) -> bool,
) -> Option<bool> {
    let mut reply = |kind: u32, d: &[u8]| proto::option_reply(out, option, kind, d);
    let Some((name, queries)) = proto::parse_meta_request(data) else {
        reply(rep::ERR_INVALID, b"malformed meta context request");
        return None;
    };
    if !structured && option == opt::SET_META_CONTEXT {
        reply(rep::ERR_INVALID, b"meta contexts need structured replies");
        return None;
    }
    if !known_export(name) {
        reply(rep::ERR_UNKNOWN, b"no such export");
        return None;
    }
    let listing = option == opt::LIST_META_CONTEXT;
    let wanted = queries
        .iter()
        .any(|q| *q == proto::BASE_ALLOCATION || (listing && *q == "base:"))
        || (listing && queries.is_empty());
    if wanted {
        let mut d = proto::BASE_ALLOCATION_ID.to_be_bytes().to_vec();
        d.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
        reply(rep::META_CONTEXT, &d);
    }
    reply(rep::ACK, &[]);
    Some(wanted)
}

/// A request of a burst, with its payload or buffer.
enum Work {
    Read(Request, AlignedBuf),
    Write(Request, AlignedBuf),
    /// Answered already (a request refused before any I/O).
    Refused(Request, u32),
    Other(Request),
}

/// Why a READ/WRITE/TRIM/WRITE_ZEROES range is refused, if it is.
fn range_error(req: &Request, size: u64, write: bool) -> Option<u32> {
    let end = req.offset.checked_add(u64::from(req.length));
    if end.is_none_or(|e| e > size) {
        return Some(if write { errno::ENOSPC } else { errno::EINVAL });
    }
    let (a, b) = (req.offset, u64::from(req.length));
    if !a.is_multiple_of(u64::from(MIN_BLOCK)) || !b.is_multiple_of(u64::from(MIN_BLOCK)) {
        return Some(errno::EINVAL);
    }
    None
}

fn error_value(e: &Error) -> u32 {
    match e {
        Error::ReadOnly(_) => errno::EPERM,
        Error::NoSpace => errno::ENOSPC,
        Error::OutOfRange(_) | Error::Invalid(_) => errno::EINVAL,
        _ => errno::EIO,
    }
}

/// How a transmission phase ended.
enum Transmitted<S, D: Device> {
    /// The client went away, or the connection broke.
    Ended(io::Result<()>),
    /// The client was idle: the stream and the session, to resume when it speaks again.
    Idle(S, Session<D>),
}

fn transmit<S: Conn, E: Exports>(
    reader: BufReader<S>,
    writer: S,
    poller: &S,
    session: Session<E::Dev>,
    shared: &Shared<E>,
) -> Transmitted<S, E::Dev> {
    match transmit_inner(reader, writer, poller, &session, shared) {
        Ok(Some(stream)) => Transmitted::Idle(stream, session),
        Ok(None) => Transmitted::Ended(Ok(())),
        Err(e) => Transmitted::Ended(Err(e)),
    }
}

/// The transmission phase; `Some(stream)` when the client went idle.
fn transmit_inner<S: Conn, E: Exports>(
    reader: BufReader<S>,
    writer: S,
    poller: &S,
    session: &Session<E::Dev>,
    shared: &Shared<E>,
) -> io::Result<Option<S>> {
    let export = &session.export;
    let pool = &export.target.pool;
    let mut wrote = false;
    // Replies leave from a thread of their own: while one burst's replies are on their way
    // to the client, the next burst's I/O already runs.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Replies>(2);
    let sender =
        std::thread::Builder::new()
            .name("nbd-reply".into())
            .spawn(move || -> io::Result<()> {
                let mut w = io::BufWriter::with_capacity(256 << 10, writer);
                for replies in rx {
                    replies.send(&mut w)?;
                    w.flush()?;
                }
                Ok(())
            })?;
    // Requests are read (payloads included) by a thread of their own, so that the next
    // burst gathers while this one's I/O runs: a burst is what waits when the last is done.
    let (read_only, size) = (export.read_only, export.size);
    let (incoming_tx, incoming) = std::sync::mpsc::sync_channel::<Incoming>(BURST);
    let request_reader = std::thread::Builder::new()
        .name("nbd-requests".into())
        .spawn(move || {
            read_requests(reader, read_only, size, &mut |item| {
                incoming_tx.send(item).is_ok()
            })
        })?;
    let mut out: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut data: Vec<(usize, AlignedBuf)> = Vec::new();
    let mut burst: Vec<Work> = Vec::with_capacity(BURST);
    let result = loop {
        // 1. Take what has been read (at least one request, or the end).
        let (end, idle) = gather(&incoming, &mut burst);
        // 2. Execute: runs of reads and of writes as batches, the rest in order.
        out.clear();
        data.clear();
        wrote |= execute_burst(&mut burst, session, &mut out, &mut data, shared);
        shared
            .stats
            .requests
            .fetch_add(burst.len() as u64, Ordering::Relaxed);
        // 3. Reply, all at once (from the reply thread).
        let replies = Replies {
            bytes: std::mem::replace(&mut out, Vec::with_capacity(64 << 10)),
            data: std::mem::take(&mut data),
        };
        if tx.send(replies).is_err() {
            break Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "reply thread ended",
            ));
        }
        if idle {
            break Ok(true);
        }
        match end {
            None => {}
            Some(None) => break Ok(false),
            Some(Some(e)) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(false),
            Some(Some(e)) => break Err(e),
        }
    };
    drop(tx);
    let sent = sender
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("reply thread panicked")));
    if result.is_err() || sent.is_err() {
        // The request reader may still wait on the socket: end it (the connection is
        // broken; after a disconnect or the client's end it has ended by itself).
        poller.close();
    }
    drop(incoming);
    let reader = request_reader.join().ok().flatten();
    let idle = matches!(result, Ok(true)) && sent.is_ok();
    if idle && let Some(reader) = reader {
        // Its buffer is empty: the reader stopped at a request boundary with nothing read.
        return Ok(Some(reader.into_inner()));
    }
    // What the client wrote is made durable when it goes away.
    if wrote {
        let _ = pool.flush();
    }
    result.and(sent).map(|_| None)
}

/// Step 1 of a burst: takes what the request reader has read, at least one request or the
/// end, up to [`BURST`]. Returns how the connection ends (`Some`, with the reader's error if
/// any) and whether the client went idle.
fn gather(
    incoming: &std::sync::mpsc::Receiver<Incoming>,
    burst: &mut Vec<Work>,
) -> (Option<Option<io::Error>>, bool) {
    burst.clear();
    let mut end = None;
    let mut idle = false;
    // The reader gone without a word (it cannot be, short of a panic) counts as a disconnect.
    let first = incoming.recv().unwrap_or(Incoming::End(None));
    for item in std::iter::once(first).chain(incoming.try_iter()) {
        match item {
            Incoming::Work(w) => burst.push(w),
            Incoming::End(e) => end = Some(e),
            Incoming::Idle => idle = true,
        }
        if end.is_some() || idle || burst.len() >= BURST {
            break;
        }
    }
    (end, idle)
}

/// Step 2 of a burst: runs of reads and of writes go to the pool as batches, the rest one by
/// one in order; replies go to `out` (read data to `data`). Returns whether anything was
/// written.
fn execute_burst<E: Exports>(
    burst: &mut [Work],
    session: &Session<E::Dev>,
    out: &mut Vec<u8>,
    data: &mut Vec<(usize, AlignedBuf)>,
    shared: &Shared<E>,
) -> bool {
    let Session {
        export,
        structured,
        allocation,
    } = session;
    let (structured, allocation) = (*structured, *allocation);
    let (pool, volume) = (&export.target.pool, export.target.volume.as_str());
    let mut wrote = false;
    let mut i = 0;
    while i < burst.len() {
        let mut j = i;
        match &burst[i] {
            Work::Read(..) => {
                while j < burst.len() && matches!(burst[j], Work::Read(..)) {
                    j += 1;
                }
                let run = &mut burst[i..j];
                read_run(pool, volume, run, structured, out, data, shared);
            }
            Work::Write(..) => {
                while j < burst.len() && matches!(burst[j], Work::Write(..)) {
                    j += 1;
                }
                write_run(pool, volume, &burst[i..j], out, shared);
                wrote = true;
                j = j.max(i + 1);
            }
            Work::Refused(req, e) => {
                reply_error(out, req, *e, structured);
                shared.stats.errors.fetch_add(1, Ordering::Relaxed);
                j = i + 1;
            }
            Work::Other(req) => {
                let req = *req;
                if matches!(req.kind, cmd::TRIM | cmd::WRITE_ZEROES) {
                    wrote = true;
                }
                other(
                    pool, volume, export, &req, structured, allocation, out, shared,
                );
                j = i + 1;
            }
        }
        i = j.max(i + 1);
    }
    wrote
}

/// The replies of a burst: header bytes, and read data to go in at given positions of
/// them (sent from its own buffer, not copied).
struct Replies {
    bytes: Vec<u8>,
    data: Vec<(usize, AlignedBuf)>,
}

impl Replies {
    fn send(self, w: &mut impl Write) -> io::Result<()> {
        let mut at = 0;
        for (pos, buf) in &self.data {
            w.write_all(&self.bytes[at..*pos])?;
            w.write_all(buf)?;
            at = *pos;
        }
        w.write_all(&self.bytes[at..])
    }
}

/// What the request reader hands over: a request (with its payload), or the end of the
/// requests — a disconnect (`None`) or why they broke off.
enum Incoming {
    Work(Work),
    End(Option<io::Error>),
    /// Nothing came for the listener's idle time at a request boundary: the connection
    /// gives its threads back (the reader returns the stream, nothing left in its buffer).
    Idle,
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Fills `buf` whole; a read timeout in the middle of a request is waited out (the idle
/// timeout only counts between requests).
fn read_patiently(r: &mut impl Read, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match r.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads requests until a disconnect or an error, handing them over one by one (`deliver`
/// says false when nobody takes them any more). With a read timeout on the stream, a
/// client silent that long between requests ends the reading with [`Incoming::Idle`], and
/// the reader comes back (its buffer empty) so that the connection can wait without a
/// thread.
fn read_requests<R: Read>(
    mut reader: BufReader<R>,
    read_only: bool,
    size: u64,
    deliver: &mut dyn FnMut(Incoming) -> bool,
) -> Option<BufReader<R>> {
    let end = loop {
        // A request boundary.
        match reader.fill_buf() {
            Ok([]) => break None,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => {
                deliver(Incoming::Idle);
                return Some(reader);
            }
            Err(e) => break Some(e),
        }
        let mut hdr = [0u8; proto::REQUEST_LEN];
        if let Err(e) = read_patiently(&mut reader, &mut hdr) {
            break Some(e);
        }
        let Some(req) = Request::parse(&hdr) else {
            break Some(protocol_error("bad request magic"));
        };
        let work = match req.kind {
            cmd::WRITE => {
                if req.length > MAX_PAYLOAD {
                    // The payload cannot be taken: answer, then hang up.
                    deliver(Incoming::Work(Work::Refused(req, errno::EOVERFLOW)));
                    break Some(protocol_error("oversize write"));
                }
                let mut data = AlignedBuf::new(req.length as usize);
                if let Err(e) = read_patiently(&mut reader, &mut data) {
                    break Some(e);
                }
                let refusal = if read_only {
                    Some(errno::EPERM)
                } else {
                    range_error(&req, size, true)
                };
                match refusal {
                    Some(e) => Work::Refused(req, e),
                    None => Work::Write(req, data),
                }
            }
            cmd::READ => {
                let refusal = if req.length > MAX_PAYLOAD {
                    Some(errno::EOVERFLOW)
                } else {
                    range_error(&req, size, false)
                };
                match refusal {
                    Some(e) => Work::Refused(req, e),
                    None => Work::Read(req, AlignedBuf::new(req.length as usize)),
                }
            }
            cmd::DISC => break None,
            _ => Work::Other(req),
        };
        if !deliver(Incoming::Work(work)) {
            return None; // the connection is over
        }
    };
    deliver(Incoming::End(end));
    None
}

fn reply_error(out: &mut Vec<u8>, req: &Request, e: u32, structured: bool) {
    if structured && req.kind == cmd::READ {
        proto::error_chunk(out, req.cookie, e, "");
    } else {
        proto::simple_reply(out, e, req.cookie);
    }
}

fn reply_data(
    out: &mut Vec<u8>,
    data_out: &mut Vec<(usize, AlignedBuf)>,
    req: &Request,
    data: AlignedBuf,
    structured: bool,
) {
    if structured {
        proto::chunk_header(
            out,
            chunk::FLAG_DONE,
            chunk::OFFSET_DATA,
            req.cookie,
            8 + data.len() as u32,
        );
        out.extend_from_slice(&req.offset.to_be_bytes());
    } else {
        proto::simple_reply(out, 0, req.cookie);
    }
    data_out.push((out.len(), data));
}

fn read_run<D: Device, E: Exports>(
    pool: &Pool<D>,
    volume: &str,
    run: &mut [Work],
    structured: bool,
    out: &mut Vec<u8>,
    data_out: &mut Vec<(usize, AlignedBuf)>,
    shared: &Shared<E>,
) {
    let outcomes = {
        let mut reqs: Vec<ReadRequest<'_>> = run
            .iter_mut()
            .filter_map(|w| match w {
                Work::Read(req, buf) => Some(ReadRequest {
                    volume,
                    offset: req.offset,
                    buf: &mut buf[..],
                }),
                _ => None,
            })
            .collect();
        pool.read_each(&mut reqs)
    };
    let reads = run.iter_mut().filter_map(|w| match w {
        Work::Read(req, buf) => Some((req, buf)),
        _ => None,
    });
    for ((req, buf), outcome) in reads.zip(outcomes) {
        match outcome {
            Ok(()) => {
                let buf = std::mem::replace(buf, AlignedBuf::new(0));
                reply_data(out, data_out, req, buf, structured)
            }
            Err(e) => {
                shared.stats.errors.fetch_add(1, Ordering::Relaxed);
                reply_error(out, req, error_value(&e), structured);
            }
        }
    }
}

fn write_run<D: Device, E: Exports>(
    pool: &Pool<D>,
    volume: &str,
    run: &[Work],
    out: &mut Vec<u8>,
    shared: &Shared<E>,
) {
    let mut reqs = Vec::with_capacity(run.len());
    let mut meta = Vec::with_capacity(run.len());
    for w in run {
        if let Work::Write(req, data) = w {
            reqs.push(WriteRequest {
                volume,
                offset: req.offset,
                data: &data[..],
            });
            meta.push(*req);
        }
    }
    let outcomes = pool.write_batch(&reqs);
    // FUA: durable before the reply (one commit covers the run).
    let fua = meta.iter().any(|r| r.flags & cflag::FUA != 0);
    let flushed = if fua {
        pool.flush().map_err(|e| error_value(&e))
    } else {
        Ok(())
    };
    for (req, outcome) in meta.iter().zip(outcomes) {
        let e = match (outcome, req.flags & cflag::FUA != 0) {
            (Err(e), _) => error_value(&e),
            (Ok(()), true) => flushed.err().unwrap_or(0),
            (Ok(()), false) => 0,
        };
        if e != 0 {
            shared.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        proto::simple_reply(out, e, req.cookie);
    }
}

/// Writes real zeros (NO_HOLE): the range stays allocated.
fn write_zero_data<D: Device>(
    pool: &Pool<D>,
    volume: &str,
    offset: u64,
    len: u64,
) -> Result<(), Error> {
    let chunk = 1u64 << 20;
    let zeros = AlignedBuf::new(chunk as usize);
    let mut at = 0;
    while at < len {
        let n = chunk.min(len - at);
        pool.write(volume, offset + at, &zeros[..n as usize])?;
        at += n;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn other<D: Device, E: Exports>(
    pool: &Pool<D>,
    volume: &str,
    export: &Selected<D>,
    req: &Request,
    structured: bool,
    allocation: bool,
    out: &mut Vec<u8>,
    shared: &Shared<E>,
) {
    let len = u64::from(req.length);
    let fua = req.flags & cflag::FUA != 0;
    let then_flush = |r: Result<(), Error>| -> Result<(), u32> {
        r.map_err(|e| error_value(&e))?;
        if fua {
            pool.flush().map_err(|e| error_value(&e))?;
        }
        Ok(())
    };
    let outcome: Result<(), u32> = match req.kind {
        cmd::FLUSH => pool.flush().map_err(|e| error_value(&e)),
        cmd::TRIM | cmd::WRITE_ZEROES if export.read_only => Err(errno::EPERM),
        cmd::TRIM => match range_error(req, export.size, true) {
            Some(e) => Err(e),
            None => then_flush(pool.discard(volume, req.offset, len)),
        },
        cmd::WRITE_ZEROES => {
            let no_hole = req.flags & cflag::NO_HOLE != 0;
            match range_error(req, export.size, true) {
                Some(e) => Err(e),
                // Writing real zeros is not fast: refuse as FAST_ZERO asks.
                None if no_hole && req.flags & cflag::FAST_ZERO != 0 => Err(errno::ENOTSUP),
                None if no_hole => then_flush(write_zero_data(pool, volume, req.offset, len)),
                None => then_flush(pool.write_zeroes(volume, req.offset, len)),
            }
        }
        cmd::BLOCK_STATUS => {
            if !structured || !allocation || req.length == 0 {
                Err(errno::EINVAL)
            } else {
                match pool.allocation(volume, req.offset, len) {
                    Err(e) => Err(error_value(&e)),
                    Ok(runs) => {
                        let take = if req.flags & cflag::REQ_ONE != 0 {
                            1
                        } else {
                            runs.len()
                        };
                        let mut payload = proto::BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                        for (l, allocated) in runs.iter().take(take) {
                            let state = if *allocated {
                                0
                            } else {
                                proto::STATE_HOLE | proto::STATE_ZERO
                            };
                            payload.extend_from_slice(&(*l as u32).to_be_bytes());
                            payload.extend_from_slice(&state.to_be_bytes());
                        }
                        proto::chunk_header(
                            out,
                            chunk::FLAG_DONE,
                            chunk::BLOCK_STATUS,
                            req.cookie,
                            payload.len() as u32,
                        );
                        out.extend_from_slice(&payload);
                        return;
                    }
                }
            }
        }
        _ => Err(errno::EINVAL),
    };
    match outcome {
        Ok(()) => proto::simple_reply(out, 0, req.cookie),
        Err(e) => {
            shared.stats.errors.fetch_add(1, Ordering::Relaxed);
            if structured && req.kind == cmd::BLOCK_STATUS {
                proto::error_chunk(out, req.cookie, e, "");
            } else {
                proto::simple_reply(out, e, req.cookie);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_lists_match_names_and_whole_pools() {
        let all = ListenerPolicy::default();
        assert!(all.offers("p/v") && all.offers("v"));
        let some = ListenerPolicy {
            exports: vec!["p/v".into(), "q/*".into()],
            ..ListenerPolicy::default()
        };
        assert!(some.offers("p/v") && some.offers("q/a") && some.offers("q/a@1"));
        assert!(!some.offers("p/w") && !some.offers("p/v2") && !some.offers("v"));
        assert!(!some.offers("qq/a") && !some.offers("q") && !some.offers("p/*"));
    }

    #[test]
    fn allow_lists_match_prefixes_and_mapped_addresses() {
        let lan: AllowedNet = "10.1.0.0/16".parse().unwrap();
        assert!(lan.contains("10.1.200.3".parse().unwrap()));
        assert!(!lan.contains("10.2.0.1".parse().unwrap()));
        assert!(lan.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: AllowedNet = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("::2".parse().unwrap()));
        assert!(!one.contains("127.0.0.1".parse().unwrap()));
        let all: AllowedNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<AllowedNet>().is_err());
        assert!("nonsense".parse::<AllowedNet>().is_err());
    }
}
