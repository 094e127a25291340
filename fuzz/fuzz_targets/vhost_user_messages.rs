//! Fuzz target: what a vhost-user frontend sends on the socket (headers, payloads, any
//! request in any order, sizes that lie), through the backend-side message handler both
//! daemons run (`vhost_device::Handler` behind the `vhost` crate's request reader). The
//! frontend's bytes arrive on a socket pair (no file descriptors: those a message needs
//! are missing, as from a frontend that sends none). No input makes it panic or allocate
//! without bound.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::BackendReqHandler;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_device::{Handler, StartedQueue, Stats, VhostDevice, config_slice};

/// A device with two queues of up to 256 entries, offering what vblockd's and vswitchd's
/// devices offer.
struct Device;

impl VhostDevice for Device {
    fn queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> u16 {
        256
    }
    fn features(&self) -> u64 {
        (1 << 32) | (1 << 29) | (1 << 30) | (1 << 28)
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK
    }
    fn config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_slice(&[7u8; 60], offset, size)
    }
    fn set_features(&self, _: u64) {}
    fn queue_started(self: Arc<Self>, _: usize, _: StartedQueue) -> std::io::Result<()> {
        Ok(())
    }
    fn queue_stopped(&self, _: usize) {}
}

fuzz_target!(|data: &[u8]| {
    // What fits a socket pair's buffer at once: the handler reads it all, then sees the end.
    let data = &data[..data.len().min(64 << 10)];
    let Ok((mut frontend, backend)) = UnixStream::pair() else {
        return;
    };
    if frontend.write_all(data).is_err() {
        return;
    }
    let _ = frontend.shutdown(std::net::Shutdown::Write);
    let handler = Arc::new(Mutex::new(Handler::new(
        Arc::new(Device),
        Arc::new(Stats::default()),
    )));
    let mut conn = BackendReqHandler::from_stream(backend, handler.clone());
    for _ in 0..4096 {
        if conn.handle_request().is_err() {
            break;
        }
    }
    handler.lock().unwrap_or_else(|p| p.into_inner()).stop_all();
});
