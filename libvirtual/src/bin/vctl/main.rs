//! vctl: the libvirtual command line.
//!
//! `vctl net ...` drives vswitchd: tenants, ports, remote VTEPs, forwarding tables, counters.
//! `vctl pool|volume|snapshot|clone ...` drive vblockd: pools, thin volumes, snapshots,
//! clones, I/O limits, raw image import/export. Tables for humans, `--output json` for
//! scripts. Exit codes: 0 done, 1 the daemon refused (its error is printed) or a local file
//! failed, 2 bad usage, 3 the daemon cannot be reached. `vctl status` shows everything both
//! daemons run. `vctl completions SHELL` prints a completion script.

mod block;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use libvirtual::Error;
use libvirtual::net::{Client, default_socket};
use serde::Serialize;
use vswitch_api::{CountersInfo, FdbEntrySpec, PortSpec, RateLimitSpec, TenantSpec};

#[derive(Parser)]
#[command(
    name = "vctl",
    version,
    about = "Control libvirtual's daemons",
    after_help = "NAMES: tenants, ports, pools, volumes, snapshots and clones are named with 1 to 64 \
characters of A-Z a-z 0-9 _ . - @, starting with a letter or digit (ports: at most 15, no @).\n\
EXIT CODES: 0 done, 1 the daemon refused or a local file failed, 2 bad usage, 3 a daemon \
cannot be reached.\n\
The daemons' sockets are root-only: run vctl as root."
)]
struct Cli {
    /// Output format.
    #[arg(long, short, value_enum, global = true, default_value = "table")]
    output: Output,
    /// The API socket of the daemon the command talks to [default: RUN_DIR/vswitchd.sock
    /// for `net`, RUN_DIR/vblockd.sock for the others; RUN_DIR is /run/libvirtual as root]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Wait up to this many seconds for the daemon to accept connections (right after
    /// starting it) instead of failing at once.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 0)]
    wait: u64,
    #[command(subcommand)]
    command: Top,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Top {
    /// The virtual switch (vswitchd).
    Net {
        #[command(subcommand)]
        command: Net,
    },
    /// Storage pools (vblockd).
    Pool {
        #[command(subcommand)]
        command: block::PoolCmd,
    },
    /// Thin volumes (vblockd).
    Volume {
        /// The pool.
        #[arg(long, global = true, default_value = "default")]
        pool: String,
        #[command(subcommand)]
        command: block::VolumeCmd,
    },
    /// Read-only snapshots of volumes (vblockd).
    Snapshot {
        /// The pool.
        #[arg(long, global = true, default_value = "default")]
        pool: String,
        #[command(subcommand)]
        command: block::SnapshotCmd,
    },
    /// vhost-user-blk exports of volumes to VMs (vblockd).
    Vhost {
        /// The pool.
        #[arg(long, global = true, default_value = "default")]
        pool: String,
        #[command(subcommand)]
        command: block::VhostCmd,
    },
    /// Writable clones of snapshots (vblockd).
    Clone {
        /// The pool.
        #[arg(long, global = true, default_value = "default")]
        pool: String,
        #[command(subcommand)]
        command: block::CloneCmd,
    },
    /// Everything this host runs: tenants, ports, pools, volumes, VM disk exports, and what
    /// thin provisioning saves (both daemons).
    Status {
        /// vswitchd's API socket.
        #[arg(long)]
        vswitchd_socket: Option<PathBuf>,
        /// vblockd's API socket.
        #[arg(long)]
        vblockd_socket: Option<PathBuf>,
    },
    /// Print a shell completion script (`vctl completions bash > /etc/bash_completion.d/vctl`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum Net {
    /// Tenants: isolated L2 networks keyed by a VXLAN VNI.
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Ports: a container's TAP or veth interface, or a VM's vhost-user-net socket, on a
    /// tenant.
    #[command(subcommand)]
    Port(PortCmd),
    /// Remote VTEPs of a tenant (head-end replication).
    #[command(subcommand)]
    Vtep(VtepCmd),
    /// Forwarding table of a tenant.
    #[command(subcommand)]
    Fdb(FdbCmd),
    /// The cluster: this host's state, the hosts, the bindings.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Prometheus text of every counter.
    Metrics,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// This host's place in the cluster: standalone, or connected / degraded.
    Status,
    /// The hosts of the cluster.
    Members,
    /// The ports of the tenants this host has ports in, on every host.
    Bindings,
    /// The addresses taken in a tenant's subnet.
    Addresses {
        /// The tenant's name.
        tenant: String,
    },
}

#[derive(Subcommand)]
enum TenantCmd {
    /// List tenants.
    List,
    /// Show one tenant.
    Show {
        /// The tenant's name (see NAMES in `vctl --help`).
        name: String,
    },
    /// Create a tenant.
    Create {
        /// The tenant's name (see NAMES in `vctl --help`).
        name: String,
        /// VXLAN network identifier.
        #[arg(long)]
        vni: u32,
        /// MTU (default: what the underlay carries).
        #[arg(long, default_value_t = 0)]
        mtu: u16,
        /// Most learned MAC addresses [default: 8192].
        #[arg(long)]
        max_macs: Option<usize>,
        /// Hear VXLAN from any underlay host and learn VTEPs (flood-and-learn); by default
        /// only the tenant's VTEPs (`vctl net vtep add`) are heard.
        #[arg(long)]
        learn_vteps: bool,
        /// IP subnet for cluster IPAM (`10.0.0.0/24`): addresses unique across hosts.
        #[arg(long)]
        subnet: Option<String>,
    },
    /// Delete a tenant without ports.
    Delete {
        /// The tenant's name (see NAMES in `vctl --help`).
        name: String,
    },
}

#[derive(Subcommand)]
enum PortCmd {
    /// List ports with counters.
    List,
    /// Show one port.
    Show {
        /// The port's name.
        name: String,
    },
    /// Create a port: a TAP, a veth pair (its other end in --netns) or a VM's
    /// vhost-user-net socket.
    Create {
        /// The port's name (also the interface's name in vswitchd's namespace: at most 15 characters).
        name: String,
        /// The tenant it joins.
        #[arg(long)]
        tenant: String,
        /// Port kind.
        #[arg(long, default_value = "tap", value_parser = ["tap", "veth", "vhost-user-net"])]
        kind: String,
        /// Network namespace file to move the interface into.
        #[arg(long)]
        netns: Option<String>,
        /// Interface name inside that namespace.
        #[arg(long)]
        ifname: Option<String>,
        /// Port security: the only source MAC allowed.
        #[arg(long)]
        mac: Option<String>,
        /// Port security: a source IP allowed (repeatable; needs --mac).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// Ingress limit in bits per second.
        #[arg(long)]
        rate_bps: Option<u64>,
        /// Ingress limit in packets per second.
        #[arg(long)]
        rate_pps: Option<u64>,
    },
    /// Delete a port (its interface disappears).
    Delete {
        /// The port's name.
        name: String,
    },
}

#[derive(Subcommand)]
enum VtepCmd {
    /// List a tenant's remote VTEPs.
    List {
        /// The tenant.
        tenant: String,
    },
    /// Add a remote VTEP.
    #[command(visible_alias = "create")]
    Add {
        /// The tenant.
        tenant: String,
        /// The remote VTEP's underlay address (IPv4 or IPv6).
        ip: IpAddr,
        /// The UDP port it listens on, if not this daemon's (`--udp-port`): 8472 for a Linux
        /// peer on its old default or flannel [default: this daemon's port].
        #[arg(long)]
        port: Option<u16>,
    },
    /// Remove a remote VTEP.
    #[command(visible_alias = "delete")]
    Remove {
        /// The tenant.
        tenant: String,
        /// The remote VTEP's underlay address (IPv4 or IPv6).
        ip: IpAddr,
    },
}

#[derive(Subcommand)]
enum FdbCmd {
    /// Show a tenant's forwarding table.
    List {
        /// The tenant.
        tenant: String,
    },
    /// Add a static entry: the MAC lives at a local port or a remote VTEP.
    #[command(visible_alias = "create")]
    Add {
        /// The tenant.
        tenant: String,
        /// The MAC address (02:00:00:00:00:01).
        mac: String,
        /// The local port the MAC lives at.
        #[arg(long, conflicts_with = "vtep", required_unless_present = "vtep")]
        port: Option<String>,
        /// The remote VTEP the MAC lives behind.
        #[arg(long)]
        vtep: Option<IpAddr>,
    },
    /// Remove an entry.
    #[command(visible_alias = "delete")]
    Remove {
        /// The tenant.
        tenant: String,
        /// The MAC address.
        mac: String,
    },
}

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    let out = cli.output;
    let socket = cli.socket;
    if cli.wait > 0 {
        wait_for_socket(&cli.command, socket.as_deref(), cli.wait);
    }
    if socket.is_some() && matches!(cli.command, Top::Status { .. }) {
        eprintln!("vctl: status talks to both daemons: use --vswitchd-socket and --vblockd-socket");
        return ExitCode::from(2);
    }
    let bsock = |s: Option<PathBuf>| {
        libvirtual::block::Client::new(s.unwrap_or_else(libvirtual::block::default_socket))
    };
    let result = match cli.command {
        Top::Net { command } => run(
            &Client::new(socket.unwrap_or_else(default_socket)),
            command,
            out,
        ),
        Top::Pool { command } => block::pool(&bsock(socket), command, out),
        Top::Volume { pool, command } => block::volume(&bsock(socket), &pool, command, out),
        Top::Snapshot { pool, command } => block::snapshot(&bsock(socket), &pool, command, out),
        Top::Clone { pool, command } => block::clone(&bsock(socket), &pool, command, out),
        Top::Vhost { pool, command } => block::vhost(&bsock(socket), &pool, command, out),
        Top::Status {
            vswitchd_socket,
            vblockd_socket,
        } => status(
            &libvirtual::host::Host::new(
                vswitchd_socket.unwrap_or_else(default_socket),
                vblockd_socket.unwrap_or_else(libvirtual::block::default_socket),
            ),
            out,
        ),
        Top::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "vctl", &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vctl: {e}");
            match e {
                Error::Connect { .. } => ExitCode::from(3),
                _ => ExitCode::from(1),
            }
        }
    }
}

