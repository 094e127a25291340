//! The control logic: API operations applied to the datapath and persisted atomically, so
//! that after a restart (also after `kill -9`) the same tenants, ports, VTEPs and static
//! entries come back.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use overlay_net::{Destination, MacAddr, PortId, TenantLimits, Timestamp, Vni};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::api::{
    CountersInfo, FdbEntryInfo, FdbEntrySpec, PortInfo, PortSpec, TenantInfo, TenantSpec,
    Unrestored, VtepSpec,
};
use crate::datapath::{Datapath, DatapathWorkers};
use crate::placement::Placement;
use crate::tap::Offloads;
use crate::{
    Drops, Error, PortConfig, PortCounters, PortSecurity, RateLimit, TenantConfig, TenantSwitch,
};

/// What an API operation fails with: the envelope both daemons and their clients share.
pub use daemon_kit::ApiError as ControlError;

impl From<Error> for ControlError {
    fn from(e: Error) -> Self {
        let m = e.to_string();
        match e {
            Error::NoSuchTenant(_) | Error::NoSuchPort(_) => ControlError::NotFound(m),
            Error::TenantExists(_)
            | Error::PortExists(_)
            | Error::TenantInUse(..)
            | Error::InterfaceInUse(_) => ControlError::Conflict(m),
            Error::Invalid { .. } | Error::BadName(_) | Error::Overlay(_) => {
                ControlError::Invalid(m)
            }
            // What the caller can fix is theirs (a name taken in a namespace, a namespace
            // that does not exist, no permission); only our own failures are internal.
            Error::Io(_, ref io) => match io.kind() {
                std::io::ErrorKind::AlreadyExists => ControlError::Conflict(m),
                std::io::ErrorKind::NotFound => ControlError::NotFound(m),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::InvalidInput => {
                    ControlError::Invalid(m)
                }
                _ => ControlError::Internal(m),
            },
        }
    }
}

type Result<T> = std::result::Result<T, ControlError>;

/// Everything the daemon persists.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// Format version.
    pub version: u32,
    /// Tenants, in creation order.
    pub tenants: Vec<TenantSpec>,
    /// Ports, in creation order.
    pub ports: Vec<PortSpec>,
    /// Remote VTEPs per tenant.
    pub vteps: BTreeMap<String, Vec<IpAddr>>,
    /// UDP ports of remote VTEPs that listen on another port than this daemon's, per tenant.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vtep_ports: BTreeMap<String, BTreeMap<IpAddr, u16>>,
    /// Static forwarding entries per tenant.
    pub fdb: BTreeMap<String, Vec<FdbEntrySpec>>,
    /// Tenants that are cluster objects (created here from the cluster, or through this
    /// daemon into it): deleted here when the cluster deletes them.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub cluster_tenants: BTreeSet<String>,
}

const STATE_VERSION: u32 = 1;

/// The daemon's control plane: the datapath plus its persisted description.
pub struct Control {
    dp: DatapathWorkers,
    pub(super) state: State,
    path: PathBuf,
    /// Where vhost-user sockets go (`RUN_DIR/vhost/<port>.sock`).
    run_dir: PathBuf,
    /// Saved objects that could not be restored: kept in the state, reported, retried.
    unrestored: Vec<(Saved, String)>,
    /// Restoring: nothing is saved until everything was tried (a crash then loses nothing).
    restoring: bool,
    /// The cluster this daemon is a member of (`--cluster`).
    pub(super) cluster: Option<vswitch_cluster::Cluster>,
    /// What the cluster programmed per tenant, the base of the next diff.
    pub(super) programmed: BTreeMap<String, vswitch_cluster::TenantProgram>,
}

/// An object of the saved state, as it is restored (and retried).
#[derive(Clone, Debug)]
enum Saved {
    Tenant(TenantSpec),
    Port(PortSpec),
    Vtep(String, IpAddr, Option<u16>),
    Fdb(String, FdbEntrySpec),
}

impl Saved {
    fn kind(&self) -> &'static str {
        match self {
            Saved::Tenant(_) => "tenant",
            Saved::Port(_) => "port",
            Saved::Vtep(..) => "vtep",
            Saved::Fdb(..) => "fdb",
        }
    }

    fn name(&self) -> String {
        match self {
            Saved::Tenant(t) => t.name.clone(),
            Saved::Port(p) => p.name.clone(),
            Saved::Vtep(t, ip, _) => format!("{t}/{ip}"),
            Saved::Fdb(t, e) => format!("{t}/{}", e.mac),
        }
    }

    /// The tenant it belongs to.
    fn tenant(&self) -> &str {
        match self {
            Saved::Tenant(t) => &t.name,
            Saved::Port(p) => &p.tenant,
            Saved::Vtep(t, ..) | Saved::Fdb(t, _) => t,
        }
    }
}

fn call<R: Send + 'static>(
    dp: &DatapathWorkers,
    f: impl FnOnce(&mut Datapath) -> R + Send + 'static,
) -> Result<R> {
    dp.call(f)
        .map_err(|e| ControlError::Internal(e.to_string()))
}

