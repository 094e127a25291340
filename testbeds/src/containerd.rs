//! containerd (Debian's 1.6) as users run it with `ctr run --cni`, confined to a scratch
//! directory: a private containerd (its own root, state and socket; the CRI plugin off), and
//! every `ctr` call in a private mount namespace where `/opt/cni/bin` and `/etc/cni/net.d` —
//! the fixed places `ctr run --cni` reads plugins and network configurations from — are the
//! bed's own directories (nothing on the machine is touched). Containers run a busybox root
//! file system from a directory (`--rootfs`), no image needed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use crate::Error;
use crate::netns::run;

/// Whether containerd and ctr are installed.
pub fn available() -> bool {
    ["containerd", "ctr"].iter().all(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// A private containerd; stopped (and its containers' tasks killed) on drop.
pub struct Containerd {
    dir: PathBuf,
    daemon: Child,
    namespace: String,
    started: Vec<String>,
}

impl Containerd {
    /// Starts containerd in `dir` and waits for its socket. `plugins` holds the CNI plugins
    /// `ctr` will find in `/opt/cni/bin`.
    pub fn start(dir: &Path, plugins: &[PathBuf]) -> Result<Containerd, Error> {
        let io = |what: &str| {
            let what = what.to_owned();
            move |e| Error::Io(what, e)
        };
        for sub in [
            "root",
            "state",
            "cni-bin",
            "net.d",
            "rootfs/bin",
            "rootfs/proc",
        ] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io("containerd dirs"))?;
        }
        for p in plugins {
            let name = p
                .file_name()
                .ok_or_else(|| Error::Setup(format!("plugin {}", p.display())))?;
            std::fs::copy(p, dir.join("cni-bin").join(name)).map_err(io("copying a plugin"))?;
        }
        let bin = dir.join("rootfs/bin");
        std::fs::copy("/bin/busybox", bin.join("busybox")).map_err(io("copying busybox"))?;
        for applet in ["sh", "ping", "sleep", "ip", "cat"] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).map_err(io("symlink"))?;
        }
        let d = dir.display();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n\
             [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
             [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n"
        );
        std::fs::write(dir.join("config.toml"), config).map_err(io("config.toml"))?;
        let log = std::fs::File::create(dir.join("containerd.log")).map_err(io("log"))?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(log.try_clone().map_err(io("log"))?)
            .stderr(log);
        crate::daemon::tie_to_parent(&mut cmd);
        let daemon = cmd.spawn().map_err(io("starting containerd"))?;
        let c = Containerd {
            dir: dir.to_owned(),
            daemon,
            namespace: format!("lv{}", std::process::id()),
            started: Vec::new(),
        };
        let socket = dir.join("containerd.sock");
        crate::wait::until("containerd's socket", crate::wait::SOON, || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        })
        .map_err(|e| {
            let log = std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
            Error::Setup(format!("{e}\n{log}"))
        })?;
        // It answers once its plugins are loaded.
        c.ctr(&["version"])?;
        Ok(c)
    }

    /// Installs the network configuration list `ctr run --cni` uses (it reads only the first
    /// list in `/etc/cni/net.d`, so the bed keeps exactly one).
    pub fn set_network(&self, list: &serde_json::Value) -> Result<(), Error> {
        let dir = self.dir.join("net.d");
        for e in std::fs::read_dir(&dir).map_err(|e| Error::Io("net.d".into(), e))? {
            let _ = std::fs::remove_file(e.map_err(|e| Error::Io("net.d".into(), e))?.path());
        }
        std::fs::write(dir.join("10-net.conflist"), list.to_string())
            .map_err(|e| Error::Io("writing the network list".into(), e))
    }

    /// `ctr ARGS...` against this containerd, in a private mount namespace that shows the
    /// bed's plugins and network list at ctr's fixed paths; its stdout, or an error.
    pub fn ctr(&self, args: &[&str]) -> Result<String, Error> {
        let d = self.dir.display();
        // The mount point of the configurations (an empty directory, where the CNI packages
        // would make it anyway).
        std::fs::create_dir_all("/etc/cni/net.d")
            .map_err(|e| Error::Io("/etc/cni/net.d".into(), e))?;
        let mut script = format!(
            "set -e; mount -t tmpfs lv-cni /opt; mkdir -p /opt/cni/bin; \
             mount --bind '{d}/cni-bin' /opt/cni/bin; \
             mount --bind '{d}/net.d' /etc/cni/net.d; \
             exec ctr --address '{d}/containerd.sock' -n {}",
            self.namespace
        );
        for a in args {
            script.push_str(" '");
            script.push_str(&a.replace('\'', "'\\''"));
            script.push('\'');
        }
        run(Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(&script))
    }

    /// Runs container `id` (busybox `sh -c 'sleep 3600'`) detached, with CNI networking.
    pub fn run_container(&mut self, id: &str) -> Result<(), Error> {
        let rootfs = self.dir.join("rootfs").display().to_string();
        self.started.push(id.to_owned());
        self.ctr(&[
            "run",
            "--cni",
            "--rootfs",
            "-d",
            &rootfs,
            id,
            "/bin/sh",
            "-c",
            "sleep 3600",
        ])
        .map(drop)
    }

    /// Runs `argv` in container `id`; its stdout, or an error with its stderr.
    pub fn exec(&self, id: &str, argv: &[&str]) -> Result<String, Error> {
        let exec_id = format!(
            "x{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let mut args = vec!["task", "exec", "--exec-id", &exec_id, id];
        args.extend_from_slice(argv);
        self.ctr(&args)
    }

    /// The process id of container `id`'s task (its network namespace is
    /// `/proc/PID/ns/net`).
    pub fn pid(&self, id: &str) -> Result<u32, Error> {
        let out = self.ctr(&["task", "ls"])?;
        out.lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(id)).then(|| w.next()?.parse().ok())?
            })
            .ok_or_else(|| Error::Setup(format!("no task {id} in:\n{out}")))
    }

    /// Kills container `id`'s task and deletes the container, as `ctr` does it: without a
    /// CNI DEL (its network namespace vanishes with the task).
    pub fn remove(&mut self, id: &str) -> Result<(), Error> {
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        crate::wait::until("the task to stop", crate::wait::SOON, || {
            self.ctr(&["task", "delete", id]).is_ok()
        })?;
        self.ctr(&["container", "delete", id])?;
        self.started.retain(|s| s != id);
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in std::mem::take(&mut self.started) {
            let _ = self.remove(&id);
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        // Leftover shims (they outlive containerd by design) would keep the scratch busy.
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(format!("containerd-shim.*-namespace {}", self.namespace))
            .status();
    }
}
