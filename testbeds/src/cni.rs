//! A CNI runtime in miniature, as the spec describes one: it executes `vswitch-cni` (and the
//! reference plugins it delegates or chains to, from `/usr/lib/cni`) with real `CNI_*`
//! variables and the network configuration on stdin, and reads the result or error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::Error;
use crate::daemon::workspace_binary;

/// Where Debian's `containernetworking-plugins` puts the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// Whether the reference plugins are installed (`apt-get install containernetworking-plugins`).
pub fn reference_plugins_installed() -> bool {
    Path::new(REFERENCE_PLUGINS).join("host-local").is_file()
}

/// The outcome of one plugin run.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The exit status was 0.
    pub ok: bool,
    /// What it printed on stdout, parsed (`null` if nothing or not JSON).
    pub out: Value,
    /// What it printed on stderr.
    pub stderr: String,
}

impl Outcome {
    /// The spec error code, if it failed with one.
    pub fn code(&self) -> Option<u64> {
        if self.ok {
            None
        } else {
            self.out["code"].as_u64()
        }
    }
}

/// Runs CNI plugins by name from `CNI_PATH` (the workspace's target directory, then the
/// reference plugins).
#[derive(Clone, Debug)]
pub struct Runtime {
    path: String,
}

impl Runtime {
    /// A runtime that finds `vswitch-cni` next to the running program.
    pub fn new() -> Result<Runtime, Error> {
        let plugin = workspace_binary("vswitch-cni")?;
        let dir = plugin
            .parent()
            .ok_or_else(|| Error::Setup("vswitch-cni has no directory".into()))?;
        Ok(Runtime {
            path: format!("{}:{REFERENCE_PLUGINS}", dir.display()),
        })
    }

    /// The `CNI_PATH` it passes.
    pub fn cni_path(&self) -> &str {
        &self.path
    }

    /// The directory holding `vswitch-cni`.
    pub fn plugin_dir(&self) -> PathBuf {
        PathBuf::from(self.path.split(':').next().unwrap_or("."))
    }

    /// Runs plugin `conf.type` for `command` with `vars` (`CNI_CONTAINERID`, ...) set.
    pub fn exec(
        &self,
        command: &str,
        conf: &Value,
        vars: &[(&str, &str)],
    ) -> Result<Outcome, Error> {
        let kind = conf["type"]
            .as_str()
            .ok_or_else(|| Error::Setup("configuration without type".into()))?;
        let program = self
            .path
            .split(':')
            .map(|d| Path::new(d).join(kind))
            .find(|p| p.is_file())
            .ok_or_else(|| Error::Setup(format!("no plugin {kind} in {}", self.path)))?;
        let mut child = Command::new(&program)
            .env_remove("CNI_NETNS")
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", &self.path)
            .envs(vars.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Io(format!("running {}", program.display()), e))?;
        let input = serde_json::to_vec(conf).unwrap_or_default();
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&input)
                .map_err(|e| Error::Io("plugin stdin".into(), e))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| Error::Io("plugin output".into(), e))?;
        Ok(Outcome {
            ok: out.status.success(),
            out: serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// ADD of `container` in namespace file `netns` as `ifname`; the result, or an error
    /// naming the plugin's.
    pub fn add(
        &self,
        conf: &Value,
        container: &str,
        netns: &str,
        ifname: &str,
    ) -> Result<Value, Error> {
        let o = self.exec(
            "ADD",
            conf,
            &[
                ("CNI_CONTAINERID", container),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", ifname),
            ],
        )?;
        if !o.ok {
            return Err(Error::Setup(format!(
                "CNI ADD {container}: {} {}",
                o.out, o.stderr
            )));
        }
        Ok(o.out)
    }

    /// DEL of `container`'s `ifname` (with its namespace file, if it still has one).
    pub fn del(
        &self,
        conf: &Value,
        container: &str,
        netns: Option<&str>,
        ifname: &str,
    ) -> Result<Outcome, Error> {
        let mut vars = vec![("CNI_CONTAINERID", container), ("CNI_IFNAME", ifname)];
        if let Some(ns) = netns {
            vars.push(("CNI_NETNS", ns));
        }
        self.exec("DEL", conf, &vars)
    }
}

/// A `vswitch-cni` network configuration: tenant `tenant` of the vswitchd at `socket`,
/// addresses from the reference `host-local` in `subnet`, its reservations kept in `ipam_dir`.
pub fn network(name: &str, tenant: &str, socket: &Path, subnet: &str, ipam_dir: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": name,
        "type": "vswitch-cni",
        "tenant": tenant,
        "socket": socket,
        "ipam": {
            "type": "host-local",
            "subnet": subnet,
            "dataDir": ipam_dir,
        }
    })
}

/// The addresses `host-local` holds for network `name` in `ipam_dir`, with the container id
/// each belongs to.
pub fn reservations(ipam_dir: &Path, name: &str) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(ipam_dir.join(name)) else {
        return Vec::new();
    };
    let mut v: Vec<(String, String)> = entries
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            file.parse::<std::net::IpAddr>().ok()?;
            let owner = std::fs::read_to_string(e.path()).unwrap_or_default();
            Some((file, owner.lines().next().unwrap_or("").trim().to_owned()))
        })
        .collect();
    v.sort();
    v
}
