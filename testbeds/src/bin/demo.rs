//! The libvirtual demo (for now: the overlay interop tour).
//!
//! Builds, in network namespaces, a Linux kernel VTEP (vxlan + bridge, tenants in VNI 42 and
//! 43 with the same subnet) and a userspace VTEP built on overlay-net with a smoltcp host in
//! VNI 42, then shows ping, a TCP transfer and tenant isolation over IPv4 and IPv6 underlays,
//! through a UDP socket and through raw frames. Needs root. Cleans up, also on Ctrl-C.

use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use overlay_net::UnderlayFamily;
use testbeds::kernel_peer::{ScenarioReport, run_scenario};
use testbeds::netns::{missing_privileges, remove_all};
use testbeds::transport::TransportKind;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Family {
    V4,
    V6,
    All,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Transport {
    Udp,
    Raw,
    All,
}

/// Interop tour: Linux kernel VXLAN <-> overlay-net userspace VTEP.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Underlay address family.
    #[arg(long, value_enum, default_value = "all")]
    family: Family,
    /// Userspace VTEP transport: UDP socket, raw AF_PACKET frames, or both.
    #[arg(long, value_enum, default_value = "all")]
    transport: Transport,
    /// Bytes of the TCP transfer (echoed back).
    #[arg(long, default_value_t = 8 << 20)]
    bytes: usize,
    /// Skip the vswitchd part.
    #[arg(long)]
    skip_switch: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(why) = missing_privileges() {
        eprintln!("demo: cannot run: {why}. Run as root (see README).");
        return ExitCode::from(2);
    }
    if let Err(e) = ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: removing the namespaces this demo made");
        remove_all();
        std::process::exit(130);
    }) {
        eprintln!("demo: warning: no Ctrl-C handler ({e}); namespaces may stay behind on Ctrl-C");
    }
    let families: &[UnderlayFamily] = match args.family {
        Family::V4 => &[UnderlayFamily::V4],
        Family::V6 => &[UnderlayFamily::V6],
        Family::All => &[UnderlayFamily::V4, UnderlayFamily::V6],
    };
    let kinds: &[TransportKind] = match args.transport {
        Transport::Udp => &[TransportKind::Udp],
        Transport::Raw => &[TransportKind::Raw],
        Transport::All => &[TransportKind::Udp, TransportKind::Raw],
    };
    println!("libvirtual demo: Linux kernel VXLAN (VNI 42 + 43, bridge, veth tenants)");
    println!("             <-> overlay-net userspace VTEP + smoltcp host 10.42.0.2 in VNI 42\n");
    let mut all_passed = true;
    let mut rows = Vec::new();
    for &family in families {
        for &kind in kinds {
            print!("  {} underlay, {kind}: ", family_name(family));
            let _ = std::io::Write::flush(&mut std::io::stdout());
            match run_scenario(family, kind, args.bytes) {
                Ok(r) => {
                    println!("{}", if r.passed() { "PASS" } else { "FAIL" });
                    all_passed &= r.passed();
                    rows.push(r);
                }
                Err(e) => {
                    println!("ERROR: {e}");
                    all_passed = false;
                }
            }
        }
    }
    println!();
    print_table(&rows);
    if args.skip_switch {
        println!("\n(vswitchd part skipped)");
    } else {
        println!(
            "\nlibvirtual demo, part 2: vswitchd on two hosts + a kernel vxlan host; tenants a (VNI 100)"
        );
        println!(
            "and b (VNI 200) both use 10.0.0.0/24; every endpoint pings 10.0.0.1, .2 and .9\n"
        );
        match testbeds::switch_demo::run() {
            Ok(tour) => {
                print_tour(&tour);
                all_passed &= tour.passed();
            }
            Err(e) => {
                println!("  ERROR: {e}");
                all_passed = false;
            }
        }
    }
    if all_passed {
        println!("\nall checks passed; every namespace was removed");
        ExitCode::SUCCESS
    } else {
        println!("\nsome checks FAILED");
        ExitCode::FAILURE
    }
}

fn family_name(f: UnderlayFamily) -> &'static str {
    match f {
        UnderlayFamily::V4 => "IPv4",
        UnderlayFamily::V6 => "IPv6",
    }
}

fn print_table(rows: &[ScenarioReport]) {
    println!(
        "{:<9} {:<11} {:>10} {:>6} {:>9} {:>22} {:>11} {:>13} {:>9}",
        "underlay",
        "transport",
        "MTU us/k",
        "ping",
        "ping@MTU",
        "TCP echo (both ways)",
        "VNI43 ping",
        "VNI43 probe",
        "VNI43 drop"
    );
    for r in rows {
        let mbit = (2 * r.tcp.bytes) as f64 * 8.0 / r.tcp.elapsed.as_secs_f64() / 1e6;
        let tcp = format!(
            "{} MiB {} {:.0} Mb/s",
            r.tcp.bytes >> 20,
            if r.tcp.echo_matches && r.tcp.host_crc32 == Some(r.tcp.client_crc32) {
                "crc ok"
            } else {
                "BAD"
            },
            mbit
        );
        println!(
            "{:<9} {:<11} {:>10} {:>6} {:>9} {:>22} {:>11} {:>13} {:>9}",
            family_name(r.family),
            r.kind.to_string(),
            format!("{}/{}", r.inner_mtu, r.kernel_vxlan_mtu),
            format!("{}/{}", r.ping.received, r.ping.sent),
            format!("{}/{}", r.ping_full_mtu.received, r.ping_full_mtu.sent),
            tcp,
            format!(
                "{}/{}",
                r.other_tenant_ping.received, r.other_tenant_ping.sent
            ),
            if r.foreign_vni_probe_answered {
                "DELIVERED"
            } else {
                "not delivered"
            },
            r.foreign_vni_dropped,
        );
    }
    println!(
        "\nping: kernel tenant -> smoltcp host; ping@MTU fills the {}-byte tenant MTU with DF set.\n\
         VNI43 ping: the VNI-43 tenant (same IP) must reach nobody; VNI43 probe: an echo request\n\
         sent in VNI 43 to the VNI-42 tenant's MAC must not be delivered (VNI 42 control: answered).",
        rows.first().map_or(1450, |r| r.inner_mtu)
    );
}

fn print_tour(t: &testbeds::switch_demo::SwitchTour) {
    print!("  {:<10}", "from \\ to");
    for ip in &t.targets {
        print!("{:<16}", ip.to_string());
    }
    println!();
    for (i, row) in t.answers.iter().enumerate() {
        let me = &t.endpoints[i];
        print!("  {:<10}", me.name);
        for (ans, ip) in row.iter().zip(&t.targets) {
            let cell = match ans {
                _ if *ip == me.ip => "(self)".to_owned(),
                Some(j) => format!("-> {}", t.endpoints[*j].name),
                None => "no answer".to_owned(),
            };
            print!("{cell:<16}");
        }
        println!();
    }
    println!("\n  counters from the vswitchd APIs:");
    for c in &t.counters {
        println!("    {c}");
    }
    println!(
        "\n  {}: answers come only from the pinger's own tenant",
        if t.passed() { "PASS" } else { "FAIL" }
    );
}
