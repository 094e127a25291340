//! Hosts running the vswitch datapath on a shared underlay, with tenant endpoints attached
//! through TAP ports, plus an optional Linux-kernel VXLAN host for interop.
//!
//! ```text
//!  netns ul: bridge br0 ---- veth ---- netns h1 (198.18.0.1, datapath) -- TAP --> netns endpoint
//!                      ---- veth ---- netns h2 (198.18.0.2, datapath) -- TAP --> netns endpoint
//!                      ---- veth ---- netns hK (198.18.0.9, kernel vxlan + bridge) --> endpoint
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use overlay_net::{TenantLimits, Vni};
use vswitch::datapath::{DatapathConfig, DatapathWorkers};
use vswitch::placement::Placement;
use vswitch::tap::Offloads;
use vswitch::{PortConfig, TenantConfig};

use crate::Error;
use crate::netns::{Netns, enter_current_thread};

fn sw(e: vswitch::Error) -> Error {
    Error::Setup(format!("vswitch: {e}"))
}

/// The underlay: a bridge in its own namespace.
pub struct Underlay {
    ns: Netns,
    next_link: u32,
    mtu: Option<u16>,
    queues: Option<u32>,
}

impl Underlay {
    /// Creates the underlay bridge.
    pub fn new() -> Result<Underlay, Error> {
        let ns = Netns::create("ul")?;
        ns.ip(&["link", "add", "name", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(Underlay {
            ns,
            next_link: 0,
            mtu: None,
            queues: None,
        })
    }

    /// Creates the underlay bridge; every host's link has `queues` transmit and receive
    /// queues at both ends (a veth puts a frame on the peer's receive queue of the number of
    /// the transmit queue it left by, as multi-queue NICs spread flows).
    pub fn with_queues(queues: u32) -> Result<Underlay, Error> {
        let mut ul = Self::new()?;
        ul.queues = Some(queues);
        Ok(ul)
    }

    /// Creates the underlay bridge; every host's link gets MTU `mtu` (jumbo frames: room for
    /// full-size tenant frames in VXLAN).
    pub fn with_mtu(mtu: u16) -> Result<Underlay, Error> {
        let mut ul = Self::new()?;
        ul.mtu = Some(mtu);
        Ok(ul)
    }

    /// The underlay's own namespace (holding the bridge).
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Plugs a new namespace into the bridge as `eth0` with `addr/24` and returns it.
    pub fn host(&mut self, role: &str, addr: Ipv4Addr) -> Result<Netns, Error> {
        let host = Netns::create(role)?;
        self.next_link += 1;
        let link = format!("p{}", self.next_link);
        let queues = self.queues.map(|q| q.to_string());
        let q: Vec<&str> = match &queues {
            Some(n) => vec!["numtxqueues", n, "numrxqueues", n],
            None => Vec::new(),
        };
        let mut args = vec!["link", "add", "name", &link];
        args.extend(&q);
        args.extend(["type", "veth", "peer", "name", "eth0"]);
        args.extend(&q);
        args.extend(["netns", host.name()]);
        self.ns.ip(&args)?;
        self.ns.ip(&["link", "set", &link, "master", "br0"])?;
        if let Some(mtu) = self.mtu {
            let mtu = mtu.to_string();
            self.ns.ip(&["link", "set", &link, "mtu", &mtu])?;
            host.ip(&["link", "set", "eth0", "mtu", &mtu])?;
        }
        // The links keep the kernel's defaults (a veth offloads checksums and segmentation):
        // what users run is what the beds prove.
        self.ns.ip(&["link", "set", &link, "up"])?;
        host.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        // Every host also has an IPv6 underlay address, fd00:18::<last octet>.
        let v6 = format!("fd00:18::{}/64", addr.octets()[3]);
        host.ip(&["addr", "add", &v6, "dev", "eth0", "nodad"])?;
        host.ip(&["link", "set", "eth0", "up"])?;
        Ok(host)
    }
}

/// A host running the vswitch datapath.
pub struct SwitchHost {
    /// The datapath thread (dropped first).
    pub datapath: DatapathWorkers,
    /// The host's namespace.
    pub ns: Netns,
    /// The underlay address its datapath binds.
    pub ip: IpAddr,
}

impl SwitchHost {
    /// Plugs a host into the underlay at `198.18.0.<n>` and starts its datapath there.
    pub fn new(underlay: &mut Underlay, n: u8) -> Result<SwitchHost, Error> {
        Self::with_underlays(underlay, n, false)
    }

    /// Like [`SwitchHost::new`]; with `ipv6` the datapath binds only the IPv6 underlay
    /// address `fd00:18::<n>` (tenant MTU 1430).
    pub fn with_underlays(underlay: &mut Underlay, n: u8, ipv6: bool) -> Result<SwitchHost, Error> {
        Self::with_options(underlay, n, ipv6, 0)
    }

    /// Like [`SwitchHost::with_underlays`], with `workers` datapath threads (0: one per core).
    pub fn with_options(
        underlay: &mut Underlay,
        n: u8,
        ipv6: bool,
        workers: usize,
    ) -> Result<SwitchHost, Error> {
        Self::with_checksums(underlay, n, ipv6, workers, Default::default())
    }

    /// Like [`SwitchHost::with_options`], with zero UDP checksums on an IPv6 underlay.
    pub fn with_checksums(
        underlay: &mut Underlay,
        n: u8,
        ipv6: bool,
        workers: usize,
        udp6_zero_checksum: vswitch::uplink::Udp6ZeroChecksum,
    ) -> Result<SwitchHost, Error> {
        Self::with_uplink(
            underlay,
            n,
            ipv6,
            workers,
            udp6_zero_checksum,
            Default::default(),
        )
    }

    /// Like [`SwitchHost::with_checksums`], with the uplink's I/O chosen (AF_XDP or socket).
    pub fn with_uplink(
        underlay: &mut Underlay,
        n: u8,
        ipv6: bool,
        workers: usize,
        udp6_zero_checksum: vswitch::uplink::Udp6ZeroChecksum,
        uplink_io: vswitch::uplink::UplinkIo,
    ) -> Result<SwitchHost, Error> {
        let addr = Ipv4Addr::new(198, 18, 0, n);
        let ns = underlay.host(&format!("h{n}"), addr)?;
        let name = ns.name().to_owned();
        let bind: IpAddr = if ipv6 {
            std::net::Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, n as u16).into()
        } else {
            addr.into()
        };
        let datapath = DatapathWorkers::spawn(
            DatapathConfig {
                underlay: vec![bind],
                underlay_mtu: 1500,
                udp_port: overlay_net::VXLAN_PORT,
                workers,
                udp6_zero_checksum,
                uplink_io,
            },
            move || {
                enter_current_thread(&name).map_err(|e| {
                    vswitch::Error::Io(
                        "enter host netns".into(),
                        std::io::Error::other(e.to_string()),
                    )
                })
            },
        )
        .map_err(sw)?;
        Ok(SwitchHost {
            datapath,
            ns,
            ip: bind,
        })
    }

    /// Creates a tenant (MTU from the underlay) and points its flood list at `peers`.
    pub fn tenant(&self, name: &str, vni: u32, peers: &[IpAddr]) -> Result<(), Error> {
        let cfg = TenantConfig {
            name: name.into(),
            vni: Vni::new(vni)?,
            mtu: 0,
            limits: TenantLimits::default(),
            learn_vteps: false,
        };
        let peers = peers.to_vec();
        let tenant = name.to_owned();
        self.datapath
            .call(move |dp| {
                dp.add_tenant(cfg)?;
                for p in peers {
                    dp.add_remote_vtep(&tenant, p)?;
                }
                Ok::<_, vswitch::Error>(())
            })
            .map_err(sw)?
            .map_err(sw)
    }

    /// Attaches an endpoint: a TAP port `port` of `tenant`, placed by the datapath into a new
    /// namespace as `eth0` (tenant MTU), given `mac` and `addr/24` there.
    pub fn endpoint(
        &self,
        tenant: &str,
        port: &str,
        addr: Ipv4Addr,
        mac: &str,
    ) -> Result<Netns, Error> {
        self.endpoint_with(tenant, PortConfig::new(port), addr, mac)
    }

    /// Like [`SwitchHost::endpoint`], with port security or a rate limit in `config`.
    pub fn endpoint_with(
        &self,
        tenant: &str,
        config: PortConfig,
        addr: Ipv4Addr,
        mac: &str,
    ) -> Result<Netns, Error> {
        let ep = Netns::create(&format!("e{}", config.name))?;
        // No IPv6: endpoints then send nothing on their own (no router solicitations, MLD or
        // DAD), so counters show exactly the traffic a test makes.
        quiet_ipv6(&ep)?;
        let placement = Placement {
            netns: format!("/run/netns/{}", ep.name()).into(),
            ifname: "eth0".into(),
        };
        let t = tenant.to_owned();
        self.datapath
            .call(move |dp| dp.add_tap_port(&t, config, Offloads::TCP, Some(&placement)))
            .map_err(sw)?
            .map_err(sw)?;
        ep.ip(&["link", "set", "eth0", "address", mac])?;
        ep.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ep.ip(&["link", "set", "eth0", "up"])?;
        Ok(ep)
    }
}

fn quiet_ipv6(ns: &Netns) -> Result<(), Error> {
    ns.exec(
        "sh",
        &[
            "-c",
            "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
        ],
    )
    .map(|_| ())
}

/// A host whose tenant side is the Linux kernel: vxlan + bridge, head-end replication to the
/// given peers, one endpoint.
pub struct KernelHost {
    /// The host's namespace.
    pub ns: Netns,
    /// Its endpoint.
    pub endpoint: Netns,
    /// Its underlay address.
    pub ip: IpAddr,
}

impl KernelHost {
    /// Plugs a kernel VTEP at `198.18.0.<n>` with VNI `vni`, flooding to `peers`, and an
    /// endpoint with `addr/24`.
    pub fn new(
        underlay: &mut Underlay,
        n: u8,
        vni: u32,
        peers: &[IpAddr],
        addr: Ipv4Addr,
    ) -> Result<KernelHost, Error> {
        Self::with_family(underlay, n, vni, peers, addr, false)
    }

