//! The CNI specification's wire types (spec 1.1.0, results down to 0.3.1): the plugin's
//! environment, its network configuration, results and errors. Pure data, no I/O.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The spec versions this plugin speaks (what `VERSION` advertises).
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Error codes of the spec (and this plugin's own, from 100).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later (vswitchd does not answer).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// The interface name is taken in the container's namespace.
    pub const INTERFACE_EXISTS: u32 = 100;
    /// vswitchd refused the request (its message says why).
    pub const SWITCH_REFUSED: u32 = 101;
    /// Configuring the container's interface failed.
    pub const INTERFACE_SETUP: u32 = 102;
    /// CHECK found the attachment different from its result.
    pub const CHECK_FAILED: u32 = 103;
    /// The IPAM plugin failed without a spec error.
    pub const IPAM_FAILED: u32 = 104;
}

/// An error as the spec prints it on stdout (with a non-zero exit).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniError {
    /// The spec's error code.
    pub code: u32,
    /// A short message.
    pub msg: String,
    /// Longer details (may be empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    /// An error with `code` and `msg`.
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// The same error with `details`.
    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    /// The JSON object printed on stdout.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

/// The operation asked for (`CNI_COMMAND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Attach a container.
    Add,
    /// Detach a container (idempotent).
    Del,
    /// Check an attachment against its result.
    Check,
    /// Report the supported versions.
    Version,
    /// Remove what belongs to attachments no longer valid.
    Gc,
    /// Report whether ADD can be served.
    Status,
}

impl Command {
    fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            _ => return None,
        })
    }

    /// The spec version that introduced the command.
    pub fn since(self) -> &'static str {
        match self {
            Command::Check => "0.4.0",
            Command::Gc | Command::Status => "1.1.0",
            _ => "0.1.0",
        }
    }
}

/// The plugin's environment (`CNI_*` variables).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID`.
    pub container_id: Option<String>,
    /// `CNI_NETNS`: the container's network namespace file.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`: the interface name inside the container.
    pub ifname: Option<String>,
    /// `CNI_ARGS`, as key/value pairs.
    pub args: BTreeMap<String, String>,
    /// `CNI_PATH`: where plugins (IPAM) are found.
    pub path: Vec<PathBuf>,
}

fn bad_env(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_ENV, msg)
}

impl Env {
    /// Reads the environment from `get` (`std::env::var` in the plugin).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());
        let command = nonempty("CNI_COMMAND").ok_or_else(|| bad_env("CNI_COMMAND is not set"))?;
        let command = Command::parse(&command)
            .ok_or_else(|| bad_env(format!("CNI_COMMAND {command:?} is not a CNI operation")))?;
        let mut args = BTreeMap::new();
        for pair in nonempty("CNI_ARGS").unwrap_or_default().split(';') {
            if pair.is_empty() {
                continue;
            }
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad_env(format!("CNI_ARGS: {pair:?} is not KEY=VALUE")))?;
            args.insert(k.to_owned(), v.to_owned());
        }
        Ok(Env {
            command,
            container_id: nonempty("CNI_CONTAINERID"),
            netns: nonempty("CNI_NETNS").map(PathBuf::from),
            ifname: nonempty("CNI_IFNAME"),
            args,
            path: nonempty("CNI_PATH")
                .map(|p| std::env::split_paths(&p).collect())
                .unwrap_or_default(),
        })
    }

    /// The container id, checked as the spec asks (alphanumerics first, then also `_.-`).
    pub fn container_id(&self) -> Result<&str, CniError> {
        let id = self
            .container_id
            .as_deref()
            .ok_or_else(|| bad_env("CNI_CONTAINERID is not set"))?;
        let mut chars = id.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
            return Err(bad_env(format!("CNI_CONTAINERID {id:?} is not a valid id")));
        }
        Ok(id)
    }

    /// The interface name, checked as Linux requires (1-15 bytes, no `/`, `:` or space).
    pub fn ifname(&self) -> Result<&str, CniError> {
        let name = self
            .ifname
            .as_deref()
            .ok_or_else(|| bad_env("CNI_IFNAME is not set"))?;
        if name.len() > 15
            || name == "."
            || name == ".."
            || name
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace())
        {
            return Err(bad_env(format!(
                "CNI_IFNAME {name:?} is not a valid interface name"
            )));
        }
        Ok(name)
    }

    /// The container's namespace file.
    pub fn netns(&self) -> Result<&std::path::Path, CniError> {
        self.netns
            .as_deref()
            .ok_or_else(|| bad_env("CNI_NETNS is not set"))
    }
}

