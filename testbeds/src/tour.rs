//! The whole-system tour, the README's first command: two hosts (network namespaces on one
//! underlay bridge) each running vswitchd and vblockd; tenants `a` (VNI 100) and `b` (VNI 200)
//! with the same subnet 10.0.0.0/24; two containers per tenant, one on each host, attached by
//! `vswitch-cni` (started by podman when it is installed, else in plain namespaces); one QEMU
//! VM (TCG) on tenant `a` whose root file system is a thin clone of a golden vblock volume,
//! attached through vhost-user-net and vhost-user-blk. It measures who reaches whom with real
//! pings, the storage the clone saves, and reads the daemons' counters. Everything is driven
//! through `libvirtual`'s clients; everything it makes goes away when it returns (also after
//! Ctrl-C, see [`crate::interrupt`]).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use libvirtual::host::Host as Api;
use serde_json::{Value, json};
use vblock::api::PoolSpec;
use vswitch::api::TenantSpec;

use crate::Error;
use crate::cni::{self, Runtime};
use crate::daemon::{Daemon, start_vswitchd, workspace_binary};
use crate::etcd::EtcdCluster;
use crate::guest::{self, Guest, Nic};
use crate::interrupt::check;
use crate::netns::Netns;
use crate::podman::{self, IMAGE, Podman};
use crate::probe::ping;
use crate::switch_bed::Underlay;

/// The tenants: name, VNI.
const TENANTS: [(&str, u32); 2] = [("a", 100), ("b", 200)];
/// The shared tenant subnet.
const SUBNET: &str = "10.0.0.0/24";
/// The VM's MAC (its address comes from the cluster, like the containers').
const VM_MAC: &str = "02:00:00:00:0a:1e";
/// The etcd member the hosts share, on the underlay.
const ETCD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The storage pool on each host.
const POOL: &str = "demo";
/// The golden image's virtual size.
const GOLDEN_SIZE: u64 = 256 << 20;
/// How long the VM may take to boot and run its checks (TCG).
const VM_TIMEOUT: Duration = Duration::from_secs(300);

/// How the tour attached its containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Containers {
    /// podman (CNI backend) calling `vswitch-cni`.
    Podman,
    /// Plain network namespaces, `vswitch-cni` called as a CNI runtime would.
    Netns,
}

/// What the tour should use.
#[derive(Clone, Debug)]
pub struct TourOptions {
    /// Where its files go (a directory of its own is made inside and removed).
    pub scratch: PathBuf,
    /// Containers with podman if it is installed (`None`), or as told.
    pub podman: Option<bool>,
}

/// One endpoint: a container or the VM.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Display name, e.g. `a1@h1`.
    pub name: String,
    /// Its tenant.
    pub tenant: &'static str,
    /// Its address (the tenants share the subnet).
    pub ip: Ipv4Addr,
    /// Its MAC address (an answer is attributed by the MAC the pinger resolved).
    pub mac: String,
}

/// The storage figures of the golden volume and the VM's clone.
#[derive(Clone, Debug, Default)]
pub struct StorageReport {
    /// Virtual size of the golden volume (and the clone).
    pub size: u64,
    /// Bytes the golden volume maps after the import (zeros are not stored).
    pub golden_allocated: u64,
    /// Bytes the clone maps after the VM ran (shared data counted).
    pub clone_allocated: u64,
    /// Bytes where the clone differs from the golden snapshot: the VM's own writes.
    pub clone_own: u64,
    /// Data space the pool uses for golden volume, snapshot and clone together.
    pub pool_used: u64,
    /// Bytes sent to replicate the golden snapshot to the second host (its mapped ranges).
    pub replicated: u64,
    /// The golden snapshot reads the same before and after the VM ran.
    pub golden_untouched: bool,
    /// The clone's I/O as vblockd counted it (the VM's, through vhost-user-blk).
    pub clone_io: vblock::api::IoInfo,
}

