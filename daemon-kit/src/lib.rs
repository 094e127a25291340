//! `daemon-kit`: what libvirtual's daemons (vswitchd, vblockd) and their clients share.
//!
//! Always: the conventions both sides agree on ([`default_run_dir`], the rule for
//! [`names`]). With the `server`
//! feature (default): logs, the unix-socket API server, state files and API errors.

use std::path::PathBuf;

pub mod names;
#[cfg(feature = "server")]
mod server;
#[cfg(feature = "server")]
pub use server::*;

/// The default run directory of the daemons' sockets: `/run/libvirtual` as root,
/// `$XDG_RUNTIME_DIR/libvirtual` otherwise (DESIGN.md conventions).
pub fn default_run_dir() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
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
