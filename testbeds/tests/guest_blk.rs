//! QEMU guests (TCG) on vblock volumes through vhost-user-blk.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use testbeds::daemon::{Daemon, workspace_binary};
use testbeds::guest;
use testbeds::scratch::Scratch;
use vblock::uring::UringDevice;
use vblock::vhost_blk::{Export, ExportConfig};
use vblock::{Pool, PoolOptions};

#[test]
fn a_guest_writes_a_pattern_the_host_reads_back_and_discards_release_space() {
    if !guest::available() {
        panic!("QEMU is not installed: scripts/install-qemu installs it");
    }
    let image = guest::image().unwrap();
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-guest-blk").unwrap();
    let dev = UringDevice::create(&dir.join("pool"), 256 << 20).unwrap();
    let pool = Arc::new(Pool::create(dev, PoolOptions::default()).unwrap());
    pool.create_volume("vm", 64 << 20).unwrap();
    let sock = dir.join("vm.sock");
    let _export = Export::start(pool.clone(), "vm", &sock, ExportConfig { queues: 2 }).unwrap();
    let script = r#"
set -e
cat /sys/block/vda/size
cat /sys/block/vda/queue/logical_block_size /sys/block/vda/queue/physical_block_size
ls /sys/block/vda/mq | wc -l
i=0; while [ $i -lt 256 ]; do printf 'lv-pattern-%08d\n' $i; i=$((i+1)); done > /tmp/p
dd if=/tmp/p of=/dev/vda bs=4096 seek=256 conv=fsync 2>/dev/null
dd if=/dev/vda of=/tmp/back bs=4096 skip=256 count=$(( ($(wc -c < /tmp/p) + 4095) / 4096 )) 2>/dev/null
head -c $(wc -c < /tmp/p) /tmp/back | cmp - /tmp/p && echo READBACK-OK
cat /sys/block/vda/queue/discard_max_bytes /sys/block/vda/queue/write_zeroes_max_bytes
dd if=/dev/urandom of=/dev/vda bs=1M seek=16 count=8 conv=fsync 2>/dev/null
blkdiscard -o $((16<<20)) -l $((8<<20)) /dev/vda
dd if=/dev/vda bs=1M skip=16 count=1 2>/dev/null | tr -d '\0' | wc -c
"#;
    let run = guest::run(
        &image,
        &[(sock.clone(), 2)],
        script,
        &dir.join("vm1"),
        Duration::from_secs(300),
    )
    .unwrap();
    assert_eq!(run.status, Some(0), "{}", run.console);
    assert!(run.console.contains("READBACK-OK"), "{}", run.console);
    assert!(
        run.console.contains(&((64u64 << 20) / 512).to_string()),
        "{}",
        run.console
    );
    // The host sees what the guest wrote, at the same place.
    let mut expected = Vec::new();
    for i in 0..256 {
        expected.extend_from_slice(format!("lv-pattern-{i:08}\n").as_bytes());
    }
    let mut host = vec![0u8; expected.len().div_ceil(512) * 512];
    pool.read("vm", 256 * 4096, &mut host).unwrap();
    assert!(host[..expected.len()] == expected[..]);
    // 8 MiB written and discarded by the guest: their space is released (only the pattern's
    // 4 KiB blocks stay allocated), and they read as zeros.
    let allocated = pool.volume("vm").unwrap().allocated;
    assert!(
        allocated < 1 << 20,
        "allocated {allocated}: {}",
        run.console
    );
    assert!(
        run.console.lines().any(|l| l.trim() == "0"),
        "discarded data read as zeros: {}",
        run.console
    );
}

#[test]
fn ext4_made_in_a_guest_survives_a_reboot_and_a_clone_of_its_snapshot_boots_with_it() {
    if !guest::available() {
        panic!("QEMU is not installed: scripts/install-qemu installs it");
    }
    let image = guest::image().unwrap();
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-guest-ext4").unwrap();
    let dev = UringDevice::create(&dir.join("pool"), 512 << 20).unwrap();
    let pool = Arc::new(Pool::create(dev, PoolOptions::default()).unwrap());
    pool.create_volume("vm", 128 << 20).unwrap();
    let sock = dir.join("vm.sock");
    let export = Export::start(pool.clone(), "vm", &sock, ExportConfig::default()).unwrap();
    let make = r#"
set -e
mkfs.ext4 -q -F /dev/vda
mkdir -p /mnt && mount -t ext4 /dev/vda /mnt
i=0; while [ $i -lt 20 ]; do dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i+1)) 2>/dev/null; i=$((i+1)); done
cd /mnt && md5sum f* > sums && cd /
sync && umount /mnt && echo FS-MADE
"#;
    let run = guest::run(
        &image,
        &[(sock.clone(), 1)],
        make,
        &dir.join("run1"),
        Duration::from_secs(300),
    )
    .unwrap();
    assert_eq!(run.status, Some(0), "{}", run.console);
    let check = r#"
