//! vswitchd in a cluster: its ports published as bindings, cluster tenants created here,
//! and each tenant's program (flood list / VTEP allow-list, remote MACs, ARP answers)
//! applied to the datapath as a diff against what was applied before.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use overlay_net::{Destination, MacAddr, Timestamp};
use vswitch_cluster::{BindingRecord, Cluster, ClusterView, TenantProgram, Touched};

use super::control::{Control, ControlError};
use crate::api::{PortSpec, TenantSpec};

/// The binding a port publishes: its MAC and addresses, as port security pins them.
pub(super) fn binding_of(spec: &PortSpec) -> BindingRecord {
    BindingRecord {
        mac: spec.mac.clone(),
        ips: spec.ips.clone(),
    }
}

/// The rebuildable cache of the cluster view in the state directory.
pub fn cache_path(state_dir: &Path) -> PathBuf {
    state_dir.join("cluster-view.cache")
}

impl Control {
    /// The bindings of this daemon's ports, (tenant, port) → record: what it publishes when
    /// it joins a cluster ([`vswitch_cluster::Cluster::start`]).
    pub fn cluster_bindings(&self) -> BTreeMap<(String, String), BindingRecord> {
        self.state
            .ports
            .iter()
            .map(|p| ((p.tenant.clone(), p.name.clone()), binding_of(p)))
            .collect()
    }

    /// Joins a cluster started with [`Self::cluster_bindings`]: the cluster's program (from
    /// the cached view until etcd answers) is applied at once.
    pub fn join_cluster(&mut self, cluster: Cluster) {
        self.cluster = Some(cluster);
        self.reconcile_cluster(&Touched {
            all: true,
            tenant_set: true,
            ..Touched::default()
        });
    }

