//! The six CNI operations over vswitchd's API, the IPAM plugin and the container's
//! namespace.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vswitch_api::{PortInfo, PortSpec, RateLimitSpec};

use super::ipam::Ipam;
use super::sandbox::{self, Setup};
use super::spec::{
    CniError, CniResult, Command, Env, Interface, IpConfig, NetConf, Route, SUPPORTED_VERSIONS,
    code, parse_cidr, version_cmp,
};
use crate::Error;
use crate::net::Client;

/// Port label: the CNI network's name.
pub const LABEL_NETWORK: &str = "cni.network";
/// Port label: the container id.
pub const LABEL_CONTAINER: &str = "cni.container";
/// Port label: the interface name in the container.
pub const LABEL_IFNAME: &str = "cni.ifname";
/// Port label: the Kubernetes namespace of the pod (`K8S_POD_NAMESPACE` in `CNI_ARGS`).
pub const LABEL_POD_NAMESPACE: &str = "k8s.pod.namespace";
/// Port label: the Kubernetes pod's name (`K8S_POD_NAME` in `CNI_ARGS`).
pub const LABEL_POD_NAME: &str = "k8s.pod.name";

/// Runs one plugin invocation: `env` and the configuration on `stdin`. Returns what to
/// print on success (None: nothing) and the spec version to print errors in.
pub fn run(env: &Env, stdin: &[u8]) -> (Result<Option<Value>, CniError>, String) {
    // VERSION needs no configuration (as with the reference plugins): the runtime may send
    // none, or just `{"cniVersion": ...}`.
    if env.command == Command::Version {
        let asked = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "1.1.0".into());
        return (Ok(Some(version_answer(&asked))), asked);
    }
    let raw: Value = match serde_json::from_slice(stdin) {
        Ok(v) => v,
        Err(e) => {
            let err = CniError::new(code::DECODE, "cannot decode the network configuration")
                .with_details(e.to_string());
            return (Err(err), "1.1.0".into());
        }
    };
    let version = raw["cniVersion"].as_str().unwrap_or("1.1.0").to_owned();
    let out = Plugin::new(env, raw).and_then(|p| p.dispatch());
    (out, version)
}

fn version_answer(version: &str) -> Value {
    serde_json::json!({
        "cniVersion": if SUPPORTED_VERSIONS.contains(&version) { version } else { "1.1.0" },
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

struct Plugin<'a> {
    env: &'a Env,
    raw: Value,
    conf: NetConf,
    client: Client,
    socket: PathBuf,
}

/// A vswitchd error as a CNI error: unreachable is "try again later".
fn switch_err(socket: &Path, e: Error) -> CniError {
    match e {
        Error::Connect { .. } | Error::Io { .. } => CniError::new(
            code::TRY_AGAIN_LATER,
            format!("vswitchd at {} does not answer", socket.display()),
        )
        .with_details(e.to_string()),
        other => CniError::new(code::SWITCH_REFUSED, "vswitchd refused the request")
            .with_details(other.to_string()),
    }
}

fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::Api { code, .. } if code == "not_found")
}

