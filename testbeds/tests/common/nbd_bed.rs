//! vblockd with one pool for the NBD tests, and the third-party tools they run.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use libvirtual::block::Client;
use testbeds::daemon::{Daemon, workspace_binary};
use testbeds::scratch::Scratch;
use vblock::api::{PoolSpec, VolumeSpec};
use vblock::nbd::proto::{self, Request, opt, rep};

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

/// A raw client: negotiates with GO, then speaks requests by hand.
pub struct Raw {
    pub s: UnixStream,
}

impl Raw {
    /// Connects, reads the greeting, sends the client flags.
    pub fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw { s };
        let mut hello = [0u8; 18];
        r.s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], &proto::NBDMAGIC.to_be_bytes());
        r.s.write_all(&3u32.to_be_bytes()).unwrap();
        r
    }

    /// Sends option `option` with `data`.
    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut o = proto::IHAVEOPT.to_be_bytes().to_vec();
        o.extend_from_slice(&option.to_be_bytes());
        o.extend_from_slice(&(data.len() as u32).to_be_bytes());
        o.extend_from_slice(data);
        self.s.write_all(&o).unwrap();
    }

    /// The next option reply: type and data.
    pub fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (kind, d)
    }

    /// GO to `export`; the replies up to ACK (or the error).
    pub fn go(&mut self, export: &str) -> u32 {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(opt::GO, &d);
        loop {
            let (kind, _) = self.option_reply();
            if kind != rep::INFO {
                return kind;
            }
        }
    }

    /// Sends request `kind` (no payload).
    pub fn request(&mut self, kind: u16, offset: u64, length: u32, cookie: u64) {
        let r = Request {
            flags: 0,
            kind,
            cookie,
            offset,
            length,
        };
        self.s.write_all(&r.encode()).unwrap();
    }

    /// A simple reply: error and cookie.
    pub fn reply(&mut self) -> Option<(u32, u64)> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).ok()?;
        assert_eq!(&h[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        Some((
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        ))
    }

    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}
