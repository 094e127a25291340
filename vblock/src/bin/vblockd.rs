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
use vblock::daemon::control::Control;
use vblock::daemon::server::router;

/// libvirtual's block storage daemon.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    common: daemon_kit::CommonArgs,
    /// A pool to serve, NAME=PATH (an existing pool; repeatable).
    #[arg(long = "pool", value_parser = parse_pool)]
    pools: Vec<PoolSpec>,
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
    let file = match &args.common.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let common = args
        .common
        .resolve(file.run_dir, file.state_dir, file.log_format)?;
    daemon_kit::init_logs(common.json_logs);
    let (run_dir, state_dir) = (common.run_dir, common.state_dir);
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
