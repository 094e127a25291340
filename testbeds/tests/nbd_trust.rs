//! NBD listeners facing hostile clients: silent connections by the hundred (at the common
//! open-file limit, and beyond what the process can open), TLS with X.509 client
//! certificates against QEMU's own TLS client (GnuTLS), and per-export access.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockType, SockaddrIn, connect, recv, socket,
};
use vblock::nbd::proto::{self, opt, rep};

use testbeds::process::{cpu_time, open_fds, rss_kib, threads};

#[path = "common/nbd_bed.rs"]
mod nbd_bed;
use nbd_bed::{Bed, Raw, qemu_io, tool};

/// A TCP port free on loopback now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `n` connections to `port` that will never say a word, all started at once (non-blocking
/// connects: the kernel completes them as the listener's queue lets it).
fn silent_connections(port: u16, n: usize) -> Vec<OwnedFd> {
    let to = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    (0..n)
        .map(|_| {
            let fd = socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK,
                None,
            )
            .unwrap();
            match connect(fd.as_raw_fd(), &to) {
                Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => fd,
                Err(e) => panic!("connect: {e}"),
            }
        })
        .collect()
}

/// Waits until the server closed one of `conns` after greeting it: a connection it took,
/// held while the client said nothing, and ended at the handshake deadline. (Connections it
/// shed, closed without a greeting, do not count; nor do those the kernel's queue never
/// passed on.)
fn wait_one_timed_out(conns: &[OwnedFd]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        // (nix's PollFlags has no POLLRDHUP: libc's poll directly.)
        let mut fds: Vec<libc::pollfd> = conns
            .iter()
            .map(|c| libc::pollfd {
                fd: c.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if n <= 0 {
            continue;
        }
        for (c, f) in conns.iter().zip(&fds) {
            if f.revents & libc::POLLRDHUP == 0 {
                continue;
            }
            let mut b = [0u8; 32];
            let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
            if recv(c.as_raw_fd(), &mut b, flags).is_ok_and(|n| n == 18) {
                return;
            }
        }
        // Only connections closed without a greeting (shed) so far.
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no silent connection was closed at its deadline within 120 s");
}

/// The value of `vblock_nbd_connections_total{result="…"}`.
fn nbd_counter(bed: &Bed, result: &str) -> u64 {
    let metrics = bed.api.metrics().unwrap();
    let key = format!("vblock_nbd_connections_total{{result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in\n{metrics}"))
}

fn tcp_uri(port: u16, export: &str) -> String {
    format!("nbd://127.0.0.1:{port}/{export}")
}

#[test]
fn silent_tcp_clients_at_the_common_file_limit_hold_no_threads_and_a_normal_client_is_served() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // systemd's default soft limit; the attack: 600 silent TCP connections.
    let bed = Bed::limited(
        "lv-nbd-silent",
        Some(1024),
        &[
            "--nbd-listen",
            &listen,
            "--nbd-allow",
            "127.0.0.0/8",
            "--nbd-handshake-timeout",
            "3",
        ],
    );
    bed.volume("v", 16 << 20);
    let pid = bed.daemon.pid().unwrap();
    let threads0 = threads(pid);
    let (ok, out) = qemu_io(&bed.uri("v"), &["write -P 0x5a 0 64k"]);
    assert!(ok, "{out}");
    testbeds::wait::until(
        "the writer's connection to end",
        Duration::from_secs(60),
        || threads(pid) <= threads0,
    )
    .unwrap();
    let (fds0, rss0) = (open_fds(pid), rss_kib(pid));
    let (cpu0, t0) = (cpu_time(pid), Instant::now());

    let silent = silent_connections(port, 600);
    testbeds::wait::until(
        "the listener to hold its share of silent connections",
        Duration::from_secs(60),
        || open_fds(pid) >= fds0 + vblock::nbd::DEFAULT_MAX_CONNECTIONS,
    )
    .unwrap();
    // Bounded: no more than the listener's limit, and no thread for any of them.
    let (fds, threads_now) = (open_fds(pid), threads(pid));
    assert!(
        fds <= fds0 + vblock::nbd::DEFAULT_MAX_CONNECTIONS + 4,
        "{fds} descriptors (baseline {fds0})"
    );
    assert!(
        threads_now <= threads0 + 1,
        "{threads_now} threads (baseline {threads0})"
    );
    // Meanwhile the unix socket and the control API serve as usual.
    let (ok, out) = qemu_io(&bed.uri("v"), &["read -P 0x5a 0 64k"]);
    assert!(ok, "unix NBD client during the attack: {out}");
    assert_eq!(bed.api.pools().unwrap().len(), 1);
    // A normal TCP client gets its turn: silent connections are closed after the handshake
    // timeout, and the queue moves.
    let (ok, out) = qemu_io(&tcp_uri(port, "v"), &["read -P 0x5a 0 64k"]);
    assert!(ok, "TCP NBD client behind 600 silent connections: {out}");
    // No core burnt on them: the listener waited in poll, it did not spin.
    let (cpu, wall) = (cpu_time(pid) - cpu0, t0.elapsed());
    eprintln!(
        "600 silent connections: {:.2} s CPU over {:.1} s; timed out {}",
        cpu.as_secs_f64(),
        wall.as_secs_f64(),
        nbd_counter(&bed, "timed_out")
    );
    assert!(cpu < wall / 2, "{cpu:?} CPU in {wall:?}");
    assert!(nbd_counter(&bed, "timed_out") >= vblock::nbd::DEFAULT_MAX_CONNECTIONS as u64);
    drop(silent);
    testbeds::wait::until(
        "descriptors and threads back to the baseline",
        Duration::from_secs(60),
        || open_fds(pid) <= fds0 + 1 && threads(pid) <= threads0,
    )
    .unwrap();
    let rss = rss_kib(pid);
    assert!(
        rss <= rss0 + 8 * 1024,
        "RSS {rss0} KiB before, {rss} KiB after"
    );
}