/// What the tour measured.
#[derive(Clone, Debug)]
pub struct TourReport {
    /// How the containers were attached.
    pub containers: Containers,
    /// The endpoints (the VM last).
    pub endpoints: Vec<Endpoint>,
    /// The addresses every endpoint pinged.
    pub targets: Vec<Ipv4Addr>,
    /// `answers[i][k]`: which endpoint answered endpoint i's ping to `targets[k]`.
    pub answers: Vec<Vec<Option<usize>>>,
    /// The VM's lines of interest from its console (`VM-...`).
    pub vm_log: Vec<String>,
    /// Storage figures.
    pub storage: StorageReport,
    /// Counter lines read from the daemons' APIs.
    pub counters: Vec<String>,
    /// Seconds each phase took.
    pub phases: Vec<(String, f64)>,
    /// The network namespaces it made or had made (hosts, underlay, containers): all gone
    /// when it returns.
    pub namespaces: Vec<String>,
    /// Its scratch directory: gone when it returns.
    pub scratch: PathBuf,
    /// What `vctl status` printed on h1 with the VM attached.
    pub status: String,
    /// The Docker container on tenant a (when Docker is installed).
    pub docker: Option<DockerReport>,
}

/// A Docker container attached through `vswitch-docker`, and whom it reached.
#[derive(Clone, Debug)]
pub struct DockerReport {
    /// Display name, e.g. `d2@h2`.
    pub name: String,
    /// Its address (from the cluster's IPAM).
    pub ip: Ipv4Addr,
    /// Each target it pinged and the endpoint that answered (by the MAC it resolved).
    pub answers: Vec<(Ipv4Addr, Option<usize>)>,
}

impl TourReport {
    /// Whether every endpoint reached exactly the other endpoints of its own tenant, the VM
    /// read and wrote its clone through vblockd, and the clone left the golden image alone.
    pub fn passed(&self) -> bool {
        let s = &self.storage;
        let docker_ok = self.docker.as_ref().is_none_or(|d| {
            !d.answers.is_empty()
                && d.answers
                    .iter()
                    .all(|(_, a)| a.is_some_and(|j| self.endpoints[j].tenant == "a"))
        });
        docker_ok
            && self.isolation_holds()
            && s.golden_untouched
            && s.clone_own > 0
            && s.clone_io.reads > 0
            && s.clone_io.writes > 0
    }

    /// Every answer came from the pinger's own tenant and every other endpoint of that
    /// tenant answered.
    pub fn isolation_holds(&self) -> bool {
        self.answers.len() == self.endpoints.len()
            && self.answers.iter().enumerate().all(|(i, row)| {
                let me = &self.endpoints[i];
                row.iter().zip(&self.targets).all(|(answer, ip)| {
                    let expected = self
                        .endpoints
                        .iter()
                        .position(|e| e.tenant == me.tenant && e.ip == *ip && e.ip != me.ip);
                    match (answer, expected) {
                        (Some(a), Some(e)) => *a == e,
                        (None, None) => true,
                        _ => false,
                    }
                })
            })
    }
}

/// One host: its namespace, its daemons and their clients.
struct Host {
    name: String,
    ns: Netns,
    dir: PathBuf,
    vswitchd: Daemon,
    vblockd: Daemon,
    /// Both daemons through libvirtual's high-level model.
    api: Api,
}

impl Host {
    fn start(ul: &mut Underlay, n: u8, dir: &Path, etcd: &str) -> Result<Host, Error> {
        let name = format!("h{n}");
        let ip = Ipv4Addr::new(198, 18, 0, n);
        let ns = ul.host(&name, ip)?;
        let dir = dir.join(&name);
        let vswitchd = start_vswitchd(
            &ns,
            ip.into(),
            &dir.join("vswitchd"),
            &["--cluster", etcd, "--host-name", &name],
        )?;
        let vblock_dir = dir.join("vblockd");
        let args: Vec<String> = vec![
            "--run-dir".into(),
            vblock_dir.join("run").display().to_string(),
            "--state-dir".into(),
            vblock_dir.join("state").display().to_string(),
        ];
        let vblockd = Daemon::start(
            &ns,
            &workspace_binary("vblockd")?,
            &args,
            vblock_dir.join("run/vblockd.sock"),
        )?;
        Ok(Host {
            api: Api::new(
                dir.join("vswitchd/run/vswitchd.sock"),
                vblock_dir.join("run/vblockd.sock"),
            ),
            name,
            ns,
            dir,
            vswitchd,
            vblockd,
        })
    }

    fn switch_socket(&self) -> PathBuf {
        self.dir.join("vswitchd/run/vswitchd.sock")
    }

    /// Stops both daemons cleanly (SIGTERM), as an operator would.
    fn stop(mut self) {
        self.vswitchd.terminate();
        self.vblockd.terminate();
    }
}

fn api(what: &str) -> impl FnOnce(libvirtual::Error) -> Error + '_ {
    move |e| Error::Setup(format!("{what}: {e}"))
}

