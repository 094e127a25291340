//! Fuzz target: whatever another host (or anyone with write access to etcd) puts under the
//! cluster's prefix, and whatever the local view cache holds, never panics the view, and a
//! program derived from it only names hosts that are members.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vswitch_cluster::{Change, ClusterView, Keys};

fuzz_target!(|data: &[u8]| {
    let keys = Keys::new("/lv/");
    let mut view = ClusterView::default();
    // Records separated by 0xff: key 0xfe value.
    for record in data.split(|b| *b == 0xff) {
        let change = match record.iter().position(|b| *b == 0xfe) {
            Some(i) => Change::Put {
                key: [b"/lv/".as_slice(), &record[..i]].concat(),
                value: record[i + 1..].to_vec(),
            },
            None => Change::Delete {
                key: [b"/lv/".as_slice(), record].concat(),
            },
        };
        let _ = view.apply(&keys, &change, &|t| t.len() % 2 == 0);
    }
    let underlay = ["192.0.2.1".parse().unwrap(), "fd00::1".parse().unwrap()];
    let tenants: Vec<String> = view.bindings.keys().cloned().collect();
    for t in tenants {
        let p = view.program("h1", &t, &underlay);
        for vtep in p.vteps.keys() {
            assert!(view.hosts.values().any(|h| h.underlay.iter().any(|a| a.to_canonical() == *vtep)));
        }
    }
    let _ = vswitch_cluster::cache::decode(data);
    let bytes = vswitch_cluster::cache::encode(&view);
    let back = vswitch_cluster::cache::decode(&bytes).expect("a cache written is read back");
    assert_eq!(back.hosts, view.hosts);
});
