//! Fuzz target: no input makes the receive path panic or read out of bounds, and whatever
//! decapsulation accepts is self-consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay_net::{DecapConfig, FrameView, decapsulate, flow, vxlan};

fuzz_target!(|data: &[u8]| {
    for cfg in [
        DecapConfig::default(),
        DecapConfig {
            accept_zero_udp6_checksum: true,
            ..DecapConfig::default()
        },
    ] {
        if let Ok(d) = decapsulate(data, &cfg) {
            assert!(d.inner.len() >= 14 && d.inner.len() <= data.len());
            // The inner frame lies inside the input.
            let start = d.inner.as_ptr() as usize - data.as_ptr() as usize;
            assert!(start + d.inner.len() <= data.len());
            let _ = FrameView::parse(d.inner);
            let _ = flow::source_port_for(d.inner);
        }
    }
    let _ = vxlan::parse(data);
    let _ = FrameView::parse(data);
});
