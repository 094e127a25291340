//! One tenant's L2 domain: the forwarding decision for every frame that enters it.

use std::collections::HashMap;
use std::net::IpAddr;

use overlay_net::frame::FrameView;
use overlay_net::wire;
use overlay_net::{
    Destination, LearnOutcome, MacAddr, PortId, TenantFdb, TenantLimits, Timestamp, Vni,
};

use crate::counters::{DropReason, PortCounters, TenantCounters};
use crate::port::PortConfig;
use crate::ratelimit::TokenBucket;
use crate::{Error, Nanos};

/// A tenant as configured through the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantConfig {
    /// Unique name.
    pub name: String,
    /// Its VXLAN network identifier.
    pub vni: Vni,
    /// L3 MTU of the tenant network (frames may carry `mtu` + 14 bytes, + 4 with an 802.1Q
    /// tag).
    pub mtu: u16,
    /// Forwarding-table limits.
    pub limits: TenantLimits,
    /// Accept VXLAN frames from any underlay host and learn it as a VTEP (flood-and-learn).
    /// Off by default: frames are accepted, and remote MACs learned, only from the tenant's
    /// configured VTEPs; others are dropped as [`DropReason::UnknownVtep`].
    pub learn_vteps: bool,
}

/// Where a frame entered the tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingress {
    /// From a local port.
    Port(PortId),
    /// From the VXLAN uplink, sent by this remote VTEP.
    Uplink(IpAddr),
}

impl Ingress {
    fn destination(self) -> Destination {
        match self {
            Ingress::Port(p) => Destination::Local(p),
            Ingress::Uplink(v) => Destination::Remote(v),
        }
    }
}

/// What to do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it to one destination.
    Unicast(Destination),
    /// Send a copy to every target of [`TenantSwitch::flood_targets`].
    Flood,
    /// An ARP request or IPv6 neighbor solicitation for an address the tenant knows: answer
    /// it to the port it came from with this MAC (see [`TenantSwitch::set_neighbors`] and
    /// [`overlay_net::frame::build_neighbor_reply`]) instead of flooding it.
    Answer(MacAddr),
    /// Drop it (already counted).
    Drop(DropReason),
}

#[derive(Debug)]
struct PortState {
    config: PortConfig,
    policer: TokenBucket,
    counters: PortCounters,
}

/// One tenant: its ports, forwarding table and counters. Tenants share no state, so a datapath
/// may lock or shard them independently.
#[derive(Debug)]
pub struct TenantSwitch {
    config: TenantConfig,
    fdb: TenantFdb,
    ports: HashMap<PortId, PortState, overlay_net::fdb::FastHash>,
    counters: TenantCounters,
    /// Addresses whose ARP requests and neighbor solicitations from local ports the switch
    /// answers.
    neighbors: HashMap<IpAddr, MacAddr>,
}

const ETH_HEADER: usize = wire::ethernet::HEADER_LEN;
const VLAN_TAG: usize = wire::vlan::TAG_LEN;

fn millis(now: Nanos) -> Timestamp {
    Timestamp(now / 1_000_000)
}

impl TenantSwitch {
    /// A tenant without ports. Fails if the MTU is below 68 (the IPv4 minimum).
    pub fn new(config: TenantConfig) -> Result<TenantSwitch, Error> {
        if config.mtu < 68 {
            return Err(Error::invalid(
                "tenant MTU",
                format!("{} is below 68", config.mtu),
            ));
        }
        if config.limits.max_learned == 0 {
            return Err(Error::invalid("tenant MAC limit", "must be at least 1"));
        }
        Ok(TenantSwitch {
            fdb: TenantFdb::new(config.vni, config.limits),
            config,
            ports: Default::default(),
            counters: TenantCounters::default(),
            neighbors: HashMap::new(),
        })
    }

    /// The tenant's configuration.
    pub fn config(&self) -> &TenantConfig {
        &self.config
    }

    /// Changes the tenant's MTU (frames are checked against it from now on).
    pub fn set_mtu(&mut self, mtu: u16) {
        self.config.mtu = mtu;
    }

    /// The tenant's forwarding table (entries, flood lists).
    pub fn fdb(&self) -> &TenantFdb {
        &self.fdb
    }

    /// The forwarding table, for static entries and remote VTEPs.
    pub fn fdb_mut(&mut self) -> &mut TenantFdb {
        &mut self.fdb
    }

    /// Sets the addresses the switch answers for (ARP/ND suppression): a broadcast ARP
    /// request or a multicast neighbor solicitation from a local port for one of them gets a
    /// reply with its MAC and is not flooded. Empty: every request floods, as on a plain L2
    /// network.
    pub fn set_neighbors(&mut self, neighbors: HashMap<IpAddr, MacAddr>) {
        self.neighbors = neighbors;
    }

