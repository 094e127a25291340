//! Per-port and per-tenant counters.

use std::fmt;

/// Why the switch dropped a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than an Ethernet header, or a malformed header the switch must read.
    Malformed,
    /// Larger than the tenant MTU allows.
    Oversize,
    /// Source MAC is a group address or zero.
    InvalidSource,
    /// Source MAC differs from the one the port is pinned to.
    SpoofedMac,
    /// Source IP (or ARP sender) is not one the port may use.
    SpoofedIp,
    /// Over the port's rate limit.
    RateLimited,
    /// The destination lies where the frame came from: the same port, or, for a frame from
    /// the underlay, another remote VTEP (frames never go back to the underlay).
    Hairpin,
    /// The port is administratively down or being deleted.
    PortDown,
    /// A frame from the uplink for a VNI with no tenant here.
    UnknownVni,
    /// A frame from the uplink sent by a host that is not one of the tenant's VTEPs (and the
    /// tenant does not learn VTEPs): the underlay cannot inject into a tenant.
    UnknownVtep,
    /// The encapsulated frame would exceed the underlay MTU (never fragmented).
    UnderlayMtu,
    /// The egress queue or socket could not take the frame.
    TxError,
    /// The receiver had no room: a VM's port without a guest or receive buffers (its driver
    /// not started yet, or not keeping up), or a full TAP queue.
    NoRxBuffers,
}

impl DropReason {
    /// Every reason, in a fixed order (the order of the counters array).
    pub const ALL: [DropReason; 13] = [
        DropReason::Malformed,
        DropReason::Oversize,
        DropReason::InvalidSource,
        DropReason::SpoofedMac,
        DropReason::SpoofedIp,
        DropReason::RateLimited,
        DropReason::Hairpin,
        DropReason::PortDown,
        DropReason::UnknownVni,
        DropReason::UnknownVtep,
        DropReason::UnderlayMtu,
        DropReason::TxError,
        DropReason::NoRxBuffers,
    ];

    /// A stable snake_case name (API and metrics label).
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Oversize => "oversize",
            DropReason::InvalidSource => "invalid_source",
            DropReason::SpoofedMac => "spoofed_mac",
            DropReason::SpoofedIp => "spoofed_ip",
            DropReason::RateLimited => "rate_limited",
            DropReason::Hairpin => "hairpin",
            DropReason::PortDown => "port_down",
            DropReason::UnknownVni => "unknown_vni",
            DropReason::UnknownVtep => "unknown_vtep",
            DropReason::UnderlayMtu => "underlay_mtu",
            DropReason::TxError => "tx_error",
            DropReason::NoRxBuffers => "no_rx_buffers",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Drops by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drops([u64; DropReason::ALL.len()]);

impl Drops {
    /// Drops for one reason.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason.index()]
    }

    /// All drops.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// `(reason, count)` for every reason.
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.get(*r)))
    }

    #[inline]
    pub(crate) fn add(&mut self, reason: DropReason) {
        self.0[reason.index()] += 1;
    }
}

/// Counters of one port. "rx" is what the switch received from the port, "tx" what it sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Frames received from the port (dropped ones included).
    pub rx_packets: u64,
    /// Bytes received from the port.
    pub rx_bytes: u64,
    /// Frames sent to the port.
    pub tx_packets: u64,
    /// Bytes sent to the port.
    pub tx_bytes: u64,
    /// Frames from the port that were dropped, by reason.
    pub drops: Drops,
}

/// Counters of one tenant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantCounters {
    /// Frames that entered the tenant (from its ports and the uplink).
    pub rx_packets: u64,
    /// Bytes that entered the tenant.
    pub rx_bytes: u64,
    /// Frames forwarded to one known destination.
    pub unicast: u64,
    /// Frames flooded (broadcast, multicast, unknown unicast).
    pub flooded: u64,
    /// Frames that came from the uplink.
    pub from_uplink: u64,
    /// Drops by reason.
    pub drops: Drops,
    /// Source MACs not learned because the tenant's table is full.
    pub learn_limit_hits: u64,
    /// Learned MACs that moved to another port or VTEP.
    pub mac_moves: u64,
    /// ARP requests answered by the switch (a known binding) instead of flooded.
    pub arp_answered: u64,
}
