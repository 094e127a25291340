//! vblockd as a real process, driven through its API and through vctl, with qemu-img and
//! qemu-io as third-party peers for the images: pools and thin volumes, raw import/export
//! with qcow2 round trips, snapshots and clones, limits, errors, metrics, restart after
//! kill -9 under a write workload, and clean shutdown.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use libvirtual::block::Client;
use testbeds::blk_client::BlkClient;
use testbeds::daemon::{Daemon, workspace_binary};

struct Bed {
    dir: PathBuf,
}

impl Bed {
    fn new() -> Bed {
        let dir = std::env::temp_dir().join(format!("lv-vblockd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Bed { dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run/vblockd.sock")
    }

    fn start(&self) -> Daemon {
        let args: Vec<String> = [
            "--run-dir",
            &self.dir.join("run").display().to_string(),
            "--state-dir",
            &self.dir.join("state").display().to_string(),
            "--log-format",
            "json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Daemon::start_local(&workspace_binary("vblockd").unwrap(), &args, self.socket()).unwrap()
    }

    fn vctl(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(workspace_binary("vctl").unwrap())
            .args(args)
            .args(["--socket", &self.socket().display().to_string()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), text)
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, text) = self.vctl(args);
        assert_eq!(code, 0, "vctl {args:?}: {text}");
        text
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn pools_volumes_images_snapshots_and_restarts() {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        panic!("qemu-img is missing: scripts/install-deps installs qemu-utils");
    }
    let bed = Bed::new();
    let mut d = bed.start();
    let pool_file = bed.dir.join("default.pool");
    bed.ok(&[
        "pool",
        "create",
        "default",
        &path(&pool_file),
        "--size",
        "256M",
    ]);
    let (code, text) = bed.vctl(&[
        "pool",
        "create",
        "again",
        &path(&pool_file),
        "--size",
        "256M",
    ]);
    assert_eq!(code, 1, "{text}");

    // A qcow2 with data in two places, made and filled by qemu's own tools.
    let src = bed.dir.join("src.qcow2");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &path(&src), "64M"],
    );
    tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 32M 4M",
            &path(&src),
        ],
    );
    let raw = bed.dir.join("src.raw");
    tool(
        "qemu-img",
        &["convert", "-O", "raw", &path(&src), &path(&raw)],
    );
    bed.ok(&["volume", "import", "disk", &path(&raw)]);
    let c = Client::new(bed.socket());
    let v = c.volume("default", "disk").unwrap();
    assert_eq!(v.size, 64 << 20);
    assert_eq!(v.allocated, 5 << 20, "import kept the volume thin");

    // Snapshot, export it, back to qcow2: qemu-img compares it equal to the source.
    bed.ok(&["snapshot", "create", "disk", "snap1"]);
    c.write("default", "disk", 0, &vec![0x11u8; 65536]).unwrap();
    assert!(bed.ok(&["pool", "flush", "default"]).contains("committed"));
    // Zeroing releases space: a volume written in its first 2 MiB, half of it zeroed.
    bed.ok(&["volume", "create", "wipe", "--size", "4M"]);
    c.write("default", "wipe", 0, &vec![0x5au8; 2 << 20])
        .unwrap();
    bed.ok(&["volume", "zero", "wipe", "--offset", "1M", "--length", "1M"]);
    let wiped = c.volume("default", "wipe").unwrap();
    assert_eq!(wiped.allocated, 1 << 20, "{wiped:?}");
    assert_eq!(
        c.read("default", "wipe", 1 << 20, 4096).unwrap(),
        vec![0u8; 4096]
    );
    assert_eq!(
        c.read("default", "wipe", 0, 4096).unwrap(),
        vec![0x5au8; 4096]
    );
    bed.ok(&["volume", "delete", "wipe"]);
    let metrics = bed.ok(&["pool", "metrics"]);
    assert!(
        metrics.contains("vblock_volume_allocated_bytes{pool=\"default\",volume=\"disk\"}"),
        "{metrics}"
    );
    let out = bed.dir.join("out.raw");
    bed.ok(&["volume", "export", "snap1", &path(&out)]);
    let outq = bed.dir.join("out.qcow2");
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &path(&out),
            &path(&outq),
        ],
    );
    tool("qemu-img", &["compare", "-q", &path(&src), &path(&outq)]);
    // The volume moved on; the snapshot did not.
    let (code, _) = bed.vctl(&["volume", "export", "disk", &path(&out)]);
    assert_eq!(code, 0);
    let status = Command::new("qemu-img")
        .args(["compare", "-q", &path(&src), &path(&out)])
        .status()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "the volume differs from the snapshot now"
    );

    // A clone of the snapshot is writable and independent.
    bed.ok(&["clone", "create", "snap1", "c1"]);
    c.write("default", "c1", 32 << 20, &vec![0x22u8; 4096])
        .unwrap();
    assert!(c.read("default", "snap1", 32 << 20, 4096).unwrap() == vec![0xcdu8; 4096]);
    assert!(c.read("default", "c1", 32 << 20, 4096).unwrap() == vec![0x22u8; 4096]);
    let (code, text) = bed.vctl(&["volume", "import", "snap1", &path(&raw)]);
    assert_eq!(code, 1, "snapshots refuse writes: {text}");
    // Importing over an existing volume replaces all of it, zeros included.
    c.write("default", "c1", 16 << 20, &vec![0x33u8; 8192])
        .unwrap();
    bed.ok(&["volume", "import", "c1", &path(&raw)]);
    assert!(c.read("default", "c1", 16 << 20, 8192).unwrap() == vec![0u8; 8192]);
    assert!(c.read("default", "c1", 32 << 20, 4096).unwrap() == vec![0xcdu8; 4096]);
    c.write("default", "c1", 32 << 20, &vec![0x22u8; 4096])
        .unwrap();
    c.flush("default").unwrap();
    // Clones and snapshots have list, show and delete like volumes; each refuses the other
    // kind.
    bed.ok(&["clone", "create", "snap1", "c2"]);
    let clones = bed.ok(&["clone", "list"]);
    assert!(clones.contains("c1") && clones.contains("c2"), "{clones}");
    assert!(!clones.contains("disk "), "{clones}");
    assert!(bed.ok(&["clone", "show", "c2"]).contains("snap1"));
    assert!(bed.ok(&["snapshot", "show", "snap1"]).contains("snapshot"));
    let (code, text) = bed.vctl(&["clone", "show", "disk"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("not a clone"), "{text}");
    let (code, text) = bed.vctl(&["snapshot", "show", "c2"]);
    assert_eq!(code, 1, "{text}");
    let (code, _) = bed.vctl(&["clone", "delete", "snap1"]);
    assert_eq!(code, 1, "a snapshot is not deleted as a clone");
    bed.ok(&["clone", "delete", "c2"]);
    assert!(!bed.ok(&["clone", "list"]).contains("c2"));

    // Limits, listed; JSON output for scripts.
    bed.ok(&["volume", "limit", "disk", "--iops", "5000", "--bps", "100M"]);
    let json: serde_json::Value =
        serde_json::from_str(&bed.ok(&["volume", "list", "-o", "json"])).unwrap();
    let disk = json
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "disk")
        .unwrap();
    assert_eq!(disk["qos"]["iops"], 5000);
    assert_eq!(disk["qos"]["bps"], 100 << 20);

    // Bad requests get clear errors and the daemon keeps serving.
    let (s, body) = d
        .request("POST", "/v1/pools/default/volumes", Some("{not json"))
        .unwrap();
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("\"code\":\"invalid\""), "{body}");
    let (s, body) = d
        .request(
            "POST",
            "/v1/pools/default/volumes",
            Some(r#"{"name":"odd","size":1000}"#),
        )
        .unwrap();
    assert_eq!(s, 400, "{body}");
    let (s, _) = d.request("GET", "/v1/pools/nope/volumes", None).unwrap();
    assert_eq!(s, 404);
    let (s, _) = d
        .request(
            "GET",
            "/v1/pools/default/volumes/disk/data?offset=100&length=512",
            None,
        )
        .unwrap();
    assert_eq!(s, 400);
    let (s, body) = d
        .request(
            "POST",
            "/v1/pools/default/volumes",
            Some(r#"{"name":"huge","size":1099511627776}"#),
        )
        .unwrap();
    assert_eq!(s, 201, "thin volumes may exceed the pool: {body}");
    let (code, text) = bed.vctl(&["volume", "show", "missing"]);
    assert_eq!(code, 1, "{text}");
    let (s, body) = d.request("GET", "/metrics", None).unwrap();
    assert_eq!(s, 200);
    assert!(
        body.contains(r#"vblock_volume_allocated_bytes{pool="default",volume="disk"}"#),
        "{body}"
    );
    let check: serde_json::Value =
        serde_json::from_str(&bed.ok(&["pool", "check", "default", "-o", "json"])).unwrap();
    assert_eq!(check["clean"], true, "{check}");

    // Moving a volume to another pool by files: a full diff stream of snap1, then only what
    // changed until snap2.
    c.write_zeroes("default", "disk", 32 << 20, 1 << 20)
        .unwrap();
    bed.ok(&["snapshot", "create", "disk", "snap2"]);
    let remote_file = bed.dir.join("remote.pool");
    bed.ok(&[
        "pool",
        "create",
        "remote",
        &path(&remote_file),
        "--size",
        "128M",
    ]);
    let full = bed.dir.join("full.diff");
    let inc = bed.dir.join("inc.diff");
    bed.ok(&["snapshot", "diff-export", "snap1", &path(&full)]);
    bed.ok(&[
        "snapshot",
        "--pool",
        "remote",
        "diff-import",
        "disk",
        &path(&full),
    ]);
    bed.ok(&[
        "snapshot",
        "diff-export",
        "--from",
        "snap1",
        "snap2",
        &path(&inc),
    ]);
    let (full_len, inc_len) = (
        std::fs::metadata(&full).unwrap().len(),
        std::fs::metadata(&inc).unwrap().len(),
    );
    assert!(
        full_len > 5 << 20 && inc_len < 100 << 10,
        "full {full_len}, incremental {inc_len}"
    );
    // A damaged stream is refused before anything is written.
    let mut bad = std::fs::read(&inc).unwrap();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    let bad_file = bed.dir.join("bad.diff");
    std::fs::write(&bad_file, &bad).unwrap();
    let (code, text) = bed.vctl(&[
        "snapshot",
        "--pool",
        "remote",
        "diff-import",
        "disk",
        &path(&bad_file),
    ]);
    assert_eq!(code, 1, "{text}");
    bed.ok(&[
        "snapshot",
        "--pool",
        "remote",
        "diff-import",
        "disk",
        &path(&inc),
    ]);
    let (a, b) = (bed.dir.join("a.raw"), bed.dir.join("b.raw"));
    bed.ok(&["volume", "export", "snap2", &path(&a)]);
    bed.ok(&["volume", "--pool", "remote", "export", "disk", &path(&b)]);
    tool(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "raw",
            &path(&a),
            &path(&b),
        ],
    );

    // vhost-user-blk: the volume is exported for VMs; an exported volume cannot be deleted.
    bed.ok(&["vhost", "create", "disk", "--queues", "2"]);
    let vsock = bed.dir.join("run/vhost/disk.sock");
    {
        let mut blk = BlkClient::connect(&vsock, 2, false).unwrap();
        assert_eq!(blk.capacity().unwrap(), 64 << 20);
        assert_eq!(blk.read(1, 0, 0, 4096), 0);
        assert!(blk.mem()[..4096].iter().all(|b| *b == 0x11));
    }
    let (code, text) = bed.vctl(&["volume", "delete", "disk"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("vhost-user-blk export"), "{text}");

    // kill -9 under a write workload: what a flush acknowledged survives; the rest is old or
    // new, block by block.
    c.create_volume(
        "default",
        &vblock::api::VolumeSpec {
            name: "w".into(),
            size: 64 << 20,
        },
    )
    .unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (c, acked, stop) = (c.clone(), acked.clone(), stop.clone());
        std::thread::spawn(move || {
            for i in 0..1024u64 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                if c.write("default", "w", i * 65536, &vec![(i % 251) as u8 + 1; 65536])
                    .is_err()
                {
                    return;
                }
                if i % 4 == 3 {
                    if c.flush("default").is_err() {
                        return;
                    }
                    acked.store(i + 1, Ordering::SeqCst);
                }
            }
        })
    };
    testbeds::wait::until(
        "40 acknowledged flushes",
        std::time::Duration::from_secs(300),
        || acked.load(Ordering::SeqCst) >= 40 || writer.is_finished(),
    )
    .unwrap();
    assert!(
        acked.load(Ordering::SeqCst) >= 40,
        "the writer stopped after {} flushes",
        acked.load(Ordering::SeqCst)
    );
    d.kill9();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let acked = acked.load(Ordering::SeqCst);
    let d = bed.start();
    assert!(
        bed.ok(&["pool", "list"]).contains("default"),
        "the pool is served again"
    );
    for i in 0..1024u64 {
        let got = c.read("default", "w", i * 65536, 65536).unwrap();
        let want = vec![(i % 251) as u8 + 1; 65536];
        if i < acked {
            assert!(
                got == want,
                "chunk {i} was acknowledged by a flush but is not intact"
            );
        } else {
            assert!(
                got == want || got.iter().all(|b| *b == 0),
                "chunk {i} is neither old nor new"
            );
        }
    }
    // The export is back at the same socket path, so QEMU (reconnect=) re-attaches.
    assert!(bed.ok(&["vhost", "list"]).contains("disk.sock"));
    // A client stays connected through the SIGTERM below: the daemon must not wait for it.
    let mut blk = BlkClient::connect(&vsock, 2, false).unwrap();
    assert_eq!(blk.read(0, 0, 0, 4096), 0);
    assert!(blk.mem()[..4096].iter().all(|b| *b == 0x11));
    // Everything else survived the crash too.
    assert!(c.read("default", "c1", 32 << 20, 4096).unwrap() == vec![0x22u8; 4096]);
    let check = c.check("default", false).unwrap();
    assert!(check.clean, "{check:?}");

    // SIGTERM: a clean exit, and the pool opens again without a journal to replay.
    let mut d = d;
    assert!(d.terminate(), "vblockd exits cleanly on SIGTERM");
    drop(blk);
    assert!(!bed.socket().exists(), "the socket is removed");
    // The offline checker agrees, and refuses what is not a pool.
    let vblock = workspace_binary("vblock").unwrap();
    let out = Command::new(&vblock)
        .args(["check", &path(&pool_file)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("0 leaked"), "{text}");
    let out = Command::new(&vblock)
        .args(["check", &path(&raw)])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _d = bed.start();
    let back = bed.dir.join("back.raw");
    bed.ok(&["volume", "export", "snap1", &path(&back)]);
    tool(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "qcow2",
            &path(&back),
            &path(&src),
        ],
    );
}
