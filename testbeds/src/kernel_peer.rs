//! Interop with the Linux kernel's VXLAN: the bed and the scenario.
//!
//! ```text
//!  netns t (10.42.0.1/24)   netns t43 (10.42.0.1/24, VNI 43)
//!        eth0                     eth0
//!         |  veth                  |  veth
//!  +------+--------- netns k ------+--------+          netns u
//!  |    br42 -- vx42 (VNI 42)   br43 -- vx43 (VNI 43)  |
//!  |              \ dstport 4789 /                     |
//!  |                    ul0  ---------- veth ---------- ul0  userspace VTEP (overlay-net)
//!  +---------------------------------------------------+      + smoltcp host 10.42.0.2
//! ```
//! The underlay is IPv4 (198.18.42.0/24) or IPv6 (fd42::/64). The userspace VTEP reaches it
//! through a UDP socket or an `AF_PACKET` socket ([`TransportKind`]). The underlay veth keeps
//! the kernel's default offloads: the kernel hands partial checksums and tunnel-GSO
//! super-frames to it, which the userspace VTEP finishes and cuts as a NIC driver would.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use overlay_net::{MacAddr, TunnelConfig, UnderlayFamily, VXLAN_PORT, Vni, mtu};

use crate::Error;
use crate::netns::Netns;
use crate::overlay_host::{HostConfig, OverlayHost, Transfer};
use crate::probe::{PingResult, pattern, ping};
use crate::transport::{Transport, TransportKind};

const K_UNDERLAY_MAC: MacAddr = MacAddr([0x02, 0x4c, 0x56, 0, 0, 0x01]);
const U_UNDERLAY_MAC: MacAddr = MacAddr([0x02, 0x4c, 0x56, 0, 0, 0x02]);
const TENANT_MAC: MacAddr = MacAddr([0x02, 0x4c, 0x56, 0, 0x42, 0x01]);
const OTHER_TENANT_MAC: MacAddr = MacAddr([0x02, 0x4c, 0x56, 0, 0x43, 0x01]);
const HOST_MAC: MacAddr = MacAddr([0x02, 0x4c, 0x56, 0, 0x42, 0x02]);
const TENANT_IP: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 1);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 2);
const ECHO_PORT: u16 = 7000;
const UNDERLAY_MTU: u16 = 1500;

/// The tenant VNI of the bed.
pub const VNI: u32 = 42;
/// The other tenant's VNI, which must stay invisible to VNI 42.
pub const OTHER_VNI: u32 = 43;

fn vni(n: u32) -> Vni {
    Vni::new(n).unwrap_or_else(|_| unreachable!("constant VNIs fit in 24 bits"))
}

/// The running bed: four namespaces, the kernel VXLAN config and the userspace VTEP.
pub struct KernelPeerBed {
    // Field order is drop order: stop the host before its namespaces go.
    host: OverlayHost,
    family: UnderlayFamily,
    kind: TransportKind,
    inner_mtu: u16,
    k: Netns,
    t: Netns,
    t43: Netns,
    _u: Netns,
}

/// Result of a TCP collect-and-echo transfer from the kernel tenant to the smoltcp host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpReport {
    /// Bytes sent (and echoed back).
    pub bytes: usize,
    /// CRC-32 of the bytes the client sent.
    pub client_crc32: u32,
    /// CRC-32 the smoltcp host computed over what it received.
    pub host_crc32: Option<u32>,
    /// The echoed bytes equal the sent bytes.
    pub echo_matches: bool,
    /// Wall time of connect, send, echo and close.
    pub elapsed: Duration,
}