/// A container: its name, host, tenant, namespace (podman's or ours) and address.
struct Container {
    name: String,
    host: usize,
    tenant: &'static str,
    ns: Netns,
    ip: Ipv4Addr,
    /// The CNI configuration it was attached with (plain namespaces: DEL'd at the end).
    conf: Option<Value>,
}

/// Runs the tour, telling what it does through `say`. Needs root, QEMU (scripts/install-qemu)
/// and the workspace's vswitchd, vblockd and vswitch-cni next to the running program.
pub fn run(opts: &TourOptions, say: &mut dyn FnMut(&str)) -> Result<TourReport, Error> {
    let dir = crate::scratch::Scratch::new(&opts.scratch, "libvirtual-tour")?;
    let mut phases = Vec::new();
    let mut phase_start = Instant::now();
    let mut lap = |name: &str, phases: &mut Vec<(String, f64)>| {
        phases.push((name.to_owned(), phase_start.elapsed().as_secs_f64()));
        phase_start = Instant::now();
    };
    if !guest::available() {
        return Err(Error::Setup(
            "QEMU is not installed (scripts/install-qemu installs it)".into(),
        ));
    }
    say("guest kernel and initramfs (Debian's kernel, busybox; cached after the first run)");
    let image = guest::image()?;
    check()?;
    lap("guest image", &mut phases);

    say("hosts h1 (198.18.0.1) and h2 (198.18.0.2): vswitchd + vblockd each, on one underlay,");
    say("  one cluster: vswitchd --cluster, state in etcd (198.18.0.100)");
    let mut ul = Underlay::new()?;
    let etcd = EtcdCluster::start(&mut ul, &[ETCD_IP], &dir.join("etcd"))?;
    let mut hosts = Vec::new();
    for n in 1..=2u8 {
        hosts.push(Host::start(&mut ul, n, dir.path(), &etcd.endpoints())?);
    }
    // Tenants are cluster objects: created once, on h1; h2 has them from its watch, and
    // each host programs the other as a VTEP once it has a port in a tenant.
    let h1 = libvirtual::net::Client::new(hosts[0].switch_socket());
    for (tenant, vni) in TENANTS {
        h1.create_tenant(&TenantSpec {
            name: tenant.into(),
            vni,
            mtu: 0,
            max_macs: None,
            learn_vteps: false,
            subnet: Some(SUBNET.into()),
        })
        .map_err(api("creating a tenant"))?;
    }
    let h2 = libvirtual::net::Client::new(hosts[1].switch_socket());
    for (tenant, _) in TENANTS {
        crate::wait::until("the tenants on h2", crate::wait::SOON, || {
            h2.tenant(tenant).is_ok()
        })?;
    }
    let mut namespaces: Vec<String> = std::iter::once(ul.netns())
        .chain(etcd.members().iter().map(|m| &m.ns))
        .chain(hosts.iter().map(|h| &h.ns))
        .map(|ns| ns.name().to_owned())
        .collect();
    say("tenants a (VNI 100) and b (VNI 200), created once on h1, on both hosts; both 10.0.0.0/24");
    check()?;
    lap("hosts and tenants", &mut phases);

    let mut storage = golden_and_clone(&hosts, dir.path(), say)?;
    check()?;
    lap("golden volume, replica, clone", &mut phases);

    let use_podman = opts
        .podman
        .unwrap_or_else(|| podman::available() && cni::reference_plugins_installed());
    let cni = Runtime::new()?;
    let pm = if use_podman {
        say("containers: podman (CNI backend) -> vswitch-cni -> cluster IPAM (etcd)");
        Some(Podman::new(&dir.join("podman"), &cni.plugin_dir())?)
    } else {
        say("containers: network namespaces -> vswitch-cni -> cluster IPAM (no podman here)");
        None
    };
    let result = (|| {
        let containers = start_containers(&hosts, pm.as_ref(), &cni)?;
        namespaces.extend(containers.iter().map(|c| c.ns.name().to_owned()));
        for c in &containers {
            say(&format!(
                "  {}@{} tenant {} -> {}",
                c.name, hosts[c.host].name, c.tenant, c.ip
            ));
        }
        check()?;
        lap("containers", &mut phases);
        // The VM's address: from the cluster too (owner: its port).
        let vm_ip = match h1
            .allocate_address("a", "vm1")
            .map_err(api("an address for the VM"))?
            .ip
        {
            IpAddr::V4(ip) => ip,
            other => return Err(Error::Setup(format!("the VM got {other}"))),
        };
        let targets = target_addresses(&containers, vm_ip);
        let docker = if crate::docker::installed() {
            Some(docker_container(&hosts[1], dir.path(), say)?)
        } else {
            say("Docker is not installed (scripts/install-deps installs docker.io): skipped");
            None
        };
        check()?;
        let outcome = vm_and_matrix(&hosts[0], &image, &containers, &targets, dir.path(), say)
            .map(|m| (m, targets.clone()))
            .and_then(|m| Ok((m, counters(&hosts)?, vctl_status(&hosts[0])?)));
        // Docker's container pings tenant a's containers (the VM is gone by now).
        let docker = match (docker, &outcome) {
            (Some(d), Ok((((endpoints, _, _), _), _, _))) => {
                let report = docker_answers(&d, &targets[..targets.len() - 1], endpoints);
                d.stop();
                Some(report)
            }
            (Some(d), Err(_)) => {
                d.stop();
                None
            }
            (None, _) => None,
        };
        let outcome = outcome.map(|o| (o, docker));
        // Plain namespaces are detached as a runtime would (CNI DEL); podman's go with it.
        for c in &containers {
            if let Some(conf) = &c.conf {
                let host = cni.on_host(&hosts[c.host].ns);
                let netns = format!("/run/netns/{}", c.ns.name());
                let _ = host.del(conf, &c.name, Some(&netns), "eth0");
            }
        }
        outcome
    })();
    drop(pm);
    let ((((endpoints, answers, vm_log), targets), counters, status), docker) = result?;
    lap("VM boot and connectivity", &mut phases);

    storage_after_vm(&hosts[0], &mut storage)?;
    for h in hosts {
        h.stop();
    }
    drop(etcd);
    drop(ul);
    let scratch = dir.path().to_owned();
    drop(dir);
    lap("storage, counters, cleanup", &mut phases);
    Ok(TourReport {
        containers: if use_podman {
            Containers::Podman
        } else {
            Containers::Netns
        },
        endpoints,
        targets,
        answers,
        vm_log,
        storage,
        counters,
        phases,
        namespaces,
        scratch,
        status,
        docker,
    })
}

