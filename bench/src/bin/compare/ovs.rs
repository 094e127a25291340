//! Open vSwitch with DPDK (Debian `openvswitch-switch-dpdk`) as a vhost-user-net peer: its own
//! `ovsdb-server` and `ovs-vswitchd-dpdk` in a scratch directory, one userspace (`netdev`)
//! bridge, one PMD thread, `dpdkvhostuserclient` ports. DPDK needs hugepages here (OVS runs
//! it with `--in-memory`, which `--no-huge` cannot serve): they are reserved and mounted for
//! the run and given back when it ends.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testbeds::daemon::tie_to_parent;

use crate::Killed;

/// The Debian package's DPDK build of ovs-vswitchd.
pub const OVS_VSWITCHD_DPDK: &str = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk";
const SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";
/// Hugepage memory DPDK takes for OVS (MiB).
const SOCKET_MEM_MB: u64 = 1024;
const HUGEPAGE_KB: u64 = 2048;

/// Whether OVS-DPDK and its tools are installed.
pub fn installed() -> bool {
    Path::new(OVS_VSWITCHD_DPDK).exists()
        && Path::new(SCHEMA).exists()
        && Command::new("ovs-vsctl").arg("--version").output().is_ok()
        && Command::new("ovsdb-server")
            .arg("--version")
            .output()
            .is_ok()
}

/// 2 MiB hugepages added to the pool and a hugetlbfs mount of them; both undone on drop
/// (the pages added are taken away again, whatever others did to the pool meanwhile).
struct Hugepages {
    mount: PathBuf,
    added: u64,
}

/// The 2 MiB pool (whatever the default huge page size).
const NR_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
const FREE_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

fn read_u64(path: &str) -> Result<u64, String> {
    std::fs::read_to_string(path)
        .map_err(|e| format!("{path}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("{path}: {e}"))
}

fn free_hugepages() -> u64 {
    read_u64(FREE_HUGEPAGES).unwrap_or(0)
}

impl Hugepages {
    fn reserve(mount: PathBuf, pages: u64) -> Result<Hugepages, String> {
        let before = read_u64(NR_HUGEPAGES)?;
        std::fs::write(NR_HUGEPAGES, (before + pages).to_string())
            .map_err(|e| format!("{NR_HUGEPAGES}: {e}"))?;
        let h = Hugepages {
            mount: mount.clone(),
            added: read_u64(NR_HUGEPAGES)?.saturating_sub(before),
        };
        if free_hugepages() < pages {
            return Err(format!(
                "only {} free 2 MiB hugepages after asking for {pages} more (memory too fragmented?)",
                free_hugepages()
            ));
        }
        std::fs::create_dir_all(&mount).map_err(|e| format!("{}: {e}", mount.display()))?;
        let ok = Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "lv-bench-huge"])
            .arg(&mount)
            .status()
            .map_err(|e| format!("mount: {e}"))?
            .success();
        if !ok {
            return Err(format!("mount hugetlbfs on {} failed", mount.display()));
        }
        Ok(h)
    }
}

impl Drop for Hugepages {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        if let Ok(now) = read_u64(NR_HUGEPAGES) {
            let _ = std::fs::write(NR_HUGEPAGES, now.saturating_sub(self.added).to_string());
        }
    }
}

/// One OVS-DPDK instance; stopped and cleaned up on drop (fields drop in order: the switch,
/// its database, then the hugepages).
pub struct OvsDpdk {
    dir: PathBuf,
    vswitchd: Killed,
    _db: Killed,
    _huge: Hugepages,
}

