//! QEMU test guests built from Debian packages in seconds: Debian's kernel (the uncompressed
//! `vmlinux`, booted directly), a busybox initramfs with the virtio modules, and a test script
//! handed in through fw_cfg. The guest prints its script's output and an exit marker on the
//! serial console and powers off. TCG only (`/dev/kvm` on the machines this was built on cannot
//! boot a stock kernel). `scripts/install-qemu` installs QEMU and busybox.
//!
//! Tests and guests wait for events, never for a count of iterations: the host waits for
//! console lines ([`Guest::wait_for`]); a guest script waits for the host with
//! `wait-host EVENT`, which prints `LV-WAIT EVENT` and blocks until the host sends that event
//! ([`Guest::send`]) on a second serial port (`ttyS1`, a pipe on the host side).

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::Error;

/// Where built guests are cached (kernel version in the name).
const CACHE: &str = "/var/cache/libvirtual/guest";
/// The private apt configuration of `scripts/install-qemu`.
const APT: &str = "/var/cache/libvirtual/apt";
/// Version of the initramfs layout (bumped with every change of INIT or MODULES).
const LAYOUT: u32 = 5;
/// Modules the guest needs (Debian 6.1 builds virtio and ext4 as modules); their
/// dependencies are found with depmod/modprobe and loaded first.
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "qemu_fw_cfg",
    "ext4",
];
/// Host programs packed into the guest with the libraries they need (e2fsprogs).
const PROGRAMS: &[&str] = &["/usr/sbin/mke2fs", "/usr/sbin/e2fsck"];

/// A bootable guest.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// Uncompressed kernel.
    pub kernel: PathBuf,
    /// Initramfs (gzip cpio).
    pub initramfs: PathBuf,
}