/// Docker on a host: its dockerd, the plugin, and a container on tenant a.
struct DockerBed {
    plugin: Daemon,
    plugin_socket: PathBuf,
    dockerd: crate::docker::Dockerd,
    name: String,
    ip: Ipv4Addr,
}

impl DockerBed {
    /// Stops the container, dockerd and the plugin (which takes its socket along).
    fn stop(mut self) {
        let _ = self.dockerd.docker(&["rm", "-f", "d2"]);
        let _ = self.dockerd.docker(&["network", "rm", "tenant-a"]);
        drop(self.dockerd);
        self.plugin.terminate();
        let _ = std::fs::remove_file(&self.plugin_socket);
    }
}

/// A private dockerd on `host` with the `vswitch-docker` plugin, and a Docker container
/// `d2` on tenant a whose address comes from the cluster.
fn docker_container(
    host: &Host,
    dir: &Path,
    say: &mut dyn FnMut(&str),
) -> Result<DockerBed, Error> {
    let name = format!("lvdemo{}", std::process::id() % 1_000_000);
    let plugin_socket = PathBuf::from(format!("/run/docker/plugins/{name}.sock"));
    let args: Vec<String> = vec![
        "--name".into(),
        name.clone(),
        "--socket".into(),
        host.switch_socket().display().to_string(),
        "--state-dir".into(),
        dir.join("docker-plugin").display().to_string(),
    ];
    let plugin = Daemon::start(
        &host.ns,
        &workspace_binary("vswitch-docker")?,
        &args,
        plugin_socket.clone(),
    )?;
    let dockerd = crate::docker::Dockerd::start(&host.ns, &dir.join("docker"))?;
    dockerd.docker(&[
        "network",
        "create",
        "--driver",
        &name,
        "--ipam-driver",
        &name,
        "--opt",
        "tenant=a",
        "--ipam-opt",
        "tenant=a",
        "tenant-a",
    ])?;
    dockerd.docker(&[
        "run",
        "-d",
        "--name",
        "d2",
        "--network",
        "tenant-a",
        crate::docker::IMAGE,
        "sleep",
        "3600",
    ])?;
    let ip: Ipv4Addr = dockerd
        .ip_of("d2")?
        .parse()
        .map_err(|_| Error::Setup("the Docker container has no address".into()))?;
    say(&format!(
        "Docker: dockerd 20.10 + vswitch-docker on h2, container d2@h2 tenant a -> {ip} (cluster IPAM)"
    ));
    Ok(DockerBed {
        plugin,
        plugin_socket,
        dockerd,
        name: "d2@h2".into(),
        ip,
    })
}

