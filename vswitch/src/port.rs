//! Port configuration and port security.

use std::net::{IpAddr, Ipv6Addr};

use overlay_net::MacAddr;
use overlay_net::frame::{FrameView, Network};

use crate::{DropReason, Error, RateLimit};

/// Anti-spoofing for a port: frames must come from its MAC and, if any IPs are listed, from
/// those addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSecurity {
    /// The only source MAC the port may use.
    pub mac: MacAddr,
    /// The IPv4/IPv6 source addresses the port may use; empty means any. Also allowed: the
    /// unspecified addresses (DHCP, ARP probes, IPv6 DAD) and the EUI-64 link-local address
    /// of `mac`.
    pub ips: Vec<IpAddr>,
}

impl PortSecurity {
    /// Checks a frame's source addresses; `Err` names the reason to drop it.
    pub fn check(&self, view: &FrameView<'_>) -> Result<(), DropReason> {
        if view.source != self.mac {
            return Err(DropReason::SpoofedMac);
        }
        if self.ips.is_empty() {
            return Ok(());
        }
        let allowed = |ip: IpAddr| {
            ip.is_unspecified()
                || self.ips.contains(&ip)
                || ip == IpAddr::V6(eui64_link_local(self.mac))
        };
        match view.network {
            Network::Ipv4(ip) if allowed(ip.source.into()) => Ok(()),
            Network::Ipv6(ip) if allowed(ip.source.into()) => Ok(()),
            Network::Arp(arp) if arp.sender_mac != self.mac => Err(DropReason::SpoofedMac),
            Network::Arp(arp) if allowed(arp.sender_ip.into()) => Ok(()),
            Network::Ipv4(_) | Network::Ipv6(_) | Network::Arp(_) => Err(DropReason::SpoofedIp),
            Network::Malformed(_) => Err(DropReason::Malformed),
            Network::Other => Ok(()),
        }
    }
}

/// The modified EUI-64 link-local address (RFC 4291 appendix A) of a MAC.
pub fn eui64_link_local(mac: MacAddr) -> Ipv6Addr {
    let m = mac.0;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 0x02,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ])
}

/// A port as configured through the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortConfig {
    /// Unique name (for TAP ports: the interface name).
    pub name: String,
    /// Anti-spoofing, if enabled.
    pub security: Option<PortSecurity>,
    /// Ingress policing.
    pub rate_limit: RateLimit,
}

impl PortConfig {
    /// A port without security or rate limit.
    pub fn new(name: impl Into<String>) -> PortConfig {
        PortConfig {
            name: name.into(),
            security: None,
            rate_limit: RateLimit::default(),
        }
    }

    /// Checks the name ([`daemon_kit::names::check_port_name`]: a Linux interface name).
    pub fn validate(&self) -> Result<(), Error> {
        daemon_kit::names::check_port_name(&self.name).map_err(Error::BadName)?;
        if let Some(sec) = &self.security
            && !sec.mac.is_unicast()
        {
            return Err(Error::invalid(
                "port MAC",
                format!("{} is not unicast", sec.mac),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlay_net::frame::{ArpInfo, build_arp, build_udp};

    const MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x11]);

    fn udp_from(mac: MacAddr, src: &str) -> Vec<u8> {
        let mut buf = vec![0u8; 200];
        let dst = if src.contains('[') {
            "[2001:db8::99]:9"
        } else {
            "10.0.0.99:9"
        };
        let n = build_udp(
            &mut buf,
            mac,
            MacAddr::BROADCAST,
            None,
            src.parse().unwrap(),
            dst.parse().unwrap(),
            b"x",
        )
        .unwrap();
        buf.truncate(n);
        buf
    }

    fn check(sec: &PortSecurity, frame: &[u8]) -> Result<(), DropReason> {
        sec.check(&FrameView::parse(frame).unwrap())
    }

    #[test]
    fn mac_and_ip_pinning() {
        let sec = PortSecurity {
            mac: MAC,
            ips: vec!["10.0.0.5".parse().unwrap(), "2001:db8::5".parse().unwrap()],
        };
        assert_eq!(check(&sec, &udp_from(MAC, "10.0.0.5:1")), Ok(()));
        assert_eq!(check(&sec, &udp_from(MAC, "[2001:db8::5]:1")), Ok(()));
        assert_eq!(check(&sec, &udp_from(MAC, "0.0.0.0:68")), Ok(()), "DHCP");
        let ll = format!("[{}]:1", eui64_link_local(MAC));
        assert_eq!(check(&sec, &udp_from(MAC, &ll)), Ok(()), "own link-local");
        assert_eq!(
            check(&sec, &udp_from(MAC, "10.0.0.6:1")),
            Err(DropReason::SpoofedIp)
        );
        assert_eq!(
            check(&sec, &udp_from(MAC, "[fe80::1]:1")),
            Err(DropReason::SpoofedIp)
        );
        let other = MacAddr([0x02, 0, 0, 0, 0, 0x12]);
        assert_eq!(
            check(&sec, &udp_from(other, "10.0.0.5:1")),
            Err(DropReason::SpoofedMac)
        );
    }

    #[test]
    fn arp_sender_fields_are_checked() {
        let sec = PortSecurity {
            mac: MAC,
            ips: vec!["10.0.0.5".parse().unwrap()],
        };
        let arp = |sender_mac, sender_ip: &str| {
            let mut buf = [0u8; 64];
            let info = ArpInfo {
                operation: 2,
                sender_mac,
                sender_ip: sender_ip.parse().unwrap(),
                target_mac: MacAddr::ZERO,
                target_ip: "10.0.0.1".parse().unwrap(),
            };
            // The Ethernet source is always the port's MAC here: only ARP fields lie.
            let n = build_arp(&mut buf, MacAddr::BROADCAST, &info).unwrap();
            buf[6..12].copy_from_slice(&MAC.0);
            buf[..n].to_vec()
        };
        assert_eq!(check(&sec, &arp(MAC, "10.0.0.5")), Ok(()));
        assert_eq!(check(&sec, &arp(MAC, "0.0.0.0")), Ok(()), "ARP probe");
        assert_eq!(
            check(&sec, &arp(MAC, "10.0.0.1")),
            Err(DropReason::SpoofedIp)
        );
        let other = MacAddr([0x02, 0, 0, 0, 0, 0x99]);
        assert_eq!(
            check(&sec, &arp(other, "10.0.0.5")),
            Err(DropReason::SpoofedMac)
        );
    }

    #[test]
    fn mac_only_pinning_allows_any_ip() {
        let sec = PortSecurity {
            mac: MAC,
            ips: vec![],
        };
        assert_eq!(check(&sec, &udp_from(MAC, "192.0.2.77:1")), Ok(()));
    }

    #[test]
    fn eui64_matches_rfc_4291() {
        let mac = MacAddr([0x00, 0x1b, 0x21, 0x3c, 0x4d, 0x5e]);
        assert_eq!(
            eui64_link_local(mac).to_string(),
            "fe80::21b:21ff:fe3c:4d5e"
        );
    }

    #[test]
    fn names_are_validated() {
        assert!(PortConfig::new("tap-a0.1").validate().is_ok());
        for bad in ["", "a-name-that-is-too-long", "sp ace", "slash/x"] {
            assert!(PortConfig::new(bad).validate().is_err(), "{bad:?}");
        }
    }
}
