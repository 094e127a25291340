//! podman 4.3 with its CNI backend, confined to a scratch directory: its own
//! `containers.conf` and `storage.conf` (what Debian 12's podman needs here: cgroupfs, runc,
//! file events, explicit ulimits), CNI network lists in its own directory, plugins
//! from the workspace and `/usr/lib/cni`, and a busybox image imported from a tarball. Every
//! podman command runs inside a chosen host namespace (`nsenter --net`), so that the plugins
//! it calls (and portmap's iptables rules) act there.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::Error;
use crate::netns::{Netns, run};

/// Writes `dir/image.tar`: a root file system of busybox-static and its applets as `/bin/*`,
/// for `podman import` / `docker import` (no registry is reachable here).
pub fn busybox_image(dir: &Path) -> Result<std::path::PathBuf, Error> {
    let io = |what: &'static str| move |e| Error::Io(what.into(), e);
    let bin = dir.join("image/bin");
    std::fs::create_dir_all(&bin).map_err(io("creating the image directory"))?;
    std::fs::copy("/bin/busybox", bin.join("busybox")).map_err(io("copying busybox"))?;
    for applet in [
        "sh", "ping", "sleep", "ip", "cat", "nc", "httpd", "wget", "echo",
    ] {
        let link = bin.join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link).map_err(io("symlink"))?;
        }
    }
    let tar = dir.join("image.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(dir.join("image"))
        .arg("-cf")
        .arg(&tar)
        .arg("."))?;
    Ok(tar)
}

/// The image every container runs: busybox-static as `/bin/*`.
pub const IMAGE: &str = "localhost/lv-busybox:latest";

/// Whether podman is installed.
pub fn available() -> bool {
    Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A podman confined to `dir`.
pub struct Podman {
    dir: PathBuf,
}

impl Podman {
    /// Writes the configuration into `dir` (plugins from `plugin_dir`, then the reference
    /// ones) and imports the busybox image.
    pub fn new(dir: &Path, plugin_dir: &Path) -> Result<Podman, Error> {
        let io = |what: &str| {
            let what = what.to_owned();
            move |e| Error::Io(what, e)
        };
        for sub in ["networks", "storage", "run", "tmp", "image/bin"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io("podman dirs"))?;
        }
        let d = dir.display();
        let conf = format!(
            r#"[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
tmp_dir = "{d}/tmp"
static_dir = "{d}/static"
volume_path = "{d}/volumes"
[network]
network_backend = "cni"
cni_plugin_dirs = ["{}", "{}"]
network_config_dir = "{d}/networks"
"#,
            plugin_dir.display(),
            crate::cni::REFERENCE_PLUGINS
        );
        std::fs::write(dir.join("containers.conf"), conf).map_err(io("containers.conf"))?;
        let storage = format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{d}/storage\"\nrunroot = \"{d}/run\"\n"
        );
        std::fs::write(dir.join("storage.conf"), storage).map_err(io("storage.conf"))?;
        let tar = busybox_image(dir)?;
        let p = Podman {
            dir: dir.to_owned(),
        };
        run(p
            .command(None)
            .args(["import", "--quiet"])
            .arg(&tar)
            .arg(IMAGE))?;
        Ok(p)
    }

    /// Installs a CNI network list (`{"cniVersion","name","plugins":[...]}`).
    pub fn add_network(&self, list: &Value) -> Result<(), Error> {
        let name = list["name"].as_str().unwrap_or("unnamed");
        let path = self.dir.join(format!("networks/{name}.conflist"));
        std::fs::write(&path, list.to_string())
            .map_err(|e| Error::Io(format!("writing {}", path.display()), e))
    }

    /// `podman ARGS...` inside host `ns` (or here), with this configuration.
    pub fn command(&self, ns: Option<&Netns>) -> Command {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{}", ns.name()))
                    .arg("podman");
                c
            }
            None => Command::new("podman"),
        };
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"));
        cmd
    }

    /// Runs `podman ARGS...` inside `ns`; its stdout, or an error with its stderr.
    pub fn run(&self, ns: &Netns, args: &[&str]) -> Result<String, Error> {
        run(self.command(Some(ns)).args(args))
    }

    /// Whether `podman ARGS...` inside `ns` succeeds.
    pub fn succeeds(&self, ns: &Netns, args: &[&str]) -> bool {
        self.command(Some(ns))
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers and their mounts go before the scratch directory does; the plugins
        // that DEL run in a namespace of their own (never touching the machine's iptables).
        let ns = Netns::create("pdrop").ok();
        let _ = self
            .command(ns.as_ref())
            .args(["rm", "-a", "-f", "-t", "0"])
            .output();
        let _ = self
            .command(ns.as_ref())
            .args(["system", "reset", "--force"])
            .output();
    }
}