/// Whom the Docker container reaches among `targets`, by the MAC it resolved.
fn docker_answers(d: &DockerBed, targets: &[Ipv4Addr], endpoints: &[Endpoint]) -> DockerReport {
    let answers = targets
        .iter()
        .map(|t| {
            let t_s = t.to_string();
            let answered = d
                .dockerd
                .succeeds(&["exec", "d2", "ping", "-c", "1", "-W", "3", &t_s]);
            let who = answered
                .then(|| {
                    d.dockerd
                        .docker(&["exec", "d2", "ip", "neigh", "show", &t_s])
                        .ok()
                })
                .flatten()
                .and_then(|n| endpoints.iter().position(|e| n.contains(&e.mac)));
            (*t, who)
        })
        .collect();
    DockerReport {
        name: d.name.clone(),
        ip: d.ip,
        answers,
    }
}

/// The addresses everybody pings: tenant a's container on each host, and the VM. Tenant b's
/// containers have the same addresses (each tenant allocates from its own 10.0.0.0/24).
fn target_addresses(containers: &[Container], vm: Ipv4Addr) -> Vec<Ipv4Addr> {
    let mut t: Vec<Ipv4Addr> = containers
        .iter()
        .filter(|c| c.tenant == "a")
        .map(|c| c.ip)
        .collect();
    t.push(vm);
    t
}

/// Builds the golden root file system (busybox, an init script), imports it into h1's pool,
/// snapshots it, replicates the snapshot to h2 (only its mapped ranges travel), clones it for
/// the VM and exports the clone over vhost-user-blk.
fn golden_and_clone(
    hosts: &[Host],
    dir: &Path,
    say: &mut dyn FnMut(&str),
) -> Result<StorageReport, Error> {
    for h in hosts {
        h.api
            .block
            .create_pool(&PoolSpec {
                name: POOL.into(),
                path: h.dir.join("pool.img"),
                size: Some(1 << 30),
                preallocation: Default::default(),
                space: Default::default(),
            })
            .map_err(api("creating a pool"))?;
    }
    let root = dir.join("golden-root");
    build_rootfs(&root)?;
    let file = dir.join("golden.ext4");
    crate::netns::run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", "golden", "-d"])
            .arg(&root)
            .arg(&file)
            .arg(format!("{}k", GOLDEN_SIZE >> 10)),
    )?;
    let _ = std::fs::remove_dir_all(&root);
    let h1 = &hosts[0].api.block;
    let pool = hosts[0].api.pool(POOL);
    let golden = pool
        .import("golden", &file)
        .map_err(api("importing the golden image"))?;
    let _ = std::fs::remove_file(&file);
    let snapshot = golden.snapshot("golden@v1").map_err(api("snapshot"))?;
    let golden = golden.info().map_err(api("golden"))?;
    say(&format!(
        "golden volume on h1: an ext4 root file system ({} MiB virtual, {:.1} MiB stored), snapshot golden@v1",
        GOLDEN_SIZE >> 20,
        mib(golden.allocated)
    ));
    // Replication, as `vctl snapshot diff-export | diff-import` does it: the snapshot's
    // mapped ranges only.
    let h2 = &hosts[1].api.block;
    h2.create_volume(
        POOL,
        &vblock::api::VolumeSpec {
            name: "golden".into(),
            size: GOLDEN_SIZE,
        },
    )
    .map_err(api("golden on h2"))?;
    let mut replicated = 0;
    for r in h1
        .diff(POOL, "golden@v1", None)
        .map_err(api("golden@v1 ranges"))?
    {
        if r.zero {
            continue;
        }
        let mut off = r.offset;
        while off < r.offset + r.length {
            let n = (r.offset + r.length - off).min(libvirtual::block::TRANSFER_CHUNK);
            let data = h1.read(POOL, "golden@v1", off, n).map_err(api("read"))?;
            h2.write(POOL, "golden", off, &data).map_err(api("write"))?;
            off += n;
            replicated += n;
        }
    }
    h2.flush(POOL).map_err(api("flush"))?;
    h2.snapshot(POOL, "golden", "golden@v1")
        .map_err(api("snapshot on h2"))?;
    say(&format!(
        "golden@v1 replicated to h2: {:.1} MiB sent of {} MiB",
        mib(replicated),
        GOLDEN_SIZE >> 20
    ));
    snapshot.clone_to("vm1-root").map_err(api("clone"))?;
    say("clone vm1-root of golden@v1 (shares all its data until written)");
    Ok(StorageReport {
        size: GOLDEN_SIZE,
        golden_allocated: golden.allocated,
        replicated,
        ..StorageReport::default()
    })
}

