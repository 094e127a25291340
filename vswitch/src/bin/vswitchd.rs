//! vswitchd: libvirtual's userspace virtual switch daemon.
//!
//! Tenants are VXLAN-keyed L2 networks; ports are TAP interfaces; the uplink is a UDP socket
//! per underlay address. Configure it through the JSON API on `RUN_DIR/vswitchd.sock`
//! (docs/api.md). State is persisted in `STATE_DIR/vswitchd.json` and restored at start.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use clap::Parser;
use tracing::{info, warn};
use vswitch::daemon::config::{Config, FileConfig};
use vswitch::daemon::control::Control;
use vswitch::daemon::server::router;
use vswitch::datapath::{DatapathConfig, DatapathWorkers};

/// libvirtual's userspace virtual switch.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    common: daemon_kit::CommonArgs,
    /// This host's underlay address, where the VXLAN port is bound (repeat for IPv4 and
    /// IPv6). Required, here or as `underlay = [...]` in the config file.
    #[arg(long = "underlay", value_name = "ADDR")]
    underlay: Vec<IpAddr>,
    /// L3 MTU of the underlay; tenants get 50 bytes less (70 over IPv6) [default: the MTU
    /// of the interface that holds the underlay address, else 1500].
    #[arg(long, value_name = "BYTES")]
    underlay_mtu: Option<u16>,
    /// VXLAN UDP port [default: 4789].
    #[arg(long, value_name = "PORT")]
    udp_port: Option<u16>,
    /// Datapath worker threads [default: one per core].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
}

fn effective(args: Args) -> anyhow::Result<Config> {
    let file = match &args.common.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let common = args
        .common
        .resolve(file.run_dir, file.state_dir, file.log_format)?;
    let socket_access =
        args.common
            .socket_access(file.socket_owner, file.socket_group, file.socket_mode)?;
    let underlay = if args.underlay.is_empty() {
        file.underlay
    } else {
        args.underlay
    };
    if underlay.is_empty() {
        bail!("no underlay address: give --underlay ADDR or `underlay = [...]` in the config");
    }
    let underlay_mtu = args
        .underlay_mtu
        .or(file.underlay_mtu)
        .or_else(|| vswitch::uplink::detect_underlay_mtu(&underlay))
        .unwrap_or(1500);
    Ok(Config {
        run_dir: common.run_dir,
        state_dir: common.state_dir,
        underlay,
        underlay_mtu,
        udp_port: args
            .udp_port
            .or(file.udp_port)
            .unwrap_or(overlay_net_port()),
        workers: args.workers.or(file.workers).unwrap_or(0),
        json_logs: common.json_logs,
        socket_access,
        api_max_connections: args
            .common
            .api_max_connections
            .or(file.api_max_connections)
            .map_or(daemon_kit::MAX_API_CONNECTIONS, |n| n as usize),
    })
}

fn overlay_net_port() -> u16 {
    vswitch::overlay_net::VXLAN_PORT
}

/// How often objects that could not be restored are tried again.
const RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3);

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    daemon_kit::run_main("vswitchd", || serve(args))
}

fn serve(args: Args) -> anyhow::Result<()> {
    let cfg = effective(args)?;
    daemon_kit::init_logs(cfg.json_logs);
    cfg.socket_access.install();
    daemon_kit::SocketAccess::create_dir(&cfg.run_dir)
        .with_context(|| format!("creating {}", cfg.run_dir.display()))?;
    let dp = DatapathWorkers::spawn(
        DatapathConfig {
            underlay: cfg.underlay.clone(),
            underlay_mtu: cfg.underlay_mtu,
            udp_port: cfg.udp_port,
            workers: cfg.workers,
        },
        || Ok(()),
    )
    .context("starting the datapath")?;
    info!(workers = dp.workers(), "datapath started");
    let (control, problems) =
        Control::restore(dp, &cfg.state_dir, &cfg.run_dir).context("restoring state")?;
    for p in &problems {
        warn!(problem = %p, "could not restore");
    }
    let shared = Arc::new(Mutex::new(control));
    // What could not be restored is tried again every few seconds (a network namespace may
    // come back); it stays in the state meanwhile.
    daemon_kit::spawn_retries(
        "vswitchd-retry",
        RETRY_INTERVAL,
        Arc::downgrade(&shared),
        |c| {
            if !c.unrestored().is_empty() {
                c.retry_unrestored();
            }
        },
    )?;
    let socket = cfg.run_dir.join("vswitchd.sock");
    info!(underlay = ?cfg.underlay, underlay_mtu = cfg.underlay_mtu, state = %cfg.state_dir.display(), "configuration");
    daemon_kit::runtime()?.block_on(daemon_kit::serve(
        &socket,
        router(shared),
        "vswitchd",
        cfg.api_max_connections,
    ))
}
