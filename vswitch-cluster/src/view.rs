//! What one host knows of the cluster, and what it programs from it (sans-IO: changes in,
//! per-tenant programs out).
//!
//! The view keeps every host and tenant, and the bindings of the tenants this host has
//! ports in (others are not kept: memory follows the tenants a host hosts, not the whole
//! cluster). From it, [`ClusterView::program`] derives a tenant's flood list / VTEP
//! allow-list, its static remote MACs and its ARP answers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use overlay_net::MacAddr;
use serde::{Deserialize, Serialize};

use crate::keys::{BindingRecord, HostRecord, Key, Keys, TenantSpec};

/// One change to the cluster's keys, as a watch reports it (or a snapshot lists it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A key was written.
    Put {
        /// Its key.
        key: Vec<u8>,
        /// Its value.
        value: Vec<u8>,
    },
    /// A key was deleted (or its lease expired).
    Delete {
        /// Its key.
        key: Vec<u8>,
    },
}

/// What a tenant gets programmed on one host from the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantProgram {
    /// Remote VTEPs (the other hosts with a port in the tenant) and their UDP port: the flood
    /// list and the allow-list of incoming VXLAN.
    pub vteps: BTreeMap<IpAddr, u16>,
    /// Remote MACs and the VTEP each lives behind (static entries: no flood-and-learn).
    pub macs: BTreeMap<MacAddr, IpAddr>,
    /// Address → MAC of every binding in the tenant (local ones too): ARP requests and
    /// neighbor solicitations for them are answered on the host.
    pub neighbors: BTreeMap<IpAddr, MacAddr>,
}

/// A binding as the view keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// Host.
    pub host: String,
    /// Port on that host.
    pub port: String,
    /// Its record.
    pub record: BindingRecord,
}

/// The cluster as one host sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// Live hosts (their lease holds).
    pub hosts: BTreeMap<String, HostRecord>,
    /// Cluster tenants.
    pub tenants: BTreeMap<String, TenantSpec>,
    /// Bindings of the tenants this host keeps, by tenant, by (host, port).
    pub bindings: BTreeMap<String, BTreeMap<(String, String), BindingRecord>>,
    /// The etcd revision the view is at.
    pub revision: i64,
    /// Records that were not understood (bad JSON, a key outside the layout): skipped.
    #[serde(skip)]
    pub invalid: u64,
}

/// Which tenants a change touched (their programs may differ now).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    /// Every tenant's program may have changed (a host came, went or moved).
    pub all: bool,
    /// These tenants' programs may have changed.
    pub tenants: BTreeSet<String>,
    /// The set of cluster tenants changed.
    pub tenant_set: bool,
}

impl Touched {
    /// Whether nothing was touched.
    pub fn is_empty(&self) -> bool {
        !self.all && self.tenants.is_empty() && !self.tenant_set
    }

    /// Adds what `other` touched.
    pub fn merge(&mut self, other: Touched) {
        self.all |= other.all;
        self.tenant_set |= other.tenant_set;
        self.tenants.extend(other.tenants);
    }
}

impl ClusterView {
    /// Applies one change. `keep` says whether the bindings of a tenant are kept (this host
    /// has ports in it); a change that is not understood is counted in `invalid` and
    /// skipped.
    pub fn apply(&mut self, keys: &Keys, change: &Change, keep: &dyn Fn(&str) -> bool) -> Touched {
        let mut touched = Touched::default();
        let (key, value) = match change {
            Change::Put { key, value } => (key, Some(value)),
            Change::Delete { key } => (key, None),
        };
        let Some(parsed) = keys.parse(key) else {
            // Keys of other layouts (addresses, vnis are fine) are not ours to judge.
            self.invalid += 1;
            return touched;
        };
        // A record that is not valid counts as gone: what the key held before is not kept
        // either (a reload would not have it).
        let mut invalid = || {
            self.invalid += 1;
        };
        match parsed {
            Key::Host(h) => {
                let record = value.and_then(|v| {
                    let r = serde_json::from_slice::<HostRecord>(v)
                        .ok()
                        .filter(valid_host);
                    if r.is_none() {
                        invalid();
                    }
                    r
                });
                let changed = match record {
                    Some(r) => self.hosts.insert(h, r.clone()) != Some(r),
                    None => self.hosts.remove(&h).is_some(),
                };
                touched.all |= changed;
            }
            Key::Tenant(t) => {
                let spec = value.and_then(|v| {
                    let s = serde_json::from_slice::<TenantSpec>(v)
                        .ok()
                        .filter(|s| s.name == t);
                    if s.is_none() {
                        invalid();
                    }
                    s
                });
                let changed = match spec {
                    Some(s) => self.tenants.insert(t, s.clone()) != Some(s),
                    None => self.tenants.remove(&t).is_some(),
                };
                touched.tenant_set |= changed;
            }
            Key::Binding { tenant, host, port } => {
                let record = value.and_then(|v| {
                    let r = serde_json::from_slice::<BindingRecord>(v)
                        .ok()
                        .filter(valid_binding);
                    if r.is_none() {
                        invalid();
                    }
                    r
                });
                match record {
                    Some(r) if keep(&tenant) => {
                        self.bindings
                            .entry(tenant.clone())
                            .or_default()
                            .insert((host, port), r);
                        touched.tenants.insert(tenant);
                    }
                    Some(_) => {}
                    None => {
                        if let Some(b) = self.bindings.get_mut(&tenant)
                            && b.remove(&(host, port)).is_some()
                        {
                            if b.is_empty() {
                                self.bindings.remove(&tenant);
                            }
                            touched.tenants.insert(tenant);
                        }
                    }
                }
            }
            Key::Vni(_) | Key::Address { .. } => {}
        }
        touched
    }