/// The golden root file system: busybox and the VM's init, which configures the network,
/// pings the targets it is given, records its boot on its own disk and stays up.
fn build_rootfs(root: &Path) -> Result<(), Error> {
    let io = |what: &'static str| move |e| Error::Io(what.into(), e);
    for d in ["bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "var/log"] {
        std::fs::create_dir_all(root.join(d)).map_err(io("golden root"))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).map_err(io("busybox"))?;
    for applet in [
        "sh", "ip", "ping", "mount", "cat", "echo", "sleep", "sync", "awk", "wc", "dd", "uname",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
            .map_err(io("applet"))?;
    }
    std::fs::write(
        root.join("etc/golden-release"),
        "libvirtual demo golden image v1\n",
    )
    .map_err(io("release"))?;
    let init = r#"#!/bin/sh
# The VM's init, from its root volume (a clone of golden@v1): network, pings, a boot record.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
addr=$1; shift
echo "VM-OS $(cat /etc/golden-release) kernel $(uname -r)"
ip link set lo up
ip link set eth0 up
ip addr add "$addr" dev eth0
for t in "$@"; do
  [ "$t" = "${addr%/*}" ] && continue
  # First contact crosses the overlay under an emulated CPU: wait for it up to a minute.
  if ping -c 1 -w 60 "$t" > /dev/null 2>&1; then
    echo "VM-PING $t $(awk -v t="$t" '$1 == t { print $4 }' /proc/net/arp)"
  else
    echo "VM-PING $t none"
  fi
done
n=$(($(cat /var/log/boots 2>/dev/null | wc -l) + 1))
echo "boot $n as $addr" >> /var/log/boots
dd if=/dev/urandom of=/var/vm-state bs=64k count=16 2> /dev/null
sync
echo "VM-READY boot $n"
while :; do sleep 1; done
"#;
    let path = root.join("sbin/init");
    std::fs::write(&path, init).map_err(io("init"))?;
    let mode = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
    std::fs::set_permissions(&path, mode).map_err(io("init mode"))?;
    Ok(())
}

/// The CNI network of `tenant` on host `host` (index): vswitch-cni, addresses from the
/// cluster (unique across hosts, no ranges split by hand).
fn network(hosts: &[Host], host: usize, tenant: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": format!("{tenant}-{}", hosts[host].name),
        "type": "vswitch-cni",
        "tenant": tenant,
        "socket": hosts[host].switch_socket(),
        "ipam": { "type": "vswitch-cluster" }
    })
}

/// Two containers per tenant, one on each host.
fn start_containers(
    hosts: &[Host],
    pm: Option<&Podman>,
    cni: &Runtime,
) -> Result<Vec<Container>, Error> {
    let mut out = Vec::new();
    for (h, host) in hosts.iter().enumerate() {
        for (tenant, _) in TENANTS {
            check()?;
            let name = format!("{tenant}{}", h + 1);
            let conf = network(hosts, h, tenant);
            let (ns, ip, conf) = match pm {
                Some(pm) => {
                    // podman takes a network list.
                    let mut list = json!({
                        "cniVersion": conf["cniVersion"],
                        "name": conf["name"],
                        "plugins": [conf.clone()],
                    });
                    if let Some(p) = list["plugins"][0].as_object_mut() {
                        p.remove("cniVersion");
                        p.remove("name");
                    }
                    pm.add_network(&list)?;
                    let net = conf["name"].as_str().unwrap_or_default().to_owned();
                    pm.run(
                        &host.ns,
                        &[
                            "run",
                            "-d",
                            "--name",
                            &name,
                            "--network",
                            &net,
                            IMAGE,
                            "sleep",
                            "3600",
                        ],
                    )?;
                    let inspect = |what: &str| -> Result<String, Error> {
                        let format =
                            format!("{{{{range .NetworkSettings.Networks}}}}{what}{{{{end}}}}");
                        Ok(pm
                            .run(&host.ns, &["inspect", "--format", &format, &name])?
                            .trim()
                            .to_owned())
                    };
                    let ip = inspect("{{.IPAddress}}")?;
                    let key = pm
                        .run(
                            &host.ns,
                            &[
                                "inspect",
                                "--format",
                                "{{.NetworkSettings.SandboxKey}}",
                                &name,
                            ],
                        )?
                        .trim()
                        .to_owned();
                    let ns_name = Path::new(&key)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .ok_or_else(|| {
                            Error::Setup(format!("{name}: no network namespace ({key:?})"))
                        })?;
                    (Netns::borrowed(&ns_name)?, ip, None)
                }
                None => {
                    let ns = Netns::create(&name)?;
                    let netns = format!("/run/netns/{}", ns.name());
                    let result = cni.on_host(&host.ns).add(&conf, &name, &netns, "eth0")?;
                    let ip = result["ips"][0]["address"]
                        .as_str()
                        .and_then(|a| a.split('/').next())
                        .unwrap_or_default()
                        .to_owned();
                    (ns, ip, Some(conf))
                }
            };
            let ip = ip
                .parse()
                .map_err(|_| Error::Setup(format!("{name}: no address ({ip:?})")))?;
            out.push(Container {
                name,
                host: h,
                tenant,
                ns,
                ip,
                conf,
            });
        }
    }
    Ok(out)
}

