//! vblockd: libvirtual's block storage daemon.
//!
//! Serves thin-provisioned pools (files or block devices, io_uring with O_DIRECT): volumes,
//! snapshots, clones, I/O limits, through the JSON API on `RUN_DIR/vblockd.sock`
//! (docs/api.md). The list of pools is persisted in `STATE_DIR/vblockd.json`; each pool's
//! own metadata is crash-consistent on its device (docs/format.md).

use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use tracing::{info, warn};
use vblock::api::PoolSpec;
use vblock::daemon::config::FileConfig;
use vblock::daemon::control::{Control, NbdCatalog};
use vblock::daemon::server::router;
use vblock::nbd::{AllowedNet, ListenerPolicy, NbdServer};

/// libvirtual's block storage daemon.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    common: daemon_kit::CommonArgs,
    /// A pool to serve, NAME=PATH (an existing pool; repeatable).
    #[arg(long = "pool", value_parser = parse_pool)]
    pools: Vec<PoolSpec>,
    /// Also serve NBD over TCP on ADDR:PORT (repeatable; needs --nbd-allow). The unix
    /// socket RUN_DIR/nbd.sock is always served.
    #[arg(long = "nbd-listen")]
    nbd_listen: Vec<std::net::SocketAddr>,
    /// A client network allowed on the NBD TCP listeners (CIDR; repeatable).
    #[arg(long = "nbd-allow", value_parser = parse_net)]
    nbd_allow: Vec<AllowedNet>,
    /// Exports offered on the NBD TCP listeners: POOL/VOLUME, or POOL/* for a whole pool
    /// (repeatable; default: every volume).
    #[arg(long = "nbd-export", value_name = "POOL/VOLUME")]
    nbd_export: Vec<String>,
    /// TLS on the NBD TCP listeners (clients must STARTTLS): the server's certificate
    /// chain (PEM). Needs --nbd-tls-key.
    #[arg(long = "nbd-tls-cert", value_name = "PEM")]
    nbd_tls_cert: Option<std::path::PathBuf>,
    /// The server's private key (PEM).
    #[arg(long = "nbd-tls-key", value_name = "PEM")]
    nbd_tls_key: Option<std::path::PathBuf>,
    /// Require client certificates issued by this CA (PEM).
    #[arg(long = "nbd-tls-client-ca", value_name = "PEM")]
    nbd_tls_client_ca: Option<std::path::PathBuf>,
    /// Open NBD connections at most per listener (default 128); more wait until one ends.
    #[arg(long = "nbd-max-connections", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    nbd_max_connections: Option<u32>,
    /// Seconds an NBD client has, from connecting, to choose an export (default 10; the
    /// TLS handshake included).
    #[arg(long = "nbd-handshake-timeout", value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    nbd_handshake_timeout: Option<u64>,
    /// Seconds of silence between requests after which an NBD connection gives its threads
    /// back until its client speaks again (default 30; the connection stays open).
    #[arg(long = "nbd-idle-after", value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    nbd_idle_after: Option<u64>,
    /// Commit writes no client flushed after this many seconds at most (default 30; each
    /// commit flushes the pool's device).
    #[arg(long = "commit-interval", value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    commit_interval: Option<u64>,
}

fn parse_net(s: &str) -> Result<AllowedNet, String> {
    s.parse()
}

fn parse_pool(s: &str) -> Result<PoolSpec, String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: use NAME=PATH"))?;
    Ok(PoolSpec {
        name: name.into(),
        path: path.into(),
        size: None,
        preallocation: Default::default(),
        space: Default::default(),
    })
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    daemon_kit::run_main("vblockd", || serve(args))
}

