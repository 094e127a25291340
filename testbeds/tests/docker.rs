//! Docker containers on tenant networks through `vswitch-docker` (libnetwork's remote network
//! and IPAM drivers), with the real dockerd (Debian's docker.io 20.10): two hosts (network
//! namespaces on one underlay), each with vswitchd, the plugin and a private dockerd.
//!
//! Containers on tenant a on both hosts talk across VXLAN, and with a podman container
//! (vswitch-cni) of the same tenant; a Docker network on tenant b with the same subnet stays
//! apart; the plugin and vswitchd each restart under running
//! containers; `docker rm -f` and `docker network rm` leave no port and no plugin state.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use testbeds::daemon::{Daemon, start_vswitchd, workspace_binary};
use testbeds::docker::{Dockerd, IMAGE};
use testbeds::netns::{Netns, missing_privileges};
use testbeds::switch_bed::Underlay;
use testbeds::wait::{SOON, until};

struct Host {
    ns: Netns,
    ip: Ipv4Addr,
    dir: PathBuf,
    vswitchd: Option<Daemon>,
    plugin: Option<Daemon>,
    name: String,
}

impl Host {
    fn start_vswitchd(&mut self) {
        self.vswitchd =
            Some(start_vswitchd(&self.ns, self.ip.into(), &self.dir.join("vs"), &[]).unwrap());
    }

    fn start_plugin(&mut self) {
        let args: Vec<String> = [
            "--name",
            &self.name,
            "--socket",
            &self.dir.join("vs/run/vswitchd.sock").display().to_string(),
            "--state-dir",
            &self.dir.join("plugin").display().to_string(),
            "--log-format",
            "json",
        ]
        .map(String::from)
        .to_vec();
        self.plugin = Some(
            Daemon::start(
                &self.ns,
                &workspace_binary("vswitch-docker").unwrap(),
                &args,
                PathBuf::from(format!("/run/docker/plugins/{}.sock", self.name)),
            )
            .unwrap(),
        );
    }

    fn switch(&self) -> &Daemon {
        self.vswitchd.as_ref().unwrap()
    }

    fn docker_ports(&self) -> usize {
        let (_, body) = self.switch().request("GET", "/v1/ports", None).unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter(|p| p["labels"]["docker.endpoint"].is_string())
            .count()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // SIGTERM: the plugin removes its socket from the plugin directory (shared with
        // any other dockerd of the machine); a killed one's socket is removed here.
        if let Some(mut p) = self.plugin.take() {
            p.terminate();
        }
        let _ = std::fs::remove_file(format!("/run/docker/plugins/{}.sock", self.name));
    }
}

fn pings(d: &Dockerd, from: &str, to: &str) -> bool {
    d.succeeds(&["exec", from, "ping", "-c", "1", "-W", "5", to])
}

