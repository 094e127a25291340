//! Side-by-side comparisons with peers, in one run on one machine.
//!
//! `cargo run --release -p bench --bin compare -- switch [--quick] [--json] [--workers N]`
//! (root; `--workers`: datapath threads per vswitch host, default one per core): iperf3
//! TCP throughput and 64-byte UDP packet rate between two tenant endpoints on two netns hosts
//! over VXLAN, through vswitch's datapath and through the Linux kernel (vxlan + bridge), and
//! the ratio (> 1: ours is better). `--json` prints `[{"name","ours","peer","unit","ratio"}]`.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use testbeds::netns::{Netns, missing_privileges};
use testbeds::switch_bed::{KernelHost, SwitchHost, Underlay};

struct Row {
    name: &'static str,
    ours: f64,
    peer: f64,
    unit: &'static str,
}

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, 0, n)
}

/// Runs an iperf3 client in `client` against a one-off server in `server`; returns the
/// client's JSON report.
fn iperf3(
    client: &Netns,
    server: &Netns,
    to: IpAddr,
    args: &[&str],
) -> Result<serde_json::Value, String> {
    let mut srv = server
        .command("iperf3", &["-s", "-1", "-B", &to.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("iperf3 server: {e}"))?;
    std::thread::sleep(Duration::from_millis(300));
    let to = to.to_string();
    let mut cargs = vec!["-c", to.as_str(), "-J"];
    cargs.extend_from_slice(args);
    let out = client
        .command("iperf3", &cargs)
        .output()
        .map_err(|e| format!("iperf3: {e}"))?;
    let _ = srv.wait();
    serde_json::from_slice(&out.stdout).map_err(|e| format!("iperf3 output: {e}"))
}

fn tcp_gbps(client: &Netns, server: &Netns, to: IpAddr, secs: u32) -> Result<f64, String> {
    let j = iperf3(client, server, to, &["-t", &secs.to_string()])?;
    j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| format!("no TCP result: {}", j["error"]))
}

fn udp64_mpps(client: &Netns, server: &Netns, to: IpAddr, secs: u32) -> Result<f64, String> {
    // 18 bytes of UDP payload: 64-byte Ethernet frames (with FCS).
    let j = iperf3(
        client,
        server,
        to,
        &["-u", "-l", "18", "-b", "0", "-t", &secs.to_string()],
    )?;
    let sum = &j["end"]["sum"];
    let packets = sum["packets"].as_f64().unwrap_or(0.0);
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let seconds = sum["seconds"].as_f64().unwrap_or(secs as f64);
    if packets == 0.0 {
        return Err(format!("no UDP result: {}", j["error"]));
    }
    Ok((packets - lost) / seconds / 1e6)
}

fn switch_suite(secs: u32, workers: usize) -> Result<Vec<Row>, String> {
    let e = |e: testbeds::Error| e.to_string();
    // Ours: two hosts running the vswitch datapath.
    let mut ul = Underlay::new().map_err(e)?;
    let h1 = SwitchHost::with_options(&mut ul, 1, false, workers).map_err(e)?;
    let h2 = SwitchHost::with_options(&mut ul, 2, false, workers).map_err(e)?;
    h1.tenant("a", 100, &[h2.ip]).map_err(e)?;
    h2.tenant("a", 100, &[h1.ip]).map_err(e)?;
    let a1 = h1
        .endpoint("a", "tapa1", ip(1), "02:00:00:00:00:01")
        .map_err(e)?;
    let a2 = h2
        .endpoint("a", "tapa2", ip(2), "02:00:00:00:00:02")
        .map_err(e)?;
    let ours_tcp = tcp_gbps(&a1, &a2, ip(2).into(), secs)?;
    let ours_udp = udp64_mpps(&a1, &a2, ip(2).into(), secs)?;
    drop((a1, a2, h1, h2, ul));
    // The peer: the same topology with the kernel's vxlan + bridge.
    let mut ul = Underlay::new().map_err(e)?;
    let peers = |n: u8| vec![IpAddr::from(Ipv4Addr::new(198, 18, 0, n))];
    let k1 = KernelHost::new(&mut ul, 1, 100, &peers(2), ip(1)).map_err(e)?;
    let k2 = KernelHost::new(&mut ul, 2, 100, &peers(1), ip(2)).map_err(e)?;
    let peer_tcp = tcp_gbps(&k1.endpoint, &k2.endpoint, ip(2).into(), secs)?;
    let peer_udp = udp64_mpps(&k1.endpoint, &k2.endpoint, ip(2).into(), secs)?;
    Ok(vec![
        Row {
            name: "switch/tcp_1_stream",
            ours: ours_tcp,
            peer: peer_tcp,
            unit: "Gbit/s",
        },
        Row {
            name: "switch/udp_64B",
            ours: ours_udp,
            peer: peer_udp,
            unit: "Mpps",
        },
    ])
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let quick = args.iter().any(|a| a == "--quick");
    let suite = args
        .iter()
        .enumerate()
        .find(|(i, a)| !a.starts_with("--") && (*i == 0 || args[i - 1] != "--workers"))
        .map(|(_, a)| a.as_str());
    if let Some(why) = missing_privileges() {
        eprintln!("compare: {why}");
        return ExitCode::from(2);
    }
    if Command::new("iperf3").arg("--version").output().is_err() {
        eprintln!("compare: iperf3 is not installed (apt-get install iperf3)");
        return ExitCode::from(2);
    }
    let secs = if quick { 3 } else { 10 };
    let workers = match args.iter().position(|a| a == "--workers") {
        None => 0,
        Some(i) => match args.get(i + 1).and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => {
                eprintln!("compare: --workers takes a number (0: one per core)");
                return ExitCode::from(2);
            }
        },
    };
    let rows = match suite {
        Some("switch") | None => switch_suite(secs, workers),
        Some(other) => {
            eprintln!("compare: unknown suite {other:?}; suites: switch");
            return ExitCode::from(2);
        }
    };
    let rows = match rows {
        Ok(r) => r,
        Err(e) => {
            eprintln!("compare: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({"name": r.name, "ours": r.ours, "peer": r.peer, "unit": r.unit, "ratio": r.ours / r.peer})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!(
            "{:<22} {:>8} {:>16} {:>8}  unit",
            "comparison", "vswitch", "kernel vxlan+br", "ratio"
        );
        for r in &rows {
            println!(
                "{:<22} {:>8.3} {:>16.3} {:>7.2}x  {}",
                r.name,
                r.ours,
                r.peer,
                r.ours / r.peer,
                r.unit
            );
        }
    }
    ExitCode::SUCCESS
}
