//! podman 4.3 (CNI backend) runs containers on vswitchd tenants through `vswitch-cni`,
//! chained with the reference `tuning`, `bandwidth` and `portmap` plugins: containers of one
//! tenant on two hosts reach each other across the VXLAN overlay; containers of another
//! tenant with the same subnet reach none of them; `podman rm -f` leaves no port and no
//! address reservation.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use testbeds::cni::{self, Runtime, reservations};
use testbeds::daemon::{Daemon, start_vswitchd};
use testbeds::netns::{Netns, missing_privileges};
use testbeds::podman::{self, IMAGE, Podman};
use testbeds::probe::tcp_transfer;
use testbeds::scratch::Scratch;
use testbeds::switch_bed::Underlay;

/// A network list: vswitch-cni on `tenant` of the vswitchd at `socket` (addresses
/// `first`..`last` of 10.9.0.0/24), then tuning, bandwidth and portmap.
fn network(name: &str, tenant: &str, socket: &Path, range: (&str, &str), ipam: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "vswitch-cni",
                "tenant": tenant,
                "socket": socket,
                "ipam": {
                    "type": "host-local",
                    "subnet": "10.9.0.0/24",
                    "rangeStart": range.0,
                    "rangeEnd": range.1,
                    "dataDir": ipam,
                }
            },
            {"type": "tuning", "sysctl": {"net.core.somaxconn": "512"}},
            {"type": "bandwidth", "capabilities": {"bandwidth": true}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
}

