//! Embeds libvirtual's switch in a process — no root, no daemon, no kernel interface: one
//! tenant with two ports and a smoltcp host behind each, which exchange 1 MiB over TCP through
//! the switch's forwarding core (MAC learning, flooding of the first ARP, unicast after); a
//! third host, on another tenant with the server's address, never sees a frame of theirs.
//!
//! `cargo run -p libvirtual --example embedded_switch`

use std::collections::VecDeque;

use libvirtual::overlay_net::Vni;
use libvirtual::overlay_net::fdb::{Destination, PortId, TenantLimits};
use libvirtual::vswitch::{Ingress, PortConfig, Switch, TenantConfig, Verdict};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

/// Bytes the client sends.
const TRANSFER: usize = 1 << 20;
/// The server's TCP port.
const PORT: u16 = 7;

/// A host's network card: frames the switch delivered to it, frames it sent.
#[derive(Default)]
struct Nic {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let result = f(&mut frame);
        self.0.push_back(frame);
        result
    }
}

impl Device for Nic {
    type RxToken<'a>
        = Rx
    where
        Self: 'a;
    type TxToken<'a>
        = Tx<'a>
    where
        Self: 'a;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514; // the tenant's MTU of 1500 + Ethernet header
        caps
    }
}

/// A smoltcp host attached to a switch port.
struct Host {
    port: PortId,
    nic: Nic,
    iface: Interface,
    sockets: SocketSet<'static>,
    tcp: SocketHandle,
}

impl Host {
    fn new(port: PortId, mac: u8, ip: Ipv4Address) -> Host {
        let mut nic = Nic::default();
        let hw = HardwareAddress::Ethernet(EthernetAddress([0x02, 0, 0, 0, 0, mac]));
        let mut iface = Interface::new(Config::new(hw), &mut nic, Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(ip.into(), 24));
        });
        let mut sockets = SocketSet::new(Vec::new());
        let tcp = sockets.add(tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 64 << 10]),
            tcp::SocketBuffer::new(vec![0; 64 << 10]),
        ));
        Host {
            port,
            nic,
            iface,
            sockets,
            tcp,
        }
    }

    fn poll(&mut self, now: Instant) {
        self.iface.poll(now, &mut self.nic, &mut self.sockets);
    }

    fn socket(&mut self) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.tcp)
    }
}

/// Byte `i` of the transfer.
fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut switch = Switch::new();
    for (name, vni) in [("a", 100), ("b", 200)] {
        switch.add_tenant(TenantConfig {
            name: name.into(),
            vni: Vni::new(vni)?,
            mtu: 1500,
            limits: TenantLimits::default(),
            learn_vteps: false,
        })?;
    }
    let server_ip = Ipv4Address::new(10, 0, 0, 1);
    let mut hosts = [
        Host::new(switch.add_port("a", PortConfig::new("a1"))?, 1, server_ip),
        Host::new(
            switch.add_port("a", PortConfig::new("a2"))?,
            2,
            Ipv4Address::new(10, 0, 0, 2),
        ),
        // Another tenant, the same address as the server.
        Host::new(switch.add_port("b", PortConfig::new("b1"))?, 3, server_ip),
    ];
    let other_tenant = hosts[2].port;
    hosts[0].socket().listen(PORT)?;
    let mut sent = 0usize;
    let mut received = 0usize;
    let mut corrupt = 0usize;
    let mut frames_to_b = 0usize;
    let mut connected = false;
    // Simulated time: a millisecond per round (smoltcp's timers run on it).
    for ms in 0..60_000u64 {
        let now = Instant::from_millis(ms as i64);
        for h in hosts.iter_mut() {
            h.poll(now);
        }
        // The client connects once, then sends what fits; the server reads and checks.
        let client = &mut hosts[1];
        if !connected {
            let cx = client.iface.context();
            client.sockets.get_mut::<tcp::Socket>(client.tcp).connect(
                cx,
                (server_ip, PORT),
                49152,
            )?;
            connected = true;
        }
        let sock = client.socket();
        while sent < TRANSFER && sock.can_send() {
            let n = sock.send(|buf| {
                let n = buf.len().min(TRANSFER - sent);
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    *b = pattern(sent + i);
                }
                (n, n)
            })?;
            sent += n;
            if n == 0 {
                break;
            }
        }
        let sock = hosts[0].socket();
        while sock.can_recv() {
            sock.recv(|buf| {
                corrupt += buf
                    .iter()
                    .enumerate()
                    .filter(|(i, b)| **b != pattern(received + i))
                    .count();
                received += buf.len();
                (buf.len(), ())
            })?;
        }
        if received == TRANSFER {
            break;
        }
        // The switch: every frame a host sent goes through the tenant's forwarding decision.
        let nanos = ms * 1_000_000;
        for from in 0..hosts.len() {
            while let Some(frame) = hosts[from].nic.tx.pop_front() {
                let port = hosts[from].port;
                let (vni, verdict) = switch.ingress_port(port, &frame, nanos);
                let targets: Vec<PortId> = match verdict {
                    Verdict::Unicast(Destination::Local(p)) => vec![p],
                    Verdict::Flood => vni
                        .and_then(|v| switch.tenant_by_vni(v))
                        .map(|t| {
                            t.flood_targets(Ingress::Port(port))
                                .filter_map(|d| match d {
                                    Destination::Local(p) => Some(p),
                                    Destination::Remote(_) => None,
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    // An ARP request the switch answers itself (ARP suppression, with addresses
                    // set by `TenantSwitch::set_neighbors`): the reply goes back to the asker.
                    Verdict::Answer(mac) => {
                        let mut reply = [0u8; 64];
                        if let Ok(n) =
                            libvirtual::overlay_net::frame::build_arp_reply(&mut reply, &frame, mac)
                        {
                            hosts[from].nic.rx.push_back(reply[..n].to_vec());
                        }
                        Vec::new()
                    }
                    Verdict::Unicast(Destination::Remote(_)) | Verdict::Drop(_) => Vec::new(),
                };
                for p in targets {
                    let Some(to) = hosts.iter_mut().find(|h| h.port == p) else {
                        continue;
                    };
                    if p == other_tenant {
                        frames_to_b += 1;
                    }
                    if let Some(t) = vni.and_then(|v| switch.tenant_by_vni_mut(v)) {
                        t.count_tx(p, frame.len());
                    }
                    to.nic.rx.push_back(frame.clone());
                }
            }
        }
    }
    let tenant = switch.tenant("a").ok_or("tenant a")?;
    println!("sent {sent} bytes, received {received}, corrupt {corrupt}");
    for (id, config) in tenant.ports() {
        if let Some((_, c)) = tenant.port(id) {
            println!(
                "port {:<3} rx {:>5} frames {:>8} bytes   tx {:>5} frames {:>8} bytes",
                config.name, c.rx_packets, c.rx_bytes, c.tx_packets, c.tx_bytes
            );
        }
    }
    println!("frames delivered to tenant b: {frames_to_b}");
    if received != TRANSFER || corrupt != 0 || frames_to_b != 0 {
        return Err("the transfer failed or crossed tenants".into());
    }
    Ok(())
}