fn serve(args: Args) -> anyhow::Result<()> {
    let file = match &args.common.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let common = args
        .common
        .resolve(file.run_dir, file.state_dir, file.log_format)?;
    daemon_kit::init_logs(common.json_logs);
    args.common
        .socket_access(
            file.socket_owner.clone(),
            file.socket_group.clone(),
            file.socket_mode.clone(),
        )?
        .install();
    let (run_dir, state_dir) = (common.run_dir, common.state_dir);
    let commit_interval = match args.commit_interval.or(file.commit_interval) {
        Some(0) => anyhow::bail!("commit_interval: at least 1 second"),
        Some(s) => std::time::Duration::from_secs(s),
        None => vblock::DEFAULT_COMMIT_INTERVAL,
    };
    let mut pools = file.pools;
    pools.extend(args.pools);
    daemon_kit::SocketAccess::create_dir(&run_dir)
        .with_context(|| format!("creating {}", run_dir.display()))?;
    let (control, problems) = Control::restore(&state_dir, &run_dir, &pools, commit_interval)
        .context("restoring state")?;
    for p in &problems {
        warn!(problem = %p, "could not open");
    }
    let shared = Arc::new(Mutex::new(control));
    // Saved pools and exports that could not be restored are tried again every few seconds
    // (a file system mounted late); they stay in the state meanwhile.
    daemon_kit::spawn_retries(
        "vblockd-retry",
        std::time::Duration::from_secs(3),
        Arc::downgrade(&shared),
        |c| {
            if !c.unrestored().is_empty() {
                c.retry_unrestored();
            }
        },
    )?;
    info!(state = %state_dir.display(), pools = shared.lock().map(|c| c.pools().len()).unwrap_or(0), "configuration");
    let mut nbd = NbdServer::new(Arc::new(NbdCatalog(shared.clone())));
    shared
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .set_nbd(nbd.connections());
    let nbd_socket = run_dir.join("nbd.sock");
    let mut policy = ListenerPolicy::default();
    if let Some(n) = args.nbd_max_connections.or(file.nbd_max_connections) {
        anyhow::ensure!(n > 0, "nbd_max_connections: at least 1");
        policy.max_connections = n as usize;
    }
    if let Some(s) = args.nbd_handshake_timeout.or(file.nbd_handshake_timeout) {
        anyhow::ensure!(s > 0, "nbd_handshake_timeout: at least 1 second");
        policy.handshake_timeout = std::time::Duration::from_secs(s);
    }
    if let Some(s) = args.nbd_idle_after.or(file.nbd_idle_after) {
        anyhow::ensure!(s > 0, "nbd_idle_after: at least 1 second");
        policy.idle_after = std::time::Duration::from_secs(s);
    }
    nbd.listen_unix(&nbd_socket, policy.clone())
        .with_context(|| format!("NBD socket {}", nbd_socket.display()))?;
    let mut listen = file.nbd_listen;
    listen.extend(args.nbd_listen);
    let mut allow: Vec<AllowedNet> = file
        .nbd_allow
        .iter()
        .map(|s| s.parse().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    allow.extend(args.nbd_allow);
    if !listen.is_empty() && allow.is_empty() {
        anyhow::bail!("NBD over TCP needs an allow-list (--nbd-allow CIDR)");
    }
    policy.allow = allow;
    policy.exports = file.nbd_exports;
    policy.exports.extend(args.nbd_export);
    for e in &policy.exports {
        let ok = e
            .split_once('/')
            .is_some_and(|(p, v)| !p.is_empty() && !v.is_empty() && !v.contains('/'));
        anyhow::ensure!(ok, "NBD export {e:?}: use POOL/VOLUME or POOL/*");
    }
    let cert = args.nbd_tls_cert.or(file.nbd_tls_cert);
    let key = args.nbd_tls_key.or(file.nbd_tls_key);
    let client_ca = args.nbd_tls_client_ca.or(file.nbd_tls_client_ca);
    policy.tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(
            vblock::nbd::tls::server_config(&cert, &key, client_ca.as_deref())
                .context("NBD TLS")?,
        ),
        (None, None) if client_ca.is_none() => None,
        _ => anyhow::bail!(
            "NBD TLS needs both a certificate and a key (--nbd-tls-cert, --nbd-tls-key)"
        ),
    };
    for addr in listen {
        nbd.listen_tcp(addr, policy.clone())
            .with_context(|| format!("NBD on {addr}"))?;
        info!(%addr, ?policy, "NBD over TCP");
    }
    info!(socket = %nbd_socket.display(), "NBD exports");
    let socket = run_dir.join("vblockd.sock");
    let api_max = args
        .common
        .api_max_connections
        .or(file.api_max_connections)
        .map_or(daemon_kit::MAX_API_CONNECTIONS, |n| n as usize);
    let served = daemon_kit::runtime()?.block_on(daemon_kit::serve(
        &socket,
        router(shared.clone()),
        "vblockd",
        api_max,
    ));
    // Clean shutdown: NBD clients go (their writes flushed), then every pool's journal is
    // folded into a checkpoint.
    drop(nbd);
    shared.lock().unwrap_or_else(|e| e.into_inner()).close_all();
    served
}
