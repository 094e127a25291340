//! The datapath: TAP ports and VXLAN uplinks driven by one epoll loop, run to completion in
//! bursts of up to [`BATCH`] frames per descriptor, asleep in `epoll_wait` when idle.
//!
//! [`Datapath`] is single-threaded state; [`DatapathThread`] runs it on its own thread and
//! carries configuration calls to it between bursts (a command queue plus an eventfd), so the
//! forwarding path takes no locks.
//!
//! Why our own loop rather than one thread set per port (as rust-vmm's `vhost-user-backend`
//! runs per backend): threads would grow with ports, and every frame between two ports would
//! cross threads. One loop owning all port descriptors forwards a frame from read to write
//! without a hand-off; its cost per frame is the forwarding decision (35-52 ns,
//! `cargo bench -p bench --bench switch`) plus the system calls, which bursts and
//! TSO/GRO amortise. More cores come from several such loops with disjoint ports and a shared
//! forwarding table (not yet: one loop today).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use overlay_net::fdb::FastHash;
use overlay_net::{Destination, PortId, UnderlayFamily, Vni};

use crate::placement::{Placement, in_netns, open_netns, place, set_mtu};
use crate::tap::{
    Offloads, Tap, VNET_F_NEEDS_CSUM, VNET_GSO_NONE, VNET_GSO_TCPV4, VNET_GSO_TCPV6, VNET_HDR_LEN,
    VnetHeader,
};
use crate::uplink::{BATCH, QueueError, Uplink};
use crate::{
    DropReason, Error, Ingress, Nanos, PortConfig, Switch, TenantConfig, TenantSwitch, Verdict,
};
use overlay_net::gso::{TcpCoalescer, TcpSegmenter, complete_checksum};

/// epoll token of the control eventfd.
const TOKEN_CONTROL: u64 = u64::MAX;
/// epoll tokens of uplinks: this base plus the uplink's index.
const TOKEN_UPLINK: u64 = 1 << 40;

/// Settings of a datapath.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// Underlay addresses to bind the VXLAN port on (one IPv4 and/or one IPv6).
    pub underlay: Vec<IpAddr>,
    /// L3 MTU of the underlay.
    pub underlay_mtu: u16,
    /// UDP port of VXLAN.
    pub udp_port: u16,
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
}

/// Single-threaded datapath state.
pub struct Datapath {
    switch: Switch,
    taps: HashMap<PortId, Tap, FastHash>,
    uplinks: Vec<Uplink>,
    epoll: Epoll,
    buf: Box<[u8]>,
    scratch: Box<[u8]>,
    gro: TcpCoalescer,
    flood: Vec<Destination>,
    epoch: Instant,
    counters: DatapathCounters,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("uplinks", &self.uplinks)
            .finish()
    }
}

fn nix_err(what: &str, e: nix::Error) -> Error {
    Error::Io(what.into(), e.into())
}

