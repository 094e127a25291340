//! The high-level model: a [`Host`] (one machine's vswitchd and vblockd) with its
//! [`Tenant`]s, their ports, its [`Pool`]s and their [`Volume`]s, and the one thing a VMM
//! needs from both: a [`VmAttachment`] (a NIC on a tenant and a disk from a volume, with the
//! QEMU arguments that use them).
//!
//! ```no_run
//! use libvirtual::host::Host;
//!
//! # fn main() -> Result<(), libvirtual::Error> {
//! let host = Host::local();
//! let tenant = host.create_tenant("blue", 100)?;
//! tenant.add_vtep("198.18.0.2".parse().unwrap())?;
//! let golden = host.pool("default").volume("golden");
//! let root = golden.snapshot("golden@v1")?.clone_to("vm1-root")?;
//! let vm = host.attach_vm("vm1", &tenant, "02:00:00:00:00:01", &root)?;
//! println!("qemu-system-x86_64 ... {}", vm.qemu_args(1 << 30).join(" "));
//! # Ok(())
//! # }
//! ```

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;
use vblock_api::{PoolInfo, VhostInfo, VolumeInfo, VolumeSpec};
use vswitch_api::{PortInfo, PortSpec, TenantInfo, TenantSpec};

use crate::{Error, block, net};

/// One machine's libvirtual daemons, addressed together.
#[derive(Clone, Debug)]
pub struct Host {
    /// vswitchd's client.
    pub net: net::Client,
    /// vblockd's client.
    pub block: block::Client,
}

/// Everything a host runs, read at one moment (`vctl status`).
#[derive(Clone, Debug, Serialize)]
pub struct Inventory {
    /// Tenants, with their counters.
    pub tenants: Vec<TenantInfo>,
    /// Ports, with their counters.
    pub ports: Vec<PortInfo>,
    /// Pools with their volumes.
    pub pools: Vec<PoolInventory>,
    /// Running vhost-user-blk exports.
    pub exports: Vec<VhostInfo>,
    /// Daemons that could not be reached, each with why (`vswitchd: cannot reach ...`):
    /// their parts above are empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
}

/// A pool and its volumes.
#[derive(Clone, Debug, Serialize)]
pub struct PoolInventory {
    /// The pool.
    pub pool: PoolInfo,
    /// Its volumes, snapshots and clones.
    pub volumes: Vec<VolumeInfo>,
}

impl Inventory {
    /// Bytes the pools' volumes would take as full copies (every volume's mapped data),
    /// and bytes the pools really use: the difference is what thin provisioning, snapshots
    /// and clones save.
    pub fn thin_savings(&self) -> (u64, u64) {
        let mapped = self
            .pools
            .iter()
            .flat_map(|p| &p.volumes)
            .map(|v| v.allocated)
            .sum();
        let used = self
            .pools
            .iter()
            .map(|p| p.pool.capacity - p.pool.free)
            .sum();
        (mapped, used)
    }
}

impl Host {
    /// The daemons listening on these sockets.
    pub fn new(vswitchd: impl AsRef<Path>, vblockd: impl AsRef<Path>) -> Host {
        Host {
            net: net::Client::new(vswitchd),
            block: block::Client::new(vblockd),
        }
    }

    /// The daemons at their default sockets (`/run/libvirtual/...`).
    pub fn local() -> Host {
        Host::new(net::default_socket(), block::default_socket())
    }