#[test]
fn a_listener_out_of_file_descriptors_sheds_connections_without_spinning_and_recovers() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // A limit far below what the listener is allowed to take: accept runs into EMFILE.
    let bed = Bed::limited(
        "lv-nbd-emfile",
        Some(200),
        &[
            "--nbd-listen",
            &listen,
            "--nbd-allow",
            "127.0.0.0/8",
            "--nbd-max-connections",
            "5000",
            "--nbd-handshake-timeout",
            "3",
        ],
    );
    bed.volume("v", 16 << 20);
    let (ok, out) = qemu_io(&bed.uri("v"), &["write -P 0x6b 0 64k"]);
    assert!(ok, "{out}");
    let pid = bed.daemon.pid().unwrap();
    let fds0 = open_fds(pid);
    let (cpu0, t0) = (cpu_time(pid), Instant::now());
    let silent = silent_connections(port, 600);
    testbeds::wait::until(
        "the daemon to run out of descriptors",
        Duration::from_secs(60),
        || open_fds(pid) >= 195,
    )
    .unwrap();
    // Out of descriptors until the first silent connections reach their deadline.
    wait_one_timed_out(&silent);
    let (cpu, wall) = (cpu_time(pid) - cpu0, t0.elapsed());
    drop(silent);
    testbeds::wait::until(
        "descriptors back to the baseline",
        Duration::from_secs(60),
        || open_fds(pid) <= fds0 + 1,
    )
    .unwrap();
    let shed = nbd_counter(&bed, "shed");
    eprintln!(
        "600 connections at nofile 200: {:.2} s CPU over {:.1} s; shed {shed}, timed out {}",
        cpu.as_secs_f64(),
        wall.as_secs_f64(),
        nbd_counter(&bed, "timed_out")
    );
    // The attack did exhaust the descriptors, and the listener backed off instead of spinning.
    assert!(
        shed > 0,
        "never out of descriptors: the test did not reproduce the attack"
    );
    assert!(cpu < wall / 2, "{cpu:?} CPU in {wall:?}");
    // Everything serves again: the control API, NBD on the unix socket and on TCP.
    assert_eq!(bed.api.pools().unwrap().len(), 1);
    let (ok, out) = qemu_io(&bed.uri("v"), &["read -P 0x6b 0 64k"]);
    assert!(ok, "{out}");
    let (ok, out) = qemu_io(&tcp_uri(port, "v"), &["read -P 0x6b 0 64k"]);
    assert!(ok, "{out}");
}