/// FNV-1a over the parts, separated (stable across builds and platforms).
fn digest(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0u8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The vswitchd port name of an attachment: `vc` and 12 hex digits of its digest (a valid
/// interface name, the TAP's name until it moves into the container).
pub fn port_name(network: &str, container: &str, ifname: &str) -> String {
    format!(
        "vc{:012x}",
        digest(&[network, container, ifname]) & 0xffff_ffff_ffff
    )
}

/// The MAC an attachment gets unless the runtime names one: locally administered, unicast,
/// derived from the attachment.
pub fn derived_mac(network: &str, container: &str, ifname: &str) -> [u8; 6] {
    let h = digest(&["mac", network, container, ifname]).to_le_bytes();
    [0x02, h[0], h[1], h[2], h[3], h[4]]
}

fn parse_mac(s: &str) -> Result<[u8; 6], CniError> {
    let bad = || CniError::new(code::INVALID_CONFIG, format!("{s:?} is not a MAC address"));
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next().ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || mac[0] & 1 == 1 {
        return Err(bad());
    }
    Ok(mac)
}

fn mac_string(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The network configuration `raw` checked for the command in `env`: decoded, a supported
/// version, a known link kind, names present, the MTU in range. Nothing is touched.
pub fn check_config(env: &Env, raw: &Value) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_value(raw.clone()).map_err(|e| {
        CniError::new(code::INVALID_CONFIG, "invalid network configuration")
            .with_details(e.to_string())
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {} is not one of {SUPPORTED_VERSIONS:?}",
                conf.cni_version
            ),
        ));
    }
    if version_cmp(&conf.cni_version, env.command.since()).is_lt() {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{:?} needs cniVersion {} or later, the configuration says {}",
                env.command,
                env.command.since(),
                conf.cni_version
            ),
        ));
    }
    if conf.link != "veth" && conf.link != "tap" {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("link {:?}: \"veth\" or \"tap\"", conf.link),
        ));
    }
    if conf.name.is_empty() || conf.tenant.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "\"name\" and \"tenant\" must not be empty",
        ));
    }
    if let Some(mtu) = conf.mtu
        && !(68..=9000).contains(&mtu)
    {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("mtu {mtu} is outside 68..=9000"),
        ));
    }
    Ok(conf)
}

impl<'a> Plugin<'a> {
    fn new(env: &'a Env, raw: Value) -> Result<Plugin<'a>, CniError> {
        let conf = check_config(env, &raw)?;
        let socket = conf
            .socket
            .clone()
            .unwrap_or_else(vswitch_api::default_socket);
        Ok(Plugin {
            env,
            client: Client::new(&socket),
            socket,
            raw,
            conf,
        })
    }

    fn dispatch(&self) -> Result<Option<Value>, CniError> {
        match self.env.command {
            Command::Add => {
                let _lock = self.lock(false)?;
                self.add().map(Some)
            }
            Command::Del => {
                let _lock = self.lock(false)?;
                self.del().map(|_| None)
            }
            Command::Check => self.check().map(|_| None),
            Command::Gc => {
                let _lock = self.lock(true)?;
                self.gc().map(|_| None)
            }
            Command::Status => self.status().map(|_| None),
            Command::Version => Ok(Some(version_answer(&self.conf.cni_version))),
        }
    }

    /// A lock per network next to vswitchd's socket: ADD and DEL share it, GC takes it alone
    /// (so that GC never removes an attachment while it is being made).
    fn lock(&self, exclusive: bool) -> Result<Option<nix::fcntl::Flock<File>>, CniError> {
        let Some(dir) = self.socket.parent().filter(|d| d.is_dir()) else {
            return Ok(None);
        };
        let path = dir.join(format!("cni-{:016x}.lock", digest(&[&self.conf.name])));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| {
                CniError::new(code::IO, format!("opening {}", path.display()))
                    .with_details(e.to_string())
            })?;
        let arg = if exclusive {
            nix::fcntl::FlockArg::LockExclusive
        } else {
            nix::fcntl::FlockArg::LockShared
        };
        nix::fcntl::Flock::lock(file, arg)
            .map(Some)
            .map_err(|(_, e)| {
                CniError::new(code::IO, format!("locking {}", path.display()))
                    .with_details(e.to_string())
            })
    }

    fn ipam(&self) -> Result<Option<Addressing>, CniError> {
        match self.conf.ipam_type()? {
            None => Ok(None),
            Some(CLUSTER_IPAM) => Ok(Some(Addressing::Cluster)),
            Some(kind) => {
                if self.env.path.is_empty() {
                    return Err(CniError::new(
                        code::INVALID_ENV,
                        "CNI_PATH is not set (needed to find the IPAM plugin)",
                    ));
                }
                Ipam::new(kind, &self.env.path, &self.raw).map(|i| Some(Addressing::Plugin(i)))
            }
        }
    }

