//! A private dockerd (Debian's `docker.io` 20.10) inside a test host's network namespace:
//! its own data root, exec root and API socket in a scratch directory, no bridge, no
//! iptables, no forwarding changes; its containers run the busybox image imported from a
//! tarball. Started with `nsenter --net` (not `ip netns exec`, which remounts /sys and hides
//! the cgroup v1 mounts dockerd needs). Everything goes when it is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::Error;
use crate::daemon::tie_to_parent;
use crate::netns::{Netns, run};

/// The image containers run: busybox-static as `/bin/*`.
pub const IMAGE: &str = "lv-busybox:latest";

const DOCKER: &str = "/usr/bin/docker";
const DOCKERD: &str = "/usr/sbin/dockerd";

/// Whether dockerd and the docker CLI (Debian's) are installed.
pub fn installed() -> bool {
    Path::new(DOCKER).is_file() && Path::new(DOCKERD).is_file()
}

/// A private dockerd.
pub struct Dockerd {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
    ns: String,
}

impl Dockerd {
    /// Starts dockerd in `ns` with its files under `dir`, waits until it answers and imports
    /// the busybox image.
    pub fn start(ns: &Netns, dir: &Path) -> Result<Dockerd, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io(format!("{}", dir.display()), e))?;
        let mut d = Dockerd {
            child: None,
            dir: dir.to_owned(),
            socket: dir.join("docker.sock"),
            ns: ns.name().to_owned(),
        };
        d.spawn()?;
        let tar = crate::podman::busybox_image(&dir.join("image"))?;
        d.docker(&["import", &tar.display().to_string(), IMAGE])?;
        Ok(d)
    }

    /// Stops dockerd (SIGTERM: it stops its containers) and starts it again on the same
    /// data, as an operator's restart does.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.stop();
        self.spawn()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }

    fn spawn(&mut self) -> Result<(), Error> {
        let dir = self.dir.clone();
        let socket = self.socket.clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("dockerd.log"))
            .map_err(|e| Error::Io("dockerd log".into(), e))?;
        let err = log
            .try_clone()
            .map_err(|e| Error::Io("dockerd log".into(), e))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns))
            .arg(DOCKERD)
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .args([
                "--bridge",
                "none",
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--userland-proxy=false",
                "--shutdown-timeout",
                "5",
            ])
            // Its own namespaces in a containerd it may share (a system one, when running).
            .arg("--containerd-namespace")
            .arg(format!("lv{}", std::process::id()))
            .arg("--containerd-plugins-namespace")
            .arg(format!("lv{}p", std::process::id()))
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err));
        tie_to_parent(&mut cmd);
        self.child = Some(
            cmd.spawn()
                .map_err(|e| Error::Io("starting dockerd".into(), e))?,
        );
        crate::wait::until("dockerd to answer", Duration::from_secs(60), || {
            self.succeeds(&["version"])
        })
        .map_err(|e| Error::Setup(format!("{e}: {}", self.log_tail())))
    }

    /// A `docker` command talking to this dockerd.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(DOCKER);
        c.arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args);
        c
    }

    /// Runs `docker ARGS...`, failing with its stderr if it fails.
    pub fn docker(&self, args: &[&str]) -> Result<String, Error> {
        run(&mut self.command(args))
    }

    /// Whether `docker ARGS...` succeeds.
    pub fn succeeds(&self, args: &[&str]) -> bool {
        self.command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A container's address on its (only) network.
    pub fn ip_of(&self, container: &str) -> Result<String, Error> {
        Ok(self
            .docker(&[
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                container,
            ])?
            .trim()
            .to_owned())
    }

    /// The last lines of dockerd's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(8).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Ok(ids) = self.docker(&["ps", "-aq"]) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = self.docker(&args);
            }
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
