//! The worker loop: a burst read from a port or an uplink, forwarded under the lock,
//! written without it.

use super::*;
use overlay_net::MacAddr;
use overlay_net::frame::build_neighbor_reply;

/// Where one copy of a frame goes, resolved under the lock.
#[derive(Clone, Copy)]
enum Target {
    /// A local port: its index in the burst's [`BurstPorts`].
    Local(usize),
    /// A remote VTEP and the UDP port it listens on (0: this host's VXLAN port).
    Remote(IpAddr, u16),
    /// An ARP reply or neighbor advertisement with this MAC, to the local port (index in
    /// [`BurstPorts`]) that asked.
    Answer(usize, MacAddr),
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
pub(super) struct Worker {
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
    /// Frames of a burst bound for guests: (index in `ports`, index in `pending` or of the
    /// uplink datagram).
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
        Verdict::Answer(mac) => {
            if let Ingress::Port(q) = from {
                match ports.index(q, endpoints) {
                    Some(i) => out.push(Target::Answer(i, mac)),
                    None => tenant.count_drop(Some(q), DropReason::TxError),
                }
            }
        }
        Verdict::Drop(_) => {}
    }
}

impl Worker {
    /// A worker with its descriptors, and buffers for bursts of [`BATCH`] frames.
    pub(super) fn new(
        index: usize,
        shared: Arc<Mutex<Datapath>>,
        epoll: Arc<Epoll>,
        stats: Arc<WorkerStats>,
        uplinks: Vec<Uplink>,
        epoch: Instant,
    ) -> Worker {
        Worker {
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
            vhost_out: Vec::with_capacity(8 * BATCH),
            flood: Vec::with_capacity(64),
            tally: Tally {
                events: Vec::with_capacity(4 * BATCH),
            },
            scratch: vec![0u8; 65536].into_boxed_slice(),
            gro: TcpCoalescer::new(),
        }
    }

    fn now(&self) -> Nanos {
        self.epoch.elapsed().as_nanos() as Nanos
    }

    /// Serves events until told to stop. Worker 0 also runs configuration commands.
    pub(super) fn run(
        mut self,
        wake: &EventFd,
        stop: &AtomicBool,
        commands: Option<mpsc::Receiver<Command>>,
    ) {
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
                    t if t >= TOKEN_UPLINK_XDP => {
                        self.on_uplink((t - TOKEN_UPLINK_XDP) as usize, true)
                    }
                    t if t >= TOKEN_UPLINK => self.on_uplink((t - TOKEN_UPLINK) as usize, false),
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
    /// Serves one burst of a local port (a TAP, or one queue pair of a guest): read, decide
    /// under the lock, send without it, count under it. Returns the frames taken and whether
    /// more are waiting.
    fn on_tap(&mut self, port: PortId, pair: usize, kicked: bool, poll: bool) -> (usize, bool) {
        let (tap, vni) = {
            let s = lock(&self.shared);
            (s.endpoints.get(&port).cloned(), s.switch.port_vni(port))
        };
        let (Some(tap), Some(vni)) = (tap, vni) else {
            return (0, false);
        };
        let now = self.now();
        let (taken, more) = self.read_port_burst(&tap, port, vni, pair, kicked, poll);
        self.decide_port_burst(port, vni, now);
        self.send_port_burst(port, vni);
        if !self.tally.events.is_empty() {
            self.tally.apply(&mut lock(&self.shared).switch);
        }
        (taken, more)
    }

    /// Step 1 of a port's burst: reads up to [`BATCH`] frames into `frames` and checks their
    /// offload metadata; what passes is in `pending`.
    fn read_port_burst(
        &mut self,
        tap: &Endpoint,
        port: PortId,
        vni: Vni,
        pair: usize,
        kicked: bool,
        poll: bool,
    ) -> (usize, bool) {
        let Worker {
            stats,
            frames,
            pending,
            tally,
            epoll,
            ..
        } = self;
        pending.clear();
        let mut spans = [(0usize, 0usize); BATCH];
        let (taken, more) = match tap {
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
        (taken, more)
    }

    /// Step 2 of a port's burst, under the lock: the forwarding decision of each pending
    /// frame, as a range of `targets` in `decisions` (what step 1 and earlier sends counted
    /// is applied first).
    fn decide_port_burst(&mut self, port: PortId, vni: Vni, now: Nanos) {
        let Worker {
            shared,
            frames,
            pending,
            decisions,
            targets,
            ports,
            flood,
            tally,
            ..
        } = self;
        decisions.clear();
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

    /// Step 3 of a port's burst, without the lock: each frame to its targets (guests that
    /// take it as it is get theirs together, one ring lock each), the uplinks flushed.
    fn send_port_burst(&mut self, port: PortId, vni: Vni) {
        // The worker's index picks a guest's receive queue: workers fill different queues.
        let lane = self.index;
        let Worker {
            stats,
            uplinks,
            frames,
            pending,
            decisions,
            targets,
            ports,
            tally,
            scratch,
            vhost_out,
            ..
        } = self;
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
                    Target::Answer(k, mac) => {
                        let (q, ep) = ports.get(k);
                        let mut reply = [0u8; 128];
                        if let Ok(n) = build_neighbor_reply(&mut reply, frame, mac) {
                            send_local(tally, lane, vni, q, ep, Payload::Plain(&reply[..n]));
                        }
                    }
                }
            }
        }
        deliver_to_guests(vhost_out, ports, pending, frames, tally, lane, vni);
        ports.end_burst();
        targets.clear();
        let mut tx_dropped = 0;
        let mut xdp_sent = 0;
        for up in uplinks.iter_mut() {
            up.flush();
            tx_dropped += up.tx_dropped();
            xdp_sent += up.xdp_counts().1;
        }
        stats.uplink_tx_dropped.store(tx_dropped, Ordering::Relaxed);
        stats.uplink_xdp_sent.store(xdp_sent, Ordering::Relaxed);
    }

