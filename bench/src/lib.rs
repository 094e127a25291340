//! Shared fixtures of libvirtual's benchmarks: representative frames and tunnels.
//!
//! The criterion suites live in `benches/`; run them with `cargo bench -p bench`.

use std::net::{IpAddr, SocketAddr};

use overlay_net::frame::build_udp;
use overlay_net::{Encapsulator, MacAddr, TunnelConfig};

/// Source MAC of the sample inner frames.
pub const INNER_SRC: MacAddr = MacAddr([0x02, 0xbe, 0, 0, 0, 1]);
/// Destination MAC of the sample inner frames.
pub const INNER_DST: MacAddr = MacAddr([0x02, 0xbe, 0, 0, 0, 2]);

/// An inner Ethernet + IPv4 + UDP frame of exactly `len` bytes (at least 42).
pub fn inner_udp_frame(len: usize) -> Vec<u8> {
    let payload = vec![0x5a; len.saturating_sub(42)];
    let mut frame = vec![0u8; len.max(42)];
    let src: SocketAddr = ([10, 0, 0, 1], 40000).into();
    let dst: SocketAddr = ([10, 0, 0, 2], 5201).into();
    let n = build_udp(&mut frame, INNER_SRC, INNER_DST, None, src, dst, &payload)
        .unwrap_or_else(|e| panic!("sample frame of {len} bytes: {e}"));
    frame.truncate(n);
    frame
}

/// A tunnel between two documentation addresses of the given family (`"v4"` or `"v6"`).
pub fn tunnel(v6: bool) -> TunnelConfig {
    let (l, r): (IpAddr, IpAddr) = if v6 {
        (
            [0x2001, 0xdb8, 0, 0, 0, 0, 0, 1].into(),
            [0x2001, 0xdb8, 0, 0, 0, 0, 0, 2].into(),
        )
    } else {
        ([192, 0, 2, 1].into(), [192, 0, 2, 2].into())
    };
    TunnelConfig::new(
        MacAddr([2, 0, 0, 0, 0, 1]),
        MacAddr([2, 0, 0, 0, 0, 2]),
        l,
        r,
    )
}

/// An encapsulator for [`tunnel`].
pub fn encapsulator(v6: bool) -> Encapsulator {
    Encapsulator::new(&tunnel(v6)).unwrap_or_else(|e| panic!("bench tunnel: {e}"))
}

/// A small deterministic xorshift generator for request offsets in the comparison suites.
#[derive(Clone, Debug)]
pub struct XorShift(pub u64);

impl XorShift {
    /// The next pseudo-random value (the seed must not be 0).
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
