//! vhost-user-net ports of a real vswitchd, driven by a raw vhost-user frontend with crafted
//! rings: descriptors outside guest memory, chain loops, oversize chains and garbage
//! virtio-net headers are dropped and counted, port security drops a spoofed source; frames
//! around them still reach the tenant's container, and the daemon keeps serving.

use std::net::Ipv4Addr;
use std::path::Path;

use testbeds::daemon::{Daemon, container_port, start_vswitchd};
use testbeds::netns::missing_privileges;
use testbeds::scratch::Scratch;
use testbeds::switch_bed::Underlay;
use vm_memory::{Bytes, GuestAddress};

#[path = "common/raw_frontend.rs"]
mod raw;

fn post(d: &Daemon, path: &str, body: &str) {
    d.create(path, body).unwrap();
}

/// A broadcast ARP request from 02:00:00:00:0a:01 (10.9.0.2) for 10.9.0.1, after a zeroed
/// 12-byte virtio-net header.
fn arp_request() -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&[2, 0, 0, 0, 0x0a, 1]);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[2, 0, 0, 0, 0x0a, 1, 10, 9, 0, 2]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 9, 0, 1]);
    f.resize(12 + 60, 0);
    f
}

fn counter(d: &Daemon, port: &str, field: &str) -> u64 {
    let (_, body) = d
        .request("GET", &format!("/v1/ports/{port}"), None)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    match field {
        "malformed" | "spoofed_mac" | "rate_limited" => {
            v["counters"]["drops"][field].as_u64().unwrap_or(0)
        }
        f => v["counters"][f].as_u64().unwrap_or(0),
    }
}

#[test]
fn hostile_transmit_rings_are_dropped_and_counted_and_the_switch_keeps_forwarding() {
    if let Some(why) = missing_privileges() {
        panic!("needs root: {why}");
    }
    let dir = Scratch::new(Path::new("/var/tmp"), "lv-vhost-net").unwrap();
    let mut ul = Underlay::new().unwrap();
    let host = ul.host("h1", Ipv4Addr::new(198, 18, 0, 1)).unwrap();
    let d = start_vswitchd(&host, "198.18.0.1".parse().unwrap(), dir.path(), &[]).unwrap();
    post(&d, "/v1/tenants", r#"{"name":"a","vni":100}"#);
    let ct = container_port(&d, "ct1", "a", "10.9.0.1/24").unwrap();
    // Port security applies to VMs as to containers: only this MAC and address.
    post(
        &d,
        "/v1/ports",
        r#"{"name":"vm1","tenant":"a","kind":"vhost-user-net","mac":"02:00:00:00:0a:01","ips":["10.9.0.2"]}"#,
    );
    // The transmit queue (1) of the VM's device.
    let mut r = raw::Ring::connect_queue(&dir.join("run/vhost/vm1.sock"), 1);
    let frame = arp_request();
    let data = raw::DATA;
    r.mem.write_slice(&frame, GuestAddress(data)).unwrap();
    let send_valid = |r: &mut raw::Ring| {
        assert_eq!(
            r.submit(&[(data, frame.len() as u32, false)], false),
            Some(0)
        );
    };
    send_valid(&mut r);
    // A buffer outside guest memory.
    assert_eq!(r.submit(&[(0x7fff_0000_0000, 64, false)], false), Some(0));
    // A chain that loops back on itself.
    assert_eq!(
        r.submit(&[(data, 12, false), (data + 12, 60, false)], true),
        Some(0)
    );
    // A chain longer than any frame (64 KiB + header): refused, not read.
    assert_eq!(
        r.submit(
            &[
                (data, 0x8000, false),
                (data, 0x8000, false),
                (data, 0x8000, false)
            ],
            false
        ),
        Some(0)
    );
    // A garbage virtio-net header: an unknown segmentation type.
    let mut bad = frame.clone();
    bad[1] = 0x33;
    r.mem
        .write_slice(&bad, GuestAddress(data + 0x1000))
        .unwrap();
    assert_eq!(
        r.submit(&[(data + 0x1000, bad.len() as u32, false)], false),
        Some(0)
    );
    // A buffer too short for the header.
    assert_eq!(r.submit(&[(data, 6, false)], false), Some(0));
    // A frame from another MAC than the port's: port security drops it.
    let mut spoofed = frame.clone();
    spoofed[12 + 11] = 0x99;
    r.mem
        .write_slice(&spoofed, GuestAddress(data + 0x2000))
        .unwrap();
    assert_eq!(
        r.submit(&[(data + 0x2000, spoofed.len() as u32, false)], false),
        Some(0)
    );
    send_valid(&mut r);
    // The two valid frames were switched (the container saw them: ARP requests for its
    // address, answered), the spoofed one received and dropped by port security, the broken
    // ones dropped before that and counted; the daemon serves on.
    let ct_rx = || -> u64 {
        ct.exec("cat", &["/sys/class/net/eth0/statistics/rx_packets"])
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let all_counted = || {
        counter(&d, "vm1", "rx_packets") >= 3
            && counter(&d, "vm1", "malformed") >= 4
            && counter(&d, "vm1", "spoofed_mac") >= 1
            && counter(&d, "ct1", "tx_packets") >= 2
            && ct_rx() >= 2
    };
    let _ = testbeds::wait::until(
        "the frames to be counted",
        testbeds::wait::SOON,
        all_counted,
    );
    assert_eq!(counter(&d, "vm1", "rx_packets"), 3);
    assert!(counter(&d, "vm1", "malformed") >= 4);
    assert_eq!(counter(&d, "vm1", "spoofed_mac"), 1);
    assert!(counter(&d, "ct1", "tx_packets") >= 2);
    assert!(ct_rx() >= 2);
    // The port is deleted while its "VM" is still connected: the socket goes, the VM's frames
    // go nowhere, the daemon serves on.
    let (status, _) = d.request("DELETE", "/v1/ports/vm1", None).unwrap();
    assert_eq!(status, 204);
    assert!(!dir.join("run/vhost/vm1.sock").exists());
    assert!(r.submit_unanswered(
        &[(data, frame.len() as u32, false)],
        std::time::Duration::from_secs(5)
    ));
    let (status, _) = d.request("GET", "/v1/ports/ct1", None).unwrap();
    assert_eq!(status, 200);
    // Ingress policing applies to VMs too: 1 packet/s (burst 32), 60 frames sent.
    post(
        &d,
        "/v1/ports",
        r#"{"name":"vm2","tenant":"a","kind":"vhost-user-net","rate_limit":{"packets_per_sec":1}}"#,
    );
    let mut r2 = raw::Ring::connect_queue(&dir.join("run/vhost/vm2.sock"), 1);
    r2.mem.write_slice(&frame, GuestAddress(data)).unwrap();
    let start = std::time::Instant::now();
    for i in 0..60u16 {
        // Each frame in its own descriptor (the table is not reused).
        r2.next_desc = i;
        assert_eq!(
            r2.submit(&[(data, frame.len() as u32, false)], false),
            Some(0)
        );
    }
    // The bucket passes its burst plus one frame per second the sending took (however long
    // that was on this machine).
    let took = start.elapsed().as_secs();
    let _ = testbeds::wait::until("all 60 frames counted", testbeds::wait::SOON, || {
        counter(&d, "vm2", "rx_packets") >= 60
    });
    let limited = counter(&d, "vm2", "rate_limited");
    let passed = 60 - limited;
    assert!(
        (31..=33 + took).contains(&passed),
        "{passed} of 60 passed in {took} s"
    );
}
