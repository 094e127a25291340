//! Per-tenant forwarding databases: MAC address -> local port or remote VTEP.
//!
//! Each tenant (VNI) has its own table, so two tenants may use the same MAC addresses. Learned
//! entries age out; static entries never age and are never overwritten by learning. A
//! per-tenant limit bounds learned entries: at the limit learning stops, and the entries that
//! exist keep working. A table starts with room for [`INITIAL_CAPACITY`] entries and doubles
//! when it fills, so learning allocates at most log2(limit) times in a table's life, never per
//! packet, and a tenant with few MACs does not pay (in memory and cache) for its limit. Flood
//! lists (local ports and remote VTEPs) drive head-end
//! replication with split horizon: frames from a remote VTEP are never sent back to the
//! underlay.
//!
//! Time is passed in by the caller as a [`Timestamp`] (milliseconds of a monotonic clock the
//! caller owns), as in every sans-IO core: the datapath reads its clock once per burst, not
//! once per lookup.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::vxlan::Vni;
use crate::{Error, MacAddr};

/// A local switch port, numbered by the switch.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct PortId(pub u32);

/// Where frames for a MAC address go.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Destination {
    /// A port on this switch.
    Local(PortId),
    /// A remote VTEP, reached through the VXLAN uplink.
    Remote(IpAddr),
}

/// A point in time: milliseconds on a monotonic clock chosen by the caller.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Milliseconds from `epoch` to `now` (zero if `now` is earlier).
    pub fn since(epoch: Instant, now: Instant) -> Timestamp {
        Timestamp(now.saturating_duration_since(epoch).as_millis() as u64)
    }

    /// This timestamp plus a duration (saturating).
    #[inline]
    pub fn after(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(d.as_millis() as u64))
    }
}

/// One forwarding entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FdbEntry {
    /// Where the MAC lives.
    pub destination: Destination,
    /// Configured by the operator: never ages, never moved by learning.
    pub is_static: bool,
    /// When a frame from this MAC was last seen (learned entries).
    pub last_seen: Timestamp,
}

/// Limits of one tenant's table.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TenantLimits {
    /// Most learned entries (static entries are not counted).
    pub max_learned: usize,
    /// How long a learned entry lives without traffic from its MAC.
    pub aging: Duration,
}

impl Default for TenantLimits {
    /// 8192 learned MACs, 300 s aging (the IEEE 802.1D default, as in Linux bridges).
    fn default() -> Self {
        TenantLimits {
            max_learned: 8192,
            aging: Duration::from_secs(300),
        }
    }
}

/// What [`TenantFdb::learn`] did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LearnOutcome {
    /// A new entry was created.
    Learned,
    /// The entry existed with the same destination; its age was reset.
    Refreshed,
    /// The MAC moved to a new destination (a VM migrated, or a loop).
    Moved {
        /// The previous destination.
        from: Destination,
    },
    /// A static entry exists for this MAC; it was left alone.
    Static,
    /// The tenant's table is full; nothing was learned.
    LimitReached,
    /// Group or zero source addresses are never learned.
    NotUnicast,
}

/// The fast, per-process seeded hasher the overlay and switch tables use (foldhash).
pub type FastHash = foldhash::fast::RandomState;

/// Keyed by [`MacAddr::to_u64`]: a `u64` hashes and compares in one instruction each, where a
/// six-byte array costs several loads.
type MacMap = HashMap<u64, FdbEntry, FastHash>;

/// The forwarding table and flood list of one tenant.
#[derive(Debug)]
pub struct TenantFdb {
    vni: Vni,
    limits: TenantLimits,
    aging_ms: u64,
    entries: MacMap,
    learned: usize,
    local_ports: Vec<PortId>,
    remote_vteps: Vec<IpAddr>,
    last_full_sweep: Option<Timestamp>,
}

/// Entries a tenant's table has room for before it first grows.
pub const INITIAL_CAPACITY: usize = 256;

/// How often (ms) a full table may be swept for expired entries on the learning path.
const FULL_SWEEP_INTERVAL_MS: u64 = 1000;

impl TenantFdb {
    /// An empty table for `vni`.
    pub fn new(vni: Vni, limits: TenantLimits) -> TenantFdb {
        TenantFdb {
            vni,
            limits,
            aging_ms: limits.aging.as_millis() as u64,
            entries: MacMap::with_capacity_and_hasher(
                limits.max_learned.min(INITIAL_CAPACITY),
                Default::default(),
            ),
            learned: 0,
            local_ports: Vec::new(),
            remote_vteps: Vec::new(),
            last_full_sweep: None,
        }
    }

    /// The tenant's VNI.
    pub fn vni(&self) -> Vni {
        self.vni
    }