    /// The cluster this daemon is a member of.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// Applies what changed in the cluster view.
    pub fn reconcile_cluster(&mut self, touched: &Touched) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        if touched.tenant_set || touched.all {
            let tenants = cluster.view().tenants.clone();
            self.reconcile_tenants(&tenants, cluster.is_connected());
        }
        // The programs of the touched tenants, derived under the view's lock (not a copy of
        // the whole view), applied after it is released.
        let programs: Vec<(String, TenantProgram)> = {
            let view = cluster.view();
            self.state
                .tenants
                .iter()
                .filter(|t| touched.all || touched.tenants.contains(&t.name))
                .map(|t| {
                    (
                        t.name.clone(),
                        view.program(cluster.host(), &t.name, cluster.underlay()),
                    )
                })
                .collect()
        };
        for (tenant, program) in programs {
            if let Err(e) = self.apply_program(&tenant, program, cluster.udp_port()) {
                tracing::warn!(tenant, error = %e.message(), "could not program the tenant from the cluster");
            }
        }
    }

    /// Cluster tenants exist here; those deleted from the cluster go (once etcd said so,
    /// and only without ports).
    fn reconcile_tenants(&mut self, tenants: &BTreeMap<String, TenantSpec>, connected: bool) {
        for spec in tenants.values() {
            match self.state.tenants.iter().find(|t| t.name == spec.name) {
                Some(here) if here == spec => {
                    self.state.cluster_tenants.insert(spec.name.clone());
                    continue;
                }
                Some(_) if self.state.ports.iter().any(|p| p.tenant == spec.name) => {
                    // Never forward a tenant's ports with another VNI than the cluster's.
                    tracing::error!(
                        tenant = %spec.name,
                        "this host's tenant differs from the cluster's and has ports: not \
                         joined (delete its ports, or the tenant, here)"
                    );
                    continue;
                }
                Some(_) => {
                    // Changed in the cluster (deleted and made again) while this host was
                    // away, without ports here: made again as the cluster has it.
                    self.programmed.remove(&spec.name);
                    if let Err(e) = self.delete_tenant(&spec.name) {
                        tracing::warn!(tenant = %spec.name, error = %e.message(), "could not replace a changed cluster tenant");
                        continue;
                    }
                }
                None => {}
            }
            match self.create_tenant(spec.clone()) {
                Ok(_) => {
                    self.state.cluster_tenants.insert(spec.name.clone());
                    tracing::info!(tenant = %spec.name, "cluster tenant created here");
                }
                Err(e) => {
                    tracing::warn!(tenant = %spec.name, error = %e.message(), "could not create a cluster tenant here")
                }
            }
        }
        if !connected {
            return;
        }
        let gone: Vec<String> = self
            .state
            .cluster_tenants
            .iter()
            .filter(|t| !tenants.contains_key(*t))
            .cloned()
            .collect();
        for t in gone {
            if self.state.ports.iter().any(|p| p.tenant == t) {
                continue;
            }
            self.programmed.remove(&t);
            match self.delete_tenant(&t) {
                Ok(()) => tracing::info!(tenant = %t, "cluster tenant deleted here"),
                Err(e) => {
                    tracing::warn!(tenant = %t, error = %e.message(), "could not delete a cluster tenant here")
                }
            }
            self.state.cluster_tenants.remove(&t);
        }
        if let Err(e) = self.save() {
            tracing::warn!(error = %e.message(), "saving state");
        }
    }

    /// Applies a tenant's program as a diff against the one applied before. Each step that
    /// fails is logged and left out of what is recorded as applied, so that the next change
    /// tries it again; what was configured by hand (VTEPs, their ports, static entries) is
    /// never changed.
    fn apply_program(
        &mut self,
        tenant: &str,
        program: TenantProgram,
        local_port: u16,
    ) -> Result<(), ControlError> {
        let old = self.programmed.get(tenant).cloned().unwrap_or_default();
        if old == program {
            return Ok(());
        }
        let manual_vteps: Vec<IpAddr> = self.state.vteps.get(tenant).cloned().unwrap_or_default();
        let manual_macs: Vec<MacAddr> = self
            .state
            .fdb
            .get(tenant)
            .into_iter()
            .flatten()
            .filter_map(|e| e.mac.parse().ok())
            .collect();
        let t = tenant.to_owned();
        let new = program;
        let (applied, resized) = self.call_dp(move |dp| {
            let mut applied = TenantProgram::default();
            for vtep in old.vteps.keys().filter(|v| !new.vteps.contains_key(*v)) {
                if manual_vteps.contains(vtep) {
                    continue;
                }
                if let Some(ts) = dp.switch_mut().tenant_mut(&t) {
                    ts.fdb_mut().remove_remote_vtep(*vtep);
                }
                let _ = dp.set_vtep_port(&t, *vtep, None);
            }
            for (vtep, port) in &new.vteps {
                let known = old.vteps.get(vtep) == Some(port) || manual_vteps.contains(vtep);
                if !known {
                    if let Err(e) = dp.add_remote_vtep(&t, *vtep) {
                        tracing::warn!(tenant = %t, vtep = %vtep, error = %e, "cluster VTEP not usable here");
                        continue;
                    }
                    let port = (*port != local_port).then_some(*port);
                    if let Err(e) = dp.set_vtep_port(&t, *vtep, port) {
                        tracing::warn!(tenant = %t, vtep = %vtep, error = %e, "cluster VTEP port not set");
                        continue;
                    }
                }
                applied.vteps.insert(*vtep, *port);
            }
            let Some(ts) = dp.switch_mut().tenant_mut(&t) else {
                return (applied, None);
            };
            for (mac, vtep) in &old.macs {
                let kept = new.macs.get(mac) == Some(vtep) && applied.vteps.contains_key(vtep);
                if kept || manual_macs.contains(mac) {
                    continue;
                }
                let ours = ts.fdb().entries().any(|(m, e)| {
                    m == *mac && e.is_static && e.destination == Destination::Remote(*vtep)
                });
                if ours {
                    ts.fdb_mut().remove(*mac);
                }
            }
            for (mac, vtep) in &new.macs {
                if manual_macs.contains(mac) || !applied.vteps.contains_key(vtep) {
                    continue;
                }
                if old.macs.get(mac) != Some(vtep)
                    && let Err(e) =
                        ts.fdb_mut()
                            .add_static(*mac, Destination::Remote(*vtep), Timestamp(0))
                {
                    tracing::warn!(tenant = %t, mac = %mac, error = %e, "cluster MAC not programmed");
                    continue;
                }
                applied.macs.insert(*mac, *vtep);
            }
            if old.neighbors != new.neighbors {
                ts.set_neighbors(
                    new.neighbors
                        .iter()
                        .map(|(ip, mac)| (*ip, *mac))
                        .collect::<HashMap<_, _>>(),
                );
            }
            applied.neighbors = new.neighbors;
            (applied, dp.refresh_tenant_mtu(&t))
        })?;
        if let Some(mtu) = resized {
            self.resize_ports(tenant, mtu);
        }
        tracing::info!(
            tenant,
            vteps = applied.vteps.len(),
            macs = applied.macs.len(),
            neighbors = applied.neighbors.len(),
            "tenant programmed from the cluster"
        );
        self.programmed.insert(tenant.to_owned(), applied);
        Ok(())
    }

    /// Whether the cluster programmed VTEP `ip` into `tenant` (not configured by hand).
    pub(super) fn cluster_vtep(&self, tenant: &str, ip: IpAddr) -> bool {
        self.programmed
            .get(tenant)
            .is_some_and(|p| p.vteps.contains_key(&ip))
            && !self
                .state
                .vteps
                .get(tenant)
                .is_some_and(|v| v.contains(&ip))
    }

    /// Whether the cluster programmed a static entry for `mac` into `tenant`.
    pub(super) fn cluster_mac(&self, tenant: &str, mac: MacAddr) -> bool {
        self.programmed
            .get(tenant)
            .is_some_and(|p| p.macs.contains_key(&mac))
    }

    /// What the cluster programmed, per tenant (for tests and the API).
    pub fn programmed(&self) -> &BTreeMap<String, TenantProgram> {
        &self.programmed
    }
}

/// The cached cluster view of the last run, if there is a valid one.
pub fn load_cache(state_dir: &Path) -> Option<ClusterView> {
    let bytes = std::fs::read(cache_path(state_dir)).ok()?;
    let view = vswitch_cluster::cache::decode(&bytes);
    if view.is_none() {
        tracing::warn!(path = %cache_path(state_dir).display(), "cluster cache not valid: ignored (etcd has the truth)");
    }
    view
}

/// Caches the cluster view (atomically; a failure only costs the next start its head start);
/// returns whether it was written.
pub fn save_cache(state_dir: &Path, view: &ClusterView) -> bool {
    let bytes = vswitch_cluster::cache::encode(view);
    match daemon_kit::save_atomic(&cache_path(state_dir), &bytes) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "caching the cluster view");
            false
        }
    }
}
