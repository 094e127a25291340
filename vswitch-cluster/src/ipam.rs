//! Address choice within a tenant's subnet (sans-IO; the etcd transaction that takes the
//! address is in [`crate::client`]).

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::Error;

/// A tenant subnet addresses are allocated from. Its first host address is kept for the
/// gateway; IPv4's network and broadcast addresses are never handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    net: IpNet,
}

impl Subnet {
    /// Parses `"10.0.0.0/24"` (host bits must be zero) or `"fd00::/64"`.
    pub fn parse(s: &str) -> Result<Subnet, Error> {
        let net: IpNet = s
            .parse()
            .map_err(|_| Error::Invalid(format!("subnet {s:?}: not an address/prefix")))?;
        if net.trunc() != net {
            return Err(Error::Invalid(format!(
                "subnet {s}: host bits are set (did you mean {}?)",
                net.trunc()
            )));
        }
        let host_bits = net.max_prefix_len() - net.prefix_len();
        if host_bits < 2 {
            return Err(Error::Invalid(format!(
                "subnet {s}: too small to allocate from"
            )));
        }
        Ok(Subnet { net })
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.net.prefix_len()
    }

    /// The gateway address (the first host address), never allocated.
    pub fn gateway(&self) -> IpAddr {
        self.nth(1).unwrap_or(self.net.network())
    }

    /// Whether `ip` is in the subnet.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.net.contains(&ip)
    }

    fn nth(&self, n: u128) -> Option<IpAddr> {
        match self.net {
            IpNet::V4(v4) => {
                let base = u32::from(v4.network());
                let n = u32::try_from(n).ok()?;
                let ip = std::net::Ipv4Addr::from(base.checked_add(n)?);
                v4.contains(&ip).then_some(IpAddr::V4(ip))
            }
            IpNet::V6(v6) => {
                let base = u128::from(v6.network());
                let ip = std::net::Ipv6Addr::from(base.checked_add(n)?);
                v6.contains(&ip).then_some(IpAddr::V6(ip))
            }
        }
    }

    /// The first address not in `taken`, searching from the second host address; `None` if
    /// the subnet is full (searching at most `limit` candidates, for huge IPv6 subnets).
    pub fn first_free(&self, taken: &BTreeSet<IpAddr>, limit: u128) -> Option<IpAddr> {
        let broadcast = match self.net {
            IpNet::V4(v4) => Some(IpAddr::V4(v4.broadcast())),
            IpNet::V6(_) => None,
        };
        (2..limit.saturating_add(2))
            .map_while(|n| self.nth(n))
            .find(|ip| Some(*ip) != broadcast && !taken.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_skips_network_gateway_broadcast_and_taken() {
        let s = Subnet::parse("10.0.0.0/30").unwrap();
        assert_eq!(s.gateway(), "10.0.0.1".parse::<IpAddr>().unwrap());
        let mut taken = BTreeSet::new();
        let first = s.first_free(&taken, 1 << 20).unwrap();
        assert_eq!(first, "10.0.0.2".parse::<IpAddr>().unwrap());
        taken.insert(first);
        assert_eq!(
            s.first_free(&taken, 1 << 20),
            None,
            "10.0.0.3 is the broadcast"
        );
        let s6 = Subnet::parse("fd00::/64").unwrap();
        assert_eq!(
            s6.first_free(&BTreeSet::new(), 10),
            Some("fd00::2".parse().unwrap())
        );
        assert!(Subnet::parse("10.0.0.1/24").is_err());
        assert!(Subnet::parse("10.0.0.0/31").is_err());
        assert!(Subnet::parse("nonsense").is_err());
    }
}