impl KernelPeerBed {
    /// Builds the bed and starts the userspace VTEP.
    pub fn new(family: UnderlayFamily, kind: TransportKind) -> Result<KernelPeerBed, Error> {
        let inner_mtu = mtu::inner_mtu(UNDERLAY_MTU, family)
            .ok_or_else(|| Error::Setup("underlay MTU too small".into()))?;
        let (k_ip, u_ip, plen): (IpAddr, IpAddr, u8) = match family {
            UnderlayFamily::V4 => (
                Ipv4Addr::new(198, 18, 42, 1).into(),
                Ipv4Addr::new(198, 18, 42, 2).into(),
                24,
            ),
            UnderlayFamily::V6 => (
                Ipv6Addr::new(0xfd42, 0, 0, 0, 0, 0, 0, 1).into(),
                Ipv6Addr::new(0xfd42, 0, 0, 0, 0, 0, 0, 2).into(),
                64,
            ),
        };
        let k = Netns::create("k")?;
        let u = Netns::create("u")?;
        let t = Netns::create("t")?;
        let t43 = Netns::create("t43")?;

        // Underlay wire between the kernel VTEP and the userspace VTEP.
        let (kmac, umac) = (K_UNDERLAY_MAC.to_string(), U_UNDERLAY_MAC.to_string());
        k.ip(&[
            "link",
            "add",
            "name",
            "ul0",
            "address",
            &kmac,
            "type",
            "veth",
            "peer",
            "name",
            "ul0",
            "address",
            &umac,
            "netns",
            u.name(),
        ])?;
        let k_cidr = format!("{k_ip}/{plen}");
        let mut addr_args = vec!["addr", "add", &k_cidr, "dev", "ul0"];
        if family == UnderlayFamily::V6 {
            addr_args.push("nodad");
        }
        k.ip(&addr_args)?;
        // The links keep the kernel's defaults: the kernel peer hands partial checksums and
        // tunnel-GSO super-frames to the veth, and the userspace VTEP takes them as they come.
        k.ip(&["link", "set", "ul0", "up"])?;
        u.ip(&["link", "set", "ul0", "up"])?;
        match kind {
            TransportKind::Udp => {
                let u_cidr = format!("{u_ip}/{plen}");
                let mut args = vec!["addr", "add", &u_cidr, "dev", "ul0"];
                if family == UnderlayFamily::V6 {
                    args.push("nodad");
                }
                u.ip(&args)?;
            }
            TransportKind::Raw => {
                // The userspace VTEP answers no ARP/ND: the kernel gets a static neighbour.
                let u_addr = u_ip.to_string();
                k.ip(&[
                    "neigh",
                    "replace",
                    &u_addr,
                    "lladdr",
                    &umac,
                    "dev",
                    "ul0",
                    "nud",
                    "permanent",
                ])?;
            }
        }

        // Kernel VTEP: one vxlan device and bridge per tenant, a veth into each tenant netns.
        let (local, remote) = (k_ip.to_string(), u_ip.to_string());
        let mtu_s = inner_mtu.to_string();
        for (n, tenant, mac) in [(VNI, &t, TENANT_MAC), (OTHER_VNI, &t43, OTHER_TENANT_MAC)] {
            let (vx, br, port) = (format!("vx{n}"), format!("br{n}"), format!("t{n}"));
            let id = n.to_string();
            let port_s = VXLAN_PORT.to_string();
            k.ip(&[
                "link", "add", "name", &vx, "type", "vxlan", "id", &id, "dstport", &port_s,
                "local", &local, "remote", &remote, "dev", "ul0",
            ])?;
            k.ip(&["link", "add", "name", &br, "type", "bridge"])?;
            k.ip(&[
                "link",
                "add",
                "name",
                &port,
                "mtu",
                &mtu_s,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "address",
                &mac.to_string(),
                "mtu",
                &mtu_s,
                "netns",
                tenant.name(),
            ])?;
            for dev in [&vx, &port] {
                k.ip(&["link", "set", dev, "master", &br])?;
                k.ip(&["link", "set", dev, "up"])?;
            }
            k.ip(&["link", "set", &br, "up"])?;
            tenant.ip(&["addr", "add", &format!("{TENANT_IP}/24"), "dev", "eth0"])?;
            tenant.ip(&["link", "set", "eth0", "up"])?;
        }

        let transport = match kind {
            TransportKind::Udp => {
                let (l, p) = (
                    SocketAddr::new(u_ip, VXLAN_PORT),
                    SocketAddr::new(k_ip, VXLAN_PORT),
                );
                u.enter(move || Transport::udp(l, p))?
            }
            TransportKind::Raw => {
                let tunnel = TunnelConfig {
                    underlay_mtu: UNDERLAY_MTU,
                    ..TunnelConfig::new(U_UNDERLAY_MAC, K_UNDERLAY_MAC, u_ip, k_ip)
                };
                u.enter(move || Transport::raw("ul0", &tunnel))?
            }
        };
        let host = OverlayHost::spawn(
            transport,
            HostConfig {
                vni: vni(VNI),
                mac: HOST_MAC,
                ip: HOST_IP,
                prefix_len: 24,
                mtu: inner_mtu,
                echo_port: ECHO_PORT,
            },
        );
        Ok(KernelPeerBed {
            host,
            family,
            kind,
            inner_mtu,
            k,
            t,
            t43,
            _u: u,
        })
    }