    /// ADD of an attachment's addresses (`port`: the switch port it gets).
    fn ipam_add(&self, ipam: &Addressing, port: &str) -> Result<CniResult, CniError> {
        match ipam {
            Addressing::Plugin(i) => i.add(),
            Addressing::Cluster => {
                let a = self
                    .client
                    .allocate_address(&self.conf.tenant, port)
                    .map_err(|e| {
                        CniError::new(
                            code::IPAM_FAILED,
                            format!("cluster IPAM of tenant {}", self.conf.tenant),
                        )
                        .with_details(e.to_string())
                    })?;
                Ok(CniResult {
                    ips: vec![IpConfig {
                        address: format!("{}/{}", a.ip, a.prefix_len),
                        gateway: Some(a.gateway),
                        interface: None,
                    }],
                    ..CniResult::default()
                })
            }
        }
    }

    /// DEL of the addresses of the attachment `attachment` (container id, ifname; `None`:
    /// this one) whose switch port is `port`.
    fn ipam_del(
        &self,
        ipam: &Addressing,
        port: &str,
        attachment: Option<(&str, &str)>,
    ) -> Result<(), CniError> {
        match ipam {
            Addressing::Plugin(i) => i.del(attachment),
            Addressing::Cluster => match self.client.release_address(&self.conf.tenant, port) {
                Ok(()) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(CniError::new(
                    code::IPAM_FAILED,
                    format!("releasing the cluster address of {port}"),
                )
                .with_details(e.to_string())),
            },
        }
    }

    fn attachment_port(&self) -> Result<String, CniError> {
        Ok(port_name(
            &self.conf.name,
            self.env.container_id()?,
            self.env.ifname()?,
        ))
    }

