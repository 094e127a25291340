//! The `switch` suite: iperf3 TCP and 64-byte UDP between tenant endpoints on two netns
//! hosts over VXLAN, through vswitch and through the kernel's vxlan + bridge.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::time::Duration;

use testbeds::netns::Netns;
use testbeds::switch_bed::{KernelHost, SwitchHost, Underlay};

use crate::Row;

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

pub(crate) fn tcp_gbps(
    client: &Netns,
    server: &Netns,
    to: IpAddr,
    secs: u32,
) -> Result<f64, String> {
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

/// Runs the suite (`secs` per measurement, `workers` datapath threads per host).
pub fn suite(secs: u32, workers: usize) -> Result<Vec<Row>, String> {
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
            peer_name: "kernel vxlan+br",
        },
        Row {
            name: "switch/udp_64B",
            ours: ours_udp,
            peer: peer_udp,
            unit: "Mpps",
            peer_name: "kernel vxlan+br",
        },
    ])
}
