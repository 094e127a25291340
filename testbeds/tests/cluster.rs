//! Many hosts, one control plane: three vswitchd hosts joined to a real 3-member etcd
//! cluster (each member and host in its own namespace on one underlay).
//!
//! A tenant created on one host appears on all; containers attached by `vswitch-cni` with
//! cluster IPAM on every host get unique addresses and reach each other, with no ARP
//! request crossing the underlay (the switches answer for known bindings). A host killed with
//! SIGKILL leaves everyone's tables when its lease expires and comes back on restart. An etcd
//! member killed, then all of etcd stopped: traffic goes on (the hosts say "degraded"); when
//! etcd is back a new container anywhere is reachable everywhere. A VTEP that is not a member
//! cannot inject into the tenant.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testbeds::cni::Runtime;
use testbeds::daemon::{Daemon, workspace_binary};
use testbeds::etcd::EtcdCluster;
use testbeds::netns::{Netns, missing_privileges};
use testbeds::probe::ping;
use testbeds::switch_bed::{ArpWatch, Underlay};
use testbeds::wait::{SOON, until};

/// The lease TTL the hosts run with (short, so that the test sees expiry soon).
const TTL_SECS: u64 = 3;
const VNI: u32 = 7001;

struct Host {
    name: String,
    ns: Netns,
    ip: Ipv4Addr,
    dir: PathBuf,
    daemon: Option<Daemon>,
}

impl Host {
    fn start(&mut self, endpoints: &str) {
        self.start_with(endpoints, &[]);
    }

    fn start_with(&mut self, endpoints: &str, extra: &[&str]) {
        let mut args: Vec<String> = [
            "--underlay",
            &self.ip.to_string(),
            "--run-dir",
            &self.dir.join("run").display().to_string(),
            "--state-dir",
            &self.dir.join("state").display().to_string(),
            "--workers",
            "1",
            "--log-format",
            "json",
            "--cluster",
            endpoints,
            "--host-name",
            &self.name,
            "--lease-ttl",
            &TTL_SECS.to_string(),
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        self.daemon = Some(
            Daemon::start(
                &self.ns,
                &workspace_binary("vswitchd").unwrap(),
                &args,
                self.socket(),
            )
            .unwrap(),
        );
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run/vswitchd.sock")
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let (status, body) = self
            .daemon
            .as_ref()
            .unwrap()
            .request("GET", path, None)
            .unwrap();
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    fn vteps(&self) -> Vec<String> {
        let (_, v) = self.get("/v1/tenants/a/vteps");
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["ip"].as_str().map(String::from))
            .collect()
    }

    fn static_remote_macs(&self) -> usize {
        let (_, v) = self.get("/v1/tenants/a/fdb");
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["static"] == json!(true) && e["vtep"].is_string())
            .count()
    }

