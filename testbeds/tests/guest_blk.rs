//! QEMU guests (TCG) on vblock volumes through vhost-user-blk.

use std::sync::Arc;
use std::time::Duration;

use testbeds::guest;
use vblock::uring::UringDevice;
use vblock::vhost_blk::{Export, ExportConfig};
use vblock::{Pool, PoolOptions};

#[test]
fn a_guest_writes_a_pattern_the_host_reads_back_and_discards_release_space() {
    if !guest::available() {
        panic!("QEMU is not installed: scripts/install-qemu installs it");
    }
    let image = guest::image().unwrap();
    let dir = std::path::PathBuf::from(format!("/var/tmp/lv-guest-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
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
        Duration::from_secs(120),
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
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ext4_made_in_a_guest_survives_a_reboot_and_a_clone_of_its_snapshot_boots_with_it() {
    if !guest::available() {
        panic!("QEMU is not installed: scripts/install-qemu installs it");
    }
    let image = guest::image().unwrap();
    let dir = std::path::PathBuf::from(format!("/var/tmp/lv-guest-ext4-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
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
        Duration::from_secs(180),
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
        Duration::from_secs(180),
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
        Duration::from_secs(180),
    )
    .unwrap();
    assert_eq!(run.status, Some(0), "{}", run.console);
    assert!(run.console.contains("FILES-INTACT"), "{}", run.console);
    let info = pool.volume("vm2").unwrap();
    assert!(info.allocated > 0);
    let _ = std::fs::remove_dir_all(&dir);
}