impl OvsDpdk {
    /// Starts OVS-DPDK with its state in `dir` (created), its PMD thread and everything else
    /// on CPU `cpu`, and a netdev bridge `br0`.
    pub fn start(dir: &Path, cpu: u8) -> Result<OvsDpdk, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let huge = Hugepages::reserve(dir.join("hugepages"), SOCKET_MEM_MB * 1024 / HUGEPAGE_KB)?;
        let db = dir.join("conf.db");
        run(Command::new("ovsdb-tool")
            .arg("create")
            .arg(&db)
            .arg(SCHEMA))?;
        let env = [
            ("OVS_RUNDIR", dir.as_os_str()),
            ("OVS_LOGDIR", dir.as_os_str()),
            ("OVS_DBDIR", dir.as_os_str()),
        ];
        let db_sock = dir.join("db.sock");
        let mut db_cmd = Command::new("ovsdb-server");
        // Both daemons die with the bench (a killed bench must not leave a PMD spinning).
        tie_to_parent(&mut db_cmd);
        let db_server = db_cmd
            .arg(&db)
            .arg(format!("--remote=punix:{}", db_sock.display()))
            .arg(format!("--unixctl={}", dir.join("ovsdb.ctl").display()))
            .arg(format!("--log-file={}", dir.join("ovsdb.log").display()))
            .arg("--no-chdir")
            .envs(env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("ovsdb-server: {e}"))?;
        let db_server = Killed(db_server);
        wait_for(&db_sock, Duration::from_secs(20))?;
        vsctl(dir, &["--no-wait", "init"])?;
        let prefix = format!("--file-prefix=lv-bench-ovs-{}", std::process::id());
        let huge_dir = format!(
            "other_config:dpdk-hugepage-dir={}",
            dir.join("hugepages").display()
        );
        vsctl(
            dir,
            &[
                "--no-wait",
                "set",
                "Open_vSwitch",
                ".",
                "other_config:dpdk-init=true",
                &format!("other_config:dpdk-socket-mem={SOCKET_MEM_MB}"),
                &format!("other_config:pmd-cpu-mask={:#x}", 1u64 << cpu),
                &huge_dir,
                &format!("other_config:dpdk-extra=\"{prefix}\""),
            ],
        )?;
        let mut ovs_cmd = Command::new("taskset");
        tie_to_parent(&mut ovs_cmd);
        let child = ovs_cmd
            .args(["-c", &cpu.to_string(), OVS_VSWITCHD_DPDK])
            .arg(format!("unix:{}", db_sock.display()))
            .arg(format!(
                "--unixctl={}",
                dir.join("ovs-vswitchd.ctl").display()
            ))
            .arg(format!(
                "--log-file={}",
                dir.join("ovs-vswitchd.log").display()
            ))
            .arg("--no-chdir")
            .envs(env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{OVS_VSWITCHD_DPDK}: {e}"))?;
        let ovs = OvsDpdk {
            dir: dir.to_owned(),
            vswitchd: Killed(child),
            _db: db_server,
            _huge: huge,
        };
        ovs.vsctl(&[
            "--timeout=60",
            "wait-until",
            "Open_vSwitch",
            ".",
            "dpdk_initialized=true",
        ])
        .map_err(|e| format!("{e}; log:\n{}", ovs.log_tail()))?;
        ovs.vsctl(&[
            "--timeout=30",
            "add-br",
            "br0",
            "--",
            "set",
            "bridge",
            "br0",
            "datapath_type=netdev",
        ])?;
        Ok(ovs)
    }

    /// Adds a vhost-user-net port that connects, as the client, to the socket at `path`
    /// (served by the VM side: QEMU, or testpmd's virtio_user with `server=1`).
    pub fn add_vhost_client_port(&self, name: &str, path: &Path) -> Result<(), String> {
        self.vsctl(&[
            "--timeout=30",
            "add-port",
            "br0",
            name,
            "--",
            "set",
            "Interface",
            name,
            "type=dpdkvhostuserclient",
            &format!("options:vhost-server-path={}", path.display()),
        ])
    }

    /// The process id of ovs-vswitchd.
    pub fn pid(&self) -> u32 {
        self.vswitchd.0.id()
    }

    fn vsctl(&self, args: &[&str]) -> Result<(), String> {
        vsctl(&self.dir, args)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("ovs-vswitchd.log")).unwrap_or_default();
        log.lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `ovs-vsctl` against the database of the instance in `dir`.
fn vsctl(dir: &Path, args: &[&str]) -> Result<(), String> {
    run(Command::new("ovs-vsctl")
        .arg(format!("--db=unix:{}", dir.join("db.sock").display()))
        .args(args))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn wait_for(path: &Path, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} did not appear", path.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
