//! `daemon-kit`: what libvirtual's daemons (vswitchd, vblockd) and their clients share.
//!
//! Always: the conventions both sides agree on ([`default_run_dir`], the rule for
//! [`names`]), who may connect to a daemon's sockets ([`SocketAccess`]) and the one error
//! envelope of their APIs ([`ApiError`], [`ErrorResponse`]). With the `server`
//! feature (default): logs, the unix-socket API server, state files and API errors.

use std::path::PathBuf;

mod access;
mod api_error;
pub mod names;
#[cfg(feature = "server")]
mod server;
pub use access::SocketAccess;
pub use api_error::{ApiError, ErrorBody, ErrorResponse, Unrestored};
#[cfg(feature = "server")]
pub use server::*;

/// The default run directory of the daemons' sockets: `$LIBVIRTUAL_RUN_DIR` if set, else
/// `/run/libvirtual` as root and `$XDG_RUNTIME_DIR/libvirtual` otherwise. Daemons and clients
/// agree on it, so `LIBVIRTUAL_RUN_DIR` moves a whole installation (tests, a second instance).
pub fn default_run_dir() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    if let Some(dir) = std::env::var_os("LIBVIRTUAL_RUN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    // /proc/self belongs to the effective user of this process.
    if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        PathBuf::from("/run/libvirtual")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join("libvirtual")
    }
}

/// The default directory of the daemons' persisted state: `$LIBVIRTUAL_STATE_DIR` if set,
/// else `/var/lib/libvirtual`.
pub fn default_state_dir() -> PathBuf {
    std::env::var_os("LIBVIRTUAL_STATE_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/libvirtual"))
}
