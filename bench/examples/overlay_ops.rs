//! Runs one overlay-net operation N times, for instruction counting under callgrind, which is
//! repeatable where wall-clock timings on a shared VM are not:
//!
//! ```sh
//! cargo build --release -p bench --example overlay_ops
//! for n in 0 1000000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/overlay_ops encap-v4 $n 2>&1 | grep refs
//! done   # instructions per operation = (refs(1000000) - refs(0)) / 1000000
//! ```
//! Operations: `encap-v4`, `decap-v4`, `encap-v6`, `decap-v6` (64-byte inner frames) and
//! `fdb-lookup` (hits in a 4096-entry table).

use std::hint::black_box;

use bench::{encapsulator, inner_udp_frame};
use overlay_net::{
    DecapConfig, Destination, MacAddr, PortId, TenantFdb, TenantLimits, Timestamp, Vni, decapsulate,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let op = args.next().unwrap_or_else(|| "encap-v4".into());
    let n: usize = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let vni = Vni::new(42).expect("constant VNI");
    let inner = inner_udp_frame(64);
    let mut acc = 0usize;
    match op.as_str() {
        "encap-v4" | "encap-v6" | "decap-v4" | "decap-v6" => {
            let enc = encapsulator(op.ends_with("v6"));
            let mut buf = vec![0u8; 256];
            let len = enc.encap(vni, &inner, &mut buf).expect("sample frame fits");
            let outer = buf[..len].to_vec();
            let cfg = DecapConfig::default();
            let encap = op.starts_with("encap");
            for _ in 0..n {
                acc += if encap {
                    enc.encap_in_place(vni, black_box(&mut buf), inner.len())
                        .unwrap_or(0)
                } else {
                    decapsulate(black_box(&outer), &cfg).map_or(0, |d| d.inner.len())
                };
            }
        }
        "fdb-lookup" => {
            let now = Timestamp(1);
            let mut t = TenantFdb::new(vni, TenantLimits::default());
            let keys: Vec<MacAddr> = (0..4096u32)
                .map(|i| {
                    let b = i.to_be_bytes();
                    MacAddr([2, 0x10, b[0], b[1], b[2], b[3]])
                })
                .collect();
            for k in &keys {
                t.learn(*k, Destination::Local(PortId(1)), now);
            }
            for i in 0..n {
                acc += t.lookup(*black_box(&keys[(i * 97) & 4095]), now).is_some() as usize;
            }
        }
        other => {
            eprintln!("unknown operation {other}");
            std::process::exit(2);
        }
    }
    println!("{acc}");
}
