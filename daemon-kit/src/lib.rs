//! `daemon-kit`: what libvirtual's daemons (vswitchd, vblockd) share: structured logs and the
//! control API served over HTTP/1.1 on a unix socket with clean shutdown.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, bail};
use tracing::{error, info};

/// Sets up `tracing` logs: human-readable, or JSON lines with `json`; the level comes from
/// `RUST_LOG` (default `info`).
pub fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
}

/// Parses a `--log-format` value: `human` or `json`; returns true for JSON.
pub fn json_logs(format: &str) -> anyhow::Result<bool> {
    match format {
        "human" => Ok(false),
        "json" => Ok(true),
        other => bail!("log format {other:?}: use human or json"),
    }
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
    info!("shutting down");
}

/// Serves `router` on the unix socket `socket` (mode 0600) until SIGINT/SIGTERM, then removes
/// the socket. A socket left by a crashed instance is replaced; one a live instance answers
/// on is not (`daemon` names the daemon in that error).
pub async fn serve(socket: &Path, router: axum::Router, daemon: &str) -> anyhow::Result<()> {
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            bail!("another {daemon} serves {}", socket.display());
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale {}", socket.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %socket.display(), "{daemon} ready");
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await;
    let _ = std::fs::remove_file(socket);
    if let Err(e) = served {
        error!(error = %e, "API server failed");
        return Err(e.into());
    }
    Ok(())
}

/// A multi-threaded tokio runtime for the control API (two workers: the API is not a
/// datapath).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")
}
