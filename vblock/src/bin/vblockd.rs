//! vblockd: libvirtual's block storage daemon.
//!
//! Serves thin-provisioned pools (files or block devices, io_uring with O_DIRECT): volumes,
//! snapshots, clones, I/O limits, through the JSON API on `RUN_DIR/vblockd.sock`
//! (docs/api.md). The list of pools is persisted in `STATE_DIR/vblockd.json`; each pool's
//! own metadata is crash-consistent on its device (docs/format.md).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use tracing::{info, warn};
use vblock::api::{PoolSpec, default_run_dir};
use vblock::daemon::config::FileConfig;
use vblock::daemon::control::Control;
use vblock::daemon::server::router;

/// libvirtual's block storage daemon.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML config file (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory of the control socket (default /run/libvirtual as root).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Directory of the persisted state (default /var/lib/libvirtual).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// A pool to serve, NAME=PATH (an existing pool; repeatable).
    #[arg(long = "pool", value_parser = parse_pool)]
    pools: Vec<PoolSpec>,
    /// Log format: human or json.
    #[arg(long)]
    log_format: Option<String>,
}

fn parse_pool(s: &str) -> Result<PoolSpec, String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: use NAME=PATH"))?;
    Ok(PoolSpec {
        name: name.into(),
        path: path.into(),
        size: None,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let log_format = args
        .log_format
        .or(file.log_format)
        .unwrap_or_else(|| "human".into());
    daemon_kit::init_logs(daemon_kit::json_logs(&log_format)?);
    let run_dir = args
        .run_dir
        .or(file.run_dir)
        .unwrap_or_else(default_run_dir);
    let state_dir = args
        .state_dir
        .or(file.state_dir)
        .unwrap_or_else(|| PathBuf::from("/var/lib/libvirtual"));
    let mut pools = file.pools;
    pools.extend(args.pools);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let (control, problems) =
        Control::restore(&state_dir, &run_dir, &pools).context("restoring state")?;
    for p in &problems {
        warn!(problem = %p, "could not open");
    }
    let shared = Arc::new(Mutex::new(control));
    info!(state = %state_dir.display(), pools = shared.lock().map(|c| c.pools().len()).unwrap_or(0), "configuration");
    let socket = run_dir.join("vblockd.sock");
    let served = daemon_kit::runtime()?.block_on(daemon_kit::serve(
        &socket,
        router(shared.clone()),
        "vblockd",
    ));
    // Clean shutdown: every pool's journal is folded into a checkpoint.
    shared.lock().unwrap_or_else(|e| e.into_inner()).close_all();
    served
}
