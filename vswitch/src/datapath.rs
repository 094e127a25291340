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
use crate::uplink::{BATCH, QueueError, Uplink};
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
/// Room for one frame read from a TAP: virtio-net header + a 64 KiB TSO super-frame.
const FRAME_SLOT: usize = VNET_HDR_LEN + 65536;
/// How long a guest queue is polled after its last frame before the worker asks for kicks
/// again and may sleep: under load the guest never has to kick (an eventfd write) nor the
/// worker to wake; idle, the worker sleeps after this long.
const POLL_WINDOW: Nanos = 50_000;

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
}

/// A worker's own counters, readable by the control plane without stopping it.
#[derive(Debug, Default)]
struct WorkerStats {
    uplink_invalid: AtomicU64,
    tap_offload_dropped: AtomicU64,
    uplink_tx_dropped: AtomicU64,
    uplink_super_frames: AtomicU64,
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
            in_netns(Some(open_netns(&placement.netns)?), move || {
                set_mtu(&ifname, mtu)
            })?;
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
                // A worker in the middle of a burst may still hold the TAP; the interface
                // goes when it lets go (at the end of that burst). A veth pair goes now.
                if tap.is_veth() {
                    delete_link(tap.name())?;
                } else {
                    tap.destroy()?;
                }
            }
            Some(Endpoint::Vhost(port)) => {
                // The socket goes; the VM's queues are let go (the kick leaves the epoll set).
                self.servers.remove(&id);
                port.close();
            }
            None => {}
        }
        Ok(())
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

/// Where one copy of a frame goes, resolved under the lock.
#[derive(Clone, Copy)]
enum Target {
    /// A local port: its index in the burst's [`BurstPorts`].
    Local(usize),
    /// A remote VTEP and the UDP port it listens on (0: this host's VXLAN port).
    Remote(IpAddr, u16),
}

/// The local ports a burst sends to, each once, with their endpoints (taken from the shared
/// state under the lock, used without it). A burst's frames mostly go to one or two ports:
/// a frame's target is an index here rather than its own handle (no reference count taken
/// and dropped per frame), and the guests among them are notified once per burst.
#[derive(Default)]
struct BurstPorts {
    ports: Vec<(PortId, Endpoint)>,
}

impl BurstPorts {
    /// The index of local port `q`, looked up in `endpoints` the first time in a burst;
    /// `None` if the port is gone.
    fn index(
        &mut self,
        q: PortId,
        endpoints: &HashMap<PortId, Endpoint, FastHash>,
    ) -> Option<usize> {
        // Latest first: consecutive frames mostly go where the previous one went.
        if let Some(i) = self.ports.iter().rposition(|(p, _)| *p == q) {
            return Some(i);
        }
        let ep = endpoints.get(&q)?;
        self.ports.push((q, ep.clone()));
        Some(self.ports.len() - 1)
    }

    fn get(&self, i: usize) -> (PortId, &Endpoint) {
        let (q, ep) = &self.ports[i];
        (*q, ep)
    }

    /// The end of a burst: the guests among the ports are notified of the frames put on
    /// their receive rings; the list is cleared.
    fn end_burst(&mut self) {
        for (_, ep) in &self.ports {
            ep.end_rx_burst();
        }
        self.ports.clear();
    }
}

/// What a burst did to the counters, applied under the lock at its end.
#[derive(Default)]
struct Tally {
    /// Consecutive frames sent to one port are one entry.
    events: Vec<TallyEvent>,
}

/// Frames sent to a port, or a drop.
struct TallyEvent {
    vni: Vni,
    port: Option<PortId>,
    /// None: frames sent.
    reason: Option<DropReason>,
    frames: u64,
    bytes: u64,
}

impl Tally {
    fn tx(&mut self, vni: Vni, port: PortId, len: usize) {
        if let Some(e) = self.events.last_mut()
            && e.reason.is_none()
            && (e.vni, e.port) == (vni, Some(port))
        {
            e.frames += 1;
            e.bytes += len as u64;
            return;
        }
        self.events.push(TallyEvent {
            vni,
            port: Some(port),
            reason: None,
            frames: 1,
            bytes: len as u64,
        });
    }

    fn drop(&mut self, vni: Vni, port: Option<PortId>, reason: DropReason) {
        self.events.push(TallyEvent {
            vni,
            port,
            reason: Some(reason),
            frames: 1,
            bytes: 0,
        });
    }

