//! Fuzz target: what a guest or container hands vswitchd with a frame: the virtio-net header
//! (checksum and segmentation offload requests) and the frame, through the same offload
//! code the datapath runs (checksum completion, TCP segmentation, super-frame preparation
//! for the uplink, coalescing). No input makes it panic; segments fit the MSS they were cut
//! for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay_net::gso::{
    TcpCoalescer, TcpSegmenter, complete_checksum, finish_partial_checksum, prepare_tcp_super_frame,
};
use vswitch::tap::{VNET_HDR_LEN, VnetHeader};

fuzz_target!(|data: &[u8]| {
    let Some((header, frame)) = data.split_first_chunk::<VNET_HDR_LEN>() else {
        return;
    };
    let vnet = VnetHeader::parse(header);
    let mut frame = frame.to_vec();
    if vnet.flags & 1 != 0 {
        let _ = complete_checksum(
            &mut frame,
            usize::from(vnet.csum_start),
            usize::from(vnet.csum_offset),
        );
    }
    let _ = finish_partial_checksum(&mut frame.clone());
    if let Ok(mut seg) = TcpSegmenter::new(&frame, usize::from(vnet.gso_size)) {
        let mut out = vec![0u8; seg.max_segment_len()];
        let mut coalescer = TcpCoalescer::new();
        for _ in 0..64 {
            match seg.next_into(&mut out) {
                Some(Ok(n)) => {
                    assert!(n <= out.len());
                    coalescer.push(&out[..n]);
                }
                _ => break,
            }
        }
    }
    let mtu = 576 + usize::from(header[11]) * 32;
    let _ = prepare_tcp_super_frame(&mut frame, mtu);
});
