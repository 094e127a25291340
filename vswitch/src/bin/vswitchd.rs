//! vswitchd: libvirtual's userspace virtual switch daemon.
//!
//! Tenants are VXLAN-keyed L2 networks; ports are TAP interfaces; the uplink is a UDP socket
//! per underlay address. Configure it through the JSON API on `RUN_DIR/vswitchd.sock`
//! (docs/api.md). State is persisted in `STATE_DIR/vswitchd.json` and restored at start.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use clap::Parser;
use std::path::PathBuf;
use tracing::{info, warn};

use vswitch::daemon::cluster::{load_cache, save_cache};
use vswitch::daemon::config::{ClusterFile, Config, FileConfig};
use vswitch::daemon::control::Control;
use vswitch::daemon::server::router;
use vswitch::datapath::{DatapathConfig, DatapathWorkers};
use vswitch_cluster::{Cluster, ClusterConfig, TlsFiles};

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
    /// On an IPv6 underlay, send VXLAN with a zero UDP checksum (RFC 6935; Linux vxlan's
    /// `udp6zerocsumtx`). Peers must accept it (`udp6zerocsumrx`).
    #[arg(long)]
    udp6_zero_checksum_tx: bool,
    /// On an IPv6 underlay, accept VXLAN with a zero UDP checksum (RFC 6936; Linux vxlan's
    /// `udp6zerocsumrx`), as peers with `udp6zerocsumtx` send it.
    #[arg(long)]
    udp6_zero_checksum_rx: bool,
    /// How the VXLAN uplink meets the underlay: `socket` (the kernel's UDP stack), `xdp`
    /// (AF_XDP on the underlay interface; refuse to start where it cannot run) or `auto`
    /// (AF_XDP where the driver runs it zero-copy, the socket elsewhere; the log says which
    /// and why) [default: socket].
    #[arg(long, value_name = "IO")]
    uplink_io: Option<vswitch::uplink::UplinkIo>,
    /// Datapath worker threads [default: one per core].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Join a cluster whose state is in etcd at these endpoints (comma-separated,
    /// `http://10.0.0.1:2379`); without it vswitchd runs standalone.
    #[arg(long, value_name = "ENDPOINTS", value_delimiter = ',')]
    cluster: Vec<String>,
    /// This host's name in the cluster [default: the hostname].
    #[arg(long, value_name = "NAME")]
    host_name: Option<String>,
    /// Key prefix in etcd [default: /libvirtual/].
    #[arg(long, value_name = "PREFIX")]
    cluster_prefix: Option<String>,
    /// Seconds this host's records outlive it (its lease TTL) [default: 10].
    #[arg(long, value_name = "SECS")]
    lease_ttl: Option<u64>,
    /// PEM CA of etcd's certificates (TLS to etcd).
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd (with --etcd-key).
    #[arg(long, value_name = "FILE")]
    etcd_cert: Option<PathBuf>,
    /// PEM key of --etcd-cert.
    #[arg(long, value_name = "FILE")]
    etcd_key: Option<PathBuf>,
}

/// The cluster membership the flags and the `[cluster]` table ask for.
fn cluster_config(
    args: &Args,
    file: Option<ClusterFile>,
    underlay: &[IpAddr],
    udp_port: u16,
) -> anyhow::Result<Option<ClusterConfig>> {
    let file = file.unwrap_or_default();
    let endpoints = if args.cluster.is_empty() {
        file.endpoints
    } else {
        args.cluster.clone()
    };
    if endpoints.is_empty() {
        return Ok(None);
    }
    let host = match args.host_name.clone().or(file.host) {
        Some(h) => h,
        // The hostname of this UTS namespace.
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("the hostname (give --host-name)")?
            .trim()
            .to_owned(),
    };
    daemon_kit::names::check_name("host", &host).map_err(anyhow::Error::msg)?;
    let ttl = args.lease_ttl.or(file.lease_ttl_secs).unwrap_or(10);
    if !(2..=3600).contains(&ttl) {
        bail!("lease TTL {ttl}: 2 to 3600 seconds");
    }
    let (ca, cert, key) = (
        args.etcd_ca.clone().or(file.ca),
        args.etcd_cert.clone().or(file.cert),
        args.etcd_key.clone().or(file.key),
    );
    let tls =
        (ca.is_some() || cert.is_some() || key.is_some()).then_some(TlsFiles { ca, cert, key });
    Ok(Some(ClusterConfig {
        endpoints,
        host,
        prefix: args
            .cluster_prefix
            .clone()
            .or(file.prefix)
            .unwrap_or_else(|| "/libvirtual/".into()),
        lease_ttl: std::time::Duration::from_secs(ttl),
        tls,
        underlay: underlay.to_vec(),
        udp_port,
    }))
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
        args.underlay.clone()
    };
    if underlay.is_empty() {
        bail!("no underlay address: give --underlay ADDR or `underlay = [...]` in the config");
    }
    let udp_port = args
        .udp_port
        .or(file.udp_port)
        .unwrap_or(overlay_net_port());
    let cluster = cluster_config(&args, file.cluster, &underlay, udp_port)?;
    let underlay_mtu = args
        .underlay_mtu
        .or(file.underlay_mtu)
        .or_else(|| vswitch::uplink::detect_underlay_mtu(&underlay))
        .unwrap_or(1500);
    let udp6_zero_checksum = vswitch::uplink::Udp6ZeroChecksum {
        tx: args.udp6_zero_checksum_tx || file.udp6_zero_checksum_tx.unwrap_or(false),
        rx: args.udp6_zero_checksum_rx || file.udp6_zero_checksum_rx.unwrap_or(false),
    };
    Ok(Config {
        run_dir: common.run_dir,
        state_dir: common.state_dir,
        underlay,
        underlay_mtu,
        udp_port,
        udp6_zero_checksum,
        uplink_io: args.uplink_io.or(file.uplink_io).unwrap_or_default(),
        workers: args.workers.or(file.workers).unwrap_or(0),
        json_logs: common.json_logs,
        socket_access,
        api_max_connections: args
            .common
            .api_max_connections
            .or(file.api_max_connections)
            .map_or(daemon_kit::MAX_API_CONNECTIONS, |n| n as usize),
        cluster,
    })
}