    fn apply(&mut self, switch: &mut Switch) {
        for e in self.events.drain(..) {
            let Some(tenant) = switch.tenant_by_vni_mut(e.vni) else {
                continue;
            };
            match (e.reason, e.port) {
                (Some(r), p) => tenant.count_drop(p, r),
                (None, Some(p)) => tenant.count_tx_frames(p, e.frames, e.bytes),
                (None, None) => {}
            }
        }
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

/// A frame read from a port, waiting for its forwarding decision.
struct Pending {
    /// Where the frame starts in the worker's frame buffer.
    at: usize,
    len: usize,
    header: [u8; VNET_HDR_LEN],
    vnet: VnetHeader,
    wire_len: usize,
}

/// One worker thread's state: its descriptors, buffers and scratch lists; nothing here is
/// allocated per frame.
struct Worker {
    index: usize,
    shared: Arc<Mutex<Datapath>>,
    epoll: Arc<Epoll>,
    stats: Arc<WorkerStats>,
    uplinks: Vec<Uplink>,
    epoch: Instant,
    frames: Box<[u8]>,
    pending: Vec<Pending>,
    decisions: Vec<Range<usize>>,
    /// Per datagram of an uplink batch: its segmentation offload, for a TCP super-frame.
    offloads: Vec<Option<Coalesced>>,
    targets: Vec<Target>,
    ports: BurstPorts,
    flood: Vec<Destination>,
    tally: Tally,
    scratch: Box<[u8]>,
    gro: TcpCoalescer,
    /// Frames of a burst bound for guests: (index in `targets`, index in `pending`).
    vhost_out: Vec<(usize, usize)>,
}

/// Resolves a verdict to targets: local ports (entered in `ports`; a port that is gone is
/// counted as a send error) and remote VTEPs.
#[allow(clippy::too_many_arguments)]
fn resolve(
    tenant: &mut TenantSwitch,
    endpoints: &HashMap<PortId, Endpoint, FastHash>,
    vtep_ports: &HashMap<(Vni, IpAddr), u16, FastHash>,
    from: Ingress,
    verdict: Verdict,
    flood: &mut Vec<Destination>,
    ports: &mut BurstPorts,
    out: &mut Vec<Target>,
) {
    let mut push = |tenant: &mut TenantSwitch, dest: Destination| match dest {
        Destination::Local(q) => match ports.index(q, endpoints) {
            Some(i) => out.push(Target::Local(i)),
            None => tenant.count_drop(Some(q), DropReason::TxError),
        },
        Destination::Remote(vtep) => {
            let port = if vtep_ports.is_empty() {
                0
            } else {
                let vni = tenant.config().vni;
                vtep_ports.get(&(vni, vtep)).copied().unwrap_or(0)
            };
            out.push(Target::Remote(vtep, port))
        }
    };
    match verdict {
        Verdict::Unicast(dest) => push(tenant, dest),
        Verdict::Flood => {
            flood.clear();
            flood.extend(tenant.flood_targets(from));
            for dest in flood.iter() {
                push(tenant, *dest);
            }
        }
        Verdict::Drop(_) => {}
    }
}

impl Worker {
    fn now(&self) -> Nanos {
        self.epoch.elapsed().as_nanos() as Nanos
    }

    /// Serves events until told to stop. Worker 0 also runs configuration commands.
    fn run(mut self, wake: &EventFd, stop: &AtomicBool, commands: Option<mpsc::Receiver<Command>>) {
        let mut events = [EpollEvent::empty(); 64];
        // Guest queues served again without sleeping: those with more waiting than one burst
        // took, and those polled for POLL_WINDOW after their last frame (kicks off). Each
        // with the time it last gave frames.
        let mut again: Vec<(PortId, usize, Nanos)> = Vec::new();
        let mut next: Vec<(PortId, usize, Nanos)> = Vec::new();
        loop {
            let timeout = if again.is_empty() {
                EpollTimeout::from(500u16)
            } else {
                EpollTimeout::ZERO
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(_) => {
                    // epoll itself failed: do not spin; keep serving commands.
                    std::thread::sleep(Duration::from_millis(10));
                    0
                }
            };
            let mut control = false;
            let mut busy = n > 0;
            let now = self.now();
            let listed = |list: &[(PortId, usize, Nanos)], port, pair| {
                list.iter().any(|&(p, q, _)| p == port && q == pair)
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_CONTROL => {
                        let _ = wake.read();
                        control = true;
                    }
                    t if t >= TOKEN_UPLINK => self.on_uplink((t - TOKEN_UPLINK) as usize),
                    t => {
                        let (port, pair) = (PortId(t as u32), (t >> 32) as usize);
                        let (_, more) = self.on_tap(port, pair, true, true);
                        if more && !listed(&next, port, pair) {
                            next.push((port, pair, now));
                        }
                    }
                }
            }
            for (port, pair, last) in again.drain(..) {
                if listed(&next, port, pair) {
                    continue;
                }
                let poll = now.saturating_sub(last) < POLL_WINDOW;
                let (taken, more) = self.on_tap(port, pair, false, poll);
                busy |= taken > 0;
                if more {
                    next.push((port, pair, if taken > 0 { now } else { last }));
                }
            }
            std::mem::swap(&mut again, &mut next);
            if !busy && !again.is_empty() {
                // Only polling: let another thread on this core (a second switch, the
                // guest's own vCPU) run in between.
                std::thread::yield_now();
            }
            if stop.load(Ordering::Acquire) {
                return;
            }
            if let (true, Some(rx)) = (control, &commands) {
                loop {
                    match rx.try_recv() {
                        Ok(cmd) => cmd(&mut lock(&self.shared)),
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => return,
                    }
                }
            }
        }
    }

    /// Serves a burst from a port (`kicked`: epoll reported it, rather than the port having
    /// had more last time; `poll`: a guest queue found empty keeps its kicks off, to be
    /// polled). Returns the frames taken and whether to serve the port again without waiting
    /// for a kick (a guest queue with more, or being polled).
    fn on_tap(&mut self, port: PortId, pair: usize, kicked: bool, poll: bool) -> (usize, bool) {
        let (tap, vni) = {
            let s = lock(&self.shared);
            (s.endpoints.get(&port).cloned(), s.switch.port_vni(port))
        };
        let (Some(tap), Some(vni)) = (tap, vni) else {
            return (0, false);
        };
        let now = self.now();
        // The worker's index picks a guest's receive queue: workers fill different queues.
        let lane = self.index;
        let Worker {
            shared,
            stats,
            uplinks,
            frames,
            pending,
            decisions,
            targets,
            ports,
            flood,
            tally,
            scratch,
            vhost_out,
            epoll,
            ..
        } = self;

        // 1. Read a burst and check its offload metadata.
        pending.clear();
        let mut spans = [(0usize, 0usize); BATCH];
        let (taken, more) = match &tap {
            Endpoint::Vhost(v) => v.recv_burst(pair, kicked, poll, frames, FRAME_SLOT, &mut spans),
            Endpoint::Tap(t) => {
                // Packed like a guest's frames (see `recv_burst`).
                let mut n = 0;
                let mut at = 0;
                while n < BATCH && at + FRAME_SLOT <= frames.len() {
                    match t.recv(&mut frames[at..at + FRAME_SLOT]) {
                        Ok(Some(len)) => {
                            spans[n] = (at, len);
                            at += len.next_multiple_of(64);
                            n += 1;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            // EBADFD: the interface is gone (its namespace was deleted).
                            // It would stay readable for ever: stop watching it. The port
                            // stays until it is deleted through the API.
                            if e.raw_os_error() == Some(libc::EBADFD) {
                                let _ = epoll.delete(t.fd());
                            }
                            break;
                        }
                    }
                }
                // A TAP with more to read stays readable: epoll comes back to it.
                (n, false)
            }
        };
        for &(at, n) in &spans[..taken] {
            let buf = &frames[at..at + n];
            // `buf` is the frame's own bytes: shorter than a header, none.
            let Some(header) = buf.first_chunk::<VNET_HDR_LEN>() else {
                tally.drop(vni, Some(port), DropReason::Malformed);
                continue;
            };
            let header = *header;
            let vnet = VnetHeader::parse(&header);
            let frame = &buf[VNET_HDR_LEN..n];
            let wire_len = if vnet.is_plain() || vnet.gso_type == VNET_GSO_NONE {
                Some(frame.len())
            } else if vnet.is_tcp_gso() {
                TcpSegmenter::new(frame, vnet.gso_size as usize)
                    .ok()
                    .map(|seg| seg.max_segment_len())
            } else {
                // UDP fragmentation/segmentation offload is never enabled on our TAPs.
                None
            };
            let Some(wire_len) = wire_len else {
                stats.tap_offload_dropped.fetch_add(1, Ordering::Relaxed);
                tally.drop(vni, Some(port), DropReason::Malformed);
                continue;
            };
            pending.push(Pending {
                at,
                len: n,
                header,
                vnet,
                wire_len,
            });
        }

        // 2. Decide, under the lock.
        decisions.clear();
        {
            let mut guard = lock(shared);
            let s = &mut *guard;
            tally.apply(&mut s.switch);
            let from = Ingress::Port(port);
            for p in pending.iter() {
                let Some(tenant) = s.switch.tenant_by_vni_mut(vni) else {
                    break;
                };
                let frame = &frames[p.at + VNET_HDR_LEN..p.at + p.len];
                let verdict = tenant.ingress_sized(from, frame, p.wire_len, now);
                let start = targets.len();
                resolve(
                    tenant,
                    &s.endpoints,
                    &s.vtep_ports,
                    from,
                    verdict,
                    flood,
                    ports,
                    targets,
                );
                decisions.push(start..targets.len());
            }
        }

        // 3. Send, without it.
        for (i, range) in decisions.iter().enumerate() {
            let p = &pending[i];
            let frame = &frames[p.at + VNET_HDR_LEN..p.at + p.len];
            let payload = if p.vnet.is_plain() {
                Payload::Plain(frame)
            } else {
                Payload::Offloaded {
                    frame,
                    header: p.header,
                    vnet: p.vnet,
                }
            };
            for target in &targets[range.clone()] {
                match *target {
                    Target::Local(k) => match ports.get(k) {
                        // A guest that takes the frame as it is: written with the others of
                        // the burst for it, under one lock.
                        (_, Endpoint::Vhost(v))
                            if p.vnet.is_plain() || v.takes_as_is(&p.header) =>
                        {
                            vhost_out.push((k, i));
                        }
                        (q, ep) => send_local(tally, lane, vni, q, ep, payload),
                    },
                    Target::Remote(vtep, vtep_port) => {
                        send_remote(tally, uplinks, scratch, port, vtep, vtep_port, vni, payload)
                    }
                }
            }
        }
        deliver_to_guests(vhost_out, ports, pending, frames, tally, lane, vni);
        ports.end_burst();
        targets.clear();
        let mut tx_dropped = 0;
        for up in uplinks.iter_mut() {
            up.flush();
            tx_dropped += up.tx_dropped();
        }
        stats.uplink_tx_dropped.store(tx_dropped, Ordering::Relaxed);

        // 4. Count, under the lock.
        if !tally.events.is_empty() {
            tally.apply(&mut lock(shared).switch);
        }
        (taken, more)
    }

    fn on_uplink(&mut self, index: usize) {
        let now = self.now();
        // The worker's index picks a guest's receive queue: workers fill different queues.
        let lane = self.index;
        let Worker {
            shared,
            stats,
            uplinks,
            decisions,
            targets,
            ports,
            flood,
            tally,
            gro,
            offloads,
            ..
        } = self;
        let Some(up) = uplinks.get_mut(index) else {
            return;
        };
        let n = up.recv_batch().unwrap_or(0);
        if n == 0 {
            return;
        }
        up.finish_partial_checksums();

        // Decide, under the lock.
        decisions.clear();
        offloads.clear();
        {
            let mut guard = lock(shared);
            let s = &mut *guard;
            tally.apply(&mut s.switch);
            // TCP super-frames (a kernel peer's tunnel GSO): delivered with segmentation
            // offload at the tenant's MTU, checked against it by their largest segment. Only
            // frames larger than any datagram of the underlay carries are candidates.
            let most = usize::from(up.inner_mtu()) + 18;
            for i in 0..n {
                let tenant_mtu = match up.datagram(i) {
                    Some((Ok((vni, inner)), _)) if inner.len() > most => s
                        .switch
                        .tenant_by_vni(vni)
                        .map(|t| t.config().mtu)
                        .filter(|mtu| inner.len() > usize::from(*mtu) + 18),
                    _ => None,
                };
                let offload = tenant_mtu.and_then(|mtu| up.prepare_super_frame(i, mtu));
                if offload.is_some() {
                    stats.uplink_super_frames.fetch_add(1, Ordering::Relaxed);
                }
                offloads.push(offload);
            }
            let up = &*up;
            for (i, offload) in offloads.iter().enumerate() {
                let start = targets.len();
                match up.datagram(i) {
                    Some((Ok((vni, inner)), from)) => {
                        let wire_len = offload.map_or(inner.len(), |c| {
                            usize::from(c.header_len) + usize::from(c.segment_size)
                        });
                        let verdict =
                            s.switch
                                .ingress_uplink_sized(vni, from.ip(), inner, wire_len, now);
                        if let Some(tenant) = s.switch.tenant_by_vni_mut(vni) {
                            let ingress = Ingress::Uplink(from.ip().to_canonical());
                            resolve(
                                tenant,
                                &s.endpoints,
                                &s.vtep_ports,
                                ingress,
                                verdict,
                                flood,
                                ports,
                                targets,
                            );
                        }
                    }
                    Some((Err(_), _)) => {
                        stats.uplink_invalid.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {}
                }
                decisions.push(start..targets.len());
            }
        }

        // Send, without it. In-order TCP segments of one flow for one local port are merged
        // (GRO) and written to the TAP as one frame with segmentation offload. Frames from the
        // underlay go to local ports only (split horizon).
        let up = &*up;
        let mut gro_dest: Option<(Vni, PortId, Endpoint)> = None;
        for (i, range) in decisions.iter().enumerate() {
            let Some((Ok((vni, inner)), _)) = up.datagram(i) else {
                continue;
            };
            let dests = &targets[range.clone()];
            if let Some(c) = offloads.get(i).copied().flatten() {
                // A super-frame goes on whole, with its offload header (ports that cannot
                // take it — a guest without TSO — get it cut).
                flush_gro(gro, &mut gro_dest, tally, lane);
                let header = tso_header(&c);
                let payload = Payload::Offloaded {
                    frame: inner,
                    header,
                    vnet: VnetHeader::parse(&header),
                };
                for target in dests {
                    if let Target::Local(k) = *target {
                        let (q, tap) = ports.get(k);
                        send_local(tally, lane, vni, q, tap, payload);
                    }
                }
                continue;
            }
            if let [Target::Local(k)] = dests {
                let (q, tap) = ports.get(*k);
                if matches!(&gro_dest, Some((v, p, _)) if (*v, *p) == (vni, q)) && gro.push(inner) {
                    continue;
                }
                flush_gro(gro, &mut gro_dest, tally, lane);
                if gro.push(inner) {
                    gro_dest = Some((vni, q, tap.clone()));
                    continue;
                }
            } else {
                flush_gro(gro, &mut gro_dest, tally, lane);
            }
            for target in dests {
                if let Target::Local(k) = *target {
                    let (q, tap) = ports.get(k);
                    send_local(tally, lane, vni, q, tap, Payload::Plain(inner));
                }
            }
        }
        flush_gro(gro, &mut gro_dest, tally, lane);
        ports.end_burst();
        targets.clear();

        if !tally.events.is_empty() {
            tally.apply(&mut lock(shared).switch);
        }
    }
}

/// Writes the frames of a burst bound for guests (`out`: index in `ports`, frame), each
/// guest's under one lock, in the order they came; counts them.
fn deliver_to_guests(
    out: &mut Vec<(usize, usize)>,
    ports: &BurstPorts,
    pending: &[Pending],
    frames: &[u8],
    tally: &mut Tally,
    lane: usize,
    vni: Vni,
) {
    const PLAIN: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];
    // Stable: each guest's frames stay in order (a burst for one guest is sorted already).
    if !out.is_sorted_by_key(|&(k, _)| k) {
        out.sort_by_key(|&(k, _)| k);
    }
    for run in out.chunk_by(|a, b| a.0 == b.0) {
        let (q, Endpoint::Vhost(v)) = ports.get(run[0].0) else {
            continue;
        };
        let items = run.iter().map(|&(_, i)| {
            let p = &pending[i];
            let header = if p.vnet.is_plain() { &PLAIN } else { &p.header };
            (header, &frames[p.at + VNET_HDR_LEN..p.at + p.len])
        });
        let mut lens = run.iter().map(|&(_, i)| pending[i].len - VNET_HDR_LEN);
        v.deliver_burst(lane, items, |result| {
            let len = lens.next().unwrap_or(0);
            match result {
                Ok(()) => tally.tx(vni, q, len),
                Err(e) => tally.drop(vni, Some(q), send_failure(&e)),
            }
        });
    }
    out.clear();
}

/// Writes what the coalescer holds to its port: one frame, with a TCP segmentation offload
/// header if segments were merged.
fn flush_gro(
    gro: &mut TcpCoalescer,
    dest: &mut Option<(Vni, PortId, Endpoint)>,
    tally: &mut Tally,
    lane: usize,
) {
    let Some((vni, port, tap)) = dest.take() else {
        return;
    };
    let Some((frame, info)) = gro.finish() else {
        return;
    };
    let sent = match info {
        None => tap.send_frame(lane, frame),
        Some(c) => tap.send_with_header(lane, &tso_header(&c), frame),
    };
    match sent {
        Ok(()) => tally.tx(vni, port, frame.len()),
        Err(e) => tally.drop(vni, Some(port), send_failure(&e)),
    }
}

/// The virtio-net header of a TCP frame with segmentation offload (and its checksum pending).
fn tso_header(c: &Coalesced) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = VNET_F_NEEDS_CSUM;
    h[1] = if c.ipv6 {
        VNET_GSO_TCPV6
    } else {
        VNET_GSO_TCPV4
    };
    h[2..4].copy_from_slice(&c.header_len.to_le_bytes());
    h[4..6].copy_from_slice(&c.segment_size.to_le_bytes());
    h[6..8].copy_from_slice(&c.csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&c.csum_offset.to_le_bytes());
    h
}

