//! The local cache of the cluster view: a rebuildable `rkyv` archive in the state
//! directory, so that a restarted vswitchd forwards at once with what it last knew. It is
//! never the source of truth: it is validated on load (magic, version, the archive's own
//! structure), anything wrong means "no cache", and etcd's view replaces it as soon as etcd
//! answers.

use std::net::IpAddr;

use rkyv::{Archive, Deserialize, Serialize};

use crate::keys::{BindingRecord, HostRecord, TenantSpec};
use crate::view::ClusterView;

const MAGIC: &[u8; 8] = b"LVCVIEW1";

#[derive(Archive, Serialize, Deserialize)]
struct CachedTenant {
    name: String,
    vni: u32,
    mtu: u16,
    max_macs: Option<u64>,
    learn_vteps: bool,
    subnet: Option<String>,
}

#[derive(Archive, Serialize, Deserialize)]
struct CachedBinding {
    tenant: String,
    host: String,
    port: String,
    mac: Option<String>,
    ips: Vec<IpAddr>,
}

#[derive(Archive, Serialize, Deserialize)]
struct CachedView {
    revision: i64,
    hosts: Vec<(String, Vec<IpAddr>, u16)>,
    tenants: Vec<CachedTenant>,
    bindings: Vec<CachedBinding>,
}

/// The view as cache bytes.
pub fn encode(view: &ClusterView) -> Vec<u8> {
    let cached = CachedView {
        revision: view.revision,
        hosts: view
            .hosts
            .iter()
            .map(|(n, h)| (n.clone(), h.underlay.clone(), h.udp_port))
            .collect(),
        tenants: view
            .tenants
            .values()
            .map(|t| CachedTenant {
                name: t.name.clone(),
                vni: t.vni,
                mtu: t.mtu,
                max_macs: t.max_macs.map(|m| m as u64),
                learn_vteps: t.learn_vteps,
                subnet: t.subnet.clone(),
            })
            .collect(),
        bindings: view
            .bindings
            .iter()
            .flat_map(|(tenant, b)| {
                b.iter().map(move |((host, port), r)| CachedBinding {
                    tenant: tenant.clone(),
                    host: host.clone(),
                    port: port.clone(),
                    mac: r.mac.clone(),
                    ips: r.ips.clone(),
                })
            })
            .collect(),
    };
    let mut out = MAGIC.to_vec();
    // Serializing owned, plain data into memory does not fail.
    if let Ok(bytes) = rkyv::to_bytes::<rkyv::rancor::Error>(&cached) {
        out.extend_from_slice(&bytes);
    }
    out
}

/// The view from cache bytes, validated; `None` if they are not a valid cache.
pub fn decode(bytes: &[u8]) -> Option<ClusterView> {
    let body = bytes.strip_prefix(MAGIC.as_slice())?;
    // rkyv wants the archive aligned: copy it into an aligned buffer.
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    let cached = rkyv::from_bytes::<CachedView, rkyv::rancor::Error>(&aligned).ok()?;
    let mut view = ClusterView {
        revision: cached.revision,
        ..ClusterView::default()
    };
    for (name, underlay, udp_port) in cached.hosts {
        view.hosts.insert(name, HostRecord { underlay, udp_port });
    }
    for t in cached.tenants {
        view.tenants.insert(
            t.name.clone(),
            TenantSpec {
                name: t.name,
                vni: t.vni,
                mtu: t.mtu,
                max_macs: t.max_macs.map(|m| m as usize),
                learn_vteps: t.learn_vteps,
                subnet: t.subnet,
            },
        );
    }
    for b in cached.bindings {
        view.bindings.entry(b.tenant).or_default().insert(
            (b.host, b.port),
            BindingRecord {
                mac: b.mac,
                ips: b.ips,
            },
        );
    }
    Some(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_round_trips_and_damage_means_no_cache() {
        let mut view = ClusterView {
            revision: 42,
            ..ClusterView::default()
        };
        view.hosts.insert(
            "h1".into(),
            HostRecord {
                underlay: vec!["192.0.2.1".parse().unwrap(), "fd00::1".parse().unwrap()],
                udp_port: 4789,
            },
        );
        view.tenants.insert(
            "a".into(),
            TenantSpec {
                name: "a".into(),
                vni: 100,
                mtu: 0,
                max_macs: Some(10),
                learn_vteps: false,
                subnet: Some("10.0.0.0/24".into()),
            },
        );
        view.bindings.entry("a".into()).or_default().insert(
            ("h1".into(), "p1".into()),
            BindingRecord {
                mac: Some("02:00:00:00:00:01".into()),
                ips: vec!["10.0.0.2".parse().unwrap()],
            },
        );
        let bytes = encode(&view);
        assert_eq!(decode(&bytes), Some(view));
        assert_eq!(decode(&bytes[..bytes.len() / 2]), None, "truncated");
        assert_eq!(decode(b"garbage"), None);
        // Any flipped byte is either caught or yields some valid view: never a panic.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            let _ = decode(&b);
        }
    }
}