    /// A batch from uplink `index`: from its AF_XDP socket (`xdp`) or its UDP socket.
    fn on_uplink(&mut self, index: usize, xdp: bool) {
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
            vhost_out,
            ..
        } = self;
        let Some(up) = uplinks.get_mut(index) else {
            return;
        };
        let n = if xdp {
            let n = up.recv_xdp_batch();
            stats
                .uplink_xdp_received
                .fetch_add(n as u64, Ordering::Relaxed);
            n
        } else {
            up.recv_batch().unwrap_or(0)
        };
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
                deliver_uplink_run(vhost_out, ports, up, tally, lane);
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
                    // Frames for guests before it go first (each port's frames in order).
                    deliver_uplink_run(vhost_out, ports, up, tally, lane);
                    gro_dest = Some((vni, q, tap.clone()));
                    continue;
                }
                if matches!(tap, Endpoint::Vhost(_)) {
                    // One guest's frames go in as a run: one ring update and one
                    // notification for all of them, not one per frame.
                    vhost_out.push((*k, i));
                    continue;
                }
            } else {
                flush_gro(gro, &mut gro_dest, tally, lane);
            }
            deliver_uplink_run(vhost_out, ports, up, tally, lane);
            for target in dests {
                if let Target::Local(k) = *target {
                    let (q, tap) = ports.get(k);
                    send_local(tally, lane, vni, q, tap, Payload::Plain(inner));
                }
            }
        }
        flush_gro(gro, &mut gro_dest, tally, lane);
        deliver_uplink_run(vhost_out, ports, up, tally, lane);
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

/// Writes plain frames of an uplink batch bound for guests (`run`: index in `ports`, index of
/// the datagram), each guest's under one lock, in the order they came; counts them.
fn deliver_uplink_run(
    run: &mut Vec<(usize, usize)>,
    ports: &BurstPorts,
    up: &Uplink,
    tally: &mut Tally,
    lane: usize,
) {
    const PLAIN: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];
    if run.is_empty() {
        return;
    }
    // Stable: each guest's frames stay in order.
    if !run.is_sorted_by_key(|&(k, _)| k) {
        run.sort_by_key(|&(k, _)| k);
    }
    let inner = |i: usize| match up.datagram(i) {
        Some((Ok((vni, inner)), _)) => Some((vni, inner)),
        _ => None,
    };
    for group in run.chunk_by(|a, b| a.0 == b.0) {
        let (q, Endpoint::Vhost(v)) = ports.get(group[0].0) else {
            continue;
        };
        let mut frames = group.iter().filter_map(|&(_, i)| inner(i));
        let mut counted = frames.clone();
        v.deliver_burst(lane, frames.by_ref().map(|(_, f)| (&PLAIN, f)), |result| {
            let Some((vni, f)) = counted.next() else {
                return;
            };
            match result {
                Ok(()) => tally.tx(vni, q, f.len()),
                Err(e) => tally.drop(vni, Some(q), send_failure(&e)),
            }
        });
    }
    run.clear();
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