set -e
e2fsck -fn /dev/vda
mkdir -p /mnt && mount -t ext4 /dev/vda /mnt
cd /mnt && md5sum -c sums > /dev/null && echo FILES-INTACT
cd / && umount /mnt
"#;
    let run = guest::run(
        &image,
        &[(sock.clone(), 1)],
        check,
        &dir.join("run2"),
        Duration::from_secs(300),
    )
    .unwrap();
    assert_eq!(run.status, Some(0), "{}", run.console);
    assert!(run.console.contains("FILES-INTACT"), "{}", run.console);
    // A snapshot, a clone of it, and a VM on the clone: same files.
    drop(export);
    pool.snapshot("vm", "golden").unwrap();
    pool.clone_snapshot("golden", "vm2").unwrap();
    let sock2 = dir.join("vm2.sock");
    let _export2 = Export::start(pool.clone(), "vm2", &sock2, ExportConfig::default()).unwrap();
    let run = guest::run(
        &image,
        &[(sock2, 1)],
        check,
        &dir.join("run3"),
        Duration::from_secs(300),
    )
    .unwrap();
    assert_eq!(run.status, Some(0), "{}", run.console);
    assert!(run.console.contains("FILES-INTACT"), "{}", run.console);
    let info = pool.volume("vm2").unwrap();
    assert!(info.allocated > 0);
}

/// vblockd as a process: killed with SIGKILL in the middle of guest I/O and started again on
/// the same state.
struct Vblockd {
    dir: Scratch,
}

impl Vblockd {
    fn api(&self) -> std::path::PathBuf {
        self.dir.join("run/vblockd.sock")
    }

    fn start(&self) -> Daemon {
        let args: Vec<String> = ["--run-dir", "run", "--state-dir", "state"]
            .iter()
            .map(|a| match *a {
                "run" | "state" => self.dir.join(a).display().to_string(),
                a => a.to_owned(),
            })
            .collect();
        Daemon::start_local(&workspace_binary("vblockd").unwrap(), &args, self.api()).unwrap()
    }

    fn call(&self, d: &Daemon, method: &str, path: &str, body: &str) -> String {
        let (code, text) = d.request(method, path, Some(body)).unwrap();
        assert!((200..300).contains(&code), "{method} {path}: {code} {text}");
        text
    }
}

