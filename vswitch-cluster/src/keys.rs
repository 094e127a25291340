//! The key layout in etcd and the records stored under it (JSON values).
//!
//! Under a prefix (default `/libvirtual/`):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `hosts/{host}` | [`HostRecord`] | the host's |
//! | `tenants/{tenant}` | [`TenantSpec`] | none (a cluster object) |
//! | `vnis/{vni}` | the tenant's name | none (keeps VNIs unique) |
//! | `bindings/{tenant}/{host}/{port}` | [`BindingRecord`] | the host's |
//! | `addresses/{tenant}/{ip}` | [`AddressRecord`] | none (survives restarts; GC) |

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use vswitch_api::TenantSpec;

/// A host as it publishes itself (`hosts/{host}`, under its lease).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Underlay addresses, at most one per family is used (IPv4 preferred).
    pub underlay: Vec<IpAddr>,
    /// The UDP port its VXLAN uplink listens on.
    pub udp_port: u16,
}

/// A local port of a host in a tenant (`bindings/{tenant}/{host}/{port}`, under the host's
/// lease). A host with any binding in a tenant is in the tenant's flood list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingRecord {
    /// The port's MAC address, if it is known (port security, the VM's configured MAC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The port's IP addresses (port security, the CNI result).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
}

/// An address taken from a tenant's subnet (`addresses/{tenant}/{ip}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressRecord {
    /// The host that allocated it.
    pub host: String,
    /// Who holds it: the port (or attachment) name on that host.
    pub owner: String,
    /// When it was allocated (seconds since the Unix epoch): garbage collection spares
    /// allocations younger than a grace period (their port is still being made).
    pub allocated_at: u64,
}

/// The keys of one cluster, under a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

/// A key of the layout, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    /// `hosts/{host}`.
    Host(String),
    /// `tenants/{tenant}`.
    Tenant(String),
    /// `vnis/{vni}`.
    Vni(u32),
    /// `bindings/{tenant}/{host}/{port}`.
    Binding {
        /// Tenant.
        tenant: String,
        /// Host.
        host: String,
        /// Port name on that host.
        port: String,
    },
    /// `addresses/{tenant}/{ip}`.
    Address {
        /// Tenant.
        tenant: String,
        /// The address.
        ip: IpAddr,
    },
}

impl Keys {
    /// The layout under `prefix` (a trailing `/` is added if missing).
    pub fn new(prefix: &str) -> Keys {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }

    /// The prefix every key starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `hosts/{host}`.
    pub fn host(&self, host: &str) -> String {
        format!("{}hosts/{host}", self.prefix)
    }

    /// `hosts/`.
    pub fn hosts(&self) -> String {
        format!("{}hosts/", self.prefix)
    }

    /// `tenants/{tenant}`.
    pub fn tenant(&self, tenant: &str) -> String {
        format!("{}tenants/{tenant}", self.prefix)
    }

    /// `tenants/`.
    pub fn tenants(&self) -> String {
        format!("{}tenants/", self.prefix)
    }

    /// `vnis/{vni}`.
    pub fn vni(&self, vni: u32) -> String {
        format!("{}vnis/{vni}", self.prefix)
    }

    /// `bindings/{tenant}/{host}/{port}`.
    pub fn binding(&self, tenant: &str, host: &str, port: &str) -> String {
        format!("{}bindings/{tenant}/{host}/{port}", self.prefix)
    }

    /// `bindings/{tenant}/`.
    pub fn tenant_bindings(&self, tenant: &str) -> String {
        format!("{}bindings/{tenant}/", self.prefix)
    }

    /// `addresses/{tenant}/{ip}`.
    pub fn address(&self, tenant: &str, ip: IpAddr) -> String {
        format!("{}addresses/{tenant}/{ip}", self.prefix)
    }

    /// `addresses/{tenant}/`.
    pub fn tenant_addresses(&self, tenant: &str) -> String {
        format!("{}addresses/{tenant}/", self.prefix)
    }

    /// `addresses/`.
    pub fn addresses(&self) -> String {
        format!("{}addresses/", self.prefix)
    }

    /// Parses a key of the layout; `None` for anything else (a key written by someone else
    /// under the prefix, a name that is not valid).
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        let key = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        let parts: Vec<&str> = key.split('/').collect();
        let name = |s: &str| daemon_kit::names::check_name("name", s).is_ok();
        let port = |s: &str| daemon_kit::names::check_port_name(s).is_ok();
        match parts.as_slice() {
            ["hosts", h] if name(h) => Some(Key::Host((*h).into())),
            ["tenants", t] if name(t) => Some(Key::Tenant((*t).into())),
            ["vnis", v] => v.parse().ok().map(Key::Vni),
            ["bindings", t, h, p] if name(t) && name(h) && port(p) => Some(Key::Binding {
                tenant: (*t).into(),
                host: (*h).into(),
                port: (*p).into(),
            }),
            ["addresses", t, ip] if name(t) => Some(Key::Address {
                tenant: (*t).into(),
                ip: ip.parse().ok()?,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_foreign_keys_are_rejected() {
        let k = Keys::new("/lv");
        assert_eq!(k.host("h1"), "/lv/hosts/h1");
        assert_eq!(
            k.parse(k.host("h1").as_bytes()),
            Some(Key::Host("h1".into()))
        );
        let b = k.binding("a", "h1", "p0");
        assert_eq!(
            k.parse(b.as_bytes()),
            Some(Key::Binding {
                tenant: "a".into(),
                host: "h1".into(),
                port: "p0".into()
            })
        );
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        assert_eq!(
            k.parse(k.address("a", ip).as_bytes()),
            Some(Key::Address {
                tenant: "a".into(),
                ip
            })
        );
        assert_eq!(k.parse(k.vni(42).as_bytes()), Some(Key::Vni(42)));
        for bad in [
            "/other/hosts/h1",
            "/lv/hosts/h1/extra",
            "/lv/hosts/",
            "/lv/hosts/-bad",
            "/lv/bindings/a/h1",
            "/lv/addresses/a/not-an-ip",
            "/lv/vnis/x",
            "/lv/unknown/x",
        ] {
            assert_eq!(k.parse(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(k.parse(&[0xff, 0xfe]), None);
    }
}
