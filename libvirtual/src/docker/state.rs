//! What the Docker plugin remembers (persisted, so that it survives its own restarts and
//! dockerd's): networks and the tenant each is backed by, endpoints and their switch ports,
//! and the address pools of its IPAM driver. Pure data and decisions; no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A Docker network backed by a tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// The vswitchd tenant.
    pub tenant: String,
}

/// A Docker endpoint: a veth port of the tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Docker's network ID.
    pub network: String,
    /// The switch port (its host end).
    pub port: String,
    /// The other end, in the host's namespace until Docker moves it into the container.
    pub ifname: String,
    /// Its MAC.
    pub mac: String,
}

/// An address pool of the IPAM driver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// The pool (`--subnet`).
    pub pool: IpNet,
    /// Where container addresses come from (`--ip-range`), within `pool`.
    pub range: IpNet,
    /// Addresses handed out (the gateway included).
    pub taken: BTreeSet<IpAddr>,
    /// The tenant whose cluster IPAM hands out the addresses (vswitchd in a cluster):
    /// unique across hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_tenant: Option<String>,
    /// Cluster addresses and their owners (the port each becomes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub owners: BTreeMap<IpAddr, String>,
}

/// Everything the plugin persists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Networks by Docker's network ID.
    pub networks: BTreeMap<String, Network>,
    /// Endpoints by Docker's endpoint ID.
    pub endpoints: BTreeMap<String, Endpoint>,
    /// IPAM pools by pool ID.
    pub pools: BTreeMap<String, Pool>,
    /// The next pool number (pool IDs are never reused).
    pub next_pool: u64,
}

/// Docker's IDs are 64 hex digits; anything else is refused before it names anything.
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    if id.len() >= 12 && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(format!("{what} {id:?} is not a Docker ID"))
    }
}

/// The switch port of an endpoint and the name of its other end (15 characters at most,
/// from the endpoint ID).
pub fn port_names(endpoint: &str) -> (String, String) {
    let short = &endpoint[..12.min(endpoint.len())];
    (format!("dk{short}"), format!("dv{short}"))
}

/// The MAC of an endpoint Docker gave none: from its IPv4 address as Docker's own bridge
/// driver does (`02:42:` + the address: a container that leaves and comes back with its
/// address keeps its MAC, so its peers' neighbour caches stay right), else from the endpoint
/// ID.
pub fn endpoint_mac(endpoint: &str, ipv4: Option<std::net::Ipv4Addr>) -> String {
    match ipv4 {
        Some(ip) => {
            let o = ip.octets();
            format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
        }
        None => derived_mac(endpoint),
    }
}

/// A locally administered unicast MAC derived from the endpoint ID.
pub fn derived_mac(endpoint: &str) -> String {
    let hex = |i: usize| endpoint.get(i..i + 2).unwrap_or("00");
    format!("02:{}:{}:{}:{}:{}", hex(0), hex(2), hex(4), hex(6), hex(8)).to_lowercase()
}

impl State {
    /// A new pool: `pool` (`--subnet`), addresses from `range` (`--ip-range`, default the
    /// whole pool). Returns its ID.
    pub fn add_pool(&mut self, pool: &str, range: Option<&str>) -> Result<String, String> {
        let net: IpNet = pool
            .parse()
            .map_err(|_| format!("subnet {pool:?} is not an address/prefix"))?;
        if net.trunc() != net {
            return Err(format!("subnet {pool}: host bits are set"));
        }
        let range: IpNet = match range {
            Some(r) if !r.is_empty() => r
                .parse()
                .map_err(|_| format!("ip-range {r:?} is not an address/prefix"))?,
            _ => net,
        };
        if !net.contains(&range) {
            return Err(format!("ip-range {range} is not within {net}"));
        }
        self.next_pool += 1;
        let id = format!("lv{}-{}", self.next_pool, net);
        self.pools.insert(
            id.clone(),
            Pool {
                pool: net,
                range,
                taken: BTreeSet::new(),
                cluster_tenant: None,
                owners: BTreeMap::new(),
            },
        );
        Ok(id)
    }

    /// The owner (the port to be) of cluster address `ip` in `tenant`, if this plugin took it.
    pub fn cluster_owner(&self, tenant: &str, ip: IpAddr) -> Option<&str> {
        self.pools
            .values()
            .filter(|p| p.cluster_tenant.as_deref() == Some(tenant))
            .find_map(|p| p.owners.get(&ip).map(String::as_str))
    }

