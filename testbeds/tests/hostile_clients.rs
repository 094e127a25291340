//! Clients that connect and say nothing cannot stall a daemon's control API: connections are
//! bounded, silent ones are closed after a timeout, and a normal client is served meanwhile.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use testbeds::process::{open_fds, rss_kib};
use testbeds::scratch::Scratch;

#[test]
fn silent_api_connections_are_bounded_and_closed_and_a_normal_client_is_served() {
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-silent").unwrap();
    let socket = dir.join("run/vblockd.sock");
    // A bound of 16 (`--api-max-connections`; 64 by default), and three times as many
    // connections that send nothing.
    let most = 16;
    let d = testbeds::daemon::start_vblockd(dir.path(), &["--api-max-connections", "16"]).unwrap();
    let pid = d.pid().unwrap();
    let baseline = open_fds(pid);
    let rss0 = rss_kib(pid);
    let mut silent: Vec<UnixStream> = (0..3 * most)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    testbeds::wait::until(
        "the daemon to take connections",
        testbeds::wait::SOON,
        || open_fds(pid) > baseline,
    )
    .unwrap();
    assert!(
        open_fds(pid) <= baseline + most + 8,
        "{} descriptors open (baseline {baseline})",
        open_fds(pid)
    );
    // A normal client is served while they hang on (silent ones are closed after their
    // timeout, 16 at a time, and the queue moves).
    let started = Instant::now();
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    s.write_all(b"GET /v1/pools HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    eprintln!(
        "served after {:.1} s behind {} silent connections",
        started.elapsed().as_secs_f64(),
        silent.len()
    );
    // Every silent connection is closed by the daemon in the end, and its descriptors with it.
    for c in &mut silent {
        c.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).unwrap_or(0), 0);
    }
    drop(silent);
    testbeds::wait::until(
        "descriptors back to the baseline",
        Duration::from_secs(60),
        || open_fds(pid) <= baseline + 2,
    )
    .unwrap();
    // Memory is back too (it grew by tens of MB and stayed when every connection was held).
    let rss = rss_kib(pid);
    eprintln!("RSS {rss0} KiB before, {rss} KiB after");
    assert!(
        rss <= rss0 + 8 * 1024,
        "RSS {rss0} KiB before, {rss} KiB after"
    );
}
