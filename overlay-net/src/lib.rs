//! `overlay-net`: the sans-IO core of libvirtual's network overlay.
//!
//! Everything here works on byte slices and in-memory tables: no sockets, no threads and no
//! allocation per packet. The I/O shells (vswitchd's datapath, the testbeds) own the buffers and
//! the clock and call in here.
//!
//! * [`frame`]: parse and build inner frames (Ethernet II, 802.1Q, ARP, IPv4, IPv6, UDP) with
//!   `etherparse`.
//! * [`vxlan`]: the 8-byte VXLAN header of RFC 7348 and the 24-bit [`Vni`].
//! * [`encap`]: outer Ethernet + IPv4/IPv6 + UDP + VXLAN written in front of an inner frame
//!   from a precomputed per-tunnel template.
//! * [`decap`]: validation of every outer layer of a received frame, yielding the VNI, the
//!   source VTEP and the inner frame as a slice.
//! * [`flow`]: the inner-flow hash that picks the outer UDP source port (RFC 7348 §5).
//! * [`fdb`]: per-VNI forwarding databases with learning, aging, static entries, capacity
//!   limits and flood lists for head-end replication.
//! * [`mtu`]: overlay MTU arithmetic (RFC 7348 §4.3: never fragment).
//! * [`checksum`]: the Internet checksum, vectorised.
//! * [`gso`]: software TCP segmentation and checksum completion for offloaded frames.
//! * [`wire`]: header field offsets and the accessors of the hand-written fast paths.
//!
//! ```
//! use overlay_net::{DecapConfig, Encapsulator, MacAddr, TunnelConfig, Vni, decapsulate};
//!
//! let tunnel = TunnelConfig::new(
//!     MacAddr([2, 0, 0, 0, 0, 1]),             // our underlay MAC
//!     MacAddr([2, 0, 0, 0, 0, 2]),             // next hop towards the remote VTEP
//!     "192.0.2.1".parse().unwrap(),            // local VTEP
//!     "192.0.2.2".parse().unwrap(),            // remote VTEP
//! );
//! let enc = Encapsulator::new(&tunnel)?;
//! let inner = [0u8; 60]; // an inner Ethernet frame
//! let mut buf = [0u8; 1514];
//! let len = enc.encap(Vni::new(42)?, &inner, &mut buf)?;
//! assert_eq!(len, 50 + 60);
//!
//! let d = decapsulate(&buf[..len], &DecapConfig::default())?;
//! assert_eq!((d.vni.get(), d.inner), (42, &inner[..]));
//! # Ok::<(), overlay_net::Error>(())
//! ```

pub mod checksum;
pub mod decap;
pub mod encap;
mod error;
pub mod fdb;
pub mod flow;
pub mod frame;
pub mod gso;
mod mac;
pub mod mtu;
pub mod vxlan;
pub mod wire;

pub use decap::{DecapConfig, Decapsulated, decapsulate};
pub use encap::{Encapsulator, TunnelConfig};
pub use error::{Error, Layer};
pub use fdb::{
    Destination, Fdb, FdbEntry, LearnOutcome, PortId, TenantFdb, TenantLimits, Timestamp,
};
pub use frame::FrameView;
pub use mac::MacAddr;
pub use mtu::UnderlayFamily;
pub use vxlan::{VXLAN_PORT, Vni};

/// Re-export of the `etherparse` version used for all header parsing and building.
pub use etherparse;