/// Waits up to `secs` for the socket the command talks to to accept connections (the
/// command then reports what it finds).
fn wait_for_socket(command: &Top, socket: Option<&std::path::Path>, secs: u64) {
    let sockets = match (command, socket) {
        (_, Some(s)) => vec![s.to_owned()],
        (Top::Net { .. }, None) => vec![default_socket()],
        (
            Top::Status {
                vswitchd_socket,
                vblockd_socket,
            },
            None,
        ) => vec![
            vswitchd_socket.clone().unwrap_or_else(default_socket),
            vblockd_socket
                .clone()
                .unwrap_or_else(libvirtual::block::default_socket),
        ],
        (Top::Completions { .. }, None) => Vec::new(),
        (_, None) => vec![libvirtual::block::default_socket()],
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    for s in sockets {
        while std::os::unix::net::UnixStream::connect(&s).is_err()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// Lets a closed pipe end vctl quietly, as it ends other Unix tools (`vctl ... | head`):
/// Rust ignores SIGPIPE, and printing to a closed pipe would panic.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: resetting a signal's disposition to its default at the start of main, before
    // any thread exists; no handler is installed.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

pub(crate) fn emit<T: Serialize>(
    out: Output,
    value: &T,
    table: impl FnOnce(&T) -> Vec<Vec<String>>,
) {
    match out {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        ),
        Output::Table => print_table(&table(value)),
    }
}

fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn drops(c: &CountersInfo) -> String {
    if c.drops.is_empty() {
        "-".into()
    } else {
        c.drops
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `vctl status`: one section per kind of object.
fn status(host: &libvirtual::host::Host, out: Output) -> Result<(), Error> {
    let inv = host.inventory()?;
    if out == Output::Json {
        emit(out, &inv, |_| Vec::new());
        return Ok(());
    }
    let human = block::human;
    for down in &inv.unreachable {
        eprintln!("vctl: {down}");
    }
    let reached = |daemon: &str| !inv.unreachable.iter().any(|d| d.starts_with(daemon));
    if reached("vswitchd") {
        println!("TENANTS");
        let mut rows = vec![
            ["NAME", "VNI", "MTU", "PORTS", "VTEPS", "MACS"]
                .map(String::from)
                .to_vec(),
        ];
        rows.extend(inv.tenants.iter().map(|t| {
            vec![
                t.name.clone(),
                t.vni.to_string(),
                t.mtu.to_string(),
                t.ports.len().to_string(),
                t.vteps.len().to_string(),
                t.learned_macs.to_string(),
            ]
        }));
        print_table(&rows);
        println!("\nPORTS");
        let mut rows = vec![
            ["NAME", "TENANT", "KIND", "LINK", "RX", "TX", "DROPS"]
                .map(String::from)
                .to_vec(),
        ];
        rows.extend(inv.ports.iter().map(|p| {
            vec![
                p.spec.name.clone(),
                p.spec.tenant.clone(),
                p.spec.kind.clone(),
                link(p),
                p.counters.rx_packets.to_string(),
                p.counters.tx_packets.to_string(),
                drops(&p.counters),
            ]
        }));
        print_table(&rows);
        println!();
    } else {
        println!("TENANTS, PORTS: not shown (vswitchd cannot be reached)\n");
    }
    if reached("vblockd") {
        println!("VOLUMES");
        let mut rows = vec![
            [
                "POOL",
                "NAME",
                "KIND",
                "PARENT",
                "SIZE",
                "ALLOCATED",
                "EXPORTED",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for p in &inv.pools {
            rows.extend(p.volumes.iter().map(|v| {
                let exported = inv
                    .exports
                    .iter()
                    .any(|e| e.pool == p.pool.name && e.volume == v.name);
                vec![
                    p.pool.name.clone(),
                    v.name.clone(),
                    v.kind.clone(),
                    v.parent.clone().unwrap_or_else(|| "-".into()),
                    human(v.size),
                    human(v.allocated),
                    if exported { "vhost-user-blk" } else { "-" }.to_owned(),
                ]
            }));
        }
        print_table(&rows);
        let (mapped, used) = inv.thin_savings();
        println!(
            "\nvolumes map {} of data; the pools store it in {} (snapshots and clones share it)",
            human(mapped),
            human(used)
        );
    } else {
        println!("POOLS, VOLUMES: not shown (vblockd cannot be reached)");
    }
    Ok(())
}

/// A port's interface as a table cell: `present`, `GONE` (its namespace vanished without a
/// CNI DEL: the port is stale and should be deleted), or `-` (no kernel interface).
fn link(p: &vswitch_api::PortInfo) -> String {
    match p.link {
        Some(vswitch_api::PortLink::Present) => "present".into(),
        Some(vswitch_api::PortLink::Gone) => "GONE (netns removed; delete the port)".into(),
        None => "-".into(),
    }
}

pub(crate) fn done(out: Output, what: String) {
    match out {
        Output::Json => println!("{}", serde_json::json!({ "ok": what })),
        Output::Table => println!("{what}"),
    }
}

/// Runs a `vctl net` command against vswitchd.
fn run(c: &Client, cmd: Net, out: Output) -> Result<(), Error> {
    match cmd {
        Net::Tenant(TenantCmd::List) => emit(out, &c.tenants()?, |rows| tenant_rows(rows)),
        Net::Tenant(TenantCmd::Show { name }) => {
            emit(out, &vec![c.tenant(&name)?], |rows| tenant_rows(rows))
        }
        Net::Tenant(TenantCmd::Create {
            name,
            vni,
            mtu,
            max_macs,
            learn_vteps,
            subnet,
        }) => {
            let t = c.create_tenant(&TenantSpec {
                name,
                vni,
                mtu,
                max_macs,
                learn_vteps,
                subnet,
            })?;
            emit(out, &vec![t], |rows| tenant_rows(rows));
        }
        Net::Cluster(ClusterCmd::Status) => {
            let i = c.cluster()?;
            emit(out, &i, |i| {
                let mut rows = vec![vec!["MODE".into(), i.mode.clone()]];
                let mut row = |k: &str, v: String| rows.push(vec![k.to_owned(), v]);
                if let Some(h) = &i.host {
                    row("HOST", h.clone());
                }
                if let Some(s) = &i.state {
                    row("STATE", format!("{s} for {}s", i.state_age_secs));
                }
                if !i.endpoints.is_empty() {
                    row("ETCD", i.endpoints.join(","));
                    row("REVISION", i.revision.to_string());
                    row("SYNCS", i.syncs.to_string());
                }
                if let Some(e) = &i.last_error {
                    row("ERROR", e.clone());
                }
                rows
            })
        }
        Net::Cluster(ClusterCmd::Members) => emit(out, &c.cluster_members()?, |ms| {
            let mut rows = vec![vec!["HOST".into(), "UNDERLAY".into(), "PORT".into()]];
            rows.extend(ms.iter().map(|m| {
                vec![
                    if m.local {
                        format!("{} (this host)", m.name)
                    } else {
                        m.name.clone()
                    },
                    m.underlay
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    m.udp_port.to_string(),
                ]
            }));
            rows
        }),
        Net::Cluster(ClusterCmd::Bindings) => emit(out, &c.cluster_bindings()?, |bs| {
            let mut rows: Vec<Vec<String>> = vec![
                ["TENANT", "HOST", "PORT", "MAC", "IPS"]
                    .map(String::from)
                    .to_vec(),
            ];
            rows.extend(bs.iter().map(|b| {
                vec![
                    b.tenant.clone(),
                    b.host.clone(),
                    b.port.clone(),
                    b.mac.clone().unwrap_or_else(|| "-".into()),
                    b.ips
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                ]
            }));
            rows
        }),
        Net::Cluster(ClusterCmd::Addresses { tenant }) => emit(out, &c.addresses(&tenant)?, |a| {
            let mut rows: Vec<Vec<String>> =
                vec![["ADDRESS", "HOST", "OWNER"].map(String::from).to_vec()];
            rows.extend(a.iter().map(|a| {
                vec![
                    format!("{}/{}", a.ip, a.prefix_len),
                    a.host.clone(),
                    a.owner.clone(),
                ]
            }));
            rows
        }),
        Net::Tenant(TenantCmd::Delete { name }) => {
            c.delete_tenant(&name)?;
            done(out, format!("deleted tenant {name}"));
        }
        Net::Port(PortCmd::List) => emit(out, &c.ports()?, |rows| port_rows(rows)),
        Net::Port(PortCmd::Show { name }) => {
            emit(out, &vec![c.port(&name)?], |rows| port_rows(rows))
        }
        Net::Port(PortCmd::Create {
            name,
            tenant,
            kind,
            netns,
            ifname,
            mac,
            ips,
            rate_bps,
            rate_pps,
        }) => {
            let p = c.create_port(&PortSpec {
                name,
                tenant,
                kind,
                mac,
                ips,
                rate_limit: RateLimitSpec {
                    bits_per_sec: rate_bps,
                    packets_per_sec: rate_pps,
                },
                netns,
                ifname,
                labels: Default::default(),
            })?;
            emit(out, &vec![p], |rows| port_rows(rows));
        }
        Net::Port(PortCmd::Delete { name }) => {
            c.delete_port(&name)?;
            done(out, format!("deleted port {name}"));
        }
        Net::Vtep(VtepCmd::List { tenant }) => {
            emit(out, &c.vteps(&tenant)?, |rows| vtep_rows(rows))
        }
        Net::Vtep(VtepCmd::Add { tenant, ip, port }) => {
            c.add_vtep_spec(&tenant, &vswitch_api::VtepSpec { ip, port })?;
            done(out, format!("tenant {tenant}: added VTEP {ip}"));
        }
        Net::Vtep(VtepCmd::Remove { tenant, ip }) => {
            c.remove_vtep(&tenant, ip)?;
            done(out, format!("tenant {tenant}: removed VTEP {ip}"));
        }
        Net::Fdb(FdbCmd::List { tenant }) => emit(out, &c.fdb(&tenant)?, |rows| fdb_rows(rows)),
        Net::Fdb(FdbCmd::Add {
            tenant,
            mac,
            port,
            vtep,
        }) => {
            c.add_fdb(
                &tenant,
                &FdbEntrySpec {
                    mac: mac.clone(),
                    port,
                    vtep,
                },
            )?;
            done(out, format!("tenant {tenant}: static entry for {mac}"));
        }
        Net::Fdb(FdbCmd::Remove { tenant, mac }) => {
            c.remove_fdb(&tenant, &mac)?;
            done(out, format!("tenant {tenant}: removed {mac}"));
        }
        Net::Metrics => print!("{}", c.metrics()?),
    }
    Ok(())
}

/// The table of tenants.
fn tenant_rows(ts: &[vswitch_api::TenantInfo]) -> Vec<Vec<String>> {
    let mut rows = vec![
        vec![
            "NAME", "VNI", "MTU", "PORTS", "VTEPS", "MACS", "RX", "FLOODED", "DROPS",
        ]
        .into_iter()
        .map(String::from)
        .collect(),
    ];
    rows.extend(ts.iter().map(|t| {
        vec![
            t.name.clone(),
            t.vni.to_string(),
            t.mtu.to_string(),
            t.ports.join(","),
            t.vteps
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            format!("{}/{}", t.learned_macs, t.max_macs),
            t.counters.rx_packets.to_string(),
            t.flooded.to_string(),
            drops(&t.counters),
        ]
    }));
    rows
}

/// The table of ports.
fn port_rows(ps: &[vswitch_api::PortInfo]) -> Vec<Vec<String>> {
    let mut rows = vec![
        vec![
            "NAME", "TENANT", "KIND", "LINK", "NETNS", "SECURITY", "RX PKTS", "RX BYTES",
            "TX PKTS", "TX BYTES", "DROPS",
        ]
        .into_iter()
        .map(String::from)
        .collect(),
    ];
    rows.extend(ps.iter().map(|p| {
        vec![
            p.spec.name.clone(),
            p.spec.tenant.clone(),
            p.spec.kind.clone(),
            link(p),
            p.spec.netns.clone().unwrap_or_else(|| "-".into()),
            p.spec.mac.clone().unwrap_or_else(|| "-".into()),
            p.counters.rx_packets.to_string(),
            p.counters.rx_bytes.to_string(),
            p.counters.tx_packets.to_string(),
            p.counters.tx_bytes.to_string(),
            drops(&p.counters),
        ]
    }));
    rows
}

/// The table of a tenant's VTEPs.
fn vtep_rows(v: &[vswitch_api::VtepSpec]) -> Vec<Vec<String>> {
    let mut rows = vec![vec!["VTEP".to_owned(), "PORT".to_owned()]];
    rows.extend(v.iter().map(|x| {
        vec![
            x.ip.to_string(),
            x.port.map_or_else(|| "-".to_owned(), |p| p.to_string()),
        ]
    }));
    rows
}

/// The table of a tenant's forwarding entries.
fn fdb_rows(v: &[vswitch_api::FdbEntryInfo]) -> Vec<Vec<String>> {
    let mut rows = vec![
        vec!["MAC", "WHERE", "TYPE"]
            .into_iter()
            .map(String::from)
            .collect(),
    ];
    rows.extend(v.iter().map(|e| {
        let at = match (&e.port, &e.vtep) {
            (Some(p), _) => format!("port {p}"),
            (_, Some(v)) => format!("vtep {v}"),
            _ => "-".into(),
        };
        vec![
            e.mac.clone(),
            at,
            if e.is_static { "static" } else { "learned" }.into(),
        ]
    }));
    rows
}
