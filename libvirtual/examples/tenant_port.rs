//! A tenant network and a port through vswitchd's API: the tenant (a VXLAN VNI with its MTU),
//! a TAP port on it with port security (only its MAC and address may send) and a rate limit,
//! then both removed. Needs a running vswitchd.
//!
//! `cargo run -p libvirtual --example tenant_port -- [SOCKET]` (default
//! `/run/libvirtual/vswitchd.sock`).

use libvirtual::net::Client;
use libvirtual::vswitch_api::{PortSpec, RateLimitSpec, TenantSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let socket = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/run/libvirtual/vswitchd.sock".into());
    let vswitchd = Client::new(&socket);
    let id = std::process::id() % 10_000;
    let tenant = format!("ex{id}");
    let info = vswitchd.create_tenant(&TenantSpec {
        name: tenant.clone(),
        vni: 100_000 + id,
        mtu: 0, // the underlay's MTU less the VXLAN overhead
        max_macs: None,
        learn_vteps: false, // frames only from the tenant's VTEPs
        subnet: None,       // cluster IPAM only
    })?;
    println!("tenant {} on VNI {}, MTU {}", info.name, info.vni, info.mtu);
    let result = vswitchd.create_port(&PortSpec {
        name: format!("ex{id}p"),
        tenant: tenant.clone(),
        kind: "tap".into(),
        mac: Some("02:00:00:00:00:01".into()),
        ips: vec!["10.0.0.1".parse()?],
        rate_limit: RateLimitSpec {
            bits_per_sec: Some(100_000_000),
            packets_per_sec: None,
        },
        netns: None,
        ifname: None,
        labels: [("app".to_string(), "example".to_string())].into(),
    });
    let shown = result.and_then(|port| {
        println!(
            "port {} ({}) on tenant {}, MTU {:?}, worker {:?}",
            port.spec.name, port.spec.kind, port.spec.tenant, port.mtu, port.worker
        );
        vswitchd.ports().map(|ports| {
            let on_tenant = ports.iter().filter(|p| p.spec.tenant == tenant).count();
            println!("{on_tenant} port(s) on {tenant}");
            on_tenant
        })
    });
    let _ = vswitchd.delete_port(&format!("ex{id}p"));
    vswitchd.delete_tenant(&tenant)?;
    if shown? != 1 {
        return Err("the port is not listed on its tenant".into());
    }
    Ok(())
}
