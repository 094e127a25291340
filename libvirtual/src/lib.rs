//! `libvirtual`: the public Rust API over libvirtual's daemons.
//!
//! * [`net`]: the typed clients of vswitchd (tenants, ports, VTEPs, forwarding tables,
//!   metrics), on the request/response types of [`vswitch_api`].
//! * [`block`]: the typed clients of vblockd (pools, volumes, snapshots, clones, data,
//!   image import and export), on the request/response types of [`vblock_api`].
//! * Each comes as an `AsyncClient` (any tokio runtime) and a blocking `Client` that wraps
//!   it (for programs without a runtime; it refuses to run inside one).
//! * [`host`]: the high-level model: a host with tenants, ports, pools and volumes, and a
//!   VM's attachment (NIC + disk) with the QEMU arguments that use it.
//! * [`http`]: the small async HTTP/1.1 client for unix-socket APIs under them.
//!
//! * [`cni`]: the CNI plugin `vswitch-cni` (containers join tenants).
//!
//! The `vctl` binary is the command line over these clients.
//!
//! Cargo features (all on by default): `net` (vswitchd's clients and `vswitch_api`: serde
//! types, no datapath), `block` (vblockd's clients and `vblock_api`), `switch` (the
//! embeddable switch re-exported as `vswitch`), `store` (the embeddable block store as
//! `vblock`), `overlay` (`overlay_net` re-exported), `images` (raw/qcow2 in and out), `cni`
//! (the plugin; needs `net`), `cli` (`vctl`; needs `net` and `block`). `host` needs `net` and
//! `block`. A program that only drives vblockd takes
//! `default-features = false, features = ["block"]` and builds neither daemon's internals.

#[cfg(any(feature = "net", feature = "block"))]
mod blocking;

#[cfg(feature = "block")]
pub mod block;
#[cfg(feature = "cni")]
pub mod cni;
#[cfg(feature = "docker")]
pub mod docker;
#[cfg(all(feature = "net", feature = "block"))]
pub mod host;
pub mod http;
#[cfg(feature = "images")]
pub mod image;
#[cfg(feature = "net")]
pub mod net;

/// Re-export of the overlay wire core (feature `overlay`).
#[cfg(feature = "overlay")]
pub use overlay_net;
/// Re-export of the block store crate, to embed it (feature `store`).
#[cfg(feature = "store")]
pub use vblock;
/// vblockd's API types (feature `block`).
#[cfg(feature = "block")]
pub use vblock_api;
/// Re-export of the switch crate, to embed it (feature `switch`).
#[cfg(feature = "switch")]
pub use vswitch;
/// vswitchd's API types (feature `net`).
#[cfg(feature = "net")]
pub use vswitch_api;

/// Errors of the clients.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon's socket could not be reached (the message says what to do).
    #[error("cannot reach {socket}: {}", connect_advice(source))]
    Connect {
        /// The socket path.
        socket: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed mid-request.
    #[error("talking to {socket}: {source}")]
    Io {
        /// The socket path.
        socket: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered with an API error.
    #[error("{code}: {message} (HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable error code (`not_found`, `conflict`, `invalid`, `internal`).
        code: String,
        /// The daemon's message.
        message: String,
    },
    /// The answer was not what the API promises.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// A local file (an image to import or export) could not be read or written.
    #[error("{what}: {source}")]
    File {
        /// The file and what was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The request cannot be made as asked (checked before anything was sent).
    #[error("{0}")]
    Refused(String),
}

/// What a failed connection to a daemon's socket means, and what to do about it.
fn connect_advice(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::PermissionDenied => format!(
            "{e}: the daemons' sockets are for root only (mode 0600); run this as root \
             (e.g. sudo)"
        ),
        ErrorKind::NotFound => format!(
            "{e}: is the daemon running? (start it, or point --socket at the socket it serves)"
        ),
        ErrorKind::ConnectionRefused => format!(
            "{e}: a socket file is there but no daemon listens on it (it stopped; start it \
             again)"
        ),
        _ => e.to_string(),
    }
}

/// The README's Rust examples, compiled (and run where they need no daemon) as doc tests.
#[cfg(all(doctest, feature = "net", feature = "block"))]
#[doc = include_str!("../../README.md")]
struct ReadmeExamples;