fn sh(cmd: &str, dir: &Path) -> Result<String, Error> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .map_err(|e| Error::Io(format!("sh -c {cmd}"), e))?;
    if !out.status.success() {
        return Err(Error::Setup(format!(
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn apt_opts() -> String {
    if Path::new(APT).join("sources").is_dir() {
        format!(
            "-o Dir::Etc::sourceparts={APT}/sources -o Dir::Etc::sourcelist=/dev/null -o Dir::State::lists={APT}/lists"
        )
    } else {
        String::new()
    }
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/sbin:/usr/bin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp && mount -t tmpfs tmp /tmp
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m 2>/dev/null; done
# The script arrives with the fw_cfg module; the host's deadline bounds this wait.
until [ -e /sys/firmware/qemu_fw_cfg/by_name/opt/lv/script/raw ]; do sleep 0.1; done
cat /sys/firmware/qemu_fw_cfg/by_name/opt/lv/script/raw > /script.sh
# Events from the host arrive as lines on ttyS1; it is held open from here on (fd 3) so that
# nothing the host sends is dropped when the port starts.
stty -F /dev/ttyS1 -echo 2>/dev/null
cat > /bin/wait-host <<'WAIT'
#!/bin/busybox sh
# wait-host EVENT: blocks until the host sends EVENT (Guest::send); the host bounds the wait.
echo "LV-WAIT $1"
while read -r line <&3; do [ "$line" = "$1" ] && exit 0; done
echo "LV-WAIT-FAILED $1"
exit 1
WAIT
chmod +x /bin/wait-host
echo LV-START
sh /script.sh 3</dev/ttyS1
echo "LV-EXIT $?"
sync
poweroff -f
"#;

/// Builds (or takes from the cache) the guest image.
pub fn image() -> Result<GuestImage, Error> {
    let opts = apt_opts();
    let deps = sh(
        &format!("apt-cache {opts} depends linux-image-amd64"),
        Path::new("/"),
    )?;
    let pkg = deps
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| Error::Setup(format!("no kernel package in {deps:?}")))?
        .trim()
        .to_owned();
    // The layout number changes whenever the initramfs does, so caches are rebuilt.
    let dir = PathBuf::from(CACHE).join(format!("{pkg}-layout{LAYOUT}"));
    let image = GuestImage {
        kernel: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio.gz"),
    };
    if image.kernel.is_file() && image.initramfs.is_file() {
        return Ok(image);
    }
    let _lock = cache_lock()?;
    if image.kernel.is_file() && image.initramfs.is_file() {
        return Ok(image);
    }
    let work = dir.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Error::Io(work.display().to_string(), e))?;
    sh(&format!("apt-get {opts} download -qq {pkg}"), &work)?;
    sh("dpkg -x linux-image-*.deb root", &work)?;
    // The uncompressed kernel: the xz payload of the bzImage.
    sh(
        r#"f=$(ls root/boot/vmlinuz-*); off=$(grep -abo "$(printf '\3757zXZ')" "$f" | head -1 | cut -d: -f1); tail -c +$((off+1)) "$f" | xz -dc --single-stream > vmlinux"#,
        &work,
    )?;
    let rootfs = work.join("initramfs");
    sh(
        "mkdir -p initramfs/bin initramfs/proc initramfs/sys initramfs/dev initramfs/lib/modules && cp /bin/busybox initramfs/bin/busybox",
        &work,
    )?;
    // Modules with their dependencies, in load order.
    sh("kver=$(ls root/lib/modules); depmod -b root $kver", &work)?;
    let mut order: Vec<String> = Vec::new();
    for m in MODULES {
        let deps = sh(
            &format!("kver=$(ls root/lib/modules); modprobe -d root -S $kver --show-depends {m}"),
            &work,
        )?;
        for path in deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("insmod "))
        {
            let path = path.trim();
            let name = Path::new(path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !order.contains(&name) {
                sh(&format!("cp {path} initramfs/lib/modules/"), &work)?;
                order.push(name);
            }
        }
    }
    std::fs::write(rootfs.join("lib/modules/order"), order.join("\n"))
        .map_err(|e| Error::Io("modules order".into(), e))?;
    // Programs and their libraries, at the same paths.
    for p in PROGRAMS {
        sh(
            &format!(
                "for f in {p} $(ldd {p} | grep -o '/[^ ]*'); do mkdir -p initramfs$(dirname $f); cp -L $f initramfs$f; done"
            ),
            &work,
        )?;
    }
    sh(
        "ln -sf mke2fs initramfs/usr/sbin/mkfs.ext4 && ln -sf e2fsck initramfs/usr/sbin/fsck.ext4",
        &work,
    )?;
    std::fs::write(rootfs.join("init"), INIT).map_err(|e| Error::Io("init".into(), e))?;
    sh(
        "chmod +x initramfs/init && cd initramfs && find . | cpio -o -H newc --quiet | gzip -1 > ../initramfs.cpio.gz",
        &work,
    )?;
    std::fs::rename(work.join("vmlinux"), &image.kernel)
        .and_then(|()| std::fs::rename(work.join("initramfs.cpio.gz"), &image.initramfs))
        .map_err(|e| Error::Io("guest image".into(), e))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(image)
}

/// Locks the guest cache: one builder at a time (tests run in parallel); the others wait and
/// find the image built.
fn cache_lock() -> Result<nix::fcntl::Flock<std::fs::File>, Error> {
    std::fs::create_dir_all(CACHE).map_err(|e| Error::Io(CACHE.into(), e))?;
    let lock_file = std::fs::File::create(PathBuf::from(CACHE).join("lock"))
        .map_err(|e| Error::Io("guest cache lock".into(), e))?;
    nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::Io("guest cache lock".into(), e.into()))
}

/// The guest image with the host's fio (and the libraries it links) as one more initramfs
/// layer; large (~36 MB compressed), so only the tests that run fio boot it.
pub fn image_with_fio() -> Result<GuestImage, Error> {
    image_with_program("fio", "/usr/bin/fio")
}

/// The guest image with the host's iperf3 (and its libraries) as one more initramfs layer.
pub fn image_with_iperf3() -> Result<GuestImage, Error> {
    image_with_program("iperf3", "/usr/bin/iperf3")
}

/// The guest image with the host's `program` and the libraries it links as one more
/// initramfs layer, cached as `initramfs-NAME.cpio.gz`.
fn image_with_program(name: &str, program: &str) -> Result<GuestImage, Error> {
    let base = image()?;
    let dir = base
        .initramfs
        .parent()
        .ok_or_else(|| Error::Setup("guest cache".into()))?
        .to_owned();
    let image = GuestImage {
        kernel: base.kernel.clone(),
        initramfs: dir.join(format!("initramfs-{name}.cpio.gz")),
    };
    if image.initramfs.is_file() {
        return Ok(image);
    }
    if !Path::new(program).is_file() {
        return Err(Error::Setup(format!(
            "{program} is not installed (scripts/install-deps installs it)"
        )));
    }
    let _lock = cache_lock()?;
    if image.initramfs.is_file() {
        return Ok(image);
    }
    let work = dir.join(format!("work-{name}"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Error::Io(work.display().to_string(), e))?;
    // Compressed cpio archives laid one after another form one initramfs.
    sh(
        &format!(
            "for f in {program} $(ldd {program} | grep -o '/[^ ]*'); do mkdir -p layer$(dirname $f); cp -L $f layer$f; done \
             && (cd layer && find . | cpio -o -H newc --quiet | gzip -1 > ../layer.cpio.gz) \
             && cat {} layer.cpio.gz > initramfs.cpio.gz",
            base.initramfs.display()
        ),
        &work,
    )?;
    std::fs::rename(work.join("initramfs.cpio.gz"), &image.initramfs)
        .map_err(|e| Error::Io(format!("guest image with {name}"), e))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(image)
}

/// A guest network card on a vhost-user-net socket.
#[derive(Clone, Debug)]
pub struct Nic {
    /// The switch's vhost-user socket.
    pub socket: PathBuf,
    /// The card's MAC address.
    pub mac: String,
    /// The MTU QEMU announces to the guest (`host_mtu`; vhost-user leaves the device's
    /// configuration space to QEMU): the tenant MTU the switch reports for the port.
    pub mtu: Option<u16>,
    /// Queue pairs (the guest gets as many vCPUs as the most queue pairs of its cards, so
    /// that it uses them all).
    pub queues: u16,
}

impl Nic {
    /// A card with one queue pair and no MTU announced.
    pub fn new(socket: PathBuf, mac: &str) -> Nic {
        Nic {
            socket,
            mac: mac.to_owned(),
            mtu: None,
            queues: 1,
        }
    }
}

/// What a guest run printed.
#[derive(Clone, Debug)]
pub struct GuestRun {
    /// The script's exit status (None: the guest never got there).
    pub status: Option<i32>,
    /// The serial console output.
    pub console: String,
}

/// Boots `image` with one vhost-user-blk disk per socket (`/dev/vda`, `/dev/vdb`, ...), runs
/// `script` (busybox sh) and waits for it to power off (at most `timeout`).
pub fn run(
    image: &GuestImage,
    disks: &[(PathBuf, u16)],
    script: &str,
    scratch: &Path,
    timeout: Duration,
) -> Result<GuestRun, Error> {
    Guest::boot(image, disks, script, scratch)?.finish(timeout)
}

/// A guest that is running its script; killed on drop.
pub struct Guest {
    child: std::process::Child,
    log: PathBuf,
    /// The host end of the guest's `ttyS1` (QEMU's `pipe:` chardev reads `<path>.in`).
    events: PathBuf,
}

impl Guest {
    /// Boots `image` with one vhost-user-blk disk per socket (`/dev/vda`, `/dev/vdb`, ...; the
    /// number is the disk's queue count; QEMU reconnects to a restarted backend) and hands it
    /// `script` (busybox sh) to run.
    pub fn boot(
        image: &GuestImage,
        disks: &[(PathBuf, u16)],
        script: &str,
        scratch: &Path,
    ) -> Result<Guest, Error> {
        Self::boot_with_nics(image, disks, &[], script, scratch)
    }

    /// [`Self::boot`] with network cards too: one virtio-net device per [`Nic`] (`eth0`,
    /// `eth1`, ...; QEMU reconnects to a restarted switch).
    pub fn boot_with_nics(
        image: &GuestImage,
        disks: &[(PathBuf, u16)],
        nics: &[Nic],
        script: &str,
        scratch: &Path,
    ) -> Result<Guest, Error> {
        std::fs::create_dir_all(scratch)
            .map_err(|e| Error::Io(scratch.display().to_string(), e))?;
        let script_file = scratch.join("script.sh");
        std::fs::write(&script_file, script).map_err(|e| Error::Io("script".into(), e))?;
        let log = scratch.join("console.log");
        let _ = std::fs::remove_file(&log);
        let events = scratch.join("events");
        for end in ["in", "out"] {
            let fifo = events.with_extension(end);
            let _ = std::fs::remove_file(&fifo);
            nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(|e| Error::Io(fifo.display().to_string(), e.into()))?;
        }
        // One vCPU per queue pair: Linux uses min(pairs, CPUs) pairs.
        let cpus = nics
            .iter()
            .map(|n| n.queues)
            .max()
            .unwrap_or(1)
            .max(1)
            .to_string();
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-machine",
            "q35,accel=tcg",
            "-cpu",
            "max",
            "-smp",
            &cpus,
            "-m",
            "768M",
            "-object",
            "memory-backend-memfd,id=mem,size=768M,share=on",
            "-numa",
            "node,memdev=mem",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-bios",
            "/usr/share/qemu/qboot.rom",
        ]);
        cmd.arg("-serial").arg(format!("file:{}", log.display()));
        cmd.arg("-serial").arg(format!("pipe:{}", events.display()));
        cmd.arg("-kernel").arg(&image.kernel);
        cmd.arg("-initrd").arg(&image.initramfs);
        cmd.args(["-append", "console=ttyS0 panic=-1 quiet"]);
        cmd.arg("-fw_cfg")
            .arg(format!("name=opt/lv/script,file={}", script_file.display()));
        for (i, (sock, queues)) in disks.iter().enumerate() {
            cmd.arg("-chardev").arg(format!(
                "socket,id=blk{i},path={},reconnect=1",
                sock.display()
            ));
            cmd.arg("-device").arg(format!(
                "vhost-user-blk-pci,chardev=blk{i},num-queues={queues}"
            ));
        }
        for (i, nic) in nics.iter().enumerate() {
            cmd.arg("-chardev").arg(format!(
                "socket,id=net{i},path={},reconnect=1",
                nic.socket.display()
            ));
            cmd.arg("-netdev").arg(format!(
                "vhost-user,id=n{i},chardev=net{i},queues={}",
                nic.queues
            ));
            let mut device = format!("virtio-net-pci,netdev=n{i},mac={},romfile=", nic.mac);
            if let Some(mtu) = nic.mtu {
                device.push_str(&format!(",host_mtu={mtu}"));
            }
            if nic.queues > 1 {
                // One MSI-X vector per queue, plus config and control.
                device.push_str(&format!(",mq=on,vectors={}", 2 * nic.queues + 2));
            }
            cmd.arg("-device").arg(device);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        crate::daemon::tie_to_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| Error::Io("qemu-system-x86_64".into(), e))?;
        Ok(Guest { child, log, events })
    }

    /// What the guest printed on its serial console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the console shows a line starting with `marker` (at most `timeout`).
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().lines().any(|l| l.trim().starts_with(marker)) {
                return Ok(());
            }
            crate::interrupt::check()?;
            if Instant::now() > deadline || matches!(self.child.try_wait(), Ok(Some(_))) {
                return Err(Error::Setup(format!(
                    "the guest never printed {marker:?}:\n{}",
                    self.console()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `event` to the guest once its script waits for it (`wait-host EVENT` printed
    /// `LV-WAIT EVENT`; at most `timeout`).
    pub fn send(&mut self, event: &str, timeout: Duration) -> Result<(), Error> {
        self.wait_for(&format!("LV-WAIT {event}"), timeout)?;
        // Non-blocking: QEMU holds the pipe open for reading; if it died, this fails (ENXIO)
        // instead of waiting for a reader forever.
        let path = self.events.with_extension("in");
        let mut pipe = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| Error::Io(path.display().to_string(), e))?;
        std::io::Write::write_all(&mut pipe, format!("{event}\n").as_bytes())
            .map_err(|e| Error::Io(path.display().to_string(), e))
    }

    /// Waits for the guest to power off (at most `timeout`, then it is killed) and returns its
    /// script's exit status and console.
    pub fn finish(mut self, timeout: Duration) -> Result<GuestRun, Error> {
        let deadline = Instant::now() + timeout;
        let exited = loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break true,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => break false,
            }
        };
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let console = self.console();
        let status = console
            .lines()
            .find_map(|l| l.trim().strip_prefix("LV-EXIT "))
            .and_then(|s| s.trim().parse().ok());
        if status.is_none() && exited {
            let mut err = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return Err(Error::Setup(format!(
                "guest did not finish its script: {err}\n{console}"
            )));
        }
        Ok(GuestRun { status, console })
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// True if QEMU and busybox are installed (scripts/install-qemu).
pub fn available() -> bool {
    Path::new("/usr/share/qemu/qboot.rom").is_file()
        && Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok()
        && Path::new("/bin/busybox").is_file()
}