/// A frame to deliver: complete, or with checksum/segmentation offload pending.
#[derive(Clone, Copy)]
enum Payload<'a> {
    Plain(&'a [u8]),
    Offloaded {
        frame: &'a [u8],
        header: [u8; VNET_HDR_LEN],
        vnet: VnetHeader,
    },
}

impl Payload<'_> {
    fn len(&self) -> usize {
        match self {
            Payload::Plain(f) | Payload::Offloaded { frame: f, .. } => f.len(),
        }
    }
}

/// Why a local port could not take a frame: no room at the receiver (a VM without a
/// guest, rings or receive buffers; a full TAP queue), or another failure.
fn send_failure(e: &std::io::Error) -> DropReason {
    match e.kind() {
        std::io::ErrorKind::NotConnected | std::io::ErrorKind::WouldBlock => {
            DropReason::NoRxBuffers
        }
        _ => DropReason::TxError,
    }
}

/// Writes a frame to a local port as it is: offloads pending are the kernel's (a TAP) or the
/// port's (a guest that did not accept them) to finish. `lane` is the sending worker: a
/// guest's receive queue is picked by it.
fn send_local(
    tally: &mut Tally,
    lane: usize,
    vni: Vni,
    port: PortId,
    tap: &Endpoint,
    payload: Payload<'_>,
) {
    let sent = match payload {
        Payload::Plain(f) => tap.send_frame(lane, f),
        Payload::Offloaded { frame, header, .. } => tap.send_with_header(lane, &header, frame),
    };
    match sent {
        Ok(()) => tally.tx(vni, port, payload.len()),
        Err(e) => tally.drop(vni, Some(port), send_failure(&e)),
    }
}

