//! vblockd with one pool for the NBD tests, and the third-party tools they run.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use libvirtual::block::Client;
use testbeds::daemon::{Daemon, workspace_binary};
use testbeds::scratch::Scratch;
use vblock::api::{PoolSpec, VolumeSpec};

pub struct Bed {
    pub dir: Scratch,
    pub daemon: Daemon,
    pub api: Client,
}

impl Bed {
    /// vblockd with pool `p` (1 GiB), and `extra` flags.
    pub fn new(role: &str, extra: &[&str]) -> Bed {
        Bed::limited(role, None, extra)
    }

    /// The same, with the daemon's open-file limit (soft and hard) set to `nofile`.
    pub fn limited(role: &str, nofile: Option<u64>, extra: &[&str]) -> Bed {
        let dir = Scratch::new(Path::new("/var/tmp"), role).unwrap();
        let vblockd = workspace_binary("vblockd").unwrap();
        let (program, mut args): (PathBuf, Vec<String>) = match nofile {
            None => (vblockd, Vec::new()),
            Some(n) => (
                PathBuf::from("prlimit"),
                vec![
                    format!("--nofile={n}:{n}"),
                    "--".into(),
                    vblockd.display().to_string(),
                ],
            ),
        };
        args.extend([
            "--run-dir".into(),
            dir.join("run").display().to_string(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let socket = dir.join("run/vblockd.sock");
        let daemon = Daemon::start_local(&program, &args, socket.clone()).unwrap();
        let api = Client::new(&socket);
        api.create_pool(&PoolSpec {
            name: "p".into(),
            path: dir.join("p.pool"),
            size: Some(1 << 30),
            preallocation: Default::default(),
            space: Default::default(),
        })
        .unwrap();
        Bed { dir, daemon, api }
    }

    /// Creates volume `name` in pool `p`.
    pub fn volume(&self, name: &str, size: u64) {
        self.api
            .create_volume(
                "p",
                &VolumeSpec {
                    name: name.into(),
                    size,
                },
            )
            .unwrap();
    }

    /// The NBD unix socket.
    pub fn nbd_socket(&self) -> PathBuf {
        self.dir.join("run/nbd.sock")
    }

    /// The NBD URI of `export` on the unix socket.
    pub fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.nbd_socket().display()
        )
    }
}

/// Runs a tool; its exit status and what it printed.
pub fn tool(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (scripts/install-deps installs it)"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// qemu-io on a raw image with the commands given.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    qemu_io_format("raw", uri, cmds)
}

/// qemu-io on an image of `format` with the commands given.
pub fn qemu_io_format(format: &str, image: &str, cmds: &[&str]) -> (bool, String) {
    let mut args = vec!["-f", format];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(image);
    tool("qemu-io", &args)
}