/// The test PKI ([`testbeds::pki::Pki`]): a CA, a server certificate for 127.0.0.1, a client
/// certificate, and a second, foreign CA with a client certificate of its own; plus QEMU's
/// `tls-creds-x509` directories (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
struct Pki(testbeds::pki::Pki);

impl std::ops::Deref for Pki {
    type Target = testbeds::pki::Pki;
    fn deref(&self) -> &testbeds::pki::Pki {
        &self.0
    }
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let p = testbeds::pki::Pki::new(&dir.join("pki")).unwrap();
        p.ca("ca").unwrap();
        p.ca("foreign-ca").unwrap();
        p.leaf("ca", "server", "serverAuth", "IP:127.0.0.1,DNS:localhost")
            .unwrap();
        p.leaf("ca", "client", "clientAuth", "DNS:client.test")
            .unwrap();
        p.leaf("foreign-ca", "intruder", "clientAuth", "DNS:intruder.test")
            .unwrap();
        Pki(p)
    }

    /// A QEMU client credentials directory: trusting the CAs `cas`, presenting `client`
    /// (if any).
    fn qemu_dir(&self, label: &str, cas: &[&str], client: Option<&str>) -> String {
        let d = self.dir().join(format!("qemu-{label}"));
        std::fs::create_dir_all(&d).unwrap();
        let mut bundle = String::new();
        for ca in cas {
            bundle += &std::fs::read_to_string(self.path(&format!("{ca}-cert.pem"))).unwrap();
        }
        std::fs::write(d.join("ca-cert.pem"), bundle).unwrap();
        if let Some(c) = client {
            std::fs::copy(
                self.path(&format!("{c}-cert.pem")),
                d.join("client-cert.pem"),
            )
            .unwrap();
            std::fs::copy(self.path(&format!("{c}-key.pem")), d.join("client-key.pem")).unwrap();
        }
        d.display().to_string()
    }
}

/// qemu-io over TCP with TLS credentials from `creds` (none: no TLS).
fn qemu_io_tls(port: u16, export: &str, creds: Option<&str>, cmds: &[&str]) -> (bool, String) {
    let mut opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={export}"
    );
    let object;
    let mut args: Vec<&str> = Vec::new();
    if let Some(dir) = creds {
        object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={dir}");
        args.extend(["--object", &object]);
        opts.push_str(",tls-creds=tls0");
    }
    args.extend(["--image-opts", &opts]);
    for c in cmds {
        args.extend(["-c", c]);
    }
    tool("qemu-io", &args)
}

/// A client that does not start TLS, speaking the negotiation by hand: it asks for the list
/// of exports and for an export, and must get neither.
fn plaintext_client_gets_nothing(port: u16, export: &str) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], &proto::NBDMAGIC.to_be_bytes());
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut option = |o: u32, data: &[u8]| -> (u32, Vec<u8>) {
        let mut m = proto::IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&o.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        s.write_all(&m).unwrap();
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).unwrap();
        (kind, d)
    };
    let (kind, _) = option(opt::LIST, &[]);
    assert_eq!(kind, rep::ERR_TLS_REQD, "LIST without TLS");
    let mut go = (export.len() as u32).to_be_bytes().to_vec();
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    let (kind, _) = option(opt::GO, &go);
    assert_eq!(kind, rep::ERR_TLS_REQD, "GO without TLS");
    // EXPORT_NAME cannot be refused but by hanging up: the client gets no export.
    let mut m = proto::IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt::EXPORT_NAME.to_be_bytes());
    m.extend_from_slice(&(export.len() as u32).to_be_bytes());
    m.extend_from_slice(export.as_bytes());
    s.write_all(&m).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{} bytes after EXPORT_NAME", rest.len());
}

