//! Disk images in and out the way users have them, against qemu-img as the peer: qcow2 images
//! made by qemu-img (plain, compressed, 64 KiB and 2 MiB clusters, version 2) are imported
//! thinly (unallocated clusters stay holes) and exported back as qcow2 and raw, and
//! `qemu-img compare` finds them identical; images that cannot be read faithfully (backing
//! chains, extended L2 entries, zstd, encryption, vmdk, vhdx) are refused with the
//! `qemu-img convert` command that makes them importable, and leave no volume behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use testbeds::daemon::{Daemon, workspace_binary};
use testbeds::scratch::Scratch;

fn sh(cmd: &str, dir: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Bed {
    dir: Scratch,
    _vblockd: Daemon,
}

impl Bed {
    fn new() -> Bed {
        if let Some(why) = testbeds::netns::missing_privileges() {
            panic!("needs root: {why}");
        }
        let dir = Scratch::new(Path::new("/var/tmp"), "lv-images").unwrap();
        let args: Vec<String> = vec![
            "--run-dir".into(),
            dir.join("run").display().to_string(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
        ];
        let vblockd = Daemon::start_local(
            &workspace_binary("vblockd").unwrap(),
            &args,
            dir.join("run/vblockd.sock"),
        )
        .unwrap();
        let bed = Bed {
            dir,
            _vblockd: vblockd,
        };
        let pool = bed.dir.join("p.pool").display().to_string();
        let out = bed.vctl(&["pool", "create", "default", &pool, "--size", "1G"]);
        assert!(out.status.success(), "{out:?}");
        bed
    }

    fn vctl(&self, args: &[&str]) -> Output {
        Command::new(workspace_binary("vctl").unwrap())
            .arg("--socket")
            .arg(self.dir.join("run/vblockd.sock"))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    fn volume(&self, name: &str) -> serde_json::Value {
        let out = self.vctl(&["volume", "-o", "json", "show", name]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()[0].clone()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Writes the same pattern into a fresh 256 MiB qcow2 `name` made with `options`: data at
/// scattered offsets (some of it all zeros), an explicit zero cluster, most of it never
/// written.
fn make_qcow2(dir: &Path, name: &str, options: &str) {
    sh(
        &format!("qemu-img create -q -f qcow2 -o {options} {name} 256M"),
        dir,
    );
    sh(
        &format!(
            "qemu-io -f qcow2 -c 'write -P 0x11 0 100k' -c 'write -P 0x22 3M 4k' \
             -c 'write -P 0x33 64M 2M' -c 'write -P 0 100M 64k' -c 'write -z 120M 1M' \
             -c 'write -P 0x44 255M 1M' {name}"
        ),
        dir,
    );
}

/// Bytes of data the qcow2 image `name` maps, by `qemu-img map` (holes and zeros excluded).
fn mapped_data(dir: &Path, name: &str) -> u64 {
    let map = sh(&format!("qemu-img map --output=json {name}"), dir);
    let v: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    v.iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

#[test]
fn qemu_made_qcow2_images_go_in_and_out_thin_and_identical() {
    let bed = Bed::new();
    let dir = bed.dir.path();
    let images = [
        ("plain.qcow2", "cluster_size=64k"),
        ("big.qcow2", "cluster_size=2M"),
        ("v2.qcow2", "compat=0.10"),
    ];
    for (name, options) in images {
        make_qcow2(dir, name, options);
    }
    // Compressed clusters, at both cluster sizes.
    sh("qemu-img convert -c -O qcow2 plain.qcow2 zlib.qcow2", dir);
    sh(
        "qemu-img convert -c -O qcow2 -o cluster_size=2M plain.qcow2 zlib2m.qcow2",
        dir,
    );
    let names = ["plain", "big", "v2", "zlib", "zlib2m"];
    for n in names {
        let file = format!("{n}.qcow2");
        let out = bed.vctl(&["volume", "import", n, &file]);
        assert!(out.status.success(), "{file}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("(qcow2)"),
            "{out:?}"
        );
        let v = bed.volume(n);
        assert_eq!(v["size"], 256 << 20, "{v}");
        // Thin: what the volume holds is what was written (100k + 4k + 2M + 1M of data, the
        // all-zero 64k not stored), in whole 64 KiB clusters; not the 256 MiB.
        let allocated = v["allocated"].as_u64().unwrap();
        assert!(
            ((3 << 20)..=(4 << 20)).contains(&allocated),
            "{n}: {allocated} bytes allocated"
        );
        // Back out as qcow2 and raw: identical to the original for qemu-img.
        let back = format!("{n}-back.qcow2");
        let out = bed.vctl(&["volume", "export", n, &back]);
        assert!(out.status.success(), "{out:?}");
        sh(&format!("qemu-img check -q {back}"), dir);
        let same = sh(&format!("qemu-img compare {file} {back}"), dir);
        assert!(same.contains("identical"), "{n}: {same}");
        let raw = format!("{n}-back.raw");
        let out = bed.vctl(&["volume", "export", "--format", "raw", n, &raw]);
        assert!(out.status.success(), "{out:?}");
        let same = sh(
            &format!("qemu-img compare -f qcow2 -F raw {file} {raw}"),
            dir,
        );
        assert!(same.contains("identical"), "{n}: {same}");
        // The exported qcow2 is thin too: it maps only clusters with data.
        let mapped = mapped_data(dir, &back);
        assert!(mapped <= 4 << 20, "{n}: the export maps {mapped} bytes");
    }
    // Importing over an existing volume: what the image reads as zeros is zero afterwards.
    let out = bed.vctl(&["volume", "create", "reused", "--size", "256M"]);
    assert!(out.status.success());
    sh("qemu-img create -q -f raw junk.raw 256M", dir);
    sh("qemu-io -f raw -c 'write -P 0x77 0 256M' junk.raw", dir);
    assert!(
        bed.vctl(&["volume", "import", "reused", "junk.raw"])
            .status
            .success()
    );
    assert!(
        bed.vctl(&["volume", "import", "reused", "zlib.qcow2"])
            .status
            .success()
    );
    assert!(
        bed.vctl(&["volume", "export", "reused", "reused.qcow2"])
            .status
            .success()
    );
    let same = sh("qemu-img compare plain.qcow2 reused.qcow2", dir);
    assert!(same.contains("identical"), "{same}");
    // --format raw takes a qcow2 file's bytes as they are.
    let out = bed.vctl(&[
        "volume",
        "import",
        "--format",
        "raw",
        "container",
        "plain.qcow2",
    ]);
    assert!(out.status.success(), "{out:?}");
    let size = std::fs::metadata(bed.path("plain.qcow2")).unwrap().len();
    assert_eq!(
        bed.volume("container")["size"].as_u64().unwrap(),
        size.div_ceil(512) * 512
    );
}

#[test]
fn images_that_cannot_be_read_faithfully_are_refused_with_the_command_that_converts_them() {
    let bed = Bed::new();
    let dir = bed.dir.path();
    make_qcow2(dir, "base.qcow2", "cluster_size=64k");
    sh(
        "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2",
        dir,
    );
    make_qcow2(dir, "ext.qcow2", "extended_l2=on");
    make_qcow2(dir, "zstd.qcow2", "compression_type=zstd");
    sh(
        "qemu-img create -q -f qcow2 --object secret,id=s,data=pw \
         -o encrypt.format=luks,encrypt.key-secret=s luks.qcow2 16M",
        dir,
    );
    sh("qemu-img convert -O vmdk base.qcow2 disk.vmdk", dir);
    sh("qemu-img convert -O vhdx base.qcow2 disk.vhdx", dir);
    for (file, why) in [
        ("overlay.qcow2", "backing file"),
        ("ext.qcow2", "extended L2"),
        ("zstd.qcow2", "compression type"),
        ("luks.qcow2", "encrypted"),
        ("disk.vmdk", "vmdk"),
        ("disk.vhdx", "vhdx"),
    ] {
        let out = bed.vctl(&["volume", "import", "refused", file]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {stderr}");
        assert!(
            stderr.contains(why) && stderr.contains("qemu-img convert"),
            "{file}: {stderr}"
        );
        // Nothing was made.
        let v = bed.vctl(&["volume", "show", "refused"]);
        assert_eq!(v.status.code(), Some(1), "{file} left a volume behind");
    }
    // The command the message names works, and its output imports.
    sh(
        "qemu-img convert -O qcow2 -o extended_l2=off,compression_type=zlib ext.qcow2 flat.qcow2",
        dir,
    );
    assert!(
        bed.vctl(&["volume", "import", "flat", "flat.qcow2"])
            .status
            .success()
    );
    assert!(
        bed.vctl(&["volume", "export", "flat", "flat-back.qcow2"])
            .status
            .success()
    );
    let same = sh("qemu-img compare ext.qcow2 flat-back.qcow2", dir);
    assert!(same.contains("identical"), "{same}");
}