    fn state(&self) -> String {
        self.get("/v1/cluster").1["state"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    fn last_error(&self) -> String {
        self.get("/v1/cluster").1["last_error"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    fn metric(&self, prefix: &str) -> u64 {
        let (_, body) = self
            .daemon
            .as_ref()
            .unwrap()
            .request("GET", "/metrics", None)
            .unwrap();
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

struct Container {
    id: String,
    ns: Netns,
    ip: IpAddr,
    mac: String,
    host: usize,
}

fn network(host: &Host) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "clu",
        "type": "vswitch-cni",
        "tenant": "a",
        "socket": host.socket(),
        "ipam": { "type": "vswitch-cluster" }
    })
}

fn attach(rt: &Runtime, hosts: &[Host], h: usize, n: usize) -> Container {
    let ns = Netns::create(&format!("c{n}")).unwrap();
    let id = format!("clu-{}-{n}", std::process::id());
    let result = rt
        .on_host(&hosts[h].ns)
        .add(
            &network(&hosts[h]),
            &id,
            &format!("/run/netns/{}", ns.name()),
            "eth0",
        )
        .unwrap();
    let addr = result["ips"][0]["address"].as_str().unwrap();
    let ip: IpAddr = addr.split('/').next().unwrap().parse().unwrap();
    let mac = result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == json!("eth0"))
        .and_then(|i| i["mac"].as_str())
        .unwrap()
        .to_owned();
    Container {
        id,
        ns,
        ip,
        mac,
        host: h,
    }
}

/// Every container pings every other one (each pair both ways); returns the pairs that
/// got no reply.
fn unreachable_pairs(cs: &[Container]) -> Vec<(IpAddr, IpAddr)> {
    let mut bad = Vec::new();
    for a in cs {
        for b in cs {
            if a.ip != b.ip && ping(&a.ns, b.ip, 2, 56).unwrap().received == 0 {
                bad.push((a.ip, b.ip));
            }
        }
    }
    bad
}

/// Forgets the containers' neighbours, so that the next packets need ARP again.
fn flush_neighbours(cs: &[Container]) {
    for c in cs {
        c.ns.ip(&["neigh", "flush", "all"]).unwrap();
    }
}

#[test]
fn three_hosts_share_tenants_bindings_and_addresses_through_etcd() {
    if let Some(why) = missing_privileges() {
        eprintln!("SKIPPED cluster test: {why}");
        return;
    }
    if !testbeds::etcd::installed() {
        eprintln!("SKIPPED cluster test: etcd is not installed (scripts/install-deps)");
        return;
    }
    let tmp = testbeds::scratch::Scratch::new(&std::env::temp_dir(), "cluster").unwrap();
    let mut ul = Underlay::new().unwrap();
    let etcd_ips = [11, 12, 13].map(|n| Ipv4Addr::new(192, 168, 77, n));
    let mut etcd = EtcdCluster::start(&mut ul, &etcd_ips, &tmp.join("etcd")).unwrap();
    let endpoints = etcd.endpoints();
    let mut hosts: Vec<Host> = (1..=3u8)
        .map(|n| {
            let ip = Ipv4Addr::new(192, 168, 77, n);
            Host {
                name: format!("h{n}"),
                ns: ul.host(&format!("h{n}"), ip).unwrap(),
                ip,
                dir: tmp.join(format!("h{n}")),
                daemon: None,
            }
        })
        .collect();
    for h in &mut hosts {
        h.start(&endpoints);
    }
    for h in &hosts {
        until("every host to join", SOON, || h.state() == "connected").unwrap();
    }

    // A tenant created on one host is on all of them.
    let d1 = hosts[0].daemon.as_ref().unwrap();
    d1.create(
        "/v1/tenants",
        &format!(r#"{{"name":"a","vni":{VNI},"subnet":"10.50.0.0/24"}}"#),
    )
    .unwrap();
    for h in &hosts {
        until("the tenant on every host", SOON, || {
            h.get("/v1/tenants/a").0 == 200
        })
        .unwrap();
    }
    // The same VNI under another name is refused by the cluster, from any host.
    let (status, body) = hosts[2]
        .daemon
        .as_ref()
        .unwrap()
        .request(
            "POST",
            "/v1/tenants",
            Some(&format!(r#"{{"name":"z","vni":{VNI}}}"#)),
        )
        .unwrap();
    assert_eq!(status, 409, "{body}");

    // Containers on all three hosts, addresses from the cluster: unique.
    let rt = Runtime::new().unwrap();
    let mut containers: Vec<Container> = (0..3).map(|h| attach(&rt, &hosts, h, h)).collect();
    let mut ips: Vec<IpAddr> = containers.iter().map(|c| c.ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(
        ips.len(),
        3,
        "cluster IPAM handed out one address twice: {ips:?}"
    );
    for h in &hosts {
        until("every binding programmed on every host", SOON, || {
            h.vteps().len() == 2 && h.static_remote_macs() == 2
        })
        .unwrap();
    }
    let (_, bindings) = hosts[1].get("/v1/cluster/bindings");
    for c in &containers {
        assert!(
            bindings
                .as_array()
                .unwrap()
                .iter()
                .any(|b| b["mac"] == json!(c.mac) && b["ips"][0] == json!(c.ip.to_string())),
            "binding of {} missing: {bindings}",
            c.ip
        );
    }

    // All pairs reach each other, and no ARP request crosses the underlay.
    flush_neighbours(&containers);
    let watch = ArpWatch::start(&ul).unwrap();
    assert_eq!(unreachable_pairs(&containers), vec![]);
    let (vxlan, arp) = watch.finish();
    assert!(vxlan > 0, "the watch saw no VXLAN at all");
    assert_eq!(
        arp, 0,
        "ARP requests crossed the underlay ({vxlan} VXLAN datagrams)"
    );
    let answered: u64 = hosts
        .iter()
        .map(|h| h.metric("vswitch_tenant_arp_answered"))
        .sum();
    assert!(
        answered >= 3,
        "the switches answered {answered} ARP requests"
    );

    // Host 3 dies: the others drop it when its lease expires.
    let killed = Instant::now();
    hosts[2].daemon.as_mut().unwrap().kill9();
    let h3 = hosts[2].ip.to_string();
    for h in &hosts[..2] {
        until("the dead host to leave the tables", SOON, || {
            !h.vteps().contains(&h3) && h.static_remote_macs() == 1
        })
        .unwrap();
    }
    eprintln!(
        "host 3 left both tables {:.1} s after SIGKILL (lease TTL {TTL_SECS} s)",
        killed.elapsed().as_secs_f64()
    );
    // It restarts with its ports and converges: reachable again.
    hosts[2].start(&endpoints);
    for h in &hosts {
        until("the restarted host back in every table", SOON, || {
            h.vteps().len() == 2 && h.static_remote_macs() == 2
        })
        .unwrap();
    }
    assert_eq!(unreachable_pairs(&containers), vec![]);

    // Every host has cached what it knows (a restart forwards with it until etcd answers).
    for h in &hosts {
        until("the view cached on every host", SOON, || {
            let (_, i) = h.get("/v1/cluster");
            i["cached_revision"].as_i64() == i["revision"].as_i64()
        })
        .unwrap();
    }

    // One etcd member killed: nothing stops.
    etcd.kill(0);
    flush_neighbours(&containers);
    assert_eq!(unreachable_pairs(&containers), vec![]);
    // All of etcd gone: the hosts say so, and forward with what they know.
    etcd.stop_all();
    for h in &hosts {
        until("every host to say degraded", SOON, || {
            h.state() == "degraded"
        })
        .unwrap();
        assert_eq!(h.metric("vswitch_cluster_degraded"), 1);
    }
    flush_neighbours(&containers);
    assert_eq!(unreachable_pairs(&containers), vec![]);
    // A host restarted while etcd is away forwards at once with its cached view.
    hosts[1].daemon.as_mut().unwrap().kill9();
    hosts[1].start(&endpoints);
    assert_eq!(hosts[1].state(), "degraded");
    assert_eq!(
        hosts[1].static_remote_macs(),
        2,
        "the cache was not applied"
    );
    flush_neighbours(&containers);
    assert_eq!(unreachable_pairs(&containers), vec![]);
    // etcd is back: the hosts resync; a new container anywhere is reachable everywhere.
    for i in 0..3 {
        etcd.restart(i).unwrap();
    }
    etcd.wait_healthy(Duration::from_secs(60)).unwrap();
    for h in &hosts {
        until("every host to reconnect", Duration::from_secs(60), || {
            h.state() == "connected"
        })
        .unwrap();
    }
    containers.push(attach(&rt, &hosts, 1, 3));
    for h in &hosts {
        until("the new container on every host", SOON, || {
            h.static_remote_macs() == if h.name == "h2" { 2 } else { 3 }
        })
        .unwrap();
    }
    assert_eq!(unreachable_pairs(&containers), vec![]);

    // A host on the underlay that is not a member cannot inject into the tenant.
    let intruder_ip = Ipv4Addr::new(192, 168, 77, 66);
    let intruder = ul.host("intruder", intruder_ip).unwrap();
    let before =
        hosts[0].metric("vswitch_tenant_drops_total{tenant=\"a\",reason=\"unknown_vtep\"}");
    let target = hosts[0].ip;
    let frame = forged_frame(&containers[0].mac);
    intruder
        .enter(move || {
            let s = UdpSocket::bind(SocketAddr::new(IpAddr::V4(intruder_ip), 0))
                .map_err(|e| testbeds::Error::Io("bind".into(), e))?;
            for _ in 0..10 {
                s.send_to(&frame, SocketAddr::new(IpAddr::V4(target), 4789))
                    .map_err(|e| testbeds::Error::Io("send".into(), e))?;
            }
            Ok(())
        })
        .unwrap();
    until(
        "the forged frames to be dropped as unknown_vtep",
        SOON,
        || {
            hosts[0].metric("vswitch_tenant_drops_total{tenant=\"a\",reason=\"unknown_vtep\"}")
                >= before + 10
        },
    )
    .unwrap();

    // DEL gives the addresses back to the cluster.
    for c in &containers {
        let o = rt
            .on_host(&hosts[c.host].ns)
            .del(
                &network(&hosts[c.host]),
                &c.id,
                Some(&format!("/run/netns/{}", c.ns.name())),
                "eth0",
            )
            .unwrap();
        assert!(o.ok, "DEL: {} {}", o.out, o.stderr);
    }
    let (_, left) = hosts[0].get("/v1/tenants/a/addresses");
    assert_eq!(left, json!([]), "addresses left after DEL");
    // And the tenant can go, from any host, everywhere.
    let (status, body) = hosts[1]
        .daemon
        .as_ref()
        .unwrap()
        .request("DELETE", "/v1/tenants/a", None)
        .unwrap();
    assert_eq!(status, 204, "{body}");
    for h in &hosts {
        until("the tenant gone from every host", SOON, || {
            h.get("/v1/tenants/a").0 == 404
        })
        .unwrap();
    }
}

/// A VXLAN datagram of the tenant's VNI carrying a frame to `mac` (an ARP reply claiming an
/// address), as a host that is not a member would send it.
fn forged_frame(mac: &str) -> Vec<u8> {
    let to: overlay_net::MacAddr = mac.parse().unwrap();
    let mut inner = [0u8; 64];
    let n = overlay_net::frame::build_arp(
        &mut inner,
        to,
        &overlay_net::frame::ArpInfo {
            operation: 2,
            sender_mac: overlay_net::MacAddr([0x02, 0xee, 0, 0, 0, 1]),
            sender_ip: Ipv4Addr::new(10, 50, 0, 1),
            target_mac: to,
            target_ip: Ipv4Addr::new(10, 50, 0, 2),
        },
    )
    .unwrap();
    let v = VNI.to_be_bytes();
    let mut d = vec![0x08, 0, 0, 0, v[1], v[2], v[3], 0];
    d.extend_from_slice(&inner[..n]);
    d
}

#[test]
fn with_tls_only_hosts_with_a_client_certificate_of_the_ca_join() {
    if let Some(why) = missing_privileges() {
        eprintln!("SKIPPED cluster TLS test: {why}");
        return;
    }
    if !testbeds::etcd::installed() {
        eprintln!("SKIPPED cluster TLS test: etcd is not installed (scripts/install-deps)");
        return;
    }
    let tmp = testbeds::scratch::Scratch::new(&std::env::temp_dir(), "cluster-tls").unwrap();
    let etcd_ip = Ipv4Addr::new(192, 168, 78, 11);
    let pki = testbeds::pki::Pki::new(&tmp.join("pki")).unwrap();
    pki.ca("ca").unwrap();
    pki.ca("foreign").unwrap();
    pki.leaf(
        "ca",
        "etcd",
        "serverAuth,clientAuth",
        &format!("IP:{etcd_ip}"),
    )
    .unwrap();
    pki.leaf("ca", "h1", "clientAuth", "DNS:h1").unwrap();
    pki.leaf("foreign", "h3", "clientAuth", "DNS:h3").unwrap();
    let mut ul = Underlay::new().unwrap();
    let tls = testbeds::etcd::Tls {
        cert: pki.path("etcd-cert.pem"),
        key: pki.path("etcd-key.pem"),
        ca: pki.path("ca-cert.pem"),
    };
    let etcd = EtcdCluster::start_with(&mut ul, &[etcd_ip], &tmp.join("etcd"), Some(tls)).unwrap();
    let endpoints = etcd.endpoints();
    assert!(endpoints.starts_with("https://"));
    let mut hosts: Vec<Host> = (1..=3u8)
        .map(|n| {
            let ip = Ipv4Addr::new(192, 168, 78, n);
            Host {
                name: format!("h{n}"),
                ns: ul.host(&format!("h{n}"), ip).unwrap(),
                ip,
                dir: tmp.join(format!("h{n}")),
                daemon: None,
            }
        })
        .collect();
    let ca = pki.path("ca-cert.pem");
    // h1: the CA and its own client certificate. h2: the CA but no certificate. h3: a
    // certificate of another CA.
    hosts[0].start_with(
        &endpoints,
        &[
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &pki.path("h1-cert.pem"),
            "--etcd-key",
            &pki.path("h1-key.pem"),
        ],
    );
    hosts[1].start_with(&endpoints, &["--etcd-ca", &ca]);
    hosts[2].start_with(
        &endpoints,
        &[
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &pki.path("h3-cert.pem"),
            "--etcd-key",
            &pki.path("h3-key.pem"),
        ],
    );
    until("h1 to join over TLS", SOON, || {
        hosts[0].state() == "connected"
    })
    .unwrap();
    hosts[0]
        .daemon
        .as_ref()
        .unwrap()
        .create("/v1/tenants", r#"{"name":"t","vni":42}"#)
        .unwrap();
    for h in &hosts[1..] {
        until("the refused hosts to have tried", SOON, || {
            let e = h.last_error();
            !e.is_empty() && e != "connecting"
        })
        .unwrap();
        let (_, info) = h.get("/v1/cluster");
        assert_eq!(info["state"], json!("degraded"), "{info}");
        assert_eq!(info["syncs"], json!(0), "{info}");
        assert_eq!(
            h.get("/v1/tenants/t").0,
            404,
            "a refused host saw the tenant"
        );
    }
    let (_, members) = hosts[0].get("/v1/cluster/members");
    assert_eq!(members.as_array().map(Vec::len), Some(1), "{members}");
}
