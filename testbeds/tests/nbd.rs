//! vblockd's NBD exports against third-party clients only: qemu-io and qemu-img (libnbd-free
//! QEMU NBD client), fio's `nbd` engine (libnbd), and a raw socket for protocol violations.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use testbeds::scratch::Scratch;
use vblock::nbd::proto::{self, Request, cmd, errno, opt, rep};

#[path = "common/nbd_bed.rs"]
mod nbd_bed;
use nbd_bed::{Bed, Raw, qemu_io, qemu_io_format, tool};

#[test]
fn qemu_io_and_qemu_img_read_write_discard_zero_map_and_compare() {
    let bed = Bed::new("lv-nbd-qemu", &[]);
    bed.volume("v", 64 << 20);
    let uri = bed.uri("v");
    // Patterns written, read back; discard and write-zeroes read as zeros after.
    let (ok, out) = qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 8M 64k",
            "write -P 0xef 20M 4k",
            "read -P 0xab 0 1M",
            "read -P 0xcd 8M 64k",
            "discard 0 512k",
            "read -P 0 0 512k",
            "read -P 0xab 512k 512k",
            "write -z -u 8M 64k",
            "read -P 0 8M 64k",
            "flush",
        ],
    );
    assert!(
        ok && !out.contains("failed") && !out.contains("error"),
        "{out}"
    );
    // The pool saw it: the same bytes through vblockd's own API.
    let back = bed.api.read("p", "v", 20 << 20, 4096).unwrap();
    assert!(back.iter().all(|b| *b == 0xef));
    // Block status: data exactly where it was written and not discarded; holes elsewhere.
    let (ok, map) = tool("qemu-img", &["map", "-f", "raw", "--output=json", &uri]);
    assert!(ok, "{map}");
    let extents: serde_json::Value = serde_json::from_str(&map).unwrap();
    let data: Vec<(u64, u64)> = extents
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        data,
        vec![(512 << 10, 512 << 10), (20 << 20, 4096)],
        "{map}"
    );
    // A qcow2 made by qemu-img goes in through NBD and comes back out equal.
    let src = bed.dir.join("src.qcow2");
    let src_s = src.display().to_string();
    assert!(tool("qemu-img", &["create", "-f", "qcow2", &src_s, "32M"]).0);
    let (ok, out) = qemu_io_format(
        "qcow2",
        &src_s,
        &[
            "write -P 0x5a 1M 3M",
            "write -P 0xa5 17M 64k",
            "write -P 0x33 31M 1M",
        ],
    );
    assert!(ok, "{out}");
    bed.volume("img", 32 << 20);
    let img = bed.uri("img");
    let (ok, out) = tool(
        "qemu-img",
        &["convert", "-n", "-f", "qcow2", "-O", "raw", &src_s, &img],
    );
    assert!(ok, "{out}");
    let (ok, out) = tool(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", &src_s, &img],
    );
    assert!(ok && out.contains("identical"), "{out}");
    // Thin: only what the image holds was allocated (skipped holes stay holes).
    let info = bed.api.volume("p", "img").unwrap();
    assert!(info.allocated <= (5 << 20) + (64 << 10), "{info:?}");
    let back = bed.dir.join("back.qcow2");
    let back_s = back.display().to_string();
    let (ok, out) = tool(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &img, &back_s],
    );
    assert!(ok, "{out}");
    let (ok, out) = tool("qemu-img", &["compare", &src_s, &back_s]);
    assert!(ok && out.contains("identical"), "{out}");
    // The sparse export stays sparse: qemu-img skipped the holes block status reported.
    let (ok, out) = tool("qemu-img", &["map", "--output=json", &back_s]);
    assert!(ok, "{out}");
    let allocated: u64 = serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(allocated <= (5 << 20) + (64 << 10), "{out}");
}

#[test]
fn fio_verifies_crc32c_over_several_connections() {
    let bed = Bed::new("lv-nbd-fio", &[]);
    bed.volume("f", 128 << 20);
    let uri = bed.uri("f");
    // Four jobs, each its own NBD connection (multi-conn) on its own 32 MiB, random 4-64 KiB
    // writes at depth 8, each block checked after writing.
    let (ok, out) = tool(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=8",
            "--numjobs=4",
            "--size=32M",
            "--offset_increment=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--group_reporting",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("err= 0"), "{out}");
}

