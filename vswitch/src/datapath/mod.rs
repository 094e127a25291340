//! The datapath: TAP ports and VXLAN uplinks served by N worker threads (default one per
//! core), each an epoll loop that runs to completion in bursts of up to [`BATCH`] frames per
//! descriptor and sleeps in `epoll_wait` when idle (no busy polling).
//!
//! [`Datapath`] is the shared state: the [`Switch`] (tenants, forwarding tables, counters) and
//! the TAP ports. It sits behind one mutex that a worker takes per burst, not per frame:
//!
//! 1. read a burst from one descriptor (no lock);
//! 2. lock: forwarding decisions for the whole burst (learning, policing, lookups, flood
//!    lists), resolved to TAP handles and remote VTEPs; unlock;
//! 3. write the burst to its destinations (no lock: TAP writes and `sendmmsg`/UDP GSO);
//! 4. lock: count what was sent or dropped; unlock.
//!
//! The system calls, which are most of the cost per frame, thus run in parallel on all
//! workers; the locked part is the forwarding decision (35-52 ns per frame,
//! `cargo bench -p bench --bench switch`). Each TAP is read by one worker (ports are spread
//! over workers, fewest first) and written by any. Each worker has its own uplink socket per
//! underlay address, all in one `SO_REUSEPORT` group: the kernel spreads received datagrams
//! over them by 4-tuple, so a flow stays on one worker and in order.
//!
//! Configuration runs on worker 0 between its bursts ([`DatapathWorkers::call`]), in the
//! underlay's network namespace, holding the lock.
//!
//! Why our own loops rather than one thread set per port (as rust-vmm's `vhost-user-backend`
//! runs per backend): threads would grow with ports, and every frame between two ports would
//! cross threads; here a frame goes from read to write on the worker that read it.

mod worker;
mod workers;

pub use workers::DatapathWorkers;

/// A configuration change, run on worker 0 between its bursts.
type Command = Box<dyn FnOnce(&mut Datapath) + Send>;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use overlay_net::fdb::FastHash;
use overlay_net::{Destination, PortId, UnderlayFamily, Vni, mtu};

use crate::placement::{Placement, create_veth, delete_link, in_netns, open_netns, place, set_mtu};
use crate::tap::{
    Offloads, Tap, VNET_F_NEEDS_CSUM, VNET_GSO_NONE, VNET_GSO_TCPV4, VNET_GSO_TCPV6, VNET_HDR_LEN,
    VnetHeader,
};
use crate::uplink::{BATCH, QueueError, Uplink, UplinkIo};
use crate::vhost_net::{self, KickTarget, VhostNetPort};
use crate::{
    DropReason, Error, Ingress, Nanos, PortConfig, Switch, TenantConfig, TenantSwitch, Verdict,
};
use overlay_net::gso::{Coalesced, TcpCoalescer, TcpSegmenter, complete_checksum};

/// epoll token of a port's queue pair `pair` (0 for a TAP): the port id, the pair above it.
fn port_token(port: PortId, pair: usize) -> u64 {
    u64::from(port.0) | (pair as u64) << 32
}

/// epoll token of a worker's control eventfd.
const TOKEN_CONTROL: u64 = u64::MAX;
/// epoll tokens of uplinks: this base plus the uplink's index.
const TOKEN_UPLINK: u64 = 1 << 40;
/// epoll tokens of uplinks' AF_XDP sockets: this base plus the uplink's index.
const TOKEN_UPLINK_XDP: u64 = TOKEN_UPLINK + (1 << 20);
/// Room for one frame read from a TAP: virtio-net header + a 64 KiB TSO super-frame.
const FRAME_SLOT: usize = VNET_HDR_LEN + 65536;
/// How long a guest queue is polled after its last frame before the worker asks for kicks
/// again and may sleep: under load the guest never has to kick (an eventfd write) nor the
/// worker to wake; idle, the worker sleeps after this long.
const POLL_WINDOW: Nanos = 50_000;

/// A port taken out of the datapath whose interface may still exist ([`Datapath::detach_port`]).
#[derive(Debug)]
pub struct DetachedPort(Option<Arc<Tap>>);