    /// The tenant's limits.
    pub fn limits(&self) -> TenantLimits {
        self.limits
    }

    #[inline]
    fn is_live(aging_ms: u64, entry: &FdbEntry, now: Timestamp) -> bool {
        entry.is_static || now.0.saturating_sub(entry.last_seen.0) < aging_ms
    }

    /// Where frames for `mac` go, or `None` if unknown or aged out (flood it).
    #[inline]
    pub fn lookup(&self, mac: MacAddr, now: Timestamp) -> Option<Destination> {
        self.entries
            .get(&mac.to_u64())
            .filter(|e| Self::is_live(self.aging_ms, e, now))
            .map(|e| e.destination)
    }

    /// Learns that `mac` (a frame's source) lives at `destination`.
    #[inline]
    pub fn learn(
        &mut self,
        mac: MacAddr,
        destination: Destination,
        now: Timestamp,
    ) -> LearnOutcome {
        if !mac.is_unicast() {
            return LearnOutcome::NotUnicast;
        }
        if let Some(entry) = self.entries.get_mut(&mac.to_u64()) {
            if entry.is_static {
                return LearnOutcome::Static;
            }
            let from = entry.destination;
            entry.destination = destination;
            entry.last_seen = now;
            return if from == destination {
                LearnOutcome::Refreshed
            } else {
                LearnOutcome::Moved { from }
            };
        }
        if self.learned >= self.limits.max_learned {
            let may_sweep = self
                .last_full_sweep
                .is_none_or(|t| now.0.saturating_sub(t.0) >= FULL_SWEEP_INTERVAL_MS);
            if !may_sweep {
                return LearnOutcome::LimitReached;
            }
            self.last_full_sweep = Some(now);
            if self.expire(now) == 0 {
                return LearnOutcome::LimitReached;
            }
        }
        self.entries.insert(
            mac.to_u64(),
            FdbEntry {
                destination,
                is_static: false,
                last_seen: now,
            },
        );
        self.learned += 1;
        LearnOutcome::Learned
    }

    /// Adds or replaces a static entry. Fails for group or zero addresses.
    pub fn add_static(
        &mut self,
        mac: MacAddr,
        destination: Destination,
        now: Timestamp,
    ) -> Result<(), Error> {
        if !mac.is_unicast() {
            return Err(Error::NotUnicast(mac));
        }
        let old = self.entries.insert(
            mac.to_u64(),
            FdbEntry {
                destination,
                is_static: true,
                last_seen: now,
            },
        );
        if old.is_some_and(|e| !e.is_static) {
            self.learned -= 1;
        }
        Ok(())
    }

    /// Removes the entry for `mac` (static or learned); returns it if there was one.
    pub fn remove(&mut self, mac: MacAddr) -> Option<FdbEntry> {
        let old = self.entries.remove(&mac.to_u64())?;
        if !old.is_static {
            self.learned -= 1;
        }
        Some(old)
    }

    /// Removes learned entries that have aged out; returns how many.
    pub fn expire(&mut self, now: Timestamp) -> usize {
        let aging_ms = self.aging_ms;
        let before = self.entries.len();
        self.entries.retain(|_, e| Self::is_live(aging_ms, e, now));
        let removed = before - self.entries.len();
        self.learned -= removed;
        removed
    }

    /// Removes every learned entry pointing at `destination` (a port went away, a remote
    /// VTEP was removed); returns how many.
    pub fn flush(&mut self, destination: Destination) -> usize {
        let before = self.entries.len();
        self.entries
            .retain(|_, e| e.is_static || e.destination != destination);
        let removed = before - self.entries.len();
        self.learned -= removed;
        removed
    }

    /// Number of learned (dynamic) entries, including aged ones not yet swept.
    pub fn learned_len(&self) -> usize {
        self.learned
    }

    /// All entries, static and learned (aged ones included until swept).
    pub fn entries(&self) -> impl Iterator<Item = (MacAddr, &FdbEntry)> {
        self.entries.iter().map(|(m, e)| (MacAddr::from_u64(*m), e))
    }

    /// Adds a local port to the flood list (idempotent).
    pub fn add_port(&mut self, port: PortId) {
        if !self.local_ports.contains(&port) {
            self.local_ports.push(port);
        }
    }

    /// Removes a local port from the flood list and flushes its learned entries.
    pub fn remove_port(&mut self, port: PortId) {
        self.local_ports.retain(|p| *p != port);
        self.flush(Destination::Local(port));
    }

    /// Adds a remote VTEP to the flood list (idempotent).
    pub fn add_remote_vtep(&mut self, vtep: IpAddr) {
        if !self.remote_vteps.contains(&vtep) {
            self.remote_vteps.push(vtep);
        }
    }