#[test]
fn docker_networks_on_tenants_across_hosts() {
    if let Some(why) = missing_privileges() {
        eprintln!("SKIPPED docker test: {why}");
        return;
    }
    assert!(
        testbeds::docker::installed(),
        "docker.io is not installed: scripts/install-deps installs it"
    );
    let tmp = testbeds::scratch::Scratch::new(&std::env::temp_dir(), "docker").unwrap();
    let mut ul = Underlay::new().unwrap();
    let id = std::process::id() % 100_000;
    let mut hosts: Vec<Host> = (1..=2u8)
        .map(|n| {
            let ip = Ipv4Addr::new(192, 168, 80, n);
            Host {
                ns: ul.host(&format!("dk{n}"), ip).unwrap(),
                ip,
                dir: tmp.join(format!("h{n}")),
                vswitchd: None,
                plugin: None,
                name: format!("lv{id}h{n}"),
            }
        })
        .collect();
    for h in &mut hosts {
        h.start_vswitchd();
    }
    for (i, h) in hosts.iter().enumerate() {
        let peer = hosts[1 - i].ip;
        for (tenant, vni) in [("a", 301), ("b", 302)] {
            h.switch()
                .create(
                    "/v1/tenants",
                    &format!(r#"{{"name":"{tenant}","vni":{vni}}}"#),
                )
                .unwrap();
            h.switch()
                .create(
                    &format!("/v1/tenants/{tenant}/vteps"),
                    &format!(r#"{{"ip":"{peer}"}}"#),
                )
                .unwrap();
        }
    }
    for h in &mut hosts {
        h.start_plugin();
    }
    let mut dockers: Vec<Dockerd> = hosts
        .iter()
        .map(|h| Dockerd::start(&h.ns, &h.dir.join("docker")).unwrap())
        .collect();
    // One Docker network per tenant and host, the same subnet; each host its own range.
    for (i, (h, d)) in hosts.iter().zip(&dockers).enumerate() {
        let range = if i == 0 {
            "10.0.0.0/26"
        } else {
            "10.0.0.64/26"
        };
        for tenant in ["a", "b"] {
            d.docker(&[
                "network",
                "create",
                "--driver",
                &h.name,
                "--ipam-driver",
                &h.name,
                "--opt",
                &format!("tenant={tenant}"),
                "--subnet",
                "10.0.0.0/24",
                "--ip-range",
                range,
                &format!("net{tenant}"),
            ])
            .unwrap();
        }
    }
    let run = |d: &Dockerd, name: &str, net: &str| {
        d.docker(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            net,
            IMAGE,
            "sleep",
            "3600",
        ])
        .unwrap();
        d.ip_of(name).unwrap()
    };
    let a1 = run(&dockers[0], "a1", "neta");
    let a2 = run(&dockers[1], "a2", "neta");
    let b1 = run(&dockers[0], "b1", "netb");
    assert_eq!(
        a1, b1,
        "both tenants allocate from the same subnet and range"
    );
    assert!(pings(&dockers[0], "a1", &a2), "a1 -> a2 across hosts");
    assert!(pings(&dockers[1], "a2", &a1), "a2 -> a1 across hosts");
    // b1 has a1's address in another tenant: it never reaches tenant a.
    assert!(!pings(&dockers[0], "b1", &a2), "tenant b reached tenant a");
    // A podman container (vswitch-cni) on the same tenant: Docker's and podman's talk.
    let rt = testbeds::cni::Runtime::new().unwrap();
    let pm = testbeds::podman::Podman::new(&hosts[0].dir.join("podman"), &rt.plugin_dir()).unwrap();
    pm.add_network(&serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "pa",
        "plugins": [{
            "type": "vswitch-cni",
            "tenant": "a",
            "socket": hosts[0].dir.join("vs/run/vswitchd.sock"),
            "ipam": {"type": "host-local", "subnet": "10.0.0.0/24", "rangeStart": "10.0.0.200",
                     "rangeEnd": "10.0.0.210", "dataDir": hosts[0].dir.join("podman-ipam")},
        }]
    }))
    .unwrap();
    pm.run(
        &hosts[0].ns,
        &[
            "run",
            "-d",
            "--name",
            "p1",
            "--network",
            "pa",
            testbeds::podman::IMAGE,
            "sleep",
            "3600",
        ],
    )
    .unwrap();
    let p1 = pm
        .run(
            &hosts[0].ns,
            &[
                "inspect",
                "--format",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                "p1",
            ],
        )
        .unwrap()
        .trim()
        .to_owned();
    assert!(pings(&dockers[1], "a2", &p1), "Docker (h2) -> podman (h1)");
    assert!(
        pm.succeeds(
            &hosts[0].ns,
            &["exec", "p1", "ping", "-c", "1", "-W", "5", &a2]
        ),
        "podman (h1) -> Docker (h2)"
    );
    pm.run(&hosts[0].ns, &["rm", "-f", "p1"]).unwrap();
    // The container's interface: the tenant MTU, the MAC the plugin pinned.
    let link = dockers[0]
        .docker(&["exec", "a1", "ip", "link", "show", "eth0"])
        .unwrap();
    assert!(link.contains("mtu 1450"), "{link}");

    // The plugin restarts: running containers keep working, new ones are attached.
    // A port of an endpoint the plugin never recorded (its answer lost in a crash) goes
    // when the plugin starts again.
    hosts[0]
        .switch()
        .create(
            "/v1/ports",
            r#"{"name":"dkstray","tenant":"a","kind":"veth","ifname":"dvstray","labels":{"docker.endpoint":"0123456789abcdef"}}"#,
        )
        .unwrap();
    assert_eq!(hosts[0].docker_ports(), 3);
    hosts[0].plugin.as_mut().unwrap().kill9();
    hosts[0].start_plugin();
    until("the stray port to go", SOON, || {
        hosts[0].docker_ports() == 2
    })
    .unwrap();
    let a3 = run(&dockers[0], "a3", "neta");
    assert!(
        pings(&dockers[1], "a2", &a3),
        "a container made after a plugin restart"
    );
    // vswitchd restarts (kill -9): the ports come back with the containers' interfaces.
    hosts[0].vswitchd.as_mut().unwrap().kill9();
    hosts[0].start_vswitchd();
    until("a1 reachable again after vswitchd's restart", SOON, || {
        pings(&dockers[1], "a2", &a1)
    })
    .unwrap();
    assert_eq!(hosts[0].docker_ports(), 3);

    // docker network disconnect / connect: the port goes and comes back.
    dockers[0]
        .docker(&["network", "disconnect", "neta", "a3"])
        .unwrap();
    until("disconnect to remove the port", SOON, || {
        hosts[0].docker_ports() == 2
    })
    .unwrap();
    dockers[0]
        .docker(&["network", "connect", "neta", "a3"])
        .unwrap();
    assert_eq!(hosts[0].docker_ports(), 3);
    let a3 = dockers[0].ip_of("a3").unwrap();
    assert!(pings(&dockers[1], "a2", &a3), "a container connected again");
    // dockerd restarts (its containers stop with it): started again, a2 is reachable again.
    dockers[1].restart().unwrap();
    until("a stopped container's port to go", SOON, || {
        hosts[1].docker_ports() == 0
    })
    .unwrap();
    dockers[1].docker(&["start", "a2"]).unwrap();
    let a2 = dockers[1].ip_of("a2").unwrap();
    assert!(pings(&dockers[0], "a1", &a2), "after dockerd's restart");

    // Nothing left after docker rm -f and docker network rm.
    for (d, names) in [
        (&dockers[0], vec!["a1", "a3", "b1"]),
        (&dockers[1], vec!["a2"]),
    ] {
        let mut args = vec!["rm", "-f"];
        args.extend(names);
        d.docker(&args).unwrap();
        d.docker(&["network", "rm", "neta", "netb"]).unwrap();
    }
    for h in &hosts {
        assert_eq!(h.docker_ports(), 0, "ports left on {}", h.name);
        let state =
            std::fs::read_to_string(h.dir.join(format!("plugin/vswitch-docker-{}.json", h.name)))
                .unwrap();
        let v: serde_json::Value = serde_json::from_str(&state).unwrap();
        assert_eq!(v["networks"], serde_json::json!({}), "{state}");
        assert_eq!(v["endpoints"], serde_json::json!({}), "{state}");
        assert_eq!(v["pools"], serde_json::json!({}), "{state}");
    }
}

