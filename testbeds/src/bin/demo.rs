//! The libvirtual demo: the whole-system tour ([`testbeds::tour`]): two hosts with vswitchd
//! and vblockd, tenants with overlapping subnets, containers attached by vswitch-cni, a VM
//! booted from a thin clone over vhost-user-net and vhost-user-blk; a connectivity matrix by
//! real pings, the storage thin clones save, the daemons' counters.
//!
//! With `--interop`, also the interop tour: a Linux kernel VTEP (vxlan + bridge) against
//! overlay-net's userspace VTEP (IPv4/IPv6 underlays, UDP socket and raw frames) and vswitchd
//! hosts sharing a tenant with a kernel vxlan host. Needs root. Cleans up, also on Ctrl-C.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use overlay_net::UnderlayFamily;
use testbeds::kernel_peer::{ScenarioReport, run_scenario};
use testbeds::netns::missing_privileges;
use testbeds::tour::{self, Containers, TourOptions, TourReport};
use testbeds::transport::TransportKind;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum PodmanChoice {
    Auto,
    Yes,
    No,
}

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

/// The libvirtual tour: two hosts, two tenants, containers and a VM from a thin clone.
#[derive(Parser)]
#[command(
    version,
    about = "The libvirtual tour: two hosts, tenants with one subnet, containers, a VM from a thin clone"
)]
struct Args {
    /// Containers with podman (`yes`), in plain namespaces (`no`), or podman if installed.
    #[arg(long, value_enum, default_value = "auto")]
    podman: PodmanChoice,
    /// Where the tour's files go while it runs.
    #[arg(long, default_value = "/var/tmp")]
    scratch: std::path::PathBuf,
    /// Also run the interop tour against the Linux kernel's vxlan (about a minute more).
    #[arg(long)]
    interop: bool,
    /// With --interop: underlay address family.
    #[arg(long, value_enum, default_value = "all")]
    family: Family,
    /// With --interop: userspace VTEP transport: UDP socket, raw AF_PACKET frames, or both.
    #[arg(long, value_enum, default_value = "all")]
    transport: Transport,
    /// With --interop: bytes of the TCP transfer (echoed back).
    #[arg(long, default_value_t = 8 << 20)]
    bytes: usize,
    /// With --interop: skip its vswitchd part.
    #[arg(long)]
    skip_switch: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(why) = missing_privileges() {
        eprintln!("demo: cannot run: {why}. Run as root (see README).");
        return ExitCode::from(2);
    }
    if let Err(e) = testbeds::interrupt::install() {
        eprintln!("demo: warning: {e}; namespaces may stay behind on Ctrl-C");
    }
    let started = Instant::now();
    let opts = TourOptions {
        scratch: args.scratch.clone(),
        podman: match args.podman {
            PodmanChoice::Auto => None,
            PodmanChoice::Yes => Some(true),
            PodmanChoice::No => Some(false),
        },
    };
    println!(
        "libvirtual demo: two hosts, tenants a and b on the same subnet, containers, and a VM"
    );
    println!("booted from a thin clone of a golden volume\n");
    let mut say = |line: &str| println!("[{:>5.1}s] {line}", started.elapsed().as_secs_f64());
    let mut all_passed = match tour::run(&opts, &mut say) {
        Ok(report) => {
            print_report(&report);
            report.passed()
        }
        Err(testbeds::Error::Interrupted) => {
            println!("interrupted: everything the demo made was removed");
            return ExitCode::from(130);
        }
        Err(e) => {
            println!("\nERROR: {e}");
            false
        }
    };
    if args.interop && !testbeds::interrupt::requested() {
        all_passed &= interop(&args);
    }
    if all_passed {
        println!(
            "\nall checks passed in {:.0} s; everything the demo made was removed",
            started.elapsed().as_secs_f64()
        );
        ExitCode::SUCCESS
    } else {
        println!("\nsome checks FAILED");
        ExitCode::FAILURE
    }
}