    /// Forgets the bindings of a tenant this host no longer keeps.
    pub fn drop_tenant_bindings(&mut self, tenant: &str) {
        self.bindings.remove(tenant);
    }

    /// Replaces the bindings of one tenant (after loading them at the view's revision).
    pub fn set_tenant_bindings(
        &mut self,
        tenant: &str,
        bindings: BTreeMap<(String, String), BindingRecord>,
    ) {
        if bindings.is_empty() {
            self.bindings.remove(tenant);
        } else {
            self.bindings.insert(tenant.to_owned(), bindings);
        }
    }

    /// Hosts with a binding in `tenant`.
    pub fn tenant_hosts(&self, tenant: &str) -> BTreeSet<&str> {
        self.bindings
            .get(tenant)
            .map(|b| b.keys().map(|(h, _)| h.as_str()).collect())
            .unwrap_or_default()
    }

    /// Every binding the view keeps, by tenant.
    pub fn all_bindings(&self) -> impl Iterator<Item = (&str, Binding)> + '_ {
        self.bindings.iter().flat_map(|(t, b)| {
            b.iter().map(move |((host, port), record)| {
                (
                    t.as_str(),
                    Binding {
                        host: host.clone(),
                        port: port.clone(),
                        record: record.clone(),
                    },
                )
            })
        })
    }

    /// The program of `tenant` on host `local`, which has uplinks in `families` (the address
    /// families of its underlay) and listens on `local_port`: a remote host is reached over
    /// IPv4 if both have it, else over IPv6; a host reachable over neither is left out.
    pub fn program(&self, local: &str, tenant: &str, underlay: &[IpAddr]) -> TenantProgram {
        let mut program = TenantProgram::default();
        let Some(bindings) = self.bindings.get(tenant) else {
            return program;
        };
        let has_v4 = underlay.iter().any(IpAddr::is_ipv4);
        let has_v6 = underlay.iter().any(IpAddr::is_ipv6);
        let vtep_of = |host: &str| -> Option<(IpAddr, u16)> {
            let r = self.hosts.get(host)?;
            let pick = |v4: bool| {
                r.underlay
                    .iter()
                    .map(|ip| ip.to_canonical())
                    .find(|ip| ip.is_ipv4() == v4)
            };
            let ip = (if has_v4 { pick(true) } else { None })
                .or_else(|| if has_v6 { pick(false) } else { None })?;
            Some((ip, r.udp_port))
        };
        let mac_of = |r: &BindingRecord| r.mac.as_deref().and_then(|m| m.parse::<MacAddr>().ok());
        // This host's own ports win over anything another host claims: a remote record with
        // the MAC or an address of a local port (a duplicate, a VM moving, a hostile record)
        // never takes traffic or ARP answers away from it.
        let local_macs: BTreeSet<MacAddr> = bindings
            .iter()
            .filter(|((host, _), _)| host == local)
            .filter_map(|(_, r)| mac_of(r))
            .collect();
        for ((host, _), record) in bindings.iter().filter(|((h, _), _)| h != local) {
            // A host whose lease expired has no host record: it is not a member any more,
            // whatever bindings of it are still on their way out.
            let Some((vtep, port)) = vtep_of(host) else {
                continue;
            };
            program.vteps.insert(vtep, port);
            let Some(mac) = mac_of(record).filter(|m| !local_macs.contains(m)) else {
                continue;
            };
            program.macs.insert(mac, vtep);
            for ip in &record.ips {
                program.neighbors.insert(ip.to_canonical(), mac);
            }
        }
        for ((_, _), record) in bindings.iter().filter(|((h, _), _)| h == local) {
            if let Some(mac) = mac_of(record) {
                for ip in &record.ips {
                    program.neighbors.insert(ip.to_canonical(), mac);
                }
            }
        }
        program
    }
}