/// An attachment named in `cni.dev/valid-attachments` (GC).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The container id.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The interface name.
    pub ifname: String,
}

/// Run-time settings the runtime passes for declared capabilities.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct RuntimeConfig {
    /// Capability `mac`: the MAC the container's interface gets.
    #[serde(default)]
    pub mac: Option<String>,
    /// Capability `bandwidth`: the container's rates (as for the reference `bandwidth`
    /// plugin). The switch polices what the container sends (`egressRate`).
    #[serde(default)]
    pub bandwidth: Option<Bandwidth>,
}

/// The `bandwidth` capability's settings, bits per second and bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Bandwidth {
    /// Rate into the container.
    #[serde(default, rename = "ingressRate")]
    pub ingress_rate: Option<u64>,
    /// Burst into the container.
    #[serde(default, rename = "ingressBurst")]
    pub ingress_burst: Option<u64>,
    /// Rate out of the container.
    #[serde(default, rename = "egressRate")]
    pub egress_rate: Option<u64>,
    /// Burst out of the container.
    #[serde(default, rename = "egressBurst")]
    pub egress_burst: Option<u64>,
}

/// DNS settings of a result (or of the network configuration).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    /// Name servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Local domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// Resolver options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    /// Nothing set.
    pub fn is_empty(&self) -> bool {
        *self == Dns::default()
    }
}

/// The network configuration on stdin for `type: vswitch-cni`.
#[derive(Clone, Debug, Deserialize)]
pub struct NetConf {
    /// The spec version of the configuration (and of the result).
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// The network's name.
    pub name: String,
    /// The plugin type (`vswitch-cni`).
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The vswitchd tenant the containers join.
    pub tenant: String,
    /// vswitchd's API socket (default: `RUN_DIR/vswitchd.sock`).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// The interface MTU (default: the tenant's, the underlay's minus the VXLAN overhead).
    #[serde(default)]
    pub mtu: Option<u16>,
    /// The container's interface: `"veth"` (default; the switch's end stays on the host, as
    /// the reference `bandwidth` plugin needs) or `"tap"` (a TAP moved into the container).
    #[serde(default = "veth")]
    pub link: String,
    /// Pin the port to the interface's MAC and the IPAM addresses (default true).
    #[serde(default = "yes", rename = "portSecurity")]
    pub port_security: bool,
    /// The IPAM plugin's configuration (`type` names the plugin).
    #[serde(default)]
    pub ipam: Option<Value>,
    /// DNS settings copied into the result when IPAM gives none.
    #[serde(default)]
    pub dns: Dns,
    /// Run-time settings.
    #[serde(default, rename = "runtimeConfig")]
    pub runtime_config: RuntimeConfig,
    /// The previous plugin's result in a chain (CHECK, DEL, chained ADD).
    #[serde(default, rename = "prevResult")]
    pub prev_result: Option<Value>,
    /// GC: the attachments that stay.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Vec<Attachment>,
}

fn yes() -> bool {
    true
}

fn veth() -> String {
    "veth".into()
}

impl NetConf {
    /// The IPAM plugin's type, if IPAM is configured.
    pub fn ipam_type(&self) -> Result<Option<&str>, CniError> {
        match &self.ipam {
            None => Ok(None),
            Some(v) if v.as_object().is_some_and(|o| o.is_empty()) => Ok(None),
            Some(v) => v
                .get("type")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty() && !t.contains('/'))
                .map(Some)
                .ok_or_else(|| {
                    CniError::new(code::INVALID_CONFIG, "ipam needs a plugin name in \"type\"")
                }),
        }
    }
}

/// Orders two spec versions (`"0.4.0" < "1.0.0"`); unparsable parts count as 0.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parts(a).cmp(&parts(b))
}

