//! `vswitch-docker`: the Docker network plugin of libvirtual (remote network driver and
//! IPAM driver). It serves `PLUGIN_DIR/NAME.sock` (default `/run/docker/plugins/libvirtual.sock`,
//! where dockerd finds it as `--driver libvirtual` / `--ipam-driver libvirtual`) and backs
//! each Docker network with a vswitchd tenant (`--opt tenant=NAME`). Its state (networks,
//! endpoints, pools) is kept in `STATE_DIR/vswitch-docker-NAME.json`. Start it before
//! dockerd; it must run in the network namespace of dockerd and vswitchd.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use libvirtual::docker::Plugin;
use libvirtual::net::AsyncClient;

/// libvirtual's Docker network plugin.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The plugin's name: `docker network create --driver NAME --ipam-driver NAME`.
    #[arg(long, default_value = "libvirtual")]
    name: String,
    /// Where dockerd looks for plugin sockets.
    #[arg(long, default_value = "/run/docker/plugins", value_name = "DIR")]
    plugin_dir: PathBuf,
    /// vswitchd's API socket [default: RUN_DIR/vswitchd.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Directory of the persisted state [default: $LIBVIRTUAL_STATE_DIR, else
    /// /var/lib/libvirtual].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, default_value = "human", value_parser = ["human", "json"])]
    log_format: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    daemon_kit::run_main("vswitch-docker", || serve(args))
}

fn serve(args: Args) -> anyhow::Result<()> {
    daemon_kit::init_logs(args.log_format == "json");
    if daemon_kit::names::check_port_name(&args.name).is_err() {
        bail!(
            "plugin name {:?}: letters, digits, '_', '.', '-' (at most 15)",
            args.name
        );
    }
    let state_dir = args.state_dir.unwrap_or_else(|| {
        std::env::var_os("LIBVIRTUAL_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/libvirtual"))
    });
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    std::fs::create_dir_all(&args.plugin_dir)
        .with_context(|| format!("creating {}", args.plugin_dir.display()))?;
    let switch = AsyncClient::new(args.socket.unwrap_or_else(libvirtual::net::default_socket));
    let plugin = Plugin::new(
        switch,
        state_dir.join(format!("vswitch-docker-{}.json", args.name)),
    )
    .context("loading the plugin's state")?;
    let socket = args.plugin_dir.join(format!("{}.sock", args.name));
    let runtime = daemon_kit::runtime()?;
    // Ports of endpoints made by requests whose answers were lost go before Docker asks
    // anything (best effort: vswitchd may not answer yet; they are found again next start).
    match runtime.block_on(plugin.reconcile()) {
        Ok(n) => tracing::info!(removed = n, "docker endpoints reconciled with vswitchd"),
        Err(e) => tracing::warn!(error = %e, "could not reconcile docker endpoints with vswitchd"),
    }
    runtime.block_on(daemon_kit::serve(
        &socket,
        plugin.router(),
        "vswitch-docker",
        daemon_kit::MAX_API_CONNECTIONS,
    ))
}
