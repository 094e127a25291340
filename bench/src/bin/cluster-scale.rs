//! The cluster control plane at scale: a load generator plays N hosts with P ports each
//! against a real etcd (host records under leases, bindings spread over T tenants), while R
//! real vswitchd hosts (`--cluster`) watch, each with a port in tenant `t0`. For each N it
//! measures:
//!
//! * convergence: the time from a port's creation on real host 0 (`POST /v1/ports`) until
//!   every other real host has its MAC programmed (p50 / p99 / max over the samples), and the
//!   same for a port published by a simulated host (the watch path alone);
//! * etcd writes per port: etcd's revision before and after a port is made the way
//!   `vswitch-cni` makes it (an address from cluster IPAM, then the port);
//! * memory: each real vswitchd's RSS and the bindings it keeps (those of `t0`) against all
//!   bindings of the cluster;
//! * flood-and-learn for comparison: the copies of one ARP broadcast a new endpoint's first
//!   packet costs with head-end replication to the hosts of its tenant (a cluster host
//!   answers it locally: no copy; `testbeds/tests/cluster.rs` counts zero on the underlay).
//!
//! etcd runs on loopback with its data on tmpfs (`/dev/shm`): its fsyncs are the disk's cost,
//! not the control plane's. Root is not needed.
//!
//! `cargo run --release -p bench --bin cluster-scale -- [--hosts 10,100,1000] [--ports 10]
//! [--tenants 10] [--real 3] [--samples 50] [--json]`

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp};
use serde_json::{Value, json};
use testbeds::daemon::{Daemon, http, tie_to_parent, workspace_binary};
use vswitch_cluster::{BindingRecord, HostRecord, Keys};

/// The cluster control plane at N simulated hosts.
#[derive(Debug, Parser)]
#[command(name = "cluster-scale")]
struct Args {
    /// Simulated host counts, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [10, 100, 1000])]
    hosts: Vec<usize>,
    /// Ports per simulated host.
    #[arg(long, default_value_t = 10)]
    ports: usize,
    /// Tenants the simulated ports are spread over (port j of host h is in tenant
    /// (h*ports + j) mod T).
    #[arg(long, default_value_t = 10)]
    tenants: usize,
    /// Real vswitchd hosts watching.
    #[arg(long, default_value_t = 3)]
    real: usize,
    /// Convergence samples per run and path.
    #[arg(long, default_value_t = 50)]
    samples: usize,
    /// Print one JSON object per run instead of tables.
    #[arg(long)]
    json: bool,
}

const ETCD_PORT: u16 = 23_790;
/// How often a real host is asked whether it has programmed a MAC.
const POLL_MS: u64 = 1;