/// The interop tour: kernel vxlan against the userspace VTEP, and vswitchd hosts with a
/// kernel vxlan host in one tenant.
fn interop(args: &Args) -> bool {
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
    println!("\ninterop: Linux kernel VXLAN (VNI 42 + 43, bridge, veth tenants)");
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
            "\ninterop, part 2: vswitchd on two hosts + a kernel vxlan host; tenants a (VNI 100)"
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
    all_passed
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

fn print_report(r: &TourReport) {
    println!(
        "\nConnectivity, measured by ping (a cell names who answered; tenants a and b share 10.0.0.0/24):"
    );
    print!("  {:<14}", "from \\ to");
    for t in &r.targets {
        print!("{:<16}", t.to_string());
    }
    println!();
    for (i, row) in r.answers.iter().enumerate() {
        let me = &r.endpoints[i];
        print!("  {:<14}", format!("{} ({})", me.name, me.tenant));
        for (answer, ip) in row.iter().zip(&r.targets) {
            let cell = match answer {
                _ if *ip == me.ip => "(itself)".to_owned(),
                Some(j) => format!("{} ({})", r.endpoints[*j].name, r.endpoints[*j].tenant),
                None => "-".to_owned(),
            };
            print!("{cell:<16}");
        }
        println!();
    }
    println!(
        "  {}: every endpoint reaches its own tenant on both hosts and nothing of the other",
        if r.isolation_holds() { "PASS" } else { "FAIL" }
    );
    if let Some(d) = &r.docker {
        let cells: Vec<String> = d
            .answers
            .iter()
            .map(|(ip, who)| match who {
                Some(j) => format!("{ip} {} ({})", r.endpoints[*j].name, r.endpoints[*j].tenant),
                None => format!("{ip} -"),
            })
            .collect();
        println!("  Docker {} (a, {}): {}", d.name, d.ip, cells.join(", "));
    }
    println!(
        "  containers: {}",
        match r.containers {
            Containers::Podman => "podman 4 (CNI backend) + vswitch-cni + cluster IPAM",
            Containers::Netns => "network namespaces + vswitch-cni + cluster IPAM",
        }
    );
    println!("\nThe VM (its console):");
    for l in &r.vm_log {
        println!("  {l}");
    }
    let s = &r.storage;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!("\nStorage (vblockd on h1, pool demo):");
    println!(
        "  golden volume      {:>4} MiB virtual, {:>6.1} MiB stored (zeros are not stored)",
        s.size >> 20,
        mib(s.golden_allocated)
    );
    println!(
        "  clone vm1-root     maps {:.1} MiB; {:.1} MiB of it its own (the VM's writes), the rest shared",
        mib(s.clone_allocated),
        mib(s.clone_own)
    );
    println!(
        "  the VM's disk I/O  {} reads ({:.1} MiB), {} writes ({:.1} MiB) through vhost-user-blk",
        s.clone_io.reads,
        mib(s.clone_io.read_bytes),
        s.clone_io.writes,
        mib(s.clone_io.written_bytes)
    );
    println!(
        "  pool data in use   {:.1} MiB for golden + snapshot + clone; full copies would need {:.1} MiB",
        mib(s.pool_used),
        mib(s.golden_allocated * 2 + s.clone_allocated)
    );
    println!(
        "  to h2              golden@v1 replicated by sending {:.1} MiB (its mapped ranges) of {} MiB",
        mib(s.replicated),
        s.size >> 20
    );
    println!(
        "  {}: golden@v1 unchanged after the VM wrote to its clone",
        if s.golden_untouched { "PASS" } else { "FAIL" }
    );
    println!("\n`vctl status` on h1 while the VM ran:");
    for l in r.status.lines() {
        println!("  {l}");
    }
    println!("\nCounters, from the daemons' APIs:");
    for c in &r.counters {
        println!("  {c}");
    }
    print!("\nPhases:");
    for (name, secs) in &r.phases {
        print!("  {name} {secs:.1} s;");
    }
    println!();
}
