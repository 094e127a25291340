//! Side-by-side comparisons with peers, in one run on one machine.
//!
//! `cargo run --release -p bench --bin compare -- SUITE [--quick] [--json] [--workers N]`
//! (root). Suites:
//!
//! * `switch` (`--workers`: datapath threads per vswitch host, default one per core): iperf3
//!   TCP throughput and 64-byte UDP packet rate between two tenant endpoints on two netns
//!   hosts over VXLAN, through vswitch and through the Linux kernel (vxlan + bridge).
//! * `block`: vblock's engine against fio on a raw file through io_uring (the bound) and
//!   `qemu-img bench` on qcow2 (64 KiB clusters) and raw, on one file system.
//! * `vhost-blk`: a VM-less vhost-user-blk client (libblkio) against vblock's export and
//!   `qemu-storage-daemon` exporting raw and qcow2.
//! * `vhost-net`: `dpdk-testpmd` (virtio_user ports) looping frames through two
//!   vhost-user-net ports of vswitchd, on one host and across two over VXLAN, against testpmd's
//!   vhost PMD bouncing them back directly (the bound), and through Open vSwitch with DPDK
//!   (when `openvswitch-switch-dpdk` is installed).
//! * `nbd`: fio's `nbd` engine against vblock's NBD export and `qemu-storage-daemon`
//!   exporting qcow2 (64 KiB clusters) and raw: 4 KiB random writes into thin space and
//!   random reads at QD 32, 1 MiB sequential.
//! * `cni`: two containers on one host attached by `vswitch-cni` (veth and TAP) against the
//!   reference `bridge` plugin: TCP between them, ADD+DEL pairs per second.
//! * `all`: every suite (`vhost-net` only when dpdk-testpmd is installed, `cni` only with
//!   the reference CNI plugins).
//!
//! Each row is ours, the peer and the ratio (> 1: ours is better); `--json` prints
//! `[{"name","ours","peer","peer_name","unit","ratio"}]`.

use std::process::{Command, ExitCode};

use testbeds::netns::missing_privileges;

mod block;
mod cni;
mod nbd;
mod ovs;
mod switch;
mod vhost_blk;
mod vhost_net;

/// A child process killed (and reaped) on drop.
pub(crate) struct Killed(pub(crate) std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One comparison: ours against a peer.
pub struct Row {
    /// Suite/measurement.
    pub name: &'static str,
    /// Our figure.
    pub ours: f64,
    /// The peer's figure.
    pub peer: f64,
    /// What the peer is.
    pub peer_name: &'static str,
    /// Unit of both figures (higher is better).
    pub unit: &'static str,
}

/// The suites.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Suite {
    /// vswitch against the kernel's vxlan + bridge (iperf3 TCP, 64-byte UDP).
    Switch,
    /// vswitch-cni against the reference bridge plugin.
    Cni,
    /// vblock's engine against fio on raw and qemu-img bench on qcow2.
    Block,
    /// vblock's vhost-user-blk export against qemu-storage-daemon.
    VhostBlk,
    /// vblock's NBD export against qemu-storage-daemon.
    Nbd,
    /// vswitchd's vhost-user-net ports under dpdk-testpmd.
    VhostNet,
    /// Every suite whose tools are installed.
    All,
}

/// Side-by-side comparisons with peers, in one run on one machine (root; see the suites in
/// bench/src/bin/compare/main.rs).
#[derive(Debug, clap::Parser)]
#[command(name = "compare")]
struct Args {
    /// Which suite.
    #[arg(value_enum, default_value = "all")]
    suite: Suite,
    /// Shorter measurements (3 s instead of 10 s; 2 s instead of 5 s for storage).
    #[arg(long)]
    quick: bool,
    /// Print `[{"name","ours","peer","peer_name","unit","ratio"}]`.
    #[arg(long)]
    json: bool,
    /// Datapath threads per vswitch host in `switch` (0: one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
}

fn main() -> ExitCode {
    let Args {
        suite,
        quick,
        json,
        workers,
    } = <Args as clap::Parser>::parse();
    let need = |tool: &str, pkg: &str| -> Result<(), String> {
        match Command::new(tool).arg("--version").output() {
            Ok(_) => Ok(()),
            Err(_) => Err(format!("{tool} is not installed (apt-get install {pkg})")),
        }
    };
    let ready = match suite {
        Suite::Switch => need("iperf3", "iperf3"),
        Suite::Cni => need("iperf3", "iperf3").and(
            std::path::Path::new("/usr/lib/cni/bridge")
                .is_file()
                .then_some(())
                .ok_or_else(|| {
                    "the reference CNI plugins are missing (apt-get install containernetworking-plugins)"
                        .to_owned()
                }),
        ),
        Suite::Block => need("fio", "fio").and(need("qemu-img", "qemu-utils")),
        Suite::VhostBlk => need("qemu-storage-daemon", "qemu-utils"),
        Suite::Nbd => need("qemu-storage-daemon", "qemu-utils").and(need("fio", "fio")),
        Suite::VhostNet => need("dpdk-testpmd", "dpdk-dev"),
        Suite::All => need("iperf3", "iperf3")
            .and(need("fio", "fio"))
            .and(need("qemu-img", "qemu-utils")),
    };
    if let Err(e) = ready {
        eprintln!("compare: {e}");
        return ExitCode::from(2);
    }
    if !matches!(suite, Suite::Block | Suite::VhostBlk | Suite::Nbd)
        && let Some(why) = missing_privileges()
    {
        eprintln!("compare: {why}");
        return ExitCode::from(2);
    }
    let secs = if quick { 3 } else { 10 };
    let block_secs = if quick { 2.0 } else { 5.0 };
    let rows = match suite {
        Suite::Switch => switch::suite(secs, workers),
        Suite::Block => block::suite(block_secs),
        Suite::VhostBlk => vhost_blk::suite(block_secs),
        Suite::VhostNet => vhost_net::suite(secs / 2),
        Suite::Cni => cni::suite(secs),
        Suite::Nbd => nbd::suite(block_secs),
        Suite::All => switch::suite(secs, workers).and_then(|mut rows| {
            if std::path::Path::new("/usr/lib/cni/bridge").is_file() {
                rows.extend(cni::suite(secs)?);
            }
            rows.extend(block::suite(block_secs)?);
            rows.extend(vhost_blk::suite(block_secs)?);
            rows.extend(nbd::suite(block_secs)?);
            if need("dpdk-testpmd", "dpdk-dev").is_ok() {
                rows.extend(vhost_net::suite(secs / 2)?);
            }
            Ok(rows)
        }),
    };
    let rows = match rows {
        Ok(r) => r,
        Err(e) => {
            eprintln!("compare: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({"name": r.name, "ours": r.ours, "peer": r.peer, "peer_name": r.peer_name, "unit": r.unit, "ratio": r.ours / r.peer})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!(
            "{:<34} {:>10} {:>10} {:>8}  {:<8} peer",
            "comparison", "ours", "peer", "ratio", "unit"
        );
        for r in &rows {
            println!(
                "{:<34} {:>10.3} {:>10.3} {:>7.2}x  {:<8} {}",
                r.name,
                r.ours,
                r.peer,
                r.ours / r.peer,
                r.unit,
                r.peer_name
            );
        }
    }
    ExitCode::SUCCESS
}