#[test]
fn a_guest_running_fio_verify_sees_no_error_when_vblockd_is_killed_and_restarted() {
    if !guest::available() {
        panic!("QEMU is not installed: scripts/install-qemu installs it");
    }
    let image = guest::image_with_fio().unwrap();
    let bed = Vblockd {
        dir: Scratch::new(Path::new("/var/tmp"), "lv-guest-crash").unwrap(),
    };
    let mut vblockd = bed.start();
    let pool_file = bed.dir.join("pool").display().to_string();
    bed.call(
        &vblockd,
        "POST",
        "/v1/pools",
        &format!(
            r#"{{"name":"p","path":"{pool_file}","size":{}}}"#,
            256u64 << 20
        ),
    );
    bed.call(
        &vblockd,
        "POST",
        "/v1/pools/p/volumes",
        &format!(r#"{{"name":"vm","size":{}}}"#, 96u64 << 20),
    );
    let sock = bed.dir.join("run/vhost/vm.sock");
    bed.call(
        &vblockd,
        "PUT",
        "/v1/pools/p/volumes/vm/vhost",
        r#"{"queues":2}"#,
    );
    // The region fio writes is allocated and flushed first: a kill -9 then loses nothing the
    // guest was told is written (a thin first write is durable at the guest's next flush, as
    // on a disk with a volatile cache).
    let script = r#"
set -e
dd if=/dev/zero of=/dev/vda bs=1M count=64 oflag=direct conv=fsync 2>/dev/null
echo FIO-START
fio --name=crash --filename=/dev/vda --size=64M --rw=randwrite --bs=4k --ioengine=libaio \
    --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --output-format=terse > /tmp/fio.out
echo "FIO-OK $(cut -d';' -f5 /tmp/fio.out) errors"
echo "WRITE-CLAT-MAX-US $(cut -d';' -f56 /tmp/fio.out)"
echo "DMESG-IO-ERRORS $(dmesg | grep -ci 'i/o error')"
"#;
    let mut guest = guest::Guest::boot(&image, &[(sock, 2)], script, &bed.dir.join("vm")).unwrap();
    guest
        .wait_for("FIO-START", Duration::from_secs(300))
        .unwrap();
    // Kill vblockd once fio is writing: its writes show in the volume's counters.
    let writes = || -> u64 {
        let v: vblock::api::VolumeInfo =
            serde_json::from_str(&bed.call(&vblockd, "GET", "/v1/pools/p/volumes/vm", "")).unwrap();
        v.io.writes
    };
    let before = writes();
    testbeds::wait::until("fio's writes", Duration::from_secs(300), || {
        writes() >= before + 200
    })
    .unwrap();
    vblockd.kill9();
    let vblockd = bed.start();
    let run = guest.finish(Duration::from_secs(600)).unwrap();
    assert_eq!(run.status, Some(0), "{}", run.console);
    assert!(run.console.contains("FIO-OK 0 errors"), "{}", run.console);
    let io_errors = run
        .console
        .lines()
        .find_map(|l| l.trim().strip_prefix("DMESG-IO-ERRORS "));
    assert_eq!(io_errors, Some("0"), "{}", run.console);
    // The daemon was down while writes were in flight: some waited out the restart.
    let clat_max: u64 = run
        .console
        .lines()
        .find_map(|l| l.trim().strip_prefix("WRITE-CLAT-MAX-US "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        clat_max > 300_000,
        "the crash missed the writes: {}",
        run.console
    );
    // The restarted daemon brought the export back by itself, and QEMU came back to it.
    let exports: Vec<vblock::api::VhostInfo> =
        serde_json::from_str(&bed.call(&vblockd, "GET", "/v1/vhost", "")).unwrap();
    assert_eq!(exports.len(), 1);
    assert!(exports[0].connections >= 1, "{exports:?}");
    eprintln!(
        "after the restart: {} connection(s), {} request(s) resubmitted from the inflight record",
        exports[0].connections, exports[0].resubmitted
    );
    drop(vblockd);
}

#[test]
fn a_snapshot_taken_while_the_guest_writes_is_a_consistent_point_a_clone_of_it_boots_on() {
    if !guest::available() {
        panic!("QEMU is not installed: scripts/install-qemu installs it");
    }
    let image = guest::image().unwrap();
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-guest-live").unwrap();
    let dev = UringDevice::create(&dir.join("pool"), 512 << 20).unwrap();
    let pool = Arc::new(Pool::create(dev, PoolOptions::default()).unwrap());
    pool.create_volume("vm", 128 << 20).unwrap();
    let sock = dir.join("vm.sock");
    let _export = Export::start(pool.clone(), "vm", &sock, ExportConfig::default()).unwrap();
    // File i is written, its checksum appended to `sums`, everything synced, then announced.
    let writer = r#"
set -e
mkfs.ext4 -q -F /dev/vda
mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && cd /mnt
i=1; while [ $i -le 60 ]; do
  dd if=/dev/urandom of=f$i bs=64k count=4 2>/dev/null
  md5sum f$i >> sums
  sync
  echo "SYNCED $i"
  i=$((i+1))
done
cd / && umount /mnt
"#;
    let mut guest = guest::Guest::boot(&image, &[(sock, 1)], writer, &dir.join("run1")).unwrap();
    guest
        .wait_for("SYNCED 10", Duration::from_secs(300))
        .unwrap();
    // Files announced before the snapshot must be in it, whole.
    let synced = guest
        .console()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("SYNCED "))
        .filter_map(|n| n.trim().parse::<u32>().ok())
        .max()
        .unwrap();
    pool.snapshot("vm", "live").unwrap();
    let run = guest.finish(Duration::from_secs(300)).unwrap();
    assert_eq!(run.status, Some(0), "{}", run.console);
    assert!(run.console.contains("SYNCED 60"), "{}", run.console);
    assert!(
        synced < 60,
        "the snapshot was not taken while the guest wrote"
    );
    pool.clone_snapshot("live", "vm2").unwrap();
    let sock2 = dir.join("vm2.sock");
    let _export2 = Export::start(pool.clone(), "vm2", &sock2, ExportConfig::default()).unwrap();
    // Mounting replays the journal (the snapshot is a crash-consistent point); then the
    // announced files are intact and fsck finds nothing to fix.
    let check = format!(
        r#"
set -e
mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && cd /mnt
head -n {synced} sums > /tmp/before
[ $(wc -l < /tmp/before) -eq {synced} ] && md5sum -c /tmp/before > /dev/null && echo "FILES-INTACT {synced}"
echo "FILES-IN-CLONE $(ls f* | wc -l)"
cd / && umount /mnt
e2fsck -fn /dev/vda > /dev/null && echo FSCK-CLEAN
"#
    );
    let run = guest::run(
        &image,
        &[(sock2, 1)],
        &check,
        &dir.join("run2"),
        Duration::from_secs(300),
    )
    .unwrap();
    assert_eq!(run.status, Some(0), "{}", run.console);
    assert!(
        run.console.contains(&format!("FILES-INTACT {synced}")),
        "{}",
        run.console
    );
    assert!(run.console.contains("FSCK-CLEAN"), "{}", run.console);
    // The clone stopped at the snapshot; the volume went on to the end.
    let in_clone: u32 = run
        .console
        .lines()
        .find_map(|l| l.trim().strip_prefix("FILES-IN-CLONE "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    assert!(in_clone < 60, "{}", run.console);
}

#[test]
fn a_guest_whose_pool_fills_waits_and_goes_on_when_the_pool_grows() {
    if !guest::available() {
        panic!("QEMU is not installed: scripts/install-qemu installs it");
    }
    let image = guest::image_with_fio().unwrap();
    let bed = Vblockd {
        dir: Scratch::new(Path::new("/var/tmp"), "lv-guest-full").unwrap(),
    };
    let vblockd = bed.start();
    let pool_file = bed.dir.join("pool").display().to_string();
    // A pool of about 20 MiB of data space under a thin 64 MiB volume: fio's scattered
    // writes over 32 MiB need more clusters than the pool has. Writes into a full pool
    // queue; below 8 MiB free the low-water event fires.
    let info: vblock::api::PoolInfo = serde_json::from_str(&bed.call(
        &vblockd,
        "POST",
        "/v1/pools",
        &format!(
            r#"{{"name":"p","path":"{pool_file}","size":{},
                "space":{{"when_full":"queue","queue_timeout":900,"low_water":8388608}}}}"#,
            24u64 << 20
        ),
    ))
    .unwrap();
    assert!(info.capacity < 32 << 20, "{info:?}");
    bed.call(
        &vblockd,
        "POST",
        "/v1/pools/p/volumes",
        &format!(r#"{{"name":"vm","size":{}}}"#, 64u64 << 20),
    );
    let sock = bed.dir.join("run/vhost/vm.sock");
    bed.call(
        &vblockd,
        "PUT",
        "/v1/pools/p/volumes/vm/vhost",
        r#"{"queues":1}"#,
    );
    let script = r#"
set -e
echo FIO-START
fio --name=fill --filename=/dev/vda --size=32M --rw=randwrite --bs=16k --ioengine=libaio \
    --iodepth=8 --direct=1 --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --output-format=terse > /tmp/fio.out
echo "FIO-OK $(cut -d';' -f5 /tmp/fio.out) errors"
echo "DMESG-IO-ERRORS $(dmesg | grep -ci 'i/o error')"
"#;
    let guest = guest::Guest::boot(&image, &[(sock, 1)], script, &bed.dir.join("vm")).unwrap();
    let pool = || -> vblock::api::PoolInfo {
        serde_json::from_str(&bed.call(&vblockd, "GET", "/v1/pools/p", "")).unwrap()
    };
    // The pool fills: the low-water event has fired, and the guest's writes wait.
    testbeds::wait::until(
        "writes queued on the full pool",
        Duration::from_secs(600),
        || pool().queued_writes > 0,
    )
    .unwrap();
    let full = pool();
    assert!(full.below_low_water, "{full:?}");
    assert_eq!(full.low_water_events, 1, "{full:?}");
    assert_eq!(full.refused_writes, 0, "{full:?}");
    let metrics = bed.call(&vblockd, "GET", "/metrics", "");
    assert!(
        metrics.contains("vblock_pool_below_low_water{pool=\"p\"} 1"),
        "{metrics}"
    );
    // Grown online with vctl: the waiting writes go on, fio verifies every block.
    let vctl = std::process::Command::new(workspace_binary("vctl").unwrap())
        .arg("--socket")
        .arg(bed.api())
        .args(["pool", "resize", "p", "64M"])
        .output()
        .unwrap();
    assert!(
        vctl.status.success(),
        "{}",
        String::from_utf8_lossy(&vctl.stderr)
    );
    let run = guest.finish(Duration::from_secs(900)).unwrap();
    assert_eq!(run.status, Some(0), "{}", run.console);
    assert!(run.console.contains("FIO-OK 0 errors"), "{}", run.console);
    let io_errors = run
        .console
        .lines()
        .find_map(|l| l.trim().strip_prefix("DMESG-IO-ERRORS "));
    assert_eq!(io_errors, Some("0"), "{}", run.console);
    let grown = pool();
    eprintln!("full: {full:?}\ngrown: {grown:?}");
    assert!(grown.capacity > full.capacity, "{grown:?}");
    assert_eq!(grown.refused_writes, 0, "{grown:?}");
    assert_eq!(
        grown.used + grown.pending_free + grown.free,
        grown.capacity,
        "{grown:?}"
    );
    drop(vblockd);
}