    /// Like [`KernelHost::new`]; with `ipv6` the VTEP uses the host's IPv6 underlay address
    /// `fd00:18::<n>` (tenant MTU 1430).
    pub fn with_family(
        underlay: &mut Underlay,
        n: u8,
        vni: u32,
        peers: &[IpAddr],
        addr: Ipv4Addr,
        ipv6: bool,
    ) -> Result<KernelHost, Error> {
        let peers: Vec<(IpAddr, u16)> = peers
            .iter()
            .map(|p| (*p, overlay_net::VXLAN_PORT))
            .collect();
        Self::with_ports(
            underlay,
            n,
            vni,
            &peers,
            addr,
            ipv6,
            overlay_net::VXLAN_PORT,
        )
    }

    /// Like [`KernelHost::with_family`], its VTEP listening on UDP port `port` and each peer
    /// reached on its own port (`bridge fdb ... port`). Unless the port is 4789, the device
    /// learns nothing from what it receives (`nolearning`, as flannel's on 8472): a learned
    /// entry would send to `port`, not to the peer's.
    pub fn with_ports(
        underlay: &mut Underlay,
        n: u8,
        vni: u32,
        peers: &[(IpAddr, u16)],
        addr: Ipv4Addr,
        ipv6: bool,
        port: u16,
    ) -> Result<KernelHost, Error> {
        Self::with_vxlan_options(underlay, n, vni, peers, addr, ipv6, port, &[])
    }