#[test]
fn nbd_over_tls_serves_qemu_with_a_client_certificate_and_nothing_to_anyone_else() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let scratch = testbeds::scratch::Scratch::new(Path::new("/var/tmp"), "lv-nbd-pki").unwrap();
    let pki = Pki::new(scratch.path());
    let (cert, key, ca) = (
        pki.path("server-cert.pem"),
        pki.path("server-key.pem"),
        pki.path("ca-cert.pem"),
    );
    let bed = Bed::new(
        "lv-nbd-tls",
        &[
            "--nbd-listen",
            &listen,
            "--nbd-allow",
            "127.0.0.0/8",
            "--nbd-tls-cert",
            &cert,
            "--nbd-tls-key",
            &key,
            "--nbd-tls-client-ca",
            &ca,
            // Only these exports over TCP; the unix socket offers every volume.
            "--nbd-export",
            "p/shared",
        ],
    );
    bed.volume("shared", 16 << 20);
    bed.volume("private", 16 << 20);
    let good = pki.qemu_dir("good", &["ca"], Some("client"));
    // QEMU (GnuTLS) with the right CA and a client certificate: reads and writes.
    let (ok, out) = qemu_io_tls(
        port,
        "p/shared",
        Some(&good),
        &["write -P 0x7c 0 1M", "read -P 0x7c 0 1M"],
    );
    assert!(ok && out.contains("read 1048576/1048576"), "{out}");
    // What went over TLS is on the volume (read back over the unix socket).
    let (ok, out) = qemu_io(&bed.uri("p/shared"), &["read -P 0x7c 0 1M"]);
    assert!(ok, "{out}");
    // Without TLS: neither the list nor an export.
    let (ok, out) = qemu_io_tls(port, "p/shared", None, &["read 0 4k"]);
    assert!(!ok, "{out}");
    eprintln!("refused as it should be: {}", out.trim());
    plaintext_client_gets_nothing(port, "p/shared");
    // A client that does not trust our CA stops at the server's certificate.
    let wrong_ca = pki.qemu_dir("wrong-ca", &["foreign-ca"], None);
    let (ok, out) = qemu_io_tls(port, "p/shared", Some(&wrong_ca), &["read 0 4k"]);
    assert!(!ok, "{out}");
    eprintln!("refused as it should be: {}", out.trim());
    // Client certificates are required: none, or one from another CA, gets nothing.
    let no_cert = pki.qemu_dir("no-cert", &["ca"], None);
    let (ok, out) = qemu_io_tls(port, "p/shared", Some(&no_cert), &["read 0 4k"]);
    assert!(!ok, "{out}");
    eprintln!("refused as it should be: {}", out.trim());
    // (The intruder trusts both CAs, so that QEMU accepts its own certificate and our
    // server's: it is our server that says no.)
    let intruder = pki.qemu_dir("intruder", &["ca", "foreign-ca"], Some("intruder"));
    let (ok, out) = qemu_io_tls(port, "p/shared", Some(&intruder), &["read 0 4k"]);
    assert!(!ok, "{out}");
    eprintln!("refused as it should be: {}", out.trim());
    // Per-export access: the private volume is not offered over TCP, even over TLS, nor
    // listed; it is on the unix socket.
    let (ok, out) = qemu_io_tls(port, "p/private", Some(&good), &["read 0 4k"]);
    assert!(!ok, "{out}");
    eprintln!("refused as it should be: {}", out.trim());
    let object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={good}");
    let (ok, out) = tool(
        "qemu-nbd",
        &[
            "--list",
            "--object",
            &object,
            "--tls-creds",
            "tls0",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("p/shared") && !out.contains("p/private"),
        "{out}"
    );
    let (ok, out) = qemu_io(&bed.uri("p/private"), &["read 0 4k"]);
    assert!(ok, "{out}");
    // The listener still serves the right client after all that.
    let (ok, out) = qemu_io_tls(port, "p/shared", Some(&good), &["read -P 0x7c 0 64k"]);
    assert!(ok, "{out}");
}

