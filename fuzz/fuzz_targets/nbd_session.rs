//! Fuzz target: a client's bytes after the greeting, through vblockd's NBD negotiation (every
//! option, STARTTLS refusal included) and, once an export is chosen, its request reader. No
//! input makes it panic; requests handed on are in range and sized as declared.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vblock::device::MemDevice;
use vblock::nbd::server::fuzzing::session;
use vblock::nbd::{ListenerPolicy, PoolExports};
use vblock::{Pool, PoolOptions};

fn exports() -> &'static PoolExports<MemDevice> {
    static EXPORTS: OnceLock<PoolExports<MemDevice>> = OnceLock::new();
    EXPORTS.get_or_init(|| {
        let pool = Pool::create(MemDevice::new(64 << 20), PoolOptions::default()).unwrap();
        pool.create_volume("v", 16 << 20).unwrap();
        pool.snapshot("v", "v@1").unwrap();
        PoolExports(Arc::new(pool))
    })
}

fuzz_target!(|data: &[u8]| {
    let every = ListenerPolicy::default();
    let some = ListenerPolicy {
        exports: vec!["v@1".into()],
        ..ListenerPolicy::default()
    };
    for policy in [&every, &some] {
        let (answer, _) = session(exports(), policy, data);
        // Every option reply starts with the reply magic.
        assert!(answer.is_empty() || answer.len() >= 8);
    }
});
