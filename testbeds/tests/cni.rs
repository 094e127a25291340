//! `vswitch-cni` run as a container runtime runs it: real `CNI_*` variables, the network
//! configuration on stdin, the reference `host-local` IPAM plugin, a real vswitchd and real
//! namespaces. After every operation the tests look at what is left: vswitchd's ports, the
//! container's interfaces and host-local's reservations.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use testbeds::cni::{self, Runtime, network, reservations};
use testbeds::daemon::{Daemon, start_vswitchd};
use testbeds::netns::{Netns, missing_privileges};
use testbeds::probe::ping;
use testbeds::scratch::Scratch;
use testbeds::switch_bed::Underlay;

/// A host with vswitchd, tenants `a` and `b`, and a CNI network per tenant.
struct Bed {
    _ul: Underlay,
    host: Netns,
    switch: Daemon,
    dir: Scratch,
    rt: Runtime,
}

impl Bed {
    fn new(role: &str) -> Bed {
        if let Some(why) = missing_privileges() {
            panic!("needs root: {why}");
        }
        assert!(
            cni::reference_plugins_installed(),
            "the reference CNI plugins are missing: apt-get install containernetworking-plugins"
        );
        let dir = Scratch::new(Path::new("/var/tmp"), role).unwrap();
        let mut ul = Underlay::new().unwrap();
        let host = ul.host("h1", Ipv4Addr::new(198, 18, 0, 1)).unwrap();
        let switch = start_vswitchd(&host, "198.18.0.1".parse().unwrap(), dir.path(), &[]).unwrap();
        switch
            .create("/v1/tenants", r#"{"name":"a","vni":100}"#)
            .unwrap();
        switch
            .create("/v1/tenants", r#"{"name":"b","vni":200}"#)
            .unwrap();
        Bed {
            _ul: ul,
            switch,
            rt: Runtime::new().unwrap().on_host(&host),
            host,
            dir,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run/vswitchd.sock")
    }

    fn ipam(&self) -> PathBuf {
        self.dir.join("ipam")
    }

    fn net(&self, name: &str, tenant: &str) -> Value {
        network(name, tenant, &self.socket(), "10.9.0.0/24", &self.ipam())
    }

    /// The ports vswitchd has, by name.
    fn ports(&self) -> Vec<String> {
        let (status, body) = self.switch.request("GET", "/v1/ports", None).unwrap();
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect()
    }

    fn nothing_left(&self, net: &str) {
        assert!(self.ports().is_empty(), "ports left: {:?}", self.ports());
        assert!(
            reservations(&self.ipam(), net).is_empty(),
            "reservations left: {:?}",
            reservations(&self.ipam(), net)
        );
    }
}

fn netns_path(ns: &Netns) -> String {
    format!("/run/netns/{}", ns.name())
}

fn first_ip(result: &Value) -> Ipv4Addr {
    let cidr = result["ips"][0]["address"].as_str().unwrap();
    cidr.split('/').next().unwrap().parse().unwrap()
}

/// Clock ticks (1/100 s) the daemon's process spends on the CPU during `span`.
fn cpu_ticks(d: &Daemon, span: std::time::Duration) -> u64 {
    let stat = || -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", d.pid().unwrap())).unwrap();
        let fields: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let before = stat();
    std::thread::sleep(span);
    stat() - before
}

fn has_link(ns: &Netns, ifname: &str) -> bool {
    ns.ip(&["link", "show", ifname]).is_ok()
}

/// The index and entry of the result's interface inside a sandbox.
fn sandbox_interface(r: &Value) -> (usize, &Value) {
    r["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .find(|(_, i)| i.get("sandbox").is_some())
        .unwrap_or_else(|| panic!("no sandbox interface in {r}"))
}

#[test]
fn add_check_del_and_del_again_leave_nothing_behind() {
    lifecycle("veth");
}

#[test]
fn add_check_del_and_del_again_leave_nothing_behind_with_a_tap() {
    lifecycle("tap");
}

fn lifecycle(link: &str) {
    let bed = Bed::new(&format!("lv-cni-{link}"));
    let mut conf = bed.net("neta", "a");
    conf["link"] = json!(link);
    let (c1, c2) = (Netns::create("c1").unwrap(), Netns::create("c2").unwrap());
    let r1 = bed.rt.add(&conf, "ctr1", &netns_path(&c1), "eth0").unwrap();
    let r2 = bed.rt.add(&conf, "ctr2", &netns_path(&c2), "eth0").unwrap();
    // The result: the interface in the sandbox with MAC and MTU, its address from host-local;
    // with a veth, first the switch's end on the host.
    let (index, iface) = sandbox_interface(&r1);
    assert_eq!(index, if link == "veth" { 1 } else { 0 }, "{r1}");
    assert_eq!(iface["name"], "eth0");
    assert_eq!(iface["sandbox"], netns_path(&c1));
    assert_eq!(r1["cniVersion"], "1.0.0");
    assert!(iface.get("mtu").is_none(), "mtu is a 1.1.0 field");
    assert_eq!(r1["ips"][0]["interface"], index);
    let kind = c1.ip(&["-d", "-o", "link", "show", "eth0"]).unwrap();
    assert!(
        kind.contains(if link == "veth" { "veth" } else { "tun" }),
        "{kind}"
    );
    assert!(
        r1["ips"][0]["address"]
            .as_str()
            .unwrap()
            .starts_with("10.9.0.")
    );
    // The interface as the result says: MAC, the tenant's MTU (1500 underlay - 50), up.
    let link = c1.ip(&["-o", "link", "show", "eth0"]).unwrap();
    assert!(link.contains(iface["mac"].as_str().unwrap()), "{link}");
    assert!(link.contains("mtu 1450"), "{link}");
    assert!(link.contains(",UP"), "{link}");
    // The two containers reach each other through the switch.
    let p = ping(&c1, first_ip(&r2).into(), 3, 56).unwrap();
    assert_eq!(p.received, p.sent, "{p:?}");
    assert_eq!(bed.ports().len(), 2);
    assert_eq!(reservations(&bed.ipam(), "neta").len(), 2);
    // CHECK agrees with the result; it fails once the address is taken away.
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = r1.clone();
    let vars = [
        ("CNI_CONTAINERID", "ctr1"),
        ("CNI_NETNS", &netns_path(&c1) as &str),
        ("CNI_IFNAME", "eth0"),
    ];
    let check = bed.rt.exec("CHECK", &with_prev, &vars).unwrap();
    assert!(check.ok, "{check:?}");
    let addr = r1["ips"][0]["address"].as_str().unwrap();
    c1.ip(&["addr", "del", addr, "dev", "eth0"]).unwrap();
    let check = bed.rt.exec("CHECK", &with_prev, &vars).unwrap();
    assert_eq!(check.code(), Some(103), "{check:?}");
    assert!(
        check.out["msg"].as_str().unwrap().contains(addr),
        "{check:?}"
    );
    // A second ADD with the same interface name fails cleanly and leaves nothing new.
    let again = bed
        .rt
        .try_add(&conf, "ctr3", &netns_path(&c1), "eth0")
        .unwrap();
    assert_eq!(again.code(), Some(100), "{again:?}");
    assert_eq!(bed.ports().len(), 2);
    assert_eq!(reservations(&bed.ipam(), "neta").len(), 2);
    // DEL, then DEL again: both succeed; the port, the interface and the address are gone.
    let d = bed
        .rt
        .del(&with_prev, "ctr1", Some(&netns_path(&c1)), "eth0")
        .unwrap();
    assert!(d.ok, "{d:?}");
    assert!(!has_link(&c1, "eth0"));
    let d = bed
        .rt
        .del(&conf, "ctr1", Some(&netns_path(&c1)), "eth0")
        .unwrap();
    assert!(d.ok, "{d:?}");
    // DEL without a namespace (the container's is gone already) and without prevResult.
    let links = || -> Vec<Value> {
        let (_, body) = bed.switch.request("GET", "/v1/ports", None).unwrap();
        let v: Value = serde_json::from_str(&body).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p["link"].clone())
            .collect()
    };
    assert_eq!(links(), vec![json!("present")]);
    drop(c2);
    // Its interface vanished with the namespace: the port says so (a stale port an operator
    // can see and delete), and vswitchd stops watching it instead of spinning on a
    // descriptor that stays readable (a whole core before the fix).
    testbeds::wait::until(
        "the port to show its interface gone",
        testbeds::wait::SOON,
        || links() == vec![json!("gone")],
    )
    .unwrap();
    let busy = cpu_ticks(&bed.switch, std::time::Duration::from_secs(1));
    assert!(
        busy < 30,
        "vswitchd used {busy} of 100 ticks with a vanished interface"
    );
    let d = bed.rt.del(&conf, "ctr2", None, "eth0").unwrap();
    assert!(d.ok, "{d:?}");
    bed.nothing_left("neta");
}

#[test]
fn a_failed_add_undoes_the_port_the_interface_and_the_reservation() {
    let bed = Bed::new("lv-cni-undo");
    // host-local hands out a route through a gateway the container cannot reach: the route
    // is refused after the port and the address were made.
    let mut conf = bed.net("netu", "a");
    conf["ipam"]["routes"] = json!([{"dst": "10.200.0.0/16", "gw": "192.0.2.1"}]);
    let c1 = Netns::create("c1").unwrap();
    let o = bed
        .rt
        .try_add(&conf, "ctr1", &netns_path(&c1), "eth0")
        .unwrap();
    assert_eq!(o.code(), Some(102), "{o:?}");
    assert!(
        o.out["msg"].as_str().unwrap().contains("10.200.0.0/16"),
        "{o:?}"
    );
    assert!(!has_link(&c1, "eth0"), "the interface is gone");
    bed.nothing_left("netu");
    // A tenant vswitchd does not have: invalid configuration, nothing made.
    let o = bed
        .rt
        .try_add(&bed.net("netx", "nosuch"), "ctr1", &netns_path(&c1), "eth0")
        .unwrap();
    assert_eq!(o.code(), Some(7), "{o:?}");
    // Missing environment: code 4.
    let o = bed
        .rt
        .exec("ADD", &bed.net("netx", "a"), &[("CNI_CONTAINERID", "ctr1")])
        .unwrap();
    assert_eq!(o.code(), Some(4), "{o:?}");
    // A namespace that does not exist: unknown container, and nothing reserved.
    let o = bed
        .rt
        .try_add(
            &bed.net("netx", "a"),
            "ctr1",
            "/run/netns/lv-no-such-ns",
            "eth0",
        )
        .unwrap();
    assert_eq!(o.code(), Some(3), "{o:?}");
    bed.nothing_left("netx");
}

#[test]
fn chained_results_pass_through_and_versions_convert() {
    let bed = Bed::new("lv-cni-chain");
    let mut conf = bed.net("netc", "a");
    conf["cniVersion"] = json!("0.4.0");
    conf["prevResult"] = json!({
        "cniVersion": "0.4.0",
        "interfaces": [{"name": "lo0"}],
        "dns": {"nameservers": ["10.9.0.53"]}
    });
    let c1 = Netns::create("c1").unwrap();
    let r = bed.rt.add(&conf, "ctr1", &netns_path(&c1), "net1").unwrap();
    assert_eq!(r["cniVersion"], "0.4.0");
    assert_eq!(r["interfaces"][0]["name"], "lo0", "{r}");
    assert_eq!(r["interfaces"][2]["name"], "net1", "{r}");
    assert_eq!(r["ips"][0]["interface"], 2, "{r}");
    assert_eq!(
        r["ips"][0]["version"], "4",
        "0.4.0 results name the IP version"
    );
    assert_eq!(r["dns"]["nameservers"][0], "10.9.0.53");
    assert!(has_link(&c1, "net1"));
    // An explicit MTU below the tenant's, and a MAC from CNI_ARGS (as podman --mac-address).
    let mut conf2 = bed.net("netm", "a");
    conf2["cniVersion"] = json!("1.1.0");
    conf2["mtu"] = json!(1400);
    // host-local stops at 1.0.0: the plugin hands it the newest version both speak.
    let c2 = Netns::create("c2").unwrap();
    let o = bed
        .rt
        .exec(
            "ADD",
            &conf2,
            &[
                ("CNI_CONTAINERID", "ctr2"),
                ("CNI_NETNS", &netns_path(&c2)),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", "IgnoreUnknown=1;MAC=02:aa:bb:cc:dd:ee"),
            ],
        )
        .unwrap();
    assert!(o.ok, "{o:?}");
    assert_eq!(sandbox_interface(&o.out).1["mtu"], 1400);
    assert_eq!(sandbox_interface(&o.out).1["mac"], "02:aa:bb:cc:dd:ee");
    let link = c2.ip(&["-o", "link", "show", "eth0"]).unwrap();
    assert!(
        link.contains("mtu 1400") && link.contains("02:aa:bb:cc:dd:ee"),
        "{link}"
    );
    // An MTU above the tenant's is refused.
    conf2["mtu"] = json!(1500);
    let c3 = Netns::create("c3").unwrap();
    let o = bed
        .rt
        .try_add(&conf2, "ctr3", &netns_path(&c3), "eth0")
        .unwrap();
    assert_eq!(o.code(), Some(7), "{o:?}");
    assert!(
        bed.rt
            .del(&conf, "ctr1", Some(&netns_path(&c1)), "net1")
            .unwrap()
            .ok
    );
    assert!(
        bed.rt
            .del(&conf2, "ctr2", Some(&netns_path(&c2)), "eth0")
            .unwrap()
            .ok
    );
    bed.nothing_left("netc");
    bed.nothing_left("netm");
}

#[test]
fn gc_status_and_version() {
    let mut bed = Bed::new("lv-cni-gc");
    let mut conf = bed.net("netg", "a");
    conf["cniVersion"] = json!("1.1.0");
    let other = bed.net("neto", "b");
    let cs: Vec<Netns> = (0..3)
        .map(|i| Netns::create(&format!("c{i}")).unwrap())
        .collect();
    for (i, c) in cs.iter().enumerate() {
        bed.rt
            .add(&conf, &format!("ctr{i}"), &netns_path(c), "eth0")
            .unwrap();
    }
    // Another network's attachment, which GC of this one must not touch.
    bed.rt
        .add(&other, "ctr9", &netns_path(&cs[0]), "eth1")
        .unwrap();
    assert_eq!(bed.ports().len(), 4);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "ctr0", "ifname": "eth0"}]);
    let o = bed.rt.exec("GC", &gc, &[]).unwrap();
    assert!(o.ok, "{o:?}");
    assert_eq!(bed.ports().len(), 2, "{:?}", bed.ports());
    let held = reservations(&bed.ipam(), "netg");
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].1, "ctr0");
    assert_eq!(reservations(&bed.ipam(), "neto").len(), 1);
    assert!(has_link(&cs[0], "eth0") && has_link(&cs[0], "eth1"));
    assert!(!has_link(&cs[1], "eth0") && !has_link(&cs[2], "eth0"));
    // GC with a 1.0.0 configuration is refused (GC is a 1.1.0 operation).
    let o = bed.rt.exec("GC", &bed.net("netg", "a"), &[]).unwrap();
    assert_eq!(o.code(), Some(1), "{o:?}");
    // VERSION.
    let o = bed
        .rt
        .exec(
            "VERSION",
            &json!({"cniVersion": "1.1.0", "type": "vswitch-cni"}),
            &[],
        )
        .unwrap();
    assert!(o.ok);
    assert_eq!(
        o.out["supportedVersions"],
        json!(["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    // STATUS: ready while vswitchd answers; 50 when it is down, and ADD asks to try later.
    let o = bed.rt.exec("STATUS", &conf, &[]).unwrap();
    assert!(o.ok, "{o:?}");
    let mut no_tenant = conf.clone();
    no_tenant["tenant"] = json!("nosuch");
    assert_eq!(
        bed.rt.exec("STATUS", &no_tenant, &[]).unwrap().code(),
        Some(50)
    );
    bed.switch.kill9();
    let o = bed.rt.exec("STATUS", &conf, &[]).unwrap();
    assert_eq!(o.code(), Some(50), "{o:?}");
    let c9 = Netns::create("c9").unwrap();
    let o = bed
        .rt
        .try_add(&conf, "ctr8", &netns_path(&c9), "eth0")
        .unwrap();
    assert_eq!(o.code(), Some(11), "{o:?}");
    assert_eq!(
        reservations(&bed.ipam(), "netg").len(),
        1,
        "nothing reserved"
    );
    // vswitchd back (its state persisted): DEL of what is left empties everything.
    bed.switch = start_vswitchd(
        &bed.host,
        "198.18.0.1".parse().unwrap(),
        bed.dir.path(),
        &[],
    )
    .unwrap();
    assert!(
        bed.rt
            .del(&conf, "ctr0", Some(&netns_path(&cs[0])), "eth0")
            .unwrap()
            .ok
    );
    assert!(
        bed.rt
            .del(&other, "ctr9", Some(&netns_path(&cs[0])), "eth1")
            .unwrap()
            .ok
    );
    bed.nothing_left("netg");
    bed.nothing_left("neto");
}

#[test]
fn twenty_concurrent_add_del_pairs_leave_nothing() {
    let bed = Bed::new("lv-cni-many");
    let conf = bed.net("netp", "a");
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let (rt, conf) = (&bed.rt, &conf);
                s.spawn(move || -> Result<(), String> {
                    let ns = Netns::create(&format!("p{i}")).map_err(|e| e.to_string())?;
                    let id = format!("ctr{i}");
                    let r = rt
                        .add(conf, &id, &netns_path(&ns), "eth0")
                        .map_err(|e| e.to_string())?;
                    if !has_link(&ns, "eth0") || r["ips"].as_array().map(Vec::len) != Some(1) {
                        return Err(format!("{id}: {r}"));
                    }
                    let d = rt
                        .del(conf, &id, Some(&netns_path(&ns)), "eth0")
                        .map_err(|e| e.to_string())?;
                    if !d.ok || has_link(&ns, "eth0") {
                        return Err(format!("{id}: DEL {d:?}"));
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    bed.nothing_left("netp");
}

/// TCP throughput (Mbit/s) from `from` to `to_ip` (an iperf3 server in `to`) over 2 s.
fn throughput(from: &Netns, to: &Netns, to_ip: Ipv4Addr, port: u16) -> f64 {
    let p = port.to_string();
    let server = testbeds::probe::Iperf3Server::start(to, port).unwrap();
    let out = from
        .exec(
            "iperf3",
            &["-c", &to_ip.to_string(), "-p", &p, "-t", "2", "-J"],
        )
        .unwrap();
    server.wait();
    let v: Value = serde_json::from_str(&out).unwrap();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap()
        / 1e6
}

#[test]
fn chained_bandwidth_limits_hold_in_both_directions_and_del_removes_them() {
    let bed = Bed::new("lv-cni-bw");
    let mut main = bed.net("netb", "a");
    main["capabilities"] = json!({"bandwidth": true});
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "netb",
        "plugins": [main, {"type": "bandwidth", "capabilities": {"bandwidth": true}}]
    });
    // 20 Mbit/s each way for the limited container, nothing for its peer.
    let runtime = json!({"bandwidth": {
        "ingressRate": 20_000_000, "ingressBurst": 200_000,
        "egressRate": 20_000_000, "egressBurst": 200_000
    }});
    let (c1, c2) = (Netns::create("c1").unwrap(), Netns::create("c2").unwrap());
    let r1 = bed
        .rt
        .add_list(&list, &runtime, "ctr1", &netns_path(&c1), "eth0")
        .unwrap();
    let r2 = bed
        .rt
        .add_list(&list, &json!({}), "ctr2", &netns_path(&c2), "eth0")
        .unwrap();
    // The reference plugin found the switch's end of the veth and shapes it.
    let host_end = r1["interfaces"][0]["name"].as_str().unwrap().to_owned();
    let qdiscs = bed
        .host
        .exec("tc", &["qdisc", "show", "dev", &host_end])
        .unwrap();
    assert!(qdiscs.contains("tbf"), "{qdiscs}");
    let (_, port) = bed
        .switch
        .request("GET", &format!("/v1/ports/{host_end}"), None)
        .unwrap();
    assert!(port.contains("\"bits_per_sec\":20000000"), "{port}");
    // Both directions stay near 20 Mbit/s (well under what the path carries unlimited).
    let (ip1, ip2) = (first_ip(&r1), first_ip(&r2));
    let out = throughput(&c1, &c2, ip2, 5301);
    let into = throughput(&c2, &c1, ip1, 5302);
    assert!(out < 40.0, "from the container: {out:.1} Mbit/s");
    assert!(into < 40.0, "into the container: {into:.1} Mbit/s");
    eprintln!("limited to 20 Mbit/s: from the container {out:.1}, into it {into:.1}");
    // DEL of the list: the shaping, its ifb device and the port go.
    bed.rt
        .del_list(&list, &runtime, &r1, "ctr1", Some(&netns_path(&c1)), "eth0")
        .unwrap();
    bed.rt
        .del_list(
            &list,
            &json!({}),
            &r2,
            "ctr2",
            Some(&netns_path(&c2)),
            "eth0",
        )
        .unwrap();
    let links = bed.host.ip(&["-o", "link", "show"]).unwrap();
    assert_eq!(
        links.lines().count(),
        2,
        "only lo and the underlay remain: {links}"
    );
    bed.nothing_left("netb");
}

/// What containerd's CRI (and kubelet through it) sends: a network list of spec 1.0.0, the
/// Kubernetes `CNI_ARGS` and the capabilities' runtime settings.
#[test]
fn kubernetes_style_arguments_and_capabilities() {
    let bed = Bed::new("lv-cni-k8s");
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "k8s",
        "plugins": [
            {
                "type": "vswitch-cni",
                "tenant": "a",
                "socket": bed.socket(),
                "capabilities": {"ips": true, "mac": true, "bandwidth": true},
                "ipam": {"type": "host-local", "subnet": "10.9.0.0/24", "dataDir": bed.ipam()},
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ]
    });
    let runtime = json!({
        "ips": ["10.9.0.77/24"],
        "mac": "02:00:00:00:77:77",
        "bandwidth": {"ingressRate": 8_000_000, "ingressBurst": 1_000_000,
                      "egressRate": 4_000_000, "egressBurst": 500_000},
        "portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}],
    });
    let rt = bed.rt.with_args(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
         K8S_POD_INFRA_CONTAINER_ID=0123456789ab;K8S_POD_UID=4f0e",
    );
    let pod = Netns::create("pod").unwrap();
    let result = rt
        .add_list(&list, &runtime, "0123456789ab", &netns_path(&pod), "eth0")
        .unwrap();
    assert_eq!(first_ip(&result), Ipv4Addr::new(10, 9, 0, 77), "{result}");
    let link = pod.ip(&["-o", "link", "show", "eth0"]).unwrap();
    assert!(link.contains("02:00:00:00:77:77"), "{link}");
    let (_, body) = bed.switch.request("GET", "/v1/ports", None).unwrap();
    let ports: Value = serde_json::from_str(&body).unwrap();
    let port = &ports[0];
    assert_eq!(port["labels"]["k8s.pod.namespace"], "shop", "{port}");
    assert_eq!(port["labels"]["k8s.pod.name"], "web-0", "{port}");
    assert_eq!(port["mac"], "02:00:00:00:77:77");
    assert_eq!(port["ips"][0], "10.9.0.77");
    assert_eq!(
        port["rate_limit"]["bits_per_sec"], 4_000_000,
        "egress policed: {port}"
    );
    // portmap installed its rules on the host for the pod's address.
    let nat = bed.host.exec("iptables-save", &["-t", "nat"]).unwrap();
    assert!(nat.contains("18080") && nat.contains("10.9.0.77"), "{nat}");
    rt.del_list(
        &list,
        &runtime,
        &result,
        "0123456789ab",
        Some(&netns_path(&pod)),
        "eth0",
    )
    .unwrap();
    bed.nothing_left("k8s");
    let nat = bed.host.exec("iptables-save", &["-t", "nat"]).unwrap();
    assert!(!nat.contains("18080"), "portmap rules left: {nat}");
}