/// The descriptor of a deleted veth port: closing it waits out an RCU grace period in the
/// kernel (`AF_PACKET` release), which nobody needs to wait for once the pair is gone.
#[derive(Debug)]
pub struct ClosedLater(#[allow(dead_code)] Option<Arc<Tap>>);

impl DetachedPort {
    /// Deletes the port's interface (in the underlay's namespace): a veth pair over netlink
    /// now, a TAP when its descriptor closes (persist flag cleared, then closed, here). A
    /// worker in the middle of a burst may still hold the port; its descriptor closes when
    /// that burst ends. Returns the veth's descriptor, closed when dropped.
    pub fn delete_interface(mut self) -> Result<ClosedLater, Error> {
        let Some(tap) = self.0.take() else {
            return Ok(ClosedLater(None));
        };
        if tap.is_veth() {
            delete_link(tap.name())?;
            Ok(ClosedLater(Some(tap)))
        } else {
            tap.destroy()?;
            Ok(ClosedLater(None))
        }
    }
}

/// Settings of a datapath.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// Underlay addresses to bind the VXLAN port on (one IPv4 and/or one IPv6).
    pub underlay: Vec<IpAddr>,
    /// L3 MTU of the underlay.
    pub underlay_mtu: u16,
    /// UDP port of VXLAN.
    pub udp_port: u16,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// Zero outer UDP checksums on an IPv6 underlay (send, accept).
    pub udp6_zero_checksum: crate::uplink::Udp6ZeroChecksum,
    /// How the uplinks meet the underlay: UDP sockets, AF_XDP, or AF_XDP where it runs.
    pub uplink_io: crate::uplink::UplinkIo,
}

impl DatapathConfig {
    /// The number of worker threads this configuration runs: `workers`, or one per core.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// Counters of the datapath itself (per-tenant and per-port counters live in the switch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathCounters {
    /// Datagrams on the uplink that are not valid VXLAN.
    pub uplink_invalid: u64,
    /// Frames from TAP ports with offload metadata the datapath cannot carry out (malformed
    /// TCP super-frames, UDP segmentation).
    pub tap_offload_dropped: u64,
    /// Datagrams the kernel did not take on send (socket buffer full).
    pub uplink_tx_dropped: u64,
    /// TCP super-frames received whole from the underlay (a Linux peer's tunnel GSO),
    /// delivered with segmentation offload.
    pub uplink_super_frames: u64,
    /// Frames received through the uplinks' AF_XDP sockets.
    pub uplink_xdp_received: u64,
    /// Frames sent through the uplinks' AF_XDP sockets.
    pub uplink_xdp_sent: u64,
}

/// A worker's own counters, readable by the control plane without stopping it.
#[derive(Debug, Default)]
struct WorkerStats {
    uplink_invalid: AtomicU64,
    tap_offload_dropped: AtomicU64,
    uplink_tx_dropped: AtomicU64,
    uplink_super_frames: AtomicU64,
    uplink_xdp_received: AtomicU64,
    uplink_xdp_sent: AtomicU64,
}

/// What the shared state knows of a worker.
#[derive(Debug)]
struct WorkerLink {
    epoll: Arc<Epoll>,
    wake: Arc<EventFd>,
    stats: Arc<WorkerStats>,
}

/// The datapath's shared state: the switch and its TAP ports, and the workers that serve
/// them. Reached through [`DatapathWorkers::call`].
pub struct Datapath {
    switch: Switch,
    endpoints: HashMap<PortId, Endpoint, FastHash>,
    /// The vhost-user sockets of vhost-user-net ports.
    servers: HashMap<PortId, vhost_device::Server, FastHash>,
    owner: HashMap<PortId, usize, FastHash>,
    workers: Vec<WorkerLink>,
    /// Each underlay's family and the tenant MTU it carries.
    underlays: Vec<(UnderlayFamily, u16)>,
    /// This host's own underlay addresses.
    local: Vec<IpAddr>,
    /// Remote VTEPs that listen on another UDP port than this host's, by tenant (as the
    /// kernel's `bridge fdb ... port`): peers on 4789 and on 8472 from one daemon.
    vtep_ports: HashMap<(Vni, IpAddr), u16, FastHash>,
    /// Tenants created without an MTU: theirs follows the families of their VTEPs.
    auto_mtu: std::collections::HashSet<Vni, FastHash>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("workers", &self.workers.len())
            .field("underlays", &self.underlays)
            .finish()
    }
}

fn nix_err(what: &str, e: nix::Error) -> Error {
    Error::Io(what.into(), e.into())
}