/// A host record is usable: a UDP port, and underlay addresses that can be a host's.
fn valid_host(r: &HostRecord) -> bool {
    r.udp_port != 0
        && !r.underlay.is_empty()
        && r.underlay.len() <= 8
        && r.underlay.iter().all(|ip| match ip.to_canonical() {
            IpAddr::V4(a) => !(a.is_unspecified() || a.is_broadcast() || a.is_multicast()),
            IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
        })
}

/// A binding's fields are valid: a unicast MAC if any, addresses that can be a host's.
fn valid_binding(r: &BindingRecord) -> bool {
    let mac_ok = match &r.mac {
        None => true,
        Some(m) => m.parse::<MacAddr>().is_ok_and(|m| m.is_unicast()),
    };
    mac_ok
        && r.ips.len() <= 64
        && r.ips
            .iter()
            .all(|ip| !ip.is_unspecified() && !ip.is_multicast())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: String, value: impl Serialize) -> Change {
        Change::Put {
            key: key.into_bytes(),
            value: serde_json::to_vec(&value).unwrap(),
        }
    }

    fn host(ip: &str) -> HostRecord {
        HostRecord {
            underlay: vec![ip.parse().unwrap()],
            udp_port: 4789,
        }
    }

    fn binding(mac: &str, ip: &str) -> BindingRecord {
        BindingRecord {
            mac: Some(mac.into()),
            ips: vec![ip.parse().unwrap()],
        }
    }

    #[test]
    fn a_tenant_program_has_the_other_hosts_of_the_tenant_and_their_macs() {
        let k = Keys::new("/lv/");
        let mut v = ClusterView::default();
        let all = |_: &str| true;
        for (h, ip) in [
            ("h1", "192.0.2.1"),
            ("h2", "192.0.2.2"),
            ("h3", "192.0.2.3"),
        ] {
            assert!(v.apply(&k, &put(k.host(h), host(ip)), &all).all);
        }
        let t = v.apply(
            &k,
            &put(
                k.binding("a", "h1", "p1"),
                binding("02:00:00:00:00:01", "10.0.0.2"),
            ),
            &all,
        );
        assert!(t.tenants.contains("a"));
        v.apply(
            &k,
            &put(
                k.binding("a", "h2", "p2"),
                binding("02:00:00:00:00:02", "10.0.0.3"),
            ),
            &all,
        );
        // h3 has a port only in tenant b.
        v.apply(
            &k,
            &put(
                k.binding("b", "h3", "p3"),
                binding("02:00:00:00:00:03", "10.0.0.2"),
            ),
            &all,
        );
        let p = v.program("h1", "a", &["192.0.2.1".parse().unwrap()]);
        let h2: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(p.vteps, BTreeMap::from([(h2, 4789)]));
        assert_eq!(
            p.macs,
            BTreeMap::from([("02:00:00:00:00:02".parse().unwrap(), h2)])
        );
        assert_eq!(p.neighbors.len(), 2, "local bindings are answered for too");
        // Host h2's lease expires: it leaves the program, its MAC and its neighbor with it.
        let gone = v.apply(
            &k,
            &Change::Delete {
                key: k.host("h2").into_bytes(),
            },
            &all,
        );
        assert!(gone.all);
        let p = v.program("h1", "a", &["192.0.2.1".parse().unwrap()]);
        assert!(p.vteps.is_empty() && p.macs.is_empty());
        assert_eq!(p.neighbors.len(), 1);
    }

    #[test]
    fn hostile_records_are_skipped_and_counted() {
        let k = Keys::new("/lv/");
        let mut v = ClusterView::default();
        let all = |_: &str| true;
        let bad = [
            put(k.host("h1"), "not a host"),
            put(
                k.binding("a", "h1", "p1"),
                binding("ff:ff:ff:ff:ff:ff", "10.0.0.2"),
            ),
            put(
                k.binding("a", "h1", "p1"),
                binding("02:00:00:00:00:01", "0.0.0.0"),
            ),
            put(format!("{}tenants/x", k.prefix()), "x"),
            Change::Put {
                key: b"/lv/hosts/../../etc".to_vec(),
                value: b"{}".to_vec(),
            },
        ];
        for c in &bad {
            assert!(v.apply(&k, c, &all).is_empty());
        }
        assert_eq!(v.invalid, bad.len() as u64);
        assert!(v.hosts.is_empty() && v.bindings.is_empty() && v.tenants.is_empty());
    }

    #[test]
    fn bindings_of_tenants_not_hosted_here_are_not_kept() {
        let k = Keys::new("/lv/");
        let mut v = ClusterView::default();
        let only_a = |t: &str| t == "a";
        v.apply(
            &k,
            &put(
                k.binding("b", "h2", "p2"),
                binding("02:00:00:00:00:02", "10.0.0.3"),
            ),
            &only_a,
        );
        assert!(v.bindings.is_empty());
    }

    #[test]
    fn ipv4_is_preferred_and_a_host_without_a_shared_family_is_left_out() {
        let k = Keys::new("/lv/");
        let mut v = ClusterView::default();
        let all = |_: &str| true;
        let dual = HostRecord {
            underlay: vec!["fd00::2".parse().unwrap(), "192.0.2.2".parse().unwrap()],
            udp_port: 8472,
        };
        v.apply(&k, &put(k.host("h2"), dual), &all);
        v.apply(&k, &put(k.host("h3"), host("192.0.2.3")), &all);
        v.apply(
            &k,
            &put(k.binding("a", "h2", "p2"), BindingRecord::default()),
            &all,
        );
        v.apply(
            &k,
            &put(k.binding("a", "h3", "p3"), BindingRecord::default()),
            &all,
        );
        let p = v.program("h1", "a", &["fd00::1".parse().unwrap()]);
        assert_eq!(
            p.vteps,
            BTreeMap::from([("fd00::2".parse().unwrap(), 8472)])
        );
        let p = v.program(
            "h1",
            "a",
            &["192.0.2.1".parse().unwrap(), "fd00::1".parse().unwrap()],
        );
        assert_eq!(p.vteps.len(), 2);
        assert_eq!(p.vteps.get(&"192.0.2.2".parse().unwrap()), Some(&8472));
    }
}

