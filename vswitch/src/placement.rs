//! Placing a port's interface: moving it into another network namespace (a container's),
//! renaming it there and setting its MTU, over rtnetlink.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};
use rtnetlink::LinkUnspec;

use crate::Error;

/// Where a port's interface lives, if not in the switch's own namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`).
    pub netns: PathBuf,
    /// The interface's name there (e.g. `eth0`).
    pub ifname: String,
}

impl Placement {
    /// The switch's own namespace, as `ifname`: a veth end left for a runtime that moves
    /// and renames it itself (Docker's remote network drivers).
    pub fn here(ifname: String) -> Placement {
        Placement {
            netns: PathBuf::from("/proc/self/ns/net"),
            ifname,
        }
    }

    /// Whether this is [`Placement::here`].
    pub fn is_here(&self) -> bool {
        self.netns == std::path::Path::new("/proc/self/ns/net")
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::Io(what, e)
}

/// A netlink error with its errno kept (so that `EEXIST` stays `AlreadyExists`).
fn rt_err(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> Error {
    move |e| {
        let io = match &e {
            rtnetlink::Error::NetlinkError(m) if m.raw_code() < 0 => {
                std::io::Error::from_raw_os_error(-m.raw_code())
            }
            _ => std::io::Error::other(e.to_string()),
        };
        Error::Io(what.into(), io)
    }
}

/// Opens a namespace file.
pub fn open_netns(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(io(format!("opening network namespace {}", path.display())))
}

/// Runs `f` on a fresh thread, inside `netns` if given (the caller's thread keeps its own).
pub fn in_netns<T: Send + 'static>(
    netns: Option<File>,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    std::thread::spawn(move || {
        if let Some(ns) = &netns {
            setns(ns, CloneFlags::CLONE_NEWNET).map_err(|e| Error::Io("setns".into(), e.into()))?;
        }
        f()
    })
    .join()
    .map_err(|_| Error::invalid("placement", "namespace thread panicked"))?
}

/// Runs netlink requests built by `f` on the calling thread's namespace.
fn netlink<F>(f: impl FnOnce(rtnetlink::Handle) -> F) -> Result<(), Error>
where
    F: Future<Output = Result<(), Error>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(io("tokio runtime"))?;
    rt.block_on(async move {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(io("netlink socket"))?;
        let task = tokio::spawn(conn);
        let out = f(handle).await;
        task.abort();
        out
    })
}

fn index_of(name: &str) -> Result<u32, Error> {
    nix::net::if_::if_nametoindex(name)
        .map_err(|e| Error::Io(format!("no interface {name}"), e.into()))
}

/// Sets the MTU of interface `name` in the caller's namespace.
pub fn set_mtu(name: &str, mtu: u16) -> Result<(), Error> {
    let idx = index_of(name)?;
    netlink(|h| async move {
        h.link()
            .set(LinkUnspec::new_with_index(idx).mtu(mtu as u32).build())
            .execute()
            .await
            .map_err(rt_err("setting MTU"))
    })
}

/// Moves interface `name` from the caller's namespace into `placement.netns`, renames it to
/// `placement.ifname` there and sets its MTU.
pub fn place(name: &str, placement: &Placement, mtu: u16) -> Result<(), Error> {
    let target = open_netns(&placement.netns)?;
    let idx = index_of(name)?;
    let fd = target.as_raw_fd();
    netlink(|h| async move {
        h.link()
            .set(LinkUnspec::new_with_index(idx).setns_by_fd(fd).build())
            .execute()
            .await
            .map_err(rt_err("moving the interface"))
    })?;
    let (old, new) = (name.to_owned(), placement.ifname.clone());
    in_netns(Some(target), move || {
        let idx = index_of(&old)?;
        netlink(|h| async move {
            h.link()
                .set(
                    LinkUnspec::new_with_index(idx)
                        .name(new)
                        .mtu(mtu as u32)
                        .build(),
                )
                .execute()
                .await
                .map_err(rt_err("renaming the interface"))
        })
    })
}

/// Creates a veth pair: `host` (the switch's end) in the caller's namespace — up, no ARP,
/// no IPv6 — and its peer directly in `placement.netns` as `placement.ifname`, both with MTU
/// `mtu` (one netlink request; no move or rename afterwards).
pub fn create_veth(host: &str, placement: &Placement, mtu: u16) -> Result<(), Error> {
    use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
    let target = open_netns(&placement.netns)?;
    let fd = target.as_raw_fd();
    let peer = LinkUnspec::new_with_name(&placement.ifname)
        .mtu(mtu as u32)
        .setns_by_fd(fd)
        .build();
    let pair =
        rtnetlink::LinkMessageBuilder::<rtnetlink::LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host.to_owned())
            .mtu(mtu as u32)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
    netlink(|handle| async move {
        handle
            .link()
            .add(pair)
            .execute()
            .await
            .map_err(rt_err("creating a veth pair"))
    })?;
    drop(target);
    // The host end is a switch port, not an interface of this host: no IPv6 link-local
    // address, router solicitations or neighbour discovery of its own on the tenant.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{host}/disable_ipv6"), "1");
    let idx = index_of(host)?;
    netlink(|handle| async move {
        handle
            .link()
            .set(LinkUnspec::new_with_index(idx).arp(false).up().build())
            .execute()
            .await
            .map_err(rt_err("bringing the veth up"))
    })
}

/// Deletes interface `name` of the caller's namespace (a veth takes its peer along); one
/// that is gone already is fine.
pub fn delete_link(name: &str) -> Result<(), Error> {
    let Ok(idx) = index_of(name) else {
        return Ok(());
    };
    netlink(|handle| async move {
        match handle.link().del(idx).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
            r => r.map_err(rt_err("deleting the interface")),
        }
    })
}