    /// Removes a remote VTEP from the flood list and flushes its learned entries.
    pub fn remove_remote_vtep(&mut self, vtep: IpAddr) {
        self.remote_vteps.retain(|v| *v != vtep);
        self.flush(Destination::Remote(vtep));
    }

    /// Local ports of the tenant.
    pub fn local_ports(&self) -> &[PortId] {
        &self.local_ports
    }

    /// Remote VTEPs of the tenant.
    pub fn remote_vteps(&self) -> &[IpAddr] {
        &self.remote_vteps
    }

    /// Where to replicate a broadcast, multicast or unknown-unicast frame that entered at
    /// `ingress`: every other local port and, for frames from a local port, every remote VTEP
    /// (head-end replication). Frames from the underlay never go back to it (split horizon).
    pub fn flood_targets(&self, ingress: Destination) -> impl Iterator<Item = Destination> + '_ {
        let from_local = matches!(ingress, Destination::Local(_));
        let locals = self
            .local_ports
            .iter()
            .filter(move |p| ingress != Destination::Local(**p))
            .map(|p| Destination::Local(*p));
        let remotes = self
            .remote_vteps
            .iter()
            .filter(move |_| from_local)
            .map(|v| Destination::Remote(*v));
        locals.chain(remotes)
    }
}

/// The forwarding databases of all tenants, keyed by VNI.
#[derive(Debug, Default)]
pub struct Fdb {
    tenants: HashMap<Vni, TenantFdb, FastHash>,
}

impl Fdb {
    /// An FDB without tenants.
    pub fn new() -> Fdb {
        Fdb::default()
    }

    /// Creates the table of a tenant.
    pub fn add_tenant(&mut self, vni: Vni, limits: TenantLimits) -> Result<&mut TenantFdb, Error> {
        use std::collections::hash_map::Entry;
        match self.tenants.entry(vni) {
            Entry::Occupied(_) => Err(Error::TenantExists(vni)),
            Entry::Vacant(v) => Ok(v.insert(TenantFdb::new(vni, limits))),
        }
    }

    /// Deletes a tenant and all its entries.
    pub fn remove_tenant(&mut self, vni: Vni) -> Result<TenantFdb, Error> {
        self.tenants.remove(&vni).ok_or(Error::NoSuchTenant(vni))
    }

    /// The table of a tenant.
    #[inline]
    pub fn tenant(&self, vni: Vni) -> Option<&TenantFdb> {
        self.tenants.get(&vni)
    }

    /// The table of a tenant, mutable.
    #[inline]
    pub fn tenant_mut(&mut self, vni: Vni) -> Option<&mut TenantFdb> {
        self.tenants.get_mut(&vni)
    }

    /// All tenants.
    pub fn tenants(&self) -> impl Iterator<Item = &TenantFdb> {
        self.tenants.values()
    }

