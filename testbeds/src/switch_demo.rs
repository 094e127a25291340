//! The vswitchd part of the demo: two hosts running vswitchd (driven only through its API),
//! a third host using the kernel's vxlan, two tenants with the same subnet, a connectivity
//! matrix measured with ping, and the switches' counters.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use crate::Error;
use crate::daemon::{Daemon, start_vswitchd};
use crate::netns::Netns;
use crate::probe::ping;
use crate::switch_bed::{KernelHost, Underlay};

/// One endpoint of the demo.
pub struct Endpoint {
    /// Display name, e.g. `a@h1`.
    pub name: String,
    /// Tenant.
    pub tenant: &'static str,
    /// Address (the tenants share the subnet).
    pub ip: Ipv4Addr,
    /// MAC address (unique, so that an answer tells who sent it).
    pub mac: String,
}

/// What the tour measured.
pub struct SwitchTour {
    /// The endpoints.
    pub endpoints: Vec<Endpoint>,
    /// The addresses every endpoint pinged.
    pub targets: Vec<Ipv4Addr>,
    /// `answers[i][k]`: which endpoint answered endpoint i's ping to `targets[k]`, if any.
    pub answers: Vec<Vec<Option<usize>>>,
    /// `host port tenant rx tx drops` lines from the daemons' APIs.
    pub counters: Vec<String>,
}

impl SwitchTour {
    /// Every answer came from the pinger's own tenant, and every other endpoint of that
    /// tenant answered.
    pub fn passed(&self) -> bool {
        self.answers.iter().enumerate().all(|(i, row)| {
            let me = &self.endpoints[i];
            row.iter().zip(&self.targets).all(|(ans, ip)| {
                let expected = self
                    .endpoints
                    .iter()
                    .position(|e| e.tenant == me.tenant && e.ip == *ip && e.ip != me.ip);
                match (ans, expected) {
                    (Some(a), Some(e)) => *a == e,
                    (None, None) => true,
                    _ => *ip == me.ip,
                }
            })
        })
    }
}

fn post(d: &Daemon, path: &str, body: &str) -> Result<(), Error> {
    let (status, resp) = d.request("POST", path, Some(body))?;
    if status != 201 {
        return Err(Error::Setup(format!("POST {path}: {status} {resp}")));
    }
    Ok(())
}

/// Runs the tour. Needs root and the vswitchd binary next to the running program.
pub fn run() -> Result<SwitchTour, Error> {
    let tmp: PathBuf = std::env::temp_dir().join(format!("libvirtual-demo-{}", std::process::id()));
    let mut ul = Underlay::new()?;
    let mut hosts = Vec::new();
    let mut daemons = Vec::new();
    for n in 1..=2u8 {
        let ip = Ipv4Addr::new(198, 18, 0, n);
        let ns = ul.host(&format!("h{n}"), ip)?;
        let dir = tmp.join(format!("h{n}"));
        daemons.push(start_vswitchd(&ns, ip.into(), &dir, &[])?);
        hosts.push((ns, ip));
    }
    let kernel_peers: Vec<IpAddr> = hosts.iter().map(|(_, ip)| IpAddr::V4(*ip)).collect();
    let kernel = KernelHost::new(&mut ul, 9, 100, &kernel_peers, Ipv4Addr::new(10, 0, 0, 9))?;
    let mut endpoints = Vec::new();
    let mut namespaces: Vec<Netns> = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        let mut peers: Vec<String> = hosts
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (_, ip))| ip.to_string())
            .collect();
        for (tenant, vni) in [("a", 100), ("b", 200)] {
            post(
                d,
                "/v1/tenants",
                &format!(r#"{{"name":"{tenant}","vni":{vni}}}"#),
            )?;
            if tenant == "a" {
                peers.push("198.18.0.9".into());
            }
            for p in &peers {
                post(
                    d,
                    &format!("/v1/tenants/{tenant}/vteps"),
                    &format!(r#"{{"ip":"{p}"}}"#),
                )?;
            }
            let n = i as u8 + 1;
            let ep = Netns::create(&format!("{tenant}{n}"))?;
            let port = format!("{tenant}{n}");
            post(
                d,
                "/v1/ports",
                &format!(
                    r#"{{"name":"{port}","tenant":"{tenant}","netns":"/run/netns/{}","ifname":"eth0"}}"#,
                    ep.name()
                ),
            )?;
            let ip = Ipv4Addr::new(10, 0, 0, n);
            let mac = format!("02:00:00:00:0{tenant}:0{n}");
            ep.ip(&["link", "set", "eth0", "address", &mac])?;
            ep.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            ep.ip(&["link", "set", "eth0", "up"])?;
            endpoints.push(Endpoint {
                name: format!("{tenant}@h{n}"),
                tenant,
                ip,
                mac,
            });
            namespaces.push(ep);
        }
    }
    let kmac = "02:00:00:00:0a:09".to_owned();
    kernel
        .endpoint
        .ip(&["link", "set", "eth0", "address", &kmac])?;
    endpoints.push(Endpoint {
        name: "a@kernel".into(),
        tenant: "a",
        ip: Ipv4Addr::new(10, 0, 0, 9),
        mac: kmac,
    });
    let targets: Vec<Ipv4Addr> = [1, 2, 9].map(|n| Ipv4Addr::new(10, 0, 0, n)).to_vec();
    let all_ns: Vec<&Netns> = namespaces
        .iter()
        .chain(std::iter::once(&kernel.endpoint))
        .collect();
    let mut answers = Vec::new();
    for (i, from) in all_ns.iter().enumerate() {
        let mut row = Vec::new();
        for t in &targets {
            if *t == endpoints[i].ip || ping(from, (*t).into(), 2, 56)?.received == 0 {
                row.push(None);
                continue;
            }
            // Who answered: the MAC the pinger resolved the address to.
            let neigh = from.ip(&["neigh", "show", &t.to_string()])?;
            let who = endpoints.iter().position(|e| neigh.contains(&e.mac));
            row.push(who);
        }
        answers.push(row);
    }
    let mut counters = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        let (_, body) = d.request("GET", "/v1/ports", None)?;
        let ports: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| Error::Setup(format!("ports: {e}")))?;
        for p in ports.as_array().into_iter().flatten() {
            let c = &p["counters"];
            counters.push(format!(
                "h{} {:<6} tenant {}  rx {:>4} pkts  tx {:>4} pkts  drops {}",
                i + 1,
                p["name"].as_str().unwrap_or("?"),
                p["tenant"].as_str().unwrap_or("?"),
                c["rx_packets"],
                c["tx_packets"],
                c["drops"]
            ));
        }
    }
    drop(daemons);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(SwitchTour {
        endpoints,
        targets,
        answers,
        counters,
    })
}