/// Sends a frame from local port `from` to a remote VTEP: complete frames are queued on the
/// uplink (sent at the end of the burst), TCP super-frames cut into segments, checksums left
/// to offload completed here.
#[allow(clippy::too_many_arguments)]
fn send_remote(
    tally: &mut Tally,
    uplinks: &mut [Uplink],
    scratch: &mut [u8],
    from: PortId,
    vtep: IpAddr,
    vtep_port: u16,
    vni: Vni,
    payload: Payload<'_>,
) {
    match payload {
        Payload::Plain(f) => to_uplink(tally, uplinks, from, vtep, vtep_port, vni, f),
        Payload::Offloaded { frame, vnet, .. } if vnet.is_tcp_gso() => segment_to_uplink(
            tally,
            uplinks,
            scratch,
            from,
            vtep,
            vtep_port,
            vni,
            frame,
            vnet.gso_size,
        ),
        Payload::Offloaded { frame, vnet, .. } => {
            let copy = &mut scratch[..frame.len()];
            copy.copy_from_slice(frame);
            let done = vnet.flags & VNET_F_NEEDS_CSUM == 0
                || complete_checksum(copy, vnet.csum_start as usize, vnet.csum_offset as usize)
                    .is_ok();
            if done {
                to_uplink(tally, uplinks, from, vtep, vtep_port, vni, copy);
            } else {
                tally.drop(vni, Some(from), DropReason::Malformed);
            }
        }
    }
}

