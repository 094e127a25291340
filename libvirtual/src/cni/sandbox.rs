//! The container side: the interface inside the container's network namespace, configured
//! and inspected over rtnetlink from a thread that entered the namespace (the caller's
//! threads keep theirs).

use std::fs::File;
use std::net::IpAddr;
use std::path::Path;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteVia};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::spec::{CniError, code};

/// What the interface looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    /// Its MAC address.
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// Its addresses with prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    /// Main-table routes through it: destination, prefix length, gateway.
    pub routes: Vec<(IpAddr, u8, Option<IpAddr>)>,
}

/// How the interface is to be set up.
#[derive(Clone, Debug)]
pub struct Setup {
    /// MAC address.
    pub mac: [u8; 6],
    /// MTU.
    pub mtu: u32,
    /// Addresses with prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    /// Routes: destination, prefix length, gateway.
    pub routes: Vec<(IpAddr, u8, Option<IpAddr>)>,
}

fn setup_err(what: &str, e: impl std::fmt::Display) -> CniError {
    CniError::new(code::INTERFACE_SETUP, what.to_owned()).with_details(e.to_string())
}

/// Opens the namespace file; a missing one is "unknown container".
pub fn open(netns: &Path) -> Result<File, CniError> {
    File::open(netns).map_err(|e| {
        CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("cannot open network namespace {}", netns.display()),
        )
        .with_details(e.to_string())
    })
}

/// Runs `f` with a netlink handle inside `netns`, on a thread of its own.
fn inside<T: Send + 'static, F>(
    netns: File,
    f: impl FnOnce(Handle, Option<u32>) -> F + Send + 'static,
    ifname: String,
) -> Result<T, CniError>
where
    F: Future<Output = Result<T, CniError>>,
{
    std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| setup_err("entering the container's network namespace", e))?;
        let index = nix::net::if_::if_nametoindex(ifname.as_str()).ok();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| setup_err("starting a netlink runtime", e))?;
        rt.block_on(async move {
            let (conn, handle, _) =
                rtnetlink::new_connection().map_err(|e| setup_err("opening netlink", e))?;
            let task = tokio::spawn(conn);
            let out = f(handle, index).await;
            task.abort();
            out
        })
    })
    .join()
    .map_err(|_| setup_err("netlink thread", "panicked"))?
}

/// Whether interface `ifname` exists in `netns`.
pub fn has_interface(netns: &Path, ifname: &str) -> Result<bool, CniError> {
    inside(
        open(netns)?,
        |_, index| async move { Ok(index.is_some()) },
        ifname.into(),
    )
}

/// Sets MAC, MTU, addresses and routes of `ifname` in `netns` and brings it up.
pub fn configure(netns: &Path, ifname: &str, setup: Setup) -> Result<(), CniError> {
    let name = ifname.to_owned();
    inside(
        open(netns)?,
        move |h, index| async move {
            let idx = index.ok_or_else(|| setup_err("no interface", &name))?;
            h.link()
                .set(
                    LinkUnspec::new_with_index(idx)
                        .address(setup.mac.to_vec())
                        .mtu(setup.mtu)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| setup_err("setting MAC, MTU and link up", e))?;
            for (ip, prefix) in setup.addresses {
                h.address()
                    .add(idx, ip, prefix)
                    .execute()
                    .await
                    .map_err(|e| setup_err(&format!("adding address {ip}/{prefix}"), e))?;
            }
            for (dst, prefix, gw) in setup.routes {
                let msg = match (dst, gw) {
                    (IpAddr::V4(d), gw) => {
                        let mut b = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                            .destination_prefix(d, prefix)
                            .output_interface(idx);
                        if let Some(IpAddr::V4(g)) = gw {
                            b = b.gateway(g);
                        }
                        b.build()
                    }
                    (IpAddr::V6(d), gw) => {
                        let mut b = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                            .destination_prefix(d, prefix)
                            .output_interface(idx);
                        if let Some(IpAddr::V6(g)) = gw {
                            b = b.gateway(g);
                        }
                        b.build()
                    }
                };
                h.route().add(msg).execute().await.map_err(|e| {
                    setup_err(&format!("adding route {dst}/{prefix} via {gw:?}"), e)
                })?;
            }
            Ok(())
        },
        ifname.into(),
    )
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The state of `ifname` in `netns`, or None if there is no such interface.
pub fn inspect(netns: &Path, ifname: &str) -> Result<Option<LinkState>, CniError> {
    inside(
        open(netns)?,
        move |h, index| async move {
            let Some(idx) = index else {
                return Ok(None);
            };
            let read = |e| setup_err("reading the interface", e);
            let link = h
                .link()
                .get()
                .match_index(idx)
                .execute()
                .try_next()
                .await
                .map_err(read)?
                .ok_or_else(|| setup_err("reading the interface", "vanished"))?;
            let mut state = LinkState {
                mac: [0; 6],
                mtu: 0,
                up: link.header.flags.contains(LinkFlags::Up),
                addresses: Vec::new(),
                routes: Vec::new(),
            };
            for a in &link.attributes {
                match a {
                    LinkAttribute::Address(m) if m.len() == 6 => state.mac.copy_from_slice(m),
                    LinkAttribute::Mtu(m) => state.mtu = *m,
                    _ => {}
                }
            }
            let mut addrs = h.address().get().set_link_index_filter(idx).execute();
            while let Some(a) = addrs.try_next().await.map_err(read)? {
                for attr in &a.attributes {
                    if let AddressAttribute::Address(ip) = attr {
                        state.addresses.push((*ip, a.header.prefix_len));
                    }
                }
            }
            for family in [4u8, 6] {
                let query = if family == 4 {
                    RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
                } else {
                    RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
                };
                let mut routes = h.route().get(query).execute();
                while let Some(r) = routes.try_next().await.map_err(read)? {
                    let mut dst = None;
                    let mut gw = None;
                    let mut oif = None;
                    for attr in &r.attributes {
                        match attr {
                            RouteAttribute::Destination(a) => dst = route_ip(a),
                            RouteAttribute::Gateway(a) => gw = route_ip(a),
                            RouteAttribute::Via(RouteVia::Inet(v4)) => gw = Some(IpAddr::V4(*v4)),
                            RouteAttribute::Via(RouteVia::Inet6(v6)) => gw = Some(IpAddr::V6(*v6)),
                            RouteAttribute::Oif(i) => oif = Some(*i),
                            _ => {}
                        }
                    }
                    if oif != Some(idx) {
                        continue;
                    }
                    let dst = dst.unwrap_or(if family == 4 {
                        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
                    } else {
                        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                    });
                    state
                        .routes
                        .push((dst, r.header.destination_prefix_length, gw));
                }
            }
            Ok(Some(state))
        },
        ifname.into(),
    )
}
