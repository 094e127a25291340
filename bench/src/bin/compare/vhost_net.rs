//! The `vhost-net` suite: DPDK's `dpdk-testpmd` as a VM-less vhost-user-net peer.
//!
//! One testpmd process (virtio_user ports, one forwarding core) sends bursts around a loop in
//! `mac` forwarding mode: whatever comes in on one port goes out of the other, so the loop
//! runs as fast as the element in the middle forwards. The middle is:
//!
//! * the bound: testpmd's vhost PMD bouncing frames straight back (`io` forwarding, one
//!   busy-polling core), no switch;
//! * vswitchd with one datapath worker: two vhost-user-net ports of one tenant;
//! * two vswitchd hosts (one worker each) on netns hosts, the ports on different hosts, frames
//!   crossing the VXLAN overlay: through the kernel's UDP sockets, and through AF_XDP
//!   (`--uplink-io xdp`; copy mode on the veths), in alternating rounds;
//! * Open vSwitch with DPDK (when installed): two `dpdkvhostuserclient` ports on a netdev
//!   bridge (`NORMAL` forwarding: MAC learning, as vswitchd's tenant), one PMD thread — the
//!   userspace switch to beat. Started afresh for each of its rounds, so that its PMD, which
//!   spins at 100 % whether or not there is traffic, never runs beside the others.
//!
//! The figure is the frame rate through the middle (frames testpmd receives per second, both
//! directions together), for 64-byte and 1518-byte frames. Processes are pinned: testpmd's
//! forwarding core is CPU 0, the middle runs on CPU 1. The bound and the one-host switch are
//! measured in alternating rounds (medians reported, every round printed), and OVS-DPDK in the
//! same rotation.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testbeds::daemon::{Daemon, vswitchd_args, workspace_binary};
use testbeds::netns::Netns;
use testbeds::scratch::Scratch;
use testbeds::switch_bed::Underlay;

use crate::ovs::{self, OvsDpdk};
use crate::{Killed, Row};

/// MACs of testpmd's two virtio_user ports.
const MAC0: &str = "02:00:00:00:d0:00";
const MAC1: &str = "02:00:00:00:d0:01";
/// Underlay MTU of the switch hosts: room for 1518-byte frames in VXLAN.
const UNDERLAY_MTU: u16 = 1600;
/// Bursts of 32 frames each port puts into the loop.
const BURSTS: u32 = 4;