/// The MAC of `eth0` in `ns`.
fn mac_of(ns: &Netns) -> Result<String, Error> {
    let link = ns.ip(&["link", "show", "eth0"])?;
    link.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_owned)
        .ok_or_else(|| Error::Setup(format!("no MAC in {link:?}")))
}

type Matrix = (Vec<Endpoint>, Vec<Vec<Option<usize>>>, Vec<String>);

/// Boots the VM on `host` (port vm1 of tenant a, disk vm1-root), waits for its pings, then
/// has every container ping every target, in parallel.
fn vm_and_matrix(
    host: &Host,
    image: &guest::GuestImage,
    containers: &[Container],
    targets: &[Ipv4Addr],
    dir: &Path,
    say: &mut dyn FnMut(&str),
) -> Result<Matrix, Error> {
    let mut endpoints = Vec::new();
    for c in containers {
        endpoints.push(Endpoint {
            name: format!("{}@h{}", c.name, c.host + 1),
            tenant: c.tenant,
            ip: c.ip,
            mac: mac_of(&c.ns)?,
        });
    }
    let vm_ip = *targets
        .last()
        .ok_or_else(|| Error::Setup("no VM address".into()))?;
    endpoints.push(Endpoint {
        name: "vm1@h1".into(),
        tenant: "a",
        ip: vm_ip,
        mac: VM_MAC.into(),
    });
    let m = &host.api;
    let vm = m
        .attach_vm(
            "vm1",
            &m.tenant("a"),
            VM_MAC,
            &m.pool(POOL).volume("vm1-root"),
        )
        .map_err(api("attaching the VM"))?;
    say(&format!(
        "VM attachment: NIC {}, disk {}",
        vm.net_socket.display(),
        vm.disk_socket.display()
    ));
    let nic = Nic {
        socket: vm.net_socket.clone(),
        mac: vm.mac.clone(),
        mtu: vm.mtu,
        queues: 1,
    };
    let target_list: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
    // Stage one, from the initramfs: mount the clone and run the init it holds.
    let script = format!(
        "mkdir -p /newroot\n\
         mount -t ext4 /dev/vda /newroot || {{ echo 'VM-ERROR cannot mount the root volume'; exit 20; }}\n\
         echo \"VM-ROOT $(cat /sys/block/vda/size) sectors from vhost-user-blk\"\n\
         exec chroot /newroot /sbin/init {vm_ip}/24 {}\n",
        target_list.join(" ")
    );
    say("VM vm1@h1 (QEMU, TCG): kernel + initramfs, root file system = clone vm1-root,");
    say("  NIC on tenant a through vhost-user-net, disk through vhost-user-blk; booting");
    let started = Instant::now();
    let mut vm = Guest::boot_with_nics(
        image,
        &[(vm.disk_socket.clone(), 1)],
        &[nic],
        &script,
        &dir.join("vm1"),
    )?;
    vm.wait_for("VM-READY", VM_TIMEOUT)?;
    say(&format!(
        "  VM up and done with its pings after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let console = vm.console();
    let vm_log: Vec<String> = console
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("VM-"))
        .map(str::to_owned)
        .collect();
    say(&format!(
        "every container pings {} (in parallel)",
        target_list.join(", ")
    ));
    let rows: Vec<Result<Vec<Option<usize>>, Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = containers
            .iter()
            .zip(&endpoints)
            .map(|(c, me)| {
                let (targets, endpoints) = (&targets, &endpoints);
                s.spawn(move || {
                    targets
                        .iter()
                        .map(|t| {
                            if *t == me.ip || ping(&c.ns, (*t).into(), 1, 56)?.received == 0 {
                                return Ok(None);
                            }
                            let neigh = c.ns.ip(&["neigh", "show", &t.to_string()])?;
                            Ok(endpoints.iter().position(|e| neigh.contains(&e.mac)))
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Setup("a ping thread panicked".into())))
            })
            .collect()
    });
    let mut answers = Vec::new();
    for r in rows {
        answers.push(r?);
    }
    // The VM's row, from its console.
    let vm_row = targets
        .iter()
        .map(|t| {
            let line = vm_log
                .iter()
                .find(|l| l.split_whitespace().nth(1) == Some(&t.to_string()))?;
            let mac = line.split_whitespace().nth(2)?;
            endpoints.iter().position(|e| e.mac == mac)
        })
        .collect();
    answers.push(vm_row);
    drop(vm);
    Ok((endpoints, answers, vm_log))
}

/// The clone's own data after the VM ran, the pool's use, and whether golden@v1 still reads
/// as it did.
fn storage_after_vm(host: &Host, s: &mut StorageReport) -> Result<(), Error> {
    let b = &host.api.block;
    let pool = host.api.pool(POOL);
    let clone = pool.volume("vm1-root");
    let info = clone.info().map_err(api("clone"))?;
    s.clone_allocated = info.allocated;
    s.clone_io = info.io;
    s.clone_own = clone
        .bytes_differing_from(&pool.volume("golden@v1"))
        .map_err(api("diff"))?;
    let pool = b.pool(POOL).map_err(api("pool"))?;
    s.pool_used = pool.capacity - pool.free;
    // The snapshot maps exactly what the golden volume maps (nobody wrote either).
    let golden = b.volume(POOL, "golden@v1").map_err(api("golden"))?;
    let changed = b
        .diff(POOL, "golden@v1", Some("golden"))
        .map_err(api("diff"))?;
    s.golden_untouched = golden.allocated == s.golden_allocated && changed.is_empty();
    Ok(())
}

/// `vctl status` on `host` (both daemons).
fn vctl_status(host: &Host) -> Result<String, Error> {
    crate::netns::run(
        Command::new(workspace_binary("vctl")?)
            .arg("status")
            .arg("--vswitchd-socket")
            .arg(host.api.net.as_async().socket())
            .arg("--vblockd-socket")
            .arg(host.api.block.as_async().socket()),
    )
}

/// Counter lines from both daemons of every host.
fn counters(hosts: &[Host]) -> Result<Vec<String>, Error> {
    let mut lines = Vec::new();
    for h in hosts {
        for p in h.api.net.ports().map_err(api("ports"))? {
            let c = &p.counters;
            let drops = if c.drops.is_empty() {
                "none".to_owned()
            } else {
                let all: Vec<String> = c.drops.iter().map(|(k, v)| format!("{k} {v}")).collect();
                all.join(", ")
            };
            let name = match p.spec.labels.get(libvirtual::cni::plugin::LABEL_CONTAINER) {
                Some(id) => format!(
                    "{} (ctr {})",
                    p.spec.name,
                    id.chars().take(8).collect::<String>()
                ),
                None => p.spec.name.clone(),
            };
            lines.push(format!(
                "{} vswitchd port {:<22} tenant {}  rx {:>5} frames {:>9} B  tx {:>5} frames {:>9} B  drops: {}",
                h.name,
                name,
                p.spec.tenant,
                c.rx_packets,
                c.rx_bytes,
                c.tx_packets,
                c.tx_bytes,
                drops
            ));
        }
        for t in h.api.net.tenants().map_err(api("tenants"))? {
            lines.push(format!(
                "{} vswitchd tenant {} (VNI {})  learned MACs {}  unicast {}  flooded {}",
                h.name, t.name, t.vni, t.learned_macs, t.unicast, t.flooded
            ));
        }
        for v in h.api.block.volumes(POOL).map_err(api("volumes"))? {
            lines.push(format!(
                "{} vblockd  {:<10} {:<8} {:>6.1} MiB mapped  reads {:>5} ({:.1} MiB)  writes {:>5} ({:.1} MiB)",
                h.name,
                v.name,
                v.kind,
                mib(v.allocated),
                v.io.reads,
                mib(v.io.read_bytes),
                v.io.writes,
                mib(v.io.written_bytes),
            ));
        }
    }
    Ok(lines)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}