    /// Like [`KernelHost::with_ports`], with more `ip link add ... type vxlan` options
    /// (`udp6zerocsumtx`, ...).
    #[allow(clippy::too_many_arguments)]
    pub fn with_vxlan_options(
        underlay: &mut Underlay,
        n: u8,
        vni: u32,
        peers: &[(IpAddr, u16)],
        addr: Ipv4Addr,
        ipv6: bool,
        port: u16,
        options: &[&str],
    ) -> Result<KernelHost, Error> {
        let v4 = Ipv4Addr::new(198, 18, 0, n);
        let ns = underlay.host(&format!("k{n}"), v4)?;
        let local: IpAddr = if ipv6 {
            std::net::Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, u16::from(n)).into()
        } else {
            v4.into()
        };
        let tenant_mtu = if ipv6 { "1430" } else { "1450" };
        let id = vni.to_string();
        let dstport = port.to_string();
        let local_s = local.to_string();
        let mut args = vec![
            "link", "add", "name", "vxl0", "type", "vxlan", "id", &id, "dstport", &dstport,
            "local", &local_s, "dev", "eth0",
        ];
        if port != overlay_net::VXLAN_PORT {
            args.push("nolearning");
        }
        args.extend_from_slice(options);
        ns.ip(&args)?;
        for (p, peer_port) in peers {
            ns.exec(
                "bridge",
                &[
                    "fdb",
                    "append",
                    "00:00:00:00:00:00",
                    "dev",
                    "vxl0",
                    "dst",
                    &p.to_string(),
                    "port",
                    &peer_port.to_string(),
                ],
            )?;
        }
        // All-zero entries: broadcast and unknown unicast go to every peer (head-end
        // replication); the vxlan device learns where remote MACs live from what it receives.
        // Device names avoid `br`/`vx`: `ip link set` reads bare words as abbreviations.
        ns.ip(&["link", "add", "name", "kbr0", "type", "bridge"])?;
        let endpoint = Netns::create(&format!("ek{n}"))?;
        ns.ip(&[
            "link",
            "add",
            "name",
            "tv0",
            "mtu",
            tenant_mtu,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "mtu",
            tenant_mtu,
            "netns",
            endpoint.name(),
        ])?;
        for dev in ["vxl0", "tv0"] {
            ns.ip(&["link", "set", "dev", dev, "master", "kbr0"])?;
            ns.ip(&["link", "set", "dev", dev, "up"])?;
        }
        ns.ip(&["link", "set", "dev", "kbr0", "up"])?;
        endpoint.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        endpoint.ip(&["link", "set", "eth0", "up"])?;
        Ok(KernelHost {
            ns,
            endpoint,
            ip: local,
        })
    }
}