    /// Underlay family.
    pub fn family(&self) -> UnderlayFamily {
        self.family
    }

    /// Transport of the userspace VTEP.
    pub fn kind(&self) -> TransportKind {
        self.kind
    }

    /// Tenant MTU that overlay-net computed for the underlay.
    pub fn inner_mtu(&self) -> u16 {
        self.inner_mtu
    }

    /// The userspace host (counters, echo replies, injection).
    pub fn host(&self) -> &OverlayHost {
        &self.host
    }

    /// MTU the kernel chose for its VNI-42 vxlan device.
    pub fn kernel_vxlan_mtu(&self) -> Result<u16, Error> {
        let out = self.k.ip(&["-o", "link", "show", "dev", "vx42"])?;
        out.split_whitespace()
            .skip_while(|w| *w != "mtu")
            .nth(1)
            .and_then(|m| m.parse().ok())
            .ok_or_else(|| Error::Setup(format!("no MTU in `{out}`")))
    }

    /// `ping` from the VNI-42 tenant to the smoltcp host with ICMP payload `payload`, DF set.
    pub fn ping_from_tenant(&self, count: u32, payload: u16) -> Result<PingResult, Error> {
        ping(&self.t, HOST_IP.into(), count, payload)
    }

    /// The largest ICMP payload whose IPv4 packet fills the tenant MTU exactly.
    pub fn full_mtu_ping_payload(&self) -> u16 {
        self.inner_mtu - 20 - 8
    }

    /// `ping` from the VNI-43 tenant, which has the same address as the VNI-42 tenant.
    pub fn ping_from_other_tenant(&self, count: u32) -> Result<PingResult, Error> {
        ping(&self.t43, HOST_IP.into(), count, 56)
    }

    /// Sends `bytes` of pseudo-random data over TCP from the kernel tenant to the smoltcp
    /// host, which echoes them back after the half-close.
    pub fn tcp_echo(&self, bytes: usize) -> Result<TcpReport, Error> {
        let data = pattern(bytes);
        let client_crc32 = crc32fast::hash(&data);
        let addr = SocketAddr::new(HOST_IP.into(), ECHO_PORT);
        let sent = data.clone();
        let (echoed, elapsed) = self.t.enter(move || {
            let io = |what: &str| {
                let what = what.to_owned();
                move |e| Error::Io(what, e)
            };
            let start = Instant::now();
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(20))
                .map_err(io("connect"))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .map_err(io("timeout"))?;
            s.set_write_timeout(Some(Duration::from_secs(30)))
                .map_err(io("timeout"))?;
            s.write_all(&sent).map_err(io("send"))?;
            s.shutdown(Shutdown::Write).map_err(io("shutdown"))?;
            let mut back = Vec::with_capacity(sent.len());
            s.read_to_end(&mut back).map_err(io("receive echo"))?;
            Ok((back, start.elapsed()))
        })?;
        let host_crc32 = self
            .host
            .transfers()
            .iter()
            .rev()
            .find(|t: &&Transfer| t.bytes == bytes)
            .map(|t| t.crc32);
        Ok(TcpReport {
            bytes,
            client_crc32,
            host_crc32,
            echo_matches: echoed == data,
            elapsed,
        })
    }

    /// Makes the userspace host send an ICMP echo request (sequence `seq`) to the VNI-42
    /// tenant's MAC and address, encapsulated in `vni`. With VNI 43 the kernel must not
    /// deliver it to the VNI-42 tenant.
    pub fn inject_echo(&self, vni_n: u32, seq: u16) -> Result<(), Error> {
        let mut frame = Vec::new();
        etherparse::PacketBuilder::ethernet2(HOST_MAC.0, TENANT_MAC.0)
            .ipv4(HOST_IP.octets(), TENANT_IP.octets(), 64)
            .icmpv4_echo_request(PROBE_IDENT, seq)
            .write(&mut frame, b"libvirtual isolation probe")
            .map_err(|e| Error::Setup(format!("building probe: {e}")))?;
        let v = Vni::new(vni_n)?;
        self.host.inject(v, frame);
        Ok(())
    }

    /// Whether the reply to injected probe `seq` came back (waiting up to `wait` for it).
    pub fn echo_answered(&self, seq: u16, wait: Duration) -> Result<bool, Error> {
        let answered = || self.host.echo_replies().contains(&(PROBE_IDENT, seq));
        Ok(crate::wait::until("the probe's reply", wait, answered).is_ok() || answered())
    }
}

