//! QEMU guests (TCG) on vhost-user-net ports of vswitchd: a VM and a container endpoint (TAP)
//! of one tenant reach each other; a VM of another tenant with the same address reaches
//! neither; after `kill -9` and a restart of vswitchd, QEMU re-attaches by itself and the VM
//! reaches its peer again.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use testbeds::daemon::{Daemon, container_port, start_vswitchd};
use testbeds::guest;
use testbeds::netns::missing_privileges;
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
    // The container: a TAP moved into its namespace.
    let ct = container_port(&d, "ct1", "a", "10.9.0.1/24").unwrap();
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
i=0; while [ ! -e /tmp/never ] && [ $i -lt 600 ]; do
  if ping -c 1 -W 1 10.9.0.1 > /dev/null 2>&1; then
    [ -e /tmp/down ] && { echo "PING-AFTER-RESTART 0"; break; }
  else
    touch /tmp/down
  fi
  i=$((i+1))
done
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
        &[(vm_socket("vm1"), "02:00:00:00:0a:01".into())],
        script,
        &dir.join("vm1"),
    )
    .unwrap();
    vm1.wait_for("VM-WAITING", Duration::from_secs(120))
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
        &[(vm_socket("vm2"), "02:00:00:00:0b:01".into())],
        isolated,
        &dir.join("vm2"),
    )
    .unwrap();
    let run2 = vm2.finish(Duration::from_secs(120)).unwrap();
    assert!(
        run2.console.contains("PING-OTHER-TENANT 1"),
        "{}",
        run2.console
    );
    // kill -9 and a restart: QEMU comes back by itself, the VM reaches the container again.
    d.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    d = start_vswitchd(&host, underlay, dir.path(), &["--workers", "2"]).unwrap();
    let run1 = vm1.finish(Duration::from_secs(180)).unwrap();
    assert!(
        run1.console.contains("PING-AFTER-RESTART 0"),
        "{}",
        run1.console
    );
    let (_, ports) = d.request("GET", "/v1/ports/vm1", None).unwrap();
    assert!(ports.contains("vhost-user-net"), "{ports}");
}