    fn add(&self) -> Result<Value, CniError> {
        let container = self.env.container_id()?;
        let ifname = self.env.ifname()?;
        let netns = self.env.netns()?;
        let tenant = self.client.tenant(&self.conf.tenant).map_err(|e| match e {
            e if is_not_found(&e) => CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "vswitchd at {} has no tenant {:?}",
                    self.socket.display(),
                    self.conf.tenant
                ),
            ),
            e => switch_err(&self.socket, e),
        })?;
        let mtu = match self.conf.mtu {
            None => tenant.mtu,
            Some(m) if m > tenant.mtu => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!(
                        "mtu {m} exceeds tenant {}'s MTU {}",
                        self.conf.tenant, tenant.mtu
                    ),
                ));
            }
            Some(m) => m,
        };
        if sandbox::has_interface(netns, ifname)? {
            return Err(CniError::new(
                code::INTERFACE_EXISTS,
                format!("interface {ifname} already exists in {}", netns.display()),
            ));
        }
        let mac = match self
            .env
            .args
            .get("MAC")
            .or(self.conf.runtime_config.mac.as_ref())
        {
            Some(m) => parse_mac(m)?,
            None => derived_mac(&self.conf.name, container, ifname),
        };
        let name = self.attachment_port()?;
        // From here on, whatever fails undoes what was made before it.
        let ipam = self.ipam()?;
        let assigned = match &ipam {
            Some(i) => self.ipam_add(i, &name)?,
            None => CniResult::default(),
        };
        let undo_ipam = || {
            if let Some(i) = &ipam {
                let _ = self.ipam_del(i, &name, None);
            }
        };
        let addresses = assigned
            .ips
            .iter()
            .map(|ip| parse_cidr(&ip.address))
            .collect::<Result<Vec<_>, _>>()
            .inspect_err(|_| undo_ipam())?;
        let mut labels = BTreeMap::new();
        labels.insert(LABEL_NETWORK.to_owned(), self.conf.name.clone());
        labels.insert(LABEL_CONTAINER.to_owned(), container.to_owned());
        labels.insert(LABEL_IFNAME.to_owned(), ifname.to_owned());
        // A Kubernetes runtime (containerd's CRI, CRI-O) names the pod: the port says whose
        // it is. Values are the runtime's; only printable ones, bounded, are kept.
        for (arg, label) in [
            ("K8S_POD_NAMESPACE", LABEL_POD_NAMESPACE),
            ("K8S_POD_NAME", LABEL_POD_NAME),
        ] {
            if let Some(v) = self.env.args.get(arg).filter(|v| {
                !v.is_empty() && v.len() <= 253 && v.chars().all(|c| c.is_ascii_graphic())
            }) {
                labels.insert(label.to_owned(), v.clone());
            }
        }
        let spec = PortSpec {
            name: name.clone(),
            tenant: self.conf.tenant.clone(),
            kind: self.conf.link.clone(),
            mac: self.conf.port_security.then(|| mac_string(&mac)),
            ips: if self.conf.port_security {
                addresses.iter().map(|(ip, _)| *ip).collect()
            } else {
                Vec::new()
            },
            // The container's sending rate, policed by the switch where its frames enter
            // (the reference `bandwidth` plugin shapes what goes into the container).
            rate_limit: RateLimitSpec {
                bits_per_sec: self
                    .conf
                    .runtime_config
                    .bandwidth
                    .and_then(|b| b.egress_rate)
                    .filter(|r| *r > 0),
                packets_per_sec: None,
            },
            netns: Some(netns.display().to_string()),
            ifname: Some(ifname.to_owned()),
            labels,
        };
        if let Err(e) = self.client.create_port(&spec) {
            undo_ipam();
            return Err(switch_err(&self.socket, e));
        }
        let routes = self.routes(&assigned).inspect_err(|_| {
            let _ = self.client.delete_port(&name);
            undo_ipam();
        })?;
        let setup = Setup {
            mac,
            mtu: u32::from(mtu),
            addresses,
            routes,
        };
        if let Err(e) = sandbox::configure(netns, ifname, setup) {
            let _ = self.client.delete_port(&name);
            undo_ipam();
            return Err(e);
        }
        let mut result = self.prev_result()?.unwrap_or_default();
        if self.conf.link == "veth" {
            // The switch's end, on the host (where `bandwidth` shapes the container's traffic).
            result.interfaces.push(Interface {
                name: name.clone(),
                ..Default::default()
            });
        }
        let index = result.interfaces.len();
        result.interfaces.push(Interface {
            name: ifname.to_owned(),
            mac: Some(mac_string(&mac)),
            mtu: Some(u32::from(mtu)),
            sandbox: Some(netns.display().to_string()),
        });
        result
            .ips
            .extend(assigned.ips.into_iter().map(|ip| IpConfig {
                interface: Some(index),
                ..ip
            }));
        result.routes.extend(assigned.routes);
        if !assigned.dns.is_empty() {
            result.dns = assigned.dns;
        } else if result.dns.is_empty() {
            result.dns = self.conf.dns.clone();
        }
        Ok(result.to_json(&self.conf.cni_version))
    }

    /// The routes of an IPAM result, each with its next hop (the route's own, else the
    /// gateway of an address of the same family, else on-link).
    fn routes(&self, assigned: &CniResult) -> Result<Vec<(IpAddr, u8, Option<IpAddr>)>, CniError> {
        assigned
            .routes
            .iter()
            .map(|r: &Route| {
                let (dst, prefix) = parse_cidr(&r.dst)?;
                let gw = r.gw.or_else(|| {
                    assigned
                        .ips
                        .iter()
                        .filter_map(|ip| ip.gateway)
                        .find(|g| g.is_ipv4() == dst.is_ipv4())
                });
                Ok((dst, prefix, gw))
            })
            .collect()
    }

    fn prev_result(&self) -> Result<Option<CniResult>, CniError> {
        self.conf
            .prev_result
            .as_ref()
            .map(CniResult::parse)
            .transpose()
    }

    fn del(&self) -> Result<(), CniError> {
        let name = self.attachment_port()?;
        if let Some(ipam) = self.ipam()? {
            self.ipam_del(&ipam, &name, None)?;
        }
        match self.client.delete_port(&name) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(switch_err(&self.socket, e)),
        }
    }

    fn check(&self) -> Result<(), CniError> {
        let ifname = self.env.ifname()?;
        let netns = self.env.netns()?;
        let prev = self
            .prev_result()?
            .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult"))?;
        if let Some(Addressing::Plugin(ipam)) = self.ipam()? {
            ipam.check()?;
        }
        let failed = |msg: String| CniError::new(code::CHECK_FAILED, msg);
        let name = self.attachment_port()?;
        let port: PortInfo = self.client.port(&name).map_err(|e| {
            if is_not_found(&e) {
                failed(format!("vswitchd has no port {name} for this attachment"))
            } else {
                switch_err(&self.socket, e)
            }
        })?;
        let netns_str = netns.display().to_string();
        if port.spec.tenant != self.conf.tenant
            || port.spec.netns.as_deref() != Some(netns_str.as_str())
            || port.spec.ifname.as_deref() != Some(ifname)
        {
            return Err(failed(format!(
                "port {name} is on tenant {} in {:?} as {:?}",
                port.spec.tenant, port.spec.netns, port.spec.ifname
            )));
        }
        let (index, iface) = prev
            .interfaces
            .iter()
            .enumerate()
            .find(|(_, i)| i.name == ifname && i.sandbox.as_deref() == Some(netns_str.as_str()))
            .ok_or_else(|| {
                failed(format!(
                    "prevResult has no interface {ifname} in {netns_str}"
                ))
            })?;
        let state = sandbox::inspect(netns, ifname)?
            .ok_or_else(|| failed(format!("interface {ifname} is gone from {netns_str}")))?;
        if let Some(mac) = &iface.mac
            && parse_mac(mac)? != state.mac
        {
            return Err(failed(format!(
                "{ifname} has MAC {}, prevResult says {mac}",
                mac_string(&state.mac)
            )));
        }
        let want_mtu = match (iface.mtu, self.conf.mtu) {
            (Some(m), _) => Some(m),
            (None, Some(m)) => Some(u32::from(m)),
            (None, None) => port.mtu.map(u32::from),
        };
        if let Some(m) = want_mtu
            && m != state.mtu
        {
            return Err(failed(format!(
                "{ifname} has MTU {}, expected {m}",
                state.mtu
            )));
        }
        if !state.up {
            return Err(failed(format!("{ifname} is down")));
        }
        for ip in prev.ips.iter().filter(|ip| ip.interface == Some(index)) {
            let want = parse_cidr(&ip.address)?;
            if !state.addresses.contains(&want) {
                return Err(failed(format!("{ifname} lacks address {}", ip.address)));
            }
        }
        for (dst, prefix, gw) in self.routes(&prev)? {
            let present = state
                .routes
                .iter()
                .any(|(d, p, g)| *d == dst && *p == prefix && (gw.is_none() || *g == gw));
            if !present {
                return Err(failed(format!(
                    "route {dst}/{prefix} via {gw:?} is missing in the container"
                )));
            }
        }
        Ok(())
    }

    fn gc(&self) -> Result<(), CniError> {
        let ports = self
            .client
            .ports()
            .map_err(|e| switch_err(&self.socket, e))?;
        let ipam = self.ipam()?;
        let mut first_error = None;
        for p in ports {
            let labels = &p.spec.labels;
            if labels.get(LABEL_NETWORK) != Some(&self.conf.name) {
                continue;
            }
            let (Some(container), Some(ifname)) =
                (labels.get(LABEL_CONTAINER), labels.get(LABEL_IFNAME))
            else {
                continue;
            };
            let valid = self
                .conf
                .valid_attachments
                .iter()
                .any(|a| &a.container_id == container && &a.ifname == ifname);
            if valid {
                continue;
            }
            let released = match &ipam {
                Some(i) => self.ipam_del(i, &p.spec.name, Some((container, ifname))),
                None => Ok(()),
            };
            let removed = match self.client.delete_port(&p.spec.name) {
                Err(e) if !is_not_found(&e) => Err(switch_err(&self.socket, e)),
                _ => Ok(()),
            };
            if let Err(e) = released.and(removed) {
                first_error.get_or_insert(e);
            }
        }
        if let Some(Addressing::Plugin(i)) = &ipam {
            i.maintenance("GC")?;
        }
        first_error.map_or(Ok(()), Err)
    }

    fn status(&self) -> Result<(), CniError> {
        let unavailable = |msg: String, details: String| {
            CniError::new(code::NOT_AVAILABLE, msg).with_details(details)
        };
        match self.client.tenant(&self.conf.tenant) {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {
                return Err(unavailable(
                    format!("vswitchd has no tenant {:?}", self.conf.tenant),
                    String::new(),
                ));
            }
            Err(e) => {
                return Err(unavailable(
                    format!("vswitchd at {} does not answer", self.socket.display()),
                    e.to_string(),
                ));
            }
        }
        match self.ipam()? {
            Some(Addressing::Plugin(i)) => i.maintenance("STATUS")?,
            Some(Addressing::Cluster) => {
                let c = self
                    .client
                    .cluster()
                    .map_err(|e| unavailable("vswitchd does not answer".into(), e.to_string()))?;
                if c.state.as_deref() != Some("connected") {
                    return Err(unavailable(
                        format!(
                            "cluster IPAM: vswitchd is {}",
                            c.state.as_deref().unwrap_or(&c.mode)
                        ),
                        c.last_error.unwrap_or_default(),
                    ));
                }
            }
            None => {}
        }
        Ok(())
    }
}