#[test]
fn a_tls_listener_refuses_to_start_without_its_key_or_with_a_bad_certificate() {
    let scratch = testbeds::scratch::Scratch::new(Path::new("/var/tmp"), "lv-nbd-badtls").unwrap();
    let garbage = scratch.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    for flags in [
        vec!["--nbd-tls-cert", garbage.to_str().unwrap()],
        vec![
            "--nbd-tls-cert",
            garbage.to_str().unwrap(),
            "--nbd-tls-key",
            garbage.to_str().unwrap(),
        ],
    ] {
        let mut args = vec![
            "--run-dir".to_string(),
            scratch.join("run").display().to_string(),
            "--state-dir".into(),
            scratch.join("state").display().to_string(),
            "--nbd-listen".into(),
            "127.0.0.1:0".into(),
            "--nbd-allow".into(),
            "127.0.0.0/8".into(),
        ];
        args.extend(flags.iter().map(|s| s.to_string()));
        let out =
            std::process::Command::new(testbeds::daemon::workspace_binary("vblockd").unwrap())
                .args(&args)
                .output()
                .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {flags:?}");
        assert!(err.contains("TLS"), "{err}");
    }
}

#[test]
fn idle_clients_hold_no_threads_and_are_served_as_soon_as_they_speak() {
    let bed = Bed::new("lv-nbd-idle", &["--nbd-idle-after", "1"]);
    bed.volume("v", 16 << 20);
    let pid = bed.daemon.pid().unwrap();
    let threads0 = threads(pid);
    let (ok, out) = qemu_io(&bed.uri("v"), &["write -P 0x3c 0 64k"]);
    assert!(ok, "{out}");
    testbeds::wait::until(
        "the writer's connection to end",
        Duration::from_secs(60),
        || threads(pid) <= threads0,
    )
    .unwrap();
    let fds0 = open_fds(pid);
    // 40 clients choose the export and read once (three threads each while they work)...
    let read = |c: &mut Raw, cookie: u64| {
        c.request(proto::cmd::READ, 4096, 4096, cookie);
        assert_eq!(c.reply(), Some((0, cookie)));
        let mut data = vec![0u8; 4096];
        c.s.read_exact(&mut data).unwrap();
        assert!(data.iter().all(|&b| b == 0x3c));
    };
    let mut clients: Vec<Raw> = (0..40)
        .map(|i| {
            let mut c = Raw::connect(&bed.nbd_socket());
            c.s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            assert_eq!(c.go("p/v"), rep::ACK);
            read(&mut c, i);
            c
        })
        .collect();
    // ...then say nothing: their threads go, their connections stay.
    testbeds::wait::until(
        "idle connections to give their threads back",
        Duration::from_secs(60),
        || threads(pid) <= threads0,
    )
    .unwrap();
    assert!(open_fds(pid) >= fds0 + 40, "connections closed");
    // Each is served again the moment it speaks (a write, and a read of it).
    for (i, c) in clients.iter_mut().enumerate() {
        let at = (1 << 20) + 4096 * i as u64;
        let mut w = proto::Request {
            flags: 0,
            kind: proto::cmd::WRITE,
            cookie: 1000 + i as u64,
            offset: at,
            length: 4096,
        }
        .encode()
        .to_vec();
        w.extend_from_slice(&[i as u8; 4096]);
        c.s.write_all(&w).unwrap();
        assert_eq!(c.reply(), Some((0, 1000 + i as u64)));
        read(c, 2000 + i as u64);
    }
    testbeds::wait::until("idle again", Duration::from_secs(60), || {
        threads(pid) <= threads0
    })
    .unwrap();
    drop(clients);
    testbeds::wait::until("connections closed", Duration::from_secs(60), || {
        open_fds(pid) <= fds0
    })
    .unwrap();
    let (ok, out) = qemu_io(&bed.uri("v"), &["read -P 7 1077248 4k"]);
    assert!(ok, "{out}");
}
