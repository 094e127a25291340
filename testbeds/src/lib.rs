//! `testbeds`: network-namespace hosts, kernel peers and the end-to-end proofs of libvirtual.
//!
//! * [`daemon`]: daemons as processes in test hosts, and an HTTP client for their sockets.
//! * [`cni`]: a miniature CNI runtime that runs `vswitch-cni` and the reference plugins.
//! * [`netns`]: uniquely named namespaces that are always removed.
//! * [`transport`]: a userspace VTEP's underlay, as a UDP socket or a raw packet socket.
//! * [`overlay_host`]: a `smoltcp` tenant host living inside a VNI through overlay-net.
//! * [`kernel_peer`]: the interop bed against the Linux kernel's `vxlan` device and the
//!   scenario the tests and the demo run.
//! * [`podman`]: podman with the CNI backend, confined to a scratch directory.
//! * [`containerd`]: a private containerd driven by `ctr run --cni`, confined likewise.
//! * [`probe`]: `ping` and TCP transfers between endpoints.
//! * [`switch_bed`]: hosts running the vswitch datapath on a shared underlay, TAP endpoints,
//!   and a kernel VXLAN host for interop.
//! * [`switch_demo`]: the vswitchd part of the demo.
//! * [`scratch`]: scratch directories removed on drop.
//! * [`tour`]: the whole-system demo (two hosts, tenants, containers, a VM from a clone).
//! * [`interrupt`]: Ctrl-C that unwinds a bed so that everything is cleaned up.
//! * [`wait`]: waiting for events with generous deadlines (never for a fixed time).
//!
//! Everything here needs root (network namespaces); the library crates never depend on it.

pub mod blk_client;
pub mod cni;
pub mod containerd;
pub mod daemon;
pub mod docker;
pub mod etcd;
pub mod guest;
pub mod interrupt;
pub mod kernel_peer;
pub mod netns;
pub mod overlay_host;
pub mod pki;
pub mod podman;
pub mod probe;
pub mod process;
pub mod scratch;
pub mod switch_bed;
pub mod switch_demo;
pub mod tour;
pub mod transport;
pub mod wait;

/// Errors of the test beds.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call or file operation failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// An external command (ip, ping, ethtool) failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// overlay-net refused something.
    #[error(transparent)]
    Overlay(#[from] overlay_net::Error),
    /// The bed could not be set up or a check could not run.
    #[error("{0}")]
    Setup(String),
    /// Ctrl-C was pressed ([`interrupt`]).
    #[error("interrupted")]
    Interrupted,
}