fn eal(prefix: &str, main_lcore: u8) -> Vec<String> {
    [
        "-l",
        "0,1",
        "--main-lcore",
        &main_lcore.to_string(),
        "--no-huge",
        "-m",
        "1024",
        "--no-pci",
        "--file-prefix",
        prefix,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// testpmd's vhost PMD serving `sock` and bouncing every frame back (the bound's middle);
/// forwarding on CPU 1.
fn vhost_pmd(sock: &Path) -> Result<Killed, String> {
    let mut args = eal("lv-bench-vhost", 0);
    args.push("--vdev".into());
    args.push(format!("net_vhost0,iface={},queues=1", sock.display()));
    args.extend(
        [
            "--",
            "--total-num-mbufs=32768",
            "--forward-mode=io",
            "-a",
            // Non-interactive testpmd waits on stdin unless it prints statistics periodically.
            "--stats-period",
            "1000",
        ]
        .map(String::from),
    );
    let child = Command::new("dpdk-testpmd")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("dpdk-testpmd: {e}"))?;
    let p = Killed(child);
    wait_for_socket(sock)?;
    Ok(p)
}

fn wait_for_socket(sock: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} did not appear", sock.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Interactive testpmd with one virtio_user port per socket, forwarding core CPU 0.
struct LoopDriver {
    child: Killed,
    stdin: ChildStdin,
    output: Arc<Mutex<String>>,
}

impl LoopDriver {
    fn start(sockets: &[&Path], frame: usize) -> Result<LoopDriver, String> {
        Self::start_with(sockets, frame, false)
    }

    /// Like [`LoopDriver::start`]; with `server` the virtio_user ports serve their sockets
    /// (for switches that connect as vhost-user clients, as OVS's `dpdkvhostuserclient`).
    fn start_with(sockets: &[&Path], frame: usize, server: bool) -> Result<LoopDriver, String> {
        let mut args = eal("lv-bench-user", 1);
        let macs = [MAC0, MAC1];
        for (i, sock) in sockets.iter().enumerate() {
            args.push("--vdev".into());
            args.push(format!(
                "net_virtio_user{i},path={},queues=1,mac={}{}",
                sock.display(),
                macs[i],
                if server { ",server=1" } else { "" }
            ));
        }
        args.extend(
            [
                "--",
                "-i",
                "--total-num-mbufs=32768",
                "--forward-mode=mac",
                "--port-topology=paired",
            ]
            .map(String::from),
        );
        // Each port addresses frames to the other port's MAC (one port: to itself; the
        // vhost PMD bounces them unchanged).
        if sockets.len() == 2 {
            args.push(format!("--eth-peer=0,{MAC1}"));
            args.push(format!("--eth-peer=1,{MAC0}"));
        } else {
            args.push(format!("--eth-peer=0,{MAC1}"));
        }
        args.push(format!("--txpkts={frame}"));
        let mut child = Command::new("dpdk-testpmd")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("dpdk-testpmd: {e}"))?;
        let stdin = child.stdin.take().ok_or("testpmd stdin")?;
        let mut stdout = child.stdout.take().ok_or("testpmd stdout")?;
        let output = Arc::new(Mutex::new(String::new()));
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&text);
            }
        });
        let d = LoopDriver {
            child: Killed(child),
            stdin,
            output,
        };
        d.wait_output("testpmd>", Duration::from_secs(30))?;
        Ok(d)
    }

    fn text(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn wait_output(&self, what: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while !self.text().contains(what) {
            if Instant::now() > deadline {
                let t = self.text();
                let tail = &t[t.len().saturating_sub(2000)..];
                return Err(format!("testpmd: no {what:?} in time; output:\n{tail}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn send(&mut self, line: &str) -> Result<(), String> {
        writeln!(self.stdin, "{line}").map_err(|e| format!("testpmd stdin: {e}"))
    }

    /// Starts the loop, lets it settle, and returns the frames received per second (all
    /// ports) over `secs`.
    fn measure(mut self, ports: usize, secs: u32) -> Result<f64, String> {
        self.send(&format!("start tx_first {BURSTS}"))?;
        std::thread::sleep(Duration::from_secs(2));
        // testpmd reports the rate since the previous `show port stats`.
        self.send("show port stats all")?;
        std::thread::sleep(Duration::from_secs(u64::from(secs)));
        self.send("show port stats all")?;
        self.send("stop")?;
        self.send("quit")?;
        self.wait_output("Bye", Duration::from_secs(20))?;
        let _ = self.child.0.wait();
        let text = self.text();
        let rates: Vec<f64> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Rx-pps:"))
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .collect();
        if rates.len() < 2 * ports {
            return Err(format!("testpmd printed no port statistics:\n{text}"));
        }
        Ok(rates[rates.len() - ports..].iter().sum::<f64>() / 1e6)
    }
}

/// vswitchd in `ns` on `underlay`, one datapath worker, pinned to CPU 1, its uplink on the
/// kernel's UDP sockets.
fn vswitchd(ns: &Netns, underlay: IpAddr, dir: &Path) -> Result<Daemon, String> {
    vswitchd_with(ns, underlay, dir, "socket")
}

/// Like [`vswitchd`], the uplink's I/O given (`socket` or `xdp`).
fn vswitchd_with(ns: &Netns, underlay: IpAddr, dir: &Path, io: &str) -> Result<Daemon, String> {
    let bin = workspace_binary("vswitchd").map_err(|e| e.to_string())?;
    let mut args = vec!["-c".to_string(), "1".into(), bin.display().to_string()];
    args.extend(vswitchd_args(
        underlay,
        dir,
        &[
            "--underlay-mtu",
            &UNDERLAY_MTU.to_string(),
            "--workers",
            "1",
            "--uplink-io",
            io,
        ],
    ));
    Daemon::start(
        ns,
        Path::new("taskset"),
        &args,
        dir.join("run/vswitchd.sock"),
    )
    .map_err(|e| e.to_string())
}

fn api(d: &Daemon, path: &str, body: &str) -> Result<(), String> {
    d.create(path, body).map(|_| ()).map_err(|e| e.to_string())
}

/// A tenant `a` (VNI 100) flooding to `peers`, and the vhost-user-net port `port` on it.
fn tenant_with_port(d: &Daemon, port: &str, peers: &[IpAddr]) -> Result<(), String> {
    api(d, "/v1/tenants", r#"{"name":"a","vni":100}"#)?;
    for p in peers {
        api(d, "/v1/tenants/a/vteps", &format!(r#"{{"ip":"{p}"}}"#))?;
    }
    api(
        d,
        "/v1/ports",
        &format!(r#"{{"name":"{port}","tenant":"a","kind":"vhost-user-net"}}"#),
    )
}

fn socket(dir: &Path, port: &str) -> PathBuf {
    dir.join(format!("run/vhost/{port}.sock"))
}

/// CPU time (user + system, clock ticks) of process `pid`.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces): state is field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Rounds of the one-host comparison.
const ROUNDS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the suite (`secs` per measurement).
pub fn suite(secs: u32) -> Result<Vec<Row>, String> {
    let dir =
        Scratch::new(Path::new("/var/tmp"), "lv-bench-vhost-net").map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    let with_ovs = ovs::installed();
    if !with_ovs {
        eprintln!(
            "OVS-DPDK rows skipped: {} is not installed (apt-get install openvswitch-switch-dpdk)",
            ovs::OVS_VSWITCHD_DPDK
        );
    }
    for (frame, name_local, name_vxlan, name_xdp, name_ovs) in [
        (
            64,
            "vhost-net 64B, 2 ports, 1 host",
            "vhost-net 64B, over VXLAN, 2 hosts",
            "vhost-net 64B, over VXLAN on AF_XDP, 2 hosts",
            "vhost-net 64B, 2 ports, 1 host, vs OVS-DPDK",
        ),
        (
            1518,
            "vhost-net 1518B, 2 ports, 1 host",
            "vhost-net 1518B, over VXLAN, 2 hosts",
            "vhost-net 1518B, over VXLAN on AF_XDP, 2 hosts",
            "vhost-net 1518B, 2 ports, 1 host, vs OVS-DPDK",
        ),
    ] {
        // One vswitchd, two ports; rounds alternate between the bound (testpmd's vhost PMD
        // as the middle) and vswitchd, and the medians are reported: this machine's speed
        // drifts between runs by a factor of up to two (vCPUs sharing a physical core or not).
        let (bound, local, ovs) = {
            let mut ul = Underlay::with_mtu(UNDERLAY_MTU).map_err(|e| e.to_string())?;
            let host = ul
                .host("h1", Ipv4Addr::new(198, 18, 0, 1))
                .map_err(|e| e.to_string())?;
            let d_dir = dir.join(format!("local-{frame}"));
            let d = vswitchd(
                &host,
                "198.18.0.1".parse().unwrap_or(IpAddr::from([0; 4])),
                &d_dir,
            )?;
            tenant_with_port(&d, "p0", &[])?;
            api(
                &d,
                "/v1/ports",
                r#"{"name":"p1","tenant":"a","kind":"vhost-user-net"}"#,
            )?;
            if frame == 64 {
                // With testpmd connected to both ports, sending nothing.
                let (s0, s1) = (socket(&d_dir, "p0"), socket(&d_dir, "p1"));
                let _idle = LoopDriver::start(&[&s0, &s1], frame)?;
                let pid = d.pid().ok_or("vswitchd has no pid")?;
                let before = cpu_ticks(pid);
                std::thread::sleep(Duration::from_secs(5));
                if let (Some(b), Some(a)) = (before, cpu_ticks(pid)) {
                    eprintln!(
                        "vswitchd idle with two vhost-user-net ports connected: {} clock ticks in 5 s ({:.2} % of a core)",
                        a - b,
                        (a - b) as f64 / 5.0
                    );
                }
            }
            let (s0, s1) = (socket(&d_dir, "p0"), socket(&d_dir, "p1"));
            let mut bound = Vec::new();
            let mut local = Vec::new();
            let mut ovs = Vec::new();
            for round in 0..ROUNDS {
                let sock = dir.join(format!("bound-{frame}-{round}.sock"));
                {
                    let _middle = vhost_pmd(&sock)?;
                    bound.push(LoopDriver::start(&[&sock], frame)?.measure(1, secs)?);
                }
                local.push(LoopDriver::start(&[&s0, &s1], frame)?.measure(2, secs)?);
                if with_ovs {
                    let ovs_dir = dir.join(format!("ovs-{frame}-{round}"));
                    ovs.push(ovs_round(&ovs_dir, frame, secs, frame == 64 && round == 0)?);
                }
            }
            eprintln!(
                "{frame}B rounds: bound {bound:.3?} Mpps, vswitchd {local:.3?} Mpps, OVS-DPDK {ovs:.3?} Mpps"
            );
            (
                median(bound),
                median(local),
                (!ovs.is_empty()).then(|| median(ovs)),
            )
        };
        // Two vswitchd hosts, one port on each, VXLAN between them: over the kernel's UDP
        // sockets and over AF_XDP (copy mode on these veths), in alternating rounds, a fresh
        // pair of hosts each.
        let (mut sockets, mut xdp) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            for io in ["socket", "xdp"] {
                let mut ul = Underlay::with_mtu(UNDERLAY_MTU).map_err(|e| e.to_string())?;
                let mut hosts = Vec::new();
                for n in [1u8, 2] {
                    let ns = ul
                        .host(&format!("h{n}"), Ipv4Addr::new(198, 18, 0, n))
                        .map_err(|e| e.to_string())?;
                    let d_dir = dir.join(format!("vxlan-{frame}-{io}-{round}-h{n}"));
                    let d = vswitchd_with(&ns, IpAddr::from([198, 18, 0, n]), &d_dir, io)?;
                    let peer = IpAddr::from([198, 18, 0, 3 - n]);
                    tenant_with_port(&d, &format!("p{}", n - 1), &[peer])?;
                    hosts.push((ns, d, d_dir));
                }
                let s0 = socket(&hosts[0].2, "p0");
                let s1 = socket(&hosts[1].2, "p1");
                let rate = LoopDriver::start(&[&s0, &s1], frame)?.measure(2, secs)?;
                if io == "xdp" { &mut xdp } else { &mut sockets }.push(rate);
            }
        }
        eprintln!("{frame}B VXLAN rounds: sockets {sockets:.3?} Mpps, AF_XDP {xdp:.3?} Mpps");
        let (vxlan, vxlan_xdp) = (median(sockets), median(xdp));
        eprintln!(
            "{frame}B: bound {bound:.3} Mpps, vswitchd {local:.3} Mpps, VXLAN {vxlan:.3} Mpps, VXLAN on AF_XDP {vxlan_xdp:.3} Mpps"
        );
        let peer_name = "testpmd vhost PMD, no switch (the bound)";
        rows.push(Row {
            name: name_local,
            ours: local,
            peer: bound,
            peer_name,
            unit: "Mpps",
        });
        rows.push(Row {
            name: name_vxlan,
            ours: vxlan,
            peer: bound,
            peer_name,
            unit: "Mpps",
        });
        rows.push(Row {
            name: name_xdp,
            ours: vxlan_xdp,
            peer: local,
            peer_name: "vswitchd, the same two ports on one host",
            unit: "Mpps",
        });
        if let Some(ovs) = ovs {
            rows.push(Row {
                name: name_ovs,
                ours: local,
                peer: ovs,
                peer_name: "Open vSwitch 3.1 with DPDK, 1 PMD core",
                unit: "Mpps",
            });
        }
    }
    Ok(rows)
}

/// One round through OVS-DPDK (started for it, stopped after): testpmd's two ports, served
/// by testpmd, connected to by OVS. With `idle`, first prints OVS's CPU use with the ports
/// connected and no traffic.
fn ovs_round(dir: &Path, frame: usize, secs: u32, idle: bool) -> Result<f64, String> {
    let ovs = OvsDpdk::start(dir, 1)?;
    let (s0, s1) = (dir.join("vu0.sock"), dir.join("vu1.sock"));
    ovs.add_vhost_client_port("vu0", &s0)?;
    ovs.add_vhost_client_port("vu1", &s1)?;
    // testpmd waits in its start-up until OVS has connected to both sockets.
    let driver = LoopDriver::start_with(&[&s0, &s1], frame, true)?;
    if idle {
        let before = cpu_ticks(ovs.pid());
        std::thread::sleep(Duration::from_secs(5));
        if let (Some(b), Some(a)) = (before, cpu_ticks(ovs.pid())) {
            eprintln!(
                "OVS-DPDK idle with two vhost-user ports connected: {} clock ticks in 5 s ({:.2} % of a core)",
                a - b,
                (a - b) as f64 / 5.0
            );
        }
    }
    let rate = driver.measure(2, secs)?;
    drop(ovs);
    Ok(rate)
}
