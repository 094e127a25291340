//! QEMU guests (TCG) on vhost-user-net ports of vswitchd: a VM and a container (attached by
//! `vswitch-cni`) of one tenant reach each other; a VM of another tenant with the same address reaches
//! neither; after `kill -9` and a restart of vswitchd, QEMU re-attaches by itself and the VM
//! reaches its peer again.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use testbeds::cni::Runtime;
use testbeds::daemon::{Daemon, container_port, start_vswitchd};
use testbeds::guest;
use testbeds::netns::{Netns, missing_privileges};
use testbeds::probe::ping;
use testbeds::scratch::Scratch;
use testbeds::switch_bed::Underlay;

fn post(d: &Daemon, path: &str, body: &str) {
    d.create(path, body).unwrap();
}

#[test]
fn a_vm_and_a_container_of_one_tenant_talk_and_survive_a_switch_restart() {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    if !guest::available() {
        panic!("QEMU is not installed: scripts/install-qemu installs it");
    }
    let image = guest::image().unwrap();
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-guest-net").unwrap();
    let mut ul = Underlay::new().unwrap();
    let host = ul.host("h1", Ipv4Addr::new(198, 18, 0, 1)).unwrap();
    let underlay = "198.18.0.1".parse().unwrap();
    let mut d = start_vswitchd(&host, underlay, dir.path(), &["--workers", "2"]).unwrap();
    post(&d, "/v1/tenants", r#"{"name":"a","vni":100}"#);
    post(&d, "/v1/tenants", r#"{"name":"b","vni":200}"#);
    // The container: attached by the CNI plugin as a runtime would (the reference `static`
    // IPAM plugin gives it its address).
    let ct = Netns::create("ct1").unwrap();
    let net = serde_json::json!({
        "cniVersion": "1.0.0", "name": "vmnet", "type": "vswitch-cni", "tenant": "a",
        "socket": dir.join("run/vswitchd.sock"),
        "ipam": {"type": "static", "addresses": [{"address": "10.9.0.1/24"}]}
    });
    let cni = Runtime::new().unwrap();
    cni.add(&net, "ct1", &format!("/run/netns/{}", ct.name()), "eth0")
        .unwrap();
    // The VMs: vhost-user-net ports, one per tenant, the same address in both.
    post(
        &d,
        "/v1/ports",
        r#"{"name":"vm1","tenant":"a","kind":"vhost-user-net","mac":"02:00:00:00:0a:01"}"#,
    );
    post(
        &d,
        "/v1/ports",
        r#"{"name":"vm2","tenant":"b","kind":"vhost-user-net","mac":"02:00:00:00:0b:01"}"#,
    );
    let script = r#"
ip link set eth0 up
ip addr add 10.9.0.2/24 dev eth0
ping -c 3 -W 2 10.9.0.1 > /tmp/p1 2>&1; echo "PING-1 $?"
cat /tmp/p1
echo VM-WAITING
wait-host switch-restarted
# QEMU re-attaches to the restarted switch by itself; the host's deadline bounds this.
until ping -c 1 -W 1 10.9.0.1 > /dev/null 2>&1; do :; done
echo "PING-AFTER-RESTART 0"
"#;
    let isolated = r#"
ip link set eth0 up
ip addr add 10.9.0.2/24 dev eth0
ping -c 2 -W 1 10.9.0.1 > /dev/null 2>&1; echo "PING-OTHER-TENANT $?"
"#;
    let vm_socket = |p: &str| dir.join(format!("run/vhost/{p}.sock"));
    let mut vm1 = guest::Guest::boot_with_nics(
        &image,
        &[],
        &[guest::Nic::new(vm_socket("vm1"), "02:00:00:00:0a:01")],
        script,
        &dir.join("vm1"),
    )
    .unwrap();
    vm1.wait_for("VM-WAITING", Duration::from_secs(300))
        .unwrap();
    let (_, info) = d.request("GET", "/v1/ports", None).unwrap();
    assert!(
        vm1.console().contains("PING-1 0"),
        "{}\n{info}",
        vm1.console()
    );
    // The container reaches the VM too.
    let r = ping(&ct, "10.9.0.2".parse().unwrap(), 2, 56).unwrap();
    assert_eq!(r.received, r.sent, "{r:?}");
    // The other tenant's VM, same address: nobody answers it.
    let vm2 = guest::Guest::boot_with_nics(
        &image,
        &[],
        &[guest::Nic::new(vm_socket("vm2"), "02:00:00:00:0b:01")],
        isolated,
        &dir.join("vm2"),
    )
    .unwrap();
    let run2 = vm2.finish(Duration::from_secs(300)).unwrap();
    assert!(
        run2.console.contains("PING-OTHER-TENANT 1"),
        "{}",
        run2.console
    );
    // kill -9 and a restart: QEMU comes back by itself, the VM reaches the container again.
    d.kill9();
    d = start_vswitchd(&host, underlay, dir.path(), &["--workers", "2"]).unwrap();
    vm1.send("switch-restarted", Duration::from_secs(60))
        .unwrap();
    let run1 = vm1.finish(Duration::from_secs(300)).unwrap();
    assert!(
        run1.console.contains("PING-AFTER-RESTART 0"),
        "{}",
        run1.console
    );
    let (_, ports) = d.request("GET", "/v1/ports/vm1", None).unwrap();
    assert!(ports.contains("vhost-user-net"), "{ports}");
    // The restarted switch kept the container's attachment: CNI DEL finds and removes it.
    let del = cni
        .del(
            &net,
            "ct1",
            Some(&format!("/run/netns/{}", ct.name())),
            "eth0",
        )
        .unwrap();
    assert!(del.ok, "{del:?}");
    let (_, ports) = d.request("GET", "/v1/ports", None).unwrap();
    assert!(!ports.contains("cni.container"), "{ports}");
    assert!(ct.ip(&["link", "show", "eth0"]).is_err(), "eth0 is gone");
}

/// Average frame size a port's counters show in one direction (`rx`: from the VM).
fn average_frame(d: &Daemon, port: &str, dir: &str) -> f64 {
    let (_, body) = d
        .request("GET", &format!("/v1/ports/{port}"), None)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let c = &v["counters"];
    let bytes = c[format!("{dir}_bytes")].as_f64().unwrap_or(0.0);
    let packets = c[format!("{dir}_packets")].as_f64().unwrap_or(0.0);
    assert!(packets > 0.0, "no {dir} traffic on {port}: {body}");
    bytes / packets
}

#[test]
fn two_vms_on_two_hosts_talk_tcp_across_the_overlay() {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    if !guest::available() {
        panic!("QEMU is not installed: scripts/install-qemu installs it");
    }
    let image = guest::image_with_iperf3().unwrap();
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-guest-overlay").unwrap();
    let mut ul = Underlay::new().unwrap();
    let mut switches = Vec::new();
    for n in [1u8, 2] {
        let ns = ul
            .host(&format!("h{n}"), Ipv4Addr::new(198, 18, 0, n))
            .unwrap();
        let at = std::net::IpAddr::from([198, 18, 0, n]);
        let d = start_vswitchd(&ns, at, &dir.join(format!("h{n}")), &["--workers", "1"]).unwrap();
        post(&d, "/v1/tenants", r#"{"name":"a","vni":100}"#);
        post(
            &d,
            "/v1/tenants/a/vteps",
            &format!(r#"{{"ip":"198.18.0.{}"}}"#, 3 - n),
        );
        post(
            &d,
            "/v1/ports",
            &format!(
                r#"{{"name":"vm{n}","tenant":"a","kind":"vhost-user-net","mac":"02:00:00:00:0a:0{n}"}}"#
            ),
        );
        switches.push((ns, d));
    }
    // The guest's MTU is the one the switch reports for the port (the underlay's minus
    // VXLAN's 50 bytes), handed to QEMU as host_mtu (VIRTIO_NET_F_MTU).
    let (_, port) = switches[0].1.request("GET", "/v1/ports/vm1", None).unwrap();
    let mtu = serde_json::from_str::<serde_json::Value>(&port).unwrap()["mtu"]
        .as_u64()
        .unwrap();
    assert_eq!(mtu, 1450, "{port}");
    let server = r#"
ip link set eth0 up
ip addr add 10.9.0.2/24 dev eth0
echo "MTU $(cat /sys/class/net/eth0/mtu)"
iperf3 -s -1 --forceflush > /tmp/s 2>&1 &
until grep -q "Server listening" /tmp/s; do sleep 0.1; done
echo SERVER-LISTENING
wait $!; echo "SERVER $?"
tail -n 4 /tmp/s
cat /proc/net/dev | grep eth0
"#;
    let client = r#"
ip link set eth0 up
ip addr add 10.9.0.1/24 dev eth0
wait-host server-listening
# The host's deadline bounds the wait for the overlay path.
until ping -c 1 -W 1 10.9.0.2 > /dev/null 2>&1; do :; done
ping -c 3 -W 5 10.9.0.2 > /tmp/p 2>&1; echo "PING $?"
iperf3 -c 10.9.0.2 -t 5 > /tmp/c 2>&1; echo "IPERF $?"
cat /tmp/c
cat /proc/net/dev | grep eth0
"#;
    let nic = |n: u8| guest::Nic {
        mtu: Some(mtu as u16),
        ..guest::Nic::new(
            dir.join(format!("h{n}/run/vhost/vm{n}.sock")),
            &format!("02:00:00:00:0a:0{n}"),
        )
    };
    let mut vm2 =
        guest::Guest::boot_with_nics(&image, &[], &[nic(2)], server, &dir.join("vm2")).unwrap();
    let mut vm1 =
        guest::Guest::boot_with_nics(&image, &[], &[nic(1)], client, &dir.join("vm1")).unwrap();
    vm2.wait_for("SERVER-LISTENING", Duration::from_secs(300))
        .unwrap();
    vm1.send("server-listening", Duration::from_secs(300))
        .unwrap();
    let run1 = vm1.finish(Duration::from_secs(300)).unwrap();
    let run2 = vm2.finish(Duration::from_secs(60)).unwrap();
    let both = format!("vm1:\n{}\nvm2:\n{}", run1.console, run2.console);
    assert!(run2.console.contains("MTU 1450"), "{both}");
    assert!(run1.console.contains("PING 0"), "{both}");
    assert!(run1.console.contains("IPERF 0"), "{both}");
    assert!(run2.console.contains("SERVER 0"), "{both}");
    assert!(
        run1.console.contains("receiver") && run1.console.contains("bits/sec"),
        "{both}"
    );
    // The sender's TCP went out as segmentation-offload super-frames, cut into MTU-sized
    // segments only for the VXLAN uplink.
    let sent = average_frame(&switches[0].1, "vm1", "rx");
    assert!(
        sent > 1514.0,
        "average frame from vm1: {sent} bytes\n{both}"
    );
    let received = average_frame(&switches[1].1, "vm2", "tx");
    // The receiving guest took every frame: no length errors (a frame's buffers published
    // together), no bad offload headers, no drops.
    let rx = run2
        .console
        .lines()
        .find_map(|l| l.trim().strip_prefix("eth0:"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .unwrap_or_default();
    assert!(rx.len() >= 6, "no interface statistics\n{both}");
    assert_eq!(
        (rx[2], rx[3], rx[5]),
        ("0", "0", "0"),
        "receive errors, drops, frame errors in vm2\n{both}"
    );
    eprintln!("{both}\naverage frame from vm1 {sent:.0} B, to vm2 {received:.0} B");
}

#[test]
fn a_vm_with_two_queue_pairs_sends_on_both_and_two_workers_serve_them() {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    if !guest::available() {
        panic!("QEMU is not installed: scripts/install-qemu installs it");
    }
    let image = guest::image_with_iperf3().unwrap();
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-guest-mq").unwrap();
    let mut ul = Underlay::new().unwrap();
    let host = ul.host("h1", Ipv4Addr::new(198, 18, 0, 1)).unwrap();
    let d = start_vswitchd(
        &host,
        "198.18.0.1".parse().unwrap(),
        dir.path(),
        &["--workers", "2"],
    )
    .unwrap();
    post(&d, "/v1/tenants", r#"{"name":"a","vni":100}"#);
    let ct = container_port(&d, "ct1", "a", "10.9.0.1/24").unwrap();
    post(
        &d,
        "/v1/ports",
        r#"{"name":"vm1","tenant":"a","kind":"vhost-user-net","mac":"02:00:00:00:0a:01"}"#,
    );
    // One iperf3 server per guest CPU.
    let servers: Vec<_> = [5201, 5202]
        .into_iter()
        .map(|p| testbeds::probe::Iperf3Server::start(&ct, p).unwrap())
        .collect();
    // A TCP stream from each vCPU: Linux maps CPU k to transmit queue k (XPS).
    let script = r#"
ip link set eth0 up
ip addr add 10.9.0.2/24 dev eth0
echo "CPUS $(nproc) QUEUES $(ls /sys/class/net/eth0/queues | tr '\n' ' ')"
# The host's deadline bounds the wait for the path to the container.
until ping -c 1 -W 1 10.9.0.1 > /dev/null 2>&1; do :; done
taskset 1 iperf3 -c 10.9.0.1 -p 5201 -t 3 > /tmp/a 2>&1 &
taskset 2 iperf3 -c 10.9.0.1 -p 5202 -t 3 > /tmp/b 2>&1 &
wait
echo "STREAMS $(cat /tmp/a /tmp/b | grep -c receiver)"
"#;
    let nic = guest::Nic {
        queues: 2,
        mtu: Some(1450),
        ..guest::Nic::new(dir.join("run/vhost/vm1.sock"), "02:00:00:00:0a:01")
    };
    let vm = guest::Guest::boot_with_nics(&image, &[], &[nic], script, &dir.join("vm1")).unwrap();
    let run = vm.finish(Duration::from_secs(300)).unwrap();
    drop(servers);
    let (_, port) = d.request("GET", "/v1/ports/vm1", None).unwrap();
    let info = format!("{}\n{port}", run.console);
    assert!(run.console.contains("CPUS 2"), "{info}");
    assert!(run.console.contains("rx-1"), "{info}");
    assert!(run.console.contains("STREAMS 2"), "{info}");
    let v: serde_json::Value = serde_json::from_str(&port).unwrap();
    let pairs = v["queue_pairs"].as_array().cloned().unwrap_or_default();
    assert_eq!(pairs.len(), 2, "{info}");
    // Both transmit queues carried the guest's frames, each served by its own worker.
    for p in &pairs {
        assert!(p["from_guest"].as_u64().unwrap_or(0) > 100, "{info}");
    }
    assert_ne!(pairs[0]["worker"], pairs[1]["worker"], "{info}");
    // TSO super-frames from the guest reach the container's TAP whole (it takes offloads).
    let from_vm = average_frame(&d, "vm1", "rx");
    let to_container = average_frame(&d, "ct1", "tx");
    assert!(
        from_vm > 1514.0 && to_container > 1514.0,
        "average frame from the VM {from_vm:.0} B, to the container {to_container:.0} B\n{info}"
    );
    eprintln!(
        "{info}\naverage frame from the VM {from_vm:.0} B, to the container {to_container:.0} B"
    );
}