    /// A tenant by name (nothing is asked yet).
    pub fn tenant(&self, name: &str) -> Tenant<'_> {
        Tenant {
            host: self,
            name: name.to_owned(),
        }
    }

    /// Creates a tenant on VXLAN network `vni` with the largest MTU the underlay carries.
    pub fn create_tenant(&self, name: &str, vni: u32) -> Result<Tenant<'_>, Error> {
        self.net.create_tenant(&TenantSpec {
            name: name.to_owned(),
            vni,
            mtu: 0,
            max_macs: None,
            learn_vteps: false,
            subnet: None,
        })?;
        Ok(self.tenant(name))
    }

    /// A pool by name (nothing is asked yet).
    pub fn pool(&self, name: &str) -> Pool<'_> {
        Pool {
            host: self,
            name: name.to_owned(),
        }
    }

    /// Reads everything both daemons run. A daemon that cannot be reached is named in
    /// [`Inventory::unreachable`] and the other's part is still read; if neither can be
    /// reached, that is the error.
    pub fn inventory(&self) -> Result<Inventory, Error> {
        let mut unreachable = Vec::new();
        let mut inv = Inventory {
            tenants: Vec::new(),
            ports: Vec::new(),
            pools: Vec::new(),
            exports: Vec::new(),
            unreachable: Vec::new(),
        };
        let net = (|| -> Result<(), Error> {
            inv.tenants = self.net.tenants()?;
            inv.ports = self.net.ports()?;
            Ok(())
        })();
        let net_down = match net {
            Err(e @ Error::Connect { .. }) => Some(e),
            other => {
                other?;
                None
            }
        };
        let block = (|| -> Result<(), Error> {
            for pool in self.block.pools()? {
                let volumes = self.block.volumes(&pool.name)?;
                inv.pools.push(PoolInventory { pool, volumes });
            }
            inv.exports = self.block.vhost_exports()?;
            Ok(())
        })();
        let block_down = match block {
            Err(e @ Error::Connect { .. }) => Some(e),
            other => {
                other?;
                None
            }
        };
        match (net_down, block_down) {
            (Some(e), Some(_)) => return Err(e),
            (Some(e), None) => unreachable.push(format!("vswitchd: {e}")),
            (None, Some(e)) => unreachable.push(format!("vblockd: {e}")),
            (None, None) => {}
        }
        inv.unreachable = unreachable;
        Ok(inv)
    }

    /// Attaches a VM: a vhost-user-net port `name` on `tenant` with `mac` (port security
    /// allows only that MAC) and `disk` exported as vhost-user-blk (one queue). If the disk
    /// cannot be exported, the port is removed again.
    pub fn attach_vm(
        &self,
        name: &str,
        tenant: &Tenant<'_>,
        mac: &str,
        disk: &Volume<'_>,
    ) -> Result<VmAttachment, Error> {
        let port = self.net.create_port(&PortSpec {
            name: name.to_owned(),
            tenant: tenant.name.clone(),
            kind: "vhost-user-net".into(),
            mac: Some(mac.to_owned()),
            ips: Vec::new(),
            rate_limit: Default::default(),
            netns: None,
            ifname: None,
            labels: Default::default(),
        })?;
        let export = match self.block.export_vhost(&disk.pool.name, &disk.name, 1) {
            Ok(e) => e,
            Err(e) => {
                let _ = self.net.delete_port(name);
                return Err(e);
            }
        };
        let net_socket = port
            .socket
            .clone()
            .ok_or_else(|| Error::Protocol(format!("port {name} reports no vhost-user socket")))?;
        Ok(VmAttachment {
            name: name.to_owned(),
            mac: mac.to_owned(),
            mtu: port.mtu,
            net_socket,
            disk_socket: export.socket,
            pool: disk.pool.name.clone(),
            volume: disk.name.clone(),
        })
    }

    /// Undoes [`Self::attach_vm`]: the port goes, the export stops (the volume stays).
    pub fn detach_vm(&self, vm: &VmAttachment) -> Result<(), Error> {
        let port = self.net.delete_port(&vm.name);
        self.block.unexport_vhost(&vm.pool, &vm.volume)?;
        port
    }
}

/// A tenant of a [`Host`].
#[derive(Clone, Debug)]
pub struct Tenant<'h> {
    host: &'h Host,
    name: String,
}

impl Tenant<'_> {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its state and counters.
    pub fn info(&self) -> Result<TenantInfo, Error> {
        self.host.net.tenant(&self.name)
    }

    /// Adds a remote VTEP: another host carrying this tenant.
    pub fn add_vtep(&self, ip: IpAddr) -> Result<(), Error> {
        self.host.net.add_vtep(&self.name, ip)
    }

    /// Its ports.
    pub fn ports(&self) -> Result<Vec<PortInfo>, Error> {
        Ok(self
            .host
            .net
            .ports()?
            .into_iter()
            .filter(|p| p.spec.tenant == self.name)
            .collect())
    }

    /// A TAP port `name` moved into network namespace file `netns` as `ifname` (a
    /// container's interface).
    pub fn container_port(
        &self,
        name: &str,
        netns: &Path,
        ifname: &str,
    ) -> Result<PortInfo, Error> {
        self.host.net.create_port(&PortSpec {
            name: name.to_owned(),
            tenant: self.name.clone(),
            kind: "tap".into(),
            mac: None,
            ips: Vec::new(),
            rate_limit: Default::default(),
            netns: Some(netns.display().to_string()),
            ifname: Some(ifname.to_owned()),
            labels: Default::default(),
        })
    }

    /// Deletes the tenant (it must have no ports).
    pub fn delete(self) -> Result<(), Error> {
        self.host.net.delete_tenant(&self.name)
    }
}

/// A storage pool of a [`Host`].
#[derive(Clone, Debug)]
pub struct Pool<'h> {
    host: &'h Host,
    name: String,
}

impl<'h> Pool<'h> {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its space.
    pub fn info(&self) -> Result<PoolInfo, Error> {
        self.host.block.pool(&self.name)
    }

    /// A volume, snapshot or clone by name (nothing is asked yet).
    pub fn volume(&self, name: &str) -> Volume<'h> {
        Volume {
            pool: self.clone(),
            name: name.to_owned(),
        }
    }

    /// Creates a thin volume of `size` bytes.
    pub fn create_volume(&self, name: &str, size: u64) -> Result<Volume<'h>, Error> {
        let spec = VolumeSpec {
            name: name.to_owned(),
            size,
        };
        self.host.block.create_volume(&self.name, &spec)?;
        Ok(self.volume(name))
    }

    /// Imports the disk image at `path` (raw, or qcow2 with the `images` feature; found by
    /// its magic) as volume `name`, thinly.
    pub fn import(&self, name: &str, path: &Path) -> Result<Volume<'h>, Error> {
        #[cfg(feature = "images")]
        crate::image::import(&self.host.block, &self.name, name, path, None, &mut |_| {})?;
        #[cfg(not(feature = "images"))]
        {
            let local = |source| Error::File {
                what: path.display().to_string(),
                source,
            };
            let mut file = std::fs::File::open(path).map_err(local)?;
            let len = file.metadata().map_err(local)?.len();
            self.host
                .block
                .import(&self.name, name, &mut file, len, &mut |_| {})?;
        }
        Ok(self.volume(name))
    }

    /// All its volumes, snapshots and clones.
    pub fn volumes(&self) -> Result<Vec<VolumeInfo>, Error> {
        self.host.block.volumes(&self.name)
    }
}