/// An interface of a result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Its name.
    pub name: String,
    /// Its MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Its MTU (spec 1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The namespace it lives in (absent: the host's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// An address of a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// The address with its prefix length (`10.1.0.5/24`).
    pub address: String,
    /// The gateway of its subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// A route of a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination prefix (`0.0.0.0/0`).
    pub dst: String,
    /// Next hop (absent: the address's gateway, else on-link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// A result (ADD's output, `prevResult`, an IPAM plugin's output).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    /// Interfaces made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// Addresses assigned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    /// Routes installed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// DNS settings.
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

impl CniResult {
    /// Reads a result of any supported version (0.3.x `version` fields are ignored).
    pub fn parse(v: &Value) -> Result<CniResult, CniError> {
        serde_json::from_value(v.clone())
            .map_err(|e| CniError::new(code::DECODE, format!("cannot decode a result: {e}")))
    }

    /// The result as printed for spec `version`: 0.3.x/0.4.0 addresses carry `version`,
    /// interface MTUs exist from 1.1.0 on.
    pub fn to_json(&self, version: &str) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        v["cniVersion"] = Value::String(version.to_owned());
        let old = version_cmp(version, "1.0.0").is_lt();
        if old && let Some(ips) = v.get_mut("ips").and_then(Value::as_array_mut) {
            for ip in ips {
                let four = ip["address"].as_str().is_some_and(|a| !a.contains(':'));
                ip["version"] = Value::String(if four { "4" } else { "6" }.into());
            }
        }
        if version_cmp(version, "1.1.0").is_lt()
            && let Some(ifs) = v.get_mut("interfaces").and_then(Value::as_array_mut)
        {
            for i in ifs {
                if let Some(o) = i.as_object_mut() {
                    o.remove("mtu");
                }
            }
        }
        v
    }
}

/// Parses `"10.1.0.5/24"` into the address and prefix length.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), CniError> {
    let bad = || CniError::new(code::DECODE, format!("{s:?} is not an address/prefix"));
    let (a, p) = s.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad());
    }
    Ok((ip, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Env, CniError> {
        Env::from_vars(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn the_environment_is_read_and_checked() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc-1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;MAC=02:00:00:00:00:09"),
            ("CNI_PATH", "/a:/b"),
        ])
        .unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.args["MAC"], "02:00:00:00:00:09");
        assert_eq!(e.path, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(e.ifname().unwrap(), "eth0");
        assert_eq!(e.netns().unwrap_err().code, code::INVALID_ENV);
        assert_eq!(env(&[]).unwrap_err().code, code::INVALID_ENV);
        assert_eq!(
            env(&[("CNI_COMMAND", "FROB")]).unwrap_err().code,
            code::INVALID_ENV
        );
        let bad = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "-x"),
            ("CNI_IFNAME", "a/b"),
        ])
        .unwrap();
        assert_eq!(bad.container_id().unwrap_err().code, code::INVALID_ENV);
        assert_eq!(bad.ifname().unwrap_err().code, code::INVALID_ENV);
        assert!(env(&[("CNI_COMMAND", "ADD"), ("CNI_ARGS", "novalue")]).is_err());
    }

    #[test]
    fn results_follow_the_asked_version() {
        let r = CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mtu: Some(1450),
                ..Default::default()
            }],
            ips: vec![IpConfig {
                address: "10.1.0.5/24".into(),
                gateway: None,
                interface: Some(0),
            }],
            ..Default::default()
        };
        let old = r.to_json("0.4.0");
        assert_eq!(old["ips"][0]["version"], "4");
        assert!(old["interfaces"][0].get("mtu").is_none());
        let new = r.to_json("1.1.0");
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["interfaces"][0]["mtu"], 1450);
        assert_eq!(CniResult::parse(&old).unwrap(), r.clone().without_mtu());
        assert!(version_cmp("0.4.0", "1.0.0").is_lt());
        assert!(version_cmp("1.1.0", "1.0.0").is_gt());
        assert_eq!(parse_cidr("fd00::1/64").unwrap().1, 64);
        assert!(parse_cidr("10.0.0.1/33").is_err());
        assert!(parse_cidr("10.0.0.1").is_err());
    }

    impl CniResult {
        fn without_mtu(mut self) -> CniResult {
            for i in &mut self.interfaces {
                i.mtu = None;
            }
            self
        }
    }
}