/// The `ipam.type` of vswitchd's own cluster IPAM: addresses from the tenant's subnet,
/// unique across the hosts of a cluster (etcd transactions in vswitchd).
pub const CLUSTER_IPAM: &str = "vswitch-cluster";

/// Where an attachment's addresses come from.
enum Addressing {
    /// An IPAM plugin found in `CNI_PATH` (host-local, static, dhcp...).
    Plugin(Ipam),
    /// vswitchd's cluster IPAM ([`CLUSTER_IPAM`]).
    Cluster,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_macs_are_stable_valid_and_distinct() {
        let a = port_name("net", "c1", "eth0");
        assert_eq!(a, port_name("net", "c1", "eth0"));
        assert_eq!(a.len(), 14);
        assert_ne!(a, port_name("net", "c1", "eth1"));
        assert_ne!(a, port_name("net2", "c1", "eth0"));
        // The parts are separated: ("ab", "c") is not ("a", "bc").
        assert_ne!(port_name("ab", "c", "x"), port_name("a", "bc", "x"));
        let m = derived_mac("net", "c1", "eth0");
        assert_eq!(m[0] & 3, 2, "locally administered unicast");
        assert_eq!(parse_mac(&mac_string(&m)).unwrap(), m);
        assert!(parse_mac("01:00:00:00:00:01").is_err(), "multicast");
        assert!(parse_mac("02:00:00:00:00").is_err());
        assert!(parse_mac("02:00:00:00:00:zz").is_err());
    }

