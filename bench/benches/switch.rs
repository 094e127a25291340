//! vswitch's in-process forwarding cost per frame: the ingress decision (parse, learn, look
//! up) for a known unicast destination, and the same followed by VXLAN encapsulation towards
//! a remote VTEP. `cargo bench -p bench --bench switch`.
//!
//! A datapath worker keeps each port's tenant at hand, so it calls the tenant's `ingress`
//! directly; `via_registry` adds the switch-wide port -> tenant lookup for comparison.

use std::hint::black_box;
use std::time::Duration;

use bench::{INNER_DST, INNER_SRC, encapsulator, inner_udp_frame};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use overlay_net::{Destination, TenantLimits, Vni};
use vswitch::{Ingress, PortConfig, Switch, TenantConfig, Verdict};

fn forwarding(c: &mut Criterion) {
    let vni = Vni::new(42).unwrap();
    let mut sw = Switch::new();
    sw.add_tenant(TenantConfig {
        name: "bench".into(),
        vni,
        mtu: 1450,
        limits: TenantLimits::default(),
        learn_vteps: false,
    })
    .unwrap();
    let p1 = sw.add_port("bench", PortConfig::new("p1")).unwrap();
    let p2 = sw.add_port("bench", PortConfig::new("p2")).unwrap();
    let remote = "192.0.2.2".parse().unwrap();
    sw.tenant_mut("bench")
        .unwrap()
        .fdb_mut()
        .add_remote_vtep(remote);
    let frame = inner_udp_frame(64);
    // Teach the switch where the destination lives: on p2 for the local case.
    let mut reply = frame.clone();
    reply[..6].copy_from_slice(&INNER_SRC.0);
    reply[6..12].copy_from_slice(&INNER_DST.0);
    sw.ingress_port(p2, &reply, 0);
    assert_eq!(
        sw.ingress_port(p1, &frame, 1).1,
        Verdict::Unicast(Destination::Local(p2))
    );

    let mut g = c.benchmark_group("switch/64B");
    g.throughput(Throughput::Elements(1));
    let mut now = 1_000u64;
    g.bench_function("ingress_to_local_port/via_registry", |b| {
        b.iter(|| {
            now += 100;
            sw.ingress_port(p1, black_box(&frame), now).1
        })
    });
    let t = sw.tenant_mut("bench").unwrap();
    g.bench_function("ingress_to_local_port", |b| {
        b.iter(|| {
            now += 100;
            t.ingress(Ingress::Port(p1), black_box(&frame), now)
        })
    });

    // The remote case: the destination was learned from the uplink.
    t.ingress(Ingress::Uplink(remote), &reply, now);
    let enc = encapsulator(false);
    let h = enc.header_len();
    let mut buf = vec![0u8; h + frame.len()];
    buf[h..].copy_from_slice(&frame);
    g.bench_function("ingress_and_vxlan_encap", |b| {
        b.iter(|| {
            now += 100;
            match t.ingress(Ingress::Port(p1), black_box(&buf[h..]), now) {
                Verdict::Unicast(Destination::Remote(_)) => enc
                    .encap_in_place(vni, black_box(&mut buf), frame.len())
                    .unwrap_or(0),
                other => panic!("unexpected verdict {other:?}"),
            }
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = forwarding
}
criterion_main!(benches);
