//! An in-process tenant host on the overlay: a `smoltcp` interface whose Ethernet frames travel
//! through overlay-net's VXLAN encapsulation over a [`Transport`].
//!
//! It answers ARP and ICMP echo (smoltcp does), runs a TCP "collect and echo back" service
//! (read everything until the peer half-closes, record its length and CRC-32, send it all
//! back, close), records ICMP echo replies it sees, and counts frames it drops because they
//! belong to another VNI or are not valid VXLAN.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use etherparse::{Icmpv4Type, SlicedPacket, TransportSlice};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use overlay_net::{MacAddr, Vni};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};

use crate::Error;
use crate::transport::{Received, Transport};

/// Addressing of the smoltcp host.
#[derive(Clone, Copy, Debug)]
pub struct HostConfig {
    /// The tenant the host lives in.
    pub vni: Vni,
    /// The host's MAC address.
    pub mac: MacAddr,
    /// The host's IPv4 address.
    pub ip: std::net::Ipv4Addr,
    /// Prefix length of its subnet.
    pub prefix_len: u8,
    /// L3 MTU of the tenant network (underlay MTU minus VXLAN overhead).
    pub mtu: u16,
    /// TCP port of the collect-and-echo service.
    pub echo_port: u16,
}

/// Counters of the host's datapath.
#[derive(Debug, Default)]
pub struct HostCounters {
    /// Inner frames of our VNI delivered to smoltcp.
    pub rx_frames: AtomicU64,
    /// Frames encapsulated and sent.
    pub tx_frames: AtomicU64,
    /// Valid VXLAN frames dropped because they belong to another VNI.
    pub rx_foreign_vni: AtomicU64,
    /// Datagrams or frames that claim to be VXLAN for us but are invalid (bad checksum,
    /// truncated, I flag clear...).
    pub rx_invalid: AtomicU64,
    /// Other traffic seen on the underlay interface (not VXLAN for this VTEP).
    pub rx_other: AtomicU64,
    /// Sends that failed (e.g. a frame above the underlay MTU).
    pub tx_errors: AtomicU64,
}

/// One completed TCP transfer seen by the echo service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes received.
    pub bytes: usize,
    /// CRC-32 (IEEE) of the bytes received.
    pub crc32: u32,
}

#[derive(Default)]
struct Shared {
    counters: HostCounters,
    transfers: Mutex<Vec<Transfer>>,
    echo_replies: Mutex<Vec<(u16, u16)>>,
    inject: Mutex<Vec<(Vni, Vec<u8>)>>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running overlay host (its event loop runs on its own thread until dropped).
pub struct OverlayHost {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<(), Error>>>,
}

impl OverlayHost {
    /// Starts the host on `transport`.
    pub fn spawn(transport: Transport, cfg: HostConfig) -> OverlayHost {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("overlay-host".into())
            .spawn(move || run(transport, cfg, &s))
            .ok();
        OverlayHost { shared, thread }
    }

    /// Sends a raw inner frame in `vni` (any VNI, for isolation tests).
    pub fn inject(&self, vni: Vni, frame: Vec<u8>) {
        lock(&self.shared.inject).push((vni, frame));
    }

    /// The host's counters.
    pub fn counters(&self) -> &HostCounters {
        &self.shared.counters
    }

    /// Transfers the echo service completed so far.
    pub fn transfers(&self) -> Vec<Transfer> {
        lock(&self.shared.transfers).clone()
    }

    /// `(identifier, sequence)` of every ICMP echo reply received in the host's VNI.
    pub fn echo_replies(&self) -> Vec<(u16, u16)> {
        lock(&self.shared.echo_replies).clone()
    }

    /// Stops the event loop and reports how it ended.
    pub fn stop(mut self) -> Result<(), Error> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), Error> {
        self.shared.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| Error::Setup("overlay host thread panicked".into()))?,
            None => Err(Error::Setup("overlay host thread did not start".into())),
        }
    }
}

impl Drop for OverlayHost {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.shutdown();
        }
    }
}