    #[test]
    fn bad_configurations_get_their_codes() {
        let env = Env::from_vars(|k| (k == "CNI_COMMAND").then(|| "ADD".to_owned())).unwrap();
        let (r, _) = run(&env, b"{not json");
        assert_eq!(r.unwrap_err().code, code::DECODE);
        let (r, _) = run(
            &env,
            br#"{"cniVersion":"1.0.0","name":"n","type":"vswitch-cni"}"#,
        );
        assert_eq!(r.unwrap_err().code, code::INVALID_CONFIG, "no tenant");
        let (r, _) = run(
            &env,
            br#"{"cniVersion":"9.9.9","name":"n","type":"vswitch-cni","tenant":"a"}"#,
        );
        assert_eq!(r.unwrap_err().code, code::INCOMPATIBLE_VERSION);
        let (r, _) = run(
            &env,
            br#"{"cniVersion":"1.0.0","name":"n","type":"vswitch-cni","tenant":"a","mtu":20}"#,
        );
        assert_eq!(r.unwrap_err().code, code::INVALID_CONFIG);
        let gc = Env::from_vars(|k| (k == "CNI_COMMAND").then(|| "GC".to_owned())).unwrap();
        let (r, _) = run(
            &gc,
            br#"{"cniVersion":"1.0.0","name":"n","type":"vswitch-cni","tenant":"a"}"#,
        );
        assert_eq!(
            r.unwrap_err().code,
            code::INCOMPATIBLE_VERSION,
            "GC is 1.1.0"
        );
        let ver = Env::from_vars(|k| (k == "CNI_COMMAND").then(|| "VERSION".to_owned())).unwrap();
        let (r, _) = run(&ver, br#"{"cniVersion":"0.4.0"}"#);
        let v = r.unwrap().unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"][3], "1.1.0");
    }
}
