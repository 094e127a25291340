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
    /// The namespace plugins run in (the host's, where vswitchd is), if not the caller's.
    host: Option<String>,
    /// `CNI_ARGS` it passes, if any.
    args: Option<String>,
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
            host: None,
            args: None,
        })
    }

    /// The same runtime running its plugins inside host namespace `ns` (as a runtime on
    /// that host would: the reference plugins act on the host's interfaces there).
    pub fn on_host(&self, ns: &crate::netns::Netns) -> Runtime {
        Runtime {
            host: Some(ns.name().to_owned()),
            ..self.clone()
        }
    }

    /// The same runtime passing `CNI_ARGS` (`IgnoreUnknown=1;K8S_POD_NAME=...`), as
    /// Kubernetes runtimes do.
    pub fn with_args(&self, args: &str) -> Runtime {
        Runtime {
            args: Some(args.to_owned()),
            ..self.clone()
        }
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
        let mut cmd = match &self.host {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        let mut child = cmd
            .env_remove("CNI_NETNS")
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", &self.path)
            .envs(self.args.iter().map(|a| ("CNI_ARGS", a.as_str())))
            .envs(vars.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Io(format!("running {}", program.display()), e))?;
        let input = serde_json::to_vec(conf).unwrap_or_default();
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin may exit without reading stdin (VERSION): its answer decides.
            match stdin.write_all(&input) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Io("plugin stdin".into(), e));
                }
                _ => {}
            }
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
        let o = self.try_add(conf, container, netns, ifname)?;
        if !o.ok {
            return Err(Error::Setup(format!(
                "CNI ADD {container}: {} {}",
                o.out, o.stderr
            )));
        }
        Ok(o.out)
    }

    /// ADD of `container` in namespace file `netns` as `ifname`, succeeding or not.
    pub fn try_add(
        &self,
        conf: &Value,
        container: &str,
        netns: &str,
        ifname: &str,
    ) -> Result<Outcome, Error> {
        self.exec(
            "ADD",
            conf,
            &[
                ("CNI_CONTAINERID", container),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", ifname),
            ],
        )
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

impl Runtime {
    /// ADD of a network list (`{"cniVersion","name","plugins":[...]}`) as libcni runs one:
    /// each plugin gets the list's version and name, the previous plugin's result and the
    /// `runtime` settings of the capabilities it declares. Returns the last result.
    pub fn add_list(
        &self,
        list: &Value,
        runtime: &Value,
        container: &str,
        netns: &str,
        ifname: &str,
    ) -> Result<Value, Error> {
        let mut prev: Option<Value> = None;
        for plugin in list["plugins"].as_array().into_iter().flatten() {
            let conf = list_member(list, plugin, runtime, prev.take());
            prev = Some(self.add(&conf, container, netns, ifname)?);
        }
        prev.ok_or_else(|| Error::Setup("empty network list".into()))
    }

    /// DEL of a network list: the plugins in reverse order, each with `result` (ADD's).
    pub fn del_list(
        &self,
        list: &Value,
        runtime: &Value,
        result: &Value,
        container: &str,
        netns: Option<&str>,
        ifname: &str,
    ) -> Result<(), Error> {
        let plugins: Vec<&Value> = list["plugins"].as_array().into_iter().flatten().collect();
        for plugin in plugins.into_iter().rev() {
            let conf = list_member(list, plugin, runtime, Some(result.clone()));
            let o = self.del(&conf, container, netns, ifname)?;
            if !o.ok {
                return Err(Error::Setup(format!(
                    "CNI DEL {}: {} {}",
                    plugin["type"], o.out, o.stderr
                )));
            }
        }
        Ok(())
    }
}

/// One plugin's configuration out of a list.
fn list_member(list: &Value, plugin: &Value, runtime: &Value, prev: Option<Value>) -> Value {
    let mut conf = plugin.clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    let mut rc = serde_json::Map::new();
    if let Some(caps) = plugin["capabilities"].as_object() {
        for (cap, on) in caps {
            if on.as_bool() == Some(true)
                && let Some(v) = runtime.get(cap)
            {
                rc.insert(cap.clone(), v.clone());
            }
        }
    }
    if !rc.is_empty() {
        conf["runtimeConfig"] = Value::Object(rc);
    }
    if let Some(p) = prev {
        conf["prevResult"] = p;
    }
    conf
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