/// With vswitchd in a cluster, the plugin's IPAM takes addresses from the tenant's cluster
/// IPAM (`--ipam-opt tenant=`): unique across hosts without ranges split by hand, each held
/// by the container's port, given back when the container goes.
#[test]
fn docker_addresses_from_the_cluster() {
    if let Some(why) = missing_privileges() {
        eprintln!("SKIPPED docker cluster test: {why}");
        return;
    }
    assert!(
        testbeds::docker::installed() && testbeds::etcd::installed(),
        "docker.io or etcd is not installed: scripts/install-deps installs them"
    );
    let tmp = testbeds::scratch::Scratch::new(&std::env::temp_dir(), "docker-cluster").unwrap();
    let mut ul = Underlay::new().unwrap();
    let etcd = testbeds::etcd::EtcdCluster::start(
        &mut ul,
        &[Ipv4Addr::new(192, 168, 83, 100)],
        &tmp.join("etcd"),
    )
    .unwrap();
    let id = std::process::id() % 100_000;
    let mut hosts: Vec<Host> = (1..=2u8)
        .map(|n| {
            let ip = Ipv4Addr::new(192, 168, 83, n);
            Host {
                ns: ul.host(&format!("dc{n}"), ip).unwrap(),
                ip,
                dir: tmp.join(format!("h{n}")),
                vswitchd: None,
                plugin: None,
                name: format!("lv{id}c{n}"),
            }
        })
        .collect();
    for (i, h) in hosts.iter_mut().enumerate() {
        let host = format!("h{}", i + 1);
        h.vswitchd = Some(
            start_vswitchd(
                &h.ns,
                h.ip.into(),
                &h.dir.join("vs"),
                &["--cluster", &etcd.endpoints(), "--host-name", &host],
            )
            .unwrap(),
        );
    }
    hosts[0]
        .switch()
        .create(
            "/v1/tenants",
            r#"{"name":"a","vni":311,"subnet":"10.70.0.0/24"}"#,
        )
        .unwrap();
    for h in &hosts {
        until("the tenant on every host", SOON, || {
            h.switch()
                .request("GET", "/v1/tenants/a", None)
                .is_ok_and(|(s, _)| s == 200)
        })
        .unwrap();
    }
    for h in &mut hosts {
        h.start_plugin();
    }
    let dockers: Vec<Dockerd> = hosts
        .iter()
        .map(|h| Dockerd::start(&h.ns, &h.dir.join("docker")).unwrap())
        .collect();
    for (h, d) in hosts.iter().zip(&dockers) {
        d.docker(&[
            "network",
            "create",
            "--driver",
            &h.name,
            "--ipam-driver",
            &h.name,
            "--opt",
            "tenant=a",
            "--ipam-opt",
            "tenant=a",
            "neta",
        ])
        .unwrap();
    }
    let run = |d: &Dockerd, name: &str| {
        d.docker(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "neta",
            IMAGE,
            "sleep",
            "3600",
        ])
        .unwrap();
        d.ip_of(name).unwrap()
    };
    let c1 = run(&dockers[0], "c1");
    let c2 = run(&dockers[1], "c2");
    assert_ne!(c1, c2, "the cluster handed out one address twice");
    assert!(
        c1.starts_with("10.70.0.") && c2.starts_with("10.70.0."),
        "{c1} {c2}"
    );
    assert!(pings(&dockers[0], "c1", &c2), "c1 -> c2");
    // Each address is held by its container's port.
    let (_, body) = hosts[0]
        .switch()
        .request("GET", "/v1/tenants/a/addresses", None)
        .unwrap();
    let addresses: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (_, ports) = hosts[0].switch().request("GET", "/v1/ports", None).unwrap();
    let owner_of_c1 = addresses
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["ip"] == serde_json::json!(c1))
        .map(|a| a["owner"].as_str().unwrap().to_owned())
        .unwrap();
    assert!(
        ports.contains(&format!("\"name\":\"{owner_of_c1}\"")),
        "{ports}"
    );
    for d in &dockers {
        d.docker(&["rm", "-f", "c1", "c2"]).ok();
        d.docker(&["network", "rm", "neta"]).unwrap();
    }
    let (_, body) = hosts[0]
        .switch()
        .request("GET", "/v1/tenants/a/addresses", None)
        .unwrap();
    assert_eq!(body, "[]", "addresses left in the cluster");
    drop(dockers);
    drop(hosts);
    drop(etcd);
}