/// Queues a complete frame on the uplink of `vtep`'s family, counting what cannot go.
fn to_uplink(
    tally: &mut Tally,
    uplinks: &mut [Uplink],
    from: PortId,
    vtep: IpAddr,
    vtep_port: u16,
    vni: Vni,
    frame: &[u8],
) {
    let family = UnderlayFamily::of(vtep);
    let reason = match uplinks.iter_mut().find(|u| u.family() == family) {
        Some(up) => match up.queue(vtep, vtep_port, vni, frame) {
            Ok(()) => return,
            Err(QueueError::TooBig) => DropReason::UnderlayMtu,
            Err(QueueError::WrongFamily) => DropReason::TxError,
        },
        None => DropReason::TxError,
    };
    tally.drop(vni, Some(from), reason);
}

/// Most UDP payload bytes handed to one UDP segmentation offload send.
const MAX_GSO_SEND: usize = 65_000;

/// Cuts a TCP super-frame into segments, encapsulates them and sends them to `vtep` with UDP
/// segmentation offload: one system call for up to 64 KiB of datagrams. If the kernel refuses
/// the offload, the datagrams are queued one by one instead.
#[allow(clippy::too_many_arguments)]
fn segment_to_uplink(
    tally: &mut Tally,
    uplinks: &mut [Uplink],
    scratch: &mut [u8],
    from: PortId,
    vtep: IpAddr,
    vtep_port: u16,
    vni: Vni,
    frame: &[u8],
    mss: u16,
) {
    let Ok(mut seg) = TcpSegmenter::new(frame, mss as usize) else {
        tally.drop(vni, Some(from), DropReason::Malformed);
        return;
    };
    let family = UnderlayFamily::of(vtep);
    let Some(up) = uplinks.iter_mut().find(|u| u.family() == family) else {
        tally.drop(vni, Some(from), DropReason::TxError);
        return;
    };
    let seg_max = seg.max_segment_len();
    if !up.fits(seg_max) {
        tally.drop(vni, Some(from), DropReason::UnderlayMtu);
        return;
    }
    let stride = overlay_net::vxlan::HEADER_LEN + seg_max;
    let per_send = (MAX_GSO_SEND / stride).clamp(1, 64);
    let header = overlay_net::vxlan::header(vni);
    let send = |up: &mut Uplink, tally: &mut Tally, chunk: &[u8]| {
        if up
            .send_segmented(vtep, vtep_port, chunk, stride as u16)
            .is_err()
        {
            // No UDP GSO here: queue the datagrams one by one.
            for d in chunk.chunks(stride) {
                if up
                    .queue(vtep, vtep_port, vni, &d[overlay_net::vxlan::HEADER_LEN..])
                    .is_err()
                {
                    tally.drop(vni, Some(from), DropReason::TxError);
                }
            }
        }
    };
    let (mut off, mut count) = (0usize, 0usize);
    loop {
        let start = off + overlay_net::vxlan::HEADER_LEN;
        let Some(r) = seg.next_into(&mut scratch[start..start + seg_max]) else {
            break;
        };
        let Ok(n) = r else {
            tally.drop(vni, Some(from), DropReason::Malformed);
            return;
        };
        scratch[off..start].copy_from_slice(&header);
        off = start + n;
        count += 1;
        if count == per_send {
            send(up, tally, &scratch[..off]);
            (off, count) = (0, 0);
        }
    }
    if count > 0 {
        send(up, tally, &scratch[..off]);
    }
}

