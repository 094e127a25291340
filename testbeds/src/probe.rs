//! Measurements between endpoints: `ping` runs and TCP transfers with a checksum.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::Error;
use crate::netns::Netns;

/// Result of a `ping` run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingResult {
    /// Echo requests sent.
    pub sent: u32,
    /// Replies received.
    pub received: u32,
    /// ICMP payload size (`-s`).
    pub payload: u16,
}

/// How long one echo request waits for its reply: generous, so that a loaded machine (or a
/// TCG guest) answering late is not counted as a loss.
pub const PING_REPLY_WAIT: Duration = Duration::from_secs(5);

/// Sends `count` echo requests with `payload` bytes (DF set) from `ns` to `to`, one after the
/// other, each waiting up to [`PING_REPLY_WAIT`] for its own reply (one `ping -c 1` each:
/// a `ping -c N` run gives the last reply only twice the round trip seen so far).
pub fn ping(ns: &Netns, to: IpAddr, count: u32, payload: u16) -> Result<PingResult, Error> {
    let mut received = 0;
    for _ in 0..count {
        let out = ns
            .command(
                "ping",
                &[
                    "-n",
                    "-q",
                    "-c",
                    "1",
                    "-W",
                    &PING_REPLY_WAIT.as_secs().to_string(),
                    "-M",
                    "do",
                    "-s",
                    &payload.to_string(),
                    &to.to_string(),
                ],
            )
            .output()
            .map_err(|e| Error::Io("ping".into(), e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "1 packets transmitted, 1 received, 0% packet loss, time 0ms"
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .ok_or_else(|| {
                Error::Setup(format!(
                    "unexpected ping output: {text}{}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            })?;
        let answered = line
            .split(',')
            .nth(1)
            .and_then(|part| part.split_whitespace().next())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0);
        received += answered.min(1);
    }
    Ok(PingResult {
        sent: count,
        received,
        payload,
    })
}

/// Deterministic pseudo-random bytes (xorshift), so a transfer is reproducible.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Result of a one-way TCP transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransferReport {
    /// Bytes sent.
    pub bytes: usize,
    /// CRC-32 of what was sent.
    pub sent_crc32: u32,
    /// CRC-32 of what arrived.
    pub received_crc32: u32,
    /// Bytes that arrived.
    pub received: usize,
    /// Wall time.
    pub elapsed: Duration,
}

impl TransferReport {
    /// Everything sent arrived, byte for byte (same length and CRC-32).
    pub fn intact(&self) -> bool {
        self.received == self.bytes && self.received_crc32 == self.sent_crc32
    }
}

/// Sends `bytes` of pattern data over TCP from `client` to a listener in `server` on
/// `addr:port`, and checks what arrived.
pub fn tcp_transfer(
    client: &Netns,
    server: &Netns,
    addr: IpAddr,
    port: u16,
    bytes: usize,
) -> Result<TransferReport, Error> {
    let io = |what: &'static str| move |e| Error::Io(what.into(), e);
    let listener = server.enter(move || TcpListener::bind((addr, port)).map_err(io("bind")))?;
    let receiver = std::thread::spawn(move || -> Result<(usize, u32), Error> {
        let (mut s, _) = listener.accept().map_err(io("accept"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io("timeout"))?;
        let mut got = Vec::with_capacity(bytes);
        s.read_to_end(&mut got).map_err(io("receive"))?;
        Ok((got.len(), crc32fast::hash(&got)))
    });
    let data = pattern(bytes);
    let sent_crc32 = crc32fast::hash(&data);
    let elapsed = client.enter(move || {
        let start = Instant::now();
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::new(addr, port), Duration::from_secs(20))
                .map_err(io("connect"))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))
            .map_err(io("timeout"))?;
        s.write_all(&data).map_err(io("send"))?;
        s.shutdown(Shutdown::Write).map_err(io("shutdown"))?;
        let mut rest = [0u8; 1];
        let _ = s.read(&mut rest);
        Ok(start.elapsed())
    })?;
    let (received, received_crc32) = receiver
        .join()
        .map_err(|_| Error::Setup("receiver thread panicked".into()))??;
    Ok(TransferReport {
        bytes,
        sent_crc32,
        received_crc32,
        received,
        elapsed,
    })
}

/// Sends `count` UDP datagrams of `size` bytes (each numbered, the rest a pattern) from
/// `client` to `addr:port` in `server`, paced a millisecond apart, and returns how many
/// arrived intact (right length and content, each number once). The receiver counts until
/// all arrived or nothing more came for 5 s after the last was sent.
pub fn udp_datagrams(
    client: &Netns,
    server: &Netns,
    addr: IpAddr,
    port: u16,
    count: u32,
    size: usize,
) -> Result<u32, Error> {
    use std::net::UdpSocket;
    let io = |what: &'static str| move |e| Error::Io(what.into(), e);
    let size = size.max(4);
    let datagram = move |i: u32| {
        let mut d = pattern(size);
        d[..4].copy_from_slice(&i.to_be_bytes());
        d
    };
    let rx = server.enter(move || UdpSocket::bind((addr, port)).map_err(io("bind")))?;
    rx.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(io("timeout"))?;
    let sent_at = std::sync::Arc::new(std::sync::Mutex::new(None::<Instant>));
    let done_sending = sent_at.clone();
    let counter = std::thread::spawn(move || {
        let mut seen = std::collections::HashSet::new();
        let mut buf = vec![0u8; 65536];
        while seen.len() < count as usize {
            match rx.recv(&mut buf) {
                Ok(n) if n >= 4 => {
                    let i = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                    if i < count && buf[..n] == datagram(i)[..] {
                        seen.insert(i);
                    }
                }
                _ => {
                    let finished = *done_sending.lock().unwrap_or_else(|p| p.into_inner());
                    if finished.is_some_and(|t: Instant| t.elapsed() > Duration::from_secs(5)) {
                        break;
                    }
                }
            }
        }
        seen.len() as u32
    });
    let sent = client.enter(move || {
        let tx = UdpSocket::bind((
            if addr.is_ipv4() {
                IpAddr::from([0u8; 4])
            } else {
                IpAddr::from([0u16; 8])
            },
            0,
        ))
        .map_err(io("bind"))?;
        tx.connect((addr, port)).map_err(io("connect"))?;
        for i in 0..count {
            tx.send(&datagram(i)).map_err(io("send"))?;
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    });
    *sent_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    sent?;
    counter
        .join()
        .map_err(|_| Error::Setup("counter thread panicked".into()))
}

/// The kernel's checksum error counters in a namespace (`/proc/net/snmp`): TCP and UDP
/// segments that arrived with a bad checksum.
pub fn checksum_errors(ns: &Netns) -> Result<(u64, u64), Error> {
    let snmp = ns.exec("cat", &["/proc/net/snmp"])?;
    let field = |proto: &str| -> Option<u64> {
        let mut lines = snmp
            .lines()
            .filter(|l| l.starts_with(&format!("{proto}: ")));
        let names = lines.next()?;
        let values = lines.next()?;
        let at = names.split_whitespace().position(|n| n == "InCsumErrors")?;
        values.split_whitespace().nth(at)?.parse().ok()
    };
    match (field("Tcp"), field("Udp")) {
        (Some(t), Some(u)) => Ok((t, u)),
        _ => Err(Error::Setup("no InCsumErrors in /proc/net/snmp".into())),
    }
}

/// Sends UDP datagrams of `size` bytes from `client` to `addr:port` in `server` at about
/// `offered_bps` for `duration`, and returns the bits per second that arrived (measured over
/// the time the sender actually took).
pub fn udp_rate(
    client: &Netns,
    server: &Netns,
    addr: IpAddr,
    port: u16,
    size: usize,
    offered_bps: u64,
    duration: Duration,
) -> Result<f64, Error> {
    use std::net::UdpSocket;
    let io = |what: &'static str| move |e| Error::Io(what.into(), e);
    let rx = server.enter(move || UdpSocket::bind((addr, port)).map_err(io("bind")))?;
    rx.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(io("timeout"))?;
    // The receiver counts until the sender is done and nothing more arrives (not until some
    // silence: a stall of the sender on a loaded machine must not end the count).
    let sending = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let still_sending = sending.clone();
    let counter = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut bytes = 0u64;
        loop {
            match rx.recv(&mut buf) {
                Ok(n) => bytes += n as u64,
                Err(_) if still_sending.load(std::sync::atomic::Ordering::Acquire) => {}
                Err(_) => break,
            }
        }
        bytes
    });
    let sent_for = client.enter(move || {
        let tx = UdpSocket::bind(("0.0.0.0", 0)).map_err(io("bind"))?;
        tx.connect((addr, port)).map_err(io("connect"))?;
        let payload = vec![0x5a; size];
        let start = Instant::now();
        let per_ms = (offered_bps / 8 / 1000 / size as u64).max(1);
        let mut sent_ms = 0u64;
        while start.elapsed() < duration {
            for _ in 0..per_ms {
                let _ = tx.send(&payload);
            }
            sent_ms += 1;
            let next = Duration::from_millis(sent_ms);
            if let Some(wait) = next.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(start.elapsed())
    });
    sending.store(false, std::sync::atomic::Ordering::Release);
    let sent_for = sent_for?;
    let bytes = counter
        .join()
        .map_err(|_| Error::Setup("counter thread panicked".into()))?;
    // UDP payload bytes -> frame bits: add IP (20) + UDP (8) + Ethernet (14) per datagram.
    let frames = bytes as f64 / size as f64;
    Ok((bytes as f64 + frames * 42.0) * 8.0 / sent_for.as_secs_f64())
}

/// An `iperf3` server in a namespace, started and listening; killed on drop.
pub struct Iperf3Server {
    child: std::process::Child,
}

impl Iperf3Server {
    /// Starts `iperf3 -s` (`-1`: one test) on `port` in `ns` and returns once it listens (its
    /// banner says so; at most 30 s).
    pub fn start(ns: &Netns, port: u16) -> Result<Iperf3Server, Error> {
        use std::io::BufRead;
        let mut child = ns
            .command(
                "iperf3",
                &["-s", "-1", "--forceflush", "-p", &port.to_string()],
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| Error::Io("iperf3 -s".into(), e))?;
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        // The reader goes on draining the output, so that the server never blocks on it.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.contains("Server listening")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        let mut server = Iperf3Server { child };
        match rx.recv_timeout(crate::wait::SOON) {
            Ok(()) => Ok(server),
            Err(_) => {
                let status = server.child.try_wait().ok().flatten();
                Err(Error::Setup(format!(
                    "iperf3 -s -p {port} did not listen within {} s (exit: {status:?})",
                    crate::wait::SOON.as_secs()
                )))
            }
        }
    }

    /// Waits for the server to end after its one test.
    pub fn wait(mut self) {
        let _ = self.child.wait();
    }
}

impl Drop for Iperf3Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
