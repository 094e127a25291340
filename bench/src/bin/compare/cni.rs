//! The `cni` suite: two containers on one host attached by `vswitch-cni` (veth and TAP
//! links, one vswitchd datapath worker) against the reference `bridge` plugin (a kernel
//! bridge and veths), both with `host-local` addresses: iperf3 TCP between the containers, and
//! how many attach + detach pairs (CNI ADD then DEL) run per second.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Instant;

use serde_json::{Value, json};
use testbeds::cni::Runtime;
use testbeds::daemon::start_vswitchd;
use testbeds::netns::Netns;
use testbeds::scratch::Scratch;
use testbeds::switch_bed::Underlay;

use crate::Row;
use crate::switch::tcp_gbps;

fn ip_of(result: &Value) -> Result<IpAddr, String> {
    result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("no address in {result}"))
}

/// TCP from one container to another on network `conf`, and ADD+DEL pairs per second.
fn measure(rt: &Runtime, conf: &Value, secs: u32, pairs: usize) -> Result<(f64, f64), String> {
    let e = |e: testbeds::Error| e.to_string();
    let (c1, c2) = (
        Netns::create("c1").map_err(e)?,
        Netns::create("c2").map_err(e)?,
    );
    let path = |n: &Netns| format!("/run/netns/{}", n.name());
    let _r1 = rt.add(conf, "bench1", &path(&c1), "eth0").map_err(e)?;
    let r2 = rt.add(conf, "bench2", &path(&c2), "eth0").map_err(e)?;
    let gbps = tcp_gbps(&c1, &c2, ip_of(&r2)?, secs)?;
    for (id, c) in [("bench1", &c1), ("bench2", &c2)] {
        rt.del(conf, id, Some(&path(c)), "eth0").map_err(e)?;
    }
    let c3 = Netns::create("c3").map_err(e)?;
    let start = Instant::now();
    for i in 0..pairs {
        let id = format!("churn{i}");
        rt.add(conf, &id, &path(&c3), "eth0").map_err(e)?;
        let d = rt.del(conf, &id, Some(&path(&c3)), "eth0").map_err(e)?;
        if !d.ok {
            return Err(format!("DEL {id}: {}", d.out));
        }
    }
    Ok((gbps, pairs as f64 / start.elapsed().as_secs_f64()))
}

/// Runs the suite (`secs` per TCP measurement).
pub fn suite(secs: u32) -> Result<Vec<Row>, String> {
    let e = |e: testbeds::Error| e.to_string();
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-bench-cni").map_err(e)?;
    let mut ul = Underlay::new().map_err(e)?;
    let host = ul.host("h1", Ipv4Addr::new(198, 18, 0, 1)).map_err(e)?;
    let switch = start_vswitchd(
        &host,
        "198.18.0.1".parse().map_err(|_| "address")?,
        dir.path(),
        &["--workers", "1"],
    )
    .map_err(e)?;
    switch
        .create("/v1/tenants", r#"{"name":"a","vni":100}"#)
        .map_err(e)?;
    let rt = Runtime::new().map_err(e)?.on_host(&host);
    let ipam =
        |n: &str| json!({"type": "host-local", "subnet": "10.9.0.0/24", "dataDir": dir.join(n)});
    let ours = |link: &str| {
        json!({"cniVersion": "1.0.0", "name": format!("vsw-{link}"), "type": "vswitch-cni",
               "tenant": "a", "link": link, "socket": dir.join("run/vswitchd.sock"),
               "ipam": ipam(link)})
    };
    let pairs = (secs as usize * 4).max(10);
    let (veth_tcp, veth_rate) = measure(&rt, &ours("veth"), secs, pairs)?;
    let (tap_tcp, _) = measure(&rt, &ours("tap"), secs, pairs)?;
    let bridge = json!({"cniVersion": "1.0.0", "name": "br", "type": "bridge",
                        "bridge": "cni-bench0", "ipam": ipam("bridge")});
    let (br_tcp, br_rate) = measure(&rt, &bridge, secs, pairs)?;
    drop(switch);
    Ok(vec![
        Row {
            name: "cni/tcp_veth",
            ours: veth_tcp,
            peer: br_tcp,
            unit: "Gbit/s",
            peer_name: "bridge plugin",
        },
        Row {
            name: "cni/tcp_tap",
            ours: tap_tcp,
            peer: br_tcp,
            unit: "Gbit/s",
            peer_name: "bridge plugin",
        },
        Row {
            name: "cni/add_del_pairs",
            ours: veth_rate,
            peer: br_rate,
            unit: "pairs/s",
            peer_name: "bridge plugin",
        },
    ])
}