fn ports(d: &Daemon) -> Vec<Value> {
    let (_, body) = d.request("GET", "/v1/ports", None).unwrap();
    serde_json::from_str::<Value>(&body)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn address(p: &Podman, host: &Netns, container: &str) -> String {
    p.run(
        host,
        &[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            container,
        ],
    )
    .unwrap()
    .trim()
    .to_owned()
}

#[test]
fn podman_containers_on_two_hosts_share_a_tenant_and_other_tenants_stay_apart() {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    assert!(
        podman::available() && cni::reference_plugins_installed(),
        "podman and the reference CNI plugins are missing: scripts/install-deps installs them"
    );
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-podman").unwrap();
    let mut ul = Underlay::new().unwrap();
    let ips = [Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2)];
    let hosts: Vec<Netns> = (0..2)
        .map(|i| ul.host(&format!("h{}", i + 1), ips[i]).unwrap())
        .collect();
    let sock = |i: usize| -> PathBuf { dir.join(format!("h{}/run/vswitchd.sock", i + 1)) };
    let switches: Vec<Daemon> = (0..2)
        .map(|i| {
            let d = dir.join(format!("h{}", i + 1));
            let sw = start_vswitchd(&hosts[i], ips[i].into(), &d, &[]).unwrap();
            sw.create("/v1/tenants", r#"{"name":"a","vni":100}"#)
                .unwrap();
            sw.create("/v1/tenants", r#"{"name":"b","vni":200}"#)
                .unwrap();
            for t in ["a", "b"] {
                let peer = ips[1 - i];
                sw.create(
                    &format!("/v1/tenants/{t}/vteps"),
                    &format!(r#"{{"ip":"{peer}"}}"#),
                )
                .unwrap();
            }
            sw
        })
        .collect();
    let rt = Runtime::new().unwrap();
    let pm = Podman::new(&dir.join("podman"), &rt.plugin_dir()).unwrap();
    let ipam = dir.join("ipam");
    // Tenant a on both hosts (each host its own part of the subnet); tenant b on host 1,
    // the same subnet and the same addresses as tenant a there.
    pm.add_network(&network(
        "a-h1",
        "a",
        &sock(0),
        ("10.9.0.10", "10.9.0.99"),
        &ipam.join("h1"),
    ))
    .unwrap();
    pm.add_network(&network(
        "a-h2",
        "a",
        &sock(1),
        ("10.9.0.100", "10.9.0.199"),
        &ipam.join("h2"),
    ))
    .unwrap();
    pm.add_network(&network(
        "b-h1",
        "b",
        &sock(0),
        ("10.9.0.10", "10.9.0.99"),
        &ipam.join("h1b"),
    ))
    .unwrap();
    let start = |host: usize, name: &str, net: &str, extra: &[&str]| {
        let mut args = vec!["run", "-d", "--name", name, "--network", net];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, "sleep", "600"]);
        pm.run(&hosts[host], &args).unwrap();
    };
    start(0, "a1", "a-h1", &["-p", "18080:80"]);
    start(1, "a2", "a-h2", &[]);
    start(0, "b1", "b-h1", &[]);
    let (a1, a2, b1) = (
        address(&pm, &hosts[0], "a1"),
        address(&pm, &hosts[1], "a2"),
        address(&pm, &hosts[0], "b1"),
    );
    assert_eq!(a1, b1, "tenant b reuses tenant a's addresses");
    assert!(a2.starts_with("10.9.0.1"), "{a2}");
    // The chain ran: tuning's sysctl is set, portmap's rules exist in host 1.
    let somaxconn = pm
        .run(
            &hosts[0],
            &["exec", "a1", "cat", "/proc/sys/net/core/somaxconn"],
        )
        .unwrap();
    assert_eq!(somaxconn.trim(), "512");
    let nat = hosts[0].exec("iptables", &["-t", "nat", "-S"]).unwrap();
    assert!(nat.contains("18080"), "{nat}");
    // a1 and a2 talk across the overlay; b1 reaches neither a2 nor anything of tenant a.
    // (busybox ping: `-c 1 -w 60` ends at the first reply, or after 60 s without one)
    let ping = |host: usize, from: &str, to: &str, deadline: &str| {
        pm.succeeds(
            &hosts[host],
            &["exec", from, "ping", "-c", "1", "-w", deadline, to],
        )
    };
    assert!(ping(0, "a1", &a2, "60"), "a1 -> a2");
    assert!(ping(1, "a2", &a1, "60"), "a2 -> a1");
    assert!(!ping(0, "b1", &a2, "5"), "b1 must not reach tenant a");
    // TCP across the overlay between the containers' namespaces (TSO super-frames from the
    // veth, segmented for the VXLAN uplink): 8 MiB arrive intact.
    let sandbox = |host: usize, c: &str| {
        let key = pm
            .run(
                &hosts[host],
                &["inspect", "--format", "{{.NetworkSettings.SandboxKey}}", c],
            )
            .unwrap();
        Netns::borrowed(key.trim().trim_start_matches("/run/netns/")).unwrap()
    };
    let (ns1, ns2) = (sandbox(0, "a1"), sandbox(1, "a2"));
    let t = tcp_transfer(&ns1, &ns2, a2.parse().unwrap(), 5000, 8 << 20).unwrap();
    assert!(t.intact(), "{t:?}");
    let t = tcp_transfer(&ns2, &ns1, a1.parse().unwrap(), 5001, 8 << 20).unwrap();
    assert!(t.intact(), "{t:?}");
    // The MTU is the tenant's (underlay 1500 - VXLAN 50).
    let link = pm
        .run(
            &hosts[1],
            &["exec", "a2", "ip", "-o", "link", "show", "eth0"],
        )
        .unwrap();
    assert!(link.contains("mtu 1450"), "{link}");
    assert_eq!(ports(&switches[0]).len(), 2);
    assert_eq!(ports(&switches[1]).len(), 1);
    // podman rm -f: the ports, the reservations and portmap's rules go.
    pm.run(&hosts[0], &["rm", "-f", "-t", "0", "a1", "b1"])
        .unwrap();
    pm.run(&hosts[1], &["rm", "-f", "-t", "0", "a2"]).unwrap();
    for sw in &switches {
        assert!(ports(sw).is_empty(), "{:?}", ports(sw));
    }
    for net in ["h1", "h2", "h1b"] {
        let held: Vec<_> = ["a-h1", "a-h2", "b-h1"]
            .iter()
            .flat_map(|n| reservations(&ipam.join(net), n))
            .collect();
        assert!(held.is_empty(), "{net}: {held:?}");
    }
    let nat = hosts[0].exec("iptables", &["-t", "nat", "-S"]).unwrap();
    assert!(!nat.contains("18080"), "{nat}");
}
