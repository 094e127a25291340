//! Running the daemons as real processes inside test hosts, and a minimal HTTP/1.1 client for
//! their unix-socket APIs (what `curl --unix-socket` does).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::Error;
use crate::netns::Netns;

/// The path of a workspace binary built next to the running program (e.g. `vswitchd`): in
/// the same directory (a binary in `target/<profile>/`) or one up (a test in
/// `target/<profile>/deps/`).
pub fn workspace_binary(name: &str) -> Result<PathBuf, Error> {
    let exe = std::env::current_exe().map_err(|e| Error::Io("current_exe".into(), e))?;
    let dir = exe
        .parent()
        .ok_or_else(|| Error::Setup("cannot locate the target directory".into()))?;
    [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Setup(format!(
                "{name} is not built next to {} (cargo build --workspace builds it)",
                exe.display()
            ))
        })
}

/// Makes the child of `cmd` die with its parent (also on a crash of the test), never
/// outliving the namespaces it was started in, and puts it in a process group of its own, so
/// that a Ctrl-C on the terminal reaches only the parent, which then stops it in order.
pub fn tie_to_parent(cmd: &mut std::process::Command) {
    std::os::unix::process::CommandExt::process_group(cmd, 0);
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl,
    // which is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A daemon process; killed (SIGKILL) on drop if still running.
pub struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
}

impl Daemon {
    /// Starts `program args...` inside `ns` and waits until `socket` accepts connections.
    pub fn start(
        ns: &Netns,
        program: &Path,
        args: &[String],
        socket: PathBuf,
    ) -> Result<Daemon, Error> {
        let prog = program.to_string_lossy().into_owned();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::spawn(ns.command(&prog, &args), &prog, socket)
    }

    /// Starts `program args...` in the caller's namespaces (a daemon that needs no network of
    /// its own, e.g. vblockd) and waits until `socket` accepts connections.
    pub fn start_local(program: &Path, args: &[String], socket: PathBuf) -> Result<Daemon, Error> {
        let mut cmd = std::process::Command::new(program);
        cmd.args(args);
        Self::spawn(cmd, &program.to_string_lossy(), socket)
    }

    fn spawn(mut cmd: std::process::Command, prog: &str, socket: PathBuf) -> Result<Daemon, Error> {
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        tie_to_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| Error::Io(format!("starting {prog}"), e))?;
        let mut d = Daemon {
            child: Some(child),
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&d.socket).is_err() {
            if let Some(c) = d.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(Error::Setup(format!("{prog} exited early: {status}")));
            }
            if Instant::now() > deadline {
                return Err(Error::Setup(format!("{prog}: no API socket after 20 s")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(d)
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills the daemon with SIGKILL (no chance to clean up), as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the daemon with SIGTERM and waits for it; returns whether it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        c.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// POSTs `body` to `path` and returns the reply, which must be `201 Created`.
    pub fn create(&self, path: &str, body: &str) -> Result<String, Error> {
        let (status, resp) = self.request("POST", path, Some(body))?;
        if status != 201 {
            return Err(Error::Setup(format!("POST {path} {body}: {status} {resp}")));
        }
        Ok(resp)
    }

    /// Sends an API request and returns the status and the body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), Error> {
        http(&self.socket, method, path, body)
    }
}

/// Starts vblockd (the workspace binary) in the caller's namespaces with its run and state
/// directories in `dir` (`dir/run/vblockd.sock` is its API), plus `extra` flags.
pub fn start_vblockd(dir: &Path, extra: &[&str]) -> Result<Daemon, Error> {
    let mut args: Vec<String> = vec![
        "--run-dir".into(),
        dir.join("run").display().to_string(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    Daemon::start_local(
        &workspace_binary("vblockd")?,
        &args,
        dir.join("run/vblockd.sock"),
    )
}

/// vswitchd's command line for a host on underlay address `underlay`, with its run and state
/// directories in `dir` (`dir/run/vswitchd.sock` is its API), plus `extra` flags.
pub fn vswitchd_args(underlay: std::net::IpAddr, dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--underlay".into(),
        underlay.to_string(),
        "--run-dir".into(),
        dir.join("run").display().to_string(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Starts vswitchd (the workspace binary) inside host `ns` with [`vswitchd_args`].
pub fn start_vswitchd(
    ns: &Netns,
    underlay: std::net::IpAddr,
    dir: &Path,
    extra: &[&str],
) -> Result<Daemon, Error> {
    Daemon::start(
        ns,
        &workspace_binary("vswitchd")?,
        &vswitchd_args(underlay, dir, extra),
        dir.join("run/vswitchd.sock"),
    )
}

/// A container on a tenant of the vswitchd `d`: a new namespace holding the TAP port `port`
/// as `eth0`, with address `cidr` (`"10.9.0.1/24"`), up.
pub fn container_port(d: &Daemon, port: &str, tenant: &str, cidr: &str) -> Result<Netns, Error> {
    let ns = Netns::create(port)?;
    d.create(
        "/v1/ports",
        &format!(
            r#"{{"name":"{port}","tenant":"{tenant}","netns":"/run/netns/{}","ifname":"eth0"}}"#,
            ns.name()
        ),
    )?;
    ns.ip(&["addr", "add", cidr, "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    Ok(ns)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One HTTP/1.1 request over a unix socket (`Connection: close`).
pub fn http(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), Error> {
    let io = |e| Error::Io(format!("API {}", socket.display()), e);
    let mut s = UnixStream::connect(socket).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(io)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Error::Setup(format!("bad HTTP response: {resp:?}")))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