    /// Takes an address of pool `id`: `wanted` if given (it must be free), else the gateway
    /// (the pool's first host address) or the first free address of the range. Returns it
    /// as CIDR with the pool's prefix length.
    pub fn take_address(
        &mut self,
        id: &str,
        wanted: Option<&str>,
        gateway: bool,
    ) -> Result<String, String> {
        let pool = self
            .pools
            .get_mut(id)
            .ok_or_else(|| format!("no pool {id}"))?;
        // The gateway: the address after the network's (also for IPv6, where `hosts()`
        // would start at the subnet-router anycast address). IPv4's network and broadcast
        // addresses are nobody's.
        let gw = nth(pool.pool, 1);
        let reserved = |ip: &IpAddr| match pool.pool {
            IpNet::V4(v4) => *ip == IpAddr::V4(v4.network()) || *ip == IpAddr::V4(v4.broadcast()),
            IpNet::V6(v6) => *ip == IpAddr::V6(v6.network()),
        };
        let ip = match wanted.filter(|w| !w.is_empty()) {
            Some(w) => {
                let ip: IpAddr = w
                    .split('/')
                    .next()
                    .unwrap_or(w)
                    .parse()
                    .map_err(|_| format!("{w:?} is not an address"))?;
                if !pool.pool.contains(&ip) || reserved(&ip) {
                    return Err(format!("{ip} is not a host address of {}", pool.pool));
                }
                if pool.taken.contains(&ip) {
                    return Err(format!("{ip} is taken"));
                }
                ip
            }
            None if gateway => gw.ok_or_else(|| format!("{} has no host", pool.pool))?,
            None => (0..1u128 << 20)
                .map_while(|n| nth(pool.range, n))
                .find(|ip| Some(*ip) != gw && !reserved(ip) && !pool.taken.contains(ip))
                .ok_or_else(|| format!("no free address in {}", pool.range))?,
        };
        pool.taken.insert(ip);
        Ok(format!("{ip}/{}", pool.pool.prefix_len()))
    }

    /// Gives an address back.
    pub fn release_address(&mut self, id: &str, address: &str) {
        let ip = address.split('/').next().and_then(|a| a.parse().ok());
        if let (Some(pool), Some(ip)) = (self.pools.get_mut(id), ip) {
            pool.taken.remove(&ip);
        }
    }
}

/// The `n`th address of `net` (0: its network address), if it is in `net`.
fn nth(net: IpNet, n: u128) -> Option<IpAddr> {
    let ip = match net {
        IpNet::V4(v4) => {
            let n = u32::try_from(n).ok()?;
            IpAddr::V4(u32::from(v4.network()).checked_add(n)?.into())
        }
        IpNet::V6(v6) => IpAddr::V6(u128::from(v6.network()).checked_add(n)?.into()),
    };
    net.contains(&ip).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_hand_out_the_gateway_then_free_addresses_of_their_range() {
        let mut s = State::default();
        let a = s.add_pool("10.0.0.0/24", Some("10.0.0.128/25")).unwrap();
        assert_eq!(s.take_address(&a, None, true).unwrap(), "10.0.0.1/24");
        assert_eq!(s.take_address(&a, None, false).unwrap(), "10.0.0.128/24");
        assert_eq!(s.take_address(&a, None, false).unwrap(), "10.0.0.129/24");
        assert!(s.take_address(&a, Some("10.0.0.129"), false).is_err());
        assert_eq!(
            s.take_address(&a, Some("10.0.0.7"), false).unwrap(),
            "10.0.0.7/24"
        );
        s.release_address(&a, "10.0.0.129/24");
        assert_eq!(s.take_address(&a, None, false).unwrap(), "10.0.0.129/24");
        // The same subnet again (another tenant): another pool, its own addresses.
        let b = s.add_pool("10.0.0.0/24", None).unwrap();
        assert_ne!(a, b);
        assert_eq!(s.take_address(&b, None, false).unwrap(), "10.0.0.2/24");
        assert!(s.add_pool("10.0.0.1/24", None).is_err());
        assert!(s.add_pool("10.0.0.0/24", Some("10.1.0.0/25")).is_err());
        let small = s.add_pool("10.9.0.0/30", None).unwrap();
        assert_eq!(s.take_address(&small, None, false).unwrap(), "10.9.0.2/30");
        assert!(s.take_address(&small, None, false).is_err(), "full");
        // A range's own first and last addresses are hosts of the pool.
        let r = s.add_pool("10.1.0.0/24", Some("10.1.0.64/26")).unwrap();
        assert_eq!(s.take_address(&r, None, false).unwrap(), "10.1.0.64/24");
        assert!(
            s.take_address(&r, Some("10.1.0.255"), false).is_err(),
            "broadcast"
        );
        assert!(
            s.take_address(&r, Some("10.1.0.0"), false).is_err(),
            "network"
        );
        let v6 = s.add_pool("fd00::/64", None).unwrap();
        assert_eq!(s.take_address(&v6, None, true).unwrap(), "fd00::1/64");
        assert_eq!(s.take_address(&v6, None, false).unwrap(), "fd00::2/64");
    }

    #[test]
    fn names_come_from_docker_ids_only() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert!(check_id("endpoint", id).is_ok());
        assert!(check_id("endpoint", "../../etc").is_err());
        assert!(check_id("endpoint", "abc").is_err());
        let (port, ifname) = port_names(id);
        assert_eq!(
            (port.as_str(), ifname.as_str()),
            ("dk0123456789ab", "dv0123456789ab")
        );
        assert_eq!(derived_mac(id), "02:01:23:45:67:89");
        assert_eq!(
            endpoint_mac(id, Some("10.0.0.130".parse().unwrap())),
            "02:42:0a:00:00:82"
        );
        assert_eq!(endpoint_mac(id, None), "02:01:23:45:67:89");
    }
}