struct Etcd {
    child: Child,
    dir: PathBuf,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_etcd(dir: &Path) -> Result<Etcd, String> {
    let client = format!("http://127.0.0.1:{ETCD_PORT}");
    let peer = format!("http://127.0.0.1:{}", ETCD_PORT + 1);
    let mut cmd = Command::new("etcd");
    cmd.args([
        "--name",
        "scale",
        "--data-dir",
        &dir.join("data").display().to_string(),
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        &format!("scale={peer}"),
        "--quota-backend-bytes",
        &(4u64 << 30).to_string(),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    tie_to_parent(&mut cmd);
    let child = cmd.spawn().map_err(|e| format!("starting etcd: {e}"))?;
    Ok(Etcd {
        child,
        dir: dir.to_owned(),
    })
}

struct Real {
    daemon: Daemon,
    socket: PathBuf,
    pid: u32,
}

fn api(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<Value, String> {
    let (status, text) = http(socket, method, path, body).map_err(|e| e.to_string())?;
    if status >= 300 {
        return Err(format!("{method} {path}: {status} {text}"));
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn start_real(i: usize, dir: &Path, prefix: &str) -> Result<Real, String> {
    let d = dir.join(format!("real{i}"));
    let args: Vec<String> = [
        "--underlay",
        &format!("127.0.1.{}", 10 + i),
        "--run-dir",
        &d.join("run").display().to_string(),
        "--state-dir",
        &d.join("state").display().to_string(),
        "--workers",
        "1",
        "--cluster",
        &format!("http://127.0.0.1:{ETCD_PORT}"),
        "--cluster-prefix",
        prefix,
        "--host-name",
        &format!("real{i}"),
        "--lease-ttl",
        "30",
        "--log-format",
        "json",
    ]
    .map(String::from)
    .to_vec();
    let socket = d.join("run/vswitchd.sock");
    let bin = workspace_binary("vswitchd").map_err(|e| e.to_string())?;
    let daemon = Daemon::start_local(&bin, &args, socket.clone()).map_err(|e| e.to_string())?;
    let pid = daemon.pid().unwrap_or(0);
    Ok(Real {
        daemon,
        socket,
        pid,
    })
}

fn wait(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(POLL_MS));
    }
    Ok(())
}

/// Whether the real host has `mac` as a static entry of `t0`.
fn has_mac(real: &Real, mac: &str) -> bool {
    api(&real.socket, "GET", "/v1/tenants/t0/fdb", None)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .is_some_and(|a| {
            a.iter()
                .any(|e| e["mac"] == json!(mac) && e["static"] == json!(true))
        })
}

fn static_macs(real: &Real) -> usize {
    api(&real.socket, "GET", "/v1/tenants/t0/fdb", None)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .map_or(0, |a| {
            a.iter().filter(|e| e["static"] == json!(true)).count()
        })
}

fn sim_mac(host: usize, port: usize) -> String {
    let n = (host * 256 + port) as u32;
    let b = n.to_be_bytes();
    format!("06:00:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

fn sim_ip(host: usize, port: usize) -> IpAddr {
    let n = (host * 64 + port) as u32;
    IpAddr::V4(Ipv4Addr::from(0x0a80_0000 | n))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Plays `n` hosts with `ports` ports each under `prefix`.
async fn populate(client: &Client, keys: &Keys, args: &Args, n: usize) -> Result<(), String> {
    let e = |e: etcd_client::Error| e.to_string();
    // Tenants as cluster objects (what `POST /v1/tenants` writes).
    let mut c = client.clone();
    for t in 0..args.tenants {
        let spec = json!({"name": format!("t{t}"), "vni": 1000 + t, "mtu": 0});
        c.txn(Txn::new().and_then([
            TxnOp::put(keys.tenant(&format!("t{t}")), spec.to_string(), None),
            TxnOp::put(keys.vni(1000 + t as u32), format!("t{t}"), None),
        ]))
        .await
        .map_err(e)?;
    }
    let mut tasks = Vec::new();
    let workers = 32.min(n.max(1));
    for w in 0..workers {
        let mut c = client.clone();
        let keys = keys.clone();
        let (ports, tenants) = (args.ports, args.tenants);
        tasks.push(tokio::spawn(async move {
            for h in (w..n).step_by(workers) {
                let lease = c.lease_grant(600, None).await.map_err(e)?.id();
                let host = HostRecord {
                    underlay: vec![IpAddr::V4(Ipv4Addr::from(0x0a40_0000 | h as u32))],
                    udp_port: 4789,
                };
                let name = format!("sim{h}");
                let opts = || Some(PutOptions::new().with_lease(lease));
                let mut ops = vec![TxnOp::put(
                    keys.host(&name),
                    serde_json::to_vec(&host).map_err(|e| e.to_string())?,
                    opts(),
                )];
                for p in 0..ports {
                    let tenant = format!("t{}", (h * ports + p) % tenants);
                    let record = BindingRecord {
                        mac: Some(sim_mac(h, p)),
                        ips: vec![sim_ip(h, p)],
                    };
                    ops.push(TxnOp::put(
                        keys.binding(&tenant, &name, &format!("p{p}")),
                        serde_json::to_vec(&record).map_err(|e| e.to_string())?,
                        opts(),
                    ));
                }
                c.txn(Txn::new().and_then(ops)).await.map_err(e)?;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

async fn revision(client: &Client) -> Result<i64, String> {
    let mut c = client.clone();
    let r = c
        .get("/", Some(GetOptions::new().with_count_only()))
        .await
        .map_err(|e| e.to_string())?;
    Ok(r.header().map_or(0, |h| h.revision()))
}

async fn run_one(args: &Args, n: usize, dir: &Path, client: &Client) -> Result<Value, String> {
    let prefix = format!("/scale-{n}-{}/", std::process::id());
    let keys = Keys::new(&prefix);
    let started = Instant::now();
    populate(client, &keys, args, n).await?;
    let populated = started.elapsed();
    let reals: Vec<Real> = (0..args.real)
        .map(|i| start_real(i, &dir.join(format!("n{n}")), &prefix))
        .collect::<Result<_, _>>()?;
    for r in &reals {
        wait("t0 on a real host", Duration::from_secs(120), || {
            api(&r.socket, "GET", "/v1/tenants/t0", None).is_ok()
        })?;
    }
    // Each real host: a port in t0 (a VM's vhost-user-net port with its MAC).
    for (i, r) in reals.iter().enumerate() {
        api(
            &r.socket,
            "POST",
            "/v1/ports",
            Some(&format!(
                r#"{{"name":"base{i}","tenant":"t0","kind":"vhost-user-net","mac":"02:ff:00:00:00:{i:02x}","ips":["10.200.0.{}"]}}"#,
                i + 1
            )),
        )?;
    }
    // Every simulated binding of t0 and the other real hosts' on every real host.
    let in_t0 = (0..n)
        .flat_map(|h| (0..args.ports).map(move |p| (h, p)))
        .filter(|(h, p)| (h * args.ports + p).is_multiple_of(args.tenants))
        .count();
    let expected = in_t0 + args.real - 1;
    let sync_start = Instant::now();
    for r in &reals {
        wait("t0 programmed", Duration::from_secs(300), || {
            static_macs(r) >= expected
        })?;
    }
    let initial_sync = sync_start.elapsed();

    // Convergence, real port path: created on real 0, seen on the others.
    let mut real_path = Vec::new();
    for s in 0..args.samples {
        let mac = format!("02:fe:00:00:{:02x}:{:02x}", s / 256, s % 256);
        let t0 = Instant::now();
        api(
            &reals[0].socket,
            "POST",
            "/v1/ports",
            Some(&format!(
                r#"{{"name":"s{s}","tenant":"t0","kind":"vhost-user-net","mac":"{mac}"}}"#
            )),
        )?;
        for r in &reals[1..] {
            wait(
                "a new port on the other real hosts",
                Duration::from_secs(60),
                || has_mac(r, &mac),
            )?;
        }
        real_path.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    // Convergence, watch path: a simulated host publishes, every real host programs it.
    let mut watch_path = Vec::new();
    let mut c = client.clone();
    for s in 0..args.samples {
        let mac = format!("06:fe:00:00:{:02x}:{:02x}", s / 256, s % 256);
        let record = BindingRecord {
            mac: Some(mac.clone()),
            ips: vec![IpAddr::V4(Ipv4Addr::new(
                10,
                201,
                (s / 256) as u8,
                (s % 256) as u8,
            ))],
        };
        let host = format!("sim{}", s % n);
        let t0 = Instant::now();
        c.put(
            keys.binding("t0", &host, &format!("late{s}")),
            serde_json::to_vec(&record).map_err(|e| e.to_string())?,
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
        for r in &reals {
            wait(
                "a simulated port on every real host",
                Duration::from_secs(60),
                || has_mac(r, &mac),
            )?;
        }
        watch_path.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    // etcd writes per port, made as vswitch-cni makes one: an address, then the port.
    api(
        &reals[0].socket,
        "POST",
        "/v1/tenants",
        Some(r#"{"name":"ipam","vni":999,"subnet":"10.99.0.0/16"}"#),
    )?;
    let before = revision(client).await?;
    let made = 10;
    for k in 0..made {
        let owner = format!("w{k}");
        let a = api(
            &reals[0].socket,
            "POST",
            "/v1/tenants/ipam/addresses",
            Some(&format!(r#"{{"owner":"{owner}"}}"#)),
        )?;
        api(
            &reals[0].socket,
            "POST",
            "/v1/ports",
            Some(&format!(
                r#"{{"name":"{owner}","tenant":"ipam","kind":"vhost-user-net","mac":"02:fd:00:00:00:{k:02x}","ips":["{}"]}}"#,
                a["ip"].as_str().unwrap_or_default()
            )),
        )?;
    }
    let bindings_visible = || {
        api(&reals[0].socket, "GET", "/v1/cluster/bindings", None)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|a| a.iter().filter(|b| b["tenant"] == json!("ipam")).count() == made)
    };
    wait(
        "the ipam ports published",
        Duration::from_secs(60),
        bindings_visible,
    )?;
    let writes_per_port = (revision(client).await? - before) as f64 / made as f64;

    // What one poll costs (a GET of t0's whole table): the resolution of the figures above.
    let poll_start = Instant::now();
    for _ in 0..20 {
        has_mac(&reals[1], "02:00:00:00:00:00");
    }
    let poll_ms = poll_start.elapsed().as_secs_f64() * 1e3 / 20.0;
    let rss: Vec<u64> = reals
        .iter()
        .map(|r| testbeds::process::rss_kib(r.pid))
        .collect();
    let kept = api(&reals[1].socket, "GET", "/v1/cluster/bindings", None)?
        .as_array()
        .map_or(0, Vec::len);
    let total_bindings = n * args.ports + args.real + 2 * args.samples + made;
    real_path.sort_by(f64::total_cmp);
    watch_path.sort_by(f64::total_cmp);
    for r in reals {
        let mut d = r.daemon;
        d.terminate();
    }
    // The run's keys go (the leases of the simulated hosts with them).
    let mut c = client.clone();
    c.delete(
        prefix.clone(),
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(json!({
        "hosts": n,
        "ports_per_host": args.ports,
        "tenants": args.tenants,
        "real_hosts": args.real,
        "populate_s": populated.as_secs_f64(),
        "initial_sync_s": initial_sync.as_secs_f64(),
        "convergence_real_port_ms": {
            "p50": percentile(&real_path, 0.5),
            "p99": percentile(&real_path, 0.99),
            "max": real_path.last().copied().unwrap_or(f64::NAN),
        },
        "convergence_watch_ms": {
            "p50": percentile(&watch_path, 0.5),
            "p99": percentile(&watch_path, 0.99),
            "max": watch_path.last().copied().unwrap_or(f64::NAN),
        },
        "etcd_writes_per_port": writes_per_port,
        "one_poll_ms": poll_ms,
        "vswitchd_rss_kib": rss,
        "bindings_kept_by_a_host": kept,
        "bindings_in_cluster": total_bindings,
        "flood_and_learn_copies_per_new_endpoint": in_t0 + args.real - 1,
        "cluster_copies_per_new_endpoint": 0,
    }))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let dir = Path::new("/dev/shm").join(format!("cluster-scale-{}", std::process::id()));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cluster-scale: tokio: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let _etcd = start_etcd(&dir)?;
        let endpoint = format!("http://127.0.0.1:{ETCD_PORT}");
        let client = {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(mut c) = Client::connect([endpoint.as_str()], None).await
                    && c.status().await.is_ok()
                {
                    break c;
                }
                if Instant::now() > deadline {
                    return Err("etcd did not start".to_owned());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let mut rows = Vec::new();
        for &n in &args.hosts {
            let row = run_one(&args, n, &dir, &client).await?;
            if args.json {
                println!("{row}");
            } else {
                eprintln!("{}", serde_json::to_string_pretty(&row).unwrap_or_default());
            }
            rows.push(row);
        }
        Ok::<_, String>(rows)
    });
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(rows) => {
            if !args.json {
                println!(
                    "{:>6} {:>10} {:>10} {:>10} {:>10} {:>8} {:>12} {:>14} {:>10}",
                    "hosts",
                    "real p50",
                    "real p99",
                    "watch p50",
                    "watch p99",
                    "writes",
                    "rss KiB",
                    "kept/all",
                    "F&L copies"
                );
                for r in rows {
                    println!(
                        "{:>6} {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>8.2} {:>12} {:>14} {:>10}",
                        r["hosts"],
                        r["convergence_real_port_ms"]["p50"]
                            .as_f64()
                            .unwrap_or(f64::NAN),
                        r["convergence_real_port_ms"]["p99"]
                            .as_f64()
                            .unwrap_or(f64::NAN),
                        r["convergence_watch_ms"]["p50"]
                            .as_f64()
                            .unwrap_or(f64::NAN),
                        r["convergence_watch_ms"]["p99"]
                            .as_f64()
                            .unwrap_or(f64::NAN),
                        r["etcd_writes_per_port"].as_f64().unwrap_or(f64::NAN),
                        r["vswitchd_rss_kib"][1],
                        format!(
                            "{}/{}",
                            r["bindings_kept_by_a_host"], r["bindings_in_cluster"]
                        ),
                        r["flood_and_learn_copies_per_new_endpoint"],
                    );
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cluster-scale: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