/// A volume, snapshot or clone in a [`Pool`].
#[derive(Clone, Debug)]
pub struct Volume<'h> {
    pool: Pool<'h>,
    name: String,
}

impl<'h> Volume<'h> {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its size, allocation, limits and I/O counters.
    pub fn info(&self) -> Result<VolumeInfo, Error> {
        self.pool.host.block.volume(&self.pool.name, &self.name)
    }

    /// Takes a read-only snapshot `name` of it.
    pub fn snapshot(&self, name: &str) -> Result<Volume<'h>, Error> {
        self.pool
            .host
            .block
            .snapshot(&self.pool.name, &self.name, name)?;
        Ok(self.pool.volume(name))
    }

    /// Makes writable clone `name` of it (a snapshot): it shares all data until written.
    pub fn clone_to(&self, name: &str) -> Result<Volume<'h>, Error> {
        self.pool
            .host
            .block
            .clone_snapshot(&self.pool.name, &self.name, name)?;
        Ok(self.pool.volume(name))
    }

    /// Bytes where it differs from `base` (a snapshot it descends from): its own data.
    pub fn bytes_differing_from(&self, base: &Volume<'_>) -> Result<u64, Error> {
        let ranges = self
            .pool
            .host
            .block
            .diff(&self.pool.name, &self.name, Some(&base.name))?;
        Ok(ranges.iter().map(|r| r.length).sum())
    }

    /// Deletes it.
    pub fn delete(self) -> Result<(), Error> {
        self.pool
            .host
            .block
            .delete_volume(&self.pool.name, &self.name)
    }
}

/// A VM's NIC and disk on a host ([`Host::attach_vm`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmAttachment {
    /// The port's (and the VM's) name.
    pub name: String,
    /// The NIC's MAC address.
    pub mac: String,
    /// The tenant's MTU, for the guest (QEMU `host_mtu`).
    pub mtu: Option<u16>,
    /// vswitchd's vhost-user-net socket for the NIC.
    pub net_socket: PathBuf,
    /// vblockd's vhost-user-blk socket for the disk.
    pub disk_socket: PathBuf,
    /// The disk's pool.
    pub pool: String,
    /// The disk's volume.
    pub volume: String,
}

impl VmAttachment {
    /// QEMU arguments for the NIC and the disk, with the shared guest memory vhost-user
    /// needs (`memory` bytes; give QEMU `-m` the same). Both sockets reconnect after a
    /// daemon restart.
    pub fn qemu_args(&self, memory: u64) -> Vec<String> {
        let mib = memory >> 20;
        let mut nic = format!("virtio-net-pci,netdev=net0,mac={},romfile=", self.mac);
        if let Some(mtu) = self.mtu {
            nic.push_str(&format!(",host_mtu={mtu}"));
        }
        [
            "-object".to_owned(),
            format!("memory-backend-memfd,id=mem,size={mib}M,share=on"),
            "-numa".to_owned(),
            "node,memdev=mem".to_owned(),
            "-chardev".to_owned(),
            format!(
                "socket,id=net0,path={},reconnect=1",
                self.net_socket.display()
            ),
            "-netdev".to_owned(),
            "vhost-user,id=net0,chardev=net0".to_owned(),
            "-device".to_owned(),
            nic,
            "-chardev".to_owned(),
            format!(
                "socket,id=disk0,path={},reconnect=1",
                self.disk_socket.display()
            ),
            "-device".to_owned(),
            "vhost-user-blk-pci,chardev=disk0,num-queues=1".to_owned(),
        ]
        .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_args_share_memory_and_name_both_sockets() {
        let vm = VmAttachment {
            name: "vm1".into(),
            mac: "02:00:00:00:00:01".into(),
            mtu: Some(1450),
            net_socket: "/run/libvirtual/vhost/vm1.sock".into(),
            disk_socket: "/run/libvirtual/vhost/root.sock".into(),
            pool: "p".into(),
            volume: "root".into(),
        };
        let args = vm.qemu_args(512 << 20).join(" ");
        assert!(args.contains("size=512M,share=on"), "{args}");
        assert!(args.contains("path=/run/libvirtual/vhost/vm1.sock,reconnect=1"));
        assert!(args.contains("mac=02:00:00:00:00:01,romfile=,host_mtu=1450"));
        assert!(args.contains("path=/run/libvirtual/vhost/root.sock,reconnect=1"));
    }
}