/// The smoltcp device: frames in and out of the VXLAN transport.
struct OverlayDevice<'a> {
    transport: &'a Transport,
    vni: Vni,
    mtu: u16,
    rx: Vec<u8>,
    tx: Vec<u8>,
    shared: &'a Shared,
    /// Segments of a TCP super-frame still to hand to smoltcp, and the one handed now.
    segments: std::collections::VecDeque<Vec<u8>>,
    segment: Vec<u8>,
}

/// What a NIC's receive path would hand the stack for an inner frame as it came off the
/// underlay: a partial TCP/UDP checksum finished, a TCP super-frame (a kernel peer's
/// tunnel GSO) cut into MTU-sized segments (queued in `segments`; `false` then).
fn as_a_nic_would(
    frame: &mut [u8],
    mtu: u16,
    segments: &mut std::collections::VecDeque<Vec<u8>>,
) -> bool {
    if frame.len() <= usize::from(mtu) + 18 {
        overlay_net::gso::finish_partial_checksum(frame);
        return true;
    }
    let Ok(c) = overlay_net::gso::prepare_tcp_super_frame(frame, usize::from(mtu)) else {
        return true; // oversize: smoltcp drops it
    };
    let Ok(mut cut) = overlay_net::gso::TcpSegmenter::new(frame, usize::from(c.segment_size))
    else {
        return true;
    };
    let mut buf = vec![0u8; cut.max_segment_len()];
    while let Some(Ok(n)) = cut.next_into(&mut buf) {
        segments.push_back(buf[..n].to_vec());
    }
    false
}

impl OverlayDevice<'_> {
    fn send(&mut self, vni: Vni, inner: &[u8]) {
        let h = self.transport.headroom();
        if self.tx.len() < h + inner.len() {
            self.tx.resize(h + inner.len(), 0);
        }
        self.tx[h..h + inner.len()].copy_from_slice(inner);
        let c = &self.shared.counters;
        match self.transport.send(vni, &mut self.tx, inner.len()) {
            Ok(()) => c.tx_frames.fetch_add(1, Ordering::Relaxed),
            Err(_) => c.tx_errors.fetch_add(1, Ordering::Relaxed),
        };
    }
}

fn note_echo_reply(shared: &Shared, frame: &[u8]) {
    if let Ok(p) = SlicedPacket::from_ethernet(frame)
        && let Some(TransportSlice::Icmpv4(icmp)) = p.transport
        && let Icmpv4Type::EchoReply(echo) = icmp.icmp_type()
    {
        lock(&shared.echo_replies).push((echo.id, echo.seq));
    }
}

struct RxToken<'a>(&'a [u8]);

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

struct TxToken<'a> {
    transport: &'a Transport,
    vni: Vni,
    tx: &'a mut Vec<u8>,
    shared: &'a Shared,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let h = self.transport.headroom();
        if self.tx.len() < h + len {
            self.tx.resize(h + len, 0);
        }
        let result = f(&mut self.tx[h..h + len]);
        let c = &self.shared.counters;
        match self.transport.send(self.vni, self.tx, len) {
            Ok(()) => c.tx_frames.fetch_add(1, Ordering::Relaxed),
            Err(_) => c.tx_errors.fetch_add(1, Ordering::Relaxed),
        };
        result
    }
}

impl Device for OverlayDevice<'_> {
    type RxToken<'a>
        = RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _ts: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let c = &self.shared.counters;
        if let Some(segment) = self.segments.pop_front() {
            self.segment = segment;
            c.rx_frames.fetch_add(1, Ordering::Relaxed);
            let tx = TxToken {
                transport: self.transport,
                vni: self.vni,
                tx: &mut self.tx,
                shared: self.shared,
            };
            return Some((RxToken(&self.segment), tx));
        }
        let range = loop {
            match self.transport.recv(&mut self.rx) {
                Ok(None) | Err(_) => return None,
                Ok(Some(Received::Rejected(e))) if e.is_other_traffic() => {
                    c.rx_other.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(Received::Rejected(_))) => {
                    c.rx_invalid.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(Received::Frame(vni, _))) if vni != self.vni => {
                    c.rx_foreign_vni.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(Received::Frame(_, range))) => {
                    if as_a_nic_would(&mut self.rx[range.clone()], self.mtu, &mut self.segments) {
                        break range;
                    }
                    if let Some(segment) = self.segments.pop_front() {
                        self.segment = segment;
                        break 0..0;
                    }
                }
            }
        };
        c.rx_frames.fetch_add(1, Ordering::Relaxed);
        let frame = if range.is_empty() {
            &self.segment[..]
        } else {
            &self.rx[range]
        };
        note_echo_reply(self.shared, frame);
        let tx = TxToken {
            transport: self.transport,
            vni: self.vni,
            tx: &mut self.tx,
            shared: self.shared,
        };
        Some((RxToken(frame), tx))
    }

    fn transmit(&mut self, _ts: Instant) -> Option<Self::TxToken<'_>> {
        Some(TxToken {
            transport: self.transport,
            vni: self.vni,
            tx: &mut self.tx,
            shared: self.shared,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        // smoltcp counts the Ethernet header in the MTU of an Ethernet device.
        caps.max_transmission_unit = self.mtu as usize + 14;
        caps.checksum = ChecksumCapabilities::default();
        caps
    }
}