/// The ICMP identifier of injected probes.
const PROBE_IDENT: u16 = 0x4c56;

/// Everything one interop run measured.
#[derive(Clone, Debug)]
pub struct ScenarioReport {
    /// Underlay family.
    pub family: UnderlayFamily,
    /// Userspace VTEP transport.
    pub kind: TransportKind,
    /// Tenant MTU from overlay-net.
    pub inner_mtu: u16,
    /// Tenant MTU the kernel chose for its vxlan device.
    pub kernel_vxlan_mtu: u16,
    /// Small pings from the VNI-42 tenant.
    pub ping: PingResult,
    /// Pings that fill the tenant MTU exactly (DF set).
    pub ping_full_mtu: PingResult,
    /// TCP transfer with echo.
    pub tcp: TcpReport,
    /// Pings from the VNI-43 tenant with the same address (must all fail).
    pub other_tenant_ping: PingResult,
    /// An echo request injected in VNI 43 towards the VNI-42 tenant was answered (must not be).
    pub foreign_vni_probe_answered: bool,
    /// The same probe in VNI 42 was answered (the control).
    pub own_vni_probe_answered: bool,
    /// Frames of VNI 43 the userspace VTEP dropped.
    pub foreign_vni_dropped: u64,
    /// Frames the userspace VTEP rejected as invalid VXLAN (must be none: the kernel's
    /// packets are valid).
    pub invalid: u64,
    /// Other traffic the userspace VTEP saw on the underlay (IPv6 ND, MLD, ...).
    pub other_traffic: u64,
    /// Frames the userspace VTEP sent and received.
    pub tx_frames: u64,
    /// Frames of VNI 42 delivered to the smoltcp host.
    pub rx_frames: u64,
}

impl ScenarioReport {
    /// Everything the issue asks of the interop holds.
    pub fn passed(&self) -> bool {
        self.inner_mtu == self.kernel_vxlan_mtu
            && self.ping.received == self.ping.sent
            && self.ping_full_mtu.received == self.ping_full_mtu.sent
            && self.tcp.echo_matches
            && self.tcp.host_crc32 == Some(self.tcp.client_crc32)
            && self.other_tenant_ping.received == 0
            && !self.foreign_vni_probe_answered
            && self.own_vni_probe_answered
            && self.foreign_vni_dropped > 0
            && self.invalid == 0
    }
}

/// Builds a bed and runs the whole interop scenario on it.
pub fn run_scenario(
    family: UnderlayFamily,
    kind: TransportKind,
    tcp_bytes: usize,
) -> Result<ScenarioReport, Error> {
    use std::sync::atomic::Ordering::Relaxed;
    let bed = KernelPeerBed::new(family, kind)?;
    let ping = bed.ping_from_tenant(5, 56)?;
    let ping_full_mtu = bed.ping_from_tenant(3, bed.full_mtu_ping_payload())?;
    let tcp = bed.tcp_echo(tcp_bytes)?;
    let other_tenant_ping = bed.ping_from_other_tenant(1)?;
    // The foreign probe first, then the control in the right VNI: once the control's reply
    // is back, a reply to the foreign one would have come too (same path, sent earlier).
    bed.inject_echo(OTHER_VNI, 1)?;
    bed.inject_echo(VNI, 2)?;
    let own_vni_probe_answered = bed.echo_answered(2, Duration::from_secs(30))?;
    let foreign_vni_probe_answered = bed.echo_answered(1, Duration::ZERO)?;
    let c = bed.host().counters();
    Ok(ScenarioReport {
        family,
        kind,
        inner_mtu: bed.inner_mtu(),
        kernel_vxlan_mtu: bed.kernel_vxlan_mtu()?,
        ping,
        ping_full_mtu,
        tcp,
        other_tenant_ping,
        foreign_vni_probe_answered,
        own_vni_probe_answered,
        foreign_vni_dropped: c.rx_foreign_vni.load(Relaxed),
        invalid: c.rx_invalid.load(Relaxed),
        other_traffic: c.rx_other.load(Relaxed),
        tx_frames: c.tx_frames.load(Relaxed),
        rx_frames: c.rx_frames.load(Relaxed),
    })
}