    /// The addresses the switch answers ARP and ND for.
    pub fn neighbors(&self) -> &HashMap<IpAddr, MacAddr> {
        &self.neighbors
    }

    /// The tenant's counters.
    pub fn counters(&self) -> &TenantCounters {
        &self.counters
    }

    /// A port's configuration and counters.
    pub fn port(&self, id: PortId) -> Option<(&PortConfig, &PortCounters)> {
        self.ports.get(&id).map(|p| (&p.config, &p.counters))
    }

    /// The tenant's ports.
    pub fn ports(&self) -> impl Iterator<Item = (PortId, &PortConfig)> {
        self.ports.iter().map(|(id, p)| (*id, &p.config))
    }

    /// Attaches a port.
    pub fn add_port(&mut self, id: PortId, config: PortConfig) -> Result<(), Error> {
        config.validate()?;
        if self.ports.contains_key(&id) {
            return Err(Error::PortExists(config.name));
        }
        let policer = TokenBucket::new(&config.rate_limit)?;
        self.ports.insert(
            id,
            PortState {
                config,
                policer,
                counters: PortCounters::default(),
            },
        );
        self.fdb.add_port(id);
        Ok(())
    }

    /// Detaches a port; its learned MACs are forgotten.
    pub fn remove_port(&mut self, id: PortId) -> Result<PortConfig, Error> {
        let state = self.ports.remove(&id).ok_or_else(|| Error::no_port(id))?;
        self.fdb.remove_port(id);
        Ok(state.config)
    }

    /// Changes a port's security and rate limit (the name stays).
    pub fn update_port(&mut self, id: PortId, config: PortConfig) -> Result<(), Error> {
        config.validate()?;
        let policer = TokenBucket::new(&config.rate_limit)?;
        let state = self.ports.get_mut(&id).ok_or_else(|| Error::no_port(id))?;
        state.config = config;
        state.policer = policer;
        Ok(())
    }

    /// Largest frame the tenant accepts, for a frame with or without an 802.1Q tag.
    #[inline]
    fn max_frame(&self, tagged: bool) -> usize {
        self.config.mtu as usize + ETH_HEADER + if tagged { VLAN_TAG } else { 0 }
    }

    /// Decides what to do with a frame that entered the tenant, learns its source MAC and
    /// counts it. Never fails: bad frames are dropped with a counted reason.
    ///
    /// The hot path reads the MAC addresses straight from the frame; the L3 headers are
    /// parsed only for ports with IP anti-spoofing.
    #[inline]
    pub fn ingress(&mut self, from: Ingress, frame: &[u8], now: Nanos) -> Verdict {
        self.ingress_sized(from, frame, frame.len(), now)
    }

    /// Like [`TenantSwitch::ingress`] for a frame that carries segmentation offload (a TSO
    /// "super-frame"): the MTU check applies to `wire_len`, the length of the largest segment
    /// it will be cut into, not to the whole frame.
    #[inline]
    pub fn ingress_sized(
        &mut self,
        from: Ingress,
        frame: &[u8],
        wire_len: usize,
        now: Nanos,
    ) -> Verdict {
        let max_untagged = self.max_frame(false);
        // Disjoint borrows: the port's state, the tenant's counters and the table.
        let TenantSwitch {
            ports,
            counters,
            fdb,
            config,
            neighbors,
        } = self;
        counters.rx_packets += 1;
        counters.rx_bytes += frame.len() as u64;
        let mut port = match from {
            Ingress::Port(p) => match ports.get_mut(&p) {
                Some(state) => {
                    state.counters.rx_packets += 1;
                    state.counters.rx_bytes += frame.len() as u64;
                    Some(state)
                }
                None => return Self::dropped(counters, None, DropReason::PortDown),
            },
            Ingress::Uplink(vtep) => {
                if !config.learn_vteps && !fdb.remote_vteps().contains(&vtep) {
                    return Self::dropped(counters, None, DropReason::UnknownVtep);
                }
                counters.from_uplink += 1;
                None
            }
        };
        let Some(hdr) = frame.first_chunk::<14>() else {
            return Self::dropped(counters, port, DropReason::Malformed);
        };
        let mac = |field: wire::Field| MacAddr(hdr[field].try_into().unwrap_or_default());
        let (destination, source) = (
            mac(wire::ethernet::DESTINATION),
            mac(wire::ethernet::SOURCE),
        );
        let tagged = wire::be16(hdr, wire::vlan::TPID) == wire::ethertype::VLAN;
        if tagged && frame.len() < ETH_HEADER + VLAN_TAG {
            return Self::dropped(counters, port, DropReason::Malformed);
        }
        if wire_len > max_untagged + if tagged { VLAN_TAG } else { 0 } {
            return Self::dropped(counters, port, DropReason::Oversize);
        }
        if !source.is_unicast() {
            return Self::dropped(counters, port, DropReason::InvalidSource);
        }
        if let Some(state) = port.as_deref_mut() {
            if let Some(sec) = &state.config.security {
                let verdict = FrameView::parse(frame)
                    .map_err(|_| DropReason::Malformed)
                    .and_then(|view| sec.check(&view));
                if let Err(reason) = verdict {
                    return Self::dropped(counters, port, reason);
                }
            }
            if !state.policer.conform(now, frame.len()) {
                return Self::dropped(counters, port, DropReason::RateLimited);
            }
        }
        let ts = millis(now);
        match fdb.learn(source, from.destination(), ts) {
            LearnOutcome::LimitReached => counters.learn_limit_hits += 1,
            LearnOutcome::Moved { .. } => counters.mac_moves += 1,
            _ => {}
        }
        if destination.is_multicast() {
            if !neighbors.is_empty()
                && !tagged
                && matches!(from, Ingress::Port(_))
                && let Some(mac) = answer_for(neighbors, destination, source, frame)
            {
                counters.arp_answered += 1;
                return Verdict::Answer(mac);
            }
            counters.flooded += 1;
            return Verdict::Flood;
        }
        match (fdb.lookup(destination, ts), from) {
            (None, _) => {
                counters.flooded += 1;
                Verdict::Flood
            }
            (Some(Destination::Local(q)), Ingress::Port(p)) if q == p => {
                Self::dropped(counters, port, DropReason::Hairpin)
            }
            (Some(Destination::Remote(_)), Ingress::Uplink(_)) => {
                Self::dropped(counters, port, DropReason::Hairpin)
            }
            (Some(dest), _) => {
                counters.unicast += 1;
                Verdict::Unicast(dest)
            }
        }
    }