impl Datapath {
    /// Binds the uplinks (call in the underlay's network namespace).
    pub fn new(cfg: &DatapathConfig) -> Result<Datapath, Error> {
        let epoll =
            Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| nix_err("epoll_create", e))?;
        let mut uplinks = Vec::new();
        for (i, ip) in cfg.underlay.iter().enumerate() {
            let up = Uplink::bind(SocketAddr::new(*ip, cfg.udp_port), cfg.underlay_mtu)?;
            epoll
                .add(
                    up.fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_UPLINK + i as u64),
                )
                .map_err(|e| nix_err("epoll_ctl uplink", e))?;
            uplinks.push(up);
        }
        Ok(Datapath {
            switch: Switch::new(),
            taps: HashMap::default(),
            uplinks,
            epoll,
            buf: vec![0u8; VNET_HDR_LEN + 65536].into_boxed_slice(),
            scratch: vec![0u8; 65536].into_boxed_slice(),
            gro: TcpCoalescer::new(),
            flood: Vec::with_capacity(64),
            epoch: Instant::now(),
            counters: DatapathCounters::default(),
        })
    }

    /// The switch (tenants, ports, forwarding tables, counters).
    pub fn switch(&self) -> &Switch {
        &self.switch
    }

    /// The switch, for configuration.
    pub fn switch_mut(&mut self) -> &mut Switch {
        &mut self.switch
    }

    /// The datapath's own counters.
    pub fn counters(&self) -> DatapathCounters {
        DatapathCounters {
            uplink_tx_dropped: self.uplinks.iter().map(Uplink::tx_dropped).sum(),
            ..self.counters
        }
    }

    /// The tenant MTU the underlay carries (the smallest over the uplinks).
    pub fn tenant_mtu(&self) -> Option<u16> {
        self.uplinks.iter().map(Uplink::inner_mtu).min()
    }

    /// Creates a tenant; an MTU of 0 means "as large as the underlay carries".
    pub fn add_tenant(&mut self, mut config: TenantConfig) -> Result<(), Error> {
        let max = self.tenant_mtu().unwrap_or(1500);
        if config.mtu == 0 {
            config.mtu = max;
        } else if config.mtu > max {
            return Err(Error::invalid(
                "tenant MTU",
                format!("{} exceeds what the underlay carries ({max})", config.mtu),
            ));
        }
        self.switch.add_tenant(config).map(|_| ())
    }

    /// Attaches a TAP port to `tenant` and starts serving it. The interface is persistent
    /// (it survives a crash of the switch). Without `placement` it is named like the port in
    /// the switch's namespace; with it, it lives in `placement.netns` as `placement.ifname`:
    /// an interface of that name there is attached to again (after a restart), otherwise one
    /// is created, moved there and renamed. Its MTU is the tenant's.
    pub fn add_tap_port(
        &mut self,
        tenant: &str,
        config: PortConfig,
        offloads: Offloads,
        placement: Option<&Placement>,
    ) -> Result<PortId, Error> {
        config.validate()?;
        let mtu = self
            .switch
            .tenant(tenant)
            .ok_or_else(|| Error::NoSuchTenant(tenant.into()))?
            .config()
            .mtu;
        if self.switch.port_id(&config.name).is_some() {
            return Err(Error::PortExists(config.name));
        }
        let tap = match placement {
            None => {
                let tap = Tap::create_persistent(&config.name, offloads)?;
                set_mtu(&config.name, mtu)?;
                tap
            }
            Some(p) => {
                let ifname = p.ifname.clone();
                let ns = open_netns(&p.netns)?;
                let existing = in_netns(Some(ns), move || {
                    if nix::net::if_::if_nametoindex(ifname.as_str()).is_err() {
                        return Ok(None);
                    }
                    Tap::create_persistent(&ifname, offloads).map(Some)
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
        let port_name = config.name.clone();
        let id = match self.switch.add_port(tenant, config) {
            Ok(id) => id,
            Err(e) => {
                let _ = tap.destroy();
                return Err(e);
            }
        };
        if let Err(e) = self
            .epoll
            .add(tap.fd(), EpollEvent::new(EpollFlags::EPOLLIN, id.0 as u64))
        {
            let _ = self.switch.remove_port(&port_name);
            let _ = tap.destroy();
            return Err(nix_err("epoll_ctl tap", e));
        }
        self.taps.insert(id, tap);
        Ok(id)
    }

    /// Detaches a port and closes its TAP (the interface disappears).
    pub fn remove_port(&mut self, name: &str) -> Result<(), Error> {
        let id = self
            .switch
            .port_id(name)
            .ok_or_else(|| Error::NoSuchPort(name.into()))?;
        self.switch.remove_port(name)?;
        if let Some(tap) = self.taps.remove(&id) {
            let _ = self.epoll.delete(tap.fd());
            tap.destroy()?;
        }
        Ok(())
    }

    /// Adds a remote VTEP to a tenant's flood list.
    pub fn add_remote_vtep(&mut self, tenant: &str, vtep: IpAddr) -> Result<(), Error> {
        if !self
            .uplinks
            .iter()
            .any(|u| u.family() == UnderlayFamily::of(vtep))
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

    fn now(&self) -> Nanos {
        self.epoch.elapsed().as_nanos() as Nanos
    }

    /// Waits up to `timeout` for traffic and forwards what is there, in bursts. Returns the
    /// number of events handled. `control` is told whether the control eventfd fired.
    pub fn poll(
        &mut self,
        timeout: Duration,
        control: Option<&EventFd>,
    ) -> Result<(usize, bool), Error> {
        let mut events = [EpollEvent::empty(); 64];
        let ms = timeout.as_millis().min(u16::MAX as u128) as u16;
        let n = match self.epoll.wait(&mut events, EpollTimeout::from(ms)) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(nix_err("epoll_wait", e)),
        };
        let mut control_fired = false;
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_CONTROL => {
                    if let Some(c) = control {
                        let _ = c.read();
                    }
                    control_fired = true;
                }
                t if t >= TOKEN_UPLINK => self.on_uplink((t - TOKEN_UPLINK) as usize),
                t => self.on_tap(PortId(t as u32)),
            }
        }
        Ok((n, control_fired))
    }

    fn on_tap(&mut self, port: PortId) {
        let now = self.now();
        let Some(vni) = self.switch.port_vni(port) else {
            return;
        };
        let Datapath {
            switch,
            taps,
            uplinks,
            buf,
            scratch,
            flood,
            counters,
            ..
        } = self;
        let Some(tap) = taps.get(&port) else {
            return;
        };
        for _ in 0..BATCH {
            let n = match tap.recv(buf) {
                Ok(Some(n)) => n,
                Ok(None) | Err(_) => break,
            };
            let Some(tenant) = switch.tenant_by_vni_mut(vni) else {
                break;
            };
            let Some(hdr) = buf
                .first_chunk::<VNET_HDR_LEN>()
                .filter(|_| n >= VNET_HDR_LEN)
            else {
                tenant.count_drop(Some(port), DropReason::Malformed);
                continue;
            };
            let header = *hdr;
            let vnet = VnetHeader::parse(&header);
            let frame = &buf[VNET_HDR_LEN..n];
            let from = Ingress::Port(port);
            let (payload, wire_len) = if vnet.is_plain() {
                (Payload::Plain(frame), frame.len())
            } else if vnet.is_tcp_gso() {
                match TcpSegmenter::new(frame, vnet.gso_size as usize) {
                    Ok(seg) => (
                        Payload::Offloaded {
                            frame,
                            header,
                            vnet,
                        },
                        seg.max_segment_len(),
                    ),
                    Err(_) => {
                        counters.tap_offload_dropped += 1;
                        tenant.count_drop(Some(port), DropReason::Malformed);
                        continue;
                    }
                }
            } else if vnet.gso_type == VNET_GSO_NONE {
                (
                    Payload::Offloaded {
                        frame,
                        header,
                        vnet,
                    },
                    frame.len(),
                )
            } else {
                // UDP fragmentation/segmentation offload is never enabled on our TAPs.
                counters.tap_offload_dropped += 1;
                tenant.count_drop(Some(port), DropReason::Malformed);
                continue;
            };
            let verdict = tenant.ingress_sized(from, frame, wire_len, now);
            deliver(
                tenant, taps, uplinks, flood, scratch, from, verdict, payload, vni,
            );
        }
        for up in uplinks.iter_mut() {
            up.flush();
        }
    }

    fn on_uplink(&mut self, index: usize) {
        let now = self.now();
        let Datapath {
            switch,
            taps,
            uplinks,
            flood,
            scratch,
            gro,
            counters,
            ..
        } = self;
        let Some(up) = uplinks.get_mut(index) else {
            return;
        };
        let n = up.recv_batch().unwrap_or(0);
        // In-order TCP segments of one flow for one local port are merged (GRO) and written
        // to the TAP as one frame with segmentation offload.
        let mut gro_dest: Option<(Vni, PortId)> = None;
        for i in 0..n {
            let Some((parsed, from)) = up.datagram(i) else {
                continue;
            };
            let (vni, inner) = match parsed {
                Ok(v) => v,
                Err(_) => {
                    counters.uplink_invalid += 1;
                    continue;
                }
            };
            let ingress = Ingress::Uplink(from.ip());
            let verdict = switch.ingress_uplink(vni, from.ip(), inner, now);
            if let Verdict::Unicast(Destination::Local(q)) = verdict {
                if gro_dest == Some((vni, q)) && gro.push(inner) {
                    continue;
                }
                flush_gro(gro, &mut gro_dest, switch, taps);
                if gro.push(inner) {
                    gro_dest = Some((vni, q));
                    continue;
                }
            } else {
                flush_gro(gro, &mut gro_dest, switch, taps);
            }
            if let Some(tenant) = switch.tenant_by_vni_mut(vni) {
                // Frames from the underlay go to local ports only (split horizon).
                let payload = Payload::Plain(inner);
                deliver(
                    tenant,
                    taps,
                    &mut [],
                    flood,
                    scratch,
                    ingress,
                    verdict,
                    payload,
                    vni,
                );
            }
        }
        flush_gro(gro, &mut gro_dest, switch, taps);
    }
}

/// Writes what the coalescer holds to its port: one frame, with a TCP segmentation offload
/// header if segments were merged.
fn flush_gro(
    gro: &mut TcpCoalescer,
    dest: &mut Option<(Vni, PortId)>,
    switch: &mut Switch,
    taps: &HashMap<PortId, Tap, FastHash>,
) {
    let Some((vni, port)) = dest.take() else {
        return;
    };
    let Some((frame, info)) = gro.finish() else {
        return;
    };
    let sent = taps.get(&port).map(|tap| match info {
        None => tap.send_frame(frame),
        Some(c) => {
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
            tap.send_with_header(&h, frame)
        }
    });
    if let Some(tenant) = switch.tenant_by_vni_mut(vni) {
        match sent {
            Some(Ok(())) => tenant.count_tx(port, frame.len()),
            _ => tenant.count_drop(Some(port), DropReason::TxError),
        }
    }
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

/// Queues a complete frame on the uplink of `vtep`'s family, counting what cannot go.
fn to_uplink(
    tenant: &mut TenantSwitch,
    uplinks: &mut [Uplink],
    from_port: Option<PortId>,
    vtep: IpAddr,
    vni: Vni,
    frame: &[u8],
) {
    let family = UnderlayFamily::of(vtep);
    match uplinks.iter_mut().find(|u| u.family() == family) {
        Some(up) => match up.queue(vtep, vni, frame) {
            Ok(()) => {}
            Err(QueueError::TooBig) => tenant.count_drop(from_port, DropReason::UnderlayMtu),
            Err(QueueError::WrongFamily) => tenant.count_drop(from_port, DropReason::TxError),
        },
        None => tenant.count_drop(from_port, DropReason::TxError),
    }
}

/// Most UDP payload bytes handed to one UDP segmentation offload send.
const MAX_GSO_SEND: usize = 65_000;

/// Cuts a TCP super-frame into segments, encapsulates them and sends them to `vtep` with UDP
/// segmentation offload: one system call for up to 64 KiB of datagrams. If the kernel refuses
/// the offload, the datagrams are queued one by one instead.
#[allow(clippy::too_many_arguments)]
fn segment_to_uplink(
    tenant: &mut TenantSwitch,
    uplinks: &mut [Uplink],
    scratch: &mut [u8],
    from_port: Option<PortId>,
    vtep: IpAddr,
    vni: Vni,
    frame: &[u8],
    mss: u16,
) {
    let Ok(mut seg) = TcpSegmenter::new(frame, mss as usize) else {
        tenant.count_drop(from_port, DropReason::Malformed);
        return;
    };
    let family = UnderlayFamily::of(vtep);
    let Some(up) = uplinks.iter_mut().find(|u| u.family() == family) else {
        tenant.count_drop(from_port, DropReason::TxError);
        return;
    };
    let seg_max = seg.max_segment_len();
    if !up.fits(seg_max) {
        tenant.count_drop(from_port, DropReason::UnderlayMtu);
        return;
    }
    let stride = overlay_net::vxlan::HEADER_LEN + seg_max;
    let per_send = (MAX_GSO_SEND / stride).clamp(1, 64);
    let header = overlay_net::vxlan::header(vni);
    let send = |up: &mut Uplink, tenant: &mut TenantSwitch, chunk: &[u8]| {
        if up.send_segmented(vtep, chunk, stride as u16).is_err() {
            // No UDP GSO here: queue the datagrams one by one.
            for d in chunk.chunks(stride) {
                if up
                    .queue(vtep, vni, &d[overlay_net::vxlan::HEADER_LEN..])
                    .is_err()
                {
                    tenant.count_drop(from_port, DropReason::TxError);
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
            tenant.count_drop(from_port, DropReason::Malformed);
            return;
        };
        scratch[off..start].copy_from_slice(&header);
        off = start + n;
        count += 1;
        if count == per_send {
            send(up, tenant, &scratch[..off]);
            (off, count) = (0, 0);
        }
    }
    if count > 0 {
        send(up, tenant, &scratch[..off]);
    }
}

/// Sends a frame where its verdict says. Local TAP ports take offloaded frames as they are
/// (the kernel finishes them); the uplink gets complete frames: checksums completed and TCP
/// super-frames cut into segments here, queued and sent at the end of the burst.
#[allow(clippy::too_many_arguments)]
fn deliver(
    tenant: &mut TenantSwitch,
    taps: &HashMap<PortId, Tap, FastHash>,
    uplinks: &mut [Uplink],
    flood: &mut Vec<Destination>,
    scratch: &mut [u8],
    from: Ingress,
    verdict: Verdict,
    payload: Payload<'_>,
    vni: Vni,
) {
    let from_port = match from {
        Ingress::Port(p) => Some(p),
        Ingress::Uplink(_) => None,
    };
    let mut send = |tenant: &mut TenantSwitch, dest: Destination| match dest {
        Destination::Local(q) => {
            let sent = taps.get(&q).map(|t| match payload {
                Payload::Plain(f) => t.send_frame(f),
                Payload::Offloaded { frame, header, .. } => t.send_with_header(&header, frame),
            });
            match sent {
                Some(Ok(())) => tenant.count_tx(q, payload.len()),
                _ => tenant.count_drop(Some(q), DropReason::TxError),
            }
        }
        Destination::Remote(vtep) => match payload {
            Payload::Plain(f) => to_uplink(tenant, uplinks, from_port, vtep, vni, f),
            Payload::Offloaded { frame, vnet, .. } if vnet.is_tcp_gso() => segment_to_uplink(
                tenant,
                uplinks,
                scratch,
                from_port,
                vtep,
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
                    to_uplink(tenant, uplinks, from_port, vtep, vni, copy);
                } else {
                    tenant.count_drop(from_port, DropReason::Malformed);
                }
            }
        },
    };
    match verdict {
        Verdict::Unicast(dest) => send(tenant, dest),
        Verdict::Flood => {
            flood.clear();
            flood.extend(tenant.flood_targets(from));
            for dest in flood.iter() {
                send(tenant, *dest);
            }
        }
        Verdict::Drop(_) => {}
    }
}

type Command = Box<dyn FnOnce(&mut Datapath) + Send>;

/// A datapath running on its own thread.
pub struct DatapathThread {
    commands: mpsc::Sender<Command>,
    wake: std::sync::Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl DatapathThread {
    /// Starts a datapath thread. `enter` runs first on the new thread (e.g. to enter the
    /// underlay's network namespace); the uplinks are bound after it.
    pub fn spawn(
        config: DatapathConfig,
        enter: impl FnOnce() -> Result<(), Error> + Send + 'static,
    ) -> Result<DatapathThread, Error> {
        let wake = std::sync::Arc::new(
            EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(|e| nix_err("eventfd", e))?,
        );
        let (tx, rx) = mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), Error>>();
        let wake2 = wake.clone();
        let thread = std::thread::Builder::new()
            .name("vswitch-datapath".into())
            .spawn(move || {
                let setup = enter().and_then(|()| {
                    let dp = Datapath::new(&config)?;
                    dp.epoll
                        .add(&*wake2, EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_CONTROL))
                        .map_err(|e| nix_err("epoll_ctl eventfd", e))?;
                    Ok(dp)
                });
                let mut dp = match setup {
                    Ok(dp) => {
                        let _ = ready_tx.send(Ok(()));
                        dp
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                loop {
                    let fired = match dp.poll(Duration::from_millis(500), Some(&wake2)) {
                        Ok((_, fired)) => fired,
                        Err(_) => {
                            // epoll itself failed: do not spin; keep serving commands.
                            std::thread::sleep(Duration::from_millis(10));
                            true
                        }
                    };
                    if fired {
                        loop {
                            match rx.try_recv() {
                                Ok(cmd) => cmd(&mut dp),
                                Err(mpsc::TryRecvError::Empty) => break,
                                Err(mpsc::TryRecvError::Disconnected) => return,
                            }
                        }
                    }
                }
            })
            .map_err(|e| Error::Io("spawn datapath thread".into(), e))?;
        ready_rx
            .recv()
            .map_err(|_| Error::invalid("datapath", "thread died during setup"))??;
        Ok(DatapathThread {
            commands: tx,
            wake,
            thread: Some(thread),
        })
    }

    /// Runs `f` on the datapath thread between bursts and returns its result.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Datapath) -> R + Send + 'static,
    ) -> Result<R, Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.commands
            .send(Box::new(move |dp: &mut Datapath| {
                let _ = tx.send(f(dp));
            }))
            .map_err(|_| Error::invalid("datapath", "thread is gone"))?;
        self.wake
            .write(1)
            .map_err(|e| nix_err("eventfd write", e))?;
        rx.recv()
            .map_err(|_| Error::invalid("datapath", "thread is gone"))
    }
}

impl Drop for DatapathThread {
    fn drop(&mut self) {
        // Closing the command channel and waking the thread makes it return.
        let (dead, _) = mpsc::channel();
        self.commands = dead;
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
