//! Uniquely named network namespaces that are always removed, and helpers to run commands
//! and code inside them.

use std::fs::File;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};

use crate::Error;

/// Names of the namespaces this process made and has not removed yet, so that a signal
/// handler can remove them ([`remove_all`]).
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace under `/run/netns`, deleted (with everything in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Made (and removed on drop) by us, rather than borrowed from someone else.
    owned: bool,
}

impl Netns {
    /// Creates a namespace named `lv<pid>x<n><role>`: unique per process and call, and
    /// recognisable as ours. The loopback interface is brought up.
    pub fn create(role: &str) -> Result<Netns, Error> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("lv{}x{}{}", std::process::id(), n, role);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.clone());
        let ns = Netns { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A namespace someone else made (a container's, `/run/netns/NAME`), to run things in;
    /// it is left alone on drop.
    pub fn borrowed(name: &str) -> Result<Netns, Error> {
        let path = format!("/run/netns/{name}");
        if !std::path::Path::new(&path).exists() {
            return Err(Error::Setup(format!("no network namespace {path}")));
        }
        Ok(Netns {
            name: name.to_owned(),
            owned: false,
        })
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS...`, failing with its stderr if it fails.
    pub fn ip(&self, args: &[&str]) -> Result<String, Error> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs a program inside the namespace (`ip netns exec`), failing if it fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, Error> {
        run(&mut self.command(program, args))
    }

    /// A command that runs `program` inside the namespace, for callers that need its exit
    /// status or want to run it in the background.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]).args(args);
        cmd
    }

    /// Runs `f` on a thread that has entered the namespace and returns its result. Sockets
    /// created by `f` stay in the namespace wherever they are used afterwards.
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).map_err(|e| Error::Io(path.clone(), e))?;
        std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| Error::Io(path, e.into()))?;
            f()
        })
        .join()
        .map_err(|_| Error::Setup("thread inside the namespace panicked".into()))?
    }
}

/// Moves the calling thread into the named namespace (for threads that must live there, such
/// as a datapath whose TAPs and sockets belong to a host).
pub fn enter_current_thread(name: &str) -> Result<(), Error> {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).map_err(|e| Error::Io(path.clone(), e))?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| Error::Io(path, e.into()))
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|n| n != &self.name);
    }
}

/// Deletes every namespace this process created and still holds: for signal handlers, where
/// destructors will not run.
pub fn remove_all() {
    let names = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|e| e.into_inner()));
    for name in names {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
    }
}

/// Runs a command, returning its stdout, or an error holding the command line and stderr.
pub fn run(cmd: &mut Command) -> Result<String, Error> {
    let out: Output = cmd
        .output()
        .map_err(|e| Error::Io(format!("{:?}", cmd.get_program()), e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: format!("{cmd:?}").replace('"', ""),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Why root-only tests cannot run here, or `None` if they can.
pub fn missing_privileges() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (network namespaces)".into());
    }
    for tool in ["ip", "ping", "ethtool"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Some(format!("`{tool}` is not installed (.ci/run installs it)"));
        }
    }
    None
}