/// Checks what a tenant spec can be checked for without creating it: its name, VNI, MTU
/// and subnet.
pub fn check_tenant_spec(spec: &TenantSpec) -> Result<()> {
    daemon_kit::names::check_name("tenant", &spec.name).map_err(ControlError::Invalid)?;
    Vni::new(spec.vni).map_err(|e| ControlError::Invalid(e.to_string()))?;
    if spec.mtu != 0 && spec.mtu < 68 {
        return Err(ControlError::Invalid(format!(
            "tenant MTU {} is below 68",
            spec.mtu
        )));
    }
    if spec.max_macs == Some(0) {
        return Err(ControlError::Invalid("max_macs must be at least 1".into()));
    }
    if let Some(s) = &spec.subnet {
        vswitch_cluster::Subnet::parse(s).map_err(|e| ControlError::Invalid(e.to_string()))?;
    }
    Ok(())
}

/// The port configuration a spec asks for, checked (names, MAC, addresses, limits).
pub fn port_config(spec: &PortSpec) -> Result<PortConfig> {
    if !["tap", "veth", "vhost-user-net"].contains(&spec.kind.as_str()) {
        return Err(ControlError::Invalid(format!(
            "port kind {:?}: \"tap\", \"veth\" or \"vhost-user-net\"",
            spec.kind
        )));
    }
    if spec.kind == "veth" && spec.netns.is_none() && spec.ifname.is_none() {
        return Err(ControlError::Invalid(
            "a veth port needs netns (its other end goes there), or ifname (its other end \
             stays in the switch's namespace under that name, for a runtime that moves it \
             itself, as Docker does)"
                .into(),
        ));
    }
    if let (Some(ifname), "veth", None) = (&spec.ifname, spec.kind.as_str(), &spec.netns) {
        // It stays in the switch's own namespace: a name that cannot clash with anything
        // the daemon makes or names there.
        daemon_kit::names::check_port_name(ifname)
            .map_err(|e| ControlError::Invalid(format!("ifname: {e}")))?;
    }
    if spec.kind == "vhost-user-net" && spec.netns.is_some() {
        return Err(ControlError::Invalid(
            "a vhost-user-net port has no interface to move into a netns".into(),
        ));
    }
    let security = match (&spec.mac, spec.ips.is_empty()) {
        (Some(mac), _) => Some(PortSecurity {
            mac: mac
                .parse()
                .map_err(|e: overlay_net::Error| ControlError::Invalid(e.to_string()))?,
            ips: spec.ips.clone(),
        }),
        (None, true) => None,
        (None, false) => return Err(ControlError::Invalid("ips need mac (port security)".into())),
    };
    Ok(PortConfig {
        name: spec.name.clone(),
        security,
        rate_limit: RateLimit {
            bits_per_sec: spec.rate_limit.bits_per_sec,
            packets_per_sec: spec.rate_limit.packets_per_sec,
            ..RateLimit::default()
        },
    })
}

/// Drops by reason name, only reasons that have drops (the API's `drops` object).
fn drops_map(d: &Drops) -> std::collections::BTreeMap<String, u64> {
    d.iter()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| (r.name().to_owned(), n))
        .collect()
}

fn counters_info(c: &PortCounters) -> CountersInfo {
    CountersInfo {
        rx_packets: c.rx_packets,
        rx_bytes: c.rx_bytes,
        tx_packets: c.tx_packets,
        tx_bytes: c.tx_bytes,
        drops: drops_map(&c.drops),
    }
}

fn tenant_info(t: &TenantSwitch) -> TenantInfo {
    let c = t.counters();
    let mut ports: Vec<String> = t.ports().map(|(_, p)| p.name.clone()).collect();
    ports.sort();
    TenantInfo {
        name: t.config().name.clone(),
        vni: t.config().vni.get(),
        mtu: t.config().mtu,
        max_macs: t.config().limits.max_learned,
        ports,
        vteps: t.fdb().remote_vteps().to_vec(),
        learned_macs: t.fdb().learned_len(),
        flooded: c.flooded,
        unicast: c.unicast,
        learn_vteps: t.config().learn_vteps,
        learn_limit_hits: c.learn_limit_hits,
        mac_moves: c.mac_moves,
        counters: CountersInfo {
            rx_packets: c.rx_packets,
            rx_bytes: c.rx_bytes,
            tx_packets: 0,
            tx_bytes: 0,
            drops: drops_map(&c.drops),
        },
        subnet: None,
    }
}

type Labels = Vec<(String, String)>;

/// Adds one `reason`-labelled series per drop reason that has drops.
fn add_drops(family: &Family<Labels, Counter>, labels: &Labels, drops: &Drops) {
    for (reason, n) in drops.iter().filter(|(_, n)| *n > 0) {
        let mut l = labels.clone();
        l.push(("reason".into(), reason.name().into()));
        family.get_or_create(&l).inc_by(n);
    }
}