fn lock(shared: &Mutex<Datapath>) -> MutexGuard<'_, Datapath> {
    // A worker that panicked cannot leave the switch half-updated in a way that matters more
    // than stopping all traffic would; go on with the state as it is.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Datapath {
    /// The switch (tenants, ports, forwarding tables, counters).
    pub fn switch(&self) -> &Switch {
        &self.switch
    }

    /// The switch, for configuration.
    pub fn switch_mut(&mut self) -> &mut Switch {
        &mut self.switch
    }

    /// The datapath's own counters, summed over the workers.
    pub fn counters(&self) -> DatapathCounters {
        let mut c = DatapathCounters::default();
        for w in &self.workers {
            c.uplink_invalid += w.stats.uplink_invalid.load(Ordering::Relaxed);
            c.tap_offload_dropped += w.stats.tap_offload_dropped.load(Ordering::Relaxed);
            c.uplink_tx_dropped += w.stats.uplink_tx_dropped.load(Ordering::Relaxed);
            c.uplink_super_frames += w.stats.uplink_super_frames.load(Ordering::Relaxed);
            c.uplink_xdp_received += w.stats.uplink_xdp_received.load(Ordering::Relaxed);
            c.uplink_xdp_sent += w.stats.uplink_xdp_sent.load(Ordering::Relaxed);
        }
        c
    }

    /// Number of worker threads.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// The worker that reads a port.
    pub fn port_worker(&self, name: &str) -> Option<usize> {
        let id = self.switch.port_id(name)?;
        self.owner.get(&id).copied()
    }

    /// The tenant MTU the underlay carries (the smallest over the uplinks).
    pub fn tenant_mtu(&self) -> Option<u16> {
        self.underlays.iter().map(|(_, m)| *m).min()
    }

    /// Creates a tenant; an MTU of 0 means "as large as the underlay carries": as large as
    /// the underlays of its VTEPs' address families carry (IPv4 VTEPs only: 50 bytes of
    /// overhead, not IPv6's 70), following its VTEPs as they change
    /// ([`Self::refresh_tenant_mtu`]); without VTEPs, what every underlay carries.
    pub fn add_tenant(&mut self, mut config: TenantConfig) -> Result<(), Error> {
        let max = self.tenant_mtu().unwrap_or(1500);
        let auto = config.mtu == 0;
        if auto {
            config.mtu = max;
        } else if config.mtu > max {
            return Err(Error::invalid(
                "tenant MTU",
                format!("{} exceeds what the underlay carries ({max})", config.mtu),
            ));
        }
        let vni = config.vni;
        self.switch.add_tenant(config)?;
        if auto {
            self.auto_mtu.insert(vni);
        } else {
            self.auto_mtu.remove(&vni);
        }
        Ok(())
    }

    /// The MTU for a tenant with `vteps`: what the underlays of their families carry (the
    /// smallest); with none, what every underlay carries.
    fn mtu_for_vteps(&self, vteps: &[IpAddr]) -> u16 {
        let families: Vec<UnderlayFamily> = vteps.iter().map(|v| UnderlayFamily::of(*v)).collect();
        self.underlays
            .iter()
            .filter(|(f, _)| families.is_empty() || families.contains(f))
            .map(|(_, m)| *m)
            .min()
            .unwrap_or(1500)
    }

    /// Recomputes the MTU of a tenant created without one from its VTEPs' families; returns
    /// the new MTU if it changed (its ports' interfaces are then to be resized).
    pub fn refresh_tenant_mtu(&mut self, tenant: &str) -> Option<u16> {
        let t = self.switch.tenant(tenant)?;
        if !self.auto_mtu.contains(&t.config().vni) {
            return None;
        }
        let mtu = self.mtu_for_vteps(t.fdb().remote_vteps());
        if mtu == t.config().mtu {
            return None;
        }
        self.switch.tenant_mut(tenant)?.set_mtu(mtu);
        Some(mtu)
    }

    /// Attaches a TAP port to `tenant` and starts serving it on the worker with the fewest
    /// ports. The interface is persistent (it survives a crash of the switch). Without
    /// `placement` it is named like the port in the switch's namespace; with it, it lives in
    /// `placement.netns` as `placement.ifname`: an interface of that name there is attached
    /// to again (after a restart), otherwise one is created, moved there and renamed. Its MTU
    /// is the tenant's.
    pub fn add_tap_port(
        &mut self,
        tenant: &str,
        config: PortConfig,
        offloads: Offloads,
        placement: Option<&Placement>,
    ) -> Result<PortId, Error> {
        let mtu = self.check_new_port(tenant, &config)?;
        let tap = match placement {
            None => {
                let tap = Tap::create_persistent(&config.name, offloads)?;
                set_mtu(&config.name, mtu)?;
                tap
            }
            Some(p) => {
                let ifname = p.ifname.clone();
                let netns = p.netns.clone();
                let ns = open_netns(&p.netns)?;
                let existing =
                    in_netns(Some(ns), move || {
                        if nix::net::if_::if_nametoindex(ifname.as_str()).is_err() {
                            return Ok(None);
                        }
                        // Ours from before a restart: attach again, at the tenant's MTU now
                        // (the underlay may have changed). Anything else is in the way.
                        Tap::create_persistent(&ifname, offloads)
                        .and_then(|tap| set_mtu(&ifname, mtu).map(|()| Some(tap)))
                        .map_err(|e| match e {
                            Error::Io(_, io)
                                if matches!(io.raw_os_error(), Some(libc::EINVAL | libc::EBUSY)) =>
                            {
                                Error::InterfaceInUse(format!(
                                    "{} has an interface named {ifname} already (not a TAP this \
                                     port can take over): pick another ifname or remove it",
                                    netns.display()
                                ))
                            }
                            e => e,
                        })
                    })?;
                match existing {
                    Some(tap) => tap,
                    None => {
                        let tap = Tap::create_persistent(&config.name, offloads)?;
                        if let Err(e) = place(&config.name, p, mtu) {
                            let _ = tap.destroy();
                            return Err(e);
                        }
                        tap
                    }
                }
            }
        };
        self.attach_interface(tenant, config, tap)
    }

    /// Attaches a veth port to `tenant`, for a container: the pair's host end (named like
    /// the port) stays in the switch's namespace, read and written through a packet socket;
    /// the other end lives in `placement.netns` as `placement.ifname`, with the tenant's
    /// MTU. A host end of that name that exists already (after a restart) is attached to
    /// again. Removing the port deletes the pair.
    pub fn add_veth_port(
        &mut self,
        tenant: &str,
        config: PortConfig,
        placement: &Placement,
    ) -> Result<PortId, Error> {
        let mtu = self.check_new_port(tenant, &config)?;
        let name = config.name.clone();
        if nix::net::if_::if_nametoindex(name.as_str()).is_ok() {
            // Attached again after a restart: both ends take the tenant's MTU now (the
            // underlay may have changed).
            set_mtu(&name, mtu)?;
            let ifname = placement.ifname.clone();
            let peer = in_netns(Some(open_netns(&placement.netns)?), move || {
                set_mtu(&ifname, mtu)
            });
            match peer {
                // A runtime moved the other end on (Docker takes it into the container).
                Err(Error::Io(_, ref e))
                    if placement.is_here() && e.raw_os_error() == Some(libc::ENODEV) => {}
                Err(Error::Io(_, ref e))
                    if placement.is_here() && e.kind() == std::io::ErrorKind::NotFound => {}
                r => r?,
            }
        } else {
            create_veth(&name, placement, mtu).map_err(|e| match e {
                Error::Io(_, io) if io.kind() == std::io::ErrorKind::AlreadyExists => {
                    Error::InterfaceInUse(format!(
                        "{} has an interface named {} already: pick another ifname or remove it",
                        placement.netns.display(),
                        placement.ifname
                    ))
                }
                e => e,
            })?;
        }
        let port = Tap::open_veth(&name).and_then(|t| self.attach_interface(tenant, config, t));
        if port.is_err() {
            let _ = delete_link(&name);
        }
        port
    }

    /// Registers a kernel interface as a port of `tenant` and starts serving it on the
    /// worker with the fewest ports; on failure the interface is let go.
    fn attach_interface(
        &mut self,
        tenant: &str,
        config: PortConfig,
        tap: Tap,
    ) -> Result<PortId, Error> {
        let port_name = config.name.clone();
        let id = match self.switch.add_port(tenant, config) {
            Ok(id) => id,
            Err(e) => {
                let _ = tap.destroy();
                return Err(e);
            }
        };
        let worker = self.least_loaded_worker();
        if let Err(e) = self.workers[worker]
            .epoll
            .add(tap.fd(), EpollEvent::new(EpollFlags::EPOLLIN, id.0 as u64))
        {
            let _ = self.switch.remove_port(&port_name);
            let _ = tap.destroy();
            return Err(nix_err("epoll_ctl tap", e));
        }
        self.endpoints.insert(id, Endpoint::Tap(Arc::new(tap)));
        self.owner.insert(id, worker);
        Ok(id)
    }

    /// Validates a new port of `tenant`; returns the tenant's MTU.
    fn check_new_port(&self, tenant: &str, config: &PortConfig) -> Result<u16, Error> {
        config.validate()?;
        let mtu = self
            .switch
            .tenant(tenant)
            .ok_or_else(|| Error::NoSuchTenant(tenant.into()))?
            .config()
            .mtu;
        if self.switch.port_id(&config.name).is_some() {
            return Err(Error::PortExists(config.name.clone()));
        }
        Ok(mtu)
    }

    /// The worker serving the fewest ports (a new port goes there).
    fn least_loaded_worker(&self) -> usize {
        (0..self.workers.len())
            .min_by_key(|w| self.owner.values().filter(|o| *o == w).count())
            .unwrap_or(0)
    }

    /// Whether a TAP or veth port's interface still exists (`None` for other ports).
    pub fn port_link(&self, name: &str) -> Option<crate::api::PortLink> {
        let id = self.switch.port_id(name)?;
        match self.endpoints.get(&id)? {
            Endpoint::Tap(t) if t.is_present() => Some(crate::api::PortLink::Present),
            Endpoint::Tap(_) => Some(crate::api::PortLink::Gone),
            Endpoint::Vhost(_) => None,
        }
    }

    /// The queue pairs of vhost-user-net port `name`: the worker serving each, and its frame
    /// counts.
    pub fn vhost_queue_pairs(&self, name: &str) -> Vec<crate::api::QueuePairInfo> {
        let Some(id) = self.switch.port_id(name) else {
            return Vec::new();
        };
        let (Some(Endpoint::Vhost(port)), Some(first)) =
            (self.endpoints.get(&id), self.owner.get(&id))
        else {
            return Vec::new();
        };
        port.pairs
            .iter()
            .enumerate()
            .map(|(k, c)| crate::api::QueuePairInfo {
                worker: (first + k) % self.workers.len().max(1),
                from_guest: c.tx_frames.load(Ordering::Relaxed),
                to_guest: c.rx_frames.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Adds a vhost-user-net port for a VM to `tenant`: the switch serves the vhost-user
    /// socket `socket` (QEMU: `-chardev socket,path=SOCKET,reconnect=1 -netdev vhost-user`),
    /// one VM connection after another. The guest is offered the port's security MAC, if it
    /// has one, and the tenant's MTU.
    pub fn add_vhost_port(
        &mut self,
        tenant: &str,
        config: PortConfig,
        socket: &std::path::Path,
    ) -> Result<PortId, Error> {
        let mtu = self.check_new_port(tenant, &config)?;
        let mac = config.security.as_ref().map(|s| s.mac);
        let port_name = config.name.clone();
        let id = self.switch.add_port(tenant, config)?;
        let worker = self.least_loaded_worker();
        // One queue pair per worker, pair k served by the k-th worker from the least loaded.
        let n = self.workers.len();
        let kicks = (0..n.min(vhost_net::MAX_PAIRS))
            .map(|k| KickTarget {
                epoll: self.workers[(worker + k) % n].epoll.clone(),
                token: port_token(id, k),
            })
            .collect();
        let port = Arc::new(VhostNetPort::new(&port_name, mac, mtu, kicks));
        let device = port.clone();
        let server = match vhost_device::Server::start(
            socket,
            &format!("net-{port_name}"),
            move || Some(device.clone()),
            || {},
        ) {
            Ok(s) => s,
            Err(e) => {
                let _ = self.switch.remove_port(&port_name);
                return Err(Error::Io(
                    format!("vhost-user socket {}", socket.display()),
                    std::io::Error::other(e.to_string()),
                ));
            }
        };
        // Who may connect: the daemon's socket owner, group and mode (QEMU may run as an
        // unprivileged user of group kvm).
        if let Err(e) = daemon_kit::SocketAccess::current().apply(socket) {
            let _ = self.switch.remove_port(&port_name);
            return Err(Error::Io(
                format!("access of vhost-user socket {}", socket.display()),
                e,
            ));
        }
        self.endpoints.insert(id, Endpoint::Vhost(port));
        self.servers.insert(id, server);
        self.owner.insert(id, worker);
        Ok(id)
    }

    /// Detaches a port and removes its TAP interface.
    pub fn remove_port(&mut self, name: &str) -> Result<(), Error> {
        self.detach_port(name)?.delete_interface().map(drop)
    }

    /// Takes a port out of the switch and the workers at once (no frame goes to or comes
    /// from it after this); its interface, if it has one, is still to be deleted with
    /// [`DetachedPort::delete_interface`], which waits on the kernel and so is best done off
    /// the datapath threads.
    pub fn detach_port(&mut self, name: &str) -> Result<DetachedPort, Error> {
        let id = self
            .switch
            .port_id(name)
            .ok_or_else(|| Error::NoSuchPort(name.into()))?;
        self.switch.remove_port(name)?;
        let worker = self.owner.remove(&id);
        match self.endpoints.remove(&id) {
            Some(Endpoint::Tap(tap)) => {
                if let Some(w) = worker {
                    let _ = self.workers[w].epoll.delete(tap.fd());
                }
                Ok(DetachedPort(Some(tap)))
            }
            Some(Endpoint::Vhost(port)) => {
                // The socket goes; the VM's queues are let go (the kick leaves the epoll set).
                self.servers.remove(&id);
                port.close();
                Ok(DetachedPort(None))
            }
            None => Ok(DetachedPort(None)),
        }
    }

    /// Adds a remote VTEP to a tenant's flood list.
    pub fn add_remote_vtep(&mut self, tenant: &str, vtep: IpAddr) -> Result<(), Error> {
        let vtep = vtep.to_canonical();
        let unusable = match vtep {
            IpAddr::V4(a) => a.is_unspecified() || a.is_broadcast() || a.is_multicast(),
            IpAddr::V6(a) => a.is_unspecified() || a.is_multicast(),
        };
        if unusable {
            return Err(Error::invalid(
                "remote VTEP",
                format!("{vtep} is not a host's unicast address"),
            ));
        }
        if self.local.contains(&vtep) {
            return Err(Error::invalid(
                "remote VTEP",
                format!("{vtep} is this host's own underlay address"),
            ));
        }
        if !self
            .underlays
            .iter()
            .any(|(f, _)| *f == UnderlayFamily::of(vtep))
        {
            return Err(Error::invalid(
                "remote VTEP",
                format!("no uplink of {vtep}'s address family"),
            ));
        }
        self.switch
            .tenant_mut(tenant)
            .ok_or_else(|| Error::NoSuchTenant(tenant.into()))?
            .fdb_mut()
            .add_remote_vtep(vtep);
        Ok(())
    }

    /// Sets the UDP port remote VTEP `vtep` of `tenant` listens on (`None`: this host's VXLAN
    /// port, the default).
    pub fn set_vtep_port(
        &mut self,
        tenant: &str,
        vtep: IpAddr,
        port: Option<u16>,
    ) -> Result<(), Error> {
        let vni = self
            .switch
            .tenant(tenant)
            .ok_or_else(|| Error::NoSuchTenant(tenant.into()))?
            .config()
            .vni;
        let key = (vni, vtep.to_canonical());
        match port {
            Some(0) => {
                return Err(Error::invalid("remote VTEP port", "0 is not a UDP port"));
            }
            Some(p) => {
                self.vtep_ports.insert(key, p);
            }
            None => {
                self.vtep_ports.remove(&key);
            }
        }
        Ok(())
    }

    /// The UDP port of a remote VTEP of tenant `vni`, if not this host's.
    pub fn vtep_port(&self, vni: Vni, vtep: IpAddr) -> Option<u16> {
        self.vtep_ports.get(&(vni, vtep)).copied()
    }
}

/// A local port's frame endpoint: a TAP, or a VM's virtio-net queues over vhost-user.
#[derive(Clone)]
enum Endpoint {
    Tap(Arc<Tap>),
    Vhost(Arc<VhostNetPort>),
}

impl Endpoint {
    /// After a burst: a guest is notified of the frames put on its receive ring.
    fn end_rx_burst(&self) {
        if let Endpoint::Vhost(v) = self {
            v.end_rx_burst();
        }
    }

    /// Sends a complete frame.
    fn send_frame(&self, lane: usize, frame: &[u8]) -> std::io::Result<()> {
        match self {
            Endpoint::Tap(t) => t.send_frame(frame),
            Endpoint::Vhost(v) => v.send_frame(lane, frame),
        }
    }

    /// Sends a frame with offload metadata.
    fn send_with_header(
        &self,
        lane: usize,
        header: &[u8; VNET_HDR_LEN],
        frame: &[u8],
    ) -> std::io::Result<()> {
        match self {
            Endpoint::Tap(t) => t.send_with_header(header, frame),
            Endpoint::Vhost(v) => v.send_with_header(lane, header, frame),
        }
    }
}
