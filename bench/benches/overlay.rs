//! overlay-net per-packet costs: encapsulation, decapsulation, FDB lookup and learning.
//!
//! `cargo bench -p bench --bench overlay`. Inner frames of 64 and 1500 bytes (the outer packet
//! of a 1500-byte inner frame needs a jumbo underlay MTU, set here to 9000).

use std::hint::black_box;
use std::time::Duration;

use bench::{encapsulator, inner_udp_frame, tunnel};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use overlay_net::{
    DecapConfig, Destination, Encapsulator, MacAddr, PortId, TenantFdb, TenantLimits, Timestamp,
    Vni, decapsulate,
};

const SIZES: [usize; 2] = [64, 1500];

fn jumbo(v6: bool) -> Encapsulator {
    let mut cfg = tunnel(v6);
    cfg.underlay_mtu = 9000;
    Encapsulator::new(&cfg).unwrap_or_else(|_| encapsulator(v6))
}

fn jumbo_zero_checksum() -> Encapsulator {
    let mut cfg = tunnel(true);
    cfg.underlay_mtu = 9000;
    cfg.udp6_zero_checksum = true;
    Encapsulator::new(&cfg).unwrap_or_else(|_| encapsulator(true))
}

fn encap_decap(c: &mut Criterion) {
    let vni = Vni::new(42).unwrap();
    // IPv6 twice: with the UDP checksum, and with a zero one (RFC 6935, `udp6zerocsumtx`).
    for (v6, zero) in [(false, false), (true, false), (true, true)] {
        let fam = match (v6, zero) {
            (false, _) => "ipv4",
            (true, false) => "ipv6",
            (true, true) => "ipv6-zero-csum",
        };
        let enc = if zero {
            jumbo_zero_checksum()
        } else {
            jumbo(v6)
        };
        let h = enc.header_len();
        for size in SIZES {
            let inner = inner_udp_frame(size);
            let mut buf = vec![0u8; h + size];
            buf[h..].copy_from_slice(&inner);
            let mut g = c.benchmark_group(format!("overlay/{fam}/{size}B"));
            g.throughput(Throughput::Elements(1));
            g.bench_function("encap_in_place", |b| {
                b.iter(|| {
                    enc.encap_in_place(black_box(vni), black_box(&mut buf), size)
                        .unwrap()
                })
            });
            let n = enc.encap_in_place(vni, &mut buf, size).unwrap();
            let outer = buf[..n].to_vec();
            let cfg = DecapConfig {
                accept_zero_udp6_checksum: zero,
                ..DecapConfig::default()
            };
            g.bench_function("decap", |b| {
                b.iter(|| decapsulate(black_box(&outer), &cfg).unwrap().vni)
            });
            // One encapsulation and the decapsulation of its result, per iteration.
            g.bench_function("encap+decap", |b| {
                b.iter(|| {
                    let n = enc.encap_in_place(vni, black_box(&mut buf), size).unwrap();
                    decapsulate(black_box(&buf[..n]), &cfg).unwrap().inner.len()
                })
            });
            let mut out = vec![0u8; h + size];
            g.bench_function("encap_copy", |b| {
                b.iter(|| {
                    enc.encap(vni, black_box(&inner), black_box(&mut out))
                        .unwrap()
                })
            });
            g.finish();
        }
    }
}

fn mac(i: u32) -> MacAddr {
    let b = i.to_be_bytes();
    MacAddr([0x02, 0x10, b[0], b[1], b[2], b[3]])
}

/// Lookups and learning in one tenant's table. Keys come from memory, as they do from a
/// packet buffer, in an order that defeats the prefetcher (a stride coprime with the size).
fn fdb(c: &mut Criterion) {
    let now = Timestamp(1_000_000);
    for entries in [256usize, 4096] {
        let limits = TenantLimits {
            max_learned: 8192,
            aging: Duration::from_secs(300),
        };
        let mut t = TenantFdb::new(Vni::new(42).unwrap(), limits);
        let known: Vec<MacAddr> = (0..entries as u32).map(mac).collect();
        let unknown: Vec<MacAddr> = (entries as u32..2 * entries as u32).map(mac).collect();
        for (i, m) in known.iter().enumerate() {
            t.learn(*m, Destination::Local(PortId(i as u32 % 16)), now);
        }
        let mask = entries - 1;
        let mut g = c.benchmark_group(format!("fdb/{entries}-entries"));
        g.throughput(Throughput::Elements(1));
        let mut i = 0usize;
        g.bench_function("lookup_hit", |b| {
            b.iter(|| {
                i = (i + 97) & mask;
                t.lookup(*black_box(&known[i]), now)
            })
        });
        g.bench_function("lookup_miss", |b| {
            b.iter(|| {
                i = (i + 97) & mask;
                t.lookup(*black_box(&unknown[i]), now)
            })
        });
        g.bench_function("learn_refresh", |b| {
            b.iter(|| {
                i = (i + 97) & mask;
                t.learn(*black_box(&known[i]), Destination::Local(PortId(3)), now)
            })
        });
        g.bench_function("learn_new_then_remove", |b| {
            b.iter(|| {
                i = (i + 97) & mask;
                let m = *black_box(&unknown[i]);
                t.learn(m, Destination::Local(PortId(1)), now);
                t.remove(m)
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = encap_decap, fdb
}
criterion_main!(benches);
