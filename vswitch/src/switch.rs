//! The registry of tenants and ports: names, VNIs and port ids are unique switch-wide.

use std::collections::HashMap;
use std::net::IpAddr;

use overlay_net::fdb::FastHash;
use overlay_net::{PortId, Vni};

use crate::counters::DropReason;
use crate::tenant::{Ingress, TenantConfig, TenantSwitch, Verdict};
use crate::{Error, Nanos, PortConfig};

/// All tenants and ports of one switch.
#[derive(Debug, Default)]
pub struct Switch {
    tenants: HashMap<Vni, TenantSwitch, FastHash>,
    names: HashMap<String, Vni>,
    ports: HashMap<PortId, Vni, FastHash>,
    port_names: HashMap<String, PortId>,
    next_port: u32,
    unknown_vni: u64,
}

impl Switch {
    /// An empty switch.
    pub fn new() -> Switch {
        Switch::default()
    }

    /// Creates a tenant; names and VNIs are unique.
    pub fn add_tenant(&mut self, config: TenantConfig) -> Result<&mut TenantSwitch, Error> {
        if self.names.contains_key(&config.name) {
            return Err(Error::TenantExists(config.name));
        }
        if self.tenants.contains_key(&config.vni) {
            return Err(Error::TenantExists(format!("with VNI {}", config.vni)));
        }
        if config.name.is_empty() || config.name.len() > 64 {
            return Err(Error::invalid("tenant name", "1 to 64 characters"));
        }
        let vni = config.vni;
        let name = config.name.clone();
        let tenant = TenantSwitch::new(config)?;
        self.names.insert(name, vni);
        Ok(self.tenants.entry(vni).or_insert(tenant))
    }

    /// Deletes a tenant that has no ports left.
    pub fn remove_tenant(&mut self, name: &str) -> Result<TenantConfig, Error> {
        let vni = *self
            .names
            .get(name)
            .ok_or_else(|| Error::NoSuchTenant(name.into()))?;
        let n = self.tenants.get(&vni).map_or(0, |t| t.ports().count());
        if n > 0 {
            return Err(Error::TenantInUse(name.into(), n));
        }
        self.names.remove(name);
        let t = self
            .tenants
            .remove(&vni)
            .ok_or_else(|| Error::no_vni(vni))?;
        Ok(t.config().clone())
    }

    /// A tenant by name.
    pub fn tenant(&self, name: &str) -> Option<&TenantSwitch> {
        self.names.get(name).and_then(|v| self.tenants.get(v))
    }

    /// A tenant by name, mutable.
    pub fn tenant_mut(&mut self, name: &str) -> Option<&mut TenantSwitch> {
        let vni = *self.names.get(name)?;
        self.tenants.get_mut(&vni)
    }

    /// A tenant by VNI.
    pub fn tenant_by_vni(&self, vni: Vni) -> Option<&TenantSwitch> {
        self.tenants.get(&vni)
    }

    /// A tenant by VNI, mutable.
    pub fn tenant_by_vni_mut(&mut self, vni: Vni) -> Option<&mut TenantSwitch> {
        self.tenants.get_mut(&vni)
    }

    /// The VNI of a port's tenant.
    pub fn port_vni(&self, id: PortId) -> Option<Vni> {
        self.ports.get(&id).copied()
    }

    /// Counts a frame from the uplink whose VNI no tenant has (dropped by the datapath).
    pub fn count_unknown_vni(&mut self) {
        self.unknown_vni += 1;
    }

    /// All tenants.
    pub fn tenants(&self) -> impl Iterator<Item = &TenantSwitch> {
        self.tenants.values()
    }

    /// Attaches a new port to a tenant and returns its id.
    pub fn add_port(&mut self, tenant: &str, config: PortConfig) -> Result<PortId, Error> {
        if self.port_names.contains_key(&config.name) {
            return Err(Error::PortExists(config.name));
        }
        let vni = *self
            .names
            .get(tenant)
            .ok_or_else(|| Error::NoSuchTenant(tenant.into()))?;
        let id = PortId(self.next_port);
        let name = config.name.clone();
        self.tenants
            .get_mut(&vni)
            .ok_or_else(|| Error::no_vni(vni))?
            .add_port(id, config)?;
        self.next_port += 1;
        self.ports.insert(id, vni);
        self.port_names.insert(name, id);
        Ok(id)
    }

    /// Detaches a port by name.
    pub fn remove_port(&mut self, name: &str) -> Result<PortConfig, Error> {
        let id = *self
            .port_names
            .get(name)
            .ok_or_else(|| Error::NoSuchPort(name.into()))?;
        let vni = *self.ports.get(&id).ok_or_else(|| Error::no_port(id))?;
        let config = self
            .tenants
            .get_mut(&vni)
            .ok_or_else(|| Error::no_vni(vni))?
            .remove_port(id)?;
        self.ports.remove(&id);
        self.port_names.remove(name);
        Ok(config)
    }

    /// A port's id by name.
    pub fn port_id(&self, name: &str) -> Option<PortId> {
        self.port_names.get(name).copied()
    }

    /// The tenant a port belongs to.
    pub fn port_tenant(&self, id: PortId) -> Option<&TenantSwitch> {
        self.ports.get(&id).and_then(|v| self.tenants.get(v))
    }

    /// A frame from a local port: its tenant is the port's.
    pub fn ingress_port(&mut self, id: PortId, frame: &[u8], now: Nanos) -> (Option<Vni>, Verdict) {
        match self.ports.get(&id).copied() {
            Some(vni) => match self.tenants.get_mut(&vni) {
                Some(t) => (Some(vni), t.ingress(Ingress::Port(id), frame, now)),
                None => (None, Verdict::Drop(DropReason::PortDown)),
            },
            None => (None, Verdict::Drop(DropReason::PortDown)),
        }
    }

    /// A frame from the uplink: its tenant is its VNI's; unknown VNIs are dropped and counted.
    pub fn ingress_uplink(
        &mut self,
        vni: Vni,
        source_vtep: IpAddr,
        frame: &[u8],
        now: Nanos,
    ) -> Verdict {
        self.ingress_uplink_sized(vni, source_vtep, frame, frame.len(), now)
    }

    /// Like [`Switch::ingress_uplink`] for a TCP super-frame from the underlay: the MTU check
    /// applies to `wire_len`, its largest segment.
    pub fn ingress_uplink_sized(
        &mut self,
        vni: Vni,
        source_vtep: IpAddr,
        frame: &[u8],
        wire_len: usize,
        now: Nanos,
    ) -> Verdict {
        // An IPv4 peer seen through a dual-stack socket is the IPv4 VTEP it is.
        let source_vtep = source_vtep.to_canonical();
        match self.tenants.get_mut(&vni) {
            Some(t) => t.ingress_sized(Ingress::Uplink(source_vtep), frame, wire_len, now),
            None => {
                self.unknown_vni += 1;
                Verdict::Drop(DropReason::UnknownVni)
            }
        }
    }

    /// Frames from the uplink dropped because no tenant has their VNI.
    pub fn unknown_vni_drops(&self) -> u64 {
        self.unknown_vni
    }
}