    #[cold]
    fn dropped(
        counters: &mut TenantCounters,
        port: Option<&mut PortState>,
        reason: DropReason,
    ) -> Verdict {
        counters.drops.add(reason);
        if let Some(p) = port {
            p.counters.drops.add(reason);
        }
        Verdict::Drop(reason)
    }

    /// Where copies of a flooded frame go (split horizon: never back where it came from, and
    /// frames from the underlay only to local ports).
    pub fn flood_targets(&self, from: Ingress) -> impl Iterator<Item = Destination> + '_ {
        self.fdb.flood_targets(from.destination())
    }

    /// Counts a frame the datapath sent to a local port.
    #[inline]
    pub fn count_tx(&mut self, port: PortId, bytes: usize) {
        self.count_tx_frames(port, 1, bytes as u64);
    }

    /// Counts `frames` frames of `bytes` bytes in all sent to a local port.
    pub fn count_tx_frames(&mut self, port: PortId, frames: u64, bytes: u64) {
        if let Some(p) = self.ports.get_mut(&port) {
            p.counters.tx_packets += frames;
            p.counters.tx_bytes += bytes;
        }
    }

    /// Counts a drop the datapath made after the verdict (underlay MTU, transmit errors).
    pub fn count_drop(&mut self, port: Option<PortId>, reason: DropReason) {
        let state = port.and_then(|p| self.ports.get_mut(&p));
        Self::dropped(&mut self.counters, state, reason);
    }
}

/// The MAC to answer a neighbor request in `frame` with, if it asks for a known address: a
/// broadcast ARP request (not a gratuitous ARP or a probe), or a neighbor solicitation to a
/// solicited-node multicast address (not duplicate address detection); never the owner
/// asking about itself.
#[cold]
fn answer_for(
    neighbors: &HashMap<IpAddr, MacAddr>,
    destination: MacAddr,
    source: MacAddr,
    frame: &[u8],
) -> Option<MacAddr> {
    let (target, asker) = if destination == MacAddr::BROADCAST {
        let view = FrameView::parse(frame).ok()?;
        let overlay_net::frame::Network::Arp(arp) = view.network else {
            return None;
        };
        // Gratuitous ARP and address-conflict probes (RFC 5227, from 0.0.0.0) flood.
        if arp.operation != 1 || arp.sender_ip == arp.target_ip || arp.sender_ip.is_unspecified() {
            return None;
        }
        (IpAddr::V4(arp.target_ip), arp.sender_mac)
    } else if destination.0[..3] == [0x33, 0x33, 0xff] {
        let ns = overlay_net::frame::parse_solicitation(frame)?;
        (IpAddr::V6(ns.target), ns.source_mac)
    } else {
        return None;
    };
    let mac = *neighbors.get(&target)?;
    (mac != source && mac != asker).then_some(mac)
}