fn overlay_net_port() -> u16 {
    vswitch::overlay_net::VXLAN_PORT
}

/// Most often the cluster view is cached to disk.
const CACHE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

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
            udp6_zero_checksum: cfg.udp6_zero_checksum,
            uplink_io: cfg.uplink_io,
        },
        || Ok(()),
    )
    .context("starting the datapath")?;
    info!(workers = dp.workers(), "datapath started");
    for path in dp.uplink_paths() {
        info!(uplink = %path, "uplink");
    }
    let (control, problems) =
        Control::restore(dp, &cfg.state_dir, &cfg.run_dir).context("restoring state")?;
    for p in &problems {
        warn!(problem = %p, "could not restore");
    }
    let runtime = daemon_kit::runtime()?;
    let mut control = control;
    let cluster = match &cfg.cluster {
        Some(cc) => {
            let cache = load_cache(&cfg.state_dir);
            info!(
                endpoints = ?cc.endpoints,
                host = %cc.host,
                cached_revision = cache.as_ref().map(|v| v.revision),
                "joining the cluster"
            );
            let cluster = Cluster::start(
                cc.clone(),
                runtime.handle(),
                cache,
                control.cluster_bindings(),
            )
            .context("joining the cluster")?;
            control.join_cluster(cluster.clone());
            Some(cluster)
        }
        None => None,
    };
    let shared = Arc::new(Mutex::new(control));
    if let Some(cluster) = cluster.clone() {
        // Changes of the cluster view are applied one batch after the other, off the
        // runtime (they wait for the datapath); the view is cached after each.
        let weak = Arc::downgrade(&shared);
        let state_dir = cfg.state_dir.clone();
        runtime.spawn(async move {
            // The cache is written at most once per CACHE_INTERVAL (an fsync each) while
            // the view moves, and soon after it stops: a busy cluster does not make every
            // change wait for a disk.
            let mut saved_at: Option<std::time::Instant> = None;
            loop {
                let touched = tokio::time::timeout(CACHE_INTERVAL, cluster.changes())
                    .await
                    .ok();
                let Some(shared) = weak.upgrade() else { return };
                let stale = cluster.view().revision != cluster.cached_revision();
                let save = stale && saved_at.is_none_or(|t| t.elapsed() >= CACHE_INTERVAL);
                if touched.is_none() && !save {
                    continue;
                }
                let c = cluster.clone();
                let dir = state_dir.clone();
                let done = tokio::task::spawn_blocking(move || {
                    if let Some(touched) = touched {
                        shared
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .reconcile_cluster(&touched);
                    }
                    if save && c.is_connected() {
                        let view = c.view().clone();
                        if save_cache(&dir, &view) {
                            c.note_cached(view.revision);
                        }
                    }
                })
                .await;
                if let Err(e) = done {
                    warn!(error = %e, "applying cluster changes");
                }
                if save {
                    saved_at = Some(std::time::Instant::now());
                }
            }
        });
    }
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
    info!(underlay = ?cfg.underlay, underlay_mtu = cfg.underlay_mtu, udp6_zero_checksum_tx = cfg.udp6_zero_checksum.tx, udp6_zero_checksum_rx = cfg.udp6_zero_checksum.rx, state = %cfg.state_dir.display(), "configuration");
    if (cfg.udp6_zero_checksum.tx || cfg.udp6_zero_checksum.rx)
        && !cfg.underlay.iter().any(IpAddr::is_ipv6)
    {
        warn!("udp6 zero checksums are set but no underlay address is IPv6: they apply to none");
    }
    runtime.block_on(daemon_kit::serve(
        &socket,
        router(shared, cluster),
        "vswitchd",
        cfg.api_max_connections,
    ))
}