/// A capture thread on the underlay ([`watch_vxlan`]) and what it gathers: stopped (and
/// joined) by [`Watch::finish`] or on drop.
struct Watch<T> {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<T>>,
}

impl<T> Watch<T> {
    /// Stops the capture and returns what it gathered.
    fn finish(mut self) -> Result<T, Error> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .ok_or_else(|| Error::Setup("watch already finished".into()))?
            .join()
            .map_err(|_| Error::Setup("watch thread panicked".into()))
    }
}

impl<T> Drop for Watch<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Watches every link of the underlay's bridge on a thread until stopped, calling
/// `seen(state, source address, datagram)` for each VXLAN datagram (UDP to port 4789); the
/// watch returns the state when finished.
fn watch_vxlan<T: Send + 'static>(
    underlay: &Underlay,
    state: T,
    mut seen: impl FnMut(&mut T, IpAddr, &etherparse::UdpSlice<'_>) + Send + 'static,
) -> Result<Watch<T>, Error> {
    use std::os::fd::AsRawFd;
    // Every port of the bridge, blocking (the thread polls it).
    let fd = underlay.ns.enter(|| {
        crate::transport::packet_socket(0, false)
            .map_err(|e| Error::Io("AF_PACKET socket on the underlay".into(), e))
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::spawn(move || {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let mut state = state;
        let mut buf = vec![0u8; 65536];
        while !stopped.load(Ordering::Relaxed) {
            let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
            if !matches!(poll(&mut fds, PollTimeout::from(100u16)), Ok(n) if n > 0) {
                continue;
            }
            // SAFETY: the buffer is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            let Ok(n) = usize::try_from(n) else { continue };
            if let Ok(p) = etherparse::SlicedPacket::from_ethernet(&buf[..n])
                && let Some(etherparse::TransportSlice::Udp(udp)) = p.transport
                && udp.destination_port() == overlay_net::VXLAN_PORT
            {
                let from = match &p.net {
                    Some(etherparse::NetSlice::Ipv4(ip)) => IpAddr::from(ip.header().source_addr()),
                    Some(etherparse::NetSlice::Ipv6(ip)) => IpAddr::from(ip.header().source_addr()),
                    _ => continue,
                };
                seen(&mut state, from, &udp);
            }
        }
        state
    });
    Ok(Watch {
        stop,
        thread: Some(thread),
    })
}

/// Watches the underlay for VXLAN datagrams (UDP to port 4789) and collects their
/// UDP source ports, until stopped.
pub struct SourcePortWatch(Watch<std::collections::BTreeSet<u16>>);

impl SourcePortWatch {
    /// Starts watching the links of the underlay's bridge.
    pub fn start(underlay: &Underlay) -> Result<SourcePortWatch, Error> {
        let watch = watch_vxlan(
            underlay,
            std::collections::BTreeSet::new(),
            |ports, _, udp| {
                ports.insert(udp.source_port());
            },
        )?;
        Ok(SourcePortWatch(watch))
    }

    /// Stops and returns the source ports seen.
    pub fn finish(self) -> Result<std::collections::BTreeSet<u16>, Error> {
        self.0.finish()
    }
}

/// Counts, per sending VTEP, the VXLAN datagrams on the underlay's links with a zero outer
/// UDP checksum and with a non-zero one (which, sent through a veth with checksum offload, may
/// still be partial: only zero versus non-zero is told apart).
pub struct ChecksumWatch(Watch<ChecksumCounts>);

/// Per sending VTEP: (datagrams with a zero UDP checksum, with a non-zero one).
pub type ChecksumCounts = std::collections::BTreeMap<IpAddr, (u64, u64)>;

impl ChecksumWatch {
    /// Starts watching the links of the underlay's bridge.
    pub fn start(underlay: &Underlay) -> Result<ChecksumWatch, Error> {
        let watch = watch_vxlan(underlay, ChecksumCounts::new(), |counts, from, udp| {
            let c = counts.entry(from).or_default();
            if udp.checksum() == 0 {
                c.0 += 1;
            } else {
                c.1 += 1;
            }
        })?;
        Ok(ChecksumWatch(watch))
    }

    /// Stops and returns the counts.
    pub fn finish(self) -> Result<ChecksumCounts, Error> {
        self.0.finish()
    }
}

/// Counts, on every link of the underlay, VXLAN datagrams and those whose inner frame is a
/// broadcast ARP request (not a gratuitous one): what ARP suppression keeps off the wire.
/// A datagram is seen once per link it crosses.
pub struct ArpWatch(Watch<(u64, u64)>);

impl ArpWatch {
    /// Starts watching the links of the underlay's bridge.
    pub fn start(underlay: &Underlay) -> Result<ArpWatch, Error> {
        let watch = watch_vxlan(underlay, (0u64, 0u64), |(vxlan, arp), _, udp| {
            *vxlan += 1;
            let Some(inner) = udp.payload().get(8..) else {
                return;
            };
            if let Ok(view) = overlay_net::FrameView::parse(inner)
                && view.destination.is_broadcast()
                && let overlay_net::frame::Network::Arp(a) = view.network
                && a.operation == 1
                && a.sender_ip != a.target_ip
            {
                *arp += 1;
            }
        })?;
        Ok(ArpWatch(watch))
    }

    /// Stops and returns (VXLAN datagrams, broadcast ARP requests inside them) seen.
    pub fn finish(self) -> (u64, u64) {
        self.0.finish().unwrap_or_default()
    }
}
