//! vswitchd's configuration: a TOML file, overridden by command-line flags.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Settings from the config file; every field is optional there.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Directory of the control socket (and, later, vhost-user sockets).
    pub run_dir: Option<PathBuf>,
    /// Directory of the persisted state.
    pub state_dir: Option<PathBuf>,
    /// Underlay addresses to bind the VXLAN port on.
    #[serde(default)]
    pub underlay: Vec<IpAddr>,
    /// L3 MTU of the underlay.
    pub underlay_mtu: Option<u16>,
    /// VXLAN UDP port.
    pub udp_port: Option<u16>,
    /// Send zero outer UDP checksums on an IPv6 underlay (Linux vxlan's `udp6zerocsumtx`).
    pub udp6_zero_checksum_tx: Option<bool>,
    /// Accept zero outer UDP checksums on an IPv6 underlay (`udp6zerocsumrx`).
    pub udp6_zero_checksum_rx: Option<bool>,
    /// How the uplink meets the underlay: `socket`, `xdp` or `auto` (absent: `socket`).
    pub uplink_io: Option<crate::uplink::UplinkIo>,
    /// Datapath worker threads (0 or absent: one per core).
    pub workers: Option<usize>,
    /// `human` or `json`.
    pub log_format: Option<String>,
    /// Owner (user name or uid) of every socket the daemon creates.
    pub socket_owner: Option<String>,
    /// Group (name or gid) of every socket the daemon creates.
    pub socket_group: Option<String>,
    /// Permission bits of every socket the daemon creates, in octal (`"0660"`).
    pub socket_mode: Option<String>,
    /// API connections served at once (default 64).
    pub api_max_connections: Option<u32>,
    /// Membership in a cluster (absent: standalone).
    pub cluster: Option<ClusterFile>,
}

/// The `[cluster]` table: membership in a cluster whose state is in etcd.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// etcd endpoints (`"http://10.0.0.1:2379"`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// This host's name in the cluster (default: the hostname).
    pub host: Option<String>,
    /// Key prefix in etcd (default `/libvirtual/`).
    pub prefix: Option<String>,
    /// Lease TTL of this host's records in seconds (default 10).
    pub lease_ttl_secs: Option<u64>,
    /// PEM CA of etcd's certificates.
    pub ca: Option<PathBuf>,
    /// PEM client certificate for etcd.
    pub cert: Option<PathBuf>,
    /// PEM key of `cert`.
    pub key: Option<PathBuf>,
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }
}

/// The effective settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Directory of the control socket.
    pub run_dir: PathBuf,
    /// Directory of the persisted state.
    pub state_dir: PathBuf,
    /// Underlay addresses.
    pub underlay: Vec<IpAddr>,
    /// Underlay MTU.
    pub underlay_mtu: u16,
    /// VXLAN UDP port.
    pub udp_port: u16,
    /// Zero outer UDP checksums on an IPv6 underlay.
    pub udp6_zero_checksum: crate::uplink::Udp6ZeroChecksum,
    /// How the uplink meets the underlay.
    pub uplink_io: crate::uplink::UplinkIo,
    /// Datapath worker threads; 0 means one per core.
    pub workers: usize,
    /// Log as JSON lines instead of human-readable text.
    pub json_logs: bool,
    /// Owner, group and mode of every socket.
    pub socket_access: daemon_kit::SocketAccess,
    /// API connections served at once.
    pub api_max_connections: usize,
    /// Cluster membership (`None`: standalone).
    pub cluster: Option<vswitch_cluster::ClusterConfig>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_keys_and_rejects_unknown_ones() {
        let cfg: FileConfig = toml::from_str(
            r#"
            underlay = ["198.18.0.1", "fd42::1"]
            underlay_mtu = 9000
            udp6_zero_checksum_rx = true
            uplink_io = "auto"
            udp_port = 4789
            workers = 2
            run_dir = "/tmp/run"
            state_dir = "/tmp/state"
            log_format = "json"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.underlay.len(), 2);
        assert_eq!(cfg.underlay_mtu, Some(9000));
        assert_eq!(cfg.udp6_zero_checksum_rx, Some(true));
        assert_eq!(cfg.udp6_zero_checksum_tx, None);
        assert_eq!(cfg.workers, Some(2));
        assert_eq!(cfg.uplink_io, Some(crate::uplink::UplinkIo::Auto));
        assert!(toml::from_str::<FileConfig>("uplink_io = \"dpdk\"").is_err());
        assert_eq!(cfg.log_format.as_deref(), Some("json"));
        assert!(toml::from_str::<FileConfig>("underlay_mtu = 1500\nmtu = 1").is_err());
        assert!(toml::from_str::<FileConfig>("underlay = [\"not-an-ip\"]").is_err());
        let cfg: FileConfig = toml::from_str(
            "[cluster]\nendpoints = [\"http://10.0.0.1:2379\"]\nhost = \"h1\"\nlease_ttl_secs = 5",
        )
        .unwrap();
        let cluster = cfg.cluster.unwrap();
        assert_eq!(cluster.host.as_deref(), Some("h1"));
        assert_eq!(cluster.lease_ttl_secs, Some(5));
        assert!(toml::from_str::<FileConfig>("[cluster]\nttl = 5").is_err());
    }
}