#[test]
fn snapshots_are_read_only_and_tcp_needs_the_allow_list() {
    let port = 20000 + (std::process::id() % 20000) as u16;
    let listen = format!("127.0.0.1:{port}");
    let bed = Bed::new(
        "lv-nbd-ro",
        &["--nbd-listen", &listen, "--nbd-allow", "127.0.0.0/8"],
    );
    bed.volume("v", 16 << 20);
    let (ok, out) = qemu_io(&bed.uri("v"), &["write -P 0x42 0 64k"]);
    assert!(ok, "{out}");
    bed.api.snapshot("p", "v", "v@1").unwrap();
    // The snapshot is advertised read-only (qemu-io cannot open it for writing), reads,
    // and refuses a write anyway sent with EPERM.
    let snap = bed.uri("v@1");
    let (ok, out) = tool("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &snap]);
    assert!(!ok && out.contains("Permission denied"), "{out}");
    let (ok, out) = tool(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x42 0 64k", &snap],
    );
    assert!(ok && out.contains("read 65536/65536"), "{out}");
    let mut raw = Raw::connect(&bed.nbd_socket());
    assert_eq!(raw.go("p/v@1"), rep::ACK);
    let mut w = Request {
        flags: 0,
        kind: cmd::WRITE,
        cookie: 7,
        offset: 0,
        length: 4096,
    }
    .encode()
    .to_vec();
    w.extend_from_slice(&[1u8; 4096]);
    raw.s.write_all(&w).unwrap();
    assert_eq!(raw.reply(), Some((errno::EPERM, 7)));
    raw.request(cmd::TRIM, 0, 4096, 8);
    assert_eq!(raw.reply(), Some((errno::EPERM, 8)));
    let back = bed.api.read("p", "v@1", 0, 4096).unwrap();
    assert!(back.iter().all(|b| *b == 0x42), "the snapshot is unchanged");
    // Over TCP from an allowed address.
    let tcp = format!("nbd://{listen}/v");
    let (ok, out) = qemu_io(&tcp, &["read -P 0x42 0 64k"]);
    assert!(ok && out.contains("read 65536/65536"), "{out}");
    // NBD_OPT_LIST names every volume as POOL/NAME.
    let (ok, out) = tool(
        "qemu-nbd",
        &["--list", "-k", &bed.nbd_socket().display().to_string()],
    );
    if ok {
        assert!(out.contains("p/v@1") && out.contains("p/v"), "{out}");
    }
    drop(bed);
    // A listener whose allow-list excludes the client: the connection is closed at once.
    let bed = Bed::new(
        "lv-nbd-deny",
        &["--nbd-listen", &listen, "--nbd-allow", "10.0.0.0/8"],
    );
    bed.volume("v", 16 << 20);
    let (ok, out) = qemu_io(&tcp, &["read 0 4k"]);
    assert!(!ok, "{out}");
}

#[test]
fn protocol_violations_get_errors_or_a_closed_connection_and_others_keep_working() {
    let bed = Bed::new("lv-nbd-raw", &[]);
    bed.volume("v", 16 << 20);
    let sock = bed.nbd_socket();
    // A well-behaved client stays connected through all of this.
    let mut good = Raw::connect(&sock);
    assert_eq!(good.go("v"), rep::ACK);
    // Options: unknown → UNSUP; garbage INFO → INVALID; unknown export → UNKNOWN; oversize
    // option data → TOO_BIG, after which negotiation goes on.
    let mut r = Raw::connect(&sock);
    r.option(99, b"");
    assert_eq!(r.option_reply().0, rep::ERR_UNSUP);
    r.option(opt::INFO, &[0, 0, 0, 50, b'x']);
    assert_eq!(r.option_reply().0, rep::ERR_INVALID);
    assert_eq!(r.go("nosuch"), rep::ERR_UNKNOWN);
    r.option(opt::LIST, &vec![0u8; 100_000]);
    assert_eq!(r.option_reply().0, rep::ERR_TOO_BIG);
    r.option(opt::SET_META_CONTEXT, &[0, 0, 0, 1, b'v', 0, 0, 0, 0]);
    assert_eq!(
        r.option_reply().0,
        rep::ERR_INVALID,
        "needs structured replies"
    );
    assert_eq!(r.go("v"), rep::ACK);
    // Requests: out of range, unaligned, oversize, unknown command, block status without
    // the context: each its error, the connection goes on.
    r.request(cmd::READ, 16 << 20, 4096, 1);
    assert_eq!(r.reply(), Some((errno::EINVAL, 1)));
    r.request(cmd::READ, 100, 4096, 2);
    assert_eq!(r.reply(), Some((errno::EINVAL, 2)));
    r.request(cmd::READ, 0, 1 << 30, 3);
    assert_eq!(r.reply(), Some((errno::EOVERFLOW, 3)));
    r.request(77, 0, 0, 4);
    assert_eq!(r.reply(), Some((errno::EINVAL, 4)));
    r.request(cmd::BLOCK_STATUS, 0, 4096, 5);
    assert_eq!(r.reply(), Some((errno::EINVAL, 5)));
    r.request(cmd::TRIM, u64::MAX - 10, 4096, 6);
    assert_eq!(r.reply(), Some((errno::ENOSPC, 6)));
    // Several requests in flight, answered by cookie.
    for c in 10..20 {
        r.request(cmd::READ, c * 4096, 4096, c);
    }
    let mut seen = Vec::new();
    for _ in 10..20 {
        let (e, c) = r.reply().unwrap();
        assert_eq!(e, 0);
        let mut data = vec![0u8; 4096];
        r.s.read_exact(&mut data).unwrap();
        seen.push(c);
    }
    seen.sort();
    assert_eq!(seen, (10..20).collect::<Vec<_>>());
    // A write that announces more than the server takes: an error, then the hang-up.
    r.request(cmd::WRITE, 0, u32::MAX, 30);
    assert_eq!(r.reply(), Some((errno::EOVERFLOW, 30)));
    assert!(r.closed());
    // Garbage instead of a request: hung up.
    let mut g = Raw::connect(&sock);
    assert_eq!(g.go("v"), rep::ACK);
    g.s.write_all(&[0x55; 28]).unwrap();
    assert!(g.closed());
    // A client that vanishes mid-write (header and half the payload).
    let mut v = Raw::connect(&sock);
    assert_eq!(v.go("v"), rep::ACK);
    v.request(cmd::WRITE, 0, 65536, 40);
    v.s.write_all(&[1u8; 30000]).unwrap();
    drop(v);
    // A client that never negotiates.
    let idle = UnixStream::connect(&sock).unwrap();
    drop(idle);
    // The first client still works, reads and writes.
    good.request(cmd::FLUSH, 0, 0, 50);
    assert_eq!(good.reply(), Some((0, 50)));
    let mut w = Request {
        flags: proto::cflag::FUA,
        kind: cmd::WRITE,
        cookie: 51,
        offset: 8192,
        length: 4096,
    }
    .encode()
    .to_vec();
    w.extend_from_slice(&[0x99; 4096]);
    good.s.write_all(&w).unwrap();
    assert_eq!(good.reply(), Some((0, 51)));
    let back = bed.api.read("p", "v", 8192, 4096).unwrap();
    assert!(back.iter().all(|b| *b == 0x99));
    // The half-written block never landed.
    let first = bed.api.read("p", "v", 0, 4096).unwrap();
    assert!(first.iter().all(|b| *b == 0), "a torn request wrote data");
}

#[test]
fn a_connection_is_bound_to_its_volume_and_deleting_a_used_one_needs_force() {
    // In-process: the volume goes past the daemon's checks (as a race would) and a new one
    // takes its name; the old connection reaches nothing.
    use std::sync::Arc;
    use vblock::nbd::{NbdServer, PoolExports};
    let pool = Arc::new(
        vblock::Pool::create(
            vblock::device::MemDevice::new(64 << 20),
            vblock::PoolOptions::default(),
        )
        .unwrap(),
    );
    pool.create_volume("v", 1 << 20).unwrap();
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-nbd-identity").unwrap();
    let server =
        NbdServer::start_unix(&dir.join("nbd.sock"), Arc::new(PoolExports(pool.clone()))).unwrap();
    let mut r = Raw::connect(server.socket().unwrap());
    assert_eq!(r.go("v"), rep::ACK);
    pool.delete("v").unwrap();
    pool.create_volume("v", 1 << 20).unwrap();
    r.request(cmd::WRITE, 0, 4096, 7);
    r.s.write_all(&[0x77; 4096]).unwrap();
    let (error, cookie) = r.reply().unwrap();
    assert_eq!(cookie, 7);
    assert_ne!(error, 0, "a write into a deleted volume succeeded");
    let mut data = vec![0xffu8; 4096];
    pool.read("v", 0, &mut data).unwrap();
    assert!(
        data.iter().all(|b| *b == 0),
        "the new volume got the old client's data"
    );
    drop(server);

    // Through vblockd: deleting a volume with a client is refused, naming it; forced, the
    // client is disconnected first.
    if let Some(why) = testbeds::netns::missing_privileges() {
        panic!("needs root: {why}");
    }
    let bed = Bed::new("lv-nbd-delete", &[]);
    bed.volume("w", 1 << 20);
    let mut r = Raw::connect(&bed.nbd_socket());
    assert_eq!(r.go("w"), rep::ACK);
    let refused = bed.api.delete_volume("p", "w").unwrap_err().to_string();
    assert!(
        refused.contains("conflict")
            && refused.contains("NBD clients")
            && refused.contains(&format!("pid {}", std::process::id())),
        "{refused}"
    );
    assert!(
        bed.api.volume("p", "w").is_ok(),
        "the refused delete left it"
    );
    bed.api.delete_volume_force("p", "w").unwrap();
    assert!(r.closed(), "the forced delete ended the connection");
    assert!(bed.api.volume("p", "w").is_err());
    // An exported volume likewise: refused, then forced (the export stops).
    bed.volume("x", 1 << 20);
    bed.api.export_vhost("p", "x", 1).unwrap();
    let refused = bed.api.delete_volume("p", "x").unwrap_err().to_string();
    assert!(refused.contains("vhost-user-blk export"), "{refused}");
    bed.api.delete_volume_force("p", "x").unwrap();
    assert!(bed.api.vhost_exports().unwrap().is_empty());
    assert!(!bed.dir.join("run/vhost/x.sock").exists());
}