    /// Sweeps aged entries of every tenant; returns how many were removed.
    pub fn expire(&mut self, now: Timestamp) -> usize {
        self.tenants.values_mut().map(|t| t.expire(now)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u32) -> MacAddr {
        let b = n.to_be_bytes();
        MacAddr([0x02, 0, b[0], b[1], b[2], b[3]])
    }

    fn vni(n: u32) -> Vni {
        Vni::new(n).unwrap()
    }

    const P1: Destination = Destination::Local(PortId(1));
    const P2: Destination = Destination::Local(PortId(2));

    #[test]
    fn learns_looks_up_moves_and_ages() {
        let t0 = Timestamp(1_000);
        let mut t = TenantFdb::new(vni(1), TenantLimits::default());
        assert_eq!(t.lookup(mac(1), t0), None);
        assert_eq!(t.learn(mac(1), P1, t0), LearnOutcome::Learned);
        assert_eq!(t.lookup(mac(1), t0), Some(P1));
        assert_eq!(t.learn(mac(1), P1, t0), LearnOutcome::Refreshed);
        assert_eq!(t.learn(mac(1), P2, t0), LearnOutcome::Moved { from: P1 });
        assert_eq!(
            t.lookup(mac(1), t0.after(Duration::from_secs(299))),
            Some(P2)
        );
        let late = t0.after(Duration::from_secs(300));
        assert_eq!(t.lookup(mac(1), late), None, "aged entries are misses");
        assert_eq!(t.expire(late), 1);
        assert_eq!(t.learned_len(), 0);
        assert_eq!(
            t.learn(MacAddr::BROADCAST, P1, t0),
            LearnOutcome::NotUnicast
        );
        assert_eq!(t.learn(MacAddr::ZERO, P1, t0), LearnOutcome::NotUnicast);
    }

    #[test]
    fn static_entries_never_age_and_beat_learning() {
        let t0 = Timestamp(1_000);
        let mut t = TenantFdb::new(vni(1), TenantLimits::default());
        let remote = Destination::Remote("192.0.2.7".parse().unwrap());
        t.learn(mac(5), P1, t0);
        t.add_static(mac(5), remote, t0).unwrap();
        assert_eq!(t.learned_len(), 0);
        assert_eq!(t.learn(mac(5), P2, t0), LearnOutcome::Static);
        let much_later = t0.after(Duration::from_secs(100_000));
        assert_eq!(t.lookup(mac(5), much_later), Some(remote));
        assert_eq!(t.expire(much_later), 0);
        assert!(t.add_static(MacAddr::BROADCAST, P1, t0).is_err());
        assert!(t.remove(mac(5)).unwrap().is_static);
        assert_eq!(t.lookup(mac(5), t0), None);
    }

    #[test]
    fn learning_stops_at_the_limit_and_existing_entries_keep_working() {
        let t0 = Timestamp(1_000);
        let limits = TenantLimits {
            max_learned: 100,
            aging: Duration::from_secs(10),
        };
        let mut t = TenantFdb::new(vni(1), limits);
        for i in 0..100 {
            assert_eq!(t.learn(mac(i), P1, t0), LearnOutcome::Learned);
        }
        assert_eq!(t.learn(mac(1000), P1, t0), LearnOutcome::LimitReached);
        assert_eq!(t.lookup(mac(1000), t0), None);
        assert_eq!(t.lookup(mac(42), t0), Some(P1));
        assert_eq!(t.learn(mac(42), P2, t0), LearnOutcome::Moved { from: P1 });
        // Statics are not limited by the learning limit.
        t.add_static(mac(2000), P2, t0).unwrap();
        assert_eq!(t.lookup(mac(2000), t0), Some(P2));
        // Once entries age out, learning resumes (a full table sweeps itself).
        let later = t0.after(Duration::from_secs(11));
        assert_eq!(t.learn(mac(1000), P1, later), LearnOutcome::Learned);
        assert_eq!(t.learned_len(), 1);
    }

    #[test]
    fn tenants_are_isolated() {
        let t0 = Timestamp(1_000);
        let mut fdb = Fdb::new();
        fdb.add_tenant(vni(10), TenantLimits::default()).unwrap();
        fdb.add_tenant(vni(20), TenantLimits::default()).unwrap();
        assert!(fdb.add_tenant(vni(10), TenantLimits::default()).is_err());
        fdb.tenant_mut(vni(10)).unwrap().learn(mac(1), P1, t0);
        fdb.tenant_mut(vni(20)).unwrap().learn(mac(1), P2, t0);
        assert_eq!(fdb.tenant(vni(10)).unwrap().lookup(mac(1), t0), Some(P1));
        assert_eq!(fdb.tenant(vni(20)).unwrap().lookup(mac(1), t0), Some(P2));
        assert!(fdb.tenant(vni(30)).is_none());
        fdb.remove_tenant(vni(10)).unwrap();
        assert!(fdb.remove_tenant(vni(10)).is_err());
        assert_eq!(fdb.tenant(vni(20)).unwrap().lookup(mac(1), t0), Some(P2));
    }

    #[test]
    fn flooding_uses_split_horizon() {
        let t0 = Timestamp(1_000);
        let v1: IpAddr = "192.0.2.1".parse().unwrap();
        let v2: IpAddr = "2001:db8::2".parse().unwrap();
        let mut t = TenantFdb::new(vni(1), TenantLimits::default());
        for p in [1, 2, 3] {
            t.add_port(PortId(p));
        }
        t.add_port(PortId(2));
        t.add_remote_vtep(v1);
        t.add_remote_vtep(v2);
        let from_port: Vec<_> = t.flood_targets(P2).collect();
        assert_eq!(
            from_port,
            vec![
                Destination::Local(PortId(1)),
                Destination::Local(PortId(3)),
                Destination::Remote(v1),
                Destination::Remote(v2)
            ]
        );
        let from_remote: Vec<_> = t.flood_targets(Destination::Remote(v1)).collect();
        assert_eq!(
            from_remote.len(),
            3,
            "underlay frames go to local ports only"
        );
        t.learn(mac(9), Destination::Remote(v2), t0);
        t.remove_remote_vtep(v2);
        assert_eq!(t.lookup(mac(9), t0), None);
        t.learn(mac(8), P1, t0);
        t.remove_port(PortId(1));
        assert_eq!(t.lookup(mac(8), t0), None);
        assert_eq!(t.local_ports(), &[PortId(2), PortId(3)]);
    }
}