/// Largest transfer the echo service keeps in memory.
const MAX_TRANSFER: usize = 64 << 20;

/// The TCP collect-and-echo service.
#[derive(Default)]
struct EchoService {
    data: Vec<u8>,
    sent: usize,
    sending: bool,
}

impl EchoService {
    fn step(&mut self, sock: &mut tcp::Socket<'_>, port: u16, shared: &Shared) {
        if !sock.is_open() {
            *self = EchoService::default();
            let _ = sock.listen(port);
            return;
        }
        while sock.can_recv() {
            let got = sock.recv(|buf| {
                self.data.extend_from_slice(buf);
                (buf.len(), buf.len())
            });
            if got.unwrap_or(0) == 0 {
                break;
            }
        }
        if self.data.len() > MAX_TRANSFER {
            sock.abort();
            return;
        }
        if !self.sending && sock.state() == tcp::State::CloseWait && !sock.may_recv() {
            self.sending = true;
            lock(&shared.transfers).push(Transfer {
                bytes: self.data.len(),
                crc32: crc32fast::hash(&self.data),
            });
        }
        if self.sending {
            while self.sent < self.data.len() && sock.can_send() {
                match sock.send_slice(&self.data[self.sent..]) {
                    Ok(n) if n > 0 => self.sent += n,
                    _ => break,
                }
            }
            if self.sent == self.data.len() && sock.state() == tcp::State::CloseWait {
                sock.close();
            }
        }
    }
}

fn run(transport: Transport, cfg: HostConfig, shared: &Shared) -> Result<(), Error> {
    let mut device = OverlayDevice {
        transport: &transport,
        vni: cfg.vni,
        mtu: cfg.mtu,
        rx: vec![0u8; 65536],
        tx: vec![0u8; 4096],
        shared,
        segments: Default::default(),
        segment: Vec::new(),
    };
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(cfg.mac.0)));
    config.random_seed = u64::from(std::process::id()) << 32 | u64::from(cfg.vni.get());
    let mut iface = Interface::new(config, &mut device, Instant::now());
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(cfg.ip.into(), cfg.prefix_len));
    });
    let mut sockets = SocketSet::new(vec![]);
    let tcp_socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 256 * 1024]),
        tcp::SocketBuffer::new(vec![0; 256 * 1024]),
    );
    let handle = sockets.add(tcp_socket);
    let mut echo = EchoService::default();
    while !shared.stop.load(Ordering::Relaxed) {
        let injected = std::mem::take(&mut *lock(&shared.inject));
        for (vni, frame) in injected {
            device.send(vni, &frame);
        }
        let now = Instant::now();
        iface.poll(now, &mut device, &mut sockets);
        echo.step(
            sockets.get_mut::<tcp::Socket>(handle),
            cfg.echo_port,
            shared,
        );
        iface.poll(now, &mut device, &mut sockets);
        let delay_ms = iface
            .poll_delay(Instant::now(), &sockets)
            .map_or(20, |d| d.total_millis())
            .min(20) as u16;
        let fd = transport.fd();
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(delay_ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(Error::Io("poll".into(), e.into())),
        }
    }
    Ok(())
}