impl Control {
    /// Runs `f` on the datapath's control thread.
    pub(super) fn call_dp<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Datapath) -> R + Send + 'static,
    ) -> Result<R> {
        call(&self.dp, f)
    }

    /// Takes over a running datapath, restores the state saved in `state_dir` (if any) and
    /// returns the control plane with the errors of items that could not be restored.
    /// vhost-user sockets go to `run_dir/vhost/`.
    pub fn restore(
        dp: DatapathWorkers,
        state_dir: &Path,
        run_dir: &Path,
    ) -> std::io::Result<(Control, Vec<String>)> {
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join("vswitchd.json");
        let saved: State = daemon_kit::load_state(&path)?;
        if saved.version > STATE_VERSION {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{}: state version {} is newer than this vswitchd understands ({STATE_VERSION}); \
                     refusing to start rather than drop what it holds (run the newer vswitchd, \
                     or move the file away)",
                    path.display(),
                    saved.version
                ),
            ));
        }
        let mut control = Control {
            dp,
            state: State {
                version: STATE_VERSION,
                ..State::default()
            },
            path,
            run_dir: run_dir.to_owned(),
            unrestored: Vec::new(),
            restoring: true,
            cluster: None,
            programmed: BTreeMap::new(),
        };
        control.state.cluster_tenants = saved.cluster_tenants;
        let mut items: Vec<Saved> = Vec::new();
        items.extend(saved.tenants.into_iter().map(Saved::Tenant));
        items.extend(saved.ports.into_iter().map(Saved::Port));
        for (tenant, vteps) in saved.vteps {
            for ip in vteps {
                let port = saved
                    .vtep_ports
                    .get(&tenant)
                    .and_then(|ports| ports.get(&ip))
                    .copied();
                items.push(Saved::Vtep(tenant.clone(), ip, port));
            }
        }
        for (tenant, entries) in saved.fdb {
            items.extend(entries.into_iter().map(|e| Saved::Fdb(tenant.clone(), e)));
        }
        for item in items {
            if let Err(e) = control.apply(item.clone()) {
                control.keep(item, e.message().to_owned());
            }
        }
        control.restoring = false;
        control
            .save()
            .map_err(|e| std::io::Error::other(e.message().to_owned()))?;
        let problems = control
            .unrestored
            .iter()
            .map(|(item, error)| format!("{} {}: {error}", item.kind(), item.name()))
            .collect();
        Ok((control, problems))
    }

    /// Creates a saved object (recording it in the state).
    fn apply(&mut self, item: Saved) -> Result<()> {
        match item {
            Saved::Tenant(t) => self.create_tenant(t).map(|_| ()),
            Saved::Port(p) => self.create_port(p).map(|_| ()),
            Saved::Vtep(t, ip, port) => self.add_vtep(&t, ip, port),
            Saved::Fdb(t, e) => self.add_fdb(&t, e),
        }
    }

    /// Keeps a saved object that could not be restored: in the state (so that saving does
    /// not drop it) and in the list of what to retry.
    fn keep(&mut self, item: Saved, error: String) {
        match &item {
            Saved::Tenant(t) => self.state.tenants.push(t.clone()),
            Saved::Port(p) => self.state.ports.push(p.clone()),
            Saved::Vtep(t, ip, port) => {
                self.state.vteps.entry(t.clone()).or_default().push(*ip);
                if let Some(port) = port {
                    self.state
                        .vtep_ports
                        .entry(t.clone())
                        .or_default()
                        .insert(*ip, *port);
                }
            }
            Saved::Fdb(t, e) => self.state.fdb.entry(t.clone()).or_default().push(e.clone()),
        }
        self.unrestored.push((item, error));
    }

    /// Takes a kept object out of the state again (before it is retried or deleted).
    fn unkeep(&mut self, item: &Saved) {
        match item {
            Saved::Tenant(t) => self.state.tenants.retain(|x| x.name != t.name),
            Saved::Port(p) => self.state.ports.retain(|x| x.name != p.name),
            Saved::Vtep(t, ip, _) => {
                if let Some(list) = self.state.vteps.get_mut(t) {
                    list.retain(|x| x != ip);
                    if list.is_empty() {
                        self.state.vteps.remove(t);
                    }
                }
                if let Some(ports) = self.state.vtep_ports.get_mut(t) {
                    ports.remove(ip);
                    if ports.is_empty() {
                        self.state.vtep_ports.remove(t);
                    }
                }
            }
            Saved::Fdb(t, e) => {
                if let Some(list) = self.state.fdb.get_mut(t) {
                    list.retain(|x| x.mac != e.mac);
                    if list.is_empty() {
                        self.state.fdb.remove(t);
                    }
                }
            }
        }
    }

    /// Saved objects that could not be restored, with why (retried by
    /// [`Self::retry_unrestored`]).
    pub fn unrestored(&self) -> Vec<Unrestored> {
        self.unrestored
            .iter()
            .map(|(item, error)| Unrestored {
                kind: item.kind().into(),
                name: item.name(),
                error: error.clone(),
            })
            .collect()
    }

    /// Tries the objects that could not be restored again (a namespace may have come back);
    /// returns how many are still not restored.
    pub fn retry_unrestored(&mut self) -> usize {
        if self.unrestored.is_empty() {
            return 0;
        }
        let pending = std::mem::take(&mut self.unrestored);
        let mut restored = 0;
        // Nothing is saved while the list is worked through: the state keeps every object.
        self.restoring = true;
        for (item, _) in pending {
            self.unkeep(&item);
            let what = format!("{} {}", item.kind(), item.name());
            match self.apply(item.clone()) {
                Ok(()) => {
                    restored += 1;
                    tracing::info!(object = %what, "restored on retry");
                }
                Err(e) => self.keep(item, e.message().to_owned()),
            }
        }
        self.restoring = false;
        if restored > 0
            && let Err(e) = self.save()
        {
            tracing::warn!(error = %e.message(), "saving state after a retry");
        }
        self.unrestored.len()
    }

    /// A saved object of `kind` and `name` that is not restored (yet).
    fn is_unrestored(&self, kind: &str, name: &str) -> bool {
        self.unrestored
            .iter()
            .any(|(item, _)| item.kind() == kind && item.name() == name)
    }

    /// Deletes saved objects that were never restored: those `pick` selects.
    fn forget_unrestored(&mut self, pick: impl Fn(&Saved) -> bool) -> bool {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unrestored)
            .into_iter()
            .partition(|(item, _)| pick(item));
        self.unrestored = kept;
        for (item, _) in &gone {
            self.unkeep(item);
        }
        !gone.is_empty()
    }

    /// Writes the state atomically: a temporary file, fsync, rename, fsync of the directory.
    pub(super) fn save(&self) -> Result<()> {
        if self.restoring {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(&self.state)
            .map_err(|e| ControlError::Internal(e.to_string()))?;
        daemon_kit::save_atomic(&self.path, &bytes)
            .map_err(|e| ControlError::Internal(format!("saving state: {e}")))
    }

    /// Creates a tenant of the cluster here (it is in etcd already); one that exists here
    /// with the same configuration is fine.
    pub fn create_cluster_tenant(&mut self, spec: TenantSpec) -> Result<TenantInfo> {
        let name = spec.name.clone();
        match self.state.tenants.iter().find(|t| t.name == name) {
            Some(t) if *t == spec => {}
            Some(_) => {
                return Err(ControlError::Conflict(format!(
                    "tenant {name} exists on this host with another configuration"
                )));
            }
            None => {
                self.create_tenant(spec)?;
            }
        }
        self.state.cluster_tenants.insert(name.clone());
        self.save()?;
        self.tenant(&name)
    }

    /// A tenant's configuration as created.
    pub fn tenant_spec(&self, name: &str) -> Result<TenantSpec> {
        self.state
            .tenants
            .iter()
            .find(|t| t.name == name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("no tenant {name}")))
    }

    /// Whether a tenant is a cluster tenant, and whether it has ports here.
    pub fn tenant_place(&self, name: &str) -> (bool, bool) {
        (
            self.state.cluster_tenants.contains(name),
            self.state.ports.iter().any(|p| p.tenant == name),
        )
    }

    /// Creates a tenant.
    pub fn create_tenant(&mut self, spec: TenantSpec) -> Result<TenantInfo> {
        check_tenant_spec(&spec)?;
        if self.is_unrestored("tenant", &spec.name) {
            return Err(ControlError::Conflict(format!(
                "tenant {} exists but could not be restored (GET /v1/unrestored says why); \
                 delete it first",
                spec.name
            )));
        }
        let vni = Vni::new(spec.vni).map_err(|e| ControlError::Invalid(e.to_string()))?;
        let limits = TenantLimits {
            max_learned: spec.max_macs.unwrap_or(TenantLimits::default().max_learned),
            ..TenantLimits::default()
        };
        let cfg = TenantConfig {
            name: spec.name.clone(),
            vni,
            mtu: spec.mtu,
            limits,
            learn_vteps: spec.learn_vteps,
        };
        let name = spec.name.clone();
        let info = call(&self.dp, move |dp| {
            dp.add_tenant(cfg)?;
            dp.switch()
                .tenant(&name)
                .map(tenant_info)
                .ok_or(Error::NoSuchTenant(name))
        })??;
        let mut info = info;
        info.subnet = spec.subnet.clone();
        tracing::info!(tenant = %info.name, vni = info.vni, mtu = info.mtu, "tenant created");
        self.state.tenants.push(spec);
        self.save()?;
        Ok(info)
    }

    /// Deletes a tenant without ports.
    pub fn delete_tenant(&mut self, name: &str) -> Result<()> {
        if self.is_unrestored("tenant", name) {
            // Never restored: it goes with what was kept of it.
            self.forget_unrestored(|item| item.tenant() == name);
            tracing::info!(tenant = name, "unrestored tenant deleted");
            return self.save();
        }
        let n = name.to_owned();
        call(&self.dp, move |dp| {
            dp.switch_mut().remove_tenant(&n).map(|_| ())
        })??;
        self.forget_unrestored(|item| item.tenant() == name);
        self.state.tenants.retain(|t| t.name != name);
        self.state.vteps.remove(name);
        self.state.vtep_ports.remove(name);
        self.state.fdb.remove(name);
        self.state.cluster_tenants.remove(name);
        self.programmed.remove(name);
        tracing::info!(tenant = name, "tenant deleted");
        self.save()
    }

    /// All tenants.
    pub fn tenants(&self) -> Result<Vec<TenantInfo>> {
        let mut v = call(&self.dp, |dp| {
            dp.switch().tenants().map(tenant_info).collect::<Vec<_>>()
        })?;
        v.sort_by(|a, b| a.name.cmp(&b.name));
        for t in &mut v {
            t.subnet = self.subnet_of(&t.name);
        }
        Ok(v)
    }

    /// One tenant.
    pub fn tenant(&self, name: &str) -> Result<TenantInfo> {
        let n = name.to_owned();
        let mut info = call(&self.dp, move |dp| dp.switch().tenant(&n).map(tenant_info))?
            .ok_or_else(|| ControlError::NotFound(format!("no tenant {name}")))?;
        info.subnet = self.subnet_of(name);
        Ok(info)
    }

    fn subnet_of(&self, tenant: &str) -> Option<String> {
        self.state
            .tenants
            .iter()
            .find(|t| t.name == tenant)
            .and_then(|t| t.subnet.clone())
    }

    /// Creates a port: a TAP interface, or a vhost-user-net socket for a VM
    /// (`RUN_DIR/vhost/<port>.sock`).
    pub fn create_port(&mut self, spec: PortSpec) -> Result<PortInfo> {
        if self.is_unrestored("port", &spec.name) {
            return Err(ControlError::Conflict(format!(
                "port {} exists but could not be restored (GET /v1/unrestored says why); \
                 delete it first",
                spec.name
            )));
        }
        let cfg = port_config(&spec)?;
        let tenant = spec.tenant.clone();
        if spec.netns.is_none() && spec.ifname.is_some() && spec.kind != "veth" {
            return Err(ControlError::Invalid("ifname needs netns".into()));
        }
        let placement = match (&spec.netns, spec.kind.as_str()) {
            (Some(ns), _) => Some(Placement {
                netns: ns.into(),
                ifname: spec.ifname.clone().unwrap_or_else(|| spec.name.clone()),
            }),
            // The other end stays here, for the runtime to move into its container.
            (None, "veth") => Some(Placement::here(
                spec.ifname.clone().unwrap_or_else(|| spec.name.clone()),
            )),
            (None, _) => None,
        };
        if spec.kind == "vhost-user-net" {
            let socket = self.vhost_socket(&spec.name);
            let dir = self.run_dir.join("vhost");
            daemon_kit::SocketAccess::create_dir(&dir)
                .map_err(|e| ControlError::Internal(format!("creating {}: {e}", dir.display())))?;
            call(&self.dp, move |dp| dp.add_vhost_port(&tenant, cfg, &socket))??;
        } else if let (true, Some(placement)) = (spec.kind == "veth", placement.clone()) {
            call(&self.dp, move |dp| {
                dp.add_veth_port(&tenant, cfg, &placement)
            })??;
        } else {
            call(&self.dp, move |dp| {
                dp.add_tap_port(&tenant, cfg, Offloads::TCP, placement.as_ref())
            })??;
        }
        tracing::info!(port = %spec.name, tenant = %spec.tenant, netns = ?spec.netns, "port created");
        if let Some(c) = &self.cluster {
            c.publish(&spec.tenant, &spec.name, super::cluster::binding_of(&spec));
        }
        self.state.ports.push(spec.clone());
        self.save()?;
        self.port(&spec.name)
    }

    /// Deletes a port (its TAP interface disappears).
    pub fn delete_port(&mut self, name: &str) -> Result<()> {
        let tenant = self
            .state
            .ports
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.tenant.clone());
        if self.forget_unrestored(|item| matches!(item, Saved::Port(p) if p.name == name)) {
            if let (Some(c), Some(t)) = (&self.cluster, &tenant) {
                c.unpublish(t, name);
            }
            tracing::info!(port = name, "unrestored port deleted");
            return self.save();
        }
        if let Some(e) = self.dp.remove_port(name)? {
            // The port is out of the switch: forgetting it is the truth; its interface stays.
            tracing::warn!(port = name, error = %e, "port removed, its interface could not be deleted");
        }
        tracing::info!(port = name, "port deleted");
        if let (Some(c), Some(t)) = (&self.cluster, &tenant) {
            c.unpublish(t, name);
        }
        self.state.ports.retain(|p| p.name != name);
        for entries in self.state.fdb.values_mut() {
            entries.retain(|e| e.port.as_deref() != Some(name));
        }
        self.save()
    }

    /// One port with its counters.
    pub fn port(&self, name: &str) -> Result<PortInfo> {
        let spec = self
            .state
            .ports
            .iter()
            .find(|p| p.name == name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("no port {name}")))?;
        let n = name.to_owned();
        let (counters, worker, mtu, queue_pairs, link) = self.dp.with(|dp| {
            let sw = dp.switch();
            let tenant = sw
                .port_id(&n)
                .and_then(|id| Some((id, sw.port_tenant(id)?)));
            let counters = tenant.and_then(|(id, t)| t.port(id).map(|(_, c)| counters_info(c)));
            let mtu = tenant.map(|(_, t)| t.config().mtu);
            (
                counters.unwrap_or_default(),
                dp.port_worker(&n),
                mtu,
                dp.vhost_queue_pairs(&n),
                dp.port_link(&n),
            )
        });
        let socket = (spec.kind == "vhost-user-net").then(|| self.vhost_socket(&spec.name));
        let error = self
            .unrestored
            .iter()
            .find(|(item, _)| matches!(item, Saved::Port(p) if p.name == spec.name))
            .map(|(_, e)| format!("not restored: {e}"));
        Ok(PortInfo {
            spec,
            error,
            counters,
            worker,
            mtu,
            queue_pairs,
            socket,
            link,
        })
    }

    /// Where a vhost-user-net port's socket lives: `RUN_DIR/vhost/<port>.sock`.
    fn vhost_socket(&self, port: &str) -> PathBuf {
        self.run_dir.join("vhost").join(format!("{port}.sock"))
    }

    /// All ports.
    pub fn ports(&self) -> Result<Vec<PortInfo>> {
        self.state
            .ports
            .iter()
            .map(|p| self.port(&p.name))
            .collect()
    }

    /// Adds a remote VTEP to a tenant, listening on UDP port `port` (`None`: this daemon's
    /// VXLAN port); for a VTEP the tenant has, sets its port.
    pub fn add_vtep(&mut self, tenant: &str, ip: IpAddr, port: Option<u16>) -> Result<()> {
        let ip = ip.to_canonical();
        if port == Some(0) {
            return Err(ControlError::Invalid(
                "remote VTEP port 0: give a UDP port (1-65535) or none".into(),
            ));
        }
        let t = tenant.to_owned();
        let resized = call(&self.dp, move |dp| {
            dp.add_remote_vtep(&t, ip)?;
            dp.set_vtep_port(&t, ip, port)?;
            Ok::<_, Error>(dp.refresh_tenant_mtu(&t))
        })??;
        if let Some(mtu) = resized {
            self.resize_ports(tenant, mtu);
        }
        let list = self.state.vteps.entry(tenant.to_owned()).or_default();
        if !list.contains(&ip) {
            list.push(ip);
            tracing::info!(tenant, vtep = %ip, port, "remote VTEP added");
        }
        let ports = self.state.vtep_ports.entry(tenant.to_owned()).or_default();
        match port {
            Some(p) => {
                ports.insert(ip, p);
            }
            None => {
                ports.remove(&ip);
            }
        }
        if ports.is_empty() {
            self.state.vtep_ports.remove(tenant);
        }
        self.save()
    }

    /// The tenant's MTU changed (its VTEPs' families did): its ports' interfaces follow —
    /// a TAP where it lives, both ends of a veth. A VM keeps the MTU its VMM gave it until it
    /// is started again (virtio-net has no MTU change); the port's `mtu` says the new one.
    pub(super) fn resize_ports(&self, tenant: &str, mtu: u16) {
        use crate::placement::{in_netns, open_netns, set_mtu};
        tracing::info!(tenant, mtu, "tenant MTU follows its VTEPs");
        for p in self.state.ports.iter().filter(|p| p.tenant == tenant) {
            let ifname = p.ifname.clone().unwrap_or_else(|| p.name.clone());
            let resized = match (p.kind.as_str(), &p.netns) {
                ("vhost-user-net", _) => continue,
                ("veth", None) => set_mtu(&p.name, mtu).map(|()| {
                    // The other end, while it is still here (a runtime moves it on).
                    let _ = set_mtu(&ifname, mtu);
                }),
                ("veth", Some(ns)) => set_mtu(&p.name, mtu).and_then(|()| {
                    in_netns(Some(open_netns(std::path::Path::new(ns))?), move || {
                        set_mtu(&ifname, mtu)
                    })
                }),
                (_, Some(ns)) => open_netns(std::path::Path::new(ns))
                    .and_then(|f| in_netns(Some(f), move || set_mtu(&ifname, mtu))),
                (_, None) => set_mtu(&p.name, mtu),
            };
            if let Err(e) = resized {
                tracing::warn!(port = %p.name, mtu, error = %e, "could not resize the port's interface");
            }
        }
    }

    /// A tenant's remote VTEPs, with the ports of those that listen elsewhere.
    pub fn vteps(&self, tenant: &str) -> Result<Vec<VtepSpec>> {
        let t = self.tenant(tenant)?;
        let ports = self.state.vtep_ports.get(tenant);
        Ok(t.vteps
            .into_iter()
            .map(|ip| VtepSpec {
                ip,
                port: ports.and_then(|p| p.get(&ip)).copied(),
            })
            .collect())
    }

    /// Removes a remote VTEP from a tenant (and the MACs learned behind it).
    pub fn remove_vtep(&mut self, tenant: &str, ip: IpAddr) -> Result<()> {
        if self.cluster_vtep(tenant, ip) {
            return Err(ControlError::Conflict(format!(
                "VTEP {ip} of tenant {tenant} is a host of the cluster with ports in it: it \
                 leaves when that host's ports (or lease) do"
            )));
        }
        let t = tenant.to_owned();
        let known = call(&self.dp, move |dp| {
            let fdb = dp
                .switch_mut()
                .tenant_mut(&t)
                .ok_or_else(|| Error::NoSuchTenant(t.clone()))?
                .fdb_mut();
            let known = fdb.remote_vteps().contains(&ip);
            fdb.remove_remote_vtep(ip);
            dp.set_vtep_port(&t, ip, None)?;
            Ok::<_, Error>((known, dp.refresh_tenant_mtu(&t)))
        })??;
        let (known, resized) = known;
        if let Some(mtu) = resized {
            self.resize_ports(tenant, mtu);
        }
        if !known {
            return Err(ControlError::NotFound(format!(
                "tenant {tenant} has no VTEP {ip}"
            )));
        }
        if let Some(list) = self.state.vteps.get_mut(tenant) {
            list.retain(|v| *v != ip);
        }
        if let Some(ports) = self.state.vtep_ports.get_mut(tenant) {
            ports.remove(&ip);
            if ports.is_empty() {
                self.state.vtep_ports.remove(tenant);
            }
        }
        tracing::info!(tenant, vtep = %ip, "remote VTEP removed");
        self.save()
    }

    /// Adds a static forwarding entry.
    pub fn add_fdb(&mut self, tenant: &str, spec: FdbEntrySpec) -> Result<()> {
        let mac: MacAddr = spec
            .mac
            .parse()
            .map_err(|e: overlay_net::Error| ControlError::Invalid(e.to_string()))?;
        let (t, port, vtep) = (tenant.to_owned(), spec.port.clone(), spec.vtep);
        call(&self.dp, move |dp| {
            let dest = match (port, vtep) {
                (Some(p), None) => {
                    let id = dp
                        .switch()
                        .port_id(&p)
                        .ok_or_else(|| Error::NoSuchPort(p.clone()))?;
                    if dp
                        .switch()
                        .port_tenant(id)
                        .map(|x| x.config().name.as_str())
                        != Some(t.as_str())
                    {
                        return Err(Error::invalid(
                            "fdb entry",
                            format!("port {p} is not in tenant {t}"),
                        ));
                    }
                    Destination::Local(id)
                }
                (None, Some(v)) => Destination::Remote(v),
                _ => {
                    return Err(Error::invalid(
                        "fdb entry",
                        "give exactly one of port and vtep",
                    ));
                }
            };
            dp.switch_mut()
                .tenant_mut(&t)
                .ok_or_else(|| Error::NoSuchTenant(t.clone()))?
                .fdb_mut()
                .add_static(mac, dest, Timestamp(0))
                .map_err(Error::from)
        })??;
        let list = self.state.fdb.entry(tenant.to_owned()).or_default();
        list.retain(|e| e.mac.parse::<MacAddr>().ok() != Some(mac));
        list.push(FdbEntrySpec {
            mac: mac.to_string(),
            ..spec
        });
        self.save()
    }

    /// Removes a static entry (or forgets a learned one).
    pub fn remove_fdb(&mut self, tenant: &str, mac: &str) -> Result<()> {
        let m: MacAddr = mac
            .parse()
            .map_err(|e: overlay_net::Error| ControlError::Invalid(e.to_string()))?;
        if self.cluster_mac(tenant, m) {
            return Err(ControlError::Conflict(format!(
                "{m} in tenant {tenant} is a port of another host of the cluster: its entry \
                 goes when that port does"
            )));
        }
        let t = tenant.to_owned();
        let removed = call(&self.dp, move |dp| {
            dp.switch_mut()
                .tenant_mut(&t)
                .map(|x| x.fdb_mut().remove(m).is_some())
                .ok_or(Error::NoSuchTenant(t))
        })??;
        if !removed {
            return Err(ControlError::NotFound(format!(
                "tenant {tenant} has no entry for {m}"
            )));
        }
        if let Some(list) = self.state.fdb.get_mut(tenant) {
            list.retain(|e| e.mac.parse::<MacAddr>().ok() != Some(m));
        }
        self.save()
    }

    /// A tenant's forwarding table.
    pub fn fdb(&self, tenant: &str) -> Result<Vec<FdbEntryInfo>> {
        let t = tenant.to_owned();
        call(&self.dp, move |dp| {
            let sw = dp.switch();
            let tenant = sw
                .tenant(&t)
                .ok_or_else(|| Error::NoSuchTenant(t.clone()))?;
            let name_of = |id: PortId| tenant.port(id).map(|(c, _)| c.name.clone());
            let mut v: Vec<FdbEntryInfo> = tenant
                .fdb()
                .entries()
                .map(|(mac, e)| {
                    let (port, vtep) = match e.destination {
                        Destination::Local(id) => (name_of(id), None),
                        Destination::Remote(ip) => (None, Some(ip)),
                    };
                    FdbEntryInfo {
                        mac: mac.to_string(),
                        port,
                        vtep,
                        is_static: e.is_static,
                    }
                })
                .collect();
            v.sort_by(|a, b| a.mac.cmp(&b.mac));
            Ok::<_, Error>(v)
        })?
        .map_err(ControlError::from)
    }

    /// Prometheus text exposition of every counter.
    pub fn metrics(&self) -> Result<String> {
        let snapshot = call(&self.dp, |dp| {
            let sw = dp.switch();
            let tenants: Vec<_> = sw
                .tenants()
                .map(|t| {
                    let ports: Vec<(String, PortCounters)> = t
                        .ports()
                        .filter_map(|(id, c)| Some((c.name.clone(), *t.port(id)?.1)))
                        .collect();
                    (
                        t.config().name.clone(),
                        *t.counters(),
                        t.fdb().learned_len(),
                        ports,
                    )
                })
                .collect();
            (tenants, dp.counters(), sw.unknown_vni_drops())
        })?;
        let mut reg = Registry::with_prefix("vswitch");
        let port_rx_packets = Family::<Labels, Counter>::default();
        let port_rx_bytes = Family::<Labels, Counter>::default();
        let port_tx_packets = Family::<Labels, Counter>::default();
        let port_tx_bytes = Family::<Labels, Counter>::default();
        let port_drops = Family::<Labels, Counter>::default();
        let tenant_rx = Family::<Labels, Counter>::default();
        let tenant_flooded = Family::<Labels, Counter>::default();
        let tenant_drops = Family::<Labels, Counter>::default();
        let tenant_macs = Family::<Labels, Gauge>::default();
        let tenant_limit_hits = Family::<Labels, Counter>::default();
        let tenant_moves = Family::<Labels, Counter>::default();
        let tenant_arp = Family::<Labels, Counter>::default();
        let (tenants, dpc, unknown_vni) = snapshot;
        for (tname, tc, macs, ports) in &tenants {
            let tl = vec![("tenant".to_owned(), tname.clone())];
            tenant_rx.get_or_create(&tl).inc_by(tc.rx_packets);
            tenant_flooded.get_or_create(&tl).inc_by(tc.flooded);
            tenant_macs.get_or_create(&tl).set(*macs as i64);
            tenant_limit_hits
                .get_or_create(&tl)
                .inc_by(tc.learn_limit_hits);
            tenant_moves.get_or_create(&tl).inc_by(tc.mac_moves);
            tenant_arp.get_or_create(&tl).inc_by(tc.arp_answered);
            add_drops(&tenant_drops, &tl, &tc.drops);
            for (pname, pc) in ports {
                let pl = vec![
                    ("tenant".to_owned(), tname.clone()),
                    ("port".to_owned(), pname.clone()),
                ];
                port_rx_packets.get_or_create(&pl).inc_by(pc.rx_packets);
                port_rx_bytes.get_or_create(&pl).inc_by(pc.rx_bytes);
                port_tx_packets.get_or_create(&pl).inc_by(pc.tx_packets);
                port_tx_bytes.get_or_create(&pl).inc_by(pc.tx_bytes);
                add_drops(&port_drops, &pl, &pc.drops);
            }
        }
        reg.register(
            "port_rx_packets",
            "Frames received from a port",
            port_rx_packets,
        );
        reg.register("port_rx_bytes", "Bytes received from a port", port_rx_bytes);
        reg.register("port_tx_packets", "Frames sent to a port", port_tx_packets);
        reg.register("port_tx_bytes", "Bytes sent to a port", port_tx_bytes);
        reg.register(
            "port_drops",
            "Frames from a port dropped, by reason",
            port_drops,
        );
        reg.register(
            "tenant_rx_packets",
            "Frames that entered a tenant",
            tenant_rx,
        );
        reg.register(
            "tenant_flooded",
            "Frames flooded in a tenant",
            tenant_flooded,
        );
        reg.register(
            "tenant_drops",
            "Frames dropped in a tenant, by reason",
            tenant_drops,
        );
        reg.register(
            "tenant_learned_macs",
            "MAC addresses learned in a tenant",
            tenant_macs,
        );
        reg.register(
            "tenant_learn_limit_hits",
            "Source MACs not learned because the tenant's table was full (frames to them flood)",
            tenant_limit_hits,
        );
        reg.register(
            "tenant_mac_moves",
            "Learned MACs that moved to another port or VTEP",
            tenant_moves,
        );
        reg.register(
            "tenant_arp_answered",
            "ARP requests for known bindings answered by the switch instead of flooded",
            tenant_arp,
        );
        if let Some(c) = &self.cluster {
            let degraded = Gauge::<i64>::default();
            degraded.set(i64::from(!c.is_connected()));
            reg.register(
                "cluster_degraded",
                "1 while etcd does not answer (forwarding continues with what is known)",
                degraded,
            );
            let members = Gauge::<i64>::default();
            members.set(c.members().len() as i64);
            reg.register(
                "cluster_members",
                "Hosts of the cluster (live leases)",
                members,
            );
            let syncs = Counter::<u64>::default();
            syncs.inc_by(c.info().syncs);
            reg.register(
                "cluster_syncs",
                "Times this host (re)synchronised with etcd",
                syncs,
            );
        }
        let single = |reg: &mut Registry, name: &str, help: &str, value: u64| {
            let c = Counter::<u64>::default();
            c.inc_by(value);
            reg.register(name, help, c);
        };
        single(
            &mut reg,
            "uplink_invalid",
            "Uplink datagrams that are not valid VXLAN",
            dpc.uplink_invalid,
        );
        single(
            &mut reg,
            "uplink_tx_dropped",
            "Datagrams the uplink socket did not take",
            dpc.uplink_tx_dropped,
        );
        single(
            &mut reg,
            "uplink_super_frames",
            "TCP super-frames from the underlay (a Linux peer's tunnel GSO) delivered with \
             segmentation offload",
            dpc.uplink_super_frames,
        );
        single(
            &mut reg,
            "uplink_xdp_received",
            "Frames received through the uplinks' AF_XDP sockets",
            dpc.uplink_xdp_received,
        );
        single(
            &mut reg,
            "uplink_xdp_sent",
            "Frames sent through the uplinks' AF_XDP sockets",
            dpc.uplink_xdp_sent,
        );
        let workers = Gauge::<i64>::default();
        workers.set(self.dp.workers() as i64);
        reg.register("datapath_workers", "Datapath worker threads", workers);
        single(
            &mut reg,
            "tap_offload_dropped",
            "TAP frames with offload metadata the datapath cannot carry out",
            dpc.tap_offload_dropped,
        );
        single(
            &mut reg,
            "unknown_vni",
            "Uplink frames for a VNI without tenant",
            unknown_vni,
        );
        let mut out = String::new();
        encode(&mut out, &reg).map_err(|e| ControlError::Internal(e.to_string()))?;
        let _ = writeln!(out);
        Ok(out)
    }
}
