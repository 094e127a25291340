//! vblockd's configuration: a TOML file, overridden by command-line flags.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::api::PoolSpec;

/// Settings from the config file; every field is optional there.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Directory of the control socket (and vhost-user sockets).
    pub run_dir: Option<PathBuf>,
    /// Directory of the persisted state.
    pub state_dir: Option<PathBuf>,
    /// Pools to open at start (in addition to those created through the API).
    #[serde(default)]
    pub pools: Vec<PoolSpec>,
    /// `human` or `json`.
    pub log_format: Option<String>,
    /// NBD over TCP: addresses to listen on (off when empty; the unix socket
    /// `RUN_DIR/nbd.sock` is always served).
    #[serde(default)]
    pub nbd_listen: Vec<std::net::SocketAddr>,
    /// NBD over TCP: client networks allowed (`10.0.0.0/8`); required with `nbd_listen`.
    #[serde(default)]
    pub nbd_allow: Vec<String>,
    /// NBD over TCP: exports offered (`POOL/VOLUME` or `POOL/*`; default every volume).
    #[serde(default)]
    pub nbd_exports: Vec<String>,
    /// NBD over TCP: TLS required, with this certificate chain (PEM).
    pub nbd_tls_cert: Option<PathBuf>,
    /// NBD over TCP: the TLS private key (PEM).
    pub nbd_tls_key: Option<PathBuf>,
    /// NBD over TCP: client certificates required, issued by this CA (PEM).
    pub nbd_tls_client_ca: Option<PathBuf>,
    /// Open NBD connections at most, per listener (default 128).
    pub nbd_max_connections: Option<u32>,
    /// Seconds an NBD client has to choose an export (default 10).
    pub nbd_handshake_timeout: Option<u64>,
    /// Seconds of silence after which an NBD connection waits without threads (default 30).
    pub nbd_idle_after: Option<u64>,
    /// Seconds after which writes no client flushed are committed (default 30).
    pub commit_interval: Option<u64>,
    /// Owner (user name or uid) of every socket the daemon creates.
    pub socket_owner: Option<String>,
    /// Group (name or gid) of every socket the daemon creates.
    pub socket_group: Option<String>,
    /// Permission bits of every socket the daemon creates, in octal (`"0660"`).
    pub socket_mode: Option<String>,
    /// API connections served at once (default 64).
    pub api_max_connections: Option<u32>,
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_keys_and_rejects_unknown_ones() {
        let cfg: FileConfig = toml::from_str(
            r#"
            run_dir = "/tmp/run"
            state_dir = "/tmp/state"
            log_format = "json"
            nbd_listen = ["127.0.0.1:10809"]
            nbd_allow = ["127.0.0.0/8"]
            commit_interval = 5
            [[pools]]
            name = "fast"
            path = "/var/lib/libvirtual/fast.pool"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.pools.len(), 1);
        assert_eq!(cfg.nbd_listen.len(), 1);
        assert_eq!(cfg.commit_interval, Some(5));
        assert_eq!(cfg.pools[0].name, "fast");
        assert!(toml::from_str::<FileConfig>("pool = 1").is_err());
    }
}