type Command = Box<dyn FnOnce(&mut Datapath) + Send>;

/// The running datapath: its worker threads and a way to configure it.
pub struct DatapathWorkers {
    shared: Arc<Mutex<Datapath>>,
    commands: mpsc::Sender<Command>,
    stop: Arc<AtomicBool>,
    wakes: Vec<Arc<EventFd>>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for DatapathWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathWorkers")
            .field("workers", &self.threads.len())
            .finish()
    }
}

/// Binds a worker's uplinks and registers them and its eventfd with its epoll.
fn bind_uplinks(
    addrs: &[SocketAddr],
    cfg: &DatapathConfig,
    epoll: &Epoll,
    wake: &EventFd,
) -> Result<Vec<Uplink>, Error> {
    epoll
        .add(wake, EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_CONTROL))
        .map_err(|e| nix_err("epoll_ctl eventfd", e))?;
    let mut uplinks = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let up = Uplink::bind(*addr, cfg.underlay_mtu, true)?;
        epoll
            .add(
                up.fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_UPLINK + i as u64),
            )
            .map_err(|e| nix_err("epoll_ctl uplink", e))?;
        uplinks.push(up);
    }
    Ok(uplinks)
}

impl DatapathWorkers {
    /// Starts the worker threads. `enter` runs first on each of them (e.g. to enter the
    /// underlay's network namespace); their uplinks are bound after it. Fails if another
    /// socket already has an underlay address's VXLAN port.
    pub fn spawn(
        config: DatapathConfig,
        enter: impl Fn() -> Result<(), Error> + Send + Sync + 'static,
    ) -> Result<DatapathWorkers, Error> {
        let count = config.worker_count();
        let mut underlays = Vec::new();
        for ip in &config.underlay {
            let family = UnderlayFamily::of(*ip);
            let inner = mtu::inner_mtu(config.underlay_mtu, family).ok_or_else(|| {
                Error::invalid(
                    "underlay MTU",
                    format!("{} is too small", config.underlay_mtu),
                )
            })?;
            underlays.push((family, inner));
        }
        let mut links = Vec::new();
        for _ in 0..count {
            links.push(WorkerLink {
                epoll: Arc::new(
                    Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
                        .map_err(|e| nix_err("epoll_create", e))?,
                ),
                wake: Arc::new(
                    EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                        .map_err(|e| nix_err("eventfd", e))?,
                ),
                stats: Arc::default(),
            });
        }
        let wakes: Vec<_> = links.iter().map(|l| l.wake.clone()).collect();
        let epolls: Vec<_> = links.iter().map(|l| l.epoll.clone()).collect();
        let stats: Vec<_> = links.iter().map(|l| l.stats.clone()).collect();
        let shared = Arc::new(Mutex::new(Datapath {
            switch: Switch::new(),
            endpoints: HashMap::default(),
            servers: HashMap::default(),
            owner: HashMap::default(),
            workers: links,
            underlays,
            local: config.underlay.iter().map(|a| a.to_canonical()).collect(),
            vtep_ports: HashMap::default(),
            auto_mtu: Default::default(),
        }));
        let (tx, rx) = mpsc::channel::<Command>();
        let mut workers = DatapathWorkers {
            shared: shared.clone(),
            commands: tx,
            stop: Arc::new(AtomicBool::new(false)),
            wakes: wakes.clone(),
            threads: Vec::new(),
        };
        let enter = Arc::new(enter);
        let epoch = Instant::now();
        let mut rx = Some(rx);
        // Worker 0 binds the configured addresses first (also checking that nobody else has
        // them); the others join its sockets' SO_REUSEPORT groups on the very same ports.
        let mut addrs: Vec<SocketAddr> = config
            .underlay
            .iter()
            .map(|ip| SocketAddr::new(*ip, config.udp_port))
            .collect();
        for index in 0..count {
            let (ready_tx, ready_rx) = mpsc::channel::<Result<Vec<SocketAddr>, Error>>();
            let (enter, cfg, bind_to) = (enter.clone(), config.clone(), addrs.clone());
            let (epoll, wake, stats) = (
                epolls[index].clone(),
                wakes[index].clone(),
                stats[index].clone(),
            );
            let (shared, stop, commands) = (shared.clone(), workers.stop.clone(), rx.take());
            let thread = std::thread::Builder::new()
                .name(format!("vswitch-dp{index}"))
                .spawn(move || {
                    let setup = enter().and_then(|()| {
                        if index == 0 {
                            for a in &bind_to {
                                // A plain bind fails if any socket has the port, SO_REUSEPORT
                                // group or not: never share an address with another switch.
                                std::net::UdpSocket::bind(a)
                                    .map_err(|e| Error::Io(format!("bind {a}"), e))?;
                            }
                        }
                        bind_uplinks(&bind_to, &cfg, &epoll, &wake)
                    });
                    let uplinks = match setup {
                        Ok(u) => {
                            let bound = u.iter().filter_map(Uplink::local_addr).collect();
                            let _ = ready_tx.send(Ok(bound));
                            u
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let worker = Worker {
                        index,
                        shared,
                        epoll,
                        stats,
                        uplinks,
                        epoch,
                        frames: vec![0u8; FRAME_SLOT * BATCH].into_boxed_slice(),
                        pending: Vec::with_capacity(BATCH),
                        decisions: Vec::with_capacity(BATCH),
                        offloads: Vec::with_capacity(BATCH),
                        targets: Vec::with_capacity(4 * BATCH),
                        ports: BurstPorts::default(),
                        vhost_out: Vec::with_capacity(4 * BATCH),
                        flood: Vec::with_capacity(64),
                        tally: Tally {
                            events: Vec::with_capacity(4 * BATCH),
                        },
                        scratch: vec![0u8; 65536].into_boxed_slice(),
                        gro: TcpCoalescer::new(),
                    };
                    debug_assert!(worker.index == 0 || commands.is_none());
                    worker.run(&wake, &stop, commands);
                })
                .map_err(|e| Error::Io("spawn datapath worker".into(), e))?;
            workers.threads.push(thread);
            let bound = ready_rx
                .recv()
                .map_err(|_| Error::invalid("datapath", "worker died during setup"))??;
            if index == 0 {
                addrs = bound;
            }
        }
        Ok(workers)
    }

    /// Runs `f` on worker 0 between its bursts, with the datapath locked, in the underlay's
    /// network namespace, and returns its result.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Datapath) -> R + Send + 'static,
    ) -> Result<R, Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.commands
            .send(Box::new(move |dp: &mut Datapath| {
                let _ = tx.send(f(dp));
            }))
            .map_err(|_| Error::invalid("datapath", "worker 0 is gone"))?;
        self.wakes[0]
            .write(1)
            .map_err(|e| nix_err("eventfd write", e))?;
        rx.recv()
            .map_err(|_| Error::invalid("datapath", "worker 0 is gone"))
    }

    /// Reads the shared state from the calling thread (counters, tables); for anything that
    /// creates interfaces use [`Self::call`], which runs in the underlay's namespace.
    pub fn with<R>(&self, f: impl FnOnce(&Datapath) -> R) -> R {
        f(&lock(&self.shared))
    }

    /// Number of worker threads.
    pub fn workers(&self) -> usize {
        self.threads.len()
    }
}

impl Drop for DatapathWorkers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for w in &self.wakes {
            let _ = w.write(1);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
