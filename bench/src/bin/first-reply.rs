//! A new endpoint's first exchange, cluster against flood-and-learn: three vswitchd hosts in
//! network namespaces on one underlay, a container on each (a TAP port pinned to its MAC and
//! address), run twice: standalone with every host configured as the others' VTEP
//! (flood-and-learn, as before the control plane), and as a cluster on an etcd member. For
//! every ordered pair of containers, with both neighbour caches empty, it times the first
//! ping's round trip (ARP resolution included) and a second one, and counts the ARP requests
//! that crossed the underlay (each copy on each link it crossed).
//!
//! `cargo run --release -p bench --bin first-reply -- [--rounds 5] [--json]` (root).

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use clap::Parser;
use serde_json::json;
use testbeds::daemon::{Daemon, start_vswitchd};
use testbeds::etcd::EtcdCluster;
use testbeds::netns::Netns;
use testbeds::switch_bed::{ArpWatch, Underlay};

/// First-reply latency and ARP copies, cluster against flood-and-learn.
#[derive(Debug, Parser)]
#[command(name = "first-reply")]
struct Args {
    /// Rounds over all pairs.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

struct Bed {
    ul: Underlay,
    _etcd: Option<EtcdCluster>,
    _hosts: Vec<(Netns, Daemon)>,
    containers: Vec<(Netns, Ipv4Addr)>,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Three hosts and a container on each, as a cluster or flood-and-learn.
fn bed(cluster: bool, dir: &Path) -> Result<Bed, String> {
    let mut ul = Underlay::new().map_err(err)?;
    let etcd = if cluster {
        Some(
            EtcdCluster::start(
                &mut ul,
                &[Ipv4Addr::new(192, 168, 79, 100)],
                &dir.join("etcd"),
            )
            .map_err(err)?,
        )
    } else {
        None
    };
    let ips: Vec<Ipv4Addr> = (1..=3).map(|n| Ipv4Addr::new(192, 168, 79, n)).collect();
    let mut hosts = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let ns = ul.host(&format!("fr{i}"), *ip).map_err(err)?;
        let name = format!("h{i}");
        let extra: Vec<String> = match &etcd {
            Some(e) => vec![
                "--cluster".into(),
                e.endpoints(),
                "--host-name".into(),
                name,
            ],
            None => Vec::new(),
        };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut all = vec!["--workers", "1"];
        all.extend(extra);
        let d = start_vswitchd(&ns, (*ip).into(), &dir.join(format!("h{i}")), &all).map_err(err)?;
        hosts.push((ns, d));
    }
    let tenant = r#"{"name":"fr","vni":4242}"#;
    if cluster {
        hosts[0].1.create("/v1/tenants", tenant).map_err(err)?;
        for (_, d) in &hosts {
            testbeds::wait::until("the tenant everywhere", Duration::from_secs(30), || {
                d.request("GET", "/v1/tenants/fr", None)
                    .is_ok_and(|(s, _)| s == 200)
            })
            .map_err(err)?;
        }
    } else {
        for (i, (_, d)) in hosts.iter().enumerate() {
            d.create("/v1/tenants", tenant).map_err(err)?;
            for (k, ip) in ips.iter().enumerate() {
                if k != i {
                    d.create("/v1/tenants/fr/vteps", &format!(r#"{{"ip":"{ip}"}}"#))
                        .map_err(err)?;
                }
            }
        }
    }
    let mut containers = Vec::new();
    for (i, (_, d)) in hosts.iter().enumerate() {
        let ns = Netns::create(&format!("frc{i}")).map_err(err)?;
        let ip = Ipv4Addr::new(10, 77, 0, 10 + i as u8);
        let mac = format!("02:77:00:00:00:{i:02x}");
        d.create(
            "/v1/ports",
            &format!(
                r#"{{"name":"frp{i}","tenant":"fr","mac":"{mac}","ips":["{ip}"],"netns":"/run/netns/{}","ifname":"eth0"}}"#,
                ns.name()
            ),
        )
        .map_err(err)?;
        ns.ip(&["link", "set", "eth0", "address", &mac])
            .map_err(err)?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])
            .map_err(err)?;
        ns.ip(&["link", "set", "eth0", "up"]).map_err(err)?;
        containers.push((ns, ip));
    }
    if cluster {
        // Every host has the others' bindings.
        for (_, d) in &hosts {
            testbeds::wait::until("the bindings everywhere", Duration::from_secs(30), || {
                d.request("GET", "/v1/cluster/bindings", None)
                    .ok()
                    .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
                    .and_then(|v| v.as_array().map(Vec::len))
                    == Some(3)
            })
            .map_err(err)?;
        }
    }
    Ok(Bed {
        ul,
        _etcd: etcd,
        _hosts: hosts,
        containers,
    })
}

/// One ping's round trip in milliseconds, if answered.
fn rtt(ns: &Netns, to: Ipv4Addr) -> Option<f64> {
    let out = ns
        .command("ping", &["-n", "-c", "1", "-W", "5", &to.to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let t = text.split("time=").nth(1)?;
    t.split_whitespace().next()?.parse().ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn measure(cluster: bool, args: &Args, dir: &Path) -> Result<serde_json::Value, String> {
    let bed = bed(
        cluster,
        &dir.join(if cluster { "cluster" } else { "flood" }),
    )?;
    let (mut first, mut second) = (Vec::new(), Vec::new());
    let mut lost = 0;
    let watch = ArpWatch::start(&bed.ul).map_err(err)?;
    let mut exchanges = 0;
    for _ in 0..args.rounds {
        for (a, _) in &bed.containers {
            for (b, ip) in &bed.containers {
                if a.name() == b.name() {
                    continue;
                }
                for (ns, _) in &bed.containers {
                    ns.ip(&["neigh", "flush", "all"]).map_err(err)?;
                }
                exchanges += 1;
                match rtt(a, *ip) {
                    Some(t) => first.push(t),
                    None => lost += 1,
                }
                if let Some(t) = rtt(a, *ip) {
                    second.push(t);
                }
            }
        }
    }
    let (vxlan, arp) = watch.finish();
    Ok(json!({
        "mode": if cluster { "cluster" } else { "flood-and-learn" },
        "exchanges": exchanges,
        "first_reply_ms_median": median(first),
        "second_reply_ms_median": median(second),
        "lost_first": lost,
        "underlay_arp_request_copies_per_exchange": arp as f64 / exchanges as f64,
        "underlay_vxlan_datagrams": vxlan,
    }))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(why) = testbeds::netns::missing_privileges() {
        eprintln!("first-reply: {why}");
        return std::process::ExitCode::FAILURE;
    }
    let dir = std::env::temp_dir().join(format!("first-reply-{}", std::process::id()));
    let result = (|| {
        let flood = measure(false, &args, &dir)?;
        let cluster = measure(true, &args, &dir)?;
        Ok::<_, String>((flood, cluster))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok((flood, cluster)) => {
            if args.json {
                println!("{}", json!([flood, cluster]));
            } else {
                println!(
                    "{:<16} {:>12} {:>12} {:>10} {:>22}",
                    "mode", "first ping", "second ping", "lost", "ARP copies/exchange"
                );
                for r in [&flood, &cluster] {
                    println!(
                        "{:<16} {:>10.3}ms {:>10.3}ms {:>10} {:>22.1}",
                        r["mode"].as_str().unwrap_or(""),
                        r["first_reply_ms_median"].as_f64().unwrap_or(f64::NAN),
                        r["second_reply_ms_median"].as_f64().unwrap_or(f64::NAN),
                        r["lost_first"],
                        r["underlay_arp_request_copies_per_exchange"]
                            .as_f64()
                            .unwrap_or(f64::NAN),
                    );
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("first-reply: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