#[cfg(test)]
mod local_tests {
    use super::*;

    #[test]
    fn a_remote_record_never_takes_a_local_ports_mac_or_address() {
        let k = Keys::new("/lv/");
        let mut v = ClusterView::default();
        let all = |_: &str| true;
        let put = |key: String, value: &dyn erased::Json| Change::Put {
            key: key.into_bytes(),
            value: value.bytes(),
        };
        let host = HostRecord {
            underlay: vec!["192.0.2.2".parse().unwrap()],
            udp_port: 4789,
        };
        let mine = BindingRecord {
            mac: Some("02:00:00:00:00:01".into()),
            ips: vec!["10.0.0.2".parse().unwrap()],
        };
        let thief = BindingRecord {
            mac: Some("02:00:00:00:00:01".into()),
            ips: vec!["10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap()],
        };
        let other = BindingRecord {
            mac: Some("02:00:00:00:00:09".into()),
            ips: vec!["10.0.0.2".parse().unwrap()],
        };
        v.apply(&k, &put(k.host("h2"), &host), &all);
        v.apply(&k, &put(k.binding("a", "h1", "p1"), &mine), &all);
        v.apply(&k, &put(k.binding("a", "h2", "x1"), &thief), &all);
        v.apply(&k, &put(k.binding("a", "h2", "x2"), &other), &all);
        let p = v.program("h1", "a", &["192.0.2.1".parse().unwrap()]);
        let m1: MacAddr = "02:00:00:00:00:01".parse().unwrap();
        assert!(
            !p.macs.contains_key(&m1),
            "a remote copy of a local MAC is not programmed"
        );
        assert_eq!(p.neighbors.get(&"10.0.0.2".parse().unwrap()), Some(&m1));
        // An invalid update of a host removes what it held (a reload would not keep it).
        let bad = HostRecord {
            underlay: vec!["192.0.2.2".parse().unwrap()],
            udp_port: 0,
        };
        assert!(v.apply(&k, &put(k.host("h2"), &bad), &all).all);
        assert!(v.hosts.is_empty());
        assert!(
            v.program("h1", "a", &["192.0.2.1".parse().unwrap()])
                .vteps
                .is_empty()
        );
    }

    mod erased {
        pub trait Json {
            fn bytes(&self) -> Vec<u8>;
        }
        impl<T: serde::Serialize> Json for T {
            fn bytes(&self) -> Vec<u8> {
                serde_json::to_vec(self).unwrap()
            }
        }
    }
}
